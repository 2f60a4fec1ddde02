"""The heal study: every arm's heal curve on the real SmolLM2 experiment, run in resumable parts.

    python -m demo --preset study                         # runs what is not in docs/study yet
    python -m demo --preset study --budget-minutes 60     # start no new run after 60 minutes
    python -m demo --preset study --report                # only rebuild docs/study/README.md and its plots
    python -m demo --preset study --arm self-distill --steps 200 --seed 0   # rebuild one healed model

recipes/demo/study.yaml holds every value. Each *run* (an arm at a seed) heals the raw stack with a constant
learning rate, keeps the adapter every `save_steps`, and evaluates the checkpoints at `eval_steps` against the
source (python -m evaluation on the adapter folders). Its result -- the evaluation at every step (per-item values
included, for paired intervals across arms), the training log and the wall times -- is one JSON file in
results_dir (tracked in git: docs/study/runs/). The *baseline* (source and raw stack) is one more.

A result is keyed by a hash of everything that shapes it (the run's heal recipe without paths, the data files'
hashes, the answer settings, the evaluation flags and steps). The study skips every run whose result is already
there with the same hash, so a later session on a fresh machine carries on where the last one stopped; a changed
value in the YAML re-runs exactly the runs it changes. Weights stay in the work folder (out/study), never in git.
A run interrupted midway resumes from its last checkpoint (heal/train.py resumes by itself).
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

from demo.run import RECIPES, REPO, SOURCE_NAME, _run, _write_recipe
from stack.atomic import mark_output_dir, write_file_atomic

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
        evaluation=tuple(str(flag) for flag in raw["evaluation"]), arms=arms, runs=runs)
    _check_steps(path, config)
    return config


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
    bad = [step for step in config.eval_steps if not save or step % save or step > last]
    if bad:
        raise StudyConfigError(f"{path}: eval_steps {bad} are not multiples of heal.save_steps ({save}) up to "
                               f"heal.max_steps ({last}): no checkpoint would exist there")
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


# ---- what a result is keyed by ------------------------------------------------------------------------------


def run_key(config: StudyConfig, run: Run, data_hashes: dict[str, str]) -> dict:
    """Everything that shapes a run's result, without paths: its hash decides whether a stored result is current."""
    arm = config.arms[run.arm]
    key = {"source": SOURCE_NAME, "heal": {**_base_heal(), **config.heal, **arm.heal, "seed": run.seed},
           "data": data_hashes, "train_data": arm.data, "num_train_prompts": config.num_train_prompts,
           "evaluation": list(config.evaluation), "eval_steps": list(config.eval_steps)}
    if arm.data != "instruct":
        key["answers"] = config.answers[arm.data]
    if arm.heal.get("protect"):
        key["fisher"] = config.fisher
    return key


def baseline_key(config: StudyConfig, data_hashes: dict[str, str]) -> dict:
    return {"source": SOURCE_NAME, "stack": (RECIPES / "mini-e6b.yaml").read_text(), "data": data_hashes,
            "evaluation": list(config.evaluation)}


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
    """out/study: the inputs every run shares, each made once and reused (each stage's own completeness check)."""

    def __init__(self, workdir: Path, config: StudyConfig, cache_dir: Path | None):
        from demo.data import resolve_cache_dir

        self.workdir, self.config = workdir, config
        self.cache = resolve_cache_dir(cache_dir)
        self.source = self.cache / SOURCE_NAME
        self.data, self.raw = workdir / "data", workdir / "raw"

    def prepare(self) -> dict[str, str]:
        """Data, source and raw stack; returns the data files' hashes (part of every result's key)."""
        from demo.data import prepare
        from stack.from_gguf import convert_gguf, smollm2_gguf_path

        mark_output_dir(self.workdir, "demo")
        if not (self.data / "data.json").is_file():
            prepare(self.data, cache_dir=self.cache)
        convert_gguf(smollm2_gguf_path(), self.source)
        if not (self.raw / "stack.json").is_file():
            _run("-m", "stack", RECIPES / "mini-e6b.yaml", "--source", self.source, "--out", self.raw)
        manifest = json.loads((self.data / "data.json").read_text())
        return {name: entry["sha256"] for name, entry in sorted(manifest["files"].items())}

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
        out = self.workdir / f"answers-{kind}"
        if not (out / "answers.jsonl").is_file():
            _run("-m", "heal.answers", "--model", self.source, "--data", self.train_prompts(), "--out", out,
                 *cli_flags(self.config.answers[kind]))
        return out / "answers.jsonl"

    def fisher(self) -> Path:
        path = self.workdir / "fisher" / "fisher.safetensors"
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


