"""A decoder whose layers each have an optional attention (own head counts) and an optional MLP (own width).

slimconv copies this file beside the weights, so that
``AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)`` works without slimconv installed.
It depends on torch and transformers only, and is proven on the transformers versions named in
``configuration_slim.PROVEN_TRANSFORMERS`` (oldest and newest, by slimconv's compatibility matrix).
transformers has renamed how the KV cache travels (``past_key_values`` until 5.23, ``cache`` from
5.24), so this file reads the cache under every name, returns it under the name the installed
version's output classes use, and creates the cache itself: it relies only on the public Cache API
(``update``, ``get_seq_length``) and on ``generate()`` accepting a cache object.

A wide layer (layer parallelism) is an ordinary layer with more heads and a wider MLP: the members'
norm gains were folded into the projections at conversion time, so nothing here is specific to it.

Early exit (AdaInfer), only when the config carries ``early_exit`` and ``early_exit_enabled`` is true:
after each eligible layer the final norm and LM head read the hidden state of the last position, and
the stop policy (a linear classifier on features of those logits, or a threshold on the top-1/top-2 gap)
decides whether to stop. One decision per forward call: the prompt stops as a whole, every generated
token decides for itself, and a batch stops only when every row is confident. A call that stops at
layer e still fills the KV cache of the layers it skipped, from its exit hidden state (CALM's state
propagation): later tokens attend to keys/values computed as if the exited state had passed unchanged
through the skipped layers, which is exactly what a model that copies exited states forward computes.
"""
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

try:
    from .configuration_slim import SlimConfig
except ImportError:  # imported as a plain module (slimconv's own tests)
    from configuration_slim import SlimConfig

# The name under which this transformers version passes the cache to ``forward`` and reads it back from
# the output: the output dataclass's own field says it, whatever the version.
CACHE_NAME = "cache" if "cache" in {f.name for f in fields(CausalLMOutputWithPast)} else "past_key_values"
# Every name a version in or before the proven range has used for the cache argument.
_CACHE_ALIASES = ("cache", "past_key_values", "cache_params")


def _take_cache(kwargs):
    """Removes and returns the one cache passed in ``kwargs``, whatever its name.

    A Cache under a name this file does not know means transformers renamed it again: ignoring it would
    silently decode every step without context, so it is an error that names the fix.
    """
    given = {k: kwargs.pop(k) for k in _CACHE_ALIASES if kwargs.get(k) is not None}
    unknown = [k for k, v in kwargs.items() if isinstance(v, Cache)]
    if unknown or len(given) > 1:
        import transformers

        raise TypeError(
            f"modeling_slim.py got the KV cache as {sorted(given) + unknown}; transformers "
            f"{transformers.__version__} passes it in a way this file was not proven with. Install a transformers "
            f"version in the range named in configuration_slim.PROVEN_TRANSFORMERS."
        )
    return next(iter(given.values()), None)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class SlimRMSNorm(nn.Module):
    """RMSNorm over the last dim; ``shape`` may be (heads, head_dim) for per-head q/k norms of a wide layer.
    Every family's norm is stored in this ``w`` form (slimconv folds Gemma's ``1 + w`` at conversion)."""

    def __init__(self, shape, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(shape))
        self.variance_epsilon = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


def _rope(x, position_embeddings):
    """RoPE on (batch, heads, seq, head_dim), as transformers' apply_rotary_pos_emb; with partial rotary (cos
    narrower than head_dim) only the first dims rotate, as Phi-3's."""
    cos, sin = position_embeddings
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos[:, None] + _rotate_half(x) * sin[:, None]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat([x_rot * cos[:, None] + _rotate_half(x_rot) * sin[:, None], x_pass], dim=-1)


class SlimRotaryEmbedding(LlamaRotaryEmbedding):
    """transformers' rotary embedding for one RoPE kind of the config (``config.rope_parameters`` is that kind's);
    the default type honours ``partial_rotary_factor`` (Llama's ignores it, Phi-3's does not)."""

    @staticmethod
    def compute_default_rope_parameters(config, device=None, **kwargs):
        params = config.rope_parameters
        dim = int(config.head_dim * params.get("partial_rotary_factor", 1.0))
        inv_freq = 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        return inv_freq.to(device), 1.0


def _qk_norm_mode(config):
    """None, "head" (one gain per head dimension; ``True`` in configs of earlier slimconv) or "full"."""
    mode = getattr(config, "qk_norm", False)
    return "head" if mode is True else (mode or None)


