"""What a person reads: the plan and validation as terminal tables, and the model card (README.md)."""
import json
import math
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .errors import SlimError
from .outdir import (BENCH_FILE, CARD_FILE, DEPLOYED_FILE, HEAL_FILE, HEAL_PLOT, ONNX_REPORT, PLAN_FILE,
                     RECIPE_FILE, REPORT_FILE, read_json, write_text)
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
        kind += ", narrowed" if s.narrowed else ""
        rows.append([str(i), src, kind, _heads(s), _width(s.mlp)])
    return rows


def _width(mlp) -> str:
    """A dense MLP's width, or a mixture's experts x width, top-k and shared expert width."""
    if mlp is None:
        return "-"
    if mlp.experts is None:
        return str(mlp.intermediate_size)
    shared = f" +{mlp.shared_intermediate_size} shared" if mlp.shared_intermediate_size else ""
    return f"{len(mlp.experts)}x{mlp.intermediate_size} top-{mlp.top_k}{shared}"


PLAN_HEADER = ["out", "source layers", "kind", "heads q/kv", "MLP width"]


def _fmt(v: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.2f}{unit}"
    return f"{v:.0f}"


def cost_rows(src: dict, slim: dict) -> list[list[str]]:
    L = src["seq_len"]
    keys = [("parameters", "params")]
    if src.get("active_params", src["params"]) != src["params"]:  # a mixture of experts: what one token reads
        keys.append(("active parameters/token", "active_params"))
    keys += [("sequential layers", "sequential_layers"),
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


def healed_exactness_text(ex: dict) -> str:
    """The exactness line of a healed output: its weights were trained, so it is the frozen-tensor check."""
    if not ex.get("compared"):
        return f"weights trained by heal ({ex['trained_tensors']} tensors); {ex['note']}"
    verdict = "pass" if ex["passed"] else "FAIL: " + "; ".join(ex["problems"])
    return (f"weights trained by heal ({ex['trained_tensors']} tensors); the other {ex['frozen_tensors']} equal the "
            f"unhealed output's byte for byte ({ex['frozen_identical']}/{ex['frozen_tensors']}), names, shapes "
            f"and dtypes unchanged: {verdict}")


def print_validation(report: dict):
    ex, q = report.get("exactness"), report.get("quality")
    if ex and ex.get("heal"):
        console.print(f"exactness: {healed_exactness_text(ex)}")
        ex = None
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
        if report.get("quality_unhealed"):
            u = report["quality_unhealed"]
            t.add_row(f"{u['ppl_source']:.3f}", f"{u['ppl_slim']:.3f} (unhealed)", f"{u['ppl_ratio']:.3f}",
                      f"{u['kl']:.4f}", f"{u['top1']:.3f}", "")
        console.print(t)
    if report.get("early_exit"):
        t = Table(title="early exit vs the same model without it", header_style="bold")
        for h in ("run", "items", "avg layers", "layers saved", "compute saved", "top-1 agreement", "ppl / accuracy"):
            t.add_column(h, justify="right")
        for row in early_exit_rows(report["early_exit"]):
            t.add_row(*row)
        console.print(t)


def deployed_rows(record: dict) -> list[list[str]]:
    """One row per text and precision: perplexities, their ratio, and the KLs."""
    rows = []
    for text, by_precision in record["texts"].items():
        for precision, r in by_precision.items():
            src, slim = r["source"], r["slim"]
            rows.append([text, precision, f"{src['ppl']:.2f}", f"{slim['ppl']:.2f}", f"{slim['ppl'] / src['ppl']:.3f}",
                         "-" if "kl_float_source" not in src else f"{src['kl_float_source']:.3f}",
                         f"{slim['kl_float_source']:.3f}",
                         "-" if "kl_same_precision_source" not in slim else f"{slim['kl_same_precision_source']:.3f}"])
    return rows


DEPLOYED_HEADER = ["text", "precision", "ppl source", "ppl slim", "slim/source", "KL source", "KL slim",
                   "KL slim vs source"]  # KL from the float source; the last, from the source at that precision


def print_deployed(record: dict):
    t = Table(title=f"deployed precision in {record['engine']}: {record['samples']} x {record['seq_len']} tokens per "
              "text", header_style="bold", caption="KL in nats/token from the float source; the last column from the "
              "source file of the same precision")
    for h in DEPLOYED_HEADER:
        t.add_column(h, justify="right")
    for row in deployed_rows(record):
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


def print_bench(rows: list[dict], repeats: int):
    """Three tables (prefill, decode, memory) so that each fits a terminal; the JSON and the card have
    every column in one table."""
    key = [("runtime", "runtime"), ("batch", "batch"), ("prompt", "prompt")]
    ratios = lambda phase: [(f"{phase} speedup", "speedup"), (f"{phase} ideal", "ideal"),
                            (f"{phase} measured/ideal", "measured/ideal")]
    tables = ((f"prefill, medians of {repeats} interleaved repeats",
               [("prefill ms source", "ms source"), ("prefill ms slim", "ms slim"), *ratios("prefill")]),
              (f"decode, medians of {repeats} interleaved repeats (tokens/s of the whole batch)",
               [("decode tok/s source", "tok/s source"), ("decode tok/s slim", "tok/s slim"), *ratios("decode")]),
              ("memory: weights + KV cache at the end of the run, computed from the plan (not measured)",
               [("weights+KV MB source", "MB source"), ("weights+KV MB slim", "MB slim")]))
    for title, columns in tables:
        t = Table(title=title, header_style="bold")
        for _, header in key + columns:
            t.add_column(header, justify="left" if header == "runtime" else "right")
        for r in rows:
            t.add_row(*[f"{r[k]:.3f}" if k.endswith(("speedup", "ideal")) else _cell(r[k]) for k, _ in key + columns])
        console.print(t)


HEAL_HEADER = ["text (test split)", "model", "perplexity", "KL to source", "top-1 agreement", "log-ppl gap recovered"]


def heal_rows(heal: dict) -> list[list[str]]:
    """Source / unhealed / healed on both evaluation texts; the last column is 1 - log(ppl healed/ppl source)
    / log(ppl unhealed/ppl source), the share of the log-perplexity gap that healing won back."""
    rows = []
    for text, e in heal["eval"].items():
        u, h = e["unhealed"], e["healed"]
        gap = math.log(u["ppl_slim"] / u["ppl_source"])
        recovered = 1 - math.log(h["ppl_slim"] / h["ppl_source"]) / gap if gap > 0 else float("nan")
        rows.append([text, "source", f"{u['ppl_source']:.2f}", "0", "1", ""])
        rows.append([text, "unhealed", f"{u['ppl_slim']:.2f}", f"{u['kl']:.4f}", f"{u['top1']:.3f}", ""])
        rows.append([text, "healed", f"{h['ppl_slim']:.2f}", f"{h['kl']:.4f}", f"{h['top1']:.3f}",
                     f"{recovered:.0%}" if gap > 0 else "-"])
    return rows


def heal_summary(heal: dict) -> str:
    from .data import describe_training

    s = heal["settings"]
    stop = " (stopped by max_minutes)" if heal.get("stopped_by_time") else ""
    peak = f", peak CUDA memory {heal['peak_cuda_mb']:.0f} MB" if heal.get("peak_cuda_mb") else ""
    hidden = f" + {s['hidden_weight']} x hidden MSE" if s["hidden_weight"] else ""
    sampling = f" (after {heal['sampling_s'] / 60:.1f} min sampling)" if heal.get("sampling_s") else ""
    # A report without generated_windows predates `--data generated`, so its data never names it.
    return (f"train `{s['train']}` (output layers {heal['trained_layers']}, {heal['trainable_parameters'] / 1e6:.2f}M "
            f"trainable parameters), KL(source || student){hidden} on "
            f"{describe_training(s['data'], s.get('generated_windows'))}, lr {s['lr']}: {heal['steps']} of "
            f"{s['steps']} steps{stop}, {heal['tokens']} tokens ({s['batch']} x {s['seq_len']} per step), "
            f"{heal['wall_s'] / 60:.1f} min{sampling} on {heal['device']}, peak RSS {heal['peak_rss_mb']:.0f} MB{peak}")


def print_heal(heal: dict):
    console.print(heal_summary(heal).replace("`", ""))
    t = Table(title="heal: source / unhealed / healed, held-out text of two domains", header_style="bold")
    for h in HEAL_HEADER:
        t.add_column(h, justify="left" if h in ("text (test split)", "model") else "right")
    for row in heal_rows(heal):
        t.add_row(*row)
    console.print(t)


def md_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def load_bench(out: Path) -> list[dict] | None:
    """The speed measurements beside the weights, if `bench` ran: OUTPUT/slimconv_bench.json.

    Expected shape: a JSON list of flat objects, one per table row, e.g.
    [{"model": "source", "runtime": "torch cpu", "prefill tokens/s": 812.5, "decode tokens/s": 61.2}, ...].
    The card shows every key as a column, in the order the keys first appear; a row without a key shows "-".
    """
    path = out / BENCH_FILE
    if not path.is_file():
        return None
    rows = read_json(path)
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise SlimError(f"{path} is not a list of rows (JSON objects)", f"re-run the benchmark, or delete {path}")
    return rows


def load_deployed(out: Path) -> dict | None:
    """The deployed-precision record (`validate --deployed`) when it describes the folder's current weights."""
    from .source import weights_sha256

    path = out / DEPLOYED_FILE
    if not path.is_file():
        return None
    record = read_json(path)
    return record if record.get("weights_sha256") == weights_sha256(out) else None


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def _speed_table(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    return md_table(columns, [[_cell(r.get(c)) for c in columns] for r in rows])


def _onnx_section(report: dict) -> list[str]:
    # The tolerance is per case since float16 graphs are checked relative to the logit scale.
    cases = "; ".join(f"{label}: max |logit error| {r['max_abs_error']:.2e} (tolerance {r['tolerance']:.1e}), "
                      f"greedy {r['greedy_agreement']}" for label, r in report["cases"].items())
    return ["## ONNX",
            f"`onnx/model.onnx`: one {report.get('dtype', 'float32')} decoder graph with the KV cache as "
            f"inputs/outputs ({report['export']['cache_pairs']} past/present pairs). Checked against the "
            f"PyTorch checkpoint on {report['provider']} over prefill + {report['steps']} cached decode steps: "
            f"{cases}: **{'pass' if report['passed'] else 'FAIL'}**."]


def _load_section(name: str, uniform: bool, onnx: bool, fmt: str | None = None) -> list[str]:
    if fmt == "nemotron-nas":
        transformers = ("Attention/MLP sublayers were removed; the checkpoint is in NVIDIA's nemotron-nas (DeciLM) "
                        "format (`block_configs` per layer), which vLLM, SGLang, TensorRT-LLM and mlx-lm run natively "
                        f"(e.g. `vllm serve {name} --trust-remote-code`: the config class is `configuration_decilm.py`). "
                        "transformers loads it with `trust_remote_code=True` through `modeling_decilm.py`, a thin "
                        "mapping onto the bundled `modeling_slim.py`.")
        remote = ", trust_remote_code=True"
    elif uniform:
        transformers = ("Only whole blocks were removed, so this is a stock checkpoint: plain transformers "
                        "loads it, no remote code.")
        remote = ""
    else:
        from .modeling.configuration_slim import PROVEN_TRANSFORMERS

        oldest, newest = PROVEN_TRANSFORMERS
        transformers = ("The layers differ in shape, so the checkpoint carries its own modeling code "
                        f"(`modeling_slim.py`, needs only torch and transformers; proven with transformers "
                        f"{oldest} to {newest}, and it warns when loaded under another version); load it with "
                        f"`trust_remote_code=True` after reading that file: "
                        f"`pip install 'transformers>={oldest},<={newest}'`.")
        remote = ", trust_remote_code=True"
    parts = ["## How to load", transformers,
             "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
             f"model = AutoModelForCausalLM.from_pretrained(\"{name}\"{remote})\n"
             f"tokenizer = AutoTokenizer.from_pretrained(\"{name}\")\n```"]
    if onnx:
        local = name.split("/")[-1]
        parts += [
            "ONNX Runtime: fetch the `onnx/` folder (with the Hub: "
            f"`hf download {name} --include 'onnx/*' --local-dir {local}`), then generate with slimconv's "
            "ONNX Runtime loop, or with onnxruntime-genai, which reads the `genai_config.json` beside the graph "
            "(both tested by slimconv):",
            f"```bash\nslimconv generate {local}/onnx \"The capital of France is\"\n```",
            f"```python\nimport onnxruntime_genai as og\nmodel = og.Model(\"{local}/onnx\")\n```",
            "optimum's `ORTModelForCausalLM` is meant to drive the same uniform cache layout "
            "(not yet checked by slimconv's tests):",
            "```python\nfrom optimum.onnxruntime import ORTModelForCausalLM\n"
            f"model = ORTModelForCausalLM.from_pretrained(\"{name}\", subfolder=\"onnx\")\n```",
        ]
    return parts


def card_text(out: Path, repo_id: str | None = None, onnx: bool | None = None) -> str:
    """The model card for an output folder, built from the files slimconv keeps beside the weights.

    repo_id names the model in the loading examples (default: the folder name); onnx says whether the
    ONNX folder is part of what the card describes (default: when its report is present).
    """
    import yaml

    from .recipe import load_recipe

    meta = read_json(out / PLAN_FILE)
    plan = Plan(**meta["plan"])
    recipe_text = (out / RECIPE_FILE).read_text()
    recipe = load_recipe(out / RECIPE_FILE)
    report = read_json(out / REPORT_FILE) if (out / REPORT_FILE).is_file() else {}
    onnx_report = read_json(out / ONNX_REPORT) if (out / ONNX_REPORT).is_file() else None
    onnx = onnx_report is not None and onnx is not False
    bench = load_bench(out)
    deployed = load_deployed(out)
    tags = ["slimconv", "pruned", "layer-pruning"]
    if any(len(s.source_layers) > 1 for s in plan.layers):
        tags.append("layer-parallelism")
    if onnx:
        tags.append("onnx")
    if (out / HEAL_FILE).is_file():
        tags.append("distillation")
    front = {"library_name": "transformers", "pipeline_tag": "text-generation", "tags": tags}
    if meta.get("base_model"):
        front["base_model"] = meta["base_model"]
    if meta.get("license"):
        front["license"] = meta["license"]
    name = repo_id or out.name
    parts = [
        f"---\n{yaml.safe_dump(front, sort_keys=False)}---", f"# {name.split('/')[-1]}",
        f"Slimmed from `{meta.get('base_model') or meta['model']}` by slimconv "
        f"({plan.num_source_layers} source layers -> {len(plan.layers)} output layers)."
        + (f" {recipe.description}" if recipe.description else ""),
        "## Recipe", f"```yaml\n{recipe_text}```",
        "## Plan", md_table(PLAN_HEADER, plan_rows(plan)),
        md_table(["", "source", "slim", "source/slim"], cost_rows(meta["costs"]["source"], meta["costs"]["slim"])),
        "## Validation",
    ]
    ex, q = report.get("exactness"), report.get("quality")
    if not report:
        parts.append("Not validated yet: run `slimconv validate` on this folder.")
    heal = read_json(out / HEAL_FILE) if (out / HEAL_FILE).is_file() else None
    if ex and ex.get("heal"):
        parts.append(f"Exactness: {healed_exactness_text(ex)}.")
        ex = None
    if ex:
        parts.append(f"Exactness (float32, against the source model with the same changes applied at run time): "
                     f"max |logit error| {ex['max_abs_error']:.2e} (tolerance {ex['tolerance']:.0e}); "
                     f"{ex['greedy_identical']}/{ex['greedy_tokens']} greedy tokens identical: "
                     f"**{'pass' if ex['passed'] else 'FAIL'}**.")
    if q:
        parts.append(f"Quality against the source model on {q['samples']} x {q['seq_len']} held-out tokens of "
                     f"`{recipe.validation.quality.data}` (test split): "
                     f"**{'pass' if q['passed'] else 'FAIL: ' + '; '.join(q['failures'])}**.")
        parts.append(md_table(["perplexity source", "perplexity slim", "ratio", "KL", "top-1 agreement"],
                               [[f"{q['ppl_source']:.3f}", f"{q['ppl_slim']:.3f}", f"{q['ppl_ratio']:.3f}",
                                 f"{q['kl']:.4f}", f"{q['top1']:.3f}"]]))
    elif ex:
        parts.append("Quality (perplexity, KL, top-1 agreement against the source) was not measured.")
    if report.get("quality_unhealed"):
        u = report["quality_unhealed"]
        parts.append(f"The unhealed output on the same tokens: perplexity {u['ppl_slim']:.3f}, KL {u['kl']:.4f}, "
                     f"top-1 agreement {u['top1']:.3f}.")
    if heal:
        parts += ["## Healing",
                  f"Distilled from the source model by `slimconv heal` after slimming: {heal_summary(heal)}. "
                  "Evaluated on held-out text of two domains, so that fitting the training text's domain is not "
                  "mistaken for healing:",
                  md_table(HEAL_HEADER, heal_rows(heal)),
                  f"![loss curve]({HEAL_PLOT})"]
    if report.get("environment"):
        env = report["environment"]
        parts.append(f"Validated with slimconv {env['slimconv']}, transformers {env['transformers']}, "
                     f"torch {env['torch']}.")
    if report.get("early_exit"):
        parts.append(f"Early exit (policy `{json.dumps(report['early_exit']['policy'])}`), against the same "
                     "checkpoint with every layer run:")
        parts.append(md_table(EARLY_EXIT_HEADER, early_exit_rows(report["early_exit"])))
    if deployed:
        parts += ["## Deployed precision",
                  f"The slim model and its source, each exported alike by slimconv and run by {deployed['engine']}, "
                  f"on {deployed['samples']} x {deployed['seq_len']} held-out tokens per text. KL in nats per token from "
                  "the float source; the last column compares the slim file with the source file of the same "
                  "precision:",
                  md_table(DEPLOYED_HEADER, deployed_rows(deployed))]
    if onnx:
        parts += _onnx_section(onnx_report)
    if bench:
        parts += ["## Speed", _speed_table(bench)]
    parts += _load_section(name, plan.uniform, onnx, meta.get("format"))
    return "\n\n".join(parts) + "\n"


def write_card(out: Path):
    """(Re)writes README.md from the files slimconv keeps beside the weights."""
    write_text(out / CARD_FILE, card_text(out))
