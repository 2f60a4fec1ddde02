"""The heal studies: every arm's heal curve on a real model, run in resumable parts. `--preset study` is the SmolLM2
experiment (recipes/demo/study.yaml, results in docs/study/); `--preset study-gpu` is the same experiment on a GPU,
more seeds and longer curves (recipes/demo/study-gpu.yaml, results in docs/study-gpu/); `--preset gemma3` is
Gemma-3-270M (base) healed by continued pretraining (recipes/demo/gemma3.yaml, results in docs/gemma3/), and
`--preset gemma3-gpu` the same on a GPU (recipes/demo/gemma3-gpu.yaml, results in docs/gemma3-gpu/).

    python -m demo --preset study                         # runs what is not in docs/study yet
    python -m demo --preset study --budget-minutes 60     # start no new run after 60 minutes
    python -m demo --preset study --report                # only rebuild docs/study/README.md and its plots
    python -m demo --preset study --arm self-distill --steps 200 --seed 0   # rebuild one healed model
    python -m demo --preset study --only sft-s0,sft-s1    # only these runs (no report: --report writes it)
    python -m demo --preset study-gpu --parallel 6        # several runs at once, on one GPU

Every value is in the preset's recipe. Runs, results, keys and work folders: docs/architecture.md, section
"The heal study".
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import MISSING, dataclass, field
from pathlib import Path

import yaml

from core.cli import setup_logging
from core.files import read_jsonl
from core.outputs import mark_output_dir, write_file_atomic
from demo.run import RECIPES, REPO, SOURCE_NAME, STUDY_PRESETS, _run, _write_recipe

logger = logging.getLogger("demo.study")

STUDY_RECIPE = STUDY_PRESETS["study"]
# What an arm trains on: the demo's answers (instruct), the source's own (greedy, sampled: ANSWER_KINDS), plain
# text passages with the loss on every token (text: continued pretraining), or both (mix: chat rows written out by
# the source's chat template as plain text, alternating with passages, every token trained on; mix_rows).
DATA_KINDS = ("instruct", "greedy", "sampled", "text", "mix")
ANSWER_KINDS = ("greedy", "sampled")


class StudyConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Arm:
    name: str
    description: str
    data: str  # one of DATA_KINDS
    heal: dict  # heal recipe keys of this arm (objective, protect, ...)


@dataclass(frozen=True)
class Run:
    arm: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.arm}-s{self.seed}"


@dataclass(frozen=True)
class StudyConfig:
    results_dir: Path  # relative to the repository
    heal: dict
    eval_steps: tuple[int, ...]
    num_train_prompts: int  # training rows: the first N of the arm's training file (prompts, or text passages)
    evaluation: tuple[str, ...]
    arms: dict[str, Arm]
    runs: tuple[Run, ...]
    # The keys below may be left out; their defaults are the SmolLM2 study's, and a default is left out of the
    # result keys too (plain_text), so adding a key never re-keys that study's stored results.
    source: str = SOURCE_NAME  # a packaged model: stack.from_gguf.PACKAGED_GGUFS
    stack_recipe: str = "mini-e6b.yaml"  # a file of recipes/demo/
    title: str = "The heal study"  # the report's heading
    answers: dict = field(default_factory=dict)  # data kind -> python -m heal.answers settings
    fisher: dict = field(default_factory=dict)  # python -m fisher recipe keys, for protected arms
    # steps: checkpoints to score; evaluation: python -m evaluation flags. None: no instruction-following
    instruction_following: dict | None = None
    # A base model (no chat template), e.g. {prompt_words: 24}: the loops continue the openings (the first
    # prompt_words words) of held-out passages as plain text, and the KL is on held-out text, every token. None: a
    # chat model's held-out prompts and conversations.
    plain_text: dict | None = None


# A study recipe may start from another (`base: study.yaml`, a file of recipes/demo/): its own keys replace the
# base's, except these, whose entries are merged into the base's one by one (an arm, a heal key, an answer set).
MERGED_KEYS = ("heal", "answers", "fisher", "arms")


def load_study(path: Path = STUDY_RECIPE) -> StudyConfig:
    """The study YAML as a StudyConfig; an unknown key, arm or data kind is an error that names it."""
    raw = _read_study_yaml(Path(path))
    fields = StudyConfig.__dataclass_fields__
    required = {name for name, spec in fields.items() if spec.default is MISSING and spec.default_factory is MISSING}
    unknown = sorted(set(raw) - set(fields))
    missing = sorted(required - set(raw))
    if unknown or missing:
        raise StudyConfigError(f"{path}: unknown key(s) {unknown}, missing key(s) {missing}")
    arms = {name: _arm(path, name, entry) for name, entry in raw["arms"].items()}
    runs = tuple(_run_entry(path, entry, arms) for entry in raw["runs"])
    optional = {key: raw[key] for key in ("source", "stack_recipe", "title") if key in raw}
    config = StudyConfig(
        results_dir=Path(raw["results_dir"]), heal=dict(raw["heal"]), eval_steps=tuple(raw["eval_steps"]),
        num_train_prompts=int(raw["num_train_prompts"]), answers=dict(raw.get("answers") or {}),
        fisher=dict(raw.get("fisher") or {}), evaluation=tuple(str(flag) for flag in raw["evaluation"]),
        instruction_following=_instruction_following(path, raw.get("instruction_following")),
        plain_text=_plain_text(path, raw.get("plain_text")), arms=arms, runs=runs, **optional)
    _check_steps(path, config)
    _check_source(path, config)
    return config


def _read_study_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """The recipe's keys on top of its `base` recipe's (MERGED_KEYS merged entry by entry)."""
    raw = yaml.safe_load(path.read_text()) or {}
    if "base" not in raw:
        return raw
    base = RECIPES / str(raw.pop("base"))
    if not base.is_file() or base.resolve() in seen:
        reason = "is not a file of" if not base.is_file() else "starts a cycle of bases in"
        raise StudyConfigError(f"{path}: base {base.name!r} {reason} {RECIPES}")
    merged = _read_study_yaml(base, (*seen, path.resolve()))
    for key, value in raw.items():
        both_dicts = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = {**merged[key], **value} if key in MERGED_KEYS and both_dicts else value
    return merged


def _plain_text(path: Path, entry: dict | None) -> dict | None:
    if entry is not None and (set(entry) != {"prompt_words"} or int(entry["prompt_words"]) < 1):
        raise StudyConfigError(f"{path}: plain_text must be {{prompt_words: N}} with N >= 1 (the prompts' length in "
                               f"words), got {entry}")
    return entry


def _check_source(path: Path, config: StudyConfig) -> None:
    from stack.from_gguf import PACKAGED_GGUFS

    if config.source not in PACKAGED_GGUFS:
        raise StudyConfigError(f"{path}: source {config.source!r} is not a packaged model; sources are "
                               f"{', '.join(PACKAGED_GGUFS)}")
    if not (RECIPES / config.stack_recipe).is_file():
        raise StudyConfigError(f"{path}: stack_recipe {config.stack_recipe!r} is not a file of {RECIPES}")


def _instruction_following(path: Path, entry: dict | None) -> dict | None:
    if entry is None:
        return None
    if set(entry) != {"steps", "evaluation"}:
        raise StudyConfigError(f"{path}: instruction_following must have exactly the keys steps and evaluation, "
                               f"got {sorted(entry)}")
    return {"steps": tuple(int(step) for step in entry["steps"]),
            "evaluation": tuple(str(flag) for flag in entry["evaluation"])}


def _arm(path: Path, name: str, entry: dict) -> Arm:
    unknown = sorted(set(entry) - {"description", "data", "heal"})
    if unknown:
        raise StudyConfigError(f"{path}: arm {name!r} has unknown key(s) {unknown}; keys are description, data, heal")
    if entry.get("data") not in DATA_KINDS:
        raise StudyConfigError(f"{path}: arm {name!r} has data {entry.get('data')!r}; expected one of {DATA_KINDS}")
    return Arm(name, entry.get("description", ""), entry["data"], dict(entry.get("heal") or {}))


def _run_entry(path: Path, entry: dict, arms: dict[str, Arm]) -> Run:
    if set(entry) != {"arm", "seed"}:
        raise StudyConfigError(f"{path}: run {entry} must have exactly the keys arm and seed")
    if entry["arm"] not in arms:
        raise StudyConfigError(f"{path}: run {entry} names arm {entry['arm']!r}, which `arms` does not define "
                               f"({', '.join(arms)})")
    return Run(entry["arm"], int(entry["seed"]))


def _check_steps(path: Path, config: StudyConfig) -> None:
    missing = [key for key in ("max_steps", "save_steps") if key not in config.heal]
    if missing:
        raise StudyConfigError(f"{path}: heal has no {' or '.join(missing)}: every run needs a budget and the "
                               "checkpoints its curve is evaluated at")
    save = config.heal["save_steps"]
    last = max(max_steps_of(config, arm) for arm in config.arms)
    instruction_steps = config.instruction_following["steps"] if config.instruction_following else ()
    bad = [step for step in (*config.eval_steps, *instruction_steps) if not save or step % save or step > last]
    if bad:
        raise StudyConfigError(f"{path}: eval_steps or instruction_following steps {bad} are not multiples of "
                               f"heal.save_steps ({save}) up to the longest arm's max_steps ({last}): no checkpoint "
                               "is there")
    for arm in config.arms.values():
        if not steps_of(config, arm.name):
            raise StudyConfigError(f"{path}: arm {arm.name!r} stops at max_steps {arm.heal['max_steps']}, before "
                                   f"the first of eval_steps {list(config.eval_steps)}")
    for kind in {arm.data for arm in config.arms.values()} & set(ANSWER_KINDS):
        if kind not in config.answers:
            raise StudyConfigError(f"{path}: an arm trains on {kind!r} answers, but `answers` has no {kind!r} entry")


def max_steps_of(config: StudyConfig, arm: str) -> int:
    """An arm's budget: the study's max_steps, or the arm's own (a costly on-policy arm stops early, a curve
    followed until it flattens goes further)."""
    return config.arms[arm].heal.get("max_steps", config.heal["max_steps"])


def steps_of(config: StudyConfig, arm: str) -> list[int]:
    """The eval_steps an arm reaches."""
    return [step for step in config.eval_steps if step <= max_steps_of(config, arm)]


def instruction_steps_of(config: StudyConfig, arm: str) -> list[int]:
    """The instruction_following steps an arm reaches, and its last eval step (where its curve ends)."""
    last = steps_of(config, arm)[-1]
    return sorted({step for step in config.instruction_following["steps"] if step <= last} | {last})


# ---- what a result is keyed by ------------------------------------------------------------------------------


def heal_key(config: StudyConfig, run: Run, data_hashes: dict[str, str]) -> dict:
    """Everything that shapes a run's heal (its checkpoints), without paths: the heal folder is named by its hash."""
    arm = config.arms[run.arm]
    key = {"source": config.source, "stack": _stack_recipe(config),
           "heal": {**_base_heal(), **config.heal, **arm.heal, "seed": run.seed},
           "data": data_hashes, "train_data": arm.data, "num_train_prompts": config.num_train_prompts}
    if arm.data in ANSWER_KINDS:
        key["answers"] = answers_key(config, arm.data, data_hashes)["answers"]
    if arm.heal.get("protect"):
        key["fisher"] = config.fisher
    return key


