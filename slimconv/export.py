"""ONNX export of a slim (or stock, blocks-only) checkpoint: one decoder graph with the KV cache as
inputs and outputs, named as in DESIGN.md, and its validation against PyTorch (question 2).

The graph is traced from an explicit-cache forward written here (the model's own modules, the cache as
plain tensors), because ONNX needs the cache as graph inputs rather than a Python cache object. A wide
(layer-parallel) layer keeps one past/present pair per member, split along the KV-head axis, so every
cache tensor has the source's shape. torch's TorchScript exporter is used: the dynamo exporter needs
hand-written dynamic shapes for the variadic cache and specialises an empty past.
"""
import io
import json
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

from .errors import SlimError
from .layout import DTYPES, as_slim_config
from .outdir import ONNX_DIR, ONNX_REPORT_FILE, write_json
from .runtime import Decoder, load_model, providers
from .source import AUX_FILES, Checkpoint

OPSET = 17


def load_as_slim(directory: Path, dtype: torch.dtype = torch.float32):
    """Loads any slimconv output as the slim model class (stock blocks-only outputs are converted in memory),
    with its weights in ``dtype``. The model is built on the meta device and the weights are read tensor by
    tensor, so memory holds one copy of the weights, not a random init plus the loaded copy."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from .modeling.modeling_slim import SlimForCausalLM

    config = json.loads((directory / "config.json").read_text())
    config.pop("early_exit", None)  # the graph runs every layer (see run_export): compare it with that
    with torch.device("meta"):
        model = SlimForCausalLM(as_slim_config(config)).eval()
    # Its buffers (inverse frequencies) are computed from the config, not stored in the checkpoint.
    model.model.rotary_emb = LlamaRotaryEmbedding(config=model.config)
    expected = model.state_dict()
    state = {}
    ckpt = Checkpoint(directory)
    for name in expected:
        if name in ckpt:
            t = ckpt.get(name).to(dtype)
            if expected[name].shape != t.shape:  # stock q/k norms: one gain per layer
                t = t.expand(expected[name].shape).contiguous()
            state[name] = t
    if "lm_head.weight" not in state:
        state["lm_head.weight"] = state.get("model.embed_tokens.weight")
    missing = sorted(k for k in expected if state.get(k) is None)
    if missing:
        raise SlimError(f"{directory}: weights missing for {missing[:3]}...")
    # assign=True adopts the loaded tensors instead of copying them into the (meta) parameters.
    model.load_state_dict(state, assign=True)
    if config.get("tie_word_embeddings"):
        model.lm_head.weight = model.model.embed_tokens.weight  # one initializer in the graph, not two
    return model


class CacheDecoder(nn.Module):
    """forward(input_ids, attention_mask, position_ids, *past) -> (logits, *present), past/present flat
    as [key0, value0, key1, value1, ...], one pair per kept source attention."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.kv_heads = model.config.num_key_value_heads
        self.pairs = [layer.self_attn.num_kv_heads // self.kv_heads if layer.self_attn is not None else 0
                      for layer in model.model.layers]

    @property
    def num_pairs(self) -> int:
        return sum(self.pairs)

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        base = self.model.model
        x = base.embed_tokens(input_ids)
        b, t = input_ids.shape
        p = past[0].shape[2]
        cos, sin = base.rotary_emb(x, position_ids)
        q_pos = torch.arange(t)[:, None] + p
        k_pos = torch.arange(p + t)[None, :]
        keep = attention_mask[:, None, None, :].bool()
        masks = {}
        presents, slot = [], 0
        for layer, n in zip(base.layers, self.pairs):
            a = layer.self_attn
            if a is not None:
                if a.sliding_window not in masks:
                    allowed = k_pos <= q_pos
                    if a.sliding_window is not None:
                        allowed = allowed & (q_pos - k_pos < a.sliding_window)
                    allowed = allowed[None, None] & keep
                    masks[a.sliding_window] = torch.zeros(allowed.shape, dtype=x.dtype).masked_fill(
                        ~allowed, torch.finfo(x.dtype).min)
                h = layer.input_layernorm(x)
                q = a.q_proj(h).view(b, t, a.num_heads, a.head_dim)
                k = a.k_proj(h).view(b, t, a.num_kv_heads, a.head_dim)
                v = a.v_proj(h).view(b, t, a.num_kv_heads, a.head_dim)
                if a.q_norm is not None:
                    q, k = a.q_norm(q), a.k_norm(k)
                q, k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
                v = v.transpose(1, 2)
                mine = past[2 * slot: 2 * (slot + n)]
                k = torch.cat([torch.cat(mine[0::2], 1) if n > 1 else mine[0], k], 2)
                v = torch.cat([torch.cat(mine[1::2], 1) if n > 1 else mine[1], v], 2)
                for j in range(n):
                    heads = slice(j * self.kv_heads, (j + 1) * self.kv_heads)
                    presents += [k[:, heads], v[:, heads]]
                slot += n
                rep = a.num_heads // a.num_kv_heads
                out = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                                     attn_mask=masks[a.sliding_window], scale=a.scaling)
                x = x + a.o_proj(out.transpose(1, 2).reshape(b, t, -1))
            if layer.mlp is not None:
                x = x + layer.mlp(layer.post_attention_layernorm(x))
        return (self.model.lm_head(base.norm(x)), *presents)


