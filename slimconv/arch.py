"""Model families, described as data, and the one object a stage reads them through.

Every supported family is a decoder of RMSNorm'ed attention and gated-MLP sublayers with RoPE; what differs
is written down per family in ``FAMILIES``:

- the tensor names of a layer's parts (``Names``), including fused q/k/v or gate/up tensors (Phi-3) and which
  norms a sublayer owns: its input norm, and its output norm where the family has one (Gemma 2/3 and OLMo 2
  "sandwich" norms; OLMo 2 has no input norms at all);
- the norm's form: ``w`` or ``1 + w`` (Gemma);
- q/k norms: none, one gain per head dimension (Qwen3, Gemma 3), or one over all heads (OLMo 2);
- scalars: embedding, residual, attention and logits multipliers (Granite, Gemma), soft-caps (Gemma 2);
- per-layer config lists: sliding windows (``layer_types`` or one global window), RoPE per layer type
  (Gemma 3), layers without RoPE (SmolLM3's ``no_rope_layers``);
- the config key of the activation;
- a mixture-of-experts MLP (``Moe``): router, experts and shared expert as name templates, routing and the layers
  that keep a dense MLP as config keys (Qwen3-MoE, Mixtral, Qwen2-MoE).

``get_arch(config)`` resolves a source config against its family once, into an ``Arch`` that the plan,
the converter, the analysis engine, heal and the exporters read. slimconv's own output layout (the slim
format) is one canonical family, ``CANONICAL``: q/k/v and gate/up split, norms in ``w`` form, the attention
and residual multipliers folded into the weights, the logits multiplier into the final norm. What cannot be
folded travels in the slim config (the embedding multiplier of a tied embedding, soft-caps, RoPE kinds).
"""
import math
from dataclasses import dataclass

from .errors import SlimError

ATTN_PROJ = ("q", "k", "v", "o")
MLP_PROJ = ("gate", "up", "down")

EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"
LAYER = "model.layers.{i}."
ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "relu")


@dataclass(frozen=True)
class Names:
    """A layer's tensors, relative to ``model.layers.{i}.`` and without ``.weight``/``.bias``; None: absent.
    ``qkv`` / ``gate_up``: one fused tensor instead of q, k, v (in that order along the output dim) / gate,
    up (gate first)."""

    q: str = "self_attn.q_proj"
    k: str = "self_attn.k_proj"
    v: str = "self_attn.v_proj"
    o: str = "self_attn.o_proj"
    qkv: str | None = None
    q_norm: str = "self_attn.q_norm"
    k_norm: str = "self_attn.k_norm"
    gate: str = "mlp.gate_proj"
    up: str = "mlp.up_proj"
    down: str = "mlp.down_proj"
    gate_up: str | None = None
    attn_in: str | None = "input_layernorm"
    attn_out: str | None = None
    mlp_in: str | None = "post_attention_layernorm"
    mlp_out: str | None = None


LLAMA_NAMES = Names()
SANDWICH = Names(attn_out="post_attention_layernorm", mlp_in="pre_feedforward_layernorm",
                 mlp_out="post_feedforward_layernorm")
# slimconv's own layout: every norm a family can have, under a name that says which sublayer owns it.
CANONICAL = Names(attn_out="attention_output_layernorm", mlp_out="mlp_output_layernorm")


def canonical_names(norms: dict | None) -> Names:
    """``CANONICAL`` with only the norms a slim config's ``norms`` names (None: Llama's two input norms)."""
    has = {"attention_input": True, "mlp_input": True, **(norms or {})}
    return Names(attn_in=CANONICAL.attn_in if has["attention_input"] else None,
                 attn_out=CANONICAL.attn_out if has.get("attention_output") else None,
                 mlp_in=CANONICAL.mlp_in if has["mlp_input"] else None,
                 mlp_out=CANONICAL.mlp_out if has.get("mlp_output") else None)


@dataclass(frozen=True)
class MoeNames:
    """A mixture-of-experts MLP's tensors, relative to the layer, without ``.weight``; ``{e}``: the expert index.
    ``shared_*``: an always-on shared expert and its sigmoid gate (None: absent)."""

    router: str = "mlp.gate"
    gate: str = "mlp.experts.{e}.gate_proj"
    up: str = "mlp.experts.{e}.up_proj"
    down: str = "mlp.experts.{e}.down_proj"
    shared_gate: str | None = "mlp.shared_expert.gate_proj"
    shared_up: str | None = "mlp.shared_expert.up_proj"
    shared_down: str | None = "mlp.shared_expert.down_proj"
    shared_router: str | None = "mlp.shared_expert_gate"