def run_key(config: StudyConfig, run: Run, data_hashes: dict[str, str]) -> dict:
    """Everything that shapes a run's result: the heal's key, the evaluation flags and steps. Its hash decides
    whether a stored result is current, and names the run's evaluation folder."""
    return {**heal_key(config, run, data_hashes), "evaluation": list(config.evaluation),
            "eval_steps": steps_of(config, run.arm), **_evaluation_inputs_key(config)}


def baseline_key(config: StudyConfig, data_hashes: dict[str, str]) -> dict:
    return {"source": config.source, "stack": _stack_recipe(config), "data": data_hashes,
            "evaluation": list(config.evaluation), **_evaluation_inputs_key(config)}


def _evaluation_inputs_key(config: StudyConfig) -> dict:
    """What the evaluation reads beyond the data files' hashes: nothing for a chat model's held-out rows (so the
    SmolLM2 study's keys are what they were before plain_text existed), the plain-text prompts' settings else."""
    return {} if config.plain_text is None else {"plain_text": config.plain_text}


def instructions_key(config: StudyConfig, run: Run | None, data_hashes: dict[str, str]) -> dict:
    """What shapes an instruction-following result: the source's (run None), or a run's at its steps."""
    key = {"source": config.source, "data": data_hashes,
           "instruction_following": list(config.instruction_following["evaluation"])}
    if run is not None:
        key.update(heal=heal_key(config, run, data_hashes), steps=instruction_steps_of(config, run.arm))
    return key


