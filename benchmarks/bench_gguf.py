"""Benchmark: llama.cpp decode speed of slim GGUF files against the unslimmed model (docs/results/gguf.md).

Not a test: run it by hand (needs llama-cpp-python; see docs/formats.md, "GGUF", for building it once):

    python benchmarks/bench_gguf.py                                   # SmolLM2-135M, 6 blocks removed
    python benchmarks/bench_gguf.py --recipe attention --repeats 7
    python benchmarks/bench_gguf.py --recipe-file outputs/search/recipe.yaml   # any recipe's removals and widths
    python benchmarks/bench_gguf.py --files SOURCE.gguf,SLIM.gguf      # GGUF files already written (k-quants)

Converts the default model unslimmed and slimmed, exports each with `slimconv.formats.gguf_export.write_gguf` at f32 and
q4_0, then decodes --new-tokens greedy tokens after a --prompt-len token prompt in llama.cpp, every file once per
round (interleaved), --repeats rounds, and prints the median decode tokens/s as a Markdown table beside two ideal
decode speedups (ratios of bytes read per token): the plan's, every weight at that precision's bytes, and the files'
own, from the GGUF tensors as written (under q4_0 the token embedding, which a tied model reads whole as its output
layer every token, stays q8_0, so fewer of the bytes read shrink with the layers), each plus llama.cpp's f16 KV
cache. `--files` times GGUF files already written instead (say, the k-quant files `validate --deployed` leaves),
against the first, beside the files' ideal.
"""
import argparse
import shutil
import statistics
import time
from pathlib import Path

RECIPES = {
    "blocks": dict(remove={"blocks": "20-25"}),  # 6 of 30 blocks
    "attention": dict(remove={"attention": "25-29"}),
    "mix": dict(remove={"blocks": [22, 23], "attention": "25-29", "mlp": [12]}),
}
BYTES = {"f32": 4.0, "q4_0": 18 / 32}  # q4_0: 32 weights in 16 bytes + a 2-byte scale


def build(workdir: Path, recipe: str, recipe_file: str | None = None):
    import json

    import yaml

    from slimconv.convert import prepare, write_checkpoint
    from slimconv.formats.gguf_export import write_gguf
    from slimconv.formats.nemotron import choose_format
    from slimconv.plan import source_plan
    from slimconv.recipe import parse_recipe
    from slimconv.source import Checkpoint, resolve_source

    src = resolve_source("default")
    ckpt = Checkpoint(src)
    sections = RECIPES[recipe]
    if recipe_file:  # its removals and narrowed layers (a fraction of channels is resolved as convert does)
        data = yaml.safe_load(Path(recipe_file).read_text())
        sections, recipe = {k: v for k, v in data.items() if k in ("remove", "shrink")}, Path(recipe_file).stem
    slim = prepare(parse_recipe({"model": "default", "output": {"dir": "x"}, **sections}))[2]
    files = {}
    for label, plan in (("unslimmed", source_plan(ckpt.config)), (f"slim ({recipe})", slim)):
        out = workdir / label.split()[0]
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        fmt = "stock" if plan.uniform else choose_format("auto", plan, ckpt.config)[0]
        write_checkpoint(plan, ckpt, out, "float32", "5GB", fmt)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy2(src / f, out / f)
        for dtype in BYTES:
            path = workdir / f"{out.name}-{dtype}.gguf"
            write_gguf(out, path, dtype)
            files[(label, dtype)] = path
    return ckpt.config, source_plan(ckpt.config), slim, files, json


def file_bytes_per_token(path: Path, kv_bytes: float) -> float:
    """Bytes one decoded token reads from a GGUF file: every tensor, except that the token embedding is one row when
    the file has its own output matrix (tied models read it whole as their output), plus ``kv_bytes`` of cache."""
    from gguf import GGUFReader

    tensors = {t.name: t for t in GGUFReader(path).tensors}
    total = sum(int(t.n_bytes) for t in tensors.values())
    if "output.weight" in tensors:
        embd = tensors["token_embd.weight"]
        total -= int(embd.n_bytes) - int(embd.n_bytes) // int(embd.shape[-1])
    return total + kv_bytes


