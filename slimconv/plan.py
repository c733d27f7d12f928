"""The plan: the recipe resolved against the source config into one spec per output layer, with costs."""
import json
from pathlib import Path

from pydantic import BaseModel, PrivateAttr

from .arch import Arch, get_arch, head_dim, kv_heads
from .errors import SlimError
from .recipe import EarlyExit, Recipe, parse_indices


class AttentionSpec(BaseModel):
    sources: list[int]
    num_heads: int
    num_key_value_heads: int
    sliding_window: int | None = None
    rope: str | None = "default"  # a key of the slim config's rope_kinds; None: this attention has no RoPE
    merged_from: int | None = None  # KV heads merged (shrink.kv_heads): the source's count they replace


class MlpSpec(BaseModel):
    """A dense MLP, or (``experts`` set) a mixture of experts: the source experts kept, in order, each of width
    ``intermediate_size``, with softmax top-k routing and an optional gated shared expert."""

    sources: list[int]
    intermediate_size: int
    experts: list[int] | None = None
    top_k: int | None = None
    norm_topk_prob: bool | None = None
    shared_intermediate_size: int | None = None
    source_experts: int | None = None  # how many the source layer has
    channels: list[int] | None = None  # a narrowed MLP (shrink.mlp): the source channels kept, in source order

    @property
    def pruned(self) -> bool:
        return self.experts is not None and len(self.experts) < self.source_experts


class LayerSpec(BaseModel):
    source_layers: list[int]
    attention: AttentionSpec | None
    mlp: MlpSpec | None

    @property
    def narrowed(self) -> bool:
        """Whether shrink narrowed this layer (fewer MLP channels or merged KV heads)."""
        return (self.mlp is not None and self.mlp.channels is not None) or (
            self.attention is not None and self.attention.merged_from is not None)


class Plan(BaseModel):
    model_type: str
    num_source_layers: int
    layers: list[LayerSpec]
    norm: str
    notes: list[str]
    early_exit: dict | None = None  # the run-time stop policy stored in the slim config (selection/early_exit.py)
    _arch: Arch | None = PrivateAttr(default=None)

    def arch(self, config: dict) -> Arch:
        """The source's family resolved (``get_arch``) once per plan: built with the plan, or on first use for a
        plan read back from slimconv_plan.json; the layout, the formats and the costs all read this one object."""
        if self._arch is None:
            self._arch = get_arch(config)
        return self._arch

    @property
    def uniform(self) -> bool:
        """True when only whole blocks were removed (and experts pruned alike in every mixture-of-experts layer)
        and no early exit: a stock config of the source architecture fits, its expert count the kept one."""
        whole = self.early_exit is None and all(
            len(s.source_layers) == 1 and s.attention is not None and s.mlp is not None and not s.narrowed
            for s in self.layers)
        return whole and len({(len(s.mlp.experts), s.mlp.top_k) for s in self.layers if s.mlp.experts is not None}) <= 1


def _dims(config: dict) -> dict:
    return dict(
        hidden=config["hidden_size"],
        heads=config["num_attention_heads"],
        kv=kv_heads(config),
        head_dim=head_dim(config),
        inter=config["intermediate_size"],
    )


def kept_experts(recipe: Recipe, config: dict, arch, removed: set) -> dict[int, tuple[list[int], int]]:
    """``remove.experts`` resolved: source layer -> (the experts it keeps, top-k); a SlimError names the layer,
    the count and the fix for what cannot be done."""
    n, out = config["num_hidden_layers"], {}
    if not recipe.remove.experts:
        return out
    if not any(arch.sparse):
        raise SlimError(f"remove.experts: {config.get('model_type')} has no mixture-of-experts layers",
                        "remove the experts section (it applies to qwen3_moe, mixtral and qwen2_moe models)")
    for spec, kept in recipe.remove.experts.items():
        key = f"remove.experts[{spec!r}]"
        if isinstance(kept, int):  # convert.prepare resolves counts first (selection/experts.py)
            raise SlimError(f"{key}: a count of experts is chosen from the source's weights on calibration text, "
                            "and only its config is at hand here", "give the list of experts to keep, or run "
                            "`slimconv plan` / `convert` on a local copy of the model")
        for i in parse_indices(spec, key, n):
            if i in out:
                raise SlimError(f"{key}: layer {i} is also named by another key of remove.experts", "name each layer once")
            if not arch.sparse[i]:
                raise SlimError(f"{key}: layer {i} has a dense MLP, not experts",
                                f"leave it out; the sparse layers are {[j for j in range(n) if arch.sparse[j]]}")
            if i in removed:
                raise SlimError(f"{key}: layer {i} loses its MLP (remove.blocks or remove.mlp), so it keeps no experts",
                                "name it in one of the two only")
            bad = [e for e in kept if not 0 <= e < arch.num_experts]
            if bad or len(set(kept)) != len(kept) or not kept:
                what = (f"expert {bad[0]} does not exist (the layer has {arch.num_experts}: 0-{arch.num_experts - 1})"
                        if bad else "no expert is kept" if not kept else "an expert is listed twice")
                raise SlimError(f"{key}: layer {i}: {what}", "list the experts to keep, each once")
            if len(kept) < arch.top_k and not recipe.remove.cap_top_k:
                raise SlimError(f"{key}: layer {i} keeps {len(kept)} experts but routes each token to {arch.top_k} "
                                "(num_experts_per_tok)", f"keep at least {arch.top_k}, or set remove.cap_top_k: true "
                                f"to route each token to all {len(kept)} kept experts")
            out[i] = (sorted(kept), min(arch.top_k, len(kept)))
    return out


