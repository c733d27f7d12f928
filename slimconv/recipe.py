"""The recipe: a YAML file validated against a typed schema, with errors a person can act on."""
import difflib
import json
import re
from pathlib import Path
from typing import Annotated, Literal, get_args

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, StrictFloat, StrictInt, StrictStr,
                      ValidationError, field_validator)

from .errors import SlimError

# Layer indices are 0-based source indices; "a-b" is an inclusive range. Strict: lax parsing would read
# `true` as layer 1 and 2.5 as a refusal but 2.0 as layer 2.
Indices = StrictInt | StrictStr | list[StrictInt | StrictStr]

STAGES = ("convert", "validate", "heal", "export", "bench", "push")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Remove(_Strict):
    """Source layers to remove (0-based; lists, ints, and inclusive ranges like "20-29")."""

    blocks: Indices = Field([], description="whole decoder blocks to remove")
    attention: Indices = Field([], description="layers whose attention sublayer is removed (MLP kept)")
    mlp: Indices = Field([], description="layers whose MLP sublayer is removed (attention kept)")
    experts: dict[StrictStr, list[StrictInt] | StrictInt] = Field(
        {}, description='mixture-of-experts layers -> the experts to KEEP, e.g. {"0-23": [0, 2, 5, 7]}, or how many '
        '({"0-23": 6}: the highest router-weighted output norms on calibration text, chosen by convert); the router '
        'loses the rows of the others')
    cap_top_k: bool = Field(False, description="where fewer experts are kept than the model routes each token to "
                            "(num_experts_per_tok), route to all the kept ones instead of refusing")


class Shrink(_Strict):
    """Narrower layers (width pruning, as NVIDIA's Minitron and Puzzle): fewer MLP channels, fewer KV heads."""

    mlp: dict[StrictStr, list[StrictInt] | StrictInt | StrictFloat] = Field(
        {}, description='source layers -> the MLP channels they keep: a fraction in (0, 1) of the source width '
        '({"8-19": 0.5}) or a count ({"20-27": 768}), chosen by convert as the channels of highest mean |activation| '
        'at the down projection\'s input on calibration text (Minitron\'s rule), kept in source order; or the list '
        'of channels to keep')
    kv_heads: dict[StrictStr, StrictInt] = Field(
        {}, description='source layers -> KV heads they keep ({"10-29": 1}); each kept head is the mean of the k and '
        'v projections of the source KV heads it replaces (Puzzle\'s initialisation), and the query heads that read '
        'those now share it; the count divides the source\'s KV heads')
    multiple_of: int = Field(1, ge=1, le=4096, description="round a fraction's channel count to a multiple of this "
                             "(256 gives widths nemotron-nas can carry; 64 suits GPU kernels)")


class Parallel(_Strict):
    """Groups of consecutive source layers evaluated in parallel (layer parallelism)."""

    groups: list[Indices] = Field([], description='each group: consecutive layers, e.g. [10, 11] or "12-14"')
    norm: Literal["per_layer", "mean"] = Field(
        "per_layer",
        description="per_layer: fold each member's own norm gains (exact parallel evaluation); "
        "mean: one shared post-attention norm with the members' mean gain (the LP authors' code)",
    )


class EarlyExit(_Strict):
    """AdaInfer: stop after a layer when a policy on that layer's logits is confident (weights unchanged)."""

    policy: Literal["linear", "gap"] = Field(
        "linear", description="linear: logistic classifier on the logits' features; gap: top-1 minus top-2 probability")
    classifier: str | None = Field(
        None, description="early_exit.json written by `slimconv analyze MODEL --early-exit -o DIR` (policy linear)")
    weights: dict[str, float] | None = Field(
        None, description="linear weights by feature (top1_prob, gap, layer_frac), instead of a classifier file")
    bias: float | None = Field(None, description="linear bias (with weights)")
    threshold: float = Field(0.9, ge=0, le=1, description="exit when the classifier's probability (or the gap) "
                             "reaches this: the knob trading layers saved against agreement")
    min_layer: int = Field(0, ge=0, description="first OUTPUT layer (0-based) after which an exit may happen")
    every: int = Field(1, ge=1, description="evaluate the policy after every k-th layer from min_layer "
                       "(each check costs one LM head)")


def parse_size(text: str, what: str = "output.max_shard_size") -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(text), re.I)
    if not m or float(m.group(1)) == 0:
        raise SlimError(f"{what}: {text!r} is not a size", "write it like 500MB or 5GB")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * scale)