class SlimAttention(nn.Module):
    def __init__(self, config, spec, cache_index):
        super().__init__()
        bias = config.projection_bias or {}
        self.num_heads = spec["num_heads"]
        self.num_kv_heads = spec["num_key_value_heads"]
        self.head_dim = config.head_dim
        self.sliding_window = spec.get("sliding_window")
        self.rope = spec.get("rope", "default")
        self.softcap = getattr(config, "attn_logit_softcapping", None)
        self.cache_index = cache_index
        self.scaling = self.head_dim**-0.5
        h, d = config.hidden_size, self.head_dim
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=bias.get("q", False))
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=bias.get("k", False))
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=bias.get("v", False))
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=bias.get("o", False))
        self.qk_norm = _qk_norm_mode(config)
        if self.qk_norm == "head":
            self.q_norm = SlimRMSNorm((self.num_heads, d), config.rms_norm_eps)
            self.k_norm = SlimRMSNorm((self.num_kv_heads, d), config.rms_norm_eps)
        elif self.qk_norm == "full":  # over all heads at once (OLMo 2)
            self.q_norm = SlimRMSNorm(self.num_heads * d, config.rms_norm_eps)
            self.k_norm = SlimRMSNorm(self.num_kv_heads * d, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def _project(self, proj, norm, x, heads):
        b, t, _ = x.shape
        y = proj(x)
        if self.qk_norm == "full":
            y = norm(y)
        y = y.view(b, t, heads, self.head_dim)
        if self.qk_norm == "head":
            y = norm(y)
        return y.transpose(1, 2)

    def _rotated(self, y, position_embeddings):
        return y if self.rope is None else _rope(y, position_embeddings[self.rope])

    def _keys_values(self, x, position_embeddings):
        b, t, _ = x.shape
        k = self._rotated(self._project(self.k_proj, self.k_norm, x, self.num_kv_heads), position_embeddings)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return k, v

    def fill_cache(self, x, position_embeddings, cache):
        """Stores this layer's keys/values for ``x`` (already normed) without computing attention."""
        cache.update(*self._keys_values(x, position_embeddings), self.cache_index)

    def forward(self, x, position_embeddings, masks, cache):
        b, t, _ = x.shape
        q = self._rotated(self._project(self.q_proj, self.q_norm, x, self.num_heads), position_embeddings)
        k, v = self._keys_values(x, position_embeddings)
        if cache is not None:
            k, v = cache.update(k, v, self.cache_index)
        mask = masks(self.sliding_window)
        if self.softcap is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling, enable_gqa=True)
        else:  # soft-capped logits (Gemma 2): tanh(s / cap) * cap before the mask, which SDPA cannot do
            groups = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
            scores = torch.matmul(q, k.transpose(2, 3)) * self.scaling
            scores = torch.tanh(scores / self.softcap) * self.softcap + mask
            out = torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class SlimMLP(nn.Module):
    def __init__(self, config, width, bias):
        super().__init__()
        h = config.hidden_size
        self.gate_proj = nn.Linear(h, width, bias=bias)
        self.up_proj = nn.Linear(h, width, bias=bias)
        self.down_proj = nn.Linear(width, h, bias=bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class SlimMoE(nn.Module):
    """A mixture of experts: softmax over the router's logits (in float32), the top-k experts per token, their
    probabilities renormalised when ``norm_topk_prob``; plus, where the spec has one, a shared expert scaled by a
    sigmoid gate (Qwen2-MoE). Experts are separate MLPs, so a pruned expert is simply absent."""

    def __init__(self, config, spec):
        super().__init__()
        h, width = config.hidden_size, spec["intermediate_size"]
        self.top_k, self.norm_topk = spec["top_k"], spec["norm_topk_prob"]
        self.gate = nn.Linear(h, len(spec["experts"]), bias=False)
        self.experts = nn.ModuleList(SlimMLP(config, width, False) for _ in spec["experts"])
        shared = spec.get("shared_intermediate_size")
        self.shared_expert = SlimMLP(config, shared, False) if shared else None
        self.shared_expert_gate = nn.Linear(h, 1, bias=False) if shared else None

    def route(self, x):
        """(routing weights, chosen experts), each (tokens, top_k), for tokens ``x`` (tokens, hidden)."""
        probs = torch.softmax(self.gate(x), dim=-1, dtype=torch.float32)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        if self.norm_topk:
            weights = weights / weights.sum(-1, keepdim=True)
        return weights.to(x.dtype), chosen

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, chosen = self.route(x)
        out = torch.zeros_like(x)
        for e in chosen.unique().tolist():
            rows, slot = torch.where(chosen == e)
            out.index_add_(0, rows, self.experts[e](x[rows]) * weights[rows, slot, None])
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out.reshape(shape)


# Which norms a sublayer owns, by the family (the config's ``norms``); configs of earlier slimconv have Llama's.
_NORMS = {"attention_input": True, "attention_output": False, "mlp_input": True, "mlp_output": False}


def _norm(config, role):
    own = {**_NORMS, **(getattr(config, "norms", None) or {})}[role]
    return SlimRMSNorm(config.hidden_size, config.rms_norm_eps) if own else None


def _apply(norm, x):
    return x if norm is None else norm(x)


class SlimDecoderLayer(nn.Module):
    """``x + out_norm(attn(in_norm(x)))``, then the same for the MLP; each norm only where the family has it."""

    def __init__(self, config, spec, cache_index):
        super().__init__()
        self.input_layernorm = self.self_attn = self.attention_output_layernorm = None
        self.post_attention_layernorm = self.mlp = self.mlp_output_layernorm = None
        if spec.get("attention"):
            self.input_layernorm = _norm(config, "attention_input")
            self.self_attn = SlimAttention(config, spec["attention"], cache_index)
            self.attention_output_layernorm = _norm(config, "attention_output")
        if spec.get("mlp"):
            self.post_attention_layernorm = _norm(config, "mlp_input")
            mlp = spec["mlp"]
            self.mlp = (SlimMoE(config, mlp) if mlp.get("experts") is not None
                        else SlimMLP(config, mlp["intermediate_size"], config.mlp_bias))
            self.mlp_output_layernorm = _norm(config, "mlp_output")

    def fill_cache(self, x, position_embeddings, cache):
        if self.self_attn is not None:
            self.self_attn.fill_cache(_apply(self.input_layernorm, x), position_embeddings, cache)

    def attention_block(self, x, position_embeddings, masks, cache):
        """What the attention sublayer adds to the residual stream ``x``."""
        y = self.self_attn(_apply(self.input_layernorm, x), position_embeddings, masks, cache)
        return _apply(self.attention_output_layernorm, y)

    def mlp_block(self, x):
        """What the MLP sublayer adds to the residual stream ``x``."""
        return _apply(self.mlp_output_layernorm, self.mlp(_apply(self.post_attention_layernorm, x)))

    def forward(self, x, position_embeddings, masks, cache):
        if self.self_attn is not None:
            x = x + self.attention_block(x, position_embeddings, masks, cache)
        if self.mlp is not None:
            x = x + self.mlp_block(x)
        return x


def rotary_embeddings(config) -> nn.ModuleDict:
    """One rotary embedding per RoPE kind the layers use (``config.rope_kinds``; configs of earlier slimconv have
    one, ``default``, in ``rope_parameters``)."""
    import copy

    kinds = getattr(config, "rope_kinds", None) or {"default": config.rope_parameters}
    used = {s["attention"].get("rope", "default") for s in config.slim_layers if s.get("attention")} - {None}
    out = nn.ModuleDict()
    for kind in sorted(used):
        kind_config = copy.copy(config)
        kind_config.rope_parameters = dict(kinds[kind])
        out[kind] = SlimRotaryEmbedding(config=kind_config)
    return out


def embed_scale(config, x):
    """The embedding multiplier (Gemma's sqrt(hidden), Granite's), in the activations' dtype, as the source."""
    mult = getattr(config, "embedding_multiplier", None)
    return x if mult is None else x * torch.tensor(mult, dtype=x.dtype)


def final_softcap(config, logits):
    cap = getattr(config, "final_logit_softcapping", None)
    return logits if cap is None else torch.tanh(logits / cap) * cap


EXIT_FEATURES = ("top1_prob", "gap", "layer_frac")


def exit_features(logits, layer, num_layers):
    """AdaInfer's features of one layer's logits (..., vocab): top-1 probability, top-1 minus top-2
    probability, and the layer's depth (layer + 1) / num_layers. Returns (..., 3) in EXIT_FEATURES order."""
    top = torch.softmax(logits.float(), -1).topk(2, dim=-1).values
    depth = torch.full_like(top[..., 0], (layer + 1) / num_layers)
    return torch.stack([top[..., 0], top[..., 0] - top[..., 1], depth], -1)


def exit_score(features, policy):
    """The policy's confidence from features (..., 3): the gap itself, or the linear classifier's probability."""
    if policy["policy"] == "gap":
        return features[..., EXIT_FEATURES.index("gap")]
    idx = [EXIT_FEATURES.index(f) for f in policy["features"]]
    w = torch.tensor(policy["weights"], dtype=features.dtype, device=features.device)
    return torch.sigmoid(features[..., idx] @ w + policy["bias"])


def may_exit(layer, num_layers, policy):
    """Layers after which the policy is evaluated: from min_layer on, every ``every``-th, never the last."""
    first, every = policy.get("min_layer", 0), policy.get("every", 1)
    return first <= layer < num_layers - 1 and (layer - first) % every == 0


@dataclass
class SlimModelOutput(BaseModelOutputWithPast):
    """``exit_layer``: index of the layer after which the call stopped (None: ran every layer);
    ``exit_logits``: the last position's logits at that layer, already computed by the policy."""

    exit_layer: int | None = None
    exit_logits: torch.FloatTensor | None = None


@dataclass
class SlimCausalLMOutput(CausalLMOutputWithPast):
    exit_layer: int | None = None


class SlimPreTrainedModel(PreTrainedModel):
    config_class = SlimConfig
    config: SlimConfig
    base_model_prefix = "model"
    _no_split_modules = ["SlimDecoderLayer"]
    _supports_sdpa = True


def mask_factory(attention_mask, past, t, dtype, device):
    """Returns window -> additive mask (B or 1, 1, t, past+t), built once per distinct window.

    Keys are every cached position (the cache is never cropped), so causality and sliding windows are
    index arithmetic; padded keys come from ``attention_mask``. Fully masked rows (left padding) get a
    finite minimum instead of -inf so that they give no NaN.
    """
    built = {}
    q_pos = torch.arange(past, past + t, device=device)[:, None]
    k_pos = torch.arange(past + t, device=device)[None, :]

    def masks(window):
        if window not in built:
            allowed = k_pos <= q_pos
            if window is not None:
                allowed = allowed & (q_pos - k_pos < window)
            allowed = allowed[None, None]
            if attention_mask is not None:
                allowed = allowed & attention_mask[:, None, None, -(past + t):].bool()
            built[window] = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(
                ~allowed, torch.finfo(dtype).min
            )
        return built[window]

    return masks


class SlimModel(SlimPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        # Cache slots are numbered over attention-bearing layers only, so slot 0 always holds keys and
        # get_seq_length() is right even when the first output layer has no attention.
        layers, slot = [], 0
        for spec in config.slim_layers:
            layers.append(SlimDecoderLayer(config, spec, slot))
            slot += 1 if spec.get("attention") else 0
        self.layers = nn.ModuleList(layers)
        self.norm = SlimRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = rotary_embeddings(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def position_embeddings(self, x, position_ids):
        """(cos, sin) by RoPE kind, what every layer's forward takes."""
        return {kind: rope(x, position_ids=position_ids) for kind, rope in self.rotary_emb.items()}

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, use_cache=None,
                exit_head=None, **kwargs):
        """``exit_head`` (the LM head) turns on the config's early-exit policy; None runs every layer.
        The cache comes in ``kwargs`` under any name transformers uses (see ``CACHE_NAME``)."""
        cache = _take_cache(kwargs)
        if inputs_embeds is None:
            inputs_embeds = embed_scale(self.config, self.embed_tokens(input_ids))
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache()
        past = cache.get_seq_length() if cache is not None else 0
        t = inputs_embeds.shape[1]
        if position_ids is None:
            position_ids = torch.arange(past, past + t, device=inputs_embeds.device)[None]
        masks = mask_factory(attention_mask, past, t, inputs_embeds.dtype, inputs_embeds.device)
        x = inputs_embeds
        position_embeddings = self.position_embeddings(x, position_ids)
        policy, n = self.config.early_exit, len(self.layers)
        for i, layer in enumerate(self.layers):
            x = layer(x, position_embeddings, masks, cache if use_cache else None)
            if exit_head is None or not may_exit(i, n, policy):
                continue
            logits = final_softcap(self.config, exit_head(self.norm(x[:, -1])))
            if (exit_score(exit_features(logits, i, n), policy) >= policy["threshold"]).all():
                if use_cache:
                    for skipped in self.layers[i + 1:]:
                        skipped.fill_cache(x, position_embeddings, cache)
                return SlimModelOutput(last_hidden_state=self.norm(x), exit_layer=i, exit_logits=logits,
                                       **{CACHE_NAME: cache})
        return SlimModelOutput(last_hidden_state=self.norm(x), **{CACHE_NAME: cache})


class SlimForCausalLM(SlimPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.model = SlimModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def generate(self, *args, **kwargs):
        """``generate()`` with a cache this model created: a cache built by transformers from the config would
        be laid out per source layer (and cropped to the sliding window), not per kept attention."""
        if not any(kwargs.get(k) is not None for k in _CACHE_ALIASES):
            kwargs[CACHE_NAME] = DynamicCache()
        return super().generate(*args, **kwargs)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, use_cache=None,
                logits_to_keep=0, **kwargs):
        exit_on = self.config.early_exit is not None and self.config.early_exit_enabled
        cache = _take_cache(kwargs)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         inputs_embeds=inputs_embeds, use_cache=use_cache,
                         exit_head=self.lm_head if exit_on else None, **{CACHE_NAME: cache})
        h = out.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            h = h[:, -logits_to_keep:]
        if out.exit_logits is not None and h.shape[1] == 1:
            logits = out.exit_logits[:, None]  # the policy already paid for the LM head on this position
        else:
            logits = final_softcap(self.config, self.lm_head(h))
        return SlimCausalLMOutput(logits=logits, exit_layer=out.exit_layer, **{CACHE_NAME: getattr(out, CACHE_NAME)})
