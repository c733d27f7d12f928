"""Streaming rewrite of a source checkpoint into a slim one, following a plan.

The output tensors are described up front (``layout``), so shard headers are known before any data is
read. Each tensor is then computed from the lazily read source, written, and freed: peak memory is about
one output tensor plus its inputs.

safetensors' own writer needs every tensor of a shard in memory at once, so the shard writer here
is hand-written (the format is an 8-byte header length, a JSON header, then raw little-endian data).
"""
import json
import shutil
from pathlib import Path

import torch
from tqdm import tqdm

from . import arch as A
from .errors import SlimError
from .layout import FROM_ST, DTYPES, ST_DTYPES, Job, dtype_name, output_dtype, slim_layers_config, tensor_dtype, tensor_jobs
from .outdir import CONFIG_FILE, PLAN_FILE, RECIPE_FILE, AtomicDir, refuse_overlap, write_json
from .plan import Plan
from .recipe import parse_size
from .source import Checkpoint, check_weights, checked_source, source_paths, weights_sha256

MODELING_DIR = Path(__file__).parent / "modeling"
MULTIMODAL_FIX = ("remove whole blocks only (`remove.blocks`: a stock output, vision tower included), or set "
                  "`output.text_only: true` to write the text model alone, which every format carries")
MODELING_FILES = ("configuration_slim.py", "modeling_slim.py")




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
                header[job.name] = {"dtype": ST_DTYPES[job.dtype], "shape": list(job.shape),
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
    """The checkpoint's dtype as config.json records it: the embedding's, as written."""
    return dtype_name(tensor_dtype(A.EMBED, ckpt, dtype))


def slim_config(plan: Plan, ckpt: Checkpoint, dtype: str, fmt: str | None = None, wrapped: bool = False) -> dict:
    """The output's config.json. ``wrapped``: a stock output of a multimodal source, its text config rewritten
    inside the source's own config."""
    src = ckpt.config
    n_src = plan.num_source_layers
    fmt = fmt or ("stock" if plan.uniform else "slim")
    if fmt == "nemotron-nas":
        from .formats.nemotron import nas_config

        cfg = nas_config(plan, src)
    elif fmt == "stock":
        kept = [s.source_layers[0] for s in plan.layers]
        cfg = {k: ([v[i] for i in kept] if isinstance(v, list) and len(v) == n_src and k != "architectures" else v)
               for k, v in src.items()}
        cfg["num_hidden_layers"] = len(kept)
        cfg.update(A.moe_layer_keys(plan.arch(src), kept))
        pruned = [s.mlp for s in plan.layers if s.mlp.pruned]
        if pruned:  # plan.uniform: every mixture-of-experts layer keeps as many
            cfg.update(A.expert_count_keys(plan.arch(src), src, len(pruned[0].experts), pruned[0].top_k))
        # Every architecture slimconv converts is a stock transformers model_type: a source's auto_map only
        # points at code the output does not carry, which would make loading it fail (or run foreign code).
        cfg.pop("auto_map", None)
        if not cfg.get("architectures"):  # a dequantised GGUF source has none; engines pick the class from it
            from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

            cfg["architectures"] = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[src["model_type"]]]
        if src.get("model_type") == "qwen2" and "max_window_layers" in src and "layer_types" not in src:
            raise SlimError("this qwen2 config sets sliding layers by max_window_layers without layer_types",
                            "load and re-save it with transformers 5 so that layer_types is explicit")
    else:
        cfg = slim_layers_config(plan, src)
    cfg["dtype"] = _dtype_name(dtype, ckpt)
    cfg.pop("torch_dtype", None)
    if wrapped:
        text = ckpt.raw_config[ckpt.wrapper.text_config]
        cfg = {**ckpt.raw_config, ckpt.wrapper.text_config: {k: v for k, v in cfg.items() if k in text},
               "dtype": cfg["dtype"]}
        cfg.pop("torch_dtype", None)
    return cfg


def keeps_wrapper(ckpt: Checkpoint, fmt: str, text_only: bool) -> bool:
    """Whether the output is a multimodal checkpoint like its source; a SlimError when it would have to be and
    its format cannot be."""
    if not ckpt.wrapper or text_only:
        return False
    if fmt != "stock":
        raise SlimError(f"{ckpt.dir} is a multimodal {ckpt.raw_config['model_type']!r} checkpoint: only a stock "
                        f"output keeps its vision tower, and this plan needs the {fmt} format (it removes sublayers, "
                        "groups layers or prunes experts)", MULTIMODAL_FIX)
    return True


def wrapped_jobs(jobs: list[Job], ckpt: Checkpoint, dtype: str) -> list[Job]:
    """A stock output's text-model tensors under the multimodal source's stored names, then every tensor outside
    the text model (vision tower, projector) as it is, in the output dtype."""
    for job in jobs:
        job.name = ckpt.stored_name(job.name)
    return jobs + [Job(name, ckpt.outside_shapes[name], output_dtype(dtype, FROM_ST[ckpt.outside_dtypes[name]]),
                       lambda name=name: ckpt.get(name)) for name in ckpt.outside]


