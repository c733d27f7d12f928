"""Held-out text for validation: WikiText-2 (shipped with slimconv), a local file, or a Hub dataset; and a
second text of another domain (the King James Genesis and Exodus, public domain, shipped too)."""
import gzip
import os
from pathlib import Path

from .errors import SlimError


def wikitext(split: str) -> str:
    """WikiText-2's ``split``: from ``$SLIMCONV_DATA_DIR/wikitext-2/{split}.txt`` when set, else the packaged copy."""
    override = os.environ.get("SLIMCONV_DATA_DIR")
    if override:
        path = Path(override) / "wikitext-2" / f"{split}.txt"
        if not path.is_file():
            raise SlimError(f"SLIMCONV_DATA_DIR is set but {path} does not exist",
                            "point SLIMCONV_DATA_DIR at a folder holding wikitext-2/valid.txt and test.txt, "
                            "or unset it to use the copy shipped with slimconv")
        return path.read_text(encoding="utf-8")
    path = Path(__file__).resolve().parent / "data" / "wikitext-2" / f"{split}.txt.gz"
    if not path.is_file():
        raise SlimError(f"the WikiText-2 copy shipped with slimconv is missing ({path})",
                        "reinstall slimconv, or set SLIMCONV_DATA_DIR to a folder holding wikitext-2/")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return f.read()


def kjv() -> str:
    """Genesis and Exodus of the King James Version (public domain; data/kjv/README.md): archaic narrative
    prose, far from WikiText's encyclopedia articles. For evaluation only; it has no splits."""
    path = Path(__file__).resolve().parent / "data" / "kjv" / "genesis-exodus.txt.gz"
    if not path.is_file():
        raise SlimError(f"the King James text shipped with slimconv is missing ({path})", "reinstall slimconv")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return f.read()


def load_text(spec: str, split: str = "test") -> str:
    """``wikitext2`` (split valid or test), ``kjv`` (one text, any split), ``hf:NAME[:CONFIG]`` (needs network
    and `datasets`), or a file."""
    if spec == "wikitext2":
        return wikitext(split)
    if spec == "kjv":
        return kjv()
    if spec.startswith("hf:"):
        try:
            import datasets
        except ImportError:
            raise SlimError("a Hub dataset needs the `datasets` package", "pip install datasets") from None
        name, _, config = spec[3:].partition(":")
        try:
            ds = datasets.load_dataset(name, config or None, split="validation" if split == "valid" else split)
        except Exception as e:  # datasets raises many unrelated types for a missing name or no network
            raise SlimError(f"could not load dataset {name!r}: {e}", "check the name and your network") from None
        column = "text" if "text" in ds.column_names else ds.column_names[0]
        return "\n".join(ds[column])
    check_text(spec)
    return Path(spec).read_text(encoding="utf-8")


def check_text(spec: str, key: str = "data") -> None:
    """Refuses a text ``spec`` (as ``load_text`` takes it) that names no existing file; ``key`` is where the
    user wrote it. Cheap, so `run` calls it before any stage works."""
    if spec in ("wikitext2", "kjv") or spec.startswith("hf:") or Path(spec).is_file():
        return
    raise SlimError(f"{key} {spec!r} is not 'wikitext2', 'kjv', 'hf:NAME' or an existing text file",
                    f"correct the path in {key}, or use wikitext2")


def check_training(spec: str, key: str = "heal.data") -> None:
    """Refuses heal training data ``spec`` (texts as ``check_text`` takes them, or ``generated``, joined by
    ``+`` to mix) that names a missing file, or the out-of-domain evaluation text."""
    for part in spec.split("+"):
        if part == "kjv":
            raise SlimError(f"{key} {spec!r}: kjv is heal's out-of-domain evaluation text, never training data",
                            "train on wikitext2 (its valid split), generated, a text file or hf:NAME")
        if part != "generated":
            check_text(part, key)


def describe_training(spec: str, generated_windows: int | None) -> str:
    """Heal's training data as a person reads it: "WikiText-2 valid + 64 windows sampled from the source"."""
    names = {"wikitext2": "WikiText-2 valid", "generated": f"{generated_windows} windows sampled from the source"}
    return " + ".join(names.get(part, part) for part in spec.split("+"))


def token_chunks(tokenizer, text: str, samples: int, seq_len: int):
    """The first ``samples`` non-overlapping windows of ``seq_len`` tokens (deterministic)."""
    import torch

    ids = tokenizer(text[: samples * seq_len * 12], return_tensors="pt").input_ids[0]
    n = min(samples, len(ids) // seq_len)
    if n == 0:
        raise SlimError(f"the text has only {len(ids)} tokens, fewer than one sequence of {seq_len}",
                        "use longer text or a smaller seq_len")
    return ids[: n * seq_len].view(n, seq_len).to(torch.long)


def calibration_ids(src_dir: Path, calib: str, samples: int, seq_len: int, seed: int):
    """``samples`` windows of ``seq_len`` tokens (a samples x seq_len tensor) at seeded random offsets of
    the calibration text (the valid split for WikiText-2), as SLEB samples its calibration set."""
    import torch

    from .runtime import load_tokenizer

    try:
        tok = load_tokenizer(src_dir)
    except (OSError, ValueError) as e:
        raise SlimError(f"no tokenizer in {src_dir}: {e}", "analyse a checkpoint that ships its tokenizer files") from None
    ids = tok(load_text(calib, "valid"), return_tensors="pt").input_ids[0]
    if len(ids) < seq_len + 1:
        raise SlimError(f"the calibration text has {len(ids)} tokens, fewer than one window of {seq_len}",
                        "use a longer text or a smaller --seq-len")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len, (samples,), generator=g)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])
