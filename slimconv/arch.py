"""Supported architectures, described as data.

Every supported family has the Llama decoder layout (pre-norm RMSNorm, separate q/k/v/o and
gate/up/down projections, RoPE); they differ only in which projections carry a bias, whether q and k
have a per-head RMSNorm, and how sliding-window attention is configured. Adding a family with the
same layout is one row in ARCHS.
"""
from dataclasses import dataclass

from .errors import SlimError

ATTN_PROJ = ("q", "k", "v", "o")
MLP_PROJ = ("gate", "up", "down")

EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"
LAYER = "model.layers.{i}."
INPUT_NORM = "input_layernorm.weight"
POST_NORM = "post_attention_layernorm.weight"
ATTN = "self_attn.{p}_proj.{kind}"
QK_NORM = "self_attn.{p}_norm.weight"
MLP = "mlp.{p}_proj.{kind}"


# Configs leave these out when they equal the defaults: no grouped-query attention, head_dim = hidden / heads.
def kv_heads(config: dict) -> int:
    return config.get("num_key_value_heads") or config["num_attention_heads"]


def head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


@dataclass(frozen=True)
class Arch:
    model_type: str
    # projection -> config key whose boolean value says whether it has a bias, or a constant
    attn_bias: dict
    mlp_bias: str | bool
    qk_norm: bool
    # "layer_types": per-layer list names sliding layers; "global": config.sliding_window applies to all
    sliding: str

    def projection_bias(self, config: dict) -> dict:
        return {p: bool(config.get(v, False)) if isinstance(v, str) else v for p, v in self.attn_bias.items()}

    def has_mlp_bias(self, config: dict) -> bool:
        return bool(config.get(self.mlp_bias, False)) if isinstance(self.mlp_bias, str) else self.mlp_bias

    def layer_windows(self, config: dict) -> list:
        n, window = config["num_hidden_layers"], config.get("sliding_window")
        if window is None:
            return [None] * n
        if self.sliding == "global":
            return [window] * n
        types = config.get("layer_types") or ["full_attention"] * n
        return [window if t == "sliding_attention" else None for t in types]


_ALL_ATTN = {p: "attention_bias" for p in ATTN_PROJ}
ARCHS = {
    "llama": Arch("llama", _ALL_ATTN, "mlp_bias", qk_norm=False, sliding="global"),
    "mistral": Arch("mistral", dict.fromkeys(ATTN_PROJ, False), False, qk_norm=False, sliding="global"),
    "qwen2": Arch("qwen2", {"q": True, "k": True, "v": True, "o": False}, False, qk_norm=False,
                  sliding="layer_types"),
    "qwen3": Arch("qwen3", _ALL_ATTN, False, qk_norm=True, sliding="layer_types"),
}

# Families users ask about, and what keeps them out.
WHY_NOT = {
    "gemma": "Gemma scales embeddings and uses (1 + weight) norms",
    "gemma2": "Gemma 2 has extra pre/post feed-forward norms and logit soft-capping",
    "gemma3": "Gemma 3 has extra pre/post feed-forward norms and mixed local/global RoPE",
    "phi3": "Phi-3 fuses q/k/v into qkv_proj and gate/up into gate_up_proj",
    "mixtral": "Mixtral's MLP is a mixture of experts",
    "qwen2_moe": "its MLP is a mixture of experts",
    "gpt2": "GPT-2 uses LayerNorm, learned positions and fused c_attn",
}


def get_arch(config: dict) -> Arch:
    model_type = config.get("model_type")
    if model_type in ARCHS:
        if config.get("hidden_act", "silu") not in ("silu", "gelu", "gelu_pytorch_tanh", "relu"):
            raise SlimError(f"unsupported activation {config['hidden_act']!r} in the source config")
        return ARCHS[model_type]
    why = WHY_NOT.get(model_type, "its decoder layout is not described in slimconv/arch.py")
    raise SlimError(
        f"model_type {model_type!r} is not supported: {why}.",
        f"use a model of a supported family ({', '.join(ARCHS)})",
    )
