"""Multimodal checkpoints (issue 28): Gemma 3 and Mistral 3 with their vision tower, on tiny random models built from
transformers' config classes. Every stage reads the text model inside; a blocks-only output is the source's own
multimodal class with the vision tower copied bit for bit, and anything else needs `output.text_only`."""
import json

import pytest
import torch
import transformers
import yaml
from safetensors.torch import load_file, save_file

from helpers import (MULTIMODAL_CONFIGS, assert_exact, convert, make_multimodal, random_removals,
                     validate_analyse_search, with_word_tokenizer)
from slimconv.cli import main
from slimconv.runtime import load_model

NAMES = list(MULTIMODAL_CONFIGS)
IDS = torch.randint(0, 120, (2, 20), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("multimodal")
    return {name: make_multimodal(root / name, name) for name in NAMES}


def _multimodal(directory):
    return transformers.AutoModelForImageTextToText.from_pretrained(str(directory), dtype=torch.float32).eval()


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_the_text_model_slimconv_reads_is_the_multimodal_models_text_path(models, name):
    full, text = _multimodal(models[name]), load_model(models[name])
    assert (full(input_ids=IDS).logits - text(input_ids=IDS).logits).abs().max().item() == 0.0


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_a_blocks_only_output_is_the_multimodal_model_with_its_vision_tower_untouched(models, tmp_path, name):
    src, out = models[name], tmp_path / "out"
    plan = convert(src, out, remove={"blocks": [1, "3-4"]})
    assert_exact(src, out, plan, IDS)
    config = json.loads((out / "config.json").read_text())
    source = json.loads((src / "config.json").read_text())
    assert config["model_type"] == name and config["architectures"] == source["architectures"]
    assert config["text_config"]["num_hidden_layers"] == 3
    if "layer_types" in source["text_config"]:
        assert config["text_config"]["layer_types"] == [source["text_config"]["layer_types"][i] for i in (0, 2, 5)]
    assert {k: v for k, v in config.items() if k != "text_config"} == {
        k: v for k, v in source.items() if k not in ("text_config", "transformers_version")} | {
        "dtype": config["dtype"]} | ({"transformers_version": source["transformers_version"]}
                                    if "transformers_version" in config else {})
    before, after = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    vision = [k for k in before if not k.startswith("language_model.")]
    assert vision and all(torch.equal(before[k], after[k]) for k in vision)
    assert not [k for k in after if k.startswith("language_model.model.layers.3.")]
    # The output loads in transformers' own multimodal class: text as the slim text model, the vision side as the
    # source's.
    slim, ref = _multimodal(out), _multimodal(src)
    assert (slim(input_ids=IDS).logits - load_model(out)(input_ids=IDS).logits).abs().max().item() == 0.0
    for part in ("vision_tower", "multi_modal_projector"):
        a, b = getattr(slim.model, part).state_dict(), getattr(ref.model, part).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", NAMES)
def test_text_only_outputs_carry_any_removal_exactly(models, tmp_path, name):
    for k, remove in enumerate(random_removals(name)):
        out = tmp_path / f"out{k}"
        plan = convert(models[name], out, remove=remove, output={"dir": str(out), "text_only": True})
        assert_exact(models[name], out, plan, IDS)
        config = json.loads((out / "config.json").read_text())
        assert "vision_config" not in config and not [n for n in load_file(out / "model.safetensors")
                                                      if "vision" in n or n.startswith("language_model.")]


def test_the_older_layout_is_read_and_kept(models, tmp_path):
    """transformers 4.52-4.57 stored the text model under model.language_model. and the head as lm_head."""
    src = tmp_path / "src"
    src.mkdir()
    for f in models["mistral3"].iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    state = load_file(src / "model.safetensors")
    renamed = {k.replace("language_model.model.", "model.language_model.").replace("language_model.lm_head.",
                                                                                   "lm_head."): v
               for k, v in state.items()}
    save_file(renamed, src / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    plan = convert(src, out, remove={"blocks": [2]})
    assert_exact(src, out, plan, IDS)
    names = load_file(out / "model.safetensors")
    assert "model.language_model.embed_tokens.weight" in names and "lm_head.weight" in names


def _recipe(tmp_path, src, **extra):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(dict(model=str(src), output={"dir": str(tmp_path / "out")}, **extra)))
    return str(recipe)


def test_sublayer_removal_needs_text_only_and_says_so(models, tmp_path, capsys):
    recipe = _recipe(tmp_path, models["gemma3"], remove={"attention": [2]})
    assert main(["convert", recipe]) == 2
    err = capsys.readouterr().err
    assert "multimodal 'gemma3'" in err and "text_only: true" in err and "remove.blocks" in err
    assert not (tmp_path / "out").exists()


def test_a_multimodal_checkpoint_without_its_text_model_is_refused_naming_what_it_holds(models, tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for f in models["gemma3"].iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    state = load_file(src / "model.safetensors")
    save_file({k.replace("language_model.model.", "text.model."): v for k, v in state.items()},
              src / "model.safetensors", metadata={"format": "pt"})
    assert main(["convert", _recipe(tmp_path, src, remove={"blocks": [1]})]) == 2
    err = capsys.readouterr().err
    assert "language_model.model.embed_tokens.weight" in err and "text.model" in err


@pytest.mark.parametrize("fmt", ["gguf", "onnx"])
def test_exports_of_a_multimodal_output_are_refused_with_the_way_out(models, tmp_path, capsys, fmt):
    out = tmp_path / "out"
    convert(models["gemma3"], out, remove={"blocks": [1]})
    assert main(["export", str(out), "--format", fmt]) == 2
    err = capsys.readouterr().err
    assert "multimodal 'gemma3'" in err and "text_only" in err


def test_every_stage_runs_on_a_multimodal_source(models, tmp_path):
    """plan, convert, validate (exact), analyze, search, heal and bench on Gemma 3 with its vision tower, as a
    user runs them; the healed output is still the multimodal model, its vision tower untouched."""
    import random

    src = with_word_tokenizer(models["gemma3"], tmp_path / "src", 120)
    rng = random.Random(0)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{rng.randrange(120)}" for _ in range(6000)))
    out = tmp_path / "out"
    recipe = _recipe(tmp_path, src, remove={"blocks": [1, 4]},
                     validate={"exactness": {"prompt_tokens": 16, "greedy_tokens": 8},
                               "quality": {"data": str(text), "samples": 2, "seq_len": 32}})
    assert main(["plan", recipe]) == 0
    assert main(["convert", recipe]) == 0
    validate_analyse_search(src, out, text, tmp_path)
    assert main(["heal", str(out), "--steps", "3", "--seq-len", "16", "--batch", "2", "--data", str(text),
                 "--eval-text", str(text)]) == 0
    healed = tmp_path / "out-healed"
    before, after = load_file(src / "model.safetensors"), load_file(healed / "model.safetensors")
    vision = [k for k in before if not k.startswith("language_model.")]
    assert all(torch.equal(before[k], after[k]) for k in vision)
    assert json.loads((healed / "config.json").read_text())["model_type"] == "gemma3"
    _multimodal(healed)
    assert main(["bench", str(src), str(out), "--runtime", "torch", "--repeats", "1", "--new-tokens", "2",
                 "--prompt-lens", "8"]) == 0
