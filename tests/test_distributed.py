"""`slimconv heal` under torchrun (FSDP2, gloo, CPU): 2 and 3 ranks give one process's losses step by step and its
written weights, a killed rank leaves nothing that looks finished, and --resume continues on another number of
ranks (issue 33)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_heal import _flags, _output, src, texts  # noqa: F401  (fixtures)
from slimconv.cli import main

pytestmark = pytest.mark.distributed
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


def torchrun(n: int, args: list[str], **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd())
    return subprocess.run([*TORCHRUN, "--nproc-per-node", str(n), "-m", "slimconv", *args], env=env,
                          capture_output=True, text=True, timeout=600, **kw)


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (torchrun's ranks), from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and b"slimconv" in (stat.parent / "cmdline").read_bytes():
            found.append(int(stat.parent.name))
    return found


def curve(folder) -> list[float]:
    return [r["kl"] for r in json.loads((folder / "slimconv_heal.json").read_text())["curve"]]


def weights(folder) -> dict:
    return load_file(folder / "model.safetensors")


@pytest.fixture(scope="module")
def single(tmp_path_factory, src, texts):  # noqa: F811
    """One process's heal: the reference every world size must reproduce."""
    root = tmp_path_factory.mktemp("single")
    out = _output(root, src, texts, blocks=[2])
    healed = root / "healed"
    assert main(["heal", str(out), "-o", str(healed), "--train", "all", *_flags(texts, steps=6, batch=6)]) == 0
    return out, healed


@pytest.mark.parametrize("n,shard", [(2, "full"), (3, "full"), (2, "grad-op")])
def test_sharded_heal_gives_one_process_losses_and_weights(single, texts, tmp_path, n, shard):  # noqa: F811
    out, reference = single
    healed = tmp_path / "healed"
    run = torchrun(n, ["heal", str(out), "-o", str(healed), "--train", "all", *_flags(texts, steps=6, batch=6),
                       "--shard", shard])
    assert run.returncode == 0, run.stderr[-3000:]
    assert curve(healed) == pytest.approx(curve(reference), rel=1e-4, abs=1e-6)
    got, want = weights(healed), weights(reference)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-3, atol=1e-4)  # Adam amplifies float noise
    report = json.loads((healed / "slimconv_heal.json").read_text())
    assert report["world_size"] == n and len(report["peak_rss_mb_per_rank"]) == n
    assert "FSDP2" in run.stdout and run.stdout.count("heal ") >= 1


@pytest.mark.parametrize("mode,shard", [("adjacent", "full"), ("lora", "full"), ("adjacent", "grad-op")])
def test_every_training_mode_runs_sharded_as_in_one_process(tmp_path, src, texts, mode, shard):  # noqa: F811
    """grad-op with frozen layers between trained ones: those stay gathered from their first forward on."""
    out = _output(tmp_path, src, texts, attention="2-3")
    one, two = tmp_path / "one", tmp_path / "two"
    flags = ["--train", mode, *_flags(texts, steps=4, batch=4)]
    assert main(["heal", str(out), "-o", str(one), *flags]) == 0
    run = torchrun(2, ["heal", str(out), "-o", str(two), *flags, "--shard", shard])
    assert run.returncode == 0, run.stderr[-3000:]
    assert curve(two) == pytest.approx(curve(one), rel=1e-4, abs=1e-6)
    for name, t in weights(one).items():
        torch.testing.assert_close(weights(two)[name], t, rtol=1e-3, atol=1e-4)


