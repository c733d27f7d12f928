"""What a person reads: the plan and validation as terminal tables, and the model card (README.md)."""
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .plan import Plan

console = Console(stderr=False, highlight=False)


def _heads(spec) -> str:
    return f"{spec.attention.num_heads}/{spec.attention.num_key_value_heads}" if spec.attention else "-"


def plan_rows(plan: Plan) -> list[list[str]]:
    rows = []
    for i, s in enumerate(plan.layers):
        src = ",".join(map(str, s.source_layers))
        kind = "parallel" if len(s.source_layers) > 1 else ("block" if s.attention and s.mlp else
                                                            ("MLP only" if s.mlp else "attention only"))
        rows.append([str(i), src, kind, _heads(s), str(s.mlp.intermediate_size) if s.mlp else "-"])
    return rows


PLAN_HEADER = ["out", "source layers", "kind", "heads q/kv", "MLP width"]


def _fmt(v: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.2f}{unit}"
    return f"{v:.0f}"


def cost_rows(src: dict, slim: dict) -> list[list[str]]:
    L = src["seq_len"]
    keys = [("parameters", "params"), ("sequential layers", "sequential_layers"),
            ("attention layers", "attention_layers"), (f"prefill FLOPs/token (L={L})", "prefill_flops_per_token"),
            (f"decode FLOPs/token (ctx={L})", "decode_flops_per_token"), ("KV-cache bytes/token", "kv_bytes_per_token"),
            (f"decode bytes read/token (ctx={L})", "decode_bytes_per_token")]
    return [[label, _fmt(src[k]), _fmt(slim[k]), f"{src[k] / slim[k]:.3f}x" if slim[k] else "inf"]
            for label, k in keys]


def print_plan(plan: Plan, src_costs: dict, slim_costs: dict, ideal: dict, title: str):
    t = Table(title=title, header_style="bold")
    for h in PLAN_HEADER:
        t.add_column(h, justify="right" if h != "kind" else "left")
    removed = sorted(set(range(plan.num_source_layers)) - {m for s in plan.layers for m in s.source_layers})
    for row in plan_rows(plan):
        t.add_row(*row)
    console.print(t)
    if removed:
        console.print(f"removed blocks: {removed}")
    for note in plan.notes:
        console.print(f"[yellow]note:[/] {note}")
    c = Table(title="cost per token", header_style="bold")
    for h in ("", "source", "slim", "source/slim"):
        c.add_column(h, justify="left" if not h else "right")
    for row in cost_rows(src_costs, slim_costs):
        c.add_row(*row)
    console.print(c)
    console.print(f"ideal speedup: prefill {ideal['prefill']:.3f}x (FLOPs), decode {ideal['decode']:.3f}x "
                  "(bytes read; decode is memory-bound)")
    if any(len(s.source_layers) > 1 for s in plan.layers):
        console.print("parallel groups do not reduce FLOPs: they gain by running fewer, wider layers "
                      f"({src_costs['sequential_layers']} -> {slim_costs['sequential_layers']} sequential steps)")


def print_validation(report: dict):
    ex, q = report.get("exactness"), report.get("quality")
    if ex:
        mark = "[green]PASS[/]" if ex["passed"] else "[red]FAIL[/]"
        console.print(f"exactness {mark}: max |logit error| {ex['max_abs_error']:.2e} (tolerance {ex['tolerance']:.0e}, "
                      f"max |logit| {ex['max_abs_logit']:.1f}), greedy tokens identical "
                      f"{ex['greedy_identical']}/{ex['greedy_tokens']}")
    if q:
        t = Table(title=f"quality on {q['samples']} x {q['seq_len']} held-out tokens", header_style="bold")
        for h in ("perplexity source", "perplexity slim", "ratio", "KL (nats/token)", "top-1 agreement", "result"):
            t.add_column(h, justify="right")
        t.add_row(f"{q['ppl_source']:.3f}", f"{q['ppl_slim']:.3f}", f"{q['ppl_ratio']:.3f}", f"{q['kl']:.4f}",
                  f"{q['top1']:.3f}", "[green]PASS[/]" if q["passed"] else "[red]FAIL: " + "; ".join(q["failures"]))
        console.print(t)
    if report.get("early_exit"):
        t = Table(title="early exit vs the same model without it", header_style="bold")
        for h in ("run", "items", "avg layers", "layers saved", "compute saved", "top-1 agreement", "ppl / accuracy"):
            t.add_column(h, justify="right")
        for row in early_exit_rows(report["early_exit"]):
            t.add_row(*row)
        console.print(t)


