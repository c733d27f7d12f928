"""Heal: win back some of the quality slimming cost by distilling the source model (teacher) into the slim
output (student) on calibration text, then write the result as a new output of the same format.

Loss: KL(teacher || student) of the next-token distributions per token, optionally plus the MSE between
hidden states after each changed layer (normalised by the teacher's mean square). What is trained:

- ``adjacent``: the output layers next to each change, with their norms: the layer holding the MLP that
  follows a removed attention, the layer after a removed MLP or block (the one before, when the removal
  is at the end), every wide (parallel) layer and every layer shrink narrowed; the final norm when the last layer is among them.
- ``all``: every decoder layer and the final norm.
- ``lora``: rank-r adapters on every linear of every decoder layer (hand-written, see ``LoRALinear``),
  merged into the weights at the end.

Embeddings and the LM head never train: they are shared with the teacher's vocabulary semantics and a
short run on one domain would only bend them to it. The healed output keeps the unhealed one's config,
tensor names, shapes and dtypes (frozen tensors byte for byte), so it loads, validates, exports and
benchmarks like any output; the unhealed output is only read.
"""
import contextlib
import math
import os
import resource
import shutil
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from .convert import MODELING_FILES
from .errors import SlimError
from .formats.nemotron import NAS_FILES
from .outdir import (CONFIG_FILE, HEAL_FILE, HEAL_PLOT, PLAN_FILE, RECIPE_FILE, REPORT_FILE, AtomicDir, read_json,
                     refuse_overlap, require_output, write_json)
from .plan import Plan
from .recipe import Heal
from .runtime import load_model, load_tokenizer, pick_device
from .source import AUX_FILES, same_source, source_paths, weights_sha256

# What the healed output takes from the unhealed one besides the weights (heal writes those, its plan, reports
# and card itself). A list of what to keep, not of what to leave: exports (gguf/, onnx/, any folder a user
# exported into) and reports describe the unhealed weights, and a healed folder carrying them would publish
# files that run another model than its card says.
INHERITED = (CONFIG_FILE, RECIPE_FILE, "model.safetensors.index.json", *AUX_FILES, *MODELING_FILES, *NAS_FILES)


class LoRALinear(nn.Module):
    """``base(x) + (x A^T) B^T * alpha/r`` with ``base`` frozen; B starts at zero so step 0 is the unhealed
    model. Hand-written rather than peft: a dozen lines, no new dependency, and nothing that can break on
    a transformers release (peft patches transformers' modules); merging is one matrix product."""

    def __init__(self, base: nn.Linear, rank: int, generator: torch.Generator | None):
        super().__init__()
        self.base, self.scale = base, 1.0  # alpha = r: the update's scale does not change with the rank
        self.lora_a = nn.Parameter(torch.zeros(rank, base.in_features).to(base.weight))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank).to(base.weight))
        if generator is not None:
            self.reset(generator)

    @torch.no_grad()
    def reset(self, generator: torch.Generator):
        """A random, B zero. Drawn on the CPU whole and then placed, so that a sharded run (whose adapters are
        built on the meta device and sharded first) draws exactly what one process does."""
        a = torch.randn(self.lora_a.shape, generator=generator) / math.sqrt(self.base.in_features)
        for p, value in ((self.lora_a, a), (self.lora_b, torch.zeros(self.lora_b.shape))):
            if hasattr(p, "device_mesh"):  # a DTensor shard
                from torch.distributed.tensor import distribute_tensor

                value = distribute_tensor(value.to(p.dtype), p.device_mesh, p.placements)
            p.copy_(value)

    def forward(self, x):
        return self.base(x) + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scale

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        self.base.weight += (self.lora_b @ self.lora_a) * self.scale
        return self.base


def adjacent_layers(plan: Plan) -> list[int]:
    """Output layers next to each change (see the module docstring), sorted."""
    out_of = {m: j for j, s in enumerate(plan.layers) for m in s.source_layers}
    last = len(plan.layers) - 1
    picked = set()
    for j, s in enumerate(plan.layers):
        if len(s.source_layers) > 1 or s.narrowed:
            picked.add(j)
        if s.attention is None and s.mlp is not None:
            picked.add(j)  # its MLP now reads what the removed attention used to add to
        if s.mlp is None:
            picked.add(min(j + 1, last))
    for m in range(plan.num_source_layers):
        if m not in out_of:  # a removed block: the next kept layer, or the last one if none follows
            after = [out_of[k] for k in range(m + 1, plan.num_source_layers) if k in out_of]
            picked.add(after[0] if after else last)
    return sorted(picked)


def _layers(model) -> nn.ModuleList:
    return model.model.layers


