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
from types import SimpleNamespace

from core.data import DataError, DatasetSpec, check_chat_template, load_trl_datasets

from .config import FisherConfig

logger = logging.getLogger(__name__)


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


def _skip_rows_without_assistant_turn(dataset, spec: DatasetSpec):
    """A conversation with no assistant message has an empty loss mask; TRL would stop on it."""
    keep = [i for i, messages in enumerate(dataset["messages"]) if any(m.get("role") == "assistant" for m in messages)]
    skipped = len(dataset) - len(keep)
    if skipped:
        rows = [dataset[i]["_row"] for i in sorted(set(range(len(dataset))) - set(keep))][:5]
        logger.warning("%s: %d row(s) have no assistant turn (empty loss mask), skipped; first rows: %s",
                       spec.path, skipped, rows)
    return dataset.select(keep) if skipped else dataset