# slimconv's own layout of an MoE sublayer (Qwen's names; a shared expert's tensors only where the source has one).
CANONICAL_MOE = MoeNames()
EXPERT_PROJ = ("gate", "up", "down")
SHARED_PROJ = ("shared_gate", "shared_up", "shared_down")


@dataclass(frozen=True)
class Moe:
    """A family's mixture-of-experts MLP: softmax top-k routing over ``num_experts`` gated experts of width
    ``width``, the top-k probabilities renormalised when ``norm_topk`` (a config key, or always: True). Config keys
    throughout. A layer is sparse unless ``dense_layers`` lists it or ``sparse_step`` skips it (layer i is sparse
    when (i + 1) % step == 0); a dense layer has the family's ordinary MLP of ``intermediate_size``."""

    names: MoeNames
    num_experts: tuple = ("num_experts", "num_local_experts")  # the first present (transformers 5 renamed Qwen3-MoE's)
    top_k: str = "num_experts_per_tok"
    width: str = "moe_intermediate_size"
    norm_topk: str | bool = "norm_topk_prob"
    shared_width: str | None = None
    dense_layers: str | None = "mlp_only_layers"
    sparse_step: str | None = "decoder_sparse_step"


QWEN_MOE = MoeNames(shared_gate=None, shared_up=None, shared_down=None, shared_router=None)


@dataclass(frozen=True)
class Family:
    """How one model_type differs from Llama. Config keys are read by ``get_arch``; a str value of a bias
    entry is the config key whose boolean says whether that projection has a bias."""

    attn_bias: dict
    mlp_bias: str | bool = False
    names: Names = LLAMA_NAMES
    qk_norm: str | None = None          # "head": (head_dim,) shared by every head; "full": over all heads
    norm_offset: float = 0.0            # 1.0: a norm applies (1 + weight)
    sliding: str | None = "global"      # "global": config.sliding_window for every layer; "layer_types": per layer
    sliding_switch: str | None = None   # config key that must be true for any window to apply
    activation: str = "hidden_act"
    embedding_multiplier: str | None = None   # config key, or "sqrt_hidden"
    residual_multiplier: str | None = None
    attention_multiplier: str | None = None   # the attention's scale itself (instead of head_dim ** -0.5)
    query_pre_attn_scalar: str | None = None  # the attention's scale is this ** -0.5
    logits_scaling: str | None = None         # logits are divided by it
    attn_softcap: str | None = None
    final_softcap: str | None = None
    rope_by_layer_type: bool = False    # rope_parameters holds one entry per layer type
    no_rope: str | None = None          # config list, one entry per layer: 0 = that layer has no RoPE
    moe: Moe | None = None              # a mixture-of-experts MLP (in the layers the config makes sparse)
    differs: str = ""                   # for messages: what sets it apart from Llama


def _bias(key):
    return dict.fromkeys(ATTN_PROJ, key)


