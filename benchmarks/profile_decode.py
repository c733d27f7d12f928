"""Where an ONNX Runtime decode step spends its time, by op type, source against slim exports.

A benchmark, not a test: run it by hand on folders written by `slimconv export` (and `slimconv bench`,
which caches the source's export under $SLIMCONV_CACHE/onnx-float32-*), e.g.

    python benchmarks/profile_decode.py SOURCE_ONNX_DIR SLIM_ONNX_DIR [SLIM_ONNX_DIR ...] --threads 2

ONNX Runtime's profiler records every node's kernel time; the prefill run is left out, so the numbers are
ms per decode step at batch 1, summed per op type, and "(whole step)" is the session's run time per step
(kernels plus the framework's per-node and per-run overhead).
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from slimconv.bench import OrtRunner  # noqa: E402


def profile_decode(onnx_dir: Path, threads: int, prompt_len: int, new_tokens: int, workdir: Path) -> dict:
    """ms per decode step by op type at batch 1; the profile covers one prefill (skipped) and
    ``new_tokens`` decode steps."""
    runner = OrtRunner(onnx_dir, threads, "cpu", profile_prefix=str(workdir / onnx_dir.parent.name))
    runner.run(1, prompt_len, new_tokens)
    trace = json.loads(Path(runner.decoder.session.end_profiling()).read_text())
    runs = [e for e in trace if e.get("name") == "model_run"]
    decode_start = runs[1]["ts"]  # the first run is the prefill
    per_op: dict[str, float] = {}
    nodes = 0
    for e in trace:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= decode_start:
            op = e["args"]["op_name"]
            per_op[op] = per_op.get(op, 0.0) + e["dur"] / 1000 / new_tokens
            nodes += 1
    per_op["(kernels, all ops)"] = sum(per_op.values())
    per_op["(whole step)"] = sum(e["dur"] for e in runs[1:]) / 1000 / new_tokens
    per_op["(nodes run per step)"] = nodes / new_tokens
    return per_op


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("onnx_dirs", nargs="+", type=Path, help="the source's ONNX folder first, then slim ones")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="slimconv-profile-"))
    profiles = [profile_decode(d, args.threads, args.prompt_len, args.new_tokens, work) for d in args.onnx_dirs]
    ops = sorted(set().union(*profiles), key=lambda k: -profiles[0].get(k, 0.0))
    names = [d.parent.name for d in args.onnx_dirs]
    print(f"ms per decode step (batch 1, context {args.prompt_len}+, {args.threads} threads)\n")
    print("| op type | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    for op in ops:
        print(f"| {op} | " + " | ".join(f"{p.get(op, 0.0):.3f}" for p in profiles) + " |")


if __name__ == "__main__":
    main()
