"""Checks slim outputs under whatever transformers is installed, importing nothing of slimconv.

Run by ``tests/test_compat.py`` in the project's environment and by ``benchmarks/compat_matrix.py`` in
throwaway environments that hold only torch, transformers and safetensors: there the bundled modeling
code must work exactly as it would on a user's machine.

    python tests/compat_check.py FIXTURES_DIR        # prints one JSON line per output, exit 1 on a failure

Each output folder in FIXTURES_DIR carries ``compat_expect.safetensors`` (written by
``compat_fixtures.build``): a prompt, the greedy tokens of slimconv's independent reference (the source
model with the plan applied at run time, no KV cache) and its logits over prompt + greedy tokens.
Checked per output, on logits as well as tokens (a tiny random model often repeats one token whatever
its context, so tokens alone would not show a decode step that lost its cache):

- logits of one uncached forward equal the reference's (float32, early exit off);
- ``generate()`` with its KV cache gives the reference's greedy tokens, and each step's logits equal the
  reference's at that position;
- a left-padded batch gives the short row the logits it has alone;
- with an early-exit policy on: ``generate()`` equals stepping ``forward`` by hand with one cache.
"""
import json
import sys
from dataclasses import fields
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file
from transformers.modeling_outputs import CausalLMOutputWithPast

EXPECT = "compat_expect.safetensors"
MAX_ABS_ERROR = 1e-4


def _load(directory: Path):
    config = json.loads((directory / "config.json").read_text())
    remote = "auto_map" in config
    # A stock soft-capped attention (Gemma 2) in eager, as slimconv's runtime.load_model and transformers' own Gemma 2
    # docs do: transformers 5.0.0 picks SDPA for it, which drops the cap.
    eager = {"attn_implementation": "eager"} if config.get("attn_logit_softcapping") and not remote else {}
    # A multimodal stock output (Gemma 3, Mistral 3 with their vision tower) loads in its own multimodal class.
    auto = transformers.AutoModelForImageTextToText if "vision_config" in config else transformers.AutoModelForCausalLM
    model = auto.from_pretrained(str(directory), dtype=torch.float32, trust_remote_code=remote, **eager)
    return model.eval()


def _greedy(model, ids, mask, n):
    """Greedy tokens (batch, prompt + n) and each step's logits (batch, n, vocab) from ``generate()``."""
    # EOS off: the reference neither stops nor refuses at one, and generate() refuses one before min_new_tokens.
    model.generation_config.eos_token_id = None
    out = model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                         pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits, 1)


def _stepped(model, ids, n):
    """Greedy decoding by hand: one forward per token, one cache object, passed under the name this
    transformers' output classes use. Returns what ``_greedy`` returns."""
    name = "cache" if "cache" in {f.name for f in fields(CausalLMOutputWithPast)} else "past_key_values"
    cache, logits = {name: transformers.DynamicCache()}, []
    out = model(input_ids=ids, use_cache=True, **cache)
    for step in range(n):
        logits.append(out.logits[:, -1])
        ids = torch.cat([ids, out.logits[:, -1:].argmax(-1)], 1)
        if step < n - 1:
            out = model(input_ids=ids[:, -1:], use_cache=True, **cache)
    return ids, torch.stack(logits, 1)


@torch.no_grad()
def check(directory: Path) -> dict:
    want = load_file(str(directory / EXPECT))
    ids, greedy, reference = want["ids"], want["greedy"], want["logits"]
    p, n = ids.shape[1], greedy.shape[1] - ids.shape[1]
    model = _load(directory)
    early_exit = getattr(model.config, "early_exit", None) is not None
    if early_exit:
        model.config.early_exit_enabled = False
    forward_err = (model(input_ids=greedy, use_cache=False).logits - reference).abs().max().item()
    tokens, steps = _greedy(model, ids, torch.ones_like(ids), n)
    generate_err = (steps - reference[:, p - 1:-1]).abs().max().item()
    short, pad = ids[:, 3:], torch.zeros_like(ids[:, :3])
    batch = torch.cat([torch.cat([pad, short], 1), ids])
    mask = torch.ones_like(batch)
    mask[0, :3] = 0
    alone = _greedy(model, short, torch.ones_like(short), n)
    in_batch = _greedy(model, batch, mask, n)
    padding_err = (alone[1][0] - in_batch[1][0]).abs().max().item()
    result = {
        "output": directory.name,
        "transformers": transformers.__version__,
        "max_abs_error": max(forward_err, generate_err),
        "generate_equals_reference": bool(torch.equal(tokens, greedy)) and generate_err <= MAX_ABS_ERROR,
        "left_padded_equals_alone": bool(torch.equal(alone[0][0], in_batch[0][0, 3:])) and padding_err <= MAX_ABS_ERROR,
    }
    if early_exit:
        model.config.early_exit_enabled = True
        (got, got_logits), (want_ids, want_logits) = _greedy(model, ids, torch.ones_like(ids), n), _stepped(model, ids, n)
        result["early_exit_generate_equals_stepped"] = (bool(torch.equal(got, want_ids)) and
                                                        (got_logits - want_logits).abs().max().item() <= MAX_ABS_ERROR)
    result["ok"] = forward_err <= MAX_ABS_ERROR and all(
        v for k, v in result.items() if k.endswith(("reference", "alone", "stepped")))
    return result


def main(root: str) -> int:
    failed = 0
    for directory in sorted(p.parent for p in Path(root).glob(f"*/{EXPECT}")):
        result = check(directory)
        failed += not result["ok"]
        print(json.dumps(result), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
