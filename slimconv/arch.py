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


# safetensors dtypes of the weights slimconv reads and writes: an integer tensor is quantised or not a weight.
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")


def tensor_shapes(config: dict, layers: list[tuple[int, int, int]], bias: dict, mlp_bias: bool, qk_norm: bool,
                  per_head_qk_norm: bool = False) -> dict[str, tuple]:
    """Every tensor a checkpoint described by ``config`` must hold, as name -> shape, each dimension a pair
    (size, the config key or count it follows from), built from the name templates above.

    ``layers``: per decoder layer, (query heads, KV heads, MLP width), 0 for a removed sublayer. ``bias``,
    ``mlp_bias``, ``qk_norm``: which optional tensors exist. q/k norms are (head_dim,) in a stock checkpoint
    and (heads, head_dim) in slimconv's own format, where a wide layer's heads keep their member's gains."""
    hidden, hd = (config["hidden_size"], "hidden_size"), head_dim(config)
    vocab = (config["vocab_size"], "vocab_size")
    shapes = {EMBED: (vocab, hidden), FINAL_NORM: (hidden,)}
    if not config.get("tie_word_embeddings", False):
        shapes[LM_HEAD] = (vocab, hidden)
    for i, (q, kv, width) in enumerate(layers):
        at = LAYER.format(i=i)
        if q:
            heads = (q * hd, "num_attention_heads x head_dim" if q == config["num_attention_heads"]
                     else f"{q} heads x head_dim")
            kvs = (kv * hd, "num_key_value_heads x head_dim" if kv == kv_heads(config) else f"{kv} KV heads x head_dim")
            for p, shape in (("q", (heads, hidden)), ("k", (kvs, hidden)), ("v", (kvs, hidden)), ("o", (hidden, heads))):
                shapes[at + ATTN.format(p=p, kind="weight")] = shape
                if bias[p]:
                    shapes[at + ATTN.format(p=p, kind="bias")] = shape[:1]
            if qk_norm:
                for p, n in (("q", q), ("k", kv)):
                    norm = (hd, "head_dim")
                    shapes[at + QK_NORM.format(p=p)] = ((n, f"{n} heads"), norm) if per_head_qk_norm else (norm,)
            shapes[at + INPUT_NORM] = (hidden,)
        if width:
            inter = (width, "intermediate_size" if width == config["intermediate_size"] else f"MLP width {width}")
            for p, shape in (("gate", (inter, hidden)), ("up", (inter, hidden)), ("down", (hidden, inter))):
                shapes[at + MLP.format(p=p, kind="weight")] = shape
                if mlp_bias:
                    shapes[at + MLP.format(p=p, kind="bias")] = shape[:1]
            shapes[at + POST_NORM] = (hidden,)
    return shapes


def stock_shapes(config: dict) -> dict[str, tuple]:
    """``tensor_shapes`` of a stock checkpoint of a supported family: every layer whole."""
    arch = get_arch(config)
    layer = (config["num_attention_heads"], kv_heads(config), config["intermediate_size"])
    return tensor_shapes(config, [layer] * config["num_hidden_layers"], arch.projection_bias(config),
                         arch.has_mlp_bias(config), arch.qk_norm)
