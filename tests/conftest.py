import os
import tempfile
from pathlib import Path

import pytest
import torch

from helpers import ARCH_CONFIGS, TINY, make_tiny  # noqa: F401 (tests import them from here too)

# Tests never reach the Hub; the GGUF dequantisation cache lives in one temp dir per session unless
# the caller points SLIMCONV_CACHE somewhere persistent (CI does, to reuse it across its steps).
os.environ.setdefault("SLIMCONV_CACHE", tempfile.mkdtemp(prefix="slimconv-cache-"))
os.environ["HF_HUB_OFFLINE"] = "1"
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {name: make_tiny(root / name, name) for name in ARCH_CONFIGS}


@pytest.fixture(scope="session")
def smollm2_dir():
    from slimconv.source import resolve_source

    return resolve_source("default")
