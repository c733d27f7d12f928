"""Running a source model one layer at a time, straight from its safetensors.

Analysis pushes the whole calibration set through one layer, then the next, so only one layer's
weights (plus the activations) need to be in memory: models larger than RAM can be analysed. Layers
are built by the converter's own weight rewrite (``layout.layer_jobs``) into the slim modeling
code's layer class, so a candidate (a removed sublayer, a wide parallel layer) is evaluated exactly as
the converted checkpoint would compute it.
"""
import copy
import math
from collections import OrderedDict

import torch
import torch.nn.functional as F

from .. import arch as A
from ..layout import as_slim_config, layer_jobs, tensor_jobs
from ..plan import LayerSpec, Plan, layer_spec, source_plan
from ..runtime import pick_device
from ..source import Checkpoint


def group_spec(config: dict, members: list[int], attention: bool = True, mlp: bool = True) -> LayerSpec:
    """The layer spec of source layers ``members`` evaluated as one (wide) layer, optionally without a sublayer."""
    return layer_spec(config, members, members if attention else [], members if mlp else [])


class LayerBank:
    """Decoder layers for layer specs over one source checkpoint, kept in memory up to ``budget`` bytes
    (least recently used first out); ``budget=None`` keeps every layer once built."""

    def __init__(self, ckpt: Checkpoint, norm: str = "per_layer", budget: int | None = None, device: str = "cpu"):
        self.ckpt = ckpt
        self.device = pick_device(device)
        self.config = as_slim_config(ckpt.config)
        self.arch = A.get_arch(ckpt.config)
        self.norm = norm
        self.budget = budget
        self._cache: OrderedDict[str, torch.nn.Module] = OrderedDict()
        self._sizes: dict[str, int] = {}
        self.loads = 0
        tied = A.LM_HEAD not in ckpt or ckpt.config.get("tie_word_embeddings", False)
        self.embed = ckpt.get(A.EMBED).float().to(self.device)
        self.head = self.embed if tied else ckpt.get(A.LM_HEAD).float().to(self.device)
        # The final norm in the canonical layout (offset and logits multiplier folded), as the converter writes it.
        final = next(j for j in tensor_jobs(Plan(model_type=ckpt.config["model_type"], num_source_layers=0, layers=[],
                                                 norm=norm, notes=[]), ckpt, "float32", renamed=False, arch=self.arch)
                     if j.name == A.FINAL_NORM)
        self.final_norm = final.compute().float().to(self.device)
        self.eps = ckpt.config.get("rms_norm_eps", 1e-6)

    def layer(self, spec: LayerSpec) -> torch.nn.Module:
        from ..modeling.modeling_slim import SlimDecoderLayer

        key = spec.model_dump_json()
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        with torch.device("meta"):  # the weights come from the checkpoint: skip random initialisation
            module = SlimDecoderLayer(self.config, spec.model_dump(), 0)
        prefix = A.LAYER.format(i=0)
        state = {j.name[len(prefix):]: j.compute().float() for j in layer_jobs(spec, 0, self.ckpt, self.arch,
                                                                              self.norm, "float32")}
        module.load_state_dict(state, assign=True)
        module.to(self.device).eval()
        self.loads += 1
        size = sum(t.numel() * 4 for t in state.values())
        if self.budget is None or size <= self.budget:
            self._cache[key], self._sizes[key] = module, size
            while self.budget is not None and sum(self._sizes.values()) > self.budget:
                old, _ = self._cache.popitem(last=False)
                del self._sizes[old]
        return module


