"""Benchmark: slimconv's converter against a plain file copy, on a multi-GB synthetic Llama checkpoint.

This is a benchmark, not a test: run it by hand, e.g.

    python benchmarks/bench_convert.py                 # 2.2 GB bfloat16 source, temp dir under /tmp
    python benchmarks/bench_convert.py --size-gb 4 --keep --workdir /tmp/slimbench

It builds a random-weight Llama-shaped safetensors checkpoint (Hugging Face layout, ~1 GB shards with
model.safetensors.index.json), then alternately times, in child processes,

* copy:    shutil.copyfile of every source file into a fresh directory, and
* convert: slimconv's write_checkpoint with a recipe that removes blocks and attention sublayers and
           merges runs of layers into parallel groups (so some output tensors are 2-3x wider),

and prints a markdown table with sizes, median times and the peak resident memory of each child.
The targets are: convert time <= 1.5x copy time, and convert peak RSS <= largest output tensor + 1 GiB.
"""
import argparse
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

MiB = 2**20
GB = 10**9

# Llama-shaped dimensions (a ~1B-class model with GQA).
HIDDEN = 2048
INTER = 8192
HEADS = 16
KV_HEADS = 4
HEAD_DIM = HIDDEN // HEADS
VOCAB = 32000
SHARD_BYTES = 1 * GB
RATIO_TARGET = 1.5
RSS_SLACK_MB = 1024


# ----------------------------------------------------------------------------------------------------
# Synthetic source checkpoint
# ----------------------------------------------------------------------------------------------------

def layer_shapes(i: int) -> list[tuple[str, tuple]]:
    p = f"model.layers.{i}."
    return [
        (p + "input_layernorm.weight", (HIDDEN,)),
        (p + "self_attn.q_proj.weight", (HEADS * HEAD_DIM, HIDDEN)),
        (p + "self_attn.k_proj.weight", (KV_HEADS * HEAD_DIM, HIDDEN)),
        (p + "self_attn.v_proj.weight", (KV_HEADS * HEAD_DIM, HIDDEN)),
        (p + "self_attn.o_proj.weight", (HIDDEN, HEADS * HEAD_DIM)),
        (p + "post_attention_layernorm.weight", (HIDDEN,)),
        (p + "mlp.gate_proj.weight", (INTER, HIDDEN)),
        (p + "mlp.up_proj.weight", (INTER, HIDDEN)),
        (p + "mlp.down_proj.weight", (HIDDEN, INTER)),
    ]


def numel(shape) -> int:
    return math.prod(shape)


def layers_for(size_gb: float, itemsize: int) -> int:
    fixed = (2 * VOCAB * HIDDEN + HIDDEN) * itemsize
    per_layer = sum(numel(s) for _, s in layer_shapes(0)) * itemsize
    # At least 7 layers so the recipe below (groups [1,2] and [3,4,5] at minimum) fits.
    return max(7, math.ceil((size_gb * GB - fixed) / per_layer))


def all_shapes(n_layers: int) -> list[tuple[str, tuple]]:
    shapes = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(n_layers):
        shapes += layer_shapes(i)
    shapes += [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]
    return shapes


def source_config(n_layers: int, dtype: str) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": n_layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "vocab_size": VOCAB,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "dtype": dtype,
    }


