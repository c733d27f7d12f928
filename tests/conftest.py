import os
import tempfile
from pathlib import Path

import pytest
import torch

# Tests never reach the Hub; the GGUF dequantisation cache lives in one temp dir per session unless
# the caller points SLIMCONV_CACHE somewhere persistent (CI does, to reuse it across its steps).
os.environ.setdefault("SLIMCONV_CACHE", tempfile.mkdtemp(prefix="slimconv-cache-"))
os.environ["HF_HUB_OFFLINE"] = "1"
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)

# Every supported family, with the variations the converter must handle (tied/untied embeddings,
# attention and MLP biases, per-head q/k norms, sliding windows).
ARCH_CONFIGS = {
    "llama-tied": ("LlamaConfig", dict(tie_word_embeddings=True)),
    "llama-bias-untied": ("LlamaConfig", dict(tie_word_embeddings=False, attention_bias=True, mlp_bias=True)),
    "mistral": ("MistralConfig", dict(tie_word_embeddings=False, sliding_window=8, head_dim=16)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(tie_word_embeddings=False, head_dim=16)),
}


def make_tiny(directory: Path, name: str, seed: int = 0) -> Path:
    import transformers

    cls, extra = ARCH_CONFIGS[name]
    torch.manual_seed(seed)
    config = getattr(transformers, cls)(**TINY, **extra)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 1:  # norms and biases away from their init so folding errors would show
                p.copy_((1.0 if "norm" in n else 0.0) + 0.3 * torch.randn_like(p))
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {name: make_tiny(root / name, name) for name in ARCH_CONFIGS}


@pytest.fixture(scope="session")
def smollm2_dir():
    from slimconv.source import resolve_source

    return resolve_source("default")