def write_checkpoint(plan: Plan, ckpt: Checkpoint, out: Path, dtype: str, max_shard_size: str,
                     fmt: str | None = None, text_only: bool = False) -> dict:
    """Writes weights, config, modeling code and tokenizer files into ``out`` (an empty directory).

    ``fmt``: stock, nemotron-nas or slim (see nemotron.choose_format); None: stock when the plan is uniform,
    else slim. A multimodal source gives a multimodal stock output unless ``text_only``."""
    fmt = fmt or ("stock" if plan.uniform else "slim")
    wrapped = keeps_wrapper(ckpt, fmt, text_only)
    jobs = tensor_jobs(plan, ckpt, dtype, renamed=fmt == "stock")
    if wrapped:
        jobs = wrapped_jobs(jobs, ckpt, dtype)
    modeling = MODELING_FILES
    if fmt == "nemotron-nas":
        from .formats.nemotron import NAS_FILES, by_layer, choose_format, extra_jobs

        choose_format(fmt, plan, ckpt.config)  # a plan the format cannot carry is an error, never a wrong file

        jobs, modeling = by_layer(jobs + extra_jobs(plan, ckpt, dtype, jobs)), NAS_FILES
    info = write_shards(jobs, out, parse_size(max_shard_size))
    write_json(out / CONFIG_FILE, slim_config(plan, ckpt, dtype, fmt, wrapped))
    if fmt != "stock":
        for f in modeling:
            shutil.copy2(MODELING_DIR / f, out / f)
    for f in ckpt.aux_files():
        copy_aux(f, out)
    return info


def copy_aux(path: Path, out: Path) -> None:
    """Copies a tokenizer or generation file of the source into ``out``. A tokenizer_config.json loses its
    auto_map: the tokenizer code it points at never travels with an output (in any format), so the map would
    only make loading the output fail, or run code from wherever it resolved."""
    settings = None
    if path.name == "tokenizer_config.json":
        try:
            settings = json.loads(path.read_bytes())
        except ValueError:
            pass  # copied as it is: the source's tokenizer fails to load the same way
    if isinstance(settings, dict) and settings.pop("auto_map", None) is not None:
        (out / path.name).write_text(json.dumps(settings, indent=2, ensure_ascii=False))
    else:
        shutil.copy2(path, out / path.name)


def output_shapes(config: dict) -> dict:
    """arch.tensor_shapes of a written checkpoint, from its own config: a stock one as its family, a slim or
    nemotron-nas one through the per-layer view slimconv's modeling code reads."""
    if config.get("model_type") in A.FAMILIES:
        return A.stock_shapes(config)
    from .layout import as_slim_config

    view = as_slim_config(config)
    layers = []
    for s in view.slim_layers:
        attention, mlp = s["attention"] or {}, s["mlp"] or {}
        layers.append((attention.get("num_heads", 0), attention.get("num_key_value_heads", 0),
                       mlp.get("intermediate_size", 0), len(mlp.get("experts") or []),
                       mlp.get("shared_intermediate_size") or 0))
    return A.tensor_shapes(view.to_dict(), layers, view.projection_bias, view.mlp_bias,
                           "head" if view.qk_norm is True else view.qk_norm or None,
                           A.canonical_names(getattr(view, "norms", None)), per_head_qk_norm=True)


def checked_output(slim_dir: Path) -> Checkpoint:
    """A slimconv output folder that a later stage reads (export, gguf), checked from its headers against its
    own config first, so that damage found by a long export is found before it starts instead."""
    fix = (f"give a folder that `slimconv convert` wrote; if {slim_dir} is one, it is no longer what convert "
           "wrote: convert again (`slimconv convert RECIPE --force`)")
    try:
        ckpt = Checkpoint(slim_dir)
        check_weights(ckpt, output_shapes(ckpt.config), fix)
    except SlimError as e:  # the source's advice (re-download the model) does not apply to an output
        raise SlimError(e.problem, fix) from None
    except (KeyError, ValueError, TypeError) as e:  # a config of a family slimconv does not know
        raise SlimError(f"{slim_dir / CONFIG_FILE} is neither a slim config nor one of a supported family "
                        f"({', '.join(sorted(A.FAMILIES))}): {type(e).__name__} {e}", fix) from None
    return ckpt


def refuse_multimodal(slim_dir: Path, config: dict, fmt: str, how: str) -> None:
    """An export of a multimodal checkpoint is refused: ``how`` says how ``fmt`` runs one, which slimconv does not
    write."""
    if config.get("model_type") in A.MULTIMODAL:
        raise SlimError(f"{slim_dir} is a multimodal {config['model_type']!r} checkpoint: {how}; slimconv does not "
                        f"export its vision tower to {fmt} yet",
                        "convert with `output.text_only: true` (the text model alone) and export that output")


