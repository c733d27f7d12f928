"""Healing on SmolLM2-135M: how much of the quality slimming cost does `slimconv heal` win back, per recipe and
training mode, at the same wall-time budget.

    python benchmarks/bench_heal.py [--recipes drop-late-attention,drop-blocks-20pct] [--modes adjacent,all,lora]
                                    [--minutes 10] [--steps 400] [--lr 2e-4] [--data wikitext2+generated]
                                    [--hidden-weight 1.0] [--generated-windows 64]
                                    [--out-dir outputs/bench-heal]

Each recipe is converted and validated once (reused when its output exists), then healed once per mode in
its own child process (so peak RSS is that heal's), every mode with the same --max-minutes budget (sampling
for --data generated comes before it). Prints a markdown table: WikiText-2 test and King James (other
domain) perplexity and KL of source / unhealed / healed, the share of the log-perplexity gap recovered
(target >= 50%) and of the KL removed on the other domain (target >= 40%), steps, wall time and peak RSS. Rows go to OUT_DIR/bench_heal.json as they finish.
Run it under `nice` on a shared machine: each cell takes the budget plus a few minutes of evaluation.
"""
import argparse
import json
import math
import re
import subprocess
import sys
from pathlib import Path

from slimconv.recipe import Heal

# heal's own default: rows written before --generated-windows existed were sampled with it.
WINDOWS = Heal.model_fields["generated_windows"].default
RECIPES = {"drop-late-attention": "recipes/smollm2-drop-late-attention.yaml",
           "drop-blocks-20pct": "recipes/smollm2-drop-blocks-20pct.yaml",
           "sleb-20pct": "recipes/smollm2-sleb-20pct.yaml",
           "parallel-pairs": "recipes/smollm2-parallel-pairs.yaml"}


def slim(cli, name: str, out_dir: Path) -> Path:
    import yaml

    recipe = yaml.safe_load(Path(RECIPES[name]).read_text())
    recipe["output"]["dir"] = str(out_dir / name)
    recipe["stages"] = ["convert", "validate"]
    recipe.pop("heal", None)
    path = out_dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    if not (out_dir / name / "slimconv_report.json").is_file():
        subprocess.run([*cli, "run", str(path), "--force"], check=False)
    return out_dir / name


def row(name: str, mode: str, lr: float, data: str, hidden_weight: float, generated_windows: int, heal: dict) -> dict:
    first, second = heal["eval"][heal["first_text"]], heal["eval"][heal["second_text"]]

    def recovered(e):
        gap = math.log(e["unhealed"]["ppl_slim"] / e["unhealed"]["ppl_source"])
        return 1 - math.log(e["healed"]["ppl_slim"] / e["healed"]["ppl_source"]) / gap if gap > 0 else float("nan")

    return dict(recipe=name, train=mode, lr=lr, data=data, hidden_weight=hidden_weight, generated_windows=generated_windows,
                steps=heal["steps"],
                minutes=round(heal["wall_s"] / 60, 1),
                peak_rss_mb=round(heal["peak_rss_mb"]),
                ppl_source=first["unhealed"]["ppl_source"], ppl_unhealed=first["unhealed"]["ppl_slim"],
                ppl_healed=first["healed"]["ppl_slim"], gap_recovered=recovered(first),
                kl_unhealed=first["unhealed"]["kl"], kl_healed=first["healed"]["kl"],
                kjv_ppl_source=second["unhealed"]["ppl_source"], kjv_ppl_unhealed=second["unhealed"]["ppl_slim"],
                kjv_ppl_healed=second["healed"]["ppl_slim"], kjv_kl_unhealed=second["unhealed"]["kl"],
                kjv_kl_healed=second["healed"]["kl"], kjv_kl_drop=1 - second["healed"]["kl"] / second["unhealed"]["kl"])


def data_tag(data: str) -> str:
    """A folder-name part for heal --data: a text file by its stem (a path would nest folders), other parts
    (wikitext2, generated, hf:org/name) with anything but word characters, dots and dashes replaced."""
    return "+".join(Path(p).stem if Path(p).is_file() else re.sub(r"[^\w.-]+", "_", p) for p in data.split("+"))


