"""Every recipe inconsistency is a clear error before any work starts."""
import pytest

from slimconv.errors import SlimError
from slimconv.plan import build_plan
from slimconv.recipe import parse_indices, parse_recipe

CONFIG = dict(model_type="llama", num_hidden_layers=8, hidden_size=64, num_attention_heads=4,
              num_key_value_heads=2, intermediate_size=96, vocab_size=128)


def plan(**recipe):
    return build_plan(parse_recipe({"model": "x", "output": {"dir": "o"}, **recipe}), CONFIG)


def error_of(**recipe) -> str:
    with pytest.raises(SlimError) as e:
        plan(**recipe)
    return str(e.value)


def test_indices_accept_ints_lists_and_inclusive_ranges():
    assert parse_indices(["1-3", 6, "7"], "k", 8) == [1, 2, 3, 6, 7]
    assert parse_indices("2-2", "k", 8) == [2]


@pytest.mark.parametrize("recipe,words", [
    (dict(remove={"blocks": [8]}), ["remove.blocks", "layer 8", "8 layers", "0-7"]),
    (dict(remove={"attention": "5-9"}), ["remove.attention", "layer 9"]),
    (dict(remove={"mlp": "5-3"}), ["backwards", "3-5"]),
    (dict(remove={"blocks": ["x"]}), ["'x'", "inclusive range"]),
    (dict(remove={"blocks": [2]}, parallel={"groups": [[2, 3]]}), ["layer 2", "both removed", "parallel"]),
    (dict(parallel={"groups": [[1, 2], [2, 3]]}), ["layer 2", "overlap"]),
    (dict(parallel={"groups": [[1, 3]]}), ["not consecutive"]),
    (dict(parallel={"groups": [[1]]}), ["at least 2"]),
    (dict(parallel={"groups": [[1, 1, 2]]}), ["listed twice"]),
    (dict(remove={"blocks": "0-7"}), ["every layer"]),
    (dict(remove={"attention": "0-7", "mlp": "0-7"}), ["every layer"]),
])
def test_plan_errors_name_the_problem(recipe, words):
    text = error_of(**recipe)
    for w in words:
        assert w in text, f"{w!r} not in {text!r}"


def test_unknown_keys_suggest_the_right_one():
    with pytest.raises(SlimError) as e:
        parse_recipe({"model": "x", "remov": {}, "output": {"dir": "o", "dtyp": "float16"}})
    assert "did you mean 'remove'" in str(e.value) and "did you mean 'dtype'" in str(e.value)


def test_wrong_types_and_missing_keys():
    with pytest.raises(SlimError) as e:
        parse_recipe({"output": {"dir": "o", "dtype": "fp8"}, "remove": {"blocks": 1.5}})
    text = str(e.value)
    assert "missing key 'model'" in text and "output.dtype" in text and "remove.blocks" in text


def test_both_sublayers_removed_is_a_block_and_the_plan_says_so():
    p = plan(remove={"attention": [3], "mlp": [3, 4]})
    assert [s.source_layers for s in p.layers] == [[i] for i in range(8) if i != 3]
    assert any("removed as whole blocks" in n for n in p.notes)
    assert p.layers[3].attention is not None and p.layers[3].mlp is None


def test_parallel_group_becomes_one_wide_layer():
    p = plan(parallel={"groups": ["2-4"]}, remove={"attention": [3]})
    wide = p.layers[2]
    assert wide.source_layers == [2, 3, 4]
    assert wide.attention.sources == [2, 4] and wide.attention.num_heads == 8 and wide.attention.num_key_value_heads == 4
    assert wide.mlp.intermediate_size == 3 * 96


def test_unsupported_architecture_says_why_and_names_the_closest_family():
    with pytest.raises(SlimError) as e:
        build_plan(parse_recipe({"model": "x", "output": {"dir": "o"}}), {**CONFIG, "model_type": "deepseek_v3"})
    assert "'deepseek_v3' is not supported" in str(e.value) and "latent attention" in str(e.value)
    assert "closest supported family is 'qwen3_moe'" in str(e.value)
    with pytest.raises(SlimError) as e:
        build_plan(parse_recipe({"model": "x", "output": {"dir": "o"}}), {**CONFIG, "model_type": "falcon"})
    assert "'falcon' is not supported" in str(e.value) and "gemma3_text" in e.value.fix


def test_every_shipped_recipe_is_a_valid_recipe():
    from pathlib import Path

    from slimconv.recipe import load_recipe

    recipes = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))
    assert len(recipes) >= 12
    for path in recipes:
        load_recipe(path)
