"""Mixtures of experts (issue 29), on tiny random Qwen3-MoE, Mixtral and Qwen2-MoE models built from transformers'
own config classes: removing blocks, attention and MoE sublayers is exact against the run-time reference (logits and
cached greedy tokens), a stock output keeps the layers' kinds true, the formats that cannot carry experts say so, and
every stage runs on an MoE source."""
import json
import random

import numpy as np
import pytest
import torch
import yaml

from helpers import (MOE_CONFIGS, assert_exact, compare, convert, make_tiny, random_removals, reference_nll,
                     validate_analyse_search, with_word_tokenizer)
from slimconv.cli import main
from slimconv.errors import SlimError
from slimconv.plan import costs, source_plan
from slimconv.source import Checkpoint

FAMILIES = list(MOE_CONFIGS)
CHANGES = {
    "blocks": dict(remove={"blocks": [1, "3-4"]}),
    "attention": dict(remove={"attention": "3-5"}),
    "mlp": dict(remove={"mlp": [0, 3]}),
    "mix": dict(remove={"blocks": [0], "attention": [2, 5], "mlp": [1]}),
}
IDS = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
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


def test_a_wrong_expert_is_seen_by_the_exactness_check(families, tmp_path):
    """The tiny models route decisively and their experts matter: two experts swapped is a large error."""
    from safetensors.torch import load_file, save_file

    plan = convert(families["qwen2_moe"], tmp_path / "out", remove={"attention": [2]})
    path = tmp_path / "out" / "model.safetensors"
    tensors = load_file(path)
    a, b = (f"model.layers.1.mlp.experts.{e}.down_proj.weight" for e in (0, 1))
    tensors[a], tensors[b] = tensors[b].clone(), tensors[a].clone()
    save_file(tensors, path, metadata={"format": "pt"})
    assert compare(families["qwen2_moe"], tmp_path / "out", plan, IDS)[0] > 1e-2


@pytest.mark.parametrize("family, dense", [("qwen3_moe", [1]), ("qwen2_moe", [0, 1])])
def test_a_stock_output_says_which_layers_stay_dense(families, tmp_path, family, dense):
    """Source layers 2 (Qwen3-MoE's mlp_only_layers) and 0, 2, 4 (Qwen2-MoE's period of 2) are dense; without
    blocks 1, 3 and 4 the dense layers are written out as indices with a period of 1."""
    from transformers import AutoModelForCausalLM

    convert(families[family], tmp_path / "out", remove={"blocks": [1, 3, 4]})
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["mlp_only_layers"] == dense and config["decoder_sparse_step"] == 1
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert [hasattr(layer.mlp, "experts") for layer in model.model.layers] == [j not in dense for j in range(3)]


def test_the_slim_format_stores_each_expert_apart_under_one_layout(families, tmp_path):
    convert(families["mixtral"], tmp_path / "out", remove={"attention": [0]})
    names = Checkpoint(tmp_path / "out").where
    assert "model.layers.0.mlp.gate.weight" in names and "model.layers.0.mlp.experts.3.down_proj.weight" in names
    assert not any("block_sparse_moe" in n for n in names)


