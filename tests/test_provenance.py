"""Exports belong to the weights they were made from (issue 34): heal never carries the unhealed model's GGUF or
ONNX files into the healed folder, every export records its weights' sha256, and push refuses one that
records other weights (validate and bench warn or refuse too)."""
import random
import shutil

import pytest
import yaml

from helpers import BPE_TEXT, BPE_VOCAB, bpe_tokenizer, make_tiny
from slimconv.cli import main
from slimconv.provenance import GGUF_KEY, find_exports, gguf_record, onnx_record
from slimconv.source import weights_sha256


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """The user's session of issue 34 on a tiny Llama: convert, validate, export GGUF (q4_0, f32) and ONNX,
    heal, export the healed model again."""
    root = tmp_path_factory.mktemp("provenance")
    src = make_tiny(root / "src", "llama-tied", vocab_size=BPE_VOCAB)
    bpe_tokenizer(src)
    words = BPE_TEXT.split()
    rng = random.Random(0)
    text = root / "text.txt"
    text.write_text(" ".join(rng.choice(words) for _ in range(4000)))
    recipe = root / "b.yaml"
    recipe.write_text(yaml.safe_dump(dict(
        model=str(src), remove={"blocks": [2]}, output={"dir": str(root / "b6")},
        validate={"exactness": {"prompt_tokens": 16, "greedy_tokens": 8},
                  "quality": {"data": str(text), "samples": 2, "seq_len": 32}})))
    out, healed = root / "b6", root / "b6-healed"
    assert main(["convert", str(recipe)]) == 0
    assert main(["validate", str(out)]) == 0
    for args in (["--format", "gguf", "--dtype", "q4_0"], ["--format", "gguf", "--dtype", "f32"], []):
        assert main(["export", str(out), *args]) == 0
    assert main(["heal", str(out), "--steps", "3", "--seq-len", "16", "--batch", "2", "--data", str(text),
                 "--eval-text", str(text)]) == 0
    for args in (["--format", "gguf", "--dtype", "q4_0"], ["--format", "gguf", "--dtype", "f32"], []):
        assert main(["export", str(healed), *args]) == 0
    return out, healed


def test_the_healed_folder_holds_only_its_own_exports(session):
    out, healed = session
    assert sorted(p.name for p in (healed / "gguf").iterdir()) == ["b6-healed-f32.gguf", "b6-healed-q4_0.gguf"]
    assert weights_sha256(healed) != weights_sha256(out)
    exports = find_exports(healed)
    assert sorted(e.kind for e in exports) == ["gguf", "gguf", "onnx"]
    assert {e.status for e in exports} == {"own"}
    assert gguf_record(healed / "gguf" / "b6-healed-f32.gguf") == weights_sha256(healed)
    assert onnx_record(healed / "onnx") == weights_sha256(healed)
    # The unhealed folder's exports record the unhealed weights.
    assert {e.status for e in find_exports(out)} == {"own"}
    assert gguf_record(out / "gguf" / "b6-q4_0.gguf") == weights_sha256(out)


def test_push_dry_run_of_the_healed_folder_lists_only_its_own_exports(session, capsys):
    _, healed = session
    assert main(["push", str(healed), "--repo-id", "someone/test", "--dry-run", "--include-onnx"]) == 0
    listing = capsys.readouterr().out
    assert "b6-healed-q4_0.gguf" in listing and "b6-q4_0.gguf" not in listing


def test_push_refuses_a_stale_gguf_planted_by_hand(session, tmp_path, capsys):
    out, healed = session
    copy = tmp_path / "b6-healed"
    shutil.copytree(healed, copy)
    shutil.copy2(out / "gguf" / "b6-q4_0.gguf", copy / "gguf" / "b6-q4_0.gguf")
    assert main(["push", str(copy), "--repo-id", "someone/test", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "b6-q4_0.gguf was exported from other weights" in err
    assert "delete it, then export again" in err and "--dtype q4_0" in err
    assert "files to upload" not in err


def test_push_refuses_a_stale_onnx_folder_only_when_it_is_uploaded(session, tmp_path, capsys):
    out, healed = session
    copy = tmp_path / "b6-healed"
    shutil.copytree(healed, copy)
    shutil.rmtree(copy / "onnx")
    shutil.copytree(out / "onnx", copy / "onnx")
    assert main(["push", str(copy), "--repo-id", "someone/test", "--dry-run", "--include-onnx"]) == 2
    assert "onnx was exported from other weights" in capsys.readouterr().err
    # Without --include-onnx the onnx/ folder is not uploaded, so nothing stale would reach the Hub.
    assert main(["push", str(copy), "--repo-id", "someone/test", "--dry-run"]) == 0


def test_an_export_that_predates_the_record_is_a_warning_not_a_refusal(session, tmp_path, capsys):
    import gguf

    _, healed = session
    copy = tmp_path / "b6-healed"
    shutil.copytree(healed, copy)
    old = copy / "gguf" / "old-f32.gguf"
    reader = gguf.GGUFReader(str(copy / "gguf" / "b6-healed-f32.gguf"))
    writer = gguf.GGUFWriter(str(old), "llama")
    for name, field in reader.fields.items():  # the same file, minus the record
        if name == GGUF_KEY or name.startswith("GGUF.") or name == "general.architecture":
            continue
        writer.add_key_value(name, field.contents(), field.types[0], sub_type=field.types[-1]
                             if field.types[0] == gguf.GGUFValueType.ARRAY else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    assert gguf_record(old) is None
    assert main(["push", str(copy), "--repo-id", "someone/test", "--dry-run"]) == 0
    assert "old-f32.ggufrecordsnoweightshash" in "".join(capsys.readouterr().out.split())


def test_validate_warns_about_a_stale_export_and_bench_refuses_a_stale_graph(session, tmp_path, capsys):
    import json

    out, healed = session
    copy = tmp_path / "b6-healed"
    shutil.copytree(healed, copy)
    shutil.copy2(out / "gguf" / "b6-f32.gguf", copy / "gguf" / "b6-f32.gguf")
    shutil.rmtree(copy / "onnx")
    shutil.copytree(out / "onnx", copy / "onnx")
    assert main(["validate", str(copy), "--skip-quality"]) == 0
    printed = "".join(capsys.readouterr().out.split())
    assert "b6-f32.ggufwasexportedfromotherweights" in printed and "onnxwasexportedfromother" in printed
    report = json.loads((copy / "slimconv_report.json").read_text())
    assert {e["status"] for e in report["exports_not_of_these_weights"]} == {"stale"}
    src = json.loads((copy / "slimconv_plan.json").read_text())["model"]
    assert main(["bench", src, str(copy), "--runtime", "onnx", "--repeats", "1", "--new-tokens", "2",
                 "--prompt-lens", "8"]) == 2
    assert "onnx was exported from other weights" in capsys.readouterr().err
