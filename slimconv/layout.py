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
FROM_ST = {v: k for k, v in ST_DTYPES.items()}
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
    return output_dtype(requested, FROM_ST[ckpt.dtypes[name]])


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class _Reader:
    """``ckpt.get`` remembering the last tensor read: a fused q/k/v (or gate/up) tensor is sliced three (two)
    times in a row, and is read once."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt, self.name, self.tensor = ckpt, None, None

    def __call__(self, name: str) -> torch.Tensor:
        if name != self.name:
            self.name, self.tensor = None, None  # the old one is freed before the new one is read
            self.tensor, self.name = self.ckpt.get(name), name
        return self.tensor


def layer_jobs(spec: LayerSpec, out_i: int, ckpt: Checkpoint, arch: A.Arch, norm: str, dtype: str) -> list[Job]:
    """The tensors of output layer ``out_i`` computing ``spec``, in slimconv's canonical layout (``arch.CANONICAL``):
    fused q/k/v and gate/up split, norms in ``w`` form, the attention scale folded into q (or its norm) and the
    residual multiplier into the sublayer's last projection (or its output norm), a wide layer's members
    concatenated with their input norm gains folded into the columns that read them (``norm``: the plan's
    parallel norm mode)."""
    cfg = ckpt.config
    names, out = arch.names, A.CANONICAL
    heads, kv, hd = cfg["num_attention_heads"], A.kv_heads(cfg), arch.head_dim
    rows = {"q": (0, heads * hd), "k": (heads * hd, kv * hd), "v": ((heads + kv) * hd, kv * hd)}
    offset = arch.family.norm_offset
    read = _Reader(ckpt)
    at = lambda m, t: A.LAYER.format(i=m) + t
    jobs = []

    def stored(m, p, kind):
        """The source tensor that holds projection ``p`` of layer ``m`` (a fused one for split parts)."""
        fused = names.qkv if p in "qkv" else names.gate_up if p in ("gate", "up") else None
        return at(m, f"{fused or getattr(names, p)}.{kind}")

    def part(m, p, kind="weight"):
        """Projection ``p`` of source layer ``m`` as stored (sliced out of its fused tensor if it is one)."""
        t = read(stored(m, p, kind))
        if p in "qkv" and names.qkv:
            return t.narrow(0, *rows[p])
        if p in ("gate", "up") and names.gate_up:
            half = t.shape[0] // 2
            return t.narrow(0, 0 if p == "gate" else half, half)
        return t

    def shape_of(m, p, kind="weight"):
        shape = list(ckpt.shapes[stored(m, p, kind)])
        if p in "qkv" and names.qkv:
            shape[0] = rows[p][1]
        elif p in ("gate", "up") and names.gate_up:
            shape[0] //= 2
        return shape

    def gain(m, role):
        """A norm's effective gain (w + offset) of source layer ``m``, in float32."""
        return read(at(m, getattr(names, role) + ".weight")).to(torch.float32) + offset

    def add(name, dtype_of, shape, compute):
        """``shape``: the output's, None for the source tensor's; a None dimension is the source's."""
        stored_shape = ckpt.shapes[dtype_of]
        shape = stored_shape if shape is None else [s if s is not None else stored_shape[k] for k, s in enumerate(shape)]
        jobs.append(Job(A.LAYER.format(i=out_i) + name, tuple(shape), tensor_dtype(dtype_of, ckpt, dtype), compute))

    def projection(members, p, kind, dim, scale=1.0, columns=None, keep=None):
        """Members' ``p`` concatenated along ``dim``, times ``scale``, input columns times norm gain ``columns``.
        One member as stored passes through untouched; otherwise each member is written into a preallocated
        output, so the only float32 temporary is one member's tensor (scales apply in float32, rounded once).
        ``keep``: a single member narrowed along ``dim`` by a function of its tensor (channels kept, heads merged)
        and the width it leaves."""
        shapes = [shape_of(m, p, kind) for m in members]
        shape = list(shapes[0])
        shape[dim] = sum(s[dim] for s in shapes) if keep is None else keep[1]
        name = stored(members[0], p, kind)

        def compute():
            if keep is not None:
                return keep[0](part(members[0], p, kind).to(torch.float32) * scale)
            if len(members) == 1 and scale == 1.0 and columns is None:
                return part(members[0], p, kind).clone() if names.qkv or names.gate_up else part(members[0], p, kind)
            result, start = torch.empty(shape, dtype=tensor_dtype(name, ckpt, dtype)), 0
            for m in members:
                t = part(m, p, kind).to(torch.float32) * scale
                if columns is not None:
                    t = t * gain(m, columns)[None, :]
                result.narrow(dim, start, t.shape[dim]).copy_(t)
                start += t.shape[dim]
            return result

        add(f"{getattr(out, p)}.{kind}", name, shape, compute)

    def summed(members, p, scale):
        add(f"{getattr(out, p)}.bias", stored(members[0], p, "bias"), shape_of(members[0], p, "bias"),
            lambda: sum(part(m, p, "bias").to(torch.float32) for m in members) * scale)

    def norm_gain(members, role, out_name, how="own", scale=1.0):
        """A norm of the output layer: its member's gain (``own``), the identity (``ones``: gains folded into the
        projections), or the members' mean gain (``mean``: the LP authors' shared norm)."""
        name = at(members[0], getattr(names, role) + ".weight")
        compute = {"own": lambda: gain(members[0], role) * scale,
                   "ones": lambda: torch.ones(ckpt.shapes[name]),
                   "mean": lambda: sum(gain(m, role) for m in members) / len(members)}[how]
        if how == "own" and offset == 0 and scale == 1.0:
            compute = lambda: read(name)
        add(f"{out_name}.weight", name, ckpt.shapes[name], compute)

    # The residual multiplier scales what a sublayer adds: its output norm's gain where it has one, else its
    # last projection.
    residual = arch.residual_multiplier
    if spec.attention:
        mem = spec.attention.sources
        wide = len(mem) > 1
        columns = "attn_in" if wide else None
        q_scale = arch.query_scale if not arch.qk_norm else 1.0
        merged = None
        if spec.attention.merged_from:
            merged = merge_heads(spec.attention.num_key_value_heads, hd), spec.attention.num_key_value_heads * hd
        for p in "qkv":
            projection(mem, p, "weight", 0, q_scale if p == "q" else 1.0, columns, merged if p != "q" else None)
            if arch.bias[p]:
                projection(mem, p, "bias", 0, q_scale if p == "q" else 1.0, keep=merged if p != "q" else None)
        o_scale = residual if names.attn_out is None else 1.0
        projection(mem, "o", "weight", 1, o_scale)
        if arch.bias["o"]:
            summed(mem, "o", o_scale)
        if arch.qk_norm == "head":
            n_heads = {"q": heads, "k": spec.attention.num_key_value_heads // len(mem)}
            for p in "qk":
                src = at(mem[0], getattr(names, f"{p}_norm") + ".weight")
                scale = arch.query_scale if p == "q" else 1.0
                # Per-head weights: a wide layer's heads keep their own member's q/k norm gain.
                add(f"{getattr(out, p + '_norm')}.weight", src, (n_heads[p] * len(mem), ckpt.shapes[src][0]),
                    lambda t=f"{p}_norm", p=p, scale=scale, mem=mem: torch.cat(
                        [gain(m, t).expand(n_heads[p], -1) for m in mem]) * scale)
        elif arch.qk_norm == "full":  # over all heads: a wide layer has no such norm (build_plan refuses one)
            for p in "qk":
                norm_gain(mem, f"{p}_norm", getattr(out, f"{p}_norm"), scale=arch.query_scale if p == "q" else 1.0)
        if names.attn_in:
            norm_gain(mem, "attn_in", out.attn_in, "ones" if wide else "own")
        if names.attn_out:
            norm_gain(mem, "attn_out", out.attn_out, scale=residual)
    if spec.mlp and spec.mlp.experts is not None:
        moe_jobs(spec.mlp, at, arch, add, read, residual if names.mlp_out is None else 1.0)
        m = spec.mlp.sources[0]
        if names.mlp_in:
            norm_gain([m], "mlp_in", out.mlp_in)
        if names.mlp_out:
            norm_gain([m], "mlp_out", out.mlp_out, scale=residual)
    elif spec.mlp:
        mem = spec.mlp.sources
        wide = len(mem) > 1
        fold = wide and norm == "per_layer"
        inner = outer = None
        if spec.mlp.channels is not None:  # a narrowed MLP: its kept channels' rows of gate/up, columns of down
            kept = torch.tensor(spec.mlp.channels)
            inner, outer = (lambda t: t.index_select(0, kept), len(kept)), (lambda t: t.index_select(1, kept), len(kept))
        for p in ("gate", "up"):
            projection(mem, p, "weight", 0, columns="mlp_in" if fold else None, keep=inner)
            if arch.mlp_bias:
                projection(mem, p, "bias", 0, keep=inner)
        down_scale = residual if names.mlp_out is None else 1.0
        projection(mem, "down", "weight", 1, down_scale, keep=outer)
        if arch.mlp_bias:
            summed(mem, "down", down_scale)
        if names.mlp_in:
            norm_gain(mem, "mlp_in", out.mlp_in, "ones" if fold else "mean" if wide else "own")
        if names.mlp_out:
            norm_gain(mem, "mlp_out", out.mlp_out, scale=residual)
    return jobs


def merge_heads(count: int, head_dim: int):
    """Rows of a k or v projection (weight or bias) over the source's KV heads -> ``count`` heads, each the mean of a
    run of consecutive source heads: the heads whose query groups it now serves (Puzzle's mean-pooling init)."""
    return lambda t: t.reshape(count, -1, head_dim, *t.shape[1:]).mean(1).reshape(count * head_dim, *t.shape[1:])


def moe_jobs(mlp, at, arch: A.Arch, add, read, scale: float) -> None:
    """A mixture-of-experts sublayer of one source layer in the canonical layout (``arch.CANONICAL_MOE``): the router
    keeps the rows of the kept experts, which are renumbered in their order; ``scale`` (the residual multiplier)
    goes into every down projection. Each tensor is read (and freed) on its own: never a layer's expert set."""
    src, out, m = arch.moe.names, A.CANONICAL_MOE, mlp.sources[0]
    kept = list(mlp.experts)
    router = at(m, src.router + ".weight")
    every = kept == list(range(arch.num_experts))
    add(f"{out.router}.weight", router, (len(kept), None),
        (lambda: read(router)) if every else (lambda: read(router)[kept].clone()))

    def copy(source, target, scaled):
        name = at(m, source + ".weight")
        compute = ((lambda: read(name).to(torch.float32) * scale) if scaled and scale != 1.0 else lambda: read(name))
        add(f"{target}.weight", name, None, compute)

    for j, e in enumerate(kept):
        for p in A.EXPERT_PROJ:
            copy(getattr(src, p).format(e=e), getattr(out, p).format(e=j), p == "down")
    if mlp.shared_intermediate_size:
        for p in A.SHARED_PROJ:
            copy(getattr(src, p), getattr(out, p), p == "shared_down")
        copy(src.shared_router, out.shared_router, False)


def _renamed_layer_jobs(spec: LayerSpec, out_i: int, ckpt: Checkpoint, dtype: str, arch: A.Arch) -> list[Job]:
    """A kept layer's tensors as stored, under its new index; pruned experts left out and the kept ones renumbered
    in their order, the router keeping their rows (a stock output of experts pruned alike in every layer)."""
    prefix, at = A.LAYER.format(i=spec.source_layers[0]), A.LAYER.format(i=out_i)
    renamed, router, kept = {}, None, []
    if spec.mlp is not None and spec.mlp.pruned:
        names, kept = arch.moe.names, spec.mlp.experts
        router = prefix + names.router + ".weight"
        for e in range(spec.mlp.source_experts):
            for p in A.EXPERT_PROJ:
                name = prefix + getattr(names, p).format(e=e) + ".weight"
                renamed[name] = at + getattr(names, p).format(e=kept.index(e)) + ".weight" if e in kept else None
    jobs = []
    for name in ckpt.where:
        if not name.startswith(prefix) or renamed.get(name, "") is None:
            continue
        if name == router:
            jobs.append(Job(at + name[len(prefix):], (len(kept), *ckpt.shapes[name][1:]), tensor_dtype(name, ckpt, dtype),
                            lambda name=name: ckpt.get(name)[kept].clone()))
        else:
            jobs.append(Job(renamed.get(name) or at + name[len(prefix):], ckpt.shapes[name],
                            tensor_dtype(name, ckpt, dtype), lambda name=name: ckpt.get(name)))
    return jobs


def tensor_jobs(plan: Plan, ckpt: Checkpoint, dtype: str, renamed: bool | None = None, arch: A.Arch | None = None) -> list[Job]:
    """``renamed``: copy each kept layer's tensors under its new index (a stock output; default: when the plan
    is uniform) instead of building them in the canonical layout from the layer spec. The final norm of the
    canonical layout carries the norm offset and the logits multiplier."""
    arch = arch or plan.arch(ckpt.config)
    renamed = plan.uniform if renamed is None else renamed
    plain = lambda name: Job(name, ckpt.shapes[name], tensor_dtype(name, ckpt, dtype), lambda: ckpt.get(name))
    jobs = [plain(A.EMBED)]
    for i, spec in enumerate(plan.layers):
        jobs += (_renamed_layer_jobs(spec, i, ckpt, dtype, arch) if renamed
                 else layer_jobs(spec, i, ckpt, arch, plan.norm, dtype))
    final = plain(A.FINAL_NORM)
    scale, offset = arch.logits_multiplier, arch.family.norm_offset
    if not renamed and (scale != 1.0 or offset):
        final.compute = lambda: (ckpt.get(A.FINAL_NORM).to(torch.float32) + offset) * scale
    jobs.append(final)
    if A.LM_HEAD in ckpt and not ckpt.config.get("tie_word_embeddings", False):
        jobs.append(plain(A.LM_HEAD))
    return jobs


# Source keys whose effect the canonical layout folds into the weights, or carries under its own keys.
FOLDED_KEYS = ("mlp_only_layers", "decoder_sparse_step", "residual_multiplier", "attention_multiplier",
               "logits_scaling", "query_pre_attn_scalar", "embedding_multiplier", "hidden_activation",
               "no_rope_layers", "no_rope_layer_interval", "sliding_window_pattern", "attn_logit_softcapping",
               "final_logit_softcapping")


def slim_layers_config(plan: Plan, src: dict, arch: A.Arch | None = None) -> dict:
    """The ``model_type: slimconv`` config for a plan over a source config (no dtype)."""
    arch = arch or plan.arch(src)
    names = arch.names
    cfg = {k: v for k, v in src.items() if k not in _SLIM_DROP_KEYS + FOLDED_KEYS}
    cfg.update(
        model_type="slimconv",
        architectures=["SlimForCausalLM"],
        auto_map={"AutoConfig": "configuration_slim.SlimConfig",
                  "AutoModelForCausalLM": "modeling_slim.SlimForCausalLM"},
        source_model_type=src["model_type"],
        head_dim=arch.head_dim,
        num_key_value_heads=A.kv_heads(src),
        num_hidden_layers=len(plan.layers),
        # The cache is never cropped to a window (masks handle windows), so every slot is "full".
        layer_types=["full_attention"] * len(plan.layers),
        projection_bias=arch.bias,
        mlp_bias=arch.mlp_bias,
        hidden_act=arch.activation,
        qk_norm=arch.qk_norm or False,
        norms=dict(attention_input=names.attn_in is not None, attention_output=names.attn_out is not None,
                   mlp_input=names.mlp_in is not None, mlp_output=names.mlp_out is not None),
        rope_kinds=arch.rope_kinds,
        embedding_multiplier=arch.embedding_multiplier,
        attn_logit_softcapping=arch.attn_softcap,
        final_logit_softcapping=arch.final_softcap,
        # Which channels a narrowed MLP keeps is the plan's record (plan.json); the modeling code needs its width only.
        slim_layers=[s.model_dump(exclude={"mlp": {"channels"}}) for s in plan.layers],
    )
    if plan.early_exit is not None:
        cfg["early_exit"] = plan.early_exit
    return cfg


class CanonicalView:
    """A stock checkpoint of any supported family seen in slimconv's canonical layout, tensor by tensor (every
    layer kept): what the readers of slim outputs (the ONNX and GGUF writers) read, so that they meet one
    layout whatever the family. Tensors are computed on demand (``get``); nothing is held."""

    def __init__(self, ckpt: Checkpoint):
        config = ckpt.config
        self.dir, self.config = ckpt.dir, config
        self.jobs = {j.name: j for j in tensor_jobs(source_plan(config), ckpt, "source", renamed=False)}
        self.shapes = {n: tuple(j.shape) for n, j in self.jobs.items()}
        self.dtypes = {n: ST_DTYPES[j.dtype] for n, j in self.jobs.items()}
        self.where = dict.fromkeys(self.jobs)

    def __contains__(self, name: str) -> bool:
        return name in self.jobs

    def get(self, name: str) -> torch.Tensor:
        return self.jobs[name].compute()


def canonical(ckpt: Checkpoint):
    """``ckpt`` itself when it is a slimconv (or nemotron-nas) output, else its ``CanonicalView``."""
    if ckpt.config.get("model_type") in ("slimconv", "nemotron-nas"):
        return ckpt
    return CanonicalView(ckpt)


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
