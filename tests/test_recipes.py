"""Every recipe in recipes/ loads and validates; bad recipes fail with the key they got wrong."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from stack.recipe import RecipeError, load_recipe, parse_recipe, parse_size

from .conftest import REPO, SEED_SOURCE_LAYERS


def recipe_kind(path: Path) -> str | None:
    """What a YAML under recipes/ configures, told by its keys: a stack recipe has `slices:`, a heal recipe the raw
    `stack:` folder and `datasets:`, a Fisher recipe a `model:` and `datasets:`, an answers recipe (heal.answers) a
    `model:` and one prompt file, `data:`. None: the demo's presets and study (demo/run.py and demo/study.py load
    them) and accelerate's configs."""
    raw = yaml.safe_load(path.read_text())
    if not isinstance(raw, dict) or "accelerate" in path.parts:
        return None
    if "slices" in raw:
        return "stack"
    if "datasets" in raw:
        return "heal" if "stack" in raw else "fisher" if "model" in raw else None
    if "data" in raw and "model" in raw:
        return "answers"
    return None


# Every recipe under recipes/, subfolders included, by kind (no list to keep up to date).
RECIPES = {path: recipe_kind(path) for path in sorted((REPO / "recipes").rglob("*.yaml"))}
STACK_RECIPES = [path for path, kind in RECIPES.items() if kind == "stack"]
HEAL_RECIPES = [path for path, kind in RECIPES.items() if kind == "heal"]
FISHER_RECIPES = [path for path, kind in RECIPES.items() if kind == "fisher"]
ANSWERS_RECIPES = [path for path, kind in RECIPES.items() if kind == "answers"]


def test_the_seed_recipes_are_found_by_kind():
    # Guards the discovery above: a glob that found nothing would make the parametrized tests below vacuous.
    assert REPO / "recipes" / "e6b.yaml" in STACK_RECIPES
    assert REPO / "recipes" / "heal.yaml" in HEAL_RECIPES and REPO / "recipes" / "fisher.yaml" in FISHER_RECIPES
    assert REPO / "recipes" / "answers.yaml" in ANSWERS_RECIPES
    studies = {"presets.yaml", "study.yaml", "study-gpu.yaml", "gemma3.yaml", "gemma3-gpu.yaml"}
    assert studies == {path.name for path, kind in RECIPES.items() if kind is None and "accelerate" not in path.parts}


