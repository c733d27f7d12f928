"""slimconv's command line: one sub-command per pipeline stage, and `run` for all of a recipe's stages."""
import argparse
import json
import sys

from .errors import SlimError

EXIT_USER_ERROR = 2
EXIT_CHECK_FAILED = 1

DESCRIPTION = """\
Remove transformer blocks or attention/MLP sublayers from a pretrained LLM, or evaluate neighbouring
layers in parallel, following a YAML recipe; write an exact slimmed Hugging Face checkpoint and
measure what it costs in quality.

  slimconv plan     RECIPE.yaml    print the per-layer plan and costs, change nothing
  slimconv convert  RECIPE.yaml    write the slim checkpoint to the recipe's output.dir
  slimconv validate OUTPUT_DIR     exactness and quality checks; exit code 1 if one fails
  slimconv heal     OUTPUT_DIR     distil the source into the slim model (-> OUTPUT_DIR-healed, same format)
  slimconv export   OUTPUT_DIR     ONNX model with KV cache, checked against PyTorch; exit 1 if it disagrees
                                   (--format gguf --dtype f32|f16|bf16|q8_0|q4_0: a llama.cpp GGUF file)
  slimconv generate ONNX_DIR TEXT  generate with ONNX Runtime (greedy, or sampled with --temperature)
  slimconv bench    SOURCE OUTPUT_DIR
                                   speed of source and slim (PyTorch, ONNX Runtime) beside the plan's ideal
  slimconv push     OUTPUT_DIR --repo-id NAMESPACE/NAME
                                   upload a validated output to the Hugging Face Hub (--dry-run: list, change nothing)
  slimconv run      RECIPE.yaml    every stage the recipe names (default: convert, validate; add export, push)
  slimconv analyze  MODEL -o DIR   layer importance on calibration text: SLEB, block influence, angular
                                   distance, attention/MLP importance, parallel pairs; report and plots
  slimconv recipe   DIR --method M write a recipe from an analysis (sleb, block-influence, angular, last,
                                   attention, mlp, parallel)
  slimconv search   MODEL --target decode:1.25 -o DIR
                                   greedy search over blocks, sublayers and parallel groups for the recipe
                                   that reaches a speed target with the least calibration loss
  slimconv schema                  print the recipe's JSON Schema

Exit codes: 0 success, 1 a validation check failed, 2 a problem with the input (recipe, model, paths).
"""


def _cmd_plan(args):
    from .convert import prepare
    from .recipe import load_recipe
    from .report import print_plan

    recipe = load_recipe(args.recipe)
    _, _, plan, cost = prepare(recipe, args.seq_len, config_only=True)
    print_plan(plan, cost["source"], cost["slim"], cost["ideal_speedup"], f"plan: {recipe.model}")
    return 0


def _verdict(report, passed: str, failed: str) -> int:
    from .report import console

    console.print(f"[green]{passed}[/]" if report["passed"] else f"[red]{failed}[/]")
    return 0 if report["passed"] else EXIT_CHECK_FAILED


def _validated(report) -> int:
    return _verdict(report, "validation passed", "validation FAILED (see slimconv_report.json)")


def _exported(report) -> int:
    return _verdict(report, f"ONNX export validated: {report['dir']}",
                    "ONNX export does not match PyTorch (see slimconv_onnx_report.json)")


def _load_recipe(args):
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe)
    if args.allow_pickle:
        recipe.allow_pickle = True
    if getattr(args, "format", None):
        recipe.output.format = args.format
    return recipe


def _cmd_convert(args):
    from .convert import run_convert

    run_convert(_load_recipe(args), args.force)
    return 0


def _cmd_validate(args):
    from .validate import run_validate

    return _validated(run_validate(args.output, skip_quality=args.skip_quality,
                                   trust_remote_code=args.trust_remote_code))


