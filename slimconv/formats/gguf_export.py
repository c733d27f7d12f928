"""GGUF export for llama.cpp, written directly with the `gguf` library, one tensor at a time.

Architectures (llama.cpp's names):
  native llama.cpp's own architecture of the family (``NATIVE``: gemma, gemma2, gemma3, qwen3, olmo2, smollm3,
         phi3) when every kept layer is whole (only blocks removed): its graph has the family's norms, q/k
         norms, soft-caps, windows and rotary as llama.cpp's own converter writes them. llama.cpp derives some
         layer kinds from the layer's index (smollm3's no-RoPE step); a layer that would change kind at its new
         index is refused. Sliding windows are written per layer (attention.sliding_window_pattern), so
         gemma2/gemma3 layers keep their kind whatever blocks go. Mixtures of experts (qwen3moe, qwen2moe,
         llama for Mixtral) store each projection of a layer's experts as one stacked tensor: the one tensor in
         memory is then that stack, filled one expert at a time
  llama  every kept layer has its attention and MLP (only whole blocks removed)
  deci   per-layer head counts and MLP widths (NVIDIA's nemotron-nas in llama.cpp): attention removed is a
         layer with 0 heads; MLP removed while attention stays is written as a 1-wide all-zero MLP (norm gain
         ones, gate/up/down zero), because llama.cpp's deci graph (src/models/deci.cpp, ``if (n_ff == 0)
         continue;``) skips the rest of a layer whose FFN width is 0 *before* adding the attention's residual,
         dropping the whole layer; the zero MLP adds exactly 0 at the cost of one multiply-add per token.

Weights: for llama, deci and smollm3 (llama.cpp's NORM RoPE) q and k rows are permuted from Hugging Face's
half-split RoPE layout to llama.cpp's interleaved pairs (what llama.cpp's own converter does); the other native
architectures rotate half-split (NEOX) as Hugging Face does. Precisions: f32, f16, bf16, and the
block quantisations q8_0 / q4_0 computed by the `gguf` library's quantiser (a pure numpy port of llama.cpp's
reference quantise functions; llama.cpp's own `llama-quantize` is a C++ binary that needs an f32/f16 GGUF
first, and its Python binding is not a dependency of slimconv). With q4_0 the token embedding / output stay
q8_0, as llama.cpp keeps the output head at higher precision; 1-D tensors (norms, biases) stay f32, and a
matrix whose rows are not a multiple of 32 (the 1-wide zero MLP) stays f32.

Tokenizers: byte-level BPE (tokenizer.json, llama.cpp's "gpt2" model, with a pre-tokenizer name recognised
from the tokenizer's own splitting rules) and SentencePiece (tokenizer.model, llama.cpp's "llama" model, read
with a small protobuf reader: no sentencepiece dependency).
"""
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..arch import moe_layers
from ..errors import SlimError
from ..recipe import GGUF_DTYPES
from .kquant import KQUANTS

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


def _qtype(name: str):
    from gguf import GGMLQuantizationType as T

    return {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0}[name]


# ---------------------------------------------------------------------------------------------- what fits
@dataclass(frozen=True)
class Native:
    """llama.cpp's own architecture for a family (src/models/<arch>.cpp), what its graph takes from the file and
    what it decides by itself. Everything else (norms, q/k norm form, activation) is read from the slim config."""

    arch: str
    pairs: bool = False            # NORM RoPE: q/k rows permuted to interleaved pairs
    windows: bool = False          # reads a per-layer sliding_window_pattern
    swa_rope_kind: bool = False    # sliding layers rotate with rope.freq_base_swa, unscaled (gemma3)
    softcaps: tuple = ()           # the soft-caps its graph applies
    embedding_scale: bool = False  # scales embeddings by sqrt(n_embd) itself
    tied_only: bool = False        # reads the output head from token_embd, always
    square: bool = False           # creates q and o as n_embd x n_embd: heads x head_dim must equal hidden
    partial_rotary: bool = False   # rotates the first rope.dimension_count dims of a head
    gate_up: bool = False          # ffn_up holds gate then up (no ffn_gate)
    no_rope_step: int = 0          # a layer with (index + 1) % step == 0 has no RoPE, whatever the file says
    head_required: bool = False    # needs output.weight even when the head is tied
    experts: bool | None = None    # every layer a mixture of experts, llama.cpp renormalising the top-k weights
                                   # (True) or not (False); None: no experts
    shared_expert: bool = False    # the experts come with a gated shared expert (Qwen2-MoE)
    activation: str = "silu"
    large: tuple = ()              # layer counts llama.cpp takes for its 27B type, whose query scale is
                                   # (hidden / heads) ** -0.5 instead of head_dim ** -0.5


