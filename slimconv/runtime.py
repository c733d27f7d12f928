"""Running checkpoints: PyTorch through transformers, and ONNX Runtime on the graph `slimconv export` writes.

``load_model`` is how every stage loads a source or slim checkpoint for PyTorch. ``Decoder`` is the one
driver of the exported decoder graph (prefill and cached steps, the KV cache held as numpy arrays):
export's check, ``generate`` and bench all step the graph through it.
"""
import json
import time
from pathlib import Path

import numpy as np

from . import arch as A
from .errors import SlimError


MODELING_DIR = Path(__file__).parent / "modeling"
TRUST_FIX = "read its .py files; if you trust them, pass --trust-remote-code (validate, bench, run)"


def pick_device(requested: str):
    """The torch device a stage runs on: "auto" is CUDA when torch sees it, else the CPU; "cuda" without one is
    a user error."""
    import torch

    requested = str(requested)
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise SlimError(f"--device {requested}: torch sees no CUDA device here", "use --device cpu (or auto)")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def bundled_code(directory: Path) -> bool:
    """Whether every Python file in ``directory`` is byte-identical to one of the modeling files this
    slimconv ships (slim, nemotron-nas outputs): code slimconv wrote, which it may run without asking."""
    files = list(Path(directory).glob("*.py"))
    return bool(files) and all((MODELING_DIR / f.name).is_file()
                               and f.read_bytes() == (MODELING_DIR / f.name).read_bytes() for f in files)


def load_model(directory, trust_remote_code: bool = False):
    """A source or slim checkpoint as a float32 transformers causal LM in eval mode (slim layouts through
    the modeling code copied beside their weights).

    Code in a checkpoint folder (an ``auto_map`` in its config) runs only when it is slimconv's own bundled
    modeling code or the user agreed (``trust_remote_code``); anything else is refused before it is
    imported."""
    import torch
    from transformers import AutoModelForCausalLM

    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    custom = bool(config.get("auto_map"))
    ours = custom and bundled_code(directory)
    if custom and not ours and not trust_remote_code:
        raise SlimError(f"{directory} carries its own modeling code (auto_map in config.json), which slimconv "
                        "does not run without your agreement", TRUST_FIX)
    # Stock soft-capped attention (Gemma 2) in eager: transformers 5.0.0 picks SDPA for it, which drops the
    # cap (measured: logits off by 5e-4 on a tiny model); eager is what its Gemma 2 docs ask for.
    eager = {"attn_implementation": "eager"} if config.get("attn_logit_softcapping") and not custom else {}
    if config.get("model_type") in A.MULTIMODAL:
        return _text_model(directory).eval()
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32,
                                                 trust_remote_code=ours or trust_remote_code, **eager)
    return model.eval()


def _text_model(directory: Path):
    """The text model of a multimodal checkpoint, as its family's causal LM, loaded from the stored tensors under
    their text-model names (the vision tower is not loaded: no stage reads it). Its text-only forward is the
    multimodal model's (tests/test_multimodal.py)."""
    import re

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging

    from .source import Checkpoint

    ckpt = Checkpoint(directory)
    text = AutoConfig.for_model(**ckpt.config)
    mapping = {"^" + re.escape(stored): view for stored, view in ckpt.layout if stored != view}
    level = logging.get_verbosity()
    logging.set_verbosity_error()  # its load report lists every vision tensor as unexpected
    try:
        return AutoModelForCausalLM.from_pretrained(str(directory), config=text, key_mapping=mapping,
                                                    dtype=torch.float32)
    finally:
        logging.set_verbosity(level)


