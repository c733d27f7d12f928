"""Faults: SIGKILLs at random moments of `convert`, `convert --force` over an existing output, `export` and
`heal`, and concurrent runs on one output folder. What docs/reliability.md promises, measured.

    nice -n 15 python benchmarks/bench_faults.py [--kills 20] [--pairs 10] [--seed 0] [--workdir DIR] [--keep]

Everything happens in a scratch folder (a new one under the system's temp folder unless --workdir), with
$SLIMCONV_CACHE inside it, on a random-weight Llama (8 layers, hidden 512, 2048 words; about 80 MB in fp32,
written in 8 MB shards so that a kill can land while files are being written).

Each kill: the command runs as a child process and gets SIGKILL at a random moment: each operation's first
kill during start-up and the checks, the others while the output is built and renamed (see kill_at); the
moment is recorded as what was on disk then. After each kill:

- partial: the final path holds something that is neither the previous output nor a complete new one;
- lost: the previous output (convert --force) is neither at the final path nor restored by the next run;
- stray: a `.NAME.tmp-*`, `.NAME.old-*`, `.NAME.lock` (or heal's resume file) is left after the next
  successful run;
- equal: the next run's output equals an uninterrupted run's, tensor for tensor (safetensors, or the ONNX
  initializers).

Each concurrent pair starts two `convert --force` of one recipe together: both may succeed (one after the
other), or one is refused with exit 2 ("another slimconv is writing"); anything else is a crash.
Prints the counts as markdown tables. The scratch folder is deleted at the end unless --keep.
"""
import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "slimconv"]
WORDS = 2047  # vocabulary 2048: w0..w2046 and [UNK]
HEAL_FLAGS = ["--steps", "6", "--seq-len", "16", "--batch", "2", "--lr", "1e-3", "--checkpoint-every", "2"]