def decode_rate(path: Path, prompt: list[int], new_tokens: int, threads: int) -> float:
    from slimconv.formats.kquant import open_gguf
    import numpy as np

    model = open_gguf(path, n_ctx=len(prompt) + new_tokens + 8, n_threads=threads,
                            n_batch=512, verbose=False)
    model.eval(prompt)
    nxt = int(np.argmax(model.scores[model.n_tokens - 1]))
    start = time.perf_counter()
    for _ in range(new_tokens):
        model.eval([nxt])
        nxt = int(np.argmax(model.scores[model.n_tokens - 1]))
    rate = new_tokens / (time.perf_counter() - start)
    model.close()
    return rate


def median_rates(files: dict, a) -> dict:
    """{key: median decode tokens/s} of ``files`` ({key: path}): a warm-up that pages every file in, then
    --repeats rounds, every file once per round (interleaved, so the machine's drift falls on all alike)."""
    prompt = list(range(100, 100 + a.prompt_len))
    for path in files.values():
        decode_rate(path, prompt, 4, a.threads)
    rates = {k: [] for k in files}
    for _ in range(a.repeats):
        for key, path in files.items():
            rates[key].append(decode_rate(path, prompt, a.new_tokens, a.threads))
    return {k: statistics.median(v) for k, v in rates.items()}


def time_files(paths: list[Path], a) -> None:
    """Decode rates of ``paths``, interleaved, against the first, beside the ideal from their own bytes."""
    from gguf import GGUFReader

    ctx = a.prompt_len + a.new_tokens // 2
    kv = {p: sum(2 * int(t.shape[1]) * 2 * ctx for t in GGUFReader(p).tensors if t.name.endswith("attn_k.weight"))
          for p in paths}  # k and v, f16, as llama.cpp caches them
    med = median_rates({p: p for p in paths}, a)
    first = paths[0]
    base = file_bytes_per_token(first, kv[first])
    print(f"llama.cpp decode, {a.new_tokens} greedy tokens after {a.prompt_len}, {a.threads} threads, median of "
          f"{a.repeats} interleaved rounds\n")
    print("| file | decode tok/s | vs the first | ideal (the files' bytes read) | measured / ideal |")
    print("|---|---|---|---|---|")
    for p in paths:
        ideal = base / file_bytes_per_token(p, kv[p])
        speedup = med[p] / med[first]
        print(f"| {p.name} | {med[p]:.1f} | {speedup:.3f}x | {ideal:.3f}x | {speedup / ideal:.3f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", choices=list(RECIPES), default="blocks")
    p.add_argument("--recipe-file", default=None, help="a recipe YAML instead (its remove and shrink sections)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", default="/tmp/slimconv-gguf-bench")
    p.add_argument("--files", default=None, help="comma-separated GGUF files to time instead, the first the base")
    a = p.parse_args()
    if a.files:
        return time_files([Path(f) for f in a.files.split(",")], a)
    from slimconv.plan import costs

    config, src_plan, slim_plan, files, _ = build(Path(a.workdir), a.recipe, a.recipe_file)
    med = median_rates(files, a)
    base = med[("unslimmed", "f32")]
    ctx = a.prompt_len + a.new_tokens // 2
    print(f"llama.cpp decode, SmolLM2-135M, {a.new_tokens} greedy tokens after {a.prompt_len}, {a.threads} threads, "
          f"median of {a.repeats} interleaved rounds\n")
    print("| model | GGUF | decode tok/s | vs unslimmed f32 | vs unslimmed, same precision | ideal (plan, bytes read) "
          "| ideal (the files' bytes read) | same precision / files' ideal |")
    print("|---|---|---|---|---|---|---|---|")
    for (label, dtype), rate in med.items():
        plan = slim_plan if label != "unslimmed" else src_plan
        ideal = (costs(src_plan, config, ctx, BYTES[dtype])["decode_bytes_per_token"]
                 / costs(plan, config, ctx, BYTES[dtype])["decode_bytes_per_token"])
        kv = lambda pl: costs(pl, config, ctx, 2)["kv_bytes_per_token"] * ctx  # llama.cpp's cache is f16
        files_ideal = (file_bytes_per_token(files[("unslimmed", dtype)], kv(src_plan))
                       / file_bytes_per_token(files[(label, dtype)], kv(plan)))
        same = rate / med[("unslimmed", dtype)]
        print(f"| {label} | {dtype} | {rate:.1f} | {rate / base:.2f}x | {same:.2f}x | {ideal:.2f}x | "
              f"{files_ideal:.3f}x | {same / files_ideal:.3f} |")


if __name__ == "__main__":
    main()
