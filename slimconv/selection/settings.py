"""The settings of analysis and search, apart from the code that runs them: the command line builds its flags
from these fields (name, type, choices, default and help), and reading them must not import torch."""
from typing import Annotated, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from ..recipe import Device, Size

OPS = ("blocks", "attention", "mlp", "parallel", "experts", "mlp_width", "kv_heads")
# What each method searches unless --ops says otherwise: greedy removes whole blocks and sublayers and builds parallel
# groups; mip picks one alternative per layer, narrower ones included (selection/mip.py).
DEFAULT_OPS = {"greedy": ["blocks", "attention", "mlp", "parallel", "experts"],
               "mip": ["blocks", "attention", "mlp", "mlp_width", "kv_heads"]}

METRICS = {
    "decode": "ideal decode speedup: bytes read per token (weights + KV cache), memory-bound decode (CPU, large GPUs)",
    "decode-gpu": "ideal GPU decode latency speedup at batch 1: bytes read / bandwidth + a fixed time per "
                  "sequential layer (kernel launches), so parallel groups count",
    "prefill": "ideal prefill speedup: FLOPs per token",
    "params": "parameters kept, as a fraction of the source (params:0.8 = at most 80%)",
    "layers": "sequential layers kept (layers:24 = at most 24; a parallel group counts as one)",
}


class AnalysisSettings(BaseModel):
    """Everything that determines an analysis (`slimconv analyze`); stored in metrics.json so a result says how
    it was made. The papers calibrate on 128 samples of 2048 tokens (SLEB, ShortGPT); the defaults here are
    small enough for a CPU."""

    model: str = Field(description='"default" (SmolLM2-135M-Instruct), a local HF dir, a .gguf file, or a Hub id')
    calib: str = Field("wikitext2", description='calibration text: "wikitext2" (its valid split), a text file, or '
                       '"hf:NAME[:CONFIG]"')
    samples: int = Field(8, ge=1, description="calibration windows")
    seq_len: int = Field(256, ge=8, description="tokens per window")
    seed: int = Field(0, description="seed for the windows' offsets and the token sample")
    sleb_blocks: int | None = Field(None, ge=0, description="SLEB removals to run, each about layers/2 forward "
                                    "passes of the calibration set; 0: off (default: 20% of the layers)")
    max_window: int | None = Field(None, ge=1, description="largest window n for the angular distance (default: "
                                   "half the layers)")
    group_sizes: list[Annotated[int, Field(ge=2)]] = Field([2], min_length=1, description="parallel group sizes "
                                                            "to score, comma-separated, e.g. 2,3")
    group_ppl: bool = Field(True, description="measure the calibration perplexity of each parallel group (off: "
                            "keep only its relative error)")
    naive_check: int = Field(0, ge=0, description="repeat the first K SLEB steps without the prefix cache: time "
                             "both, check the same choices")
    sleb_halving: bool = Field(False, description="rank SLEB candidates by successive halving over the windows: "
                               "less work, but the choices may differ from the naive loop's (default: every "
                               "candidate on every window)")
    max_memory: Size = Field(None, description="layer weights kept in memory at once, e.g. 2GB (default: all layers)")
    batch_size: int = Field(8, ge=1, description="calibration windows per forward")
    angular_tokens: int = Field(2048, ge=1, description="tokens sampled for the angular distances")
    norm: Literal["per_layer", "mean"] = Field("per_layer", description="norm mode of the parallel groups scored "
                                               "(as a recipe's parallel.norm)")
    device: Device = Field("auto", description="auto: CUDA when torch sees it")
    allow_pickle: bool = Field(False, description="accept .bin (pickle) source weights; pickle can run code")


