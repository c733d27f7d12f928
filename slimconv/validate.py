"""Validation questions 1 (is the conversion exact?) and 3 (what did the slimming cost?)."""
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .plan import Plan
from .recipe import Exactness, Quality
from .reference import apply_plan, greedy_no_cache
from .runtime import load_model, load_tokenizer

# Logits tolerance by output dtype. float32 differs from the reference only by summation order
# (wider matmuls, folded gains); half-precision outputs are compared with the source weights rounded
# to the same dtype, but folded gains round differently from separate ones.
TOLERANCE = {"float32": 1e-3, "float16": 5e-2, "bfloat16": 2.5e-1}


def environment() -> dict:
    """The versions a validation ran under: the bundled modeling code's behaviour depends on them."""
    import transformers

    from . import __version__

    return {"slimconv": __version__, "transformers": transformers.__version__, "torch": torch.__version__}


def load_reference(source_dir, plan: Plan, round_to: torch.dtype | None, trust_remote_code: bool = False):
    model = load_model(source_dir, trust_remote_code)
    if round_to is not None and round_to != torch.float32:
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(round_to).to(torch.float32))
    return apply_plan(model, plan)


@torch.no_grad()
def greedy_cached(model, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` greedy tokens from ``generate()`` with the model's KV cache, EOS included: the uncached reference
    (``greedy_no_cache``) does not stop or refuse at an EOS either, and generate() would refuse one before
    ``min_new_tokens`` (a false mismatch on a model that emits its EOS early)."""
    import copy

    saved = model.generation_config
    model.generation_config = copy.deepcopy(saved)
    model.generation_config.eos_token_id = None
    try:
        return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=steps, do_sample=False,
                              pad_token_id=0)
    finally:
        model.generation_config = saved


@torch.no_grad()
def exactness(slim, reference, prompt: torch.Tensor, settings: Exactness, dtype_name: str) -> dict:
    prompt = prompt[None] if prompt.dim() == 1 else prompt
    a = slim(input_ids=prompt, use_cache=False).logits
    b = reference(input_ids=prompt).logits
    err = (a - b).abs().max().item()
    tol = settings.max_abs_error if settings.max_abs_error is not None else TOLERANCE[dtype_name]
    slim_tokens = greedy_cached(slim, prompt, settings.greedy_tokens)
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
    return _judge(out, settings)


def _judge(out: dict, settings: Quality) -> dict:
    """Adds the perplexity ratio and the thresholds' verdict to quality metrics."""
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


def _metrics(ls, lt, target) -> tuple[float, float, float, float]:
    """Summed NLL of source and slim, summed KL(source || slim) and top-1 agreements over a batch."""
    return (-ls.gather(-1, target[..., None]).sum().item(), -lt.gather(-1, target[..., None]).sum().item(),
            F.kl_div(lt, ls, log_target=True, reduction="sum").item(), (ls.argmax(-1) == lt.argmax(-1)).sum().item())


@torch.no_grad()
def compare_three(source, unhealed, healed, chunks: torch.Tensor, settings: Quality, device=None,
                  batch_size: int = 4) -> dict:
    """``quality`` of the unhealed and of the healed model against the source, in one pass over ``chunks``
    (the source runs once per batch). Returns {"unhealed": quality dict, "healed": quality dict}."""
    sums = {"unhealed": [0.0] * 4, "healed": [0.0] * 4}
    count = 0
    for i in tqdm(range(0, len(chunks), batch_size), desc="quality", unit="batch", disable=None):
        ids = chunks[i: i + batch_size].to(device or "cpu")
        ls = torch.log_softmax(source(input_ids=ids, use_cache=False).logits[:, :-1].float(), -1)
        for name, model in (("unhealed", unhealed), ("healed", healed)):
            lt = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[:, :-1].float(), -1)
            sums[name] = [a + b for a, b in zip(sums[name], _metrics(ls, lt, ids[:, 1:]))]
        count += ids[:, 1:].numel()
    return {name: _judge(dict(tokens=count, samples=len(chunks), seq_len=chunks.shape[1],
                              ppl_source=math.exp(s[0] / count), ppl_slim=math.exp(s[1] / count),
                              kl=s[2] / count, top1=s[3] / count), settings)
            for name, s in sums.items()}


def healed_exactness(healed_dir, unhealed_dir, unhealed_sha256: str, trained: list[str]) -> dict:
    """A healed output's exactness question: its weights were trained by heal, so they are not compared
    with the run-time reference; instead every tensor heal did not train must equal the unhealed output's,
    byte for byte, and the trained ones must keep their names, shapes and dtypes."""
    from safetensors import safe_open

    from .source import weights_sha256

    out = dict(heal="weights trained by heal", trained_tensors=len(trained), unhealed=str(unhealed_dir))
    unhealed_dir = Path(unhealed_dir)
    if not unhealed_dir.is_dir() or not any(unhealed_dir.glob("*.safetensors")):
        return dict(out, passed=True, compared=False,
                    note="the unhealed output is gone: frozen tensors not compared with it")
    if weights_sha256(unhealed_dir) != unhealed_sha256:
        return dict(out, passed=True, compared=False,
                    note="the unhealed output's weights changed since heal: frozen tensors not compared with it")

    def tensors(folder):
        found = {}
        for shard in sorted(Path(folder).glob("*.safetensors")):
            with safe_open(shard, framework="pt") as f:
                for name in f.keys():
                    found[name] = (shard.name, f.get_slice(name))
        return found

    a, b = tensors(healed_dir), tensors(unhealed_dir)
    problems = []
    if set(a) != set(b):
        problems.append(f"tensor names differ: {sorted(set(a) ^ set(b))[:5]}")
    frozen = differ = 0
    for name in sorted(set(a) & set(b)):
        (fa, sa), (fb, sb) = a[name], b[name]
        if fa != fb or sa.get_shape() != sb.get_shape() or sa.get_dtype() != sb.get_dtype():
            problems.append(f"{name}: file, shape or dtype changed")
            continue
        if name in trained:
            continue
        frozen += 1
        with safe_open(Path(healed_dir) / fa, framework="pt") as f, safe_open(unhealed_dir / fb, framework="pt") as g:
            if not torch.equal(f.get_tensor(name), g.get_tensor(name)):
                differ += 1
                problems.append(f"{name}: not trained by heal, yet it differs from the unhealed output")
    return dict(out, compared=True, frozen_tensors=frozen, frozen_identical=frozen - differ,
                problems=problems[:10], passed=not problems)


def run_validate(out, skip_quality: bool = False, trust_remote_code: bool = False, deployed: list[str] = ()) -> dict:
    """Validates a slim output folder against its source; writes slimconv_report.json and the card. ``deployed``:
    GGUF precisions at which to measure source and slim in llama.cpp as well (slimconv_deployed.json)."""
    from .data import load_text, token_chunks
    from .outdir import PLAN_FILE, RECIPE_FILE, read_json, require_output
    from .recipe import load_recipe
    from .report import console
    from .source import resolve_source, same_source

    out = require_output(out)
    recipe = load_recipe(out / RECIPE_FILE)
    meta = read_json(out / PLAN_FILE)
    plan = Plan(**meta["plan"])
    src_dir = resolve_source(recipe.model, recipe.allow_pickle)
    # Against other weights, exactness would fail and quality would measure the wrong pair: say why instead.
    if not same_source(meta.get("source_sha256"), src_dir, recipe.model, out,
                       "re-run `slimconv convert --force` from the current source, or restore the original one"):
        console.print(f"[yellow]warning:[/] {out / PLAN_FILE} records no source weight hash (an older slimconv): "
                      f"cannot check that {recipe.model} still holds the weights it was converted from")
    v = recipe.validation
    deploy = None
    if deployed:
        from .deployed import check_dtypes, run_deployed

        check_dtypes(list(deployed))  # before the float checks, not after them
        deploy = lambda: run_deployed(out, src_dir, list(deployed), v.quality.data, v.quality.samples,
                                      v.quality.seq_len, trust_remote_code)
    tokenizer = load_tokenizer(out)
    report = {}
    slim = load_model(out)
    early_exit = getattr(slim.config, "early_exit", None)
    # Questions 1 and 3 are about the converted weights: compare them with every layer run; the early
    # exit's own cost is reported separately below.
    slim.config.early_exit_enabled = False
    healed = meta.get("heal")
    if healed:
        return _validate_healed(out, healed, src_dir, slim, tokenizer, v, skip_quality, trust_remote_code, deploy)
    if v.exactness.enabled:
        console.print("exactness: slim checkpoint vs source with the plan applied at run time (float32)")
        text = load_text(v.quality.data, "test")
        prompt = token_chunks(tokenizer, text, 1, v.exactness.prompt_tokens)[0]
        dtype = getattr(torch, meta["dtype"])
        reference = load_reference(src_dir, plan, dtype, trust_remote_code)
        report["exactness"] = exactness(slim, reference, prompt, v.exactness, meta["dtype"])
        del reference
    if v.quality.enabled and not skip_quality:
        console.print(f"quality: {v.quality.samples} x {v.quality.seq_len} tokens of {v.quality.data} (test split)")
        chunks = token_chunks(tokenizer, load_text(v.quality.data, "test"), v.quality.samples, v.quality.seq_len)
        report["quality"] = quality(load_model(src_dir, trust_remote_code), slim, chunks, v.quality)
        if early_exit is not None:
            from .selection.early_exit import evaluate

            console.print("early exit: simulated per token on the same text, real cached decoding, prompt tasks")
            report["early_exit"] = evaluate(slim, tokenizer, chunks, load_text(v.quality.data, "test"))
    return _finish(out, report, deploy)


def warn_exports(out) -> list[dict]:
    """Warns about exports in ``out`` that were made from other weights (stale) or record none; returns them
    for the report. A warning, not a failure: validation is about the weights, and push refuses stale ones."""
    from .provenance import find_exports, stale_message, unrecorded_message
    from .report import console

    found = []
    for export in find_exports(out):
        if export.status == "own":
            continue
        if export.status == "stale":
            problem, fix = stale_message(export, Path(out))
            console.print(f"[yellow]warning:[/] {problem}\n  fix: {fix}")
        else:
            console.print(f"[yellow]warning:[/] {unrecorded_message(export)}")
        found.append(dict(path=str(export.path), kind=export.kind, status=export.status))
    return found


def _finish(out, report: dict, deploy=None) -> dict:
    """Writes a validation ``report`` (passed when every check did) into ``out``, refreshes the card, prints it.
    A healed output's ``quality_unhealed`` is context, not a check of this output, as in heal's own report.
    ``deploy`` measures the deployed precisions (a measurement, not a check: it has no verdict)."""
    from .outdir import REPORT_FILE, write_json
    from .report import print_deployed, print_validation, write_card

    report["passed"] = all(r["passed"] for k, r in report.items() if k != "quality_unhealed")
    report["environment"] = environment()
    report["exports_not_of_these_weights"] = warn_exports(out)
    write_json(out / REPORT_FILE, report)
    record = deploy() if deploy else None
    write_card(out)
    print_validation(report)
    if record:
        print_deployed(record)
    return report


def _validate_healed(out, healed: dict, src_dir, slim, tokenizer, v, skip_quality: bool,
                     trust_remote_code: bool, deploy=None) -> dict:
    """A healed output: exactness is the frozen-tensor check against the unhealed output (the trained
    weights have no reference to equal); quality compares it with the source, beside the unhealed output's."""
    from .data import load_text, token_chunks
    from .report import console

    console.print("exactness: weights trained by heal; frozen tensors against the unhealed output "
                  f"{healed['unhealed']}")
    report = {"exactness": healed_exactness(out, healed["unhealed"], healed["unhealed_sha256"],
                                            healed["trained_tensors"])}
    if v.quality.enabled and not skip_quality:
        console.print(f"quality: {v.quality.samples} x {v.quality.seq_len} tokens of {v.quality.data} (test split), "
                      "healed and unhealed against the source")
        chunks = token_chunks(tokenizer, load_text(v.quality.data, "test"), v.quality.samples, v.quality.seq_len)
        unhealed_dir = Path(healed["unhealed"])
        if report["exactness"].get("compared"):
            both = compare_three(load_model(src_dir, trust_remote_code), load_model(unhealed_dir), slim, chunks,
                                 v.quality)
            report["quality"], report["quality_unhealed"] = both["healed"], both["unhealed"]
        else:
            report["quality"] = quality(load_model(src_dir, trust_remote_code), slim, chunks, v.quality)
    return _finish(out, report, deploy)
