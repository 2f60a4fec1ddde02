"""The heal study: every arm's heal curve on the real SmolLM2 experiment, run in resumable parts.

    python -m demo --preset study                         # runs what is not in docs/study yet
    python -m demo --preset study --budget-minutes 60     # start no new run after 60 minutes
    python -m demo --preset study --report                # only rebuild docs/study/README.md and its plots
    python -m demo --preset study --arm self-distill --steps 200 --seed 0   # rebuild one healed model

Every value is in recipes/demo/study.yaml. Runs, results, keys and work folders: docs/architecture.md, section
"The heal study".
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from core.cli import setup_logging
from core.outputs import mark_output_dir, write_file_atomic
from demo.run import RECIPES, REPO, SOURCE_NAME, _run, _write_recipe

logger = logging.getLogger("demo.study")

STUDY_RECIPE = RECIPES / "study.yaml"
DATA_KINDS = ("instruct", "greedy", "sampled")  # what an arm trains on: the demo's answers, or the source's own


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
    num_train_prompts: int
    answers: dict  # data kind -> python -m heal.answers settings
    fisher: dict
    evaluation: tuple[str, ...]
    instruction_following: dict  # steps: checkpoints to score; evaluation: python -m evaluation flags
    arms: dict[str, Arm]
    runs: tuple[Run, ...]


def load_study(path: Path = STUDY_RECIPE) -> StudyConfig:
    """The study YAML as a StudyConfig; an unknown key, arm or data kind is an error that names it."""
    raw = yaml.safe_load(Path(path).read_text()) or {}
    fields = set(StudyConfig.__dataclass_fields__)
    unknown = sorted(set(raw) - fields)
    missing = sorted(fields - set(raw))
    if unknown or missing:
        raise StudyConfigError(f"{path}: unknown key(s) {unknown}, missing key(s) {missing}")
    arms = {name: _arm(path, name, entry) for name, entry in raw["arms"].items()}
    runs = tuple(_run_entry(path, entry, arms) for entry in raw["runs"])
    config = StudyConfig(
        results_dir=Path(raw["results_dir"]), heal=dict(raw["heal"]), eval_steps=tuple(raw["eval_steps"]),
        num_train_prompts=int(raw["num_train_prompts"]), answers=dict(raw["answers"]), fisher=dict(raw["fisher"]),
        evaluation=tuple(str(flag) for flag in raw["evaluation"]),
        instruction_following=_instruction_following(path, raw["instruction_following"]), arms=arms, runs=runs)
    _check_steps(path, config)
    return config


def _instruction_following(path: Path, entry: dict) -> dict:
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
    save, last = config.heal.get("save_steps"), config.heal.get("max_steps")
    bad = [step for step in (*config.eval_steps, *config.instruction_following["steps"])
           if not save or step % save or step > last]
    if bad:
        raise StudyConfigError(f"{path}: eval_steps or instruction_following steps {bad} are not multiples of "
                               f"heal.save_steps ({save}) up to heal.max_steps ({last}): no checkpoint is there")
    for arm in config.arms.values():
        if not steps_of(config, arm.name):
            raise StudyConfigError(f"{path}: arm {arm.name!r} stops at max_steps {arm.heal['max_steps']}, before "
                                   f"the first of eval_steps {list(config.eval_steps)}")
    for kind in {arm.data for arm in config.arms.values()} - {"instruct"}:
        if kind not in config.answers:
            raise StudyConfigError(f"{path}: an arm trains on {kind!r} answers, but `answers` has no {kind!r} entry")


def steps_of(config: StudyConfig, arm: str) -> list[int]:
    """The eval_steps an arm reaches: an arm may stop early (its own max_steps, e.g. a costly on-policy arm)."""
    last = config.arms[arm].heal.get("max_steps", config.heal["max_steps"])
    return [step for step in config.eval_steps if step <= last]


def instruction_steps_of(config: StudyConfig, arm: str) -> list[int]:
    """The instruction_following steps an arm reaches; an arm that stops before all of them: its last eval step."""
    last = steps_of(config, arm)[-1]
    return [step for step in config.instruction_following["steps"] if step <= last] or [last]


# ---- what a result is keyed by ------------------------------------------------------------------------------


def heal_key(config: StudyConfig, run: Run, data_hashes: dict[str, str]) -> dict:
    """Everything that shapes a run's heal (its checkpoints), without paths: the heal folder is named by its hash."""
    arm = config.arms[run.arm]
    key = {"source": SOURCE_NAME, "stack": _stack_recipe(), "heal": {**_base_heal(), **config.heal, **arm.heal,
                                                                     "seed": run.seed},
           "data": data_hashes, "train_data": arm.data, "num_train_prompts": config.num_train_prompts}
    if arm.data != "instruct":
        key["answers"] = answers_key(config, arm.data, data_hashes)["answers"]
    if arm.heal.get("protect"):
        key["fisher"] = config.fisher
    return key