def test_a_parallel_group_over_moe_layers_is_refused_before_any_work(families, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(dict(model=str(families["qwen3_moe"]), parallel={"groups": [[0, 1]]},
                                          output={"dir": str(tmp_path / "out")})))
    assert main(["convert", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "parallel.groups [[0, 1]]" in err and "mixtures of experts" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_attentions_run_in_parallel_where_the_moe_sublayers_go(families, tmp_path):
    """Qwen2-MoE's layers 0 (dense) and 1 (sparse) as a pair with layer 1's MoE removed: a wide attention, one MLP."""
    plan = convert(families["qwen2_moe"], tmp_path / "out", remove={"mlp": [1]}, parallel={"groups": [[0, 1]]})
    assert plan.layers[0].attention.num_heads == 8 and plan.layers[0].mlp.experts is None
    assert_exact(families["qwen2_moe"], tmp_path / "out", plan, IDS)


@pytest.mark.parametrize("family", FAMILIES)
def test_costs_count_active_and_total_parameters(families, family):
    from transformers import AutoModelForCausalLM

    config = Checkpoint(families[family]).config
    c = costs(source_plan(config), config)
    model = AutoModelForCausalLM.from_pretrained(families[family])
    # (costs count a q/k norm per head, as the slim format stores it; a stock Qwen3-MoE shares one across heads)
    assert c["params"] == pytest.approx(sum(p.numel() for p in model.parameters()), rel=1e-2)
    arch_experts, top_k = 4, 2
    hidden, width = config["hidden_size"], (config.get("moe_intermediate_size") or config["intermediate_size"])
    sparse = sum(1 for layer in model.model.layers if hasattr(layer.mlp, "experts"))
    assert c["params"] - c["active_params"] == sparse * (arch_experts - top_k) * 3 * hidden * width


@pytest.mark.parametrize("fmt, why", [("nemotron-nas", "mixtures of experts")])
def test_nemotron_nas_names_the_experts(families, fmt, why):
    from slimconv.formats.nemotron import choose_format
    from slimconv.plan import build_plan
    from slimconv.recipe import parse_recipe

    config = Checkpoint(families["mixtral"]).config
    plan = build_plan(parse_recipe({"model": "x", "output": {"dir": "o"}, "remove": {"attention": [1]}}), config)
    with pytest.raises(SlimError, match=why):
        choose_format(fmt, plan, config)
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

    cands = [(2, 1, []), (3, 1, [group_spec(cfg, [3], mlp=False)]), (4, 1, [group_spec(cfg, [4], attention=False)]),
             (0, 0, [])]
    want = [reference(remove={"blocks": [2]}), reference(remove={"mlp": [3]}), reference(remove={"attention": [4]}),
            reference()]
    assert candidate_nlls(runner, source_plan(cfg).layers, cands) == pytest.approx(want, abs=1e-5)


def test_every_stage_runs_on_an_moe_source(families, tmp_path, capsys):
    """plan, convert, validate (exact), analyze, search, heal (router frozen), bench on Qwen2-MoE (a shared expert
    and dense layers between sparse ones) as a user runs them; ONNX exports it, GGUF refuses (a sublayer is removed)."""
    from safetensors import safe_open

    src = with_word_tokenizer(families["qwen2_moe"], tmp_path / "src", 127)
    rng = random.Random(0)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{rng.randrange(127)}" for _ in range(6000)))
    out = tmp_path / "out"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(dict(
        model=str(src), remove={"blocks": [2], "mlp": [3]}, output={"dir": str(out)},
        validate={"exactness": {"prompt_tokens": 16, "greedy_tokens": 8},
                  "quality": {"data": str(text), "samples": 2, "seq_len": 32}})))
    assert main(["plan", str(recipe)]) == 0
    assert "active" in capsys.readouterr().out
    assert main(["convert", str(recipe)]) == 0
    validate_analyse_search(src, out, text, tmp_path)
    assert main(["heal", str(out), "--train", "all", "--steps", "3", "--seq-len", "16", "--batch", "2", "--data",
                 str(text), "--eval-text", str(text)]) == 0
    healed = json.loads((tmp_path / "out-healed" / "slimconv_plan.json").read_text())["heal"]["trained_tensors"]
    assert "model.layers.1.mlp.experts.0.down_proj.weight" in healed and not any(n.endswith("mlp.gate.weight")
                                                                                  for n in healed)
    with safe_open(out / "model.safetensors", "pt") as a, safe_open(tmp_path / "out-healed" / "model.safetensors",
                                                                    "pt") as b:
        router = "model.layers.1.mlp.gate.weight"
        assert torch.equal(a.get_tensor(router), b.get_tensor(router))
    capsys.readouterr()
    assert main(["export", str(out)]) == 0  # ONNX Runtime's MoE node, checked against PyTorch
    assert main(["export", str(out), "--format", "gguf"]) == 2
    assert "mixtures of experts" in capsys.readouterr().err
    assert main(["bench", str(src), str(out), "--runtime", "torch", "--repeats", "1", "--new-tokens", "2",
                 "--prompt-lens", "8"]) == 0


def test_heal_of_a_stock_moe_output_writes_experts_back_apart(families, tmp_path):
    """transformers holds a stock output's experts as 3-D tensors; heal writes them back under the checkpoint's
    per-expert names (Mixtral's w1/w3/w2), trained, with the router as it was."""
    from safetensors import safe_open

    src = with_word_tokenizer(families["mixtral"], tmp_path / "src", 127)
    text = tmp_path / "text.txt"
    rng = random.Random(1)
    text.write_text(" ".join(f"w{rng.randrange(127)}" for _ in range(3000)))
    out = tmp_path / "out"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(dict(model=str(src), remove={"blocks": [1]}, output={"dir": str(out)}, validate={
        "exactness": {"prompt_tokens": 16, "greedy_tokens": 4}, "quality": {"data": str(text), "samples": 2,
                                                                         "seq_len": 32}})))
    assert main(["convert", str(recipe)]) == 0
    assert main(["validate", str(out)]) == 0
    assert main(["heal", str(out), "--train", "all", "--steps", "2", "--seq-len", "16", "--batch", "2", "--data",
                 str(text), "--eval-text", str(text)]) == 0
    with safe_open(out / "model.safetensors", "pt") as a, safe_open(tmp_path / "out-healed" / "model.safetensors",
                                                                    "pt") as b:
        assert set(a.keys()) == set(b.keys())
        w1 = "model.layers.0.block_sparse_moe.experts.2.w1.weight"
        router = "model.layers.0.block_sparse_moe.gate.weight"
        assert not torch.equal(a.get_tensor(w1), b.get_tensor(w1))
        assert torch.equal(a.get_tensor(router), b.get_tensor(router))


