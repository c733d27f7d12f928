"""Wall-clock of early exit against the same checkpoint with every layer run (PyTorch, batch 1, CPU).

    python benchmarks/bench_early_exit.py outputs/smollm2-early-exit [--new-tokens 24 --repeats 3]

- decode: greedy generation with the KV cache (a manual loop, so each step's exit layer is read), the
  prompt a WikiText-2 test window; ms per generated token, layers used, tokens equal to the full run's.
- prompts: one forward per one-token prompt task item (the paper's setting); ms per prompt.
Policies: the checkpoint's own, a fixed exit after layer 20 (isolates the exit mechanism: one check and
the KV fill, no classifier-driven variation), and checking after every layer from layer 0 (the paper's
schedule). Runs alternate between policies and repeat; medians are reported.
"""
import argparse
import statistics
import time

import torch
from transformers.cache_utils import DynamicCache

from slimconv.data import load_text, token_chunks
from slimconv.selection.early_exit import prompt_tasks
from slimconv.modeling.modeling_slim import CACHE_NAME
from slimconv.runtime import load_model


@torch.no_grad()
def decode(model, prompt: torch.Tensor, steps: int):
    cache, ids, layers = {CACHE_NAME: DynamicCache()}, prompt[None], []
    n = len(model.model.layers)
    out = model(input_ids=ids, use_cache=True, **cache)
    start = time.perf_counter()
    for _ in range(steps):
        ids = torch.cat([ids, out.logits[:, -1:].argmax(-1)], 1)
        out = model(input_ids=ids[:, -1:], use_cache=True, **cache)
        layers.append(n if out.exit_layer is None else out.exit_layer + 1)
    return (time.perf_counter() - start) / steps, ids[0, len(prompt):], sum(layers) / len(layers)


@torch.no_grad()
def prompts(model, items):
    n = len(model.model.layers)
    start, layers = time.perf_counter(), []
    for p, _ in items:
        out = model(input_ids=p[None], use_cache=False, logits_to_keep=1)
        layers.append(n if out.exit_layer is None else out.exit_layer + 1)
    return (time.perf_counter() - start) / len(items), sum(layers) / len(layers)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint")
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompts", type=int, default=5, help="items per prompt task")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from transformers import AutoTokenizer

    model = load_model(a.checkpoint)
    tok = AutoTokenizer.from_pretrained(a.checkpoint, trust_remote_code=True)
    text = load_text("wikitext2", "test")
    prompt = token_chunks(tok, text, 1, 64)[0]
    items = [x for v in prompt_tasks(tok, text, a.prompts).values() for x in v]
    own = model.config.early_exit
    policies = {"full (every layer)": None, "checkpoint policy": own,
                "fixed exit after layer 20": dict(policy="gap", threshold=0.0, min_layer=20),
                "same classifier, check every layer": dict(own, min_layer=0, every=1)}
    res = {k: dict(decode=[], prompt=[]) for k in policies}
    for _ in range(a.repeats):
        for name, policy in policies.items():
            model.config.early_exit_enabled = policy is not None
            if policy is not None:
                model.config.early_exit = policy
            ms, tokens, layers = decode(model, prompt, a.new_tokens)
            res[name]["decode"].append(ms)
            res[name].update(tokens=tokens, decode_layers=layers)
            ms, layers = prompts(model, items)
            res[name]["prompt"].append(ms)
            res[name]["prompt_layers"] = layers
    full = res["full (every layer)"]
    print(f"batch 1, {a.threads} threads, {a.new_tokens} greedy tokens after a 64-token prompt; {len(items)} prompts; "
          f"median of {a.repeats}")
    print("| policy | decode ms/token | decode speed vs full | layers/token | greedy tokens = full | "
          "prompt ms | prompt speed vs full | layers/prompt |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in res.items():
        d, q = statistics.median(r["decode"]), statistics.median(r["prompt"])
        fd, fq = statistics.median(full["decode"]), statistics.median(full["prompt"])
        same = int((r["tokens"] == full["tokens"]).sum())
        print(f"| {name} | {d * 1e3:.1f} | {fd / d:.2f}x | {r['decode_layers']:.1f} | {same}/{a.new_tokens} "
              f"| {q * 1e3:.1f} | {fq / q:.2f}x | {r['prompt_layers']:.1f} |")


if __name__ == "__main__":
    main()
