"""Slim outputs of every kind, for every supported architecture, with the reference's expected answers:
the input of ``compat_check.py`` (see there)."""
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from compat_check import EXPECT
from helpers import ARCH_CONFIGS, FAMILY_CONFIGS, MOE_CONFIGS, MULTIMODAL_CONFIGS, convert, make_multimodal, make_tiny
from slimconv.reference import apply_plan, greedy_no_cache
from slimconv.runtime import load_model

# One output per kind the converter writes: a stock config (blocks only), the slim format with
# sublayers removed, wide layers (a pair and a group of 3, both norm modes), and an early-exit policy.
KINDS = {
    "stock": dict(remove={"blocks": [1, 4]}),
    "sublayers": dict(remove={"attention": [2, 5], "mlp": [0]}),
    "parallel": dict(parallel={"groups": [[0, 1], "3-5"]}),
    "parallel-mean": dict(remove={"attention": [3]}, parallel={"groups": ["2-4"], "norm": "mean"}),
    "early-exit": dict(remove={"mlp": [1]}, parallel={"groups": [[3, 4]]},
                       early_exit={"policy": "gap", "threshold": 0.001, "min_layer": 1}),
}
# nemotron-nas (DeciLM classes over the slim layers) needs MLP widths on its 256 grid: its own tiny sources.
NAS_KINDS = {"nemotron-nas": dict(remove={"blocks": [1], "attention": [2, 5], "mlp": [0]})}
NAS_ARCHS = ("llama-tied", "qwen2")
# The other families' slim outputs: their own norms, scalars and RoPE in the shipped modeling code; parallel groups
# only where they fold and the tiny model's layers 0-1 and 3-5 share their attention's kind.
FAMILY_KINDS = {family: ["stock", "sublayers"] + (["parallel"] if family in ("gemma", "phi3", "granite") else [])
                for family in FAMILY_CONFIGS}
# Mixtures of experts in the shipped modeling code: sublayers removed, and experts pruned (one layer down to one).
MOE_KINDS = {"sublayers": KINDS["sublayers"],
             "experts": dict(remove={"experts": {"1": [3], "3": [0, 2]}, "cap_top_k": True})}
PROMPT = torch.randint(1, 128, (1, 12), generator=torch.Generator().manual_seed(7))
NEW_TOKENS = 10


@torch.no_grad()
def build(root: Path) -> list[Path]:
    """Writes ``root/ARCH-KIND/`` for every architecture and kind; returns the output folders."""
    outputs = []
    cases = [(arch, arch, kind, recipe, {}) for arch in ARCH_CONFIGS for kind, recipe in KINDS.items()]
    cases += [(family, family, kind, KINDS[kind], {}) for family, kinds in FAMILY_KINDS.items() for kind in kinds]
    cases += [(family, family, kind, recipe, {}) for family in MOE_CONFIGS for kind, recipe in MOE_KINDS.items()]
    cases += [(arch, f"{arch}-nas", kind, recipe, dict(intermediate_size=256))
              for arch in NAS_ARCHS for kind, recipe in NAS_KINDS.items()]
    # Multimodal sources keep their vision tower only in a stock output. Gemma 3 only: a Mistral 3 vision config as
    # transformers 5.24 writes it (Pixtral's axial RoPE) does not load in 5.0.0, the source no more than the output.
    cases += [("gemma3", "gemma3", "stock", KINDS["stock"], {})]
    for arch, source, kind, recipe, overrides in cases:
        src = root / "sources" / source
        if not src.exists():
            make_multimodal(src, arch) if arch in MULTIMODAL_CONFIGS else make_tiny(src, arch, **overrides)
        out = root / f"{arch}-{kind}"
        if (out / EXPECT).exists():
            outputs.append(out)
            continue
        shutil.rmtree(out, ignore_errors=True)  # an earlier run stopped before writing its answers
        plan = convert(src, out, fmt="nemotron-nas" if kind in NAS_KINDS else None, **recipe)
        reference = apply_plan(load_model(src), plan)
        greedy = greedy_no_cache(reference, PROMPT, NEW_TOKENS)
        save_file({"ids": PROMPT.contiguous(), "greedy": greedy.contiguous(),
                   "logits": reference(input_ids=greedy).logits.contiguous()}, str(out / EXPECT))
        outputs.append(out)
    return outputs
