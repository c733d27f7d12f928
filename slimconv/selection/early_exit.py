"""Adaptive early exit (AdaInfer): the stop classifier's training data, its training, and what it costs.

At every layer the final norm and LM head read the hidden state; the features of those logits
(``modeling_slim.exit_features``: top-1 probability, top-1 minus top-2 probability, and the layer's depth)
feed a logistic classifier whose label is "this layer's top-1 already equals the full model's". The
policy (weights, bias, threshold, first layer, check interval) is stored in the slim config, and the
bundled modeling code evaluates it at run time; nothing here is needed to run an early-exit model.

Two kinds of numbers come out of here, and the reports keep them apart:
- simulated per-token exit: every layer runs for every token, the per-layer logits are recorded and the
  policy is applied per token afterwards (cheap for many settings, but later tokens see full-depth
  keys/values, not the filled ones of a real run);
- real runs: the model with the policy on, one forward call per prompt (prompt tasks) or per token
  (teacher-forced decoding with the KV cache and its fill for skipped layers).
"""
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache

from ..errors import SlimError
from ..modeling.modeling_slim import (CACHE_NAME, EXIT_FEATURES, embed_scale, exit_features, exit_score,
                                      final_softcap, mask_factory, may_exit)

ROWS = 512  # tokens whose full-vocabulary logits are held at once


# ---------------------------------------------------------------- per-layer records

@torch.no_grad()
def layer_records(states, logits_of, ids: torch.Tensor) -> dict:
    """Per layer and per predicted token: the exit features, the top-1 token and the NLL of the true next token.

    ``states`` yields the hidden states (batch, seq, hidden) after each layer; ``logits_of`` maps hidden
    states (rows, hidden) to logits (final norm + LM head). Every position but the last of each row
    counts (it has a next token). Returns tensors of shape (layers, tokens[, features]).
    """
    target = ids[:, 1:].reshape(-1)
    feats, preds, nlls = [], [], []
    layers = 0
    for i, x in enumerate(states):
        h = x[:, :-1].reshape(-1, x.shape[-1])
        f, p, n = [], [], []
        for r in range(0, len(h), ROWS):
            logits = logits_of(h[r:r + ROWS]).float()
            f.append(exit_features(logits, i, 1))  # depth is set below, once the layer count is known
            p.append(logits.argmax(-1))
            n.append(F.cross_entropy(logits, target[r:r + ROWS], reduction="none"))
        feats.append(torch.cat(f))
        preds.append(torch.cat(p))
        nlls.append(torch.cat(n))
        layers = i + 1
    feats = torch.stack(feats)
    feats[..., EXIT_FEATURES.index("layer_frac")] = (torch.arange(layers, dtype=feats.dtype)[:, None] + 1) / layers
    return dict(features=feats, pred=torch.stack(preds), nll=torch.stack(nlls))


def source_records(runner, config: dict) -> dict:
    """Records of the source model, run layer by layer by the analysis engine (``layerwise.Runner``)."""
    from ..plan import source_plan

    def states():
        x = runner.embed()
        for spec in source_plan(config).layers:
            x = runner.apply(spec, x)
            yield x

    return layer_records(states(), runner.logits, runner.ids)


def model_records(model, ids: torch.Tensor, batch_size: int = 4) -> dict:
    """Records of a loaded SlimForCausalLM (its layers one at a time, every layer run: no exit)."""
    m = model.model
    t = ids.shape[1]
    rope = m.position_embeddings(torch.zeros(1, t, 1), torch.arange(t)[None])
    masks = mask_factory(None, 0, t, torch.float32, ids.device)
    parts = []
    for b in range(0, len(ids), batch_size):
        rows = ids[b:b + batch_size]

        def states(rows=rows):
            x = embed_scale(model.config, m.embed_tokens(rows))
            for layer in m.layers:
                x = layer(x, rope, masks, None)
                yield x

        parts.append(layer_records(states(), lambda h: final_softcap(model.config, model.lm_head(m.norm(h))), rows))
    return {k: torch.cat([p[k] for p in parts], 1) for k in parts[0]}


