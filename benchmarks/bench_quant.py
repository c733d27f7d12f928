"""Benchmark: quality of the GGUF precisions users deploy, unslimmed and slim, measured by llama.cpp itself
(docs/results/quantisation.md).

Not a test: run it by hand (needs llama-cpp-python; see docs/formats.md, "GGUF"):

    python benchmarks/bench_quant.py                      # SmolLM2-135M, blocks 3, 5, 7, 14, 17, 25 removed
    python benchmarks/bench_quant.py --windows 12 --seq-len 256

Converts the default model unslimmed and slimmed (stock outputs), exports each as f32, q4_0, q4_k_m without and
with the importance matrix (`--imatrix auto`: WikiText-2 *valid*, 64 x 512 tokens), q5_k_m and q6_k (with it) through
`slimconv export`, then runs every file in llama.cpp (float32 KV cache) on --windows windows of --seq-len tokens of
WikiText-2 *test* and of the King James Genesis/Exodus (text the calibration never saw), and prints perplexity and
the mean KL divergence from the unslimmed f32 file's next-token distribution as a Markdown table.
"""
import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

SLIM_BLOCKS = [3, 5, 7, 14, 17, 25]  # issue 31's model: 6 of 30 blocks, ideal decode 1.19x
EXPORTS = [("f32", None), ("q4_0", None), ("q4_k_m", "none"), ("q4_k_m", "auto"), ("q5_k_m", "auto"),
           ("q6_k", "auto")]


def convert(workdir: Path, name: str, blocks: list[int]) -> Path:
    import yaml

    from slimconv.cli import main

    recipe = workdir / f"{name}.yaml"
    recipe.write_text(yaml.safe_dump({"model": "default", "remove": {"blocks": blocks},
                                      "output": {"dir": str(workdir / name), "dtype": "float32"}}))
    assert main(["convert", str(recipe)]) == 0
    return workdir / name


def export(out: Path, dtype: str, imatrix: str | None) -> tuple[Path, float]:
    from slimconv.cli import main

    path = out / "gguf" / f"{out.name}-{dtype}.gguf"
    args = ["export", str(out), "--format", "gguf", "--dtype", dtype, "--force"]
    if imatrix:
        args += ["--imatrix", imatrix]
    start = time.perf_counter()
    assert main(args) == 0
    seconds = time.perf_counter() - start
    final = path.with_name(f"{path.stem}-{imatrix or 'plain'}.gguf")
    shutil.move(path, final)
    return final, seconds


def windows(tokenizer, text: str, n: int, seq_len: int) -> list[list[int]]:
    ids = tokenizer(text)["input_ids"]
    return [ids[k * seq_len:(k + 1) * seq_len] for k in range(n)]


def logits(path: Path, wins: list[list[int]], threads: int) -> list[np.ndarray]:
    import llama_cpp

    from slimconv.formats.kquant import open_gguf

    model = open_gguf(path, n_ctx=len(wins[0]) + 8, n_batch=512, logits_all=True, verbose=False, n_threads=threads,
                      type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    out = []
    for w in wins:
        model.reset()
        model.eval(w)
        out.append(np.array(model.scores[: len(w)], dtype=np.float64))
    model.close()
    return out


def log_softmax(x: np.ndarray) -> np.ndarray:
    return x - np.logaddexp.reduce(x, -1, keepdims=True)


def scores(got: list[np.ndarray], ref: list[np.ndarray], wins: list[list[int]]) -> tuple[float, float]:
    """(perplexity of the next tokens, mean KL(ref || got) over positions)."""
    nll, kl, n = 0.0, 0.0, 0
    for g, r, w in zip(got, ref, wins):
        lg, lr = log_softmax(g[:-1]), log_softmax(r[:-1])
        nll -= lg[np.arange(len(w) - 1), w[1:]].sum()
        kl += (np.exp(lr) * (lr - lg)).sum()
        n += len(w) - 1
    return float(np.exp(nll / n)), kl / n


def score(path: Path, texts: dict, ref: dict, threads: int) -> dict:
    """Perplexity and KL of ``path`` on every text; the first file scored is the reference ``ref`` of the rest."""
    out = {}
    for text, wins in texts.items():
        got = logits(path, wins, threads)
        ref.setdefault(text, got)
        out[text] = scores(got, ref[text], wins)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--windows", type=int, default=12)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", default=None, help="keep the outputs here (default: a temporary folder)")
    a = p.parse_args()
    from slimconv.data import kjv, wikitext
    from slimconv.runtime import load_tokenizer

    workdir = Path(a.workdir or tempfile.mkdtemp(prefix="bench-quant-"))
    workdir.mkdir(parents=True, exist_ok=True)
    models = {"unslimmed": convert(workdir, "unslimmed", []), "6 blocks removed": convert(workdir, "slim", SLIM_BLOCKS)}
    tok = load_tokenizer(models["unslimmed"])
    texts = {"WikiText-2 test": windows(tok, wikitext("test"), a.windows, a.seq_len),
             "King James": windows(tok, kjv(), a.windows, a.seq_len)}
    rows, ref = [], {}
    for label, out in models.items():
        for dtype, imatrix in EXPORTS:
            path, seconds = export(out, dtype, imatrix)
            row = dict(model=label, file=dtype + {"auto": " + imatrix", "none": " (no imatrix)"}.get(imatrix, ""),
                       mb=path.stat().st_size / 1e6, seconds=seconds, **score(path, texts, ref, a.threads))
            rows.append(row)
            print(row, flush=True)
    print(f"\n{a.windows} windows x {a.seq_len} tokens per text; KL from the unslimmed f32 file, in llama.cpp "
          "(float32 KV cache)\n")
    head = "| model | GGUF | MB | export s | " + " | ".join(f"{t} ppl | {t} KL" for t in texts) + " |"
    print(head + "\n" + "|---" * (head.count("|") - 1) + "|")
    for r in rows:
        base = next(x for x in rows if x["model"] == r["model"] and x["file"] == "f32")
        cells = []
        for t in texts:
            ppl, kl = r[t]
            rise = "" if r["file"] == "f32" else f" ({ppl / base[t][0] - 1:+.0%})"
            cells += [f"{ppl:.2f}{rise}", f"{kl:.3f}"]
        print(f"| {r['model']} | {r['file']} | {r['mb']:.0f} | {r['seconds']:.0f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
