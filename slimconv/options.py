"""The command line's options: one pydantic model per command, and the argparse parser generated from them.

Each command's model is its stage's own settings (the recipe sections Heal, Bench, Export and Push, the analysis
and search settings) plus what only the command needs (positional paths, -o, --force). Every flag's name,
type, choices, default and help text come from a field, so a default is written once, in the model: a flag
the user leaves out is absent from the parsed values and the model fills it in (argparse holds no defaults
of its own). Hand-written rather than a typer/click app: the models already exist, argparse is what the CLI
used, and the generator is one function.
"""
import argparse
import types
import typing
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import SlimError
from .recipe import DEPLOYED_DTYPES, ONNX_DTYPES, Bench, Device, Export, Heal, Output, Push
from .selection.settings import METRICS, OPS, AnalysisSettings, SearchSettings

FORCE = "overwrite an existing output folder"
TRUST = ("run the source model's own modeling code (an auto_map in its config.json) when loading it; read those .py "
         "files first. slimconv's own bundled code in its outputs runs without this flag")
OUTPUT = "output folder written by `slimconv convert`"


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PlanArgs(_Args):
    recipe: str = Field(description="YAML recipe")
    seq_len: int = Field(512, ge=1, description="prompt/context length for the FLOP and byte counts")


class ConvertArgs(_Args):
    recipe: str = Field(description="YAML recipe")
    force: bool = Field(False, description=FORCE)
    allow_pickle: bool = Field(False, description="accept .bin (pickle) source weights; pickle can run code, use "
                               "only trusted sources")
    format: Output.model_fields["format"].annotation | None = Field(
        None, description=Output.model_fields["format"].description + " (default: the recipe's output.format)")


class RunArgs(ConvertArgs):
    trust_remote_code: bool = Field(False, description=TRUST)


class ValidateArgs(_Args):
    output: str = Field(description=OUTPUT)
    skip_quality: bool = Field(False, description="run only the exactness check")
    deployed: list[Literal[DEPLOYED_DTYPES]] | None = Field(
        None, description="also measure source and slim quantised alike to these GGUF precisions, in llama.cpp, on the "
        "validation text and King James (perplexity, KL from the float source and from the source at the same "
        "precision; slimconv_deployed.json, shown in the model card). Exports OUTPUT/gguf files that are missing; "
        "the source's are made once into the cache. Needs llama-cpp-python (default: not measured)")
    trust_remote_code: bool = Field(False, description=TRUST)


class HealArgs(Heal):
    unhealed: str = Field(description=OUTPUT + " and checked by `slimconv validate` (with --plan, a recipe also "
                          "does: only the source's config is read)")
    resume: bool = Field(False, description="continue from the checkpoint an interrupted heal left")
    force: bool = Field(False, description="overwrite an existing healed folder")
    plan: bool = Field(False, description="print the memory each rank needs in every training mode and whether it "
                       "fits, then stop; trains nothing")
    nproc: int | None = Field(None, ge=1, description="--plan: the number of ranks to plan for (default: torchrun's "
                              "WORLD_SIZE, else 1)")
    device_memory: float | None = Field(None, gt=0, description="--plan: GB one rank may use (default: what the "
                                        "device says; the CPU's RAM is shared by the ranks)")


class ExportArgs(Export):
    output: str = Field(description=OUTPUT)
    out: str | None = Field(None, description="folder to write into (default: OUTPUT/onnx, or OUTPUT/gguf for GGUF)")
    force: bool = Field(False, description="overwrite an existing ONNX folder or GGUF file")


class BenchArgs(Bench):
    source: str = Field(description='the unslimmed model: "default", a local HF dir, a .gguf file, or a Hub id')
    output: str = Field(description=OUTPUT)
    out_json: str | None = Field(None, description="write the rows here instead of OUTPUT/slimconv_bench.json (the "
                                 "model card is then left as it is; default: OUTPUT/slimconv_bench.json)")
    plot: str | None = Field(None, description="also write a PNG of measured vs ideal speedups (default: no plot)")
    trust_remote_code: bool = Field(False, description=TRUST)


