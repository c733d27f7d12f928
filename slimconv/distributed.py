"""Heal across processes: `torchrun --nproc-per-node N -m slimconv heal ...` shards the student (parameters,
gradients, optimizer state) and the teacher over the ranks with PyTorch FSDP2 (``fully_shard``, one unit per
decoder layer plus the root), and each rank trains on its share of every global batch.

torchrun rather than ``accelerate launch``: it is PyTorch's own launcher, needs no config file, and FSDP2 is
used directly (Accelerate would wrap the same calls). Each rank builds the models on the meta device and reads
only its own shard of every tensor from the safetensors files (torch.distributed.checkpoint's Hugging Face
reader slices them), so no rank ever holds a whole model while training. The resume checkpoint is a
torch.distributed.checkpoint folder, so a run can resume on another number of ranks.
"""
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from .errors import SlimError


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int

    @property
    def main(self) -> bool:
        return self.rank == 0


def current() -> World | None:
    """The torchrun world this process is a rank of, or None for a plain (single-process) run. torchrun
    with one process is a plain run: nothing would be sharded."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return None
    return World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))


def start(world: World, device: torch.device) -> torch.device:
    """Joins the process group (gloo on the CPU, NCCL on CUDA); returns this rank's device."""
    if device.type == "cuda":
        visible = torch.cuda.device_count()
        if world.size > visible and world.local_rank >= visible:
            raise SlimError(f"torchrun started {world.size} processes per node but torch sees {visible} CUDA "
                            "device(s)", f"pass --nproc-per-node {visible} or less, or --device cpu")
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # Rank 0 alone evaluates and writes after training: the others wait that long at the last barrier.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=4))
    return device


def agree(error: SlimError | None) -> None:
    """Every rank passes its own refusal (or None); when any rank has one, every rank raises the first one,
    naming its rank, so that rank 0 reports it and no rank waits forever for the others."""
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, None if error is None else (error.problem, error.fix))
    for rank, e in enumerate(errors):
        if e is not None:
            raise SlimError(f"rank {rank}: {e[0]}", e[1])


def quiet_rank() -> int | None:
    """This process's rank when it is one of torchrun's other ranks (whose errors rank 0 reports), else None."""
    rank = int(os.environ.get("RANK", "0"))
    return rank if rank and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None


def refuse_unsupported(settings, family, multimodal: bool) -> None:
    """What the distributed path does not do yet, refused before any work, with the single-process way."""
    why = ("--quant (quantisation-aware heal) runs in one process only" if settings.quant != "none" else
           "a mixture-of-experts output stores its experts under other names than the model holds them"
           if family is not None and family.moe is not None else
           "a multimodal output stores its text model under a prefix" if multimodal else None)
    if why:
        raise SlimError(f"distributed heal: {why}", "run `slimconv heal` as one process (without torchrun)")