def _cmd_run(args):
    from .convert import run_convert
    from .formats.onnx_export import run_export
    from .hub import push
    from .recipe import Bench
    from .report import console
    from .validate import run_validate

    recipe = _load_recipe(args)
    # Text the later stages read: a wrong path is found before convert writes anything, not after.
    from .data import check_text, check_training

    v = recipe.validation
    if "validate" in recipe.stages and (v.exactness.enabled or v.quality.enabled):
        check_text(v.quality.data, "validate.quality.data")
    if "heal" in recipe.stages and recipe.heal is not None:
        check_training(recipe.heal.data, "heal.data")
        check_text(recipe.heal.eval_text, "heal.eval_text")
    console.print(f"stages: {' -> '.join(recipe.stages)}")
    out = None
    for stage in recipe.stages:
        console.rule(stage)
        if stage == "convert":
            out = run_convert(recipe, args.force)
        elif stage == "validate":
            code = _validated(run_validate(out or recipe.output.dir, trust_remote_code=args.trust_remote_code))
            if code:
                return code
        elif stage == "heal":
            from .heal import run_heal
            from .recipe import Heal

            out = run_heal(out or recipe.output.dir, recipe.heal or Heal(), force=args.force)
        elif stage == "export":
            code = _exported(run_export(out or recipe.output.dir, provider="auto", force=args.force))
            if code:
                return code
        elif stage == "bench":
            from .bench import BenchSettings, run_bench

            b = recipe.bench or Bench()
            run_bench(recipe.model, out or recipe.output.dir,
                      BenchSettings(b.runtimes, b.prompt_lens, b.new_tokens, b.batch, b.repeats,
                                    torch_dtype=b.torch_dtype),
                      trust_remote_code=args.trust_remote_code)
        elif stage == "push":
            push(out or recipe.output.dir, recipe.push.repo_id, recipe.push.private, recipe.push.include_onnx)
    return 0


HEAL_FLAGS = ("steps", "train", "lr", "seq_len", "batch", "data", "generated_windows", "hidden_weight", "lora_rank",
              "max_minutes", "checkpoint_every", "eval_text", "device", "seed")


def _cmd_heal(args):
    from pydantic import ValidationError

    from .heal import run_heal
    from .outdir import RECIPE_FILE, require_output
    from .recipe import Heal, load_recipe

    # The output's own recipe may carry a heal section: its values are the defaults the flags override.
    out = require_output(args.output)
    base = load_recipe(out / RECIPE_FILE).heal or Heal()
    given = {k: getattr(args, k) for k in HEAL_FLAGS if getattr(args, k) is not None}
    try:
        settings = Heal.model_validate({**base.model_dump(exclude={"output"}), **given})
    except ValidationError as e:
        raise SlimError("; ".join(f"--{str(err['loc'][0]).replace('_', '-')} {err['input']!r}: {err['msg']}"
                                  for err in e.errors()), "see `slimconv heal --help`") from None
    run_heal(out, settings, args.out, args.force, args.resume)
    return 0


DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "int4": "int4"}


GGUF_ALIASES = {"fp32": "f32", "fp16": "f16"}


def _cmd_export(args):
    if args.format == "gguf":
        from .formats.gguf_export import run_gguf_export

        run_gguf_export(args.output, args.out, GGUF_ALIASES.get(args.dtype, args.dtype), args.force)
        return 0
    args.dtype = {v: k for k, v in GGUF_ALIASES.items()}.get(args.dtype, args.dtype)
    if args.dtype not in DTYPE_NAMES:
        raise SlimError(f"--dtype {args.dtype} is a GGUF quantisation; the ONNX export takes {', '.join(DTYPE_NAMES)}",
                        "add --format gguf, or pick an ONNX dtype")
    from .formats.onnx_export import run_export

    return _exported(run_export(args.output, args.out, args.provider, args.force, DTYPE_NAMES[args.dtype],
                                args.external_data, args.int4_block_size, args.int4_accuracy_level,
                                args.int4_symmetric))


def _cmd_generate(args):
    from .runtime import generate
    from .report import console

    for piece in generate(args.onnx_dir, args.prompt, args.max_new_tokens, args.temperature, args.top_p,
                          args.seed, args.provider):
        if isinstance(piece, dict):
            print()
            console.print(f"[dim]{piece['new_tokens']} tokens on {piece['provider']}: prefill "
                          f"{piece['prefill_s'] * 1000:.0f} ms, decode {piece['decode_tokens_per_s']:.1f} tokens/s[/]")
        else:
            print(piece, end="", flush=True)
    return 0


def _cmd_bench(args):
    from .bench import BenchSettings, parse_runtimes, run_bench

    settings = BenchSettings(parse_runtimes(args.runtime), _int_list(args.prompt_lens, "--prompt-lens"),
                             args.new_tokens, _int_list(args.batch, "--batch"), args.repeats, args.threads,
                             args.device, args.torch_dtype)
    run_bench(args.source, args.output, settings, args.out_json, args.plot, args.trust_remote_code)
    return 0