FAMILIES = {
    "llama": Family(_bias("attention_bias"), "mlp_bias"),
    "mistral": Family(_bias(False)),
    "ministral": Family(_bias(False), sliding="layer_types", differs="Mistral with per-layer sliding windows"),
    "qwen2": Family({"q": True, "k": True, "v": True, "o": False}, sliding="layer_types"),
    "qwen3": Family(_bias("attention_bias"), qk_norm="head", sliding="layer_types"),
    "gemma": Family(_bias("attention_bias"), norm_offset=1.0, embedding_multiplier="sqrt_hidden",
                    differs="(1 + weight) norms and embeddings scaled by sqrt(hidden)"),
    "gemma2": Family(_bias("attention_bias"), names=SANDWICH, norm_offset=1.0, sliding="layer_types",
                     activation="hidden_activation", embedding_multiplier="sqrt_hidden",
                     query_pre_attn_scalar="query_pre_attn_scalar", attn_softcap="attn_logit_softcapping",
                     final_softcap="final_logit_softcapping", differs="sandwich norms and logit soft-capping"),
    "gemma3_text": Family(_bias("attention_bias"), names=SANDWICH, qk_norm="head", norm_offset=1.0,
                          sliding="layer_types", activation="hidden_activation", embedding_multiplier="sqrt_hidden",
                          query_pre_attn_scalar="query_pre_attn_scalar", attn_softcap="attn_logit_softcapping",
                          final_softcap="final_logit_softcapping", rope_by_layer_type=True,
                          differs="sandwich norms, q/k norms and RoPE per layer type"),
    "phi3": Family(_bias(False), names=Names(qkv="self_attn.qkv_proj", gate_up="mlp.gate_up_proj"),
                   differs="fused qkv_proj and gate_up_proj"),
    "granite": Family(_bias("attention_bias"), "mlp_bias", embedding_multiplier="embedding_multiplier",
                      residual_multiplier="residual_multiplier", attention_multiplier="attention_multiplier",
                      logits_scaling="logits_scaling", differs="embedding, residual, attention and logits multipliers"),
    "smollm3": Family(_bias("attention_bias"), "mlp_bias", sliding="layer_types", sliding_switch="use_sliding_window",
                      no_rope="no_rope_layers", differs="layers without RoPE"),
    "olmo2": Family(_bias("attention_bias"), names=Names(attn_in=None, attn_out="post_attention_layernorm", mlp_in=None,
                                                         mlp_out="post_feedforward_layernorm"),
                    qk_norm="full", differs="output norms instead of input norms, q/k norms over all heads"),
    "qwen3_moe": Family(_bias("attention_bias"), qk_norm="head", sliding="layer_types", moe=Moe(QWEN_MOE),
                        differs="Qwen3 with a mixture-of-experts MLP"),
    "mixtral": Family(_bias(False), moe=Moe(MoeNames(router="block_sparse_moe.gate",
                                                     gate="block_sparse_moe.experts.{e}.w1",
                                                     up="block_sparse_moe.experts.{e}.w3",
                                                     down="block_sparse_moe.experts.{e}.w2", shared_gate=None,
                                                     shared_up=None, shared_down=None, shared_router=None),
                                            num_experts=("num_local_experts",), width="intermediate_size",
                                            norm_topk=True, dense_layers=None, sparse_step=None),
                      differs="Mistral with a mixture-of-experts MLP"),
    "qwen2_moe": Family({"q": True, "k": True, "v": True, "o": False}, sliding="layer_types",
                        moe=Moe(MoeNames(), shared_width="shared_expert_intermediate_size"),
                        differs="Qwen2 with a mixture-of-experts MLP and a gated shared expert"),
}
# Families users ask about, and what keeps them out.
WHY_NOT = {
    "deepseek_v3": ("qwen3_moe", "DeepSeek-V3's multi-head latent attention and grouped routing are not described"),
    "gpt_oss": ("qwen3_moe", "gpt-oss's attention sinks, clamped SwiGLU and expert biases are not described"),
    "olmo3": ("olmo2", "OLMo 3 adds sliding windows with a period to OLMo 2's layout, not described yet"),
    "cohere2": ("llama", "Cohere 2 uses LayerNorm, a parallel attention/MLP block and a layer period"),
    "ministral3": ("mistral", "Ministral 3 scales queries by position (rope_parameters' llama_4_scaling_beta), "
                              "not described yet"),
    "gpt2": ("llama", "GPT-2 uses LayerNorm, learned positions and a fused c_attn"),
}


@dataclass(frozen=True)
class Wrapper:
    """A multimodal checkpoint around a text model of a supported family: where its text config and text tensors
    are. A stock output keeps the wrapper (its vision tower and projector copied untouched); every stage reads the
    text model alone. ``layouts``: how the text model's tensors may be stored, as (stored prefix, text-model prefix)
    pairs: the Hub's original layout, which transformers 5 still writes, and the one transformers 4.52-4.57 wrote."""

    text_type: str                      # the text config's model_type when it names none
    text_config: str = "text_config"
    layouts: tuple = ((("language_model.model.", "model."), ("language_model.lm_head.", "lm_head.")),
                      (("model.language_model.", "model."), ("lm_head.", "lm_head.")))


MULTIMODAL = {"gemma3": Wrapper("gemma3_text"), "mistral3": Wrapper("mistral")}


def text_config(config: dict) -> dict:
    """The config of the text model a checkpoint holds: ``config`` itself, or a multimodal one's text config with
    the settings the wrapper decides (a tied head, the dtype)."""
    wrapper = MULTIMODAL.get(config.get("model_type"))
    if wrapper is None:
        return config
    text = config.get(wrapper.text_config)
    if not isinstance(text, dict):
        raise SlimError(f"config.json: a {config['model_type']!r} (multimodal) config without a "
                        f"{wrapper.text_config!r} object", "use the config.json published with these weights")
    view = {"model_type": wrapper.text_type, **text}
    view.pop("architectures", None)  # the wrapper's classes, never the text model's
    view["tie_word_embeddings"] = bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
    dtype = text.get("dtype") or config.get("dtype") or config.get("torch_dtype")
    if dtype:
        view["dtype"] = dtype
    return view