def io_names(pairs: int):
    cache = [f"{{}}.{i}.{kind}" for i in range(pairs) for kind in ("key", "value")]
    inputs = ["input_ids", "attention_mask", "position_ids"] + [c.format("past_key_values") for c in cache]
    outputs = ["logits"] + [c.format("present") for c in cache]
    return inputs, outputs


def _dummy(decoder: CacheDecoder, batch=2, seq=3, past=2):
    cfg = decoder.model.config
    ids = torch.ones(batch, seq, dtype=torch.long)
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    pos = torch.arange(past, past + seq)[None].expand(batch, -1)
    dtype = decoder.model.lm_head.weight.dtype
    cache = [torch.zeros(batch, decoder.kv_heads, past, cfg.head_dim, dtype=dtype) for _ in range(2 * decoder.num_pairs)]
    return (ids, mask, pos, *cache)


_ONNX_TYPES = {torch.float32: onnx.TensorProto.FLOAT, torch.float16: onnx.TensorProto.FLOAT16,
               torch.bfloat16: onnx.TensorProto.BFLOAT16}
_NUMPY_VIEW = {torch.float32: torch.float32, torch.float16: torch.float16, torch.bfloat16: torch.int16}
# Largest model whose weights fit inside model.onnx: protobuf messages are limited to 2 GiB, minus room
# for the graph itself.
INLINE_LIMIT = 2**31 - 2**26
DATA_FILE = "model.onnx.data"


def export_onnx(slim_dir: Path, out: Path, dtype: str = "float32", external_data: str = "auto") -> dict:
    """Writes model.onnx (weights and compute in ``dtype``) and the files consumers read into ``out``.

    ``external_data``: "always" puts the weights in model.onnx.data beside the graph, "never" inside it,
    "auto" outside only when they would not fit in one protobuf (over 2 GB)."""
    decoder = CacheDecoder(load_as_slim(slim_dir, DTYPES[dtype]))
    inputs, outputs = io_names(decoder.num_pairs)
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "position_ids": {0: "batch", 1: "sequence"},
            "attention_mask": {0: "batch", 1: "total_sequence"}, "logits": {0: "batch", 1: "sequence"}}
    axes.update({n: {0: "batch", 2: "past_sequence"} for n in inputs[3:]})
    axes.update({n: {0: "batch", 2: "total_sequence"} for n in outputs[1:]})
    nbytes = sum(t.numel() * t.element_size() for t in decoder.parameters())
    external = external_data == "always" or (external_data == "auto" and nbytes > INLINE_LIMIT)
    if not external and nbytes > INLINE_LIMIT:
        raise SlimError(f"{nbytes / 1e9:.1f} GB of weights do not fit inside one ONNX file (2 GB protobuf limit)",
                        "use external data (the default)")
    start = time.time()
    proto, weights = _trace(decoder, _dummy(decoder), inputs, outputs, axes)
    _write_with_weights(proto, weights, out, external)
    cfg = json.loads((slim_dir / "config.json").read_text())
    # Consumers size the cache from these: one pair per kept source attention, uniform shapes.
    cfg["num_cache_pairs"] = decoder.num_pairs
    cfg["onnx_dtype"] = dtype
    cfg.pop("early_exit", None)  # not in the graph: the folder must not claim it
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "genai_config.json").write_text(json.dumps(genai_config(cfg, decoder), indent=2))
    for name in AUX_FILES:
        if (slim_dir / name).is_file():
            shutil.copy2(slim_dir / name, out / name)
    return dict(seconds=time.time() - start, cache_pairs=decoder.num_pairs, opset=OPSET, dtype=dtype,
                external_data=external, weight_bytes=nbytes)