def run_key(config: StudyConfig, run: Run, data_hashes: dict[str, str]) -> dict:
    """Everything that shapes a run's result: the heal's key, the evaluation flags and steps. Its hash decides
    whether a stored result is current, and names the run's evaluation folder."""
    return {**heal_key(config, run, data_hashes), "evaluation": list(config.evaluation),
            "eval_steps": list(config.eval_steps)}


def baseline_key(config: StudyConfig, data_hashes: dict[str, str]) -> dict:
    return {"source": SOURCE_NAME, "stack": _stack_recipe(), "data": data_hashes,
            "evaluation": list(config.evaluation)}


def instructions_key(config: StudyConfig, run: Run | None, data_hashes: dict[str, str]) -> dict:
    """What shapes an instruction-following result: the source's (run None), or a run's at its steps."""
    key = {"source": SOURCE_NAME, "data": data_hashes,
           "instruction_following": list(config.instruction_following["evaluation"])}
    if run is not None:
        key.update(heal=heal_key(config, run, data_hashes), steps=instruction_steps_of(config, run.arm))
    return key


def answers_key(config: StudyConfig, kind: str, data_hashes: dict[str, str]) -> dict:
    return {"source": SOURCE_NAME, "data": data_hashes, "num_train_prompts": config.num_train_prompts,
            "answers": config.answers[kind]}


def fisher_key(config: StudyConfig, data_hashes: dict[str, str]) -> dict:
    return {"source": SOURCE_NAME, "data": data_hashes, "num_train_prompts": config.num_train_prompts,
            "fisher": config.fisher, "recipe": (RECIPES / "fisher.yaml").read_text()}