# Configs leave these out when they equal the defaults: no grouped-query attention, head_dim = hidden / heads.
def kv_heads(config: dict) -> int:
    return config.get("num_key_value_heads") or config["num_attention_heads"]


def head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


@dataclass(frozen=True)
class Arch:
    """A source config resolved against its family: what every stage needs, computed once."""

    model_type: str
    family: Family
    bias: dict                  # projection -> has a bias
    mlp_bias: bool
    activation: str
    windows: tuple              # per source layer: sliding window or None
    rope: tuple                 # per source layer: a key of rope_kinds, or None (no RoPE)
    rope_kinds: dict            # kind -> rope_parameters
    embedding_multiplier: float | None
    residual_multiplier: float
    query_scale: float          # the attention's scale / head_dim ** -0.5, folded into q
    logits_multiplier: float    # folded into the final norm
    attn_softcap: float | None
    final_softcap: float | None
    head_dim: int
    sparse: tuple               # per source layer: its MLP is a mixture of experts
    num_experts: int = 0
    top_k: int = 0
    norm_topk: bool = False
    expert_width: int = 0
    shared_width: int = 0       # the shared expert's width (0: none)

    @property
    def moe(self) -> Moe | None:
        return self.family.moe

    @property
    def names(self) -> Names:
        return self.family.names

    @property
    def qk_norm(self) -> str | None:
        return self.family.qk_norm

    @property
    def pre_norm(self) -> bool:
        """Every sublayer reads a normed input and adds its output unnormed: the shape a parallel group's
        norm gains fold into (DESIGN.md, "Layer parallelism as one wide layer")."""
        n = self.names
        return n.attn_in is not None and n.mlp_in is not None and n.attn_out is None and n.mlp_out is None


def _number(config: dict, key: str | None, default):
    if key is None:
        return default
    value = config.get(key)
    return default if value is None else float(value)


def _windows(family: Family, config: dict, n: int) -> list:
    window = config.get("sliding_window")
    if window is None or family.sliding is None or (family.sliding_switch and not config.get(family.sliding_switch)):
        return [None] * n
    if family.sliding == "global":
        return [window] * n
    types = config.get("layer_types") or ["full_attention"] * n
    return [window if t == "sliding_attention" else None for t in types]


def _rope(family: Family, config: dict, n: int) -> tuple[list, dict]:
    params = config.get("rope_parameters")
    if params is None:  # a transformers 4 config: rope_theta and rope_scaling at the top level
        params = dict(config.get("rope_scaling") or {"rope_type": "default"})
        params.setdefault("rope_type", params.pop("type", "default"))
        params["rope_theta"] = config.get("rope_theta", 10000.0)
        if config.get("partial_rotary_factor") is not None:
            params["partial_rotary_factor"] = config["partial_rotary_factor"]
    if family.rope_by_layer_type:
        types = config.get("layer_types") or ["full_attention"] * n
        missing = sorted({t for t in types if t not in params})
        if missing:
            raise SlimError(f"config.json: rope_parameters has no entry for layer type(s) {missing}",
                            "use the config.json published with these weights")
        kinds = {t: dict(params[t]) for t in dict.fromkeys(types)}
        rope = list(types)
    else:
        kinds, rope = {"default": dict(params)}, ["default"] * n
    if family.no_rope:
        flags = config.get(family.no_rope) or [1] * n
        rope = [r if flags[i] else None for i, r in enumerate(rope)]
    return rope, kinds


def _experts(moe: Moe | None, config: dict) -> int:
    return 0 if moe is None else int(next((config[k] for k in moe.num_experts if config.get(k) is not None), 0))


def _sparse(moe: Moe | None, config: dict, n: int) -> list[bool]:
    if not _experts(moe, config):
        return [False] * n
    dense = set(config.get(moe.dense_layers) or []) if moe.dense_layers else set()
    step = int(config.get(moe.sparse_step) or 1) if moe.sparse_step else 1
    return [i not in dense and (i + 1) % step == 0 for i in range(n)]


def _moe_numbers(moe: Moe | None, config: dict) -> dict:
    if not _experts(moe, config):
        return {}
    norm = moe.norm_topk if isinstance(moe.norm_topk, bool) else bool(config.get(moe.norm_topk, False))
    return dict(num_experts=_experts(moe, config), top_k=int(config[moe.top_k]), norm_topk=norm,
                expert_width=int(config[moe.width]),
                shared_width=int(config.get(moe.shared_width) or 0) if moe.shared_width else 0)


