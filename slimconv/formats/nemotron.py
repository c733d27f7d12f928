"""Output formats of `convert`, and NVIDIA's nemotron-nas (DeciLM) format for plans that remove sublayers.

Formats:
  stock         only whole blocks removed: the source architecture's own config, sliced (no custom code)
  nemotron-nas  blocks and attention/MLP sublayers removed, on an architecture the format can carry: read
                natively by vLLM, SGLang, TensorRT-LLM and mlx-lm (and llama.cpp's `deci` via GGUF)
  slim          anything else (parallel groups, early exit): slimconv's own config and modeling code

What nemotron-nas can carry is what its readers agree on (vLLM's models/nemotron_nas.py, mlx-lm's
models/nemotron-nas.py): every kept attention has the source's head count and head_dim = hidden / heads,
its KV heads are heads / n_heads_in_group (per layer: merged KV heads fit); one ``attention_bias`` flag covers q, k, v and o (a source with
biases on q/k/v only gets an exact all-zero o bias); no q/k norms and no sliding windows (neither engine
reads them); the MLP width (per layer: a narrowed MLP fits) is ``int(2 * ffn_mult * hidden / 3)`` rounded up to a multiple of 256, so a width
that formula cannot give is refused; activations silu, relu, gelu (mlx-lm's list).
"""
from ..errors import SlimError
from ..modeling.configuration_decilm import ffn_mult_to_intermediate_size
from ..plan import Plan

FORMATS = ("auto", "stock", "nemotron-nas", "slim")
NAS_ACTIVATIONS = ("silu", "relu", "gelu")
NAS_ROPE_TYPES = ("default", "linear", "llama3")
NAS_FILES = ("configuration_decilm.py", "modeling_decilm.py", "configuration_slim.py", "modeling_slim.py")
# The keys mlx-lm's AttentionConfig / FFNConfig accept (an unknown key is a TypeError there).
_ATTN_KEYS = dict(no_op=False, replace_with_linear=False, sparsify=None, n_heads_in_group=None, window_length=None,
                  num_sink_tokens=None, use_prefill_window_in_sink_attention=False, unshifted_sink=False)
_FFN_KEYS = dict(no_op=False, replace_with_linear=False, sparsify=None, ffn_mult=None)
# Source keys that describe what the format cannot carry, or that its readers would misread. intermediate_size
# stays (the source's width; every reader takes each layer's from ffn_mult), as slimconv's config check wants it.
_DROP = ("architectures", "auto_map", "model_type", "layer_types", "sliding_window", "use_sliding_window",
         "max_window_layers", "transformers_version", "quantization_config", "head_dim",
         "torch_dtype", "dtype", "num_hidden_layers")


def ffn_mult_for(width: int, hidden: int) -> float | None:
    """The ffn_mult whose engine formula gives exactly ``width`` (after mlx-lm's rounding to 6 decimals), or None."""
    mult = round(width * 3 / (2 * hidden), 6)
    for m in (mult, round(mult + 1e-6, 6)):  # int() truncation may need the next representable step up
        if ffn_mult_to_intermediate_size(m, hidden) == width and ffn_mult_to_intermediate_size(round(m, 6), hidden) == width:
            return m
    return None


def _rope(config: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling in the legacy form the engines read) from either config generation."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = params.pop("rope_theta", None) or config.get("rope_theta") or 10000.0
    kind = params.get("rope_type") or params.get("type") or "default"
    return float(theta), (None if kind == "default" else {**params, "rope_type": kind})