_GEMMA = dict(embedding_scale=True, activation="gelu_pytorch_tanh")
NATIVE = {
    "gemma": Native("gemma", tied_only=True, **_GEMMA),
    "gemma2": Native("gemma2", windows=True, softcaps=("attn_logit_softcapping", "final_logit_softcapping"),
                     tied_only=True, large=(46,), **_GEMMA),
    "gemma3_text": Native("gemma3", windows=True, swa_rope_kind=True, softcaps=("final_logit_softcapping",),
                          large=(62,), **_GEMMA),
    "qwen3": Native("qwen3"),
    "olmo2": Native("olmo2", square=True, head_required=True),
    "smollm3": Native("smollm3", pairs=True, no_rope_step=4),
    "phi3": Native("phi3", square=True, partial_rotary=True, gate_up=True),
    "qwen3_moe": Native("qwen3moe", experts=True),
    "qwen2_moe": Native("qwen2moe", experts=False, shared_expert=True, square=True, head_required=True),
    "mixtral": Native("llama", pairs=True, experts=True),
}


def native_of(config: dict) -> Native | None:
    """The native architecture this slim config goes to: its family's, when every layer is whole (and, for a mixture
    of experts, has its experts)."""
    native = NATIVE.get(config.get("source_model_type"))
    if native is None or _is_deci(config) or (moe_layers(config["slim_layers"]) and native.experts is None):
        return None
    return native


def _expert_blockers(config: dict, native: Native) -> list[str]:
    """What keeps llama.cpp's mixture-of-experts graph (one expert count, top-k and width for the model, every layer
    sparse) from running these layers."""
    arch, layers = native.arch, config["slim_layers"]
    mlps = [s["mlp"] for s in layers]
    dense = [i for i, m in enumerate(mlps) if m.get("experts") is None]
    if dense:
        return [f"output layers {dense} have a dense MLP: llama.cpp's {arch} makes every layer a mixture of experts "
                "(remove those blocks, or keep the Hugging Face checkpoint)"]
    why = []
    for key, what in (("experts", "expert count"), ("top_k", "top-k"), ("intermediate_size", "expert width"),
                      ("shared_intermediate_size", "shared expert width")):
        values = sorted({len(m[key]) if key == "experts" else m.get(key) or 0 for m in mlps})
        if len(values) > 1:
            why.append(f"{what}s {values} differ between layers (llama.cpp's {arch} has one for the model)")
    if any(bool(m.get("norm_topk_prob")) != native.experts for m in mlps):
        why.append(f"norm_topk_prob {mlps[0].get('norm_topk_prob')} (llama.cpp's {arch} "
                   f"{'renormalises' if native.experts else 'does not renormalise'} the top-k routing weights)")
    if any(m.get("shared_intermediate_size") for m in mlps) != native.shared_expert:
        why.append(f"a shared expert {'missing' if native.shared_expert else ''} (llama.cpp's {arch} "
                   f"{'has' if native.shared_expert else 'has none'})".replace("  ", " "))
    return why


def _native_blockers(config: dict, native: Native) -> list[str]:
    why, family, arch = [], config.get("source_model_type"), native.arch
    if native.experts is not None:
        why += _expert_blockers(config, native)
    layers = [s["attention"] for s in config["slim_layers"]]
    hidden, heads, hd = config["hidden_size"], layers[0]["num_heads"], config["head_dim"]
    act = config.get("hidden_act", "silu")
    if act != native.activation:
        why.append(f"activation {act!r} (llama.cpp's {arch} MLP is {native.activation}-gated)")
    windows = {a.get("sliding_window") for a in layers} - {None}
    if windows and not native.windows:
        why.append(f"sliding-window attention (llama.cpp's {arch} attends to everything)")
    if len(windows) > 1:
        why.append(f"sliding windows of sizes {sorted(windows)} (llama.cpp has one window size)")
    for cap in ("attn_logit_softcapping", "final_logit_softcapping"):
        if config.get(cap) and cap not in native.softcaps:
            why.append(f"{cap} (llama.cpp's {arch} does not apply it)")
    multiplier = config.get("embedding_multiplier")
    if native.embedding_scale and multiplier != math.sqrt(hidden):
        why.append(f"embedding multiplier {multiplier} (llama.cpp's {arch} scales embeddings by sqrt(hidden))")
    elif not native.embedding_scale and multiplier is not None:
        why.append(f"an embedding multiplier (llama.cpp's {arch} has none)")
    if native.tied_only and not config.get("tie_word_embeddings", False):
        why.append(f"an untied output head (llama.cpp's {arch} reads the head from the token embedding)")
    if native.square and heads * hd != hidden:
        why.append(f"{heads} heads x head_dim {hd} != hidden_size {hidden} (llama.cpp's {arch} takes them equal)")
    bias = config.get("projection_bias") or {}
    if bias.get("o") or config.get("mlp_bias"):
        why.append(f"output-projection or MLP biases (llama.cpp's {arch} loads q/k/v biases only)")
    kinds = _rope_kinds(config)
    used = [a.get("rope", "default") for a in layers]
    for j, kind in enumerate(used):
        if native.no_rope_step and (kind is None) != ((j + 1) % native.no_rope_step == 0):
            why.append(f"output layer {j} ({'no RoPE' if kind is None else 'RoPE'}): llama.cpp's {arch} rotates "
                       f"every layer but each {native.no_rope_step}th (layers {native.no_rope_step - 1}, "
                       f"{2 * native.no_rope_step - 1}, ...), so the kept layers must keep their RoPE at their new "
                       "index")
            break
        if kind is None and not native.no_rope_step:
            why.append(f"output layer {j} has no RoPE (llama.cpp's {arch} rotates every layer)")
            break
    rotated = {k for k in used if k is not None}
    swa = {a.get("rope") for a in layers if a.get("sliding_window")} if native.swa_rope_kind else set()
    if len(rotated - swa) > 1:
        why.append(f"RoPE kinds {sorted(rotated - swa)} on the layers without a window (llama.cpp has one)")
    for kind in rotated:
        params = kinds[kind]
        if params.get("rope_type", "default") not in ("default", "linear") or (
                kind in swa and params.get("rope_type", "default") != "default"):
            why.append(f"RoPE scaling {params.get('rope_type')!r} on {kind!r} layers (written: default and linear; "
                       "sliding layers of gemma3 unscaled)")
        if params.get("partial_rotary_factor", 1.0) != 1.0 and not native.partial_rotary:
            why.append(f"partial rotary (llama.cpp's {arch} rotates whole heads)")
    if len(swa) > 1:
        why.append(f"RoPE kinds {sorted(swa)} on the sliding layers (llama.cpp has one)")
    return why


