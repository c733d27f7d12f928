"""Streaming rewrite of a source checkpoint into a slim one, following a plan.

Output tensors are described up front (name, shape, dtype, and how to compute them from source
tensors), so shard headers are known before any data is read. Each tensor is then computed from the
lazily read source, written, and freed: peak memory is about one output tensor plus its inputs.

safetensors' own writer needs every tensor of a shard in memory at once, so the shard writer here
is hand-written (the format is an 8-byte header length, a JSON header, then raw little-endian data).
"""
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from . import arch as A
from .errors import SlimError
from .outdir import CONFIG_FILE, PLAN_FILE, RECIPE_FILE, AtomicDir, refuse_overlap, write_json
from .plan import LayerSpec, Plan
from .recipe import parse_size
from .source import Checkpoint, source_paths

MODELING_DIR = Path(__file__).parent / "modeling"
MODELING_FILES = ("configuration_slim.py", "modeling_slim.py")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_ST = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
       torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.int8: "I8", torch.bool: "BOOL"}
_FROM_ST = {v: k for k, v in _ST.items()}
# Source config keys that describe per-layer attention types; the slim config carries them per layer.
# Keys of a written config that SlimConfig(**config) must not receive (class-level or loader metadata).
_RUNTIME_DROP_KEYS = ("model_type", "architectures", "auto_map", "transformers_version", "dtype", "torch_dtype")
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


def _out_dtype(name: str, ckpt: Checkpoint, dtype: str) -> torch.dtype:
    src = _FROM_ST[ckpt.dtypes[name]]
    return DTYPES[dtype] if dtype != "source" and src.is_floating_point else src


def _layer_jobs(spec: LayerSpec, out_i: int, ckpt: Checkpoint, arch: A.Arch, norm: str, dtype: str) -> list[Job]:
    cfg = ckpt.config
    src = lambda m, t: A.LAYER.format(i=m) + t
    dst = lambda t: A.LAYER.format(i=out_i) + t
    get = lambda m, t: ckpt.get(src(m, t)).to(torch.float32)
    jobs = []

    def add(template, members, shape, compute):
        name = src(members[0], template)
        jobs.append(Job(dst(template), shape, _out_dtype(name, ckpt, dtype), compute))

    def stacked(members, template, dim, gain=None):
        """Concatenates the members' tensors along ``dim``, scaling input columns by a norm gain.

        A single member without gain passes through untouched; otherwise each member is written into
        a preallocated output, so the only float32 temporary is one member's tensor (gains are applied
        in float32 and rounded once).
        """
        shapes = [ckpt.shapes[src(m, template)] for m in members]
        shape = list(shapes[0])
        shape[dim] = sum(s[dim] for s in shapes)
        out_dtype = _out_dtype(src(members[0], template), ckpt, dtype)

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
            heads = {"q": cfg["num_attention_heads"], "k": cfg.get("num_key_value_heads") or cfg["num_attention_heads"]}
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
        Job(A.LAYER.format(i=out_i) + name[len(prefix):], ckpt.shapes[name], _out_dtype(name, ckpt, dtype),
            lambda name=name: ckpt.get(name))
        for name in ckpt.where if name.startswith(prefix)
    ]


def tensor_jobs(plan: Plan, ckpt: Checkpoint, dtype: str) -> list[Job]:
    arch = A.get_arch(ckpt.config)
    plain = lambda name: Job(name, ckpt.shapes[name], _out_dtype(name, ckpt, dtype), lambda: ckpt.get(name))
    jobs = [plain(A.EMBED)]
    for i, spec in enumerate(plan.layers):
        jobs += (_renamed_layer_jobs(spec, i, ckpt, dtype) if plan.uniform
                 else _layer_jobs(spec, i, ckpt, arch, plan.norm, dtype))
    jobs.append(plain(A.FINAL_NORM))
    if A.LM_HEAD in ckpt and not ckpt.config.get("tie_word_embeddings", False):
        jobs.append(plain(A.LM_HEAD))
    return jobs


def write_shards(jobs: list[Job], out: Path, max_shard_bytes: int, desc: str = "writing") -> dict:
    shards, current, size = [], [], 0
    for job in jobs:
        if current and size + job.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(job)
        size += job.nbytes
    shards.append(current)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
    weight_map = {}
    total = sum(j.nbytes for j in jobs)
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=None) as bar:
        for fname, shard in zip(names, shards):
            header, offset = {"__metadata__": {"format": "pt"}}, 0
            for job in shard:
                header[job.name] = {"dtype": _ST[job.dtype], "shape": list(job.shape),
                                    "data_offsets": [offset, offset + job.nbytes]}
                offset += job.nbytes
                weight_map[job.name] = fname
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            with open(out / fname, "wb") as f:
                f.write(len(raw).to_bytes(8, "little"))
                f.write(raw)
                for job in shard:
                    t = job.compute().to(job.dtype).contiguous()
                    if tuple(t.shape) != tuple(job.shape):
                        raise RuntimeError(f"{job.name}: computed {tuple(t.shape)}, planned {job.shape}")
                    f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
                    bar.update(job.nbytes)
                    del t
    if len(shards) > 1:
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return {"files": names, "total_bytes": total}


def _dtype_name(dtype: str, ckpt: Checkpoint) -> str:
    if dtype != "source":
        return dtype
    return str(_FROM_ST[ckpt.dtypes[A.EMBED]]).replace("torch.", "")


