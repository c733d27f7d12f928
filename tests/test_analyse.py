"""Layer analysis: the layer-at-a-time engine against the whole model, SLEB's prefix cache against the naive
loop, memory when layers are streamed, and `analyze` -> `recipe` -> `convert` as a user runs it."""
import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import make_tiny
from slimconv.selection.analyse import AnalysisSettings, analyse, sleb
from slimconv.cli import main
from slimconv.selection.layerwise import LayerBank, Runner, candidate_nlls, group_spec
from slimconv.plan import build_plan, source_plan
from slimconv.recipe import parse_recipe
from slimconv.reference import apply_plan
from slimconv.runtime import load_model
from slimconv.source import Checkpoint

IDS = torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def _model_nll(src, ids, **recipe) -> float:
    plan = build_plan(parse_recipe({"model": str(src), "output": {"dir": "x"}, **recipe}), Checkpoint(src).config)
    logits = apply_plan(load_model(src), plan)(input_ids=ids).logits[:, :-1]
    return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).item()


@pytest.mark.parametrize("arch", ["llama-bias-untied", "qwen3", "mistral"])
def test_candidates_equal_the_model_with_the_plan_applied(tiny_models, arch):
    """Each candidate the engine scores (a removed block, a removed sublayer, a parallel pair) gives the
    calibration loss of the source model with that change applied at run time."""
    src = tiny_models[arch]
    ckpt = Checkpoint(src)
    cfg = ckpt.config
    runner = Runner(LayerBank(ckpt), IDS, batch_size=3)
    stack = source_plan(cfg).layers
    cands = [(2, 1, []), (4, 1, [group_spec(cfg, [4], attention=False)]), (1, 2, [group_spec(cfg, [1, 2])]),
             (0, 0, [])]
    got = candidate_nlls(runner, stack, cands)
    want = [_model_nll(src, IDS, remove={"blocks": [2]}), _model_nll(src, IDS, remove={"attention": [4]}),
            _model_nll(src, IDS, parallel={"groups": [[1, 2]]}), _model_nll(src, IDS)]
    assert got == pytest.approx(want, abs=1e-5)


def test_sleb_prefix_cache_gives_the_naive_loops_choices(tiny_models):
    src = tiny_models["qwen2"]
    ckpt = Checkpoint(src)
    runner = Runner(LayerBank(ckpt), IDS)
    cached = sleb(runner, ckpt.config, 3)
    naive = sleb(runner, ckpt.config, 3, prefix_cache=False)
    assert [s["removed"] for s in cached] == [s["removed"] for s in naive]
    for a, b in zip(cached, naive):
        assert a["candidates"] == pytest.approx(b["candidates"], rel=1e-6)
    # SLEB's step 2 verifies again: its candidates are scored without the block removed in step 1.
    assert str(cached[0]["removed"]) not in cached[1]["candidates"]
    assert _model_nll(src, IDS, remove={"blocks": [s["removed"] for s in cached]}) == pytest.approx(
        torch.log(torch.tensor(cached[-1]["ppl"])).item(), abs=1e-5)


@torch.no_grad()
def _own_text(src, windows: int = 8, length: int = 24) -> torch.Tensor:
    """Windows sampled from the model itself: on them a random model's losses differ by more than noise
    (on uniform random tokens every candidate is about as bad, and the ranking is the windows' noise)."""
    torch.manual_seed(0)
    model = load_model(src)
    start = torch.randint(0, 128, (windows, 1))
    return model.generate(start, attention_mask=torch.ones_like(start), max_new_tokens=length - 1,
                          min_new_tokens=length - 1, do_sample=True, pad_token_id=0)