def _query_rescale(config: dict, native: Native | None) -> float:
    """What q (or its norm) is multiplied by so that llama.cpp's own query scale gives the source's: the canonical
    layout folds the source's scale relative to head_dim ** -0.5, and gemma2/gemma3 of their 27B layer count
    scale by (hidden / heads) ** -0.5 instead."""
    layers = config["slim_layers"]
    if native is None or len(layers) not in native.large:
        return 1.0
    hd, per_head = config["head_dim"], config["hidden_size"] // layers[0]["attention"]["num_heads"]
    return (hd ** -0.5) / (per_head ** -0.5)


def gguf_blockers(config: dict) -> list[str]:
    """Why llama.cpp cannot run this slim config exactly (empty: it can), in its family's own architecture
    (``NATIVE``) when every layer is whole, else in its llama/deci architectures."""
    why = []
    if config.get("early_exit"):
        why.append("the output has an early-exit policy (llama.cpp runs every layer)")
    layers = config["slim_layers"]
    for i, s in enumerate(layers):
        if len(s["source_layers"]) > 1:
            why.append(f"output layer {i} is the parallel group {s['source_layers']} (llama.cpp has no parallel layers)")
    family = config.get("source_model_type")
    moe = moe_layers(layers)
    native = native_of(config)
    if native:
        return why + _native_blockers(config, native)
    if moe:
        why.append(f"output layers {moe} are mixtures of experts with attention or MLP sublayers removed elsewhere: "
                   f"llama.cpp's {NATIVE[family].arch if family in NATIVE else family} runs whole layers only "
                   "(remove whole blocks instead)")
    return why + _deci_blockers(config, family, moe)


def _deci_blockers(config: dict, family: str, moe: list) -> list[str]:
    """What keeps llama.cpp's llama/deci architectures from running a slim config, for a family whose own
    architecture cannot run it either (sublayers removed) or that has none."""
    why, layers = [], config["slim_layers"]
    for i, s in enumerate(layers):
        if s.get("attention") and s["attention"].get("sliding_window"):
            why.append(f"output layer {i} has sliding-window attention (llama.cpp's llama/deci attend to everything)")
            break
    if config.get("qk_norm"):
        why.append(f"{family} has q/k norms (llama.cpp's llama/deci do not load them)")
    norms = {"attention_input": True, "mlp_input": True, **(config.get("norms") or {})}
    if norms.get("attention_output") or norms.get("mlp_output") or not (norms["attention_input"] and norms["mlp_input"]):
        why.append(f"{family} has output norms or lacks input norms, which llama.cpp's llama/deci do not have")
    if config.get("hidden_act", "silu") != "silu":
        why.append(f"activation {config['hidden_act']!r} (llama.cpp's llama/deci MLP is SiLU-gated)")
    if config.get("attn_logit_softcapping") or config.get("final_logit_softcapping"):
        why.append("logit soft-capping (llama.cpp's llama/deci have none)")
    kinds = _rope_kinds(config)
    used = {(s.get("attention") or {}).get("rope", "default") for s in layers if s.get("attention")}
    if None in used or len(used) > 1:
        why.append(f"{family} has layers without RoPE or RoPE per layer type (llama.cpp's llama/deci rotate every "
                   "layer alike)")
    for kind in used - {None}:
        rope_type = kinds[kind].get("rope_type", "default")
        if rope_type not in ("default", "linear"):
            why.append(f"RoPE scaling {rope_type!r} (this exporter writes default and linear RoPE only)")
        if kinds[kind].get("partial_rotary_factor", 1.0) != 1.0:
            why.append(f"partial rotary (factor {kinds[kind]['partial_rotary_factor']}): llama.cpp's llama/deci "
                       "rotate whole heads")
    if layers and not layers[0].get("attention"):
        why.append("output layer 0 has no attention: llama.cpp derives the head size from layer 0's head count")
    if why and family in NATIVE and not moe:
        why.insert(0, f"attention or MLP sublayers are removed: llama.cpp's own {NATIVE[family].arch} architecture "
                      "runs whole layers only (remove whole blocks instead), and its llama/deci cannot run this "
                      "model")
    return why


