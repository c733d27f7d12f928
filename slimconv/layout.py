"""The layout of slim weights and config: which output tensors a plan produces, their shapes and dtypes,
and how each is computed from source tensors (removed sublayers left out, parallel groups concatenated
into one wide layer with their norm gains folded in). The converter writes these tensors; the analysis
engine (layerwise) builds single layers from the same description, so a candidate is scored exactly
as the converted checkpoint computes it.

Tensors are described up front (name, shape, dtype, and a function computing them from the lazily read
source), so shard headers are known before any data is read.
"""
from dataclasses import dataclass
from typing import Callable

import torch

from . import arch as A
from .plan import LayerSpec, Plan, source_plan
from .source import Checkpoint

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# safetensors' dtype names.
ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
             torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.int8: "I8", torch.bool: "BOOL"}
_FROM_ST = {v: k for k, v in ST_DTYPES.items()}
# Source config keys that describe per-layer attention types; the slim config carries them per layer.
_SLIM_DROP_KEYS = ("architectures", "auto_map", "model_type", "layer_types", "sliding_window",
                   "use_sliding_window", "max_window_layers", "transformers_version", "quantization_config")


@dataclass
class Job:
    name: str
    shape: tuple
    dtype: torch.dtype
    compute: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * self.dtype.itemsize


def output_dtype(requested: str, source: torch.dtype) -> torch.dtype:
    """The dtype a tensor stored as ``source`` is written in: ``requested`` (a DTYPES key) for floating
    tensors, unless it is "source"; integer tensors always keep theirs."""
    return DTYPES[requested] if requested != "source" and source.is_floating_point else source


def tensor_dtype(name: str, ckpt: Checkpoint, requested: str) -> torch.dtype:
    return output_dtype(requested, _FROM_ST[ckpt.dtypes[name]])


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def layer_jobs(spec: LayerSpec, out_i: int, ckpt: Checkpoint, arch: A.Arch, norm: str, dtype: str) -> list[Job]:
    """The tensors of output layer ``out_i`` computing ``spec`` (``norm``: the plan's parallel norm mode)."""
    cfg = ckpt.config
    src = lambda m, t: A.LAYER.format(i=m) + t
    dst = lambda t: A.LAYER.format(i=out_i) + t
    get = lambda m, t: ckpt.get(src(m, t)).to(torch.float32)
    jobs = []

    def add(template, members, shape, compute):
        name = src(members[0], template)
        jobs.append(Job(dst(template), shape, tensor_dtype(name, ckpt, dtype), compute))

    def stacked(members, template, dim, gain=None):
        """Concatenates the members' tensors along ``dim``, scaling input columns by a norm gain.

        A single member without gain passes through untouched; otherwise each member is written into
        a preallocated output, so the only float32 temporary is one member's tensor (gains are applied
        in float32 and rounded once).
        """
        shapes = [ckpt.shapes[src(m, template)] for m in members]
        shape = list(shapes[0])
        shape[dim] = sum(s[dim] for s in shapes)
        out_dtype = tensor_dtype(src(members[0], template), ckpt, dtype)

        def compute():
            if len(members) == 1 and gain is None:
                return ckpt.get(src(members[0], template))
            out, offset = torch.empty(shape, dtype=out_dtype), 0
            for m in members:
                t = ckpt.get(src(m, template))
                if gain:
                    t = t.to(torch.float32) * get(m, gain)[None, :]
                out.narrow(dim, offset, t.shape[dim]).copy_(t)
                offset += t.shape[dim]
            return out

        add(template, members, tuple(shape), compute)

    def summed(members, template):
        add(template, members, ckpt.shapes[src(members[0], template)],
            lambda: sum(get(m, template) for m in members))

    def ones_like(members, template):
        add(template, members, ckpt.shapes[src(members[0], template)],
            lambda: torch.ones(ckpt.shapes[src(members[0], template)]))

    if spec.attention:
        attn_mem = spec.attention.sources
        wide = len(attn_mem) > 1
        gain = A.INPUT_NORM if wide else None
        bias = arch.projection_bias(cfg)
        for p in "qkv":
            stacked(attn_mem, A.ATTN.format(p=p, kind="weight"), 0, gain)
            if bias[p]:
                stacked(attn_mem, A.ATTN.format(p=p, kind="bias"), 0)
        stacked(attn_mem, A.ATTN.format(p="o", kind="weight"), 1)
        if bias["o"]:
            summed(attn_mem, A.ATTN.format(p="o", kind="bias"))
        if arch.qk_norm:
            heads = {"q": cfg["num_attention_heads"], "k": A.kv_heads(cfg)}
            for p in "qk":
                t = A.QK_NORM.format(p=p)
                # Per-head weights: a wide layer's heads keep their own member's q/k norm gain.
                add(t, attn_mem, (heads[p] * len(attn_mem), ckpt.shapes[src(attn_mem[0], t)][0]),
                    lambda t=t, p=p: torch.cat([get(m, t).expand(heads[p], -1) for m in attn_mem]))
        if wide:
            ones_like(attn_mem, A.INPUT_NORM)
        else:
            stacked(attn_mem, A.INPUT_NORM, 0)
    if spec.mlp:
        mlp_mem = spec.mlp.sources
        wide = len(mlp_mem) > 1
        fold = wide and norm == "per_layer"
        gain = A.POST_NORM if fold else None
        for p in ("gate", "up"):
            stacked(mlp_mem, A.MLP.format(p=p, kind="weight"), 0, gain)
            if arch.has_mlp_bias(cfg):
                stacked(mlp_mem, A.MLP.format(p=p, kind="bias"), 0)
        stacked(mlp_mem, A.MLP.format(p="down", kind="weight"), 1)
        if arch.has_mlp_bias(cfg):
            summed(mlp_mem, A.MLP.format(p="down", kind="bias"))
        if fold:
            ones_like(mlp_mem, A.POST_NORM)
        elif wide:  # norm: mean -- one shared norm whose gain is the members' mean (the LP authors' code)
            add(A.POST_NORM, mlp_mem, ckpt.shapes[src(mlp_mem[0], A.POST_NORM)],
                lambda: sum(get(m, A.POST_NORM) for m in mlp_mem) / len(mlp_mem))
        else:
            stacked(mlp_mem, A.POST_NORM, 0)
    return jobs