def get_arch(config: dict) -> Arch:
    """The source config resolved against its family (``FAMILIES``); an unsupported family is a SlimError
    naming the closest supported one and what differs."""
    config = text_config(config)
    model_type = config.get("model_type")
    family = FAMILIES.get(model_type)
    if family is None:
        close, why = WHY_NOT.get(model_type, ("llama", "its decoder layout is not described in slimconv/arch.py"))
        raise SlimError(f"model_type {model_type!r} is not supported: {why}. The closest supported family is "
                        f"{close!r}", f"use a model of a supported family ({', '.join(FAMILIES)})")
    activation = config.get(family.activation) or config.get("hidden_act") or "silu"
    if activation not in ACTIVATIONS:
        raise SlimError(f"unsupported activation {activation!r} ({family.activation!r} in the source config)",
                        f"slimconv's MLPs run {', '.join(ACTIVATIONS)}")
    n, hd = config["num_hidden_layers"], head_dim(config)
    if family.query_pre_attn_scalar:
        scale = float(config[family.query_pre_attn_scalar]) ** -0.5
    else:
        scale = _number(config, family.attention_multiplier, hd ** -0.5)
    embed = family.embedding_multiplier
    rope, kinds = _rope(family, config, n)
    return Arch(
        model_type=model_type, family=family,
        bias={p: bool(config.get(v, False)) if isinstance(v, str) else v for p, v in family.attn_bias.items()},
        mlp_bias=bool(config.get(family.mlp_bias, False)) if isinstance(family.mlp_bias, str) else family.mlp_bias,
        activation=activation, windows=tuple(_windows(family, config, n)), rope=tuple(rope), rope_kinds=kinds,
        embedding_multiplier=(math.sqrt(config["hidden_size"]) if embed == "sqrt_hidden"
                              else _number(config, embed, None)),
        residual_multiplier=_number(config, family.residual_multiplier, 1.0),
        query_scale=scale / hd ** -0.5,
        logits_multiplier=1.0 / _number(config, family.logits_scaling, 1.0),
        attn_softcap=_number(config, family.attn_softcap, None),
        final_softcap=_number(config, family.final_softcap, None),
        head_dim=hd,
        sparse=tuple(_sparse(family.moe, config, n)),
        **_moe_numbers(family.moe, config),
    )


def moe_layer_keys(arch: Arch, kept: list[int]) -> dict:
    """The config entries that say which layers are sparse, rewritten for a stock output of source layers ``kept``:
    the dense layers as an explicit index list with a period of 1 (a removal breaks any longer period)."""
    moe = arch.moe
    if moe is None or not arch.num_experts or not moe.dense_layers:
        return {}
    out = {moe.dense_layers: [j for j, i in enumerate(kept) if not arch.sparse[i]]}
    if moe.sparse_step:
        out[moe.sparse_step] = 1
    return out


def expert_count_keys(arch: Arch, config: dict, experts: int, top_k: int) -> dict:
    """The config entries of a stock output whose every mixture-of-experts layer keeps ``experts`` experts and
    routes each token to ``top_k`` of them."""
    moe = arch.moe
    key = next(k for k in moe.num_experts if config.get(k) is not None)
    return {key: experts, moe.top_k: top_k}


def moe_layers(slim_layers: list[dict]) -> list[int]:
    """The output layers of a slim config's ``slim_layers`` whose MLP is a mixture of experts."""
    return [i for i, s in enumerate(slim_layers) if (s.get("mlp") or {}).get("experts") is not None]


# safetensors dtypes of the weights slimconv reads and writes: an integer tensor is quantised or not a weight.
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")


