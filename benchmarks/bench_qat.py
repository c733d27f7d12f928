"""Benchmark: does healing with the quantiser in the loop (`heal --quant q4_0`) leave a slim model that survives
q4_0 better than a float heal on the same budget? Measured on the deployed GGUF files in llama.cpp
(docs/results/quantisation.md).

Not a test: run it by hand (needs llama-cpp-python):

    python benchmarks/bench_qat.py                        # drop-blocks-20pct, --train all, 10 minutes per heal
    python benchmarks/bench_qat.py --minutes 20 --workdir /tmp/bench-qat

Converts and validates SmolLM2-135M with recipes/smollm2-drop-blocks-20pct.yaml, heals it twice with the same
settings and wall-time budget (`--train all --data wikitext2+generated --lr 3e-4`, heal's best shipped setting),
once in float and once with `--quant q4_0`, exports the unhealed and both healed outputs and the unslimmed model as
f32 and q4_0 GGUF files, and scores every file in llama.cpp as bench_quant.py does: perplexity and mean KL from the
unslimmed f32 file on WikiText-2 test and King James.
"""
import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_quant import convert, export, score, windows  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--steps", type=int, default=400, help="steps of the schedule (training stops at the budget)")
    p.add_argument("--windows", type=int, default=12)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", default=None)
    a = p.parse_args()
    import yaml

    from slimconv.cli import main as cli
    from slimconv.data import kjv, wikitext
    from slimconv.runtime import load_tokenizer

    workdir = Path(a.workdir or tempfile.mkdtemp(prefix="bench-qat-"))
    workdir.mkdir(parents=True, exist_ok=True)
    recipe = yaml.safe_load(Path("recipes/smollm2-drop-blocks-20pct.yaml").read_text())
    blocks = recipe["remove"]["blocks"]
    unslimmed = workdir / "unslimmed" if (workdir / "unslimmed").is_dir() else convert(workdir, "unslimmed", [])
    slim = workdir / "slim" if (workdir / "slim").is_dir() else convert(workdir, "slim", blocks)
    assert cli(["validate", str(slim)]) in (0, 1)
    heal = ["--train", "all", "--data", "wikitext2+generated", "--lr", "3e-4", "--steps", str(a.steps),
            "--max-minutes", str(a.minutes)]
    healed = {}
    for quant in ("none", "q4_0"):
        target = workdir / f"slim-healed-{quant}"
        if not target.is_dir():
            assert cli(["heal", str(slim), "-o", str(target), *heal, "--quant", quant]) == 0
        healed[quant] = target
    tok = load_tokenizer(unslimmed)
    texts = {"WikiText-2 test": windows(tok, wikitext("test"), a.windows, a.seq_len),
             "King James": windows(tok, kjv(), a.windows, a.seq_len)}
    models = {"unslimmed": unslimmed, "slim, unhealed": slim, "slim, float heal": healed["none"],
              "slim, heal --quant q4_0": healed["q4_0"]}
    ref, rows = {}, []
    for label, out in models.items():
        for dtype in ("f32", "q4_0"):
            path, _ = export(out, dtype, None)
            rows.append(dict(model=label, file=dtype, **score(path, texts, ref, a.threads)))
            row = rows[-1]
            print(row, flush=True)
    print(f"\n{a.minutes:g} minutes per heal; {a.windows} windows x {a.seq_len} tokens per text; KL from the unslimmed "
          "f32 file, in llama.cpp (float32 KV cache)\n")
    head = "| model | GGUF | " + " | ".join(f"{t} ppl | {t} KL" for t in texts) + " |"
    print(head + "\n" + "|---" * (head.count("|") - 1) + "|")
    for r in rows:
        cells = [f"{r[t][0]:.2f} | {r[t][1]:.3f}" for t in texts]
        print(f"| {r['model']} | {r['file']} | " + " | ".join(cells) + " |")
    float_q, qat_q = (next(r for r in rows if r["model"] == m and r["file"] == "q4_0")
                      for m in ("slim, float heal", "slim, heal --quant q4_0"))
    for t in texts:
        print(f"{t}: q4_0 KL after heal --quant q4_0 / after a float heal = {qat_q[t][1] / float_q[t][1]:.2f} "
              "(target <= 0.75)")


if __name__ == "__main__":
    main()