def narrowing(recipe: Recipe, config: dict, arch, blocks: set, no_attn: set, no_mlp: set,
              grouped: set) -> tuple[dict[int, list[int]], dict[int, int]]:
    """``shrink`` resolved: (source layer -> MLP channels kept, source layer -> KV heads kept); a SlimError names
    the key, the layer and the fix for what cannot be done. A layer kept at its source width is left as it is."""
    n, d = config["num_hidden_layers"], _dims(config)
    channels, kv = {}, {}

    def layers_of(section, spec, gone, what):
        key = f"shrink.{section}[{spec!r}]"
        out = parse_indices(spec, key, n)
        for i in out:
            if i in blocks:
                raise SlimError(f"{key}: layer {i} is removed (remove.blocks), so it has no {what} to narrow",
                                "name it in one of the two only")
            if i in gone:
                raise SlimError(f"{key}: layer {i} loses its {what} (remove.{section.replace('kv_heads', 'attention')})",
                                "name it in one of the two only")
            if i in grouped:
                raise SlimError(f"{key}: layer {i} is in a parallel group; a narrowed layer cannot be folded into a "
                                "wide one yet", "narrow layers outside the parallel groups")
            if i in channels if section == "mlp" else i in kv:
                raise SlimError(f"{key}: layer {i} is also named by another key of shrink.{section}", "name each layer once")
        return key, out

    for spec, kept in recipe.shrink.mlp.items():
        key, layers = layers_of("mlp", spec, no_mlp, "MLP")
        if not isinstance(kept, list):  # convert.prepare resolves fractions and counts (selection/channels.py)
            raise SlimError(f"{key}: a fraction or count of channels is chosen from the source's weights on "
                            "calibration text, and only its config is at hand here", "give the list of channels to "
                            "keep, or run `slimconv plan` / `convert` on a local copy of the model")
        for i in layers:
            if arch.sparse[i]:
                raise SlimError(f"{key}: layer {i}'s MLP is a mixture of experts", "prune its experts instead "
                                "(remove.experts), or narrow only the dense layers")
            bad = [c for c in kept if not 0 <= c < d["inter"]]
            if bad or len(set(kept)) != len(kept) or not kept:
                what = (f"channel {bad[0]} does not exist (the MLP has {d['inter']}: 0-{d['inter'] - 1})" if bad
                        else "no channel is kept" if not kept else "a channel is listed twice")
                raise SlimError(f"{key}: layer {i}: {what}", "list the channels to keep, each once")
            if len(kept) < d["inter"]:
                channels[i] = sorted(kept)
    for spec, k in recipe.shrink.kv_heads.items():
        key, layers = layers_of("kv_heads", spec, no_attn, "attention")
        if not 1 <= k <= d["kv"] or d["kv"] % k or d["heads"] % k:
            divisors = [j for j in range(1, d["kv"] + 1) if d["kv"] % j == 0]
            raise SlimError(f"{key}: {k} KV heads: a layer has {d['heads']} query heads over {d['kv']} KV heads, and "
                            "merging pools whole groups of the source's KV heads, so the count must divide "
                            f"{d['kv']} (and with it the {d['heads']} query heads)", f"use one of {divisors}")
        if arch.qk_norm == "full":
            raise SlimError(f"{key}: {config['model_type']}'s k norm spans all KV heads at once, so merged heads would "
                            "change it", "remove the kv_heads section for this family (shrink.mlp still applies)")
        for i in layers:
            if k < d["kv"]:
                kv[i] = k
    return channels, kv