def _rope_kinds(config: dict) -> dict:
    return config.get("rope_kinds") or {"default": config.get("rope_parameters") or {}}


# ---------------------------------------------------------------------------------------------- tokenizer
def _read_spm(path: Path) -> list[tuple[str, float, int]]:
    """(piece, score, type) of every piece in a SentencePiece tokenizer.model (protobuf ModelProto field 1).
    Piece types use SentencePiece's numbering, which llama.cpp's token types share (1 normal, 2 unknown,
    3 control, 4 user-defined, 5 unused, 6 byte)."""
    import struct

    data = path.read_bytes()

    def varint(buf, i):
        shift = value = 0
        while True:
            b = buf[i]
            i += 1
            value |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                return value, i

    def fields(buf):
        i = 0
        while i < len(buf):
            key, i = varint(buf, i)
            num, wire = key >> 3, key & 7
            if wire == 0:
                value, i = varint(buf, i)
            elif wire == 1:
                value, i = buf[i:i + 8], i + 8
            elif wire == 2:
                n, i = varint(buf, i)
                value, i = buf[i:i + n], i + n
            elif wire == 5:
                value, i = buf[i:i + 4], i + 4
            else:
                raise SlimError(f"{path} is not a SentencePiece model (protobuf wire type {wire})")
            yield num, value

    pieces = []
    for num, value in fields(data):
        if num == 1:
            piece, score, kind = "", 0.0, 1
            for n, v in fields(value):
                if n == 1:
                    piece = bytes(v).decode("utf-8")
                elif n == 2:
                    score = struct.unpack("<f", v)[0]
                elif n == 3:
                    kind = v
            pieces.append((piece, score, kind))
    return pieces


def _bpe_pre(tok: dict) -> str | None:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer.json, from its splitting rules (None: unknown)."""
    pre = tok.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds and kinds[0] == "Split":
        regex = (steps[0].get("pattern") or {}).get("Regex")
        return {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}.get(regex)
    return None


def _special_ids(slim_dir: Path, config: dict, vocab: dict) -> dict:
    tc = json.loads((slim_dir / "tokenizer_config.json").read_text()) if (slim_dir / "tokenizer_config.json").is_file() else {}
    ids = {}
    for key in ("bos", "eos", "unk", "pad"):
        tok = tc.get(f"{key}_token")
        tok = tok.get("content") if isinstance(tok, dict) else tok
        if tok in vocab:
            ids[key] = vocab[tok]
        elif isinstance(config.get(f"{key}_token_id"), int):
            ids[key] = config[f"{key}_token_id"]
    template = tc.get("chat_template")
    if template is None and (slim_dir / "chat_template.jinja").is_file():
        template = (slim_dir / "chat_template.jinja").read_text()
    return dict(ids=ids, add_bos=tc.get("add_bos_token"), add_eos=tc.get("add_eos_token"), template=template)


def write_tokenizer(writer, slim_dir: Path, config: dict) -> str:
    """Adds the tokenizer metadata; returns a one-line description. The token list is padded to the model's
    vocab_size with unused entries, as llama.cpp sizes the embedding from the list."""
    n_vocab = config["vocab_size"]
    spm, tj = slim_dir / "tokenizer.model", slim_dir / "tokenizer.json"
    tok = json.loads(tj.read_text()) if tj.is_file() else None
    model = (tok or {}).get("model", {})
    if spm.is_file() and (tok is None or model.get("byte_fallback") or model.get("type") == "Unigram"):
        pieces = _read_spm(spm)
        added = {a["content"]: a["id"] for a in (tok or {}).get("added_tokens", [])}
        for content, i in added.items():
            if i >= len(pieces):
                pieces += [(f"[PAD{j}]", -1000.0, 5) for j in range(len(pieces), i)] + [(content, 0.0, 3)]
        pieces += [(f"[PAD{j}]", -1000.0, 5) for j in range(len(pieces), n_vocab)]
        if len(pieces) > n_vocab:
            raise SlimError(f"{spm}: {len(pieces)} pieces but the model's vocab_size is {n_vocab}")
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list([p for p, _, _ in pieces])
        writer.add_token_scores([s for _, s, _ in pieces])
        writer.add_token_types([t for _, _, t in pieces])
        vocab = {p: i for i, (p, _, _) in enumerate(pieces)}
        kind = "SentencePiece (tokenizer.model)"
    elif tok is not None and model.get("type") == "BPE" and not model.get("byte_fallback"):
        vocab = dict(model["vocab"])
        specials = {}
        for a in tok.get("added_tokens", []):
            vocab[a["content"]] = a["id"]
            specials[a["id"]] = 3 if a.get("special") else 4
        by_id = {i: t for t, i in vocab.items()}
        if max(by_id) >= n_vocab:
            raise SlimError(f"{tj}: token id {max(by_id)} is outside the model's vocab_size {n_vocab}")
        tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n_vocab)]
        types = [specials.get(i, 1 if i in by_id else 5) for i in range(n_vocab)]
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        pre = _bpe_pre(tok)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre or "default")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        kind = f"byte-level BPE, pre-tokenizer {pre!r}" if pre else (
            "byte-level BPE with a pre-tokenizer llama.cpp does not name: written as 'default', so llama.cpp "
            "may split text differently from transformers (token ids given directly are unaffected)")
    else:
        raise SlimError(f"{slim_dir}: no tokenizer GGUF can carry (byte-level BPE tokenizer.json or SentencePiece "
                        "tokenizer.model)", "copy the source model's tokenizer files into the output folder")
    sp = _special_ids(slim_dir, config, vocab)
    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                     ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        if key in sp["ids"]:
            add(sp["ids"][key])
    if sp["add_bos"] is not None:
        writer.add_add_bos_token(bool(sp["add_bos"]))
    if sp["add_eos"] is not None:
        writer.add_add_eos_token(bool(sp["add_eos"]))
    if isinstance(sp["template"], str):
        writer.add_chat_template(sp["template"])
    return kind


# ---------------------------------------------------------------------------------------------- tensors
def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of q or k (or their bias) from the half-split RoPE layout (first half of each head's dims rotate
    with the second half) to interleaved pairs (dims 2j, 2j+1 rotate together)."""
    shape = w.shape
    return w.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).transpose(1, 2).reshape(shape)


