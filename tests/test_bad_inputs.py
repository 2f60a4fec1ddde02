"""Bad input to heal and fisher: exit status 2, an error naming the file (and how to fix it), nothing
written, and no model loaded: each case fails in seconds, not after a 24 GB load.

Every case runs the real CLI (heal/train.py main, python -m fisher main) on the tiny fixtures with one
thing broken. AutoModelForCausalLM.from_pretrained is replaced by a tripwire: a check that runs only
after the model loads (or not at all) fails the test.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from fisher.__main__ import main as fisher_main
from fisher.file import METADATA_KEY
from heal.train import main as heal_main

from .conftest import heal_recipe
from .fisher_support import rows_for, write_jsonl

LAYERS = "model.language_model.layers."


@dataclass
class Inputs:
    tmp: Path
    stack: Path  # the tiny E6B (read-only: cases copy it before breaking it)
    source: Path  # the tiny E4B
    fisher: Path
    chat: Path


@pytest.fixture
def no_model_load(monkeypatch):
    from transformers import AutoModelForCausalLM

    def tripwire(path, *args, **kwargs):
        raise AssertionError(f"a model was loaded from {path} before the bad input was reported")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", tripwire)


def copy_of(folder: Path, inputs: Inputs, name: str) -> Path:
    return Path(shutil.copytree(folder, inputs.tmp / name))


def truncate(folder: Path) -> Path:
    """Cut the last quarter of the folder's (only) shard; the header stays readable."""
    (shard,) = folder.glob("*.safetensors")
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size * 3 // 4)
    return shard


def edited_fisher(inputs: Inputs, tensors_edit=None, metadata_edit=None) -> Path:
    """A copy of the fixture's fisher.safetensors with its tensors and/or its run metadata edited."""
    with safe_open(inputs.fisher, "pt") as f:
        metadata, tensors = f.metadata(), {name: f.get_tensor(name) for name in f.keys()}
    run = json.loads(metadata[METADATA_KEY])
    (tensors_edit or (lambda t: None))(tensors)
    (metadata_edit or (lambda m: None))(run)
    path = inputs.tmp / "edited-fisher.safetensors"
    save_file(tensors, path, metadata={**metadata, METADATA_KEY: json.dumps(run)})
    return path


def first_tensor(tensors: dict) -> str:
    return sorted(tensors)[0]


# ---- heal cases: (recipe overrides, substrings the error must contain) --------------------------------------------


def truncated_stack_shard(inputs):
    shard = truncate(copy_of(inputs.stack, inputs, "stack"))
    return {"stack": str(shard.parent)}, [f"shard {shard.resolve()}", "is truncated", "Re-download"]


def stack_json_layer_count(inputs):
    stack = copy_of(inputs.stack, inputs, "stack")
    manifest = json.loads((stack / "stack.json").read_text())
    manifest["slots"], manifest["num_hidden_layers"] = manifest["slots"][:-1], 65
    (stack / "stack.json").write_text(json.dumps(manifest))
    return {"stack": str(stack)}, [f"{stack / 'stack.json'} records 65 layers",
                                   f"{stack / 'config.json'} has num_hidden_layers 66"]


def stack_json_layer_type(inputs):
    stack = copy_of(inputs.stack, inputs, "stack")
    manifest = json.loads((stack / "stack.json").read_text())
    manifest["slots"][4]["attention_type"] = "full_attention"  # slot 4 is source layer 4, sliding
    (stack / "stack.json").write_text(json.dumps(manifest))
    return {"stack": str(stack)}, [f"{stack / 'stack.json'}: slot 4 is full_attention",
                                   "layer_types[4] = sliding_attention"]


def fisher_with_nan(inputs):
    def poison(tensors):
        tensors[first_tensor(tensors)][0, 0] = float("nan")

    path = edited_fisher(inputs, tensors_edit=poison)
    return {"fisher": str(path)}, [f"Fisher file {path}: tensor '{LAYERS}0.", "has NaN or infinite entries"]


def fisher_with_negative_entries(inputs):
    def negate(tensors):
        tensors[first_tensor(tensors)][1, 2] = -1e-3

    path = edited_fisher(inputs, tensors_edit=negate)
    return {"fisher": str(path)}, [f"Fisher file {path}: tensor '{LAYERS}0.", "has negative entries"]


def fisher_of_another_source(inputs):
    """Same names and shapes (the tiny E4B's), but computed on another checkpoint: gemma-4-E4B for E4B-it."""
    def other_source(run):
        run["model"], run["model_shard_sha256"] = "google/gemma-4-E4B", {"model.safetensors": "0" * 64}

    path = edited_fisher(inputs, metadata_edit=other_source)
    return {"fisher": str(path)}, [f"{path} was computed on 'google/gemma-4-E4B'",
                                   f"{inputs.stack / 'stack.json'} was stacked from",
                                   "shard model.safetensors", "fisher_allow_other_source: true"]


def fisher_of_another_format_version(inputs):
    path = edited_fisher(inputs, metadata_edit=lambda run: run.update(format_version=2))
    return {"fisher": str(path)}, [f"Fisher file {path} has format_version 2; this code reads 1"]


