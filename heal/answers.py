"""The source model's own answers to a dataset's prompts: heal data for sequence-level self-distillation.

    python -m heal.answers --model models/e4b-it --data prompts.jsonl --out out/answers [--num-prompts N]
        [--max-new-tokens 160] [--temperature 0] [--num-samples 1] [--seed 0] [--batch-size 32]
        [--keep-unfinished] [--device auto] [--dtype auto] [--force]
    python -m heal.answers --config recipes/answers.yaml --temperature 1.0     # AnswersConfig fields from a YAML

Writes answers.jsonl (TRL prompt-completion rows) and answers.json into --out; resumable chunk by chunk. Prompts,
sampling, dropped answers, outputs and resume: docs/architecture.md, section "Self-generated data".
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from core.checkpoint import SourceError, check_data_present, open_source
from core.cli import ConfigParser, load_dataclass, package_versions, setup_logging
from core.files import jsonl_text, read_jsonl, sha256_file
from core.outputs import OutputExistsError, guard_output_dir, staged_output, write_file_atomic
from core.tokens import pad_batch, pad_id, stop_token_ids
from evaluation.config import EvalError, resolve_device, resolve_dtype
from evaluation.generation import Continuation, greedy_continuations
from evaluation.inputs import Messages, chat_ids, length_sorted_batches, load_prompts
from evaluation.run import load_model, load_tokenizer

logger = logging.getLogger(__name__)

ANSWERS_FILE = "answers.jsonl"
RECORD_FILE = "answers.json"
SETTINGS_FILE = "settings.json"  # in OUT.partial: what its chunks were generated with
SEED_STRIDE = 1_000_003  # chunk c of seed s samples under torch seed s * SEED_STRIDE + c: distinct for c < stride
VERSIONED = ("torch", "transformers")


class AnswersError(ValueError):
    """Bad input (a flag, the model folder, the data file, the work folder); the CLI reports it and exits with 2."""


@dataclass(frozen=True)
class Answer:
    prompt_index: int  # row of the (first --num-prompts) prompts
    sample: int  # 0 .. num_samples-1
    text: str
    tokens: int  # generated tokens, the stop token excluded
    stopped: bool  # False: it reached --max-new-tokens without a stop token


@dataclass(frozen=True)
class AnswersConfig:
    model: Path  # the source model's folder
    data: Path  # JSONL of chat prompts
    out: Path  # output folder
    num_prompts: int | None = None  # use the first N rows (None: all)
    max_new_tokens: int = 160  # cap of every answer, in tokens
    temperature: float = 0.0  # 0: greedy; above 0: sampled at this temperature
    num_samples: int = 1  # answers per prompt (sampled only)
    seed: int = 0  # seed of the sampled answers
    batch_size: int = 32  # prompts generated together (times num_samples rows per generate); the chunk resumed
    keep_unfinished: bool = False  # keep answers that reached the cap without stopping
    device: str = "auto"  # auto | cuda | cpu
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16

    def __post_init__(self):
        for flag in ("max_new_tokens", "num_samples", "batch_size"):
            if getattr(self, flag) < 1:
                raise AnswersError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(self, flag)}")
        if self.num_prompts is not None and self.num_prompts < 1:
            raise AnswersError(f"--num-prompts must be at least 1, got {self.num_prompts}; leave it out to use every "
                               "row")
        if self.temperature < 0:
            raise AnswersError(f"--temperature must be 0 (greedy) or more, got {self.temperature}")
        if self.temperature == 0 and self.num_samples > 1:
            raise AnswersError(f"--num-samples {self.num_samples} with --temperature 0: greedy answers would repeat "
                               "one another; pass --temperature above 0 to sample, or --num-samples 1")


def make_parser() -> ConfigParser:
    parser = ConfigParser(AnswersConfig, prog="python -m heal.answers", description=__doc__, positional=False,
                          required=False, config_help="YAML of AnswersConfig fields (heal/answers.py)",
                          usage="%(prog)s --model DIR --data PROMPTS.jsonl --out DIR [--key value ...] [--force]")
    parser.add_argument("--force", action="store_true",
                        help="replace an --out that this stage did not write, and discard an OUT.partial of other "
                        "settings")
    return parser


def load_config(path: str | Path | None, **overrides) -> AnswersConfig:
    """The AnswersConfig of the YAML at `path` (recipes/answers.yaml), `overrides` (command-line flags) on top;
    an unknown key in either is an AnswersError naming it."""
    return load_dataclass(AnswersConfig, path, overrides, "recipes/answers.yaml", AnswersError)


def check_inputs(model_dir: Path, data: Path) -> None:
    """The cheap checks, before anything is hashed or loaded."""
    if not (model_dir / "config.json").is_file():
        raise AnswersError(f"--model {model_dir}: not a model folder (no config.json); pass the source model's "
                           "folder (save_pretrained output)")
    if not data.is_file():
        raise AnswersError(f"--data {data}: no such file; pass a JSONL file of prompts ({{\"prompt\": ...}} or "
                           "{\"messages\": [...]} rows)")
    if not data.read_text().strip():
        raise AnswersError(f"--data {data}: the file is empty; it needs at least one prompt row")


def model_identity(model_dir: Path) -> dict:
    """sha256 of config.json and of every weight shard: names the exact weights the answers came from."""
    source = open_source(str(model_dir))
    check_data_present(source)  # a truncated shard fails here, before hours of generation
    return {"config_sha256": sha256_file(model_dir / "config.json"),
            "shard_sha256": {shard.name: sha256_file(shard) for shard in source.shards}}


def resolve_settings(config: AnswersConfig, identity: dict, prompts: list[Messages],
                     device: torch.device, dtype: torch.dtype) -> dict:
    """Everything that decides the chunks' contents. A resume must match it exactly; paths are left out, so a
    moved model or data file with the same bytes still resumes."""
    return {
        "model": identity,
        "data_sha256": sha256_file(config.data),
        "num_prompts": len(prompts),
        "max_new_tokens": config.max_new_tokens,
        "temperature": config.temperature,
        "num_samples": config.num_samples,
        "seed": config.seed,
        "batch_size": config.batch_size,
        "device": device.type,  # GPU and CPU kernels round differently: their answers differ
        "dtype": str(dtype).removeprefix("torch."),
        "versions": package_versions(*VERSIONED),
    }


def work_dir_for(out: Path) -> Path:
    return out.parent / f"{out.name}.partial"


def open_work_dir(work: Path, settings: dict, force: bool) -> set[int]:
    """Create OUT.partial for these settings, or reuse one made with the same settings: the indices of its
    finished chunks. One with other settings, or a folder that is not a work folder, is refused unless `force`."""
    if os.path.lexists(work):
        refusal = _work_dir_refusal(work, settings)
        if refusal is None:
            return {int(path.stem.removeprefix("chunk-")) for path in work.glob("chunk-*.jsonl")}
        if not force:
            raise AnswersError(f"{refusal}; rerun with the settings it was made with to resume, or pass --force to "
                               f"delete it and start over")
        logger.warning("--force: deleting %s (%s)", work, refusal)
        if work.is_dir() and not work.is_symlink():
            shutil.rmtree(work)
        else:
            work.unlink()
    work.mkdir(parents=True)
    (work / SETTINGS_FILE).write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    return set()


def _work_dir_refusal(work: Path, settings: dict) -> str | None:
    """Why `work` cannot be resumed with `settings`; None when it can."""
    try:
        saved = json.loads((work / SETTINGS_FILE).read_text())
    except (OSError, ValueError):
        return f"{work} exists but is not a work folder of `python -m heal.answers` (no readable {SETTINGS_FILE})"
    differing = [key for key in sorted(set(saved) | set(settings)) if saved.get(key) != settings.get(key)]
    if not differing:
        return None
    key = differing[0]
    return (f"{work} holds chunks generated with other settings: {key} was {saved.get(key)!r}, now "
            f"{settings.get(key)!r}" + (f" (also differing: {', '.join(differing[1:])})" if differing[1:] else ""))


def write_chunk(work: Path, index: int, answers: list[Answer]) -> None:
    """chunk-NNNNN.jsonl, written under a temp name and renamed: a chunk file on disk is always complete."""
    write_file_atomic(work / f"chunk-{index:05d}.jsonl", jsonl_text(asdict(answer) for answer in answers))


def read_chunks(work: Path, count: int) -> list[Answer]:
    return [Answer(**row) for index in range(count) for row in read_jsonl(work / f"chunk-{index:05d}.jsonl")]


@torch.inference_mode()
def sampled_continuations(model, tokenizer, encoded: list[list[int]], settings: dict,
                          chunk_index: int) -> list[Continuation]:
    """`num_samples` sampled continuations of each prompt (token ids), prompt-major, in one left-padded generate.
    Seeded per chunk, so a chunk's samples do not depend on which chunks ran before it in this process."""
    stops, pad = stop_token_ids(tokenizer), pad_id(tokenizer)
    input_ids, attention_mask = pad_batch(encoded, pad, side="left")
    torch.manual_seed(settings["seed"] * SEED_STRIDE + chunk_index)
    output = model.generate(
        input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device),
        max_new_tokens=settings["max_new_tokens"], do_sample=True, num_beams=1,
        num_return_sequences=settings["num_samples"], temperature=settings["temperature"],
        eos_token_id=stops, pad_token_id=pad,
        # transformers 5 fills every setting not passed from the checkpoint's generation_config.json (Gemma's
        # ships top_k 64, top_p 0.95): pin each truncation off, so the samples come from the full distribution.
        top_p=1.0, top_k=0, min_p=0.0, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0,
        repetition_penalty=1.0, no_repeat_ngram_size=0,
    )  # [prompts * num_samples, prompt width + generated]; a finished row is filled with `pad`
    continuations = []
    for row in output[:, input_ids.shape[1]:].tolist():
        end = next((position for position, token in enumerate(row) if token in stops), None)
        continuations.append(Continuation(row[:end], stopped=True) if end is not None
                             else Continuation(row, stopped=False))
    return continuations