def build_source(work: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import make_tiny, with_word_tokenizer

    model = make_tiny(work / "raw", "llama-tied", hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=4, vocab_size=WORDS + 1)
    src = with_word_tokenizer(model, work / "src", WORDS)
    shutil.rmtree(model)
    rng = random.Random(0)
    for name in ("train", "test", "other"):
        (work / f"{name}.txt").write_text(" ".join(f"w{rng.randrange(WORDS)}" for _ in range(4000)))
    return src


def recipe(work: Path, src: Path, out: Path, block: int) -> Path:
    import yaml

    path = work / f"recipe-{out.name}-{block}.yaml"
    path.write_text(yaml.safe_dump({
        "model": str(src), "remove": {"blocks": [block]},
        "output": {"dir": str(out), "max_shard_size": "8MB"},
        "validate": {"exactness": {"prompt_tokens": 16, "greedy_tokens": 4},
                     "quality": {"data": str(work / "test.txt"), "samples": 2, "seq_len": 32}}}))
    return path


def run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([*CLI, *argv], capture_output=True, text=True)
    if check and done.returncode != 0:
        raise SystemExit(f"slimconv {' '.join(argv)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done


def tensors(folder: Path) -> dict:
    """Every tensor of a checkpoint (safetensors) or an ONNX folder (initializers), by name, as numpy."""
    if (folder / "model.onnx").is_file():
        import onnx
        from onnx import numpy_helper

        model = onnx.load(str(folder / "model.onnx"), load_external_data=True)
        return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    from safetensors.numpy import load_file

    found = {}
    for shard in sorted(folder.glob("*.safetensors")):
        found.update(load_file(shard))
    return found


def same(a: Path, b: Path) -> bool:
    """Equal tensor for tensor, with equal configs: what loading either would give."""
    import numpy as np

    try:
        ta, tb = tensors(a), tensors(b)
        configs = [json.loads((f / "config.json").read_text()) for f in (a, b)]
    except Exception:  # a folder that does not load is not equal to anything
        return False
    return (configs[0] == configs[1] and ta.keys() == tb.keys()
            and all(ta[k].dtype == tb[k].dtype and np.array_equal(ta[k], tb[k]) for k in ta))


def leftovers(target: Path) -> list[str]:
    prefix = f".{target.name}."
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith(prefix))


def timed(argv: list[str], target: Path, timing: dict, op: str, check: bool = False) -> int:
    """An uninterrupted run; its exit code (with ``check``, a failure stops the benchmark). Records in
    ``timing[op]`` the seconds until its temporary folder appeared and until it was renamed into place: every
    re-run updates them, so that kill moments follow the machine's load."""
    start = time.monotonic()
    child = subprocess.Popen([*CLI, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first = renamed = None
    while child.poll() is None:
        building = any(".tmp-" in n for n in leftovers(target))
        if first is None and building:
            first = time.monotonic() - start
        if first is not None and renamed is None and not building:
            renamed = time.monotonic() - start
        time.sleep(0.002)
    if check and (child.returncode != 0 or first is None):
        raise SystemExit(f"slimconv {' '.join(argv)} failed:\n{child.stderr.read()[-3000:]}")
    if child.returncode == 0 and first is not None:
        timing[op] = (first, renamed or time.monotonic() - start)
    return child.returncode


def kill_at(argv: list[str], target: Path, timing: tuple[float, float], early: bool, rng) -> str:
    """Runs, SIGKILLs at a random moment, and says what was on disk at that moment. An ``early`` kill lands
    anywhere before the temporary folder is expected (start-up, checks), at the latest when it appears; the
    others a random time after it appears, up to 1.25 times as long as the last uninterrupted run took to
    rename it into place. Timed from the folder's appearance rather than from the start, since start-up
    time varies on a loaded machine."""
    child = subprocess.Popen([*CLI, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first, renamed = timing
    deadline = time.monotonic() + rng.uniform(0, first) if early else None
    seen = False  # whether the temporary folder ever appeared
    while child.poll() is None and (deadline is None or time.monotonic() < deadline):
        if not seen and any(".tmp-" in n for n in leftovers(target)):
            seen = True
            if early:  # it started writing sooner than the last run did: kill it now
                break
            deadline = time.monotonic() + rng.uniform(0, 1.25 * (renamed - first))
        time.sleep(0.002)
    names = leftovers(target)
    building, aside = any(".tmp-" in n for n in names), any(".old-" in n for n in names)
    moment = ("finished first" if child.poll() is not None else
              "during the swap" if building and aside else  # between the two renames of --force
              "while writing" if building else
              "after the rename" if seen else "before writing")
    if child.poll() is None:
        os.kill(child.pid, signal.SIGKILL)
    child.wait()
    return moment


class Tally:
    def __init__(self):
        self.rows = {}

    def add(self, op: str, moment: str, partial: bool, lost: bool, stray: list, equal: bool):
        row = self.rows.setdefault(op, dict(kills=0, moments={}, partial=0, lost=0, stray=0, equal=0))
        row["kills"] += 1
        row["moments"][moment] = row["moments"].get(moment, 0) + 1
        row["partial"] += partial
        row["lost"] += lost
        row["stray"] += bool(stray)
        row["equal"] += equal
        print(f"  {op}: killed {moment}; partial {partial}, lost {lost}, stray {stray or 'none'}, "
              f"re-run equal {equal}", flush=True)


def kill_convert(t: Tally, rng, early, work, src, ref_new, timing: dict, force: bool, ref_old=None):
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    if force:
        shutil.copytree(ref_old, out)
    r = recipe(work, src, out, 1)
    argv = ["convert", str(r)] + (["--force"] if force else [])
    op = "convert --force" if force else "convert"
    moment = kill_at(argv, out, timing[op], early, rng)
    complete_new = same(out, ref_new)
    intact_old = force and same(out, ref_old)
    partial = out.exists() and not (complete_new or intact_old)
    lost = False
    if force and not out.exists():
        # Any run that writes the folder first puts back what the killed swap moved aside; this one then
        # stops at "already exists", leaving the restored output to be checked.
        run(["convert", str(r)], check=False)
        lost = not same(out, ref_old)
    code = timed(["convert", str(r), "--force"], out, timing, op)
    t.add("convert --force over an output" if force else "convert", moment, partial, lost, leftovers(out),
          code == 0 and same(out, ref_new))


def kill_export(t: Tally, rng, early, work, slim, ref_onnx, timing: dict):
    target = slim / "onnx"
    shutil.rmtree(target, ignore_errors=True)
    moment = kill_at(["export", str(slim), "--provider", "cpu"], target, timing["export"], early, rng)
    partial = target.exists() and not same(target, ref_onnx)
    code = timed(["export", str(slim), "--provider", "cpu", "--force"], target, timing, "export")
    t.add("export", moment, partial, False, leftovers(target), code == 0 and same(target, ref_onnx))
    shutil.rmtree(target)  # heal would copy it into every healed folder


def kill_heal(t: Tally, rng, early, work, slim, ref_healed, timing: dict):
    target = work / "healed"
    shutil.rmtree(target, ignore_errors=True)
    argv = ["heal", str(slim), "-o", str(target), *HEAL_FLAGS, "--data", str(work / "train.txt"),
            "--eval-text", str(work / "other.txt")]
    moment = kill_at(argv, target, timing["heal"], early, rng)
    partial = target.exists() and not same(target, ref_healed)
    code = timed([*argv, "--force"], target, timing, "heal")
    t.add("heal", moment, partial, False, leftovers(target), code == 0 and same(target, ref_healed))


def concurrent_pairs(pairs: int, rng, work, src, ref_new) -> dict:
    out = work / "out"
    r = recipe(work, src, out, 1)
    counts = dict(pairs=pairs, serialised=0, refused=0, crashed=0, final_equal=0, stray=0)
    for i in range(pairs):
        children = []
        for _ in range(2):
            children.append(subprocess.Popen([*CLI, "convert", str(r), "--force"], stdout=subprocess.DEVNULL,
                                             stderr=subprocess.PIPE, text=True))
            time.sleep(rng.uniform(0, 0.3))
        results = [(c.wait(), c.stderr.read()) for c in children]
        codes = sorted(code for code, _ in results)
        refusal = all("another slimconv is writing" in err for code, err in results if code == 2)
        traceback = any("Traceback" in err for _, err in results)
        kind = ("serialised" if codes == [0, 0] else "refused" if codes == [0, 2] and refusal and not traceback
                else "crashed")
        counts[kind] += 1
        counts["final_equal"] += same(out, ref_new)
        counts["stray"] += bool(leftovers(out))
        print(f"  pair {i + 1}: exit codes {codes} -> {kind}", flush=True)
    return counts


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=20, help="SIGKILLs, spread over the four operations (default 20)")
    p.add_argument("--pairs", type=int, default=10, help="concurrent pairs (default 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", help="scratch folder (default: a new one under the system's temp folder)")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = p.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="slimconv-faults-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ.update(SLIMCONV_CACHE=str(work / "cache"), HF_HUB_OFFLINE="1")
    rng = random.Random(args.seed)
    try:
        print(f"scratch folder {work}", flush=True)
        src = build_source(work)
        refs = work / "ref"
        refs.mkdir()
        # Uninterrupted runs: what every re-run must equal, and how long each operation takes.
        timing = {}
        timed(["convert", str(recipe(work, src, refs / "new", 1))], refs / "new", timing, "convert", check=True)
        run(["convert", str(recipe(work, src, refs / "old", 2))])
        shutil.copytree(refs / "old", work / "out")
        timed(["convert", str(recipe(work, src, work / "out", 1)), "--force"], work / "out", timing,
              "convert --force", check=True)
        slim = work / "slim"
        shutil.copytree(refs / "new", slim)
        run(["validate", str(slim)])
        timed(["export", str(slim), "--provider", "cpu"], slim / "onnx", timing, "export", check=True)
        shutil.copytree(slim / "onnx", refs / "onnx")
        shutil.rmtree(slim / "onnx")
        heal = ["heal", str(slim), "-o", str(refs / "healed"), *HEAL_FLAGS, "--data", str(work / "train.txt"),
                "--eval-text", str(work / "other.txt")]
        timed(heal, refs / "healed", timing, "heal", check=True)
        print("uninterrupted runs (s until the temporary folder appeared, s until it was renamed into place): "
              + ", ".join(f"{k} {a:.1f}/{b:.1f}" for k, (a, b) in timing.items()), flush=True)

        tally = Tally()
        ops = ["convert", "convert --force", "export", "heal"]
        for i in range(args.kills):
            op = ops[i % len(ops)]
            early = i < len(ops)  # each operation's first kill lands during start-up and the checks
            if op == "convert":
                kill_convert(tally, rng, early, work, src, refs / "new", timing, force=False)
            elif op == "convert --force":
                kill_convert(tally, rng, early, work, src, refs / "new", timing, force=True,
                             ref_old=refs / "old")
            elif op == "export":
                kill_export(tally, rng, early, work, slim, refs / "onnx", timing)
            else:
                kill_heal(tally, rng, early, work, slim, refs / "healed", timing)
        pairs = concurrent_pairs(args.pairs, rng, work, src, refs / "new")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    moments = ["before writing", "while writing", "during the swap", "after the rename", "finished first"]
    print("\n| operation | kills | " + " | ".join(f"killed {m}" for m in moments)
          + " | partial output at the final path | previous output lost | stray temp/old/lock after the re-run "
            "| re-run equal to an uninterrupted run |")
    print("|---" * (6 + len(moments)) + "|")
    total = dict(kills=0, partial=0, lost=0, stray=0, equal=0, moments={})
    for op, r in tally.rows.items():
        print(f"| {op} | {r['kills']} | " + " | ".join(str(r["moments"].get(m, 0)) for m in moments)
              + f" | {r['partial']} | {r['lost']} | {r['stray']} | {r['equal']} |")
        for k in ("kills", "partial", "lost", "stray", "equal"):
            total[k] += r[k]
        for m, n in r["moments"].items():
            total["moments"][m] = total["moments"].get(m, 0) + n
    print(f"| **all** | {total['kills']} | " + " | ".join(str(total["moments"].get(m, 0)) for m in moments)
          + f" | {total['partial']} | {total['lost']} | {total['stray']} | {total['equal']} |")
    print("\n| concurrent pairs | both succeeded, one after the other | one refused with exit 2 | crashed "
          "| final output equal | stray temp/old/lock |")
    print("|---|---|---|---|---|---|")
    print(f"| {pairs['pairs']} | {pairs['serialised']} | {pairs['refused']} | {pairs['crashed']} "
          f"| {pairs['final_equal']} | {pairs['stray']} |")
    bad = total["partial"] + total["lost"] + total["stray"] + (total["kills"] - total["equal"]) + pairs["crashed"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
