"""slimconv's command line: one sub-command per pipeline stage, and `run` for all of a recipe's stages."""
import argparse
import json
import sys
import textwrap
from pathlib import Path

from .errors import SlimError
from .options import COMMANDS, methods, add_options, export_dtype, parse_options, search_epilog

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
                                   (--format gguf --dtype f32|f16|bf16|q8_0|q4_0|q4_k_m|q5_k_m|q6_k: a llama.cpp GGUF)
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


def _cmd_plan(a, argv):
    from .convert import prepare
    from .recipe import load_recipe
    from .report import print_plan

    recipe = load_recipe(a.recipe)
    _, _, plan, cost = prepare(recipe, a.seq_len, config_only=True)
    print_plan(plan, cost["source"], cost["slim"], cost["ideal_speedup"], f"plan: {recipe.model}")
    return 0


def _verdict(report, passed: str, failed: str) -> int:
    from .report import console

    console.print(f"[green]{passed}[/]" if report["passed"] else f"[red]{failed}[/]")
    return 0 if report["passed"] else EXIT_CHECK_FAILED


def _validated(report) -> int:
    return _verdict(report, "validation passed", "validation FAILED (see slimconv_report.json)")


def _export(out, e, target=None, force: bool = False) -> int:
    """The export stage: a GGUF file or an ONNX folder of ``out`` as ``e`` (an Export) says; exit code."""
    dtype = export_dtype(e)
    if e.format == "gguf":
        from .formats.gguf_export import run_gguf_export

        run_gguf_export(out, target, dtype, force, e.imatrix, e.imatrix_calib, e.imatrix_samples, e.imatrix_seq_len)
        return 0
    from .formats.onnx_export import run_export

    report = run_export(out, target, e.provider, force, DTYPE_NAMES[dtype], e.external_data, e.int4_block_size,
                        e.int4_accuracy_level, e.int4_symmetric, e.int4_algorithm)
    return _verdict(report, f"ONNX export validated: {report['dir']}",
                    "ONNX export does not match PyTorch (see slimconv_onnx_report.json)")


def _load_recipe(a):
    from .recipe import load_recipe

    recipe = load_recipe(a.recipe)
    if a.allow_pickle:
        recipe.allow_pickle = True
    if a.format:
        recipe.output.format = a.format
    return recipe


def _cmd_convert(a, argv):
    from .convert import run_convert

    run_convert(_load_recipe(a), a.force)
    return 0


def _cmd_validate(a, argv):
    from .validate import run_validate

    return _validated(run_validate(a.output, skip_quality=a.skip_quality, trust_remote_code=a.trust_remote_code,
                                  deployed=a.deployed or ()))


def _cmd_run(a, argv):
    from .convert import run_convert
    from .data import check_text, check_training
    from .hub import push
    from .recipe import Bench, Export, Heal
    from .report import console
    from .validate import run_validate

    recipe = _load_recipe(a)
    # Text the later stages read: a wrong path is found before convert writes anything, not after.
    v = recipe.validation
    if "validate" in recipe.stages and (v.exactness.enabled or v.quality.enabled):
        check_text(v.quality.data, "validate.quality.data")
    if "heal" in recipe.stages and recipe.heal is not None:
        from .heal import check_quant

        check_training(recipe.heal.data, "heal.data")
        check_text(recipe.heal.eval_text, "heal.eval_text")
        check_quant(recipe.heal, ("heal.quant", "heal.train"))
    if "export" in recipe.stages:
        e = recipe.export or Export()
        dtype = export_dtype(e, "export.dtype")  # a dtype its format does not take is refused now
        if e.format == "gguf":
            from .formats.kquant import check_request

            check_request(dtype, e.imatrix, "export.imatrix")  # a k-quant is refused now, not after convert
    console.print(f"stages: {' -> '.join(recipe.stages)}")
    out = None
    for stage in recipe.stages:
        console.rule(stage)
        if stage == "convert":
            out = run_convert(recipe, a.force)
        elif stage == "validate":
            code = _validated(run_validate(out or recipe.output.dir, trust_remote_code=a.trust_remote_code))
            if code:
                return code
        elif stage == "heal":
            from .heal import run_heal

            out = run_heal(out or recipe.output.dir, recipe.heal or Heal(), force=a.force)
        elif stage == "export":
            code = _export(out or recipe.output.dir, recipe.export or Export(), force=a.force)
            if code:
                return code
        elif stage == "bench":
            from .bench import run_bench

            run_bench(recipe.model, out or recipe.output.dir, recipe.bench or Bench(),
                      trust_remote_code=a.trust_remote_code)
        elif stage == "push":
            push(out or recipe.output.dir, recipe.push.repo_id, recipe.push.private, recipe.push.include_onnx)
    return 0