def _cmd_analyze(args):
    import torch
    from pydantic import ValidationError

    from .selection.analyse import AnalysisSettings, run_analyse
    from .recipe import parse_size

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SlimError("--device cuda: torch sees no CUDA device here", "use --device cpu")
    sizes = _int_list(args.group_sizes, "--group-sizes", "2,3")
    try:
        settings = AnalysisSettings(
            model=args.model, calib=args.calib, samples=args.samples, seq_len=args.seq_len, seed=args.seed,
            sleb_blocks=args.sleb_blocks, max_window=args.max_window, group_sizes=sizes,
            group_ppl=not args.no_group_ppl, naive_check=args.naive_check, sleb_halving=args.sleb_halving,
            max_memory=parse_size(args.max_memory, "--max-memory") if args.max_memory else None,
            batch_size=args.batch_size, device=device, allow_pickle=args.allow_pickle)
    except ValidationError as e:
        # The settings' field names are the flags' names with "_" for "-".
        raise SlimError("; ".join(f"--{str(err['loc'][0]).replace('_', '-')} {err['input']!r}: {err['msg']}"
                                  for err in e.errors()), "see `slimconv analyze --help`") from None
    if args.early_exit:
        from .selection.early_exit import run_analyse_early_exit

        run_analyse_early_exit(settings, args.out, args.force)
    else:
        run_analyse(settings, args.out, args.force)
    return 0


def _cmd_search(args):
    import torch
    from pydantic import ValidationError

    from .recipe import parse_size
    from .selection.search import SearchSettings, parse_ops, run_search

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SlimError("--device cuda: torch sees no CUDA device here", "use --device cpu")
    for flag, v in (("--eval-samples", args.eval_samples), ("--eval-seq-len", args.eval_seq_len)):
        if v < 1:
            raise SlimError(f"{flag} {v}: must be at least 1")
    try:
        settings = SearchSettings(
            model=args.model, target=args.target, ops=parse_ops(args.ops), calib=args.calib, samples=args.samples,
            seq_len=args.seq_len, seed=args.seed, exact=args.exact, max_group=args.max_group, context=args.context,
            gpu_bandwidth=args.gpu_bandwidth, layer_latency_us=args.layer_latency_us,
            max_memory=parse_size(args.max_memory, "--max-memory") if args.max_memory else None,
            batch_size=args.batch_size, device=device, allow_pickle=args.allow_pickle)
    except ValidationError as e:
        raise SlimError("; ".join(f"--{str(err['loc'][0]).replace('_', '-')} {err['input']!r}: {err['msg']}"
                                  for err in e.errors()), "see `slimconv search --help`") from None
    run_search(settings, args.out, args.force, args.verify, "slimconv " + " ".join(args.argv),
               args.eval_samples, args.eval_seq_len)
    return 0


def _int_list(text: str, flag: str, example: str = "128,512") -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise SlimError(f"{flag} {text!r} is not a comma-separated list of positive integers",
                        f"write it like {flag} {example}")
    return values


def _cmd_recipe(args):
    from .report import console
    from .selection.suggest import load_metrics, write_recipe

    m = load_metrics(args.analysis)
    command = "slimconv " + " ".join(args.argv)
    data = write_recipe(m, args.method, args.out, args.output_dir, args.force, command, blocks=args.remove_blocks,
                        attention=args.remove_attention, mlp=args.remove_mlp, pairs=args.pairs, by=args.by)
    console.print(f"[green]wrote[/] {args.out}: {data['description']}")
    if args.verify:
        from .selection.analyse import verify_recipe

        verify_recipe(args.out, args.eval_samples, args.eval_seq_len)
    return 0


def _cmd_push(args):
    from .hub import push

    push(args.output, args.repo_id, args.private, args.include_onnx, args.dry_run, args.force)
    return 0


def _cmd_schema(args):
    from .recipe import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