GATHERED = """
import json, sys
from pathlib import Path
import torch
from torch.distributed.tensor import DTensor
from slimconv import distributed
from slimconv.heal import _layers, sharded_models
from slimconv.outdir import PLAN_FILE, read_json
from slimconv.plan import Plan
from slimconv.recipe import Heal

out, src, shard, train = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
world = distributed.current()
device = distributed.start(world, torch.device("cpu"))
settings = Heal(shard=shard, train=train)
plan = Plan(**read_json(out / PLAN_FILE)["plan"])
teacher, student, _, _ = sharded_models(src, out, plan, settings, device, torch.Generator().manual_seed(0))
ids = torch.arange(8).reshape(1, 8)
for _ in range(2):
    with torch.no_grad():
        teacher(input_ids=ids)
    student(input_ids=ids).logits.float().pow(2).mean().backward()

def whole(module):  # FSDP2 swaps a gathered unit's DTensor shards for plain tensors
    return not isinstance(next(module.parameters(recurse=False)), DTensor)

def held(model):  # the share of the model's values this rank stores
    return (sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in model.parameters())
            / sum(p.numel() for p in model.parameters()))

units = lambda m: {"layers": [all(whole(x) for x in layer.modules() if any(True for _ in x.parameters(recurse=False)))
                              for layer in _layers(m)], "embedding": whole(m.get_input_embeddings()), "held": held(m)}
if world.main:
    print(json.dumps({"teacher": units(teacher), "student": units(student)}))
distributed.finish()
"""


@pytest.mark.parametrize("shard,train", [("full", "all"), ("grad-op", "all"), ("grad-op", "adjacent")])
def test_what_each_sharding_mode_keeps_gathered_between_steps(single, src, tmp_path, shard, train):  # noqa: F811
    """After two training steps: full has resharded everything, and each of 2 ranks stores half of each model.
    grad-op keeps the frozen parts gathered (the teacher, the student's embedding and its untrained layers) and
    reshards only the trained layers, which the optimizer updates in their shards."""
    out, _ = single
    script = tmp_path / "gathered.py"
    script.write_text(GATHERED)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd())
    run = subprocess.run([*TORCHRUN, "--nproc-per-node", "2", str(script), str(out), str(src), shard, train],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    kept = shard == "grad-op"
    for model in ("teacher", "student"):
        held = got[model].pop("held")
        if shard == "full":
            assert held == pytest.approx(0.5, abs=0.01)
    assert got["teacher"] == {"layers": [kept] * len(got["teacher"]["layers"]), "embedding": kept}
    assert got["student"]["embedding"] is kept
    trained = heal_layers(out, train)
    assert got["student"]["layers"] == [kept and j not in trained for j in range(len(got["student"]["layers"]))]


def heal_layers(out: Path, train: str) -> list[int]:
    from slimconv.heal import adjacent_layers
    from slimconv.outdir import PLAN_FILE, read_json
    from slimconv.plan import Plan

    plan = Plan(**read_json(out / PLAN_FILE)["plan"])
    return adjacent_layers(plan) if train == "adjacent" else list(range(len(plan.layers)))


def test_a_killed_rank_leaves_nothing_finished_and_resume_continues_on_another_world_size(single, texts,
                                                                                             tmp_path):  # noqa: F811
    out, reference = single
    healed = tmp_path / "healed"
    flags = ["--train", "all", *_flags(texts, steps=6, batch=6, checkpoint_every=2)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd())
    proc = subprocess.Popen([*TORCHRUN, "--nproc-per-node", "2", "-m", "slimconv", "heal", str(out), "-o",
                             str(healed), *flags, "--max-minutes", "30"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    checkpoint = tmp_path / ".healed.heal-resume.dcp"
    deadline = time.time() + 300
    while not checkpoint.is_dir() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert checkpoint.is_dir(), "no distributed checkpoint appeared"
    os.kill(max(children(proc.pid)), signal.SIGKILL)  # one rank, the last started
    proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert not healed.exists()
    # The sharding mode may change too: it moves the same tensors, not the training.
    run = torchrun(3, ["heal", str(out), "-o", str(healed), *flags, "--max-minutes", "30", "--resume",
                       "--shard", "grad-op"])
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((healed / "slimconv_heal.json").read_text())
    assert report["resumed_from"] >= 2 and report["steps"] == 6
    assert curve(healed) == pytest.approx(curve(reference), rel=1e-4, abs=1e-6)
    assert not checkpoint.exists()


def test_distributed_refusals_exit_non_zero_on_every_rank_naming_the_problem_once(single, texts, tmp_path):  # noqa
    out, _ = single
    run = torchrun(2, ["heal", str(out), "-o", str(tmp_path / "h"), *_flags(texts, steps=2, batch=3)])
    assert run.returncode != 0
    assert run.stderr.count("does not split over 2 ranks") == 1 and "rank 1: stopped" in run.stderr
    (tmp_path / "exists").mkdir()
    run = torchrun(2, ["heal", str(out), "-o", str(tmp_path / "exists"), *_flags(texts, steps=2, batch=2)])
    assert run.returncode != 0 and "already exists" in run.stderr and "--force" in run.stderr
    # A one-process checkpoint cannot be resumed by ranks.
    (tmp_path / ".h2.heal-resume.pt").write_bytes(b"")
    run = torchrun(2, ["heal", str(out), "-o", str(tmp_path / "h2"), *_flags(texts, steps=2, batch=2), "--resume"])
    assert run.returncode != 0 and "one process's checkpoint" in run.stderr
    assert not (tmp_path / "h").exists() and not (tmp_path / "h2").exists()


@pytest.mark.parametrize("rows", [1, 3, 7, 100])
def test_the_chunked_distillation_loss_is_kl_div_and_its_gradient(monkeypatch, rows):
    """heal's loss a few tokens at a time (the last chunk shorter) gives what kl_div over log_softmax gives, and
    the same gradient, and consumes the teacher's logits."""
    import torch.nn.functional as F

    from slimconv import heal

    monkeypatch.setattr(heal, "KL_CHUNK", rows * 50)
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 7, 50, generator=g) * 4).requires_grad_()
    target = torch.randn(3, 7, 50, generator=g) * 4
    want = F.kl_div(torch.log_softmax(logits, -1).flatten(0, 1), torch.log_softmax(target, -1).flatten(0, 1),
                    log_target=True, reduction="batchmean")
    (want * 2.5).backward()
    want_grad, logits.grad = logits.grad, None
    consumed = target.clone()
    got = heal.distil_kl(logits, consumed)
    (got * 2.5).backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    torch.testing.assert_close(logits.grad, want_grad, rtol=1e-5, atol=1e-8)
    assert not torch.equal(consumed, target)


def test_heal_leaves_malloc_to_the_environment_when_it_sets_it(monkeypatch):
    from slimconv.allocator import return_freed_memory

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "33554432")
    assert return_freed_memory() is False


