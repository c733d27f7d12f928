import pytest

from slimconv.data import load_text
from slimconv.errors import SlimError


def test_wikitext_ships_with_the_package(monkeypatch):
    monkeypatch.delenv("SLIMCONV_DATA_DIR", raising=False)
    valid, test = load_text("wikitext2", "valid"), load_text("wikitext2", "test")
    assert len(valid) > 1_000_000 and len(test) > 1_000_000 and valid[:2000] != test[:2000]
    assert "<unk>" in test


def test_data_dir_overrides_the_packaged_copy(tmp_path, monkeypatch):
    (tmp_path / "wikitext-2").mkdir()
    (tmp_path / "wikitext-2" / "test.txt").write_text("my own test text")
    monkeypatch.setenv("SLIMCONV_DATA_DIR", str(tmp_path))
    assert load_text("wikitext2", "test") == "my own test text"
    with pytest.raises(SlimError, match="SLIMCONV_DATA_DIR") as e:
        load_text("wikitext2", "valid")
    assert e.value.fix