def raw_instructions_key(config: StudyConfig, data_hashes: dict[str, str]) -> dict:
    """The raw stack's instruction-following: the source's key and the stack recipe."""
    return {**instructions_key(config, None, data_hashes), "stack": _stack_recipe(config)}


def answers_key(config: StudyConfig, kind: str, data_hashes: dict[str, str]) -> dict:
    return {"source": config.source, "data": data_hashes, "num_train_prompts": config.num_train_prompts,
            "answers": config.answers[kind]}


def fisher_key(config: StudyConfig, data_hashes: dict[str, str]) -> dict:
    return {"source": config.source, "data": data_hashes, "num_train_prompts": config.num_train_prompts,
            "fisher": config.fisher, "recipe": (RECIPES / "fisher.yaml").read_text()}


def _stack_recipe(config: StudyConfig) -> str:
    return (RECIPES / config.stack_recipe).read_text()


def key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _base_heal() -> dict:
    """recipes/demo/heal.yaml without its paths (the study fills those in)."""
    paths = {"stack", "fisher", "datasets", "output_dir"}
    return {k: v for k, v in yaml.safe_load((RECIPES / "heal.yaml").read_text()).items() if k not in paths}


def stored_result(results_dir: Path, name: str, expected_hash: str) -> dict | None:
    """The stored result of `name` if it was computed under `expected_hash`; a stale one is reported."""
    path = results_dir / f"{name}.json"
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    if result.get("key_hash") != expected_hash:
        logger.info("%s: stored under another configuration (%s, now %s): it runs again", path,
                    result.get("key_hash"), expected_hash)
        return None
    return result


