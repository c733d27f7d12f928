"""The command line as a user meets it: exit codes, messages without tracebacks, nothing lost."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from slimconv.cli import main
from helpers import with_word_tokenizer


def write_recipe(path: Path, **recipe) -> Path:
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_help_lists_the_stages(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in ("plan", "convert", "validate", "run", "schema", "Exit codes"):
        assert cmd in out


def test_bad_recipe_is_exit_2_without_traceback(tmp_path):
    r = write_recipe(tmp_path / "r.yaml", model="default", remov={"blocks": [1]}, output={"dir": str(tmp_path / "o")})
    p = subprocess.run([sys.executable, "-m", "slimconv", "plan", str(r)], capture_output=True, text=True)
    assert p.returncode == 2
    assert "did you mean 'remove'" in p.stderr and "Traceback" not in p.stderr


def test_missing_recipe_and_missing_model(tmp_path, capsys):
    assert main(["plan", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    r = write_recipe(tmp_path / "r.yaml", model=str(tmp_path / "no-such-dir"), output={"dir": str(tmp_path / "o")})
    assert main(["plan", str(r)]) == 2
    assert "not a directory, a .gguf file or a Hub id" in capsys.readouterr().err


def test_pickle_weights_are_refused_unless_allowed(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (src / "pytorch_model.bin").write_bytes(b"")
    r = write_recipe(tmp_path / "r.yaml", model=str(src), output={"dir": str(tmp_path / "o")})
    assert main(["plan", str(r)]) == 2
    err = capsys.readouterr().err
    assert "pickle" in err and "allow_pickle" in err


def test_convert_plan_then_refuse_overwrite_without_force(tiny_models, tmp_path, capsys):
    out = tmp_path / "out"
    r = write_recipe(tmp_path / "r.yaml", model=str(tiny_models["llama-tied"]), remove={"attention": "4-5"},
                     output={"dir": str(out)}, validate={"quality": {"enabled": False}})
    assert main(["plan", str(r)]) == 0
    printed = capsys.readouterr().out
    assert "attention only" not in printed and "MLP only" in printed and "ideal speedup" in printed
    assert not out.exists()
    assert main(["convert", str(r)]) == 0
    first = (out / "model.safetensors").stat().st_mtime_ns
    assert main(["convert", str(r)]) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "model.safetensors").stat().st_mtime_ns == first
    assert main(["convert", str(r), "--force"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "r.yaml"]  # no temp dirs left behind
    for f in ("config.json", "modeling_slim.py", "configuration_slim.py", "slimconv_recipe.yaml",
              "slimconv_plan.json", "README.md"):
        assert (out / f).is_file(), f


def test_failed_conversion_leaves_no_output(tiny_models, tmp_path, monkeypatch):
    import slimconv.convert as conv

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(conv, "write_shards", boom)
    r = write_recipe(tmp_path / "r.yaml", model=str(tiny_models["llama-tied"]), remove={"mlp": [1]},
                     output={"dir": str(tmp_path / "out")})
    with pytest.raises(RuntimeError):
        main(["convert", str(r)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


def test_validate_exactness_only_and_failing_threshold(tiny_models, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{i % 50}" for i in range(4000)))
    # a copy: the session's tiny models stay tokenizer-free for the tests that need one without
    src = with_word_tokenizer(tiny_models["llama-tied"], tmp_path / "src", 50)
    out = tmp_path / "out"
    r = write_recipe(tmp_path / "r.yaml", model=str(src), remove={"attention": [2]}, output={"dir": str(out)},
                     validate={"exactness": {"prompt_tokens": 16, "greedy_tokens": 8},
                               "quality": {"data": str(text), "samples": 4, "seq_len": 32, "min_top1": 1.01}})
    assert main(["run", str(r)]) == 1  # quality threshold cannot be met
    report = json.loads((out / "slimconv_report.json").read_text())
    assert report["exactness"]["passed"] and not report["quality"]["passed"]
    assert "min_top1" in report["quality"]["failures"][0]
    card = (out / "README.md").read_text()
    assert "slimconv" in card and "Exactness" in card and "| out |" in card
    assert main(["validate", str(out), "--skip-quality"]) == 0


def test_bundled_modeling_loads_without_slimconv(tiny_models, tmp_path):
    from helpers import convert

    convert(tiny_models["qwen3"], tmp_path / "out", parallel={"groups": [[1, 2]]})
    code = ("import sys; sys.modules['slimconv'] = None\n"
            "import torch; from transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'out')!r}, trust_remote_code=True)\n"
            "print(m.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False).shape)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "[1, 7]" in p.stdout


def test_sharded_output_has_an_index(tiny_models, tmp_path):
    from safetensors import safe_open

    from helpers import convert

    convert(tiny_models["llama-bias-untied"], tmp_path / "out", shard="40KB", parallel={"groups": [[0, 1]]})
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1
    names = set()
    for s in shards:
        with safe_open(tmp_path / "out" / s, "pt") as f:
            names |= set(f.keys())
    assert names == set(index["weight_map"])


def test_schema_command(capsys):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert {"model", "remove", "parallel", "output", "validate"} <= set(schema["properties"])


def test_hub_model_without_network_is_a_clear_error(tmp_path, capsys):
    r = write_recipe(tmp_path / "r.yaml", model="someone/some-model", output={"dir": str(tmp_path / "o")})
    assert main(["plan", str(r)]) == 2  # HF_HUB_OFFLINE=1 in the tests: nothing is contacted
    err = capsys.readouterr().err
    assert "someone/some-model" in err and "network" in err and "Traceback" not in err
