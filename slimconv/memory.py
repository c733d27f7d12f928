"""The memory plan of a heal (`slimconv heal OUT --plan [--nproc N]`): what each rank holds while training, for
each training mode, from the plan and the source's config alone, so that it runs for a model whose weights are
not on this machine (a recipe for Llama-3.1-70B plans from its config.json).

Heal trains in float32 (4 bytes a value). Per rank, with N ranks (FSDP2 shards every tensor over them):

- student and teacher weights: their parameter counts x 4 / N;
- gradients: the trained parameters x 4 / N; AdamW state: two values per trained parameter, x 8 / N;
- gathered working set (N > 1): with ``--shard full`` FSDP2 gathers a layer whole while it runs, and the next
  one ahead of time, and the root unit (embeddings and head) during a forward: 2 x the largest layer + the root,
  x 4; with ``--shard grad-op`` both models are gathered whole beside their shards: (student + teacher) x 4;
- activations at --batch / N windows of --seq-len tokens: the logits' two vocab-wide copies (the teacher's, which
  the loss turns into its gradient in place, and the student's; the loss works a chunk of tokens at a time) and,
  for every layer the backward pass goes through, Korthikanti et al.'s (2022) stored-activation estimate
  34·b·s·h, doubled for float32, without its 5·a·b·s² attention-score term: transformers' default attention
  (SDPA) keeps no scores. An estimate.

It also says how many ranks each mode needs on the same device (the global batch split over them, at least
one window each).
"""
from dataclasses import dataclass

from .plan import Plan, costs, source_plan
from .recipe import Heal

BYTES = 4
MODES = ("adjacent", "all", "lora")


@dataclass(frozen=True)
class Row:
    name: str
    bytes: dict  # mode -> bytes per rank


def _root_params(config: dict) -> int:
    h, vocab = config["hidden_size"], config["vocab_size"]
    return vocab * h * (1 if config.get("tie_word_embeddings", False) else 2) + h


def layer_params(plan: Plan, config: dict, j: int) -> int:
    return costs(plan.model_copy(update={"layers": [plan.layers[j]]}), config)["params"] - _root_params(config)


def lora_params(plan: Plan, config: dict, j: int, rank: int) -> int:
    """Adapter parameters on every linear of output layer ``j``: r x (in + out) each."""
    h = config["hidden_size"]
    hd = config.get("head_dim") or h // config["num_attention_heads"]
    s, n = plan.layers[j], 0
    if s.attention:
        q, kv = s.attention.num_heads * hd, s.attention.num_key_value_heads * hd
        n += rank * ((h + q) + 2 * (h + kv) + (q + h))
    if s.mlp:
        experts = len(s.mlp.experts) if s.mlp.experts is not None else 1
        n += rank * 3 * (h + s.mlp.intermediate_size) * experts
    return n


def trained(plan: Plan, config: dict, mode: str, rank: int) -> tuple[list[int], int]:
    """(output layers the backward pass runs through, trained parameters) for a training mode."""
    from .heal import adjacent_layers

    n = len(plan.layers)
    if mode == "lora":
        return list(range(n)), sum(lora_params(plan, config, j, rank) for j in range(n))
    layers = adjacent_layers(plan) if mode == "adjacent" else list(range(n))
    params = sum(layer_params(plan, config, j) for j in layers) + (config["hidden_size"] if n - 1 in layers else 0)
    return list(range(min(layers), n)) if layers else [], params


def heal_memory(plan: Plan, config: dict, settings: Heal, nproc: int) -> list[Row]:
    """Bytes per rank of each part, for every mode."""
    h, vocab = config["hidden_size"], config["vocab_size"]
    b, s = max(settings.batch / nproc, 1), settings.seq_len
    student = costs(plan, config)["params"]
    teacher = costs(source_plan(config), config)["params"]
    widest = max(max(layer_params(plan, config, j) for j in range(len(plan.layers))),
                 layer_params(source_plan(config), config, 0))
    rows = {k: {} for k in ("student weights", "teacher weights", "gradients", "optimizer state (AdamW)",
                            "gathered layers and root (FSDP2)", "activations")}
    for mode in MODES:
        through, n_train = trained(plan, config, mode, settings.lora_rank)
        rows["student weights"][mode] = student * BYTES / nproc
        rows["teacher weights"][mode] = teacher * BYTES / nproc
        rows["gradients"][mode] = n_train * BYTES / nproc
        rows["optimizer state (AdamW)"][mode] = 2 * n_train * BYTES / nproc
        gathered = student + teacher if settings.shard == "grad-op" else 2 * widest + _root_params(config)
        rows["gathered layers and root (FSDP2)"][mode] = gathered * BYTES if nproc > 1 else 0
        per_layer = 34 * b * s * h * 2
        rows["activations"][mode] = 2 * b * s * vocab * BYTES + per_layer * len(through)
    out = [Row(name, values) for name, values in rows.items()]
    return out + [Row("total per rank", {m: sum(r.bytes[m] for r in out) for m in MODES})]


def ranks_needed(plan: Plan, config: dict, settings: Heal, limit: float, most: int = 4096) -> dict:
    """{mode: the fewest ranks at which it fits ``limit`` per rank, or None up to ``most``}."""
    need = {}
    for mode in MODES:
        n = 1
        while n <= most and heal_memory(plan, config, settings, n)[-1].bytes[mode] > limit:
            n *= 2
        need[mode] = n if n <= most else None
    return need


def device_memory(device, nproc: int, given_gb: float | None) -> tuple[float, str]:
    """(bytes one rank may use, where that figure comes from)."""
    import os

    import torch

    if given_gb is not None:
        return given_gb * 1e9, f"--device-memory {given_gb:g} GB per rank"
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        return total, f"{torch.cuda.get_device_name(device)}, {total / 1e9:.0f} GB per rank (one GPU each)"
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total / nproc, f"this machine's {total / 1e9:.0f} GB of RAM shared by {nproc} rank(s)"


def print_memory(rows: list[Row], limit: float, where: str, nproc: int, settings: Heal, title: str,
                 need: dict) -> dict:
    """The table, and per mode whether it fits; returns {mode: fits}."""
    from rich.table import Table

    from .report import console

    t = Table(title=f"{title}: memory per rank, {nproc} rank(s)"
              + (f" ({settings.shard} sharding)" if nproc > 1 else "")
              + f", batch {settings.batch} ({settings.batch / nproc:g} per rank) x {settings.seq_len} tokens, float32",
              header_style="bold", caption="activations are an estimate (docs/healing.md, 'Larger than one GPU')")
    t.add_column("")
    for m in MODES:
        t.add_column(m + (f" (r={settings.lora_rank})" if m == "lora" else ""), justify="right")
    for r in rows:
        t.add_row(r.name, *(f"{r.bytes[m] / 1e9:,.2f} GB" for m in MODES))
    fits = {m: rows[-1].bytes[m] <= limit for m in MODES}
    t.add_row(f"fits {limit / 1e9:,.0f} GB?", *("[green]yes[/]" if fits[m] else "[red]no[/]" for m in MODES))
    t.add_row("ranks needed (powers of 2)", *(str(need[m]) if need[m] else "> 4096" for m in MODES))
    console.print(t)
    console.print(f"device: {where}")
    return fits