class _WeightsAsInputs(nn.Module):
    """Runs ``decoder`` with its weights taken from the trailing arguments instead of its parameters."""

    def __init__(self, decoder, slots, names, n_io):
        super().__init__()
        # Held outside the module tree: the tracer must not see the decoder's tensors as module state.
        self.decoder = [decoder]
        self.slots, self.names, self.n_io = slots, names, n_io

    def forward(self, *args):
        given = dict(zip(self.names, args[self.n_io:]))
        for module, leaf, name in self.slots:
            setattr(module, leaf, given[name])
        return self.decoder[0](*args[: self.n_io])


def _trace(decoder, args, inputs, outputs, axes):
    """The graph with every weight as a named graph input, and the weights by name.

    Weights traced as parameters cost two extra copies in memory: the exporter's shape inference keeps
    computed values of ops on constant inputs (the transposed weight of every linear layer), and it
    serialises a protobuf holding all of them. As plain inputs they are never constants; the caller turns
    them into initializers, written one tensor at a time from the model's own tensors."""
    weights = dict(decoder.named_parameters())
    name_of = {id(p): n for n, p in weights.items()}
    # Every (module, attribute) holding a parameter; a tied weight has two slots and one name.
    slots = [(m, leaf, name_of[id(p)]) for m in decoder.modules() for leaf, p in m._parameters.items()
             if p is not None]
    for module, leaf, _ in slots:
        del module._parameters[leaf]
    graph = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
            torch.onnx.export(_WeightsAsInputs(decoder, slots, list(weights), len(args)), (*args, *weights.values()),
                              graph, input_names=inputs + list(weights), output_names=outputs,
                              dynamic_axes=axes, opset_version=OPSET, dynamo=False, do_constant_folding=False)
    finally:
        for module, leaf, name in slots:
            module.__dict__.pop(leaf, None)  # the traced input tensor set by forward, if it ran
            module.register_parameter(leaf, weights[name])
    return onnx.load_from_string(graph.getvalue()), weights


def _raw(t: torch.Tensor) -> memoryview:
    """The tensor's bytes without a copy (numpy has no bfloat16, so bf16 is viewed as int16)."""
    return memoryview(t.detach().contiguous().view(_NUMPY_VIEW[t.dtype]).numpy()).cast("B")


def _write_with_weights(proto, weights: dict, out: Path, external: bool):
    """Turns the weight inputs of a traced graph into initializers and writes it to ``out``."""
    graph = proto.graph
    used = [i.name for i in graph.input if i.name in weights]
    kept = [i for i in graph.input if i.name not in weights]
    del graph.input[:]
    graph.input.extend(kept)

    def tensor(name):
        t = weights[name]
        return onnx.TensorProto(name=name, dims=list(t.shape), data_type=_ONNX_TYPES[t.dtype])

    if external:
        with open(out / DATA_FILE, "wb") as f:
            for name in used:
                if f.tell() % 65536 and weights[name].numel() * weights[name].element_size() >= 2**20:
                    f.write(bytes(65536 - f.tell() % 65536))  # aligned, so ONNX Runtime can map it
                init, offset = tensor(name), f.tell()
                f.write(_raw(weights[name]))
                for key, value in (("location", DATA_FILE), ("offset", offset), ("length", f.tell() - offset)):
                    entry = init.external_data.add()
                    entry.key, entry.value = key, str(value)
                init.data_location = onnx.TensorProto.EXTERNAL
                graph.initializer.append(init)
        onnx.save(proto, out / "model.onnx")
        return
    with open(out / "model.onnx", "wb") as f:
        f.write(proto.SerializeToString())
        for name in used:
            # A message field that occurs again in the serialised bytes is merged into the first (repeated
            # fields append), so each initializer can be appended on its own as ModelProto.graph.initializer,
            # framed by hand so that its bytes go straight from the model's tensor to the file.
            header, raw = tensor(name).SerializeToString(), _raw(weights[name])
            raw_field = _key(_RAW_DATA, len(raw))
            tensor_len = len(header) + len(raw_field) + len(raw)
            initializer = _key(_INITIALIZER, tensor_len)
            f.write(_key(_GRAPH, len(initializer) + tensor_len) + initializer + header + raw_field)
            f.write(raw)


# Protobuf field numbers of ModelProto.graph, GraphProto.initializer and TensorProto.raw_data.
_GRAPH = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
_INITIALIZER = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
_RAW_DATA = onnx.TensorProto.DESCRIPTOR.fields_by_name["raw_data"].number


