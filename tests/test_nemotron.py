"""nemotron-nas (DeciLM) output: read with the rules vLLM's and mlx-lm's loaders apply, loaded by transformers
through the bundled code and exact against the run-time reference, and refused where it cannot be exact."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml

from helpers import compare, convert, make_tiny
from slimconv.cli import main
from slimconv.modeling.configuration_decilm import ffn_mult_to_intermediate_size
from slimconv.formats.nemotron import choose_format, ffn_mult_for
from slimconv.plan import build_plan
from slimconv.recipe import parse_recipe

# The format's MLP width is a multiple of 256: these tiny models have one (the shared TINY's 96 is not).
NAS_TINY = dict(intermediate_size=256)
FITS = {  # architecture -> config overrides that make it carryable
    "llama-tied": {},
    "llama-bias-untied": {},  # attention and MLP biases
    "mistral": dict(sliding_window=None),
    "qwen2": {},  # q/k/v biases without an o bias: written with an exact all-zero o bias
}
CHANGES = {
    "attention": dict(remove={"attention": "3-5"}),
    "mlp": dict(remove={"mlp": [0, 5]}),
    "mix": dict(remove={"blocks": [1], "attention": [2, 3], "mlp": [0, 5]}),
}


@pytest.fixture(scope="module")
def nas_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("nas")
    return {name: make_tiny(root / name, name, **NAS_TINY, **extra) for name, extra in FITS.items()}


def header(out: Path) -> dict:
    """name -> shape of every tensor in the output's safetensors files (read from the headers only)."""
    shapes = {}
    for f in out.glob("*.safetensors"):
        raw = f.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        shapes.update({k: tuple(v["shape"]) for k, v in json.loads(raw[8:8 + n]).items() if k != "__metadata__"})
    return shapes


def vllm_expected(cfg) -> dict:
    """The parameters vLLM's nemotron_nas.py builds for an AutoConfig-loaded config (hf_config), as its
    DeciLMDecoderLayer reads it: attribute access on block_configs, ffn_mult through its formula, one bias flag
    for q/k/v (qkv_bias may override it) and o."""
    h, heads, vocab = cfg.hidden_size, cfg.num_attention_heads, cfg.vocab_size
    head_dim = getattr(cfg, "head_dim", None) or h // heads
    bias = getattr(cfg, "attention_bias", False) or getattr(cfg, "bias", False)
    bias_o, qkv_bias = bias, getattr(cfg, "qkv_bias", bias)
    mlp_bias = getattr(cfg, "mlp_bias", False)
    p = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        p["lm_head.weight"] = (vocab, h)
    assert len(cfg.block_configs) == cfg.num_hidden_layers
    for i, b in enumerate(cfg.block_configs):
        pre = f"model.layers.{i}."
        if not b.attention.no_op:
            kv = heads // b.attention.n_heads_in_group
            p |= {pre + "input_layernorm.weight": (h,), pre + "self_attn.q_proj.weight": (heads * head_dim, h),
                  pre + "self_attn.k_proj.weight": (kv * head_dim, h), pre + "self_attn.v_proj.weight": (kv * head_dim, h),
                  pre + "self_attn.o_proj.weight": (h, heads * head_dim)}
            if qkv_bias:
                p |= {pre + "self_attn.q_proj.bias": (heads * head_dim,), pre + "self_attn.k_proj.bias": (kv * head_dim,),
                      pre + "self_attn.v_proj.bias": (kv * head_dim,)}
            if bias_o:
                p[pre + "self_attn.o_proj.bias"] = (h,)
        if not b.ffn.no_op:
            inter = (ffn_mult_to_intermediate_size(b.ffn.ffn_mult, h) if hasattr(b.ffn, "ffn_mult")
                     else b.ffn.intermediate_size)
            p |= {pre + "post_attention_layernorm.weight": (h,), pre + "mlp.gate_proj.weight": (inter, h),
                  pre + "mlp.up_proj.weight": (inter, h), pre + "mlp.down_proj.weight": (h, inter)}
            if mlp_bias:
                p |= {pre + "mlp.gate_proj.bias": (inter,), pre + "mlp.up_proj.bias": (inter,),
                      pre + "mlp.down_proj.bias": (h,)}
    return p


