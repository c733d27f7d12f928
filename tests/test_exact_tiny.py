"""Exactness on tiny random models of every supported architecture and every kind of change."""
import json

import pytest
import torch

from conftest import ARCH_CONFIGS
from helpers import compare, convert

CHANGES = {
    "blocks": dict(remove={"blocks": [1, "3-4"]}),
    "attention": dict(remove={"attention": "3-5"}),
    "mlp": dict(remove={"mlp": [0, 5]}),
    "pairs": dict(parallel={"groups": [[1, 2], "3-4"]}),
    "group-of-3": dict(parallel={"groups": ["2-4"]}),
    "mix": dict(remove={"blocks": [0], "attention": [5], "mlp": [1]}, parallel={"groups": [[2, 3]]}),
    "mix-mean-norm": dict(remove={"attention": [2]}, parallel={"groups": ["2-4"], "norm": "mean"}),
}


@pytest.mark.parametrize("change", CHANGES)
@pytest.mark.parametrize("arch", ARCH_CONFIGS)
def test_conversion_is_exact(tiny_models, tmp_path, arch, change):
    plan = convert(tiny_models[arch], tmp_path / "out", **CHANGES[change])
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(1))
    err, same = compare(tiny_models[arch], tmp_path / "out", plan, ids)
    assert err < 1e-5, f"{arch}/{change}: max |logit error| {err}"
    assert same, f"{arch}/{change}: greedy tokens differ"


@pytest.mark.parametrize("arch", ["llama-tied", "qwen2"])
def test_only_blocks_gives_stock_config(tiny_models, tmp_path, arch):
    from transformers import AutoModelForCausalLM

    convert(tiny_models[arch], tmp_path / "out", remove={"blocks": [0, 4]})
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["model_type"] == json.loads((tiny_models[arch] / "config.json").read_text())["model_type"]
    assert cfg["num_hidden_layers"] == 4 and "auto_map" not in cfg
    assert not (tmp_path / "out" / "modeling_slim.py").exists()
    if "layer_types" in cfg:
        assert len(cfg["layer_types"]) == 4
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # stock class, no remote code


def test_left_padded_batch_matches_unpadded(tiny_models, tmp_path):
    """The slim model's masks: a left-padded row gives the same logits and cached greedy tokens."""
    from slimconv.runtime import load_model

    convert(tiny_models["qwen3"], tmp_path / "out", parallel={"groups": [[1, 2]]}, remove={"attention": [4]})
    model = load_model(tmp_path / "out")
    short = torch.randint(1, 128, (1, 7))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1)
    batch = torch.cat([padded, torch.randint(1, 128, (1, 10))])
    mask = torch.ones_like(batch)
    mask[0, :3] = 0
    with torch.no_grad():
        alone = model(input_ids=short).logits[0, -1]
        both = model(input_ids=batch, attention_mask=mask).logits[0, -1]
    assert (alone - both).abs().max() < 1e-4
    g_alone = model.generate(short, max_new_tokens=6, do_sample=False, pad_token_id=0)[0, -6:]
    g_batch = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)[0, -6:]
    assert torch.equal(g_alone, g_batch)


@pytest.mark.parametrize("dtype,tol", [("bfloat16", 0.25), ("float16", 0.05)])
def test_half_precision_output(tiny_models, tmp_path, dtype, tol):
    from safetensors import safe_open

    from slimconv.reference import apply_plan
    from slimconv.runtime import load_model
    from slimconv.validate import load_reference

    plan = convert(tiny_models["llama-tied"], tmp_path / "out", dtype=dtype, parallel={"groups": [[1, 2]]})
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == getattr(torch, dtype)
    ids = torch.randint(0, 128, (1, 16))
    ref = load_reference(tiny_models["llama-tied"], plan, getattr(torch, dtype))
    with torch.no_grad():
        err = (load_model(tmp_path / "out")(input_ids=ids).logits - ref(input_ids=ids).logits).abs().max()
    assert err < tol


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device (CI has none)")
@pytest.mark.parametrize("change", ["mix", "group-of-3"])
def test_slim_model_on_cuda(tiny_models, tmp_path, change):
    """The shipped modeling code on a GPU, float32 and float16: the same logits as the CPU; in float32, cached
    greedy generation equals the uncached argmax loop (a random model's near-ties make float16 tokens flip)."""
    from slimconv.reference import greedy_no_cache
    from slimconv.runtime import load_model

    convert(tiny_models["qwen3"], tmp_path / "out", **CHANGES[change])
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = load_model(tmp_path / "out")(input_ids=ids).logits
        gpu = load_model(tmp_path / "out").cuda()
        assert (gpu(input_ids=ids.cuda()).logits.cpu() - want).abs().max() < 1e-4
        prompt = ids[:1].cuda()
        gen = gpu.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, min_new_tokens=8,
                           do_sample=False, pad_token_id=0)
        assert torch.equal(gen, greedy_no_cache(gpu, prompt, 8))
        half = gpu.half()(input_ids=ids.cuda()).logits.float().cpu()
        assert (half - want).abs().max() < 0.05