def _plan_tensors(config: dict, ckpt, dtype: str, native: Native | None = None):
    """Yields (gguf name, torch shape, compute) for every tensor, in file order. On llama/deci an embedding
    multiplier (Granite) is folded into the token embedding, the tied output head then written as the unscaled
    matrix; a native architecture scales embeddings itself (Gemma) or has none."""
    from ..arch import canonical_names

    hidden, head_dim = config["hidden_size"], config["head_dim"]
    L = "model.layers.{}."
    mult = None if native else config.get("embedding_multiplier")
    pairs = native is None or native.pairs
    rescale = _query_rescale(config, native)
    names = canonical_names(config.get("norms"))
    qk_norm = config.get("qk_norm")
    qk_norm = "head" if qk_norm is True else qk_norm

    def src(name, transform=None):
        return lambda: (transform(ckpt.get(name)) if transform else ckpt.get(name))

    def q_side(n, scaled):
        """q/k rows: permuted to pairs where llama.cpp rotates pairs, q rescaled to llama.cpp's query scale."""
        permute = (lambda t: _permute(t, n)) if pairs else (lambda t: t)
        return (lambda t: permute(t.to(torch.float32) * rescale)) if scaled and rescale != 1.0 else permute

    def one_gain(i, p, scaled):
        def compute():
            t = ckpt.get(L.format(i) + f"self_attn.{p}_norm.weight").to(torch.float32)
            if not torch.equal(t, t[:1].expand_as(t)):
                raise SlimError(f"output layer {i}: its {p}_norm gains differ per head (heal trains them so in the slim "
                                f"format); llama.cpp's {native.arch} has one gain per head dimension",
                                "export the unhealed output, or heal the stock output")
            return t[0] * (rescale if scaled else 1.0)
        return compute

    scaled = (lambda t: t.to(torch.float32) * float(torch.tensor(mult, dtype=t.dtype))) if mult is not None else None
    yield "token_embd.weight", ckpt.shapes["model.embed_tokens.weight"], src("model.embed_tokens.weight", scaled)
    for i, s in enumerate(config["slim_layers"]):
        pre = L.format(i)
        if s.get("attention"):
            heads, kv = s["attention"]["num_heads"], s["attention"]["num_key_value_heads"]
            if names.attn_in:
                yield f"blk.{i}.attn_norm.weight", (hidden,), src(pre + names.attn_in + ".weight")
            for p, g, n in (("q", "attn_q", heads), ("k", "attn_k", kv), ("v", "attn_v", None), ("o", "attn_output", None)):
                for kind in ("weight", "bias"):
                    name = pre + f"self_attn.{p}_proj.{kind}"
                    if name in ckpt:
                        yield (f"blk.{i}.{g}.{kind}", ckpt.shapes[name],
                               src(name, q_side(n, p == "q" and not qk_norm) if n else None))
            if qk_norm:
                for p, n in (("q", heads), ("k", kv)):
                    name = pre + f"self_attn.{p}_norm.weight"
                    if qk_norm == "head":
                        yield f"blk.{i}.attn_{p}_norm.weight", (head_dim,), one_gain(i, p, p == "q")
                    else:  # over all heads: OLMo 2, which rotates half-split and has no query rescale
                        yield f"blk.{i}.attn_{p}_norm.weight", ckpt.shapes[name], src(name)
            if names.attn_out:
                yield f"blk.{i}.post_attention_norm.weight", (hidden,), src(pre + names.attn_out + ".weight")
        if s.get("mlp"):
            if names.mlp_in:
                yield f"blk.{i}.ffn_norm.weight", (hidden,), src(pre + names.mlp_in + ".weight")
            if s["mlp"].get("experts") is not None:
                yield from _expert_tensors(i, s["mlp"], ckpt, hidden)
            elif native and native.gate_up:
                width = s["mlp"]["intermediate_size"]
                yield (f"blk.{i}.ffn_up.weight", (2 * width, hidden),
                       lambda pre=pre: torch.cat([ckpt.get(pre + "mlp.gate_proj.weight"), ckpt.get(pre + "mlp.up_proj.weight")]))
                yield f"blk.{i}.ffn_down.weight", ckpt.shapes[pre + "mlp.down_proj.weight"], src(pre + "mlp.down_proj.weight")
            else:
                for p, g in (("gate", "ffn_gate"), ("up", "ffn_up"), ("down", "ffn_down")):
                    for kind in ("weight", "bias"):
                        name = pre + f"mlp.{p}_proj.{kind}"
                        if name in ckpt:
                            yield f"blk.{i}.{g}.{kind}", ckpt.shapes[name], src(name)
            if names.mlp_out:
                yield f"blk.{i}.post_ffw_norm.weight", (hidden,), src(pre + names.mlp_out + ".weight")
        elif s.get("attention") and _is_deci(config):  # the 1-wide zero MLP (see the module's docstring)
            yield f"blk.{i}.ffn_norm.weight", (hidden,), lambda: torch.ones(hidden)
            yield f"blk.{i}.ffn_gate.weight", (1, hidden), lambda: torch.zeros(1, hidden)
            yield f"blk.{i}.ffn_up.weight", (1, hidden), lambda: torch.zeros(1, hidden)
            yield f"blk.{i}.ffn_down.weight", (hidden, 1), lambda: torch.zeros(hidden, 1)
    yield "output_norm.weight", (hidden,), src("model.norm.weight")
    if "lm_head.weight" in ckpt and not config.get("tie_word_embeddings", False):
        yield "output.weight", ckpt.shapes["lm_head.weight"], src("lm_head.weight")
    elif mult is not None or (native and native.head_required):
        yield "output.weight", ckpt.shapes["model.embed_tokens.weight"], src("model.embed_tokens.weight")