def build_source(src: Path, n_layers: int, dtype_name: str, seed: int = 0) -> None:
    """Writes the checkpoint shard by shard: at most one ~1 GB shard of tensors is in memory."""
    import torch
    from safetensors.torch import save_file

    dtype = getattr(torch, dtype_name)
    src.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    shapes = all_shapes(n_layers)
    # Group tensors into shards of at most SHARD_BYTES (by planned size; names are known up front).
    shards, cur, size = [], [], 0
    for name, shape in shapes:
        nbytes = numel(shape) * dtype.itemsize
        if cur and size + nbytes > SHARD_BYTES:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += nbytes
    shards.append(cur)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape in shard:
            if name.endswith("norm.weight"):
                t = (1.0 + 0.1 * torch.randn(shape, generator=gen)).to(dtype)
            else:
                t = torch.empty(shape, dtype=dtype).normal_(0.0, 0.02, generator=gen)
            tensors[name] = t
            weight_map[name] = fname
            total += t.numel() * t.element_size()
        save_file(tensors, str(src / fname), metadata={"format": "pt"})
        del tensors
        print(f"  wrote {fname}", file=sys.stderr, flush=True)
    (src / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (src / "config.json").write_text(json.dumps(source_config(n_layers, dtype_name), indent=2))
    (src / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))


def source_matches(src: Path, n_layers: int, dtype: str) -> bool:
    try:
        cfg = json.loads((src / "config.json").read_text())
        idx = json.loads((src / "model.safetensors.index.json").read_text())
    except (OSError, ValueError):
        return False
    files = set(idx["weight_map"].values())
    return (cfg.get("num_hidden_layers") == n_layers and cfg.get("dtype") == dtype
            and all((src / f).is_file() for f in files))


def recipe_for(src: Path, n_layers: int) -> dict:
    """Removals plus two parallel groups (a pair and a triple); needs n_layers >= 7."""
    a, b = n_layers // 4, n_layers // 2
    g1, g2 = [a, a + 1], [b, b + 1, b + 2]
    used = set(g1) | set(g2)
    blocks = [n_layers - 1]
    attention = [i for i in (0, n_layers - 3) if i not in used and i not in blocks]
    return {
        "model": str(src),
        "remove": {"blocks": blocks, "attention": attention},
        "parallel": {"groups": [g1, g2]},
        "output": {"dir": "unused"},
    }


# ----------------------------------------------------------------------------------------------------
# Child processes (run as `bench_convert.py _child {copy,convert} ...`); each prints one JSON line.
# ----------------------------------------------------------------------------------------------------

def _status_kb(pid="self") -> dict:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, val = line.partition(":")
                if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(val.split()[0])
    except OSError:
        pass
    return out


def _fsync_dir(out: Path) -> None:
    for p in out.iterdir():
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def child_copy(src: Path, out: Path, fsync: bool) -> dict:
    base = _status_kb()
    out.mkdir()
    t0 = time.perf_counter()
    for p in sorted(src.iterdir()):
        if p.is_file():
            shutil.copyfile(p, out / p.name)
    if fsync:
        _fsync_dir(out)
    dt = time.perf_counter() - t0
    return {"seconds": dt, "baseline_kb": base.get("VmRSS", 0)}


def child_convert(src: Path, out: Path, recipe: dict, fsync: bool) -> dict:
    from slimconv.convert import write_checkpoint
    from slimconv.layout import tensor_jobs
    from slimconv.plan import build_plan
    from slimconv.recipe import parse_recipe
    from slimconv.source import Checkpoint

    base = _status_kb()  # after imports (torch etc.), before any work
    t0 = time.perf_counter()
    ck = Checkpoint(src)
    plan = build_plan(parse_recipe(recipe), ck.config)
    out.mkdir()
    info = write_checkpoint(plan, ck, out, "source", "1GB")
    if fsync:
        _fsync_dir(out)
    dt = time.perf_counter() - t0
    jobs = tensor_jobs(plan, ck, "source")
    largest = max(jobs, key=lambda j: j.nbytes)
    return {"seconds": dt, "baseline_kb": base.get("VmRSS", 0), "largest_bytes": largest.nbytes,
            "largest_name": largest.name, "out_bytes": info["total_bytes"], "files": len(info["files"]),
            "out_layers": len(plan.layers)}


