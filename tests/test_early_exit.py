"""Adaptive early exit (AdaInfer): off means the exact converted model; an exit at layer k is the model
truncated at k; cached generation with the KV fill equals an uncached recomputation of the same policy;
the classifier, the policy's checks, and the recipe -> convert -> validate/export path."""
import json
import subprocess
import sys

import pytest
import torch
import yaml
from transformers.cache_utils import DynamicCache

from helpers import convert, with_word_tokenizer
from slimconv.selection.early_exit import exit_layers, train_classifier
from slimconv.errors import SlimError
from slimconv.modeling.modeling_slim import exit_features, exit_score, may_exit
from slimconv.plan import resolve_policy
from slimconv.recipe import EarlyExit
from slimconv.runtime import load_model

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
# On these random models the top-1/top-2 gap is ~1e-4..1e-3: this threshold makes tokens exit at
# different layers (or not at all), which is what the cache test needs.
VARIED = {"policy": "gap", "threshold": 0.001, "min_layer": 1}


def _always(k):
    """A policy that exits after layer k whatever the logits."""
    return {"policy": "gap", "threshold": 0.0, "min_layer": k}


@torch.no_grad()
def test_off_is_the_exact_model_and_exit_at_k_is_the_truncated_model(tiny_models, tmp_path):
    src = tiny_models["llama-bias-untied"]
    convert(src, tmp_path / "plain", remove={"attention": [4]})
    convert(src, tmp_path / "exit", remove={"attention": [4]}, early_exit=_always(2))
    plain, model = load_model(tmp_path / "plain"), load_model(tmp_path / "exit")
    assert model.config.early_exit["min_layer"] == 2
    model.config.early_exit_enabled = False
    off = model(input_ids=IDS)
    assert torch.equal(off.logits, plain(input_ids=IDS).logits) and off.exit_layer is None

    model.config.early_exit_enabled = True
    on = model(input_ids=IDS, use_cache=False)
    m = model.model
    x, rope = m.embed_tokens(IDS), m.position_embeddings(torch.zeros(1), torch.arange(IDS.shape[1])[None])
    from slimconv.modeling.modeling_slim import mask_factory

    masks = mask_factory(None, 0, IDS.shape[1], torch.float32, "cpu")
    for layer in m.layers[:3]:
        x = layer(x, rope, masks, None)
    assert on.exit_layer == 2
    assert (on.logits - model.lm_head(m.norm(x))).abs().max() < 1e-6


@torch.no_grad()
def _uncached_greedy(model, prompt, steps):
    """Greedy tokens and exit layers, recomputing the whole sequence each step without a cache: a token
    that exited at e keeps its layer-e hidden state through the later layers (its keys/values there come
    from that state), which is what the cached run's KV fill must reproduce."""
    from slimconv.modeling.modeling_slim import mask_factory

    m, policy = model.model, model.config.early_exit
    n = len(m.layers)
    ids, exits, seen = prompt, [], []
    for _ in range(steps + 1):
        t = ids.shape[1]
        x = m.embed_tokens(ids)
        rope, masks = m.position_embeddings(x, torch.arange(t)[None]), mask_factory(None, 0, t, torch.float32, "cpu")
        done = torch.tensor(exits + [n] * (t - len(exits)))  # exit layer per position; n: still running
        decided = None
        for i, layer in enumerate(m.layers):
            x = torch.where((done < i)[None, :, None], x, layer(x, rope, masks, None))
            if decided is None and may_exit(i, n, policy):
                if exit_score(exit_features(model.lm_head(m.norm(x[:, -1])), i, n), policy).item() >= policy["threshold"]:
                    decided = i
                    done[len(exits):] = i  # the whole call (the prompt, or one new token) stops here
        seen.append(decided)
        exits += [n - 1 if decided is None else decided] * (t - len(exits))
        ids = torch.cat([ids, model.lm_head(m.norm(x[:, -1:])).argmax(-1)], 1)
    return ids[:, : prompt.shape[1] + steps + 1], seen


@torch.no_grad()
@pytest.mark.parametrize("arch", ["qwen3", "mistral"])
def test_cached_generation_with_kv_fill_matches_uncached_recomputation(tiny_models, tmp_path, arch):
    convert(tiny_models[arch], tmp_path / "out", parallel={"groups": [[3, 4]]}, early_exit=VARIED)
    model = load_model(tmp_path / "out")
    prompt, steps = IDS[:1, :10], 12
    cache, ids, seen = DynamicCache(), prompt, []
    out = model(input_ids=ids, past_key_values=cache, use_cache=True)
    for _ in range(steps):
        seen.append(out.exit_layer)
        ids = torch.cat([ids, out.logits[:, -1:].argmax(-1)], 1)
        out = model(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True)
    seen.append(out.exit_layer)
    ids = torch.cat([ids, out.logits[:, -1:].argmax(-1)], 1)
    want_ids, want_seen = _uncached_greedy(model, prompt, steps)
    assert len({e for e in seen}) > 2, f"the policy should exit at varied layers here, got {seen}"
    assert seen == want_seen
    assert torch.equal(ids, want_ids)
    # generate() drives the same forward: same tokens.
    got = model.generate(prompt, max_new_tokens=steps + 1, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want_ids)


