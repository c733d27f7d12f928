"""transformers path for slimconv's nemotron-nas (DeciLM) checkpoints.

Serving engines (vLLM, SGLang, TensorRT-LLM, mlx-lm, llama.cpp) run this format with their own code; this
file lets ``AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)`` run it too. It is a thin
mapping onto ``modeling_slim.py`` (copied beside it): a nemotron-nas layer is a slim layer whose attention
(``no_op`` or not) and MLP (``no_op`` or a width from ``ffn_mult``) are optional, with the same tensor names.
"""
try:
    from .configuration_decilm import DeciLMConfig
    from .modeling_slim import SlimForCausalLM
except ImportError:  # imported as a plain module (slimconv's own tests)
    from configuration_decilm import DeciLMConfig
    from modeling_slim import SlimForCausalLM


class DeciLMForCausalLM(SlimForCausalLM):
    config_class = DeciLMConfig
    config: DeciLMConfig