def layer_spec(config: dict, members: list[int], attention: list[int], mlp: list[int], arch=None,
               experts: tuple[list[int], int] | None = None, channels: list[int] | None = None,
               kv: int | None = None) -> LayerSpec:
    """Source layers ``members`` evaluated as one output layer (a wide one when several) with the
    attention of ``attention`` and the MLP of ``mlp`` (subsets of ``members``; empty: that sublayer is
    removed). The attention's sliding window and RoPE kind are its first member's (a group's members share
    them: ``build_plan`` checks). ``arch``: ``get_arch(config)``, when the caller has it. ``experts``: the experts a
    mixture-of-experts MLP keeps and its top-k (default: all, the source's). ``channels`` / ``kv``: a single layer
    narrowed by shrink, the MLP channels it keeps / its merged KV head count."""
    d = _dims(config)
    arch = arch or get_arch(config)
    first = attention[0] if attention else None
    if mlp and arch.sparse[mlp[0]]:  # build_plan keeps MoE layers out of parallel groups
        kept, top_k = experts or (list(range(arch.num_experts)), arch.top_k)
        mlp_spec = MlpSpec(sources=list(mlp), intermediate_size=arch.expert_width,
                           experts=list(kept), top_k=top_k, norm_topk_prob=arch.norm_topk,
                           source_experts=arch.num_experts,
                           shared_intermediate_size=arch.shared_width or None)
    elif channels is not None:
        mlp_spec = MlpSpec(sources=list(mlp), intermediate_size=len(channels), channels=list(channels))
    else:
        mlp_spec = MlpSpec(sources=list(mlp), intermediate_size=d["inter"] * len(mlp)) if mlp else None
    return LayerSpec(
        source_layers=list(members),
        attention=AttentionSpec(sources=list(attention), num_heads=d["heads"] * len(attention),
                                num_key_value_heads=kv or d["kv"] * len(attention), sliding_window=arch.windows[first],
                                rope=arch.rope[first], merged_from=d["kv"] if kv else None)
        if attention else None,
        mlp=mlp_spec,
    )


def groupable(arch, members) -> bool:
    """Whether source layers ``members`` can be evaluated as one wide layer: a pre-norm family, dense MLPs, and
    attentions of one window and one RoPE kind (``build_plan`` says which of these fails, for a recipe)."""
    members = list(members)
    return (arch.pre_norm and not any(arch.sparse[m] for m in members) and len({arch.windows[m] for m in members}) == 1
            and len({arch.rope[m] for m in members}) == 1)


