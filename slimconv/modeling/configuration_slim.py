"""Configuration of a slimmed decoder: the source's shared settings plus one spec per output layer.

Copied beside the weights by slimconv; needs only transformers, in the range it was proven with.
"""
import warnings

import transformers
from packaging.version import Version
from transformers import LlamaConfig

# The oldest and newest transformers on which slimconv's compatibility matrix proved this file and
# modeling_slim.py (conversion exact, generate() equal to the uncached loop). pyproject's range and the
# model card read it from here; moving it is a deliberate change that reruns the matrix.
PROVEN_TRANSFORMERS = ("5.0.0", "5.24.0")

if not Version(PROVEN_TRANSFORMERS[0]) <= Version(transformers.__version__) <= Version(PROVEN_TRANSFORMERS[1]):
    warnings.warn(
        f"this slimconv model's code was proven with transformers {PROVEN_TRANSFORMERS[0]} to "
        f"{PROVEN_TRANSFORMERS[1]}; transformers {transformers.__version__} is installed. If generation looks "
        f"wrong, install a version in that range (pip install 'transformers>={PROVEN_TRANSFORMERS[0]},"
        f"<={PROVEN_TRANSFORMERS[1]}').",
        stacklevel=2,
    )


class SlimConfig(LlamaConfig):
    """A Llama-family config whose layers are described one by one in ``slim_layers``.

    Each entry of ``slim_layers`` is ``{"source_layers": [...], "attention": None | {"sources": [...],
    "num_heads": H, "num_key_value_heads": KV, "sliding_window": None | W}, "mlp": None | {"sources":
    [...], "intermediate_size": I}}``. ``num_attention_heads``/``num_key_value_heads`` keep the source's
    per-layer values because RoPE and the head size derive from them. A mixture-of-experts MLP adds ``"experts"``
    (the source experts kept, stored renumbered 0..k-1, each of width I), ``"top_k"``, ``"norm_topk_prob"`` and
    ``"shared_intermediate_size"`` (a gated shared expert, or None).

    The source family's differences from Llama that the weights could not absorb: ``norms`` (which of
    attention_input, attention_output, mlp_input, mlp_output each layer has), ``qk_norm`` (False, "head" or
    "full"), ``rope_kinds`` (RoPE parameters by the kind an attention names in its ``rope``; None: no RoPE),
    ``embedding_multiplier``, ``attn_logit_softcapping`` and ``final_logit_softcapping``.

    ``early_exit`` (optional) is the AdaInfer stop policy that the modeling code evaluates after each
    layer: ``{"policy": "linear" | "gap", "features": [...], "weights": [...], "bias": b, "threshold": t,
    "min_layer": m, "every": k}``. ``early_exit_enabled = False`` runs every layer (exactness checks).
    """

    model_type = "slimconv"
    slim_layers: list | None = None
    projection_bias: dict | None = None
    qk_norm: bool | str = False
    norms: dict | None = None
    rope_kinds: dict | None = None
    embedding_multiplier: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    source_model_type: str | None = None
    early_exit: dict | None = None
    early_exit_enabled: bool = True
