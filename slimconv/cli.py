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
  slimconv run      RECIPE.yaml    every stage the recipe names (default: convert, validate)
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


def _validated(report) -> int:
    from .report import console

    if report["passed"]:
        console.print("[green]validation passed[/]")
        return 0
    console.print("[red]validation FAILED[/] (see slimconv_report.json)")
    return EXIT_CHECK_FAILED


def _cmd_convert(args):
    from .convert import run_convert
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe)
    if args.allow_pickle:
        recipe.allow_pickle = True
    run_convert(recipe, args.force)
    return 0


def _cmd_validate(args):
    from .validate import run_validate

    return _validated(run_validate(args.output, skip_quality=args.skip_quality))


def _cmd_run(args):
    from .convert import run_convert
    from .recipe import load_recipe
    from .report import console
    from .validate import run_validate

    recipe = load_recipe(args.recipe)
    if args.allow_pickle:
        recipe.allow_pickle = True
    console.print(f"stages: {' -> '.join(recipe.stages)}")
    out = None
    for stage in recipe.stages:
        console.rule(stage)
        if stage == "convert":
            out = run_convert(recipe, args.force)
        elif stage == "validate":
            code = _validated(run_validate(out or recipe.output.dir))
            if code:
                return code
    return 0


def _cmd_schema(args):
    from .recipe import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


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
        s.set_defaults(func=func)

    s = sub.add_parser("validate", help="check exactness and quality of a slim output; exit 1 if a check fails")
    s.add_argument("output", help="output directory written by `slimconv convert`")
    s.add_argument("--skip-quality", action="store_true", help="run only the exactness check")
    s.set_defaults(func=_cmd_validate)

    s = sub.add_parser("schema", help="print the recipe's JSON Schema")
    s.set_defaults(func=_cmd_schema)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SlimError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted; nothing was left half-written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
