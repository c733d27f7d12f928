"""GPTQ (Frantar et al. 2022, arXiv:2210.17323) into MatMulNBits' int4 blocks: ``slimconv export --dtype int4
--int4-algorithm gptq``.

Round to nearest (rtn) rounds every weight on its own. GPTQ rounds the columns (input dimensions) of a linear
layer one at a time and moves each column's rounding error onto the columns not yet rounded, through the inverse
Hessian of the layer's reconstruction error ``H = 2 X^T X`` (X: the layer's inputs on calibration text), so that
the layer's *output* ``X W^T`` changes least. Here:

- H per linear layer from forward pre-hooks on the output's own PyTorch model (``runtime.load_model``) over
  ``CALIBRATION`` windows of WikiText-2 *valid* (``data.calibration_ids``): the inputs the float model gives
  each layer (not the sequential variant that feeds quantised layers forward). Layers that read one tensor
  (q/k/v, gate/up) share one H. Dampening: 1% of H's mean diagonal (``DAMP``); a column whose input is always
  zero gets H = 1 there (rounded to nearest, no error pushed from it).
- The blocks are the graph's own: ``block`` weights along K per scale, asymmetric (a zero point each) or
  symmetric, each block's scale and zero point chosen exactly as ONNX Runtime's round to nearest chooses them
  (MLAS ``range2scalezp`` / ``range2scale``), from the block's weights *as updated* when GPTQ reaches its first
  column ("static groups" off). With H = identity nothing moves and the result is bit for bit ONNX Runtime's
  rtn (tests/test_export.py).
- The error compensation uses the upper Cholesky factor of H^-1, column by column inside lazy batches of 128
  columns (the reference implementation's update, order of columns unchanged: no act-order).

The result of a layer is its blocks in ``onnx_graph.quantize_int4``'s layout, computed once per export
(``quantize_model``) and used by both the graph writer and the export check's PyTorch reference
(``onnx_export._int4_rounded``), so the check judges the graph against exactly the weights it holds. A
mixture of experts' experts are not GPTQ'd (each would need a Hessian of its routed tokens only): they stay
rounded to nearest (``onnx_graph.experts_algorithm``).
"""
import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import SlimError

# Calibration: windows of WikiText-2 valid (the text slimconv calibrates everything on; held out from the test split
# every quality figure is measured on), seeded offsets.
CALIBRATION = dict(text="wikitext2", samples=8, seq_len=256, seed=0)
DAMP = 0.01  # of the mean diagonal of H, added to the diagonal (the reference implementation's percdamp)
LAZY = 128  # columns per lazy batch update
ROWS = 4096  # rows rounded at a time (rows are independent): a lazy batch of them stays in cache
# Hessians held at once (float32): a model whose Hessians exceed this is calibrated in several passes over the
# windows, each for a contiguous run of layers.
HESSIAN_BUDGET = 2 << 30


@dataclass
class Int4Blocks:
    """One (N, K) weight's MatMulNBits blocks, as ``onnx_graph.quantize_int4`` returns them: ``packed``
    (N, blocks, block/2) uint8, ``scales`` (N, blocks) float32, ``zero_points`` (N, ceil(blocks/2)) uint8 (0s, unused,
    when symmetric), plus ``sha1`` of the float32 weight they were made from (the graph checks it reads that weight)."""

    packed: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray
    sha1: str

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.packed, self.scales, self.zero_points


def weight_sha1(weight: torch.Tensor) -> str:
    return hashlib.sha1(weight.detach().to(torch.float32).contiguous().numpy().tobytes()).hexdigest()


