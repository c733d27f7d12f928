"""Width + depth (search --method mip) against depth-only recipes at the same ideal decode speedup, on text the search
did not see (docs/results/width.md).

    python benchmarks/bench_width.py [--targets 1.2,1.3] [--samples 4 --seq-len 128] [--eval-samples 16
        --eval-seq-len 512] [--greedy] [--heal-steps 60] [--work DIR] [--json rows.json]

For each target: `slimconv search --method mip` (calibrated on WikiText-2 valid), and the depth-only recipes to beat:
SLEB's fewest blocks and the greedy search's recipe. With ``--greedy`` the greedy search runs here on the same
calibration; without it, the recipes it and SLEB chose on 4 x 128 tokens of WikiText-2 valid on 2026-11-30
(docs/results/search.md; neither choosing code has changed for dense models since) are used. Every recipe is
measured with the plan applied to the source at run time on WikiText-2 test and on King James (Genesis and Exodus:
another domain); with ``--heal-steps`` the mip and greedy recipes are converted and healed on the same budget,
and heal's own report (held-out windows of both texts) is tabled.
"""
import argparse
import json
import time
from pathlib import Path

import yaml

# Chosen on 4 x 128 tokens of WikiText-2 valid (seed 0), docs/results/search.md.
MEASURED = {
    1.2: {"sleb": {"remove": {"blocks": [3, 12, 13, 14, 17, 25, 26]}},
          "greedy": {"remove": {"blocks": [13, 14, 25], "attention": [6, 7, 9, 10, 18, 22, 26], "mlp": [12, 17]}}},
    1.3: {"sleb": {"remove": {"blocks": [3, 4, 5, 12, 13, 14, 17, 25, 26]}},
          "greedy": {"remove": {"blocks": [4, 5, 13, 14, 25], "attention": [7, 8, 9, 10, 18, 26], "mlp": [3, 12, 17]}}},
}


def write(path: Path, sections: dict, out_dir: str) -> Path:
    path.write_text(yaml.safe_dump({"model": "default", **sections, "output": {"dir": out_dir}}, sort_keys=False))
    return path


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", default="1.2,1.3")
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--eval-samples", type=int, default=16)
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--greedy", action="store_true", help="run the greedy search here instead of its measured recipes")
    p.add_argument("--heal-steps", type=int, default=0)
    p.add_argument("--heal-lr", default="5e-4")
    p.add_argument("--work", default="outputs/bench-width")
    p.add_argument("--json", default=None)
    a = p.parse_args()

    from slimconv.cli import main as cli
    from slimconv.data import calibration_ids
    from slimconv.plan import build_plan, costs, source_plan, speedups
    from slimconv.recipe import load_recipe
    from slimconv.runtime import load_model
    from slimconv.selection.analyse import verify_recipe
    from slimconv.selection.mip import mip_search
    from slimconv.selection.search import SearchSettings, recipe_text, search
    from slimconv.source import read_config, resolve_source

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    src = resolve_source("default")
    config = read_config(src)
    source = load_model(src)
    ids = calibration_ids(src, "wikitext2", a.samples, a.seq_len, 0)
    rows = []
    for target in map(float, a.targets.split(",")):
        recipes = {}
        for method in ("mip", "greedy") if a.greedy else ("mip",):
            s = SearchSettings(model="default", target=f"decode:{target}", method=method, samples=a.samples,
                               seq_len=a.seq_len, device="cpu")
            t = time.perf_counter()
            m = (mip_search if method == "mip" else search)(s, src, ids)
            _, data = recipe_text(m, "benchmarks/bench_width.py", "x")
            recipes[method] = ({k: v for k, v in data.items() if k in ("remove", "shrink", "parallel")},
                               time.perf_counter() - t)
        for method, sections in MEASURED.get(target, {}).items():
            recipes.setdefault(method, (sections, None))
        for method, (sections, seconds) in recipes.items():
            name = f"{method}-{target:g}"
            path = write(work / f"{name}.yaml", sections, str(work / name))
            plan = build_plan(load_recipe(path), config)
            ideal = speedups(costs(source_plan(config), config), costs(plan, config))["decode"]
            row = dict(target=target, method=method, sections=sections, ideal_decode=ideal, search_s=seconds)
            for data in ("wikitext2", "kjv"):
                q = verify_recipe(path, a.eval_samples, a.eval_seq_len, data, source)
                row[data] = dict(ppl=q["ppl_slim"], ppl_source=q["ppl_source"], kl=q["kl"], top1=q["top1"])
            if a.heal_steps and method in ("mip", "greedy"):
                out = work / name
                if not (out / "slimconv_heal.json").exists() and not (work / f"{name}-healed").exists():
                    assert cli(["convert", str(path), "--force"]) == 0
                    assert cli(["validate", str(out)]) == 0
                    assert cli(["heal", str(out), "--steps", str(a.heal_steps), "--lr", a.heal_lr, "--force"]) == 0
                row["healed"] = json.loads((work / f"{name}-healed" / "slimconv_heal.json").read_text())["eval"]
            rows.append(row)
            print(json.dumps(row, default=str), flush=True)
            if a.json:
                Path(a.json).write_text(json.dumps(rows, indent=2, default=str))
    print("\n| ideal decode target | recipe | ideal decode | WikiText-2 test ppl | KL on King James | "
          "King James ppl | search s |\n|---|---|---|---|---|---|---|")
    for r in rows:
        w, k = r["wikitext2"], r["kjv"]
        print(f"| {r['target']:.2f}x | {r['method']} | {r['ideal_decode']:.3f}x | {w['ppl']:.2f} (source "
              f"{w['ppl_source']:.2f}) | {k['kl']:.3f} | {k['ppl']:.2f} (source {k['ppl_source']:.2f}) | "
              f"{r['search_s'] and round(r['search_s'])} |")
    if any("healed" in r for r in rows):
        print("\n| target | recipe | text | unhealed ppl | healed ppl | healed KL |\n|---|---|---|---|---|---|")
        for r in rows:
            for text, e in r.get("healed", {}).items():
                print(f"| {r['target']:.2f}x | {r['method']} | {text} | {e['unhealed']['ppl_slim']:.2f} | "
                      f"{e['healed']['ppl_slim']:.2f} | {e['healed']['kl']:.3f} |")


if __name__ == "__main__":
    main()
