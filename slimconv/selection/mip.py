"""Search by an exact solver over per-layer alternatives: NVIDIA Puzzle's search on slimconv's layer-by-layer engine.

1. A library of alternatives for every source layer, as ``--ops`` allow: kept; attention removed; MLP removed;
   MLP narrowed to each ``--widths`` fraction (its channels by Minitron's activation rule, ``channels``, on the
   calibration text); fewer KV heads (each divisor of the source's count below it, merged by mean pooling); the
   block removed.
2. Each alternative is scored alone: the calibration loss of the source with only that layer replaced, exactly as
   the converted checkpoint computes it (``layerwise.candidate_nlls``: a layer's alternatives share the hidden
   states before it, computed once).
3. One alternative per layer is chosen by a mixed-integer program (``scipy.optimize.milp``, HiGHS): minimise the
   summed loss increase subject to the target. Every target metric is S / V with V additive over layers (bytes
   read per token, FLOPs, parameters, sequential layers, the decode-gpu time), so the constraint is linear and
   exact: sum of the alternatives' V changes <= V_source / target - V_source.
4. The chosen combination is scored jointly (calibration loss and KL), which the sum of lone increases only
   estimates: both are reported.
"""
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ..arch import get_arch, kv_heads
from ..errors import SlimError
from ..plan import costs
from .channels import score_layers, width_of
from .experts import COUNT_CALIBRATION
from .layerwise import LayerBank, Runner, final_hidden, kl_divergence, ppl, ranked_nlls
from .search import MEASURE, Design, Step, all_speeds, diff, speed, target_speed, validate_inputs


def alternatives(config: dict, s, order: dict[int, list[int]]) -> list[tuple[int, str, Design]]:
    """(layer, name, the design with only that alternative) for every layer and every alternative but keep.
    ``order``: per dense layer its MLP channels, highest score first."""
    arch, n = get_arch(config), config["num_hidden_layers"]
    kv, width = kv_heads(config), config["intermediate_size"]
    fewer = [k for k in range(1, kv) if kv % k == 0] if "kv_heads" in s.ops and arch.qk_norm != "full" else []
    out = []
    for i in range(n):
        if "attention" in s.ops:
            out.append((i, "attention removed", Design(attention=frozenset({i}))))
        if "mlp" in s.ops:
            out.append((i, "MLP removed", Design(mlp=frozenset({i}))))
        if "blocks" in s.ops:
            out.append((i, "block removed", Design(blocks=frozenset({i}))))
        if "mlp_width" in s.ops and i in order:
            for f in sorted(set(s.widths), reverse=True):
                kept = tuple(sorted(order[i][:width_of(f, width, 1, "--widths")]))
                out.append((i, f"MLP at {f:.0%}", Design(channels=((i, kept),))))
        for k in fewer:
            out.append((i, f"{k} KV head{'s' if k > 1 else ''}", Design(kv=((i, k),))))
    return out


def combine(chosen: list[Design]) -> Design:
    """The designs of one alternative per layer as one design."""
    d = Design()
    for c in chosen:
        d = replace(d, blocks=d.blocks | c.blocks, attention=d.attention | c.attention, mlp=d.mlp | c.mlp,
                    channels=tuple(sorted(d.channels + c.channels)), kv=tuple(sorted(d.kv + c.kv)))
    return d


