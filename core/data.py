"""Instruction datasets as the Fisher and the heal both read them: a recipe's `datasets:` list, each dataset loaded
(local file or folder, or a hub dataset), its columns renamed to TRL's fields, and the mixture drawn by weight.

Formats (TRL's): conversational `messages`, `prompt`/`completion` (plain or conversational), plain `text`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.cli import check_keys, field_names

logger = logging.getLogger(__name__)

_LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}


class DataError(ValueError):
    """A dataset that cannot be used as configured; the message names it and says how to fix it."""


@dataclass(frozen=True)
class DatasetSpec:
    # A hub dataset name, or a local file / folder (JSONL, JSON, parquet, arrow, or a save_to_disk folder).
    path: str
    split: str = "train"
    name: str | None = None  # hub dataset config name
    # TRL field -> this dataset's column, e.g. {prompt: question, completion: answer}. Unset: the columns
    # already use TRL's names (messages | prompt + completion | text).
    columns: dict[str, str] | None = None
    weight: float = 1.0  # relative share of `num_examples` when several datasets are mixed


def dataset_specs(datasets: Any, where: str) -> tuple[DatasetSpec, ...]:
    """A recipe's `datasets:` list (shared by fisher and heal recipes), each entry checked for unknown keys."""
    if not isinstance(datasets, list):
        raise DataError(f"{where}: datasets must be a list of {{path: ...}} entries")
    specs = []
    for i, entry in enumerate(datasets):
        if not isinstance(entry, dict):
            raise DataError(f"{where}: datasets[{i}] must be a mapping with a 'path'")
        check_keys(entry, field_names(DatasetSpec), f"{where}: datasets[{i}]", DataError)
        try:
            specs.append(DatasetSpec(**entry))
        except TypeError as error:  # no `path`
            raise DataError(f"{where}: datasets[{i}]: {error}") from None
    return tuple(specs)


def load_trl_datasets(specs: tuple[DatasetSpec, ...], num_examples: int | None, seed: int,
                      text_field: str = "text") -> list:
    """Each dataset loaded, its columns renamed to TRL's fields (plus `_row`, the source row index),
    and `num_examples` split across them by weight (a seeded shuffle, then the first rows)."""
    counts = _rows_per_dataset(specs, num_examples)
    return [_select_rows(_with_trl_columns(_load(spec), spec, text_field), count, seed)
            for spec, count in zip(specs, counts)]


def check_chat_template(dataset, spec: DatasetSpec, tokenizer, model: str) -> None:
    """Conversational rows are tokenized through the tokenizer's chat template: it must have one."""
    from trl.data_utils import is_conversational

    if is_conversational(dataset[0]) and not getattr(tokenizer, "chat_template", None):
        raise DataError(f"dataset {spec.path!r} is conversational but the tokenizer of {model!r} has no chat "
                        "template; use a tokenizer with one, or convert the rows to plain text")


def _rows_per_dataset(specs: tuple[DatasetSpec, ...], num_examples: int | None) -> list[int | None]:
    if num_examples is None:
        return [None] * len(specs)
    total = sum(spec.weight for spec in specs)
    return [max(1, round(num_examples * spec.weight / total)) for spec in specs]


def _load(spec: DatasetSpec):
    import datasets

    path = Path(spec.path).expanduser()
    local = path.exists() or spec.path.startswith((".", "/", "~")) or path.suffix in _LOCAL_FORMATS
    if local and not path.exists():
        raise DataError(f"data path {spec.path!r} does not exist; give a JSONL/JSON/parquet/arrow file, a folder, "
                        "or a hub dataset name")
    if path.is_file() and path.stat().st_size == 0:
        raise DataError(f"data file {spec.path!r} is empty; give a dataset with at least one row")
    try:
        if path.is_dir() and (path / "dataset_info.json").is_file():
            loaded = datasets.load_from_disk(str(path))
            return loaded[spec.split] if isinstance(loaded, datasets.DatasetDict) else loaded
        if path.is_file():
            return datasets.load_dataset(_LOCAL_FORMATS.get(path.suffix, "json"), data_files=str(path), split="train")
        return datasets.load_dataset(spec.path, spec.name, split=spec.split)
    except DataError:
        raise
    except Exception as error:  # hub unreachable, bad file: say which dataset
        raise DataError(f"could not load dataset {spec.path!r} (split {spec.split!r}): {error}") from error


def _with_trl_columns(dataset, spec: DatasetSpec, text_field: str):
    """Rename the dataset's columns to TRL's field names and keep only those."""
    renames = dict(spec.columns or {})
    missing = sorted(column for column in renames.values() if column not in dataset.column_names)
    if missing:
        raise DataError(f"dataset {spec.path!r} has no column(s) {missing}; its columns are {dataset.column_names}")
    dataset = dataset.rename_columns({column: trl for trl, column in renames.items() if column != trl})
    present = set(dataset.column_names)
    if "messages" in present:
        keep = ["messages"]
    elif {"prompt", "completion"} <= present:
        keep = ["prompt", "completion"]
    elif text_field in present:
        keep = [text_field]
    else:
        raise DataError(
            f"dataset {spec.path!r} has columns {dataset.column_names}, none in a TRL format: 'messages', "
            f"'prompt' + 'completion', or '{text_field}'. Map yours with columns: "
            "{prompt: your_question_column, completion: your_answer_column}"
        )
    dataset = dataset.select_columns(keep)
    return dataset.add_column("_row", list(range(len(dataset))))


def _select_rows(dataset, count: int | None, seed: int):
    if count is None or count >= len(dataset):
        return dataset
    return dataset.shuffle(seed=seed).select(range(count))
