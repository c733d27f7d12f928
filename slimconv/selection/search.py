"""Search: the recipe that reaches a speed target with the least calibration loss, across every kind of change.

SLEB's verified greedy elimination, generalised: at every step each change that keeps the plan valid
(remove a block, an attention, an MLP; make a pair or a group of 3 parallel; grow a group by one layer; in a
mixture of experts, remove a layer's weakest remaining expert, by ``experts.expert_scores``) is
scored by the calibration loss of the plan with it applied (layer by layer, exactly as the converted
checkpoint computes it), and the change with the lowest loss increase per unit of ideal speedup gained is
kept. The ideal speedup is the plan's cost model for the target (``plan.costs``); the gain that counts is
capped at what is still missing to the target, so a change that overshoots is not preferred for it.

Each step is cheap: candidates share the hidden states before them (``layerwise.candidate_nlls``), are
ranked by successive halving over the calibration windows (``layerwise.Halving``) and the previous step's
ranking decides which of the changes scored before enter the first round; ``exact`` scores every
candidate on every window.
"""
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import yaml

from ..errors import SlimError
from .layerwise import (Halving, LayerBank, Runner, final_hidden, kl_divergence, ppl, ranked_nlls)
from ..plan import Plan, build_plan, costs
from ..recipe import parse_recipe
from .settings import METRICS, OPS, SearchSettings

@dataclass(frozen=True)
class Target:
    metric: str
    value: float

    def __str__(self):
        return f"{self.metric}:{self.value:g}"


def parse_target(text: str, config: dict) -> Target:
    metric, sep, value = str(text).partition(":")
    if metric not in METRICS:
        raise SlimError(f"--target {text!r}: unknown metric {metric!r}",
                        "write METRIC:VALUE with METRIC one of " + ", ".join(METRICS) + " (e.g. decode:1.25)")
    try:
        v = float(value)
    except ValueError:
        raise SlimError(f"--target {text!r}: {value!r} is not a number", f"write it like {metric}:1.25") from None
    n = config["num_hidden_layers"]
    if metric == "params" and not 0 < v < 1:
        raise SlimError(f"--target {text!r}: params is the fraction of parameters kept, between 0 and 1",
                        "e.g. params:0.8")
    if metric == "layers":
        if v != int(v) or not 1 <= v < n:
            raise SlimError(f"--target {text!r}: the model has {n} layers; ask for a whole number from 1 to {n - 1}")
        return Target(metric, v)
    if metric not in ("params", "layers") and not (math.isfinite(v) and v > 1):
        raise SlimError(f"--target {text!r}: a speedup target is a number above 1", f"e.g. {metric}:1.25")
    return Target(metric, v)


@dataclass(frozen=True)
class Design:
    """The changes chosen so far, in recipe terms (source layer indices)."""

    blocks: frozenset = frozenset()
    attention: frozenset = frozenset()
    mlp: frozenset = frozenset()
    groups: tuple = ()  # sorted tuples of consecutive layers
    experts: tuple = ()  # (layer, the experts it keeps) of mixture-of-experts layers that lost some, sorted
    channels: tuple = ()  # (layer, the MLP channels it keeps) of narrowed layers, sorted (search --method mip)
    kv: tuple = ()  # (layer, KV heads it keeps) of layers with merged KV heads, sorted

    def sections(self) -> dict:
        out = {}
        remove = {k: sorted(v) for k, v in (("blocks", self.blocks), ("attention", self.attention - self.blocks),
                                            ("mlp", self.mlp - self.blocks)) if v}
        # A layer whose MLP went later keeps no experts to list.
        experts = {str(i): list(kept) for i, kept in self.experts if i not in self.blocks | self.mlp}
        if experts:
            remove["experts"] = experts
        if remove:
            out["remove"] = remove
        shrink = {k: v for k, v in (
            ("mlp", {str(i): list(c) for i, c in self.channels if i not in self.blocks | self.mlp}),
            ("kv_heads", {str(i): k for i, k in self.kv if i not in self.blocks | self.attention})) if v}
        if shrink:
            out["shrink"] = shrink
        if self.groups:
            out["parallel"] = {"groups": [list(g) for g in self.groups]}
        return out

    def plan(self, model: str, config: dict, norm: str = "per_layer") -> Plan:
        sections = self.sections()
        if self.groups:
            sections["parallel"]["norm"] = norm
        return build_plan(parse_recipe({"model": model, "output": {"dir": "search"}, **sections}), config)

    def grouped(self) -> dict[int, tuple]:
        return {m: g for g in self.groups for m in g}