# ---------------------------------------------------------------- training

def train_classifier(records: dict, features=EXIT_FEATURES, l2: float = 1e-4) -> dict:
    """Logistic regression of "this layer's top-1 equals the last layer's" on the exit features.

    Written in torch (L-BFGS on the mean log-loss) instead of taking scikit-learn as a dependency for a
    model of three weights and a bias. The last layer is left out: it always agrees with itself.
    """
    idx = [EXIT_FEATURES.index(f) for f in features]
    x = records["features"][:-1, :, idx].reshape(-1, len(idx)).double()
    y = (records["pred"][:-1] == records["pred"][-1]).reshape(-1).double()
    w = torch.zeros(len(idx), dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def loss():
        opt.zero_grad()
        value = F.binary_cross_entropy_with_logits(x @ w + b, y) + l2 * w.pow(2).sum()
        value.backward()
        return value

    opt.step(loss)
    with torch.no_grad():
        p = torch.sigmoid(x @ w + b)
        acc = ((p >= 0.5).double() == y).double().mean().item()
        final = F.binary_cross_entropy_with_logits(x @ w + b, y).item()
    return dict(features=list(features), weights=w.detach().tolist(), bias=b.item(), train_examples=len(y),
                positive_rate=y.mean().item(), train_accuracy=acc, train_log_loss=final)


# ---------------------------------------------------------------- costs and simulation

def layer_flops(layers, head: torch.Tensor) -> dict:
    """Weight FLOPs per token (2 per multiply-add) of each decoder layer, of one LM head (one exit check),
    and of the key/value projections that fill a skipped layer's cache. Attention scores are left out: they
    grow with the context and are the same for every layer."""
    per_layer = [2 * sum(p.numel() for p in layer.parameters()) for layer in layers]
    fill = [2 * (layer.self_attn.k_proj.weight.numel() + layer.self_attn.v_proj.weight.numel())
            if layer.self_attn is not None else 0 for layer in layers]
    return dict(layers=per_layer, head=2 * head.numel(), kv_fill=fill)


def exit_layers(records: dict, policy: dict) -> torch.Tensor:
    """The layer after which each token stops under ``policy`` (the last layer when it never does)."""
    layers = records["pred"].shape[0]
    out = torch.full((records["pred"].shape[1],), layers - 1, dtype=torch.long)
    for i in reversed(range(layers)):  # the earliest confident check wins
        if may_exit(i, layers, policy):
            out[exit_score(records["features"][i], policy) >= policy["threshold"]] = i
    return out


def token_flops(exits: torch.Tensor, policy: dict | None, flops: dict) -> torch.Tensor:
    """Per-token weight FLOPs with early exit: layers run, one LM head per check (the exit check's head is
    the output's), and the KV fill of every skipped layer."""
    n = len(flops["layers"])
    run = torch.tensor(flops["layers"], dtype=torch.float64).cumsum(0)
    fill_after = torch.tensor(flops["kv_fill"][::-1], dtype=torch.float64).cumsum(0).flip(0)  # fill of layers >= i
    fill_after = torch.cat([fill_after, torch.zeros(1, dtype=torch.float64)])
    checks = torch.tensor([may_exit(i, n, policy) if policy else False for i in range(n)], dtype=torch.float64).cumsum(0)
    exited = exits < n - 1
    # A token that exits at e paid for the checks up to e (the last of them is its output head); one that
    # ran through paid for every check and the final head.
    heads = torch.where(exited, checks[exits], checks[-1] + 1)
    return run[exits] + heads * flops["head"] + fill_after[exits + 1]


def simulate(records: dict, policy: dict, flops: dict) -> dict:
    """Per-token early exit applied offline to the records (see the module note: a simulation)."""
    n = records["pred"].shape[0]
    exits = exit_layers(records, policy)
    tokens = torch.arange(len(exits))
    full = token_flops(torch.full_like(exits, n - 1), None, flops).mean().item()
    used = token_flops(exits, policy, flops).mean().item()
    return dict(avg_layers=(exits + 1).double().mean().item(), num_layers=n,
                layers_saved=1 - (exits + 1).double().mean().item() / n, compute_saved=1 - used / full,
                top1_agreement=(records["pred"][exits, tokens] == records["pred"][-1]).double().mean().item(),
                ppl_exit=math.exp(records["nll"][exits, tokens].mean().item()),
                ppl_full=math.exp(records["nll"][-1].mean().item()), tokens=len(exits))


# ---------------------------------------------------------------- real runs

def _set_exit(model, enabled: bool):
    model.config.early_exit_enabled = enabled


@torch.no_grad()
def teacher_forced(model, ids: torch.Tensor, flops: dict) -> dict:
    """Real per-token exit: each window fed one token per forward call with the KV cache (and its fill),
    compared with the same model without early exit. Batch 1."""
    policy = model.config.early_exit
    n = len(model.model.layers)
    exits, agree, nll_exit, nll_full = [], [], [], []
    for row in ids:
        _set_exit(model, False)
        full = model(input_ids=row[None], use_cache=False).logits[0, :-1].float()
        _set_exit(model, True)
        cache = {CACHE_NAME: DynamicCache()}
        for t in range(len(row) - 1):
            out = model(input_ids=row[None, t:t + 1], use_cache=True, **cache)
            logits = out.logits[0, -1].float()
            exits.append(n - 1 if out.exit_layer is None else out.exit_layer)
            agree.append(bool(logits.argmax() == full[t].argmax()))
            nll_exit.append(F.cross_entropy(logits, row[t + 1]).item())
            nll_full.append(F.cross_entropy(full[t], row[t + 1]).item())
    e = torch.tensor(exits)
    used = token_flops(e, policy, flops).mean().item()
    base = token_flops(torch.full_like(e, n - 1), None, flops).mean().item()
    return dict(tokens=len(exits), avg_layers=(e + 1).double().mean().item(), layers_saved=1 - (e + 1).double().mean().item() / n,
                compute_saved=1 - used / base, top1_agreement=sum(agree) / len(agree),
                ppl_exit=math.exp(sum(nll_exit) / len(nll_exit)), ppl_full=math.exp(sum(nll_full) / len(nll_full)))


def prompt_tasks(tokenizer, text: str, count: int = 40) -> dict:
    """One-token prompt tasks built from WikiText-2 test, answered by the next token:

    - ``last_word``: a sentence of 12+ words without its last word (LAMBADA-style), answer its first token;
    - ``title``: an article's header line and the first word of its title, answer the title's next token
      (the first paragraph repeats the title: recall from the prompt).
    """
    lines = [l.strip() for l in text.splitlines()]
    last_word, title = [], []
    for i, line in enumerate(lines):
        if line.startswith("= ") and not line.startswith("= =") and line.endswith(" ="):
            name = line[2:-2].strip()
            words = name.split()
            if len(words) >= 2 and "<unk>" not in name and len(title) < count:
                title.append((f"{line}\n\n {words[0]}", " " + " ".join(words[1:])))
        elif len(line.split()) > 40 and len(last_word) < count:
            sentence = line.split(" . ")[0].split()
            if len(sentence) >= 12 and sentence[-1].isalpha() and "<unk>" not in sentence:
                last_word.append((" " + " ".join(sentence[:-1]), " " + sentence[-1]))
    tasks = {}
    for name, pairs in (("last_word", last_word), ("title", title)):
        if pairs:  # other text than WikiText-2 may have no headers or long sentences
            tasks[name] = [(tokenizer(p, return_tensors="pt").input_ids[0], tokenizer(a).input_ids[0])
                           for p, a in pairs]
    return tasks


@torch.no_grad()
def run_prompt_tasks(model, tasks: dict, flops: dict) -> dict:
    """Real prompt-level exit (batch 1, one decision at the last position of each prompt)."""
    policy, n = model.config.early_exit, len(model.model.layers)
    out = {}
    for name, items in tasks.items():
        exits, agree, right_exit, right_full = [], 0, 0, 0
        for prompt, answer in items:
            _set_exit(model, False)
            full = model(input_ids=prompt[None], use_cache=False).logits[0, -1].argmax().item()
            _set_exit(model, True)
            o = model(input_ids=prompt[None], use_cache=False)
            got = o.logits[0, -1].argmax().item()
            exits.append(n - 1 if o.exit_layer is None else o.exit_layer)
            agree += got == full
            right_exit += got == answer
            right_full += full == answer
        e = torch.tensor(exits)
        used = token_flops(e, policy, flops).mean().item()
        base = token_flops(torch.full_like(e, n - 1), None, flops).mean().item()
        out[name] = dict(prompts=len(items), avg_layers=(e + 1).double().mean().item(),
                         layers_saved=1 - (e + 1).double().mean().item() / n, compute_saved=1 - used / base,
                         top1_agreement=agree / len(items), accuracy_exit=right_exit / len(items),
                         accuracy_full=right_full / len(items))
    return out


def evaluate(model, tokenizer, chunks: torch.Tensor, text: str, samples: int = 4, decode_tokens: int = 128,
             prompts: int = 40) -> dict:
    """What validate reports for an early-exit model: simulated per-token exit on the first ``samples``
    chunks (the LM head at every layer costs several layers' worth on small models, hence not all of
    them), real teacher-forced decoding on the first ``decode_tokens`` of the first chunk, and the prompt tasks."""
    policy = model.config.early_exit
    flops = layer_flops(model.model.layers, model.lm_head.weight)
    records = model_records(model, chunks[:samples])
    result = dict(policy=policy, simulated=simulate(records, policy, flops),
                  decode=teacher_forced(model, chunks[:1, :decode_tokens + 1], flops),
                  prompts=run_prompt_tasks(model, prompt_tasks(tokenizer, text, prompts), flops), passed=True)
    _set_exit(model, True)
    return result


# ---------------------------------------------------------------- analysis

def _grid(records: dict, classifier: dict, flops: dict, num_layers: int) -> list[dict]:
    """Simulated trade-off on the calibration records for a few knob settings."""
    rows = []
    schedules = [(0, 1), (num_layers // 2, 1), (num_layers // 2, 4), (2 * num_layers // 3, 4)]
    for min_layer, every in schedules:
        for thr in (0.3, 0.4, 0.5, 0.6, 0.7, 0.9):  # the classifier's probabilities are low: most layers disagree
            policy = dict(policy="linear", threshold=thr, min_layer=min_layer, every=every, **{
                k: classifier[k] for k in ("features", "weights", "bias")})
            rows.append(dict(policy="linear", threshold=thr, min_layer=min_layer, every=every,
                             **simulate(records, policy, flops)))
        for thr in (0.5, 0.8):
            policy = dict(policy="gap", threshold=thr, min_layer=min_layer, every=every)
            rows.append(dict(policy="gap", threshold=thr, min_layer=min_layer, every=every,
                             **simulate(records, policy, flops)))
    return rows


def analyse_early_exit(settings, src_dir: Path) -> dict:
    """Trains the stop classifier on the calibration set of ``settings`` (analyse.AnalysisSettings)."""
    from ..data import calibration_ids
    from .layerwise import LayerBank, Runner
    from ..plan import source_plan
    from ..source import checked_source

    ckpt, _ = checked_source(src_dir)
    ids = calibration_ids(src_dir, settings.calib, settings.samples, settings.seq_len, settings.seed)
    bank = LayerBank(ckpt, settings.norm, settings.max_memory, settings.device)
    records = source_records(Runner(bank, ids, settings.batch_size), ckpt.config)
    classifier = train_classifier(records)
    two = train_classifier(records, features=("top1_prob", "gap"))
    flops = layer_flops([bank.layer(spec) for spec in source_plan(ckpt.config).layers], bank.head)
    n = len(flops["layers"])
    agree = (records["pred"] == records["pred"][-1]).double().mean(1).tolist()
    return dict(settings=settings.model_dump(), source_dir=str(src_dir), num_layers=n, calibration_tokens=ids.numel(),
                classifier=classifier, classifier_without_depth=two, layer_agreement=agree, flops=flops,
                trade_off=_grid(records, classifier, flops, n))


def report_markdown(m: dict) -> str:
    c, two = m["classifier"], m["classifier_without_depth"]
    s = m["settings"]
    lines = [f"# Early-exit classifier for {s['model']}",
             f"Calibration: {s['calib']} valid, {s['samples']} x {s['seq_len']} tokens; label: the layer's top-1 "
             "equals the last layer's; logistic regression (L-BFGS, torch).",
             "| features | weights | bias | train accuracy | log-loss |", "|---|---|---|---|---|"]
    for k in (c, two):
        lines.append(f"| {', '.join(k['features'])} | {', '.join(f'{w:.3f}' for w in k['weights'])} | {k['bias']:.3f} "
                     f"| {k['train_accuracy']:.3f} | {k['train_log_loss']:.4f} |")
    lines += ["", f"Positive rate (a layer already agrees): {c['positive_rate']:.3f}. The policy uses the first row.",
              "", "Per-layer top-1 agreement with the last layer: "
              + ", ".join(f"{i}: {a:.2f}" for i, a in enumerate(m["layer_agreement"])),
              "", "## Simulated trade-off on the calibration tokens",
              "compute saved counts weight FLOPs including one LM head per check and the KV fill of skipped layers.", "",
              "| policy | threshold | min_layer | every | avg layers | layers saved | compute saved | top-1 agreement | ppl exit | ppl full |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in m["trade_off"]:
        lines.append(f"| {r['policy']} | {r['threshold']} | {r['min_layer']} | {r['every']} | {r['avg_layers']:.2f} "
                     f"| {r['layers_saved']:.1%} | {r['compute_saved']:.1%} | {r['top1_agreement']:.3f} "
                     f"| {r['ppl_exit']:.2f} | {r['ppl_full']:.2f} |")
    return "\n".join(lines) + "\n"


def run_analyse_early_exit(settings, out: Path, force: bool = False) -> dict:
    """Writes early_exit.json and early_exit.md into ``out``, beside any layer analysis already there
    (the issue's commands put both in one analysis folder, so this must not replace the folder)."""
    from ..outdir import locked, refuse_overlap, write_text
    from ..report import console
    from ..source import resolve_source, source_paths

    out = Path(out)
    refuse_overlap(out, source_paths(settings.model), "-o")
    if (out / "early_exit.json").exists() and not force:
        raise SlimError(f"{out / 'early_exit.json'} already exists", "pass --force to overwrite it, or choose another -o")
    src_dir = resolve_source(settings.model, settings.allow_pickle)
    # Only now is the folder known that a Hub id or GGUF file resolved to.
    refuse_overlap(out, source_paths(settings.model, src_dir), "-o")
    console.print(f"early-exit classifier for {settings.model}: {settings.samples} x {settings.seq_len} calibration "
                  f"tokens of {settings.calib} (valid), logits at every layer")
    m = analyse_early_exit(settings, src_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with locked(out, "-o"):  # a layer analysis swapping this folder meanwhile would drop these files
        out.mkdir(exist_ok=True)
        for name, text in (("early_exit.json", json.dumps(m, indent=2)), ("early_exit.md", report_markdown(m))):
            write_text(out / name, text)
    c = m["classifier"]
    console.print(f"[green]wrote[/] {out}/early_exit.json: weights "
                  + ", ".join(f"{f} {w:.3f}" for f, w in zip(c["features"], c["weights"]))
                  + f", bias {c['bias']:.3f} (train accuracy {c['train_accuracy']:.3f}); trade-off in early_exit.md")
    return m
