"""Benchmark: `slimconv heal` as one process and under torchrun with N CPU ranks (FSDP2, gloo), at the same global
batch: steps per second, peak RSS per rank, and what one gloo all-reduce of the trained parameters costs
(docs/results/healing.md, "Distributed").

Not a test: run it by hand on a validated output (needs nothing beyond the .venv):

    python benchmarks/bench_distributed.py OUT                  # --train all, 1 vs 2 ranks
    python benchmarks/bench_distributed.py OUT --ranks 1,2,3 --steps 12 --batch 6
    python benchmarks/bench_distributed.py OUT --ranks 1:1,2:1:full,2:1:grad-op   # both sharding modes

Every run trains the same steps on the same windows. By default N ranks split the cores (OMP_NUM_THREADS), so the
single process gets all of them; `--ranks 1,1:1,2` adds one process on one core, the base that N ranks on N
cores (or N GPUs) scale from. Steps per second leave out the first step
(allocation, the first all-gather). The peak RSS is each process's high-water mark up to the end of training
(the evaluation after it is left out).

Under torchrun on the CPU heal fixes glibc's mmap threshold at 1 MB (slimconv/allocator.py,
``return_freed_memory``); ``--default-malloc`` runs the ranks with glibc's defaults instead (it sets
MALLOC_ARENA_MAX to glibc's own default, 8 per core, and heal leaves a malloc that the environment configures
alone), to measure what that setting saves and costs.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def heal(out: Path, target: Path, ranks: int, threads: int, shard: str, a) -> dict:
    flags = ["heal", str(out), "-o", str(target), "--train", a.train, "--steps", str(a.steps), "--batch",
             str(a.batch), "--seq-len", str(a.seq_len), "--checkpoint-every", str(a.steps + 1), "--force",
             "--shard", shard]
    env = dict(os.environ)
    if a.default_malloc:
        env["MALLOC_ARENA_MAX"] = str(8 * (os.cpu_count() or 1))
    env["OMP_NUM_THREADS"] = str(threads)
    if ranks == 1:
        cmd = [sys.executable, "-m", "slimconv", *flags]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
               "-m", "slimconv", *flags]
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    report = json.loads((target / "slimconv_heal.json").read_text())
    curve = report["curve"]
    rate = (len(curve) - 1) / (curve[-1]["seconds"] - curve[0]["seconds"])
    rss = report.get("peak_rss_mb_per_rank") or [report["peak_rss_mb_training"]]
    return dict(ranks=ranks, threads=threads, shard=shard if ranks > 1 else "-", steps_per_s=rate,
                kl_last=curve[-1]["kl"], peak_rss_mb=max(rss), wall_s=wall, params=report["trainable_parameters"])


def probe(numel: int) -> None:
    """Under torchrun: the time of one all-reduce of ``numel`` float32 values (median of 5)."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    t = torch.ones(numel)
    times = []
    for _ in range(6):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(t)
        times.append(time.perf_counter() - start)
    if dist.get_rank() == 0:
        print(json.dumps(dict(all_reduce_s=sorted(times[1:])[2])))
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("output", nargs="?", help="a validated slimconv output")
    p.add_argument("--ranks", default="1,2",
                   help="runs, each N (processes, the cores split among them), N:T (T threads each) or N:T:SHARD "
                        "(heal --shard, default full); the first is the base of the ratios")
    p.add_argument("--train", default="all")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--default-malloc", action="store_true", help="glibc's malloc defaults (see above)")
    p.add_argument("--probe", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.probe:
        return probe(a.probe)
    out = Path(a.output)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-dist-") as tmp:
        for i, spec in enumerate(a.ranks.split(",")):
            n, t, shard = (spec.split(":") + ["", ""])[:3]
            threads = int(t) if t else max(1, (os.cpu_count() or 1) // int(n))
            rows.append(heal(out, Path(tmp) / f"healed-{i}", int(n), threads, shard or "full", a))
            print(rows[-1], flush=True)
    base = rows[0]
    cost = {}
    for r in rows:
        if r["ranks"] == 1 or r["ranks"] in cost:
            continue
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                              str(r["ranks"]), __file__, "--probe", str(base["params"])], capture_output=True,
                             text=True, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        cost[r["ranks"]] = json.loads(run.stdout.strip().splitlines()[-1])["all_reduce_s"]
    print(f"\n`--train {a.train}`, {a.steps} steps x {a.batch} x {a.seq_len} tokens, {os.cpu_count()} cores; "
          f"{base['params'] / 1e6:.1f}M trained parameters"
          f"{', glibc malloc defaults' if a.default_malloc else ''}\n")
    print("| ranks | threads each | sharding | steps/s | vs the first row | peak RSS per rank (MB) | "
          "vs the first row | last KL | gloo all-reduce of the trained parameters (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        reduce = f"{cost[r['ranks']]:.3f}" if r["ranks"] in cost else "-"
        print(f"| {r['ranks']} | {r['threads']} | {r['shard']} | {r['steps_per_s']:.3f} | "
              f"{r['steps_per_s'] / base['steps_per_s']:.2f}x | {r['peak_rss_mb']:.0f} | "
              f"{r['peak_rss_mb'] / base['peak_rss_mb']:.2f}x | {r['kl_last']:.4f} | {reduce} |")


if __name__ == "__main__":
    main()