# A mixture of experts' router: frozen unless the settings say otherwise, so that tokens keep their experts.
ROUTER = "mlp.gate.weight"


def disk_state(state: dict, config) -> dict:
    """``state`` under the names the checkpoint stores it by. transformers holds a stock MoE layer's experts as 3-D
    tensors (``mlp.experts.gate_up_proj``: experts x 2 widths x hidden, ``mlp.experts.down_proj``); its checkpoint,
    like slimconv's own, stores each expert's projections apart, named by the family's ``MoeNames``."""
    from .arch import FAMILIES

    family = FAMILIES.get(config.model_type)
    if family is None or family.moe is None:
        return state
    names, out = family.moe.names, {}
    for name, t in state.items():
        at, _, rest = name.partition("mlp.experts.")
        if rest not in ("gate_up_proj", "down_proj"):
            out[name] = t
            continue
        for e in range(t.shape[0]):
            if rest == "down_proj":
                out[at + names.down.format(e=e) + ".weight"] = t[e]
            else:
                gate, up = t[e].chunk(2, dim=0)
                out[at + names.gate.format(e=e) + ".weight"] = gate
                out[at + names.up.format(e=e) + ".weight"] = up
    return out


def trainable(model, plan: Plan, settings: Heal, generator: torch.Generator | None) -> tuple[list[int], list[str]]:
    """Freezes everything, then unfreezes (or wraps with adapters) what ``settings.train`` says. Without a
    ``generator`` the adapters stay zero until ``reset_adapters``.

    Returns the output layers that train and the names of the checkpoint tensors that will change.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    n = len(_layers(model))
    layers = adjacent_layers(plan) if settings.train == "adjacent" else list(range(n))
    names = []
    for j in layers:
        layer = _layers(model)[j]
        if settings.train == "lora":
            for mod_name, mod in list(layer.named_modules()):
                for child_name, child in list(mod.named_children()):
                    name = f"model.layers.{j}.{mod_name + '.' if mod_name else ''}{child_name}.weight"
                    if isinstance(child, nn.Linear) and (settings.train_router or not name.endswith(ROUTER)):
                        setattr(mod, child_name, LoRALinear(child, settings.lora_rank, generator))
                        names.append(name)
        else:
            for p_name, p in layer.named_parameters():
                name = f"model.layers.{j}.{p_name}"
                if settings.train_router or not name.endswith(ROUTER):
                    p.requires_grad_(True)
                    names += list(disk_state({name: p}, model.config))
    if settings.train != "lora" and (n - 1) in layers:
        model.model.norm.weight.requires_grad_(True)
        names.append("model.norm.weight")
    return layers, names


def round_trip(weight: torch.Tensor, quant: str) -> torch.Tensor:
    """``weight`` (N, K) as the export deploys it: q4_0 exactly as the gguf library writes it (per block of 32
    along K, d = the signed largest value / -8, levels trunc(w / d + 8.5) in 0..15, d stored in fp16), int4 as
    ONNX Runtime's MatMulNBits quantiser rounds it."""
    if quant == "int4":
        from .formats.onnx_graph import dequantize_int4

        return dequantize_int4(weight.detach().cpu(), 32, False).to(weight.device, weight.dtype)
    blocks = weight.detach().float().reshape(-1, 32)
    biggest = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True))
    d = biggest / -8
    levels = torch.trunc(blocks * torch.where(d == 0, 0.0, 1 / d) + 8.5).clamp(0, 15)
    return ((levels - 8) * d.half().float()).reshape(weight.shape).to(weight.dtype)


class _FakeQuant(nn.Module):
    """A parametrization: the weight's round trip forward, its gradient straight through to the float weight."""

    def __init__(self, quant: str):
        super().__init__()
        self.quant = quant

    def forward(self, w):
        return w + (round_trip(w, self.quant) - w).detach()


def check_quant(settings: Heal, keys: tuple = ("--quant", "--train")) -> None:
    """``quant`` trains the weights the export rounds; LoRA's are merged only after training."""
    if settings.quant != "none" and settings.train == "lora":
        raise SlimError(f"{keys[0]} {settings.quant} with {keys[1]} lora: the adapters are merged into the weights "
                        "after training, so there is no trained weight for the quantiser to round while it trains",
                        f"use {keys[1]} adjacent or all with {keys[0]}, or heal lora without it")