def _bytes(value):
    """A size written like 2GB (or a byte count) as bytes; None stays None."""
    if value is None or isinstance(value, int):
        return value
    try:
        return parse_size(value, "size")
    except SlimError as e:
        raise ValueError(f"not a size; {e.fix}") from None


# Bytes, given as a count or a size like 500MB, 2GB, 1.5GiB.
Size = Annotated[int | None, BeforeValidator(_bytes)]
Device = Literal["auto", "cpu", "cuda"]


class Output(_Strict):
    dir: str = Field(description="output directory of the slim checkpoint")

    @field_validator("dir")
    @classmethod
    def _names_a_folder(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must name a folder, e.g. outputs/my-slim-model")
        return v

    @field_validator("max_shard_size")
    @classmethod
    def _is_a_size(cls, v: str) -> str:
        try:
            parse_size(v)
        except SlimError as e:
            raise ValueError(f"not a size; {e.fix}") from None
        return v
    dtype: Literal["source", "float32", "float16", "bfloat16"] = Field("source", description="weight dtype")
    max_shard_size: str = Field("5GB", description="largest safetensors shard, e.g. 500MB, 5GB")
    format: Literal["auto", "stock", "nemotron-nas", "slim"] = Field(
        "auto", description="auto: stock when only blocks go, nemotron-nas (DeciLM: vLLM, SGLang, TensorRT-LLM, "
        "mlx-lm, llama.cpp) when the plan and architecture fit it, slim otherwise")
    text_only: bool = Field(False, description="for a multimodal source (Gemma 3, Mistral 3): write its text model "
                            "alone, without the vision tower; the way to remove sublayers from one (a multimodal "
                            "output is stock: whole blocks only)")


class Exactness(_Strict):
    enabled: bool = True
    prompt_tokens: int = Field(64, ge=1, description="tokens of held-out text compared in float32")
    greedy_tokens: int = Field(32, ge=0, description="greedy tokens that must be identical")
    max_abs_error: float | None = Field(None, description="logits tolerance; default depends on dtype")


class Quality(_Strict):
    enabled: bool = True
    data: str = Field("wikitext2", description='"wikitext2" (test split), a text file, or "hf:NAME[:CONFIG]"')
    samples: int = Field(16, ge=1, description="number of sequences")
    seq_len: int = Field(512, ge=2, description="tokens per sequence")
    max_ppl_ratio: float | None = Field(None, description="fail if slim/source perplexity exceeds this")
    max_kl: float | None = Field(None, description="fail if mean KL(source || slim) exceeds this (nats)")
    min_top1: float | None = Field(None, description="fail if top-1 agreement falls below this (0..1)")


class Validate(_Strict):
    exactness: Exactness = Exactness()
    quality: Quality = Quality()


class Push(_Strict):
    """Where the `push` stage of `slimconv run` publishes the output on the Hugging Face Hub."""

    repo_id: str = Field(description='Hub repository, "namespace/name"; created if missing')
    private: bool = Field(False, description="create the repository private (an existing one keeps its visibility)")
    include_onnx: bool = Field(False, description="also upload the onnx/ folder written by the export stage")

    @field_validator("repo_id")
    @classmethod
    def _valid_repo_id(cls, v: str) -> str:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(v)
        except HFValidationError as e:
            raise ValueError(f"not a Hub repository id ({e}); give \"namespace/name\" (letters, digits, \"-\", "
                             "\"_\", \".\"; no \"--\" or \"..\")") from None
        return v


class Bench(_Strict):
    """Speed measurement of the `bench` stage of `slimconv run` (the same as `slimconv bench`)."""

    runtimes: list[Literal["torch", "onnx"]] = Field(["torch", "onnx"], min_length=1,
                                                     description="torch and/or onnx (ONNX Runtime)")
    prompt_lens: list[Annotated[int, Field(ge=1)]] = Field([128], min_length=1, description="prompt lengths in tokens")
    new_tokens: int = Field(32, ge=1, description="cached decode steps after the prefill")
    batch: list[Annotated[int, Field(ge=1)]] = Field([1], min_length=1, description="batch sizes")
    repeats: int = Field(3, ge=1, description="interleaved repeats (source, slim, ...); medians are reported")
    torch_dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="what the torch runtime runs source and slim in (float16/bfloat16: as served on a GPU; "
        "the ONNX runtime runs the export's own precision)")
    threads: int | None = Field(None, ge=1, description="intra-op threads of both runtimes (default: torch's)")
    device: Device = Field("auto", description="torch device and ONNX Runtime provider (auto: CUDA when available)")