@torch.no_grad()
def test_batch_exits_at_the_first_check_where_every_row_is_confident(tiny_models, tmp_path):
    from slimconv.modeling.modeling_slim import mask_factory

    convert(tiny_models["qwen2"], tmp_path / "out", remove={"mlp": [0]}, early_exit=dict(VARIED, threshold=0.0005))
    model = load_model(tmp_path / "out")
    rows = torch.randint(0, 128, (3, 6), generator=torch.Generator().manual_seed(3))
    m, policy = model.model, model.config.early_exit
    n = len(m.layers)
    x, masks = m.embed_tokens(rows), mask_factory(None, 0, 6, torch.float32, "cpu")
    rope = m.position_embeddings(x, torch.arange(6)[None])
    confident = []
    for i, layer in enumerate(m.layers):
        x = layer(x, rope, masks, None)
        score = exit_score(exit_features(model.lm_head(m.norm(x[:, -1])), i, n), policy)
        confident.append((score >= policy["threshold"]).tolist() if may_exit(i, n, policy) else [False] * 3)
    want = next((i for i, c in enumerate(confident) if all(c)), None)
    assert any(any(c) and not all(c) for c in confident), "some check should split the rows here"
    assert model(input_ids=rows, use_cache=False).exit_layer == want


def test_policy_checks_and_classifier():
    policy = {"policy": "linear", "features": ["gap"], "weights": [10.0], "bias": -5.0, "threshold": 0.5,
              "min_layer": 2, "every": 2}
    assert [i for i in range(8) if may_exit(i, 8, policy)] == [2, 4, 6]
    logits = torch.tensor([[10.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    f = exit_features(logits, 3, 8)
    assert f[0, 1] > 0.99 and f[1, 1].abs() < 1e-6 and torch.allclose(f[:, 2], torch.tensor(0.5))
    assert exit_score(f, policy)[0] > 0.99 and exit_score(f, policy)[1] < 0.01
    # records of 4 layers x 3 tokens: the layer-2 check fires for token 0 only; layer 3 is the last.
    feats = torch.zeros(4, 3, 3)
    feats[2, 0, 1] = 1.0
    records = {"features": feats, "pred": torch.zeros(4, 3, dtype=torch.long), "nll": torch.zeros(4, 3)}
    assert exit_layers(records, dict(policy, min_layer=0, every=1)).tolist() == [2, 3, 3]

    # The classifier learns "agrees with the last layer" from a feature that predicts it.
    g = torch.Generator().manual_seed(0)
    gap = torch.rand(6, 400, generator=g)
    feats = torch.stack([gap, gap, torch.zeros_like(gap)], -1)
    pred = (gap > 0.5).long()
    pred[-1] = 1
    c = train_classifier({"features": feats, "pred": pred, "nll": torch.zeros(6, 400)}, features=("gap",))
    assert c["train_accuracy"] > 0.97 and c["weights"][0] > 0


def test_recipe_policy_errors(tmp_path):
    with pytest.raises(SlimError, match="classifier"):
        resolve_policy(EarlyExit(policy="linear"), 6)
    with pytest.raises(SlimError, match="does not exist"):
        resolve_policy(EarlyExit(classifier=str(tmp_path / "nope.json")), 6)
    with pytest.raises(SlimError, match="min_layer"):
        resolve_policy(EarlyExit(policy="gap", min_layer=5), 6)
    with pytest.raises(SlimError, match="unknown features"):
        resolve_policy(EarlyExit(weights={"entropy": 1.0}, bias=0.0), 6)
    (tmp_path / "c.json").write_text(json.dumps({"classifier": {"features": ["gap"], "weights": [2.0], "bias": -1.0}}))
    p = resolve_policy(EarlyExit(classifier=str(tmp_path / "c.json"), threshold=0.8, min_layer=1), 6)
    assert p == dict(policy="linear", threshold=0.8, min_layer=1, every=1, features=["gap"], weights=[2.0], bias=-1.0)


def test_analyze_convert_validate_export_and_load_without_slimconv(tiny_models, tmp_path, capsys, monkeypatch):
    """A user's path on a tiny model: analyze --early-exit -> recipe with the classifier (blocks removed too,
    so the config would be stock without early exit) -> run (validate) -> export says it is not exported ->
    the checkpoint loads and generates with remote code and no slimconv installed."""
    from slimconv.cli import main

    src = with_word_tokenizer(tiny_models["llama-tied"], tmp_path / "src", 120)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{(i * 7) % 120}" for i in range(3000)))
    analysis = tmp_path / "analysis"
    assert main(["analyze", str(src), "--early-exit", "--calib", str(text), "--samples", "3", "--seq-len", "24",
                 "-o", str(analysis)]) == 0
    saved = json.loads((analysis / "early_exit.json").read_text())
    assert saved["classifier"]["features"] == ["top1_prob", "gap", "layer_frac"] and saved["trade_off"]
    out = tmp_path / "out"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(dict(
        model=str(src), remove={"blocks": [5]}, output={"dir": str(out)},
        early_exit={"classifier": str(analysis / "early_exit.json"), "threshold": 0.5, "min_layer": 1},
        validate={"exactness": {"prompt_tokens": 16, "greedy_tokens": 8},
                  "quality": {"data": str(text), "samples": 2, "seq_len": 24}})))
    assert main(["run", str(recipe)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "slimconv" and cfg["early_exit"]["weights"] == saved["classifier"]["weights"]
    report = json.loads((out / "slimconv_report.json").read_text())
    assert report["exactness"]["passed"] and report["exactness"]["max_abs_error"] < 1e-5
    ee = report["early_exit"]
    assert 1 <= ee["simulated"]["avg_layers"] <= 5 and ee["decode"]["tokens"] == 23
    assert "Early exit" in (out / "README.md").read_text()

    capsys.readouterr()
    assert main(["export", str(out)]) == 0
    assert "early exit is NOT exported" in capsys.readouterr().out
    assert json.loads((out / "onnx" / "slimconv_onnx_report.json").read_text())["early_exit"].startswith("not exported")

    code = ("import sys; sys.modules['slimconv'] = None\n"
            "import torch; from transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)\n"
            "print(m.config.early_exit['policy'], m.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, "
            "do_sample=False).shape)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "linear" in p.stdout and "[1, 7]" in p.stdout
