"""Hostile and careless inputs, as a user would give them: each is refused with exit 2 and a message naming
the problem, before any work, with nothing written, nothing left behind and the source byte for byte as it
was. Also what happens to an output when runs are killed or overlap (issue 14)."""
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from slimconv.cli import main
from slimconv.source import cache_root


@dataclass
class Env:
    """A scratch folder holding a copy of a tiny model at root/parent/src."""

    root: Path

    @property
    def src(self) -> Path:
        return self.root / "parent" / "src"

    def recipe(self, name: str = "r.yaml", **keys) -> str:
        data = {"model": str(self.src), "output": {"dir": str(self.root / "out")}, **keys}
        path = self.root / name
        path.write_text(yaml.safe_dump(data))
        return str(path)

    def slim(self) -> Path:
        """A converted checkpoint at root/slim (what export reads)."""
        from helpers import convert

        convert(self.src, self.root / "slim", remove={"blocks": [1]})
        return self.root / "slim"


def tree(root: Path) -> dict:
    """Every path under root with its bytes (None for folders): equal trees mean nothing was written."""
    return {p.relative_to(root).as_posix(): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


@pytest.fixture
def env(tiny_models, tmp_path, monkeypatch):
    shutil.copytree(tiny_models["llama-tied"], tmp_path / "parent" / "src")
    # Every path a case names lies inside tmp_path, the cache too: were a refusal missing, the run would
    # replace a scratch folder, never a real one (the session cache's parent is the system's temp folder).
    (tmp_path / "caches" / "slimconv").mkdir(parents=True)
    monkeypatch.setenv("SLIMCONV_CACHE", str(tmp_path / "caches" / "slimconv"))
    return Env(tmp_path)


# Each case prepares the scratch folder and returns (argv, words the message must contain).
DATA_LOSS = {
    "output is the source's parent": lambda e: (
        ["convert", e.recipe(output={"dir": str(e.src.parent)}), "--force"], ["contains the source model", str(e.src)]),
    "output is the source": lambda e: (
        ["convert", e.recipe(output={"dir": str(e.src)}), "--force"], ["is the source model", str(e.src)]),
    "output inside the source": lambda e: (
        ["convert", e.recipe(output={"dir": str(e.src / "slim")})], ["is inside the source model", str(e.src)]),
    "output is the source via ..": lambda e: (
        ["convert", e.recipe(output={"dir": str(e.src / ".." / "src")}), "--force"], ["is the source model"]),
    "output contains the cache of model default": lambda e: (
        ["convert", e.recipe(model="default", output={"dir": str(e.root / "caches")}), "--force"],
        ["contains the slimconv cache", str(cache_root())]),
    "output is the current directory": lambda e: (
        ["convert", e.recipe(output={"dir": "."}), "--force"], ["current directory", "outputs/NAME"]),
    "output contains the current directory": lambda e: (
        ["convert", e.recipe(output={"dir": ".."}), "--force"], ["contains the current directory"]),
    "export -o is the checkpoint": lambda e: (
        ["export", str(e.slim()), "-o", str(e.root / "slim"), "--force"], ["is the slim checkpoint", "-o"]),
    "export -o contains the checkpoint": lambda e: (
        ["export", str(e.slim()), "-o", str(e.root), "--force"], ["contains the slim checkpoint"]),
    "analyze -o is the model": lambda e: (
        ["analyze", str(e.src), "-o", str(e.src), "--force"], ["is the source model", "-o"]),
    "analyze -o contains the model": lambda e: (
        ["analyze", str(e.src), "-o", str(e.src.parent), "--force"], ["contains the source model"]),
    "analyze --early-exit -o inside the model": lambda e: (
        ["analyze", str(e.src), "-o", str(e.src / "analysis"), "--early-exit"], ["is inside the source model"]),
}


def refused(env, case, capsys, monkeypatch):
    work = env.root / "work" / "here"  # the run's current directory: "." and ".." are scratch folders
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    argv, words = case(env)
    before = tree(env.root)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    for w in words:
        assert w in err, f"{w!r} not in {err!r}"
    assert "Traceback" not in err
    assert tree(env.root) == before  # nothing written, nothing left behind, the source unchanged


@pytest.mark.parametrize("case", DATA_LOSS)
def test_an_output_never_overlaps_its_source(env, case, capsys, monkeypatch):
    refused(env, DATA_LOSS[case], capsys, monkeypatch)


def test_output_beside_the_source_still_works(env, capsys):
    """The rule refuses overlap only: a sibling of the source with a similar name is fine."""
    r = env.recipe(output={"dir": str(env.src.parent / "src-slim")}, remove={"blocks": [1]})
    assert main(["convert", r]) == 0
    assert main(["convert", r, "--force"]) == 0
    assert sorted(p.name for p in env.src.parent.iterdir()) == ["src", "src-slim"]


HOLD = """
import sys, time
from slimconv.outdir import AtomicDir
with AtomicDir(sys.argv[1], force=True) as tmp:
    (tmp / "partial").write_text("x")
    print(tmp, flush=True)
    time.sleep(120)
"""

KILL_MID_SWAP = """
import os, signal, sys
from pathlib import Path
from slimconv.outdir import AtomicDir
rename = Path.rename
def rename_then_die(self, target):
    moved = rename(self, target)
    if ".old-" in Path(target).name:  # the previous output is aside, the new one not yet in place
        os.kill(os.getpid(), signal.SIGKILL)
    return moved
Path.rename = rename_then_die
with AtomicDir(sys.argv[1], force=True) as tmp:
    (tmp / "config.json").write_text("new")
"""


def test_concurrent_run_is_refused_and_a_dead_runs_leftovers_are_cleaned(env, capsys):
    r = env.recipe(remove={"blocks": [1]})
    out = env.root / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        tmp = Path(holder.stdout.readline().strip())
        assert main(["convert", r, "--force"]) == 2
        err = capsys.readouterr().err
        assert f"another slimconv is writing {out} (pid {holder.pid})" in err
        assert (tmp / "partial").is_file()  # the live run's folder is left alone
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert tmp.is_dir()  # SIGKILL: no cleanup ran
    assert main(["convert", r]) == 0
    assert sorted(p.name for p in env.root.iterdir()) == ["caches", "out", "parent", "r.yaml"]


def test_kill_between_the_renames_of_force_is_undone_by_the_next_run(env, capsys):
    r = env.recipe(remove={"blocks": [1]})
    out = env.root / "out"
    assert main(["convert", r]) == 0
    written = tree(out)
    child = subprocess.run([sys.executable, "-c", KILL_MID_SWAP, str(out)])
    assert child.returncode == -signal.SIGKILL
    assert not out.exists()
    assert list(env.root.glob(".out.old-*")) and list(env.root.glob(".out.tmp-*"))
    assert main(["convert", r]) == 2  # no --force: the restored output is kept
    err = capsys.readouterr().err
    assert "already exists" in err
    assert tree(out) == written
    assert sorted(p.name for p in env.root.iterdir()) == ["caches", "out", "parent", "r.yaml"]


def test_force_fsyncs_every_file_and_folder_before_the_swap(env, monkeypatch):
    synced = []
    fsync = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    r = env.recipe(remove={"blocks": [1]})
    assert main(["convert", r]) == 0
    out = env.root / "out"
    tmp = str(env.root / f".out.tmp-{os.getpid()}")
    wanted = {tmp} | {tmp + "/" + p.relative_to(out).as_posix() for p in out.rglob("*")}
    assert wanted <= set(synced)
    assert synced[-1] == str(env.root)  # the parent, after the rename
