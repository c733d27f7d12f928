"""Speed of a slim output against its source: prefill latency and decode throughput in PyTorch and ONNX
Runtime, measured interleaved (source, slim, source, slim, ...) after a warm-up, beside the plan's ideal.

The ideal speedups come from the plan's cost model (plan.costs): prefill is compute-bound, so its ideal
is the FLOP ratio at the prompt length; decode is memory-bound, so its ideal is the ratio of bytes read
per step: the weights once, plus the KV cache of every sequence in the batch at the mean decode context.
"""
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import SlimError
from .formats.onnx_graph import GRAPH_VERSION, bytes_per_weight

RUNTIMES = ("torch", "onnx")
TORCH_DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class BenchSettings:
    runtimes: list[str]
    prompt_lens: list[int]
    new_tokens: int
    batch: list[int]
    repeats: int = 3
    threads: int | None = None  # None: torch's default intra-op thread count, for both runtimes
    device: str = "auto"  # auto | cpu | cuda
    torch_dtype: str = "float32"  # float32 | float16 | bfloat16: what the torch runtime runs in


def _prompt(batch: int, length: int, vocab: int) -> np.ndarray:
    """Fixed token ids: speed does not depend on the text, and every run sees the same input."""
    return (np.arange(batch * length, dtype=np.int64).reshape(batch, length) * 7 + 3) % vocab


class OrtRunner:
    """A slimconv export in ONNX Runtime, greedy steps with its KV cache."""

    def __init__(self, onnx_dir: Path, threads: int, provider: str, profile_prefix: str | None = None):
        from .runtime import Decoder

        self.decoder = Decoder(onnx_dir, provider, threads, profile_prefix)
        self.provider = self.decoder.provider
        self.vocab = self.decoder.config["vocab_size"]

    def run(self, batch: int, prompt_len: int, new_tokens: int) -> tuple[float, float]:
        """(prefill seconds, decode tokens/s over the batch) for ``new_tokens`` cached greedy steps."""
        ids = _prompt(batch, prompt_len, self.vocab)
        self.decoder.reset(batch)
        start = time.perf_counter()
        logits = self.decoder(ids)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(new_tokens):
            logits = self.decoder(logits[:, -1].argmax(-1)[:, None].astype(np.int64))
        return prefill, batch * new_tokens / (time.perf_counter() - start)