@dataclasses.dataclass(frozen=True)
class _MlxAttention:  # mlx-lm's AttentionConfig fields: any other key is a TypeError there
    no_op: bool = False
    replace_with_linear: bool = False
    sparsify: list | None = None
    n_heads_in_group: int | None = None
    window_length: int | None = None
    num_sink_tokens: int | None = None
    use_prefill_window_in_sink_attention: bool = False
    unshifted_sink: bool = False


@dataclasses.dataclass(frozen=True)
class _MlxFFN:
    no_op: bool = False
    replace_with_linear: bool = False
    sparsify: list | None = None
    ffn_mult: float | None = None


def mlx_expected(raw: dict) -> dict:
    """The parameters mlx-lm's nemotron-nas.py builds from config.json, with its checks: block entries
    constructed from their keys, n_heads_in_group / ffn_mult required when active, ffn_mult rounded to 6
    decimals, head_dim = hidden / heads, rope_scaling with factor and rope_type, a known activation; rope_theta
    defaults to 500000 there, so it must be written. Its weights load strictly (tied: lm_head dropped)."""
    assert raw["model_type"] == "nemotron-nas"
    assert "rope_theta" in raw, "mlx-lm would use its default rope_theta 500000"
    if raw.get("rope_scaling"):
        assert {"factor", "rope_type"} <= set(raw["rope_scaling"])
    assert raw.get("hidden_act", "silu") in ("silu", "relu", "gelu", "gelu_new", "gelu_fast")
    h, heads, vocab = raw["hidden_size"], raw["num_attention_heads"], raw["vocab_size"]
    assert len(raw["block_configs"]) == raw["num_hidden_layers"]
    head_dim = h // heads
    assert head_dim * heads == h
    bias, mlp_bias = raw.get("attention_bias", False), raw.get("mlp_bias", False)
    p = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,)}
    if not raw.get("tie_word_embeddings", False):
        p["lm_head.weight"] = (vocab, h)
    for i, b in enumerate(raw["block_configs"]):
        attn, ffn = _MlxAttention(**b.get("attention", {})), _MlxFFN(**b.get("ffn", {}))
        pre = f"model.layers.{i}."
        if not attn.no_op:
            assert attn.n_heads_in_group and heads % attn.n_heads_in_group == 0
            kv = heads // attn.n_heads_in_group
            for name, shape in (("q", (heads * head_dim, h)), ("k", (kv * head_dim, h)), ("v", (kv * head_dim, h)),
                                ("o", (h, heads * head_dim))):
                p[pre + f"self_attn.{name}_proj.weight"] = shape
                if bias:
                    p[pre + f"self_attn.{name}_proj.bias"] = (shape[0],)
            p[pre + "input_layernorm.weight"] = (h,)
        if not ffn.no_op:
            assert ffn.ffn_mult is not None
            inter = ffn_mult_to_intermediate_size(round(ffn.ffn_mult, 6), h)
            for name, shape in (("gate", (inter, h)), ("up", (inter, h)), ("down", (h, inter))):
                p[pre + f"mlp.{name}_proj.weight"] = shape
                if mlp_bias:
                    p[pre + f"mlp.{name}_proj.bias"] = (shape[0],)
            p[pre + "post_attention_layernorm.weight"] = (h,)
    return p


def _source_widths(plan, src_cfg):
    return [s.mlp.intermediate_size if s.mlp else None for s in plan.layers]


