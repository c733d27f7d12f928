"""Validation at the precision users deploy: the slim output and its source, quantised alike to GGUF and run by
llama.cpp, scored on held-out text of two domains against the float source (`slimconv validate --deployed`).

Slimming and quantisation add up in speed but compound in quality loss, so the slim model's float quality says
little about the file a user runs. Both models go through the same export (`slimconv export --format gguf`,
k-quants weighted by each model's own importance matrix), so the ratio at one precision is the cost of the
slimming as deployed. The source's files are made once per weights and precision, in the cache.
"""
import math
import os
import shutil
from pathlib import Path

import torch

from .errors import SlimError
from .outdir import CONFIG_FILE, DEPLOYED_FILE, write_json
from .recipe import DEPLOYED_DTYPES


def llama(path: Path, n_ctx: int):
    """``path`` loaded by llama.cpp for scoring every position (float32 KV cache, so that only the weights are
    quantised)."""
    from .formats.kquant import llamacpp, open_gguf

    llama_cpp = llamacpp()
    return open_gguf(path, n_ctx=n_ctx + 8, n_batch=512, logits_all=True, verbose=False,
                     n_threads=os.cpu_count() or 1, type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)


def llama_logprobs(model, ids: list[int]) -> torch.Tensor:
    """Next-token log-probabilities at every position of ``ids`` (a len(ids) x vocab float32 tensor)."""
    import numpy as np

    model.reset()
    model.eval(ids)
    return torch.log_softmax(torch.from_numpy(np.array(model.scores[: len(ids)], dtype=np.float32)), -1)


class Totals:
    """Summed NLL of the next tokens and KL from each reference, over the positions seen so far."""

    def __init__(self):
        self.nll, self.kl, self.count = 0.0, {}, 0

    def add(self, logp: torch.Tensor, ids: torch.Tensor, references: dict[str, torch.Tensor]):
        lp = logp[:-1]
        self.nll -= lp.gather(-1, ids[1:, None]).sum().item()
        for name, ref in references.items():
            r = ref[:-1]
            self.kl[name] = self.kl.get(name, 0.0) + (r.exp() * (r - lp)).sum().item()
        self.count += len(ids) - 1

    def result(self) -> dict:
        return dict(ppl=math.exp(self.nll / self.count), **{f"kl_{k}": v / self.count for k, v in self.kl.items()})


def own_gguf(out: Path, dtype: str) -> Path:
    """The output's own GGUF at ``dtype``, what `slimconv export` writes and a user deploys. One of other weights
    is refused, since its scores would describe another model; a missing one is exported by ``run_deployed``."""
    from .provenance import Export, gguf_record, reexport_command, stale_message
    from .source import weights_sha256

    path = out / "gguf" / f"{out.name}-{dtype}.gguf"
    if not path.is_file():
        return path
    export = Export(path, "gguf", gguf_record(path), weights_sha256(out))
    if export.status == "stale":
        raise SlimError(*stale_message(export, out))
    if export.status == "unrecorded":
        raise SlimError(f"{path} records no weights (an older slimconv wrote it): cannot tell that it is this "
                        "folder's model", f"export it again: `{reexport_command(export, out)} --force`")
    return path


def export_missing(out: Path, path: Path, dtype: str) -> Path:
    from .formats.gguf_export import run_gguf_export
    from .report import console

    if not path.is_file():
        console.print(f"{path} is missing: exporting it now (as `slimconv export {out} --format gguf --dtype {dtype}` "
                      "would)")
        run_gguf_export(out, dtype=dtype)
    return path


def source_gguf(src_dir: Path, dtype: str) -> Path:
    """The source quantised exactly as a slim output is (same exporter, its own importance matrix for a
    k-quant), made once per source weights and precision in the cache."""
    from .formats.gguf_export import run_gguf_export
    from .report import console
    from .source import cache_key, cache_root, cached

    key = f"gguf-deployed-{dtype}-{cache_key(sorted(src_dir.glob('*.safetensors'))[0])}"
    if not (cache_root() / key / CONFIG_FILE).is_file():
        console.print(f"quantising the source {src_dir} to {dtype} once, into {cache_root() / key}")

    def build(tmp: Path):
        run_gguf_export(src_dir, tmp, dtype)
        shutil.copy(src_dir / CONFIG_FILE, tmp / CONFIG_FILE)  # the mark of a complete cache entry

    folder = cached(key, build)
    return next(p for p in folder.glob(f"*-{dtype}.gguf"))


