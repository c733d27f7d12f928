"""The modeling code shipped inside outputs keeps working as transformers moves.

Under the installed transformers: every output kind of every architecture generates with its cache what
the independent reference computes without one (``compat_check``). Across the proven range: the same
checks in throwaway environments with the oldest and newest proven transformers (``compat`` marker).
"""
import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from compat_check import check
from compat_fixtures import build
from slimconv.modeling.configuration_slim import PROVEN_TRANSFORMERS

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    return build(tmp_path_factory.mktemp("compat"))


def test_every_output_kind_under_the_installed_transformers(fixtures):
    results = [check(out) for out in fixtures]
    bad = [r for r in results if not r["ok"]]
    assert not bad, bad
    assert {r["output"].rsplit("-", 1)[-1] for r in results} >= {"stock", "sublayers", "parallel", "mean", "exit"}


def test_a_cache_under_an_unknown_name_is_an_error_not_garbage(fixtures):
    from transformers import DynamicCache

    from slimconv.runtime import load_model

    model = load_model(next(p for p in fixtures if p.name.endswith("-sublayers")))
    with pytest.raises(TypeError, match="KV cache"):
        model(input_ids=torch.tensor([[1, 2]]), kv_cache=DynamicCache())


def test_the_declared_range_is_the_proven_one():
    spec = re.search(r'^\s*"(transformers[^"]*)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert spec == f"transformers>={PROVEN_TRANSFORMERS[0]},<={PROVEN_TRANSFORMERS[1]}"
    locked = re.search(r"^transformers==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M).group(1)
    assert locked in PROVEN_TRANSFORMERS, "the lock must be one of the versions the matrix proved"


def test_loading_under_an_unproven_transformers_warns(monkeypatch):
    import importlib.util

    import transformers

    monkeypatch.setattr(transformers, "__version__", "99.0.0")
    path = ROOT / "slimconv" / "modeling" / "configuration_slim.py"
    spec = importlib.util.spec_from_file_location("configuration_slim_probe", path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    messages = [str(w.message) for w in caught]
    assert any("99.0.0" in m and PROVEN_TRANSFORMERS[1] in m for m in messages), messages


@pytest.mark.compat
def test_matrix_on_the_oldest_and_newest_proven_transformers(tmp_path):
    """benchmarks/compat_matrix.py in throwaway environments (made once, kept in $SLIMCONV_CACHE/compat)."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compat_matrix.py"),
                           "--fixtures", str(tmp_path), "--json", str(tmp_path / "matrix.json")],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = json.loads((tmp_path / "matrix.json").read_text())
    assert {r["transformers"] for r in rows} == set(PROVEN_TRANSFORMERS)
    assert len(rows) == 2 * len(list(tmp_path.glob("*/compat_expect.safetensors")))
