"""The families beyond Llama's layout (issue 28), on tiny random models built from transformers' own config classes:
every removal is exact against the run-time reference (logits and cached greedy tokens) in every format that can
carry the family, parallel groups fold where the sublayers are pre-norm and are refused elsewhere, and the analysis
engine scores candidates exactly as the reference computes them."""
import json
import random

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from helpers import (FAMILY_CONFIGS, PRE_NORM, assert_exact, convert, make_tiny, random_removals, reference_nll,
                     validate_analyse_search)
from slimconv.cli import main
from slimconv.errors import SlimError
from slimconv.plan import source_plan
from slimconv.source import Checkpoint

FAMILIES = list(FAMILY_CONFIGS)
CHANGES = {
    "blocks": dict(remove={"blocks": [1, "3-4"]}),
    "attention": dict(remove={"attention": "3-5"}),
    "mlp": dict(remove={"mlp": [0, 5]}),
    "mix": dict(remove={"blocks": [0], "attention": [2, 5], "mlp": [1]}),
}
# Pairs whose members share their attention's window and RoPE kind (SmolLM3's tiny model has no RoPE in layers 2
# and 5; Ministral's slides in layers 0, 1, 4, 5).
PAIRS = {"ministral": [[0, 1], [2, 3]]}
IDS = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {name: make_tiny(root / name, name) for name in FAMILIES}


@pytest.mark.parametrize("change", CHANGES)
@pytest.mark.parametrize("family", FAMILIES)
def test_removals_are_exact(families, tmp_path, family, change):
    plan = convert(families[family], tmp_path / "out", **CHANGES[change])
    assert_exact(families[family], tmp_path / "out", plan, IDS)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == (family if change == "blocks" else "slimconv")


@pytest.mark.parametrize("family", FAMILIES)
def test_random_recipes_are_exact(families, tmp_path, family):
    for k, remove in enumerate(random_removals(family)):
        out = tmp_path / f"out{k}"
        assert_exact(families[family], out, convert(families[family], out, remove=remove), IDS)


@pytest.mark.parametrize("norm", ["per_layer", "mean"])
@pytest.mark.parametrize("family", [f for f in FAMILIES if f in PRE_NORM])
def test_parallel_groups_fold_where_sublayers_are_pre_norm(families, tmp_path, family, norm):
    groups = PAIRS.get(family, [[0, 1], [3, 4]])
    plan = convert(families[family], tmp_path / "out", remove={"mlp": [5]}, parallel={"groups": groups, "norm": norm})
    assert_exact(families[family], tmp_path / "out", plan, IDS)


@pytest.mark.parametrize("family, norm", [("gemma2", "post_attention_layernorm"),
                                          ("gemma3_text", "post_feedforward_layernorm"),
                                          ("olmo2", "no attention input norm")])
def test_a_parallel_group_across_output_norms_is_refused_before_any_work(families, tmp_path, capsys, family, norm):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(dict(model=str(families[family]), parallel={"groups": [[0, 1]]},
                                          output={"dir": str(tmp_path / "out")})))
    assert main(["convert", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "parallel.groups [[0, 1]]" in err and norm in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family, key", [("gemma3_text", "layer_types"), ("smollm3", "no_rope_layers"),
                                         ("gemma2", "layer_types")])
def test_a_stock_output_slices_the_per_layer_lists(families, tmp_path, family, key):
    from transformers import AutoModelForCausalLM

    convert(families[family], tmp_path / "out", remove={"blocks": [1, 4]})
    source = json.loads((families[family] / "config.json").read_text())
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config[key] == [source[key][i] for i in (0, 2, 3, 5)]
    assert "auto_map" not in config and not (tmp_path / "out" / "modeling_slim.py").exists()
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # the stock class, no remote code


def test_phi3_stock_output_keeps_its_fused_tensors_and_slim_splits_them(families, tmp_path):
    convert(families["phi3"], tmp_path / "stock", remove={"blocks": [2]})
    convert(families["phi3"], tmp_path / "slim", remove={"attention": [2]})
    stock, slim = Checkpoint(tmp_path / "stock").where, Checkpoint(tmp_path / "slim").where
    assert "model.layers.0.self_attn.qkv_proj.weight" in stock and "model.layers.0.mlp.gate_up_proj.weight" in stock
    assert "model.layers.0.self_attn.q_proj.weight" in slim and "model.layers.0.mlp.gate_proj.weight" in slim
    assert not any("qkv_proj" in n or "gate_up" in n for n in slim)


# nemotron-nas needs MLP widths on its 256 grid and full rotary: sources of their own.
NAS = {"granite": dict(intermediate_size=256), "phi3": dict(intermediate_size=256, rope_parameters={
    "rope_type": "default", "rope_theta": 10000.0})}


@pytest.mark.parametrize("family", NAS)
def test_nemotron_nas_carries_granite_folded_and_phi3_split(tmp_path, family):
    src = make_tiny(tmp_path / "src", family, **NAS[family])
    plan = convert(src, tmp_path / "out", fmt="nemotron-nas", remove={"blocks": [1], "attention": [2, 5], "mlp": [0]})
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "nemotron-nas"
    assert not {"embedding_multiplier", "residual_multiplier", "logits_scaling"} & set(config)
    assert_exact(src, tmp_path / "out", plan, IDS)


