"""GGUF k-quants (Q4_K_M, Q5_K_M, Q6_K) by llama.cpp's own quantiser, with an importance matrix.

The quantiser is llama.cpp's ``llama_model_quantize``, called through llama-cpp-python (the optional
``slimconv[gguf]`` dependency, the same build the GGUF tests run): the `gguf` library's numpy quantisers stop at
q8_0/q4_0, and the k-quant mixes (which tensors get which type, Q6_K for the output head) are llama.cpp's own
rules, so they are what llama-quantize makes. slimconv writes the f32 GGUF first (``gguf_export``), then llama.cpp
quantises it.

The importance matrix is llama.cpp's statistic (tools/imatrix): for every weight matrix of a block, the sum over
the calibration tokens of each input column's squared activation, and the token count; the quantiser weighs each
column's rounding error by their ratio. slimconv computes it in PyTorch with forward hooks on the output's own
model (the GGUF computes the same function: tests/test_gguf.py), because llama-cpp-python does not expose the
evaluation callback llama-imatrix collects through. It is written beside the GGUF in llama.cpp's imatrix format
(``<name>.imatrix.gguf``: ``<tensor>.in_sum2`` and ``<tensor>.counts``, readable by ``llama-quantize --imatrix``),
and ``--imatrix FILE`` reads that format back, from llama-imatrix too.
"""
import ctypes
import re
from pathlib import Path

import numpy as np

from ..errors import SlimError

KQUANTS = ("q4_k_m", "q5_k_m", "q6_k")
LLAMACPP_FIX = ("install llama-cpp-python, llama.cpp's quantiser (`pip install 'slimconv[gguf]'`, built from source: "
                "about 20 minutes on 2 cores; or `SLIMCONV_LLAMACPP=1 ./setup.sh`)")
# Which activation a block's GGUF matrix multiplies: the attention input (q, k, v), the attention's output (o),
# the MLP input (gate, up; Phi-3's fused ffn_up), the MLP's inner activation (down).
_READS = {"attn_q": "attn", "attn_k": "attn", "attn_v": "attn", "attn_qkv": "attn", "attn_output": "o",
          "ffn_gate": "mlp", "ffn_up": "mlp", "ffn_down": "down"}
# The same, by the Linear module of a decoder layer (slim, stock and nemotron-nas models alike).
_MODULES = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "qkv_proj": "attn", "o_proj": "o",
            "gate_proj": "mlp", "up_proj": "mlp", "gate_up_proj": "mlp", "down_proj": "down"}
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:.*\.)?([a-z_]+)$")


def llamacpp():
    try:
        import llama_cpp
    except ImportError:
        raise SlimError("the GGUF k-quants are made by llama.cpp's quantiser, and llama_cpp (llama-cpp-python) is not "
                        "importable here", LLAMACPP_FIX) from None
    return llama_cpp


def open_gguf(path, **kwargs):
    """``llama_cpp.Llama(model_path=path, **kwargs)`` with llama.cpp's weight repacking off (``use_extra_bufts``,
    which Llama's constructor does not take). The repacked CPU kernels segfault on the first q4_0 decode on some
    AVX-512 CPUs (this project's VMs, llama-cpp-python 0.3.36); repacking only lays weights out for faster kernels,
    so without it the file computes the same, somewhat slower. Every GGUF slimconv runs goes through here."""
    llama_cpp = llamacpp()
    module = llama_cpp.llama.llama_cpp  # the name Llama's constructor reads the defaults through
    defaults = module.llama_model_default_params

    def without_repacking():
        params = defaults()
        params.use_extra_bufts = False
        return params

    module.llama_model_default_params = without_repacking
    try:
        return llama_cpp.Llama(model_path=str(path), **kwargs)
    finally:
        module.llama_model_default_params = defaults


