"""ONNX export (validation question 2): ONNX Runtime against the slim PyTorch model, with the KV cache."""
import json

import onnx
import pytest
import torch

from helpers import convert
from slimconv.cli import main
from slimconv.formats.onnx_export import export_onnx, validate_onnx

CASES = {
    "wide-and-sublayers": dict(parallel={"groups": [[1, 2], "3-5"]}, remove={"attention": [4], "mlp": [0]}),
    "blocks-only-stock": dict(remove={"blocks": [0, 3]}),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("arch", ["qwen3", "mistral", "llama-bias-untied"])
def test_onnx_matches_pytorch_with_cache(tiny_models, tmp_path, arch, case):
    convert(tiny_models[arch], tmp_path / "slim", **CASES[case])
    (tmp_path / "onnx").mkdir()
    info = export_onnx(tmp_path / "slim", tmp_path / "onnx")
    prompts = [torch.randint(1, 128, (n,), generator=torch.Generator().manual_seed(n)) for n in (12, 7, 3)]
    report = validate_onnx(tmp_path / "onnx", tmp_path / "slim", prompts, steps=16, provider="cpu")
    assert report["passed"], report
    assert report["provider"] == "CPUExecutionProvider"
    assert report["cases"]["batch 3, left-padded"]["greedy_agreement"] == "51/51"
    # One past/present pair per kept source attention, uniform shapes (a wide layer exposes one per member).
    kept = {"wide-and-sublayers": 5, "blocks-only-stock": 4}[case]
    assert info["cache_pairs"] == kept
    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx"), load_external_data=False).graph
    names = [i.name for i in graph.input]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert names[3:] == [f"past_key_values.{i}.{k}" for i in range(kept) for k in ("key", "value")]
    assert [o.name for o in graph.output][1:] == [f"present.{i}.{k}" for i in range(kept) for k in ("key", "value")]
    kv_dims = {tuple(d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim) for i in graph.input[3:]}
    assert len(kv_dims) == 1
    assert json.loads((tmp_path / "onnx" / "config.json").read_text())["num_cache_pairs"] == kept


def _ops(directory):
    import collections

    return collections.Counter(n.op_type for n in onnx.load(str(directory / "model.onnx"),
                                                             load_external_data=False).graph.node)


def test_unslimmed_graph_is_as_lean_as_the_builders(tiny_models, tmp_path):
    """The stock source itself: per layer one norm, one packed q/k/v MatMul, one GroupQueryAttention, o_proj,
    a norm, gate/up/SiLU/down (onnxruntime-genai's builder writes the same); a few shared mask nodes; no
    Transpose (weights are stored pre-transposed) and no Constant node."""
    layers = 6
    (tmp_path / "onnx").mkdir()
    export_onnx(tiny_models["llama-tied"], tmp_path / "onnx")
    ops = _ops(tmp_path / "onnx")
    assert ops["GroupQueryAttention"] == layers
    assert ops["SkipSimplifiedLayerNormalization"] == 2 * layers and ops["SimplifiedLayerNormalization"] == 1
    assert ops["MatMul"] == 5 * layers and ops["FusedMatMul"] == 1  # tied head reads the embedding
    assert "Transpose" not in ops and "Constant" not in ops
    assert sum(ops.values()) <= 11 * layers + 16, ops
    model = onnx.load(str(tmp_path / "onnx" / "model.onnx"), load_external_data=False)
    assert_ops_known_to_onnxruntime(model)
    # Not the installed onnx's newest IR: onnxruntime 1.30 refused IR 14 (docs/results/gpu-h200.md).
    assert model.ir_version == 10


def test_removed_sublayers_write_no_nodes_and_wide_layers_one_attention_per_member(tiny_models, tmp_path):
    convert(tiny_models["qwen2"], tmp_path / "slim", remove={"attention": [4, 5], "mlp": [0]},
            parallel={"groups": [[1, 2]]})
    (tmp_path / "onnx").mkdir()
    info = export_onnx(tmp_path / "slim", tmp_path / "onnx")
    ops = _ops(tmp_path / "onnx")
    # 6 source attentions, 2 removed: 4 nodes and 4 cache pairs, the wide layer's two among them.
    assert ops["GroupQueryAttention"] == info["cache_pairs"] == 4
    assert ops["Split"] == 1 and ops["Concat"] == 2  # the wide layer's members; the mask's shape
    # q/k/v + o for 3 attention layers; gate/up/down for the wide MLP and the 3 other kept MLPs.
    assert ops["MatMul"] == 2 * 3 + 3 * 4
    assert ops["Add"] == 3  # qwen2's q/k/v bias, packed into one vector per attention layer


@pytest.mark.parametrize("arch, algorithm", [("llama-bias-untied", "rtn"), ("qwen3", "rtn"), ("qwen3", "k_quant")])
def test_int4_graph_matches_the_int4_rounded_model(tiny_models, tmp_path, arch, algorithm):
    convert(tiny_models[arch], tmp_path / "slim", parallel={"groups": [[2, 3]]}, remove={"mlp": [0]})
    (tmp_path / "onnx").mkdir()
    export_onnx(tmp_path / "slim", tmp_path / "onnx", "int4", block_size=16, algorithm=algorithm)
    ops = _ops(tmp_path / "onnx")
    # q/k/v + o in 5 layers, gate/up/down in the 4 that keep their MLP, the head.
    assert "MatMul" not in ops and ops["MatMulNBits"] == 2 * 5 + 3 * 4 + 1, ops
    prompts = [torch.randint(1, 128, (n,), generator=torch.Generator().manual_seed(n)) for n in (12, 7, 3)]
    report = validate_onnx(tmp_path / "onnx", tmp_path / "slim", prompts, steps=8, provider="cpu")
    assert report["passed"], report
    # The rounded weights are what the graph computes: much closer to it than the float model is.
    for case in report["cases"].values():
        assert case["kl"] < case["against_float_model"]["kl"]


@pytest.mark.parametrize("dtype", ["float32", "int4"])
def test_nemotron_nas_output_exports(tiny_models, tmp_path, dtype):
    """The default recipe's format (sublayers removed, written as nemotron-nas) exports and checks like any
    other: the graph is built from the same layer specs."""
    from helpers import make_tiny

    # nemotron-nas needs an MLP width its ffn_mult formula reproduces (a multiple of 256 here).
    src = make_tiny(tmp_path / "src", "llama-bias-untied", intermediate_size=256)
    convert(src, tmp_path / "slim", fmt="nemotron-nas", remove={"attention": [3, 5], "mlp": [1]})
    assert json.loads((tmp_path / "slim" / "config.json").read_text())["model_type"] == "nemotron-nas"
    (tmp_path / "onnx").mkdir()
    info = export_onnx(tmp_path / "slim", tmp_path / "onnx", dtype, block_size=16)
    assert info["cache_pairs"] == 4
    prompts = [torch.randint(1, 128, (n,), generator=torch.Generator().manual_seed(n)) for n in (12, 7, 3)]
    assert validate_onnx(tmp_path / "onnx", tmp_path / "slim", prompts, steps=8, provider="cpu")["passed"]


def test_cuda_graphs_are_written_for_half_precision_activations(tiny_models, tmp_path):
    """No GPU here: the CUDA graphs are checked for structure (ops ONNX Runtime registers, float16
    activations and cache with int4 weights), and fp32 for CUDA is refused (GroupQueryAttention has no
    float32 CUDA kernel)."""
    from slimconv.errors import SlimError

    convert(tiny_models["qwen3"], tmp_path / "slim", parallel={"groups": [[1, 2]]}, remove={"attention": [4]})
    (tmp_path / "int4").mkdir()
    export_onnx(tmp_path / "slim", tmp_path / "int4", "int4", provider="cuda")
    model = onnx.load(str(tmp_path / "int4" / "model.onnx"))
    assert_ops_known_to_onnxruntime(model)
    assert {o.type.tensor_type.elem_type for o in model.graph.output} == {onnx.TensorProto.FLOAT16}
    genai = json.loads((tmp_path / "int4" / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["session_options"]["provider_options"] == [{"cuda": {}}]
    (tmp_path / "fp32").mkdir()
    with pytest.raises(SlimError, match="needs the CPU provider"):
        export_onnx(tmp_path / "slim", tmp_path / "fp32", "float32", provider="cuda")


def test_export_cli_refuses_non_checkpoint_and_existing(tmp_path, tiny_models, capsys):
    assert main(["export", str(tmp_path)]) == 2
    assert "not a converted checkpoint" in capsys.readouterr().err
    assert main(["generate", str(tmp_path), "hi"]) == 2
    assert "slimconv export" in capsys.readouterr().err
    convert(tiny_models["llama-tied"], tmp_path / "slim", remove={"mlp": [1]})
    (tmp_path / "slim" / "onnx").mkdir()
    assert main(["export", str(tmp_path / "slim")]) == 2
    assert "--force" in capsys.readouterr().err


@pytest.mark.smollm
def test_smollm2_export_and_generate(smollm2_dir, tmp_path, capsys):
    from slimconv.runtime import generate
    from slimconv.source import AUX_FILES
    import shutil

    convert(smollm2_dir, tmp_path / "slim", parallel={"groups": [[12, 13]]}, remove={"attention": [27]})
    for name in AUX_FILES:
        if (smollm2_dir / name).is_file():
            shutil.copy2(smollm2_dir / name, tmp_path / "slim" / name)
    assert main(["export", str(tmp_path / "slim"), "--provider", "cpu"]) == 0
    report = json.loads((tmp_path / "slim" / "onnx" / "slimconv_onnx_report.json").read_text())
    assert report["passed"] and report["cases"]["batch 1"]["max_abs_error"] < 2e-4
    pieces = list(generate(tmp_path / "slim" / "onnx", "The capital of France is", max_new_tokens=8))
    stats = pieces[-1]
    assert stats["new_tokens"] >= 1 and stats["provider"] == "CPUExecutionProvider"
    from slimconv.runtime import load_model
    model = load_model(tmp_path / "slim")
    from transformers import AutoTokenizer
    ids = AutoTokenizer.from_pretrained(str(tmp_path / "slim"))("The capital of France is", return_tensors="pt").input_ids
    want = model.generate(ids, max_new_tokens=len(stats["token_ids"]), do_sample=False)[0, ids.shape[1]:]
    assert want.tolist() == stats["token_ids"]


def test_run_with_export_stage(tiny_models, tmp_path):
    import yaml

    out = tmp_path / "out"
    recipe = dict(model=str(tiny_models["qwen2"]), parallel={"groups": [[2, 3]]}, output={"dir": str(out)},
                  stages=["convert", "export"])
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["run", str(tmp_path / "r.yaml")]) == 0
    assert json.loads((out / "onnx" / "slimconv_onnx_report.json").read_text())["passed"]


@pytest.mark.smollm
@pytest.mark.parametrize("dtype", ["float32", "int4"])
def test_onnxruntime_genai_generates_the_same_greedy_tokens(smollm2_dir, tmp_path, dtype):
    """onnxruntime-genai drives the exported folder through its genai_config.json (uniform cache of
    one pair per source attention, wide layers included) and matches slimconv's own ONNX loop."""
    import shutil

    og = pytest.importorskip("onnxruntime_genai")
    from slimconv.runtime import generate
    from slimconv.source import AUX_FILES

    convert(smollm2_dir, tmp_path / "slim", parallel={"groups": [[12, 13], "16-18"]}, remove={"attention": [27]})
    for name in AUX_FILES:
        if (smollm2_dir / name).is_file():
            shutil.copy2(smollm2_dir / name, tmp_path / "slim" / name)
    (tmp_path / "onnx").mkdir()
    export_onnx(tmp_path / "slim", tmp_path / "onnx", dtype)
    prompt = "The capital of France is"
    ours = list(generate(tmp_path / "onnx", prompt, max_new_tokens=24, provider="cpu"))[-1]["token_ids"]
    model = og.Model(str(tmp_path / "onnx"))
    tok = og.Tokenizer(model)
    params = og.GeneratorParams(model)
    ids = tok.encode(prompt)
    params.set_search_options(max_length=len(ids) + 24, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    theirs = []
    while not gen.is_done():
        gen.generate_next_token()
        theirs.append(int(gen.get_next_tokens()[0]))
    eos = json.loads((tmp_path / "onnx" / "config.json").read_text())["eos_token_id"]
    assert [t for t in theirs if t != eos] == ours


def test_fp16_with_external_data_loads_and_matches(tiny_models, tmp_path, capsys):
    """float16 graph, weights forced into model.onnx.data: ONNX Runtime loads it, the check against the
    float32 PyTorch model passes with the float16 criterion (its cache is fed in float16)."""
    convert(tiny_models["llama-tied"], tmp_path / "slim", parallel={"groups": [[1, 2]]}, remove={"attention": [4]})
    assert main(["export", str(tmp_path / "slim"), "--dtype", "fp16", "--external-data", "always",
                 "--provider", "cpu"]) == 0
    onnx_dir = tmp_path / "slim" / "onnx"
    report = json.loads((onnx_dir / "slimconv_onnx_report.json").read_text())
    assert report["passed"] and report["dtype"] == "float16" and report["export"]["external_data"]
    for case in report["cases"].values():  # measured ~5e-4 of a logit scale ~1
        assert 0 < case["max_abs_error"] <= 0.01 * case["max_abs_logit"]
    assert json.loads((onnx_dir / "config.json").read_text())["onnx_dtype"] == "float16"
    data = onnx_dir / "model.onnx.data"
    assert data.stat().st_size > 100_000 > (onnx_dir / "model.onnx").stat().st_size
    model = onnx.load(str(onnx_dir / "model.onnx"))  # resolves every external reference
    floats = [i for i in model.graph.initializer if i.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]
    assert {i.data_type for i in floats} == {onnx.TensorProto.FLOAT16}
    # Every weight lives in the data file; only shape constants and scalars stay in the graph (shape
    # inference must read them).
    graph = onnx.load(str(onnx_dir / "model.onnx"), load_external_data=False).graph
    inline = [i for i in graph.initializer if i.data_location != onnx.TensorProto.EXTERNAL]
    assert inline and all(len(i.dims) <= 1 and sum(i.dims) <= 4 for i in inline)


def assert_ops_known_to_onnxruntime(model):
    """Every node is an op ONNX Runtime registers, with the attributes its schema names (onnx's checker
    does not know ONNX Runtime's SimplifiedLayerNormalization, which lives in the default domain)."""
    from onnxruntime.capi.onnxruntime_pybind11_state import get_all_operator_schema

    schemas = {(s.name, s.domain or ""): s for s in get_all_operator_schema()}
    for node in model.graph.node:
        schema = schemas.get((node.op_type, node.domain or ""))
        assert schema is not None, f"{node.op_type} ({node.domain}) is not an ONNX Runtime op"
        assert {a.name for a in node.attribute} <= set(schema.attributes), node.name


def test_external_data_threshold_and_bfloat16(tiny_models, tmp_path, monkeypatch, capsys):
    import slimconv.formats.onnx_export as export

    convert(tiny_models["qwen2"], tmp_path / "slim", remove={"mlp": [1]})
    monkeypatch.setattr(export, "INLINE_LIMIT", 1000)  # as if the tiny model were over 2 GB
    (tmp_path / "auto").mkdir()
    assert export_onnx(tmp_path / "slim", tmp_path / "auto", external_data="auto")["external_data"]
    assert (tmp_path / "auto" / "model.onnx.data").is_file()
    assert main(["export", str(tmp_path / "slim"), "--external-data", "never", "--provider", "cpu"]) == 2
    assert "2 GB" in capsys.readouterr().err
    monkeypatch.undo()
    # bfloat16: a graph for CUDA is written, but ONNX Runtime's CPU provider cannot run it, so the CLI
    # refuses it here.
    (tmp_path / "bf16").mkdir()
    assert export_onnx(tmp_path / "slim", tmp_path / "bf16", "bfloat16", provider="cuda")["dtype"] == "bfloat16"
    model = onnx.load(str(tmp_path / "bf16" / "model.onnx"))
    assert_ops_known_to_onnxruntime(model)
    floats = {i.data_type for i in model.graph.initializer} - {onnx.TensorProto.INT64, onnx.TensorProto.INT32}
    assert floats == {onnx.TensorProto.BFLOAT16}
    assert main(["export", str(tmp_path / "slim"), "--dtype", "bf16", "--provider", "cpu"]) == 2
    assert "needs the CUDA provider" in capsys.readouterr().err


def test_k_quant_blocks_are_onnx_runtimes_own():
    """int4 k_quant packs ONNX Runtime's k-quant levels, scales and zero points into MatMulNBits' layout: unpacked,
    they give back its dequantised weight; an odd block count pads the last zero-point byte."""
    import numpy as np
    from onnxruntime.quantization.neural_compressor.weight_only import quant_tensor_k_quant_cpu

    from slimconv.formats.onnx_graph import dequantize_int4

    w = torch.randn(6, 96, generator=torch.Generator().manual_seed(0))  # 3 blocks of 32 per row
    levels, scale, zero = quant_tensor_k_quant_cpu(w.numpy().copy(), 4, 32)
    theirs = ((levels - zero) * scale).reshape(6, 96)
    assert np.allclose(dequantize_int4(w, 32, False, "k_quant").numpy(), theirs, rtol=1e-6, atol=1e-7)


# -- int4 gptq (slimconv.formats.gptq) ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gptq_slim(tmp_path_factory):
    """A tiny Qwen3 slimmed (a wide layer, a removed MLP) with a byte-level BPE tokenizer, so that gptq can calibrate
    on WikiText-2 valid through it."""
    from helpers import BPE_VOCAB, bpe_tokenizer, make_tiny

    root = tmp_path_factory.mktemp("gptq")
    convert(make_tiny(root / "src", "qwen3", vocab_size=BPE_VOCAB), root / "slim", parallel={"groups": [[2, 3]]},
            remove={"mlp": [0]})
    bpe_tokenizer(root / "slim")
    return root / "slim"


@pytest.mark.parametrize("symmetric", [False, True])
def test_int4_gptq_without_error_compensation_is_onnx_runtimes_rtn(symmetric):
    """gptq's blocks are MatMulNBits' own: with no Hessian, or H = identity (nothing moves between columns), it is
    ONNX Runtime's round to nearest bit for bit (scales, zero points and levels chosen as MLAS chooses them), a
    short last block and an odd block count included; decoding gives dequantize_int4's weight."""
    import numpy as np

    from slimconv.formats.gptq import decode, gptq
    from slimconv.formats.onnx_graph import dequantize_int4, quantize_int4

    w = torch.randn(40, 80, generator=torch.Generator().manual_seed(0)) * 0.05  # blocks of 32, 32, 16
    w[0, :32], w[1, :32], w[2, 32:64] = 0.0, 0.5, -0.25  # an all-zero and two constant blocks
    theirs = quantize_int4(w, 32, symmetric, "rtn")
    for hessian in (None, torch.eye(80)):
        ours = gptq(w, hessian, 32, symmetric)
        for a, b in zip(ours, theirs):
            assert a.dtype == b.dtype and np.array_equal(a, b)
    assert torch.equal(decode(*theirs, 80, symmetric), dequantize_int4(w, 32, symmetric))


@pytest.mark.parametrize("symmetric", [False, True])
def test_int4_gptq_lowers_every_layers_output_error_on_the_calibration_inputs(gptq_slim, symmetric):
    """||X W^T - X W_q^T|| over the calibration inputs X of every int4 layer: GPTQ's decoded blocks beat round to
    nearest's in each one (measured 0.35-0.73x of rtn's here)."""
    from slimconv.formats import gptq
    from slimconv.formats.onnx_graph import dequantize_int4
    from slimconv.runtime import load_model

    windows = gptq.calibration_windows(gptq_slim)
    assert windows.shape == (gptq.CALIBRATION["samples"], gptq.CALIBRATION["seq_len"])
    blocks = gptq.quantize_model(gptq_slim, 16, symmetric, windows=windows)
    model = load_model(gptq_slim)
    modules = dict(model.named_modules())
    names = gptq.target_linears(model)
    assert {f"{n}.weight" for n in names} == set(blocks) and "lm_head" in names
    inputs = {n: [] for n in names}
    hooks = [modules[n].register_forward_pre_hook(lambda m, a, n=n: inputs[n].append(a[0].reshape(-1, a[0].shape[-1])))
             for n in names]
    with torch.no_grad():
        for row in windows:
            model(input_ids=row[None], use_cache=False)
    for h in hooks:
        h.remove()
    for n in names:
        x, w = torch.cat(inputs[n]), modules[n].weight.data
        ours = (x @ w.T - x @ gptq.decode(*blocks[f"{n}.weight"].arrays(), w.shape[1], symmetric).T).norm()
        rtn = (x @ w.T - x @ dequantize_int4(w, 16, symmetric).T).norm()
        assert ours < 0.9 * rtn, (n, float(ours / rtn))


@pytest.mark.parametrize("symmetric", [False, True])
def test_int4_gptq_graph_holds_the_blocks_its_check_judges_it_against(gptq_slim, tmp_path, symmetric):
    """The gptq graph's MatMulNBits hold exactly the blocks quantize_model computed (q/k/v packed member by member
    from them), and the export check's PyTorch reference decodes those same blocks: at accuracy level 0 (float
    activations) the graph equals it to float32 summation order; at level 4 it passes the int4 criterion."""
    import numpy as np
    from onnx import numpy_helper

    from slimconv.formats.gptq import quantize_model

    blocks = quantize_model(gptq_slim, 16, symmetric)
    prompts = [torch.randint(1, 300, (n,), generator=torch.Generator().manual_seed(n)) for n in (12, 7, 3)]
    for level in (0, 4):
        out = tmp_path / f"level{level}"
        out.mkdir()
        info = export_onnx(gptq_slim, out, "int4", block_size=16, accuracy_level=level, symmetric=symmetric,
                           algorithm="gptq", int4_weights=blocks)
        assert info["int4_weights"] is blocks
        config = json.loads((out / "config.json").read_text())["onnx_int4"]
        assert config["algorithm"] == "gptq" and config["gptq"]["experts"] == "rtn"
        report = validate_onnx(out, gptq_slim, prompts, steps=8, provider="cpu", int4_weights=blocks)
        assert report["passed"], report
        for case in report["cases"].values():
            if level == 0:
                assert case["max_abs_error"] < 1e-3 and case["top1_agreement"] == 1.0, case
            assert case["kl"] < case["against_float_model"]["kl"]
    graph = {t.name: t for t in onnx.load(str(out / "model.onnx")).graph.initializer}
    prefix = "model.layers.1.self_attn."
    qkv = np.concatenate([blocks[prefix + f"{p}_proj.weight"].packed for p in "qkv"])
    assert np.array_equal(numpy_helper.to_array(graph["layers.1/attn/qkv_proj.weight_q4"]), qkv)
    assert np.array_equal(numpy_helper.to_array(graph["lm_head.scales"]), blocks["lm_head.weight"].scales.reshape(-1))
    assert ("lm_head.zero_points" in graph) != symmetric


def test_int4_gptq_refusals(gptq_slim, tiny_models, tmp_path, capsys):
    """gptq without calibration text (no tokenizer) is refused before anything is written; a graph is not written
    from blocks that lack one of its weights or were made from other weights; its check needs the blocks."""
    import numpy as np

    from slimconv.errors import SlimError
    from slimconv.formats.gptq import Int4Blocks

    convert(tiny_models["llama-tied"], tmp_path / "slim", remove={"mlp": [1]})
    assert main(["export", str(tmp_path / "slim"), "--dtype", "int4", "--int4-algorithm", "gptq",
                 "--provider", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "gptq" in err and "tokenizer" in err and "--int4-algorithm rtn" in err
    assert not (tmp_path / "slim" / "onnx").exists()

    (tmp_path / "missing").mkdir()
    with pytest.raises(SlimError, match="no GPTQ blocks for model.layers.0.self_attn.q_proj.weight"):
        export_onnx(gptq_slim, tmp_path / "missing", "int4", block_size=16, algorithm="gptq", int4_weights={})
    (tmp_path / "other").mkdir()
    other = {"model.layers.0.self_attn.q_proj.weight": Int4Blocks(np.zeros(1), np.zeros(1), np.zeros(1), "0" * 40)}
    with pytest.raises(SlimError, match="differs from the PyTorch model's weight"):
        export_onnx(gptq_slim, tmp_path / "other", "int4", block_size=16, algorithm="gptq", int4_weights=other)
    (tmp_path / "fine").mkdir()
    export_onnx(gptq_slim, tmp_path / "fine", "int4", block_size=16, algorithm="gptq")
    prompts = [torch.randint(1, 300, (5,), generator=torch.Generator().manual_seed(0))]
    with pytest.raises(SlimError, match="checked against its own GPTQ blocks"):
        validate_onnx(tmp_path / "fine", gptq_slim, prompts, steps=2, provider="cpu")


def test_int4_auto_is_gptq_but_rtn_for_a_quant_healed_output_or_no_tokenizer(gptq_slim, tiny_models, tmp_path, capsys):
    """`export --dtype int4` picks gptq by default; rtn where the weights were healed through rtn's rounding (heal
    --quant int4) or where no tokenizer gives gptq its calibration text, each said; an explicit gptq over such a heal
    is warned about."""
    import shutil

    from slimconv.formats.onnx_export import int4_algorithm
    from slimconv.outdir import HEAL_FILE

    assert int4_algorithm(gptq_slim, "auto") == "gptq"
    healed = tmp_path / "healed"
    shutil.copytree(gptq_slim, healed)
    (healed / HEAL_FILE).write_text(json.dumps({"settings": {"quant": "int4"}}))
    assert int4_algorithm(healed, "auto") == "rtn"
    assert "healed through (heal --quant int4)" in " ".join(capsys.readouterr().out.split())
    assert int4_algorithm(healed, "gptq") == "gptq"
    assert "may lose what that heal won" in " ".join(capsys.readouterr().out.split())
    (healed / HEAL_FILE).write_text(json.dumps({"settings": {"quant": "none"}}))
    assert int4_algorithm(healed, "auto") == "gptq"
    convert(tiny_models["llama-tied"], tmp_path / "bare", remove={"mlp": [1]})
    assert int4_algorithm(tmp_path / "bare", "auto") == "rtn"
    said = " ".join(capsys.readouterr().out.split())
    assert "rtn, not gptq" in said and "tokenizer" in said
    assert main(["export", str(tmp_path / "bare"), "--dtype", "int4", "--provider", "cpu"]) == 0
    assert json.loads((tmp_path / "bare" / "onnx" / "config.json").read_text())["onnx_int4"]["algorithm"] == "rtn"