TRUST_HELP = ("run the source model's own modeling code (an auto_map in its config.json) when loading it; read "
              "those .py files first. slimconv's own bundled code in its outputs runs without this flag")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slimconv", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = sub.add_parser("plan", help="print the per-layer plan and its costs; changes nothing")
    s.add_argument("recipe", help="YAML recipe")
    s.add_argument("--seq-len", type=int, default=512, help="prompt/context length for the FLOP and byte counts")
    s.set_defaults(func=_cmd_plan)

    for name, func, text in (("convert", _cmd_convert, "write the slim checkpoint to the recipe's output.dir"),
                             ("run", _cmd_run, "run every stage the recipe names, in order")):
        s = sub.add_parser(name, help=text)
        s.add_argument("recipe", help="YAML recipe")
        s.add_argument("--force", action="store_true", help="overwrite an existing output directory")
        s.add_argument("--allow-pickle", action="store_true",
                       help="accept .bin (pickle) source weights; pickle can run code, use only trusted sources")
        s.add_argument("--format", choices=["auto", "stock", "nemotron-nas", "slim"],
                       help="output format (overrides the recipe's output.format, default auto): stock when only "
                            "blocks go; nemotron-nas (DeciLM, read natively by vLLM, SGLang, TensorRT-LLM, mlx-lm) "
                            "when the plan fits it; slim (own modeling code) otherwise")
        if name == "run":  # convert reads tensors only; run's validate and bench load the source model
            s.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
        s.set_defaults(func=func)

    s = sub.add_parser("validate", help="check exactness and quality of a slim output; exit 1 if a check fails")
    s.add_argument("output", help="output directory written by `slimconv convert`")
    s.add_argument("--skip-quality", action="store_true", help="run only the exactness check")
    s.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    s.set_defaults(func=_cmd_validate)

    s = sub.add_parser("heal", help="distil the source into a validated slim output; writes OUTPUT-healed",
                       description="Trains part of a validated slim output (student) to match its source model "
                       "(teacher): KL of the next-token distributions on calibration windows of WikiText-2 valid "
                       "(never test). Writes a new output of the same format (config, tensor names and shapes; the "
                       "unhealed output is only read), with the loss curve, and source / unhealed / healed quality "
                       "on WikiText-2 test and on a second text of another domain. Defaults come from the output "
                       "recipe's heal: section, then these flags. Ctrl-C leaves no finished-looking folder; "
                       "--resume continues from the last checkpoint (every --checkpoint-every steps).")
    s.add_argument("output", help="output directory written by `slimconv convert` and checked by `slimconv validate`")
    s.add_argument("-o", "--out", help="healed output folder (default: OUTPUT-healed)")
    s.add_argument("--steps", type=int, help="optimizer steps (default 200)")
    s.add_argument("--train", help="adjacent (default): the layers next to each change and every wide layer, with "
                   "their norms; all: every decoder layer; lora: low-rank adapters merged at the end")
    s.add_argument("--lr", type=float, help="peak learning rate, (0, 0.01] (default 1e-4)")
    s.add_argument("--seq-len", type=int, help="tokens per training window (default 256)")
    s.add_argument("--batch", type=int, help="windows per step (default 4)")
    s.add_argument("--data", help="training text: wikitext2 (valid split; default), a text file, hf:NAME, or "
                   "generated (windows sampled from the source itself); join with + to mix, e.g. wikitext2+generated "
                   "(each part an equal share; name a part twice to weight it, with other windows)")
    s.add_argument("--generated-windows", type=int, help="windows the source samples for --data generated "
                   "(default 64; training cycles through them)")
    s.add_argument("--hidden-weight", type=float, help="add this x the normalised MSE of hidden states after each "
                   "trained layer to the KL (default 0: KL only)")
    s.add_argument("--lora-rank", type=int, help="adapter rank with --train lora (default 16)")
    s.add_argument("--max-minutes", type=float, help="stop training after this many minutes")
    s.add_argument("--checkpoint-every", type=int, help="resume checkpoint every N steps (default 50)")
    s.add_argument("--eval-text", help="second evaluation text, another domain: kjv (shipped; default), a file, hf:NAME")
    s.add_argument("--device", choices=["auto", "cpu", "cuda"], help="auto (default): CUDA when torch sees it")
    s.add_argument("--seed", type=int, help="seed of the windows and adapters (default 0)")
    s.add_argument("--resume", action="store_true", help="continue from the checkpoint an interrupted heal left")
    s.add_argument("--force", action="store_true", help="overwrite an existing healed folder")
    s.set_defaults(func=_cmd_heal)

    s = sub.add_parser("export", help="export a slim output to ONNX (KV cache) and check it against PyTorch")
    s.add_argument("output", help="output directory written by `slimconv convert`")
    s.add_argument("-o", "--out", help="where to write the ONNX folder (default: OUTPUT/onnx)")
    s.add_argument("--format", choices=["onnx", "gguf"], default="onnx",
                   help="onnx (default): ONNX graph with KV cache, checked against PyTorch; gguf: a llama.cpp file "
                        "OUT/gguf/<name>-<dtype>.gguf (llama architecture for blocks-only outputs, deci for sublayer "
                        "removals), written tensor by tensor")
    s.add_argument("--dtype", choices=list(DTYPE_NAMES) + ["f32", "f16", "q8_0", "q4_0"], default="fp32",
                   help="GGUF: f32 (= fp32), f16 (= fp16), bf16, q8_0, q4_0 (the gguf library's quantiser; "
                        "embeddings stay q8_0 under q4_0). ONNX: precision of the graph: fp32 (CPU; checked to 2e-4 against PyTorch), fp16 (CPU or CUDA; "
                        "1%% of the logit scale), bf16 (CUDA only), int4 (weight-only MatMulNBits, CPU with fp32 "
                        "activations or CUDA with fp16; judged by KL and top-1 agreement). Criteria: README")
    s.add_argument("--int4-block-size", type=int, default=32,
                   help="int4: weights per scale along the input dimension (power of two >= 16; default 32, as "
                        "onnxruntime-genai's builder)")
    s.add_argument("--int4-accuracy-level", type=int, default=4, choices=range(5),
                   help="int4: MatMulNBits accuracy_level; 4 = int8 activations (fastest on CPU, the builder's "
                        "default), 0 = compute in the activation dtype")
    s.add_argument("--int4-symmetric", action="store_true",
                   help="int4: symmetric blocks, no zero points (onnxruntime-genai's builder's choice): about 4%% "
                        "faster decode on CPU, but KL to the float model 0.57 against 0.44 on SmolLM2 (README)")
    s.add_argument("--external-data", choices=["auto", "always", "never"], default="always",
                   help="weights in model.onnx.data beside the graph, streamed one tensor at a time (always, the "
                        "default); never = one self-contained model.onnx (holds the weights in memory twice "
                        "while writing; 2 GB protobuf limit); auto = inside unless over 2 GB")
    s.add_argument("--provider", choices=["auto", "cpu", "cuda"], default="auto",
                   help="what the graph is built for and checked on (auto: CUDA when ONNX Runtime sees it)")
    s.add_argument("--force", action="store_true", help="overwrite an existing ONNX folder or GGUF file")
    s.set_defaults(func=_cmd_export)

    s = sub.add_parser("bench", help="measure prefill and decode speed of source and slim, beside the plan's ideal",
                       description="Runs the source and the slim model interleaved (source, slim, source, ...) after "
                       "a warm-up, and prints median prefill latency and decode tokens/s, the measured speedup, the "
                       "ideal speedup from the plan (FLOPs for prefill; bytes of weights plus KV cache read per "
                       "step for decode) and their ratio. Writes OUTPUT_DIR/slimconv_bench.json (shown in the "
                       "model card). The onnx runtime exports the source once into the cache ($SLIMCONV_CACHE) "
                       "and the slim model into OUTPUT_DIR/onnx when it is missing.")
    s.add_argument("source", help='the unslimmed model: "default", a local HF dir, a .gguf file, or a Hub id')
    s.add_argument("output", help="output directory written by `slimconv convert`")
    s.add_argument("--runtime", default="torch,onnx", help="comma-separated: torch, onnx (default both)")
    s.add_argument("--prompt-lens", default="128", help="prompt lengths in tokens, comma-separated (default 128)")
    s.add_argument("--new-tokens", type=int, default=32, help="cached decode steps after the prefill (default 32)")
    s.add_argument("--batch", default="1", help="batch sizes, comma-separated (default 1)")
    s.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the table shows medians (default 3)")
    s.add_argument("--threads", type=int, help="intra-op threads of both runtimes (default: torch's default)")
    s.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="torch device and ONNX Runtime provider (auto: CUDA when available)")
    s.add_argument("--torch-dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="what the torch runtime runs source and slim in (default float32; float16 or bfloat16 is "
                        "how a model is served on a GPU). The ONNX runtime runs the export's own precision")
    s.add_argument("--out-json", help="write the rows here instead of OUTPUT_DIR/slimconv_bench.json "
                   "(the model card is then left as it is)")
    s.add_argument("--plot", help="also write a PNG of measured vs ideal speedups")
    s.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    s.set_defaults(func=_cmd_bench)

    s = sub.add_parser("generate", help="generate text from an exported ONNX folder with ONNX Runtime")
    s.add_argument("onnx_dir", help="folder written by `slimconv export`")
    s.add_argument("prompt", help="prompt text")
    s.add_argument("--max-new-tokens", type=int, default=32)
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    s.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    s.add_argument("--seed", type=int, default=0, help="sampling seed")
    s.add_argument("--provider", choices=["auto", "cpu", "cuda"], default="auto")
    s.set_defaults(func=_cmd_generate)

    s = sub.add_parser("analyze", help="measure each layer's importance on calibration text; write metrics, report, plots",
                       description="Pushes calibration text through the source model one layer at a time and "
                       "writes metrics.json, report.md and PNG plots to -o. Papers' calibration: SLEB and ShortGPT "
                       "use 128 samples of 2048 tokens (--samples 128 --seq-len 2048); the defaults here are "
                       "small enough for a CPU.")
    s.add_argument("model", help='"default" (SmolLM2-135M-Instruct), a local HF dir, a .gguf file, or a Hub id')
    s.add_argument("-o", "--out", required=True, help="analysis folder to write")
    s.add_argument("--calib", default="wikitext2",
                   help='calibration text: "wikitext2" (its valid split), a text file, or "hf:NAME[:CONFIG]"')
    s.add_argument("--samples", type=int, default=8, help="calibration windows (default 8)")
    s.add_argument("--seq-len", type=int, default=256, help="tokens per window (default 256)")
    s.add_argument("--seed", type=int, default=0, help="seed for the windows' offsets and the token sample")
    s.add_argument("--sleb-blocks", type=int,
                   help="SLEB removals to run (default 20%% of the layers; 0: off); each costs about "
                        "layers/2 forward passes of the calibration set")
    s.add_argument("--naive-check", type=int, default=0, metavar="K",
                   help="repeat the first K SLEB steps without the prefix cache: time both, check same choices")
    s.add_argument("--sleb-halving", action="store_true",
                   help="rank SLEB candidates by successive halving over the windows: less work, but the choices "
                        "may differ from the naive loop's (default: every candidate on every window)")
    s.add_argument("--max-window", type=int, help="largest window n for the angular distance (default: half the layers)")
    s.add_argument("--group-sizes", default="2", help="parallel group sizes to score, e.g. 2,3 (default 2)")
    s.add_argument("--no-group-ppl", action="store_true",
                   help="skip the calibration perplexity of each parallel group (keep only its relative error)")
    s.add_argument("--max-memory", help="layer weights kept in memory at once, e.g. 2GB (default: all layers)")
    s.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward")
    s.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    s.add_argument("--allow-pickle", action="store_true", help="accept .bin (pickle) source weights")
    s.add_argument("--force", action="store_true", help="overwrite an existing analysis folder")
    s.add_argument("--early-exit", action="store_true",
                   help="instead of the layer metrics, train the early-exit (AdaInfer) stop classifier on the "
                        "logits of every layer; adds early_exit.json (for a recipe's early_exit.classifier) "
                        "and early_exit.md to the folder, keeping a layer analysis already there")
    s.set_defaults(func=_cmd_analyze)

    from .selection.suggest import METHODS

    s = sub.add_parser("recipe", help="write a recipe from an analysis folder",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="methods:\n" + "\n".join(f"  {k:16} {v}" for k, v in METHODS.items()))
    s.add_argument("analysis", help="folder written by `slimconv analyze`")
    s.add_argument("--method", required=True, choices=list(METHODS))
    s.add_argument("--remove-blocks", type=int, help="blocks to remove (sleb, block-influence, angular, last)")
    s.add_argument("--remove-attention", type=int, help="attention sublayers to remove (attention)")
    s.add_argument("--remove-mlp", type=int, help="MLP sublayers to remove (mlp)")
    s.add_argument("--pairs", type=int, help="parallel pairs (parallel)")
    s.add_argument("--by", choices=["importance", "position"], default="importance",
                   help="attention/mlp: by measured importance (default) or the last ones by position")
    s.add_argument("-o", "--out", required=True, help="recipe file to write")
    s.add_argument("--output-dir", help="the recipe's output.dir (default outputs/<recipe name>)")
    s.add_argument("--force", action="store_true", help="overwrite an existing recipe file")
    s.add_argument("--verify", action="store_true",
                   help="also measure the recipe's perplexity, KL and top-1 vs the source on WikiText-2 test "
                        "(applied at run time, nothing converted)")
    s.add_argument("--eval-samples", type=int, default=16)
    s.add_argument("--eval-seq-len", type=int, default=512)
    s.set_defaults(func=_cmd_recipe)

    from .selection.search import METRICS, OPS

    s = sub.add_parser("search", help="find the recipe that reaches a speed target with the least calibration loss",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Greedy search (SLEB's verified elimination generalised to every kind of change): "
                       "each step scores every valid change by the calibration loss of the plan with it applied and "
                       "keeps the one with the lowest loss increase per unit of ideal speedup. Writes recipe.yaml, "
                       "report.md (the path), search.json and pareto.png to -o.\n\ntarget metrics:\n"
                       + "\n".join(f"  {k:11} {v}" for k, v in METRICS.items()))
    s.add_argument("model", help='"default" (SmolLM2-135M-Instruct), a local HF dir, a .gguf file, or a Hub id')
    s.add_argument("--target", required=True, help="METRIC:VALUE, e.g. decode:1.25, prefill:1.3, layers:24, params:0.8")
    s.add_argument("-o", "--out", required=True, help="folder to write")
    s.add_argument("--ops", default=",".join(OPS), help=f"kinds of change, comma-separated (default {','.join(OPS)})")
    s.add_argument("--calib", default="wikitext2",
                   help='calibration text: "wikitext2" (its valid split), a text file, or "hf:NAME[:CONFIG]"')
    s.add_argument("--samples", type=int, default=8, help="calibration windows (default 8)")
    s.add_argument("--seq-len", type=int, default=256, help="tokens per window (default 256)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--exact", action="store_true",
                   help="score every candidate on every window (default: successive halving over the windows)")
    s.add_argument("--max-group", type=int, default=3, help="largest parallel group the search builds (default 3)")
    s.add_argument("--context", type=int, default=512, help="context length of the cost model (default 512)")
    s.add_argument("--gpu-bandwidth", type=float, default=3.0e12,
                   help="decode-gpu: bytes/s read from GPU memory (default 3e12)")
    s.add_argument("--layer-latency-us", type=float, default=40.0,
                   help="decode-gpu: fixed microseconds per sequential layer at batch 1 (default 40: ~10 kernels "
                        "of ~4 us)")
    s.add_argument("--verify", action="store_true",
                   help="measure the chosen recipe's perplexity, KL and top-1 on WikiText-2 test")
    s.add_argument("--eval-samples", type=int, default=16)
    s.add_argument("--eval-seq-len", type=int, default=512)
    s.add_argument("--max-memory", help="layer weights kept in memory at once, e.g. 2GB (default: all layers)")
    s.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward")
    s.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    s.add_argument("--allow-pickle", action="store_true", help="accept .bin (pickle) source weights")
    s.add_argument("--force", action="store_true", help="overwrite an existing folder")
    s.set_defaults(func=_cmd_search)

    s = sub.add_parser("push", help="upload a validated slim output to the Hugging Face Hub in one commit",
                       description="Upload a slim output folder to a Hub model repository (created if missing) in "
                       "one commit, with the model card regenerated from the reports in the folder. The token comes "
                       "from HF_TOKEN or `hf auth login`. Hidden files and temporary folders are never uploaded.")
    s.add_argument("output", help="output directory written by `slimconv convert`, checked by `slimconv validate`")
    s.add_argument("--repo-id", required=True, help='Hub repository, "namespace/name"')
    s.add_argument("--private", action="store_true",
                   help="create the repository private (an existing repository keeps its visibility)")
    s.add_argument("--include-onnx", action="store_true", help="also upload the onnx/ folder of `slimconv export`")
    s.add_argument("--dry-run", action="store_true",
                   help="list the files and sizes, print the model card; contact nothing")
    s.add_argument("--force", action="store_true", help="push even though validation failed or never ran")
    s.set_defaults(func=_cmd_push)

    s = sub.add_parser("schema", help="print the recipe's JSON Schema")
    s.set_defaults(func=_cmd_schema)
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv  # a written recipe records the command that chose it
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # its notices about remote code and config classes are not for users here
    try:
        return args.func(args)
    except SlimError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted; nothing was left half-written", file=sys.stderr)
        return 130
