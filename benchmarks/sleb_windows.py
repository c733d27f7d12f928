"""How few calibration windows can rank SLEB's candidates: the exact SLEB path with every candidate's loss on
every window, then successive-halving settings replayed on it.

    python benchmarks/sleb_windows.py [--model default] [--samples 8 --seq-len 256 --steps 9]
        [--trace outputs/sleb_windows/trace.json] [--device cpu|cuda]

Runs SLEB exactly (prefix cache, every candidate on every window) and records each candidate's mean NLL per
window, or reads a trace written before. Prints, for every step: the block removed, the gap to the runner-up,
and the rank the removed block would have on the first 1, 2, 4, ... windows alone. Then replays
`layerwise.Halving` settings (first round, keep fraction, at least k, with or without the previous step's
ranking cutting the first round) on the trace: the replay follows ``ranked_nlls``, counts each setting's
matmul work in layer-equivalents (suffix layers + LM head + the shared prefix, per window) and says how many
steps it makes the exact choice in. A setting that matches every step on the exact path makes the same
choices as the exact run end to end (each step starts where the exact run's did).
"""
import argparse
import itertools
import json
import math
from pathlib import Path

from bench_sleb import matmul_weights
from slimconv.selection.analyse import sleb_halving
from slimconv.data import calibration_ids
from slimconv.selection.layerwise import Halving, LayerBank, Runner, candidate_nlls
from slimconv.plan import source_plan
from slimconv.source import Checkpoint, resolve_source


def trace(model: str, samples: int, seq_len: int, steps: int, device: str = "cpu") -> dict:
    src = resolve_source(model)
    ckpt = Checkpoint(src)
    runner = Runner(LayerBank(ckpt, device=device), calibration_ids(src, "wikitext2", samples, seq_len, 0))
    stack = list(source_plan(ckpt.config).layers)
    layer, head = matmul_weights(ckpt.config)
    out = dict(samples=samples, seq_len=seq_len, head_in_layers=head / layer, steps=[])
    for step in range(steps):
        layers = [spec.source_layers[0] for spec in stack]
        cands = [(pos, 1, []) for pos in range(len(stack))]
        # One window at a time: the prefix cache's loss of every candidate on that window alone.
        by_window = [candidate_nlls(runner.subset(slice(w, w + 1)), stack, cands) for w in range(samples)]
        per = {l: [nlls[i] for nlls in by_window] for i, l in enumerate(layers)}
        best = min(per, key=lambda l: sum(per[l]))
        out["steps"].append(dict(layers=layers, per=per, removed=best))
        print(f"step {step + 1}: removed {best}", flush=True)
        del stack[layers.index(best)]
    return out


