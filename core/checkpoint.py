"""A model checkpoint folder, as every stage reads it: resolved from a local folder or the HF hub cache, its config
and its tensors' safetensors headers read, no tensor data.

On a hub id, open_source downloads the model (or takes it from the local HF cache); open_source_headers, for a
dry run, reads the headers through the hub API and downloads config.json alone.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.files import TensorInfo, read_safetensors_header

if TYPE_CHECKING:
    from huggingface_hub import SafetensorsRepoMetadata

logger = logging.getLogger(__name__)

# Files fetched from the hub: config, weights, tokenizer, chat template and processor files.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt", "LICENSE*"]


class SourceError(ValueError):
    pass


@dataclass(frozen=True)
class SourceCheckpoint:
    model: str  # as the user named it: hub id or path
    directory: Path
    config: dict[str, Any]  # config.json, as raw JSON
    tensors: dict[str, TensorInfo]
    shards: tuple[Path, ...]
    # Headers read through the hub API by open_source_headers (a dry run): the shards are not on disk.
    remote: bool = False


def open_source(model: str) -> SourceCheckpoint:
    """The checkpoint with its shards on disk: a local folder, or a hub id downloaded whole (or cached)."""
    return _open_local(model, resolve_source(model))


def open_source_headers(model: str) -> SourceCheckpoint:
    """The checkpoint's config and tensor headers, for a dry run: a hub id's headers are read through the hub
    API, so only config.json is downloaded, never the weights. A remote result can be planned, never written."""
    if Path(model).expanduser().is_dir():
        return open_source(model)
    _check_hub_id(model)
    return _open_remote(model)


def _open_local(model: str, directory: Path) -> SourceCheckpoint:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise SourceError(f"source {model!r} ({directory}) has no config.json; point --source at a HF model folder")
    shards = _find_shards(directory, model)
    tensors: dict[str, TensorInfo] = {}
    for shard in shards:
        for name, info in read_safetensors_header(shard).items():
            if name in tensors:
                raise SourceError(f"tensor {name!r} of model {model!r} appears in both {tensors[name].path.name} "
                                  f"and {shard.name}")
            tensors[name] = info
    return SourceCheckpoint(model, directory, json.loads(config_path.read_text()), tensors, tuple(shards))


def check_data_present(source: SourceCheckpoint) -> None:
    """Every tensor's bytes lie inside its shard (a stat per shard; no data is read)."""
    if source.remote:
        raise SourceError(
            f"model {source.model!r} was read remotely (headers only, for --dry-run), so its weights are not on disk; "
            "run without --dry-run to download them, or pass a local folder with --source"
        )
    for shard in source.shards:
        size = shard.stat().st_size
        for info in source.tensors.values():
            if info.path == shard and info.offset + info.nbytes > size:
                raise SourceError(
                    f"shard {shard} of model {source.model!r} is truncated: tensor {info.name!r} ends at byte "
                    f"{info.offset + info.nbytes}, the file has {size}. Re-download the model"
                )


def resolve_source(model: str) -> Path:
    """A local folder as-is; otherwise a hub id, downloaded or taken from the local HF cache."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    _check_hub_id(model)
    return _from_hub(model)


def _check_hub_id(model: str) -> None:
    """A name that is not an existing folder must look like a hub id ("org/name" or "name")."""
    path = Path(model).expanduser()
    if path.is_absolute() or model.startswith((".", "~")) or model.count("/") > 1:
        raise SourceError(f"source folder {model!r} does not exist; pass an existing HF model folder with --source")


def _from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    def fetch(**kwargs) -> Path:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, **kwargs))

    return _online_then_cache(repo_id, fetch)


def _hub_config(repo_id: str) -> Path:
    """config.json of a hub model, downloaded or taken from the local HF cache (a few KB)."""
    from huggingface_hub import hf_hub_download

    return _online_then_cache(repo_id, lambda **kw: Path(hf_hub_download(repo_id, "config.json", **kw)))


def _online_then_cache(repo_id: str, fetch: Callable[..., Path]) -> Path:
    try:
        return fetch()
    except Exception as online_error:  # offline, no such repo, gated, network down: all fall back to the cache
        logger.info("hub download of %s failed (%s); trying the local HF cache", repo_id, online_error)
        try:
            return fetch(local_files_only=True)
        except Exception:
            raise SourceError(
                f"model {repo_id!r} could not be fetched from the hub ({str(online_error).splitlines()[0]}) "
                f"and is not in the local HF cache. {_download_hint(repo_id)}"
            ) from None


def _download_hint(repo_id: str) -> str:
    return (f"Download it on a machine with access (`hf download {repo_id} --local-dir DIR`), then pass the folder: "
            "`make raw SOURCE=DIR` / `python -m stack RECIPE --source DIR`, or `make fisher MODEL=DIR`.")


def _open_remote(repo_id: str) -> SourceCheckpoint:
    """config.json downloaded, every shard's header read through the hub API (HTTP range requests of the
    header bytes only). If the hub cannot be reached but the weights are in the local HF cache, their headers
    are read there."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import NotASafetensorsRepoError

    config_path = _hub_config(repo_id)
    directory = config_path.parent  # the HF cache's snapshot folder; the shards would sit beside config.json
    try:
        metadata = HfApi().get_safetensors_metadata(repo_id)
    except NotASafetensorsRepoError:
        raise SourceError(f"model {repo_id!r} has no model.safetensors or model.safetensors.index.json on the hub; "
                          "the stacker reads safetensors only (re-save the model with save_pretrained)") from None
    except Exception as online_error:  # offline, gated, network down
        if (directory / "model.safetensors.index.json").is_file() or (directory / "model.safetensors").is_file():
            logger.info("hub headers of %s unreadable (%s); reading the cached shards", repo_id, online_error)
            return _open_local(repo_id, directory)
        raise SourceError(
            f"model {repo_id!r}: its safetensors headers could not be read from the hub "
            f"({str(online_error).splitlines()[0]}) and its weights are not in the local HF cache. "
            f"{_download_hint(repo_id)}"
        ) from None
    tensors = _remote_tensors(repo_id, directory, metadata)
    shards = tuple(directory / name for name in dict.fromkeys(metadata.weight_map.values()))
    return SourceCheckpoint(repo_id, directory, json.loads(config_path.read_text()), tensors, shards, remote=True)


def _remote_tensors(repo_id: str, directory: Path, metadata: SafetensorsRepoMetadata) -> dict[str, TensorInfo]:
    """TensorInfo per tensor of a huggingface_hub SafetensorsRepoMetadata, shard by shard as the index lists them."""
    tensors: dict[str, TensorInfo] = {}
    for shard in dict.fromkeys(metadata.weight_map.values()):
        for name, meta in metadata.files_metadata[shard].tensors.items():
            if name in tensors:
                raise SourceError(f"tensor {name!r} of model {repo_id!r} appears in both {tensors[name].path.name} "
                                  f"and {shard}")
            tensors[name] = TensorInfo(name, meta.dtype, tuple(meta.shape), directory / shard, None)
    return tensors


def _find_shards(directory: Path, model: str) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = [directory / name for name in dict.fromkeys(weight_map.values())]
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise SourceError(f"model {model!r}: index names shard(s) {missing} that are not in {directory}")
        return shards
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    raise SourceError(f"model {model!r} ({directory}) has no model.safetensors or model.safetensors.index.json; "
                      "the stacker reads safetensors only (re-save the model with save_pretrained)")
