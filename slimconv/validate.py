"""Validation questions 1 (is the conversion exact?) and 3 (what did the slimming cost?)."""
import math

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .plan import Plan
from .recipe import Exactness, Quality
from .reference import apply_plan, greedy_no_cache
from .runtime import load_model

# Logits tolerance by output dtype. float32 differs from the reference only by summation order
# (wider matmuls, folded gains); half-precision outputs are compared with the source weights rounded
# to the same dtype, but folded gains round differently from separate ones.
TOLERANCE = {"float32": 1e-3, "float16": 5e-2, "bfloat16": 2.5e-1}


def environment() -> dict:
    """The versions a validation ran under: the bundled modeling code's behaviour depends on them."""
    import transformers

    from . import __version__

    return {"slimconv": __version__, "transformers": transformers.__version__, "torch": torch.__version__}


def load_reference(source_dir, plan: Plan, round_to: torch.dtype | None):
    model = load_model(source_dir)
    if round_to is not None and round_to != torch.float32:
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(round_to).to(torch.float32))
    return apply_plan(model, plan)


@torch.no_grad()
def exactness(slim, reference, prompt: torch.Tensor, settings: Exactness, dtype_name: str) -> dict:
    prompt = prompt[None] if prompt.dim() == 1 else prompt
    a = slim(input_ids=prompt, use_cache=False).logits
    b = reference(input_ids=prompt).logits
    err = (a - b).abs().max().item()
    tol = settings.max_abs_error if settings.max_abs_error is not None else TOLERANCE[dtype_name]
    slim_tokens = slim.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=settings.greedy_tokens,
                                min_new_tokens=settings.greedy_tokens, do_sample=False, pad_token_id=0)
    ref_tokens = greedy_no_cache(reference, prompt, settings.greedy_tokens)
    new_a, new_b = slim_tokens[0, prompt.shape[1]:], ref_tokens[0, prompt.shape[1]:]
    same = int((new_a == new_b).sum())
    return dict(
        max_abs_error=err, max_abs_logit=b.abs().max().item(), tolerance=tol, prompt_tokens=prompt.shape[1],
        greedy_tokens=settings.greedy_tokens, greedy_identical=same,
        passed=err <= tol and same == settings.greedy_tokens, dtype_compared="float32", weights_dtype=dtype_name,
    )


@torch.no_grad()
def quality(source, slim, chunks: torch.Tensor, settings: Quality, batch_size: int = 4) -> dict:
    nll_src = nll_slim = kl = agree = 0.0
    count = 0
    for i in tqdm(range(0, len(chunks), batch_size), desc="quality", unit="batch", disable=None):
        ids = chunks[i : i + batch_size]
        ls = torch.log_softmax(source(input_ids=ids, use_cache=False).logits[:, :-1].float(), -1)
        lt = torch.log_softmax(slim(input_ids=ids, use_cache=False).logits[:, :-1].float(), -1)
        target = ids[:, 1:]
        nll_src += -ls.gather(-1, target[..., None]).sum().item()
        nll_slim += -lt.gather(-1, target[..., None]).sum().item()
        kl += F.kl_div(lt, ls, log_target=True, reduction="sum").item()
        agree += (ls.argmax(-1) == lt.argmax(-1)).sum().item()
        count += target.numel()
    out = dict(
        tokens=count, samples=len(chunks), seq_len=chunks.shape[1],
        ppl_source=math.exp(nll_src / count), ppl_slim=math.exp(nll_slim / count),
        kl=kl / count, top1=agree / count,
    )
    out["ppl_ratio"] = out["ppl_slim"] / out["ppl_source"]
    failures = []
    if settings.max_ppl_ratio is not None and out["ppl_ratio"] > settings.max_ppl_ratio:
        failures.append(f"perplexity ratio {out['ppl_ratio']:.3f} > max_ppl_ratio {settings.max_ppl_ratio}")
    if settings.max_kl is not None and out["kl"] > settings.max_kl:
        failures.append(f"KL {out['kl']:.4f} > max_kl {settings.max_kl}")
    if settings.min_top1 is not None and out["top1"] < settings.min_top1:
        failures.append(f"top-1 agreement {out['top1']:.3f} < min_top1 {settings.min_top1}")
    out.update(failures=failures, passed=not failures,
               thresholds=dict(max_ppl_ratio=settings.max_ppl_ratio, max_kl=settings.max_kl,
                               min_top1=settings.min_top1))
    return out


def run_validate(out, skip_quality: bool = False) -> dict:
    """Validates a slim output folder against its source; writes slimconv_report.json and the card."""
    from transformers import AutoTokenizer

    from .data import load_text, token_chunks
    from .outdir import PLAN_FILE, RECIPE_FILE, REPORT_FILE, read_json, require_output, write_json
    from .recipe import load_recipe
    from .report import console, print_validation, write_card
    from .source import resolve_source

    out = require_output(out)
    recipe = load_recipe(out / RECIPE_FILE)
    meta = read_json(out / PLAN_FILE)
    plan = Plan(**meta["plan"])
    src_dir = resolve_source(recipe.model, recipe.allow_pickle)
    v = recipe.validation
    tokenizer = AutoTokenizer.from_pretrained(str(out), trust_remote_code=True)
    report = {}
    slim = load_model(out)
    early_exit = getattr(slim.config, "early_exit", None)
    # Questions 1 and 3 are about the converted weights: compare them with every layer run; the early
    # exit's own cost is reported separately below.
    slim.config.early_exit_enabled = False
    if v.exactness.enabled:
        console.print("exactness: slim checkpoint vs source with the plan applied at run time (float32)")
        text = load_text(v.quality.data, "test")
        prompt = token_chunks(tokenizer, text, 1, v.exactness.prompt_tokens)[0]
        dtype = getattr(torch, meta["dtype"])
        reference = load_reference(src_dir, plan, dtype)
        report["exactness"] = exactness(slim, reference, prompt, v.exactness, meta["dtype"])
        del reference
    if v.quality.enabled and not skip_quality:
        console.print(f"quality: {v.quality.samples} x {v.quality.seq_len} tokens of {v.quality.data} (test split)")
        chunks = token_chunks(tokenizer, load_text(v.quality.data, "test"), v.quality.samples, v.quality.seq_len)
        report["quality"] = quality(load_model(src_dir), slim, chunks, v.quality)
        if early_exit is not None:
            from .early_exit import evaluate

            console.print("early exit: simulated per token on the same text, real cached decoding, prompt tasks")
            report["early_exit"] = evaluate(slim, tokenizer, chunks, load_text(v.quality.data, "test"))
    report["passed"] = all(r["passed"] for r in report.values())
    report["environment"] = environment()
    write_json(out / REPORT_FILE, report)
    write_card(out)
    print_validation(report)
    return report