def write_result(results_dir: Path, name: str, result: dict) -> Path:
    """Written beside, then renamed: a results file is whole or absent."""
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.json"
    write_file_atomic(path, json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    return path


# ---- the shared inputs: data, source, raw stack, and (when a pending run needs them) answers and Fisher -----


class Workspace:
    """out/<preset>: the inputs every run shares, each made once and reused. Every stage's folder is named by the hash
    of what shapes it (answers-greedy-<hash>, runs/sft-s0-<hash>, ...), so a changed setting makes a new folder instead
    of reusing a stale one; the raw stack, which the adapters' configs point to by path, records its key beside it."""

    def __init__(self, workdir: Path, config: StudyConfig, cache_dir: Path | None):
        from demo.data import resolve_cache_dir

        self.workdir, self.config = workdir, config
        self.cache = resolve_cache_dir(cache_dir)
        self.source = self.cache / config.source
        self.data, self.raw = workdir / "data", workdir / "raw"
        self.data_hashes: dict[str, str] = {}

    def keyed(self, name: str, key: dict) -> Path:
        return self.workdir / f"{name}-{key_hash(key)}"

    def prepare(self) -> dict[str, str]:
        """Data, source and raw stack; returns the data files' hashes (part of every result's key)."""
        from demo.data import prepare
        from stack.from_gguf import PACKAGED_GGUFS, is_converted

        mark_output_dir(self.workdir, "demo")
        if not (self.data / "data.json").is_file():
            prepare(self.data, cache_dir=self.cache)
        if not is_converted(self.source):
            gguf = PACKAGED_GGUFS[self.config.source](self.cache)
            self.run_stage(self.source, "-m", "stack.from_gguf", gguf, self.source)
        self._stack()
        manifest = json.loads((self.data / "data.json").read_text())
        self.data_hashes = {name: entry["sha256"] for name, entry in sorted(manifest["files"].items())}
        return self.data_hashes

    def _stack(self) -> None:
        """The raw stack, restacked (--force: the folder is the study's own) when its recipe has changed."""
        record = self.workdir / "raw.key.json"
        key = {"source": self.config.source, "stack": _stack_recipe(self.config)}
        if (self.raw / "stack.json").is_file() and record.is_file() and json.loads(record.read_text()) == key:
            return
        self.run_stage(self.raw, "-m", "stack", RECIPES / self.config.stack_recipe, "--source", self.source,
                       "--out", self.raw, "--force")
        write_file_atomic(record, json.dumps(key) + "\n")

    def run_stage(self, output: Path, *command) -> None:
        """A stage's CLI (demo.run._run), its peak resident memory kept beside its output folder (peak_rss): a
        result reports it even when the stage ran in an earlier session."""
        peak = _run(*command)
        write_file_atomic(_rss_record(output), json.dumps({"peak_rss_mib": round(peak)}) + "\n")

    def train_prompts(self) -> Path:
        """The first num_train_prompts rows of instruct_train.jsonl: the same prompts for every arm."""
        return self._first_rows("instruct_train.jsonl", f"train-{self.config.num_train_prompts}.jsonl")

    def train_passages(self) -> Path:
        """The first num_train_prompts rows of text_train.jsonl: plain text, the loss on every token (CPT)."""
        return self._first_rows("text_train.jsonl", f"train-text-{self.config.num_train_prompts}.jsonl")

    def train_mix(self) -> Path:
        """num_train_prompts text rows: the first half of train_prompts' conversations, each written out by the
        source's chat template, alternating with the first half of train_passages (mix_rows)."""
        from transformers import AutoTokenizer

        count = self.config.num_train_prompts
        path = self.workdir / f"train-mix-{count}.jsonl"
        if not path.is_file():
            tokenizer = AutoTokenizer.from_pretrained(self.source)
            chats = [row["prompt"] + row["completion"] for row in read_jsonl(self.train_prompts())]
            passages = [row["text"] for row in read_jsonl(self.train_passages())]
            rows = mix_rows(chats[: (count + 1) // 2], passages[: count // 2],
                            lambda messages: chat_text(tokenizer, messages))
            write_file_atomic(path, "".join(json.dumps({"text": text}) + "\n" for text in rows))
        return path

    def _first_rows(self, data_file: str, name: str) -> Path:
        path = self.workdir / name
        if not path.is_file():
            rows = (self.data / data_file).read_text().splitlines()[: self.config.num_train_prompts]
            write_file_atomic(path, "\n".join(rows) + "\n")
        return path

    def train_data(self, kind: str) -> Path:
        if kind == "instruct":
            return self.train_prompts()
        if kind == "text":
            return self.train_passages()
        if kind == "mix":
            return self.train_mix()
        out = self.keyed(f"answers-{kind}", answers_key(self.config, kind, self.data_hashes))
        if not (out / "answers.jsonl").is_file():
            self.run_stage(out, "-m", "heal.answers", "--model", self.source, "--data", self.train_prompts(),
                           "--out", out, *cli_flags(self.config.answers[kind]))
        return out / "answers.jsonl"

    def fisher(self) -> Path:
        path = self.keyed("fisher", fisher_key(self.config, self.data_hashes)) / "fisher.safetensors"
        if not path.is_file():
            recipe = _write_recipe(RECIPES / "fisher.yaml", self.workdir / "recipes" / "fisher.yaml",
                                   model=str(self.source), datasets=[{"path": str(self.train_prompts())}],
                                   out=str(path.parent), **self.config.fisher)
            self.run_stage(path.parent, "-m", "fisher", recipe)
        return path

    def heal_recipe(self, run: Run, output_dir: Path, **overrides) -> Path:
        arm = self.config.arms[run.arm]
        protect = bool(arm.heal.get("protect"))
        return _write_recipe(
            RECIPES / "heal.yaml", self.workdir / "recipes" / f"{output_dir.name}.yaml",
            stack=str(self.raw), fisher=str(self.fisher()) if protect else None,
            datasets=[{"path": str(self.train_data(arm.data))}], output_dir=str(output_dir),
            **{"num_examples": None, **self.config.heal, **arm.heal, "seed": run.seed, **overrides})

    def evaluate(self, models: dict[str, Path], out: Path) -> dict:
        """The curves' metrics (loops, KL to the source, perplexity) of `models`, into out/eval.json."""
        return self._evaluation(models, out, "--reference", "source", *self.evaluation_inputs(),
                                *self.config.evaluation)

    def evaluation_inputs(self) -> list:
        """--prompts, --instruct (the KL's rows) and --text: a chat model's held-out prompts and conversations, or
        (plain_text: a base model) the openings of held-out passages and the held-out text itself; and the lm-eval
        tasks' folder when the evaluation flags name tasks."""
        text = self.data / "text_heldout.jsonl"
        if self.config.plain_text is None:
            inputs = ["--prompts", self.data / "prompts.jsonl", "--instruct", self.data / "instruct_heldout.jsonl"]
        else:
            inputs = ["--prompts", self.passage_openings(), "--instruct", text]
        inputs += ["--text", text]
        return inputs + (["--tasks-dir", self.data / "lm_eval_tasks"] if "--tasks" in self.config.evaluation else [])

    def passage_openings(self) -> Path:
        """plain_text's prompts, one per held-out passage (passage_openings), named by the passages' hash."""
        words = self.config.plain_text["prompt_words"]
        path = self.workdir / f"openings-{words}-{self.data_hashes['text_heldout.jsonl'][:16]}.jsonl"
        if not path.is_file():
            passages = [row["text"] for row in read_jsonl(self.data / "text_heldout.jsonl")]
            write_file_atomic(path, "".join(json.dumps(row) + "\n" for row in passage_openings(passages, words)))
        return path

    def evaluate_instructions(self, models: dict[str, Path], out: Path) -> dict:
        """IFEval's checkers on data/if_prompts.jsonl (no reference: the per-prompt scores pair across results)."""
        return self._evaluation(models, out, "--instructions", self.data / "if_prompts.jsonl",
                                *self.config.instruction_following["evaluation"])

    def _evaluation(self, models: dict[str, Path], out: Path, *flags) -> dict:
        """`python -m evaluation` on `models` with `flags` into out/, unless out/eval.json exists; its eval.json."""
        if not (out / "eval.json").is_file():
            self.run_stage(out, "-m", "evaluation",
                           *[f for name, path in models.items() for f in ("--model", f"{name}={path}")],
                           *flags, "--out", out, "--force")
        return json.loads((out / "eval.json").read_text())


def mix_rows(chats: list[list[dict]], passages: list[str], render: Callable[[list[dict]], str]) -> list[str]:
    """Chat rows and passages alternating, a chat row first: each conversation as the text its chat template makes
    (render), so that one text dataset holds both (SFTTrainer trains on one format at a time) and a distillation
    on it takes the KL on every token of both."""
    rendered = [render(messages) for messages in chats]
    mixed = [row for pair in zip(rendered, passages) for row in pair]
    shorter = min(len(rendered), len(passages))
    return mixed + rendered[shorter:] + passages[shorter:]


def chat_text(tokenizer, messages: list[dict]) -> str:
    """The conversation as its chat template writes it, for a text row. TRL encodes a text row with the tokenizer's
    special tokens, so a template that writes the BOS itself (Gemma's) is given without it when the tokenizer also
    adds one: the row then starts with one BOS, as the evaluation's chat rows do (template ids, no special tokens)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    adds_bos = tokenizer.bos_token is not None and tokenizer("").input_ids[:1] == [tokenizer.bos_token_id]
    return text.removeprefix(tokenizer.bos_token) if adds_bos else text


def passage_openings(passages: list[str], words: int) -> list[dict]:
    """{"text": the first `words` words of a passage, its line breaks kept} per passage, the last passage first: the
    evaluation's first --num-rows passages (KL, perplexity) come from one end of the held-out split, its first
    --num-prompts prompts from the other."""
    opening = re.compile(rf"\s*(?:\S+\s+){{0,{words - 1}}}\S+")
    return [{"text": opening.match(text)[0]} for text in reversed(passages)]


def peak_rss(output: Path) -> int | None:
    """The peak resident memory in MiB of the stage that wrote `output` (Workspace.run_stage), None if unrecorded."""
    record = _rss_record(output)
    return json.loads(record.read_text())["peak_rss_mib"] if record.is_file() else None


def _rss_record(output: Path) -> Path:
    return output.with_name(f"{output.name}.peak-rss.json")


def cli_flags(settings: dict) -> list:
    """YAML keys as flags: `key: value` -> --key value, `key: true` -> --key (a switch), `key: false` -> nothing."""
    flags = []
    for key, value in settings.items():
        flag = f"--{key.replace('_', '-')}"
        flags += [] if value is False else [flag] if value is True else [flag, value]
    return flags


# ---- one run, the baseline, the study ---------------------------------------------------------------------


def run_one(space: Workspace, run: Run, key: dict) -> dict:
    """Heal, then evaluate the source and every checkpoint of eval_steps."""
    output_dir = heal(space, run)
    steps = steps_of(space.config, run.arm)
    models = {"source": space.source, **{f"step{s}": output_dir / f"checkpoint-{s}" for s in steps}}
    start = time.monotonic()
    evaluation_dir = space.keyed(f"evals/{run.name}", key)
    evaluation = space.evaluate(models, evaluation_dir)
    return {"name": run.name, "arm": run.arm, "seed": run.seed, "key_hash": key_hash(key), "key": key,
            "description": space.config.arms[run.arm].description, "machine": machine(),
            "wall_seconds": {"heal": round(heal_seconds(output_dir), 1),
                             "evaluate": round(time.monotonic() - start, 1)},
            "peak_rss_mib": {"heal": peak_rss(output_dir), "evaluate": peak_rss(evaluation_dir)},
            "train_log": json.loads((output_dir / "trainer_state.json").read_text())["log_history"],
            "evaluation": slim(evaluation, keep_texts_of=f"step{steps[-1]}")}


def heal(space: Workspace, run: Run) -> Path:
    """The run's heal folder, healed first unless it is complete (an interrupted heal resumes from its checkpoint;
    a run that continues a shorter run's curve starts from that run's checkpoints)."""
    output_dir = space.keyed(f"runs/{run.name}", heal_key(space.config, run, space.data_hashes))
    if not (output_dir / "trainer_state.json").is_file():
        extend_from_shorter_run(space, run, output_dir)
        space.run_stage(output_dir, REPO / "heal" / "train.py", space.heal_recipe(run, output_dir))
    return output_dir


CONSTANT_SCHEDULES = ("constant", "constant_with_warmup")
EXTENDED_FROM = "extended_from.json"  # in a run's heal folder: the shorter run whose checkpoints it started from


def shorter_run(space: Workspace, run: Run) -> Path | None:
    """The finished heal folder of the longest run whose heal is this one's with a smaller max_steps (another arm's
    budget, or the study's), under a constant learning rate. Its checkpoints are this run's own first steps: with a
    constant rate, the adapter at step N does not depend on max_steps (the data order, the RNG and the rate do not;
    tests/test_heal.py resumes a heal to more steps and gets the longer heal bit for bit)."""
    key = heal_key(space.config, run, space.data_hashes)
    if key["heal"]["lr_scheduler_type"] not in CONSTANT_SCHEDULES:
        return None
    budgets = {max_steps_of(space.config, arm) for arm in space.config.arms}
    for steps in sorted((b for b in budgets if b < key["heal"]["max_steps"]), reverse=True):
        shorter = key_hash(at_budget(key, steps))
        done = [d for d in sorted(space.workdir.glob(f"runs/*-{shorter}")) if (d / "trainer_state.json").is_file()]
        if done:
            return done[0]
    return None


def at_budget(key: dict, steps: int) -> dict:
    """A heal key with another max_steps: under a constant rate, the key of the same heal stopped at `steps`."""
    return {**key, "heal": {**key["heal"], "max_steps": steps}}


def extend_from_shorter_run(space: Workspace, run: Run, output_dir: Path) -> None:
    """Hard-link the shorter run's checkpoints into a run's empty heal folder, so that the heal resumes from its last
    one. Each checkpoint is linked in a staging folder, then moved in whole: an interruption leaves complete
    checkpoints only, and a heal folder that has any is left as it is."""
    staging = output_dir.with_name(f"{output_dir.name}.extending")
    shutil.rmtree(staging, ignore_errors=True)  # an interrupted extension's leftovers
    base = shorter_run(space, run)
    if base is None or any(output_dir.glob("checkpoint-*")):
        return
    logger.info("%s continues %s: starting from its checkpoints", output_dir.name, base.name)
    staging.mkdir(parents=True)
    for checkpoint in sorted(base.glob("checkpoint-*")):
        shutil.copytree(checkpoint, staging / checkpoint.name, copy_function=os.link)
    runtime = json.loads((base / "train_results.json").read_text())["train_runtime"]
    output_dir.mkdir(parents=True, exist_ok=True)
    write_file_atomic(output_dir / EXTENDED_FROM, json.dumps({"run": base.name, "train_runtime": runtime}) + "\n")
    for checkpoint in sorted(staging.iterdir()):
        checkpoint.rename(output_dir / checkpoint.name)
    staging.rmdir()


def heal_seconds(output_dir: Path) -> float:
    """The Trainer's own clock (train_results.json), the same whether the heal ran now or in an earlier part; a run
    that continued a shorter one adds that run's."""
    seconds = json.loads((output_dir / "train_results.json").read_text())["train_runtime"]
    extended = output_dir / EXTENDED_FROM
    return seconds + (json.loads(extended.read_text())["train_runtime"] if extended.is_file() else 0.0)


def run_instructions(space: Workspace, run: Run | str, key: dict) -> dict:
    """Instruction-following of the source or the raw stack (run "source" or "raw") or of a run's checkpoints at
    its instruction steps."""
    if run in ("source", "raw"):
        name, models = run, {run: space.source if run == "source" else space.raw}
    else:
        name, heal_dir = run.name, heal(space, run)
        models = {f"step{s}": heal_dir / f"checkpoint-{s}" for s in instruction_steps_of(space.config, run.arm)}
    start = time.monotonic()
    evaluation_dir = space.keyed(f"evals/if-{name}", key)
    evaluation = space.evaluate_instructions(models, evaluation_dir)
    return {"name": name, "key_hash": key_hash(key), "key": key, "machine": machine(),
            "wall_seconds": {"evaluate": round(time.monotonic() - start, 1)},
            "peak_rss_mib": {"evaluate": peak_rss(evaluation_dir)},
            "evaluation": slim(evaluation, keep_texts_of=next(reversed(models)))}


def run_baseline(space: Workspace, key: dict) -> dict:
    """The source and the raw stack evaluated; the peak memory of the source's conversion and of the stacking too."""
    start = time.monotonic()
    evaluation_dir = space.keyed("evals/baseline", key)
    evaluation = space.evaluate({"source": space.source, "raw": space.raw}, evaluation_dir)
    return {"name": "baseline", "key_hash": key_hash(key), "key": key, "machine": machine(),
            "wall_seconds": {"evaluate": round(time.monotonic() - start, 1)},
            "peak_rss_mib": {"convert": peak_rss(space.source), "stack": peak_rss(space.raw),
                             "evaluate": peak_rss(evaluation_dir)},
            "evaluation": slim(evaluation, keep_texts_of="raw")}


def slim(evaluation: dict, keep_texts_of: str) -> dict:
    """eval.json without the continuations' text, except one model's (results stay small enough for git), and without
    the work folder's paths."""
    models = {}
    for name, model in evaluation["models"].items():
        texts = ("continuations", "fixed_continuations", "if_responses")
        models[name] = {k: v for k, v in model.items() if k not in texts or name in (keep_texts_of, "source")}
        models[name].pop("path", None)
    paths = ("prompts", "instruct", "text", "tasks_dir")
    return {**{k: v for k, v in evaluation.items() if k not in ("models", "config")}, "models": models,
            "config": {k: v for k, v in evaluation["config"].items() if k not in paths}}


def machine() -> dict:
    import torch

    # The 15-minute load average when the run ends: above the core count, other work shared the CPU and the wall
    # times overstate what the run alone would take.
    gpu = {"gpu": torch.cuda.get_device_name()} if torch.cuda.is_available() else {}
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "load_average_15min": round(os.getloadavg()[2], 2), **gpu}