def _stack_recipe() -> str:
    return (RECIPES / "mini-e6b.yaml").read_text()


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
    """out/study: the inputs every run shares, each made once and reused. Every stage's folder is named by the hash of
    what shapes it (answers-greedy-<hash>, runs/sft-s0-<hash>, ...), so a changed setting makes a new folder instead of
    reusing a stale one; the raw stack, which the adapters' configs point to by path, records its key beside it."""

    def __init__(self, workdir: Path, config: StudyConfig, cache_dir: Path | None):
        from demo.data import resolve_cache_dir

        self.workdir, self.config = workdir, config
        self.cache = resolve_cache_dir(cache_dir)
        self.source = self.cache / SOURCE_NAME
        self.data, self.raw = workdir / "data", workdir / "raw"
        self.data_hashes: dict[str, str] = {}

    def keyed(self, name: str, key: dict) -> Path:
        return self.workdir / f"{name}-{key_hash(key)}"

    def prepare(self) -> dict[str, str]:
        """Data, source and raw stack; returns the data files' hashes (part of every result's key)."""
        from demo.data import prepare
        from stack.from_gguf import convert_gguf, smollm2_gguf_path

        mark_output_dir(self.workdir, "demo")
        if not (self.data / "data.json").is_file():
            prepare(self.data, cache_dir=self.cache)
        convert_gguf(smollm2_gguf_path(), self.source)
        self._stack()
        manifest = json.loads((self.data / "data.json").read_text())
        self.data_hashes = {name: entry["sha256"] for name, entry in sorted(manifest["files"].items())}
        return self.data_hashes

    def _stack(self) -> None:
        """The raw stack, restacked (--force: the folder is the study's own) when its recipe has changed."""
        record = self.workdir / "raw.key.json"
        key = {"source": SOURCE_NAME, "stack": _stack_recipe()}
        if (self.raw / "stack.json").is_file() and record.is_file() and json.loads(record.read_text()) == key:
            return
        _run("-m", "stack", RECIPES / "mini-e6b.yaml", "--source", self.source, "--out", self.raw, "--force")
        write_file_atomic(record, json.dumps(key) + "\n")

    def train_prompts(self) -> Path:
        """The first num_train_prompts rows of instruct_train.jsonl: the same prompts for every arm."""
        path = self.workdir / f"train-{self.config.num_train_prompts}.jsonl"
        if not path.is_file():
            rows = (self.data / "instruct_train.jsonl").read_text().splitlines()[: self.config.num_train_prompts]
            write_file_atomic(path, "\n".join(rows) + "\n")
        return path

    def train_data(self, kind: str) -> Path:
        if kind == "instruct":
            return self.train_prompts()
        out = self.keyed(f"answers-{kind}", answers_key(self.config, kind, self.data_hashes))
        if not (out / "answers.jsonl").is_file():
            _run("-m", "heal.answers", "--model", self.source, "--data", self.train_prompts(), "--out", out,
                 *cli_flags(self.config.answers[kind]))
        return out / "answers.jsonl"

    def fisher(self) -> Path:
        path = self.keyed("fisher", fisher_key(self.config, self.data_hashes)) / "fisher.safetensors"
        if not path.is_file():
            recipe = _write_recipe(RECIPES / "fisher.yaml", self.workdir / "recipes" / "fisher.yaml",
                                   model=str(self.source), datasets=[{"path": str(self.train_prompts())}],
                                   out=str(path.parent), **self.config.fisher)
            _run("-m", "fisher", recipe)
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
        if not (out / "eval.json").is_file():
            _run("-m", "evaluation", *[f for name, path in models.items() for f in ("--model", f"{name}={path}")],
                 "--reference", "source", "--prompts", self.data / "prompts.jsonl",
                 "--instruct", self.data / "instruct_heldout.jsonl", "--text", self.data / "text_heldout.jsonl",
                 *self.config.evaluation, "--out", out, "--force")
        return json.loads((out / "eval.json").read_text())

    def evaluate_instructions(self, models: dict[str, Path], out: Path) -> dict:
        """IFEval's checkers on data/if_prompts.jsonl (no reference: the per-prompt scores pair across results)."""
        if not (out / "eval.json").is_file():
            _run("-m", "evaluation", *[f for name, path in models.items() for f in ("--model", f"{name}={path}")],
                 "--instructions", self.data / "if_prompts.jsonl", *self.config.instruction_following["evaluation"],
                 "--out", out, "--force")
        return json.loads((out / "eval.json").read_text())


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
    # The Trainer's own clock (train_results.json): the same whether the heal ran now or in an earlier part.
    heal_seconds = json.loads((output_dir / "train_results.json").read_text())["train_runtime"]
    steps = steps_of(space.config, run.arm)
    models = {"source": space.source, **{f"step{s}": output_dir / f"checkpoint-{s}" for s in steps}}
    start = time.monotonic()
    evaluation = space.evaluate(models, space.keyed(f"evals/{run.name}", key))
    return {"name": run.name, "arm": run.arm, "seed": run.seed, "key_hash": key_hash(key), "key": key,
            "description": space.config.arms[run.arm].description, "machine": machine(),
            "wall_seconds": {"heal": round(heal_seconds, 1), "evaluate": round(time.monotonic() - start, 1)},
            "train_log": json.loads((output_dir / "trainer_state.json").read_text())["log_history"],
            "evaluation": slim(evaluation, keep_texts_of=f"step{steps[-1]}")}


def heal(space: Workspace, run: Run) -> Path:
    """The run's heal folder, healed first unless it is complete (an interrupted heal resumes from its checkpoint)."""
    output_dir = space.keyed(f"runs/{run.name}", heal_key(space.config, run, space.data_hashes))
    if not (output_dir / "trainer_state.json").is_file():
        _run(REPO / "heal" / "train.py", space.heal_recipe(run, output_dir))
    return output_dir


def run_instructions(space: Workspace, run: Run | None, key: dict) -> dict:
    """Instruction-following of the source (run None) or of a run's checkpoints at its instruction steps."""
    if run is None:
        name, models = "source", {"source": space.source}
    else:
        name, heal_dir = run.name, heal(space, run)
        models = {f"step{s}": heal_dir / f"checkpoint-{s}" for s in instruction_steps_of(space.config, run.arm)}
    start = time.monotonic()
    evaluation = space.evaluate_instructions(models, space.keyed(f"evals/if-{name}", key))
    return {"name": name, "key_hash": key_hash(key), "key": key, "machine": machine(),
            "wall_seconds": {"evaluate": round(time.monotonic() - start, 1)},
            "evaluation": slim(evaluation, keep_texts_of=next(reversed(models)))}


def run_baseline(space: Workspace, key: dict) -> dict:
    start = time.monotonic()
    evaluation = space.evaluate({"source": space.source, "raw": space.raw}, space.keyed("evals/baseline", key))
    return {"name": "baseline", "key_hash": key_hash(key), "key": key, "machine": machine(),
            "wall_seconds": {"evaluate": round(time.monotonic() - start, 1)},
            "evaluation": slim(evaluation, keep_texts_of="raw")}