@dataclass(frozen=True)
class Change:
    kind: str  # block, attention, mlp, parallel, grow, expert (layers: the layer and the expert)
    layers: tuple

    def __str__(self):
        span = lambda ls: f"{ls[0]}-{ls[-1]}" if len(ls) > 1 else str(ls[0])
        if self.kind == "expert":
            return f"remove expert {self.layers[1]} of layer {self.layers[0]}"
        if self.kind == "parallel":
            return f"parallel {span(self.layers)}"
        if self.kind == "grow":
            return f"grow group to {span(self.layers)}"
        return f"remove {self.kind} {self.layers[0]}"

    def apply(self, d: Design, num_experts: int = 0) -> Design:
        (i, *_), ls = self.layers, self.layers
        if self.kind == "expert":
            kept = dict(d.experts).get(i, tuple(range(num_experts)))
            new = dict(d.experts) | {i: tuple(e for e in kept if e != ls[1])}
            return replace(d, experts=tuple(sorted(new.items())))
        if self.kind == "block":
            return replace(d, blocks=d.blocks | {i})
        if self.kind in ("attention", "mlp"):
            other = d.mlp if self.kind == "attention" else d.attention
            if i in other:  # both sublayers gone: a block (build_plan would say the same)
                return replace(d, blocks=d.blocks | {i})
            return replace(d, **{self.kind: getattr(d, self.kind) | {i}})
        keep = [g for g in d.groups if not set(g) & set(ls)]
        return replace(d, groups=tuple(sorted(keep + [tuple(ls)])))


def changes(d: Design, n: int, ops: list[str], max_group: int, weakest: dict | None = None,
            top_k: int = 0) -> list[Change]:
    """Every change of the kinds ``ops`` that the recipe rules allow on top of ``d``. ``weakest``: per
    mixture-of-experts layer, its experts from the lowest score up; a layer keeps at least ``top_k``."""
    grouped = d.grouped()
    alive = [i for i in range(n) if i not in d.blocks]
    out = []
    if "experts" in ops and weakest:
        pruned = dict(d.experts)
        for i in alive:
            if i in weakest and i not in d.mlp:
                kept = pruned.get(i, weakest[i])
                left = [e for e in weakest[i] if e in kept]
                if len(left) > top_k:
                    out.append(Change("expert", (i, left[0])))
    for i in alive:
        if "blocks" in ops and i not in grouped:
            out.append(Change("block", (i,)))
        for kind in ("attention", "mlp"):
            other = d.mlp if kind == "attention" else d.attention
            # Losing the other sublayer too is the block removal (listed above), and not allowed in a group.
            if kind in ops and i not in getattr(d, kind) and i not in other:
                out.append(Change(kind, (i,)))
    if "parallel" in ops:
        free = set(alive) - set(grouped)
        for k in range(2, max_group + 1):
            out += [Change("parallel", tuple(range(i, i + k))) for i in range(n) if set(range(i, i + k)) <= free]
        for g in d.groups:
            for j in (g[0] - 1, g[-1] + 1):
                if j in free and len(g) < max_group:
                    out.append(Change("grow", tuple(sorted(g + (j,)))))
    return out


def speed(c: dict, src: dict, metric: str, s: SearchSettings) -> float:
    """The plan's ideal speedup for ``metric`` (higher is better; for params the inverse of the fraction kept)."""
    return MEASURE[metric](src, s) / MEASURE[metric](c, s)