def nas_blockers(plan: Plan, config: dict) -> list[str]:
    """Why nemotron-nas cannot carry this plan over this source (empty: it can)."""
    arch = plan.arch(config)
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    why = []
    if plan.early_exit is not None:
        why.append("the recipe has an early-exit policy (a run-time rule the format has no field for)")
    groups = [s.source_layers for s in plan.layers if len(s.source_layers) > 1]
    if groups:
        why.append(f"parallel groups {groups} (a wide layer has more heads than the format's one head count)")
    if arch.moe and any(arch.sparse):
        why.append(f"{config['model_type']}'s MLPs are mixtures of experts, which the format has no block for")
    if arch.qk_norm:
        why.append(f"{config['model_type']} has q/k norms, which vLLM's and mlx-lm's nemotron-nas code do not load")
    names = arch.names
    out_norms = [n for n in (names.attn_out, names.mlp_out) if n]
    if out_norms or not (names.attn_in and names.mlp_in):
        why.append(f"{config['model_type']} puts norms where the format has none ("
                   + ", ".join([f"output norm {n}" for n in out_norms]
                               + [f"no {w} input norm" for w, n in (("attention", names.attn_in), ("MLP", names.mlp_in))
                                  if not n]) + ")")
    if arch.attn_softcap or arch.final_softcap:
        why.append("logit soft-capping, which the format has no field for")
    if len(set(arch.rope)) > 1 or len(arch.rope_kinds) > 1:
        why.append("RoPE that differs between layers (kinds per layer type, or layers without RoPE)")
    if any((p or {}).get("partial_rotary_factor", 1.0) != 1.0 for p in arch.rope_kinds.values()):
        why.append("partial rotary embeddings (partial_rotary_factor), which the format's readers do not apply")
    windows = sorted({s.attention.sliding_window for s in plan.layers if s.attention and s.attention.sliding_window})
    if windows:
        why.append(f"sliding-window attention (window {windows[0]}), which nemotron-nas readers ignore: they would "
                   "attend to the whole context")
    if (config.get("head_dim") or hidden // heads) * heads != hidden:
        why.append(f"head_dim {config.get('head_dim')} is not hidden_size / num_attention_heads ({hidden}/{heads}); "
                   "the format's readers derive it that way")
    if heads % kv:
        why.append(f"{heads} attention heads are not a multiple of {kv} KV heads (n_heads_in_group)")
    if arch.activation not in NAS_ACTIVATIONS:
        why.append(f"activation {arch.activation!r} (mlx-lm reads {', '.join(NAS_ACTIVATIONS)})")
    kind = (_rope(config)[1] or {}).get("rope_type", "default")
    if kind not in NAS_ROPE_TYPES:
        why.append(f"RoPE scaling {kind!r} (carried: {', '.join(NAS_ROPE_TYPES)})")
    widths = sorted({s.mlp.intermediate_size for s in plan.layers if s.mlp and len(s.mlp.sources) == 1})
    for w in widths:
        if ffn_mult_for(w, hidden) is None:
            layer = next(i for i, s in enumerate(plan.layers) if s.mlp and s.mlp.intermediate_size == w)
            why.append(f"output layer {layer}: MLP width {w} is not what the format's formula int(2 * ffn_mult * "
                       f"{hidden} / 3), rounded up to a multiple of 256, gives for any ffn_mult")
    return why


def choose_format(requested: str, plan: Plan, config: dict) -> tuple[str, str]:
    """(format, why) for a requested format; a request the plan cannot be written in is a SlimError."""
    uniform = plan.uniform
    blockers = nas_blockers(plan, config)
    fits = (["stock"] if uniform else []) + (["nemotron-nas"] if not blockers else []) + ["slim"]
    if requested == "auto":
        if uniform:
            return "stock", "only whole blocks are removed: a stock config of the source architecture loads anywhere"
        if not blockers:
            return "nemotron-nas", ("sublayers are removed and the architecture fits nemotron-nas: vLLM, SGLang, "
                                    "TensorRT-LLM, mlx-lm and llama.cpp (GGUF deci) run it natively")
        return "slim", "nemotron-nas cannot carry this plan: " + "; ".join(blockers)
    if requested not in fits:
        what = "; ".join(blockers) if requested == "nemotron-nas" else (
            "a stock config can only describe a model with whole blocks removed (no sublayer removal, parallel group, "
            "pruned experts or early exit)")
        raise SlimError(f"output format {requested!r} cannot carry this plan: {what}",
                        f"use --format {' or '.join(fits)} (or auto)")
    return requested, "requested"


def nas_config(plan: Plan, src: dict) -> dict:
    """The nemotron-nas config.json for a plan that fits (see nas_blockers); no dtype."""
    hidden, heads = src["hidden_size"], src["num_attention_heads"]
    kv = src.get("num_key_value_heads") or heads
    from ..layout import FOLDED_KEYS

    arch = plan.arch(src)
    theta, scaling = _rope(src)
    blocks = []
    for s in plan.layers:
        attn = dict(_ATTN_KEYS, no_op=s.attention is None,
                    n_heads_in_group=None if s.attention is None else heads // s.attention.num_key_value_heads)
        ffn = dict(_FFN_KEYS, no_op=s.mlp is None,
                   ffn_mult=None if s.mlp is None else ffn_mult_for(s.mlp.intermediate_size, hidden))
        blocks.append({"attention": attn, "ffn": ffn})
    cfg = {k: v for k, v in src.items()
           if k not in _DROP + FOLDED_KEYS and k not in ("rope_parameters", "rope_scaling", "rope_theta")}
    cfg.update(
        architectures=["DeciLMForCausalLM"],
        model_type="nemotron-nas",
        auto_map={"AutoConfig": "configuration_decilm.DeciLMConfig",
                  "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM"},
        num_hidden_layers=len(plan.layers),
        num_key_value_heads=kv,
        attention_bias=any(arch.bias.values()),
        mlp_bias=arch.mlp_bias,
        hidden_act=arch.activation,
        rms_norm_eps=src.get("rms_norm_eps", 1e-6),
        max_position_embeddings=src.get("max_position_embeddings", 2048),
        # An embedding multiplier is folded into the embedding, so a tied head becomes its own tensor.
        tie_word_embeddings=bool(src.get("tie_word_embeddings", False)) and arch.embedding_multiplier is None,
        rope_theta=theta,  # the legacy keys mlx-lm and NVIDIA's checkpoints use ...
        rope_scaling=scaling,
        rope_parameters={**(scaling or {"rope_type": "default"}), "rope_theta": theta},  # ... and transformers 5's
        block_configs=blocks,
    )
    return cfg


def extra_jobs(plan: Plan, ckpt, dtype: str, jobs: list) -> list:
    """What the format needs beside the canonical layout's tensors: all-zero biases for projections the source has
    without one when others have one (qwen2's o_proj; the format's single attention_bias flag gives every
    projection a bias, and a zero bias is exact), and an embedding multiplier folded into the embedding, the
    tied head then written as the unscaled matrix."""
    import torch

    from .. import arch as A
    from ..layout import Job

    arch = plan.arch(ckpt.config)
    extra = []
    if arch.embedding_multiplier is not None:
        embed = next(j for j in jobs if j.name == A.EMBED)
        if A.LM_HEAD not in {j.name for j in jobs}:
            extra.append(Job(A.LM_HEAD, embed.shape, embed.dtype, embed.compute))
        mult, raw = arch.embedding_multiplier, embed.compute
        embed.compute = lambda: raw().to(torch.float32) * torch.tensor(mult, dtype=embed.dtype).float()
    if not any(arch.bias.values()):
        return extra
    hidden, hd, names = ckpt.config["hidden_size"], arch.head_dim, A.CANONICAL
    for i, s in enumerate(plan.layers):
        if not s.attention:
            continue
        rows = {"q": s.attention.num_heads * hd, "k": s.attention.num_key_value_heads * hd,
                "v": s.attention.num_key_value_heads * hd, "o": hidden}
        for p in (p for p, has in arch.bias.items() if not has):
            extra.append(Job(A.LAYER.format(i=i) + f"{getattr(names, p)}.bias", (rows[p],),
                             next(j.dtype for j in jobs if j.name == A.EMBED), lambda n=rows[p]: torch.zeros(n)))
    return extra


def by_layer(jobs: list) -> list:
    """Jobs sorted by layer (extra per-layer tensors after the layer's own), embeddings first, head last."""
    import re

    from .. import arch as A

    def key(job):
        m = re.match(r"model\.layers\.(\d+)\.", job.name)
        return (1, int(m.group(1))) if m else ((0, 0) if job.name == A.EMBED else (2, 0))

    return sorted(jobs, key=key)
