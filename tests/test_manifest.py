"""stack.json read into the typed StackManifest: the file's keys exactly, and the one K/V rule, the architecture
row's."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from core.checkpoint import open_source
from stack.architectures import architecture_named
from stack.manifest import MANIFEST_NAME, ManifestError, StackManifest, load_manifest

GRAFTED = {32: 22, 33: 22}  # tiny E6B slots whose source layers (24, 25) were KV consumers; k/v from L22
KV_TENSORS = ("self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.k_norm.weight")


def test_the_typed_manifest_holds_exactly_what_the_file_holds(tiny_e6b):
    manifest = load_manifest(tiny_e6b)
    assert isinstance(manifest, StackManifest) and manifest.arch.name == "gemma4"
    # asdict gives tuples where JSON has lists: one JSON round trip compares them as the file stores them.
    assert json.loads(json.dumps(asdict(manifest))) == json.loads((tiny_e6b / MANIFEST_NAME).read_text())


@pytest.mark.parametrize("edit, message", [
    (lambda raw: raw.pop("recipe"), "stack.json has no key 'recipe' (a StackManifest has exactly"),
    (lambda raw: raw.update(grafts=[]), "stack.json has an unknown key 'grafts' (a StackManifest"),
    (lambda raw: raw["source"].pop("shard_sha256"), "stack.json: source has no key 'shard_sha256' (a SourceRecord"),
    (lambda raw: raw["slots"][3].pop("kv_role"), "stack.json: slots[3] has no key 'kv_role' (a Slot"),
    (lambda raw: raw["seams"][1].update(kind="rewind"), "stack.json: seams[1] has an unknown key 'kind' (a Seam"),
    (lambda raw: raw.update(slots={}), "stack.json: slots must be a JSON list, got dict"),
])
def test_a_missing_or_unknown_key_names_the_key_and_the_file(tiny_e6b, tmp_path, edit, message):
    raw = json.loads((tiny_e6b / MANIFEST_NAME).read_text())
    edit(raw)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(raw))
    with pytest.raises(ManifestError) as error:
        load_manifest(tmp_path)
    assert f"{tmp_path}/{message}" in str(error.value) and "stack again" in str(error.value)


def test_grafted_kv_tensors_are_the_architecture_rows_kv_tensors_of_grafted_slots(tiny_e6b, tiny_e4b):
    """The one rule protection, LoRA targets and verify share: k_proj, v_proj and k_norm of a grafted slot come
    from its donor layer, and every tensor of every slot maps to a tensor that exists in the source."""
    manifest, source = load_manifest(tiny_e6b), open_source(str(tiny_e4b))
    prefix, grafted, mapped = manifest.layer_prefix, set(), {}
    for name in open_source(str(tiny_e6b)).tensors:
        if name.startswith(prefix):
            index, suffix = name[len(prefix):].split(".", 1)
            slot = manifest.slots[int(index)]
            if manifest.is_grafted_kv(slot, suffix):
                grafted.add((slot.index, suffix))
            mapped[name] = f"{prefix}{manifest.source_layer_of(slot, suffix)}.{suffix}"
    assert grafted == {(slot, suffix) for slot in GRAFTED for suffix in KV_TENSORS}
    assert {mapped[f"{prefix}{slot}.{suffix}"] for slot, suffix in grafted} == {f"{prefix}22.{s}" for s in KV_TENSORS}
    assert sorted(set(mapped.values()) - set(source.tensors)) == []


def test_only_families_with_kv_sharing_have_kv_tensors():
    assert all(architecture_named("gemma4").is_kv_tensor(suffix) for suffix in KV_TENSORS)
    assert not any(architecture_named("llama-style").is_kv_tensor(suffix) for suffix in KV_TENSORS)
    assert not architecture_named("gemma4").is_kv_tensor("self_attn.q_norm.weight")


def test_slots_near_seams_are_the_slots_within_width_of_each_seam(tiny_e6b):
    """The seed recipe's seams are at slots 18, 34 and 50: width w takes slots s-w .. s+w-1 of each."""
    manifest = load_manifest(tiny_e6b)
    assert [seam.slot for seam in manifest.seams] == [18, 34, 50]
    assert [slot.index for slot in manifest.slots_near_seams(1)] == [17, 18, 33, 34, 49, 50]
    assert [slot.index for slot in manifest.slots_near_seams(2)] == [16, 17, 18, 19, 32, 33, 34, 35, 48, 49, 50, 51]
    assert len(manifest.slots_near_seams(40)) == len(manifest.slots)  # clipped to the stack's slots