class Runner:
    """The calibration set's activations pushed through layers, in sample batches."""

    def __init__(self, bank: LayerBank, ids: torch.Tensor, batch_size: int = 8):
        from ..modeling.modeling_slim import mask_factory, rotary_embeddings

        self.bank, self.ids, self.batch_size = bank, ids.to(bank.device), batch_size
        t = ids.shape[1]
        x, positions = torch.zeros(1, t, 1, device=bank.device), torch.arange(t, device=bank.device)[None]
        self.rope = {kind: rope.to(bank.device)(x, positions) for kind, rope in rotary_embeddings(bank.config).items()}
        self.masks = mask_factory(None, 0, t, torch.float32, bank.device)

    def embed(self) -> torch.Tensor:
        from ..modeling.modeling_slim import embed_scale

        return embed_scale(self.bank.config, F.embedding(self.ids, self.bank.embed))

    @property
    def windows(self) -> int:
        return self.ids.shape[0]

    def subset(self, windows: slice) -> "Runner":
        """The same engine on calibration windows ``windows`` only (exact for them: windows are independent)."""
        view = copy.copy(self)
        view.ids = self.ids[windows]
        return view

    def batches(self, n: int):
        for i in range(0, n, self.batch_size):
            yield slice(i, min(i + self.batch_size, n))

    @torch.no_grad()
    def apply(self, spec: LayerSpec, x: torch.Tensor) -> torch.Tensor:
        layer = self.bank.layer(spec)
        out = torch.empty_like(x)
        for s in self.batches(len(x)):
            out[s] = layer(x[s], self.rope, self.masks, None)
        return out

    @torch.no_grad()
    def sublayers(self, spec: LayerSpec, x: torch.Tensor):
        """(after attention, after MLP) for one full source layer: the residual stream at both points."""
        layer = self.bank.layer(spec)
        mid, out = torch.empty_like(x), torch.empty_like(x)
        for s in self.batches(len(x)):
            h = x[s] + layer.attention_block(x[s], self.rope, self.masks, None)
            mid[s], out[s] = h, h + layer.mlp_block(h)
        return mid, out

    @torch.no_grad()
    def nll(self, x: torch.Tensor, rows: int = 4096) -> float:
        """Mean next-token negative log-likelihood of the final hidden states ``x`` (logits ``rows`` at a time)."""
        h = x[:, :-1].reshape(-1, x.shape[-1])
        target = self.ids[:, 1:].reshape(-1)
        total = 0.0
        for i in range(0, len(h), rows):
            total += F.cross_entropy(self.logits(h[i:i + rows]), target[i:i + rows], reduction="sum").item()
        return total / len(h)

    @torch.no_grad()
    def window_nlls(self, x: torch.Tensor) -> list[float]:
        """Mean next-token NLL of each window (the mean of these is ``nll``)."""
        return [self.subset(slice(i, i + 1)).nll(x[i:i + 1]) for i in range(len(x))]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final RMSNorm and LM head of hidden states ``h`` (rows, hidden)."""
        from ..modeling.modeling_slim import final_softcap

        b = self.bank
        return final_softcap(b.config, (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + b.eps) * b.final_norm) @ b.head.T)


def layer_scores(runner: Runner, config: dict, layers: set[int], score) -> dict:
    """``score(runner, spec, mid)`` of source layers ``layers``, ``mid`` the residual stream after each one's
    attention, pushing the calibration set through the source up to the last of them."""
    specs = source_plan(config).layers
    x, out = runner.embed(), {}
    for i, spec in enumerate(specs[: max(layers) + 1]):
        mid, x = runner.sublayers(spec, x)
        if i in layers:
            out[i] = score(runner, spec, mid)
    return out


def ppl(nll: float) -> float:
    return math.exp(nll)


Candidate = tuple[int, int, list[LayerSpec]]  # (position in the stack, layers replaced, replacement)


def candidate_nlls(runner: Runner, stack: list[LayerSpec], candidates: list[Candidate],
                   prefix_cache: bool = True, progress=None) -> list[float]:
    """Calibration NLL of the model ``stack`` with, for each candidate ``(pos, span, replacement)``,
    ``stack[pos:pos + span]`` replaced by ``replacement``.

    With ``prefix_cache`` the hidden states entering ``stack[pos]`` are computed once, advancing along
    the stack, and shared by every candidate at that position; without it (the naive loop) each
    candidate runs the whole model from the embeddings.

    Under torchrun (analyze, search) every rank scores every candidate on its own contiguous share of the
    windows, and the shares' NLLs are combined by window count: the mean over all windows, on every rank.
    """
    from .. import distributed

    share = distributed.window_share(runner.windows)
    if share is None:
        return _local_nlls(runner, stack, candidates, prefix_cache, progress)
    local = _local_nlls(runner.subset(share), stack, candidates, prefix_cache, progress)
    return distributed.combine(local, share.stop - share.start, runner.windows)


def _local_nlls(runner: Runner, stack: list[LayerSpec], candidates: list[Candidate], prefix_cache: bool,
                progress) -> list[float]:
    order = sorted(range(len(candidates)), key=lambda c: candidates[c][0])
    result = [0.0] * len(candidates)
    x0 = runner.embed()
    base, at = x0, 0
    for c in order:
        pos, span, replacement = candidates[c]
        if prefix_cache:
            while at < pos:
                base = runner.apply(stack[at], base)
                at += 1
            h = base
        else:
            h = x0
            for spec in stack[:pos]:
                h = runner.apply(spec, h)
        for spec in list(replacement) + stack[pos + span:]:
            h = runner.apply(spec, h)
        result[c] = runner.nll(h)
        if progress is not None:
            progress.update(1)
    return result


class Halving:
    """Successive halving over the calibration windows: every candidate is scored on the first ``first``
    fraction of the windows, the best ``keep`` fraction (at least ``min_keep``) goes on to twice as many
    windows (only the new ones are run: a window's loss does not depend on the others), and so on until
    the survivors are scored on every window. ``prior`` scores (the previous step's ranking) let only the
    best ``prior_keep`` fraction of the candidates that have one into the first round. Only candidates
    scored on every window can be chosen; with few windows (or ``exact``) it is one round on all of them.
    """

    def __init__(self, first: float = 0.25, keep: float = 1 / 3, min_keep: int = 3, prior_keep: float = 0.5):
        self.first, self.keep, self.min_keep, self.prior_keep = first, keep, min_keep, prior_keep

    def rounds(self, windows: int) -> list[int]:
        """Cumulative window counts of the rounds, ending with ``windows``."""
        counts = [max(1, math.ceil(windows * self.first - 1e-9))]  # k/n * n may round above k
        while counts[-1] < windows:
            counts.append(min(windows, 2 * counts[-1]))
        return counts


def ranked_nlls(runner: Runner, stack: list[LayerSpec], candidates: list[Candidate], score=None,
                halving: Halving | None = None, prior: list[float | None] | None = None,
                progress=None) -> tuple[list[float | None], list[int]]:
    """Calibration NLL of each candidate (as ``candidate_nlls``) and the number of windows it was scored on,
    with successive halving (``halving``; None: every candidate on every window, exact).

    ``score(i, nll, windows)`` is what ranks candidate ``i`` from its NLL on the first ``windows`` windows
    (lower is better; default the NLL itself). A candidate
    dropped before the first round has NLL None. Candidates are compared on the windows they share, and
    the windows are the same for every candidate in a round, so halving only decides who is scored further;
    the final choice is made among candidates scored on every window, on their exact full-window losses.
    """
    score = score or (lambda i, v, w: v)
    n, windows = len(candidates), runner.windows
    if halving is None or windows == 1:
        nlls = candidate_nlls(runner, stack, candidates, progress=progress)
        return nlls, [windows] * n
    alive = list(range(n))
    if prior is not None:
        known = sorted((i for i in alive if prior[i] is not None), key=lambda i: prior[i])
        cut = max(halving.min_keep, math.ceil(len(known) * halving.prior_keep))
        alive = sorted(set(alive) - set(known[cut:]))
    sums, seen = [0.0] * n, [0] * n
    done = 0
    rounds = halving.rounds(windows)
    for r, upto in enumerate(rounds):
        part = runner.subset(slice(done, upto))
        if progress is not None:
            progress.total = (progress.total or 0) + len(alive)
            progress.set_postfix_str(f"windows {done + 1}-{upto} of {windows}", refresh=True)
        nlls = candidate_nlls(part, stack, [candidates[i] for i in alive], progress=progress)
        for i, v in zip(alive, nlls):
            sums[i] += v * (upto - done)
            seen[i] = upto
        done = upto
        if r + 1 < len(rounds):
            ranked = sorted(alive, key=lambda i: score(i, sums[i] / seen[i], seen[i]))
            alive = sorted(ranked[:max(halving.min_keep, math.ceil(len(alive) * halving.keep))])
    return [sums[i] / seen[i] if seen[i] else None for i in range(n)], seen


@torch.no_grad()
def final_hidden(runner: Runner, stack: list[LayerSpec]) -> torch.Tensor:
    """The last hidden states of the model ``stack`` on the runner's windows."""
    h = runner.embed()
    for spec in stack:
        h = runner.apply(spec, h)
    return h


@torch.no_grad()
def kl_divergence(runner: Runner, reference: torch.Tensor, h: torch.Tensor, rows: int = 2048) -> float:
    """Mean KL(reference || h) of the next-token distributions of two final hidden states, nats per token."""
    a, b = (t[:, :-1].reshape(-1, t.shape[-1]) for t in (reference, h))
    total = 0.0
    for i in range(0, len(a), rows):
        p = F.log_softmax(runner.logits(a[i:i + rows]), -1)
        q = F.log_softmax(runner.logits(b[i:i + rows]), -1)
        total += F.kl_div(q, p, log_target=True, reduction="sum").item()
    return total / len(a)
