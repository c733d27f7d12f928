"""transformers path for slimconv's nemotron-nas (DeciLM) checkpoints.

Serving engines (vLLM, SGLang, TensorRT-LLM, mlx-lm, llama.cpp) run this format with their own code; this
file lets ``AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)`` run it too. It is a thin
mapping onto ``modeling_slim.py`` (copied beside it): a nemotron-nas layer is a slim layer whose attention
(``no_op`` or not) and MLP (``no_op`` or a width from ``ffn_mult``) are optional, with the same tensor names.
"""
# configuration_slim is imported here too, though only modeling_slim uses it: transformers 5.0 copies a remote
# module's own relative imports into its cache, not theirs, and modeling_slim would then not find it.
try:
    from .configuration_slim import SlimConfig  # noqa: F401
    from .configuration_decilm import DeciLMConfig
    from .modeling_slim import SlimForCausalLM
except ImportError:  # imported as a plain module (slimconv's own tests)
    from configuration_decilm import DeciLMConfig
    from modeling_slim import SlimForCausalLM


class DeciLMForCausalLM(SlimForCausalLM):
    config_class = DeciLMConfig
    config: DeciLMConfig
