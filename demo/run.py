"""`make demo`: the miniature E4B -> E6B experiment, on a real instruction-tuned model that runs on a CPU.

    python -m demo                      # the full experiment
    python -m demo --preset reduced     # the few-minute variant the test suite runs
    python -m demo --preset study       # the heal study, in resumable parts (demo/study.py)
    python -m demo --preset gemma3      # the same study harness on Gemma-3-270M (base), healed by CPT

SmolLM2-135M-Instruct stacked 30 -> 48 layers, healed in several arms at equal budgets and evaluated side by
side, each stage by the project's own CLI: docs/architecture.md, section "The demo: `make demo`".
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from core.cli import check_keys, field_names, setup_logging
from core.outputs import OutputExistsError, guard_output_dir, mark_output_dir, staged_output

logger = logging.getLogger("demo")

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes" / "demo"
SOURCE_NAME = "SmolLM2-135M-Instruct"
# The presets that are heal studies (demo/study.py), each with its own recipe: name -> recipes/demo file.
STUDY_PRESETS = {"study": RECIPES / "study.yaml", "study-gpu": RECIPES / "study-gpu.yaml",
                 "gemma3": RECIPES / "gemma3.yaml", "gemma3-gpu": RECIPES / "gemma3-gpu.yaml"}


@dataclass(frozen=True)
class Arm:
    name: str
    description: str
    overrides: dict  # heal recipe keys on top of recipes/demo/heal.yaml


ARMS = {
    arm.name: arm
    for arm in (
        Arm("heal", "seam LoRA, SFT on the data, no protection", {"objective": "sft", "protect": False}),
        Arm("heal+fisher", "seam LoRA, SFT, Fisher-subspace protection", {"objective": "sft", "protect": True}),
        Arm("distill", "seam LoRA, KL(source ‖ student) on the same inputs",
            {"objective": "distill", "protect": False}),
        Arm("distill+fisher", "seam LoRA, distillation, Fisher-subspace protection",
            {"objective": "distill", "protect": True}),
    )
}


@dataclass(frozen=True)
class Preset:
    arms: tuple[str, ...]
    heal: dict  # heal recipe keys: the training budget, equal for every arm
    fisher: dict  # fisher recipe keys
    eval_args: tuple[str, ...]  # python -m evaluation flags
    data_args: dict = field(default_factory=dict)  # demo.data.prepare keywords


class PresetError(ValueError):
    pass


def load_presets(path: Path = RECIPES / "presets.yaml") -> dict[str, Preset]:
    """The presets of recipes/demo/presets.yaml; an unknown key or arm is an error that names it."""
    presets = {}
    for name, raw in (yaml.safe_load(path.read_text()) or {}).items():
        check_keys(raw, field_names(Preset), f"{path}: preset {name!r}", PresetError)
        bad_arms = [arm for arm in raw.get("arms", []) if arm not in ARMS]
        if bad_arms:
            raise PresetError(f"{path}: preset {name!r} names unknown arm(s) {bad_arms}; arms are {', '.join(ARMS)}")
        presets[name] = Preset(arms=tuple(raw["arms"]), heal=dict(raw["heal"]), fisher=dict(raw["fisher"]),
                               eval_args=tuple(str(flag) for flag in raw["eval_args"]),
                               data_args=dict(raw.get("data_args") or {}))
    return presets


PRESETS = load_presets()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    study = study_preset(argv)
    if study is not None:  # a study has its own options (demo/study.py)
        from demo.study import main as study_main

        return study_main([arg for arg in argv if arg not in ("--preset", study, f"--preset={study}")], study)
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("out/demo"),
                        help="where every stage writes (default: out/demo)")
    parser.add_argument("--preset", choices=[*sorted(PRESETS), *STUDY_PRESETS], default="full",
                        help="study, gemma3 (and their -gpu twins): the heal studies of recipes/demo/study.yaml and "
                        "gemma3.yaml (python -m demo --preset study --help)")
    parser.add_argument("--force", action="store_true",
                        help="delete WORKDIR first and run every stage again (also a folder the demo did not write)")
    parser.add_argument("--cache-dir", type=Path,
                        help="downloads and the converted source (default: $HEAL_DEMO_CACHE or .venv/share/heal-demo)")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        # Never fill or delete a folder the demo did not write, unless told: `--workdir out` must not take
        # the raw stack in out/ with it.
        guard_output_dir(args.workdir, "demo", args.force)
    except OutputExistsError as error:
        logger.error("%s", error)
        return 2
    if args.force:
        shutil.rmtree(args.workdir, ignore_errors=True)
    run_demo(args.workdir.resolve(), PRESETS[args.preset], args.preset, args.cache_dir)
    return 0


def study_preset(argv: list[str]) -> str | None:
    """The study preset (STUDY_PRESETS) that `python -m demo ARGV` runs, if any: demo/study.py parses the rest of
    ARGV."""
    for name in STUDY_PRESETS:
        pairs = zip(argv, argv[1:])
        if f"--preset={name}" in argv or any(flag == "--preset" and value == name for flag, value in pairs):
            return name
    return None


def run_demo(workdir: Path, preset: Preset, preset_name: str, cache_dir: Path | None = None) -> Path:
    """Every stage in order, each skipped when its output exists; returns WORKDIR/results/results.md."""
    from demo.data import prepare, resolve_cache_dir
    from stack.from_gguf import convert_gguf, smollm2_gguf_path

    mark_output_dir(workdir, "demo")
    cache = resolve_cache_dir(cache_dir)
    source, data = cache / SOURCE_NAME, workdir / "data"
    logger.info("demo preset %r in %s:\n%s", preset_name, workdir, json.dumps(_describe(preset), indent=2))
    stage = _Stages(workdir / "stage_seconds.json")
    stage("data", data / "data.json", lambda: prepare(data, cache_dir=cache, **preset.data_args))
    convert_gguf(smollm2_gguf_path(), source)  # reuses an earlier conversion itself, by its own completeness check
    stage("stack", workdir / "raw" / "stack.json",
          lambda: _run("-m", "stack", RECIPES / "mini-e6b.yaml", "--source", source, "--out", workdir / "raw"))
    if any(ARMS[name].overrides["protect"] for name in preset.arms):
        fisher_recipe = _write_recipe(RECIPES / "fisher.yaml", workdir / "recipes" / "fisher.yaml", model=str(source),
                                      datasets=[{"path": str(data / "instruct_train.jsonl")}],
                                      out=str(workdir / "fisher"), **preset.fisher)
        stage("fisher", workdir / "fisher" / "fisher.safetensors", lambda: _run("-m", "fisher", fisher_recipe))
    for name in preset.arms:
        recipe = _heal_recipe(workdir, name, preset)
        stage(f"heal {name}", workdir / f"heal-{name}" / "merged" / "config.json",
              lambda recipe=recipe: _run(REPO / "heal" / "train.py", recipe))
    stage("evaluate", workdir / "eval" / "eval.json", lambda: _run(
        "-m", "evaluation", *_eval_models(workdir, source, preset), "--reference", "source",
        "--prompts", data / "prompts.jsonl", "--instruct", data / "instruct_heldout.jsonl",
        "--text", data / "text_heldout.jsonl",
        "--tasks-dir", data / "lm_eval_tasks", *preset.eval_args, "--out", workdir / "eval"))
    for name in preset.arms:  # each healed model's card again, now with its evaluation against the source
        _run("-m", "heal.card", workdir / "recipes" / f"heal-{name}.yaml", "--eval", workdir / "eval" / "eval.json")
    results = write_results(workdir, preset, preset_name, stage.seconds)
    logger.info("results: %s", results)
    return results


# ---- stages ------------------------------------------------------------------------------------------------


class _Stages:
    """Runs each stage unless its complete output exists, and keeps each stage's wall time on disk
    (so a resumed demo still reports the stages it skipped)."""

    def __init__(self, record: Path):
        self.record = record
        self.seconds: dict[str, float] = json.loads(record.read_text()) if record.is_file() else {}

    def __call__(self, name: str, done: Path, action) -> None:
        if done.exists():
            logger.info("== %s: done already (%s exists), skipped", name, done)
            return
        logger.info("== %s", name)
        start = time.monotonic()
        action()
        self.seconds[name] = round(time.monotonic() - start, 1)
        self.record.write_text(json.dumps(self.seconds, indent=2))
        logger.info("== %s: %.0f s", name, self.seconds[name])


def _run(*command) -> float:
    """One of the project's CLIs under this Python, its output (progress bars included) streamed here. Returns its
    peak resident memory in MiB (the largest of its own and its waited-for children's)."""
    command = [sys.executable, *map(str, command)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    logger.info("$ %s", " ".join(command))
    process = subprocess.Popen(command, cwd=REPO, env=env)
    # wait4, not Popen.wait: it also returns the child's resource usage; Linux reports ru_maxrss in KiB.
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    if process.returncode != 0:  # the stage's own exit status: 2 for a user error, as in every entry point
        logger.error("`%s` failed with exit code %d (its log is above)", " ".join(command), process.returncode)
        raise SystemExit(process.returncode)
    return usage.ru_maxrss / 1024


def _write_recipe(base: Path, path: Path, **overrides) -> Path:
    recipe = {**yaml.safe_load(base.read_text()), **overrides}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _heal_recipe(workdir: Path, arm: str, preset: Preset) -> Path:
    """recipes/demo/heal.yaml + the preset's budget + the arm's objective and protection + this run's paths."""
    protect = ARMS[arm].overrides["protect"]
    return _write_recipe(
        RECIPES / "heal.yaml", workdir / "recipes" / f"heal-{arm}.yaml",
        stack=str(workdir / "raw"), fisher=str(workdir / "fisher" / "fisher.safetensors") if protect else None,
        datasets=[{"path": str(workdir / "data" / "instruct_train.jsonl")}], output_dir=str(workdir / f"heal-{arm}"),
        **preset.heal, **ARMS[arm].overrides,
    )


def _eval_models(workdir: Path, source: Path, preset: Preset) -> list[str]:
    arms = {arm: workdir / f"heal-{arm}" / "merged" for arm in preset.arms}
    models = {"source": source, "raw": workdir / "raw", **arms}
    return [flag for name, path in models.items() for flag in ("--model", f"{name}={path}")]


def _describe(preset: Preset) -> dict:
    return {"arms": {name: ARMS[name].description for name in preset.arms}, "heal budget (every arm)": preset.heal,
            "fisher": preset.fisher, "evaluation": " ".join(preset.eval_args)}


# ---- results -----------------------------------------------------------------------------------------------


def write_results(workdir: Path, preset: Preset, preset_name: str, seconds: dict[str, float]) -> Path:
    """WORKDIR/results/: results.md (what each arm is, the shared budget, the wall time of each stage, then
    the evaluation's table and samples), results.json and eval.png."""
    evaluation = json.loads((workdir / "eval" / "eval.json").read_text())
    lines = [
        f"# Miniature E4B -> E6B: {SOURCE_NAME}, 30 -> 48 layers (preset `{preset_name}`)",
        "",
        f"Reproduce: `python -m demo --preset {preset_name} --force` (`make demo` runs the full preset).",
        "",
        "| model | what it is |",
        "|---|---|",
        f"| source | {SOURCE_NAME}, 30 layers |",
        "| raw | the 48-layer stack, untrained (recipes/demo/mini-e6b.yaml) |",
        *(f"| {name} | {ARMS[name].description} |" for name in preset.arms),
        "",
        f"Every heal arm has the same budget: `{json.dumps(preset.heal)}` on top of recipes/demo/heal.yaml. "
        "This is the short budget that fits a 30-minute demo: the heals stop long before they converge. The heal "
        "study (`python -m demo --preset study`, docs/study/) follows each arm to its end.",
        "",
        "| stage | wall time (s) |",
        "|---|---|",
        *(f"| {name} | {value:.0f} |" for name, value in seconds.items()),
        f"| total | {sum(seconds.values()):.0f} |",
        "",
        (workdir / "eval" / "eval.md").read_text(),
    ]
    summary = {"preset": preset_name, "stage_seconds": seconds, "heal_budget": preset.heal,
               "metrics": {name: model["metrics"] for name, model in evaluation["models"].items()},
               "intervals": {name: model["intervals"] for name, model in evaluation["models"].items()},
               "differences": evaluation["differences"]}
    with staged_output(workdir / "results", stage="demo-results") as tmp:
        (tmp / "results.md").write_text("\n".join(lines))
        (tmp / "results.json").write_text(json.dumps(summary, indent=2))
        shutil.copyfile(workdir / "eval" / "eval.png", tmp / "eval.png")
    return workdir / "results" / "results.md"
