"""What every model card of this project shares (stack/card.py writes the raw stack's, heal/card.py the heal's):
the source model as the Hub knows it, paths a public card may show, index ranges, and the front matter + body
rendering, checked by parsing it back with huggingface_hub.ModelCard.

The source's hub id, revision and license come from where the source was read (a hub id or the HF cache's
snapshot folder, and the source's own card), and are left out when unknown: a card never names a local folder.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CARD_NAME = "README.md"
REPO = Path(__file__).resolve().parents[1]
LOCAL_PATH = "<local path>"
SOURCE_PLACEHOLDER = "<source folder>"
_SNAPSHOT = re.compile(r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/(?P<revision>[0-9a-f]{40})$")


class CardError(ValueError):
    pass


# ---- the source, as the Hub knows it ------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceFacts:
    hub_id: str | None  # "org/name" when the source came from the Hub (or its cache); None for a local folder
    revision: str | None  # the snapshot's commit, when read from the HF cache
    license: str | None  # from the source's own card front matter or config.json
    command_source: str  # what the rebuild command passes as --source: never a local absolute path


def source_facts(model: str, directory: Path | None) -> SourceFacts:
    """What a card may say about the source named `model` (as given to the stacker) and read from `directory`."""
    hub_id, revision = _hub_id_and_revision(model, directory)
    license_ = _source_license(directory, hub_id, revision)
    if hub_id:
        command_source = hub_id
    else:
        command_source = display_path(Path(model), placeholder=SOURCE_PLACEHOLDER)
    return SourceFacts(hub_id, revision, license_, command_source)


def _hub_id_and_revision(model: str, directory: Path | None) -> tuple[str | None, str | None]:
    snapshot = _SNAPSHOT.search(str(directory.resolve())) if directory else None
    if snapshot:  # a hub id resolved through the HF cache, or a snapshot folder given as a local path
        return f"{snapshot['org']}/{snapshot['name']}", snapshot["revision"]
    path = Path(model).expanduser()
    looks_like_hub_id = not path.is_absolute() and not model.startswith((".", "~")) and model.count("/") == 1
    if looks_like_hub_id and not path.exists():
        return model, None
    return None, None


def _source_license(directory: Path | None, hub_id: str | None, revision: str | None) -> str | None:
    """The `license` of the source's card front matter, else config.json's `license`; None when neither says."""
    readme = _source_readme(directory, hub_id, revision)
    if readme is not None:
        from huggingface_hub import metadata_load

        license_ = (metadata_load(readme) or {}).get("license")
        if license_:
            return str(license_)
    config = directory / "config.json" if directory else None
    if config is not None and config.is_file():
        license_ = json.loads(config.read_text()).get("license")
        return str(license_) if license_ else None
    return None


def _source_readme(directory: Path | None, hub_id: str | None, revision: str | None) -> Path | None:
    if directory is not None and (directory / CARD_NAME).is_file():
        return directory / CARD_NAME
    if hub_id is None:
        return None
    from huggingface_hub import hf_hub_download

    try:  # the stacker downloads weights and tokenizer only; the card is a few KB, from the cache when offline
        readme = Path(hf_hub_download(hub_id, CARD_NAME, revision=revision))
    except Exception as error:  # offline and not cached, gated, no card: the license is then unknown
        logger.info("no model card of %s to read its license from (%s)", hub_id, str(error).splitlines()[0])
        return None
    return readme if readme.is_file() else None


# ---- text a card shows ---------------------------------------------------------------------------------------


def ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0–2, 5, 7–8' (sorted, consecutive runs joined by an en dash)."""
    runs: list[list[int]] = []
    for index in sorted(indices):
        if runs and index == runs[-1][-1] + 1:
            runs[-1].append(index)
        else:
            runs.append([index])
    return ", ".join(span(run[0], run[-1]) for run in runs) or "none"


def span(first: int, last: int) -> str:
    """'3' for a single index, '3–7' for a run."""
    return str(first) if first == last else f"{first}–{last}"


def local_path_prefixes() -> list[str]:
    """Folders whose paths a public card must never show: the user's home, the temp folders and this checkout."""
    candidates = {Path.home(), Path(tempfile.gettempdir()), Path("/tmp"), Path("/var/tmp"), REPO}
    prefixes = set()
    for path in candidates:
        for variant in (path, path.resolve()):
            if str(variant) != "/":
                prefixes.add(str(variant))
    return sorted(prefixes, key=len, reverse=True)  # longest first: /tmp/x/repo is matched before /tmp


def strip_local_paths(text: str) -> str:
    """`text` with every path under a local_path_prefixes() folder replaced by LOCAL_PATH."""
    alternatives = "|".join(re.escape(prefix) for prefix in local_path_prefixes())
    return re.sub(rf"(?<![\w.\-/])(?:{alternatives})(?=$|[/\s`'\"|),\]:])[^\s`'\"|),\]]*", LOCAL_PATH, text)


def display_path(path: Path, placeholder: str) -> str:
    """A path a card may show: relative to this repository when inside it, else `placeholder`."""
    try:
        return Path(os.path.abspath(path)).relative_to(REPO).as_posix()
    except ValueError:
        return placeholder


def render_card(data: dict[str, Any], body: str) -> str:
    """Front matter (None values dropped) + body, local paths stripped, checked by parsing with ModelCard."""
    from huggingface_hub import ModelCard, ModelCardData

    card_data = ModelCardData(**{key: value for key, value in data.items() if value is not None})
    text = strip_local_paths(f"---\n{card_data.to_yaml()}\n---\n\n{body.rstrip()}\n")
    parsed = ModelCard(text).data.to_dict()
    for key, value in data.items():
        if value is not None and parsed.get(key) != value:
            raise CardError(f"internal: the card's front matter reads back {key}={parsed.get(key)!r}, "
                            f"expected {value!r}")
    return text
