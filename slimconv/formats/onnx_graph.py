"""The ONNX decoder graph, written node by node from a converted checkpoint's layer specs and weights.

Nothing is traced: the graph is the one onnxruntime-genai's model builder writes for a Llama decoder,
generalised to slim layer specs, built with ``onnx.helper`` (plain protobuf, the format's own library;
onnxscript/onnx-ir would add an abstraction without removing any of the code below). Per output layer:

- attention kept: [Skip]SimplifiedLayerNormalization, one MatMul for q/k/v packed, one
  GroupQueryAttention per member *source* attention (rotary inside, its own past/present pair, the
  source's KV heads, so the cache stays uniform unless shrink merged a layer's KV heads), the members' outputs concatenated into one o_proj
  MatMul (= the sum of the members' o-projections). A wide layer packs its members' q/k/v columns member
  by member and splits them once.
- MLP kept: SkipSimplifiedLayerNormalization, gate and up MatMuls, SiLU, down MatMul.
- mixture of experts kept: the router's MatMul (float), then ONNX Runtime's MoE node with float experts, or in
  an int4 graph its QMoE node with int4 experts (``_Decoder.moe``); a shared expert as a dense MLP beside it.
- a removed sublayer writes nothing; the pending residual add moves into the next norm.

Weights are pre-transposed (K, N) for MatMul, or int4 block-quantised for MatMulNBits by ONNX Runtime's
own quantiser, one tensor at a time: each is read from the safetensors, transformed and written to the
external data file before the next is read, so the export holds about one packed q/k/v at a time. (int4 gptq
computes every weight's blocks beforehand, ``gptq.quantize_model``: the graph then writes those.)

Masks: GroupQueryAttention derives positions from ``seqlens_k`` in prefill and ignores ``position_ids``
there, so the graph gives every row ``seqlens_k = total - 1`` (positions are cache indices) and masks
padding with an additive ``attention_bias`` built once from ``attention_mask``. RoPE depends only on the
distance between query and key, so a left-padded row, whose cache indices are its positions shifted by
its padding, gets exactly the attention of the HF model. ``position_ids`` stays a graph input (the
interface of DESIGN.md, which onnxruntime-genai and optimum feed) but no node reads it.
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from ..errors import SlimError
from ..source import Checkpoint

OPSET = 17
# make_model stamps the installed onnx's newest IR version (14 with onnx 1.23), which older runtimes refuse
# to load: onnxruntime 1.30 on a GPU machine said "Unsupported model IR version: 14, max supported IR
# version: 13". Opset 17 needs IR 8; 10 is what the oldest versions pyproject claims (onnx 1.16,
# onnxruntime 1.18) read, and the graph uses nothing newer.
IR_VERSION = 10
# Changes whenever the graph's layout does, so that cached exports (bench's source graph) are rebuilt.
GRAPH_VERSION = "gqa1-qmoe1"  # qmoe1: int4 graphs write a mixture of experts' experts as int4 (QMoE)
MS = "com.microsoft"
# Additive mask for padded keys: finite, so a row with every key masked (a padding query) stays NaN-free
# in float16, and far below any attention score.
MASKED = -10000.0
DATA_FILE = "model.onnx.data"
# Largest model whose weights fit inside model.onnx: protobuf messages are limited to 2 GiB, minus room
# for the graph itself.
INLINE_LIMIT = 2**31 - 2**26

# MLP activations other than SiLU (written out as x * Sigmoid(x)): (op, domain). FastGelu is the tanh
# approximation, which is what gelu_pytorch_tanh computes.
ACTIVATION_OPS = {"silu": None, "gelu_pytorch_tanh": ("FastGelu", "com.microsoft"), "gelu": ("Gelu", "com.microsoft"),
                  "relu": ("Relu", "")}
# precision -> (weight/activation dtype on CPU, on CUDA); int4 keeps activations in these dtypes.
ACTIVATIONS = {
    "float32": {"cpu": torch.float32},
    "float16": {"cpu": torch.float16, "cuda": torch.float16},
    "bfloat16": {"cuda": torch.bfloat16},
    "int4": {"cpu": torch.float32, "cuda": torch.float16},
}
_ONNX = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16, torch.bfloat16: TensorProto.BFLOAT16,
         torch.int64: TensorProto.INT64, torch.int32: TensorProto.INT32, torch.uint8: TensorProto.UINT8}
# numpy has no bfloat16: its bytes are written through an int16 view.
_VIEW = {torch.bfloat16: torch.int16}


def bytes_per_weight(dtype: str, block_size: int = 32) -> float:
    """Stored bytes per weight: int4 is half a byte plus, per block, a float32 scale and half a byte of
    zero point."""
    if dtype == "int4":
        return 0.5 + 4.5 / block_size
    return {"float32": 4, "float16": 2, "bfloat16": 2}[dtype]


@dataclass(frozen=True)
class Precision:
    """What the graph is built for: ``dtype`` (float32 | float16 | bfloat16 | int4) on ``provider``
    (cpu | cuda). int4 is weight-only MatMulNBits with ``block_size`` weights per scale along K and
    ``accuracy_level`` (4: int8 activations on CPU, the builder's default there; 0: the activation dtype)."""

    dtype: str = "float32"
    provider: str = "cpu"
    block_size: int = 32
    accuracy_level: int = 4
    quantize_lm_head: bool = True
    # Asymmetric blocks (a zero point each): on SmolLM2-135M the KL to the float model is 0.44 against
    # 0.57 symmetric (docs/results/onnx.md); onnxruntime-genai's builder defaults to symmetric.
    symmetric: bool = False
    # "rtn": round to nearest per block (ONNX Runtime's quantize_matmul_4bits); "k_quant": ONNX Runtime's k-quant
    # search (quantization.neural_compressor.weight_only, after llama.cpp's make_qkx: per block, the scale and
    # minimum that minimise the error weighted by |w| + rms(block)), integer zero points, the same MatMulNBits;
    # "gptq": GPTQ's error-compensating rounding into the same blocks, from Hessians of calibration text
    # (``gptq.quantize_model``, computed before the graph is written and handed to it: ``write_graph``).
    algorithm: str = "rtn"

    def __post_init__(self):
        if self.dtype not in ACTIVATIONS:
            raise SlimError(f"unknown ONNX dtype {self.dtype!r}", f"use one of {', '.join(ACTIVATIONS)}")
        if self.provider not in ACTIVATIONS[self.dtype]:
            fits = [d for d, p in ACTIVATIONS.items() if self.provider in p]
            needs = " or ".join(p.upper() for p in ACTIVATIONS[self.dtype])
            raise SlimError(f"a {self.dtype} graph needs the {needs} provider: ONNX Runtime has no {self.dtype} "
                            f"kernels for it on {self.provider.upper()}",
                            f"for --provider {self.provider} use --dtype {' | '.join(fits)}")
        if self.algorithm not in INT4_ALGORITHMS:
            raise SlimError(f"int4 algorithm {self.algorithm!r} is not one of {', '.join(INT4_ALGORITHMS)}")
        if self.algorithm == "k_quant" and self.symmetric:
            raise SlimError("int4 k_quant searches a minimum per block, so its blocks have zero points",
                            "leave out --int4-symmetric, or use --int4-algorithm rtn")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise SlimError(f"int4 block size {self.block_size} is not a power of two >= 16", "use 32, 64 or 128")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise SlimError(f"int4 accuracy level {self.accuracy_level} is not 0-4", "use 4 (int8) or 0 (unset)")

    @property
    def activation(self) -> torch.dtype:
        return ACTIVATIONS[self.dtype][self.provider]


INT4_ALGORITHMS = ("rtn", "k_quant", "gptq")


def experts_algorithm(algorithm: str) -> str:
    """How a mixture of experts' experts (QMoE) are rounded under ``algorithm``: gptq's Hessians are not collected
    per expert (each would need its routed tokens alone), so its experts are rounded to nearest."""
    return "rtn" if algorithm == "gptq" else algorithm


def check_int4_experts(slim_layers: list[dict], hidden: int, block: int):
    """Refuses an int4 graph whose experts ONNX Runtime's QMoE cannot block-quantise at ``block``: it needs the
    hidden size and every expert width to be multiples of the block size (MatMulNBits pads a short last block,
    QMoE has no padding), and says which block size would do."""
    widths = {i: s["mlp"]["intermediate_size"] for i, s in enumerate(slim_layers)
              if (s.get("mlp") or {}).get("experts") is not None}
    if not widths:
        return
    what = [f"the hidden size {hidden}"] if hidden % block else []
    bad = {w: [i for i in widths if widths[i] == w] for w in sorted(set(widths.values())) if w % block}
    what += [f"the expert width {w} of layer(s) {', '.join(map(str, layers))}" for w, layers in bad.items()]
    if not what:
        return
    sizes = [hidden, *widths.values()]
    fits = [b for b in (2**p for p in range(4, block.bit_length())) if not any(n % b for n in sizes)]
    raise SlimError(f"int4 block size {block} does not divide {' nor '.join(what)}: ONNX Runtime's QMoE node, which "
                    "runs a mixture of experts' int4 experts, quantises them in whole blocks",
                    f"use --int4-block-size {fits[-1]}" if fits else
                    "export --dtype fp32 or fp16 (no power-of-two block size of 16 or more divides them)")


def quantize_int4(weight: torch.Tensor, block: int, symmetric: bool, algorithm: str = "rtn"):
    """MatMulNBits' int4 blocks of a (N, K) weight by ONNX Runtime's own quantisers (``algorithm``: see
    ``Precision``), per block of ``block`` weights along K: packed (N, blocks, block/2) uint8, scales (N, blocks),
    zero points (N, ceil(blocks/2)) uint8 (unused when symmetric: MatMulNBits then subtracts 8)."""
    n, k = weight.shape
    blocks = -(-k // block)
    if algorithm == "k_quant":
        return _k_quant(weight, block, n, k, blocks)
    if algorithm == "gptq":  # a weight alone does not say how to round it: gptq.gptq with its Hessian does
        raise SlimError("int4 gptq rounds a weight from the Hessian of its calibration inputs, not from the weight alone",
                        "quantise the model with slimconv.formats.gptq.quantize_model")
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    w = np.zeros((blocks * block, n), np.float32)
    w[:k] = weight.t().float().numpy()
    packed = np.zeros((n, blocks, block // 2), np.uint8)
    scales = np.zeros((n, blocks), np.float32)
    zero_points = np.zeros((n, (blocks + 1) // 2), np.uint8)
    quantize_matmul_4bits(packed, w, scales, zero_points, block, n, blocks * block, symmetric)
    return packed, scales, zero_points


def _k_quant(weight: torch.Tensor, block: int, n: int, k: int, blocks: int):
    """``quantize_int4``'s layout from ONNX Runtime's k-quant search (its CPU implementation)."""
    from onnxruntime.quantization.neural_compressor.weight_only import quant_tensor_k_quant_cpu

    w = np.zeros((n, blocks * block), np.float32)
    w[:, :k] = weight.float().numpy()
    levels, scales, zero = quant_tensor_k_quant_cpu(w, 4, block)
    levels = levels.astype(np.uint8).reshape(n, blocks, block)
    packed = levels[..., 0::2] | (levels[..., 1::2] << 4)
    zero = zero.reshape(n, blocks)
    if blocks % 2:
        zero = np.concatenate([zero, np.zeros((n, 1), np.uint8)], 1)
    zero_points = zero[:, 0::2] | (zero[:, 1::2] << 4)
    return packed, scales.reshape(n, blocks).astype(np.float32), zero_points


def dequantize_int4(weight: torch.Tensor, block: int, symmetric: bool, algorithm: str = "rtn") -> torch.Tensor:
    """The (N, K) weight the int4 graph computes with: ``quantize_int4`` and back. The ONNX check runs the
    PyTorch model with these weights, so that it judges the graph, not the rounding int4 chose to make."""
    n, k = weight.shape
    packed, scales, zero_points = quantize_int4(weight, block, symmetric, algorithm)
    q = np.stack([packed & 15, packed >> 4], -1).reshape(n, -1, block).astype(np.float32)
    zp = np.stack([zero_points & 15, zero_points >> 4], -1).reshape(n, -1)[:, : q.shape[1]].astype(np.float32)
    w = (q - (8.0 if symmetric else zp[..., None])) * scales[..., None]
    return torch.from_numpy(w.reshape(n, -1)[:, :k]).to(weight.dtype)


class _Writer:
    """Initializers: bytes streamed into the external data file (or kept inline), one tensor at a time."""

    def __init__(self, out: Path, external: bool):
        self.external = external
        self.file = open(out / DATA_FILE, "wb") if external else None
        self.initializers = []
        self.bytes = 0

    def add(self, name: str, t: torch.Tensor, inline: bool = False) -> str:
        """``inline``: always inside model.onnx (shape constants, which shape inference must read)."""
        t = t.detach().contiguous()
        raw = memoryview(t.view(_VIEW.get(t.dtype, t.dtype)).numpy()).cast("B")
        proto = TensorProto(name=name, dims=list(t.shape), data_type=_ONNX[t.dtype])
        if self.external and not inline:
            if self.file.tell() % 65536 and len(raw) >= 2**20:
                self.file.write(bytes(65536 - self.file.tell() % 65536))  # aligned, so ORT can map it
            offset = self.file.tell()
            self.file.write(raw)
            for key, value in (("location", DATA_FILE), ("offset", offset), ("length", len(raw))):
                entry = proto.external_data.add()
                entry.key, entry.value = key, str(value)
            proto.data_location = TensorProto.EXTERNAL
        else:
            proto.raw_data = raw.tobytes()
        self.bytes += len(raw)
        self.initializers.append(proto)
        return name

    def close(self):
        if self.file is not None:
            self.file.close()


class _Graph:
    """Nodes with generated output names, plus constants as initializers."""

    def __init__(self, writer: _Writer):
        self.writer = writer
        self.nodes = []
        self.consts = {}

    def op(self, op_type: str, inputs: list[str], name: str, outputs: int = 1, domain: str = "", out=None, **attrs):
        """One node; returns its output name (a list when ``outputs`` > 1). ``out`` names graph outputs."""
        if isinstance(out, list):
            outs = out
        else:
            outs = [f"{name}/out{i}" for i in range(outputs)] if outputs > 1 else [out or f"{name}/out"]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, domain=domain or None,
                                           **{k: v for k, v in attrs.items() if v is not None}))
        return outs if outputs > 1 else outs[0]

    def const(self, value, dtype: torch.dtype) -> str:
        key = (repr(value), dtype)
        if key not in self.consts:
            self.consts[key] = self.writer.add(f"const/{len(self.consts)}", torch.tensor(value, dtype=dtype),
                                               inline=True)
        return self.consts[key]


def _rotary_caches(cfg, dtype: torch.dtype) -> dict:
    """Per RoPE kind the layers use, cos/sin (max_position_embeddings, rotary dims / 2) from the slim modeling
    code's rotary embeddings (transformers' own, every RoPE scaling type it knows, attention scaling and
    partial rotary included)."""
    from ..modeling.modeling_slim import rotary_embeddings

    positions = torch.arange(cfg.max_position_embeddings)[None]
    caches = {}
    with torch.no_grad():
        for kind, rope in rotary_embeddings(cfg).items():
            cos, sin = rope(torch.zeros(1, dtype=torch.float32), positions)
            half = cos.shape[-1] // 2
            caches[kind] = (cos[0, :, :half].to(dtype), sin[0, :, :half].to(dtype))
    return caches


class _Decoder:
    """Writes one decoder graph; see the module docstring."""

    def __init__(self, ckpt: Checkpoint, cfg, precision: Precision, writer: _Writer, int4_weights: dict | None = None):
        self.ckpt, self.cfg, self.p = ckpt, cfg, precision
        self.g = _Graph(writer)
        self.dtype = precision.activation
        self.kv = cfg.num_key_value_heads
        self.slot_kv = []  # KV heads of each past/present pair (fewer where shrink merged them)
        self.d = cfg.head_dim
        self.bias = cfg.projection_bias or {}
        self.pairs = 0
        self.qk_norm = "head" if cfg.qk_norm is True else cfg.qk_norm or None
        self.norms = {**{"attention_input": True, "mlp_input": True}, **(getattr(cfg, "norms", None) or {})}
        if cfg.hidden_act not in ACTIVATION_OPS:
            raise SlimError(f"the ONNX graph builder has no activation {cfg.hidden_act!r}",
                            f"exported activations: {', '.join(ACTIVATION_OPS)}")
        if precision.dtype == "int4":
            check_int4_experts(cfg.slim_layers, cfg.hidden_size, precision.block_size)
        # gptq: the int4 blocks of every MatMulNBits weight, by weight name (``gptq.quantize_model``)
        self.int4 = int4_weights if precision.dtype == "int4" and precision.algorithm == "gptq" else None
        if self.int4 is None and precision.dtype == "int4" and precision.algorithm == "gptq":
            raise SlimError("an int4 gptq graph needs the GPTQ blocks of its weights (gptq.quantize_model)")

    # -- weights -----------------------------------------------------------------------------------

    def _tensor(self, name: str) -> torch.Tensor:
        t = self.ckpt.get(name).to(torch.float32)
        if self.int4 is not None and name in self.int4:
            self._same_weight(name, t)
        return t

    def _same_weight(self, name: str, t: torch.Tensor):
        """gptq: ``t``, the weight the graph reads as ``name``, must be the one GPTQ rounded (the PyTorch model's)."""
        from .gptq import weight_sha1

        if weight_sha1(t) != self.int4[name].sha1:
            raise SlimError(f"int4 gptq: {name} as the ONNX graph reads it differs from the PyTorch model's weight that "
                            "GPTQ rounded (this family's stored layout is transformed on export)",
                            "use --int4-algorithm rtn")

    def _blocks(self, parts: list) -> tuple | None:
        """gptq: the int4 blocks of the rows one MatMulNBits holds, ``parts`` being (weight name, row slice or None)
        in the order its rows are packed; None for rtn and k_quant, which round each weight as it streams."""
        if self.int4 is None:
            return None
        arrays = []
        for name, rows in parts:
            if name not in self.int4:
                raise SlimError(f"int4 gptq: no GPTQ blocks for {name} (the PyTorch model has no Linear of that "
                                "name: this family stores its projections fused or renamed)", "use --int4-algorithm rtn")
            arrays.append([a if rows is None else a[rows] for a in self.int4[name].arrays()])
        return tuple(np.concatenate(column) for column in zip(*arrays))

    def linear(self, x: str, weight: torch.Tensor, bias: torch.Tensor | None, name: str, quantize: bool = True,
               out=None, blocks: tuple | None = None) -> str:
        """x @ weight.T (+ bias); ``weight`` is (N, K) as torch stores it; ``blocks``: its int4 blocks when they were
        computed beforehand (gptq: ``_blocks``)."""
        if self.p.dtype == "int4" and quantize:
            y = self._matmul_nbits(x, weight, name, None if bias is not None else out, blocks)
        else:
            w = self.g.writer.add(f"{name}.weight", weight.t().to(self.dtype))
            y = self.g.op("MatMul", [x, w], name, out=None if bias is not None else out)
        if bias is not None:
            y = self.g.op("Add", [y, self.g.writer.add(f"{name}.bias", bias.to(self.dtype))], f"{name}/bias", out=out)
        return y

    def _matmul_nbits(self, x: str, weight: torch.Tensor, name: str, out, blocks: tuple | None = None) -> str:
        n, k = weight.shape
        block = self.p.block_size
        packed, scales, zero_points = (blocks if blocks is not None else
                                       quantize_int4(weight, block, self.p.symmetric, self.p.algorithm))
        inputs = [x, self.g.writer.add(f"{name}.weight_q4", torch.from_numpy(packed)),
                  self.g.writer.add(f"{name}.scales", torch.from_numpy(scales.reshape(-1)).to(self.dtype))]
        if not self.p.symmetric:
            inputs.append(self.g.writer.add(f"{name}.zero_points", torch.from_numpy(zero_points.reshape(-1))))
        return self.g.op("MatMulNBits", inputs, name, domain=MS, out=out, K=k, N=n, bits=4, block_size=block,
                         accuracy_level=self.p.accuracy_level)

    # -- the residual stream -----------------------------------------------------------------------

    def stream(self, name: str) -> str:
        """The residual stream itself, with a pending sublayer output added (for a sublayer without input norm)."""
        if self.pending is not None:
            self.residual, self.pending = self.g.op("Add", [self.residual, self.pending], name), None
        return self.residual

    def output_norm(self, x: str, gain_name: str, name: str) -> str:
        """A sublayer's output norm (Gemma 2/3, OLMo 2): RMSNorm of what it adds, before the add."""
        gain = self.g.writer.add(gain_name, self._tensor(gain_name).to(self.dtype))
        return self.g.op("SimplifiedLayerNormalization", [x, gain], name, axis=-1, epsilon=float(self.cfg.rms_norm_eps))

    def norm(self, gain_name: str, name: str) -> str:
        """RMSNorm of the residual stream; a pending sublayer output is added to it in the same node."""
        eps = float(self.cfg.rms_norm_eps)
        gain = self.g.writer.add(gain_name, self._tensor(gain_name).to(self.dtype))
        if self.pending is None:
            return self.g.op("SimplifiedLayerNormalization", [self.residual, gain], name, axis=-1, epsilon=eps)
        normed, _, _, self.residual = self.g.op("SkipSimplifiedLayerNormalization", [self.pending, self.residual, gain],
                                                name, outputs=4, domain=MS, epsilon=eps)
        self.pending = None
        return normed

    # -- blocks ------------------------------------------------------------------------------------

    def attention(self, i: int, spec: dict, x: str) -> str:
        prefix = f"model.layers.{i}.self_attn."
        heads, kv_heads, d = spec["num_heads"], spec["num_key_value_heads"], self.d
        members = heads // self.cfg.num_attention_heads
        mh, kv = heads // members, kv_heads // members  # query and KV heads per member attention
        w = {p: self._tensor(prefix + f"{p}_proj.weight") for p in "qkv"}
        b = {p: self._tensor(prefix + f"{p}_proj.bias") if self.bias.get(p) else None for p in "qkv"}
        rows = {"q": mh * d, "k": kv * d, "v": kv * d}

        def member_rows(t, p, m):
            return t[m * rows[p]:(m + 1) * rows[p]]

        packed_w = torch.cat([member_rows(w[p], p, m) for m in range(members) for p in "qkv"])
        packed_b = None
        if any(v is not None for v in b.values()):
            packed_b = torch.cat([member_rows(b[p] if b[p] is not None else torch.zeros(w[p].shape[0]), p, m)
                                  for m in range(members) for p in "qkv"])
        del w, b
        blocks = self._blocks([(prefix + f"{p}_proj.weight", slice(m * rows[p], (m + 1) * rows[p]))
                               for m in range(members) for p in "qkv"])
        qkv = self.linear(x, packed_w, packed_b, f"layers.{i}/attn/qkv_proj", blocks=blocks)
        del packed_w
        width = (mh + 2 * kv) * d
        parts = [qkv] if members == 1 else self.g.op("Split", [qkv, self.g.const([width] * members, torch.int64)],
                                                     f"layers.{i}/attn/split_members", outputs=members, axis=-1)
        norms = (self._qk_norms(prefix, mh, kv) if self.qk_norm == "head" else
                 ([self.g.writer.add(prefix + f"{p}_norm.weight", self._tensor(prefix + f"{p}_norm.weight").to(self.dtype))]
                  for p in "qk") if self.qk_norm == "full" else None)
        norms = list(norms) if norms is not None else None
        outs = []
        for m, part in enumerate(parts):
            outs.append(self._gqa(i, m, part, mh, kv, spec.get("sliding_window"), norms and (norms[0][m], norms[1][m]),
                                  spec.get("rope", "default")))
        attn = outs[0] if members == 1 else self.g.op("Concat", outs, f"layers.{i}/attn/concat_members", axis=-1)
        o_bias = self._tensor(prefix + "o_proj.bias") if self.bias.get("o") else None
        return self.linear(attn, self._tensor(prefix + "o_proj.weight"), o_bias, f"layers.{i}/attn/o_proj",
                           blocks=self._blocks([(prefix + "o_proj.weight", None)]))

    def _qk_norms(self, prefix: str, mh: int, kv: int):
        """Per member, the q and k norm gains: (head_dim,) when the member's heads share one (as converted), else
        (heads x head_dim,) applied after the norm (a healed output trains each head's gain on its own)."""
        out = []
        for p, per_member in (("q", mh), ("k", kv)):
            t = self._tensor(prefix + f"{p}_norm.weight").reshape(-1, self.d)
            names = []
            for m in range(max(1, t.shape[0] // per_member)):
                rows = t[m * per_member:(m + 1) * per_member]
                shared = bool((rows == rows[0]).all())
                names.append((self.g.writer.add(f"{prefix}{p}_norm.{m}", (rows[0] if shared else rows.reshape(-1))
                                                .to(self.dtype)), shared))
            out.append(names)
        return out

    def _gqa(self, i: int, m: int, qkv: str, heads: int, kv: int, window, norms, rope) -> str:
        name = f"layers.{i}/attn/member{m}"
        d = self.d
        q = k = v = ""
        if norms is None:
            q = qkv  # packed: GroupQueryAttention splits q/k/v itself
        else:
            # The per-head q/k RMSNorm (Qwen3) sits between the projection and the rotary embedding;
            # ONNX Runtime fuses it into GroupQueryAttention on CUDA only, so it is written out here.
            q, k, v = self.g.op("Split", [qkv, self.g.const([heads * d, kv * d, kv * d], torch.int64)],
                                f"{name}/split_qkv", outputs=3, axis=-1)
            norm = self._head_norm if self.qk_norm == "head" else self._full_norm
            q, k = (norm(t, gain, f"{name}/{p}_norm") for t, gain, p in ((q, norms[0], "q"), (k, norms[1], "k")))
        slot = self.pairs
        self.pairs += 1
        self.slot_kv.append(kv)
        cos, sin = self.cos[rope] if rope is not None else ("", "")
        softcap = getattr(self.cfg, "attn_logit_softcapping", None)
        return self.g.op("GroupQueryAttention",
                         [q, k, v, f"past_key_values.{slot}.key", f"past_key_values.{slot}.value", self.seqlens,
                          self.total, cos, sin, "", self.attn_bias],
                         name, outputs=3, domain=MS, out=[f"{name}/out", f"present.{slot}.key", f"present.{slot}.value"],
                         num_heads=heads, kv_num_heads=kv, scale=float(d ** -0.5), do_rotary=int(rope is not None),
                         local_window_size=int(window) if window else -1,
                         softcap=float(softcap) if softcap else None)[0]

    def _full_norm(self, x: str, gain: str, name: str) -> str:
        """A q/k norm over all heads at once (OLMo 2)."""
        return self.g.op("SimplifiedLayerNormalization", [x, gain], name, axis=-1, epsilon=float(self.cfg.rms_norm_eps))

    def _head_norm(self, x: str, gain: tuple, name: str) -> str:
        """Per-head RMSNorm; ``gain``: (initializer, whether the heads share it) from ``_qk_norms``."""
        gain, shared = gain
        per_head = self.g.op("Reshape", [x, self.g.const([0, 0, -1, self.d], torch.int64)], f"{name}/heads")
        scale = gain if shared else self.g.const([1.0] * self.d, self.dtype)
        normed = self.g.op("SimplifiedLayerNormalization", [per_head, scale], name, axis=-1,
                           epsilon=float(self.cfg.rms_norm_eps))
        flat = self.g.op("Reshape", [normed, self.g.const([0, 0, -1], torch.int64)], f"{name}/flat")
        return flat if shared else self.g.op("Mul", [flat, gain], f"{name}/gain")

    def mlp(self, i: int, x: str) -> str:
        prefix = f"model.layers.{i}.mlp."
        bias = self.cfg.mlp_bias

        def proj(p, inp):
            return self.linear(inp, self._tensor(prefix + f"{p}_proj.weight"),
                               self._tensor(prefix + f"{p}_proj.bias") if bias else None, f"layers.{i}/mlp/{p}_proj",
                               blocks=self._blocks([(prefix + f"{p}_proj.weight", None)]))

        gate, up = proj("gate", x), proj("up", x)
        kind = self.cfg.hidden_act
        if kind == "silu":
            act = self.g.op("Mul", [gate, self.g.op("Sigmoid", [gate], f"layers.{i}/mlp/sigmoid")], f"layers.{i}/mlp/silu")
        else:
            op, domain = ACTIVATION_OPS[kind]
            act = self.g.op(op, [gate], f"layers.{i}/mlp/{kind}", domain=domain)
        return proj("down", self.g.op("Mul", [act, up], f"layers.{i}/mlp/gated"))

    def moe(self, i: int, x: str, spec: dict) -> str:
        """A mixture of experts as ONNX Runtime's com.microsoft MoE node (float graphs) or QMoE node (int4 graphs,
        ``_qmoe``): the router's logits in (the router stays float), softmax, top-k and (``norm_topk_prob``)
        renormalisation inside it, the experts' SwiGLU with gate and up rows interleaved (the layout its CPU kernel
        takes; activation_alpha 1 and beta 0, no clamp: silu(gate) * up); a shared expert beside it as a dense MLP
        scaled by its sigmoid gate. One expert's tensors are read at a time."""
        from ..arch import CANONICAL_MOE as M

        g, prefix, name = self.g, f"model.layers.{i}.", f"layers.{i}/moe"
        n, width, hidden = len(spec["experts"]), spec["intermediate_size"], self.cfg.hidden_size
        shape = g.op("Shape", [x], f"{name}/shape")
        rows = g.op("Reshape", [x, g.const([-1, hidden], torch.int64)], f"{name}/rows")
        logits = self.linear(rows, self._tensor(prefix + M.router + ".weight"), None, f"{name}/router", quantize=False)

        def expert(e: int) -> tuple[torch.Tensor, torch.Tensor]:
            """Expert ``e``'s fc1 (2 x width, hidden), gate and up rows interleaved, and fc2 (hidden, width)."""
            fc1 = torch.empty(2 * width, hidden)
            fc1[0::2] = self._tensor(prefix + M.gate.format(e=e) + ".weight")
            fc1[1::2] = self._tensor(prefix + M.up.format(e=e) + ".weight")
            return fc1, self._tensor(prefix + M.down.format(e=e) + ".weight")

        routing = dict(k=spec["top_k"], activation_type="swiglu", swiglu_fusion=1,
                       normalize_routing_weights=int(bool(spec.get("norm_topk_prob"))))
        if self.p.dtype == "int4":
            out = self._qmoe(name, rows, logits, n, expert, routing)
        else:
            fc1 = torch.empty(n, 2 * width, hidden, dtype=self.dtype)
            fc2 = torch.empty(n, hidden, width, dtype=self.dtype)
            for e in range(n):
                fc1[e], fc2[e] = expert(e)
            out = g.op("MoE", [rows, logits, g.writer.add(f"{name}.fc1", fc1), "", g.writer.add(f"{name}.fc2", fc2)],
                       name, domain=MS, **routing)
        if spec.get("shared_intermediate_size"):
            proj = lambda p, inp: self.linear(inp, self._tensor(prefix + getattr(M, p) + ".weight"), None,
                                              f"{name}/{p}", blocks=self._blocks([(prefix + getattr(M, p) + ".weight",
                                                                                   None)]))
            gate, up = proj("shared_gate", rows), proj("shared_up", rows)
            act = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"{name}/shared_sigmoid")], f"{name}/shared_silu")
            shared = proj("shared_down", g.op("Mul", [act, up], f"{name}/shared_gated"))
            scale = g.op("Sigmoid", [self.linear(rows, self._tensor(prefix + M.shared_router + ".weight"), None,
                                                 f"{name}/shared_router", quantize=False)], f"{name}/shared_scale")
            out = g.op("Add", [out, g.op("Mul", [shared, scale], f"{name}/shared_scaled")], f"{name}/with_shared")
        return g.op("Reshape", [out, shape], f"{name}/out")

    def _qmoe(self, name: str, rows: str, logits: str, n: int, expert, routing: dict) -> str:
        """The experts as ONNX Runtime's QMoE node with int4 weights, block-wise: each expert's fc1 and fc2 rounded
        exactly as MatMulNBits' weights are (``quantize_int4``: the graph's block size along the input dimension,
        symmetry and algorithm), so ``dequantize_int4`` gives what it computes. Layout (weights_prepacked=0, checked
        on the CPU kernel of 1.32 against a dequantised computation to 3e-6): weights uint8 (experts, N, K/2), each
        byte two consecutive K values, the lower nibble first; scales (experts, N, K/block) in the activation dtype;
        zero points uint8 (experts, N, ceil(K/block/2)), two blocks a byte, lower nibble first, or none when
        symmetric (QMoE then subtracts 8, as MatMulNBits does). accuracy_level has MatMulNBits' meaning (4: int8
        activations on CPU). The CPU kernel renormalises the top-k probabilities whatever
        normalize_routing_weights says unless router_weights is given, so without ``norm_topk_prob`` the softmax
        over every expert goes in as router_weights (the logits still choose the experts) and it keeps them as
        they are. Peak memory: one expert's float tensors, plus the layer's packed int4 ones."""
        g, block, p = self.g, self.p.block_size, self.p
        parts = {}
        for e in range(n):
            for part, w in zip(("fc1", "fc2"), expert(e)):
                packed, scales, zero_points = quantize_int4(w, block, p.symmetric, experts_algorithm(p.algorithm))
                arrays = (packed.reshape(len(packed), -1), scales, zero_points)  # (N, K/2), (N, blocks), (N, ..)
                if part not in parts:
                    parts[part] = [np.empty((n, *a.shape), a.dtype) for a in arrays]
                for store, a in zip(parts[part], arrays):
                    store[e] = a
        names = {}
        for part, (packed, scales, zero_points) in parts.items():
            names[part] = [g.writer.add(f"{name}.{part}.weight_q4", torch.from_numpy(packed)),
                           g.writer.add(f"{name}.{part}.scales", torch.from_numpy(scales).to(self.dtype))]
            names[part + "_zp"] = "" if p.symmetric else g.writer.add(f"{name}.{part}.zero_points",
                                                                      torch.from_numpy(zero_points))
        del parts
        router_weights = ""
        if not routing["normalize_routing_weights"]:
            router_weights = g.op("Softmax", [logits], f"{name}/router_probs", axis=-1)
        # input, router_probs, fc1 weights/scales/bias, fc2 weights/scales/bias, fc3 weights/scales/bias,
        # fc1/fc2/fc3 zero points, router_weights
        inputs = [rows, logits, *names["fc1"], "", *names["fc2"], "", "", "", "", names["fc1_zp"], names["fc2_zp"], "",
                  router_weights]
        while not inputs[-1]:
            inputs.pop()
        return g.op("QMoE", inputs, name, domain=MS, expert_weight_bits=4, block_size=block, weights_prepacked=0,
                    accuracy_level=p.accuracy_level, **routing)

    # -- the whole graph ---------------------------------------------------------------------------

    def _mask_inputs(self):
        """seqlens_k, total_sequence_length and attention_bias from attention_mask (see the module doc)."""
        g = self.g
        total64 = g.op("Shape", ["attention_mask"], "mask/total", start=1, end=2)
        self.total = g.op("Cast", [g.op("Squeeze", [total64, g.const([0], torch.int64)], "mask/total_scalar")],
                          "mask/total_int32", to=TensorProto.INT32)
        batch = g.op("Shape", ["attention_mask"], "mask/batch", start=0, end=1)
        self.seqlens = g.op("Expand", [g.op("Sub", [self.total, g.const(1, torch.int32)], "mask/last"), batch],
                            "mask/seqlens_k")
        keep = g.op("Cast", ["attention_mask"], "mask/float", to=_ONNX[self.dtype])
        bias = g.op("Mul", [g.op("Sub", [keep, g.const(1.0, self.dtype)], "mask/padding"),
                            g.const(-MASKED, self.dtype)], "mask/additive")
        bias = g.op("Unsqueeze", [bias, g.const([1, 2], torch.int64)], "mask/b11t")
        seq = g.op("Shape", ["input_ids"], "mask/sequence", start=1, end=2)
        one = g.const([1], torch.int64)
        self.attn_bias = g.op("Expand", [bias, g.op("Concat", [one, one, seq, one], "mask/bias_shape", axis=0)],
                              "mask/attention_bias")

    def build(self) -> onnx.ModelProto:
        cfg, g = self.cfg, self.g
        self._mask_inputs()
        caches = _rotary_caches(cfg, self.dtype)
        for kind, (cos, _) in caches.items():
            if cos.shape[-1] % 8 or 2 * cos.shape[-1] > self.d:
                raise SlimError(f"RoPE kind {kind!r} rotates {2 * cos.shape[-1]} of {self.d} head dims: ONNX Runtime's "
                                "GroupQueryAttention needs the rotary dims / 2 to be a multiple of 8",
                                "keep the PyTorch checkpoint for this model (or export one whose partial rotary "
                                "factor gives a multiple of 16 rotary dims)")
        single = len(caches) == 1
        self.cos = {kind: (g.writer.add("cos_cache" if single else f"cos_cache.{kind}", cos),
                           g.writer.add("sin_cache" if single else f"sin_cache.{kind}", sin))
                    for kind, (cos, sin) in caches.items()}
        embed = self._tensor("model.embed_tokens.weight")
        embed_name = g.writer.add("model.embed_tokens.weight", embed.to(self.dtype))
        self.residual, self.pending = g.op("Gather", [embed_name, "input_ids"], "embed_tokens"), None
        mult = getattr(cfg, "embedding_multiplier", None)
        if mult is not None:
            # Rounded to the activations' dtype first, as the source multiplies.
            self.residual = g.op("Mul", [self.residual, g.const(float(torch.tensor(mult, dtype=self.dtype)), self.dtype)],
                                 "embed_scale")
        for i, spec in enumerate(cfg.slim_layers):
            at = f"model.layers.{i}."
            if spec.get("attention"):
                x = (self.norm(at + "input_layernorm.weight", f"layers.{i}/input_layernorm")
                     if self.norms["attention_input"] else self.stream(f"layers.{i}/attn/residual"))
                out = self.attention(i, spec["attention"], x)
                if self.norms.get("attention_output"):
                    out = self.output_norm(out, at + "attention_output_layernorm.weight", f"layers.{i}/attn/output_norm")
                self.pending = out
            if spec.get("mlp"):
                x = (self.norm(at + "post_attention_layernorm.weight", f"layers.{i}/post_attention_layernorm")
                     if self.norms["mlp_input"] else self.stream(f"layers.{i}/mlp/residual"))
                out = self.mlp(i, x) if spec["mlp"].get("experts") is None else self.moe(i, x, spec["mlp"])
                if self.norms.get("mlp_output"):
                    out = self.output_norm(out, at + "mlp_output_layernorm.weight", f"layers.{i}/mlp/output_norm")
                self.pending = out
        x = self.norm("model.norm.weight", "final_norm")
        tied = "lm_head.weight" not in self.ckpt
        quantized = self.p.dtype == "int4" and self.p.quantize_lm_head
        cap = getattr(cfg, "final_logit_softcapping", None)
        head_out = "logits" if cap is None else None
        if tied and not quantized:
            # One copy of the tied matrix: the head reads the embedding transposed, in one node.
            logits = g.op("FusedMatMul", [x, embed_name], "lm_head", domain=MS, out=head_out, transB=1)
        else:
            if tied and quantized and self.int4 is not None and "lm_head.weight" in self.int4:
                self._same_weight("lm_head.weight", embed)
            logits = self.linear(x, embed if tied else self._tensor("lm_head.weight"), None, "lm_head",
                                 quantize=quantized, out=head_out,
                                 blocks=self._blocks([("lm_head.weight", None)]) if quantized else None)
        if cap is not None:  # Gemma 2: tanh(logits / cap) * cap
            capped = g.op("Tanh", [g.op("Div", [logits, g.const(float(cap), self.dtype)], "softcap/div")], "softcap/tanh")
            g.op("Mul", [capped, g.const(float(cap), self.dtype)], "softcap/mul", out="logits")
        return self._model("logits")

    def _model(self, logits: str) -> onnx.ModelProto:
        t = _ONNX[self.dtype]
        inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
                  helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total_sequence"]),
                  helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "sequence"])]
        outputs = [helper.make_tensor_value_info(logits, t, ["batch", "sequence", self.cfg.vocab_size])]
        for s in range(self.pairs):
            for kind in ("key", "value"):
                inputs.append(helper.make_tensor_value_info(f"past_key_values.{s}.{kind}", t,
                                                            ["batch", self.slot_kv[s], "past_sequence", self.d]))
                outputs.append(helper.make_tensor_value_info(f"present.{s}.{kind}", t,
                                                             ["batch", self.slot_kv[s], "total_sequence", self.d]))
        graph = helper.make_graph(self.g.nodes, "slimconv_decoder", inputs, outputs,
                                  initializer=self.g.writer.initializers)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)],
                                 producer_name="slimconv", ir_version=IR_VERSION)


def write_graph(ckpt: Checkpoint, out: Path, precision: Precision, external: bool,
                int4_weights: dict | None = None) -> dict:
    """Writes ``out/model.onnx`` (and ``model.onnx.data`` when ``external``) for the checkpoint ``ckpt``;
    returns the number of cache pairs, nodes and weight bytes. ``int4_weights``: an int4 gptq graph's blocks by
    weight name (``gptq.quantize_model``)."""
    from ..layout import as_slim_config, canonical

    config = dict(ckpt.config)
    config.pop("early_exit", None)  # the graph runs every layer
    writer = _Writer(out, external)
    try:
        decoder = _Decoder(canonical(ckpt), as_slim_config(config), precision, writer, int4_weights)
        model = decoder.build()
    finally:
        writer.close()
    with open(out / "model.onnx", "wb") as f:
        f.write(model.SerializeToString())
    return dict(cache_pairs=decoder.pairs, nodes=len(model.graph.node), weight_bytes=writer.bytes,
                kv_heads=decoder.slot_kv, head_dim=decoder.d)