# Sparse layers of the tiny models beside layer 1 (Qwen3-MoE: all but 2; Mixtral: all; Qwen2-MoE: the odd ones).
SPARSE = {"qwen3_moe": "3-5", "mixtral": "2-5", "qwen2_moe": "3"}


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_experts_match_the_reference_that_masks_them_out_of_the_router(families, tmp_path, family):
    """remove.experts keeps listed experts (the router loses the others' rows); the reference takes the others out of
    the source's own MoE block, so its softmax runs over the kept ones. One layer keeps a single expert (top-k capped
    to 1). The pruned model really differs from the source, and pruning other experts than the reference is seen."""
    from slimconv.reference import apply_plan
    from slimconv.runtime import load_model

    recipe = dict(remove={"experts": {"1": [3], SPARSE[family]: [0, 2]}, "cap_top_k": True, "attention": [4]})
    plan = convert(families[family], tmp_path / "out", **recipe)
    assert plan.layers[1].mlp.experts == [3] and plan.layers[1].mlp.top_k == 1
    assert_exact(families[family], tmp_path / "out", plan, IDS)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "slimconv"
    assert Checkpoint(tmp_path / "out").shapes["model.layers.1.mlp.gate.weight"] == (1, 64)
    unpruned = convert(families[family], tmp_path / "unpruned", remove={"attention": [4]})
    with torch.no_grad():
        a = load_model(tmp_path / "out")(input_ids=IDS).logits
        b = apply_plan(load_model(families[family]), unpruned)(input_ids=IDS).logits
    assert (a - b).abs().max() > 1e-2
    other = convert(families[family], tmp_path / "other", remove={"experts": {"1": [2], SPARSE[family]: [0, 2]},
                                                                   "cap_top_k": True, "attention": [4]})
    assert compare(families[family], tmp_path / "other", plan, IDS)[0] > 1e-2 and other.layers[1].mlp.experts == [2]


def test_costs_shrink_with_pruned_experts(families):
    from slimconv.plan import build_plan
    from slimconv.recipe import parse_recipe

    config = Checkpoint(families["mixtral"]).config
    plan = build_plan(parse_recipe({"model": "x", "output": {"dir": "o"}, "remove": {"experts": {"0-5": [0, 1]}}}),
                      config)
    src, slim = costs(source_plan(config), config), costs(plan, config)
    expert = 3 * config["hidden_size"] * config["intermediate_size"]
    assert src["params"] - slim["params"] == 6 * 2 * (expert + config["hidden_size"])
    assert slim["active_params"] == slim["params"]  # two kept, two routed: every kept expert is read
    assert src["decode_flops_per_token"] - slim["decode_flops_per_token"] == 2 * 6 * 2 * config["hidden_size"]


