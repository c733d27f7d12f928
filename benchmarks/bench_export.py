"""Benchmark: slimconv's ONNX graphs against onnxruntime-genai's model builder, side by side in one run.

This is a benchmark, not a test: run it by hand, e.g.

    python benchmarks/bench_export.py                        # SmolLM2-135M, fp32 and int4, 3 rounds
    python benchmarks/bench_export.py --dtypes int4 --rounds 5 --workdir /tmp/exportbench
    python benchmarks/bench_export.py --synthetic-gb 2.2     # export time and peak RSS of a 2.2 GB checkpoint

For each precision (fp32, int4 on CPU):
1. Export, each in its own child process (time, peak RSS): the builder
   (`python -m onnxruntime_genai.models.builder -p fp32|int4 -e cpu`) and slimconv (`export_onnx`) of the
   unslimmed source, then slimconv of each recipe's slim checkpoint. Node counts of every graph.
2. Decode: onnxruntime-genai generating --new-tokens greedy tokens after a --prompt-len token prompt
   (held-out WikiText-2 text), every graph once per round, --rounds interleaved rounds, medians; speedups
   against the builder's graph of the same precision and against slimconv's own unslimmed graph, beside
   the plan's ideal decode speedup (bytes read per token).
3. Prefill: slimconv's ONNX Runtime driver at each --prefill-lens and --batches, slim against
   slimconv's unslimmed graph (interleaved medians), beside the plan's ideal (FLOP ratio).
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ["smollm2-drop-blocks-20pct", "smollm2-drop-late-attention", "smollm2-parallel-pairs"]
PRECISION = {"fp32": "float32", "int4": "int4"}


def peak_mb() -> float:
    """This process's peak RSS (VmHWM): ru_maxrss would carry over the forking parent's peak across exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_main(kind: str, dtype: str, src: Path, out: Path) -> None:
    import torch

    torch.set_num_threads(2)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    if kind == "slimconv":
        from slimconv.formats.onnx_export import export_onnx

        export_onnx(src, out, PRECISION[dtype])
    elif kind == "builder":  # its command line, as a user runs it, in this process
        import runpy

        sys.argv = ["builder", "-i", str(src), "-o", str(out), "-p", dtype, "-e", "cpu", "-c", str(out / "cache")]
        runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__")
    else:  # "ort": load the folder and run one short prefill
        from slimconv.runtime import Decoder

        import numpy as np

        Decoder(out, "cpu", 2)(np.ones((1, 16), np.int64))
    print(json.dumps(dict(seconds=time.time() - start, peak_mb=peak_mb())))


def run_child(kind: str, dtype: str, src: Path, out: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, __file__, "_child", kind, dtype, str(src), str(out)], env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{kind} {dtype} export failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def nodes(folder: Path) -> int:
    import onnx

    return len(onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node)


def hf_source(src: Path, work: Path) -> Path:
    """The source as the builder reads it: its config names the architecture (the GGUF-converted copy
    of the default model lacks ``architectures``)."""
    folder = work / "hf-source"
    folder.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name != "config.json" and not (folder / f.name).exists():
            (folder / f.name).symlink_to(f)
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = cfg.get("architectures") or ["LlamaForCausalLM"]
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return folder


