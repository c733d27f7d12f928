"""SLEB as the naive loop and as slimconv runs it, on the same calibration data, interleaved (A B B A ...).

    python benchmarks/bench_sleb.py [--model default] [--samples 4 --seq-len 128 --steps 9 --rounds 1]
        [--modes naive,cache,halving]

Modes: naive (every candidate runs the whole model on every window), cache (prefix cache, every candidate
on every window: `analyze`'s default), halving (prefix cache + successive halving over the windows:
`analyze --sleb-halving`). Prints the median seconds per SLEB run of each, the
speedups over the naive loop, the prefix cache's speedup expected from FLOPs, and whether the removed
blocks agree after every step (SLEB is greedy, so a 9-step run holds the 3- and 6-step choices).
"""
import argparse
import statistics
import time

import torch

from slimconv.selection.analyse import sleb
from slimconv.arch import head_dim, kv_heads
from slimconv.data import calibration_ids
from slimconv.selection.layerwise import LayerBank, Runner
from slimconv.source import Checkpoint, resolve_source


def matmul_weights(config: dict) -> tuple[int, int]:
    """(one layer's, the LM head's) matmul weights: what a token's pass through each costs, up to a factor."""
    h, inter, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    heads, kv, hd = config["num_attention_heads"], kv_heads(config), head_dim(config)
    return 2 * h * heads * hd + 2 * h * kv * hd + 3 * h * inter, h * v


def expected_speedup(config: dict, steps: int) -> float:
    """FLOP ratio naive/cached over ``steps`` SLEB steps (matmuls of layers and of the LM head)."""
    layer, head = matmul_weights(config)
    naive = cached = 0
    for k in range(steps):
        n = config["num_hidden_layers"] - k
        naive += n * (n - 1) * layer + n * head          # every candidate runs all other layers
        cached += (n * (n - 1) // 2 + n - 1) * layer + n * head  # suffixes only, plus the advancing prefix
    return naive / cached


MODES = {"naive": dict(prefix_cache=False), "cache": dict(), "halving": dict(halving=True)}


class Work:
    """Counts what a SLEB run computes, in window-passes: layer applications and LM-head evaluations, each
    times the windows it ran on, weighted by their matmul FLOPs (load-independent, unlike seconds)."""

    def __init__(self, runner: Runner, config: dict):
        self.layer, self.head = matmul_weights(config)
        self.flops = 0
        apply, nll = Runner.apply, Runner.nll

        def counted_apply(r, spec, x):
            self.flops += self.layer * len(x)
            return apply(r, spec, x)

        def counted_nll(r, x, *a, **k):
            self.flops += self.head * len(x)
            return nll(r, x, *a, **k)

        Runner.apply, Runner.nll = counted_apply, counted_nll

    def naive(self, config: dict, steps: int, windows: int) -> int:
        n0 = config["num_hidden_layers"]
        return sum(n * ((n - 1) * self.layer + self.head) * windows for n in range(n0, n0 - steps, -1))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--modes", default="naive,cache", help="comma-separated: naive, cache, halving")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    args = p.parse_args()
    modes = args.modes.split(",")
    src = resolve_source(args.model)
    ckpt = Checkpoint(src)
    runner = Runner(LayerBank(ckpt, device=args.device), calibration_ids(src, "wikitext2", args.samples, args.seq_len, 0))
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    times, choices, ppls, work = {m: [] for m in modes}, {}, {}, {}
    counter = Work(runner, ckpt.config)
    for r in range(args.rounds):
        for mode in (modes if r % 2 == 0 else modes[::-1]):
            start, counter.flops = time.perf_counter(), 0
            steps = sleb(runner, ckpt.config, args.steps, **MODES[mode])
            times[mode].append(time.perf_counter() - start)
            work[mode] = counter.flops
            choices[mode] = [s["removed"] for s in steps]
            ppls[mode] = [s["ppl"] for s in steps]
    med = {m: statistics.median(times[m]) for m in modes}
    print(f"SLEB, {args.steps} step(s), {args.samples} x {args.seq_len} calibration tokens of WikiText-2 valid, "
          f"{args.rounds} interleaved round(s), torch {torch.__version__} on {where}\n")
    print("| | " + " | ".join(modes) + " |\n" + "|---" * (len(modes) + 1) + "|")
    print("| seconds (median) | " + " | ".join(f"{med[m]:.1f}" for m in modes) + " |")
    print("| all runs (s) | " + " | ".join(", ".join(f"{t:.1f}" for t in times[m]) for m in modes) + " |")
    print("| removed blocks, in order | " + " | ".join(str(choices[m]) for m in modes) + " |")
    print("| work (matmul weights x windows they ran on, 1e9) | "
          + " | ".join(f"{work[m] / 1e9:.0f}" for m in modes) + " |")
    print("| calibration ppl after the last step | " + " | ".join(f"{ppls[m][-1]:.3f}" for m in modes) + " |")
    base = modes[0]
    for m in modes[1:]:
        same = [k for k in range(1, args.steps + 1) if sorted(choices[m][:k]) == sorted(choices[base][:k])]
        print(f"\n{m}: {med[base] / med[m]:.2f}x faster than {base}; same blocks as {base} after "
              f"{len(same)}/{args.steps} steps (all steps: {len(same) == args.steps})")
    print(f"prefix cache alone, expected from FLOPs: {expected_speedup(ckpt.config, args.steps):.2f}x")
    naive = counter.naive(ckpt.config, args.steps, args.samples)
    print("work of the naive loop (counted, not run: every candidate all other layers + head on every window): "
          f"{naive / 1e9:.0f}; " + ", ".join(f"{m} {naive / work[m]:.2f}x less" for m in modes))


if __name__ == "__main__":
    main()
