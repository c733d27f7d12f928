"""`validate --deployed`: source and slim quantised alike to GGUF, run by llama.cpp, scored against the float source
(issue 31, item 4). The scores are checked against an independent recomputation from llama.cpp's logits and against
validate's own float quality on the same windows."""
import json
import shutil
import sys

import numpy as np
import pytest
import torch
import yaml

from slimconv.cli import main
from test_gguf import llamacpp_logits, needs_llamacpp, wide_model as wide  # noqa: F401  (fixture)

QUALITY = {"quality": {"samples": 2, "seq_len": 64}}


def slim_output(src, out, blocks):
    recipe = out.with_suffix(".yaml")
    recipe.write_text(yaml.safe_dump({"model": str(src), "remove": {"blocks": blocks}, "output": {"dir": str(out)},
                                      "validate": QUALITY}))
    assert main(["convert", str(recipe)]) == 0


def _ppl(path, windows) -> float:
    nll, n = 0.0, 0
    for w in windows:
        logp = torch.log_softmax(torch.from_numpy(llamacpp_logits(path, w)), -1)[:-1]
        nll -= logp[np.arange(len(w) - 1), w[1:]].sum().item()
        n += len(w) - 1
    return float(np.exp(nll / n))


@needs_llamacpp
@pytest.mark.llamacpp
def test_deployed_scores_both_models_at_each_precision_and_the_card_shows_them(wide, tmp_path, capsys):
    from slimconv.data import load_text, token_chunks
    from slimconv.runtime import load_tokenizer

    out = tmp_path / "out"
    slim_output(wide, out, [1])
    assert main(["validate", str(out), "--deployed", "q4_0,q4_k_m"]) == 0
    said = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert said.count("is missing: exporting it now") == 2 and "quantising the source" in said
    record = json.loads((out / "slimconv_deployed.json").read_text())
    report = json.loads((out / "slimconv_report.json").read_text())
    texts = record["texts"]
    assert list(texts) == ["wikitext2 (test)", "King James"]
    for by_precision in texts.values():
        assert list(by_precision) == ["float", "q4_0", "q4_k_m"]
        for precision in ("q4_0", "q4_k_m"):
            src, slim = by_precision[precision]["source"], by_precision[precision]["slim"]
            assert 0 < src["kl_float_source"] < slim["kl_float_source"]  # slimming adds to the quantisation's loss
            assert slim["kl_same_precision_source"] > 0
    # The float row is validate's own float quality: same text, same windows.
    wt = texts["wikitext2 (test)"]["float"]
    assert wt["source"]["ppl"] == pytest.approx(report["quality"]["ppl_source"], rel=1e-4)
    assert wt["slim"]["ppl"] == pytest.approx(report["quality"]["ppl_slim"], rel=1e-4)
    assert wt["slim"]["kl_float_source"] == pytest.approx(report["quality"]["kl"], rel=1e-3)
    # The quantised rows are the deployed files' own perplexities, recomputed here from llama.cpp's logits.
    windows = [w.tolist() for w in token_chunks(load_tokenizer(out), load_text("wikitext2", "test"), 2, 64)]
    for precision in ("q4_0", "q4_k_m"):
        assert _ppl(out / "gguf" / f"out-{precision}.gguf", windows) == pytest.approx(
            texts["wikitext2 (test)"][precision]["slim"]["ppl"], rel=1e-3)
        assert _ppl(record["files"][precision]["source"]["file"], windows) == pytest.approx(
            texts["wikitext2 (test)"][precision]["source"]["ppl"], rel=1e-3)
    card = (out / "README.md").read_text()
    assert "## Deployed precision" in card and "| King James | q4_k_m |" in card
    # Again: the slim files are this folder's exports and the source's are in the cache, so nothing is exported.
    assert main(["validate", str(out), "--skip-quality", "--deployed", "q4_0"]) == 0
    said = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "exporting it now" not in said and "quantising the source" not in said
    assert list(json.loads((out / "slimconv_deployed.json").read_text())["texts"]["King James"]) == ["float", "q4_0"]


@needs_llamacpp
@pytest.mark.llamacpp
def test_a_stale_deployed_file_is_refused_and_nothing_is_recorded(wide, tmp_path, capsys):
    out, other = tmp_path / "out", tmp_path / "other"
    slim_output(wide, out, [1])
    slim_output(wide, other, [2])
    assert main(["export", str(other), "--format", "gguf", "--dtype", "q4_0"]) == 0
    (out / "gguf").mkdir()
    shutil.copy(other / "gguf" / "other-q4_0.gguf", out / "gguf" / "out-q4_0.gguf")
    assert main(["validate", str(out), "--skip-quality", "--deployed", "q4_0"]) == 2
    err = capsys.readouterr().err
    assert "out-q4_0.gguf was exported from other weights" in err and "slimconv export" in err
    assert not (out / "slimconv_deployed.json").exists()


def test_deployed_refusals_come_before_any_validation(wide, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    slim_output(wide, out, [1])
    assert main(["validate", str(out), "--deployed", "f32"]) == 2
    assert "f32" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp now raises ImportError
    assert main(["validate", str(out), "--deployed", "q4_0"]) == 2
    assert "pip install 'slimconv[gguf]'" in capsys.readouterr().err
    assert not (out / "slimconv_report.json").exists() and not (out / "gguf").exists()


def test_the_card_leaves_out_a_deployed_record_of_other_weights(wide, tmp_path):
    from slimconv.report import card_text

    out = tmp_path / "out"
    slim_output(wide, out, [1])
    row = {"source": {"ppl": 10.0, "kl_float_source": 0.1}, "slim": {"ppl": 12.0, "kl_float_source": 0.3,
                                                                     "kl_same_precision_source": 0.2}}
    record = dict(weights_sha256="0" * 64, engine="llama.cpp", samples=2, seq_len=64,
                  texts={"King James": {"q4_0": row}}, files={})
    (out / "slimconv_deployed.json").write_text(json.dumps(record))
    assert "Deployed precision" not in card_text(out)
    from slimconv.source import weights_sha256

    (out / "slimconv_deployed.json").write_text(json.dumps(dict(record, weights_sha256=weights_sha256(out))))
    assert "| King James | q4_0 | 10.00 | 12.00 | 1.200 | 0.100 | 0.300 | 0.200 |" in card_text(out)