def gpu_decode_seconds(c: dict, s: SearchSettings) -> float:
    """Batch-1 GPU decode step: the bytes read at ``gpu_bandwidth`` plus ``layer_latency_us`` per sequential
    layer (and one more for the final norm and head). A parallel group is one wide layer: the same number
    of kernels as one layer, so it saves a layer's fixed time and none of the bytes."""
    return c["decode_bytes_per_token"] / s.gpu_bandwidth + (c["sequential_layers"] + 1) * s.layer_latency_us * 1e-6


# What each target metric measures of a plan's costs: a sum over layers (and the fixed embedding and head), whose
# ratio source / slim is the metric's speedup (mip.py's solver needs it additive).
MEASURE = {"decode": lambda c, s: c["decode_bytes_per_token"], "prefill": lambda c, s: c["prefill_flops_per_token"],
           "params": lambda c, s: c["params"], "layers": lambda c, s: c["sequential_layers"],
           "decode-gpu": gpu_decode_seconds}


def all_speeds(c: dict, src: dict, s: SearchSettings) -> dict:
    return {m: speed(c, src, m, s) for m in ("prefill", "decode", "decode-gpu", "params", "layers")}


def target_speed(target: Target, config: dict, s: SearchSettings) -> float:
    """The target as the number ``speed`` must reach."""
    if target.metric == "layers":
        return config["num_hidden_layers"] / target.value
    return 1 / target.value if target.metric == "params" else target.value


def best_reachable(config: dict, model: str, target: Target, ops: list[str], s: SearchSettings) -> tuple[float, str]:
    """The most ``ops`` can give for the target's metric, and the plan that gives it (a few extreme plans)."""
    n = config["num_hidden_layers"]
    src = costs(Design().plan(model, config), config, s.context, s.bytes_per_param)
    extremes = []
    if "blocks" in ops:
        extremes.append(("every block but one removed", Design(blocks=frozenset(range(1, n)))))
    if "attention" in ops or "mlp" in ops:
        extremes.append(("every " + " and ".join(o for o in ("attention", "mlp") if o in ops) + " sublayer removed "
                         "but one layer's", Design(attention=frozenset(range(1, n)) if "attention" in ops else frozenset(),
                                                   mlp=frozenset(range(1 if "attention" in ops else 0, n))
                                                   if "mlp" in ops else frozenset())))
    if "experts" in ops:
        from ..arch import get_arch

        arch = get_arch(config)
        top = tuple(range(arch.top_k))
        pruned = tuple((i, top) for i, sparse in enumerate(arch.sparse) if sparse)
        if pruned:
            extremes.append((f"every mixture-of-experts layer down to {arch.top_k} experts", Design(experts=pruned)))
    if "mlp_width" in ops or "kv_heads" in ops:
        from ..arch import kv_heads
        from .channels import width_of

        width = width_of(min(s.widths), config["intermediate_size"], 1, "--widths")
        extremes.append(("every layer at its narrowest", Design(
            channels=tuple((i, tuple(range(width))) for i in range(n)) if "mlp_width" in ops else (),
            kv=tuple((i, 1) for i in range(n)) if "kv_heads" in ops and kv_heads(config) > 1 else ())))
    if "parallel" in ops:
        k = s.max_group
        extremes.append((f"groups of {k} everywhere", Design(groups=tuple(tuple(range(i, min(i + k, n)))
                                                                         for i in range(0, n - 1, k) if min(i + k, n) - i > 1))))
    best = (1.0, "nothing")
    for what, d in extremes:
        try:
            v = speed(costs(d.plan(model, config), config, s.context, s.bytes_per_param), src, target.metric, s)
        except SlimError:
            continue
        best = max(best, (v, what))
    return best


