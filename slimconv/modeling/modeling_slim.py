"""A decoder whose layers each have an optional attention (own head counts) and an optional MLP (own width).

slimconv copies this file beside the weights, so that
``AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)`` works without slimconv installed.
It depends on torch and transformers 5.x only.

A wide layer (layer parallelism) is an ordinary layer with more heads and a wider MLP: the members'
norm gains were folded into the projections at conversion time, so nothing here is specific to it.
"""
import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

try:
    from .configuration_slim import SlimConfig
except ImportError:  # imported as a plain module (slimconv's own tests)
    from configuration_slim import SlimConfig


class SlimRMSNorm(nn.Module):
    """RMSNorm over the last dim; ``shape`` may be (heads, head_dim) for per-head q/k norms of a wide layer."""

    def __init__(self, shape, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(shape))
        self.variance_epsilon = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


class SlimAttention(nn.Module):
    def __init__(self, config, spec, cache_index):
        super().__init__()
        bias = config.projection_bias or {}
        self.num_heads = spec["num_heads"]
        self.num_kv_heads = spec["num_key_value_heads"]
        self.head_dim = config.head_dim
        self.sliding_window = spec.get("sliding_window")
        self.cache_index = cache_index
        self.scaling = self.head_dim**-0.5
        h, d = config.hidden_size, self.head_dim
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=bias.get("q", False))
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=bias.get("k", False))
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=bias.get("v", False))
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=bias.get("o", False))
        if config.qk_norm:
            self.q_norm = SlimRMSNorm((self.num_heads, d), config.rms_norm_eps)
            self.k_norm = SlimRMSNorm((self.num_kv_heads, d), config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, position_embeddings, masks, past_key_values):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.cache_index)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=masks(self.sliding_window), scale=self.scaling, enable_gqa=True
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class SlimMLP(nn.Module):
    def __init__(self, config, spec):
        super().__init__()
        h, i, bias = config.hidden_size, spec["intermediate_size"], config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class SlimDecoderLayer(nn.Module):
    def __init__(self, config, spec, cache_index):
        super().__init__()
        eps = config.rms_norm_eps
        if spec.get("attention"):
            self.input_layernorm = SlimRMSNorm(config.hidden_size, eps)
            self.self_attn = SlimAttention(config, spec["attention"], cache_index)
        else:
            self.input_layernorm = self.self_attn = None
        if spec.get("mlp"):
            self.post_attention_layernorm = SlimRMSNorm(config.hidden_size, eps)
            self.mlp = SlimMLP(config, spec["mlp"])
        else:
            self.post_attention_layernorm = self.mlp = None

    def forward(self, x, position_embeddings, masks, past_key_values):
        if self.self_attn is not None:
            x = x + self.self_attn(self.input_layernorm(x), position_embeddings, masks, past_key_values)
        if self.mlp is not None:
            x = x + self.mlp(self.post_attention_layernorm(x))
        return x


class SlimPreTrainedModel(PreTrainedModel):
    config_class = SlimConfig
    config: SlimConfig
    base_model_prefix = "model"
    _no_split_modules = ["SlimDecoderLayer"]
    _supports_sdpa = True


def _mask_factory(attention_mask, past, t, dtype, device):
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
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, **kwargs):
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        t = inputs_embeds.shape[1]
        if position_ids is None:
            position_ids = torch.arange(past, past + t, device=inputs_embeds.device)[None]
        masks = _mask_factory(attention_mask, past, t, inputs_embeds.dtype, inputs_embeds.device)
        x = inputs_embeds
        position_embeddings = self.rotary_emb(x, position_ids=position_ids)
        for layer in self.layers:
            x = layer(x, position_embeddings, masks, past_key_values if use_cache else None)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(x), past_key_values=past_key_values)


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

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, logits_to_keep=0, **kwargs):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache)
        h = out.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            h = h[:, -logits_to_keep:]
        return CausalLMOutputWithPast(logits=self.lm_head(h), past_key_values=out.past_key_values)
