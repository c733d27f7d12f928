"""`slimconv bench`: rows, card, recipe section and input errors on tiny models (no timing assertions)."""
import json

import pytest

from slimconv.cli import main
from slimconv.convert import run_convert
from slimconv.recipe import parse_recipe

KEYS = {"runtime", "threads", "batch", "prompt", "new tokens", "prefill ms source", "prefill ms slim",
        "prefill speedup", "prefill ideal", "prefill measured/ideal", "decode tok/s source", "decode tok/s slim",
        "decode speedup", "decode ideal", "decode measured/ideal", "weights+KV MB source", "weights+KV MB slim"}
TINY_ARGS = ["--new-tokens", "2", "--repeats", "1", "--prompt-lens", "8", "--threads", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def slim(tiny_models, tmp_path_factory):
    from slimconv.report import console

    out = tmp_path_factory.mktemp("bench") / "slim"
    recipe = parse_recipe({"model": str(tiny_models["llama-tied"]), "output": {"dir": str(out)},
                           "remove": {"attention": [4, 5]}, "parallel": {"groups": [[1, 2]]}})
    with console.capture():
        run_convert(recipe)
    return out


def test_bench_rows_and_card(slim, tiny_models, tmp_path, capsys):
    src = str(tiny_models["llama-tied"])
    assert main(["bench", src, str(slim), "--runtime", "torch,onnx", "--batch", "1,2",
                 "--plot", str(tmp_path / "speed.png"), *TINY_ARGS]) == 0
    rows = json.loads((slim / "slimconv_bench.json").read_text())
    assert [(r["runtime"], r["batch"]) for r in rows] == [
        ("torch cpu", 1), ("torch cpu", 2), ("onnxruntime cpu", 1), ("onnxruntime cpu", 2)]
    assert all(set(r) == KEYS for r in rows)
    # Fewer attention layers and no removed MLP: ideal speedups above 1, less KV cache.
    assert all(r["prefill ideal"] > 1 and r["decode ideal"] > 1 for r in rows)
    assert all(r["weights+KV MB slim"] < r["weights+KV MB source"] for r in rows)
    assert (slim / "onnx" / "model.onnx").is_file()  # exported because it was missing
    assert "missing: exporting it now" in capsys.readouterr().out
    card = (slim / "README.md").read_text()
    assert "## Speed" in card and "decode measured/ideal" in card and "onnxruntime cpu" in card
    assert (tmp_path / "speed.png").stat().st_size > 0
    # --out-json leaves the output (and its card) alone.
    assert main(["bench", src, str(slim), "--runtime", "torch", "--out-json", str(tmp_path / "b.json"),
                 *TINY_ARGS]) == 0
    assert len(json.loads((tmp_path / "b.json").read_text())) == 1
    assert len(json.loads((slim / "slimconv_bench.json").read_text())) == 4


@pytest.mark.parametrize("args, message", [
    (["--runtime", "tensorflow"], "--runtimes tensorflow: Input should be 'torch' or 'onnx'"),
    (["--prompt-lens", "128;512"], "--prompt-lens 128;512: Input should be a valid integer"),
    (["--batch", "0"], "--batch 0: Input should be greater than or equal to 1"),
])
def test_bench_bad_inputs(slim, tiny_models, capsys, args, message):
    assert main(["bench", str(tiny_models["llama-tied"]), str(slim), *args]) == 2
    assert message in capsys.readouterr().err


def test_bench_needs_an_output_and_its_source(slim, tiny_models, tmp_path, capsys):
    assert main(["bench", str(tiny_models["llama-tied"]), str(tmp_path)]) == 2
    assert "no slimconv_plan.json" in capsys.readouterr().err
    assert main(["bench", str(tiny_models["qwen3"]), str(slim)]) == 2
    assert "is not the source of" in capsys.readouterr().err


def test_recipe_bench_section():
    base = {"model": "default", "output": {"dir": "x"}}
    r = parse_recipe({**base, "stages": ["convert", "export", "bench"],
                      "bench": {"runtimes": ["onnx"], "prompt_lens": [128, 512], "batch": [1, 8]}})
    assert r.bench.new_tokens == 32 and r.bench.repeats == 3
    from slimconv.errors import SlimError

    with pytest.raises(SlimError, match="bench.runtime.*did you mean 'runtimes'"):
        parse_recipe({**base, "stages": ["bench"], "bench": {"runtime": ["onnx"]}})
    with pytest.raises(SlimError, match="bench.runtimes"):
        parse_recipe({**base, "stages": ["bench"], "bench": {"runtimes": ["tensorflow"]}})
    with pytest.raises(SlimError, match="stages do not include bench"):
        parse_recipe({**base, "bench": {}})


def test_run_with_bench_stage(tiny_models, tmp_path):
    import yaml

    out = tmp_path / "slim"
    recipe = {"model": str(tiny_models["qwen2"]), "output": {"dir": str(out)}, "remove": {"blocks": [5]},
              "stages": ["convert", "bench"],
              "bench": {"runtimes": ["torch"], "prompt_lens": [8], "new_tokens": 2, "repeats": 1}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["run", str(tmp_path / "r.yaml")]) == 0
    # The stage's device is auto: CUDA where torch sees a GPU.
    assert [r["runtime"] for r in json.loads((out / "slimconv_bench.json").read_text())] in (["torch cpu"], ["torch cuda"])
    assert "## Speed" in (out / "README.md").read_text()


def test_torch_dtype_runs_both_models_in_it_and_sizes_memory_by_it(slim, tiny_models, tmp_path):
    src = str(tiny_models["llama-tied"])
    rows = {}
    for dtype in ("float32", "bfloat16"):
        assert main(["bench", src, str(slim), "--runtime", "torch", "--torch-dtype", dtype,
                     "--out-json", str(tmp_path / f"{dtype}.json"), *TINY_ARGS]) == 0
        [rows[dtype]] = json.loads((tmp_path / f"{dtype}.json").read_text())
    assert rows["float32"]["runtime"] == "torch cpu" and rows["bfloat16"]["runtime"] == "torch cpu bfloat16"
    for k in ("weights+KV MB source", "weights+KV MB slim"):
        assert rows["bfloat16"][k] == pytest.approx(rows["float32"][k] / 2)
    assert parse_recipe({"model": "x", "output": {"dir": "o"}, "stages": ["bench"],
                         "bench": {"torch_dtype": "float16"}}).bench.torch_dtype == "float16"


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="torch sees no CUDA device (CI has none)")
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_bench_on_cuda(slim, tiny_models, tmp_path, dtype):
    assert TINY_ARGS[-2:] == ["--device", "cpu"]
    assert main(["bench", str(tiny_models["llama-tied"]), str(slim), "--runtime", "torch", "--torch-dtype", dtype,
                 "--out-json", str(tmp_path / "b.json"), *TINY_ARGS[:-1], "cuda"]) == 0
    [row] = json.loads((tmp_path / "b.json").read_text())
    assert row["runtime"] == "torch cuda" + ("" if dtype == "float32" else f" {dtype}")
    assert row["decode tok/s slim"] > 0 and row["decode tok/s source"] > 0
