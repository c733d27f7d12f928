from pathlib import Path

import torch

from slimconv.convert import write_checkpoint
from slimconv.plan import build_plan
from slimconv.recipe import parse_recipe
from slimconv.reference import apply_plan, greedy_no_cache
from slimconv.runtime import load_model
from slimconv.source import Checkpoint
from slimconv.validate import greedy_cached

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)

# Every supported family, with the variations the converter must handle (tied/untied embeddings,
# attention and MLP biases, per-head q/k norms, sliding windows).
ARCH_CONFIGS = {
    "llama-tied": ("LlamaConfig", dict(tie_word_embeddings=True)),
    "llama-bias-untied": ("LlamaConfig", dict(tie_word_embeddings=False, attention_bias=True, mlp_bias=True)),
    "mistral": ("MistralConfig", dict(tie_word_embeddings=False, sliding_window=8, head_dim=16)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(tie_word_embeddings=False, head_dim=16)),
}
# The families beyond Llama's layout, each with what sets it apart turned on (scalars away from 1, soft-caps that
# bite on tiny logits, a sliding window shorter than the test prompts, partial rotary, RoPE kinds per layer).
_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
FAMILY_CONFIGS = {
    "gemma": ("GemmaConfig", dict(head_dim=16, **_IDS)),
    "gemma2": ("Gemma2Config", dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=8,
                                    attn_logit_softcapping=2.0, final_logit_softcapping=3.0, **_IDS)),
    "gemma3_text": ("Gemma3TextConfig", dict(
        head_dim=16, query_pre_attn_scalar=24, sliding_window=8, **_IDS,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 8.0}})),
    # head_dim 32 at partial rotary 0.5: 16 rotary dims, the fewest ONNX Runtime's GroupQueryAttention takes.
    "phi3": ("Phi3Config", dict(hidden_size=128, tie_word_embeddings=False, **_IDS,
                                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                 "partial_rotary_factor": 0.5})),
    "granite": ("GraniteConfig", dict(tie_word_embeddings=True, embedding_multiplier=2.0, residual_multiplier=0.5,
                                      attention_multiplier=0.1, logits_scaling=3.0, **_IDS)),
    "smollm3": ("SmolLM3Config", dict(no_rope_layer_interval=3, tie_word_embeddings=True, **_IDS)),
    "olmo2": ("Olmo2Config", dict(tie_word_embeddings=False, **_IDS)),
    "ministral": ("MinistralConfig", dict(sliding_window=8, head_dim=16, **_IDS,
                                          layer_types=["sliding_attention"] * 2 + ["full_attention"] * 2
                                          + ["sliding_attention"] * 2)),
}
# Mixtures of experts (issue 29): four experts, two per token; Qwen3-MoE with a dense layer by mlp_only_layers,
# Qwen2-MoE with a shared expert and a period of 2 (odd layers sparse, even ones dense), Mixtral with a window.
_MOE = dict(num_experts_per_tok=2, **_IDS)
MOE_CONFIGS = {
    "qwen3_moe": ("Qwen3MoeConfig", dict(head_dim=16, num_experts=4, moe_intermediate_size=32, mlp_only_layers=[2],
                                         norm_topk_prob=True, tie_word_embeddings=False, **_MOE)),
    "mixtral": ("MixtralConfig", dict(head_dim=16, num_local_experts=4, intermediate_size=32, sliding_window=8,
                                      tie_word_embeddings=False, **_MOE)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                                         decoder_sparse_step=2, norm_topk_prob=False, tie_word_embeddings=True, **_MOE)),
}
ALL_CONFIGS = {**ARCH_CONFIGS, **FAMILY_CONFIGS, **MOE_CONFIGS}
# Families whose sublayers are pre-norm (an input norm each, no output norm): parallel groups fold only there.
PRE_NORM = [a for a in ALL_CONFIGS if a not in ("gemma2", "gemma3_text", "olmo2")]


def make_tiny(directory: Path, name: str, seed: int = 0, **overrides) -> Path:
    import transformers

    cls, extra = ALL_CONFIGS[name]
    torch.manual_seed(seed)
    config = getattr(transformers, cls)(**{**TINY, **extra, **overrides})
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 1:  # norms and biases away from their init so folding errors would show
                p.copy_((1.0 if "norm" in n else 0.0) + 0.3 * torch.randn_like(p))
            elif ".experts." in n or n.endswith("mlp.gate.weight"):
                # Decisive routing and experts that matter: a wrong expert or routing weight would show.
                p.normal_(0.0, 1.0 if n.endswith("gate.weight") else 0.15)
    model.save_pretrained(directory)
    return directory


# Multimodal checkpoints (a vision tower around a text model of a supported family), as transformers 5 saves them:
# the text model under language_model.model., the head (untied) under language_model.lm_head.
_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
               patch_size=14)
MULTIMODAL_CONFIGS = {
    "gemma3": ("Gemma3Config", dict(text_config=dict(FAMILY_CONFIGS["gemma3_text"][1], **TINY),
                                    vision_config=_VISION, mm_tokens_per_image=4, image_token_index=127,
                                    boi_token_index=125, eoi_token_index=126)),
    "mistral3": ("Mistral3Config", dict(text_config=dict(TINY, model_type="mistral", sliding_window=8, head_dim=16,
                                                         tie_word_embeddings=False, **_IDS),
                                        vision_config=dict(_VISION, model_type="pixtral", head_dim=16),
                                        image_token_index=127, tie_word_embeddings=False)),
}


