"""Benchmark: ONNX int4 rounding algorithms side by side (docs/results/quantisation.md, "ONNX int4: GPTQ").

Not a test: run it by hand, e.g.

    python benchmarks/bench_int4.py                                  # rtn and gptq on drop-blocks-20pct
    python benchmarks/bench_int4.py --algorithms rtn,gptq,k_quant --windows 16 --rounds 5

1. Exports the slim checkpoint (default outputs/smollm2-drop-blocks-20pct, converted from its recipe if missing)
   as int4 with each --algorithms through the CLI (`slimconv export OUT -o DIR --dtype int4 --int4-algorithm A
   --provider cpu --force`), so every graph passes the export's own check; records its time and that check's
   "what int4 costs against the float model" figures (three short prompts).
2. Quality: every graph's prefill logits on --windows windows of --seq-len tokens of WikiText-2 *test* (gptq
   calibrates on the valid split) against the float PyTorch model's: mean KL(float || int4) over every position,
   top-1 agreement, and perplexity of each.
3. Decode speed: slimconv's ONNX Runtime loop (bench.OrtRunner, --threads), --new-tokens greedy steps after a
   --prompt-len prompt, one warm-up each, then --rounds rounds running every graph once per round (interleaved, so
   load drift hits all alike); medians.

Prints a Markdown table and writes the numbers as JSON to WORKDIR/bench_int4.json.
"""
import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def slim_checkpoint(path: Path) -> Path:
    from slimconv.cli import main

    if not (path / "config.json").is_file():
        assert main(["convert", str(ROOT / "recipes" / "smollm2-drop-blocks-20pct.yaml")]) == 0
    return path


def export(slim: Path, out: Path, algorithm: str) -> dict:
    from slimconv.cli import main

    start = time.perf_counter()
    code = main(["export", str(slim), "-o", str(out), "--dtype", "int4", "--int4-algorithm", algorithm,
                 "--provider", "cpu", "--force"])
    seconds = time.perf_counter() - start
    report = json.loads((out / "slimconv_onnx_report.json").read_text())
    assert code == 0, report
    cases = {label: c["against_float_model"] for label, c in report["cases"].items()}
    return dict(seconds=seconds, check=cases, weight_bytes=report["export"]["weight_bytes"],
                gptq_seconds=report["export"].get("gptq_seconds"))


def quality(slim: Path, graphs: dict[str, Path], windows: int, seq_len: int) -> dict:
    """Per graph: mean KL(float || graph), top-1 agreement with the float model, perplexity; and the float's."""
    import torch

    from slimconv.data import load_text, token_chunks
    from slimconv.runtime import Decoder, load_model, load_tokenizer

    ids = token_chunks(load_tokenizer(slim), load_text("wikitext2", "test"), windows, seq_len)
    model = load_model(slim)
    decoders = {name: Decoder(path, "cpu") for name, path in graphs.items()}
    sums = {name: dict(kl=0.0, top1=0, nll=0.0) for name in graphs}
    float_nll, positions = 0.0, 0
    with torch.no_grad():
        for row in ids:
            want = model(input_ids=row[None]).logits[0].float().log_softmax(-1)
            target = row[1:]
            float_nll -= float(want[:-1].gather(-1, target[:, None]).sum())
            positions += len(row)
            for name, dec in decoders.items():
                dec.reset(1)
                got = torch.from_numpy(np.asarray(dec(row[None].numpy()), np.float32))[0].log_softmax(-1)
                s = sums[name]
                s["kl"] += float((want.exp() * (want - got)).sum())
                s["top1"] += int((got.argmax(-1) == want.argmax(-1)).sum())
                s["nll"] -= float(got[:-1].gather(-1, target[:, None]).sum())
    predicted = len(ids) * (seq_len - 1)
    out = {name: dict(kl=s["kl"] / positions, top1=s["top1"] / positions, ppl=float(np.exp(s["nll"] / predicted)))
           for name, s in sums.items()}
    out["float"] = dict(kl=0.0, top1=1.0, ppl=float(np.exp(float_nll / predicted)))
    out["tokens"] = dict(windows=len(ids), seq_len=seq_len)
    return out


def decode_speed(graphs: dict[str, Path], threads: int, prompt_len: int, new_tokens: int, rounds: int) -> dict:
    from slimconv.bench import OrtRunner

    runners = {name: OrtRunner(path, threads, "cpu") for name, path in graphs.items()}
    for r in runners.values():
        r.run(1, prompt_len, 4)
    speeds = {name: [] for name in runners}
    for _ in range(rounds):
        for name, r in runners.items():
            speeds[name].append(r.run(1, prompt_len, new_tokens)[1])
    return {name: dict(median=statistics.median(v), runs=v) for name, v in speeds.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slim", type=Path, default=ROOT / "outputs" / "smollm2-drop-blocks-20pct")
    ap.add_argument("--algorithms", default="rtn,gptq")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--workdir", type=Path, default=None)
    a = ap.parse_args(argv)

    import torch

    torch.set_num_threads(a.threads)
    work = a.workdir or Path(tempfile.mkdtemp(prefix="bench-int4-"))
    work.mkdir(parents=True, exist_ok=True)
    slim = slim_checkpoint(a.slim)
    algorithms = a.algorithms.split(",")
    graphs = {alg: work / alg for alg in algorithms}
    exports = {alg: export(slim, graphs[alg], alg) for alg in algorithms}
    scores = quality(slim, graphs, a.windows, a.seq_len)
    speed = decode_speed(graphs, a.threads, a.prompt_len, a.new_tokens, a.rounds)
    result = dict(slim=str(slim), settings=vars(a) | {"slim": str(a.slim), "workdir": str(work)}, exports=exports,
                  quality=scores, decode=speed)
    (work / "bench_int4.json").write_text(json.dumps(result, indent=2, default=str))

    base = algorithms[0]
    t = scores["tokens"]
    print(f"\nWikiText-2 test, {t['windows']} x {t['seq_len']} tokens; decode {a.new_tokens} tokens after {a.prompt_len}, "
          f"{a.threads} threads, median of {a.rounds} interleaved rounds; float ppl {scores['float']['ppl']:.2f}\n")
    print(f"| --int4-algorithm | KL to float | KL / {base} | top-1 | ppl | export check KL (batch 1 / batch 3) "
          f"| decode tok/s | speed / {base} | MB | export s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for alg in algorithms:
        q, e, s = scores[alg], exports[alg], speed[alg]
        check = " / ".join(f"{c['kl']:.3f}" for c in e["check"].values())
        print(f"| {alg} | {q['kl']:.4f} | {q['kl'] / scores[base]['kl']:.2f}x | {q['top1']:.1%} | {q['ppl']:.2f} | "
              f"{check} | {s['median']:.1f} | {s['median'] / speed[base]['median']:.3f}x | "
              f"{e['weight_bytes'] / 1e6:.0f} | {e['seconds']:.0f} |")
    print(f"\nJSON: {work / 'bench_int4.json'}")


if __name__ == "__main__":
    main()