@dataclass(frozen=True)
class Part:
    """One result of the study: folder/name.json (runs/ or instructions/), made by `make(key)` unless stored."""
    folder: str
    name: str  # baseline, source, raw, or a run's name (its curve and its instruction-following share it)
    key: dict
    make: Callable[[dict], dict]

    @property
    def label(self) -> str:
        return f"{self.folder}/{self.name}"


SHARED_PARTS = ("baseline", "source", "raw")  # the parts that belong to no run


def study_parts(space: Workspace, data_hashes: dict[str, str]) -> list[Part]:
    """The baseline, the source's and raw stack's instruction-following, and every run's curve and then its
    instruction-following, in the YAML's order."""
    config = space.config
    parts = [Part("runs", "baseline", baseline_key(config, data_hashes), lambda key: run_baseline(space, key))]
    scores_instructions = config.instruction_following is not None
    if scores_instructions:
        parts.append(Part("instructions", "source", instructions_key(config, None, data_hashes),
                          lambda key: run_instructions(space, "source", key)))
        parts.append(Part("instructions", "raw", raw_instructions_key(config, data_hashes),
                          lambda key: run_instructions(space, "raw", key)))
    for run in config.runs:
        parts.append(Part("runs", run.name, run_key(config, run, data_hashes),
                          lambda key, run=run: run_one(space, run, key)))
        if scores_instructions:
            parts.append(Part("instructions", run.name, instructions_key(config, run, data_hashes),
                              lambda key, run=run: run_instructions(space, run, key)))
    return parts