def build_plan(recipe: Recipe, config: dict) -> Plan:
    arch = get_arch(config)
    n = config["num_hidden_layers"]
    blocks = set(parse_indices(recipe.remove.blocks, "remove.blocks", n))
    no_attn = set(parse_indices(recipe.remove.attention, "remove.attention", n))
    no_mlp = set(parse_indices(recipe.remove.mlp, "remove.mlp", n))
    notes = []
    both = sorted((no_attn & no_mlp) - blocks)
    if both:
        notes.append(f"layers {both} lose both attention and MLP: removed as whole blocks")
        blocks |= set(both)
    redundant = sorted((no_attn | no_mlp) & blocks)
    if redundant:
        notes.append(f"layers {redundant} are removed as blocks; their sublayer removals are redundant")
    groups = []
    seen = {}
    for gi, spec in enumerate(recipe.parallel.groups):
        key = f"parallel.groups[{gi}]"
        members = parse_indices(spec, key, n)
        if len(members) < 2:
            raise SlimError(f"{key}: a parallel group needs at least 2 layers, got {members}")
        if members != list(range(members[0], members[-1] + 1)):
            raise SlimError(
                f"{key}: layers {members} are not consecutive",
                f"a group is a run of neighbouring layers, e.g. '{members[0]}-{members[0] + len(members) - 1}'",
            )
        for m in members:
            if m in blocks:
                raise SlimError(f"{key}: layer {m} is both removed (remove.blocks) and in a parallel group",
                                "take it out of one of the two")
            if m in seen:
                raise SlimError(f"{key}: layer {m} is also in parallel.groups[{seen[m]}]: groups must not overlap")
            seen[m] = gi
        groups.append(members)
    if len(blocks) == n:
        raise SlimError("the recipe removes every layer of the model", "keep at least one layer")

    if groups and not arch.pre_norm:
        n_ = arch.names
        owned = [f"{what} ({name})" for what, name in (("the attention's output norm", n_.attn_out),
                                                        ("the MLP's output norm", n_.mlp_out)) if name]
        owned += [f"no {what} input norm" for what, name in (("attention", n_.attn_in), ("MLP", n_.mlp_in))
                  if name is None]
        raise SlimError(f"parallel.groups {groups}: a {config.get('model_type')} layer has {' and '.join(owned)}, so a "
                        "group's members cannot be folded into one wide layer (that needs pre-norm sublayers: an "
                        "input norm each and no output norm)",
                        "remove the parallel section, or use remove.blocks / attention / mlp for this family")
    moe = [g for g in groups if any(arch.sparse[m] and m not in no_mlp for m in g)]
    if moe:
        raise SlimError(f"parallel.groups {moe}: these layers' MLPs are mixtures of experts; a group is evaluated as "
                        "one wide layer, and two routers cannot be folded into one",
                        "group only dense layers, or remove.mlp for the MoE layers of the group (their attentions "
                        "can still run in parallel)")
    experts = kept_experts(recipe, config, arch, blocks | no_mlp)
    channels, kv = narrowing(recipe, config, arch, blocks, no_attn, no_mlp, {m for g in groups for m in g})
    group_of = {g[0]: g for g in groups}
    layers, i = [], 0
    while i < n:
        members = group_of.get(i, [i])
        i = members[-1] + 1
        if members[0] in blocks:
            continue
        attn = [m for m in members if m not in no_attn]
        mlp = [m for m in members if m not in no_mlp]
        if len({arch.windows[m] for m in attn}) > 1:
            raise SlimError(f"parallel group {members} mixes sliding-window and full attention layers",
                            "group only layers of the same attention type")
        if len({arch.rope[m] for m in attn}) > 1:
            kinds = {m: arch.rope[m] or "no RoPE" for m in attn}
            raise SlimError(f"parallel group {members} mixes layers of different RoPE kinds ({kinds})",
                            "group only layers of the same kind")
        layers.append(layer_spec(config, members, attn, mlp, arch, experts.get(mlp[0]) if mlp else None,
                                 channels.get(members[0]) if mlp else None, kv.get(members[0]) if attn else None))
    early_exit = None if recipe.early_exit is None else resolve_policy(recipe.early_exit, len(layers))
    plan = Plan(model_type=config["model_type"], num_source_layers=n, layers=layers,
                norm=recipe.parallel.norm, notes=notes, early_exit=early_exit)
    plan._arch = arch
    return plan


def resolve_policy(ee: EarlyExit, num_layers: int) -> dict:
    """The recipe's ``early_exit`` section as the config's policy dict (what modeling_slim evaluates)."""
    # Imported here: the modeling file pulls in torch and transformers, which planning alone does not need.
    from .modeling.modeling_slim import EXIT_FEATURES

    if ee.min_layer >= num_layers - 1:
        raise SlimError(f"early_exit.min_layer {ee.min_layer}: the slim model has {num_layers} layers, so an exit "
                        f"must come after layer {num_layers - 2} or earlier", "lower early_exit.min_layer")
    policy = dict(policy=ee.policy, threshold=ee.threshold, min_layer=ee.min_layer, every=ee.every)
    if ee.policy == "gap":
        return policy
    if ee.weights is not None:
        unknown = set(ee.weights) - set(EXIT_FEATURES)
        if unknown or ee.bias is None:
            raise SlimError(f"early_exit.weights: unknown features {sorted(unknown)}" if unknown
                            else "early_exit.weights needs early_exit.bias", f"features are {', '.join(EXIT_FEATURES)}")
        return dict(policy, features=list(ee.weights), weights=list(ee.weights.values()), bias=ee.bias)
    if ee.classifier is None:
        raise SlimError("early_exit.policy linear needs a classifier (or weights and bias)",
                        "run `slimconv analyze MODEL --early-exit -o DIR` and set early_exit.classifier: "
                        "DIR/early_exit.json, or use policy: gap")
    path = Path(ee.classifier)
    if not path.is_file():
        raise SlimError(f"early_exit.classifier {str(path)!r} does not exist",
                        "run `slimconv analyze MODEL --early-exit -o DIR` first (it writes DIR/early_exit.json)")
    c = json.loads(path.read_text())["classifier"]
    return dict(policy, features=c["features"], weights=c["weights"], bias=c["bias"])


