"""Which MLP channels to keep: Minitron's rule (mean |activation| at the down projection's input, what slimconv uses)
against rules that also weigh what a channel writes, measured on SmolLM2 (docs/results/width.md).

    python benchmarks/channel_rules.py [--fraction 0.5] [--layers 0-29] [--eval-samples 16 --eval-seq-len 512]

Every rule scores the channels on the same calibration windows (convert's: 8 x 256 tokens of WikiText-2 valid); each
keeps the same count in the same layers; the recipes are measured with the plan applied to the source at run time,
on WikiText-2 test and on King James. Rules:

- ``activation``: mean |a_c| (Minitron);
- ``output``: mean |a_c| x ||W_down[:, c]||, the size of what the channel adds to the residual stream;
- ``random``: a seeded random choice, the floor.
"""
import argparse
import json
import random
import tempfile
from pathlib import Path

import torch
import yaml


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fraction", type=float, default=0.5)
    p.add_argument("--layers", default="0-29")
    p.add_argument("--eval-samples", type=int, default=16)
    p.add_argument("--eval-seq-len", type=int, default=512)
    a = p.parse_args()

    from slimconv import arch as A
    from slimconv.data import calibration_ids
    from slimconv.recipe import parse_indices
    from slimconv.runtime import load_model
    from slimconv.selection.analyse import verify_recipe
    from slimconv.selection.channels import score_layers
    from slimconv.selection.experts import COUNT_CALIBRATION as C
    from slimconv.selection.layerwise import LayerBank, Runner
    from slimconv.source import checked_source, resolve_source

    src = resolve_source("default")
    ckpt, _ = checked_source(src)
    config = ckpt.config
    layers = parse_indices(a.layers, "--layers", config["num_hidden_layers"])
    ids = calibration_ids(src, C["calib"], C["samples"], C["seq_len"], C["seed"])
    act = score_layers(Runner(LayerBank(ckpt), ids), config, set(layers))
    width = config["intermediate_size"]
    keep = round(a.fraction * width)
    rng = random.Random(0)
    rules = {"activation": lambda i: act[i],
             "output": lambda i: (torch.tensor(act[i]) * ckpt.get(A.LAYER.format(i=i) + "mlp.down_proj.weight")
                                  .float().norm(dim=0)).tolist(),
             "random": lambda i: [rng.random() for _ in range(width)]}
    source = load_model(src)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, rule in rules.items():
            mlp = {}
            for i in layers:
                score = rule(i)
                mlp[str(i)] = sorted(sorted(range(width), key=lambda c: -score[c])[:keep])
            path = Path(tmp) / f"{name}.yaml"
            path.write_text(yaml.safe_dump({"model": "default", "shrink": {"mlp": mlp}, "output": {"dir": tmp}}))
            rows[name] = {data: verify_recipe(path, a.eval_samples, a.eval_seq_len, data, source)
                          for data in ("wikitext2", "kjv")}
    print(f"\n{len(layers)} layers at {keep} of {width} channels\n\n| rule | WikiText-2 test ppl | KL | King James ppl | "
          "KL |\n|---|---|---|---|---|")
    for name, r in rows.items():
        w, k = r["wikitext2"], r["kjv"]
        print(f"| {name} | {w['ppl_slim']:.2f} (source {w['ppl_source']:.2f}) | {w['kl']:.4f} | {k['ppl_slim']:.2f} "
              f"(source {k['ppl_source']:.2f}) | {k['kl']:.4f} |")
    print(json.dumps({n: {d: {k: v for k, v in q.items() if isinstance(v, float)} for d, q in r.items()}
                      for n, r in rows.items()}))


if __name__ == "__main__":
    main()