def check_output(out: Path, dtype: str) -> None:
    """Reads back what was written (headers only) before it is renamed into place: its config loads and
    implies exactly the tensors the shards and index hold, in the requested dtype. A failure is a slimconv
    bug, raised as such; the caller's AtomicDir then deletes the folder, so nothing reaches the final path."""
    try:
        ckpt = Checkpoint(out)
        check_weights(ckpt, output_shapes(ckpt.config), "none: slimconv wrote this config itself")
        want = None if dtype == "source" else ST_DTYPES[DTYPES[dtype]]
        wrong = [n for n, d in ckpt.dtypes.items() if want and d != want and d in A.FLOAT_DTYPES]
        if wrong:
            raise SlimError(f"{wrong[0]} is {ckpt.dtypes[wrong[0]]}, not the requested {dtype}")
    except (SlimError, ValueError, KeyError, TypeError) as e:
        raise RuntimeError(f"internal error: the checkpoint just written to {out} fails its own check, so it was "
                           f"not put in place ({e}). This is a bug in slimconv; please report it") from None


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
    from .selection.channels import chosen, resolve_widths
    from .selection.experts import counts, resolve_counts
    from .source import read_config, resolve_source

    src_dir = resolve_source(recipe.model, recipe.allow_pickle, config_only)
    config = read_config(src_dir)
    notes = []
    weights = any(src_dir.glob("*.safetensors"))
    for needed, resolve in ((counts, resolve_counts), (chosen, resolve_widths)):
        if needed(recipe) and weights:
            recipe, note = resolve(recipe, src_dir, config)
            notes.append(note)
    plan = build_plan(recipe, config)
    plan.notes += notes
    # Only the config is at hand here (config_only: no weights downloaded), so the source dtype is its word.
    source_dtype = DTYPES.get(config.get("dtype") or config.get("torch_dtype") or "float32", torch.float32)
    width = output_dtype(recipe.output.dtype, source_dtype).itemsize
    c_src = costs(source_plan(config, plan.arch(config)), config, seq_len, width)
    c_slim = costs(plan, config, seq_len, width)
    return src_dir, config, plan, dict(source=c_src, slim=c_slim, ideal_speedup=speedups(c_src, c_slim))


DEFAULT_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_LICENSE = "apache-2.0"  # SmolLM2's license; the GGUF package carries no model card


def run_convert(recipe, force: bool = False) -> Path:
    from .recipe import dump_recipe
    from .report import console, print_plan, write_card

    refuse_overlap(recipe.output.dir, source_paths(recipe.model))
    target = AtomicDir(Path(recipe.output.dir), force)
    src_dir, config, plan, cost = prepare(recipe)
    # Only now is the folder known that a Hub id or GGUF file resolved to.
    refuse_overlap(recipe.output.dir, source_paths(recipe.model, src_dir))
    ckpt, unread = checked_source(src_dir, plan.arch(config))
    if unread:
        console.print(f"[yellow]warning:[/] {ckpt.dir} holds {len(unread)} tensor(s) a {plan.model_type} checkpoint "
                      f"does not have: {', '.join(unread[:5])}{' ...' if len(unread) > 5 else ''}; they are not "
                      "checked, and only a stock output copies them (with their layer)")
    print_plan(plan, cost["source"], cost["slim"], cost["ideal_speedup"], f"plan: {recipe.model}")
    from .formats.nemotron import choose_format

    fmt, why = choose_format(recipe.output.format, plan, ckpt.config)
    wrapped = keeps_wrapper(ckpt, fmt, recipe.output.text_only)
    stock = f"stock {ckpt.raw_config['model_type']}, vision tower copied" if wrapped else f"stock {plan.model_type}"
    label = {"stock": stock, "nemotron-nas": "nemotron-nas (DeciLM)", "slim": "slim"}[fmt]
    console.print(f"format: {label} ({why})")
    console.print(f"writing {label} checkpoint to {target.target}")
    with target as tmp:
        info = write_checkpoint(plan, ckpt, tmp, recipe.output.dtype, recipe.output.max_shard_size, fmt,
                                recipe.output.text_only)
        (tmp / RECIPE_FILE).write_text(dump_recipe(recipe))
        base = DEFAULT_BASE if recipe.model == "default" else (recipe.model if not Path(recipe.model).exists() else None)
        license = DEFAULT_LICENSE if recipe.model == "default" else _license(ckpt.dir)
        # The source's weight hash lets `heal` refuse a source that changed since (same name, other weights).
        meta = dict(model=recipe.model, source_dir=str(ckpt.dir), source_sha256=weights_sha256(ckpt.dir),
                    base_model=base, license=license, dtype=_dtype_name(recipe.output.dtype, ckpt), format=fmt,
                    format_reason=why, files=info, plan=plan.model_dump(), costs=cost)
        write_json(tmp / PLAN_FILE, meta)
        write_card(tmp)
        check_output(tmp, recipe.output.dtype)
    console.print(f"[green]wrote[/] {target.target} ({info['total_bytes'] / 1e6:.1f} MB in {len(info['files'])} file(s))")
    return target.target
