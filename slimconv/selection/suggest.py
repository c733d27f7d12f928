"""From an analysis folder to a recipe: each paper's selection rule applied to the stored metrics."""
import json
from pathlib import Path

import yaml

from ..errors import SlimError
from ..recipe import parse_recipe

METHODS = {
    "sleb": "SLEB (Song et al. 2024): the first N blocks of the iterative elimination by calibration perplexity",
    "block-influence": "ShortGPT block influence: the N blocks with the lowest 1 - cos(input, output)",
    "angular": "Gromov et al.: the N consecutive blocks whose input and output are closest in angular distance",
    "last": "baseline: the N blocks before the final one",
    "attention": "attention sublayers by importance (Tyukin et al., He et al.: lowest 1 - cos across the "
                 "sublayer) or, with --by position, the last N before the final layer",
    "mlp": "MLP sublayers by importance (lowest 1 - cos across the sublayer) or by position",
    "parallel": "layer parallelism: the N non-overlapping pairs with the lowest calibration perplexity when made "
                "parallel one at a time (relative error when perplexity was not measured)",
}


def load_metrics(directory) -> dict:
    path = Path(directory) / "metrics.json"
    if not path.is_file():
        raise SlimError(f"{directory} has no metrics.json", "give the folder written by `slimconv analyze`")
    return json.loads(path.read_text())


def _count(n: int | None, flag: str, limit: int) -> int:
    if n is None:
        raise SlimError(f"this method needs {flag} N")
    if not 1 <= n < limit:
        raise SlimError(f"{flag} {n}: choose between 1 and {limit - 1} for this model")
    return n


def _lowest(scores: list[float], n: int) -> list[int]:
    return sorted(sorted(range(len(scores)), key=scores.__getitem__)[:n])


def choose(m: dict, method: str, blocks: int | None = None, attention: int | None = None, mlp: int | None = None,
           pairs: int | None = None, by: str = "importance") -> tuple[dict, str]:
    """Returns (the recipe's remove/parallel sections, one line saying how they were chosen)."""
    L = m["num_layers"]
    if method == "sleb":
        n = _count(blocks, "--remove-blocks", L)
        steps = m.get("sleb", {}).get("steps", [])
        if len(steps) < n:
            raise SlimError(f"the analysis ran {len(steps)} SLEB step(s), fewer than --remove-blocks {n}",
                            f"re-run `slimconv analyze` with --sleb-blocks {n} (or more)")
        chosen = [s["removed"] for s in steps[:n]]
        return {"remove": {"blocks": sorted(chosen)}}, (
            f"SLEB order {chosen}; calibration perplexity {m['calibration_ppl']:.2f} -> {steps[n - 1]['ppl']:.2f}")
    if method == "block-influence":
        n = _count(blocks, "--remove-blocks", L)
        chosen = _lowest(m["block_influence"], n)
        return {"remove": {"blocks": chosen}}, f"lowest block influence: {chosen}"
    if method == "angular":
        n = _count(blocks, "--remove-blocks", L)
        ad = m["angular_distance"]
        if str(n) not in ad["best_start"]:
            raise SlimError(f"angular distances were measured for windows up to {max(ad['windows'])}, not {n}",
                            f"re-run `slimconv analyze` with --max-window {n}")
        start = ad["best_start"][str(n)]
        dist = ad["matrix"][ad["windows"].index(n)][start]
        return {"remove": {"blocks": f"{start}-{start + n - 1}"}}, (
            f"smallest angular distance for n={n}: layers {start}-{start + n - 1} (d = {dist:.4f})")
    if method == "last":
        n = _count(blocks, "--remove-blocks", L)
        return {"remove": {"blocks": f"{L - 1 - n}-{L - 2}"}}, f"the {n} blocks before the final layer"
    if method in ("attention", "mlp"):
        flag, n = (f"--remove-{method}", attention if method == "attention" else mlp)
        n = _count(n, flag, L)
        if by == "position":
            return {"remove": {method: f"{L - 1 - n}-{L - 2}"}}, f"the last {n} {method} sublayers before the final layer"
        chosen = _lowest(m[f"{method}_importance"], n)
        return {"remove": {method: chosen}}, f"lowest {method} importance (1 - cos across the sublayer): {chosen}"
    if method == "parallel":
        n = _count(pairs, "--pairs", L // 2 + 1)
        groups = [g for g in m["parallel_groups"] if len(g["layers"]) == 2]
        if not groups:
            raise SlimError("the analysis measured no parallel pairs: this model's neighbouring layers cannot be "
                            "evaluated as one (a family with output norms, or neighbours whose attention window or "
                            "RoPE differs)", "use a removal method (sleb, block-influence, attention, mlp, ...)")
        key = "ppl" if groups and all("ppl" in g for g in groups) else "rel_error"
        used, chosen = set(), []
        for g in sorted(groups, key=lambda g: g[key]):
            if len(chosen) < n and not used & set(g["layers"]):
                chosen.append(g["layers"])
                used |= set(g["layers"])
        if len(chosen) < n:
            raise SlimError(f"only {len(chosen)} non-overlapping pairs were measured", "ask for fewer --pairs")
        chosen.sort()
        return {"parallel": {"groups": chosen}}, f"pairs with the lowest {'calibration perplexity' if key == 'ppl' else 'relative error'}: {chosen}"
    raise SlimError(f"unknown method {method!r}", f"choose one of {', '.join(METHODS)}")


def write_recipe(m: dict, method: str, out: Path, output_dir: str | None, force: bool, command: str, **counts) -> dict:
    """Writes the recipe (YAML with a header saying how it was chosen); returns it as a dict."""
    sections, why = choose(m, method, **counts)
    out = Path(out)
    if out.exists() and not force:
        raise SlimError(f"{out} already exists", "pass --force to overwrite it, or choose another -o")
    s = m["settings"]
    data = {"model": s["model"], "description": f"{METHODS[method].split(':')[0]}: {why}", **sections,
            "output": {"dir": output_dir or f"outputs/{out.stem}"}}
    parse_recipe(json.loads(json.dumps(data)), str(out))  # what convert will read must be valid
    header = [f"# Written by `{command}`",
              f"# method: {METHODS[method]}",
              f"# chosen: {why}",
              f"# analysis: {s['calib']} valid, {s['samples']} x {s['seq_len']} tokens, seed {s['seed']}"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(header) + "\n" + yaml.safe_dump(data, sort_keys=False, default_flow_style=None))
    return data
