"""The CLI on bad input, on existing outputs and on failures: clear errors, nothing half-written."""

from __future__ import annotations

import errno
import json
import shutil

import pytest
import torch

import stack.writer as writer
from stack.writer import INDEX_NAME

from .checkpoints import assert_loads_clean, load_tensors
from .conftest import SEED_RECIPE, run_stack, write_recipe

SEED_RANGES = [(0, 18), (10, 26), (18, 34), (26, 42)]


def assert_nothing_written(parent, out):
    assert not out.exists()
    assert not [p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]


@pytest.mark.parametrize(
    "ranges, message",
    [
        ([(0, 43)], "slices[0]: layer_range [0, 43) reaches layer 42, but model"),
        ([(0, 18), (10, 50)], "slices[1]: layer_range [10, 50) reaches layer 49"),
        ([(3, 3)], "slices[0]: layer_range [3, 3) is empty"),
        ([(0, 41)], "slot 40 (the last layer) comes from source layer 40, a sliding_attention layer"),
        ([(0, 41)], "its stop must be one of [6, 12, 18, 24, 30, 36, 42]"),
        ([(24, 42)], "slot 0 (source layer 24, sliding_attention) is in the KV-shared tail (slots 0..17)"),
        ([(0, 5), (24, 42)], "slot 10 (source layer 29, full_attention) is in the KV-shared tail (slots 5..22)"),
    ],
)
def test_bad_topologies_exit_non_zero_name_the_problem_and_write_nothing(tiny_e4b, tmp_path, caplog, ranges, message):
    out = tmp_path / "out"
    assert run_stack(write_recipe(tmp_path / "r.yaml", ranges), tiny_e4b, out) == 2
    assert message in caplog.text
    assert_nothing_written(tmp_path, out)


def test_missing_source(tmp_path, caplog):
    out = tmp_path / "out"
    assert run_stack(SEED_RECIPE, tmp_path / "no-such-model", out) == 2
    assert "does not exist; pass an existing HF model folder with --source" in caplog.text
    assert_nothing_written(tmp_path, out)


def test_unreachable_hub_model_says_how_to_pass_a_local_source(tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    assert stack_cli_with_model("nobody/not-cached-model", out) == 2
    assert "is not in the local HF cache" in caplog.text and "make raw SOURCE=DIR" in caplog.text
    assert_nothing_written(tmp_path, out)


def stack_cli_with_model(model, out):
    from stack.__main__ import main

    return main([str(SEED_RECIPE), "--source", model, "--out", str(out)])


def test_unsupported_architecture(tiny_llama, tmp_path, caplog):
    source = tmp_path / "gpt2ish"
    shutil.copytree(tiny_llama, source)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps(dict(config, model_type="gpt2")))
    out = tmp_path / "out"
    assert run_stack(write_recipe(tmp_path / "r.yaml", [(0, 4)]), source, out) == 2
    assert "has model_type 'gpt2', which the stacker does not support" in caplog.text
    assert "add a row to stack/architectures.py" in caplog.text
    assert_nothing_written(tmp_path, out)


def test_existing_output_is_refused_without_force_and_replaced_with_it(tiny_e4b, tmp_path, caplog):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    assert run_stack(SEED_RECIPE, tiny_e4b, out) == 2
    assert f"output {out} already exists and was not written by `python -m stack` (it holds keep.txt)" in caplog.text
    assert "pass --force to replace it" in caplog.text
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    assert run_stack(SEED_RECIPE, tiny_e4b, out, "--force") == 0
    assert not (out / "keep.txt").exists() and (out / "stack.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]

    # The stacker's own earlier output is replaced without --force: a rerun.
    (out / "stack.json").write_text("{}")
    assert run_stack(SEED_RECIPE, tiny_e4b, out) == 0
    assert json.loads((out / "stack.json").read_text()) != {}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_output_inside_the_source_is_refused(tiny_e4b, caplog):
    assert run_stack(SEED_RECIPE, tiny_e4b, tiny_e4b / "e6b", "--force") == 2
    assert "overlaps the source folder" in caplog.text


def test_a_failure_mid_write_keeps_the_previous_output_and_leaves_no_partial(tiny_e4b, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "previous.txt").write_text("the last good stack")

    def disk_full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer, "_gather_blocks", disk_full)
    with pytest.raises(OSError, match="No space left"):
        run_stack(SEED_RECIPE, tiny_e4b, out, "--force")
    assert [p.name for p in out.iterdir()] == ["previous.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_small_max_shard_size_gives_several_shards_and_an_index(tiny_e4b, tiny_e6b, tmp_path):
    out = tmp_path / "sharded"
    assert run_stack(write_recipe(tmp_path / "r.yaml", SEED_RANGES, max_shard_size="1MB"), tiny_e4b, out) == 0
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) >= 5 and shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / INDEX_NAME).read_text())
    tensors = load_tensors(out)
    assert set(index["weight_map"]) == set(tensors) and set(index["weight_map"].values()) == {s.name for s in shards}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert all(s.stat().st_size < 1_000_000 + 100_000 or len(load_tensors_of(s)) == 1 for s in shards)
    single = load_tensors(tiny_e6b)
    assert set(single) == set(tensors) and all(torch.equal(single[n], tensors[n]) for n in single)
    assert_loads_clean(out)


def load_tensors_of(shard):
    from safetensors.torch import load_file

    return load_file(shard)


@pytest.mark.parametrize("chunk_bytes", [672, 2100], ids=["one-row-per-chunk", "uneven-chunks"])
def test_ple_gather_in_many_row_chunks_is_byte_identical(tiny_e4b, tiny_e6b, tmp_path, monkeypatch, chunk_bytes):
    """The tiny PLE table fits one chunk by default; force the row-block path used for the 8.9 GB table.
    A source row is 42 blocks × 8 values × 2 bytes = 672 bytes."""
    monkeypatch.setattr(writer, "CHUNK_BYTES", chunk_bytes)
    out = tmp_path / "chunked"
    assert run_stack(SEED_RECIPE, tiny_e4b, out) == 0
    name = "model.language_model.embed_tokens_per_layer.weight"
    assert torch.equal(load_tensors(out)[name], load_tensors(tiny_e6b)[name])


def test_copy_without_copy_file_range_is_byte_identical(tiny_e4b, tiny_e6b, tmp_path, monkeypatch):
    def unsupported(*_args, **_kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(writer.os, "copy_file_range", unsupported)
    out = tmp_path / "buffered"
    assert run_stack(SEED_RECIPE, tiny_e4b, out) == 0
    for shard in out.glob("*.safetensors"):
        assert shard.read_bytes() == (tiny_e6b / shard.name).read_bytes()
