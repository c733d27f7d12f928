"""`slimconv search`: the greedy search over every kind of change, on tiny random models."""
import json

import pytest
import torch
import torch.nn.functional as F
import yaml

from helpers import compare, convert, with_word_tokenizer
from slimconv.cli import main
from slimconv.selection.layerwise import Halving, LayerBank, Runner, candidate_nlls, ranked_nlls
from slimconv.plan import build_plan, costs, source_plan
from slimconv.recipe import parse_recipe
from slimconv.reference import apply_plan
from slimconv.runtime import load_model
from slimconv.selection.search import Design, SearchSettings, changes, recipe_text, search, speed
from slimconv.source import Checkpoint

IDS = torch.randint(0, 128, (8, 24), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def _nll(src, plan) -> float:
    logits = apply_plan(load_model(src), plan)(input_ids=IDS).logits[:, :-1]
    return F.cross_entropy(logits.flatten(0, 1), IDS[:, 1:].flatten()).item()


@pytest.mark.parametrize("target", ["decode:1.2", "decode-gpu:1.2", "layers:4"])
def test_search_reaches_the_target_and_its_recipe_converts_exactly(tiny_models, tmp_path, target):
    src = tiny_models["llama-tied"]
    s = SearchSettings(model=str(src), target=target, method="greedy")
    m = search(s, src, IDS, quiet=True)
    assert m["reached"] and m["path"][-1]["speeds"][target.split(":")[0]] >= m["goal"] - 1e-9
    text, data = recipe_text(m, "slimconv search", str(tmp_path / "out"))
    assert text.startswith("# Written by `slimconv search`") and "# path: " in text
    assert yaml.safe_load(text) == data
    sections = {k: v for k, v in data.items() if k in ("remove", "parallel")}
    plan = convert(src, tmp_path / "out", **sections)
    assert [l.model_dump() for l in plan.layers] == [l for l in m["plan"]["layers"]]
    err, same = compare(src, tmp_path / "out", plan, IDS[:2, :12], greedy=4)
    assert err < 1e-4 and same


def test_the_path_table_is_the_plans_costs_and_losses(tiny_models):
    """Every row of the path: the speedups are plan.costs of that step's recipe, the calibration loss is the
    source model's with that recipe applied at run time (an independent path), and every step adds one change."""
    src = tiny_models["qwen2"]
    cfg = Checkpoint(src).config
    s = SearchSettings(model=str(src), target="decode-gpu:1.25", method="greedy")
    m = search(s, src, IDS, quiet=True)
    base = costs(source_plan(cfg), cfg, s.context, s.bytes_per_param)
    speeds = []
    for row in m["path"]:
        plan = build_plan(parse_recipe({"model": str(src), "output": {"dir": "x"}, **row["sections"]}), cfg)
        c = costs(plan, cfg, s.context, s.bytes_per_param)
        for metric, v in row["speeds"].items():
            assert v == pytest.approx(speed(c, base, metric, s), rel=1e-12)
        assert row["nll"] == pytest.approx(_nll(src, plan), abs=1e-5)
        assert row["kl"] >= 0
        speeds.append(row["speeds"]["decode-gpu"])
    assert speeds == sorted(speeds) and len(set(speeds)) == len(speeds)  # each step gains
    assert m["path"][0]["kl"] == 0 and m["path"][-1]["kl"] > 0


def test_every_candidate_keeps_the_recipe_valid(tiny_models):
    """Candidates from a design with groups and removed sublayers all build a plan (the recipe's rules)."""
    src = tiny_models["mistral"]
    cfg = Checkpoint(src).config
    d = Design(blocks=frozenset({5}), attention=frozenset({1}), mlp=frozenset({3}), groups=((1, 2),))
    kinds = set()
    for ch in changes(d, 6, ["blocks", "attention", "mlp", "parallel"], max_group=3):
        ch.apply(d).plan(str(src), cfg)  # raises SlimError if the recipe were invalid
        kinds.add(ch.kind)
        assert not (ch.kind == "block" and ch.layers[0] in (1, 2))  # a group member is never removed
    assert kinds == {"block", "attention", "mlp", "parallel", "grow"}


def test_successive_halving_picks_what_every_window_picks(tiny_models):
    """On a tiny case the halving's choice equals the exact one, and the candidates it scored on every window
    have exactly their all-window losses. The windows are one text repeated, so that a random model's
    ranking on the first windows is its ranking on all (on random tokens its candidates differ by noise)."""
    src = tiny_models["llama-bias-untied"]
    ckpt = Checkpoint(src)
    ids = IDS[:1].repeat(8, 1)
    runner = Runner(LayerBank(ckpt), ids)
    stack = source_plan(ckpt.config).layers
    cands = [(p, 1, []) for p in range(len(stack))]
    exact = candidate_nlls(runner, stack, cands)
    fast, seen = ranked_nlls(runner, stack, cands, halving=Halving())
    assert Halving().rounds(8) == [2, 4, 8] and sorted(seen)[:3] == [2, 2, 2]
    full = [i for i, w in enumerate(seen) if w == 8]
    assert min(full, key=fast.__getitem__) == min(range(len(exact)), key=exact.__getitem__)
    assert [fast[i] for i in full] == pytest.approx([exact[i] for i in full], abs=1e-6)
    for target in ("decode:1.2", "layers:4"):
        kw = dict(model=str(src), target=target, method="greedy")
        a = search(SearchSettings(**kw), src, ids[:4], quiet=True)
        b = search(SearchSettings(**kw, exact=True), src, ids[:4], quiet=True)
        assert [p["change"] for p in a["path"]] == [p["change"] for p in b["path"]]


def _text_model(tiny_models, tmp_path):
    src = with_word_tokenizer(tiny_models["llama-tied"], tmp_path / "src", 120)
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"w{(i * 7) % 120}" for i in range(3000)))
    return src, text