def make_multimodal(directory: Path, name: str, seed: int = 0) -> Path:
    import transformers

    cls, kwargs = MULTIMODAL_CONFIGS[name]
    torch.manual_seed(seed)
    model = transformers.AutoModelForImageTextToText.from_config(getattr(transformers, cls)(**kwargs))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_((1.0 if "norm" in n else 0.0) + 0.3 * torch.randn_like(p))
    model.save_pretrained(directory)
    return directory


def with_word_tokenizer(model: Path, dest: Path, words: int) -> Path:
    """A copy of a tiny model with a word-level tokenizer over "w0".."w{words-1}", so commands that read
    text can run on it."""
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    shutil.copytree(model, dest)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(words)} | {"[UNK]": words}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(dest)
    return dest


def convert(src: Path, out: Path, dtype="source", shard="5GB", fmt=None, **recipe):
    ckpt = Checkpoint(src)
    parsed = parse_recipe({"model": str(src), "output": {"dir": str(out)}, **recipe})
    plan = build_plan(parsed, ckpt.config)
    out.mkdir(parents=True)
    write_checkpoint(plan, ckpt, out, dtype, shard, fmt, parsed.output.text_only)
    return plan


@torch.no_grad()
def compare(src: Path, out: Path, plan, ids: torch.Tensor, greedy: int = 16):
    """Max |logit| difference of slim vs the run-time reference, and whether greedy tokens agree.

    The slim side generates with its KV cache; the reference recomputes the full sequence every step.
    """
    slim, ref = load_model(out), apply_plan(load_model(src), plan)
    err = (slim(input_ids=ids, use_cache=False).logits - ref(input_ids=ids).logits).abs().max().item()
    got = greedy_cached(slim, ids[:1], greedy)
    want = greedy_no_cache(ref, ids[:1], greedy)
    return err, torch.equal(got, want)


def assert_exact(src: Path, out: Path, plan, ids: torch.Tensor) -> None:
    """``compare``'s verdict as assertions: logits within 1e-5 of the reference's, greedy tokens identical."""
    err, same = compare(src, out, plan, ids)
    assert err < 1e-5, f"max |logit error| {err}"
    assert same, "cached greedy tokens differ from the reference's"


def random_removals(seed: str, layers: int = 6, count: int = 3) -> list[dict]:
    """``count`` random ``remove`` sections over ``layers`` layers: up to 2 blocks, then up to 2 attentions and up to
    2 MLPs among the rest (never both sublayers of one layer)."""
    import random

    rng, out = random.Random(seed), []
    for _ in range(count):
        blocks = rng.sample(range(layers), rng.randint(0, 2))
        rest = [i for i in range(layers) if i not in blocks]
        attention = rng.sample(rest, rng.randint(0, 2))
        mlp = rng.sample([i for i in rest if i not in attention], rng.randint(0, 2))
        out.append(dict(blocks=blocks, attention=attention, mlp=mlp))
    return out


@torch.no_grad()
def reference_nll(src: Path, ids: torch.Tensor, **recipe) -> float:
    """The run-time reference's next-token loss on ``ids`` for a recipe over the source ``src``."""
    import torch.nn.functional as F

    plan = build_plan(parse_recipe({"model": str(src), "output": {"dir": "x"}, **recipe}), Checkpoint(src).config)
    logits = apply_plan(load_model(src), plan)(input_ids=ids).logits[:, :-1]
    return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).item()


@torch.no_grad()
def reference_kl(src: Path, ids: torch.Tensor, **recipe) -> float:
    """How far a recipe moves the run-time reference's next-token distribution on ``ids`` from the source's (KL)."""
    full = torch.log_softmax(load_model(src)(input_ids=ids).logits, -1)
    plan = build_plan(parse_recipe({"model": str(src), "output": {"dir": "x"}, **recipe}), Checkpoint(src).config)
    changed = torch.log_softmax(apply_plan(load_model(src), plan)(input_ids=ids).logits, -1)
    return (full.exp() * (full - changed)).sum(-1).mean().item()


BPE_VOCAB = 320  # a tiny model's vocab_size when it has bpe_tokenizer's tokenizer
BPE_TEXT = ("the quick brown fox jumps over the lazy dog while hello world, slim models run fast and the dog sleeps "
            "under a tree near the river where the fox once lived")


def bpe_tokenizer(dest: Path):
    """A byte-level BPE tokenizer (GPT-2 style) of BPE_VOCAB - 2 tokens, trained here on a few sentences: one
    that GGUF can carry (llama.cpp's gpt2 tokenizer model)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB - 2, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"])
    tok.train_from_iterator([BPE_TEXT] * 20, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>").save_pretrained(dest)


def validate_analyse_search(src: Path, out: Path, text: Path, work: Path) -> None:
    """The stages after convert, as a user runs them on a tiny model: validate (exact), analyze and search on
    ``text`` (a few short windows), writing under ``work``."""
    import json

    from slimconv.cli import main

    assert main(["validate", str(out)]) == 0
    report = json.loads((out / "slimconv_report.json").read_text())
    assert report["exactness"]["passed"] and report["exactness"]["max_abs_error"] < 1e-4
    calib = ["--calib", str(text), "--samples", "2", "--seq-len", "32"]
    assert main(["analyze", str(src), "-o", str(work / "an"), *calib, "--sleb-blocks", "1"]) == 0
    assert main(["search", str(src), "--target", "layers:5", "-o", str(work / "se"), *calib]) == 0
