from pathlib import Path

import torch

from slimconv.convert import write_checkpoint
from slimconv.plan import build_plan
from slimconv.recipe import parse_recipe
from slimconv.reference import apply_plan, greedy_no_cache
from slimconv.source import Checkpoint
from slimconv.validate import load_model


def convert(src: Path, out: Path, dtype="source", shard="5GB", **recipe):
    ckpt = Checkpoint(src)
    plan = build_plan(parse_recipe({"model": str(src), "output": {"dir": str(out)}, **recipe}), ckpt.config)
    out.mkdir(parents=True)
    write_checkpoint(plan, ckpt, out, dtype, shard)
    return plan


@torch.no_grad()
def compare(src: Path, out: Path, plan, ids: torch.Tensor, greedy: int = 16):
    """Max |logit| difference of slim vs the run-time reference, and whether greedy tokens agree.

    The slim side generates with its KV cache; the reference recomputes the full sequence every step.
    """
    slim, ref = load_model(out), apply_plan(load_model(src), plan)
    err = (slim(input_ids=ids, use_cache=False).logits - ref(input_ids=ids).logits).abs().max().item()
    got = slim.generate(ids[:1], attention_mask=torch.ones_like(ids[:1]), max_new_tokens=greedy,
                        min_new_tokens=greedy, do_sample=False, pad_token_id=0)
    want = greedy_no_cache(ref, ids[:1], greedy)
    return err, torch.equal(got, want)
