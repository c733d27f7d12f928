"""The selection-method table (docs/results/analysis.md): recipes written by `slimconv recipe` from one analysis folder at
several budgets, each measured on WikiText-2 test (applied at run time to the source; nothing converted).

    python benchmarks/analysis_table.py outputs/analysis/smollm2 [--samples 16 --seq-len 512]
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

from slimconv.selection.analyse import verify_recipe
from slimconv.runtime import load_model
from slimconv.source import resolve_source
from slimconv.selection.suggest import load_metrics, write_recipe


class Memo:
    """The source model's outputs computed once and replayed for every recipe (same windows each time)."""

    def __init__(self, model):
        self.model, self.seen = model, {}

    def __call__(self, input_ids, **kwargs):
        key = input_ids.numpy().tobytes()
        if key not in self.seen:
            self.seen[key] = self.model(input_ids=input_ids, **kwargs)
        return self.seen[key]


def rows(m: dict) -> list[tuple[str, str, str, dict]]:
    n = m["num_layers"]
    out = []
    for share in (0.1, 0.2, 0.3):
        k = round(share * n)
        for method in ("sleb", "block-influence", "angular", "last"):
            out.append((f"{share:.0%} of blocks ({k})", method, "", dict(blocks=k)))
    for share, label in ((1 / 3, "1/3"), (1 / 2, "1/2")):
        k = round(share * n)
        for by in ("importance", "position"):
            out.append((f"attention of {label} of the layers ({k})", "attention", by, dict(attention=k, by=by)))
    for pairs in (2, 4, 6):
        out.append((f"{pairs} parallel pairs", "parallel", "", dict(pairs=pairs)))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("analysis")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()
    m = load_metrics(args.analysis)
    results = []
    source = Memo(load_model(resolve_source(m["settings"]["model"])))
    with tempfile.TemporaryDirectory() as tmp:
        for budget, method, by, counts in rows(m):
            path = Path(tmp) / f"{method}-{len(results)}.yaml"
            recipe = write_recipe(m, method, path, None, False, "benchmarks/analysis_table.py", **counts)
            q = verify_recipe(path, args.samples, args.seq_len, source=source)
            chosen = recipe.get("remove", recipe.get("parallel"))
            results.append(dict(budget=budget, method=method + (f" by {by}" if by else ""), chosen=chosen,
                                ppl=q["ppl_slim"], kl=q["kl"], top1=q["top1"], ppl_source=q["ppl_source"]))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    print(f"source perplexity {results[0]['ppl_source']:.2f} ({args.samples} x {args.seq_len} tokens of WikiText-2 test)\n")
    print("| budget | method | chosen | ppl | KL | top-1 |\n|---|---|---|---|---|---|")
    for r in results:
        chosen = json.dumps(r["chosen"]).replace('"', "")
        print(f"| {r['budget']} | {r['method']} | {chosen} | {r['ppl']:.2f} | {r['kl']:.3f} | {r['top1']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