def load_tokenizer(directory):
    """The tokenizer of a checkpoint or ONNX folder, never with the folder's code: without an explicit
    ``trust_remote_code=False`` transformers reads the config's ``auto_map`` and asks on the terminal
    whether to run it (and waits for the answer)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)


def providers(requested: str) -> list[str]:
    """ONNX Runtime execution providers for ``requested`` (auto | cpu | cuda), CPU always last as fallback."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if requested == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise SlimError("the CUDA execution provider is not available here",
                            "install onnxruntime-gpu on a machine with an NVIDIA GPU, or use --provider cpu")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if requested == "auto" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class Decoder:
    """An ONNX Runtime session of a slimconv export, stepped with its KV cache.

    ``reset(batch)`` starts an empty cache; each call feeds the next tokens and keeps the cache the graph
    returns. Without ``mask`` and ``positions`` every position is real and positions continue from the
    cache's length; a left-padded batch passes both.
    """

    def __init__(self, onnx_dir, provider: str = "auto", threads: int | None = None,
                 profile_prefix: str | None = None):
        import onnxruntime as ort

        onnx_dir = Path(onnx_dir)
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        if profile_prefix:
            opts.enable_profiling, opts.profile_file_prefix = True, profile_prefix
        self.session = ort.InferenceSession(str(onnx_dir / "model.onnx"), opts, providers=providers(provider))
        self.provider = self.session.get_providers()[0]
        self.config = json.loads((onnx_dir / "config.json").read_text())
        inputs = self.session.get_inputs()
        self.inputs = {i.name for i in inputs}
        self.kv_heads = {i.name: i.shape[1] for i in inputs if i.name.startswith("past_key_values.")}
        # The graph's cache dtype; numpy has no bfloat16, ml_dtypes (an onnx dependency) has.
        kind = inputs[3].type
        if kind == "tensor(bfloat16)":
            import ml_dtypes

            self.cache_dtype = ml_dtypes.bfloat16
        else:
            self.cache_dtype = {"tensor(float)": np.float32, "tensor(float16)": np.float16}[kind]
        self.reset(1)

    def reset(self, batch: int):
        self.past = {name: np.zeros((batch, heads, 0, A.head_dim(self.config)), self.cache_dtype)
                     for name, heads in self.kv_heads.items()}
        self.length = 0

    def __call__(self, ids: np.ndarray, mask: np.ndarray | None = None,
                 positions: np.ndarray | None = None) -> np.ndarray:
        """Logits (batch, len(ids), vocab) for the int64 token ids ``ids`` (batch, t)."""
        b, t = ids.shape
        if mask is None:
            mask = np.ones((b, self.length + t), np.int64)
        if positions is None:
            positions = np.broadcast_to(np.arange(self.length, self.length + t, dtype=np.int64), (b, t))
        # By name, not position: graphs of other exporters (onnxruntime-genai's builder) order the cache
        # tensors differently and may have no position_ids.
        feed = {"input_ids": ids, "attention_mask": mask, **self.past}
        if "position_ids" in self.inputs:
            feed["position_ids"] = positions
        named = dict(zip((o.name for o in self.session.get_outputs()), self.session.run(None, feed)))
        logits = named.pop("logits")
        self.past = {name.replace("present", "past_key_values", 1): value for name, value in named.items()}
        self.length += t
        return logits


def generate(onnx_dir, prompt: str, max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
             seed: int = 0, provider: str = "auto"):
    """Greedy (temperature 0) or sampled generation through ONNX Runtime with the KV cache.

    Yields decoded text pieces, then a final dict of statistics.
    """
    if max_new_tokens < 1:
        raise SlimError(f"--max-new-tokens {max_new_tokens}: generate at least 1 token", "pass --max-new-tokens 32")
    if temperature < 0:
        raise SlimError(f"--temperature {temperature}: a temperature is 0 (greedy) or positive", "pass --temperature 0.8")
    if not 0 < top_p <= 1:
        raise SlimError(f"--top-p {top_p}: the nucleus mass is in (0, 1]", "pass --top-p 0.9")
    onnx_dir = Path(onnx_dir)
    if not (onnx_dir / "model.onnx").is_file():
        raise SlimError(f"{onnx_dir} has no model.onnx", "run `slimconv export` first and give its output folder")
    tok = load_tokenizer(onnx_dir)
    decoder = Decoder(onnx_dir, provider)
    eos = decoder.config.get("eos_token_id")
    eos = set(eos if isinstance(eos, list) else [eos])
    rng = np.random.default_rng(seed)
    step = tok(prompt, return_tensors="np").input_ids.astype(np.int64)
    out_ids, start, first = [], time.time(), None
    for _ in range(max_new_tokens):
        logits = decoder(step)
        first = first or time.time()
        nxt = _pick(logits[0, -1], temperature, top_p, rng)
        if nxt in eos:
            break
        out_ids.append(nxt)
        yield tok.decode(out_ids[-1:], skip_special_tokens=True)
        step = np.array([[nxt]], np.int64)
    end = time.time()
    decode = len(out_ids) - 1
    yield dict(provider=decoder.provider, new_tokens=len(out_ids), prefill_s=first - start,
               decode_tokens_per_s=decode / (end - first) if decode > 0 and end > first else float("nan"),
               token_ids=out_ids)


def _pick(logits: np.ndarray, temperature: float, top_p: float, rng) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    z = (logits.astype(np.float32) - logits.max()) / temperature
    p = np.exp(z) / np.exp(z).sum()
    order = np.argsort(-p)
    keep = order[: int(np.searchsorted(np.cumsum(p[order]), top_p)) + 1]
    return int(rng.choice(keep, p=p[keep] / p[keep].sum()))