@pytest.mark.parametrize("arch, text", [("qwen2", "own"), ("llama-tied", "repeated")])
def test_fast_sleb_makes_the_naive_loops_choices(tiny_models, arch, text):
    """SLEB with halving (prefix cache, successive halving over 8 windows) removes
    the same blocks as the naive loop here, and the perplexity of each removal is the exact all-window one.

    Halving is a heuristic: when the first windows rank the candidates differently from all of them it can
    miss the best (on llama-tied's own text it takes block 4 before 5; docs/results/analysis.md, "SLEB, faster", for SmolLM2). With one window repeated the ranking cannot change, so that case checks
    the bookkeeping; qwen2's own text is a case where the windows disagree and the choices still agree."""
    src = tiny_models[arch]
    ckpt = Checkpoint(src)
    ids = _own_text(src) if text == "own" else IDS[:1].repeat(8, 1)
    runner = Runner(LayerBank(ckpt), ids)
    fast = sleb(runner, ckpt.config, 4, halving=True)
    naive = sleb(runner, ckpt.config, 4, prefix_cache=False)
    assert [s["removed"] for s in fast] == [s["removed"] for s in naive]
    assert [s["ppl"] for s in fast] == pytest.approx([s["ppl"] for s in naive], rel=1e-6)
    assert min(fast[0]["windows"].values()) == 2 and fast[0]["windows"][str(fast[0]["removed"])] == 8


def test_metrics_are_the_same_with_layers_streamed(tiny_models):
    src = tiny_models["llama-tied"]
    s = AnalysisSettings(model=str(src), sleb_blocks=2, group_sizes=[2, 3])
    held = analyse(s, src, IDS)
    streamed = analyse(s.model_copy(update=dict(max_memory=1)), src, IDS)
    assert streamed["layer_loads"] > held["layer_loads"]
    for key in ("block_influence", "attention_importance", "mlp_importance", "calibration_ppl"):
        assert streamed[key] == pytest.approx(held[key], rel=1e-6)
    assert [s["removed"] for s in streamed["sleb"]["steps"]] == [s["removed"] for s in held["sleb"]["steps"]]
    assert len(held["angular_distance"]["matrix"]) == 3 and len(held["angular_distance"]["matrix"][0]) == 6
    assert {tuple(g["layers"]) for g in held["parallel_groups"]} == {(0, 1), (1, 2), (2, 3), (3, 4), (4, 5),
                                                                     (0, 1, 2), (1, 2, 3), (2, 3, 4), (3, 4, 5)}


CHILD = textwrap.dedent("""
    import json, resource, sys, torch
    from slimconv.selection.analyse import AnalysisSettings, analyse
    src = sys.argv[1]
    s = AnalysisSettings(model=src, sleb_blocks=0, group_ppl=False, max_memory=int(sys.argv[2]), samples=2,
                         seq_len=16)
    ids = torch.randint(0, 256, (2, 16))
    import slimconv.selection.layerwise, transformers.models.llama.modeling_llama  # imports before the baseline
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    m = analyse(s, src, ids)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(dict(base=base, peak=peak, loads=m["layer_loads"])))
""")


def _synthetic(directory, layers=16, hidden=768, inter=3072, vocab=256):
    """A bf16 Llama checkpoint written one layer at a time (never whole in memory)."""
    from safetensors.torch import save_file

    directory.mkdir()
    cfg = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=hidden, intermediate_size=inter,
               num_hidden_layers=layers, num_attention_heads=12, num_key_value_heads=12, vocab_size=vocab,
               max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=True, hidden_act="silu")
    (directory / "config.json").write_text(json.dumps(cfg))
    w = lambda *shape: (torch.randn(*shape) * 0.02).to(torch.bfloat16)
    save_file({"model.embed_tokens.weight": w(vocab, hidden), "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16)},
              directory / "model-base.safetensors")
    for i in range(layers):
        p = f"model.layers.{i}."
        t = {p + f"self_attn.{x}_proj.weight": w(hidden, hidden) for x in "qkvo"}
        t |= {p + "mlp.gate_proj.weight": w(inter, hidden), p + "mlp.up_proj.weight": w(inter, hidden),
              p + "mlp.down_proj.weight": w(hidden, inter), p + "input_layernorm.weight": torch.ones(hidden),
              p + "post_attention_layernorm.weight": torch.ones(hidden)}
        save_file(t, directory / f"model-{i:03d}.safetensors")
    return 4 * layers * (4 * hidden * hidden + 3 * hidden * inter)


def test_a_model_larger_than_the_memory_limit_is_analysed_layer_by_layer(tmp_path):
    fp32_bytes = _synthetic(tmp_path / "big")  # ~600 MB of float32 layer weights
    limit = 100 * 10**6
    p = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "big"), str(limit)], capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    grown = r["peak"] - r["base"]
    assert fp32_bytes > 5 * limit  # 604 MB of layers against a 100 MB limit
    assert grown < fp32_bytes / 3, f"peak grew by {grown / 1e6:.0f} MB for {fp32_bytes / 1e6:.0f} MB of layers"
    assert r["loads"] == 16 + 15  # each layer, then each pair, built when needed and not kept


