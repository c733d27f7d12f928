"""The search table (docs/results/search.md): `slimconv search` against every single-method recipe that reaches at least the
same ideal decode speedup, all measured on WikiText-2 test (never used for choosing).

    python benchmarks/search_table.py [--model default] [--targets 1.1,1.2,1.3] [--samples 4 --seq-len 128]
        [--analysis DIR] [--eval-samples 16 --eval-seq-len 512] [--json rows.json]

The single methods come from one analysis (`--analysis` reuses a folder written by `slimconv analyze` with
enough SLEB steps; otherwise one is run with the same calibration windows as the search): for each method
the smallest count (blocks, attention sublayers, pairs) whose plan reaches the target. Parallel pairs never
reach a decode target (they save no bytes) and are reported as such. Each search is its own run
(`slimconv search --target decode:T`), timed beside SLEB's time in the analysis.
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from slimconv.errors import SlimError
from slimconv.selection.analyse import AnalysisSettings, analyse, verify_recipe
from slimconv.plan import build_plan, costs, source_plan, speedups
from slimconv.recipe import load_recipe
from slimconv.runtime import load_model
from slimconv.selection.search import SearchSettings, recipe_text, search
from slimconv.source import read_config, resolve_source
from slimconv.selection.suggest import load_metrics, write_recipe

sys.path.insert(0, str(Path(__file__).parent))
from analysis_table import Memo  # noqa: E402

METHODS = (("sleb", "blocks"), ("block-influence", "blocks"), ("angular", "blocks"), ("attention", "attention"),
           ("parallel", "pairs"))


def decode_speedup(path: Path, config: dict) -> float:
    return speedups(costs(source_plan(config), config), costs(build_plan(load_recipe(path), config), config))["decode"]


def smallest(m: dict, method: str, unit: str, target: float, config: dict, tmp: Path):
    """The recipe of ``method`` with the fewest changes whose ideal decode speedup reaches ``target``."""
    for k in range(1, m["num_layers"]):
        path = tmp / f"{method}-{k}.yaml"
        try:
            write_recipe(m, method, path, None, True, "benchmarks/search_table.py", **{unit: k})
        except SlimError as e:  # this method cannot give k (not enough SLEB steps, windows or pairs measured)
            return None, f"stops at {k - 1}: {str(e).splitlines()[0]}"
        v = decode_speedup(path, config)
        if v >= target - 1e-9:
            return path, k
        if v <= 1 + 1e-9:
            return None, "saves no bytes read: never reaches a decode target"
    return None, "never reaches it"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--targets", default="1.1,1.2,1.3")
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--sleb-blocks", type=int, default=10)
    p.add_argument("--analysis", help="analysis folder to reuse")
    p.add_argument("--eval-samples", type=int, default=16)
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--json")
    args = p.parse_args()
    src = resolve_source(args.model)
    config = read_config(src)
    if args.analysis:
        m = load_metrics(args.analysis)
    else:
        s = AnalysisSettings(model=args.model, samples=args.samples, seq_len=args.seq_len,
                             sleb_blocks=args.sleb_blocks, group_ppl=True)
        m = analyse(s, src)
    source = Memo(load_model(src))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for target in [float(t) for t in args.targets.split(",")]:
            for method, unit in METHODS:
                path, k = smallest(m, method, unit, target, config, tmp)
                row = dict(target=target, method=method, count=k)
                if path is not None:
                    recipe = load_recipe(path)
                    row.update(chosen={k: v for k, v in recipe.remove.model_dump().items() if v},
                               decode=decode_speedup(path, config))
                    q = verify_recipe(path, args.eval_samples, args.eval_seq_len, source=source)
                    row.update(ppl=q["ppl_slim"], kl=q["kl"], top1=q["top1"], ppl_source=q["ppl_source"])
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
            s = SearchSettings(model=args.model, target=f"decode:{target}", samples=args.samples, seq_len=args.seq_len,
                               method="greedy")
            start = time.perf_counter()
            found = search(s, src)
            seconds = time.perf_counter() - start
            path = tmp / f"search-{target}.yaml"
            path.write_text(recipe_text(found, "benchmarks/search_table.py", "outputs/search")[0])
            q = verify_recipe(path, args.eval_samples, args.eval_seq_len, source=source)
            rows.append(dict(target=target, method="search", count=len(found["path"]) - 1, chosen=found["design"],
                             decode=decode_speedup(path, config), ppl=q["ppl_slim"], kl=q["kl"], top1=q["top1"],
                             seconds=seconds, ppl_source=q["ppl_source"]))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    sleb_s = m.get("seconds", {}).get("sleb")
    print(f"calibration {args.samples} x {args.seq_len} tokens of WikiText-2 valid; evaluation {args.eval_samples} x "
          f"{args.eval_seq_len} tokens of WikiText-2 test; SLEB ({len(m.get('sleb', {}).get('steps', []))} steps) "
          f"took {sleb_s or float('nan'):.0f} s\n")
    print("| ideal decode target | method | changes | chosen | ideal decode | ppl | KL | top-1 | search s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "ppl" not in r:
            print(f"| {r['target']:.2f}x | {r['method']} | {r['count']} | - | - | - | - | - | |")
            continue
        chosen = json.dumps(r["chosen"]).replace('"', "")
        secs = f"{r['seconds']:.0f}" if "seconds" in r else ""
        print(f"| {r['target']:.2f}x | {r['method']} | {r['count']} | {chosen} | {r['decode']:.3f}x | {r['ppl']:.2f} | "
              f"{r['kl']:.3f} | {r['top1']:.3f} | {secs} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