def genai_decode(folder: Path, prompt: list[int], new_tokens: int):
    """(seconds to the first token, decode tokens/s after it) of one greedy generation in onnxruntime-genai."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new_tokens, min_length=len(prompt) + new_tokens,
                              do_sample=False)

    def run():
        gen = og.Generator(model, params)
        start = time.perf_counter()
        gen.append_tokens(prompt)
        gen.generate_next_token()
        first = time.perf_counter()
        steps = 0
        while not gen.is_done():
            gen.generate_next_token()
            steps += 1
        return first - start, steps / (time.perf_counter() - first)

    return run


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
    from slimconv.source import Checkpoint

    ckpt = Checkpoint(slim)
    largest = max(ckpt.shapes[n][0] * ckpt.shapes[n][-1] for n in ckpt.shapes if len(ckpt.shapes[n]) == 2) * 4
    gb = sum(f.stat().st_size for f in slim.glob("*.safetensors")) / 1e9
    print(f"## synthetic Llama, {n_layers} layers -> slim checkpoint of {gb:.2f} GB (bfloat16); largest tensor "
          f"{largest / 2**20:.0f} MiB in float32\n")
    print("| step | time (s) | peak RSS (MB) |\n|---|---|---|")
    for dtype in ("fp32", "int4"):
        r = run_child("slimconv", dtype, slim, work / f"synthetic-onnx-{dtype}")
        print(f"| slimconv export {dtype} | {r['seconds']:.1f} | {r['peak_mb']:.0f} |", flush=True)
    files = {f.name: f.stat().st_size / 1e9 for f in (work / "synthetic-onnx-fp32").glob("model.onnx*")}
    r = run_child("ort", "fp32", slim, work / "synthetic-onnx-fp32")
    print(f"| ONNX Runtime: load + 16-token prefill (fp32) | {r['seconds']:.1f} | {r['peak_mb']:.0f} |")
    print("\nfp32 files: " + ", ".join(f"{k} {v:.2f} GB" for k, v in files.items()))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", nargs="+", default=RECIPES, help="recipe names under recipes/")
    ap.add_argument("--dtypes", default="fp32,int4", help="comma-separated: fp32, int4")
    ap.add_argument("--workdir", type=Path, help="checkpoints and ONNX folders (default: a temp dir; reused)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of each speed measurement")
    ap.add_argument("--prefill-lens", default="128,512")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--synthetic-gb", type=float,
                    help="instead: export a random-weight Llama checkpoint of about this size (bfloat16)")
    args = ap.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    work = args.workdir or Path(tempfile.mkdtemp(prefix="slimconv-bench-export-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.synthetic_gb:
        return synthetic(args.synthetic_gb, work)

    import numpy as np
    import onnxruntime
    import onnxruntime_genai

    from slimconv.bench import ideal_speedups
    from slimconv.convert import prepare, run_convert
    from slimconv.data import load_text, token_chunks
    from slimconv.recipe import load_recipe
    from slimconv.report import console
    from slimconv.runtime import Decoder

    recipes, plans = {}, {}
    for name in args.recipes:
        recipe = load_recipe(ROOT / "recipes" / f"{name}.yaml")
        recipe.output.dir = str(work / name)
        recipes[name] = recipe
        src, config, plans[name], _ = prepare(recipe, config_only=True)
        if not (work / name / "config.json").is_file():
            with console.capture():
                run_convert(recipe, force=True)
    builder_src = hf_source(src, work)
    from transformers import AutoTokenizer

    prompt = token_chunks(AutoTokenizer.from_pretrained(str(src)), load_text("wikitext2", "test"), 1,
                          args.prompt_len)[0].tolist()
    print(f"SmolLM2 source {src}; onnxruntime {onnxruntime.__version__}, onnxruntime-genai "
          f"{onnxruntime_genai.__version__}, CPU ({os.cpu_count()} cores); workdir {work}\n")
    results = {}
    dtypes = args.dtypes.split(",")
    folders, exports = {}, {}
    for dtype in dtypes:
        for label, kind, source in [("builder, unslimmed", "builder", builder_src),
                                    ("slimconv, unslimmed", "slimconv", src)] + \
                                   [(f"slimconv, {n}", "slimconv", work / n) for n in args.recipes]:
            key = (dtype, label)
            folders[key] = work / f"onnx-{dtype}-{label.replace(', ', '-')}"
            if not (folders[key] / "model.onnx").is_file():
                exports[key] = run_child(kind, dtype, source, folders[key])
    # Every graph of every precision once per round, so that all ratios (int4 slim against fp32 builder
    # too) are measured under the same machine load.
    decode = {key: genai_decode(folder, prompt, args.new_tokens) for key, folder in folders.items()}
    times = {key: [] for key in folders}
    for run in decode.values():  # warm-up
        run()
    for _ in range(args.rounds):
        for key, run in decode.items():
            times[key].append(run()[1])
    tps = {key: statistics.median(t) for key, t in times.items()}
    reference = tps[(dtypes[0], "builder, unslimmed")]
    print(f"## export, and onnxruntime-genai decode ({args.new_tokens} greedy tokens after {args.prompt_len}; "
          f"medians of {args.rounds} rounds, every graph once per round)\n")
    print(f"| graph | nodes | export s | export peak MB | decode tok/s | vs builder (same precision) | "
          f"vs builder {dtypes[0]} | vs slimconv unslimmed | ideal |\n|---|---|---|---|---|---|---|---|---|")
    rows = []
    for (dtype, label), folder in folders.items():
        name = label.split(", ", 1)[1]
        ideal = ideal_speedups(plans[name], config, args.prompt_len, args.new_tokens, 1)["decode"] \
            if name in plans else 1.0
        e = exports.get((dtype, label), {})
        t = tps[(dtype, label)]
        row = dict(precision=dtype, graph=label, nodes=nodes(folder), export_s=e.get("seconds"),
                   export_peak_mb=e.get("peak_mb"), decode_tps=t, vs_builder=t / tps[(dtype, "builder, unslimmed")],
                   vs_reference=t / reference, vs_unslimmed=t / tps[(dtype, "slimconv, unslimmed")], ideal=ideal)
        rows.append(row)
        fmt = lambda v, f: "-" if v is None else format(v, f)
        print(f"| {dtype} {label} | {row['nodes']} | {fmt(row['export_s'], '.1f')} | "
              f"{fmt(row['export_peak_mb'], '.0f')} | {t:.1f} | {row['vs_builder']:.2f}x | {row['vs_reference']:.2f}x "
              f"| {row['vs_unslimmed']:.2f}x | {ideal:.2f}x |", flush=True)
    results["decode"] = rows

    for dtype in dtypes:
        lens = [int(x) for x in args.prefill_lens.split(",")]
        batches = [int(x) for x in args.batches.split(",")]
        ours = {label: Decoder(folder, "cpu", 2) for (d, label), folder in folders.items()
                if d == dtype and label.startswith("slimconv")}
        print(f"\n## {dtype}: prefill with slimconv's ONNX Runtime driver (ms, medians of {args.rounds} interleaved "
              f"rounds); speedup against slimconv unslimmed / ideal\n")
        header = "| graph | " + " | ".join(f"b{b} x {n}" for b in batches for n in lens) + " |"
        print(header + "\n" + "|---" * (1 + len(batches) * len(lens)) + "|")
        prefill = {label: {} for label in ours}
        vocab = config["vocab_size"]
        for b in batches:
            for n in lens:
                ids = (np.arange(b * n, dtype=np.int64).reshape(b, n) * 7 + 3) % vocab
                samples = {label: [] for label in ours}
                for _ in range(args.rounds + 1):
                    for label, dec in ours.items():
                        dec.reset(b)
                        start = time.perf_counter()
                        dec(ids)
                        samples[label].append(time.perf_counter() - start)
                for label in ours:
                    prefill[label][(b, n)] = statistics.median(samples[label][1:])
        for label in ours:
            name = label.split(", ", 1)[1]
            cells = []
            for b in batches:
                for n in lens:
                    ms = prefill[label][(b, n)] * 1000
                    speed = prefill["slimconv, unslimmed"][(b, n)] / prefill[label][(b, n)]
                    ideal = ideal_speedups(plans[name], config, n, 1, b)["prefill"] if name in plans else 1.0
                    cells.append(f"{ms:.0f} ({speed:.2f}x / {ideal:.2f}x)")
            print(f"| {label} | " + " | ".join(cells) + " |")
        results[f"prefill_ms {dtype}"] = {label: {f"b{b}x{n}": v * 1000 for (b, n), v in d.items()}
                                        for label, d in prefill.items()}
        print()
    (work / "bench_export.json").write_text(json.dumps(results, indent=1))
    print(f"rows: {work / 'bench_export.json'}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        sys.path.insert(0, str(ROOT))
        child_main(sys.argv[2], sys.argv[3], Path(sys.argv[4]), Path(sys.argv[5]))
    else:
        main()