# GGUF precisions, and ONNX's with their GGUF spellings (f32 = fp32, f16 = fp16) accepted too.
GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k")
ONNX_DTYPES = ("fp32", "fp16", "bf16", "int4")
# The quantised GGUF precisions `validate --deployed` measures (float ones would repeat its float check).
DEPLOYED_DTYPES = ("q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k")


class Export(_Strict):
    """`slimconv export` and the export stage of `slimconv run`: an ONNX graph or a GGUF file of the output."""

    format: Literal["onnx", "gguf"] = Field(
        "onnx", description="onnx: ONNX graph with KV cache, checked against PyTorch, in OUTPUT/onnx; gguf: a "
        "llama.cpp file OUTPUT/gguf/NAME-DTYPE.gguf (llama architecture for blocks-only outputs, deci for "
        "sublayer removals), written tensor by tensor")
    dtype: Literal[ONNX_DTYPES + GGUF_DTYPES] = Field(
        "fp32", description="ONNX: fp32 (CPU; checked to 2e-4 against PyTorch), fp16 (CPU or CUDA; 1% of the logit "
        "scale), bf16 (CUDA only), int4 (weight-only MatMulNBits, and QMoE for a mixture of experts' experts; "
        "judged by KL and top-1 agreement). GGUF: f32 (= fp32), f16 (= fp16), bf16, q8_0, q4_0 (embeddings stay "
        "q8_0 under q4_0), and the k-quants q4_k_m, q5_k_m, q6_k made by llama.cpp's own quantiser with an "
        "importance matrix (needs llama-cpp-python)")
    imatrix: str | None = Field(
        None, description="GGUF k-quants: the importance matrix; auto (the default for k-quants): computed from "
        "--imatrix-calib text on this model and written beside the GGUF as NAME.imatrix.gguf (llama.cpp's format, "
        "reused while the weights and calibration are the same); a file in that format (from llama-imatrix too); "
        "or none")
    imatrix_calib: str = Field("wikitext2", description='GGUF k-quants: text the importance matrix is computed on: '
                               '"wikitext2" (its VALID split), a text file, or "hf:NAME[:CONFIG]"')
    imatrix_samples: int = Field(64, ge=1, le=100_000, description="GGUF k-quants: calibration windows (llama-imatrix "
                                 "calls them chunks)")
    imatrix_seq_len: int = Field(512, ge=8, le=32768, description="GGUF k-quants: tokens per calibration window "
                                 "(llama-imatrix's default context)")
    int4_block_size: int = Field(32, ge=16, description="int4: weights per scale along the input dimension (a "
                                 "power of two, as onnxruntime-genai's builder)")
    int4_accuracy_level: Literal[0, 1, 2, 3, 4] = Field(
        4, description="int4: MatMulNBits accuracy_level; 4 = int8 activations (fastest on CPU, the builder's "
        "choice), 0 = compute in the activation dtype")
    int4_symmetric: bool = Field(False, description="int4: symmetric blocks, no zero points (onnxruntime-genai's "
                                 "builder's choice): about 4% faster decode on CPU, KL to the float model 0.57 "
                                 "against 0.44 on SmolLM2")
    int4_algorithm: Literal["auto", "rtn", "k_quant", "gptq"] = Field(
        "auto", description="int4: how blocks are rounded into the same MatMulNBits: auto (gptq, or rtn for an output "
        "healed with `heal --quant int4`, whose weights were trained through rtn's rounding), gptq (GPTQ: each weight column's "
        "rounding error moved onto the columns not yet rounded, through the Hessian of the layer's inputs on 8 x 256 "
        "tokens of WikiText-2 valid; needs the model's tokenizer; a mixture of experts' experts stay rtn; KL to the "
        "float model 0.41x rtn's on SmolLM2 drop-blocks-20pct, same decode speed), rtn (round to nearest from each "
        "block's min and max, ONNX Runtime's; no calibration) or k_quant (ONNX Runtime's: per block, the scale and "
        "minimum that minimise the |w|-weighted error, after llama.cpp)")
    external_data: Literal["auto", "always", "never"] = Field(
        "always", description="always: weights in model.onnx.data beside the graph, streamed one tensor at a time; "
        "never: one self-contained model.onnx (2 GB protobuf limit); auto: inside unless over 2 GB")
    provider: Device = Field("auto", description="what the ONNX graph is built for and checked on (auto: CUDA when "
                             "ONNX Runtime sees it)")