def _key(field: int, length: int) -> bytes:
    """Key and length prefix of a length-delimited protobuf field (wire type 2)."""
    out = bytearray()
    for value in (field << 3 | 2, length):
        while value > 0x7F:
            out.append(value & 0x7F | 0x80)
            value >>= 7
        out.append(value)
    return bytes(out)


def genai_config(cfg: dict, decoder: CacheDecoder) -> dict:
    """onnxruntime-genai's description of the graph: a plain llama decoder with ``num_cache_pairs`` layers,
    which is exactly what its uniform cache sees (a wide layer's members are separate pairs)."""
    mcfg = decoder.model.config
    eos = cfg.get("eos_token_id")
    pad = cfg.get("pad_token_id")
    return {
        "model": {
            "type": "llama", "bos_token_id": cfg.get("bos_token_id"), "eos_token_id": eos,
            "pad_token_id": pad if pad is not None else (eos[0] if isinstance(eos, list) else eos),
            "vocab_size": mcfg.vocab_size, "context_length": mcfg.max_position_embeddings,
            "decoder": {
                "filename": "model.onnx", "session_options": {"provider_options": []},
                "head_size": mcfg.head_dim, "hidden_size": mcfg.hidden_size,
                "num_attention_heads": mcfg.num_attention_heads, "num_key_value_heads": decoder.kv_heads,
                "num_hidden_layers": decoder.num_pairs,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        # The graph concatenates past and new keys, so genai must not share one buffer for both.
        "search": {"do_sample": False, "num_beams": 1, "max_length": mcfg.max_position_embeddings,
                   "past_present_share_buffer": False},
    }


# Pass criteria of the ONNX check by graph dtype (the reference is always the float32 PyTorch model):
# logits error <= abs + rel * max |reference logit|, and at least ``greedy`` of the teacher-forced greedy
# tokens equal. float32 differs from PyTorch only by summation order. Half precision rounds every
# activation, so its error scales with the logits, and a greedy token may flip where the two best logits
# are closer than that error. Measured on CPU (README): float16 errors up to 3.0e-3 of the logit scale on
# SmolLM2 and 1.0e-3 on tiny models, 98/99 greedy tokens at worst.
CRITERIA = {
    "float32": dict(abs=2e-4, rel=0.0, greedy=1.0),
    "float16": dict(abs=0.0, rel=1e-2, greedy=0.9),
}


def _positions(mask: torch.Tensor, t: int) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)[:, -t:]


@torch.no_grad()
def validate_onnx(onnx_dir: Path, slim_dir: Path, prompts: list[torch.Tensor], steps: int = 16,
                  provider: str = "auto") -> dict:
    """ONNX Runtime vs the slim PyTorch model in float32: prefill and ``steps`` cached decode steps,
    teacher-forced with PyTorch's greedy tokens; batch 1 and a left-padded batch of several prompts.
    Pass criteria by the graph's dtype: ``CRITERIA``."""
    from transformers import DynamicCache

    from .modeling.modeling_slim import CACHE_NAME

    decoder = Decoder(onnx_dir, provider)
    dtype = decoder.config["onnx_dtype"]
    criterion = CRITERIA[dtype]
    model = load_model(slim_dir)
    model.config.early_exit_enabled = False  # the graph runs every layer (see run_export)
    cases = {"batch 1": prompts[:1], f"batch {len(prompts)}, left-padded": prompts}
    results = {}
    for label, batch in cases.items():
        width = max(len(p) for p in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for r, p in enumerate(batch):
            ids[r, width - len(p):], mask[r, width - len(p):] = p, 1
        cache = DynamicCache()
        decoder.reset(len(batch))
        err, scale, agree, total, step_ids = 0.0, 0.0, 0, 0, ids
        for step in range(steps + 1):
            t = step_ids.shape[1]
            pos = _positions(mask, t)
            want = model(input_ids=step_ids, attention_mask=mask, position_ids=pos, use_cache=True,
                         **{CACHE_NAME: cache}).logits
            got = decoder(step_ids.numpy(), mask.numpy(), pos.numpy())
            real = mask[:, -t:].bool().numpy()  # padding positions' logits are meaningless
            got = got.astype(np.float32)
            err = max(err, float(np.abs(got - want.numpy())[real].max()))
            scale = max(scale, float(want.abs().numpy()[real].max()))
            nxt = want[:, -1].argmax(-1)
            agree += int((torch.from_numpy(got[:, -1]).argmax(-1) == nxt).sum())
            total += len(batch)
            step_ids = nxt[:, None]
            mask = torch.cat([mask, torch.ones(len(batch), 1, dtype=torch.long)], 1)
        tolerance = criterion["abs"] + criterion["rel"] * scale
        results[label] = dict(max_abs_error=err, max_abs_logit=scale, tolerance=tolerance,
                              greedy_agreement=f"{agree}/{total}",
                              passed=err <= tolerance and agree >= criterion["greedy"] * total)
    return dict(provider=decoder.provider, dtype=dtype, criterion=criterion, steps=steps, cases=results,
                passed=all(r["passed"] for r in results.values()))


def _prompts(slim_dir: Path, vocab_size: int, count: int = 3) -> list[torch.Tensor]:
    """Prompts of different lengths, so that the batch needs left padding: held-out text (WikiText-2
    test) when the checkpoint has a tokenizer and the data is present, else seeded random token ids."""
    from transformers import AutoTokenizer

    from .data import load_text, token_chunks

    try:
        tok = AutoTokenizer.from_pretrained(str(slim_dir), trust_remote_code=True)
        chunk = token_chunks(tok, load_text("wikitext2", "test"), 1, 64)[0]
    except (OSError, ValueError, SlimError):
        chunk = torch.randint(0, vocab_size, (64,), generator=torch.Generator().manual_seed(0))
    return [chunk[: 32 - 9 * i] for i in range(count)]


def run_export(slim_dir, out=None, provider: str = "auto", force: bool = False, dtype: str = "float32",
               external_data: str = "auto") -> dict:
    from .outdir import AtomicDir, refuse_overlap
    from .report import console

    slim_dir = Path(slim_dir)
    if not (slim_dir / "config.json").is_file() or not any(slim_dir.glob("*.safetensors")):
        raise SlimError(f"{slim_dir} is not a converted checkpoint (no config.json / safetensors)",
                        "give the output.dir that `slimconv convert` wrote")
    if dtype == "bfloat16":
        # The export itself works (export_onnx); running and checking the graph does not, yet.
        if providers(provider)[0] != "CUDAExecutionProvider":
            raise SlimError("--dtype bf16 needs the CUDA provider: ONNX Runtime's CPU provider has no bfloat16 "
                            "kernels (MatMul among others), so the graph could neither be checked nor run here",
                            "use --dtype fp16 (runs on CPU) or fp32; bf16 needs onnxruntime-gpu and a GPU")
        raise SlimError("checking a bfloat16 graph on CUDA is not implemented yet (numpy has no bfloat16 for "
                        "the cache and logits; no GPU was available to build and test it)", "use --dtype fp16")
    if out:
        refuse_overlap(out, [(slim_dir, "slim checkpoint")], "-o", inside_ok=True)
    target = AtomicDir(Path(out) if out else slim_dir / ONNX_DIR, force, "-o")
    early_exit = json.loads((slim_dir / "config.json").read_text()).get("early_exit")
    if early_exit is not None:
        console.print("[yellow]early exit is NOT exported:[/] the ONNX graph runs every layer (a data-dependent "
                      "stop per token needs control flow in the graph, not done yet); the policy stays in the "
                      "PyTorch checkpoint, and is recorded as not exported in slimconv_onnx_report.json")
    console.print(f"exporting {slim_dir} to ONNX ({dtype}, opset {OPSET}) -> {target.target}")
    with target as tmp:
        info = export_onnx(slim_dir, tmp, dtype, external_data)
        where = f"weights in {DATA_FILE}" if info["external_data"] else "weights inside model.onnx"
        console.print(f"exported in {info['seconds']:.1f} s; {info['cache_pairs']} past/present pairs; {where}")
        vocab = json.loads((slim_dir / "config.json").read_text())["vocab_size"]
        report = validate_onnx(tmp, slim_dir, _prompts(slim_dir, vocab), provider=provider)
        report["export"] = info
        report["early_exit"] = "not exported: the graph runs every layer" if early_exit is not None else None
        write_json(tmp / ONNX_REPORT_FILE, report)
    console.print(f"ONNX Runtime ran on [bold]{report['provider']}[/]")
    for label, r in report["cases"].items():
        mark = "[green]PASS[/]" if r["passed"] else "[red]FAIL[/]"
        console.print(f"  {label}: max |logit error| {r['max_abs_error']:.2e} (tolerance {r['tolerance']:.1e}), "
                      f"greedy agreement {r['greedy_agreement']} over prefill + {report['steps']} decode steps "
                      f"(at least {report['criterion']['greedy']:.0%}) {mark}")
    report["dir"] = str(target.target)
    return report
