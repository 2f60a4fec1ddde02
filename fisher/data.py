"""Instruction data for the Fisher, tokenized exactly as TRL's SFTTrainer tokenizes it for training.

Formats (TRL's): conversational `messages`, `prompt`/`completion` (plain or conversational), plain
`text`. Tokenization and loss masks are TRL's own code (`SFTTrainer._prepare_dataset`, pinned
trl==1.16.0), so the Fisher and the heal see the same tokens with the same loss tokens:
assistant turns (assistant_only_loss), completions (completion_only_loss), or every token of text.
Truncation to max_length (keep_start, as TRL) and dropping rows with no loss token are done here,
after TRL, so that both can be counted.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from .config import DatasetSpec, FisherConfig

logger = logging.getLogger(__name__)

_LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}
TRL_FIELDS = ("messages", "prompt", "completion")


class DataError(ValueError):
    pass


@dataclass(frozen=True)
class Example:
    example_id: int  # dataset index << 32 | row index: names the row, and seeds its label sampling
    input_ids: list[int]
    labels: list[int]  # -100 where the token is not a loss token

    @property
    def dataset_index(self) -> int:
        return self.example_id >> 32


@dataclass
class DataStats:
    rows: dict[str, int] = field(default_factory=dict)  # rows drawn from each dataset
    skipped_empty_loss_mask: int = 0
    truncated: int = 0


def load_examples(config: FisherConfig, tokenizer) -> tuple[list[Example], DataStats]:
    stats = DataStats()
    examples: list[Example] = []
    selected = load_trl_datasets(config.datasets, config.num_examples, config.seed, config.dataset_text_field)
    for index, (spec, dataset) in enumerate(zip(config.datasets, selected)):
        stats.rows[spec.path] = len(dataset)
        dataset = dataset.add_column("example_id", [(index << 32) | int(row) for row in dataset["_row"]])
        tokenized = _tokenize_with_trl(dataset, spec, tokenizer, config)
        stats.skipped_empty_loss_mask += len(dataset) - len(tokenized)  # conversations with no assistant turn
        for example_id, input_ids, labels in zip(tokenized["example_id"], tokenized["input_ids"], tokenized["labels"]):
            if len(input_ids) > config.max_length:
                stats.truncated += 1
                input_ids, labels = input_ids[: config.max_length], labels[: config.max_length]
            # Label t is predicted from token t-1: position 0 never counts.
            if all(label == -100 for label in labels[1:]):
                stats.skipped_empty_loss_mask += 1
                logger.warning("%s row %d has no loss token (empty loss mask); skipped", spec.path,
                               example_id & 0xFFFFFFFF)
                continue
            examples.append(Example(example_id, input_ids, labels))
    if not examples:
        raise DataError(f"no example of {[spec.path for spec in config.datasets]} has a loss token; "
                        "check the datasets' format and the loss-mask options")
    return examples, stats


def load_trl_datasets(specs: tuple[DatasetSpec, ...], num_examples: int | None, seed: int,
                      text_field: str = "text") -> list:
    """Each dataset loaded, its columns renamed to TRL's fields (plus `_row`, the source row index),
    and `num_examples` split across them by weight (a seeded shuffle, then the first rows)."""
    counts = _rows_per_dataset(specs, num_examples)
    return [_select_rows(_with_trl_columns(_load(spec), spec, text_field), count, seed)
            for spec, count in zip(specs, counts)]


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


def _tokenize_with_trl(dataset, spec: DatasetSpec, tokenizer, config: FisherConfig):
    """TRL's SFTTrainer preparation, run without a trainer: the three attributes it reads from `self`
    are set exactly as SFTTrainer.__init__ sets them."""
    from accelerate import PartialState
    from trl import SFTConfig, SFTTrainer
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    check_chat_template(dataset, spec, tokenizer, config.model)
    assistant_only = config.assistant_only_loss and "messages" in dataset.column_names
    PartialState()  # SFTConfig would otherwise reset the distributed state of the running Accelerator
    with tempfile.TemporaryDirectory() as scratch:
        args = SFTConfig(
            output_dir=scratch, max_length=None, assistant_only_loss=assistant_only,
            completion_only_loss=config.completion_only_loss, dataset_text_field=config.dataset_text_field,
            shuffle_dataset=False, report_to=[], bf16=False,  # only the data-preparation fields matter here
            accelerator_config={"use_configured_state": True}, activation_checkpointing=False,
        )
    no_assistant_mask = DataError(
        f"dataset {spec.path!r}: the chat template of {config.model!r} marks no assistant tokens (no "
        "{% generation %} markers, and TRL has no training template for it). Set assistant_only_loss: false "
        "to use every token, or give the tokenizer a chat template with generation markers"
    )
    try:
        # As SFTTrainer.__init__: a template without generation markers is swapped for TRL's training version.
        needs_training_template = assistant_only and not has_generation_markers(tokenizer.chat_template)
        training_template = get_training_chat_template(tokenizer) if needs_training_template else None
    except ValueError:
        raise no_assistant_mask from None
    trainer_state = SimpleNamespace(_tokenizer=tokenizer, chat_template=training_template,
                                    completion_only_loss=config.completion_only_loss)
    if assistant_only:
        dataset = _skip_rows_without_assistant_turn(dataset, spec)
    try:
        return SFTTrainer._prepare_dataset(trainer_state, dataset, tokenizer, args, False, None, spec.path)
    except RuntimeError as error:
        if "assistant" not in str(error):
            raise
        raise no_assistant_mask from None


def check_chat_template(dataset, spec: DatasetSpec, tokenizer, model: str) -> None:
    """Conversational rows are tokenized through the tokenizer's chat template: it must have one."""
    from trl.data_utils import is_conversational

    if is_conversational(dataset[0]) and not getattr(tokenizer, "chat_template", None):
        raise DataError(f"dataset {spec.path!r} is conversational but the tokenizer of {model!r} has no chat "
                        "template; use a tokenizer with one, or convert the rows to plain text")


def _skip_rows_without_assistant_turn(dataset, spec: DatasetSpec):
    """A conversation with no assistant message has an empty loss mask; TRL would stop on it."""
    keep = [i for i, messages in enumerate(dataset["messages"]) if any(m.get("role") == "assistant" for m in messages)]
    skipped = len(dataset) - len(keep)
    if skipped:
        rows = [dataset[i]["_row"] for i in sorted(set(range(len(dataset))) - set(keep))][:5]
        logger.warning("%s: %d row(s) have no assistant turn (empty loss mask), skipped; first rows: %s",
                       spec.path, skipped, rows)
    return dataset.select(keep) if skipped else dataset