LLAMA_31_70B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192,
                "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
                "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "max_position_embeddings": 131072,
                "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "tie_word_embeddings": False, "hidden_act": "silu",
                "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                 "original_max_position_embeddings": 8192, "rope_type": "llama3"}}


def test_the_memory_plan_of_a_70b_heal_reads_only_its_config(tmp_path, capsys):
    from slimconv.memory import heal_memory
    from slimconv.plan import source_plan
    from slimconv.recipe import Heal

    model = tmp_path / "llama-3.1-70b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA_31_70B))  # no weights on this machine
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {model}\nremove:\n  blocks: '60-75'\noutput:\n  dir: {tmp_path / 'out'}\n")
    assert main(["heal", str(recipe), "--plan", "--nproc", "8", "--device-memory", "80", "--seq-len", "1024",
                 "--batch", "8"]) == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert "8 rank(s)" in shown and "fits 80 GB?" in shown and "ranks needed" in shown
    # Llama-3.1-70B has 70,553,706,496 parameters: float32 over 8 ranks is 35.28 GB each.
    rows = {r.name: r.bytes for r in heal_memory(source_plan(LLAMA_31_70B), LLAMA_31_70B, Heal(), 8)}
    assert rows["teacher weights"]["all"] == 70_553_706_496 * 4 / 8
    assert "35.28 GB" in shown
    assert not (tmp_path / "out").exists()
    # grad-op holds both models whole on every rank (280 GB of teacher alone): no mode fits 80 GB.
    assert main(["heal", str(recipe), "--plan", "--nproc", "8", "--device-memory", "80", "--shard", "grad-op"]) == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert "grad-op sharding" in shown and "yes" not in shown.split("fits 80 GB?")[1].split("ranks needed")[0]
    rows = {r.name: r.bytes for r in heal_memory(source_plan(LLAMA_31_70B), LLAMA_31_70B, Heal(shard="grad-op"), 8)}
    assert rows["gathered layers and root (FSDP2)"]["all"] == 2 * 70_553_706_496 * 4