@pytest.mark.parametrize("change", CHANGES)
@pytest.mark.parametrize("arch", FITS)
def test_nemotron_nas_is_exact_and_read_as_the_engines_read_it(nas_models, tmp_path, arch, change):
    from transformers import AutoConfig

    out = tmp_path / "out"
    plan = convert(nas_models[arch], out, fmt="nemotron-nas", **CHANGES[change])
    raw = json.loads((out / "config.json").read_text())
    assert raw["architectures"] == ["DeciLMForCausalLM"] and raw["model_type"] == "nemotron-nas"
    weights = header(out)
    assert mlx_expected(raw) == weights
    cfg = AutoConfig.from_pretrained(out, trust_remote_code=True)  # how vLLM gets its hf_config
    assert type(cfg).__name__ == "DeciLMConfig"
    assert vllm_expected(cfg) == weights
    # per layer: what the engines derive is the plan (head counts, MLP widths, which sublayers exist)
    kv = [None if b.attention.no_op else cfg.num_attention_heads // b.attention.n_heads_in_group for b in cfg.block_configs]
    assert kv == [s.attention.num_key_value_heads if s.attention else None for s in plan.layers]
    widths = [None if b.ffn.no_op else ffn_mult_to_intermediate_size(b.ffn.ffn_mult, cfg.hidden_size)
              for b in cfg.block_configs]
    assert widths == _source_widths(plan, raw)
    # the transformers path (bundled DeciLM classes over the slim layers) against the run-time reference
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(1))
    err, same = compare(nas_models[arch], out, plan, ids)
    assert err < 1e-5, f"{arch}/{change}: max |logit error| {err}"
    assert same, f"{arch}/{change}: greedy tokens differ"


def test_config_class_round_trips_and_export_reads_it(nas_models, tmp_path):
    from transformers import AutoConfig

    from slimconv.layout import as_slim_config

    out = tmp_path / "out"
    plan = convert(nas_models["qwen2"], out, fmt="nemotron-nas", **CHANGES["mix"])
    cfg = AutoConfig.from_pretrained(out, trust_remote_code=True)
    cfg.save_pretrained(tmp_path / "again")
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    assert again["block_configs"] == json.loads((out / "config.json").read_text())["block_configs"]
    assert "slim_layers" not in again and "projection_bias" not in again  # the slim view is never serialised
    # what the ONNX graph builder and the GGUF writer read: the plan's layers, every projection with a bias
    slim = as_slim_config(json.loads((out / "config.json").read_text()))
    got = [(bool(s["attention"]), s["mlp"]["intermediate_size"] if s["mlp"] else None) for s in slim.slim_layers]
    assert got == [(bool(s.attention), s.mlp.intermediate_size if s.mlp else None) for s in plan.layers]
    assert slim.projection_bias == dict.fromkeys("qkvo", True) and slim.head_dim == 16


@pytest.mark.parametrize("width,hidden,ok", [(1536, 576, True), (256, 64, True), (14336, 4096, True),
                                             (96, 64, False), (1000, 576, False), (8192, 8192, True), (5000, 4096, False)])
def test_ffn_mult_round_trips_through_the_engines_formula_or_is_refused(width, hidden, ok):
    m = ffn_mult_for(width, hidden)
    assert (m is not None) == ok
    if ok:
        assert ffn_mult_to_intermediate_size(m, hidden) == width
        assert ffn_mult_to_intermediate_size(round(m, 6), hidden) == width


def _plan(model: Path, **recipe):
    from slimconv.source import Checkpoint

    config = Checkpoint(model).config
    return build_plan(parse_recipe({"model": str(model), "output": {"dir": "x"}, **recipe}), config), config


def test_auto_picks_stock_nemotron_or_slim_and_says_why(nas_models, tiny_models):
    fmt, why = choose_format("auto", *_plan(nas_models["llama-tied"], remove={"blocks": [2]}))
    assert fmt == "stock" and "blocks" in why
    fmt, why = choose_format("auto", *_plan(nas_models["llama-tied"], remove={"mlp": [2]}))
    assert fmt == "nemotron-nas" and "vLLM" in why
    fmt, why = choose_format("auto", *_plan(nas_models["llama-tied"], parallel={"groups": [[1, 2]]}))
    assert fmt == "slim" and "parallel groups [[1, 2]]" in why
    fmt, why = choose_format("auto", *_plan(tiny_models["qwen3"], remove={"attention": [2]}))
    assert fmt == "slim" and "q/k norms" in why
    fmt, why = choose_format("auto", *_plan(tiny_models["mistral"], remove={"attention": [2]}))
    assert fmt == "slim" and "sliding-window" in why
    fmt, why = choose_format("auto", *_plan(tiny_models["llama-tied"], remove={"attention": [2]}))
    assert fmt == "slim" and "MLP width 96" in why


