"""slimconv's slim format in vLLM: a model built from vLLM's own layers, registered through vLLM's plugin entry point.

``pip install slimconv`` beside vLLM registers ``register`` under ``vllm.general_plugins``; vLLM calls it in every
process it starts. It registers ``SlimForCausalLM`` (this module's model, imported by vLLM only when a slim output
is loaded) and the config classes of the two formats slimconv writes with its own code (``model_type`` slimconv
and nemotron-nas), so that neither needs ``--trust-remote-code``.

The model reads the same per-layer specs as the bundled modeling code (``modeling/modeling_slim.py``): each layer
has an optional attention with its own head counts, sliding window and RoPE kind, and an optional MLP with its own
width; wide (parallel) layers are ordinary layers with more heads. Built from vLLM's column/row-parallel linears,
``Attention`` over the paged KV cache, RMSNorm and rotary embeddings, so continuous batching, prefix caching and
tensor parallelism work as for a stock model. Written after reading how vLLM's ``nemotron_nas.py`` builds
heterogeneous layers; it shares no code with it. An early-exit policy is refused at load: vLLM runs every layer.
"""
from collections.abc import Iterable

import torch
from torch import nn

ARCHITECTURE = "SlimForCausalLM"


def register() -> None:
    """vLLM's plugin hook (may run several times per process)."""
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from ..modeling.configuration_decilm import DeciLMConfig
    from ..modeling.configuration_slim import SlimConfig

    for model_type, cls in (("slimconv", SlimConfig), ("nemotron-nas", DeciLMConfig)):
        try:
            AutoConfig.register(model_type, cls)
        except ValueError:  # registered already (an earlier call in this process)
            pass
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, f"{__name__}:SlimForCausalLM")


class SlimConfigError(ValueError):
    """A slim config.json this model cannot run: the message names the key and the fix."""


def check_config(config) -> None:
    """Refuses what vLLM cannot run, and a damaged config, before any weight is read."""
    early = getattr(config, "early_exit", None)
    if early:
        raise SlimConfigError(
            "this slimconv output has an early-exit policy (config.json 'early_exit'), which vLLM cannot run: it "
            "evaluates every layer. The formats that carry early exit are slimconv's slim format in transformers "
            "(AutoModelForCausalLM with trust_remote_code=True); to serve in vLLM, convert the recipe without its "
            "early_exit section")
    layers = getattr(config, "slim_layers", None)
    if not isinstance(layers, list) or len(layers) != config.num_hidden_layers:
        raise SlimConfigError(f"config.json 'slim_layers' must be a list of {config.num_hidden_layers} layer specs "
                              f"(num_hidden_layers), got {type(layers).__name__}"
                              f"{f' of {len(layers)}' if isinstance(layers, list) else ''}; convert the recipe again")
    for i, spec in enumerate(layers):
        attn, mlp = (spec or {}).get("attention"), (spec or {}).get("mlp")
        if attn is not None and not all(isinstance(attn.get(k), int) and attn[k] > 0
                                        for k in ("num_heads", "num_key_value_heads")):
            raise SlimConfigError(f"config.json 'slim_layers'[{i}]['attention'] needs positive integers num_heads and "
                                  f"num_key_value_heads, got {attn}; convert the recipe again")
        if mlp is not None and not (isinstance(mlp.get("intermediate_size"), int) and mlp["intermediate_size"] > 0):
            raise SlimConfigError(f"config.json 'slim_layers'[{i}]['mlp'] needs a positive integer intermediate_size, "
                                  f"got {mlp}; convert the recipe again")
        if mlp is not None and mlp.get("experts") is not None:
            experts, top_k = mlp["experts"], mlp.get("top_k")
            if not (isinstance(experts, list) and experts and isinstance(top_k, int) and 0 < top_k <= len(experts)):
                raise SlimConfigError(f"config.json 'slim_layers'[{i}]['mlp'] needs a non-empty 'experts' list and "
                                      f"an integer 'top_k' from 1 to its length, got experts={experts!r}, "
                                      f"top_k={top_k!r}; convert the recipe again")
        kinds = getattr(config, "rope_kinds", None) or {"default": None}
        if attn is not None and attn.get("rope", "default") not in kinds | {None: None}:
            raise SlimConfigError(f"config.json 'slim_layers'[{i}]['attention']['rope'] is {attn.get('rope')!r}, not "
                                  f"one of 'rope_kinds' ({', '.join(kinds)}); convert the recipe again")
    bias = config.projection_bias or {}
    if len({bool(bias.get(p)) for p in "qkv"}) > 1:
        raise SlimConfigError(f"config.json 'projection_bias' {bias}: vLLM's packed q/k/v projection has one bias "
                              "flag for all three")