@pytest.mark.parametrize("mode", ["adjacent", "all", "lora"])
def test_the_memory_plan_counts_the_parameters_heal_trains(tmp_path, src, texts, mode):  # noqa: F811
    from slimconv.heal import trainable
    from slimconv.memory import trained
    from slimconv.outdir import PLAN_FILE
    from slimconv.plan import Plan
    from slimconv.recipe import Heal
    from slimconv.runtime import load_model

    out = _output(tmp_path, src, texts, attention="2-3", blocks=[4])
    plan = Plan(**json.loads((out / PLAN_FILE).read_text())["plan"])
    student = load_model(out)
    trainable(student, plan, Heal(train=mode), torch.Generator().manual_seed(0))
    config = json.loads((src / "config.json").read_text())
    assert trained(plan, config, mode, 16)[1] == sum(p.numel() for p in student.parameters() if p.requires_grad)


def test_a_plan_for_more_gpus_than_there_are_is_refused(single, capsys):
    out, _ = single
    assert main(["heal", str(out), "--plan", "--nproc", "4", "--device", "cuda"]) == 2
    assert "CUDA" in capsys.readouterr().err


@pytest.fixture(scope="module")
def calibrated(tiny_models, tmp_path_factory):
    from helpers import with_word_tokenizer

    root = tmp_path_factory.mktemp("calib")
    model = with_word_tokenizer(tiny_models["llama-tied"], root / "src", 120)
    text = root / "calib.txt"
    text.write_text(" ".join(f"w{(i * 7) % 120}" for i in range(3000)))
    return model, text


COMMANDS = {
    "analyze": lambda m, t: ["analyze", str(m), "--calib", str(t), "--samples", "6", "--seq-len", "16",
                             "--sleb-blocks", "3"],
    "search": lambda m, t: ["search", str(m), "--calib", str(t), "--samples", "6", "--seq-len", "16", "--target",
                            "decode:1.3", "--method", "greedy", "--ops", "blocks,attention,mlp"],
    "search-mip": lambda m, t: ["search", str(m), "--calib", str(t), "--samples", "6", "--seq-len", "16", "--target",
                                "decode:1.3", "--method", "mip"],
}


def _ranks(command: str, folder) -> int:
    return json.loads((folder / ("metrics.json" if command == "analyze" else "search.json")).read_text())["ranks"]


def _choices(command: str, folder) -> tuple:
    if command == "analyze":
        m = json.loads((folder / "metrics.json").read_text())
        return [s["removed"] for s in m["sleb"]["steps"]], [round(s["ppl"], 4) for s in m["sleb"]["steps"]]
    return (folder / "recipe.yaml").read_text().split("# ")[0], None


@pytest.mark.parametrize("command", list(COMMANDS))
def test_analysis_and_search_split_windows_over_ranks_and_choose_what_one_process_chooses(calibrated, tmp_path,
                                                                                          command):
    model, text = calibrated
    args = COMMANDS[command](model, text)
    assert main([*args, "-o", str(tmp_path / "one")]) == 0
    want = _choices(command, tmp_path / "one")
    for n in (2, 3):
        run = torchrun(n, [*args, "-o", str(tmp_path / f"ranks-{n}")])
        assert run.returncode == 0, run.stderr[-3000:]
        got = _choices(command, tmp_path / f"ranks-{n}")
        assert _ranks(command, tmp_path / f"ranks-{n}") == n
        assert got[0] == want[0]
        if want[1] is not None:
            assert got[1] == pytest.approx(want[1], rel=1e-5)