def check_request(dtype: str, imatrix: str | None, key: str = "--imatrix") -> None:
    """Refuses, before any work, an importance matrix for a precision that takes none, a k-quant without llama.cpp's
    quantiser, and an imatrix file that is not there."""
    if imatrix not in (None, "none") and dtype not in KQUANTS:
        raise SlimError(f"{key} applies to the k-quants ({', '.join(KQUANTS)}), not to {dtype}",
                        f"leave out {key}, or pick a k-quant")
    if dtype in KQUANTS:
        llamacpp()
        if imatrix not in (None, "auto", "none") and not Path(imatrix).is_file():
            raise SlimError(f"{key} {imatrix}: no such file", "give an imatrix .gguf file, auto or none")


def collect(model, windows, device) -> dict[tuple[int, str], tuple[np.ndarray, int]]:
    """(layer, activation kind) -> (per input column, the sum of its squares over every token; the token count),
    over the calibration ``windows`` (a batch x seq_len tensor of ids), one window at a time."""
    import torch

    sums: dict[tuple[int, str], list] = {}
    hooks = []

    def hook(key):
        def record(module, args):
            x = args[0].detach().to(torch.float64).reshape(-1, args[0].shape[-1])
            entry = sums.setdefault(key, [torch.zeros(x.shape[-1], dtype=torch.float64), 0])
            if key not in seen:  # q, k and v (gate and up) read one input: counted once per forward
                entry[0] += x.pow(2).sum(0).cpu()
                entry[1] += x.shape[0]
                seen.add(key)
        return record

    for name, module in model.named_modules():
        m = _LAYER.search(name)
        if isinstance(module, torch.nn.Linear) and m and m.group(2) in _MODULES and ".experts." not in name:
            hooks.append(module.register_forward_pre_hook(hook((int(m.group(1)), _MODULES[m.group(2)]))))
    try:
        with torch.no_grad():
            for row in windows:
                seen: set = set()
                model(input_ids=row[None].to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {k: (v[0].numpy(), v[1]) for k, v in sums.items()}


def for_tensors(stats: dict, names: list[str]) -> dict[str, tuple[np.ndarray, int]]:
    """The statistic of every GGUF block matrix in ``names`` that ``stats`` has (llama-imatrix's keys: the tensor
    names)."""
    out = {}
    for name in names:
        m = re.fullmatch(r"blk\.(\d+)\.([a-z_]+)\.weight", name)
        if m and m.group(2) in _READS and (int(m.group(1)), _READS[m.group(2)]) in stats:
            out[name] = stats[(int(m.group(1)), _READS[m.group(2)])]
    return out


def write_imatrix(path: Path, entries: dict, dataset: str, chunks: int, chunk_size: int, extra: dict) -> None:
    """``entries`` (tensor -> (sums, count)) in llama.cpp's imatrix file format, with the string keys ``extra``."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "imatrix")
    writer.add_string("general.type", "imatrix")
    for key, value in extra.items():
        writer.add_string(key, value)
    writer.add_array("imatrix.datasets", [dataset])
    writer.add_uint32("imatrix.chunk_count", chunks)
    writer.add_uint32("imatrix.chunk_size", chunk_size)
    for name in sorted(entries):
        sums, count = entries[name]
        writer.add_tensor(f"{name}.in_sum2", np.asarray(sums, dtype=np.float32)[None, :])
        writer.add_tensor(f"{name}.counts", np.array([[count]], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def read_imatrix(path: Path) -> dict[str, tuple[np.ndarray, int]]:
    """An imatrix file in llama.cpp's GGUF format (written by slimconv or llama-imatrix) as tensor -> (sums, count);
    one of experts (several counts) is refused, as GGUF export writes no experts."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except (OSError, ValueError) as e:
        raise SlimError(f"--imatrix {path}: not an imatrix in llama.cpp's GGUF format ({type(e).__name__}: {e})",
                        "give a .gguf imatrix (llama-imatrix writes one; an old .dat converts with `llama-imatrix "
                        "--in-file OLD.dat -o NEW.gguf`), or --imatrix auto") from None
    tensors = {t.name: np.asarray(t.data, dtype=np.float32).reshape(-1) for t in reader.tensors}
    out = {}
    for name, sums in tensors.items():
        if name.endswith(".in_sum2"):
            base = name[: -len(".in_sum2")]
            counts = tensors.get(base + ".counts")
            if counts is None or len(counts) != 1:
                raise SlimError(f"--imatrix {path}: {base} has {'no counts' if counts is None else 'counts per expert'}",
                                "give an imatrix of this model's dense GGUF, or --imatrix auto")
            out[base] = (sums, int(counts[0]))
    if not out:
        raise SlimError(f"--imatrix {path} holds no importance matrix (no <tensor>.in_sum2 entries)",
                        "give a file written by llama-imatrix or slimconv, or --imatrix auto")
    return out


def quantize(f32: Path, out: Path, dtype: str, entries: dict | None, threads: int) -> None:
    """``f32`` quantised by llama.cpp into ``out`` as ``dtype`` (a KQUANTS name), weighted by ``entries``."""
    llama_cpp = llamacpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, "q5_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M,
                    "q6_k": llama_cpp.LLAMA_FTYPE_MOSTLY_Q6_K}[dtype]
    params.nthread = threads
    keep = []  # the buffers llama.cpp reads, alive until it returns
    if entries:
        table = (llama_cpp.llama_model_imatrix_data * (len(entries) + 1))()  # the last one (name NULL) ends it
        for k, (name, (sums, count)) in enumerate(sorted(entries.items())):
            values, encoded = np.ascontiguousarray(sums / max(count, 1), dtype=np.float32), name.encode()
            keep += [values, encoded]
            table[k].name = encoded
            table[k].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            table[k].size = values.size
        params.imatrix = ctypes.cast(table, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    if llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama.cpp's quantiser failed on {f32} (its log above says why)")


def _tensor_names(path: Path) -> list[str]:
    import gguf

    return [t.name for t in gguf.GGUFReader(path).tensors]


def check_imatrix(entries: dict, f32: Path, given) -> None:
    """An imatrix given as a file must be of this model: every entry a block matrix of the file, of its width."""
    import gguf

    widths = {t.name: int(t.shape[0]) for t in gguf.GGUFReader(f32).tensors}
    foreign = [n for n in entries if n not in widths]
    wrong = [n for n, (sums, _) in entries.items() if n in widths and len(sums) != widths[n]]
    if foreign or wrong:
        what = (f"names {foreign[0]}, which this model's GGUF does not have" if foreign else
                f"gives {wrong[0]} {len(entries[wrong[0]][0])} columns, the model {widths[wrong[0]]}")
        raise SlimError(f"--imatrix {given} is not of this model: it {what}",
                        "compute it on this output (--imatrix auto), or pass --imatrix none")


def auto_imatrix(slim_dir: Path, f32: Path, target: Path, calib: str, samples: int, seq_len: int,
                  force: bool) -> dict:
    """The importance matrix of this output on ``calib``: the one at ``target`` when it records these weights and
    this calibration, else computed (and written there)."""
    import gguf

    from ..data import calibration_ids
    from ..provenance import GGUF_KEY
    from ..report import console
    from ..runtime import load_model, pick_device
    from ..source import weights_sha256

    wanted = {GGUF_KEY: weights_sha256(slim_dir), "slimconv.imatrix_calibration": f"{calib}:{samples}x{seq_len}"}
    if target.is_file():
        fields = gguf.GGUFReader(target).fields
        have = {k: fields[k].contents() if k in fields else None for k in wanted}
        if have == wanted:
            console.print(f"importance matrix: reusing {target} (same weights, {wanted['slimconv.imatrix_calibration']})")
            return read_imatrix(target)
        if not force:
            raise SlimError(f"{target} is an importance matrix of other weights or calibration", "pass --force to "
                            "compute it again, or --imatrix FILE / none")
    device = pick_device("auto")
    console.print(f"importance matrix: {samples} windows of {seq_len} tokens of {calib} on {device} ...")
    windows = calibration_ids(slim_dir, calib, samples, seq_len, seed=0)
    model = load_model(slim_dir).to(device)
    entries = for_tensors(collect(model, windows, device), _tensor_names(f32))
    del model
    tmp = target.with_name(f".{target.name}.tmp")
    write_imatrix(tmp, entries, calib, samples, seq_len, wanted)
    tmp.replace(target)
    console.print(f"importance matrix: wrote {target} ({len(entries)} tensors; llama-quantize --imatrix reads it)")
    return entries