def empty_model(directory: Path):
    """The checkpoint's model with its parameters on the meta device (no memory) and its buffers real: the
    rotary frequencies are computed at construction and are not in the weight files."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from .runtime import bundled_code

    ours = bundled_code(directory)
    config = AutoConfig.from_pretrained(str(directory), trust_remote_code=ours)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=ours)
    model.tie_weights()  # from_pretrained ties a shared head; from_config leaves it to the caller
    return model.eval()


def shard(model, layers, mode: str = "full") -> None:
    """FSDP2 over every rank: one unit per decoder layer and the root (embeddings, final norm, head). Parameters
    become this rank's shards; gradients and optimizer state follow them.

    ``full`` gathers a unit only while it runs (forward, then again for its backward): the least memory. A model
    with nothing to train (the teacher) has its root resharded after the forward too, since no backward would.
    ``grad-op`` (PyTorch's SHARD_GRAD_OP) keeps a trained unit gathered from its forward to its backward, and a
    frozen unit (all of the teacher, the student's untrained layers and root) gathered from its first forward on:
    the traffic of a step falls to one gather of the trained layers and one scatter of their gradients, and each
    rank holds the models whole while it trains."""
    from torch.distributed.fsdp import fully_shard

    def frozen(params) -> bool:
        return not any(p.requires_grad for p in params)

    if mode == "full":
        for layer in layers:
            fully_shard(layer)
        fully_shard(model, reshard_after_forward=True if frozen(model.parameters()) else None)
        return
    # A trained final norm would put the vocab-wide embedding beside it into every step's traffic: trained
    # modules outside the layers become units of their own, so that the root is frozen and stays gathered.
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    units = list(layers) + [m for m in model.modules() if m is not model
                            and (own := list(m.parameters(recurse=False))) and not frozen(own)
                            and not any(id(p) in in_layers for p in own)]
    claimed = {id(p) for unit in units for p in unit.parameters()}
    still = [frozen(unit.parameters()) for unit in units]  # before sharding replaces the parameters
    still.append(frozen(p for p in model.parameters() if id(p) not in claimed))
    for unit, kept in zip([*units, model], still):
        fully_shard(unit, reshard_after_forward=False)
        if kept:
            unit.set_reshard_after_backward(False, recurse=False)


def load_shards(model, directory: Path, device: torch.device) -> None:
    """Fills a sharded meta model with its own slice of every tensor, read from ``directory``'s safetensors;
    the buffers keep the values they were built with."""
    import torch.distributed.checkpoint as dcp
    from safetensors import safe_open
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    ties = _ties(model)
    model.to_empty(device=device)
    for (owner, name), (other, other_name) in ties:  # to_empty gives each module its own copy of a shared one
        setattr(other, other_name, getattr(owner, name))
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    on_disk = set()
    for shard_file in sorted(directory.glob("*.safetensors")):
        with safe_open(shard_file, framework="pt") as f:
            on_disk |= set(f.keys())
    state = get_model_state_dict(model)
    # An adapter-wrapped linear holds the stored weight as `base`; the adapters themselves are not stored.
    stored = {n: n.replace(".base.", ".") for n in state if not n.endswith((".lora_a", ".lora_b"))}
    missing = [n for n, disk in stored.items() if disk not in on_disk and not _tied(model, n)]
    if missing:
        raise SlimError(f"{directory} does not store {stored[missing[0]]}, which the model holds",
                        "run `slimconv heal` as one process (without torchrun) on this output")
    wanted = {disk: state[n] for n, disk in stored.items() if disk in on_disk}
    dcp.load(wanted, storage_reader=dcp.HuggingFaceStorageReader(str(directory)))
    set_model_state_dict(model, {n: wanted[disk] for n, disk in stored.items() if disk in on_disk},
                         options=_partial())


def _ties(model) -> list[tuple[tuple, tuple]]:
    """((module, name) that owns a parameter, (module, name) that shares it) for every tied pair (the head
    that reuses the embedding)."""
    first, ties = {}, []
    for mod in model.modules():
        for name, p in mod.named_parameters(recurse=False):
            if id(p) in first:
                ties.append((first[id(p)], (mod, name)))
            else:
                first[id(p)] = (mod, name)
    return ties


def _tied(model, name: str) -> bool:
    return name == "lm_head.weight" and bool(getattr(model.config, "tie_word_embeddings", False))


def _partial():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(strict=False)


def mean(value: float) -> float:
    """The mean of ``value`` over the ranks (each rank's loss is the mean over its equal share of a batch)."""
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def broadcast(value: float) -> float:
    """Rank 0's ``value`` on every rank."""
    t = torch.tensor([value], dtype=torch.float64)
    dist.broadcast(t, 0)
    return t.item()


def gathered(values: list[float]) -> list[float]:
    """Each rank's value, in rank order."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, values)
    return out


def full_state(model) -> dict:
    """The whole model's state dict on rank 0 (on the CPU, gathered tensor by tensor); empty on the others."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def resume_dir(target: Path) -> Path:
    return target.parent / f".{target.name}.heal-resume.dcp"


def save_resume(folder: Path, model, opt, trained: list[str], extra: dict) -> None:
    """The trained parameters and the optimizer state, each rank writing its shards, world-size independent;
    ``extra`` (step, curve, fingerprint) rides along. Written beside and then renamed, so a rank killed while
    saving leaves the previous checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": {n: model_sd[n] for n in trained}, "optim": optim_sd}
    tmp = folder.with_name(folder.name + ".tmp")
    if dist.get_rank() == 0:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    dcp.save(state, checkpoint_id=str(tmp))
    if dist.get_rank() == 0:
        import json
        import shutil

        (tmp / "slimconv_resume.json").write_text(json.dumps(extra))
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    dist.barrier()


def load_resume(folder: Path, model, opt, trained: list[str]) -> dict:
    """Loads a checkpoint of ``save_resume`` into this world (any number of ranks); returns its ``extra``."""
    import json

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": {n: model_sd[n] for n in trained}, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_partial())
    return json.loads((folder / "slimconv_resume.json").read_text())


def join(world: World | None) -> None:
    """Analysis and search under torchrun: a CPU (gloo) group, for exchanging per-window losses."""
    if world and not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(hours=4))


def window_share(windows: int) -> slice | None:
    """This rank's contiguous share of ``windows`` calibration windows, or None when there is no world to
    split over (or fewer windows than ranks: every rank then scores them all, alike)."""
    if not dist.is_initialized() or dist.get_world_size() == 1 or windows < dist.get_world_size():
        return None
    size, rank = dist.get_world_size(), dist.get_rank()
    bounds = [windows * r // size for r in range(size + 1)]
    return slice(bounds[rank], bounds[rank + 1])


def combine(local: list[float], windows: int, total: int) -> list[float]:
    """Every rank's per-candidate mean over its ``windows``, weighted into the mean over all ``total``."""
    shares = [None] * dist.get_world_size()
    dist.all_gather_object(shares, (local, windows))
    return [sum(values[c] * n for values, n in shares) / total for c in range(len(local))]


def finish() -> None:
    """Leaves the group on a path every rank reaches. The barrier first: a rank that tore down its gloo pairs
    while rank 0 still wrote its folder aborted in CI ("terminate called without an active exception")."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