def _cmd_heal(a, argv):
    from .heal import run_heal
    from .outdir import RECIPE_FILE, require_output
    from .recipe import Heal, load_recipe

    # The output's own recipe may carry a heal section: its values are the defaults the flags override.
    recipe_file = Path(a.unhealed)
    planning_recipe = a.plan and recipe_file.suffix in (".yaml", ".yml") and recipe_file.is_file()
    out = None if planning_recipe else require_output(a.unhealed)
    recipe = load_recipe(recipe_file if planning_recipe else out / RECIPE_FILE)
    base = recipe.heal or Heal()
    given = {k: getattr(a, k) for k in a.model_fields_set & set(Heal.model_fields) - {"output"}}
    settings = Heal.model_validate({**base.model_dump(exclude={"output"}), **given})
    if a.plan:
        return _heal_plan(recipe, out, settings, a.nproc, a.device_memory)
    run_heal(out, settings, a.output, a.force, a.resume)
    return 0


def _heal_plan(recipe, out, settings, nproc: int | None, device_memory: float | None) -> int:
    import os

    import torch

    from .convert import prepare
    from .memory import device_memory as usable, heal_memory, print_memory, ranks_needed
    from .outdir import PLAN_FILE, read_json
    from .plan import Plan
    from .runtime import pick_device

    _, config, plan, _ = prepare(recipe, config_only=True)  # the source's config alone, even for a 70B
    if out is not None:
        plan = Plan(**read_json(out / PLAN_FILE)["plan"])  # what convert wrote (fractions resolved)
    nproc = nproc or int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(settings.device)
    if device.type == "cuda" and nproc > torch.cuda.device_count():
        raise SlimError(f"--nproc {nproc}: torch sees {torch.cuda.device_count()} CUDA device(s) here",
                        f"plan for {torch.cuda.device_count()} or fewer, or give --device-memory to plan for "
                        "another machine")
    limit, where = usable(device, nproc, device_memory)
    print_memory(heal_memory(plan, config, settings, nproc), limit, where, nproc, settings, f"heal {recipe.model}",
                 ranks_needed(plan, config, settings, limit))
    return 0


DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "int4": "int4"}


def _cmd_export(a, argv):
    return _export(a.output, a, a.out, a.force)


def _cmd_generate(a, argv):
    from .report import console
    from .runtime import generate

    for piece in generate(a.onnx_dir, a.prompt, a.max_new_tokens, a.temperature, a.top_p, a.seed, a.provider):
        if isinstance(piece, dict):
            print()
            console.print(f"[dim]{piece['new_tokens']} tokens on {piece['provider']}: prefill "
                          f"{piece['prefill_s'] * 1000:.0f} ms, decode {piece['decode_tokens_per_s']:.1f} tokens/s[/]")
        else:
            print(piece, end="", flush=True)
    return 0


def _cmd_bench(a, argv):
    from .bench import run_bench
    from .recipe import Bench

    run_bench(a.source, a.output, Bench(**a.model_dump(include=set(Bench.model_fields))), a.out_json, a.plot,
              a.trust_remote_code)
    return 0


def _on_device(settings):
    """``settings`` with its device resolved, so that what it records says where the work ran."""
    from .runtime import pick_device

    return settings.model_copy(update=dict(device=pick_device(settings.device).type))


def _cmd_analyze(a, argv):
    from .selection.analyse import AnalysisSettings, run_analyse

    settings = _on_device(AnalysisSettings(**a.model_dump(include=set(AnalysisSettings.model_fields))))
    if a.early_exit:
        from .selection.early_exit import run_analyse_early_exit

        run_analyse_early_exit(settings, a.out, a.force)
    else:
        run_analyse(settings, a.out, a.force)
    _leave_world()
    return 0


def _leave_world() -> None:
    from .distributed import finish

    finish()


def _cmd_search(a, argv):
    from .selection.search import SearchSettings, run_search

    from .selection.mip import mip_search

    settings = _on_device(SearchSettings(**a.model_dump(include=set(SearchSettings.model_fields))))
    run_search(settings, a.out, a.force, a.verify, "slimconv " + " ".join(argv), a.eval_samples, a.eval_seq_len,
               mip_search if settings.method == "mip" else None)
    _leave_world()
    return 0


def _cmd_recipe(a, argv):
    from .report import console
    from .selection.suggest import load_metrics, write_recipe

    m = load_metrics(a.analysis)
    data = write_recipe(m, a.method, a.out, a.output_dir, a.force, "slimconv " + " ".join(argv),
                        blocks=a.remove_blocks, attention=a.remove_attention, mlp=a.remove_mlp, pairs=a.pairs,
                        by=a.by)
    console.print(f"[green]wrote[/] {a.out}: {data['description']}")
    if a.verify:
        from .selection.analyse import verify_recipe

        verify_recipe(a.out, a.eval_samples, a.eval_seq_len)
    return 0


def _cmd_push(a, argv):
    from .hub import push

    push(a.output, a.repo_id, a.private, a.include_onnx, a.dry_run, a.force)
    return 0


def _cmd_schema(a, argv):
    from .recipe import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