def empty_dataset(inputs):
    empty = inputs.tmp / "empty.jsonl"
    empty.write_text("")
    return {"datasets": [{"path": str(empty)}]}, [f"data file '{empty}' is empty"]


def dataset_of_blank_lines(inputs):
    blank = inputs.tmp / "blank.jsonl"
    blank.write_text("\n\n")
    return {"datasets": [{"path": str(blank)}]}, [f"could not load dataset '{blank}' (split 'train')", "no data"]


def tokenizer_without_chat_template(inputs):
    stack = copy_of(inputs.stack, inputs, "stack")
    (stack / "chat_template.jinja").unlink()
    return {"stack": str(stack)}, [f"dataset '{inputs.chat}' is conversational but the tokenizer of '{stack}' "
                                   "has no chat template"]


def unknown_dataset_key(inputs):
    overrides = {"datasets": [{"path": str(inputs.chat), "splitt": "train"}]}
    return overrides, [f"{inputs.tmp / 'r.yaml'}: datasets[0]: unknown key(s) ['splitt']"]


def mass_share_out_of_range(inputs):
    return {"mass_share": 1.5}, ["protection mass_share must be in (0, 1), got 1.5"]


def max_fraction_out_of_range(inputs):
    return {"max_fraction": 0.0}, ["protection max_fraction must be in (0, 1), got 0.0"]


def num_examples_zero(inputs):
    return {"num_examples": 0}, ["num_examples must be >= 1"]


def protect_with_targets_and_no_manifest(inputs):
    stack = copy_of(inputs.stack, inputs, "stack")
    (stack / "stack.json").unlink()
    overrides = {"stack": str(stack), "targets": [f"{LAYERS}18.mlp.up_proj"]}
    return overrides, [f"{stack / 'stack.json'} not found", "with protect: false"]


HEAL_CASES = [truncated_stack_shard, stack_json_layer_count, stack_json_layer_type, fisher_with_nan,
              fisher_with_negative_entries, fisher_of_another_source, fisher_of_another_format_version, empty_dataset,
              dataset_of_blank_lines, tokenizer_without_chat_template, unknown_dataset_key, mass_share_out_of_range,
              max_fraction_out_of_range, num_examples_zero, protect_with_targets_and_no_manifest]


@pytest.fixture
def inputs(tmp_path, tiny_e6b, tiny_e4b, e4b_fisher):
    chat = write_jsonl(tmp_path / "chat.jsonl", rows_for("messages", 4))
    return Inputs(tmp_path, tiny_e6b, tiny_e4b, e4b_fisher, chat)


@pytest.mark.parametrize("case", HEAL_CASES, ids=lambda case: case.__name__)
def test_heal_rejects(case, inputs, no_model_load, caplog):
    overrides, expected = case(inputs)
    out = inputs.tmp / "out"
    stack, fisher = overrides.pop("stack", inputs.stack), overrides.pop("fisher", inputs.fisher)
    recipe = heal_recipe(inputs.tmp / "r.yaml", stack, fisher, inputs.chat, out, **overrides)
    assert heal_main([str(recipe)]) == 2
    for text in expected:
        assert text in caplog.text
    assert not out.exists()


# ---- fisher cases: (config overrides, substrings) ------------------------------------------------------------------


def fisher_truncated_model_shard(inputs):
    shard = truncate(copy_of(inputs.source, inputs, "model"))
    return {"model": str(shard.parent)}, [f"shard {shard}", "is truncated", "Re-download"]


def fisher_empty_dataset(inputs):
    return empty_dataset(inputs)


def fisher_dataset_of_blank_lines(inputs):
    return dataset_of_blank_lines(inputs)


@pytest.mark.parametrize("case", [fisher_truncated_model_shard, fisher_empty_dataset, fisher_dataset_of_blank_lines],
                         ids=lambda case: case.__name__)
def test_fisher_rejects(case, inputs, no_model_load, caplog):
    overrides, expected = case(inputs)
    out = inputs.tmp / "fisher-out"
    config = {"model": str(inputs.source), "datasets": [{"path": str(inputs.chat)}], "out": str(out),
              "dtype": "float32", "max_length": 64, **overrides}
    (inputs.tmp / "f.yaml").write_text(yaml.safe_dump(config))
    assert fisher_main([str(inputs.tmp / "f.yaml")]) == 2
    for text in expected:
        assert text in caplog.text
    assert not out.exists()


def test_the_tripwire_fires_when_a_model_loads(inputs, no_model_load):
    """The cases above mean something only if a model load would fail them: a good recipe reaches the load."""
    recipe = heal_recipe(inputs.tmp / "r.yaml", inputs.stack, inputs.fisher, inputs.chat, inputs.tmp / "out")
    with pytest.raises(AssertionError, match="a model was loaded from"):
        heal_main([str(recipe)])


def test_an_all_nan_free_fisher_passes_the_value_check(inputs):
    from fisher.file import load_fisher

    tensors, metadata = load_fisher(inputs.fisher)
    assert tensors and metadata["format_version"] == 1 and all(torch.isfinite(t).all() for t in tensors.values())
