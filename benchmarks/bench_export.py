"""Benchmark: ONNX export cost, and ONNX Runtime speed of slim recipes against the unslimmed model.

This is a benchmark, not a test: run it by hand, e.g.

    python benchmarks/bench_export.py                       # SmolLM2-135M (model: default), 2 ORT threads
    python benchmarks/bench_export.py --threads 1 --repeats 5 --workdir /tmp/exportbench

1. Export time and peak RSS, each export in its own child process (VmHWM of the child):
   * slimconv: `slimconv.export.export_onnx` of the unslimmed source (a stock checkpoint, exported as a slim
     model with every layer kept), float32;
   * torch.onnx.export: the stock Hugging Face LlamaForCausalLM of the same checkpoint, float32, TorchScript
     exporter with its defaults (weights inside the graph, constant folding), no KV cache (a cache object is
     not an ONNX input), so it is a smaller graph than slimconv's.
2. ONNX Runtime on the CPU: prefill latency of a --prompt-len token prompt and decode tokens/s over
   --decode-tokens cached steps, batch 1, for the unslimmed export and each recipe's slim export, measured
   interleaved (every model once per round, --repeats rounds, medians), beside the plan's ideal speedups
   (prefill: FLOP ratio at the prompt length; decode: ratio of bytes read per token).

With --synthetic-gb N it instead builds bench_convert.py's random-weight Llama checkpoint (N GB, bfloat16),
converts it with that benchmark's recipe, exports the slim result as float32 (2N GB: external data) and
loads it in ONNX Runtime, each in a child process, and prints time and peak RSS.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ["smollm2-drop-blocks-20pct", "smollm2-drop-late-attention", "smollm2-mix", "smollm2-parallel-pairs"]


def child_main(kind: str, src: Path, out: Path) -> None:
    import torch

    torch.set_num_threads(2)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    if kind == "ort":  # load the exported folder ``out`` and run one short prefill
        from slimconv.bench import OrtRunner

        OrtRunner(out, 2, "cpu").run(1, 16, 1)
    elif kind == "slimconv":
        from slimconv.export import export_onnx

        export_onnx(src, out)
    else:
        import warnings

        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
        model.config.use_cache = False
        ids = torch.ones(1, 8, dtype=torch.long)
        axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
                "logits": {0: "batch", 1: "sequence"}}
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (ids, torch.ones_like(ids)), str(out / "model.onnx"), dynamo=False,
                              input_names=["input_ids", "attention_mask"], output_names=["logits"],
                              dynamic_axes=axes, opset_version=17)
    seconds = time.time() - start
    print(json.dumps(dict(seconds=seconds, peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)))


def run_child(kind: str, src: Path, out: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, __file__, "_child", kind, str(src), str(out)], env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{kind} export failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def import_baseline_mb() -> float:
    code = ("import resource, torch, transformers, onnx, slimconv.export; "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return float(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout)


def synthetic(size_gb: float, work: Path) -> None:
    """Export of a multi-GB slim checkpoint (bench_convert's random Llama, converted with its recipe)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_convert import build_source, layers_for, recipe_for, source_matches

    from slimconv.convert import run_convert
    from slimconv.recipe import parse_recipe
    from slimconv.report import console

    src, slim = work / "synthetic-source", work / "synthetic-slim"
    n_layers = layers_for(size_gb, 2)
    if not source_matches(src, n_layers, "bfloat16"):
        build_source(src, n_layers, "bfloat16")
    if not (slim / "config.json").is_file():
        recipe = recipe_for(src, n_layers)
        recipe["output"] = {"dir": str(slim)}
        with console.capture():
            run_convert(parse_recipe(recipe), force=True)
    gb = sum(f.stat().st_size for f in slim.glob("*.safetensors")) / 1e9
    print(f"## synthetic Llama, {n_layers} layers -> slim checkpoint of {gb:.2f} GB (bfloat16), "
          f"exported as float32 (twice the bytes)\n")
    print("| step | time (s) | peak RSS (MB) |\n|---|---|---|")
    r = run_child("slimconv", slim, work / "synthetic-onnx")
    print(f"| slimconv export | {r['seconds']:.1f} | {r['peak_mb']:.0f} |", flush=True)
    files = {f.name: f.stat().st_size / 1e9 for f in (work / "synthetic-onnx").glob("model.onnx*")}
    r = run_child("ort", slim, work / "synthetic-onnx")
    print(f"| ONNX Runtime: load + 16-token prefill | {r['seconds']:.1f} | {r['peak_mb']:.0f} |")
    print("\nfiles: " + ", ".join(f"{k} {v:.2f} GB" for k, v in files.items()))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", nargs="+", default=RECIPES, help="recipe names under recipes/")
    ap.add_argument("--workdir", type=Path, help="where to write checkpoints and ONNX folders (default: a temp dir)")
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds of the speed measurement")
    ap.add_argument("--synthetic-gb", type=float,
                    help="instead: export a random-weight Llama checkpoint of about this size (bfloat16) as float32")
    args = ap.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    work = args.workdir or Path(tempfile.mkdtemp(prefix="slimconv-bench-export-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.synthetic_gb:
        return synthetic(args.synthetic_gb, work)
    from slimconv.bench import OrtRunner, measure
    from slimconv.convert import prepare, run_convert
    from slimconv.recipe import load_recipe
    from slimconv.report import console

    recipes, ideal = {}, {}
    for name in args.recipes:
        recipe = load_recipe(ROOT / "recipes" / f"{name}.yaml")
        recipe.output.dir = str(work / name)
        recipes[name] = recipe
        ideal[name] = prepare(recipe, args.prompt_len, config_only=True)[3]["ideal_speedup"]
    src = prepare(recipes[args.recipes[0]], config_only=True)[0]

    print("## export (float32, child process each)\n")
    base = import_baseline_mb()
    weights_mb = sum(f.stat().st_size for f in src.glob("*.safetensors")) / 2**20
    print(f"source: {src} ({weights_mb:.0f} MB of weights); imports alone: {base:.0f} MB RSS\n")
    print("| exporter | time (s) | peak RSS (MB) | peak - imports - weights (MB) |\n|---|---|---|---|")
    for kind in ("slimconv", "torch.onnx.export"):
        r = run_child(kind, src, work / f"export-{kind}")
        print(f"| {kind} | {r['seconds']:.1f} | {r['peak_mb']:.0f} | {r['peak_mb'] - base - weights_mb:.0f} |",
              flush=True)

    folders = {"unslimmed": work / "export-slimconv"}
    for name, recipe in recipes.items():
        if not (work / name / "config.json").is_file():
            with console.capture():
                run_convert(recipe, force=True)
        folders[name] = work / name / "onnx"
        if not (folders[name] / "model.onnx").is_file():
            run_child("slimconv", work / name, folders[name])
    runners = {name: OrtRunner(d, args.threads, "cpu") for name, d in folders.items()}
    medians = measure(runners, 1, args.prompt_len, args.decode_tokens, args.repeats)

    print(f"\n## ONNX Runtime {__import__('onnxruntime').__version__}, CPUExecutionProvider, "
          f"{args.threads} intra-op threads, batch 1, float32; medians of {args.repeats} interleaved rounds\n")
    print(f"| model | prefill {args.prompt_len} tokens (ms) | speedup | ideal | decode (tokens/s) | speedup | ideal |")
    print("|---|---|---|---|---|---|---|")
    ref_prefill, ref_tps = medians["unslimmed"]
    for name, (p, t) in medians.items():
        i = ideal.get(name, dict(prefill=1.0, decode=1.0))
        print(f"| {name} | {p * 1000:.1f} | {ref_prefill / p:.3f}x | {i['prefill']:.3f}x | {t:.1f} | "
              f"{t / ref_tps:.3f}x | {i['decode']:.3f}x |")
    print(f"\n(cpu: {os.cpu_count()} logical cores; workdir {work})")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        sys.path.insert(0, str(ROOT))
        child_main(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]))
    else:
        main()
