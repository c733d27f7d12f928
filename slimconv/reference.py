"""The independent reference: the *source* model, with the plan's removals and parallel groups applied at
run time by rewiring its own modules. It shares no code with the converter or the slim modeling file,
so agreement between the two is evidence that the conversion is exact.
"""
import torch
from torch import nn

from .plan import LayerSpec, Plan


def _shared_norm(norms: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """RMSNorm with the members' mean gain: the LP authors' shared post-attention norm."""
    gain = torch.stack([n.weight for n in norms]).mean(0)
    dtype = x.dtype
    x = x.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norms[0].variance_epsilon)
    return gain * x.to(dtype)


class RuntimeLayer(nn.Module):
    """Evaluates source layers as one plan layer: h = x + sum Attn_l(n1_l(x)); y = h + sum MLP_l(n2_l(h))."""

    def __init__(self, source_layers: nn.ModuleList, spec: LayerSpec, norm: str):
        super().__init__()
        self.attn = nn.ModuleList(source_layers[m] for m in (spec.attention.sources if spec.attention else []))
        self.mlp = nn.ModuleList(source_layers[m] for m in (spec.mlp.sources if spec.mlp else []))
        self.mean_norm = norm == "mean" and len(self.mlp) > 1

    def forward(self, hidden_states, **kwargs):
        # No cache reaches the source layers, under whichever name this transformers passes it: the
        # reference recomputes every step.
        for name in ("use_cache", "cache", "past_key_values", "cache_params"):
            kwargs.pop(name, None)
        x = hidden_states
        if len(self.attn):
            x = x + sum(l.self_attn(hidden_states=l.input_layernorm(hidden_states), **kwargs)[0] for l in self.attn)
        if len(self.mlp):
            if self.mean_norm:
                n = _shared_norm([l.post_attention_layernorm for l in self.mlp], x)
                x = x + sum(l.mlp(n) for l in self.mlp)
            else:
                x = x + sum(l.mlp(l.post_attention_layernorm(x)) for l in self.mlp)
        return x


def apply_plan(model: nn.Module, plan: Plan) -> nn.Module:
    """Rewires a loaded source causal LM in place so that its forward computes the plan."""
    source = model.model.layers
    types = getattr(model.config, "layer_types", None)
    model.model.layers = nn.ModuleList(RuntimeLayer(source, s, plan.norm) for s in plan.layers)
    model.config.num_hidden_layers = len(plan.layers)
    if types:
        model.config.layer_types = [types[(s.attention.sources if s.attention else s.source_layers)[0]]
                                    for s in plan.layers]
    model.config.use_cache = False
    return model


@torch.no_grad()
def greedy_no_cache(model: nn.Module, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy continuation recomputing the whole sequence each step (no KV cache involved)."""
    for _ in range(steps):
        nxt = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
    return ids