def _expert_tensors(i: int, mlp: dict, ckpt, hidden: int):
    """A mixture-of-experts layer as llama.cpp stores it: the router, each projection of the experts stacked into one
    (experts, rows, columns) tensor (filled one expert at a time), and the shared expert with its gate."""
    from ..arch import CANONICAL_MOE as M

    pre, n, width = f"model.layers.{i}.", len(mlp["experts"]), mlp["intermediate_size"]

    def stacked(p):
        def compute():
            first = ckpt.get(pre + getattr(M, p).format(e=0) + ".weight")
            out = torch.empty((n, *first.shape), dtype=first.dtype)
            out[0] = first
            for e in range(1, n):
                out[e] = ckpt.get(pre + getattr(M, p).format(e=e) + ".weight")
            return out
        return compute

    yield f"blk.{i}.ffn_gate_inp.weight", (n, hidden), lambda: ckpt.get(pre + M.router + ".weight")
    for p, g, shape in (("gate", "ffn_gate_exps", (n, width, hidden)), ("up", "ffn_up_exps", (n, width, hidden)),
                        ("down", "ffn_down_exps", (n, hidden, width))):
        yield f"blk.{i}.{g}.weight", shape, stacked(p)
    shared = mlp.get("shared_intermediate_size")
    if shared:
        for p, g, shape in (("shared_gate", "ffn_gate_shexp", (shared, hidden)),
                            ("shared_up", "ffn_up_shexp", (shared, hidden)),
                            ("shared_down", "ffn_down_shexp", (hidden, shared))):
            yield f"blk.{i}.{g}.weight", shape, (lambda name=pre + getattr(M, p) + ".weight": ckpt.get(name))
        yield (f"blk.{i}.ffn_gate_inp_shexp.weight", (hidden,),
               lambda: ckpt.get(pre + M.shared_router + ".weight").reshape(hidden))


def _is_deci(config: dict) -> bool:
    """deci unless every layer has attention and MLP with one head count, KV-head count and MLP width (llama, or the
    family's own architecture, is then exact): a layer narrowed by shrink needs deci's per-layer values."""
    layers = config["slim_layers"]
    if not all(s.get("attention") and s.get("mlp") for s in layers):
        return True
    heads = {(s["attention"]["num_heads"], s["attention"]["num_key_value_heads"]) for s in layers}
    widths = {s["mlp"]["intermediate_size"] for s in layers if s["mlp"].get("experts") is None}
    return len(heads) > 1 or len(widths) > 1