class GenerateArgs(_Args):
    onnx_dir: str = Field(description="folder written by `slimconv export`")
    prompt: str = Field(description="prompt text")
    max_new_tokens: int = Field(32, ge=1, description="tokens to generate")
    temperature: float = Field(0.0, ge=0, description="0 = greedy; above 0 samples")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass (with --temperature above 0)")
    seed: int = Field(0, description="sampling seed")
    provider: Device = Field("auto", description="ONNX Runtime provider (auto: CUDA when it sees one)")


class AnalyzeArgs(AnalysisSettings):
    out: str = Field(description="analysis folder to write")
    force: bool = Field(False, description="overwrite an existing analysis folder")
    early_exit: bool = Field(False, description="instead of the layer metrics, train the early-exit (AdaInfer) stop "
                             "classifier on the logits of every layer; adds early_exit.json (for a recipe's "
                             "early_exit.classifier) and early_exit.md to the folder, keeping a layer analysis "
                             "already there")


def methods() -> dict:
    from .selection.suggest import METHODS

    return METHODS


class RecipeArgs(_Args):
    analysis: str = Field(description="folder written by `slimconv analyze`")
    method: Literal[tuple(methods())] = Field(description="the selection rule (see the list above)")
    out: str = Field(description="recipe file to write")
    remove_blocks: int | None = Field(None, ge=1, description="blocks to remove (sleb, block-influence, angular, "
                                      "last); no default: the method needs it")
    remove_attention: int | None = Field(None, ge=1, description="attention sublayers to remove (attention); no "
                                         "default: the method needs it")
    remove_mlp: int | None = Field(None, ge=1, description="MLP sublayers to remove (mlp); no default: the method "
                                   "needs it")
    pairs: int | None = Field(None, ge=1, description="parallel pairs (parallel); no default: the method needs it")
    by: Literal["importance", "position"] = Field("importance", description="attention/mlp: by measured importance "
                                                  "or the last ones by position")
    output_dir: str | None = Field(None, description="the recipe's output.dir (default: outputs/<recipe name>)")
    force: bool = Field(False, description="overwrite an existing recipe file")
    verify: bool = Field(False, description="also measure the recipe's perplexity, KL and top-1 against the source "
                         "on WikiText-2 test (applied at run time, nothing converted)")
    eval_samples: int = Field(16, ge=1, description="--verify: sequences of held-out text")
    eval_seq_len: int = Field(512, ge=2, description="--verify: tokens per sequence")


class SearchArgs(SearchSettings):
    out: str = Field(description="folder to write")
    force: bool = Field(False, description="overwrite an existing folder")
    verify: bool = Field(False, description="measure the chosen recipe's perplexity, KL and top-1 on WikiText-2 test")
    eval_samples: int = Field(16, ge=1, description="--verify: sequences of held-out text")
    eval_seq_len: int = Field(512, ge=2, description="--verify: tokens per sequence")


class PushArgs(Push):
    output: str = Field(description=OUTPUT + ", checked by `slimconv validate`")
    dry_run: bool = Field(False, description="list the files and sizes, print the model card; contact nothing")
    force: bool = Field(False, description="push even though validation failed or never ran")


class SchemaArgs(_Args):
    pass


# Per command: its model, the fields that are positional (in order), and flags other than --field-name.
COMMANDS = {
    "plan": (PlanArgs, ("recipe",), {}),
    "convert": (ConvertArgs, ("recipe",), {}),
    "run": (RunArgs, ("recipe",), {}),
    "validate": (ValidateArgs, ("output",), {}),
    "heal": (HealArgs, ("unhealed",), {"output": ("-o", "--out")}),
    "export": (ExportArgs, ("output",), {"out": ("-o", "--out")}),
    "bench": (BenchArgs, ("source", "output"), {"runtimes": ("--runtime", "--runtimes")}),
    "generate": (GenerateArgs, ("onnx_dir", "prompt"), {}),
    "analyze": (AnalyzeArgs, ("model",), {"out": ("-o", "--out")}),
    "recipe": (RecipeArgs, ("analysis",), {"out": ("-o", "--out")}),
    "search": (SearchArgs, ("model",), {"out": ("-o", "--out")}),
    "push": (PushArgs, ("output",), {}),
    "schema": (SchemaArgs, (), {}),
}
# What a positional field is called in usage lines and messages.
METAVARS = {"unhealed": "OUTPUT", "output": "OUTPUT", "onnx_dir": "ONNX_DIR", "analysis": "ANALYSIS_DIR"}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _kind(annotation) -> tuple[type, tuple | None, bool]:
    """(scalar type, Literal choices or None, whether it is a list) of a field's annotation, None removed."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return _kind(args[0])
    if typing.get_origin(annotation) is list:
        inner, choices, _ = _kind(args[0])
        return inner, choices, True
    if typing.get_origin(annotation) is typing.Annotated:
        return _kind(args[0])
    if typing.get_origin(annotation) is Literal:
        return type(args[0]), args, False
    return annotation, None, False


def _shown(value) -> str:
    text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
    return text or '""'


def help_text(field) -> str:
    """The field's description and its default, as --help prints it (argparse %-escaped)."""
    text = field.description or ""
    if not field.is_required() and field.annotation is not bool:
        if field.default is not None:
            text += f" (default: {_shown(field.default)})"
        elif "default" not in text:
            text += " (default: none)"
    return text.replace("%", "%%")