class _Version(argparse.Action):
    """--version: slimconv's version and the torch and transformers it runs with (read from the installed
    packages' metadata, so it imports neither)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print slimconv's version and the torch and transformers it runs with")

    def __call__(self, parser, namespace, values, option_string=None):
        from importlib.metadata import PackageNotFoundError, version

        from . import __version__

        def installed(name):
            try:
                return version(name)
            except PackageNotFoundError:
                return "not installed"

        print(f"slimconv {__version__} (torch {installed('torch')}, transformers {installed('transformers')}, "
              f"python {sys.version.split()[0]})")
        parser.exit()


# (help line, description) per command; the flags come from the command's model (options.COMMANDS).
HELP = {
    "plan": ("print the per-layer plan and its costs; changes nothing", None),
    "convert": ("write the slim checkpoint to the recipe's output.dir", None),
    "run": ("run every stage the recipe names, in order", None),
    "validate": ("check exactness and quality of a slim output; exit 1 if a check fails", None),
    "heal": ("distil the source into a validated slim output; writes OUTPUT-healed",
             "Trains part of a validated slim output (student) to match its source model (teacher): KL of the "
             "next-token distributions on calibration windows of WikiText-2 valid (never test). Writes a new output "
             "of the same format (config, tensor names and shapes; the unhealed output is only read), with the loss "
             "curve, and source / unhealed / healed quality on WikiText-2 test and on a second text of another "
             "domain. The defaults below are heal's own; the output recipe's heal: section, where it has one, "
             "overrides them, and the flags override both. Ctrl-C leaves no finished-looking folder; --resume "
             "continues from the last checkpoint (every --checkpoint-every steps). Under `torchrun --nproc-per-node N -m "
             "slimconv heal ...` teacher and student are sharded over the ranks (FSDP2) and each rank trains on its "
             "share of every batch; --plan prints the memory each rank needs first (docs/healing.md)."),
    "export": ("export a slim output to ONNX (KV cache, checked against PyTorch) or GGUF", None),
    "bench": ("measure prefill and decode speed of source and slim, beside the plan's ideal",
              "Runs the source and the slim model interleaved (source, slim, source, ...) after a warm-up, and prints "
              "median prefill latency and decode tokens/s, the measured speedup, the ideal speedup from the plan "
              "(FLOPs for prefill; bytes of weights plus KV cache read per step for decode) and their ratio. Writes "
              "OUTPUT/slimconv_bench.json (shown in the model card). The onnx runtime exports the source once into "
              "the cache ($SLIMCONV_CACHE) and the slim model into OUTPUT/onnx when it is missing."),
    "generate": ("generate text from an exported ONNX folder with ONNX Runtime", None),
    "analyze": ("measure each layer's importance on calibration text; write metrics, report, plots",
                "Pushes calibration text through the source model one layer at a time and writes metrics.json, "
                "report.md and PNG plots to -o. Papers' calibration: SLEB and ShortGPT use 128 samples of 2048 "
                "tokens (--samples 128 --seq-len 2048); the defaults here are small enough for a CPU."),
    "recipe": ("write a recipe from an analysis folder", None),
    "search": ("find the recipe that reaches a speed target with the least calibration loss",
               "--method greedy (SLEB's verified elimination generalised to every kind of change): each step scores "
               "every valid change by the calibration loss of the plan with it applied and keeps the one with the "
               "lowest loss increase per unit of ideal speedup. --method mip (NVIDIA Puzzle's search): every layer's "
               "alternatives (sublayer or block removed, MLP narrowed to --widths, fewer KV heads) are scored alone, "
               "and an exact mixed-integer program picks one per layer for the target. Writes recipe.yaml, "
               "report.md (the path), search.json and pareto.png to -o."),
    "push": ("upload a validated slim output to the Hugging Face Hub in one commit",
             "Upload a slim output folder to a Hub model repository (created if missing) in one commit, with the "
             "model card regenerated from the reports in the folder. The token comes from HF_TOKEN or `hf auth "
             "login`. Hidden files and temporary folders are never uploaded, and neither is an export made from "
             "other weights than the folder's own (refused)."),
    "schema": ("print the recipe's JSON Schema", None),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slimconv", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action=_Version)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    epilogs = {"recipe": lambda: "methods:\n" + "\n".join(f"  {k:16} {v}" for k, v in methods().items()),
               "search": search_epilog}
    for name, (model, positional, flags) in COMMANDS.items():
        text, description = HELP[name]
        s = sub.add_parser(name, help=text, description=textwrap.fill(description or text[0].upper() + text[1:], 100),
                           epilog=epilogs[name]() if name in epilogs else None,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        add_options(s, model, positional, flags)
        s.set_defaults(func=globals()[f"_cmd_{name}"])
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = vars(build_parser().parse_args(argv))
    except SystemExit as e:  # argparse's usage errors (exit 2, message printed), --help and --version (0)
        return e.code
    func, command = args.pop("func"), args.pop("command")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # its notices about remote code and config classes are not for users here
    try:
        # argv: a written recipe records the command that chose it
        return func(parse_options(command, args), argv)
    except SlimError as e:
        from .distributed import quiet_rank

        rank = quiet_rank()
        print(f"error: {e}" if rank is None else f"rank {rank}: stopped (rank 0 says why)", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted; nothing was left half-written", file=sys.stderr)
        return 130