@pytest.mark.parametrize("model,recipe,fmt,words", [
    ("qwen3", dict(remove={"attention": [2]}), "nemotron-nas", ["q/k norms", "--format slim"]),
    ("llama-tied", dict(parallel={"groups": [[1, 2]]}), "nemotron-nas", ["parallel groups [[1, 2]]", "--format slim"]),
    ("llama-tied", dict(remove={"mlp": [1]}), "stock", ["whole blocks", "--format slim"]),
    ("llama-tied", dict(remove={"mlp": [1]}, early_exit={"policy": "gap", "threshold": 0.5}), "nemotron-nas",
     ["early-exit", "--format slim"]),
])
def test_refused_format_is_exit_2_before_writing(tiny_models, tmp_path, capsys, model, recipe, fmt, words):
    out = tmp_path / "out"
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump({"model": str(tiny_models[model]), "output": {"dir": str(out)}, **recipe}))
    assert main(["convert", str(r), "--format", fmt]) == 2
    err = capsys.readouterr().err
    for w in words:
        assert w in err, err
    assert "Traceback" not in err and not out.exists()
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_cli_auto_writes_nemotron_nas_and_says_so(nas_models, tmp_path, capsys):
    out = tmp_path / "out"
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump({"model": str(nas_models["llama-tied"]), "output": {"dir": str(out)},
                                 "remove": {"attention": [4], "mlp": [1]}}))
    assert main(["convert", str(r)]) == 0
    printed = capsys.readouterr().out
    assert "nemotron-nas" in printed
    assert json.loads((out / "config.json").read_text())["model_type"] == "nemotron-nas"
    meta = json.loads((out / "slimconv_plan.json").read_text())
    assert meta["format"] == "nemotron-nas" and meta["format_reason"]
    for f in ("configuration_decilm.py", "modeling_decilm.py", "modeling_slim.py", "configuration_slim.py"):
        assert (out / f).is_file()
    assert main(["convert", str(r)]) == 2  # an existing output: the same rule as every convert
    assert "already exists" in capsys.readouterr().err
    assert main(["convert", str(r), "--force", "--format", "slim"]) == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == "slimconv"


@pytest.mark.parametrize("arch", ["llama-bias-untied", "qwen2"])
def test_narrowed_layers_are_nemotron_nas_read_as_the_engines_read_them(tmp_path, arch):
    """shrink (issue 30): a narrowed MLP is its layer's ffn_mult where the formula gives its width, merged KV heads
    its n_heads_in_group; auto picks the format, and it is exact."""
    from transformers import AutoConfig

    src = make_tiny(tmp_path / "src", arch, intermediate_size=512)
    recipe = dict(remove={"mlp": [5]}, shrink={"mlp": {"1": list(range(0, 512, 2)), "2-3": list(range(256))},
                                               "kv_heads": {"0-2": 1}})
    assert choose_format("auto", *_plan(src, **recipe))[0] == "nemotron-nas"
    out = tmp_path / "out"
    plan = convert(src, out, fmt="nemotron-nas", **recipe)
    raw = json.loads((out / "config.json").read_text())
    assert [b["attention"]["n_heads_in_group"] for b in raw["block_configs"]] == [4, 4, 4, 2, 2, 2]
    assert [b["ffn"]["ffn_mult"] for b in raw["block_configs"]] == [12.0, 6.0, 6.0, 6.0, 12.0, None]
    weights = header(out)
    assert mlx_expected(raw) == weights
    assert vllm_expected(AutoConfig.from_pretrained(out, trust_remote_code=True)) == weights
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(1))
    err, same = compare(src, out, plan, ids)
    assert err < 1e-5 and same, err
    # a width the engines' formula cannot give goes to the slim format, saying which layer
    fmt, why = choose_format("auto", *_plan(src, shrink={"mlp": {"1": list(range(300))}}))
    assert fmt == "slim" and "output layer 1: MLP width 300" in why