def _tensor_type(name: str, shape, dtype: str):
    from gguf import GGMLQuantizationType as T

    want = _qtype(dtype)
    if len(shape) < 2:
        return T.F32
    if want in (T.Q8_0, T.Q4_0):
        if shape[-1] % 32:
            return T.F32
        if want == T.Q4_0 and name in ("token_embd.weight", "output.weight"):
            return T.Q8_0
    return want


def _encode(t: torch.Tensor, qtype) -> np.ndarray:
    from gguf import GGMLQuantizationType as T
    from gguf.quants import quantize

    a = t.to(torch.float32).contiguous().numpy()
    if qtype == T.F32:
        return a
    if qtype == T.F16:
        return a.astype(np.float16)
    return quantize(a, qtype)


def _byte_shape(shape, qtype) -> tuple:
    from gguf import GGMLQuantizationType as T
    from gguf.quants import quant_shape_to_byte_shape

    if qtype in (T.F32, T.F16):
        return tuple(shape)
    return tuple(quant_shape_to_byte_shape(tuple(shape), qtype))


def checked_config(slim_dir: Path, dtype: str) -> dict:
    """The output's config as slim layers, or a SlimError naming what GGUF cannot carry and what can."""
    from ..layout import as_slim_config

    from ..convert import refuse_multimodal

    raw = json.loads((slim_dir / "config.json").read_text())
    refuse_multimodal(slim_dir, raw, "GGUF", "llama.cpp runs one as a text GGUF beside an mmproj GGUF of the vision "
                      "tower (its convert_hf_to_gguf.py --mmproj)")
    cfg = as_slim_config(raw).to_dict()
    cfg["early_exit"] = raw.get("early_exit")
    why = gguf_blockers(cfg)
    if why:
        raise SlimError("GGUF cannot carry this model exactly: " + "; ".join(why),
                        "keep the Hugging Face checkpoint (the slim format runs it) or `slimconv export` to ONNX, "
                        "which carry parallel groups and every supported architecture")
    if dtype not in GGUF_DTYPES or dtype in KQUANTS:  # k-quants: llama.cpp quantises the f32 file (kquant.py)
        raise SlimError(f"--dtype {dtype}: GGUF precisions written here are "
                        f"{', '.join(d for d in GGUF_DTYPES if d not in KQUANTS)}")
    return cfg


def write_gguf(slim_dir: Path, path: Path, dtype: str = "f32", name: str | None = None) -> dict:
    """Writes ``path`` from a slimconv output folder; returns what was written (architecture, tokenizer, sizes)."""
    import gguf

    from ..layout import canonical
    from ..provenance import GGUF_KEY
    from ..source import Checkpoint, weights_sha256

    cfg = checked_config(slim_dir, dtype)
    ckpt = canonical(Checkpoint(slim_dir))
    deci = _is_deci(cfg)
    native = native_of(cfg)
    arch = native.arch if native else "deci" if deci else "llama"
    layers = cfg["slim_layers"]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name or slim_dir.name)
    writer.add_string(GGUF_KEY, weights_sha256(slim_dir))  # what push and validate check it against
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(len(layers))
    heads = [s["attention"]["num_heads"] if s.get("attention") else 0 for s in layers]
    kv = [s["attention"]["num_key_value_heads"] if s.get("attention") else 0 for s in layers]
    ff = [s["mlp"]["intermediate_size"] if s.get("mlp") else (1 if s.get("attention") else 0) for s in layers]
    if deci:
        writer.add_head_count(heads)
        writer.add_head_count_kv(kv)
        writer.add_feed_forward_length(ff)
    else:
        writer.add_head_count(heads[0])
        writer.add_head_count_kv(kv[0])
        writer.add_feed_forward_length(ff[0])
    moe = [s["mlp"] for s in layers if (s.get("mlp") or {}).get("experts") is not None]
    if moe:  # native_of: every layer alike (checked_config refused anything else)
        writer.add_expert_count(len(moe[0]["experts"]))
        writer.add_expert_used_count(moe[0]["top_k"])
        writer.add_expert_feed_forward_length(moe[0]["intermediate_size"])
        if moe[0].get("shared_intermediate_size"):
            writer.add_expert_shared_feed_forward_length(moe[0]["shared_intermediate_size"])
    writer.add_key_length(cfg["head_dim"])
    writer.add_value_length(cfg["head_dim"])
    kinds = _rope_kinds(cfg)
    attention = [s["attention"] for s in layers if s.get("attention")]
    windowed = {a.get("rope") for a in attention if a.get("sliding_window")} if native and native.swa_rope_kind else set()
    full = [a.get("rope", "default") for a in attention if a.get("rope", "default") not in windowed | {None}]
    rope = kinds[full[0]] if full else next(iter(kinds.values()))
    theta = lambda r: float(r.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    writer.add_rope_dimension_count(int(cfg["head_dim"] * rope.get("partial_rotary_factor", 1.0)))
    writer.add_rope_freq_base(theta(rope))
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    if windowed:
        writer.add_rope_freq_base_swa(theta(kinds[next(iter(windowed))]))
    if native and native.windows:
        windows = [a.get("sliding_window") for a in attention]
        if any(windows):
            writer.add_sliding_window(next(w for w in windows if w))
        # Per layer, so that every kept layer keeps its kind at its new index (llama.cpp's default is a period).
        if any(windows) or native.arch == "gemma2":
            writer.add_sliding_window_pattern([bool(w) for w in windows])
    for cap in native.softcaps if native else ():
        if cfg.get(cap):
            (writer.add_attn_logit_softcapping if cap.startswith("attn") else writer.add_final_logit_softcapping)(
                float(cfg[cap]))
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_vocab_size(cfg["vocab_size"])
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
             "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[dtype]
    writer.add_file_type(ftype)
    if dtype in ("q8_0", "q4_0"):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokenizer = write_tokenizer(writer, slim_dir, cfg)

    tensors = []
    for tname, shape, compute in _plan_tensors(cfg, ckpt, dtype, native):
        qtype = _tensor_type(tname, shape, dtype)
        bshape = _byte_shape(shape, qtype)
        item = {gguf.GGMLQuantizationType.F32: 4, gguf.GGMLQuantizationType.F16: 2}.get(qtype, 1)
        nbytes = int(np.prod(bshape)) * item
        np_dtype = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}.get(qtype, np.uint8)
        writer.add_tensor_info(tname, bshape, np.dtype(np_dtype), nbytes,
                               raw_dtype=None if np_dtype is not np.uint8 else qtype)
        tensors.append((tname, shape, qtype, compute))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tname, shape, qtype, compute in tensors:  # one tensor in memory at a time
        t = compute()
        if tuple(t.shape) != tuple(shape):
            raise RuntimeError(f"{tname}: computed {tuple(t.shape)}, planned {tuple(shape)}")
        writer.write_tensor_data(_encode(t, qtype))
        del t
    writer.close()
    return dict(file=path.name, architecture=arch, dtype=dtype, tokenizer=tokenizer, tensors=len(tensors),
                bytes=path.stat().st_size, layers=len(layers), head_count=heads, head_count_kv=kv,
                feed_forward_length=ff)