@pytest.mark.parametrize("family, experts, extra, says", [
    ("llama-tied", {"0": [0]}, {}, "has no mixture-of-experts layers"),
    ("qwen3_moe", {"2": [0, 1]}, {}, "layer 2 has a dense MLP"),
    ("qwen3_moe", {"0": [0, 4]}, {}, "expert 4 does not exist (the layer has 4: 0-3)"),
    ("qwen3_moe", {"0": [1, 1]}, {}, "an expert is listed twice"),
    ("qwen3_moe", {"0": [1]}, {}, "layer 0 keeps 1 experts but routes each token to 2"),
    ("qwen3_moe", {"0-1": [1, 2], "1": [0, 1]}, {}, "layer 1 is also named"),
    ("mixtral", {"3": [0, 1]}, {"blocks": [3]}, "layer 3 loses its MLP"),
])
def test_bad_expert_lists_exit_2_naming_the_layer_and_the_fix(tmp_path, capsys, family, experts, extra, says):
    src = make_tiny(tmp_path / "src", family)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(dict(model=str(src), remove={"experts": experts, **extra},
                                          output={"dir": str(tmp_path / "out")})))
    assert main(["convert", str(recipe)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert says in err and "fix:" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_expert_scores_rank_what_matters_and_a_count_keeps_the_highest(families, tmp_path, capsys):
    """Router-weighted output norms on calibration text: each layer's routing shares sum to top-k; keeping the
    highest-scored experts loses less than keeping the lowest; a recipe count keeps the highest, chosen by convert
    (which says so in the plan), and the output is exact against the reference."""
    from helpers import with_word_tokenizer
    from slimconv.selection.experts import score_layers
    from slimconv.selection.layerwise import LayerBank, Runner

    src = with_word_tokenizer(families["qwen3_moe"], tmp_path / "src", 127)
    ckpt = Checkpoint(src)
    scores = score_layers(Runner(LayerBank(ckpt), IDS), ckpt.config, {0, 1, 3})
    for s in scores.values():
        assert sum(s["frequency"]) == pytest.approx(2.0) and min(s["routed_norm"]) >= 0
    norm = scores[1]["routed_norm"]
    order = sorted(range(4), key=lambda e: -norm[e])
    from helpers import reference_kl

    change = lambda kept: reference_kl(src, IDS, remove={"experts": {"1": kept}})
    best, worst = change(sorted(order[:2])), change(sorted(order[2:]))
    assert best < worst, (norm, best, worst)

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(dict(model=str(src), remove={"experts": {"0-1": 3, "3": [0, 1, 2]}},
                                          output={"dir": str(tmp_path / "out")},
                                          validate={"exactness": {"prompt_tokens": 16, "greedy_tokens": 8},
                                                    "quality": {"enabled": False}})))
    assert main(["convert", str(recipe)]) == 0
    assert "experts kept by count (0-1: 3)" in " ".join(capsys.readouterr().out.split())
    plan = json.loads((tmp_path / "out" / "slimconv_plan.json").read_text())["plan"]
    from slimconv.data import calibration_ids
    from slimconv.selection.experts import COUNT_CALIBRATION as C

    calib = calibration_ids(src, C["calib"], C["samples"], C["seq_len"], C["seed"])
    want = score_layers(Runner(LayerBank(ckpt), calib), ckpt.config, {0, 1})
    for i in (0, 1):
        top = sorted(sorted(range(4), key=lambda e: -want[i]["routed_norm"][e])[:3])
        assert plan["layers"][i]["mlp"]["experts"] == top
    assert plan["layers"][3]["mlp"]["experts"] == [0, 1, 2]
    assert main(["validate", str(tmp_path / "out")]) == 0


@pytest.mark.parametrize("experts, says", [({"0": 5}, "keep 5 experts, but a layer has 4"),
                                           ({"2": 3}, "layer 2 has a dense MLP")])
def test_bad_expert_counts_exit_2(families, tmp_path, capsys, experts, says):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(dict(model=str(families["qwen3_moe"]), remove={"experts": experts},
                                          output={"dir": str(tmp_path / "out")})))
    assert main(["convert", str(recipe)]) == 2
    assert says in " ".join(capsys.readouterr().err.split()) and not (tmp_path / "out").exists()