def is_stored(config: StudyConfig, part: Part) -> bool:
    return stored_result(REPO / config.results_dir / part.folder, part.name, key_hash(part.key)) is not None


def select_parts(config: StudyConfig, parts: list[Part], only: Sequence[str] | None) -> list[Part]:
    """The parts named in `only` (baseline, source, raw or run names), or all of them; an unknown name is an error."""
    if only is None:
        return parts
    known = [*SHARED_PARTS, *(run.name for run in config.runs)]
    unknown = sorted(set(only) - set(known))
    if unknown:
        raise StudyConfigError(f"--only {','.join(unknown)}: not a part of this study; parts are {', '.join(known)}")
    return [part for part in parts if part.name in only]


def run_study(config: StudyConfig, workdir: Path, budget_minutes: float, cache_dir: Path | None = None,
              only: Sequence[str] | None = None) -> list[str]:
    """The parts (study_parts; `only` selects some by name) whose result is missing or stale, in the YAML's order,
    starting no new part once `budget_minutes` have passed. Returns the labels of the parts still missing."""
    start = time.monotonic()
    results_dir = REPO / config.results_dir
    space = Workspace(workdir, config, cache_dir)
    pending = []
    for part in select_parts(config, study_parts(space, space.prepare()), only):
        if is_stored(config, part):
            logger.info("== %s: done (%s/%s.json)", part.label, results_dir, part.label)
            continue
        elapsed = (time.monotonic() - start) / 60
        if elapsed > budget_minutes:
            pending.append(part.label)
            continue
        logger.info("== %s (%.0f min into this session's %.0f)", part.label, elapsed, budget_minutes)
        logger.info("== %s: wrote %s", part.label, write_result(results_dir / part.folder, part.name,
                                                                part.make(part.key)))
    return pending


