"""Hostile and careless inputs, as a user would give them: each is refused with exit 2 and a message naming
the problem, before any work, with nothing written, nothing left behind and the source byte for byte as it
was. Also what happens to an output when runs are killed or overlap (issue 14)."""
import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
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


def damaged(file: str, data: bytes | None = None, cut: float | None = None):
    """A case whose source file is replaced by ``data`` (or cut to a fraction of its size) before convert."""

    def case(e: Env):
        path = e.src / file
        path.write_bytes(data if cut is None else path.read_bytes()[: int(path.stat().st_size * cut)])
        return ["convert", e.recipe()]

    return case


def config(**changes):
    def case(e: Env):
        cfg = json.loads((e.src / "config.json").read_text())
        cfg.update(changes)
        for k in [k for k, v in changes.items() if v is ...]:
            del cfg[k]
        (e.src / "config.json").write_text(json.dumps(cfg))
        return ["convert", e.recipe()]

    return case


def recipe_bytes(data: bytes):
    def case(e: Env):
        (e.root / "r.yaml").write_bytes(data)
        return ["convert", str(e.root / "r.yaml")]

    return case


def index_naming(shard: str):
    def case(e: Env):
        names = {"model.embed_tokens.weight": "model.safetensors", "model.norm.weight": shard}
        (e.src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": names}))
        return ["convert", e.recipe()]

    return case


def weights(change):
    """A case whose source weights are rewritten after ``change`` edits their dict of tensors in place."""

    def case(e: Env):
        from safetensors.torch import load_file, save_file

        tensors = load_file(e.src / "model.safetensors")
        change(tensors)
        save_file(tensors, e.src / "model.safetensors", metadata={"format": "pt"})
        return ["convert", e.recipe()]

    return case


def renamed(old: str, new: str):
    def change(t):
        for k in [k for k in t if old in k]:
            t[k.replace(old, new)] = t.pop(k)

    return weights(change)


def sharded(edit):
    """A case whose source is split into two shards with an index, which ``edit`` then spoils."""

    def case(e: Env):
        from safetensors.torch import load_file, save_file

        tensors = load_file(e.src / "model.safetensors")
        (e.src / "model.safetensors").unlink()
        names = sorted(tensors)
        shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
        for shard, keys in shards.items():
            save_file({k: tensors[k] for k in keys}, e.src / shard, metadata={"format": "pt"})
        weight_map = {k: shard for shard, keys in shards.items() for k in keys}
        edit(weight_map)
        (e.src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        return ["convert", e.recipe()]

    return case


def swap_two_shards(weight_map):
    first = "model.embed_tokens.weight"
    weight_map[first] = next(f for f in weight_map.values() if f != weight_map[first])


class RunsCode:
    """Unpickling this calls os.system: what a malicious .bin does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def pickled(payload):
    """A case whose source holds only a .bin, written by ``payload`` (a function of the scratch folder and
    the .bin's path), converted with --allow-pickle."""

    def case(e: Env):
        (e.src / "model.safetensors").unlink()
        payload(e, e.src / "pytorch_model.bin")
        return ["convert", e.recipe(), "--allow-pickle"]

    return case


PICKLE = {
    "--allow-pickle, a .bin that runs code": (
        pickled(lambda e, path: torch.save({"model.embed_tokens.weight": RunsCode(e.root / "ran")}, path)),
        ["pytorch_model.bin was refused: it would call posix.system", "Nothing in it was run",
         "use the model's safetensors weights"]),
    "--allow-pickle, a .bin of garbage": (pickled(lambda e, path: path.write_bytes(b"garbage" * 10)),
                                          ["pytorch_model.bin was refused: it is not a PyTorch weights file"]),
    "--allow-pickle, a truncated .bin": (
        pickled(lambda e, path: (torch.save({"w": torch.ones(4)}, path), path.write_bytes(path.read_bytes()[:60]))),
        ["pytorch_model.bin is not a readable PyTorch weights file"]),
    "--allow-pickle, a .bin holding a list": (pickled(lambda e, path: torch.save([torch.ones(2)], path)),
                                              ["pytorch_model.bin holds a list, not a state dict"]),
}


def converted(e: Env) -> Path:
    """root/out, converted from the source by `slimconv convert` (so it records the source's weight hash)."""
    assert main(["convert", e.recipe(remove={"blocks": [1]})]) == 0
    return e.root / "out"


def other_weights(e: Env) -> Path:
    """root/other: a model of the source's type, size and layer count with other weights."""
    from helpers import make_tiny

    return make_tiny(e.root / "other", "llama-tied", seed=1)


def source_replaced(e: Env) -> Path:
    out = converted(e)
    shutil.copy2(other_weights(e) / "model.safetensors", e.src / "model.safetensors")
    shutil.rmtree(e.root / "other")
    return out


NOT_THE_SOURCE = {
    "bench on another model of the same type and layer count": (
        lambda e: ["bench", str(other_weights(e)), str(converted(e)), "--runtime", "torch"],
        ["is not the model", "was converted from: its weights' sha256", "give the model the recipe names"]),
    "validate after the source's weights changed": (
        lambda e: ["validate", str(source_replaced(e))],
        ["is not the model", "slimconv_plan.json records", "re-run `slimconv convert --force`"]),
}


K = "model.layers.1.self_attn.k_proj.weight"
# The tiny llama: hidden 64, 4 heads of 16, 2 KV heads, MLP 96, vocab 128, 6 layers, tied embeddings.
SOURCE_VS_CONFIG = {
    "tensor missing": (weights(lambda t: t.pop("model.layers.2.mlp.up_proj.weight")),
                       ["model.layers.2.mlp.up_proj.weight is missing", "expected shape (96, 64)"]),
    "tensor of the wrong shape": (weights(lambda t: t.update({K: t[K][:16]})),
                                  [f"{K} has shape (16, 64), expected (32, 64)", "num_key_value_heads x head_dim"]),
    "int32 tensor": (weights(lambda t: t.update({"model.norm.weight": t["model.norm.weight"].to(torch.int32)})),
                     ["model.safetensors: model.norm.weight is I32, expected a float dtype", "unquantised"]),
    "int8 projection": (weights(lambda t: t.update({K: t[K].to(torch.int8)})), [f"{K} is I8"]),
    "MoE weights under a llama config": (renamed("mlp.gate_proj", "mlp.experts.0.gate_proj"),
                                         ["model.layers.0.mlp.gate_proj.weight is missing"]),
    "hidden_size larger than the tensors": (config(hidden_size=128),
                                            ["model.embed_tokens.weight has shape (128, 64), expected (128, 128)",
                                             "hidden_size", "published with these weights"]),
    "intermediate_size smaller than the tensors": (config(intermediate_size=64),
                                                   ["gate_proj.weight has shape (96, 64), expected (64, 64)",
                                                    "intermediate_size"]),
    "vocab_size other than the embedding's": (config(vocab_size=256), ["expected (256, 64)", "vocab_size"]),
    "num_key_value_heads other than the tensors'": (config(num_key_value_heads=4), ["num_key_value_heads"]),
    "head_dim other than the tensors'": (config(head_dim=32), ["expected (128, 64)", "head_dim"]),
    "num_hidden_layers larger than the tensors": (config(num_hidden_layers=8),
                                                  ["has no tensors of layers 6-7", "num_hidden_layers 8"]),
    "num_hidden_layers smaller than the tensors": (config(num_hidden_layers=4),
                                                   ["holds tensors of layers 4-5", "num_hidden_layers 4"]),
    "untied config without lm_head": (config(tie_word_embeddings=False), ["lm_head.weight is missing"]),
    "index not covering a shard's tensor": (sharded(lambda m: m.pop("model.norm.weight")),
                                            ["does not match its shards: it does not list model.norm.weight"]),
    "index naming the wrong shard": (sharded(swap_two_shards),
                                     ["puts model.embed_tokens.weight in model-00002-of-00002.safetensors, but it is "
                                      "in model-00001-of-00002.safetensors"]),
    "index listing a tensor no shard holds": (sharded(lambda m: m.update({"model.extra.weight": next(iter(m.values()))})),
                                              ["lists model.extra.weight, which no shard holds"]),
}


def through(command, case):
    """``case``'s damage, then ``command(e)`` as the command that must refuse it (not convert)."""

    def run(e: Env):
        case(e)
        return command(e)

    return run


def damaged_output(e: Env) -> str:
    """A converted checkpoint with one of its tensors gone (what export reads)."""
    from safetensors.torch import load_file, save_file

    slim = e.slim()
    tensors = load_file(slim / "model.safetensors")
    tensors.pop("model.layers.1.mlp.down_proj.weight")
    save_file(tensors, slim / "model.safetensors", metadata={"format": "pt"})
    return str(slim)


MISSING = weights(lambda t: t.pop("model.layers.2.mlp.up_proj.weight"))
# The same header checks guard every command that reads a source or an output, before its slow work.
SOURCE_VS_CONFIG |= {
    "analyze, tensor missing": (through(lambda e: ["analyze", str(e.src), "-o", str(e.root / "a")], MISSING),
                                ["model.layers.2.mlp.up_proj.weight is missing"]),
    "analyze --early-exit, tensor missing": (
        through(lambda e: ["analyze", str(e.src), "-o", str(e.root / "a"), "--early-exit"], MISSING),
        ["model.layers.2.mlp.up_proj.weight is missing"]),
    "search, tensor missing": (
        through(lambda e: ["search", str(e.src), "--target", "layers:4", "-o", str(e.root / "s")], MISSING),
        ["model.layers.2.mlp.up_proj.weight is missing"]),
    "search, num_hidden_layers larger than the tensors": (
        through(lambda e: ["search", str(e.src), "--target", "layers:4", "-o", str(e.root / "s")],
                config(num_hidden_layers=8)), ["has no tensors of layers 6-7"]),
    "export, output tensor missing": (lambda e: ["export", damaged_output(e)],
                                      ["model.layers.1.mlp.down_proj.weight is missing", "convert again"]),
    "export gguf, output tensor missing": (lambda e: ["export", damaged_output(e), "--format", "gguf"],
                                           ["model.layers.1.mlp.down_proj.weight is missing", "convert again"]),
    "export a folder of an unsupported family": (lambda e: ["export", gpt2_folder(e)],
                                                 ["model_type 'gpt2' is not supported", "slimconv convert"]),
}


def gpt2_folder(e: Env) -> str:
    from safetensors.torch import save_file

    folder = e.root / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(dict(model_type="gpt2", hidden_size=64, num_hidden_layers=2,
                                                        num_attention_heads=4, intermediate_size=128, vocab_size=100)))
    save_file({"wte.weight": torch.zeros(100, 64)}, folder / "model.safetensors")
    return str(folder)


def mkdir(e: Env) -> str:
    (e.root / "recipe-folder").mkdir()
    return str(e.root / "recipe-folder")


# (case, words of the message); a case prepares the scratch folder and returns argv.
INPUTS = {
    "layer index true": (lambda e: ["convert", e.recipe(remove={"blocks": [True]})], ["remove.blocks", "got [True]"]),
    "layer index 2.0": (lambda e: ["convert", e.recipe(remove={"blocks": [1, 2.0]})], ["remove.blocks", "2.0"]),
    "layer index true, not a list": (lambda e: ["convert", e.recipe(remove={"attention": True})],
                                     ["remove.attention", "got True"]),
    "parallel group of floats": (lambda e: ["convert", e.recipe(parallel={"groups": [[1.0, 2.0]]})],
                                 ["parallel.groups", "1.0"]),
    "duplicate index": (lambda e: ["convert", e.recipe(remove={"blocks": [3, 3]})],
                        ["remove.blocks", "layer 3 is listed twice"]),
    "duplicate index inside a range": (lambda e: ["convert", e.recipe(remove={"mlp": [3, "2-4"]})],
                                       ["remove.mlp", "layer 3 is listed twice"]),
    "recipe is a directory": (lambda e: ["convert", mkdir(e)], ["is a directory"]),
    "recipe is not UTF-8": (recipe_bytes(b"model: caf\xe9\noutput: {dir: out}\n"), ["not UTF-8", "byte 10"]),
    "recipe is empty": (recipe_bytes(b""), ["a recipe is a YAML mapping", "empty file"]),
    "recipe is a list": (recipe_bytes(b"- model: default\n"), ["a recipe is a YAML mapping"]),
    "output.dir empty": (lambda e: ["convert", e.recipe(output={"dir": ""})], ["output.dir", "must name a folder"]),
    "output.dir blank": (lambda e: ["convert", e.recipe(output={"dir": "  "})], ["output.dir", "must name a folder"]),
    "output.dir a number": (lambda e: ["convert", e.recipe(output={"dir": 5})], ["output.dir", "string"]),
    "max_shard_size 0": (lambda e: ["convert", e.recipe(output={"dir": str(e.root / "out"), "max_shard_size": "0GB"})],
                         ["output.max_shard_size", "not a size"]),
    "model is a file, not a folder or .gguf": (lambda e: ["convert", e.recipe(model=str(e.src / "config.json"))],
                                               ["not a directory, a .gguf file or a Hub id"]),
    "config.json not JSON": (damaged("config.json", b"{not json"), ["config.json is not valid JSON"]),
    "config.json not a mapping": (damaged("config.json", b"[1, 2]"), ["not a JSON object", "list"]),
    "config.json without hidden_size": (config(hidden_size=...), ["has no 'hidden_size'"]),
    "num_hidden_layers a string": (config(num_hidden_layers="6"),
                                   ["'num_hidden_layers' must be a positive integer, got '6'"]),
    "num_attention_heads 0": (config(num_attention_heads=0), ["'num_attention_heads' must be a positive integer"]),
    "head_dim true": (config(head_dim=True), ["'head_dim' must be a positive integer, got True"]),
    "safetensors truncated": (damaged("model.safetensors", cut=0.5),
                              ["model.safetensors is not a readable safetensors file", "re-download"]),
    "safetensors zero bytes": (damaged("model.safetensors", b""), ["model.safetensors is not a readable safetensors"]),
    "safetensors garbage": (damaged("model.safetensors", bytes(range(256)) * 4),
                            ["model.safetensors is not a readable safetensors"]),
    "index names a missing shard": (index_naming("model-00002-of-00002.safetensors"),
                                    ["names model-00002-of-00002.safetensors, which is not in"]),
    "index not JSON": (damaged("model.safetensors.index.json", b"{"), ["not a safetensors index"]),
    "generate --max-new-tokens 0": (lambda e: ["generate", str(e.root), "hi", "--max-new-tokens", "0"],
                                    ["--max-new-tokens 0"]),
    "generate --temperature -1": (lambda e: ["generate", str(e.root), "hi", "--temperature", "-1"],
                                  ["--temperature -1"]),
    "generate --top-p 0": (lambda e: ["generate", str(e.root), "hi", "--temperature", "1", "--top-p", "0"],
                           ["--top-p 0"]),
    "analyze --samples 0": (lambda e: ["analyze", str(e.src), "-o", str(e.root / "a"), "--samples", "0"],
                            ["--samples 0", "greater than or equal to 1"]),
    "analyze --seq-len 1": (lambda e: ["analyze", str(e.src), "-o", str(e.root / "a"), "--seq-len", "1"],
                            ["--seq-len 1"]),
    "analyze --batch-size 0": (lambda e: ["analyze", str(e.src), "-o", str(e.root / "a"), "--batch-size", "0"],
                               ["--batch-size 0"]),
    "analyze --max-memory 0": (lambda e: ["analyze", str(e.src), "-o", str(e.root / "a"), "--max-memory", "0"],
                               ["--max-memory", "not a size"]),
    "run, validate.quality.data missing": (
        lambda e: ["run", e.recipe(validate={"quality": {"data": str(e.root / "held-out.txt")}})],
        ["validate.quality.data", "held-out.txt", "not 'wikitext2', 'kjv', 'hf:NAME' or an existing text file"]),
    "run, heal.data missing": (
        lambda e: ["run", e.recipe(stages=["convert", "validate", "heal"], heal={"data": str(e.root / "train.txt")})],
        ["heal.data", "train.txt"]),
    "validate a missing folder": (lambda e: ["validate", str(e.root / "nope")], ["not a slimconv output (it does not exist)"]),
    "push a file": (lambda e: ["push", str(e.src / "config.json"), "--repo-id", "me/x", "--dry-run"],
                    ["not a slimconv output (not a folder)"]),
}


@pytest.mark.parametrize("case", INPUTS)
def test_bad_input_is_refused_before_any_work(env, case, capsys, monkeypatch):
    build, words = INPUTS[case]
    refused(env, lambda e: (build(e), words), capsys, monkeypatch)


@pytest.mark.parametrize("case", PICKLE)
def test_a_pickle_the_restricted_loader_refuses_is_an_error_naming_what(env, case, capsys, monkeypatch):
    build, words = PICKLE[case]
    refused(env, lambda e: (build(e), words), capsys, monkeypatch)
    assert not (env.root / "ran").exists()


@pytest.mark.parametrize("case", NOT_THE_SOURCE)
def test_another_model_than_the_recorded_source_is_refused(env, case, capsys, monkeypatch):
    build, words = NOT_THE_SOURCE[case]
    refused(env, lambda e: (build(e), words), capsys, monkeypatch)


def test_bench_warns_when_the_output_records_no_source_hash(env, capsys):
    """An output of an older slimconv cannot be checked: bench says so and measures."""
    out = converted(env)
    meta = json.loads((out / "slimconv_plan.json").read_text())
    del meta["source_sha256"]
    (out / "slimconv_plan.json").write_text(json.dumps(meta))
    capsys.readouterr()
    assert main(["bench", str(env.src), str(out), "--runtime", "torch", "--prompt-lens", "4", "--new-tokens", "2",
                 "--repeats", "1", "--out-json", str(env.root / "b.json")]) == 0
    assert "records no source weight hash" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("case", SOURCE_VS_CONFIG)
def test_a_source_that_disagrees_with_its_config_is_refused_before_any_work(env, case, capsys, monkeypatch):
    build, words = SOURCE_VS_CONFIG[case]
    refused(env, lambda e: (build(e), words), capsys, monkeypatch)


def test_tensors_the_architecture_lacks_are_named_in_a_warning(env, capsys):
    from safetensors.torch import load_file, save_file

    tensors = load_file(env.src / "model.safetensors")
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(tensors, env.src / "model.safetensors", metadata={"format": "pt"})
    assert main(["convert", env.recipe(remove={"blocks": [1]})]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "1 tensor(s) a llama checkpoint does not have: model.layers.0.self_attn.rotary_emb.inv_freq" in out


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


def test_a_sources_own_modeling_code_runs_only_when_the_user_agrees(tiny_models, tmp_path, capsys):
    """validate loads the source; a source whose config has an auto_map with its own .py is refused before
    that code is imported (the file would leave a marker), and runs with --trust-remote-code."""
    import json

    from slimconv.cli import main
    from slimconv.runtime import load_model

    from helpers import with_word_tokenizer

    src = with_word_tokenizer(tiny_models["llama-tied"], tmp_path / "src", 120)
    marker = tmp_path / "ran"
    cfg = json.loads((src / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (src / "config.json").write_text(json.dumps(cfg))
    (src / "modeling_custom.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                            "from transformers import LlamaForCausalLM\n\n\n"
                                            "class CustomForCausalLM(LlamaForCausalLM):\n    pass\n")
    out = tmp_path / "out"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {src}\nremove:\n  attention: [2]\noutput:\n  dir: {out}\n  format: slim\n"
                      "validate:\n  exactness:\n    greedy_tokens: 2\n  quality:\n    enabled: false\n")
    assert main(["convert", str(recipe)]) == 0
    capsys.readouterr()
    assert main(["validate", str(out)]) == 2
    assert "its own modeling code" in capsys.readouterr().err and not marker.exists()
    load_model(out)  # the output's code is slimconv's bundled code: it runs without asking
    assert not marker.exists()
    main(["validate", str(out), "--trust-remote-code"])
    assert marker.exists()


def test_a_blocks_only_output_drops_the_sources_auto_map(tiny_models, tmp_path):
    """The output is a stock checkpoint of a stock model_type; the source's auto_map (config and tokenizer
    config) would point at code the output does not carry."""
    import json

    from transformers import AutoTokenizer

    from helpers import convert, with_word_tokenizer
    from slimconv.runtime import load_model

    src = with_word_tokenizer(tiny_models["qwen2"], tmp_path / "src", 120)
    for name, auto_map in (("config.json", {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}),
                           ("tokenizer_config.json", {"AutoTokenizer": ["tokenization_custom.CustomTokenizer", None]})):
        settings = json.loads((src / name).read_text())
        settings["auto_map"] = auto_map
        (src / name).write_text(json.dumps(settings))
    convert(src, tmp_path / "out", remove={"blocks": [1]})
    for name in ("config.json", "tokenizer_config.json"):
        assert "auto_map" not in json.loads((tmp_path / "out" / name).read_text())
    load_model(tmp_path / "out")
    assert AutoTokenizer.from_pretrained(str(tmp_path / "out")).vocab_size == 121


@pytest.mark.parametrize("spoil", ["config", "dtype"])
def test_an_output_that_fails_its_own_check_never_reaches_the_final_path(env, monkeypatch, spoil):
    """The written checkpoint is read back before the rename; a converter bug (simulated: a config that
    does not describe the weights, or weights not in the requested dtype) leaves nothing behind."""
    import slimconv.convert as convert

    if spoil == "config":
        slim_config = convert.slim_config
        monkeypatch.setattr(convert, "slim_config",
                            lambda *a, **k: {**slim_config(*a, **k), "intermediate_size": 128})
    else:
        write_shards = convert.write_shards
        monkeypatch.setattr(convert, "write_shards",
                            lambda jobs, *a, **k: write_shards([j.__class__(j.name, j.shape, torch.float32, j.compute)
                                                                for j in jobs], *a, **k))
    r = env.recipe(remove={"blocks": [1]}, output={"dir": str(env.root / "out"), "dtype": "float16"})
    before = tree(env.root)
    with pytest.raises(RuntimeError, match="internal error: the checkpoint just written to .* fails its own check"):
        main(["convert", r])
    assert tree(env.root) == before  # no output, no temporary folder, no lock