class Heal(_Strict):
    """Distillation of the source (teacher) into the slim output (student): `slimconv heal` and the heal stage."""

    steps: int = Field(200, ge=1, le=100_000, description="optimizer steps")
    train: Literal["adjacent", "all", "lora"] = Field(
        "adjacent", description="adjacent: the layers next to each change (and wide layers) with their norms; "
        "all: every decoder layer; lora: low-rank adapters on every decoder linear, merged into the weights")
    lr: float = Field(1e-4, gt=0, le=1e-2, description="peak learning rate (AdamW, warm-up then cosine decay)")
    seq_len: int = Field(256, ge=8, le=32768, description="tokens per training window")
    batch: int = Field(4, ge=1, le=4096, description="windows per step")
    data: str = Field("wikitext2", description='training text: "wikitext2" (its VALID split), a text file, '
                      '"hf:NAME[:CONFIG]", or "generated" (sampled from the source model itself, so no one domain); '
                      'join with + to mix them window by window ("wikitext2+generated"; a part named twice weights '
                      'it, with other windows); never a test split')
    generated_windows: int = Field(64, ge=1, le=100_000, description='windows the source samples when data is '
                                   '"generated"; training cycles through them (sampling costs about a training step '
                                   'per 8 windows on a CPU)')
    hidden_weight: float = Field(0.0, ge=0, le=100, description="weight of the MSE between hidden states after "
                                 "each changed layer (normalised by the source's), added to the KL; 0 = KL only")
    lora_rank: int = Field(16, ge=1, le=1024, description="rank of the adapters (train: lora)")
    train_router: bool = Field(False, description="also train mixture-of-experts routers (frozen by default, so "
                               "that each token keeps the experts it was routed to)")
    quant: Literal["none", "q4_0", "int4"] = Field(
        "none", description="train with the weights the export will deploy: every decoder matrix runs as its round "
        "trip through q4_0 (GGUF, llama.cpp's blocks of 32) or int4 (ONNX MatMulNBits, blocks of 32 with zero "
        "points), the trained ones with a straight-through gradient (quantisation-aware distillation); not with "
        "train: lora")
    max_minutes: float | None = Field(None, gt=0, description="stop training after this many minutes, whatever "
                                      "the steps (the learning-rate schedule still spans `steps`)")
    checkpoint_every: int = Field(50, ge=1, description="save a --resume checkpoint every N steps")
    shard: Literal["full", "grad-op"] = Field(
        "full", description="under torchrun: full gathers each layer only while it runs (least memory); grad-op "
        "keeps what a forward gathered for its backward and frozen parts (the teacher) gathered from their first "
        "use (least traffic, each rank holds the models whole); one process has nothing to shard")
    eval_text: str = Field("kjv", description='second evaluation text, of another domain than the first: "kjv" '
                           "(Genesis and Exodus, shipped), a text file, or \"hf:NAME\"")
    device: Device = Field("auto", description="auto: CUDA when torch sees it")
    seed: int = Field(0, description="seed of the training windows and the adapters' init")
    output: str | None = Field(None, description="healed output folder (default: output.dir + '-healed')")


class Recipe(_Strict):
    model: str = Field(description='"default", a local HF directory, a .gguf file, or a Hub id')
    description: str | None = None
    allow_pickle: bool = Field(False, description="allow .bin (pickle) source weights")
    remove: Remove = Remove()
    shrink: Shrink = Shrink()
    parallel: Parallel = Parallel()
    output: Output
    early_exit: EarlyExit | None = Field(None, description="adaptive early exit at run time (AdaInfer)")
    validation: Validate = Field(Validate(), alias="validate")
    stages: list[Literal[STAGES]] = Field(["convert", "validate"],
                                          description="stages `slimconv run` runs, in order (export: ONNX into output.dir/onnx; "
                                          "bench: speed against the source, into the report; "
                                          "push: upload to the Hub as the push section says)")
    push: Push | None = Field(None, description="Hub upload of the push stage")
    bench: Bench | None = Field(None, description="settings of the bench stage (default: Bench's defaults)")
    export: Export | None = Field(None, description="settings of the export stage (default: ONNX, fp32)")
    heal: Heal | None = Field(None, description="settings of the heal stage (default: Heal's defaults)")


def json_schema() -> dict:
    return Recipe.model_json_schema(by_alias=True)


def _field_names(model: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items()]


def _submodel(loc: tuple) -> type[BaseModel]:
    model = Recipe
    for part in loc:
        field = next((f for n, f in model.model_fields.items() if part in (n, f.alias)), None)
        ann = getattr(field, "annotation", None)
        ann = next((a for a in get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel)), ann)  # X | None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return model
        model = ann
    return model


_UNION_TAGS = ("int", "str", "list[union[int,str]]")


