"""SLEB with and without the prefix cache, on the same calibration data, interleaved (A B B A ...).

    python benchmarks/bench_sleb.py [--model default] [--samples 4 --seq-len 128 --steps 1 --rounds 3]

Prints the median seconds per SLEB run for both, the measured speedup, the speedup expected from the
FLOPs each does (layer applications and LM-head evaluations), and whether both made the same choices.
"""
import argparse
import statistics
import time

import torch

from slimconv.analyse import sleb
from slimconv.arch import head_dim, kv_heads
from slimconv.data import calibration_ids
from slimconv.layerwise import LayerBank, Runner
from slimconv.source import Checkpoint, resolve_source


def expected_speedup(config: dict, steps: int) -> float:
    """FLOP ratio naive/cached over ``steps`` SLEB steps (matmuls of layers and of the LM head)."""
    h, inter, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    heads, kv, hd = config["num_attention_heads"], kv_heads(config), head_dim(config)
    layer = 2 * h * heads * hd + 2 * h * kv * hd + 3 * h * inter
    head = h * v
    naive = cached = 0
    for k in range(steps):
        n = config["num_hidden_layers"] - k
        naive += n * (n - 1) * layer + n * head          # every candidate runs all other layers
        cached += (n * (n - 1) // 2 + n - 1) * layer + n * head  # suffixes only, plus the advancing prefix
    return naive / cached


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    src = resolve_source(args.model)
    ckpt = Checkpoint(src)
    runner = Runner(LayerBank(ckpt), calibration_ids(src, "wikitext2", args.samples, args.seq_len, 0))
    times, choices = {True: [], False: []}, {}
    for r in range(args.rounds):
        for cached in ((True, False) if r % 2 == 0 else (False, True)):
            start = time.perf_counter()
            steps = sleb(runner, ckpt.config, args.steps, prefix_cache=cached)
            times[cached].append(time.perf_counter() - start)
            choices[cached] = [s["removed"] for s in steps]
    naive, cached = statistics.median(times[False]), statistics.median(times[True])
    print(f"SLEB, {args.steps} step(s), {args.samples} x {args.seq_len} calibration tokens of WikiText-2 valid, "
          f"{args.rounds} interleaved rounds, torch {torch.__version__} CPU, {torch.get_num_threads()} threads\n")
    print("| | naive loop | prefix cache |\n|---|---|---|")
    print(f"| seconds (median) | {naive:.1f} | {cached:.1f} |")
    print(f"| all runs (s) | {', '.join(f'{t:.1f}' for t in times[False])} | {', '.join(f'{t:.1f}' for t in times[True])} |")
    print(f"| removed blocks | {choices[False]} | {choices[True]} |")
    print(f"\nmeasured speedup {naive / cached:.2f}x; expected from FLOPs {expected_speedup(ckpt.config, args.steps):.2f}x; "
          f"same choices: {choices[False] == choices[True]}")


if __name__ == "__main__":
    main()
