"""Runs `slimconv run` on the shipped SmolLM2 recipes and prints the quality/savings table of docs/results/recipes.md.

    python benchmarks/recipe_table.py [recipes/smollm2-*.yaml ...]

Outputs go where each recipe says (outputs/...), overwritten (--force).
"""
import json
import sys
from pathlib import Path

from slimconv.cli import main
from slimconv.recipe import load_recipe


def row(recipe_path: Path) -> str:
    recipe = load_recipe(recipe_path)
    code = main(["run", str(recipe_path), "--force"])
    out = Path(recipe.output.dir)
    report = json.loads((out / "slimconv_report.json").read_text())
    meta = json.loads((out / "slimconv_plan.json").read_text())
    q, ex, c = report["quality"], report["exactness"], meta["costs"]
    ideal = c["ideal_speedup"]
    return (f"| `{recipe_path.name}` | {c['source']['sequential_layers']}->{c['slim']['sequential_layers']} | "
            f"{ex['max_abs_error']:.1e}, {ex['greedy_identical']}/{ex['greedy_tokens']} | "
            f"{q['ppl_source']:.2f} | {q['ppl_slim']:.2f} | {q['kl']:.3f} | {q['top1']:.3f} | "
            f"{ideal['params']:.3f}x | {ideal['prefill']:.3f}x | {ideal['decode']:.3f}x | "
            f"{'pass' if code == 0 else 'FAIL'} |")


if __name__ == "__main__":
    paths = [Path(p) for p in sys.argv[1:]] or sorted(Path("recipes").glob("smollm2-*.yaml"))
    rows = [row(p) for p in paths]
    print("| recipe | layers | exactness (max err, greedy) | ppl source | ppl slim | KL | top-1 | "
          "params saved (src/slim) | ideal prefill | ideal decode | thresholds |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