def check_dtypes(dtypes: list[str]) -> None:
    """Every refusal before work starts: a precision slimconv cannot deploy, or llama.cpp missing."""
    from .formats.kquant import llamacpp

    wrong = [d for d in dtypes if d not in DEPLOYED_DTYPES]
    if wrong:
        raise SlimError(f"--deployed {wrong[0]}: not a quantised GGUF precision", "pick from "
                        f"{', '.join(DEPLOYED_DTYPES)} (float quality is validate's own check)")
    llamacpp()


@torch.no_grad()
def run_deployed(out: Path, src_dir: Path, dtypes: list[str], data: str, samples: int, seq_len: int,
                 trust_remote_code: bool = False) -> dict:
    """Perplexity of source and slim, float and at each of ``dtypes``, on ``samples`` x ``seq_len`` tokens of
    ``data`` (test split) and of the King James text, with the KL of each from the float source and of the slim
    file from the source file of the same precision. Writes OUTPUT/slimconv_deployed.json."""
    from tqdm import tqdm

    from .data import kjv, load_text, token_chunks
    from .report import console
    from .runtime import load_model, load_tokenizer
    from .source import weights_sha256

    check_dtypes(dtypes)
    own = {d: own_gguf(out, d) for d in dtypes}  # a stale file is refused before anything is quantised
    files = {d: {"source": source_gguf(src_dir, d), "slim": export_missing(out, own[d], d)} for d in dtypes}
    tokenizer = load_tokenizer(out)
    texts = {f"{data} (test)": token_chunks(tokenizer, load_text(data, "test"), samples, seq_len),
             "King James": token_chunks(tokenizer, kjv(), samples, seq_len)}
    source, slim = load_model(src_dir, trust_remote_code), load_model(out)
    slim.config.early_exit_enabled = False
    engines = {(d, who): llama(path, seq_len) for d, pair in files.items() for who, path in pair.items()}
    console.print(f"deployed precision: {', '.join(dtypes)} in llama.cpp against the float source, "
                  f"{samples} x {seq_len} tokens of each of {', '.join(texts)}")
    results = {}
    try:
        for text, chunks in texts.items():
            totals = {key: Totals() for key in [("float", "source"), ("float", "slim"), *engines]}
            for ids in tqdm(chunks, desc=f"deployed: {text}", unit="window", disable=None):
                float_src = torch.log_softmax(source(input_ids=ids[None], use_cache=False).logits[0].float(), -1)
                totals[("float", "source")].add(float_src, ids, {})
                totals[("float", "slim")].add(
                    torch.log_softmax(slim(input_ids=ids[None], use_cache=False).logits[0].float(), -1), ids,
                    {"float_source": float_src})
                for d in dtypes:
                    quant_src = llama_logprobs(engines[(d, "source")], ids.tolist())
                    totals[(d, "source")].add(quant_src, ids, {"float_source": float_src})
                    totals[(d, "slim")].add(llama_logprobs(engines[(d, "slim")], ids.tolist()), ids,
                                            {"float_source": float_src, "same_precision_source": quant_src})
            results[text] = {p: {"source": totals[(p, "source")].result(), "slim": totals[(p, "slim")].result()}
                             for p in ["float", *dtypes]}
    finally:
        for engine in engines.values():
            engine.close()
    record = dict(weights_sha256=weights_sha256(out), engine="llama.cpp (float32 KV cache)", samples=samples,
                  seq_len=seq_len, texts=results,
                  files={d: {who: dict(file=str(p), mb=p.stat().st_size / 1e6) for who, p in pair.items()}
                         for d, pair in files.items()})
    write_json(out / DEPLOYED_FILE, record)
    return record