@pytest.mark.parametrize("path", STACK_RECIPES, ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_every_stack_recipe_loads(path: Path):
    recipe = load_recipe(path)
    assert recipe.slices and all(spec.layers for spec in recipe.slices)


def test_seed_recipe_is_the_cards_topology():
    recipe = load_recipe(REPO / "recipes" / "e6b.yaml")
    assert recipe.model == "google/gemma-4-E4B-it"
    assert recipe.source_layers == SEED_SOURCE_LAYERS
    assert len(recipe.source_layers) == 66
    assert recipe.options.kv_graft_source == "producer"
    assert recipe.options.max_shard_bytes == 5 * 10**9


MERGEKIT_YAML = """
slices:
  - sources:
      - model: meta-llama/Llama-3.2-1B
        layer_range: [0, 12]
  - sources:
      - model: meta-llama/Llama-3.2-1B
        layer_range: [4, 16]
merge_method: passthrough
dtype: bfloat16
"""


def test_mergekit_passthrough_yaml_is_accepted_as_is():
    recipe = parse_recipe(yaml.safe_load(MERGEKIT_YAML))
    assert recipe.source_layers == list(range(0, 12)) + list(range(4, 16))
    assert recipe.dtype == "bfloat16"


def test_source_override_replaces_every_slice_model():
    recipe = parse_recipe(yaml.safe_load(MERGEKIT_YAML), source_override="/models/llama")
    assert {spec.model for spec in recipe.slices} == {"/models/llama"}


def _recipe(**changes):
    base = yaml.safe_load(MERGEKIT_YAML)
    base.update(changes)
    return base


def _slice(layer_range, **extra):
    return {"sources": [{"model": "m", "layer_range": layer_range, **extra}]}


@pytest.mark.parametrize(
    "raw, message",
    [
        (_recipe(slicez=[]), "unknown key(s) ['slicez']"),
        (_recipe(merge_method="slerp"), "merge_method 'slerp' is not supported"),
        (_recipe(slices=[]), "'slices' is empty"),
        (_recipe(slices=[_slice([5, 5])]), "slices[0]: layer_range [5, 5) is empty"),
        (_recipe(slices=[_slice([0, 4]), _slice([6, 2])]), "slices[1]: layer_range [6, 2) is empty"),
        (_recipe(slices=[_slice([-1, 2])]), "slices[0]: layer_range [-1, 2) is empty or negative"),
        (_recipe(slices=[_slice([0, "4"])]), "slices[0].sources[0].layer_range must be two integers"),
        (_recipe(slices=[_slice([0, 4], parameters={"scale": 0.5})]),
         "slices[0].sources[0].parameters is not supported"),
        (_recipe(slices=[_slice([0, 4], weight=1)]), "slices[0].sources[0]: unknown key(s) ['weight']"),
        (_recipe(slices=[_slice([0, 4]), {"sources": [{"model": "other", "layer_range": [0, 2]}]}]),
         "slices name several models"),
        (_recipe(stack={"max_shard_size": "lots"}), "stack.max_shard_size 'lots' is not a size"),
        (_recipe(stack={"kv_graft_source": "nearest"}), "stack.kv_graft_source 'nearest' must be one of"),
        (_recipe(stack={"shard": "5GB"}), "recipe: stack: unknown key(s) ['shard']"),
        (_recipe(stack={"max_shard": "5GB"}), "unknown key(s) ['max_shard'] (did you mean 'max_shard_size'?)"),
        (_recipe(base_model="another/model"), "base_model 'another/model' differs"),
    ],
)
def test_bad_recipes_name_what_is_wrong(raw, message):
    with pytest.raises(RecipeError) as error:
        parse_recipe(raw)
    assert message in str(error.value)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


@pytest.mark.parametrize("text, expected", [("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("2GiB", 2 * 2**30),
                                            (1234, 1234), ("1.5GB", 1_500_000_000)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


def test_command_line_options_go_on_top_of_the_stack_block_and_into_the_record():
    recipe = parse_recipe(_recipe(stack={"kv_graft_source": "checkpoint"}), options={"max_shard_size": "2GB"})
    assert (recipe.options.kv_graft_source, recipe.options.max_shard_bytes) == ("checkpoint", 2 * 10**9)
    assert recipe.raw["stack"] == {"kv_graft_source": "checkpoint", "max_shard_size": "2GB"}  # as stack.json records


@pytest.mark.parametrize("path", HEAL_RECIPES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_heal_recipe_loads_and_validates(path: Path):
    from heal.config import load_config

    heal, sft = load_config(path, use_cpu=True)  # GPU recipes ask for bf16; validated here on CPU
    assert heal.objective in ("sft", "distill") and heal.datasets and sft.output_dir


@pytest.mark.parametrize("path", FISHER_RECIPES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_fisher_recipe_loads_and_validates(path: Path):
    from fisher.config import load_config

    config = load_config(path)
    assert config.model and config.datasets and config.num_examples > 0


@pytest.mark.parametrize("path", ANSWERS_RECIPES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_answers_recipe_loads_and_validates(path: Path):
    from heal.answers import load_config

    config = load_config(path)  # what `python -m heal.answers --config PATH` runs
    assert config.model and config.data and config.out and config.max_new_tokens > 0


def test_an_answers_recipe_with_a_misspelt_key_names_it(tmp_path):
    from heal.answers import AnswersError, load_config

    recipe = tmp_path / "answers.yaml"
    recipe.write_text((REPO / "recipes" / "answers.yaml").read_text().replace("max_new_tokens:", "max_new_token:"))
    with pytest.raises(AnswersError, match=r"unknown key\(s\) \['max_new_token'\] \(did you mean 'max_new_tokens'"):
        load_config(recipe)


def test_the_demo_stack_recipe_has_four_slices():
    assert len(load_recipe(REPO / "recipes" / "demo" / "mini-e6b.yaml").slices) == 4