def _qk_norm_mode(config):
    mode = getattr(config, "qk_norm", False)
    return "head" if mode is True else (mode or None)


def _norms(config) -> dict:
    return {"attention_input": True, "attention_output": False, "mlp_input": True, "mlp_output": False,
            **(getattr(config, "norms", None) or {})}


class _HeadNorm(nn.Module):
    """RMSNorm over each head's dims with a gain per head (``(heads, head_dim)``, a wide layer's heads keeping their
    member's): this rank's heads only under tensor parallelism."""

    def __init__(self, heads: int, head_dim: int, eps: float, first: int):
        super().__init__()
        from vllm.model_executor.utils import set_weight_attrs

        self.heads, self.head_dim, self.eps, self.first = heads, head_dim, eps, first
        self.weight = nn.Parameter(torch.ones(heads, head_dim))
        set_weight_attrs(self.weight, {"weight_loader": self._load})

    def _load(self, param, loaded):
        param.data.copy_(loaded.reshape(-1, self.head_dim)[self.first:self.first + self.heads])

    def forward(self, x):
        shape = x.shape
        y = x.view(-1, self.heads, self.head_dim).float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * y.to(x.dtype)).reshape(shape)


class SlimAttention(nn.Module):
    def __init__(self, config, spec: dict, rope: dict, cache_config, quant_config, prefix: str):
        super().__init__()
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
        from vllm.model_executor.layers.attention import Attention
        from vllm.model_executor.layers.layernorm import RMSNorm
        from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear

        tp, rank = get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()
        heads, kv = spec["num_heads"], spec["num_key_value_heads"]
        if heads % tp or (kv % tp if kv >= tp else tp % kv):
            raise SlimConfigError(f"{prefix}: {heads} query heads and {kv} KV heads do not split over "
                                  f"tensor_parallel_size {tp}")
        d = config.head_dim
        self.head_dim, self.q_size, self.kv_size = d, heads // tp * d, max(1, kv // tp) * d
        bias = config.projection_bias or {}
        self.qkv_proj = QKVParallelLinear(config.hidden_size, d, heads, kv, bias=bool(bias.get("q")),
                                          quant_config=quant_config, prefix=f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(heads * d, config.hidden_size, bias=bool(bias.get("o")),
                                        quant_config=quant_config, prefix=f"{prefix}.o_proj")
        mode = _qk_norm_mode(config)
        if mode == "full" and tp > 1:
            raise SlimConfigError(f"{prefix}: q/k norms over all heads (qk_norm 'full') run only at "
                                  "tensor_parallel_size 1 here")
        if mode == "head":
            self.q_norm = _HeadNorm(heads // tp, d, config.rms_norm_eps, rank * heads // tp)
            self.k_norm = _HeadNorm(max(1, kv // tp), d, config.rms_norm_eps, rank * kv // tp)
        elif mode == "full":
            self.q_norm, self.k_norm = RMSNorm(heads * d, config.rms_norm_eps), RMSNorm(kv * d, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        kind = spec.get("rope", "default")
        self.rotary_emb = None if kind is None else rope[kind]
        self.attn = Attention(heads // tp, d, d**-0.5, num_kv_heads=max(1, kv // tp), cache_config=cache_config,
                              quant_config=quant_config, per_layer_sliding_window=spec.get("sliding_window"),
                              logits_soft_cap=getattr(config, "attn_logit_softcapping", None), prefix=f"{prefix}.attn")

    def forward(self, positions, x):
        qkv, _ = self.qkv_proj(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.q_norm is not None:
            q, k = self.q_norm(q.contiguous()), self.k_norm(k.contiguous())
        if self.rotary_emb is not None:
            q, k = self.rotary_emb(positions, q, k)
        out, _ = self.o_proj(self.attn(q, k, v))
        return out


class SlimMLP(nn.Module):
    def __init__(self, config, spec: dict, quant_config, prefix: str, bias: bool | None = None):
        super().__init__()
        from vllm.model_executor.layers.activation import GeluAndMul, SiluAndMul
        from vllm.model_executor.layers.linear import MergedColumnParallelLinear, RowParallelLinear

        width = spec["intermediate_size"]
        bias = bool(config.mlp_bias) if bias is None else bias
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [width] * 2, bias=bias,
                                                       quant_config=quant_config, prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(width, config.hidden_size, bias=bias, quant_config=quant_config,
                                           prefix=f"{prefix}.down_proj")
        acts = {"silu": SiluAndMul, "gelu_pytorch_tanh": lambda: GeluAndMul("tanh"), "gelu": GeluAndMul,
                "relu": lambda: _ReluAndMul()}
        if config.hidden_act not in acts:
            raise SlimConfigError(f"config.json 'hidden_act' {config.hidden_act!r}: the plugin runs {', '.join(acts)}")
        self.act_fn = acts[config.hidden_act]()

    def forward(self, x):
        x, _ = self.gate_up_proj(x)
        x, _ = self.down_proj(self.act_fn(x))
        return x


class SlimMoE(nn.Module):
    """A mixture of experts on vLLM's fused MoE layer (its kernels, and experts sharded over tensor-parallel ranks):
    the router's logits in float32, softmax top-k, renormalised when the spec's ``norm_topk_prob``; a pruned expert is
    absent, so the router has one row per kept expert. A shared expert (Qwen2-MoE) runs beside it as a dense MLP
    scaled by its sigmoid gate, as the bundled modeling code computes it."""

    def __init__(self, config, spec: dict, quant_config, prefix: str):
        super().__init__()
        from vllm.model_executor.layers.fused_moe import FusedMoEFactory
        from vllm.model_executor.layers.fused_moe.router.gate_linear import GateLinear
        from vllm.model_executor.layers.linear import ReplicatedLinear

        if config.hidden_act != "silu":
            raise SlimConfigError(f"{prefix}: experts with hidden_act {config.hidden_act!r}; vLLM's fused MoE layer "
                                  "runs SiLU-gated experts here")
        n, h = len(spec["experts"]), config.hidden_size
        self.gate = GateLinear(h, n, prefix=f"{prefix}.gate")
        self.experts = FusedMoEFactory(num_experts=n, top_k=spec["top_k"], hidden_size=h,
                                       intermediate_size=spec["intermediate_size"],
                                       renormalize=bool(spec.get("norm_topk_prob")), quant_config=quant_config,
                                       prefix=f"{prefix}.experts")
        shared = spec.get("shared_intermediate_size")
        self.shared_expert = self.shared_expert_gate = None
        if shared:
            self.shared_expert = SlimMLP(config, {"intermediate_size": shared}, quant_config,
                                         f"{prefix}.shared_expert", bias=False)
            self.shared_expert_gate = ReplicatedLinear(h, 1, bias=False, quant_config=None,
                                                       prefix=f"{prefix}.shared_expert_gate")

    def load_experts(self, name: str, weight: torch.Tensor) -> str:
        """Loads one expert tensor (``name`` relative to this layer's ``experts.``); the parameter's name."""
        loaded = list(self.experts.load_weights([(name, weight)]))
        if not loaded:
            raise SlimConfigError(f"the checkpoint's expert tensor experts.{name} does not fit the layer its "
                                  "config.json describes; convert the recipe again")
        return loaded[0]

    def forward(self, x):
        shape = x.shape
        x = x.view(-1, shape[-1])
        logits, _ = self.gate(x)
        out = self.experts(x, logits)
        if self.shared_expert is not None:
            scale, _ = self.shared_expert_gate(x)
            out = out + torch.sigmoid(scale) * self.shared_expert(x)
        return out.view(shape)


class _ReluAndMul(nn.Module):
    def forward(self, x):
        gate, up = x.chunk(2, dim=-1)
        return torch.relu(gate) * up


class SlimDecoderLayer(nn.Module):
    """``x + out_norm(attn(in_norm(x)))``, then the same for the MLP; each norm only where the family has it."""

    def __init__(self, config, spec: dict, rope: dict, cache_config, quant_config, prefix: str):
        super().__init__()
        from vllm.model_executor.layers.layernorm import RMSNorm

        norms = _norms(config)
        norm = lambda role: RMSNorm(config.hidden_size, eps=config.rms_norm_eps) if norms[role] else None
        self.self_attn = self.mlp = None
        self.input_layernorm = self.attention_output_layernorm = None
        self.post_attention_layernorm = self.mlp_output_layernorm = None
        if spec.get("attention"):
            self.input_layernorm, self.attention_output_layernorm = norm("attention_input"), norm("attention_output")
            self.self_attn = SlimAttention(config, spec["attention"], rope, cache_config, quant_config,
                                           f"{prefix}.self_attn")
        if spec.get("mlp"):
            self.post_attention_layernorm, self.mlp_output_layernorm = norm("mlp_input"), norm("mlp_output")
            moe = spec["mlp"].get("experts") is not None
            self.mlp = (SlimMoE if moe else SlimMLP)(config, spec["mlp"], quant_config, f"{prefix}.mlp")

    @staticmethod
    def _norm(norm, x):
        return x if norm is None else norm(x)

    def forward(self, positions, x):
        if self.self_attn is not None:
            y = self.self_attn(positions, self._norm(self.input_layernorm, x))
            x = x + self._norm(self.attention_output_layernorm, y)
        if self.mlp is not None:
            y = self.mlp(self._norm(self.post_attention_layernorm, x))
            x = x + self._norm(self.mlp_output_layernorm, y)
        return x


class SlimModel(nn.Module):
    def __init__(self, config, cache_config, quant_config, prefix: str):
        super().__init__()
        from vllm.model_executor.layers.layernorm import RMSNorm
        from vllm.model_executor.layers.rotary_embedding import get_rope
        from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

        self.config = config
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, quant_config=quant_config)
        kinds = getattr(config, "rope_kinds", None) or {"default": config.rope_parameters}
        rope = {kind: get_rope(config.head_dim, max_position=config.max_position_embeddings, is_neox_style=True,
                               rope_parameters=dict(params)) for kind, params in kinds.items()}
        self.layers = nn.ModuleList(SlimDecoderLayer(config, spec, rope, cache_config, quant_config,
                                                     f"{prefix}.layers.{i}")
                                    for i, spec in enumerate(config.slim_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def embed_input_ids(self, input_ids):
        x = self.embed_tokens(input_ids)
        mult = getattr(self.config, "embedding_multiplier", None)
        return x if mult is None else x * torch.tensor(mult, dtype=x.dtype)

    def forward(self, input_ids, positions, inputs_embeds=None):
        x = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        for layer in self.layers:
            x = layer(positions, x)
        return self.norm(x)


class SlimForCausalLM(nn.Module):
    """vLLM's entry for ``architectures: ["SlimForCausalLM"]`` (slimconv's slim format)."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__()
        from vllm.model_executor.layers.logits_processor import LogitsProcessor
        from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

        config = vllm_config.model_config.hf_config
        check_config(config)
        self.config = config
        self.model = SlimModel(config, vllm_config.cache_config, vllm_config.quant_config,
                               f"{prefix}.model" if prefix else "model")
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, quant_config=vllm_config.quant_config,
                                      prefix=f"{prefix}.lm_head" if prefix else "lm_head")
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size,
                                                soft_cap=getattr(config, "final_logit_softcapping", None))

    def embed_input_ids(self, input_ids):
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        return self.model(input_ids, positions, inputs_embeds)

    def compute_logits(self, hidden_states):
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        from vllm.model_executor.model_loader.weight_utils import default_weight_loader

        # checkpoint name part -> (packed parameter, shard): q/k/v and gate/up load into one matrix each.
        stacked = {".q_proj.": (".qkv_proj.", "q"), ".k_proj.": (".qkv_proj.", "k"), ".v_proj.": (".qkv_proj.", "v"),
                   ".gate_proj.": (".gate_up_proj.", 0), ".up_proj.": (".gate_up_proj.", 1)}
        params = dict(self.named_parameters())
        loaded = set()
        for name, weight in weights:
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            layer, sep, rest = name.partition(".mlp.experts.")
            if sep:  # an expert's tensor: vLLM's fused MoE layer stacks the experts itself
                moe = self.get_submodule(layer + ".mlp")
                loaded.add(f"{layer}.mlp.experts.{moe.load_experts(rest, weight)}")
                continue
            part = next((p for p in stacked if p in name), None)
            if part is not None:
                target, shard = stacked[part]
                name = name.replace(part, target)
                param = params[name]
                param.weight_loader(param, weight, shard)
            else:
                if name not in params:
                    raise SlimConfigError(f"the checkpoint holds {name}, which its config.json does not describe; "
                                          "convert the recipe again")
                param = params[name]
                getattr(param, "weight_loader", default_weight_loader)(param, weight)
            loaded.add(name)
        return loaded