def source_plan(config: dict, arch: Arch | None = None) -> Plan:
    """The source itself as a plan (every layer kept); ``arch``: ``get_arch(config)``, when the caller has it."""
    n = config["num_hidden_layers"]
    arch = arch or get_arch(config)
    plan = Plan(model_type=config["model_type"], num_source_layers=n, norm="per_layer", notes=[],
                layers=[layer_spec(config, [i], [i], [i], arch) for i in range(n)])
    plan._arch = arch
    return plan


def costs(plan: Plan, config: dict, seq_len: int = 512, bytes_per_param: int = 2) -> dict:
    """Parameter count, FLOPs and bytes per token implied by a plan (matmuls and attention only).

    Prefill FLOPs are per token, averaged over a causal prompt of ``seq_len``; decode FLOPs and bytes are
    for one new token with ``seq_len`` tokens of context. Decode is memory-bound on most hardware, so
    its ideal speedup is the ratio of bytes read per token: weights (at ``bytes_per_param``) plus KV cache.
    A mixture of experts counts the top-k experts a token is routed to (``active_params``): the batch-1 model.
    At larger batches the union of the experts the batch touches is read, up to every expert (``params``).
    """
    d = _dims(config)
    arch = plan.arch(config)
    h, hd = d["hidden"], d["head_dim"]
    bias, mlp_bias, names = arch.bias, arch.mlp_bias, arch.names
    attn_norms = h * ((names.attn_in is not None) + (names.attn_out is not None))
    mlp_norms = h * ((names.mlp_in is not None) + (names.mlp_out is not None))
    vocab = config["vocab_size"]
    tied = config.get("tie_word_embeddings", False)
    matmul = vocab * h  # the LM head; the embedding is a lookup
    params = vocab * h * (1 if tied else 2) + h
    attn_width = kv_width = 0  # summed over layers, in heads
    inactive = 0  # expert parameters a token does not read
    for s in plan.layers:
        if s.attention:
            q, kv = s.attention.num_heads * hd, s.attention.num_key_value_heads * hd
            w = 2 * h * q + 2 * h * kv
            matmul += w
            params += w + attn_norms + (bias["q"] * q + bias["k"] * kv + bias["v"] * kv + bias["o"] * h)
            params += (q + kv) if arch.qk_norm else 0
            attn_width += s.attention.num_heads
            kv_width += s.attention.num_key_value_heads
        if s.mlp and s.mlp.experts is not None:
            expert, shared = 3 * h * s.mlp.intermediate_size, 3 * h * (s.mlp.shared_intermediate_size or 0)
            router = h * (len(s.mlp.experts) + (1 if s.mlp.shared_intermediate_size else 0))
            # A token reads its top-k experts: what batch-1 decoding reads, and the FLOPs it spends.
            matmul += router + shared + expert * min(s.mlp.top_k, len(s.mlp.experts))
            params += router + shared + expert * len(s.mlp.experts) + mlp_norms
            inactive += expert * max(len(s.mlp.experts) - s.mlp.top_k, 0)
        elif s.mlp:
            w = 3 * h * s.mlp.intermediate_size
            matmul += w
            params += w + mlp_norms + (mlp_bias * (2 * s.mlp.intermediate_size + h))
    attn_flops = lambda ctx: 4 * attn_width * hd * ctx  # QK^T and AV
    kv_bytes = 2 * kv_width * hd * bytes_per_param
    return dict(
        params=params,
        active_params=params - inactive,
        sequential_layers=len(plan.layers),
        attention_layers=sum(1 for s in plan.layers if s.attention),
        prefill_flops_per_token=2 * matmul + attn_flops((seq_len + 1) / 2),
        decode_flops_per_token=2 * matmul + attn_flops(seq_len),
        kv_bytes_per_token=kv_bytes,
        decode_bytes_per_token=matmul * bytes_per_param + kv_bytes * seq_len,
        seq_len=seq_len,
    )


def speedups(src: dict, slim: dict) -> dict:
    return dict(
        params=src["params"] / slim["params"],
        prefill=src["prefill_flops_per_token"] / slim["prefill_flops_per_token"],
        decode=src["decode_bytes_per_token"] / slim["decode_bytes_per_token"],
    )
