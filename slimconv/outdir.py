"""The output folder: the names of the files slimconv keeps in it, the check that a folder is one, its
JSON files, and AtomicDir, which builds a folder under a hidden name and renames it into place."""
import json
import os
import shutil
from pathlib import Path

from .errors import SlimError

CONFIG_FILE = "config.json"
RECIPE_FILE = "slimconv_recipe.yaml"
PLAN_FILE = "slimconv_plan.json"
REPORT_FILE = "slimconv_report.json"
BENCH_FILE = "slimconv_bench.json"
CARD_FILE = "README.md"
ONNX_DIR = "onnx"
ONNX_REPORT_FILE = "slimconv_onnx_report.json"
ONNX_REPORT = Path(ONNX_DIR) / ONNX_REPORT_FILE  # relative to the output folder


def require_output(path) -> Path:
    """``path`` as a Path if `slimconv convert` wrote it (its plan file is the mark), else a SlimError."""
    out = Path(path)
    why = ("it does not exist" if not out.exists() else "not a folder" if not out.is_dir()
           else f"no {PLAN_FILE}" if not (out / PLAN_FILE).is_file() else None)
    if why:
        raise SlimError(f"{out} is not a slimconv output ({why})",
                        "give the output.dir of a recipe that `slimconv convert` has written")
    return out


def read_json(path: Path):
    """A report or metadata file; a damaged one is a user error naming the file, not a traceback."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise SlimError(f"{path} cannot be read as JSON ({e})", "re-run the stage that wrote it") from None


def write_json(path: Path, data) -> None:
    Path(path).write_text(json.dumps(data, indent=2))


class AtomicDir:
    """A directory built under a hidden temporary name and renamed into place only when complete."""

    def __init__(self, target: Path, force: bool):
        self.target = Path(target)
        if self.target.exists() and not force:
            raise SlimError(f"output {self.target} already exists", "pass --force to overwrite it, or change output.dir")
        self.tmp = self.target.parent / f".{self.target.name}.tmp-{os.getpid()}"

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        # Leftovers of killed runs (SIGKILL skips cleanup) for this same target.
        for stale in self.target.parent.glob(f".{self.target.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        old = self.target.parent / f".{self.target.name}.old-{os.getpid()}"
        if self.target.exists():
            self.target.rename(old)
        self.tmp.rename(self.target)
        shutil.rmtree(old, ignore_errors=True)
        return False