def answer_chunk(model, tokenizer, prompts: list[Messages], encoded: list[list[int]], chunk: list[int],
                 chunk_index: int, settings: dict) -> list[Answer]:
    """The answers to the prompts whose indices are `chunk`, sample by sample, decoded without special tokens."""
    if settings["temperature"] == 0:
        continuations = greedy_continuations(model, tokenizer, [prompts[i] for i in chunk],
                                             settings["max_new_tokens"], 0, len(chunk)).natural
    else:
        continuations = sampled_continuations(model, tokenizer, [encoded[i] for i in chunk], settings, chunk_index)
    samples = settings["num_samples"]
    return [Answer(chunk[position // samples], position % samples,
                   tokenizer.decode(continuation.tokens, skip_special_tokens=True), len(continuation.tokens),
                   continuation.stopped)
            for position, continuation in enumerate(continuations)]


def assemble(prompts: list[Messages], answers: list[Answer], keep_unfinished: bool) -> tuple[list[dict], dict]:
    """The TRL rows in prompt order (then sample order), unfinished answers dropped unless kept, and the counts."""
    answers = sorted(answers, key=lambda answer: (answer.prompt_index, answer.sample))
    written = [answer for answer in answers if answer.stopped or keep_unfinished]
    rows = [{"prompt": prompts[answer.prompt_index], "completion": [{"role": "assistant", "content": answer.text}],
             "prompt_index": answer.prompt_index, "sample": answer.sample} for answer in written]
    unfinished = sum(not answer.stopped for answer in answers)
    counts = {
        "prompts": len(prompts),
        "answers_generated": len(answers),
        "answers_written": len(written),
        "unfinished": unfinished,  # reached the cap without a stop token
        "unfinished_dropped": 0 if keep_unfinished else unfinished,
        "empty_answers_written": sum(answer.tokens == 0 for answer in written),
        "mean_answer_tokens": sum(answer.tokens for answer in written) / len(written) if written else 0.0,
    }
    return rows, counts


def generate_answers(config: AnswersConfig, settings: dict, prompts: list[Messages], device: torch.device,
                     dtype: torch.dtype, force: bool) -> tuple[list[Answer], int]:
    """Every chunk's answers, from OUT.partial where finished, else generated and saved there; and how many
    chunks were resumed. `force` discards an OUT.partial of other settings."""
    tokenizer = load_tokenizer(config.model)
    if not getattr(tokenizer, "chat_template", None):
        raise AnswersError(f"--model {config.model}: its tokenizer has no chat template, so the prompts cannot be "
                           "rendered as a chat; pass an instruction-tuned model's folder")
    encoded = [chat_ids(tokenizer, messages, add_generation_prompt=True) for messages in prompts]
    chunks = length_sorted_batches(encoded, config.batch_size)  # deterministic: a stable sort of the lengths
    work = work_dir_for(config.out)
    finished = open_work_dir(work, settings, force)
    todo = [index for index in range(len(chunks)) if index not in finished]
    logger.info("%d chunk(s) of up to %d prompts; %d finished in %s, %d to generate", len(chunks),
                config.batch_size, len(chunks) - len(todo), work, len(todo))
    if todo:
        model = load_model(config.model, device, dtype)
        for index in tqdm(todo, desc="answers", unit="chunk", dynamic_ncols=True):
            write_chunk(work, index, answer_chunk(model, tokenizer, prompts, encoded, chunks[index], index, settings))
    return read_chunks(work, len(chunks)), len(chunks) - len(todo)


def write_outputs(out: Path, rows: list[dict], record: dict) -> None:
    with staged_output(out, stage="answers") as tmp:
        (tmp / ANSWERS_FILE).write_text(jsonl_text(rows))
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    logger.info("wrote %d answers to %s", len(rows), out / ANSWERS_FILE)


def run(config: AnswersConfig, force: bool = False) -> None:
    """`force`: replace an --out this stage did not write, and discard an OUT.partial of other settings."""
    started = time.monotonic()
    guard_output_dir(config.out, "answers", force)  # before any model loads: a wrong --out fails in seconds
    check_inputs(config.model, config.data)
    prompts = load_prompts(config.data, config.num_prompts)
    text_rows = [index for index, prompt in enumerate(prompts) if isinstance(prompt, str)]
    if text_rows:  # an answer becomes a chat completion row: its prompt must be chat messages
        raise AnswersError(f"--data {config.data} rows {text_rows[:5]}: plain {{\"text\"}} rows; the answers are chat "
                           "completions, so give {\"prompt\": ...} or {\"messages\": [...]} rows")
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    settings = resolve_settings(config, model_identity(config.model), prompts, device, dtype)
    logger.info("settings (keep_unfinished=%s):\n%s", config.keep_unfinished, json.dumps(settings, indent=2))
    answers, resumed = generate_answers(config, settings, prompts, device, dtype, force)
    rows, counts = assemble(prompts, answers, config.keep_unfinished)
    logger.info("%s", json.dumps(counts))
    if not rows:  # an empty answers.jsonl is no heal data; the chunks stay in OUT.partial for a rerun to reuse
        raise AnswersError(f"all {counts['unfinished']} answers reached --max-new-tokens {config.max_new_tokens} "
                           "without stopping, so none is written; raise --max-new-tokens or pass --keep-unfinished "
                           f"(a rerun reuses the answers saved in {work_dir_for(config.out)})")
    record = {
        "model": str(config.model.resolve()), "data": str(config.data.resolve()), "settings": settings,
        "keep_unfinished": config.keep_unfinished, "counts": counts, "chunks_resumed": resumed,
        "wall_seconds": round(time.monotonic() - started, 1),  # this invocation's, resumed chunks not included
    }
    write_outputs(config.out, rows, record)
    shutil.rmtree(work_dir_for(config.out))


def main(argv: list[str] | None = None) -> int:
    overrides, args = make_parser().parse(argv)
    setup_logging()
    try:
        config = load_config(args.config, **overrides)
        run(config, args.force)
    except (AnswersError, EvalError, SourceError, OutputExistsError) as error:
        logger.error("%s", error)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
