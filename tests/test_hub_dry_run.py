"""`python -m stack ... --dry-run` on a hub id reads the shard headers through the hub API and downloads
config.json alone; a real run still downloads the weights.

Nothing reaches the hub: StubHub stands in for the three huggingface_hub calls core.checkpoint makes. It
serves a tiny checkpoint's real config.json and its real headers, parsed by huggingface_hub's own
safetensors parser into the SafetensorsRepoMetadata the hub API returns, and records every call.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import get_local_safetensors_metadata, save_torch_state_dict
from huggingface_hub.errors import NotASafetensorsRepoError, OfflineModeIsEnabled
from safetensors.torch import load_file

from core.checkpoint import SourceError, open_source, open_source_headers
from stack.__main__ import main as stack_main
from stack.plan import build_plan
from stack.recipe import load_recipe
from stack.writer import write_stack

from .conftest import SEED_RECIPE

REPO_ID = "some-org/tiny-e4b"


class StubHub:
    """The hub serving `folder` as REPO_ID. config.json comes from `config_dir` (a snapshot folder holding only
    config.json, as the HF cache has after hf_hub_download; default: `folder` itself, as if fully cached).
    `headers_error`, when set, is what get_safetensors_metadata raises. snapshot_download fails loudly unless
    `weights` is True, so a dry run that downloads the weights cannot pass."""

    def __init__(self, monkeypatch, folder: Path, config_dir: Path | None = None, weights: bool = False,
                 headers_error: Exception | None = None):
        self.folder, self.config_dir = folder, config_dir or folder
        self.weights, self.headers_error = weights, headers_error
        self.calls: list[tuple[str, str, dict]] = []  # (function, file name or "", keyword arguments)
        monkeypatch.setattr(huggingface_hub, "hf_hub_download", self.hf_hub_download)
        monkeypatch.setattr(huggingface_hub, "snapshot_download", self.snapshot_download)
        monkeypatch.setattr(huggingface_hub.HfApi, "get_safetensors_metadata",
                            lambda api, repo_id, **kwargs: self.get_safetensors_metadata(repo_id, **kwargs))

    def hf_hub_download(self, repo_id, filename, **kwargs):
        assert repo_id == REPO_ID
        self.calls.append(("hf_hub_download", filename, kwargs))
        return str(self.config_dir / filename)

    def snapshot_download(self, repo_id, **kwargs):
        assert repo_id == REPO_ID
        self.calls.append(("snapshot_download", "", kwargs))
        return str(self.folder) if self.weights else weights_downloaded()

    def get_safetensors_metadata(self, repo_id, **kwargs):
        assert repo_id == REPO_ID
        self.calls.append(("get_safetensors_metadata", "", kwargs))
        if self.headers_error is not None:
            raise self.headers_error
        return get_local_safetensors_metadata(self.folder)

    def called(self, function: str) -> list[tuple[str, str, dict]]:
        return [call for call in self.calls if call[0] == function]


def weights_downloaded(*args, **kwargs):
    raise AssertionError("weights downloaded")


def config_only(folder: Path, tmp_path: Path) -> Path:
    """A snapshot folder with config.json alone: no shard beside it, so reading any tensor data would fail."""
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    shutil.copyfile(folder / "config.json", snapshot / "config.json")
    return snapshot


def dry_run(source: str | Path, capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = stack_main([str(SEED_RECIPE), "--source", str(source), "--dry-run"])
    return code, capsys.readouterr().out


@pytest.fixture(scope="module")
def two_shard_e4b(tiny_e4b, tmp_path_factory) -> Path:
    """The tiny E4B re-saved as an index and two shards (same tensors, same config)."""
    folder = tmp_path_factory.mktemp("tiny-e4b-sharded")
    shard_bytes = (tiny_e4b / "model.safetensors").stat().st_size // 2 + 1
    save_torch_state_dict(load_file(tiny_e4b / "model.safetensors"), folder, max_shard_size=shard_bytes)
    shutil.copyfile(tiny_e4b / "config.json", folder / "config.json")
    assert len(set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values())) == 2
    return folder


def test_hub_dry_run_prints_the_local_plan_and_downloads_config_only(tiny_e4b, tmp_path, monkeypatch, capsys):
    local_code, local_plan = dry_run(tiny_e4b, capsys)
    hub = StubHub(monkeypatch, tiny_e4b, config_dir=config_only(tiny_e4b, tmp_path))
    code, plan = dry_run(REPO_ID, capsys)
    assert (local_code, code) == (0, 0)
    assert REPO_ID in plan and plan.replace(REPO_ID, str(tiny_e4b)) == local_plan
    assert not hub.called("snapshot_download")
    assert {filename for _, filename, _ in hub.called("hf_hub_download")} == {"config.json"}
    assert len(hub.called("get_safetensors_metadata")) == 1


def test_hub_dry_run_reads_every_shard_header(tiny_e4b, two_shard_e4b, tmp_path, monkeypatch, capsys):
    _, single_file_plan = dry_run(tiny_e4b, capsys)
    hub = StubHub(monkeypatch, two_shard_e4b, config_dir=config_only(two_shard_e4b, tmp_path))
    code, plan = dry_run(REPO_ID, capsys)
    assert code == 0 and plan.replace(REPO_ID, str(tiny_e4b)) == single_file_plan
    remote, local = open_source_headers(REPO_ID), open_source(str(two_shard_e4b))
    assert remote.remote and not local.remote
    assert [shard.name for shard in remote.shards] == [shard.name for shard in local.shards]
    assert {name: (t.dtype, t.shape, t.path.name) for name, t in remote.tensors.items()} == \
        {name: (t.dtype, t.shape, t.path.name) for name, t in local.tensors.items()}
    assert not hub.called("snapshot_download")


def test_a_tensor_in_two_shard_headers_is_an_error(two_shard_e4b, tmp_path, monkeypatch):
    metadata = get_local_safetensors_metadata(two_shard_e4b)
    first, second = dict.fromkeys(metadata.weight_map.values())
    name, info = next(iter(metadata.files_metadata[first].tensors.items()))
    metadata.files_metadata[second].tensors[name] = info
    hub = StubHub(monkeypatch, two_shard_e4b, config_dir=config_only(two_shard_e4b, tmp_path))
    hub.get_safetensors_metadata = lambda repo_id, **kwargs: metadata
    with pytest.raises(SourceError, match=re.escape(f"tensor {name!r} of model {REPO_ID!r} appears in both {first} "
                                                    f"and {second}")):
        open_source_headers(REPO_ID)


def test_a_real_run_on_a_hub_id_downloads_the_weights(tiny_e4b, tmp_path, monkeypatch):
    hub = StubHub(monkeypatch, tiny_e4b, weights=True, headers_error=AssertionError("headers read remotely"))
    out = tmp_path / "out"
    assert stack_main([str(SEED_RECIPE), "--source", REPO_ID, "--out", str(out)]) == 0
    assert (out / "model.safetensors.index.json").is_file()
    [(_, _, kwargs)] = hub.called("snapshot_download")
    assert "*.safetensors" in kwargs["allow_patterns"]
    assert not hub.called("get_safetensors_metadata")


def test_a_remote_source_is_never_written(tiny_e4b, tmp_path, monkeypatch):
    StubHub(monkeypatch, tiny_e4b, config_dir=config_only(tiny_e4b, tmp_path))
    source = open_source_headers(REPO_ID)
    plan = build_plan(load_recipe(SEED_RECIPE, REPO_ID), source)
    out = tmp_path / "out"
    with pytest.raises(SourceError, match=f"model '{REPO_ID}' was read remotely .* run without --dry-run"):
        write_stack(plan, source, out)
    assert not out.exists()


def test_hub_dry_run_offline_reads_cached_shards(tiny_e4b, monkeypatch, capsys):
    _, local_plan = dry_run(tiny_e4b, capsys)
    hub = StubHub(monkeypatch, tiny_e4b, headers_error=OfflineModeIsEnabled("HF_HUB_OFFLINE is set"))
    code, plan = dry_run(REPO_ID, capsys)
    assert code == 0 and plan.replace(REPO_ID, str(tiny_e4b)) == local_plan
    assert not open_source_headers(REPO_ID).remote  # headers read from the cached shards
    assert not hub.called("snapshot_download")


@pytest.mark.parametrize("error, message", [
    (NotASafetensorsRepoError("no safetensors"),
     f"model '{REPO_ID}' has no model.safetensors or model.safetensors.index.json on the hub; the stacker reads "
     "safetensors only"),
    (OfflineModeIsEnabled("HF_HUB_OFFLINE is set"),
     f"model '{REPO_ID}': its safetensors headers could not be read from the hub (HF_HUB_OFFLINE is set) and its "
     f"weights are not in the local HF cache. Download it on a machine with access (`hf download {REPO_ID}"),
], ids=["not-safetensors", "offline-not-cached"])
def test_hub_dry_run_without_headers_says_what_to_do(tiny_e4b, tmp_path, monkeypatch, caplog, capsys, error, message):
    hub = StubHub(monkeypatch, tiny_e4b, config_dir=config_only(tiny_e4b, tmp_path), headers_error=error)
    assert dry_run(REPO_ID, capsys) == (2, "")
    assert message in caplog.text
    assert not hub.called("snapshot_download")


def test_hub_dry_run_on_an_uncached_model_offline_says_what_to_do(tmp_path, monkeypatch, caplog, capsys):
    """The real huggingface_hub, offline: config.json is neither downloadable nor cached."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot_calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *args, **kwargs: snapshot_calls.append(args))
    assert dry_run("nobody/not-cached-model", capsys) == (2, "")
    assert not snapshot_calls
    assert "model 'nobody/not-cached-model' could not be fetched from the hub" in caplog.text
    assert "is not in the local HF cache" in caplog.text and "--source DIR" in caplog.text
