"""The settings of analysis and search, apart from the code that runs them: the command line builds its flags
from these fields (name, type, choices, default and help), and reading them must not import torch."""
from typing import Annotated, Literal

from pydantic import BaseModel, Field, field_validator

from ..recipe import Device, Size

OPS = ("blocks", "attention", "mlp", "parallel", "experts")

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
    ops: list[Literal[OPS]] = Field(list(OPS), min_length=1, description="kinds of change, comma-separated")
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
    def _in_search_order(cls, v: list[str]) -> list[str]:
        return [o for o in OPS if o in v]