def solve(layers: list[int], dloss: list[float], dcost: list[float], budget: float, n: int) -> list[int]:
    """Indices of the alternatives chosen (at most one per layer; a layer with none chosen is kept) minimising the
    summed ``dloss`` with the summed ``dcost`` at most ``budget``; a SlimError when no choice meets it."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    m = len(dloss)
    per_layer = np.zeros((n, m))
    per_layer[layers, np.arange(m)] = 1
    res = milp(np.array(dloss), integrality=np.ones(m), bounds=Bounds(0, 1),
               constraints=[LinearConstraint(per_layer, 0, 1), LinearConstraint(np.array([dcost]), -np.inf, budget)])
    if res.x is None:
        raise SlimError(f"the solver found no set of alternatives that reaches the target ({res.message})",
                        "ask for less, or allow more kinds of change with --ops")
    return [j for j in range(m) if res.x[j] > 0.5]


def same_calibration(s, src_dir: Path, ids: torch.Tensor, device: str) -> bool:
    """Whether convert, resolving a fraction, scores channels on exactly these windows (and on this device)."""
    if not device.startswith("cpu") or any(getattr(s, k) != v for k, v in COUNT_CALIBRATION.items()):
        return False
    from ..data import calibration_ids

    c = COUNT_CALIBRATION
    try:
        theirs = calibration_ids(src_dir, c["calib"], c["samples"], c["seq_len"], c["seed"])
    except SlimError:  # no tokenizer: the windows were given, and convert could not make its own
        return False
    return torch.equal(ids.cpu(), theirs)


def readable(design: dict, s, config: dict, same: bool) -> dict:
    """The design's sections with each narrowed MLP written as its fraction where convert resolves that fraction to
    the same channels (``same``: ``same_calibration``), else as the channel list."""
    mlp = (design.get("shrink") or {}).get("mlp")
    if not same or not mlp:
        return design
    width = config["intermediate_size"]
    by_count = {width_of(f, width, 1, "--widths"): f for f in s.widths}
    shrink = dict(design["shrink"], mlp={k: by_count.get(len(v), v) for k, v in mlp.items()})
    return dict(design, shrink=shrink)


def mip_search(s, src_dir: Path, ids: torch.Tensor, quiet: bool = False) -> dict:
    """Runs the search (see the module docstring); returns what search.json holds, as the greedy search does."""
    from tqdm import tqdm

    from ..report import console
    from ..source import Checkpoint

    ckpt = Checkpoint(src_dir)
    config = ckpt.config
    n = config["num_hidden_layers"]
    target, reach = validate_inputs(s, config)
    goal = target_speed(target, config, s)
    measure = MEASURE[target.metric]
    start = time.perf_counter()
    source = Design().plan(s.model, config, s.norm)
    src_costs = costs(source, config, s.context, s.bytes_per_param)
    bank = LayerBank(ckpt, s.norm, s.max_memory, s.device)
    runner = Runner(bank, ids, s.batch_size)
    arch = get_arch(config)
    dense = {i for i in range(n) if not arch.sparse[i]}
    order = {}
    if "mlp_width" in s.ops and dense:
        scores = score_layers(runner, config, dense)
        order = {i: sorted(range(len(v)), key=lambda c: -v[c]) for i, v in scores.items()}
    library, specs, dcost = [], [], []
    v_src = measure(src_costs, s)
    for layer, name, d in alternatives(config, s, order):
        try:
            plan = d.plan(s.model, config, s.norm)
        except SlimError:  # not valid on this family (a mixture-of-experts MLP narrowed, OLMo 2's KV heads)
            continue
        library.append((layer, name, d))
        specs.append(diff(source.layers, plan.layers))
        dcost.append(measure(costs(plan, config, s.context, s.bytes_per_param), s) - v_src)
    if not quiet:
        kinds = sorted({"MLP narrowed" if " at " in name else name.lstrip("0123456789 ") for _, name, _ in library})
        console.print(f"mip search on {s.model}: {n} layers, target {target}; {len(library)} alternatives "
                      f"({', '.join(kinds)}), each scored alone on {ids.shape[0]} x {ids.shape[1]} calibration tokens, "
                      "then one per layer chosen by HiGHS (scipy.optimize.milp)")
    ref = final_hidden(runner, source.layers)
    nll_src = runner.nll(ref)
    with tqdm(total=len(library), desc="mip: scoring alternatives", unit="alternative",
              disable=None if not quiet else True) as bar:
        nlls, _ = ranked_nlls(runner, source.layers, specs, progress=bar)
    scored = time.perf_counter() - start
    dloss = [v - nll_src for v in nlls]
    budget = v_src / goal - v_src
    chosen = solve([l for l, _, _ in library], dloss, dcost, budget, n)
    design = combine([library[j][2] for j in chosen])
    plan = design.plan(s.model, config, s.norm)
    c = costs(plan, config, s.context, s.bytes_per_param)
    h = final_hidden(runner, plan.layers)
    nll, kl = runner.nll(h), kl_divergence(runner, ref, h)
    estimate = nll_src + sum(dloss[j] for j in chosen)
    seconds = time.perf_counter() - start
    changes = "; ".join(f"{library[j][0]}: {library[j][1]}" for j in sorted(chosen, key=lambda j: library[j][0]))
    path = [Step("source", {}, all_speeds(src_costs, src_costs, s), nll_src, 0.0, 0, 0, 0.0),
            Step(f"mip: {len(chosen)} layers changed", design.sections(), all_speeds(c, src_costs, s), nll, kl, len(library),
                 len(library), seconds)]
    got = speed(c, src_costs, target.metric, s)
    if not quiet:
        console.print(f"  chosen ({len(chosen)} layers changed): {changes}")
        console.print(f"  {target.metric} {got:.3f}x; calibration ppl {ppl(nll):.2f} jointly (the sum of lone "
                      f"increases estimated {ppl(estimate):.2f}), KL {kl:.4f}; {scored:.0f} s scoring, "
                      f"{seconds:.0f} s in all")
    library_rows = [dict(layer=l, alternative=name, dloss=dl, dcost=dc) for (l, name, _), dl, dc
                    in zip(library, dloss, dcost)]
    return dict(settings=s.model_dump(), source_dir=str(src_dir), num_layers=n, target=str(target), goal=goal,
                reached=got >= goal - 1e-9, calibration_tokens=ids.numel(), reachable=reach[0], seconds=seconds,
                estimate=dict(scoring_s=scored), design=readable(design.sections(), s, config, same_calibration(s, src_dir, ids, str(bank.device))),
                path=[vars(p) for p in path], plan=plan.model_dump(),
                mip=dict(alternatives=len(library), chosen=[library_rows[j] for j in chosen], estimated_nll=estimate,
                         joint_nll=nll, library=library_rows))