def test_analyze_writes_the_expert_scores(families, tmp_path):
    from helpers import with_word_tokenizer

    src = with_word_tokenizer(families["qwen3_moe"], tmp_path / "src", 127)
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i % 127}" for i in range(3000)))
    assert main(["analyze", str(src), "-o", str(tmp_path / "an"), "--calib", str(text), "--samples", "2",
                 "--seq-len", "32", "--sleb-blocks", "0", "--no-group-ppl"]) == 0
    metrics = json.loads((tmp_path / "an" / "metrics.json").read_text())
    assert set(metrics["experts"]) == {"0", "1", "3", "4", "5"}  # layer 2 is dense (mlp_only_layers)
    assert "## Experts" in (tmp_path / "an" / "report.md").read_text()


def test_search_removes_the_weakest_experts_for_a_params_target(families, tmp_path, monkeypatch):
    """With --ops experts and a params target, each step removes a layer's weakest remaining expert (never below
    top-k); the recipe it writes converts and validates."""
    from helpers import with_word_tokenizer

    src = with_word_tokenizer(families["qwen3_moe"], tmp_path / "src", 127)
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{(i * 7) % 127}" for i in range(3000)))
    monkeypatch.chdir(tmp_path)
    assert main(["search", str(src), "--target", "params:0.9", "-o", "found", "--calib", str(text), "--samples", "2",
                 "--seq-len", "16", "--ops", "experts"]) == 0
    m = json.loads((tmp_path / "found" / "search.json").read_text())
    assert m["reached"] and all(p["change"].startswith("remove expert") for p in m["path"][1:])
    kept = m["design"]["remove"]["experts"]
    assert kept and all(len(v) >= 2 for v in kept.values()) and "2" not in kept  # layer 2 is dense
    assert main(["convert", "found/recipe.yaml"]) == 0
    out = yaml.safe_load((tmp_path / "found" / "recipe.yaml").read_text())["output"]["dir"]
    assert main(["validate", out]) == 0


@pytest.mark.parametrize("family, recipe", [("qwen3_moe", dict(remove={"attention": [1], "experts": {"3": [0, 2, 3]}})),
                                            ("qwen2_moe", dict(remove={"mlp": [0]})),
                                            ("mixtral", dict(remove={"blocks": [2]}))])
def test_onnx_runtime_runs_the_experts_in_its_moe_node_like_pytorch(families, tmp_path, family, recipe):
    """fp32 (the MoE node, float experts), and int4 with float activations (accuracy level 0; the QMoE node, int4
    experts): the int4 graph then equals the PyTorch model with the same int4-rounded weights, experts included,
    exactly (routers stay float in both). At level 4 the int8 activations move these tiny models' logits by up to
    0.4 (blocks of 32), over the check's 10% of their small logit scale (0.53 while the experts were float)."""
    import onnx

    from slimconv.formats.onnx_export import export_onnx, validate_onnx

    out = tmp_path / "out"
    convert(families[family], out, **recipe)
    prompts = [torch.randint(1, 128, (n,), generator=torch.Generator().manual_seed(n)) for n in (12, 7, 3)]
    for dtype, level, op in (("float32", 4, "MoE"), ("int4", 0, "QMoE")):
        (tmp_path / dtype).mkdir()
        export_onnx(out, tmp_path / dtype, dtype, block_size=16, accuracy_level=level)
        ops = {n.op_type for n in onnx.load(tmp_path / dtype / "model.onnx", load_external_data=False).graph.node}
        assert op in ops and {"MoE", "QMoE"} - {op} - ops
        report = validate_onnx(tmp_path / dtype, out, prompts, steps=6, provider="cpu")
        assert report["passed"], report
        assert max(c["max_abs_error"] for c in report["cases"].values()) < 1e-4


