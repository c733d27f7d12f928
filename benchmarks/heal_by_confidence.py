"""Where on a text does healing win back the source's behaviour: the KL to the source of an unhealed and a
healed model, split by how sure the source was of each next token.

    python benchmarks/heal_by_confidence.py UNHEALED HEALED [--model default] [--texts wikitext2,kjv]
        [--samples 16 --seq-len 512]

For every token of the first SAMPLES x SEQ_LEN of each text (WikiText-2 test, King James), the source's
probability of the true next token puts it in a bucket (>= 0.9: text the source nearly recites; 0.5-0.9;
below 0.5); each bucket's share of the tokens and its share of the mean KL(source || model) are printed for
both models, with the drop. Healing that restored only general behaviour and not recited text would show a
small drop in the first bucket and a large one in the last.
"""
import argparse

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from slimconv.data import load_text, token_chunks
from slimconv.runtime import load_tokenizer
from slimconv.source import resolve_source

BUCKETS = ((0.9, 1.0), (0.5, 0.9), (0.0, 0.5))


@torch.no_grad()
def log_probs(model, ids: torch.Tensor, batch: int = 4) -> torch.Tensor:
    return torch.cat([F.log_softmax(model(input_ids=ids[i:i + batch]).logits[:, :-1].float(), -1)
                      for i in range(0, len(ids), batch)])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("unhealed")
    p.add_argument("healed")
    p.add_argument("--model", default="default")
    p.add_argument("--texts", default="wikitext2,kjv")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    args = p.parse_args()
    src = resolve_source(args.model)
    tokenizer = load_tokenizer(src)
    models = {k: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
              for k, d in (("source", src), ("unhealed", args.unhealed), ("healed", args.healed))}
    print("| text | source p(next token) | tokens | KL unhealed | KL healed | drop |\n|---|---|---|---|---|---|")
    for text in args.texts.split(","):
        ids = token_chunks(tokenizer, load_text(text, "test"), args.samples, args.seq_len)
        lp = {k: log_probs(m, ids) for k, m in models.items()}
        sure = lp["source"].gather(-1, ids[:, 1:, None])[..., 0].exp()
        kl = {k: (lp["source"].exp() * (lp["source"] - lp[k])).sum(-1) for k in ("unhealed", "healed")}
        rows = [(f"[{lo}, {hi}{']' if hi == 1.0 else ')'}", (sure >= lo) & ((sure < hi) | (hi == 1.0)))
                for lo, hi in BUCKETS] + [("all", torch.ones_like(sure, dtype=torch.bool))]
        for label, sel in rows:
            # Each bucket's part of the mean over all tokens, so the parts add up to the total.
            ku, kh = (kl[k][sel].sum().item() / sure.numel() for k in ("unhealed", "healed"))
            print(f"| {text} | {label} | {sel.float().mean().item():.1%} | {ku:.3f} | {kh:.3f} | {1 - kh / ku:.0%} |")


if __name__ == "__main__":
    main()