EARLY_EXIT_HEADER = ["run", "items", "avg layers", "layers saved", "compute saved", "top-1 agreement",
                     "ppl / accuracy (exit vs full)"]


def early_exit_rows(ee: dict) -> list[list[str]]:
    """Rows for the early-exit results: simulated per-token text, real decoding, real prompt tasks."""
    def common(r):
        return [f"{r['avg_layers']:.2f}", f"{r['layers_saved']:.1%}", f"{r['compute_saved']:.1%}", f"{r['top1_agreement']:.3f}"]

    s, d = ee["simulated"], ee["decode"]
    rows = [["text, simulated per token", str(s["tokens"]), *common(s), f"{s['ppl_exit']:.2f} vs {s['ppl_full']:.2f}"],
            ["text, real cached decoding", str(d["tokens"]), *common(d), f"{d['ppl_exit']:.2f} vs {d['ppl_full']:.2f}"]]
    for name, p in ee["prompts"].items():
        rows.append([f"prompt task {name}", str(p["prompts"]), *common(p),
                     f"{p['accuracy_exit']:.3f} vs {p['accuracy_full']:.3f}"])
    return rows


def _md_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def write_card(out: Path):
    """(Re)writes README.md from the files slimconv keeps beside the weights."""
    meta = json.loads((out / "slimconv_plan.json").read_text())
    plan = Plan(**meta["plan"])
    recipe_text = (out / "slimconv_recipe.yaml").read_text()
    report_path = out / "slimconv_report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    model = meta["model"]
    front = ["---", "library_name: transformers", "pipeline_tag: text-generation",
             "tags:", "- slimconv", "- pruned", "- layer-pruning"]
    if meta.get("base_model"):
        front.append(f"base_model: {meta['base_model']}")
    if meta.get("license"):
        front.append(f"license: {meta['license']}")
    front.append("---")
    remote = "" if plan.uniform else ", trust_remote_code=True"
    parts = [
        "\n".join(front), f"# {out.name}",
        f"Slimmed from `{meta.get('base_model') or model}` by slimconv "
        f"({plan.num_source_layers} source layers -> {len(plan.layers)} output layers).",
        "## Recipe", f"```yaml\n{recipe_text}```",
        "## Plan", _md_table(PLAN_HEADER, plan_rows(plan)),
        _md_table(["", "source", "slim", "source/slim"], cost_rows(meta["costs"]["source"], meta["costs"]["slim"])),
        "## Validation",
    ]
    ex, q = report.get("exactness"), report.get("quality")
    if not report:
        parts.append("Not validated yet: run `slimconv validate` on this folder.")
    if ex:
        parts.append(f"Exactness (float32, against the source model with the same changes applied at run time): "
                     f"max |logit error| {ex['max_abs_error']:.2e} (tolerance {ex['tolerance']:.0e}); "
                     f"{ex['greedy_identical']}/{ex['greedy_tokens']} greedy tokens identical: "
                     f"**{'pass' if ex['passed'] else 'FAIL'}**.")
    if q:
        parts.append(_md_table(["perplexity source", "perplexity slim", "ratio", "KL", "top-1 agreement"],
                               [[f"{q['ppl_source']:.3f}", f"{q['ppl_slim']:.3f}", f"{q['ppl_ratio']:.3f}",
                                 f"{q['kl']:.4f}", f"{q['top1']:.3f}"]]))
    if report.get("early_exit"):
        parts.append(f"Early exit (policy `{json.dumps(report['early_exit']['policy'])}`), against the same "
                     "checkpoint with every layer run:")
        parts.append(_md_table(EARLY_EXIT_HEADER, early_exit_rows(report["early_exit"])))
    parts += ["## How to load", "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
              f"model = AutoModelForCausalLM.from_pretrained(\"{out.name}\"{remote})\n"
              f"tokenizer = AutoTokenizer.from_pretrained(\"{out.name}\")\n```"]
    if not plan.uniform:
        parts.append("The layers differ in shape, so the checkpoint carries its own modeling code "
                     "(`modeling_slim.py`, needs only torch and transformers 5.x).")
    (out / "README.md").write_text("\n\n".join(parts) + "\n")