def _explain(err: dict) -> tuple[str, str]:
    """Returns (where, message); union branches of one field collapse to one message."""
    union = any(p in _UNION_TAGS for p in err["loc"])
    loc = tuple(p for p in err["loc"] if p not in _UNION_TAGS)
    if union:
        loc = tuple(p for p in loc if not isinstance(p, int)) if loc and loc[0] in ("remove", "parallel") else loc
    where = ".".join(str(p) for p in loc) or "(top level)"
    if union:
        return where, (f"{where}: expected a layer index (an integer), an inclusive range like '20-29', "
                       f"or a list of them (got {err.get('input')!r})")
    if err["type"] == "extra_forbidden":
        options = _field_names(_submodel(loc[:-1]))
        close = difflib.get_close_matches(str(loc[-1]), options, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(options)}"
        return where, f"unknown key {where!r}{hint}"
    if err["type"] == "missing":
        return where, f"missing key {where!r}"
    return where, f"{where}: {err['msg'].removeprefix('Value error, ')} (got {err.get('input')!r})"


def parse_recipe(data: dict, source: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        got = "an empty file" if data is None else type(data).__name__
        raise SlimError(f"{source}: a recipe is a YAML mapping of keys, got {got}",
                        "see the recipe keys in docs/recipes.md (or `slimconv schema`)")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        lines = list(dict(_explain(err) for err in e.errors()[::-1]).values())[::-1]
        raise SlimError(
            f"{source} is not a valid recipe:\n  - " + "\n  - ".join(lines),
            "see the recipe keys in docs/recipes.md (or `slimconv schema`)",
        ) from None
    if "push" in recipe.stages and recipe.push is None:
        raise SlimError(f"{source}: stages include push, but there is no push section",
                        "add `push: {repo_id: NAMESPACE/NAME}`, or remove push from stages")
    if recipe.bench is not None and "bench" not in recipe.stages:
        raise SlimError(f"{source}: there is a bench section, but stages do not include bench",
                        "add bench to stages (after export), or remove the bench section")
    if recipe.export is not None and "export" not in recipe.stages:
        raise SlimError(f"{source}: there is an export section, but stages do not include export",
                        "add export to stages (after validate), or remove the export section")
    if recipe.heal is not None and "heal" not in recipe.stages:
        raise SlimError(f"{source}: there is a heal section, but stages do not include heal",
                        "add heal to stages (after validate), or remove the heal section")
    if "heal" in recipe.stages and (recipe.stages.index("heal") < recipe.stages.index("validate")
                                    if "validate" in recipe.stages else True):
        raise SlimError(f"{source}: the heal stage needs a validated output",
                        "put heal after validate in stages, e.g. [convert, validate, heal, export]")
    return recipe


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if path.is_dir():
        raise SlimError(f"recipe {str(path)!r} is a directory", "give the path of a YAML recipe file")
    if not path.is_file():
        raise SlimError(f"recipe file {str(path)!r} does not exist", "give the path of a YAML recipe")
    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise SlimError(f"{path} is not UTF-8 text (byte {e.start})", "save the recipe as UTF-8") from None
    except yaml.YAMLError as e:
        raise SlimError(f"{path} is not valid YAML: {e}") from None
    return parse_recipe(data, str(path))


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(json.loads(recipe.model_dump_json(by_alias=True)), sort_keys=False)


def parse_indices(spec: Indices, key: str, num_layers: int) -> list[int]:
    """Expands ints, "a-b" (inclusive) strings and lists of both into sorted indices; a layer named twice
    is refused (a typo more often than an intent)."""
    items = spec if isinstance(spec, list) else [spec]
    out = set()
    for item in items:
        if isinstance(item, int):
            lo = hi = item
        else:
            text = str(item).strip()
            try:
                if "-" in text[1:]:
                    a, b = text.split("-", 1) if not text.startswith("-") else (text, "")
                    lo, hi = int(a), int(b)
                else:
                    lo = hi = int(text)
            except ValueError:
                raise SlimError(f"{key}: {item!r} is not a layer index or an inclusive range like '20-29'") from None
            if lo > hi:
                raise SlimError(f"{key}: range {item!r} is backwards", f"write it as '{hi}-{lo}'")
        for i in (lo, hi):
            if not 0 <= i < num_layers:
                raise SlimError(
                    f"{key}: layer {i} is out of range: the source model has {num_layers} layers (0-{num_layers - 1})"
                )
        twice = out & set(range(lo, hi + 1))
        if twice:
            raise SlimError(f"{key}: layer {min(twice)} is listed twice in {spec!r}", "name each layer once")
        out.update(range(lo, hi + 1))
    return sorted(out)
