"""`python -m stack.verify` accepts a correct stack and names the tensor of a corrupted one."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from core.checkpoint import open_source
from core.files import read_safetensors_header
from stack.verify import VerifyError, main, verify_tensors

LAYERS = "model.language_model.layers."
PLE_TABLE = "model.language_model.embed_tokens_per_layer.weight"


def test_a_correct_stack_verifies(tiny_e4b, tiny_e6b):
    assert verify_tensors(tiny_e6b, open_source(str(tiny_e4b))) == 1135
    assert main([str(tiny_e6b), "--source", str(tiny_e4b)]) == 0


def flip_byte(directory, name, byte_offset=0):
    shard = next(directory.glob("*.safetensors"))
    info = read_safetensors_header(shard)[name]
    with open(shard, "r+b") as f:
        f.seek(info.offset + byte_offset)
        value = f.read(1)[0]
        f.seek(info.offset + byte_offset)
        f.write(bytes([value ^ 0x01]))


@pytest.mark.parametrize(
    "name, byte_offset, message",
    [
        (f"{LAYERS}20.mlp.down_proj.weight", 6,
         f"layers.20.mlp.down_proj.weight vs source {LAYERS}12.mlp.down_proj.weight"),
        (f"{LAYERS}33.self_attn.k_proj.weight", 0,
         f"layers.33.self_attn.k_proj.weight vs source {LAYERS}22.self_attn.k_proj.weight"),
        (f"{LAYERS}7.layer_scalar", 0, "layers.7.layer_scalar vs source"),
        # PLE table row 0 holds 66 blocks of 8 bf16 values (16 bytes each): byte 16*20 is in slot 20's block.
        (PLE_TABLE, 16 * 20, "embed_tokens_per_layer.weight block of slot 20"),
    ],
)
def test_one_flipped_byte_is_found_and_named(tiny_e4b, tiny_e6b, tmp_path, name, byte_offset, message):
    corrupted = tmp_path / "corrupted"
    shutil.copytree(tiny_e6b, corrupted)
    flip_byte(corrupted, name, byte_offset)
    with pytest.raises(VerifyError) as error:
        verify_tensors(corrupted, open_source(str(tiny_e4b)))
    assert message in str(error.value)


def test_exit_status_one_for_a_differing_tensor_two_for_bad_input(tiny_e4b, tiny_e6b, tmp_path, caplog):
    corrupted = tmp_path / "corrupted"
    shutil.copytree(tiny_e6b, corrupted)
    flip_byte(corrupted, "model.language_model.layers.7.layer_scalar")
    assert main([str(corrupted), "--source", str(tiny_e4b)]) == 1  # the check ran, and the stack differs
    assert main([str(tmp_path / "no-such-stack"), "--source", str(tiny_e4b)]) == 2  # a user error, as in every CLI
    assert f"{tmp_path / 'no-such-stack' / 'stack.json'} not found" in caplog.text
    assert main([str(tiny_e6b), "--source", str(tmp_path / "no-such-model")]) == 2


def test_a_stack_json_that_does_not_describe_the_checkpoint_is_bad_input(tiny_e4b, tiny_e6b, tmp_path, caplog):
    # A hand-edited stack.json would map slots onto the wrong source layers: refused as input (2) with the file
    # named, not reported as a stack that differs from its source (1).
    stale = tmp_path / "stale"
    shutil.copytree(tiny_e6b, stale)
    manifest = json.loads((stale / "stack.json").read_text())
    manifest["slots"] = manifest["slots"][:3]
    (stale / "stack.json").write_text(json.dumps(manifest))
    assert main([str(stale), "--source", str(tiny_e4b)]) == 2
    assert f"{stale / 'stack.json'} records {manifest['num_hidden_layers']} layers and 3 slots" in caplog.text


def test_a_source_without_a_mapped_tensor_is_named_not_a_crash(tiny_e4b, tiny_e6b, tmp_path, caplog):
    source = tmp_path / "source"
    shutil.copytree(tiny_e4b, source)
    shard = next(source.glob("*.safetensors"))
    tensors = load_file(shard)
    del tensors[PLE_TABLE]  # a block tensor: its slot blocks are compared against this one
    save_file(tensors, shard)
    assert main([str(tiny_e6b), "--source", str(source)]) == 1
    assert f"mapped source tensor {PLE_TABLE!r} is not in" in caplog.text