def test_search_command_writes_recipe_path_and_plot(tiny_models, tmp_path, monkeypatch, capsys):
    src, text = _text_model(tiny_models, tmp_path)
    monkeypatch.chdir(tmp_path)
    args = ["search", str(src), "--target", "decode:1.15", "-o", "found", "--calib", str(text), "--samples", "4",
            "--seq-len", "16", "--ops", "blocks,attention,mlp", "--method", "greedy"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "search on" in out and "candidate changes" in out and "expected: about" in out
    assert "64 calibration tokens are few" in out
    m = json.loads((tmp_path / "found" / "search.json").read_text())
    assert m["reached"] and all(p["change"].startswith("remove") for p in m["path"][1:])
    assert (tmp_path / "found" / "pareto.png").stat().st_size > 1000
    assert "## Path" in (tmp_path / "found" / "report.md").read_text()
    assert main(args) == 2 and "--force" in capsys.readouterr().err
    assert main(["plan", "found/recipe.yaml"]) == 0
    assert main(["convert", "found/recipe.yaml"]) == 0


@pytest.mark.parametrize("extra, words", [
    (["--target", "decode:10"], "unreachable"),
    (["--target", "parallel:1.2"], "unknown metric"),
    (["--target", "decode:fast"], "not a number"),
    (["--target", "layers:6"], "whole number from 1 to 5"),
    (["--target", "decode:1.2", "--ops", "parallel"], "unreachable"),
    (["--target", "decode:1.2", "--ops", "heads,,"], "--ops heads: Input should be 'blocks', 'attention'"),
    (["--target", "decode:1.2", "--ops", ","], 'ops "": List should have at least 1 item'),
    (["--target", "decode:1.2", "--seq-len", "100000"], "fewer than one window"),
    (["--target", "decode:1.2", "--samples", "0"], "--samples"),
])
def test_bad_input_exits_2_before_any_work(tiny_models, tmp_path, monkeypatch, capsys, extra, words):
    src, text = _text_model(tiny_models, tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["search", str(src), "-o", "found", "--calib", str(text), *extra]) == 2
    captured = capsys.readouterr()
    assert words in captured.err and "search on" not in captured.out
    assert not (tmp_path / "found").exists()


@pytest.mark.parametrize("target", ["decode:1.3", "params:0.8", "layers:5"])
def test_mip_reaches_the_target_and_its_recipe_converts_exactly(tiny_models, tmp_path, target):
    """--method mip: one alternative per layer, the target met by the plan's own costs, the joint loss the chosen
    plan's, and its recipe (narrowed MLPs and merged KV heads included) converts exactly."""
    from slimconv.selection.mip import mip_search

    src = tiny_models["llama-tied"]
    m = mip_search(SearchSettings(model=str(src), target=target, method="mip"), src, IDS, quiet=True)
    assert m["reached"] and m["path"][-1]["speeds"][target.split(":")[0]] >= m["goal"] - 1e-9
    layers = [c["layer"] for c in m["mip"]["chosen"]]
    assert len(layers) == len(set(layers))
    plan = build_plan(parse_recipe({"model": str(src), "output": {"dir": "x"}, **m["path"][-1]["sections"]}),
                      Checkpoint(src).config)
    assert m["mip"]["joint_nll"] == pytest.approx(_nll(src, plan), abs=1e-4)
    text, data = recipe_text(m, "slimconv search", str(tmp_path / "out"))
    assert "mip search over" in text and yaml.safe_load(text) == data
    out = convert(src, tmp_path / "out", **{k: v for k, v in data.items() if k in ("remove", "shrink")})
    err, same = compare(src, tmp_path / "out", out, IDS[:2, :12], greedy=4)
    assert err < 1e-4 and same


def test_the_solver_finds_the_best_choice_under_the_budget():
    """HiGHS against brute force over every choice of at most one alternative per layer."""
    import itertools
    import random

    from slimconv.selection.mip import solve

    rng = random.Random(0)
    for _ in range(20):
        layers = [i for i in range(4) for _ in range(3)]
        dloss = [rng.uniform(-0.1, 1) for _ in layers]
        dcost = [-rng.uniform(0, 1) for _ in layers]
        budget = -rng.uniform(0.5, 2)
        options = [[None] + [j for j, l in enumerate(layers) if l == i] for i in range(4)]
        best = min((sum(dloss[j] for j in pick if j is not None), pick) for pick in itertools.product(*options)
                   if sum(dcost[j] for j in pick if j is not None) <= budget)
        got = solve(layers, dloss, dcost, budget, 4)
        assert sum(dloss[j] for j in got) == pytest.approx(best[0], abs=1e-9)


def test_mip_command_writes_fractions_where_convert_picks_the_same_channels(tiny_models, tmp_path, monkeypatch,
                                                                           capsys):
    src, text = _text_model(tiny_models, tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["search", str(src), "--target", "decode:1.3", "--method", "mip", "-o", "found", "--calib", str(text),
                 "--samples", "4", "--seq-len", "16", "--ops", "mlp_width,kv_heads", "--device", "cpu"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "mip search on" in out and "alternatives" in out and "chosen" in out
    assert "## Chosen alternatives" in (tmp_path / "found" / "report.md").read_text()
    recipe = yaml.safe_load((tmp_path / "found" / "recipe.yaml").read_text())
    assert all(isinstance(v, list) for v in recipe["shrink"].get("mlp", {}).values())  # not convert's calibration
    from slimconv.selection.mip import readable

    s = SearchSettings(model="x", target="decode:1.3", method="mip")
    design = {"shrink": {"mlp": {"2": list(range(48)), "3": list(range(30))}}}
    assert readable(design, s, {"intermediate_size": 96}, True)["shrink"]["mlp"] == {"2": 0.5, "3": list(range(30))}
    assert readable(design, s, {"intermediate_size": 96}, False) == design


@pytest.mark.parametrize("extra, words", [
    (["--method", "greedy", "--ops", "mlp_width"], "mlp_width with --method greedy"),
    (["--method", "mip", "--ops", "parallel,blocks"], "parallel with --method mip"),
    (["--method", "mip", "--widths", "1.5"], "--widths"),
])
def test_ops_of_the_other_method_exit_2(tiny_models, tmp_path, monkeypatch, capsys, extra, words):
    src, text = _text_model(tiny_models, tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["search", str(src), "-o", "found", "--calib", str(text), "--target", "decode:1.2", *extra]) == 2
    assert words in " ".join(capsys.readouterr().err.split()) and not (tmp_path / "found").exists()