def _decoded_experts(model: "onnx.ModelProto") -> dict:
    """Per (layer, expert), the (gate, up, down) weights an int4 graph's QMoE nodes hold, decoded from the stored
    bytes by QMoE's contract as the test reads it: uint8 (experts, N, K/2), the lower nibble first; scales
    (experts, N, K/block); zero points (experts, N, blocks/2) two blocks a byte, lower nibble first, or 8 when the
    node has none; fc1's rows gate, up, gate, up..."""
    from onnx import numpy_helper

    tensors = {t.name: t for t in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type != "QMoE":
            continue
        block = next(a.i for a in node.attribute if a.name == "block_size")
        ins = list(node.input) + [""] * (13 - len(node.input))
        decoded = []
        for w, s, z in ((ins[2], ins[3], ins[11]), (ins[5], ins[6], ins[12])):
            packed, scales = numpy_helper.to_array(tensors[w]), numpy_helper.to_array(tensors[s])
            q = np.stack([packed & 15, packed >> 4], -1).reshape(*packed.shape[:2], -1, block).astype(np.float32)
            if z:
                zp = numpy_helper.to_array(tensors[z])
                zp = np.stack([zp & 15, zp >> 4], -1).reshape(*zp.shape[:2], -1)[..., :q.shape[2], None]
            else:
                zp = 8.0
            decoded.append(torch.from_numpy(((q - zp) * scales[..., None]).reshape(*packed.shape[:2], -1)))
        layer = int(node.name.split("/")[0].removeprefix("layers."))
        for e, (fc1, fc2) in enumerate(zip(*decoded)):
            out[layer, e] = (fc1[0::2], fc1[1::2], fc2)
    return out


def _with_experts(model, experts: dict):
    """``model`` (slim: an nn.Linear per projection; stock: transformers' 3-D experts) with these expert weights."""
    with torch.no_grad():
        for (i, e), (gate, up, down) in experts.items():
            block = model.model.layers[i].mlp.experts
            if isinstance(block, torch.nn.ModuleList):
                for proj, w in zip((block[e].gate_proj, block[e].up_proj, block[e].down_proj), (gate, up, down)):
                    proj.weight.copy_(w)
            else:
                block.gate_up_proj[e].copy_(torch.cat([gate, up]))
                block.down_proj[e].copy_(down)
    return model


@pytest.mark.parametrize("family, recipe, symmetric, algorithm", [
    ("qwen3_moe", dict(remove={"attention": [1], "experts": {"3": [0, 2, 3]}}), False, "rtn"),
    ("qwen2_moe", dict(remove={"mlp": [0]}), True, "rtn"),
    ("mixtral", dict(remove={"blocks": [2]}), False, "k_quant")])
def test_onnx_int4_experts_are_qmoe_blocks_that_pytorch_computes_alike(families, tmp_path, family, recipe,
                                                                       symmetric, algorithm):
    """An int4 export at the default block size of 32 writes every sparse layer's experts as one QMoE node of int4
    blocks, the router float. The expert weights decoded from the file's bytes are exactly the int4 round trip of the
    source's that the export check's reference uses; PyTorch with them (and the dense layers' int4 round trip)
    computes the graph's logits to 1e-4 at accuracy level 0 (measured 1e-5 at most), while PyTorch with float
    experts is far off (0.5 and more: the experts really are int4). The experts take 4.5 bits a weight (4.0
    symmetric), so the file is smaller than the fp32 one by at least what that saves on them."""
    import onnx

    from slimconv.arch import moe_layers
    from slimconv.formats.onnx_export import _int4_rounded, export_onnx, validate_onnx
    from slimconv.layout import as_slim_config
    from slimconv.runtime import Decoder, load_model

    out = tmp_path / "out"
    convert(families[family], out, **recipe)
    info = {}
    for dtype in ("float32", "int4"):
        (tmp_path / dtype).mkdir()
        info[dtype] = export_onnx(out, tmp_path / dtype, dtype, accuracy_level=0, symmetric=symmetric,
                                  algorithm=algorithm)
    model = onnx.load(tmp_path / "int4" / "model.onnx")
    layers = as_slim_config(Checkpoint(out).config).slim_layers
    sparse = moe_layers(layers)
    ops = [n.op_type for n in model.graph.node]
    qmoe = [n for n in model.graph.node if n.op_type == "QMoE"]
    assert [n.name for n in qmoe] == [f"layers.{i}/moe" for i in sparse] and "MoE" not in ops
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in qmoe[0].attribute}
    assert attrs["block_size"] == 32 and attrs["expert_weight_bits"] == 4 and attrs["weights_prepacked"] == 0
    tensors = {t.name: t for t in model.graph.initializer}
    assert all(tensors[f"layers.{i}/moe/router.weight"].data_type == onnx.TensorProto.FLOAT for i in sparse)

    int4 = json.loads((tmp_path / "int4" / "config.json").read_text())["onnx_int4"]
    assert int4["experts"] is True
    decoded = _decoded_experts(model)
    assert sorted(decoded) == [(i, e) for i in sparse for e in range(len(layers[i]["mlp"]["experts"]))]
    # every expert weight of the check's reference is the one the file holds
    rounded = _int4_rounded(load_model(out), int4).state_dict()
    from_file = _with_experts(load_model(out), decoded).state_dict()
    keys = [k for k in rounded if ".experts." in k]
    assert keys and all(torch.equal(rounded[k], from_file[k]) for k in keys)

    decoder = Decoder(tmp_path / "int4", "cpu")
    decoder.reset(len(IDS))
    got = torch.from_numpy(np.asarray(decoder(IDS.numpy()), np.float32))
    with torch.no_grad():
        same = _with_experts(_int4_rounded(load_model(out), {**int4, "experts": False}), decoded)(input_ids=IDS).logits
        float_experts = _int4_rounded(load_model(out), {**int4, "experts": False})(input_ids=IDS).logits
    assert (got - same).abs().max() < 1e-4
    assert (got - float_experts).abs().max() > 0.1
    prompts = [torch.randint(1, 128, (n,), generator=torch.Generator().manual_seed(n)) for n in (12, 7, 3)]
    report = validate_onnx(tmp_path / "int4", out, prompts, steps=6, provider="cpu")
    assert report["passed"] and max(c["max_abs_error"] for c in report["cases"].values()) < 1e-4, report

    shapes = [s for n, s in Checkpoint(out).shapes.items() if ".experts." in n]  # (N, K) each
    expert_weights = sum(n * k for n, k in shapes)
    int4_bytes = sum(n * k // 2 + n * (k // 32) * 4 + (0 if symmetric else n * -(-k // 64)) for n, k in shapes)
    assert sum(len(t.raw_data) for name, t in tensors.items() if "/moe.fc" in name) == int4_bytes
    saved = 4 * expert_weights - int4_bytes
    assert info["float32"]["weight_bytes"] - info["int4"]["weight_bytes"] >= saved
    size = {d: (tmp_path / d / "model.onnx.data").stat().st_size for d in info}
    assert size["float32"] - size["int4"] >= saved and size["int4"] < 0.3 * size["float32"]


def test_an_onnx_int4_block_size_that_splits_the_experts_exits_2_before_any_work(families, tmp_path, capsys):
    """QMoE quantises experts in whole blocks: the tiny models' experts are 32 wide, so blocks of 64 are refused,
    naming the width and a block size that fits; the fp32 export of the same output is not affected."""
    out = tmp_path / "out"
    convert(families["qwen3_moe"], out, remove={"attention": [1]})
    assert main(["export", str(out), "-o", str(tmp_path / "onnx"), "--dtype", "int4", "--int4-block-size", "64"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "expert width 32 of layer(s) 0, 1, 3, 4, 5" in err and "--int4-block-size 32" in err
    assert "Traceback" not in err and not (tmp_path / "onnx").exists()


@pytest.mark.parametrize("family, experts", [("qwen3_moe", {"0-1": [0, 1, 3], "3-5": [0, 2, 3]}),
                                             ("mixtral", {"0-5": [1, 2, 3]}),
                                             ("qwen2_moe", {"1": [0, 3, 2], "3": [1, 2, 3], "5": [0, 1, 2]})])
def test_experts_pruned_alike_in_every_layer_write_a_stock_checkpoint(families, tmp_path, family, experts):
    """Every sparse layer keeping 3 of 4: a stock config with the kept count, the experts renumbered and the router's
    rows kept; transformers' own class runs it exactly as the reference that masks the pruned experts out."""
    out = tmp_path / "out"
    blocks = [2] if family == "qwen3_moe" else []
    plan = convert(families[family], out, remove={"blocks": blocks, "experts": experts})
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == family
    assert config.get("num_experts", config.get("num_local_experts")) == 3 and config["num_experts_per_tok"] == 2
    assert_exact(families[family], out, plan, IDS)