def run_gguf_export(slim_dir, out=None, dtype: str = "f32", force: bool = False, imatrix: str | None = None,
                    calib: str = "wikitext2", samples: int = 64, seq_len: int = 512) -> Path:
    """`slimconv export OUT --format gguf`: writes OUT/gguf/<name>-<dtype>.gguf (or into ``out``). A k-quant is
    llama.cpp's quantisation of the f32 file, weighted by an importance matrix (``imatrix``: auto, a file, none)."""
    from ..report import console
    from . import kquant

    slim_dir = Path(slim_dir)
    if not (slim_dir / "config.json").is_file():
        raise SlimError(f"{slim_dir} is not a model folder (no config.json)", "give an output folder of `slimconv convert`")
    folder = Path(out) if out else slim_dir / "gguf"
    name = slim_dir.name
    path = folder / f"{name}-{dtype}.gguf"
    if path.exists() and not force:
        raise SlimError(f"output {path} already exists", "pass --force to overwrite it")
    is_kquant = dtype in KQUANTS
    kquant.check_request(dtype, imatrix)
    imatrix = None if imatrix == "none" else imatrix or ("auto" if is_kquant else None)
    from ..convert import checked_output
    from ..data import check_text

    checked_config(slim_dir, "f32" if is_kquant else dtype)  # every refusal before anything is written
    checked_output(slim_dir)
    entries = None
    if imatrix == "auto":
        check_text(calib, "--imatrix-calib")
    elif imatrix is not None:
        entries = kquant.read_imatrix(Path(imatrix))
    folder.mkdir(parents=True, exist_ok=True)
    tmp, f32 = path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.f32.tmp")
    try:
        if is_kquant:
            info = write_gguf(slim_dir, f32, "f32", name)
            if imatrix == "auto":
                entries = kquant.auto_imatrix(slim_dir, f32, folder / f"{name}.imatrix.gguf", calib, samples, seq_len,
                                              force)
            elif entries is not None:
                kquant.check_imatrix(entries, f32, imatrix)
            kquant.quantize(f32, tmp, dtype, entries, os.cpu_count() or 1)
            info.update(dtype=dtype, bytes=tmp.stat().st_size)
        else:
            info = write_gguf(slim_dir, tmp, dtype, name)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
        f32.unlink(missing_ok=True)
    weighted = (f", importance matrix {len(entries)} tensors" if entries else
                ", no importance matrix" if is_kquant else "")
    console.print(f"[green]wrote[/] {path} ({info['architecture']}, {dtype}{weighted}, {info['bytes'] / 1e6:.1f} MB; "
                  f"tokenizer: {info['tokenizer']})")
    return path
