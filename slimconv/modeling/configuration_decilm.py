"""Configuration of a nemotron-nas (DeciLM) checkpoint written by slimconv.

``model_type: nemotron-nas`` is NVIDIA's format for decoders whose layers differ (Llama-3.1-Nemotron-51B,
Llama-3.3-Nemotron-Super-49B): one ``block_configs`` entry per layer, ``attention: {no_op,
replace_with_linear, n_heads_in_group}`` and ``ffn: {no_op, replace_with_linear, ffn_mult}``. vLLM, SGLang,
TensorRT-LLM and mlx-lm read it natively; transformers needs this file (``auto_map``) to read it.

Like NVIDIA's checkpoints, each block config is reachable by attribute (``cfg.block_configs[i].attention.no_op``,
as vLLM reads it) and serialises as a plain JSON object. Needs only transformers (5.x).
"""
from transformers import LlamaConfig


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - (n % k)


def ffn_mult_to_intermediate_size(ffn_mult: float, hidden_size: int) -> int:
    """The MLP width the engines derive from ``ffn_mult``: int(2 * ffn_mult * hidden / 3), rounded up to 256."""
    return find_multiple(int(2 * ffn_mult * hidden_size / 3), 256)


class Section(dict):
    """A JSON object whose keys are also attributes (``block.attention.no_op``)."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


def _block(entry) -> Section:
    return Section({k: Section(v) if isinstance(v, dict) else v for k, v in dict(entry).items()})


class DeciLMConfig(LlamaConfig):
    """A Llama config whose layers are described one by one in ``block_configs``.

    The read-only properties at the end (``slim_layers``, ``projection_bias``, ``qk_norm``) are the view that
    slimconv's bundled modeling code (``modeling_decilm.py``) reads; they are derived, never serialised.
    """

    model_type = "nemotron-nas"
    block_configs: list | None = None
    early_exit = None  # the slim modeling code's run-time policy: never part of this format
    early_exit_enabled = False

    def __setattr__(self, key, value):
        if key == "block_configs" and value is not None:
            value = [_block(b) for b in value]
        super().__setattr__(key, value)

    @property
    def slim_layers(self) -> list:
        layers = []
        for i, b in enumerate(self.block_configs or []):
            attn, ffn = b["attention"], b["ffn"]
            if attn.get("replace_with_linear") or ffn.get("replace_with_linear"):
                raise ValueError(f"layer {i}: replace_with_linear is not supported by this modeling code")
            heads = self.num_attention_heads
            layers.append({
                "source_layers": [i],
                "attention": None if attn.get("no_op") else {
                    "sources": [i], "num_heads": heads, "num_key_value_heads": heads // attn["n_heads_in_group"],
                    "sliding_window": None},
                "mlp": None if ffn.get("no_op") else {
                    "sources": [i], "intermediate_size": ffn_mult_to_intermediate_size(ffn["ffn_mult"], self.hidden_size)},
            })
        return layers

    @property
    def projection_bias(self) -> dict:
        return dict.fromkeys("qkvo", bool(self.attention_bias))

    @property
    def qk_norm(self) -> bool:
        return False