def table(rows: list[dict]) -> str:
    head = ["recipe", "train", "lr", "data", "hidden weight", "steps", "min", "peak RSS MB", "ppl src / slim / healed (WikiText-2 test)",
            "gap recovered", "KL slim -> healed", "KJV ppl src / slim / healed", "KJV KL slim -> healed (drop)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        data = r.get("data", "wikitext2") + (f" ({r.get('generated_windows', WINDOWS)} sampled)" if "generated" in r.get("data", "") else "")
        lines.append(f"| {r['recipe']} | {r['train']} | {format(r['lr'], 'g') if 'lr' in r else '-'} | {data} | {r.get('hidden_weight', 0.0):g} | {r['steps']} | {r['minutes']} | {r['peak_rss_mb']} | "
                     f"{r['ppl_source']:.2f} / {r['ppl_unhealed']:.2f} / **{r['ppl_healed']:.2f}** | "
                     f"**{r['gap_recovered']:.0%}** | {r['kl_unhealed']:.3f} -> {r['kl_healed']:.3f} | "
                     f"{r['kjv_ppl_source']:.2f} / {r['kjv_ppl_unhealed']:.2f} / {r['kjv_ppl_healed']:.2f} | "
                     f"{r['kjv_kl_unhealed']:.3f} -> {r['kjv_kl_healed']:.3f} ({r['kjv_kl_drop']:.0%}) |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", default="drop-late-attention,drop-blocks-20pct")
    p.add_argument("--modes", default="adjacent,all,lora")
    p.add_argument("--minutes", type=float, default=10.0, help="training budget per cell (--max-minutes)")
    p.add_argument("--steps", type=int, default=400, help="steps of the schedule (training stops at the budget)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--lora-lr", type=float, default=1e-3, help="adapters start at zero and need a larger rate")
    p.add_argument("--data", default="wikitext2", help="heal --data: training text(s), e.g. wikitext2+generated")
    p.add_argument("--hidden-weight", type=float, default=0.0, help="heal --hidden-weight (0: KL only)")
    p.add_argument("--generated-windows", type=int, default=WINDOWS, help="heal --generated-windows")
    p.add_argument("--out-dir", default="outputs/bench-heal")
    args = p.parse_args()
    cli = [sys.executable, "-m", "slimconv"]
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = out_dir / "bench_heal.json"
    rows = json.loads(results.read_text()) if results.is_file() else []
    for name in args.recipes.split(","):
        unhealed = slim(cli, name, out_dir)
        for mode in args.modes.split(","):
            lr = args.lora_lr if mode == "lora" else args.lr
            healed = out_dir / (f"{name}-{mode}-lr{lr:g}" + ("" if args.data == "wikitext2" else f"-{data_tag(args.data)}")
                                + (f"-hw{args.hidden_weight:g}" if args.hidden_weight else "")
                                + (f"-gw{args.generated_windows}" if args.generated_windows != WINDOWS else ""))
            subprocess.run([*cli, "heal", str(unhealed), "-o", str(healed), "--force", "--train", mode,
                            "--steps", str(args.steps), "--max-minutes", str(args.minutes), "--lr", str(lr),
                            "--data", args.data, "--hidden-weight", str(args.hidden_weight),
                            "--generated-windows", str(args.generated_windows)],
                           check=True)
            key = (name, mode, lr, args.data, args.hidden_weight, args.generated_windows)
            rows = [r for r in rows if (r["recipe"], r["train"], r.get("lr"), r.get("data", "wikitext2"),
                                        r.get("hidden_weight", 0.0), r.get("generated_windows", WINDOWS)) != key]
            rows.append(row(name, mode, lr, args.data, args.hidden_weight, args.generated_windows,
                            json.loads((healed / "slimconv_heal.json").read_text())))
            results.write_text(json.dumps(rows, indent=2))
            print(table(rows), flush=True)


if __name__ == "__main__":
    main()
