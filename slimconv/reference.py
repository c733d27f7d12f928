"""The independent reference: the *source* model, with the plan's removals and parallel groups applied at
run time to its own modules. It shares no code with the converter or the slim modeling file, so agreement
between the two is evidence that the conversion is exact.

It is architecture-agnostic where it can be (DESIGN.md, "Families, widths and serving"): a removed block is
skipped, and a removed sublayer's module outputs zeros, so whatever norm the family puts around it (an output
norm of zero is zero) and whatever multiplier it scales it by, the sublayer adds exactly nothing to the
residual stream. Pruned experts are taken out of the source's own MoE block (its router's softmax then runs over
the kept ones). Only a parallel group needs to know the layer's layout: its members' sublayers read the same
input and their outputs are summed, which ``RuntimeLayer`` does with the source's own norms and modules.
"""
import torch
from torch import nn

from .arch import Arch, get_arch
from .plan import LayerSpec, Plan


class _Skipped(nn.Module):
    """A removed block: the hidden state passes through (a decoder layer returns the next hidden state)."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class _ZeroAttention(nn.Module):
    """A removed attention sublayer: adds zeros (attention modules return (output, weights))."""

    def forward(self, hidden_states, *args, **kwargs):
        return torch.zeros_like(hidden_states), None


class _ZeroMLP(nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


def _shared_norm(norms: list[nn.Module], x: torch.Tensor, offset: float) -> torch.Tensor:
    """RMSNorm with the members' mean gain: the LP authors' shared post-attention norm."""
    gain = torch.stack([n.weight + offset for n in norms]).mean(0)
    eps = getattr(norms[0], "variance_epsilon", getattr(norms[0], "eps", 1e-6))
    dtype = x.dtype
    x = x.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return gain * x.to(dtype)


class RuntimeLayer(nn.Module):
    """Evaluates source layers as one plan layer: h = x + r sum Attn_l(n1_l(x)); y = h + r sum MLP_l(n2_l(h)),
    with r the family's residual multiplier (a pre-norm family: ``build_plan`` refuses groups elsewhere)."""

    def __init__(self, source_layers: nn.ModuleList, spec: LayerSpec, norm: str, arch: Arch):
        super().__init__()
        self.attn = nn.ModuleList(source_layers[m] for m in (spec.attention.sources if spec.attention else []))
        self.mlp = nn.ModuleList(source_layers[m] for m in (spec.mlp.sources if spec.mlp else []))
        self.mean_norm = norm == "mean" and len(self.mlp) > 1
        self.attn_in, self.mlp_in = arch.names.attn_in, arch.names.mlp_in
        self.residual, self.offset = arch.residual_multiplier, arch.family.norm_offset

    def forward(self, hidden_states, **kwargs):
        # No cache reaches the source layers, under whichever name this transformers passes it: the
        # reference recomputes every step.
        for name in ("use_cache", "cache", "past_key_values", "cache_params"):
            kwargs.pop(name, None)
        x = hidden_states
        if len(self.attn):
            x = x + self.residual * sum(l.self_attn(hidden_states=getattr(l, self.attn_in)(hidden_states),
                                                    **kwargs)[0] for l in self.attn)
        if len(self.mlp):
            if self.mean_norm:
                n = _shared_norm([getattr(l, self.mlp_in) for l in self.mlp], x, self.offset)
                x = x + self.residual * sum(l.mlp(n) for l in self.mlp)
            else:
                x = x + self.residual * sum(l.mlp(getattr(l, self.mlp_in)(x)) for l in self.mlp)
        return x


def _keep_experts(moe: nn.Module, kept: list[int], top_k: int) -> None:
    """Masks a transformers MoE block down to experts ``kept``, through its own modules: the router's rows and the
    experts' stacked tensors of the others go, so its softmax runs over the kept experts only, exactly what masking
    the others' logits to -inf gives."""
    index = torch.tensor(kept)
    for module, names in ((moe.gate, ("weight",)), (moe.experts, ("gate_up_proj", "down_proj"))):
        for name in names:
            setattr(module, name, nn.Parameter(getattr(module, name).data[index], requires_grad=False))
        module.num_experts = len(kept)
    for module in (moe, moe.gate):
        if hasattr(module, "top_k"):
            module.top_k = top_k


def apply_plan(model: nn.Module, plan: Plan) -> nn.Module:
    """Rewires a loaded source causal LM in place so that its forward computes the plan. Every source layer
    keeps its index (so the family's per-layer masks and RoPE still reach it); what the plan removes or merges
    is replaced there."""
    arch = get_arch(model.config.to_dict())
    layers = model.model.layers
    replaced = {m: _Skipped() for m in range(plan.num_source_layers)}
    for spec in plan.layers:
        first = spec.source_layers[0]
        if len(spec.source_layers) > 1:
            replaced[first] = RuntimeLayer(layers, spec, plan.norm, arch)
            continue
        layer = layers[first]
        if spec.attention is None:
            layer.self_attn = _ZeroAttention()
        if spec.mlp is None:
            layer.mlp = _ZeroMLP()
        elif spec.mlp.pruned:
            _keep_experts(layer.mlp, spec.mlp.experts, spec.mlp.top_k)
        del replaced[first]
    for m, module in replaced.items():
        layers[m] = module
    model.config.use_cache = False
    return model


@torch.no_grad()
def greedy_no_cache(model: nn.Module, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy continuation recomputing the whole sequence each step (no KV cache involved)."""
    for _ in range(steps):
        nxt = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
    return ids