def fake_quantise(model, quant: str) -> list[nn.Module]:
    """Every decoder matrix the export quantises runs as its round trip: frozen ones replaced once, trained ones
    parametrized (returned, for ``release``). The embedding and the head are left float (q8_0 / float in the
    exports)."""
    from torch.nn.utils import parametrize

    wrapped = []
    for module in _layers(model).modules():
        if isinstance(module, nn.Linear) and module.weight.shape[-1] % 32 == 0:
            if module.weight.requires_grad:
                parametrize.register_parametrization(module, "weight", _FakeQuant(quant))
                wrapped.append(module)
            else:
                with torch.no_grad():
                    module.weight.copy_(round_trip(module.weight, quant))
    return wrapped


def release(wrapped: list[nn.Module]) -> None:
    """The trained float weights back in place of their parametrizations: the export rounds them to exactly what
    training ran with."""
    from torch.nn.utils import parametrize

    for module in wrapped:
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)


def reset_adapters(model, generator: torch.Generator) -> None:
    """Draws every adapter's initial values in the order ``trainable`` created them."""
    for mod in model.modules():
        if isinstance(mod, LoRALinear):
            mod.reset(generator)


def merge_lora(model) -> None:
    for mod in list(model.modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, LoRALinear):
                setattr(mod, child_name, child.merged())


def require_validated(out) -> Path:
    """An output that `convert` wrote and `validate` found exact; anything else is refused (exit 2)."""
    out = require_output(out)
    report = read_json(out / REPORT_FILE) if (out / REPORT_FILE).is_file() else None
    if report is None:
        raise SlimError(f"{out} has not been validated (no {REPORT_FILE})",
                        f"run `slimconv validate {out}` first: only an output proven exact is worth healing")
    ex = report.get("exactness") or {}
    if ex and not ex.get("passed"):
        raise SlimError(f"{out} failed its exactness check: its weights are not what the recipe says",
                        "re-run `slimconv convert --force` and `slimconv validate` before healing")
    return out


def check_source(meta: dict, src_dir: Path, given: str, out: Path) -> str:
    """The source's weight hash, refused unless it equals what convert recorded: unlike bench and validate,
    heal refuses an output with no recorded hash, because a teacher that is not the source would train the
    output towards another model."""
    fix = "re-run `slimconv convert --force` from the current source, or restore the original one"
    if not same_source(meta.get("source_sha256"), src_dir, given, out, fix):
        raise SlimError(f"{out / PLAN_FILE} records no source weight hash (written by an older slimconv), so "
                        "heal cannot tell whether the source is the one this output was made from",
                        "re-run `slimconv convert --force` and `slimconv validate` on its recipe")
    return meta["source_sha256"]


def default_target(out: Path) -> Path:
    return out.parent / f"{out.name}-healed"


@torch.no_grad()
def sample_windows(model, n: int, seq_len: int, seed: int, device: torch.device, batch: int = 32) -> torch.Tensor:
    """``n`` windows of ``seq_len`` tokens sampled from ``model`` at temperature 1 with no truncation (its own
    distribution, the one the KL compares against), each starting a new document at the BOS token.

    Training on what the source itself writes (as LLM-QAT's data-free distillation does) covers every domain
    the source knows in proportion, where one corpus teaches the student that corpus.
    """
    cfg = model.config
    start = cfg.bos_token_id if cfg.bos_token_id is not None else cfg.eos_token_id
    start = start[0] if isinstance(start, list) else start
    eos = cfg.eos_token_id[0] if isinstance(cfg.eos_token_id, list) else cfg.eos_token_id
    out = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for i in tqdm(range(0, n, batch), desc="sampling from the source", unit="batch", disable=None):
            ids = torch.full((min(batch, n - i), 1), start, device=device)
            out.append(model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                      temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=seq_len - 1,
                                      min_new_tokens=seq_len - 1, pad_token_id=eos).cpu())
    return torch.cat(out)