def tensor_shapes(config: dict, layers: list[tuple], bias: dict, mlp_bias: bool, qk_norm: str | None,
                  names: Names = CANONICAL, per_head_qk_norm: bool = False,
                  moe_names: MoeNames = CANONICAL_MOE) -> dict[str, tuple]:
    """Every tensor a checkpoint described by ``config`` must hold, as name -> shape, each dimension a pair
    (size, the config key or count it follows from), built from the name templates ``names``.

    ``layers``: per decoder layer, (query heads, KV heads, MLP width[, experts, shared expert width]), 0 for a
    removed sublayer; with experts, the MLP is a mixture of that many experts of that width (``moe_names``). ``bias``,
    ``mlp_bias``, ``qk_norm``: which optional tensors exist. q/k norms "head" are (head_dim,) in a stock
    checkpoint and (heads, head_dim) in slimconv's own format (``per_head_qk_norm``), where a wide layer's
    heads keep their member's gains; "full" norms are (heads x head_dim,)."""
    hidden, hd = (config["hidden_size"], "hidden_size"), head_dim(config)
    vocab = (config["vocab_size"], "vocab_size")
    shapes = {EMBED: (vocab, hidden), FINAL_NORM: (hidden,)}
    if not config.get("tie_word_embeddings", False):
        shapes[LM_HEAD] = (vocab, hidden)

    def add(at, name, kind, shape):
        shapes[f"{at}{name}.{kind}"] = shape

    for i, layer in enumerate(layers):
        q, kv, width, experts, shared = (*layer, 0, 0)[:5]
        at = LAYER.format(i=i)
        if q:
            heads = (q * hd, "num_attention_heads x head_dim" if q == config["num_attention_heads"]
                     else f"{q} heads x head_dim")
            kvs = (kv * hd, "num_key_value_heads x head_dim" if kv == kv_heads(config) else f"{kv} KV heads x head_dim")
            rows = {"q": heads, "k": kvs, "v": kvs}
            if names.qkv:
                add(at, names.qkv, "weight", ((q * hd + 2 * kv * hd, "(heads + 2 x KV heads) x head_dim"), hidden))
            for p in "qkv":
                if not names.qkv:
                    add(at, getattr(names, p), "weight", (rows[p], hidden))
                if bias[p]:
                    add(at, getattr(names, p), "bias", (rows[p],))
            add(at, names.o, "weight", (hidden, heads))
            if bias["o"]:
                add(at, names.o, "bias", (hidden,))
            if qk_norm:
                for p, n in (("q", q), ("k", kv)):
                    norm = (hd, "head_dim")
                    shape = (((n * hd, f"{n} heads x head_dim"),) if qk_norm == "full"
                             else ((n, f"{n} heads"), norm) if per_head_qk_norm else (norm,))
                    add(at, getattr(names, f"{p}_norm"), "weight", shape)
            for norm in (names.attn_in, names.attn_out):
                if norm:
                    add(at, norm, "weight", (hidden,))
        if width and experts:
            expert = (width, f"expert width {width}")
            add(at, moe_names.router, "weight", ((experts, f"{experts} experts"), hidden))
            for e in range(experts):
                for p, shape in (("gate", (expert, hidden)), ("up", (expert, hidden)), ("down", (hidden, expert))):
                    add(at, getattr(moe_names, p).format(e=e), "weight", shape)
            if shared:
                inner = (shared, "shared expert width")
                for p, shape in (("shared_gate", (inner, hidden)), ("shared_up", (inner, hidden)),
                                 ("shared_down", (hidden, inner))):
                    add(at, getattr(moe_names, p), "weight", shape)
                if moe_names.shared_router:
                    add(at, moe_names.shared_router, "weight", ((1, "1"), hidden))
        elif width:
            inter = (width, "intermediate_size" if width == config["intermediate_size"] else f"MLP width {width}")
            if names.gate_up:
                add(at, names.gate_up, "weight", ((2 * width, "2 x intermediate_size"), hidden))
            for p, shape in (("gate", (inter, hidden)), ("up", (inter, hidden)), ("down", (hidden, inter))):
                if not (names.gate_up and p != "down"):
                    add(at, getattr(names, p), "weight", shape)
                if mlp_bias:
                    add(at, getattr(names, p), "bias", shape[:1])
            for norm in (names.mlp_in, names.mlp_out):
                if norm:
                    add(at, norm, "weight", (hidden,))
    return shapes


def stock_shapes(config: dict, arch: Arch | None = None) -> dict[str, tuple]:
    """``tensor_shapes`` of a stock checkpoint of a supported family: every layer whole. ``arch``:
    ``get_arch(config)``, when the caller has it."""
    arch = arch or get_arch(config)
    attention = (config["num_attention_heads"], kv_heads(config))
    layers = [(*attention, arch.expert_width, arch.num_experts, arch.shared_width) if sparse
              else (*attention, config["intermediate_size"]) for sparse in arch.sparse]
    return tensor_shapes(config, layers, arch.bias, arch.mlp_bias, arch.qk_norm, arch.names,
                         moe_names=arch.moe.names if arch.moe else CANONICAL_MOE)