# ---- several study processes at once (a GPU machine) ------------------------------------------------------------


def work_units(config: StudyConfig, pending_names: Sequence[str], data_hashes: dict[str, str]) -> list[list[str]]:
    """The pending parts' names grouped into what one process runs in order: the shared parts together, and a run
    together with the pending runs that continue its curve (extends), so that the longer run starts from the
    shorter one's checkpoints instead of healing its first steps again. In the YAML's order."""
    keys = {run.name: heal_key(config, run, data_hashes) for run in config.runs}  # each read once: they read files
    units: list[list[str]] = []
    unit_of: dict[str, list[str]] = {}
    for name in dict.fromkeys(pending_names):
        if name in SHARED_PARTS:
            home = unit_of.get(SHARED_PARTS[0])
        else:
            home = next((unit_of[other] for other in unit_of if other in keys
                         and extends(keys[name], keys[other])), None)
        if home is None:
            home = []
            units.append(home)
        home.append(name)
        unit_of[SHARED_PARTS[0] if name in SHARED_PARTS else name] = home
    return units


def extends(longer: dict, shorter: dict) -> bool:
    """Whether heal key `longer` is `shorter` with more steps under a constant rate (shorter_run would reuse it)."""
    steps = shorter["heal"]["max_steps"]
    return (longer["heal"]["lr_scheduler_type"] in CONSTANT_SCHEDULES and steps < longer["heal"]["max_steps"]
            and at_budget(longer, steps) == shorter)


def unit_inputs(config: StudyConfig, names: Sequence[str]) -> list[str]:
    """The shared inputs the named runs train with: their answer sets (ANSWER_KINDS) and "fisher" when one is
    protected."""
    arms = [config.arms[run.arm] for run in config.runs if run.name in names]
    kinds = [arm.data for arm in arms if arm.data in ANSWER_KINDS]
    return list(dict.fromkeys(kinds + (["fisher"] if any(arm.heal.get("protect") for arm in arms) else [])))


def make_input(space: Workspace, name: str) -> None:
    """One of unit_inputs, made unless it exists."""
    if name == "fisher":
        space.fisher()
    else:
        space.train_data(name)


def run_parallel(config: StudyConfig, workdir: Path, budget_minutes: float, cache_dir: Path | None, preset: str,
                 jobs: int) -> list[str]:
    """run_study's parts in up to `jobs` study processes at once, one work unit each (`--only`), for a machine with
    room for several: one GPU holds many of these small heals, each process mostly Python overhead. The units start
    in the YAML's order, except that one whose shared inputs (answers, Fisher) are still being made (SharedInputs,
    one at a time, beside the runs) lets the next ready unit take its place. No unit starts after `budget_minutes`;
    each process's log is WORKDIR/logs/<first part>.log. Returns the labels still missing."""
    start = time.monotonic()
    space = Workspace(workdir, config, cache_dir)
    data_hashes = space.prepare()
    pending = [part for part in study_parts(space, data_hashes) if not is_stored(config, part)]
    queue = work_units(config, [part.name for part in pending], data_hashes)
    logger.info("%d parts to run in %d work units, %d at a time: %s", len(pending), len(queue), jobs,
                "; ".join(",".join(unit) for unit in queue))
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    running: dict[subprocess.Popen, tuple[list[str], float]] = {}
    inputs = SharedInputs(space)
    while queue or running:
        elapsed = (time.monotonic() - start) / 60
        if queue and elapsed > budget_minutes:
            logger.info("budget spent: %d work units not started", len(queue))
            queue.clear()
        unit = next_ready_unit(queue, inputs) if len(running) < jobs else None
        if unit is not None:
            running[_start_unit(unit, preset, workdir, budget_minutes - elapsed, cache_dir, logs)] = (
                unit, time.monotonic())
            continue
        for process in [process for process in running if process.poll() is not None]:
            unit, started = running.pop(process)
            log = logger.info if process.returncode == 0 else logger.error
            log("finished %s in %.0f s, exit code %d", ",".join(unit), time.monotonic() - started, process.returncode)
        time.sleep(2)
    inputs.close()
    return [part.label for part in pending if not is_stored(config, part)]


