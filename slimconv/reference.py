"""The independent reference: the *source* model, with the plan's removals and parallel groups applied at
run time to its own modules. It shares no code with the converter or the slim modeling file, so agreement
between the two is evidence that the conversion is exact.

It is architecture-agnostic where it can be (DESIGN.md, "Families, widths and serving"): a removed block is
skipped, and a removed sublayer's module outputs zeros, so whatever norm the family puts around it (an output
norm of zero is zero) and whatever multiplier it scales it by, the sublayer adds exactly nothing to the
residual stream. Pruned experts are taken out of the source's own MoE block (its router's softmax then runs over
the kept ones). A narrowed MLP is the source's MLP with the other channels masked to zero at its down projection's
input; merged KV heads are recomputed here from the source's projections, query head by query head. Only a parallel
group needs to know the layer's layout: its members' sublayers read the same
input and their outputs are summed, which ``RuntimeLayer`` does with the source's own norms and modules.
"""
import torch
from torch import nn

from .arch import Arch, get_arch, kv_heads
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


def _mask_channels(layer: nn.Module, arch: Arch, kept: list[int]) -> None:
    """A narrowed MLP as the source's own MLP with every other channel masked to zero at its down projection's
    input."""
    down = layer.get_submodule(arch.names.down)
    mask = torch.zeros(down.in_features, dtype=down.weight.dtype)
    mask[kept] = 1
    down.register_forward_pre_hook(lambda module, args: (args[0] * mask.to(args[0].device),) + args[1:])


def _merge_kv(attn: nn.Module, arch: Arch, config: dict, count: int) -> None:
    """The source's own attention module with ``count`` KV heads: each new head's k and v projection is the mean of
    the source KV heads read by the query heads it serves (one per query head, so each source head weighs by how
    many of those queries read it), and the module's grouping is set so that its query heads share them."""
    heads, kv, d = config["num_attention_heads"], kv_heads(config), arch.head_dim
    serve, read = heads // count, heads // kv
    mix = torch.zeros(count, kv, dtype=torch.float64)
    for q in range(heads):
        mix[q // serve, q // read] += 1 / serve

    def merged(w):  # (kv * d, ...) -> (count * d, ...)
        t = w.detach().double().reshape(kv, d, -1)
        return torch.einsum("nk,kdi->ndi", mix, t).reshape(count * d, *w.shape[1:]).to(w.dtype)

    if arch.names.qkv:  # one fused projection: q rows, then k, then v
        fused = attn.get_submodule(arch.names.qkv.removeprefix("self_attn."))
        parts = lambda w: (w[: heads * d], merged(w[heads * d: (heads + kv) * d]), merged(w[(heads + kv) * d:]))
        fused.weight = nn.Parameter(torch.cat(parts(fused.weight.data)), requires_grad=False)
        if fused.bias is not None:
            fused.bias = nn.Parameter(torch.cat(parts(fused.bias.data)), requires_grad=False)
        fused.out_features = fused.weight.shape[0]
    else:
        for p in (arch.names.k, arch.names.v):
            proj = attn.get_submodule(p.removeprefix("self_attn."))
            proj.weight = nn.Parameter(merged(proj.weight.data), requires_grad=False)
            if proj.bias is not None:
                proj.bias = nn.Parameter(merged(proj.bias.data), requires_grad=False)
            proj.out_features = proj.weight.shape[0]
    attn.num_key_value_groups = serve
    if hasattr(attn, "num_key_value_heads"):
        attn.num_key_value_heads = count


def apply_plan(model: nn.Module, plan: Plan) -> nn.Module:
    """Rewires a loaded source causal LM in place so that its forward computes the plan. Every source layer
    keeps its index (so the family's per-layer masks and RoPE still reach it); what the plan removes or merges
    is replaced there."""
    config = model.config.to_dict()
    arch = get_arch(config)
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
        elif spec.attention.merged_from:
            _merge_kv(layer.self_attn, arch, config, spec.attention.num_key_value_heads)
        if spec.mlp is None:
            layer.mlp = _ZeroMLP()
        elif spec.mlp.pruned:
            _keep_experts(layer.mlp, spec.mlp.experts, spec.mlp.top_k)
        elif spec.mlp.channels is not None:
            _mask_channels(layer, arch, spec.mlp.channels)
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