def slim(evaluation: dict, keep_texts_of: str) -> dict:
    """eval.json without the continuations' text, except one model's (results stay small enough for git)."""
    models = {}
    for name, model in evaluation["models"].items():
        texts = ("continuations", "fixed_continuations", "if_responses")
        models[name] = {k: v for k, v in model.items() if k not in texts or name in (keep_texts_of, "source")}
        models[name].pop("path", None)
    return {**{k: v for k, v in evaluation.items() if k not in ("models", "config")}, "models": models,
            "config": {k: v for k, v in evaluation["config"].items() if k not in ("prompts", "instruct", "text")}}


def machine() -> dict:
    import torch

    # The 15-minute load average when the run ends: above the core count, other work shared the CPU and the wall
    # times overstate what the run alone would take.
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "load_average_15min": round(os.getloadavg()[2], 2)}


def run_study(config: StudyConfig, workdir: Path, budget_minutes: float, cache_dir: Path | None = None) -> list[str]:
    """The baseline, the source's instruction-following and every run (its curve, then its instruction-following)
    whose result is missing or stale, in the YAML's order, starting no new part once `budget_minutes` have passed.
    Returns the names of the parts still missing."""
    start = time.monotonic()
    results_dir = REPO / config.results_dir
    space = Workspace(workdir, config, cache_dir)
    data_hashes = space.prepare()
    todo = [("runs", "baseline", baseline_key(config, data_hashes), lambda key: run_baseline(space, key)),
            ("instructions", "source", instructions_key(config, None, data_hashes),
             lambda key: run_instructions(space, None, key))]
    for run in config.runs:
        todo += [("runs", run.name, run_key(config, run, data_hashes), lambda key, run=run: run_one(space, run, key)),
                 ("instructions", run.name, instructions_key(config, run, data_hashes),
                  lambda key, run=run: run_instructions(space, run, key))]
    pending = []
    for folder, name, key, make in todo:
        part = f"{folder}/{name}"
        if stored_result(results_dir / folder, name, key_hash(key)) is not None:
            logger.info("== %s: done (%s/%s.json)", part, results_dir, part)
            continue
        elapsed = (time.monotonic() - start) / 60
        if elapsed > budget_minutes:
            pending.append(part)
            continue
        logger.info("== %s (%.0f min into this session's %.0f)", part, elapsed, budget_minutes)
        logger.info("== %s: wrote %s", part, write_result(results_dir / folder, name, make(key)))
    return pending


def rebuild(config: StudyConfig, workdir: Path, arm: str, steps: int, seed: int, cache_dir: Path | None) -> Path:
    """One arm's healed model at `steps`, merged, under WORKDIR/rebuild/: the same constant-rate heal stopped at
    `steps`, so it is the study's checkpoint-`steps` of that run."""
    if arm not in config.arms:
        raise StudyConfigError(f"--arm {arm!r}: not an arm of {STUDY_RECIPE} ({', '.join(config.arms)})")
    space = Workspace(workdir, config, cache_dir)
    space.prepare()
    run = Run(arm, seed)
    output_dir = space.keyed(f"rebuild/{run.name}-step{steps}", heal_key(config, run, space.data_hashes))
    _run(REPO / "heal" / "train.py", space.heal_recipe(run, output_dir, max_steps=steps, merge=True,
                                                        save_strategy="no"))
    return output_dir / "merged"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo --preset study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("out/study"), help="weights and scratch (not in git)")
    parser.add_argument("--budget-minutes", type=float, default=90.0,
                        help="start no new run after this many minutes (a run took ~35 min alone on 2 cores)")
    parser.add_argument("--report", action="store_true", help="only rebuild the report from the stored results")
    parser.add_argument("--arm", help="rebuild this arm's healed model (with --steps and --seed)")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path)
    args = parser.parse_args(argv)
    setup_logging()
    from demo.study_report import write_study_report

    try:
        config = load_study()
        if args.arm:
            if args.steps is None:
                parser.error("--arm needs --steps (the budget to rebuild at)")
            logger.info("rebuilt: %s", rebuild(config, args.workdir.resolve(), args.arm, args.steps, args.seed,
                                               args.cache_dir))
            return 0
        if not args.report:
            pending = run_study(config, args.workdir.resolve(), args.budget_minutes, args.cache_dir)
            if pending:
                logger.info("budget spent; still to run: %s (run the same command again)", ", ".join(pending))
        logger.info("report: %s", write_study_report(config, REPO / config.results_dir))
    except StudyConfigError as error:
        logger.error("%s", error)
        return 2
    return 0