MADE_AT_ONCE_S = 1.0  # how long a first ask waits for its input: make_input returns in milliseconds when it exists


class SharedInputs:
    """The units' shared inputs (unit_inputs), each made once by make_input in one thread of this process, in the
    order the units first ask for them, while the runs go on. An input whose stage fails (its error is in the log)
    is not made again: the units that need it are skipped."""

    def __init__(self, space: Workspace):
        from concurrent.futures import ThreadPoolExecutor

        self.space = space
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="study-inputs")
        self.jobs: dict = {}  # input name -> its Future

    def state(self, name: str) -> str:
        """"ready", "making" (asked for now if it was not yet) or "failed"."""
        from concurrent.futures import wait

        if name not in self.jobs:
            self.jobs[name] = self.pool.submit(make_input, self.space, name)
            wait([self.jobs[name]], timeout=MADE_AT_ONCE_S)  # one already on disk is ready now, its unit not passed
        job = self.jobs[name]
        if not job.done():
            return "making"
        return "ready" if job.exception() is None else "failed"  # a failed stage raises SystemExit (demo.run._run)

    def close(self) -> None:
        """Make nothing more; an input being made is finished (the next run reuses it)."""
        self.pool.shutdown(wait=True, cancel_futures=True)


def next_ready_unit(queue: list[list[str]], inputs: SharedInputs) -> list[str] | None:
    """The first unit of `queue` whose inputs are all made, taken out of it; the units that need a failed input
    are dropped (logged). Every input a waiting unit needs is asked for, so it is made while the others run."""
    for unit in list(queue):
        states = {name: inputs.state(name) for name in unit_inputs(inputs.space.config, unit)}
        if "failed" in states.values():
            logger.error("skipped %s: its input %s failed", ",".join(unit),
                         ", ".join(repr(name) for name, state in states.items() if state == "failed"))
            queue.remove(unit)
        elif "making" not in states.values():
            queue.remove(unit)
            return unit
    return None


def _start_unit(unit: list[str], preset: str, workdir: Path, budget_minutes: float, cache_dir: Path | None,
                logs: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "demo", "--preset", preset, "--workdir", str(workdir),
               "--budget-minutes", f"{budget_minutes:.2f}", "--only", ",".join(unit),
               *(["--cache-dir", str(cache_dir)] if cache_dir else [])]
    log = logs / f"{unit[0]}.log"
    logger.info("started %s (log: %s)", ",".join(unit), log)
    with open(log, "a") as stream:
        return subprocess.Popen(command, cwd=REPO, stdout=stream, stderr=subprocess.STDOUT)


def rebuild(config: StudyConfig, workdir: Path, arm: str, steps: int, seed: int, cache_dir: Path | None) -> Path:
    """One arm's healed model at `steps`, merged, under WORKDIR/rebuild/: the same constant-rate heal stopped at
    `steps`, so it is the study's checkpoint-`steps` of that run."""
    if arm not in config.arms:
        raise StudyConfigError(f"--arm {arm!r}: not an arm of this study ({', '.join(config.arms)})")
    space = Workspace(workdir, config, cache_dir)
    space.prepare()
    run = Run(arm, seed)
    output_dir = space.keyed(f"rebuild/{run.name}-step{steps}", heal_key(config, run, space.data_hashes))
    _run(REPO / "heal" / "train.py", space.heal_recipe(run, output_dir, max_steps=steps, merge=True,
                                                        save_strategy="no"))
    return output_dir / "merged"


def main(argv: list[str] | None = None, preset: str = "study") -> int:
    """`python -m demo --preset PRESET ARGV`, PRESET one of STUDY_PRESETS."""
    parser = argparse.ArgumentParser(prog=f"python -m demo --preset {preset}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("out") / preset, help="weights and scratch (not in git)")
    parser.add_argument("--budget-minutes", type=float, default=90.0,
                        help="start no new run after this many minutes (a run took ~35 min alone on 2 cores)")
    parser.add_argument("--report", action="store_true", help="only rebuild the report from the stored results")
    parser.add_argument("--arm", help="rebuild this arm's healed model (with --steps and --seed)")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path)
    parser.add_argument("--only", type=lambda text: text.split(","), metavar="NAME[,NAME...]",
                        help="run only these parts: run names (sft-s0), baseline, source, raw; writes no report")
    parser.add_argument("--parallel", type=int, default=1, metavar="JOBS",
                        help="run the parts in up to JOBS processes at once (a GPU machine); logs in WORKDIR/logs")
    args = parser.parse_args(argv)
    if args.parallel < 1 or (args.parallel > 1 and args.only):
        parser.error("--parallel takes a number of processes >= 1, and not with --only (it passes --only itself)")
    setup_logging()
    from demo.study_report import write_study_report

    try:
        config = load_study(STUDY_PRESETS[preset])
        if args.arm:
            if args.steps is None:
                parser.error("--arm needs --steps (the budget to rebuild at)")
            logger.info("rebuilt: %s", rebuild(config, args.workdir.resolve(), args.arm, args.steps, args.seed,
                                               args.cache_dir))
            return 0
        if not args.report:
            workdir = args.workdir.resolve()
            if args.parallel > 1:
                pending = run_parallel(config, workdir, args.budget_minutes, args.cache_dir, preset, args.parallel)
            else:
                pending = run_study(config, workdir, args.budget_minutes, args.cache_dir, args.only)
            if pending:
                logger.info("budget spent; still to run: %s (run the same command again)", ", ".join(pending))
        if args.only:
            logger.info("--only: no report written (python -m demo --preset %s --report writes it)", preset)
            return 0
        logger.info("report: %s", write_study_report(config, REPO / config.results_dir, preset))
    except StudyConfigError as error:
        logger.error("%s", error)
        return 2
    return 0