def _renamed_layer_jobs(spec: LayerSpec, out_i: int, ckpt: Checkpoint, dtype: str) -> list[Job]:
    prefix = A.LAYER.format(i=spec.source_layers[0])
    return [
        Job(A.LAYER.format(i=out_i) + name[len(prefix):], ckpt.shapes[name], tensor_dtype(name, ckpt, dtype),
            lambda name=name: ckpt.get(name))
        for name in ckpt.where if name.startswith(prefix)
    ]


def tensor_jobs(plan: Plan, ckpt: Checkpoint, dtype: str, renamed: bool | None = None) -> list[Job]:
    """``renamed``: copy each kept layer's tensors under its new index (a stock output; default: when the plan
    is uniform) instead of building them from the layer spec."""
    arch = A.get_arch(ckpt.config)
    renamed = plan.uniform if renamed is None else renamed
    plain = lambda name: Job(name, ckpt.shapes[name], tensor_dtype(name, ckpt, dtype), lambda: ckpt.get(name))
    jobs = [plain(A.EMBED)]
    for i, spec in enumerate(plan.layers):
        jobs += (_renamed_layer_jobs(spec, i, ckpt, dtype) if renamed
                 else layer_jobs(spec, i, ckpt, arch, plan.norm, dtype))
    jobs.append(plain(A.FINAL_NORM))
    if A.LM_HEAD in ckpt and not ckpt.config.get("tie_word_embeddings", False):
        jobs.append(plain(A.LM_HEAD))
    return jobs


def slim_layers_config(plan: Plan, src: dict) -> dict:
    """The ``model_type: slimconv`` config for a plan over a source config (no dtype)."""
    arch = A.get_arch(src)
    cfg = {k: v for k, v in src.items() if k not in _SLIM_DROP_KEYS}
    cfg.update(
        model_type="slimconv",
        architectures=["SlimForCausalLM"],
        auto_map={"AutoConfig": "configuration_slim.SlimConfig",
                  "AutoModelForCausalLM": "modeling_slim.SlimForCausalLM"},
        source_model_type=src["model_type"],
        head_dim=A.head_dim(src),
        num_key_value_heads=A.kv_heads(src),
        num_hidden_layers=len(plan.layers),
        # The cache is never cropped to a window (masks handle windows), so every slot is "full".
        layer_types=["full_attention"] * len(plan.layers),
        projection_bias=arch.projection_bias(src),
        mlp_bias=arch.has_mlp_bias(src),
        qk_norm=arch.qk_norm,
        slim_layers=[s.model_dump() for s in plan.layers],
    )
    if plan.early_exit is not None:
        cfg["early_exit"] = plan.early_exit
    return cfg


def as_slim_config(config: dict):
    """The SlimConfig object that runs ``config``: a slimconv config as written, or a stock one as every
    layer kept (slimconv's own code runs both through the slim modeling classes)."""
    from .modeling.configuration_slim import SlimConfig

    # Keys of a written config that SlimConfig(**config) must not receive (class-level or loader metadata).
    drop = ("model_type", "architectures", "auto_map", "transformers_version", "dtype", "torch_dtype")
    if config.get("model_type") == "nemotron-nas":  # its own config class derives the slim view
        from .modeling.configuration_decilm import DeciLMConfig

        nas = DeciLMConfig(**{k: v for k, v in config.items() if k not in drop})
        config = {**config, "model_type": "slimconv", "slim_layers": nas.slim_layers,
                  "projection_bias": nas.projection_bias, "qk_norm": False, "head_dim": nas.head_dim}
    elif config.get("model_type") != "slimconv":
        config = slim_layers_config(source_plan(config), config)
    return SlimConfig(**{k: v for k, v in config.items() if k not in drop})
