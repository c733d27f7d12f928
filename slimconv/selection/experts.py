"""Which experts a mixture-of-experts layer keeps: scores on calibration text, and a count resolved into indices.

An expert's score is NVIDIA Minitron's rule for pruning experts: the router-weighted norm of its output, summed over
the calibration tokens routed to it (what it adds to the residual stream, weighted by the router), divided by the
number of tokens; its routing frequency is reported beside it. A recipe's ``remove.experts`` count (``{"0-23": 6}``)
keeps the highest-scoring experts of each layer, in their index order.
"""
import torch

from ..errors import SlimError

# The calibration a count is resolved on: `slimconv analyze`'s defaults (its settings' fields of the same names).
COUNT_CALIBRATION = dict(calib="wikitext2", samples=8, seq_len=256, seed=0)


@torch.no_grad()
def expert_scores(runner, spec, mid: torch.Tensor) -> dict:
    """Scores of the experts of source layer ``spec`` (a mixture of experts), from the residual stream ``mid`` after
    its attention: per expert, ``routed_norm`` (the mean over tokens of |routing weight x expert output|, 0 for a
    token not routed to it) and ``frequency`` (the share of tokens routed to it)."""
    layer = runner.bank.layer(spec)
    moe = layer.mlp
    n = len(moe.experts)
    norm, count, tokens = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64), 0
    for s in runner.batches(len(mid)):
        h = mid[s]
        x = (layer.post_attention_layernorm(h) if layer.post_attention_layernorm is not None else h)
        x = x.reshape(-1, x.shape[-1])
        weights, chosen = moe.route(x)
        for e in chosen.unique().tolist():
            rows, slot = torch.where(chosen == e)
            out = moe.experts[e](x[rows]) * weights[rows, slot, None]
            norm[e] += out.float().norm(dim=-1).sum().item()
            count[e] += len(rows)
        tokens += x.shape[0]
    return dict(routed_norm=(norm / tokens).tolist(), frequency=(count / tokens).tolist())


def score_layers(runner, config: dict, layers: set[int]) -> dict[int, dict]:
    """``expert_scores`` of source layers ``layers``, pushing the calibration set through the source up to the last."""
    from .layerwise import layer_scores

    return layer_scores(runner, config, layers, expert_scores)


def count_runner(src_dir):
    """The layer-by-layer engine on ``COUNT_CALIBRATION``'s windows of the source: what convert scores a count of
    experts (or of MLP channels, ``channels.resolve_widths``) on."""
    from ..data import calibration_ids
    from ..source import checked_source
    from .layerwise import LayerBank, Runner

    c = COUNT_CALIBRATION
    ckpt, _ = checked_source(src_dir)
    return Runner(LayerBank(ckpt), calibration_ids(src_dir, c["calib"], c["samples"], c["seq_len"], c["seed"]))


def highest(scores: list[float], k: int) -> list[int]:
    """The indices of the ``k`` highest ``scores``, in index order (what a count keeps)."""
    return sorted(sorted(range(len(scores)), key=lambda e: -scores[e])[:k])


def counts(recipe) -> dict:
    """The ``remove.experts`` entries given as a count (layer spec -> experts to keep)."""
    return {k: v for k, v in recipe.remove.experts.items() if isinstance(v, int)}


def resolve_counts(recipe, src_dir, config: dict):
    """``recipe`` with every expert count replaced by the experts it keeps (by ``expert_scores`` on
    ``COUNT_CALIBRATION``), and a note for the plan saying so; the recipe itself when it has no count."""
    from ..arch import get_arch
    from ..recipe import parse_indices

    wanted = counts(recipe)
    if not wanted:
        return recipe, None
    arch, n = get_arch(config), config["num_hidden_layers"]
    layers = {}
    for spec, k in wanted.items():
        key = f"remove.experts[{spec!r}]"
        if not 1 <= k <= arch.num_experts:
            raise SlimError(f"{key}: keep {k} experts, but a layer has {arch.num_experts}",
                            f"give a count from 1 to {arch.num_experts}, or a list of experts")
        for i in parse_indices(spec, key, n):
            if i < n and not arch.sparse[i]:
                raise SlimError(f"{key}: layer {i} has a dense MLP, not experts",
                                f"leave it out; the sparse layers are {[j for j in range(n) if arch.sparse[j]]}")
            layers[i] = (spec, k)
    c = COUNT_CALIBRATION
    scores = score_layers(count_runner(src_dir), config, set(layers))
    experts = {k: v for k, v in recipe.remove.experts.items() if not isinstance(v, int)}
    for i, (spec, k) in sorted(layers.items()):
        experts[str(i)] = highest(scores[i]["routed_norm"], k)
    note = (f"experts kept by count ({', '.join(f'{s}: {k}' for s, k in wanted.items())}): the highest router-weighted "
            f"output norms on {c['samples']} x {c['seq_len']} tokens of {c['calib']} (valid split)")
    return recipe.model_copy(update=dict(remove=recipe.remove.model_copy(update=dict(experts=experts)))), note