def child_main(argv: list[str]) -> None:
    kind, src, out, fsync = argv[0], Path(argv[1]), Path(argv[2]), argv[3] == "1"
    if kind == "copy":
        res = child_copy(src, out, fsync)
    else:
        res = child_convert(src, out, json.loads(argv[4]), fsync)
    st = _status_kb()
    res["vmhwm_kb"] = st.get("VmHWM", 0)
    res["ru_maxrss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps(res), flush=True)


# ----------------------------------------------------------------------------------------------------
# Parent: run children, poll their memory, summarise
# ----------------------------------------------------------------------------------------------------

def run_child(args: list[str], poll_s: float = 0.02) -> dict:
    """Runs one child, polling /proc/<pid>/status to split its peak RSS into anonymous and file pages."""
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "_child", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peaks = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            st = _status_kb(proc.pid)
            for k in peaks:
                peaks[k] = max(peaks[k], st.get(k, 0))
            time.sleep(poll_s)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    t0 = time.perf_counter()
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    stop.set()
    th.join()
    if proc.returncode != 0:
        raise RuntimeError(f"child {args[0]} failed (rc {proc.returncode}):\n{stderr[-4000:]}")
    res = json.loads(stdout.strip().splitlines()[-1])
    res["wall_seconds"] = wall
    res["polled_peak_kb"] = peaks
    return res


def fmt_runs(runs: list[dict]) -> str:
    return ", ".join(f"{r['seconds']:.2f}" for r in runs)


def dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.iterdir() if p.is_file() and p.suffix == ".safetensors")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n", 1)[0],
        epilog=(
            "What it measures: a random-weight Llama-shaped checkpoint of about --size-gb GB (hidden 2048, "
            "intermediate 8192, 16 heads / 4 KV heads, vocab 32000, as many layers as needed) is written in "
            "~1 GB safetensors shards. Then a plain copy of its files (shutil.copyfile) and slimconv's "
            "conversion (Checkpoint + build_plan + write_checkpoint, dtype 'source', 1GB shards) run "
            "alternately (copy, convert, copy, convert, ...) each in its own child process. Times are "
            "medians of the in-child work time (interpreter start-up and imports excluded); peak RSS is the "
            "child's VmHWM (max over repeats), and a parent thread polls /proc/<pid>/status to split it into "
            "anonymous and file-backed (mmap) pages. The page cache cannot be dropped without root, so the "
            "source is warm in cache for every run (it was just written or read); os.sync() runs before "
            "each run (untimed) so no run pays for an earlier run's writeback; outputs are deleted between runs and, unless --fsync, not flushed to disk. Targets: convert/copy time <= 1.5 and "
            "convert peak RSS <= largest output tensor + 1024 MB."),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=2.2, help="approximate source checkpoint size in GB (1e9 bytes; default 2.2)")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="source weight dtype (default bfloat16)")
    ap.add_argument("--repeats", type=int, default=2, help="runs of copy and of convert, alternated (default 2)")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where the source and outputs go (default: a new temp dir under /tmp); an existing "
                         "matching source there is reused")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (source checkpoint and last output) at the end")
    ap.add_argument("--fsync", action="store_true", help="fsync the written files inside the timed region of both copy and convert")
    args = ap.parse_args(argv)

    from slimconv.plan import build_plan  # noqa: F401  (fail early if slimconv is not importable)

    itemsize = 2 if args.dtype == "bfloat16" else 4
    n_layers = layers_for(args.size_gb, itemsize)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="slimconv-bench-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    src, out_copy, out_conv = work / "source", work / "copy", work / "converted"
    try:
        if source_matches(src, n_layers, args.dtype):
            print(f"reusing source checkpoint in {src}", file=sys.stderr)
        else:
            shutil.rmtree(src, ignore_errors=True)
            print(f"building {n_layers}-layer {args.dtype} source checkpoint in {src} ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            build_source(src, n_layers, args.dtype)
            print(f"  built in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        src_bytes = dir_bytes(src)
        recipe = recipe_for(src, n_layers)
        fs = "1" if args.fsync else "0"

        copies, converts = [], []
        out_bytes = 0
        for r in range(args.repeats):
            for kind, dest, results in (("copy", out_copy, copies), ("convert", out_conv, converts)):
                shutil.rmtree(dest, ignore_errors=True)
                os.sync()  # flush earlier runs' dirty pages so no run pays for another's writeback
                extra = [json.dumps(recipe)] if kind == "convert" else []
                res = run_child([kind, str(src), str(dest), fs, *extra])
                results.append(res)
                if kind == "convert":
                    out_bytes = dir_bytes(dest)
                print(f"  run {r + 1} {kind:7s}: {res['seconds']:.2f} s, peak RSS {res['vmhwm_kb'] / 1024:.0f} MB "
                      f"(polled anon {res['polled_peak_kb']['RssAnon'] / 1024:.0f} MB, "
                      f"file {res['polled_peak_kb']['RssFile'] / 1024:.0f} MB)", file=sys.stderr, flush=True)
                if not (args.keep and r == args.repeats - 1):
                    shutil.rmtree(dest, ignore_errors=True)

        t_copy = statistics.median(c["seconds"] for c in copies)
        t_conv = statistics.median(c["seconds"] for c in converts)
        rss_copy = max(c["vmhwm_kb"] for c in copies) / 1024
        rss_conv = max(c["vmhwm_kb"] for c in converts) / 1024
        largest_mb = converts[0]["largest_bytes"] / MiB
        budget = largest_mb + RSS_SLACK_MB
        ratio = t_conv / t_copy
        anon = max(c["polled_peak_kb"]["RssAnon"] for c in converts) / 1024
        filep = max(c["polled_peak_kb"]["RssFile"] for c in converts) / 1024
        base = max(c["baseline_kb"] for c in converts) / 1024

        print()
        print(f"Synthetic Llama checkpoint: {n_layers} layers, {args.dtype}, hidden {HIDDEN}, intermediate {INTER}, "
              f"heads {HEADS}/{KV_HEADS} KV, vocab {VOCAB}; recipe remove {recipe['remove']}, "
              f"parallel groups {recipe['parallel']['groups']} -> {converts[0]['out_layers']} output layers.")
        print(f"Copy and convert alternated {args.repeats}x each in child processes; times are medians of the "
              f"in-child work time. Page cache NOT dropped (no root): the source is warm in cache for every run; "
              f"os.sync() before each run (untimed); outputs {'fsynced' if args.fsync else 'not fsynced'}.")
        print()
        print("| metric | value | target | met |")
        print("|---|---|---|---|")
        print(f"| source size (GB) | {src_bytes / GB:.2f} | | |")
        print(f"| output size (GB) | {out_bytes / GB:.2f} | | |")
        print(f"| largest output tensor (MB) | {largest_mb:.1f} (`{converts[0]['largest_name']}`) | | |")
        print(f"| copy time (s, median) | {t_copy:.2f} ({fmt_runs(copies)}) | | |")
        print(f"| convert time (s, median) | {t_conv:.2f} ({fmt_runs(converts)}) | | |")
        print(f"| time ratio convert/copy | {ratio:.2f} | <= {RATIO_TARGET} | {'yes' if ratio <= RATIO_TARGET else 'NO'} |")
        print(f"| copy peak RSS (MB) | {rss_copy:.0f} | | |")
        print(f"| convert peak RSS (MB) | {rss_conv:.0f} (after-import baseline {base:.0f}; polled peak anon {anon:.0f} + file {filep:.0f}) | | |")
        print(f"| RSS budget: largest tensor + {RSS_SLACK_MB} MB | {budget:.0f} | convert peak <= budget | {'yes' if rss_conv <= budget else 'NO'} |")
    finally:
        if args.keep:
            print(f"\nkept {work}", file=sys.stderr)
        elif args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
        else:
            for d in (src, out_copy, out_conv):
                shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        child_main(sys.argv[2:])
    else:
        main()