class SearchSettings(BaseModel):
    """Everything that determines a search (`slimconv search`); stored in search.json."""

    model: str = Field(description='"default" (SmolLM2-135M-Instruct), a local HF dir, a .gguf file, or a Hub id')
    target: str = Field(description="METRIC:VALUE, e.g. decode:1.25, prefill:1.3, layers:24, params:0.8")
    method: Literal["auto", "greedy", "mip"] = Field(
        "auto", description="greedy: SLEB's verified elimination generalised, one change per step; mip: one "
        "alternative per layer (kept, sublayer or block removed, MLP narrowed, fewer KV heads), each scored alone, "
        "chosen together by an exact mixed-integer program (NVIDIA Puzzle's search); auto: mip for decode, prefill "
        "and params targets (on SmolLM2 it beat greedy and SLEB there, docs/results/width.md), greedy for "
        "decode-gpu and layers (they reward the parallel groups only greedy builds), and the method of --ops that "
        "only one searches")
    ops: list[Literal[OPS]] | None = Field(
        None, min_length=1, description="kinds of change, comma-separated (default: greedy: "
        f"{','.join(DEFAULT_OPS['greedy'])}; mip: {','.join(DEFAULT_OPS['mip'])})")
    widths: list[Annotated[float, Field(gt=0, lt=1)]] = Field(
        [0.75, 0.5, 0.25], min_length=1, description="mip, mlp_width: the MLP widths a layer may be narrowed to, as "
        "fractions of the source's (channels chosen by Minitron's activation rule on the calibration text)")
    calib: str = Field("wikitext2", description='calibration text: "wikitext2" (its valid split), a text file, or '
                       '"hf:NAME[:CONFIG]"')
    samples: int = Field(8, ge=1, description="calibration windows")
    seq_len: int = Field(256, ge=8, description="tokens per window")
    seed: int = Field(0, description="seed for the windows' offsets")
    exact: bool = Field(False, description="score every candidate on every window (default: successive halving "
                        "over the windows)")
    max_group: int = Field(3, ge=2, description="largest parallel group the search builds")
    context: int = Field(512, ge=1, description="context length of the cost model (tokens)")
    gpu_bandwidth: float = Field(3.0e12, gt=0, description="decode-gpu: bytes/s read from GPU memory")
    layer_latency_us: float = Field(40.0, ge=0, description="decode-gpu: fixed microseconds per sequential layer "
                                    "at batch 1 (about 10 kernels of 4 us)")
    bytes_per_param: int = Field(2, ge=1, description="weight width of the cost model (2: float16/bfloat16)")
    norm: Literal["per_layer", "mean"] = Field("per_layer", description="norm mode of the parallel groups (as a "
                                               "recipe's parallel.norm)")
    batch_size: int = Field(8, ge=1, description="calibration windows per forward")
    max_memory: Size = Field(None, description="layer weights kept in memory at once, e.g. 2GB (default: all layers)")
    device: Device = Field("auto", description="auto: CUDA when torch sees it")
    allow_pickle: bool = Field(False, description="accept .bin (pickle) source weights; pickle can run code")

    @field_validator("ops")
    @classmethod
    def _in_search_order(cls, v: list[str] | None) -> list[str] | None:
        return None if v is None else [o for o in OPS if o in v]

    @model_validator(mode="after")
    def _ops_of_the_method(self):
        if self.method == "auto":
            refusing = {m for o in self.ops or [] for m in DEFAULT_OPS if o not in DEFAULT_OPS[m]}
            depth = self.target.partition(":")[0] in ("decode-gpu", "layers")
            self.method = "mip" if "greedy" in refusing else "greedy" if "mip" in refusing or depth else "mip"
        if self.ops is None:
            self.ops = list(DEFAULT_OPS[self.method])
        other = "mip" if self.method == "greedy" else "greedy"
        wrong = [o for o in self.ops if o not in DEFAULT_OPS[self.method]]
        if wrong:
            why = ("the greedy search removes whole blocks and sublayers and builds parallel groups; narrower layers "
                   "are chosen by --method mip" if self.method == "greedy" else
                   "mip picks one alternative per layer: a parallel group spans layers and expert pruning is per "
                   "expert, which the greedy search does")
            raise ValueError(f"{','.join(wrong)} with --method {self.method}: {why}; use --method {other}, or --ops "
                             f"from {','.join(DEFAULT_OPS[self.method])}")
        return self