@pytest.mark.parametrize("family, why", [("gemma2", "soft-capping"), ("gemma3_text", "RoPE that differs"),
                                         ("olmo2", "output norm"), ("smollm3", "layers without RoPE"),
                                         ("phi3", "partial rotary"), ("gemma", "gelu_pytorch_tanh")])
def test_nemotron_nas_names_what_it_cannot_carry(families, tmp_path, family, why):
    from slimconv.formats.nemotron import choose_format
    from slimconv.plan import build_plan
    from slimconv.recipe import parse_recipe

    config = Checkpoint(families[family]).config
    plan = build_plan(parse_recipe({"model": "x", "output": {"dir": "o"}, "remove": {"attention": [1]}}), config)
    with pytest.raises(SlimError) as e:
        choose_format("nemotron-nas", plan, config)
    assert why in str(e.value)
    assert choose_format("auto", plan, config)[0] == "slim"


@pytest.mark.parametrize("family", FAMILIES)
def test_the_analysis_engine_scores_candidates_as_the_reference_computes_them(families, family):
    from slimconv.selection.layerwise import LayerBank, Runner, candidate_nlls, group_spec

    src = families[family]
    ckpt = Checkpoint(src)
    cfg = ckpt.config
    runner = Runner(LayerBank(ckpt), IDS, batch_size=3)

    def reference(**recipe):
        return reference_nll(src, IDS, **recipe)

    cands = [(2, 1, []), (4, 1, [group_spec(cfg, [4], attention=False)]), (0, 0, [])]
    want = [reference(remove={"blocks": [2]}), reference(remove={"attention": [4]}), reference()]
    if family in PRE_NORM:
        pair = PAIRS.get(family, [[0, 1]])[0]
        cands.append((pair[0], 2, [group_spec(cfg, pair)]))
        want.append(reference(parallel={"groups": [pair]}))
    assert candidate_nlls(runner, source_plan(cfg).layers, cands) == pytest.approx(want, abs=1e-5)


def test_weights_holding_nan_are_refused_naming_the_tensor(families, tmp_path, capsys):
    import shutil

    src = shutil.copytree(families["granite"], tmp_path / "src")
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.3.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(dict(model=str(src), remove={"blocks": [1]}, output={"dir": str(tmp_path / "o")})))
    assert main(["convert", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "model.layers.3.mlp.up_proj.weight holds 1 NaN or Inf value(s)" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("family, change", [(f, c) for f in FAMILIES for c in ("blocks", "mix", "pairs")
                                            if c != "pairs" or f in PRE_NORM])
def test_onnx_runtime_matches_pytorch_with_the_cache(families, tmp_path, family, change):
    """The graph written node by node for each family's norms, scalars, soft-caps, RoPE kinds, partial rotary and
    activation: ONNX Runtime against the PyTorch checkpoint, prefill and cached decode, batch 1 and left-padded."""
    from slimconv.formats.onnx_export import export_onnx, validate_onnx

    recipe = (dict(parallel={"groups": PAIRS.get(family, [[0, 1], [3, 4]])}, remove={"mlp": [5]})
              if change == "pairs" else CHANGES[change])
    convert(families[family], tmp_path / "out", **recipe)
    (tmp_path / "onnx").mkdir()
    export_onnx(tmp_path / "out", tmp_path / "onnx")
    prompts = [torch.randint(1, 128, (n,), generator=torch.Generator().manual_seed(n)) for n in (12, 7, 3)]
    report = validate_onnx(tmp_path / "onnx", tmp_path / "out", prompts, steps=8, provider="cpu")
    assert report["passed"], report


@pytest.mark.parametrize("family", ["gemma3_text", "phi3", "olmo2"])
def test_every_stage_runs_on_the_family(families, tmp_path, family):
    """plan, convert, validate (exact), analyze, search, heal, ONNX export and bench on one family, as a user runs
    them (a word-level tokenizer so that the stages that read text can)."""
    from helpers import with_word_tokenizer

    src = with_word_tokenizer(families[family], tmp_path / "src", 127)
    rng = random.Random(0)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{rng.randrange(127)}" for _ in range(6000)))
    out = tmp_path / "out"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(dict(
        model=str(src), remove={"blocks": [1], "attention": [4]}, output={"dir": str(out)},
        validate={"exactness": {"prompt_tokens": 16, "greedy_tokens": 8},
                  "quality": {"data": str(text), "samples": 2, "seq_len": 32}})))
    assert main(["plan", str(recipe)]) == 0
    assert main(["convert", str(recipe)]) == 0
    validate_analyse_search(src, out, text, tmp_path)
    assert main(["heal", str(out), "--steps", "3", "--seq-len", "16", "--batch", "2", "--data", str(text),
                 "--eval-text", str(text)]) == 0
    assert main(["export", str(tmp_path / "out-healed")]) == 0
    assert main(["bench", str(src), str(out), "--runtime", "torch,onnx", "--repeats", "1", "--new-tokens", "2",
                 "--prompt-lens", "8"]) == 0