def replay(t: dict, halving: Halving, use_prior: bool) -> tuple[float, int]:
    """(work in layer-equivalents x windows / windows, steps matching the exact choice) of one setting, as
    ``layerwise.ranked_nlls`` would spend it (``use_prior``: the previous step's ranking cuts the first round)."""
    w_all, head = t["samples"], t["head_in_layers"]
    work, prior, matched = 0.0, None, 0
    for st in t["steps"]:
        layers, per, n = st["layers"], st["per"], len(st["layers"])
        alive = list(range(n))
        if prior is not None and use_prior:
            known = sorted((i for i in alive if layers[i] in prior), key=lambda i: prior[layers[i]])
            alive = sorted(set(alive) - set(known[max(halving.min_keep, math.ceil(len(known) * halving.prior_keep)):]))
        counts = halving.rounds(w_all)
        sums, seen, done = [0.0] * n, [0] * n, 0
        for r, upto in enumerate(counts):
            work += (upto - done) * (sum(n - p - 1 + head for p in alive) + max(alive)) / w_all
            for i in alive:
                sums[i] += sum(per[layers[i]][done:upto])
                seen[i] = upto
            done = upto
            if r + 1 < len(counts):
                ranked = sorted(alive, key=lambda i: sums[i] / seen[i])
                alive = sorted(ranked[:max(halving.min_keep, math.ceil(len(alive) * halving.keep))])
        best = min((i for i in range(n) if seen[i] == w_all), key=sums.__getitem__)
        prior = {layers[i]: sums[i] / seen[i] for i in range(n) if seen[i]}
        if layers[best] != st["removed"]:
            break
        matched += 1
    return work, matched


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=9)
    p.add_argument("--trace", default="outputs/sleb_windows/trace.json", help="read it if it exists, else write it")
    p.add_argument("--device", default="cpu", help="cpu or cuda (where the trace is computed)")
    args = p.parse_args()
    path = Path(args.trace)
    if path.is_file():
        t = json.loads(path.read_text())
    else:
        t = trace(args.model, args.samples, args.seq_len, args.steps, args.device)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(t))
    for st in t["steps"]:
        st["per"] = {int(k): v for k, v in st["per"].items()}
    w_all, steps, head = t["samples"], len(t["steps"]), t["head_in_layers"]
    print(f"SLEB, {steps} steps, {w_all} x {t['seq_len']} calibration tokens, every candidate on every window\n")
    prefixes = [2 ** k for k in range(int(math.log2(w_all)) + 1)]
    print("| step | removed | gap to runner-up (nats) | " + " | ".join(f"rank on {w} window(s)" for w in prefixes)
          + " |\n|---|---|---|" + "---|" * len(prefixes))
    for k, st in enumerate(t["steps"], 1):
        per = st["per"]
        total = sorted(per, key=lambda l: sum(per[l]))
        gap = (sum(per[total[1]]) - sum(per[total[0]])) / w_all
        ranks = [sorted(per, key=lambda l: sum(per[l][:w])).index(st["removed"]) + 1 for w in prefixes]
        print(f"| {k} | {st['removed']} | {gap:.4f} | " + " | ".join(f"{r}/{len(per)}" for r in ranks) + " |")
    naive = sum(len(s["layers"]) * (len(s["layers"]) - 1 + head) for s in t["steps"])
    exact = sum(sum(n - p - 1 + head for p in range(n)) + n - 1 for n in (len(s["layers"]) for s in t["steps"]))
    print(f"\nwork, naive loop / prefix cache: {naive / exact:.2f}x")
    rows = []
    for first, keep, min_keep, prior in itertools.product((1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2), (1 / 10, 1 / 6, 1 / 4, 1 / 3),
                                                          (1, 2, 3, 4, 6), (None, 1 / 2, 2 / 3)):
        if first * w_all >= 1:
            work, matched = replay(t, Halving(first, keep, min_keep, prior or 1.0), prior is not None)
            rows.append((matched, naive / work, first, keep, min_keep, prior))
    rows.sort(key=lambda r: (-r[0], -r[1]))
    print("\n| first round | keep | at least | previous ranking keeps | steps matching | work, naive / this |\n"
          "|---|---|---|---|---|---|")
    shown = [r for r in rows if r[0] == steps][:8] + [r for r in rows if r[0] < steps][:4]
    for matched, gain, first, keep, min_keep, prior in shown:
        # After a different choice the trace no longer holds (another path), so its work is not comparable.
        print(f"| {first:.3g} | {keep:.3g} | {min_keep} | {'-' if prior is None else f'{prior:.3g}'} | "
              f"{matched}/{steps} | {f'{gain:.2f}x' if matched == steps else '(diverged)'} |")
    searched = replay(t, Halving(), True)[1]
    work, matched = replay(t, sleb_halving(w_all, t["seq_len"]), False)
    print(f"\nthe search's Halving() with the previous ranking: the exact choice in {searched}/{steps} steps; "
          f"SLEB's (analyse.sleb_halving): {matched}/{steps} steps"
          + (f", {naive / work:.2f}x less work than the naive loop" if matched == steps else "")
          + f"; the best setting matching every step: {max((r[1] for r in rows if r[0] == steps), default=0):.2f}x")


if __name__ == "__main__":
    main()
