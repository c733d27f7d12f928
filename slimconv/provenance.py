"""What each export inside an output folder was made from, and whether that is still the folder's own weights.

Every export records the sha256 of the weights it was written from (``weights_sha256`` of the folder):
a GGUF file in its metadata under ``slimconv.weights_sha256``, an ONNX folder in its
slimconv_onnx_report.json. An export whose record names other weights is *stale*: an engine loads and runs
it, but it computes another model than the folder's card describes. ``push`` refuses one, ``validate``
and ``bench`` warn or refuse; an export written before the record existed is *unrecorded* and only warned
about, since nothing says it is wrong.
"""
from dataclasses import dataclass
from pathlib import Path

from .errors import SlimError
from .outdir import ONNX_REPORT_FILE, read_json
from .source import weights_sha256

GGUF_KEY = "slimconv.weights_sha256"
ONNX_KEY = "weights_sha256"


@dataclass(frozen=True)
class Export:
    path: Path          # a .gguf file, or an ONNX folder (the one holding model.onnx)
    kind: str           # "gguf" or "onnx"
    recorded: str | None
    own: str            # the folder's own weights' sha256

    @property
    def status(self) -> str:
        return "unrecorded" if self.recorded is None else "own" if self.recorded == self.own else "stale"


def gguf_record(path: Path) -> str | None:
    """The weights hash a GGUF file records, or None (an export older than the record, or not slimconv's)."""
    from gguf import GGUFReader

    try:
        field = GGUFReader(str(path), "r").fields.get(GGUF_KEY)
    except (ValueError, OSError) as e:
        raise SlimError(f"{path} is not a readable GGUF file ({e})", "delete it, or export it again") from None
    return None if field is None else bytes(field.parts[field.data[0]]).decode()


def onnx_record(folder: Path) -> str | None:
    report = folder / ONNX_REPORT_FILE
    return read_json(report).get(ONNX_KEY) if report.is_file() else None


def _hidden(path: Path, root: Path) -> bool:
    return any(p.startswith(".") for p in path.relative_to(root).parts)


def find_exports(out) -> list[Export]:
    """Every GGUF file and ONNX folder under output folder ``out`` (hidden in-progress names skipped), with what
    each records and the folder's own weights' hash."""
    out = Path(out)
    own = weights_sha256(out)
    found = [Export(p, "gguf", gguf_record(p), own) for p in sorted(out.rglob("*.gguf")) if not _hidden(p, out)]
    found += [Export(p.parent, "onnx", onnx_record(p.parent), own)
              for p in sorted(out.rglob("model.onnx")) if not _hidden(p, out)]
    return found


def reexport_command(export: Export, out: Path) -> str:
    if export.kind == "onnx":
        place = "" if export.path == out / "onnx" else f" -o {export.path}"
        return f"slimconv export {out}{place}"
    dtype = export.path.stem.rpartition("-")[2]
    return f"slimconv export {out} --format gguf --dtype {dtype if dtype else 'DTYPE'}"


def stale_message(export: Export, out: Path) -> tuple[str, str]:
    """(problem, fix) for a stale export."""
    return (f"{export.path} was exported from other weights than {out}'s own (it records sha256 "
            f"{export.recorded[:12]}, the folder's weights are {export.own[:12]}): it would run another model "
            "than this folder's card describes",
            f"delete it{' (rm -r)' if export.kind == 'onnx' else ''}, then export again from this folder: "
            f"`{reexport_command(export, out)}`")


def unrecorded_message(export: Export) -> str:
    return (f"{export.path} records no weights hash (exported by an older slimconv, or not by slimconv): cannot "
            "tell whether it was made from this folder's weights; export it again to be sure")
