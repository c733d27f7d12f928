"""The compatibility matrix: the modeling code slimconv ships inside outputs, under other transformers.

    python benchmarks/compat_matrix.py                      # the proven range's ends (configuration_slim)
    python benchmarks/compat_matrix.py --versions newest    # what a fresh `pip install` gets today
    python benchmarks/compat_matrix.py --versions 5.0.0,5.10.4,newest

Converts tiny models of every supported architecture into every output kind (stock, sublayers removed,
parallel groups in both norm modes, early exit) with this environment's slimconv, together with the
independent reference's logits and greedy tokens (``tests/compat_fixtures.py``). Then, for each
transformers version, makes a throwaway environment holding only torch, that transformers and
safetensors (kept under ``$SLIMCONV_CACHE/compat`` for the next run) and runs ``tests/compat_check.py``
there: logits equal the reference, ``generate()`` equals the reference's uncached greedy tokens, left
padding changes nothing, and early-exit ``generate()`` equals stepping by hand. Prints a table; exit 1
if any check fails, 2 if an environment could not be made.

Moving the proven range forward is deliberate: run this with ``--versions newest``; if it passes, set
``PROVEN_TRANSFORMERS`` in ``slimconv/modeling/configuration_slim.py`` and pyproject's upper bound,
and refresh ``constraints.txt`` (docs/dependencies.md).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from compat_fixtures import build  # noqa: E402

from slimconv.modeling.configuration_slim import PROVEN_TRANSFORMERS  # noqa: E402
from slimconv.source import cache_root  # noqa: E402

# torch stays at the project's pinned CPU build (a newer one pulls a multi-GB CUDA build).
TORCH = "torch==2.13.0"


def newest_transformers() -> str:
    out = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "transformers"],
                         capture_output=True, text=True, timeout=120)
    if out.returncode != 0 or "(" not in out.stdout:
        raise SystemExit(f"error: could not ask the package index for transformers' versions:\n{out.stderr}")
    return out.stdout.split("(", 1)[1].split(")", 1)[0]


def _missing(pip_output: str) -> str | None:
    """The requirement pip could not find on the index ("No matching distribution found for X"), if that failed."""
    import re

    m = re.search(r"No matching distribution found for (\S+)", pip_output)
    return m.group(1) if m else None


def environment(version: str, console: Console) -> tuple[Path, str | None]:
    """A venv with torch, transformers==version and safetensors, made once and reused; and how it was made when not
    plainly. A release whose own new dependency the package index does not have yet (transformers 5.25.0 needs
    kernels>=0.19.1) is installed as users elsewhere get it, minus that package: the newest proven release with its
    dependencies, then this one with --no-deps; the check then runs with USE_HUB_KERNELS=0."""
    env = cache_root() / "compat" / f"transformers-{version}"
    python = env / "bin" / "python"
    note_file = env / ".note"
    if (env / ".complete").exists():
        return python, note_file.read_text() if note_file.exists() else None
    console.print(f"making an environment with transformers {version} in {env} ...")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(env)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    install = subprocess.run(pip + [TORCH, f"transformers=={version}", "safetensors"], capture_output=True, text=True)
    note = None
    if install.returncode != 0 and (missing := _missing(install.stdout + install.stderr)):
        note = f"--no-deps: {missing} is not on the package index"
        console.print(f"transformers {version} needs {missing}, which the index does not have: installing it "
                      f"--no-deps over transformers {PROVEN_TRANSFORMERS[1]}'s dependencies")
        install = subprocess.run(pip + [TORCH, f"transformers=={PROVEN_TRANSFORMERS[1]}", "safetensors"],
                                 capture_output=True, text=True)
        if install.returncode == 0:
            install = subprocess.run(pip + ["--no-deps", f"transformers=={version}"], capture_output=True, text=True)
    if install.returncode != 0:
        console.print(install.stdout + install.stderr)
        raise SystemExit(2)
    if note:
        note_file.write_text(note)
    (env / ".complete").touch()
    return python, note


def run_matrix(versions: list[str], fixtures: Path, console: Console) -> list[dict]:
    rows = []
    for version in versions:
        python, note = environment(version, console)
        start = time.perf_counter()
        extra = {"USE_HUB_KERNELS": "0"} if note else {}
        proc = subprocess.run([str(python), str(ROOT / "tests" / "compat_check.py"), str(fixtures)],
                              capture_output=True, text=True, cwd=fixtures,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", **extra})
        found = [dict(json.loads(line), installed=note) for line in proc.stdout.splitlines() if line.startswith("{")]
        if not found:
            console.print(proc.stdout + proc.stderr)
            found = [{"output": "(all)", "transformers": version, "ok": False,
                      "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "no output"}]
        elif proc.returncode and all(r["ok"] for r in found):  # the checker died after the outputs it printed
            console.print(proc.stderr[-2000:])
            found.append({"output": "(crashed after the rows above)", "transformers": version, "ok": False,
                          "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "no output"})
        console.print(f"transformers {version}: {sum(r['ok'] for r in found)}/{len(found)} outputs pass "
                      f"({time.perf_counter() - start:.0f} s)")
        rows += found
    return rows


def verdict(row: dict) -> str:
    if row["ok"]:
        return f"pass {row['max_abs_error']:.0e}"
    failed = [k for k in ("generate_equals_reference", "left_padded_equals_alone",
                          "early_exit_generate_equals_stepped") if row.get(k) is False]
    return "FAIL " + (", ".join(failed) or row.get("error", f"logits {row.get('max_abs_error', 0):.1e}"))


def table(rows: list[dict]) -> Table:
    """One row per output, one column per transformers version: pass (largest logit error) or what failed."""
    versions = list(dict.fromkeys(r["transformers"] for r in rows))
    t = Table(title="bundled modeling code under each transformers (max |logit error| vs the reference)")
    t.add_column("output", no_wrap=True)
    notes = {r["transformers"]: r.get("installed") for r in rows}
    for v in versions:
        t.add_column(f"transformers {v}" + (f" ({notes[v]})" if notes.get(v) else ""), no_wrap=True)
    cells = {(r["output"], r["transformers"]): verdict(r) for r in rows}
    for output in dict.fromkeys(r["output"] for r in rows):
        t.add_row(output, *(cells.get((output, v), "-") for v in versions))
    return t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--versions", default="proven",
                   help="comma-separated transformers versions; 'proven' (the range's two ends, default), "
                        "'newest' (the package index's newest)")
    p.add_argument("--fixtures", type=Path, help="folder for the converted outputs (default: a temp folder)")
    p.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    versions = []
    for v in args.versions.split(","):
        versions += list(PROVEN_TRANSFORMERS) if v == "proven" else [newest_transformers()] if v == "newest" else [v]
    console = Console()
    fixtures = args.fixtures or Path(tempfile.mkdtemp(prefix="slimconv-compat-"))
    console.print(f"building outputs of every kind in {fixtures} ...")
    outputs = build(fixtures)
    console.print(f"{len(outputs)} outputs; checking them under transformers {', '.join(versions)}")
    rows = run_matrix(list(dict.fromkeys(versions)), fixtures, console)
    console.print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
