"""The early-exit table (docs/results/early-exit.md): several knob settings of one early-exit checkpoint, on WikiText-2 test
(simulated per-token exit, and real cached decoding) and on the one-token prompt tasks (real exits).

    python benchmarks/early_exit_table.py outputs/smollm2-early-exit [--samples 4 --seq-len 512]

Each setting replaces the checkpoint's policy in memory (threshold, min_layer, every; the classifier's
weights stay); "full" is the same checkpoint with every layer run.
"""
import argparse
import json
import time
from pathlib import Path

import torch

from slimconv.data import load_text, token_chunks
from slimconv.selection.early_exit import layer_flops, model_records, prompt_tasks, run_prompt_tasks, simulate, teacher_forced
from slimconv.runtime import load_model


def settings(base: dict) -> list[dict]:
    linear = {k: base[k] for k in ("features", "weights", "bias")}
    out = [dict(policy="linear", threshold=t, min_layer=20, every=4, **linear) for t in (0.3, 0.5, 0.7)]
    out += [dict(policy="linear", threshold=0.6, min_layer=0, every=1, **linear)]
    out += [dict(policy="gap", threshold=0.8, min_layer=20, every=4)]
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint")
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--prompts", type=int, default=10, help="items per prompt task")
    p.add_argument("--records", help="file caching the per-layer records between runs")
    p.add_argument("--out", default=None, help="JSON file for the results")
    a = p.parse_args()
    torch.set_num_threads(2)
    from transformers import AutoTokenizer

    model = load_model(a.checkpoint)
    tok = AutoTokenizer.from_pretrained(a.checkpoint, trust_remote_code=True)
    text = load_text("wikitext2", "test")
    chunks = token_chunks(tok, text, a.samples, a.seq_len)
    flops = layer_flops(model.model.layers, model.lm_head.weight)
    t = time.time()
    if a.records and Path(a.records).is_file():
        records = torch.load(a.records)
    else:
        records = model_records(model, chunks)
        if a.records:
            torch.save(records, a.records)
    print(f"records: {chunks.numel()} tokens x {len(model.model.layers)} layers in {time.time() - t:.0f} s", flush=True)
    tasks = prompt_tasks(tok, text, a.prompts)
    rows = []
    for policy in settings(model.config.early_exit):
        model.config.early_exit = policy
        t = time.time()
        row = dict(policy=policy, simulated=simulate(records, policy, flops),
                   decode=teacher_forced(model, chunks[:1, : a.decode_tokens + 1], flops),
                   prompts=run_prompt_tasks(model, tasks, flops))
        rows.append(row)
        s, d, pt = row["simulated"], row["decode"], row["prompts"]
        print(f"| {policy['policy']} | {policy['threshold']} | {policy['min_layer']} | {policy['every']} "
              f"| {s['avg_layers']:.2f} | {s['layers_saved']:.1%} | {s['compute_saved']:.1%} | {s['top1_agreement']:.3f} "
              f"| {s['ppl_exit']:.1f} ({s['ppl_full']:.1f}) "
              f"| {d['avg_layers']:.2f} | {d['top1_agreement']:.3f} | {d['ppl_exit']:.1f} ({d['ppl_full']:.1f}) "
              + " ".join(f"| {v['avg_layers']:.2f} | {v['layers_saved']:.1%} | {v['compute_saved']:.1%} "
                         f"| {v['top1_agreement']:.3f} | {v['accuracy_exit']:.3f} ({v['accuracy_full']:.3f})"
                         for v in pt.values()) + f" |  [{time.time() - t:.0f} s]", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(samples=a.samples, seq_len=a.seq_len, rows=rows, prompt_counts={k: len(v) for k, v in tasks.items()}),
                      f, indent=2)


if __name__ == "__main__":
    main()