def _comma_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def add_options(parser: argparse.ArgumentParser, model: type[BaseModel], positional=(), flags=None) -> None:
    """Adds one argument per field of ``model``: ``positional`` fields first, in that order, then flags."""
    flags = flags or {}
    for name in positional:
        field = model.model_fields[name]
        parser.add_argument(name, metavar=METAVARS.get(name, name.upper()), help=help_text(field))
    for name, field in model.model_fields.items():
        if name in positional:
            continue
        base, choices, is_list = _kind(field.annotation)
        names = list(flags.get(name, [flag(name)]))
        kw = dict(dest=name, default=argparse.SUPPRESS)
        if base is bool and field.default is True:
            parser.add_argument(flag("no_" + name), action="store_false", help="turn off: " + help_text(field), **kw)
            continue
        if base is bool:
            parser.add_argument(*names, action="store_true", help=help_text(field), **kw)
            continue
        if is_list:
            kw.update(type=_comma_list, metavar=",".join(map(str, choices)) if choices else "A,B,...")
        elif choices:
            kw.update(type=base, choices=choices)
        else:
            kw.update(type=str, metavar=names[-1].lstrip("-").replace("-", "_").upper())
        parser.add_argument(*names, required=field.is_required(), help=help_text(field), **kw)


def _where(command: str, loc: tuple) -> str:
    name = str(loc[0]) if loc else "?"
    _, positional, flags = COMMANDS[command]
    if name in positional:
        return METAVARS.get(name, name.upper())
    return flags.get(name, [flag(name)])[-1]


def parse_options(command: str, values: dict) -> BaseModel:
    """The command's model from the parsed values; a value the model refuses is a SlimError naming its flag."""
    model = COMMANDS[command][0]
    try:
        return model.model_validate(values)
    except ValidationError as e:
        raise SlimError("; ".join(f"{_where(command, err['loc'])} {_shown(err['input'])}: "
                                  f"{err['msg'].removeprefix('Value error, ')}" for err in e.errors()),
                        f"see `slimconv {command} --help`") from None


def export_dtype(e: Export, key: str = "--dtype") -> str:
    """The export's dtype in its format's own spelling, or a SlimError for one the format does not take."""
    from .recipe import GGUF_DTYPES

    fmt = "--format" if key.startswith("--") else "export.format"
    if e.format == "gguf":
        dtype = {"fp32": "f32", "fp16": "f16"}.get(e.dtype, e.dtype)
        if dtype not in GGUF_DTYPES:
            raise SlimError(f"{key} {e.dtype} is an ONNX precision; GGUF takes {', '.join(GGUF_DTYPES)}",
                            f"pick a GGUF dtype, or leave out {fmt} gguf")
        return dtype
    dtype = {"f32": "fp32", "f16": "fp16"}.get(e.dtype, e.dtype)
    if dtype not in ONNX_DTYPES:
        raise SlimError(f"{key} {e.dtype} is a GGUF quantisation; the ONNX export takes {', '.join(ONNX_DTYPES)}",
                        f"add {fmt} gguf, or pick an ONNX dtype")
    return dtype


def search_epilog() -> str:
    return "target metrics:\n" + "\n".join(f"  {k:11} {v}" for k, v in METRICS.items()) + (
        f"\n\nkinds of change (--ops): {', '.join(OPS)}")
