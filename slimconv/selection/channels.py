"""Which MLP channels a narrowed layer keeps: scores on calibration text, and a fraction or count resolved into
channel indices.

A channel's score is NVIDIA Minitron's rule for MLP width: the mean over calibration tokens of the absolute value
of its activation at the down projection's input (act(gate(x)) * up(x), x the MLP's normed input). A recipe's
``shrink.mlp`` fraction or count keeps the highest-scoring channels of each layer, in their source order.
"""
import torch

from ..errors import SlimError
from .experts import COUNT_CALIBRATION, count_runner, highest


@torch.no_grad()
def channel_scores(runner, spec, mid: torch.Tensor) -> list[float]:
    """Mean |activation| of each MLP channel of source layer ``spec`` at its down projection's input, from the
    residual stream ``mid`` after its attention."""
    layer = runner.bank.layer(spec)
    mlp, total, tokens = layer.mlp, None, 0
    for s in runner.batches(len(mid)):
        h = mid[s]
        x = layer.post_attention_layernorm(h) if layer.post_attention_layernorm is not None else h
        a = (mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)).abs().reshape(-1, mlp.down_proj.in_features)
        part = a.double().sum(0)
        total = part if total is None else total + part
        tokens += a.shape[0]
    return (total / tokens).tolist()


def score_layers(runner, config: dict, layers: set[int]) -> dict[int, list[float]]:
    """``channel_scores`` of source layers ``layers``, pushing the calibration set through the source up to the
    last."""
    from .layerwise import layer_scores

    return layer_scores(runner, config, layers, channel_scores)


def chosen(recipe) -> dict:
    """The ``shrink.mlp`` entries given as a fraction or a count (layer spec -> value)."""
    return {k: v for k, v in recipe.shrink.mlp.items() if not isinstance(v, list)}


def width_of(value, width: int, multiple: int, key: str) -> int:
    """The channel count a fraction or count asks for, of an MLP ``width`` wide; a SlimError for one out of range."""
    if isinstance(value, float):
        if not 0 < value < 1:
            raise SlimError(f"{key}: fraction {value} is outside (0, 1)", "give the share of channels to keep, e.g. "
                            "0.5, or a count of channels (an integer)")
        count = max(multiple, round(value * width / multiple) * multiple)
        return min(count, width)
    if not 1 <= value <= width:
        raise SlimError(f"{key}: keep {value} channels, but the MLP has {width}",
                        f"give a count from 1 to {width}, or a fraction in (0, 1)")
    return value


def resolve_widths(recipe, src_dir, config: dict):
    """``recipe`` with every ``shrink.mlp`` fraction or count replaced by the channels it keeps (by
    ``channel_scores`` on ``COUNT_CALIBRATION``), and a note for the plan saying so; the recipe itself when it has
    none. Out-of-range values are refused before any calibration runs."""
    from ..plan import build_plan
    from ..recipe import parse_indices

    wanted = chosen(recipe)
    if not wanted:
        return recipe, None
    n, width = config["num_hidden_layers"], config["intermediate_size"]
    count = {spec: width_of(value, width, recipe.shrink.multiple_of, f"shrink.mlp[{spec!r}]")
             for spec, value in wanted.items()}
    layers = {i: count[spec] for spec in wanted for i in parse_indices(spec, f"shrink.mlp[{spec!r}]", n)}
    # The plan's own refusals (a removed layer, a mixture of experts) come before the calibration they would waste.
    probe = {**recipe.shrink.mlp, **{spec: list(range(k)) for spec, k in count.items()}}
    build_plan(recipe.model_copy(update=dict(shrink=recipe.shrink.model_copy(update=dict(mlp=probe)))), config)
    c = COUNT_CALIBRATION
    scores = score_layers(count_runner(src_dir), config, set(layers))
    mlp = {k: v for k, v in recipe.shrink.mlp.items() if isinstance(v, list)}
    for i, k in sorted(layers.items()):
        mlp[str(i)] = highest(scores[i], k)
    note = (f"MLP channels kept by {', '.join(f'{s}: {v}' for s, v in wanted.items())}: the highest mean |activation| "
            f"at the down projection's input on {c['samples']} x {c['seq_len']} tokens of {c['calib']} (valid split)")
    return recipe.model_copy(update=dict(shrink=recipe.shrink.model_copy(update=dict(mlp=mlp)))), note
