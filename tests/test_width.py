"""Width (issue 30): narrowed MLPs and merged KV heads, on tiny random models of every dense family. A narrowed MLP
is exact against the source's MLP with the other channels masked to zero, merged KV heads against the source's own
attention module with its heads pooled, in the slim format, nemotron-nas, ONNX and (by running llama.cpp) GGUF deci;
channels are chosen by Minitron's activation rule; bad input is exit 2 before anything is written."""
import json

import pytest
import torch
import yaml

from helpers import (ARCH_CONFIGS, FAMILY_CONFIGS, TINY, assert_exact, compare, convert, make_tiny, reference_kl,
                     with_word_tokenizer)
from slimconv.cli import main
from slimconv.plan import costs, source_plan
from slimconv.source import Checkpoint

FAMILIES = list(ARCH_CONFIGS) + list(FAMILY_CONFIGS)
IDS = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(1))
WIDTH = TINY["intermediate_size"]
CHANNELS = [0, 3, 5, 7, 9, 11, 40, 41, 90]


def shrink(family: str) -> dict:
    """Narrow MLPs of three layers (one to a handful of scattered channels), and merge KV heads where the family
    allows it (OLMo 2's k norm spans all heads)."""
    out = {"mlp": {"1-2": CHANNELS, "4": list(range(0, WIDTH, 2))}}
    if family != "olmo2":
        out["kv_heads"] = {"0-3": 1}
    return out


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    root = tmp_path_factory.mktemp("width")
    return {name: make_tiny(root / name, name) for name in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_narrowed_layers_are_exact_with_removals(families, tmp_path, family):
    plan = convert(families[family], tmp_path / "out", remove={"attention": [5], "mlp": [0]}, shrink=shrink(family))
    assert [s.mlp.intermediate_size if s.mlp else None for s in plan.layers] == [None, 9, 9, WIDTH, WIDTH // 2, WIDTH]
    if family != "olmo2":
        kv = [s.attention.num_key_value_heads if s.attention else None for s in plan.layers]
        assert kv == [1, 1, 1, 1, 2, None]
    assert not plan.uniform and json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "slimconv"
    assert_exact(families[family], tmp_path / "out", plan, IDS)


def test_the_check_sees_a_wrong_channel_and_a_wrong_merge(families, tmp_path):
    """The reference masks channels and pools heads on its own: an output built for other channels, or with its KV
    heads from one source head instead of the mean, is far from it."""
    src = families["qwen2"]
    right = convert(src, tmp_path / "right", shrink={"mlp": {"2": CHANNELS}, "kv_heads": {"3": 1}})
    convert(src, tmp_path / "other", shrink={"mlp": {"2": CHANNELS[1:] + [91]}, "kv_heads": {"3": 1}})
    assert compare(src, tmp_path / "other", right, IDS)[0] > 1e-3
    from safetensors.torch import load_file, save_file

    path = tmp_path / "right" / "model.safetensors"
    tensors = load_file(path)
    full = load_file(src / "model.safetensors")["model.layers.3.self_attn.v_proj.weight"]
    tensors["model.layers.3.self_attn.v_proj.weight"] = full[:16].clone()
    save_file(tensors, path, metadata={"format": "pt"})
    assert compare(src, tmp_path / "right", right, IDS)[0] > 1e-3


def test_costs_count_the_narrower_layers(families):
    from slimconv.plan import build_plan
    from slimconv.recipe import parse_recipe

    config = Checkpoint(families["llama-tied"]).config
    plan = build_plan(parse_recipe({"model": "x", "output": {"dir": "x"},
                                    "shrink": {"mlp": {"0": list(range(48))}, "kv_heads": {"1": 1}}}), config)
    src, slim = costs(source_plan(config), config), costs(plan, config)
    h, hd = TINY["hidden_size"], TINY["hidden_size"] // TINY["num_attention_heads"]
    assert src["params"] - slim["params"] == 3 * h * 48 + 2 * h * hd
    assert src["kv_bytes_per_token"] - slim["kv_bytes_per_token"] == 2 * hd * 2


def test_channel_scores_rank_what_matters_and_a_fraction_keeps_the_highest(families, tmp_path, capsys):
    """Mean |activation| at the down projection's input: keeping the highest-scored half loses less than keeping the
    lowest; a recipe's fraction keeps the highest, chosen by convert (which says so), and the output is exact."""
    from slimconv.data import calibration_ids
    from slimconv.selection.channels import score_layers
    from slimconv.selection.experts import COUNT_CALIBRATION as C
    from slimconv.selection.layerwise import LayerBank, Runner

    src = with_word_tokenizer(families["llama-tied"], tmp_path / "src", 127)
    ckpt = Checkpoint(src)
    score = score_layers(Runner(LayerBank(ckpt), IDS), ckpt.config, {2})[2]
    order = sorted(range(WIDTH), key=lambda c: -score[c])

    change = lambda kept: reference_kl(src, IDS, shrink={"mlp": {"2": sorted(kept)}})
    best, worst = change(order[:48]), change(order[48:])
    assert best < worst / 2, (best, worst)

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(dict(model=str(src), shrink={"mlp": {"1-2": 0.5, "4": 20}, "kv_heads": {"3": 1}},
                                          output={"dir": str(tmp_path / "out")},
                                          validate={"exactness": {"prompt_tokens": 16, "greedy_tokens": 8},
                                                    "quality": {"enabled": False}})))
    assert main(["convert", str(recipe)]) == 0
    assert "MLP channels kept by 1-2: 0.5, 4: 20" in " ".join(capsys.readouterr().out.split())
    plan = json.loads((tmp_path / "out" / "slimconv_plan.json").read_text())["plan"]
    calib = calibration_ids(src, C["calib"], C["samples"], C["seq_len"], C["seed"])
    want = score_layers(Runner(LayerBank(ckpt), calib), ckpt.config, {1, 2, 4})
    for i, k in ((1, 48), (2, 48), (4, 20)):
        assert plan["layers"][i]["mlp"]["channels"] == sorted(sorted(range(WIDTH), key=lambda c: -want[i][c])[:k])
    assert "channels" not in json.dumps(json.loads((tmp_path / "out" / "config.json").read_text()))
    assert main(["validate", str(tmp_path / "out")]) == 0


@pytest.mark.parametrize("shrink, says", [
    ({"mlp": {"2": 1.5}}, "shrink.mlp['2']: fraction 1.5 is outside (0, 1)"),
    ({"mlp": {"2": 0.0}}, "fraction 0.0 is outside (0, 1)"),
    ({"mlp": {"2": 97}}, "shrink.mlp['2']: keep 97 channels, but the MLP has 96"),
    ({"mlp": {"0": [3, 96]}}, "layer 0: channel 96 does not exist"),
    ({"kv_heads": {"5": 3}}, "shrink.kv_heads['5']: 3 KV heads"),
    ({"mlp": {"0-2": 0.5}}, "shrink.mlp['0-2']: layer 1 is removed (remove.blocks)"),
    ({"kv_heads": {"4": 1}}, "layer 4 loses its attention (remove.attention)"),
    ({"mlp": {"3": [1, 2]}}, "layer 3 is in a parallel group"),
])
def test_bad_shrink_is_exit_2_naming_key_and_layer_before_writing(families, tmp_path, capsys, shrink, says):
    src = with_word_tokenizer(families["llama-tied"], tmp_path / "src", 127)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(dict(model=str(src), shrink=shrink, remove={"blocks": [1], "attention": [4]},
                                          parallel={"groups": [[2, 3]]}, output={"dir": str(tmp_path / "out")})))
    assert main(["convert", str(recipe)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert says in err and "fix:" in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_olmo2_kv_merge_and_a_mixture_of_experts_are_refused_saying_why(tmp_path, capsys):
    src = make_tiny(tmp_path / "olmo2", "olmo2")
    moe = make_tiny(tmp_path / "moe", "qwen3_moe")
    for model, section, says in ((src, {"kv_heads": {"1": 1}}, "k norm spans all KV heads"),
                                 (moe, {"mlp": {"1": [0, 1]}}, "layer 1's MLP is a mixture of experts")):
        recipe = tmp_path / "r.yaml"
        recipe.write_text(yaml.safe_dump(dict(model=str(model), shrink=section, output={"dir": str(tmp_path / "o")})))
        assert main(["convert", str(recipe)]) == 2
        assert says in " ".join(capsys.readouterr().err.split())


def test_onnx_has_each_layers_shapes_and_matches_pytorch_with_cache(families, tmp_path, capsys):
    import onnx

    from slimconv.formats.onnx_export import export_onnx, validate_onnx

    for family in ("qwen3", "llama-bias-untied"):
        slim, graph_dir = tmp_path / family, tmp_path / f"{family}-onnx"
        convert(families[family], slim, remove={"mlp": [0]}, shrink=shrink(family))
        graph_dir.mkdir()
        info = export_onnx(slim, graph_dir)
        assert not info["genai_config"] and not (graph_dir / "genai_config.json").exists()
        prompts = [torch.randint(1, 128, (n,), generator=torch.Generator().manual_seed(n)) for n in (12, 7, 3)]
        report = validate_onnx(graph_dir, slim, prompts, steps=16, provider="cpu")
        assert report["passed"], report
        graph = onnx.load(str(graph_dir / "model.onnx"), load_external_data=False).graph
        gqa = [dict((a.name, a.i) for a in n.attribute) for n in graph.node if n.op_type == "GroupQueryAttention"]
        assert [g["kv_num_heads"] for g in gqa] == [1, 1, 1, 1, 2, 2]
        past = [i.type.tensor_type.shape.dim[1].dim_value for i in graph.input if i.name.startswith("past_")]
        assert past == [1] * 8 + [2] * 4
        assert json.loads((graph_dir / "config.json").read_text())["cache_kv_heads"] == [1, 1, 1, 1, 2, 2]


def test_analyze_writes_every_channels_score(families, tmp_path):
    src = with_word_tokenizer(families["llama-tied"], tmp_path / "src", 127)
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i % 127}" for i in range(3000)))
    assert main(["analyze", str(src), "-o", str(tmp_path / "an"), "--calib", str(text), "--samples", "2",
                 "--seq-len", "32", "--sleb-blocks", "0", "--no-group-ppl"]) == 0
    metrics = json.loads((tmp_path / "an" / "metrics.json").read_text())
    assert set(metrics["channels"]) == {str(i) for i in range(6)}
    assert all(len(v) == WIDTH and min(v) >= 0 for v in metrics["channels"].values())
    assert "## MLP channels" in (tmp_path / "an" / "report.md").read_text()
