"""Running a source model one layer at a time, straight from its safetensors.

Analysis pushes the whole calibration set through one layer, then the next, so only one layer's
weights (plus the activations) need to be in memory: models larger than RAM can be analysed. Layers
are built by the converter's own weight rewrite (``layout.layer_jobs``) into the slim modeling
code's layer class, so a candidate (a removed sublayer, a wide parallel layer) is evaluated exactly as
the converted checkpoint would compute it.
"""
import math
from collections import OrderedDict

import torch
import torch.nn.functional as F

from . import arch as A
from .layout import as_slim_config, layer_jobs
from .plan import LayerSpec, layer_spec
from .source import Checkpoint


def group_spec(config: dict, members: list[int], attention: bool = True, mlp: bool = True) -> LayerSpec:
    """The layer spec of source layers ``members`` evaluated as one (wide) layer, optionally without a sublayer."""
    return layer_spec(config, members, members if attention else [], members if mlp else [])


class LayerBank:
    """Decoder layers for layer specs over one source checkpoint, kept in memory up to ``budget`` bytes
    (least recently used first out); ``budget=None`` keeps every layer once built."""

    def __init__(self, ckpt: Checkpoint, norm: str = "per_layer", budget: int | None = None, device: str = "cpu"):
        self.ckpt = ckpt
        self.device = torch.device(device)
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
        self.final_norm = ckpt.get(A.FINAL_NORM).float().to(self.device)
        self.eps = ckpt.config.get("rms_norm_eps", 1e-6)

    def layer(self, spec: LayerSpec) -> torch.nn.Module:
        from .modeling.modeling_slim import SlimDecoderLayer

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
        from .modeling.modeling_slim import mask_factory
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        self.bank, self.ids, self.batch_size = bank, ids.to(bank.device), batch_size
        t = ids.shape[1]
        rope = LlamaRotaryEmbedding(config=bank.config).to(bank.device)
        self.rope = rope(torch.zeros(1, t, 1, device=bank.device), torch.arange(t, device=bank.device)[None])
        self.masks = mask_factory(None, 0, t, torch.float32, bank.device)

    def embed(self) -> torch.Tensor:
        return F.embedding(self.ids, self.bank.embed)

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
            h = x[s] + layer.self_attn(layer.input_layernorm(x[s]), self.rope, self.masks, None)
            mid[s], out[s] = h, h + layer.mlp(layer.post_attention_layernorm(h))
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

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final RMSNorm and LM head of hidden states ``h`` (rows, hidden)."""
        b = self.bank
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + b.eps) * b.final_norm) @ b.head.T


def ppl(nll: float) -> float:
    return math.exp(nll)


def candidate_nlls(runner: Runner, stack: list[LayerSpec], candidates: list[tuple[int, int, list[LayerSpec]]],
                   prefix_cache: bool = True, progress=None) -> list[float]:
    """Calibration NLL of the model ``stack`` with, for each candidate ``(pos, span, replacement)``,
    ``stack[pos:pos + span]`` replaced by ``replacement``.

    With ``prefix_cache`` the hidden states entering ``stack[pos]`` are computed once, advancing along
    the stack, and shared by every candidate at that position; without it (the naive loop) each
    candidate runs the whole model from the embeddings.
    """
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
