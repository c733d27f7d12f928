"""The output folder: the names of the files slimconv keeps in it, the check that a folder is one, its
JSON files, the rule that an output never overlaps its source, and AtomicDir, which builds a folder under
a hidden name and renames it into place."""
import fcntl
import json
import os
import re
import shutil
import sys
from contextlib import ExitStack, contextmanager
from pathlib import Path

from .errors import SlimError

CONFIG_FILE = "config.json"
RECIPE_FILE = "slimconv_recipe.yaml"
PLAN_FILE = "slimconv_plan.json"
REPORT_FILE = "slimconv_report.json"
BENCH_FILE = "slimconv_bench.json"
DEPLOYED_FILE = "slimconv_deployed.json"  # quality at the deployed precisions (`validate --deployed`)
CARD_FILE = "README.md"
HEAL_FILE = "slimconv_heal.json"       # what `heal` did and measured (only in a healed output)
HEAL_PLOT = "slimconv_heal_loss.png"   # its loss curve
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


def write_text(path: Path, text: str) -> None:
    """Writes a file whole or not at all: a reader never sees half of it, even after a crash."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, data) -> None:
    write_text(path, json.dumps(data, indent=2))


def refuse_overlap(out, keep, given_by: str = "output.dir", inside_ok: bool = False) -> None:
    """Refuses an output that is, contains or (unless ``inside_ok``) sits inside one of ``keep``, pairs of
    (path, what it is). --force replaces the output folder, so an output over its source would delete it."""
    target = Path(out).expanduser().resolve()
    for path, what in keep:
        resolved = Path(path).expanduser().resolve()
        relation = ("is" if target == resolved else "contains" if target in resolved.parents
                    else "is inside" if resolved in target.parents and not inside_ok else None)
        if relation:
            place = "outside it" if not inside_ok else "that neither is nor contains it"
            raise SlimError(f"output {out} {relation} the {what} {path}: an output folder is replaced as a whole "
                            "(--force), so it must be apart from what it is made from",
                            f"set {given_by} to a folder {place}, e.g. outputs/NAME")


def _fsync_dir(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flushes every file and folder under ``root`` to disk: renamed into place after a power loss, the
    folder must not hold files whose data never reached the disk."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(folder)


def _sibling(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.{kind}"


def _leftovers(target: Path, kind: str) -> list[Path]:
    pattern = re.compile(rf"\.{re.escape(target.name)}\.{kind}-\d+")
    return [p for p in target.parent.iterdir() if pattern.fullmatch(p.name)]


def _recover(target: Path) -> None:
    """Puts back what a killed run left (called with the target's lock held, so every leftover is a dead
    run's): an output moved aside by a --force swap that never finished is renamed back, then the dead runs'
    temporary and moved-aside folders are deleted."""
    olds = sorted(_leftovers(target, "old"), key=lambda p: p.lstat().st_ctime)  # rename sets ctime
    if olds and not os.path.lexists(target):
        olds.pop().rename(target)
        # Plain stderr: this module sits below report.py (and its console) in the import order.
        print(f"restored {target}: a run killed while replacing it had moved it aside", file=sys.stderr)
    for stale in olds + _leftovers(target, "tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def _acquire(target: Path, shown: Path, given_by: str) -> int:
    lock = _sibling(target, "lock")
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise SlimError(f"cannot write in {target.parent} ({e.strerror})", f"change {given_by}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise SlimError(f"another slimconv is writing {shown} (pid {holder})",
                            f"wait for it to finish (or stop it), or change {given_by}") from None
        try:
            current = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            return fd
        os.close(fd)  # its holder finished and removed the file while we waited on it: lock the new one


def _release(target: Path, fd: int) -> None:
    _sibling(target, "lock").unlink(missing_ok=True)  # before unlocking, so no one locks a removed file
    os.close(fd)


@contextmanager
def locked(target, given_by: str = "output.dir"):
    """Holds the lock of output folder ``target`` (after putting back what a killed run left), so that no
    other slimconv writes or replaces it meanwhile. The parent folder must exist."""
    path = Path(os.path.abspath(target))
    fd = _acquire(path, Path(target), given_by)
    try:
        _recover(path)
        yield
    finally:
        _release(path, fd)


class AtomicDir:
    """A folder built under a hidden temporary name beside its target and renamed into place only when
    complete: the target path never holds a partial output.

    Beside a target OUT, in its parent folder:
      .OUT.lock      flock'ed by the one run writing OUT (holds its PID); removed when that run ends
      .OUT.tmp-PID   the new folder while it is built
      .OUT.old-PID   the previous OUT during a --force swap, between its two renames

    One writer at a time: a second run on the same target is refused (SlimError, exit 2) naming the first
    one's PID. The kernel drops a lock when its process dies, so the holder of the lock knows that every
    .tmp-* and .old-* of OUT is a dead run's. Whoever takes the lock first repairs what a killed run left:
    if OUT is missing and an .old-* exists, the run was killed between its two renames, and the .old-*
    (the most recently moved aside, if several) is renamed back to OUT. Rolling back rather than finishing
    the swap is deliberate: the killed run never reported success, so OUT stays what the last successful run
    wrote. Then the dead runs' .tmp-* and .old-* folders are deleted.

    Before the swap every file and folder of the new tree is fsync'ed, and the parent folder after it.
    """

    def __init__(self, target, force: bool, given_by: str = "output.dir"):
        self.target = Path(target)
        self.path = Path(os.path.abspath(self.target))  # "." and ".." resolved; a symlinked target stays a link
        self.force, self.given_by = force, given_by
        self.tmp = _sibling(self.path, f"tmp-{os.getpid()}")
        cwd = Path.cwd().resolve()
        resolved = self.path.resolve()
        if resolved == cwd or resolved in cwd.parents:
            raise SlimError(f"output {self.target} {'is' if resolved == cwd else 'contains'} the current directory "
                            f"{cwd}, which a finished run would have to replace",
                            f"set {given_by} to a new folder, e.g. outputs/NAME")
        if self.path.parent.is_dir():
            with locked(self.target, given_by):  # refuses early while another run writes it; repairs
                pass
        self._refuse_existing()

    def _refuse_existing(self) -> None:
        if not os.path.lexists(self.path):
            return
        if not self.path.is_dir():
            raise SlimError(f"output {self.target} exists and is not a folder", f"move it away, or change {self.given_by}")
        if not self.force:
            raise SlimError(f"output {self.target} already exists",
                            f"pass --force to overwrite it, or change {self.given_by}")

    def __enter__(self) -> Path:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SlimError(f"cannot create {self.path.parent} ({e.strerror})", f"change {self.given_by}") from None
        with ExitStack() as stack:
            stack.enter_context(locked(self.target, self.given_by))
            self._refuse_existing()  # another run may have written it since the checks in __init__
            self.tmp.mkdir()
            self._held = stack.pop_all()
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
            else:
                self._swap()
        finally:
            self._held.close()
        return False

    def _swap(self) -> None:
        _fsync_tree(self.tmp)
        old = _sibling(self.path, f"old-{os.getpid()}")
        if os.path.lexists(self.path):
            self.path.rename(old)
        self.tmp.rename(self.path)
        _fsync_dir(self.path.parent)
        shutil.rmtree(old, ignore_errors=True)
