"""Layer importance from one calibration set: the papers' selection metrics, written as a folder a
person reads (metrics.json, report.md, plots) and `slimconv recipe` turns into a recipe.

- block influence (ShortGPT): 1 - cos(block input, block output), mean over tokens
- sublayer importance (He et al.; Tyukin et al.): the same across the attention and the MLP sublayer
- angular distance (Gromov et al.): arccos(cos(input of l, input of l+n)) / pi, for n = 1..max_window
- layer-parallel groups: relative error of parallel vs sequential evaluation, and calibration perplexity
- SLEB: iteratively remove the block whose removal raises calibration perplexity least

Everything runs layer by layer (``layerwise``), so the model never has to fit in memory.
"""
import json
import math
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..data import calibration_ids
from ..errors import SlimError
from .channels import channel_scores
from .experts import expert_scores
from .layerwise import Halving, LayerBank, Runner, candidate_nlls, group_spec, ppl, ranked_nlls
from ..plan import groupable, source_plan
from .settings import AnalysisSettings

PAPER_DEFAULTS = "SLEB and ShortGPT calibrate on 128 samples of 2048 tokens; Gromov et al. use the last token"


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.flatten(0, -2), b.flatten(0, -2), dim=-1)


@torch.no_grad()
def layer_metrics(runner: Runner, config: dict, s: AnalysisSettings) -> dict:
    """One pass through the source layers: block/sublayer similarity, boundary states for the angular
    distances, and the parallel-vs-sequential error of every group of the chosen sizes."""
    specs = source_plan(config).layers
    n = len(specs)
    x = runner.embed()
    g = torch.Generator().manual_seed(s.seed)
    take = torch.randperm(x.shape[0] * x.shape[1], generator=g)[: s.angular_tokens].to(x.device)
    states = [x.flatten(0, 1)[take]]
    bi, attn, mlp, pending, groups, experts, channels = [], [], [], {}, [], {}, {}
    for i, spec in enumerate(tqdm(specs, desc="layer metrics", unit="layer", disable=None)):
        for k in s.group_sizes:
            if i + k <= n and groupable(runner.bank.arch, range(i, i + k)):
                pending[(i, k)] = (x, runner.apply(group_spec(config, list(range(i, i + k))), x))
        mid, out = runner.sublayers(spec, x)
        if spec.mlp and spec.mlp.experts is not None:
            experts[str(i)] = expert_scores(runner, spec, mid)
        elif spec.mlp:
            channels[str(i)] = channel_scores(runner, spec, mid)
        bi.append(1 - _cos(x, out).mean().item())
        attn.append(1 - _cos(x, mid).mean().item())
        mlp.append(1 - _cos(mid, out).mean().item())
        x = out
        for (j, k) in [key for key in pending if sum(key) == i + 1]:
            start, parallel = pending.pop((j, k))
            groups.append(dict(layers=list(range(j, j + k)),
                               rel_error=((parallel - x).norm() / (x - start).norm()).item()))
        states.append(x.flatten(0, 1)[take])
    unit = F.normalize(torch.stack(states), dim=-1)
    windows = list(range(1, min(s.max_window or n // 2, n) + 1))
    matrix = [[(torch.arccos((unit[l] * unit[l + w]).sum(-1).clamp(-1, 1)) / torch.pi).mean().item()
               for l in range(n - w + 1)] for w in windows]
    best = {str(w): int(min(range(len(row)), key=row.__getitem__)) for w, row in zip(windows, matrix)}
    metrics = dict(block_influence=bi, attention_importance=attn, mlp_importance=mlp, parallel_groups=groups,
                   angular_distance=dict(windows=windows, matrix=matrix, best_start=best),
                   calibration_ppl=ppl(runner.nll(x)))
    if experts:  # mixture-of-experts layers: selection/experts.py's scores, for remove.experts
        metrics["experts"] = experts
    if channels:  # dense MLPs: selection/channels.py's scores, for shrink.mlp
        metrics["channels"] = channels
    return metrics


def group_ppls(runner: Runner, config: dict, groups: list[dict]) -> None:
    """Adds each group's calibration perplexity (that group alone made parallel) to its entry."""
    stack = source_plan(config).layers
    cands = [(g["layers"][0], len(g["layers"]), [group_spec(config, g["layers"])]) for g in groups]
    with tqdm(total=len(cands), desc="parallel groups: perplexity", unit="group", disable=None) as bar:
        nlls = candidate_nlls(runner, stack, cands, progress=bar)
    for g, v in zip(groups, nlls):
        g["ppl"] = ppl(v)


# SLEB's successive halving (opt-in): every candidate on a quarter of the windows but at most 512 tokens,
# then the best third, at least 4, on twice as many windows, and so on. Replayed on exact traces of
# SmolLM2's SLEB (benchmarks/sleb_windows.py) it keeps all 9 of the exact loop's choices at 8 x 256 and at
# 32 x 256 calibration tokens; keeping at least 3, or a first round of 256 tokens, does not at 32 x 256.
SLEB_FIRST_TOKENS, SLEB_MIN_KEEP = 512, 4


def sleb_halving(windows: int, seq_len: int) -> Halving:
    first = max(1, min(math.ceil(windows / 4), SLEB_FIRST_TOKENS // seq_len))
    return Halving(first=first / windows, keep=1 / 3, min_keep=SLEB_MIN_KEEP)


def sleb(runner: Runner, config: dict, blocks: int, prefix_cache: bool = True, halving: bool = False,
         label: str = "SLEB") -> list[dict]:
    """SLEB's iterative elimination: at every step try removing each remaining block, keep the removal with
    the lowest calibration perplexity, and verify the rest again against the model without it.

    ``prefix_cache=False`` is the naive loop (every candidate runs the whole model on every window).
    Otherwise candidates share the hidden states before them (exact: the naive loop's choices). With
    ``halving`` they are also ranked by successive halving over the windows (``sleb_halving``), and the
    block removed is the best of those scored on every window: less work, and not guaranteed to make the
    same choices. Unlike the search, SLEB does not let the previous step's ranking cut the first round:
    on SmolLM2 with 8 x 256 calibration tokens that cut changed the choice at step 2, while halving alone
    made the naive loop's 9 choices (docs/results/analysis.md, "SLEB, faster").
    A candidate's entry in ``candidates`` is its perplexity on the ``windows`` it was scored on.
    """
    stack = list(source_plan(config).layers)
    steps = []
    halving = sleb_halving(*runner.ids.shape) if halving and prefix_cache else None
    for step in range(blocks):
        cands = [(p, 1, []) for p in range(len(stack))]
        layers = [spec.source_layers[0] for spec in stack]
        start = time.perf_counter()
        with tqdm(total=None if halving else len(cands), desc=f"{label} step {step + 1}/{blocks}", unit="candidate",
                  disable=None) as bar:
            if prefix_cache:
                nlls, seen = ranked_nlls(runner, stack, cands, halving=halving, progress=bar)
            else:
                nlls = candidate_nlls(runner, stack, cands, prefix_cache=False, progress=bar)
                seen = [runner.windows] * len(cands)
        full = [i for i in range(len(cands)) if seen[i] == runner.windows]
        best = min(full, key=nlls.__getitem__)
        steps.append(dict(removed=layers[best], ppl=ppl(nlls[best]),
                          candidates={str(l): ppl(v) for l, v in zip(layers, nlls) if v is not None},
                          windows={str(l): w for l, w in zip(layers, seen) if w},
                          seconds=time.perf_counter() - start))
        del stack[best]
    return steps


def _print_plan(s: AnalysisSettings, config: dict, tokens: int):
    from ..report import console

    n = config["num_hidden_layers"]
    console.print(f"analysis of {s.model}: {n} layers, calibration {s.calib} (valid) {s.samples} x {s.seq_len} = "
                  f"{tokens} tokens, seed {s.seed}")
    console.print(f"  1. one pass through the layers: block influence, attention/MLP importance, angular distance "
                  f"(n = 1..{min(s.max_window or n // 2, n)}), parallel groups of size {', '.join(map(str, s.group_sizes))}")
    if s.group_ppl:
        console.print(f"  2. calibration perplexity with each group parallel "
                      f"({sum(max(n - k + 1, 0) for k in s.group_sizes)} candidates)")
    if s.sleb_blocks:
        rounds = sleb_halving(s.samples, s.seq_len).rounds(s.samples)
        how = ("every candidate on every window" if not s.sleb_halving or s.samples == 1 else
               f"successive halving over the windows ({', '.join(map(str, rounds))} of {s.samples})")
        console.print(f"  3. SLEB: {s.sleb_blocks} removals, up to {sum(n - i for i in range(s.sleb_blocks))} candidate "
                      f"evaluations, each reusing the hidden states before the candidate; {how}")
    if s.naive_check:
        console.print(f"  4. the first {s.naive_check} SLEB step(s) again without that cache, to time and check it")
    console.print(f"  layers kept in memory: {'all' if s.max_memory is None else f'up to {s.max_memory / 1e6:.0f} MB'}"
                  f"; {PAPER_DEFAULTS} (--samples 128 --seq-len 2048)")


def analyse(s: AnalysisSettings, src_dir: Path, ids: torch.Tensor | None = None) -> dict:
    """Runs every phase the settings ask for; ``ids`` (samples x seq_len token ids) replaces the calibration text."""
    from ..source import checked_source

    ckpt, _ = checked_source(src_dir)
    config = ckpt.config
    if s.sleb_blocks is None:
        s = s.model_copy(update=dict(sleb_blocks=round(0.2 * config["num_hidden_layers"])))
    if s.sleb_blocks >= config["num_hidden_layers"]:
        raise SlimError(f"--sleb-blocks {s.sleb_blocks}: the model has only {config['num_hidden_layers']} layers",
                        "ask for fewer removals")
    if any(k < 2 for k in s.group_sizes):
        raise SlimError(f"--group-sizes {s.group_sizes}: a parallel group has at least 2 layers")
    if ids is None:
        ids = calibration_ids(src_dir, s.calib, s.samples, s.seq_len, s.seed)
    _print_plan(s, config, ids.numel())
    bank = LayerBank(ckpt, s.norm, s.max_memory, s.device)
    runner = Runner(bank, ids, s.batch_size)
    seconds = {}
    t = time.perf_counter()
    out = dict(settings=s.model_dump(), source_dir=str(src_dir), num_layers=config["num_hidden_layers"],
               model_type=config["model_type"], calibration_tokens=ids.numel())
    out.update(layer_metrics(runner, config, s))
    seconds["layer_metrics"] = time.perf_counter() - t
    if s.group_ppl:
        t = time.perf_counter()
        group_ppls(runner, config, out["parallel_groups"])
        seconds["group_ppl"] = time.perf_counter() - t
    if s.sleb_blocks:
        t = time.perf_counter()
        out["sleb"] = dict(steps=sleb(runner, config, s.sleb_blocks, halving=s.sleb_halving))
        seconds["sleb"] = time.perf_counter() - t
        out["block_removal_ppl"] = out["sleb"]["steps"][0]["candidates"]
    if s.naive_check:
        k = min(s.naive_check, s.sleb_blocks) or s.naive_check
        naive = sleb(runner, config, k, prefix_cache=False, label="SLEB without prefix cache")
        cached = out.get("sleb", {}).get("steps", [])[:k] or sleb(runner, config, k, halving=s.sleb_halving)
        out["sleb_naive_check"] = dict(
            steps=k, same_choices=[a["removed"] for a in naive] == [b["removed"] for b in cached],
            max_ppl_difference=max(abs(a["ppl"] - b["ppl"]) for a, b in zip(naive, cached)),
            seconds_naive=sum(a["seconds"] for a in naive), seconds_cached=sum(b["seconds"] for b in cached))
        out["sleb_naive_check"]["speedup"] = out["sleb_naive_check"]["seconds_naive"] / out["sleb_naive_check"]["seconds_cached"]
    out["seconds"] = seconds
    out["layer_loads"] = bank.loads
    return out


def plot(m: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = m["num_layers"]
    layers = list(range(n))
    files = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        files.append(name)

    fig, ax = plt.subplots(figsize=(8, 3.2))
    ax.bar(layers, m["block_influence"], color="tab:blue")
    ax.set(xlabel="layer", ylabel="1 - cos(in, out)", title="block influence (low: candidate for removal)")
    save(fig, "block_influence.png")

    fig, ax = plt.subplots(figsize=(8, 3.2))
    w = 0.4
    ax.bar([l - w / 2 for l in layers], m["attention_importance"], w, label="attention")
    ax.bar([l + w / 2 for l in layers], m["mlp_importance"], w, label="MLP")
    ax.set(xlabel="layer", ylabel="1 - cos(in, out)", title="sublayer importance", yscale="log")
    ax.legend()
    save(fig, "sublayer_importance.png")

    ad = m["angular_distance"]
    grid = [[float("nan")] * n for _ in ad["windows"]]
    for r, row in enumerate(ad["matrix"]):
        grid[r][: len(row)] = row
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(ad["windows"]) + 1.5))
    im = ax.imshow(grid, aspect="auto", cmap="viridis_r", origin="lower",
                   extent=(-0.5, n - 0.5, ad["windows"][0] - 0.5, ad["windows"][-1] + 0.5))
    for w in ad["windows"]:
        ax.plot(ad["best_start"][str(w)], w, "r*")
    ax.set(xlabel="start layer l", ylabel="window n", title="angular distance d(l, l+n) (red: best start per n)")
    fig.colorbar(im, ax=ax)
    save(fig, "angular_distance.png")

    if "sleb" in m:
        steps = m["sleb"]["steps"]
        fig, ax = plt.subplots(figsize=(6, 3.2))
        ax.plot(range(len(steps) + 1), [m["calibration_ppl"]] + [s["ppl"] for s in steps], "o-")
        for k, s in enumerate(steps, 1):
            ax.annotate(str(s["removed"]), (k, s["ppl"]), textcoords="offset points", xytext=(0, 6), ha="center")
        ax.set(xlabel="blocks removed", ylabel="calibration perplexity", title="SLEB (labels: removed layer)")
        save(fig, "sleb.png")
    if any("ppl" in g for g in m["parallel_groups"]):
        fig, ax = plt.subplots(figsize=(8, 3.2))
        for k in sorted({len(g["layers"]) for g in m["parallel_groups"]}):
            gs = [g for g in m["parallel_groups"] if len(g["layers"]) == k and "ppl" in g]
            ax.plot([g["layers"][0] for g in gs], [g["ppl"] for g in gs], "o-", label=f"group of {k}")
        ax.axhline(m["calibration_ppl"], color="gray", ls="--", label="source")
        ax.set(xlabel="first layer of the group", ylabel="calibration perplexity", yscale="log",
               title="perplexity with one group evaluated in parallel")
        ax.legend()
        save(fig, "parallel_groups.png")
    return files


def report_markdown(m: dict, plots: list[str]) -> str:
    from ..report import md_table

    s = m["settings"]
    n = m["num_layers"]
    parts = [f"# Layer analysis of {s['model']}",
             f"{n} layers ({m['model_type']}); calibration: {s['calib']} valid, {s['samples']} x {s['seq_len']} "
             f"tokens (seed {s['seed']}); calibration perplexity of the full model {m['calibration_ppl']:.2f}.",
             "Importance is `1 - cos` between the residual stream before and after a block or sublayer, "
             "averaged over tokens; low means the block changes little (ShortGPT's block influence; "
             "He et al. / Tyukin et al. for sublayers)."]
    rows = []
    removal = m.get("block_removal_ppl", {})
    seen = m.get("sleb", {}).get("steps", [{}])[0].get("windows", {})
    part = lambda i: "" if seen.get(str(i), s["samples"]) == s["samples"] else f" ({seen[str(i)]}/{s['samples']} windows)"
    for i in range(n):
        rows.append([i, f"{m['block_influence'][i]:.4f}", f"{m['attention_importance'][i]:.4f}",
                     f"{m['mlp_importance'][i]:.4f}", f"{removal[str(i)]:.2f}{part(i)}" if str(i) in removal else "-"])
    parts += ["## Per layer", md_table(["layer", "block influence", "attention", "MLP", "ppl without this block"], rows)]
    ad = m["angular_distance"]
    parts += ["## Angular distance (Gromov et al.)",
              "Best start layer l for removing n consecutive layers l..l+n-1 (smallest distance between the "
              "inputs of l and l+n):",
              md_table(["n", "best start", "distance"],
                     [[w, ad["best_start"][str(w)], f"{min(row):.4f}"] for w, row in zip(ad["windows"], ad["matrix"])])]
    groups = sorted(m["parallel_groups"], key=lambda g: g.get("ppl", g["rel_error"]))
    parts += ["## Layer-parallel groups",
              "Relative error = ||parallel - sequential|| / ||sequential - input||, over the calibration tokens; "
              "perplexity with only that group made parallel. Best first:",
              md_table(["layers", "relative error", "calibration ppl"],
                     [[g["layers"], f"{g['rel_error']:.4f}", f"{g['ppl']:.2f}" if "ppl" in g else "-"]
                      for g in groups[:15]])]
    if "sleb" in m:
        parts += ["## SLEB", "Each step removes the block whose removal gives the lowest calibration perplexity "
                  "given the blocks already removed:",
                  md_table(["step", "removed layer", "calibration ppl", "seconds"],
                         [[k + 1, st["removed"], f"{st['ppl']:.2f}", f"{st['seconds']:.1f}"]
                          for k, st in enumerate(m["sleb"]["steps"])])]
    if "experts" in m:
        rows = []
        for layer, e in m["experts"].items():
            order = sorted(range(len(e["routed_norm"])), key=lambda k: -e["routed_norm"][k])
            rows.append([layer, ", ".join(f"{k} ({e['routed_norm'][k]:.3g}, {e['frequency'][k]:.0%})" for k in order)])
        parts += ["## Experts", "Per mixture-of-experts layer, experts by router-weighted output norm (Minitron's "
                  "rule), highest first, with the share of tokens routed to each. A recipe's `remove.experts` count "
                  "keeps the highest (convert scores them itself, on 8 x 256 tokens of WikiText-2 valid):",
                  md_table(["layer", "expert (routed norm, tokens)"], rows)]
    if "channels" in m:
        rows = []
        for layer, score in m["channels"].items():
            ranked, total = sorted(score, reverse=True), sum(score) or 1.0
            rows.append([layer] + [f"{sum(ranked[: max(1, round(f * len(ranked)))]) / total:.0%}" for f in (0.25, 0.5, 0.75)])
        parts += ["## MLP channels", "Per dense layer, the share of the summed channel score (mean |activation| at the "
                  "down projection's input, Minitron's rule) held by its highest-scoring quarter, half and three "
                  "quarters of channels: where little is lost, `shrink.mlp` can cut deepest. Every channel's score is in "
                  "metrics.json (`channels`); convert scores them itself, on 8 x 256 tokens of WikiText-2 valid:",
                  md_table(["layer", "top 25%", "top 50%", "top 75%"], rows)]
    if "sleb_naive_check" in m:
        c = m["sleb_naive_check"]
        parts += [f"Prefix cache check over {c['steps']} step(s): naive loop {c['seconds_naive']:.1f} s, with the "
                  f"cache {c['seconds_cached']:.1f} s ({c['speedup']:.2f}x faster); same choices: {c['same_choices']} "
                  f"(max perplexity difference {c['max_ppl_difference']:.2e})."]
    parts += ["## Plots"] + [f"![{p}]({p})" for p in plots]
    parts += ["## Time", ", ".join(f"{k}: {v:.1f} s" for k, v in m["seconds"].items())
              + f"; layers built from the checkpoint: {m['layer_loads']}"]
    return "\n\n".join(parts) + "\n"


def run_analyse(s: AnalysisSettings, out: Path, force: bool = False) -> dict:
    from ..outdir import AtomicDir, refuse_overlap
    from ..report import console
    from ..source import resolve_source, source_paths

    from .. import distributed

    refuse_overlap(out, source_paths(s.model), "-o")
    # Under torchrun every rank scores its share of the windows; rank 0 alone writes the folder.
    world = distributed.current()
    distributed.join(world)
    if world and not world.main:
        console.quiet = True
    target = AtomicDir(Path(out), force, "-o") if world is None or world.main else None
    src_dir = resolve_source(s.model, s.allow_pickle)
    # Only now is the folder known that a Hub id or GGUF file resolved to.
    refuse_overlap(out, source_paths(s.model, src_dir), "-o")
    m = analyse(s, src_dir)
    m["ranks"] = world.size if world else 1  # the calibration windows were split over this many processes
    if target is None:  # another rank: rank 0 writes what every rank computed alike
        return m
    with target as tmp:
        for name in ("early_exit.json", "early_exit.md"):  # `analyze --early-exit` shares the folder
            if (target.target / name).is_file():
                shutil.copy2(target.target / name, tmp / name)
        (tmp / "metrics.json").write_text(json.dumps(m, indent=2))
        plots = plot(m, tmp)
        (tmp / "report.md").write_text(report_markdown(m, plots))
    console.print(f"[green]wrote[/] {target.target}: metrics.json, report.md, {len(plots)} plots")
    return m


def verify_recipe(recipe_path, samples: int = 16, seq_len: int = 512, data: str = "wikitext2", source=None) -> dict:
    """Perplexity, KL and top-1 agreement of a recipe vs its source on held-out text, with the plan applied
    at run time to the source model (nothing converted; the model must fit in memory). ``source`` may be
    given to reuse one loaded source model across recipes."""
    from ..convert import prepare
    from ..data import load_text, token_chunks
    from ..recipe import Quality, load_recipe
    from ..report import print_validation
    from ..runtime import load_model, load_tokenizer
    from ..validate import load_reference, quality

    recipe = load_recipe(recipe_path)
    src_dir, _, plan, _ = prepare(recipe)
    chunks = token_chunks(load_tokenizer(src_dir), load_text(data, "test"), samples, seq_len)
    settings = Quality(data=data, samples=samples, seq_len=seq_len)
    result = quality(source or load_model(src_dir), load_reference(src_dir, plan, None), chunks, settings)
    print_validation({"quality": result})
    return result