def decode(packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, k: int, symmetric: bool) -> torch.Tensor:
    """The (N, K) float32 weight MatMulNBits computes with from its blocks: (level - zero point) x scale."""
    n, blocks, half = packed.shape
    q = np.stack([packed & 15, packed >> 4], -1).reshape(n, blocks, 2 * half).astype(np.float32)
    zp = np.stack([zero_points & 15, zero_points >> 4], -1).reshape(n, -1)[:, :blocks].astype(np.float32)
    w = (q - (8.0 if symmetric else zp[..., None])) * scales[..., None]
    return torch.from_numpy(np.ascontiguousarray(w.reshape(n, -1)[:, :k]))


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """C's roundf: halves away from zero (torch.round rounds them to even)."""
    t = torch.trunc(x)
    return t + torch.where((x - t).abs() >= 0.5, torch.sign(x), torch.zeros_like(x))


def _block_params(w: torch.Tensor, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of the float32 block ``w`` (N, <= block), the scale and the zero point ONNX Runtime's round to
    nearest picks (MLAS range2scalezp: the range widened to hold 0, 15 steps, the zero point rounded and clamped;
    range2scale: the value of largest magnitude maps to -8, zero point 8)."""
    lo, hi = w.min(1).values, w.max(1).values
    if symmetric:
        scale = torch.where(hi.abs() > lo.abs(), hi, lo) / -8.0
        return scale, torch.full_like(scale, 8.0)
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    scale = (hi - lo) / 15.0
    zp = torch.where(scale != 0, 0.0 - lo / torch.where(scale != 0, scale, torch.ones_like(scale)), lo)
    zp = torch.where(zp < 0, 0.0, torch.where(zp > 15, 15.0, _roundf(zp)))
    return scale, zp


def _reciprocal(scale: torch.Tensor) -> torch.Tensor:
    """1 / scale as MLAS computes it, 0 for a zero scale: levels are roundf(w x reciprocal + zero point)."""
    return torch.where(scale != 0, 1.0 / torch.where(scale != 0, scale, torch.ones_like(scale)), torch.zeros_like(scale))


def _pack(levels: torch.Tensor, scales: torch.Tensor, zps: torch.Tensor, block: int, symmetric: bool) -> tuple:
    """``quantize_int4``'s layout from levels (N, K), scales and zero points (N, blocks); padding levels of a short
    last block are its zero point (what MLAS writes for the zeros it pads with); symmetric blocks' zero-point bytes
    are 0, unused (as ``quantize_int4`` returns them)."""
    n, k = levels.shape
    blocks = scales.shape[1]
    full = zps.repeat_interleave(block, 1).to(torch.uint8).numpy()
    full[:, :k] = levels.to(torch.uint8).numpy()
    full = full.reshape(n, blocks, block)
    packed = full[..., 0::2] | (full[..., 1::2] << 4)
    z = zps.to(torch.uint8).numpy()
    if blocks % 2:
        z = np.concatenate([z, np.full((n, 1), 8, np.uint8)], 1)  # as MLAS pads the last byte
    z = z[:, 0::2] | (z[:, 1::2] << 4)
    return packed, scales.numpy().astype(np.float32), np.zeros_like(z) if symmetric else z


def rtn(weight: torch.Tensor, block: int, symmetric: bool) -> tuple:
    """Round to nearest by this module's emulation of ONNX Runtime's (``gptq`` with H = identity): the tests
    hold it to ``quantize_int4(..., "rtn")`` bit for bit."""
    return gptq(weight, None, block, symmetric)


@torch.no_grad()
def gptq(weight: torch.Tensor, hessian: torch.Tensor | None, block: int, symmetric: bool, damp: float = DAMP) -> tuple:
    """The (N, K) ``weight`` GPTQ-rounded into ``quantize_int4``'s blocks, for inputs whose ``hessian`` (K, K)
    (``X^T X``, any positive scale) it was collected on; None: no error compensation (round to nearest)."""
    w = weight.detach().to(torch.float32).clone()
    n, k = w.shape
    blocks = -(-k // block)
    if hessian is not None:
        h = hessian.to(torch.float64).clone()
        dead = torch.diagonal(h) <= 0
        h[dead, dead] = 1.0
        mean = torch.diagonal(h).mean()
        for attempt in range(4):  # a numerically singular H gets 10x the dampening, up to 3 times
            damped = h + damp * 10**attempt * mean * torch.eye(k, dtype=torch.float64)
            factor, info = torch.linalg.cholesky_ex(damped)
            if not info:
                break
        else:
            raise SlimError(f"gptq: the calibration inputs' Hessian of a ({n}, {k}) weight is not positive definite "
                            "even with 1000x the dampening", "use --int4-algorithm rtn")
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(factor), upper=True).to(torch.float32)
    else:
        hinv = None
    scales, zps = torch.zeros(n, blocks), torch.zeros(n, blocks)
    levels = torch.zeros(n, k)
    for r in range(0, n, ROWS):
        rows = slice(r, min(r + ROWS, n))
        _gptq_rows(w[rows], hinv, block, symmetric, levels[rows], scales[rows], zps[rows])
    return _pack(levels, scales, zps, block, symmetric)


def _gptq_rows(w: torch.Tensor, hinv: torch.Tensor | None, block: int, symmetric: bool, levels: torch.Tensor,
               scales: torch.Tensor, zps: torch.Tensor):
    """``gptq`` of the rows ``w`` (updated in place), given the upper Cholesky factor ``hinv`` of H^-1 (None: no
    compensation), into ``levels``, ``scales`` and ``zps``."""
    k = w.shape[1]
    lazy = max(LAZY, block)  # a multiple of the block size (both powers of two): no block spans two batches
    for i1 in range(0, k, lazy):
        i2 = min(i1 + lazy, k)
        w1 = w[:, i1:i2].clone()
        q1 = torch.empty_like(w1)
        err1 = torch.empty_like(w1)
        for i in range(i2 - i1):
            col = i1 + i
            if col % block == 0:  # a block starts: its scale and zero point from its weights as updated so far
                scale, zp = _block_params(w1[:, i:i + block], symmetric)
                scales[:, col // block], zps[:, col // block] = scale, zp
                reciprocal = _reciprocal(scale)
            x = w1[:, i]
            q = _roundf(x * reciprocal + zp).clamp_(0.0, 15.0)
            q1[:, i] = q
            if hinv is not None:
                err = (x - (q - zp) * scale).div_(hinv[col, col])
                err1[:, i] = err
                w1[:, i + 1:].addr_(err, hinv[col, col + 1:i2], alpha=-1.0)
        levels[:, i1:i2] = q1
        if hinv is not None and i2 < k:
            w[:, i2:].addmm_(err1, hinv[i1:i2, i2:], alpha=-1.0)


def _one_thread(fn, *args):
    """``fn(*args)`` on one intra-op thread: GPTQ's column loop is thousands of ops on vectors of a few thousand
    values, which threads do not speed up, and on a busy machine each op's thread barrier then costs more than the op
    (measured: a 2-core VM shared with other jobs spent its time in the kernel)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(threads)


def target_linears(model, lm_head: bool = True) -> list[str]:
    """The names of the Linear modules the int4 graph holds as MatMulNBits: every one but routers, shared-expert
    gates and a mixture of experts' experts (QMoE, rounded to nearest), and the head unless ``lm_head`` is False."""
    from torch import nn

    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or ".experts." in name:
            continue
        if name.endswith((".mlp.gate", ".shared_expert_gate")) or (name == "lm_head" and not lm_head):
            continue
        names.append(name)
    return names


def hessians(model, names: list[str], windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """``X^T X`` (float32, summed over every calibration token) of the input of each Linear in ``names``, over the
    ``windows`` (samples x seq_len ids), one window at a time. Modules that read the very same tensor (q/k/v,
    gate/up) share one matrix (the same object)."""
    modules = dict(model.named_modules())
    sums: dict[str, torch.Tensor] = {}
    owner: dict[str, str] = {}  # module -> the module whose input (and matrix) it shares, decided on window 0
    hooks = []

    def hook(name):
        def record(module, args):
            x = args[0]
            if name not in owner:
                # seen holds the tensors themselves, so that no id is reused by a later tensor in this forward
                owner[name] = seen.setdefault(id(x), (x, name))[1]
            if owner[name] != name:
                return
            x = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
            if name not in sums:
                sums[name] = torch.zeros(x.shape[-1], x.shape[-1])
            sums[name].addmm_(x.t(), x)
        return record

    for name in names:
        hooks.append(modules[name].register_forward_pre_hook(hook(name)))
    try:
        with torch.no_grad():
            for row in windows:
                seen: dict = {}
                model(input_ids=row[None], use_cache=False)
                del seen
    finally:
        for h in hooks:
            h.remove()
    return {name: sums[owner[name]] for name in names if name in owner}


def calibration_windows(slim_dir, check_only: bool = False) -> torch.Tensor | None:
    """``CALIBRATION``'s windows of the output's own tokenizer; a SlimError when it has none or the text is missing
    or short. ``check_only``: only that the tokenizer loads and the text is there (cheap: nothing tokenised)."""
    from ..data import calibration_ids, load_text
    from ..runtime import load_tokenizer

    c = CALIBRATION
    try:
        if not check_only:
            return calibration_ids(slim_dir, c["text"], c["samples"], c["seq_len"], c["seed"])
        try:
            load_tokenizer(slim_dir)
        except (OSError, ValueError) as e:
            raise SlimError(f"no tokenizer in {slim_dir}: {e}") from None
        load_text(c["text"], "valid")
        return None
    except SlimError as e:
        raise SlimError(f"int4 gptq calibrates on {c['samples']} windows of {c['seq_len']} tokens of WikiText-2 "
                        f"valid, and cannot here: {e.problem}",
                        "export from a folder that holds the model's tokenizer files, or use --int4-algorithm rtn") \
            from None


def _passes(model, names: list[str]) -> list[list[str]]:
    """``names`` in runs whose Hessians (K x K float32 each; one per distinct input, counted per module here, an
    upper bound) fit ``HESSIAN_BUDGET``."""
    modules = dict(model.named_modules())
    runs, size = [[]], 0
    for name in names:
        need = modules[name].in_features ** 2 * 4
        if runs[-1] and size + need > HESSIAN_BUDGET:
            runs.append([])
            size = 0
        runs[-1].append(name)
        size += need
    return runs


def quantize_model(slim_dir, block: int, symmetric: bool, lm_head: bool = True, windows: torch.Tensor | None = None,
                   progress=None) -> dict[str, Int4Blocks]:
    """GPTQ blocks of every weight the int4 graph of ``slim_dir`` holds as MatMulNBits, by parameter name of its
    PyTorch model (``model.layers.0.self_attn.q_proj.weight``, ``lm_head.weight`` also when tied), calibrated on
    ``windows`` (default: ``calibration_windows``)."""
    from ..runtime import load_model

    if windows is None:
        windows = calibration_windows(slim_dir)
    model = load_model(slim_dir)
    model.config.early_exit_enabled = False  # every layer sees the calibration text, as the graph runs them
    names = target_linears(model, lm_head)
    modules = dict(model.named_modules())
    out = {}
    for run in _passes(model, names):
        hs = hessians(model, run, windows)
        missing = [name for name in run if name not in hs]
        if missing:
            raise SlimError(f"int4 gptq: {missing[0]} saw no calibration input (the model's forward does not run it)",
                            "use --int4-algorithm rtn")
        # Modules that read one input (q/k/v, gate/up) share H: GPTQ treats rows independently, so they are rounded
        # together, their rows stacked, and split again.
        groups: dict[int, list[str]] = {}
        for name in run:
            groups.setdefault(id(hs[name]), []).append(name)
        for group in groups.values():
            weights = [modules[name].weight.data for name in group]
            packed, scales, zero_points = _one_thread(gptq, torch.cat(weights), hs[group[0]], block, symmetric)
            start = 0
            for name, weight in zip(group, weights):
                rows = slice(start, start + len(weight))
                start += len(weight)
                out[f"{name}.weight"] = Int4Blocks(packed[rows], scales[rows], zero_points[rows], weight_sha1(weight))
            if progress:
                progress(group)
        del hs
    return out