def training_windows(teacher, src_dir: Path, settings: Heal, count: int, device: torch.device) -> torch.Tensor:
    """``count`` windows (count x seq_len) of ``settings.data``: each ``+``-joined part gives an equal share,
    interleaved so every batch mixes them; a generated part cycles through ``generated_windows`` samples.
    A part named again draws other windows (the seed plus how often it came before), so repeating a part
    weights the mix instead of duplicating windows."""
    from .data import calibration_ids
    from .report import console

    parts = settings.data.split("+")
    shares = [count // len(parts) + (i < count % len(parts)) for i in range(len(parts))]
    pools = []
    for j, (part, n) in enumerate(zip(parts, shares)):
        seed = settings.seed + parts[:j].count(part)
        if part == "generated":
            k = min(n, settings.generated_windows)
            console.print(f"sampling {k} windows of {settings.seq_len} tokens from the source for training")
            pool = sample_windows(teacher, k, settings.seq_len, seed, device)
            pools.append(pool[torch.arange(n) % len(pool)])
        else:
            pools.append(calibration_ids(src_dir, part, n, settings.seq_len, seed))
    order = [pool[i] for i in range(max(shares)) for pool in pools if i < len(pool)]
    return torch.stack(order)


def _hidden_pairs(plan: Plan, layers: list[int], num_source: int) -> list[tuple[int, int]]:
    """(student output layer, teacher source layer) whose outputs should agree: each trained layer against
    the last source layer it stands for; not the last layers (the logits' KL covers those)."""
    pairs = []
    for j in layers:
        s = max(plan.layers[j].source_layers)
        if j < len(plan.layers) - 1 and s < num_source - 1:
            pairs.append((j, s))
    return pairs


def _capture(layers: nn.ModuleList, which: list[int], store: dict):
    def hook(i):
        return lambda mod, args, out: store.__setitem__(i, out[0] if isinstance(out, tuple) else out)

    return [layers[i].register_forward_hook(hook(i)) for i in sorted(set(which))]


def _lr_at(step: int, settings: Heal, elapsed_s: float = 0.0) -> float:
    """Warm-up, then cosine decay to 10%. Under ``max_minutes`` the decay follows whichever runs out first,
    steps or time: a budget that ends the run at step 14 of 400 would otherwise stop it at peak (or still
    warming up) instead of annealed."""
    warm = max(1, min(20, settings.steps // 10))
    if settings.max_minutes is not None:
        warm = max(1, min(warm, 5))  # a budget of a few dozen steps cannot spend 20 of them warming up
    if step < warm:
        return settings.lr * (step + 1) / warm
    t = (step - warm) / max(1, settings.steps - warm)
    if settings.max_minutes is not None:
        t = max(t, elapsed_s / (settings.max_minutes * 60))
    return settings.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def shared_prefix(plan: Plan, trained: list[int], quant: str = "none") -> int:
    """How many first output layers are the source's first layers, unchanged and untrained. The teacher's
    hidden state entering layer k is then exactly the student's, so the student can start from it and skip
    k layers of every forward (for the default recipe, 25 of 30). None under ``quant``: the student's layers
    run quantised, the teacher's do not."""
    if quant != "none":
        return 0
    k = 0
    for j, s in enumerate(plan.layers):
        if j in trained or s.source_layers != [j] or s.attention is None or s.mlp is None:
            break
        k += 1
    return k


class _Passthrough(nn.Module):
    """Stands in for a shared prefix layer during training: both the stock and the slim model call a layer
    as ``layer(hidden, ...)`` and take its return value as the next hidden state."""

    def forward(self, x, *args, **kwargs):
        return x


class _StartAt:
    """While active, the student skips its first ``k`` layers and its layer k reads the hidden state the
    teacher's layer k received in the teacher's last forward (same tokens, so the same tensor)."""

    def __init__(self, teacher, student, k: int):
        self.teacher, self.student, self.k, self.hidden = teacher, student, k, None

    def __enter__(self):
        layers = _layers(self.student)
        self.saved = [layers[i] for i in range(self.k)]
        for i in range(self.k):
            layers[i] = _Passthrough()
        self.hooks = [
            _layers(self.teacher)[self.k].register_forward_pre_hook(self._keep),
            layers[self.k].register_forward_pre_hook(self._give),
        ]
        return self

    def _keep(self, mod, args):
        self.hidden = args[0]

    def _give(self, mod, args):
        return (self.hidden,) + tuple(args[1:])

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()
        layers = _layers(self.student)
        for i, layer in enumerate(self.saved):
            layers[i] = layer


class _DistilKL(torch.autograd.Function):
    """KL(teacher || student) per token: what ``F.kl_div(log_softmax(logits), log_softmax(target),
    log_target=True, reduction="batchmean")`` gives over (tokens, vocabulary), and its gradient by the same
    formulas as autograd's (kl_div's, then log_softmax's), but a chunk of tokens at a time.

    The gradient is computed in the forward and written over ``target`` (the teacher's logits, which this consumes),
    so the whole computation adds one chunk's vocab-wide temporaries to the two tensors the models return; autograd
    would hold the teacher's and the student's log probabilities, the exponentials of the first and then the
    gradient, each as large as the logits."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, rows: int) -> torch.Tensor:
        n = logits.shape[0]
        total = logits.new_zeros(())
        for i in range(0, n, rows):
            t = target[i:i + rows]
            log_t = torch.log_softmax(t, -1)
            logp = torch.log_softmax(logits[i:i + rows], -1)
            p_t = log_t.exp()
            total += (p_t * (log_t - logp)).sum()
            del log_t
            g = p_t.mul_(-1.0 / n)  # d(KL)/d(logp), as kl_div's backward gives it for a gradient of 1
            torch.sub(g, logp.exp_().mul_(g.sum(-1, keepdim=True)), out=t)  # log_softmax's backward, over t
        ctx.save_for_backward(target)
        return total / n

    @staticmethod
    def backward(ctx, grad):
        (g,) = ctx.saved_tensors
        return g.mul_(grad), None, None  # in place: the backward holds one vocab-wide tensor, not two


def distil_kl(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(softmax(target) || softmax(logits)) for (..., vocab) logits; ``target`` (the
    teacher's logits, no gradient) is overwritten."""
    vocab = logits.shape[-1]
    return _DistilKL.apply(logits.reshape(-1, vocab), target.reshape(-1, vocab), max(1, KL_CHUNK // vocab))


KL_CHUNK = 1 << 20  # vocab-wide values per chunk of _DistilKL: 4 MB a temporary in float32


def _resume_path(target: Path) -> Path:
    return target.parent / f".{target.name}.heal-resume.pt"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def distil(teacher, student, windows: torch.Tensor, plan: Plan, settings: Heal, device: torch.device,
           layers: list[int], resume_file: Path | None = None, resume: bool = False,
           fingerprint: dict | None = None, world=None) -> dict:
    """Trains ``student``'s trainable parameters towards ``teacher`` on ``windows`` (steps*batch x seq_len).

    Returns the loss curve and what the run cost. Saves a resume checkpoint every
    ``settings.checkpoint_every`` steps to ``resume_file`` when given. Under a torchrun ``world`` both models
    are FSDP2-sharded, each rank takes its share of every batch, the curve is the ranks' mean (the loss of the
    whole batch) and the checkpoint is a torch.distributed.checkpoint folder.
    """
    from . import distributed

    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0, betas=(0.9, 0.95))
    named = {n: p for n, p in student.named_parameters() if p.requires_grad}
    curve, start_step, elapsed_before = [], 0, 0.0
    if resume and resume_file is not None and resume_file.exists():
        if world:
            state = distributed.load_resume(resume_file, student, opt, list(named))
        else:
            state = torch.load(resume_file, map_location="cpu", weights_only=False)
        if state.get("fingerprint") != fingerprint:
            raise SlimError(f"{resume_file} was saved by a heal with other settings or inputs",
                            "run without --resume to start over (or with the same settings as before)")
        if not world:
            with torch.no_grad():
                for n, t in state["params"].items():
                    named[n].copy_(t)
            opt.load_state_dict(state["optimizer"])
        curve, start_step, elapsed_before = state["curve"], state["step"], state["elapsed_s"]
        if world is None or world.main:
            print(f"resuming at step {start_step} of {settings.steps} from {resume_file}")
    share = settings.batch // world.size if world else settings.batch
    first = world.rank * share if world else 0
    pairs = _hidden_pairs(plan, layers, plan.num_source_layers) if settings.hidden_weight > 0 else []
    s_store, t_store = {}, {}
    hooks = (_capture(_layers(student), [j for j, _ in pairs], s_store)
             + _capture(_layers(teacher), [s for _, s in pairs], t_store))
    student.train()
    start = time.time()
    stopped_early = False
    tokens = 0
    # Sharded layers stay in place: skipping them would leave their FSDP units out of the forward.
    k = 0 if world else shared_prefix(plan, layers, settings.quant)
    start_at = _StartAt(teacher, student, k) if k else contextlib.nullcontext()
    start_at.__enter__()
    try:
        bar = tqdm(range(start_step, settings.steps), desc=f"heal ({settings.train})", unit="step", disable=None,
                   initial=start_step, total=settings.steps)
        for step in bar:
            elapsed = elapsed_before + time.time() - start
            if world:  # rank 0's clock for all: ranks that disagreed on stopping would wait for each other forever
                elapsed = distributed.broadcast(elapsed)
            if settings.max_minutes is not None and elapsed > settings.max_minutes * 60:
                stopped_early = True
                break
            ids = windows[step * settings.batch + first:step * settings.batch + first + share].to(device)
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, settings, elapsed)
            with torch.no_grad():
                target = teacher(input_ids=ids, use_cache=False).logits.float()
            kl = distil_kl(student(input_ids=ids, use_cache=False).logits.float(), target)
            del target  # now the loss's gradient: the backward's only vocab-wide tensor
            loss = kl
            mse = None
            if pairs:
                mse = sum(((s_store[j] - t_store[s]) ** 2).mean() / (t_store[s] ** 2).mean() for j, s in pairs) / len(pairs)
                loss = kl + settings.hidden_weight * mse
                s_store.clear()
                t_store.clear()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)  # the gradients go now, not while the next forward's activations grow
            tokens += ids.numel()
            reduce = distributed.mean if world else float
            row = dict(step=step + 1, kl=reduce(kl.item()), seconds=elapsed_before + time.time() - start)
            if mse is not None:
                row["hidden_mse"] = reduce(mse.item())
            curve.append(row)
            bar.set_postfix(kl=f"{row['kl']:.4f}", refresh=False)
            if resume_file is not None and (step + 1) % settings.checkpoint_every == 0 and step + 1 < settings.steps:
                if world:
                    distributed.save_resume(resume_file, student, opt, list(named), dict(
                        curve=curve, step=step + 1, elapsed_s=row["seconds"], fingerprint=fingerprint))
                else:
                    _save_resume(resume_file, named, opt, curve, step + 1, row["seconds"], fingerprint)
    finally:
        start_at.__exit__(None, None, None)
        for h in hooks:
            h.remove()
        student.eval()
    return dict(steps=len(curve), shared_prefix_layers=k, tokens=len(curve) * settings.batch * settings.seq_len,
                tokens_this_run=tokens * (world.size if world else 1), wall_s=elapsed_before + time.time() - start,
                stopped_by_time=stopped_early, resumed_from=start_step or None, curve=curve)


def _save_resume(path: Path, named: dict, opt, curve: list, step: int, elapsed: float, fingerprint) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    torch.save(dict(params={n: p.detach().cpu() for n, p in named.items()}, optimizer=opt.state_dict(),
                    curve=curve, step=step, elapsed_s=elapsed, fingerprint=fingerprint), tmp)
    os.replace(tmp, path)


def _write_weights(student, unhealed: Path, dest: Path, changed: set[str]) -> None:
    """The unhealed output's weight files again, same names, shapes, dtypes and sharding; tensors in
    ``changed`` from the trained student, every other one copied as it was."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from .source import Checkpoint

    state = disk_state(student.state_dict(), student.config)
    text_name = Checkpoint(unhealed).text_name  # a multimodal output stores the text model under a prefix
    for shard in sorted(unhealed.glob("*.safetensors")):
        tensors = {}
        with safe_open(shard, framework="pt") as f:
            for name in f.keys():
                old = f.get_tensor(name)
                if text_name(name) in changed:
                    new = state[text_name(name)].detach().to("cpu", old.dtype).contiguous()
                    if new.shape != old.shape:
                        raise RuntimeError(f"{name}: trained {tuple(new.shape)}, stored {tuple(old.shape)}")
                    tensors[name] = new
                else:
                    tensors[name] = old
        save_file(tensors, dest / shard.name, metadata={"format": "pt"})


def _plot(curve: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [r["step"] for r in curve]
    ax.plot(steps, [r["kl"] for r in curve], lw=0.8, alpha=0.4, label="KL per step")
    k = max(1, len(curve) // 20)
    smooth = [sum(r["kl"] for r in curve[max(0, i - k + 1):i + 1]) / len(curve[max(0, i - k + 1):i + 1])
              for i in range(len(curve))]
    ax.plot(steps, smooth, lw=1.8, label=f"running mean ({k})")
    if curve and "hidden_mse" in curve[0]:
        ax.plot(steps, [r["hidden_mse"] for r in curve], lw=0.8, label="hidden MSE (normalised)")
    ax.set_xlabel("step")
    ax.set_ylabel("KL(source || student), nats/token")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def start_world(world, device: torch.device, settings: Heal, out: Path) -> torch.device:
    """Joins the torchrun world after the checks every rank makes alike; returns this rank's device."""
    from . import arch as A
    from . import distributed
    from .report import console

    if not world.main:
        console.quiet = True  # rank 0 speaks for all
    if settings.batch % world.size:
        raise SlimError(f"--batch {settings.batch} does not split over {world.size} ranks",
                        f"pick a --batch that is a multiple of {world.size}: every rank takes an equal share")
    config = read_json(out / CONFIG_FILE)
    distributed.refuse_unsupported(settings, A.FAMILIES.get(config.get("model_type")),
                                   config.get("model_type") in A.MULTIMODAL)
    return distributed.start(world, device)


def check_resume_kind(target: Path, world, resume: bool) -> None:
    """A resume checkpoint is one process's file or a distributed folder; the other kind cannot be read."""
    if not resume:
        return
    from .distributed import resume_dir

    other = _resume_path(target) if world else resume_dir(target)
    if other.exists():
        what = "one process's checkpoint" if world else "a distributed (torchrun) checkpoint"
        how = "as one process (without torchrun)" if world else "under torchrun (any number of ranks)"
        raise SlimError(f"--resume: {other} is {what}, and this run is "
                        f"{'distributed' if world else 'one process'}",
                        f"resume it {how}, or run without --resume to start over")


def sharded_models(src_dir: Path, out: Path, plan: Plan, settings: Heal, device: torch.device,
                   gen: torch.Generator):
    """Teacher and student built on the meta device, FSDP2-sharded, then filled with this rank's slices of
    their weight files; the student's trainable parts set (adapters drawn after loading, as one process
    draws them). Returns (teacher, student, trained layers, changed tensor names)."""
    from . import distributed

    teacher = distributed.empty_model(src_dir)
    for p in teacher.parameters():
        p.requires_grad_(False)
    distributed.shard(teacher, _layers(teacher), settings.shard)
    distributed.load_shards(teacher, src_dir, device)
    student = distributed.empty_model(out)
    student.config.early_exit_enabled = False
    layers, changed = trainable(student, plan, settings, None)
    distributed.shard(student, _layers(student), settings.shard)
    distributed.load_shards(student, out, device)
    reset_adapters(student, gen)
    return teacher, student, layers, changed


def run_heal(out, settings: Heal, target=None, force: bool = False, resume: bool = False) -> Path:
    """Heals output ``out`` into ``target`` (default OUT-healed); returns the healed folder."""
    from .data import check_training, describe_training, load_text, token_chunks
    from .allocator import return_freed_memory, trim_heap
    from .recipe import load_recipe
    from .report import console, print_heal, write_card
    from .source import resolve_source
    from .validate import compare_three, environment, healed_exactness

    out = require_validated(out)
    meta = read_json(out / PLAN_FILE)
    recipe = load_recipe(out / RECIPE_FILE)
    plan = Plan(**meta["plan"])
    check_training(settings.data, "--data / heal.data")
    check_quant(settings)
    device = pick_device(settings.device)
    from . import distributed

    world = distributed.current()
    if world:
        device = start_world(world, device, settings, out)
        if device.type == "cpu" and settings.shard == "full":
            # Ranks share one machine's RAM, so here freed memory goes back (measured: 0.54x the peak per rank, for
            # steps 19% slower). grad-op has chosen speed over memory and keeps glibc's faster default, as one
            # process does: the setting made their steps 18% and 26% slower.
            return_freed_memory()
    src_dir = resolve_source(recipe.model, recipe.allow_pickle)
    source_hash = check_source(meta, src_dir, recipe.model, out)
    target = Path(target) if target else Path(settings.output) if settings.output else default_target(out)
    refuse_overlap(target, [(out, "unhealed output")] + source_paths(recipe.model, src_dir), "-o/--out")
    atomic, refusal = None, None
    if world is None or world.main:  # the one writer: another rank taking its lock would be refused
        try:
            atomic = AtomicDir(target, force, "-o/--out")
        except SlimError as e:
            if world is None:
                raise
            refusal = e
    if world:
        distributed.agree(refusal)
    q = recipe.validation.quality
    tokenizer = load_tokenizer(out)
    # Every text is read before any work, so a missing file fails now, not after an hour of training.
    texts = {q.data: load_text(q.data, "test"), settings.eval_text: load_text(settings.eval_text, "test")}
    # Sampled windows need the teacher, so they come once it is loaded; text windows are cut now.
    generated = "generated" in settings.data.split("+")
    if not generated:
        windows = training_windows(None, src_dir, settings, settings.steps * settings.batch, device)
    absolute = Path(os.path.abspath(target))
    resume_file = distributed.resume_dir(absolute) if world else _resume_path(absolute)
    check_resume_kind(absolute, world, resume)
    data = describe_training(settings.data, settings.generated_windows)
    console.print(f"heal {out} -> {target}: teacher {recipe.model}, {settings.train}, {settings.steps} steps x "
                  f"{settings.batch} x {settings.seq_len} tokens of {data}, lr {settings.lr}, device {device}"
                  + (f", {world.size} ranks (FSDP2, {settings.shard} sharding), {settings.batch // world.size} "
                     "windows each per step"
                     if world else ""))
    # Rank 0 writes the output; the other ranks train, hand over their shards, and leave.
    with atomic if world is None or world.main else contextlib.nullcontext() as tmp:
        torch.manual_seed(settings.seed)
        gen = torch.Generator().manual_seed(settings.seed)
        if world:
            models, refusal = None, None
            try:
                models = sharded_models(src_dir, out, plan, settings, device, gen)
            except (SlimError, OSError, RuntimeError) as e:  # a rank that cannot read its shards
                refusal = e if isinstance(e, SlimError) else SlimError(
                    f"cannot read its shards of the weights ({type(e).__name__}: {e})",
                    f"check that every rank sees {src_dir} and {out} whole (a shared filesystem)")
            distributed.agree(refusal)
            teacher, student, layers, changed = models
        else:
            teacher = load_model(src_dir).to(device)
            for p in teacher.parameters():
                p.requires_grad_(False)
            student = load_model(out).to(device)
            student.config.early_exit_enabled = False
        sampling_s = 0.0
        if generated:
            t = time.time()
            windows = training_windows(teacher, src_dir, settings, settings.steps * settings.batch, device)
            sampling_s = time.time() - t
        if not world:
            layers, changed = trainable(student, plan, settings, gen)
            student.to(device)
        wrapped = fake_quantise(student, settings.quant) if settings.quant != "none" else []
        n_train = sum(p.numel() for p in student.parameters() if p.requires_grad)
        k = 0 if world else shared_prefix(plan, layers, settings.quant)
        console.print(f"training output layers {layers} ({n_train / 1e6:.2f}M parameters"
                      f"{', adapters' if settings.train == 'lora' else ''})"
                      + (f"; layers 0-{k - 1} are the source's, so the student starts from the teacher's "
                         f"hidden state at layer {k}" if k else ""))
        unhealed_hash = weights_sha256(out)
        # What moves the tensors between ranks (shard) leaves the training as it is: a resume may change it.
        trained_as = settings.model_dump(exclude={"max_minutes", "checkpoint_every", "output", "shard"})
        fingerprint = dict(settings=trained_as, source=source_hash, unhealed=unhealed_hash)
        trim_heap()
        run = distil(teacher, student, windows, plan, settings, device, layers, resume_file, resume, fingerprint,
                     world)
        run["peak_rss_mb_training"] = _peak_rss_mb()  # before the evaluation loads three whole models
        if world:
            run["world_size"] = world.size
            run["peak_rss_mb_per_rank"] = distributed.gathered(run["peak_rss_mb_training"])
            state = distributed.full_state(student)
            del student, teacher
            distributed.finish()
            if not world.main:
                return target
            # Rank 0 alone from here: the trained state in a plain model, the teacher whole for the evaluation.
            student = load_model(out).to(device)
            student.config.early_exit_enabled = False
            trainable(student, plan, settings, None)
            student.load_state_dict(state)
            del state
            teacher = load_model(src_dir).to(device)
        release(wrapped)
        if settings.train == "lora":
            merge_lora(student)
        _write_weights(student, out, tmp, set(changed))
        for name in dict.fromkeys(INHERITED):
            if (out / name).is_file():
                shutil.copy2(out / name, tmp / name)
        healed_meta = dict(meta, heal=dict(unhealed=str(out.resolve()), unhealed_sha256=unhealed_hash,
                                           source_sha256=source_hash, train=settings.train, trained_layers=layers,
                                           trained_tensors=changed))
        write_json(tmp / PLAN_FILE, healed_meta)
        del student
        console.print("quality: source / unhealed / healed on held-out text of two domains")
        source = teacher.eval()
        unhealed_model, healed_model = load_model(out).to(device), load_model(tmp).to(device)
        for m in (unhealed_model, healed_model):
            m.config.early_exit_enabled = False
        evals = {}
        for name, text in texts.items():
            chunks = token_chunks(tokenizer, text, q.samples, q.seq_len)
            evals[name] = compare_three(source, unhealed_model, healed_model, chunks, q, device)
        device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
        peak = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None)
        report = dict(settings=settings.model_dump(), unhealed=str(out.resolve()), trained_layers=layers,
                      trainable_parameters=n_train, device=device_name, peak_rss_mb=_peak_rss_mb(),
                      peak_cuda_mb=peak, sampling_s=sampling_s, eval=evals, first_text=q.data,
                      second_text=settings.eval_text,
                      **{k: v for k, v in run.items()})
        write_json(tmp / HEAL_FILE, report)
        _plot(run["curve"], tmp / HEAL_PLOT, f"heal {out.name} ({settings.train})")
        validation = dict(exactness=healed_exactness(tmp, out, unhealed_hash, changed),
                          quality=evals[q.data]["healed"], quality_unhealed=evals[q.data]["unhealed"])
        validation["passed"] = all(validation[k]["passed"] for k in ("exactness", "quality"))
        validation["environment"] = environment()
        write_json(tmp / REPORT_FILE, validation)
        write_card(tmp)
    if resume_file.is_dir():
        shutil.rmtree(resume_file)
    resume_file.unlink(missing_ok=True)
    print_heal(read_json(target / HEAL_FILE))
    console.print(f"[green]wrote[/] {target}")
    return target