def fmt_target(t: Target, v: float, config: dict) -> str:
    if t.metric == "params":
        return f"{1 / v:.3f} of the parameters"
    if t.metric == "layers":
        return f"{config['num_hidden_layers'] / v:.0f} layers"
    return f"{v:.3f}x"


def diff(old: list, new: list) -> tuple[int, int, list]:
    """(pos, span, replacement): ``new`` is ``old`` with ``old[pos:pos + span]`` replaced."""
    p = 0
    while p < min(len(old), len(new)) and old[p] == new[p]:
        p += 1
    q = 0
    while q < min(len(old), len(new)) - p and old[-1 - q] == new[-1 - q]:
        q += 1
    return p, len(old) - p - q, new[p:len(new) - q]


@dataclass
class Step:
    change: str
    sections: dict
    speeds: dict
    nll: float
    kl: float
    candidates: int
    scored_full: int
    seconds: float


FEW_TOKENS = 2048  # the default 8 x 256; below it the 1.30x measurement (docs/results/search.md) saw choices overfit


def print_search_plan(s: SearchSettings, config: dict, target: Target, reach: tuple, n_changes: int, tokens: int,
                      halving: Halving | None):
    from ..report import console

    n = config["num_hidden_layers"]
    console.print(f"search on {s.model}: {n} layers, target {target} ({METRICS[target.metric]}); "
                  f"the most --ops {','.join(s.ops)} can give: {fmt_target(target, reach[0], config)} ({reach[1]})")
    console.print(f"  calibration {s.calib} (valid) {s.samples} x {s.seq_len} = {tokens} tokens, seed {s.seed}; "
                  f"cost model at {s.context} tokens of context")
    if tokens < FEW_TOKENS:
        console.print(f"  [yellow]warning:[/] {tokens} calibration tokens are few for a search, which picks among "
                      "many candidates at every step and so fits what it is shown: on SmolLM2 a 1.30x search on "
                      "512 tokens ranked its recipe above SLEB's that 4096 tokens (and the test split) rank below "
                      "it (docs/results/search.md); give --samples 16 --seq-len 256 when the result matters")
    console.print(f"  step 1: {n_changes} candidate changes that gain {target.metric} (of blocks, sublayers, groups of "
                  f"2..{s.max_group}, grown groups, as --ops allow); each step keeps the lowest loss increase per unit "
                  "of speedup still missing")
    how = ("every candidate on every window (--exact)" if halving is None else
           f"successive halving: all on {halving.rounds(s.samples)[0]} window(s), then the best "
           f"{halving.keep:.0%} on {', '.join(map(str, halving.rounds(s.samples)[1:]))}; later steps let the best "
           f"{halving.prior_keep:.0%} of the previous step's ranking into the first round")
    console.print(f"  {how}")