def _tiny_with_tokenizer(tmp_path, smollm2_dir):
    """A random tiny Llama with SmolLM2's tokenizer, so the CLI can read text."""
    import transformers

    from conftest import TINY

    cfg = transformers.LlamaConfig(**{**TINY, "vocab_size": 49152, "num_hidden_layers": 8}, tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "tiny")
    for f in smollm2_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy2(f, tmp_path / "tiny" / f.name)
    return tmp_path / "tiny"


@pytest.mark.smollm
def test_analyze_then_recipe_then_convert(tmp_path, smollm2_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = _tiny_with_tokenizer(tmp_path, smollm2_dir)
    args = ["analyze", str(src), "-o", "an", "--samples", "2", "--seq-len", "32", "--sleb-blocks", "2",
            "--naive-check", "1"]
    assert main(args) == 0
    assert main(args) == 2 and "--force" in capsys.readouterr().err  # nothing overwritten
    m = json.loads((tmp_path / "an" / "metrics.json").read_text())
    assert m["sleb_naive_check"]["same_choices"]
    for png in ("block_influence.png", "sublayer_importance.png", "angular_distance.png", "sleb.png",
                "parallel_groups.png"):
        assert (tmp_path / "an" / png).stat().st_size > 1000
    assert "## SLEB" in (tmp_path / "an" / "report.md").read_text()
    # The early-exit classifier and the layer analysis share the folder; neither run removes the other's files.
    assert main(["analyze", str(src), "-o", "an", "--early-exit", "--samples", "2", "--seq-len", "32"]) == 0
    assert main(args + ["--force"]) == 0
    assert (tmp_path / "an" / "early_exit.json").is_file() and (tmp_path / "an" / "metrics.json").is_file()
    m = json.loads((tmp_path / "an" / "metrics.json").read_text())

    assert main(["recipe", "an", "--method", "sleb", "--remove-blocks", "2", "-o", "r/sleb.yaml"]) == 0
    text = (tmp_path / "r" / "sleb.yaml").read_text()
    assert text.startswith("# Written by") and "SLEB" in text
    assert sorted(yaml.safe_load(text)["remove"]["blocks"]) == sorted(s["removed"] for s in m["sleb"]["steps"])
    assert main(["convert", "r/sleb.yaml"]) == 0
    assert json.loads((tmp_path / "outputs" / "sleb" / "config.json").read_text())["num_hidden_layers"] == 6

    for method, flag in (("block-influence", "--remove-blocks"), ("angular", "--remove-blocks"),
                         ("last", "--remove-blocks"), ("attention", "--remove-attention"),
                         ("mlp", "--remove-mlp"), ("parallel", "--pairs")):
        assert main(["recipe", "an", "--method", method, flag, "2", "-o", f"r/{method}.yaml"]) == 0
        assert main(["plan", f"r/{method}.yaml"]) == 0
    assert main(["recipe", "an", "--method", "attention", "--remove-attention", "3", "--by", "position",
                 "-o", "r/pos.yaml"]) == 0
    assert yaml.safe_load((tmp_path / "r" / "pos.yaml").read_text())["remove"]["attention"] == "4-6"
    capsys.readouterr()
    assert main(["recipe", "an", "--method", "last", "--remove-blocks", "1", "-o", "r/v.yaml", "--verify",
                 "--eval-samples", "1", "--eval-seq-len", "16"]) == 0
    assert "perplexity" in capsys.readouterr().out

    assert main(["recipe", "an", "--method", "sleb", "--remove-blocks", "4", "-o", "r/x.yaml"]) == 2
    assert "--sleb-blocks 4" in capsys.readouterr().err
    assert main(["recipe", "an", "--method", "sleb", "--remove-blocks", "2", "-o", "r/sleb.yaml"]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["recipe", "an", "--method", "parallel", "-o", "r/y.yaml"]) == 2
    assert "--pairs" in capsys.readouterr().err
    assert main(["recipe", str(tmp_path), "--method", "last", "--remove-blocks", "1", "-o", "r/z.yaml"]) == 2
    assert "slimconv analyze" in capsys.readouterr().err