class TorchRunner:
    """A checkpoint loaded with transformers (remote code for slim layouts), greedy steps with its KV cache."""

    def __init__(self, directory: Path, device: str, trust_remote_code: bool = False, dtype: str = "float32"):
        import torch

        from .runtime import load_model

        self.torch = torch
        self.device = device
        self.model = load_model(directory, trust_remote_code).to(device=device, dtype=getattr(torch, dtype))
        self.vocab = self.model.config.vocab_size

    def _sync(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def run(self, batch: int, prompt_len: int, new_tokens: int) -> tuple[float, float]:
        from transformers import DynamicCache

        from .modeling.modeling_slim import CACHE_NAME

        torch = self.torch
        ids = torch.from_numpy(_prompt(batch, prompt_len, self.vocab)).to(self.device)
        with torch.no_grad():
            self._sync()
            start = time.perf_counter()
            cache = {CACHE_NAME: DynamicCache()}  # updated in place by every call
            out = self.model(input_ids=ids, use_cache=True, **cache)
            self._sync()
            prefill = time.perf_counter() - start
            start = time.perf_counter()
            for _ in range(new_tokens):
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                out = self.model(input_ids=nxt, use_cache=True, **cache)
            self._sync()
        return prefill, batch * new_tokens / (time.perf_counter() - start)


def measure(runners: dict, batch: int, prompt_len: int, new_tokens: int, repeats: int, progress=None) -> dict:
    """Median (prefill s, decode tokens/s) per runner. One warm-up run each (allocators, ORT's memory
    planning), then ``repeats`` rounds running every model once per round, so that drift in machine load
    hits all models alike."""
    for r in runners.values():
        r.run(batch, prompt_len, min(new_tokens, 4))
    times = {name: ([], []) for name in runners}
    for _ in range(repeats):
        for name, r in runners.items():
            p, t = r.run(batch, prompt_len, new_tokens)
            times[name][0].append(p)
            times[name][1].append(t)
            if progress:
                progress()
    return {name: (statistics.median(p), statistics.median(t)) for name, (p, t) in times.items()}


def ideal_speedups(plan, config: dict, prompt_len: int, new_tokens: int, batch: int) -> dict:
    """Plan-based ideal: FLOPs at the prompt length (prefill); bytes read per decode step, weights once plus
    the KV cache of ``batch`` sequences at the mean context of the decode phase (decode)."""
    from .plan import costs, source_plan

    ctx = prompt_len + new_tokens / 2
    c = {k: costs(p, config, prompt_len) for k, p in (("source", source_plan(config)), ("slim", plan))}
    read = {k: v["decode_bytes_per_token"] - v["kv_bytes_per_token"] * prompt_len + batch * v["kv_bytes_per_token"] * ctx
            for k, v in c.items()}
    return dict(prefill=c["source"]["prefill_flops_per_token"] / c["slim"]["prefill_flops_per_token"],
                decode=read["source"] / read["slim"])


def memory_mb(plan, config: dict, bytes_per_value: int, tokens: int) -> float:
    """Weights plus the full KV cache of the run, computed from the plan (not measured: with both models
    in one process, RSS growth cannot be attributed to either)."""
    from .plan import costs

    c = costs(plan, config, tokens, bytes_per_value)
    return (c["params"] * bytes_per_value + c["kv_bytes_per_token"] * tokens) / 2**20


def parse_runtimes(text: str | list[str]) -> list[str]:
    names = [x.strip() for x in (text.split(",") if isinstance(text, str) else text) if x.strip()]
    unknown = [n for n in names if n not in RUNTIMES]
    if unknown or not names:
        raise SlimError(f"unknown runtime {', '.join(unknown) or repr(text)}", f"choose from {', '.join(RUNTIMES)}")
    return list(dict.fromkeys(names))


def _weights_key(src_dir: Path) -> str:
    from .source import cache_key

    return cache_key(sorted(src_dir.glob("*.safetensors"))[0])


def source_onnx(src_dir: Path, slim_onnx_config: dict) -> Path:
    """The unslimmed source exported once (unchecked: it is the reference only for speed) into the cache,
    with the slim graph's precision, provider and int4 settings."""
    from .formats.onnx_export import export_onnx
    from .report import console
    from .source import cache_root, cached

    dtype = slim_onnx_config.get("onnx_dtype", "float32")
    provider = slim_onnx_config.get("onnx_provider", "cpu")
    int4 = slim_onnx_config.get("onnx_int4") or {}
    settings = dict(block_size=int4.get("block_size", 32), accuracy_level=int4.get("accuracy_level", 4),
                    symmetric=int4.get("symmetric", False), algorithm=int4.get("algorithm", "rtn"))
    key = "-".join(["onnx", GRAPH_VERSION, dtype, provider, *map(str, settings.values()), _weights_key(src_dir)])
    if not (cache_root() / key / "config.json").is_file():
        console.print(f"exporting the source {src_dir} to ONNX ({dtype}, {provider}) once, into {cache_root() / key}")
    return cached(key, lambda tmp: export_onnx(src_dir, tmp, dtype, provider=provider, **settings))


def slim_onnx(out: Path) -> Path:
    from .formats.onnx_export import run_export
    from .outdir import ONNX_DIR
    from .report import console

    onnx_dir = out / ONNX_DIR
    if not (onnx_dir / "model.onnx").is_file():
        console.print(f"{onnx_dir} is missing: exporting it now (as `slimconv export {out}` would)")
        if not run_export(out, provider="cpu")["passed"]:
            raise SlimError(f"the ONNX export of {out} does not match PyTorch (see {onnx_dir}/slimconv_onnx_report.json)",
                            "fix the export before timing it")
    from .provenance import Export, onnx_record, stale_message
    from .source import weights_sha256

    export = Export(onnx_dir, "onnx", onnx_record(onnx_dir), weights_sha256(out))
    if export.status == "stale":  # timing another model's graph would report its speed as this one's
        raise SlimError(*stale_message(export, out))
    return onnx_dir


def run_bench(source: str, out, settings: BenchSettings, out_json=None, plot=None,
              trust_remote_code: bool = False) -> list[dict]:
    """Measures source and slim, prints the table, writes the rows (OUTPUT/slimconv_bench.json unless
    ``out_json``), refreshes the model card, and returns the rows."""
    import torch
    from tqdm import tqdm

    from .layout import DTYPES
    from .plan import Plan, source_plan
    from .outdir import BENCH_FILE, PLAN_FILE, RECIPE_FILE, read_json, require_output, write_json
    from .report import console, print_bench, write_card
    from .runtime import pick_device
    from .source import read_config, resolve_source, same_source

    out = require_output(out)
    runtimes = parse_runtimes(settings.runtimes)
    if settings.repeats < 1 or settings.new_tokens < 1:
        raise SlimError("--repeats and --new-tokens must be at least 1")
    if settings.torch_dtype not in TORCH_DTYPES:
        raise SlimError(f"--torch-dtype {settings.torch_dtype}: unknown", f"use one of {', '.join(TORCH_DTYPES)}")
    meta = read_json(out / PLAN_FILE)
    plan = Plan(**meta["plan"])
    src_dir = resolve_source(source)
    config = read_config(src_dir)
    fix = f"give the model the recipe names: {meta['model']}"
    if config.get("num_hidden_layers") != plan.num_source_layers or config.get("model_type") != plan.model_type:
        raise SlimError(f"{source} ({config.get('model_type')}, {config.get('num_hidden_layers')} layers) is not the "
                        f"source of {out} ({plan.model_type}, {plan.num_source_layers} layers)", fix)
    # Same type and layer count is not the same model: a speedup over another model's weights means nothing.
    if not same_source(meta.get("source_sha256"), src_dir, source, out,
                       fix + "; if its weights changed since, re-run `slimconv convert --force` on its recipe"):
        console.print(f"[yellow]warning:[/] {out / PLAN_FILE} records no source weight hash (an older slimconv): "
                      f"cannot check that {source} is the model it was converted from")
    threads = settings.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    device = pick_device(settings.device).type
    # auto lets ONNX Runtime fall back to the CPU where torch has CUDA but onnxruntime-gpu is missing.
    ort_provider = "auto" if settings.device == "auto" else device

    cases = [(b, p) for b in settings.batch for p in settings.prompt_lens]
    console.print(f"bench {src_dir} (source) vs {out} (slim): runtimes {', '.join(runtimes)} on {device}, "
                  f"{threads} threads; batch {settings.batch} x prompt {settings.prompt_lens} tokens, "
                  f"{settings.new_tokens} new tokens; {settings.repeats} interleaved repeats after 1 warm-up")
    if "onnx" in runtimes:  # exports first, so that their messages do not cut through the progress bar
        slim_dir = slim_onnx(out)
        onnx_config = json.loads((slim_dir / "config.json").read_text())
        src_onnx = source_onnx(src_dir, onnx_config)
    rows = []
    bar = tqdm(total=len(runtimes) * len(cases) * settings.repeats * 2, desc="bench", unit="run")
    for runtime in runtimes:
        if runtime == "onnx":
            runners = {"source": OrtRunner(src_onnx, threads, ort_provider),
                       "slim": OrtRunner(slim_dir, threads, ort_provider)}
            label = f"onnxruntime {runners['slim'].provider.removesuffix('ExecutionProvider').lower()}"
            width = bytes_per_weight(onnx_config["onnx_dtype"], (onnx_config.get("onnx_int4") or {}).get("block_size", 32))
        else:
            dtype = settings.torch_dtype
            runners = {"source": TorchRunner(src_dir, device, trust_remote_code, dtype),
                       "slim": TorchRunner(out, device, dtype=dtype)}
            label = f"torch {device}" + ("" if dtype == "float32" else f" {dtype}")
            width = DTYPES[dtype].itemsize
        for batch, prompt_len in cases:
            med = measure(runners, batch, prompt_len, settings.new_tokens, settings.repeats, bar.update)
            ideal = ideal_speedups(plan, config, prompt_len, settings.new_tokens, batch)
            (sp, st), (lp, lt) = med["source"], med["slim"]
            tokens = batch * (prompt_len + settings.new_tokens)
            rows.append({
                "runtime": label, "threads": threads, "batch": batch, "prompt": prompt_len,
                "new tokens": settings.new_tokens,
                "prefill ms source": sp * 1000, "prefill ms slim": lp * 1000,
                "prefill speedup": sp / lp, "prefill ideal": ideal["prefill"],
                "prefill measured/ideal": sp / lp / ideal["prefill"],
                "decode tok/s source": st, "decode tok/s slim": lt,
                "decode speedup": lt / st, "decode ideal": ideal["decode"],
                "decode measured/ideal": lt / st / ideal["decode"],
                "weights+KV MB source": memory_mb(source_plan(config), config, width, tokens),
                "weights+KV MB slim": memory_mb(plan, config, width, tokens),
            })
        del runners
    bar.close()
    print_bench(rows, settings.repeats)
    target = Path(out_json) if out_json else out / BENCH_FILE
    write_json(target, rows)
    console.print(f"wrote {target}")
    if target == out / BENCH_FILE and (out / RECIPE_FILE).is_file():
        write_card(out)
        console.print(f"model card {out / 'README.md'} now shows the speed table")
    if plot:
        plot_rows(rows, Path(plot))
        console.print(f"wrote {plot}")
    return rows


def plot_rows(rows: list[dict], path: Path):
    """Measured against ideal speedup, prefill and decode, one group of bars per row."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    labels = [f"{r['runtime']}\nb{r['batch']} p{r['prompt']}" for r in rows]
    x = np.arange(len(rows))
    fig, axes = plt.subplots(1, 2, figsize=(max(6, 1.6 * len(rows)) * 2, 4), sharey=True)
    for ax, phase in zip(axes, ("prefill", "decode")):
        ax.bar(x - 0.2, [r[f"{phase} speedup"] for r in rows], 0.4, label="measured")
        ax.bar(x + 0.2, [r[f"{phase} ideal"] for r in rows], 0.4, label="ideal (plan)")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_title(f"{phase} speedup, slim vs source")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