def estimate(runner: Runner, stack: list, n_changes: int, halving: Halving | None, config: dict, target: Target,
             s: SearchSettings, src_costs: dict) -> dict:
    """Times one layer and the LM head on the calibration windows (each once warm: the first call of a layer
    builds it from the checkpoint); from them, step 1's time."""
    x = runner.embed()
    y = runner.apply(stack[0], x)
    runner.subset(slice(0, 1)).nll(y[:1])
    t = time.perf_counter()
    runner.apply(stack[0], x)
    layer_s = time.perf_counter() - t
    t = time.perf_counter()
    runner.nll(y)
    head_s = time.perf_counter() - t
    per_cand = (len(stack) / 2) * layer_s + head_s
    if halving is None:
        step = n_changes * per_cand + len(stack) * layer_s
    else:
        step, alive, done = 0.0, n_changes, 0
        for r, upto in enumerate(halving.rounds(s.samples)):
            step += (upto - done) / s.samples * (alive * per_cand + len(stack) * layer_s)
            done, alive = upto, max(halving.min_keep, math.ceil(alive * halving.keep))
    one = Change("block", (config["num_hidden_layers"] // 2,)).apply(Design())
    gain = speed(costs(one.plan(s.model, config), config, s.context, s.bytes_per_param), src_costs, target.metric, s) - 1
    steps = max(1, math.ceil((target_speed(target, config, s) - 1) / gain)) if gain > 0 else 1
    return dict(layer_s=layer_s, head_s=head_s, step_s=step, steps=steps)


MIN_GAIN = 1e-4  # below this a change gains nothing that matters (a group's folded norm saves a few params)


def efficiency(dloss: float, gain: float) -> float:
    """The step's ranking (lower is better): loss increase per unit of speedup; a change that lowers the loss
    ranks before every change that raises it, the more so the more it gains."""
    return dloss / gain if dloss >= 0 else dloss * gain


def step_candidates(design: Design, plan: Plan, cur: float, goal: float, config: dict, src_costs: dict,
                    target: Target, s: SearchSettings, weakest: dict | None = None, top_k: int = 0,
                    num_experts: int = 0) -> tuple[list[Change], list, list[float]]:
    """The changes worth scoring on top of ``design``: valid, gaining speed for the target, one per distinct
    plan; with their (pos, span, replacement) against ``plan`` and their gain capped at what is missing."""
    cands, specs, gains, seen_plans = [], [], [], set()
    for ch in changes(design, config["num_hidden_layers"], s.ops, s.max_group, weakest, top_k):
        try:
            p = ch.apply(design, num_experts).plan(s.model, config, s.norm)
        except SlimError:
            continue
        key = json.dumps([l.model_dump() for l in p.layers])
        g = speed(costs(p, config, s.context, s.bytes_per_param), src_costs, target.metric, s) - cur
        if g < MIN_GAIN or key in seen_plans:
            continue
        seen_plans.add(key)
        cands.append(ch)
        specs.append(diff(plan.layers, p.layers))
        gains.append(min(g, goal - cur))
    return cands, specs, gains


def _expert_order(runner: Runner, config: dict, s: SearchSettings) -> tuple[dict | None, int, int]:
    """(per mixture-of-experts layer its experts from the lowest score up, top-k, expert count), scored once on
    the calibration set; (None, 0, 0) for a dense model or without the experts op."""
    from ..arch import get_arch
    from .experts import score_layers

    arch = get_arch(config)
    sparse = {i for i, sp in enumerate(arch.sparse) if sp}
    if "experts" not in s.ops or not sparse:
        return None, 0, 0
    scores = score_layers(runner, config, sparse)
    order = {i: sorted(range(arch.num_experts), key=lambda e: scores[i]["routed_norm"][e]) for i in sparse}
    return order, arch.top_k, arch.num_experts


def search(s: SearchSettings, src_dir: Path, ids: torch.Tensor | None = None, quiet: bool = False) -> dict:
    """Runs the greedy search; returns everything search.json holds."""
    from tqdm import tqdm

    from ..data import calibration_ids
    from ..source import Checkpoint

    ckpt = Checkpoint(src_dir)
    config = ckpt.config
    n = config["num_hidden_layers"]
    target, reach = validate_inputs(s, config)
    goal = target_speed(target, config, s)
    if ids is None:
        ids = calibration_ids(src_dir, s.calib, s.samples, s.seq_len, s.seed)
    halving = None if s.exact else Halving()
    design = Design()
    plan = design.plan(s.model, config, s.norm)
    src_costs = costs(plan, config, s.context, s.bytes_per_param)
    bank = LayerBank(ckpt, s.norm, s.max_memory, s.device)
    runner = Runner(bank, ids, s.batch_size)
    src_speed = speed(src_costs, src_costs, target.metric, s)
    moe = _expert_order(runner, config, s)
    first = step_candidates(design, plan, src_speed, goal, config, src_costs, target, s, *moe)[0]
    if not quiet:
        print_search_plan(s, config, target, reach, len(first), ids.numel(), halving)
    est = estimate(runner, plan.layers, len(first), halving, config, target, s, src_costs)
    if not quiet:
        from ..report import console

        console.print(f"  expected: about {est['step_s']:.0f} s for step 1 (one layer {est['layer_s'] * 1e3:.0f} ms, "
                      f"LM head {est['head_s'] * 1e3:.0f} ms on all windows), at least {est['steps']} step(s)")
    start = time.perf_counter()
    ref = final_hidden(runner, plan.layers)
    per_window = runner.window_nlls(ref)
    nll = sum(per_window) / len(per_window)
    cur = src_speed
    path = [Step("source", {}, all_speeds(src_costs, src_costs, s), nll, 0.0, 0, 0, 0.0)]
    prior: dict[Change, float] = {}
    while cur < goal - 1e-9:
        t0 = time.perf_counter()
        cands, specs, gains = step_candidates(design, plan, cur, goal, config, src_costs, target, s, *moe)
        if not cands:
            break
        # Against the current plan's loss on the same windows: a partial score is compared like with like.
        score = lambda i, v, w: efficiency(v - sum(per_window[:w]) / w, gains[i])
        with tqdm(total=None if halving else len(cands), desc=f"search step {len(path)}", unit="candidate",
                  disable=None if not quiet else True) as bar:
            nlls, seen = ranked_nlls(runner, plan.layers, specs, score=score, halving=halving,
                                     prior=[prior.get(c) for c in cands] if prior else None, progress=bar)
        full = [i for i in range(len(cands)) if seen[i] == runner.windows]
        best = min(full, key=lambda i: score(i, nlls[i], runner.windows))
        prior = {c: score(i, v, w) for i, (c, v, w) in enumerate(zip(cands, nlls, seen)) if v is not None}
        design = cands[best].apply(design, moe[2])
        plan = design.plan(s.model, config, s.norm)
        c = costs(plan, config, s.context, s.bytes_per_param)
        cur = speed(c, src_costs, target.metric, s)
        nll = nlls[best]
        h = final_hidden(runner, plan.layers)
        kl = kl_divergence(runner, ref, h)
        per_window = runner.window_nlls(h)
        path.append(Step(str(cands[best]), design.sections(), all_speeds(c, src_costs, s), nll, kl, len(cands),
                         len(full), time.perf_counter() - t0))
        if not quiet:
            from ..report import console

            console.print(f"  step {len(path) - 1}: {cands[best]} -> {target.metric} "
                          f"{fmt_target(target, cur, config)}, calibration ppl {ppl(nll):.2f}, KL {kl:.4f} "
                          f"({len(cands)} candidates, {len(full)} on every window, {path[-1].seconds:.0f} s)")
    reached = cur >= goal - 1e-9
    return dict(settings=s.model_dump(), source_dir=str(src_dir), num_layers=n, target=str(target),
                goal=goal, reached=reached, calibration_tokens=ids.numel(), reachable=reach[0],
                seconds=time.perf_counter() - start, estimate=est, design=design.sections(),
                path=[vars(p) for p in path], plan=plan.model_dump())


def path_rows(m: dict) -> list[list]:
    rows = []
    for k, p in enumerate(m["path"]):
        sp = p["speeds"]
        rows.append([k, p["change"], f"{sp['prefill']:.3f}x", f"{sp['decode']:.3f}x", f"{sp['decode-gpu']:.3f}x",
                     f"{1 / sp['params']:.3f}", f"{m['num_layers'] / sp['layers']:.0f}", f"{ppl(p['nll']):.2f}",
                     f"{p['kl']:.4f}", p["candidates"] or "-", f"{p['seconds']:.1f}"])
    return rows


PATH_HEADER = ["step", "change added", "prefill (ideal)", "decode (ideal)", "decode-gpu (ideal)", "params kept",
               "layers", "calibration ppl", "calibration KL", "candidates", "seconds"]


def method_text(m: dict) -> str:
    """One line saying how the search chose (for the report and the recipe's header)."""
    s = m["settings"]
    if s.get("method") == "mip":
        mip = m["mip"]
        return (f"mip search over {', '.join(s['ops'])}: {mip['alternatives']} per-layer alternatives, each scored "
                "alone on every window; one per layer chosen by an exact mixed-integer program (HiGHS) minimising the "
                "summed calibration loss increase under the target")
    return (f"greedy search over {', '.join(s['ops'])} "
            f"({'every candidate on every window' if s['exact'] else 'successive halving over the windows'}): each "
            "step adds the change with the lowest calibration loss increase per unit of ideal speedup")


def report_markdown(m: dict, recipe_text: str, verify: dict | None) -> str:
    from ..report import md_table

    s = m["settings"]
    parts = [f"# Search on {s['model']}: target {m['target']}",
             f"{method_text(m)}; calibration {s['calib']} valid, {s['samples']} x {s['seq_len']} tokens (seed {s['seed']}); "
             f"{len(m['path']) - 1} steps in {m['seconds']:.0f} s; target {'reached' if m['reached'] else 'NOT reached'}.",
             "## Path", md_table(PATH_HEADER, path_rows(m)),
             "Speedups are the plan's ideal ones: FLOPs per token for prefill, bytes read per token for decode, "
             f"and for decode-gpu bytes / {s['gpu_bandwidth']:.2g} B/s + {s['layer_latency_us']:g} us per sequential "
             "layer. KL is KL(source || slim) of the next-token distributions on the calibration windows.",
             "## Recipe", "```yaml\n" + recipe_text + "```", "![pareto](pareto.png)"]
    if "mip" in m:
        mip = m["mip"]
        rows = [[c["layer"], c["alternative"], f"{c['dloss']:+.4f}", f"{c['dcost']:+.4g}"]
                for c in sorted(mip["chosen"], key=lambda c: c["layer"])]
        parts[4:4] = ["## Chosen alternatives",
                      f"Calibration loss {mip['joint_nll']:.4f} nats/token jointly; the sum of the lone increases "
                      f"estimated {mip['estimated_nll']:.4f}. Every alternative scored is in search.json (`mip`).",
                      md_table(["layer", "alternative", "loss change alone", f"{m['target'].split(':')[0]} measure change"],
                               rows)]
    if verify:
        parts += ["## Held-out check (WikiText-2 test)",
                  f"perplexity {verify['ppl_slim']:.2f} (source {verify['ppl_source']:.2f}), KL {verify['kl']:.4f}, "
                  f"top-1 agreement {verify['top1']:.3f}"]
    return "\n\n".join(parts) + "\n"


def plot(m: dict, out: Path, metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(p["speeds"][metric], p["kl"], p["change"]) for p in m["path"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-")
    for k, (x, y, label) in enumerate(pts[1:], 1):
        ax.annotate(f"{k}: {label}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.axvline(m["goal"], color="gray", ls="--", label="target")
    ax.set(xlabel=f"ideal {metric} speedup" if metric not in ("params", "layers") else f"{metric} (source / slim)",
           ylabel="calibration KL (nats/token)", title="search path: speedup vs calibration KL")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=110)
    plt.close(fig)


def recipe_text(m: dict, command: str, output_dir: str) -> tuple[str, dict]:
    s = m["settings"]
    last = m["path"][-1]
    target = m["target"]
    what = last["change"].removeprefix("mip: ") if "mip" in m else f"{len(m['path']) - 1} changes"
    data = {"model": s["model"],
            "description": f"slimconv search for {target}: {what}, calibration ppl "
                           f"{ppl(m['path'][0]['nll']):.2f} -> {ppl(last['nll']):.2f}",
            **m["design"], "output": {"dir": output_dir}}
    if "parallel" in data:
        data["parallel"] = {**data["parallel"], "norm": s["norm"]}
    parse_recipe(json.loads(json.dumps(data)), "the searched recipe")  # what convert will read must be valid
    header = [f"# Written by `{command}`",
              f"# method: {method_text(m)} ({METRICS[target.split(':')[0]]})",
              f"# reached: {', '.join(f'{k} {v:.3f}x' for k, v in last['speeds'].items())}; calibration KL "
              f"{last['kl']:.4f}",
              "# path: " + "; ".join(p["change"] for p in m["path"][1:]),
              f"# calibration: {s['calib']} valid, {s['samples']} x {s['seq_len']} tokens, seed {s['seed']}"
              + ("" if not s["exact"] else ", every candidate on every window")]
    return "\n".join(header) + "\n" + yaml.safe_dump(data, sort_keys=False, default_flow_style=None), data


def validate_inputs(s: SearchSettings, config: dict) -> tuple[Target, tuple[float, str]]:
    """The checks that need only the config: exit 2 before any slow work."""
    target = parse_target(s.target, config)
    reach = best_reachable(config, s.model, target, s.ops, s)
    if reach[0] < target_speed(target, config, s) - 1e-9:
        raise SlimError(f"--target {target} is unreachable with --ops {','.join(s.ops)}: the most they can give is "
                        f"{fmt_target(target, reach[0], config)} ({reach[1]})",
                        "ask for less, or allow more kinds of change with --ops")
    return target, reach


def run_search(s: SearchSettings, out: Path, force: bool = False, verify: bool = False, command: str = "slimconv search",
               eval_samples: int = 16, eval_seq_len: int = 512, method=None) -> dict:
    """Runs ``method`` (default: the greedy ``search``; ``mip.mip_search`` for --method mip) and writes its folder."""
    from ..data import calibration_ids
    from ..outdir import AtomicDir, refuse_overlap
    from ..report import console
    from ..source import checked_source, resolve_source, source_paths

    from .. import distributed

    refuse_overlap(out, source_paths(s.model), "-o")
    # Under torchrun every rank scores its share of the windows; rank 0 alone writes the folder.
    world = distributed.current()
    distributed.join(world)
    if world and not world.main:
        console.quiet = True
    target = AtomicDir(Path(out), force, "-o") if world is None or world.main else None
    src_dir = resolve_source(s.model, s.allow_pickle)
    refuse_overlap(out, source_paths(s.model, src_dir), "-o")
    validate_inputs(s, checked_source(src_dir)[0].config)
    ids = calibration_ids(src_dir, s.calib, s.samples, s.seq_len, s.seed)
    m = (method or search)(s, src_dir, ids)
    m["ranks"] = world.size if world else 1  # the calibration windows were split over this many processes
    if not m["reached"]:
        raise SlimError(f"the search stopped before reaching {m['target']}: no valid change is left",
                        "ask for less, or allow more kinds of change with --ops")
    text, data = recipe_text(m, command, f"outputs/{Path(out).name}")
    v = None
    if target is None:  # another rank: rank 0 writes what every rank computed alike
        return m
    with target as tmp:
        (tmp / "recipe.yaml").write_text(text)
        if verify:
            from .analyse import verify_recipe

            v = verify_recipe(tmp / "recipe.yaml", eval_samples, eval_seq_len)
            m["verify"] = dict(v, samples=eval_samples, seq_len=eval_seq_len, data="wikitext2 test")
        (tmp / "search.json").write_text(json.dumps(m, indent=2))
        plot(m, tmp, m["target"].split(":")[0])
        (tmp / "report.md").write_text(report_markdown(m, text, v))
    from rich import box
    from rich.table import Table

    table = Table("step", "change", "prefill", "decode", "decode-gpu", "layers", "ppl", "KL", box=box.SIMPLE,
                  title=f"search path to {m['target']}: ideal speedups, calibration ppl and KL (all: report.md)")
    for row in path_rows(m):
        table.add_row(*map(str, row[:5] + row[6:9]))
    console.print(table)
    console.print(f"[green]wrote[/] {target.target}: recipe.yaml, report.md, search.json, pareto.png "
                  f"({len(m['path']) - 1} steps, {m['seconds']:.0f} s)")
    return m