def cli_flags(settings: dict) -> list:
    """YAML keys as flags: `key: value` -> --key value, `key: true` -> --key (a switch), `key: false` -> nothing."""
    flags = []
    for key, value in settings.items():
        flag = f"--{key.replace('_', '-')}"
        flags += [] if value is False else [flag] if value is True else [flag, value]
    return flags


# ---- one run, the baseline, the study ---------------------------------------------------------------------


def run_one(space: Workspace, run: Run, key: dict) -> dict:
    """Heal (resuming if a checkpoint exists), then evaluate the source and every checkpoint of eval_steps."""
    output_dir = space.workdir / "runs" / run.name
    start = time.monotonic()
    if not (output_dir / "trainer_state.json").is_file():
        _run(REPO / "heal" / "train.py", space.heal_recipe(run, output_dir))
    heal_seconds = time.monotonic() - start
    steps = steps_of(space.config, run.arm)
    models = {"source": space.source, **{f"step{s}": output_dir / f"checkpoint-{s}" for s in steps}}
    start = time.monotonic()
    evaluation = space.evaluate(models, space.workdir / "evals" / run.name)
    return {"name": run.name, "arm": run.arm, "seed": run.seed, "key_hash": key_hash(key), "key": key,
            "description": space.config.arms[run.arm].description, "machine": machine(),
            "wall_seconds": {"heal": round(heal_seconds, 1), "evaluate": round(time.monotonic() - start, 1)},
            "train_log": json.loads((output_dir / "trainer_state.json").read_text())["log_history"],
            "evaluation": slim(evaluation, keep_texts_of=f"step{steps[-1]}")}


def run_baseline(space: Workspace, key: dict) -> dict:
    start = time.monotonic()
    evaluation = space.evaluate({"source": space.source, "raw": space.raw}, space.workdir / "evals" / "baseline")
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
    """The baseline and every run whose result is missing or stale, in the YAML's order, starting no new run once
    `budget_minutes` have passed. Returns the names of the runs still missing."""
    start = time.monotonic()
    results_dir = REPO / config.results_dir / "runs"
    space = Workspace(workdir, config, cache_dir)
    data_hashes = space.prepare()
    pending = []
    todo = [("baseline", baseline_key(config, data_hashes), None)]
    todo += [(run.name, run_key(config, run, data_hashes), run) for run in config.runs]
    for name, key, run in todo:
        if stored_result(results_dir, name, key_hash(key)) is not None:
            logger.info("== %s: done (%s/%s.json)", name, results_dir, name)
            continue
        elapsed = (time.monotonic() - start) / 60
        if elapsed > budget_minutes:
            pending.append(name)
            continue
        logger.info("== %s (%.0f min into this session's %.0f)", name, elapsed, budget_minutes)
        result = run_baseline(space, key) if run is None else run_one(space, run, key)
        logger.info("== %s: wrote %s", name, write_result(results_dir, name, result))
    return pending


def rebuild(config: StudyConfig, workdir: Path, arm: str, steps: int, seed: int, cache_dir: Path | None) -> Path:
    """One arm's healed model at `steps`, merged, under WORKDIR/rebuild/: the same constant-rate heal stopped at
    `steps`, so it is the study's checkpoint-`steps` of that run."""
    if arm not in config.arms:
        raise StudyConfigError(f"--arm {arm!r}: not an arm of {STUDY_RECIPE} ({', '.join(config.arms)})")
    space = Workspace(workdir, config, cache_dir)
    space.prepare()
    run = Run(arm, seed)
    output_dir = workdir / "rebuild" / f"{run.name}-step{steps}"
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
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
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