def slim_layers_config(plan: Plan, src: dict) -> dict:
    """The ``model_type: slimconv`` config for a plan over a source config (no dtype)."""
    arch = A.get_arch(src)
    heads = src["num_attention_heads"]
    cfg = {k: v for k, v in src.items() if k not in _SLIM_DROP_KEYS}
    cfg.update(
        model_type="slimconv",
        architectures=["SlimForCausalLM"],
        auto_map={"AutoConfig": "configuration_slim.SlimConfig",
                  "AutoModelForCausalLM": "modeling_slim.SlimForCausalLM"},
        source_model_type=src["model_type"],
        head_dim=src.get("head_dim") or src["hidden_size"] // heads,
        num_key_value_heads=src.get("num_key_value_heads") or heads,
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
    from .plan import source_plan

    if config.get("model_type") != "slimconv":
        config = slim_layers_config(source_plan(config), config)
    return SlimConfig(**{k: v for k, v in config.items() if k not in _RUNTIME_DROP_KEYS})


def slim_config(plan: Plan, ckpt: Checkpoint, dtype: str) -> dict:
    src = ckpt.config
    n_src = plan.num_source_layers
    if plan.uniform:
        kept = [s.source_layers[0] for s in plan.layers]
        cfg = {k: ([v[i] for i in kept] if isinstance(v, list) and len(v) == n_src and k != "architectures" else v)
               for k, v in src.items()}
        cfg["num_hidden_layers"] = len(kept)
        if src.get("model_type") == "qwen2" and "max_window_layers" in src and "layer_types" not in src:
            raise SlimError("this qwen2 config sets sliding layers by max_window_layers without layer_types",
                            "load and re-save it with transformers 5 so that layer_types is explicit")
    else:
        cfg = slim_layers_config(plan, src)
    cfg["dtype"] = _dtype_name(dtype, ckpt)
    cfg.pop("torch_dtype", None)
    return cfg


def write_checkpoint(plan: Plan, ckpt: Checkpoint, out: Path, dtype: str, max_shard_size: str) -> dict:
    """Writes weights, config, modeling code and tokenizer files into ``out`` (an empty directory)."""
    jobs = tensor_jobs(plan, ckpt, dtype)
    info = write_shards(jobs, out, parse_size(max_shard_size))
    write_json(out / CONFIG_FILE, slim_config(plan, ckpt, dtype))
    if not plan.uniform:
        for f in MODELING_FILES:
            shutil.copy2(MODELING_DIR / f, out / f)
    for f in ckpt.aux_files():
        shutil.copy2(f, out / f.name)
    return info


def _license(src: Path) -> str | None:
    """The license named in the source model card's front matter, if any."""
    readme = src / "README.md"
    text = readme.read_text(errors="ignore") if readme.is_file() else ""
    front = text.split("---")[1] if text.startswith("---") else ""
    return next((l.split(":", 1)[1].strip() for l in front.splitlines() if l.startswith("license:")), None)


def prepare(recipe, seq_len: int = 512, config_only: bool = False):
    """Resolves the source and the plan (every recipe error surfaces here, before any work).

    Returns (source directory, source config, plan, costs).
    """
    from .plan import build_plan, costs, source_plan, speedups
    from .source import read_config, resolve_source

    src_dir = resolve_source(recipe.model, recipe.allow_pickle, config_only)
    config = read_config(src_dir)
    plan = build_plan(recipe, config)
    dtype = recipe.output.dtype if recipe.output.dtype != "source" else (
        config.get("dtype") or config.get("torch_dtype") or "float32")
    width = DTYPES.get(dtype, torch.float32).itemsize
    c_src = costs(source_plan(config), config, seq_len, width)
    c_slim = costs(plan, config, seq_len, width)
    return src_dir, config, plan, dict(source=c_src, slim=c_slim, ideal_speedup=speedups(c_src, c_slim))


DEFAULT_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_LICENSE = "apache-2.0"  # SmolLM2's license; the GGUF package carries no model card


def run_convert(recipe, force: bool = False) -> Path:
    from .recipe import dump_recipe
    from .report import console, print_plan, write_card

    refuse_overlap(recipe.output.dir, source_paths(recipe.model))
    target = AtomicDir(Path(recipe.output.dir), force)
    src_dir, _, plan, cost = prepare(recipe)
    # Only now is the folder known that a Hub id or GGUF file resolved to.
    refuse_overlap(recipe.output.dir, source_paths(recipe.model, src_dir))
    ckpt = Checkpoint(src_dir)
    print_plan(plan, cost["source"], cost["slim"], cost["ideal_speedup"], f"plan: {recipe.model}")
    console.print(f"writing {'stock ' + plan.model_type if plan.uniform else 'slim'} checkpoint to {target.target}")
    with target as tmp:
        info = write_checkpoint(plan, ckpt, tmp, recipe.output.dtype, recipe.output.max_shard_size)
        (tmp / RECIPE_FILE).write_text(dump_recipe(recipe))
        base = DEFAULT_BASE if recipe.model == "default" else (recipe.model if not Path(recipe.model).exists() else None)
        license = DEFAULT_LICENSE if recipe.model == "default" else _license(ckpt.dir)
        meta = dict(model=recipe.model, source_dir=str(ckpt.dir), base_model=base, license=license,
                    dtype=_dtype_name(recipe.output.dtype, ckpt), files=info, plan=plan.model_dump(), costs=cost)
        write_json(tmp / PLAN_FILE, meta)
        write_card(tmp)
    console.print(f"[green]wrote[/] {target.target} ({info['total_bytes'] / 1e6:.1f} MB in {len(info['files'])} file(s))")
    return target.target
