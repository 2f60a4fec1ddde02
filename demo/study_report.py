"""The study's report, from the stored results alone (docs/study/runs/*.json): README.md with the curves' table,
the targets, the paired differences between arms, and two plots: curves.png (each metric against training tokens,
one line per arm) and pareto.png (KL to the source against the length-controlled seq-rep-4, every checkpoint).
Protected arms (named `twin+protection`) are also compared with their unprotected twin at equal quality: at the
loop rate both reach (`compare_at_equal_quality`).

Runs of one arm at several seeds are averaged per item (per prompt, row or passage) before any interval, so an
arm's interval is over items of the seed-mean, and the seed-to-seed spread (min-max of the per-seed estimates)
is reported beside it.
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evaluation import stats

logger = logging.getLogger(__name__)

# The curves' metrics: name -> (label, how its items combine: "mean" of values or "ratio" of (Σ num, Σ den), the
# transform of a ratio). Lower is better for all four.
METRICS = {
    "fixed_seq_rep_4": ("seq-rep-4 at 96 tokens", "mean", None),
    "fixed_loop_rate": ("loop rate at 96 tokens", "mean", None),
    "kl_to_reference": ("KL to the source (nats/token)", "ratio", None),
    "perplexity": ("held-out perplexity", "ratio", math.exp),
}
# Instruction-following (results_dir/instructions/): higher is better.
IF_METRICS = {
    "if_prompt_strict": ("IFEval prompt-level strict", "mean", None),
    "if_instruction_loose": ("IFEval instruction-level loose", "ratio", None),
}
SPECS = {**METRICS, **IF_METRICS}
# The study's targets (issue 16): loops within the source's + 0.05, perplexity <= 1.1x the source's, KL <= 0.15.
LOOP_MARGIN, PERPLEXITY_FACTOR, KL_TARGET = 0.05, 1.1, 0.15
RESAMPLES = 2000
# What an arm's curve toward the source carries, for comparisons at equal loop rate.
CURVE_METRICS = ("fixed_loop_rate", "kl_to_reference", "perplexity")
# Arms compared at equal steps are compared at this step, or at the last step both reach if they do not.
EQUAL_STEP = 200
# The unprotected arm every other unprotected arm is compared with at equal quality (the best so far).
BEST_ARM = "self-distill"


def load_results(results_dir: Path) -> tuple[dict | None, list[dict]]:
    runs_dir = results_dir / "runs"
    paths = sorted(runs_dir.glob("*.json")) if runs_dir.is_dir() else []
    results = [json.loads(path.read_text()) for path in paths]
    baseline = next((r for r in results if r["name"] == "baseline"), None)
    return baseline, [r for r in results if r["name"] != "baseline"]


def step_of(model_name: str) -> int:
    return int(model_name.removeprefix("step"))


def tokens_at(train_log: list[dict], step: int) -> float:
    """Training tokens seen by `step` (TRL logs the running count as num_tokens every logging_steps). Before
    HealTrainer restored the count on resume, a resumed heal's count restarted from 0 at its checkpoint: a drop is
    read as such a restart, and the count before it carried on."""
    offset, previous, seen = 0.0, 0.0, math.nan
    for entry in train_log:
        if "num_tokens" not in entry or entry["step"] > step:
            continue
        if entry["num_tokens"] < previous:
            offset += previous
        previous = entry["num_tokens"]
        seen = offset + previous
    return seen


def seed_mean_items(runs: list[dict], model: str, metric: str) -> np.ndarray:
    """The metric's items at one checkpoint, averaged over the runs (seeds): [items] or [items, 2] for ratios."""
    stacked = np.array([run["evaluation"]["models"][model]["items"][metric] for run in runs], dtype=float)
    return stacked.mean(axis=0)


def interval(items: np.ndarray, metric: str) -> stats.Interval:
    _, kind, transform = SPECS[metric]
    if kind == "ratio":
        return stats.bootstrap_ratio(items[:, 0], items[:, 1], transform=transform, num_resamples=RESAMPLES)
    return stats.bootstrap_mean(items, num_resamples=RESAMPLES)


def paired(a: np.ndarray, b: np.ndarray, metric: str) -> stats.Interval:
    _, kind, transform = SPECS[metric]
    if kind == "ratio":
        return stats.paired_ratio_difference(a[:, 0], a[:, 1], b[:, 0], b[:, 1], transform=transform,
                                             num_resamples=RESAMPLES)
    return stats.paired_mean_difference(a, b, num_resamples=RESAMPLES)


def estimate(items: np.ndarray, metric: str) -> float:
    _, kind, transform = SPECS[metric]
    if kind == "ratio":
        value = items[:, 0].sum() / items[:, 1].sum()
        return transform(value) if transform else value
    return float(items.mean())


def arm_points(runs: list[dict]) -> dict[str, list[dict]]:
    """arm -> one point per evaluated step: tokens, minutes, seeds, and per metric its seed-mean items, interval and
    the per-seed estimates."""
    by_arm: dict[str, list[dict]] = defaultdict(list)
    for run in runs:
        by_arm[run["arm"]].append(run)
    points = {}
    for arm, arm_runs in by_arm.items():
        models = sorted((m for m in arm_runs[0]["evaluation"]["models"] if m.startswith("step")), key=step_of)
        max_step = max(step_of(m) for m in models)
        arm_points_list = []
        for model in models:
            step = step_of(model)
            point = {"step": step, "seeds": [r["seed"] for r in arm_runs],
                     "tokens": float(np.mean([tokens_at(r["train_log"], step) for r in arm_runs])),
                     # heal wall time prorated by steps (the heal runs at a steady rate after its first steps)
                     "minutes": float(np.mean([r["wall_seconds"]["heal"] for r in arm_runs])) * step / max_step / 60,
                     "items": {}, "intervals": {}, "per_seed": {}}
            for metric in METRICS:
                items = seed_mean_items(arm_runs, model, metric)
                point["items"][metric] = items
                point["intervals"][metric] = interval(items, metric)
                point["per_seed"][metric] = [estimate(np.array(r["evaluation"]["models"][model]["items"][metric],
                                                               dtype=float), metric) for r in arm_runs]
            arm_points_list.append(point)
        points[arm] = arm_points_list
    return points


def reference_points(baseline: dict) -> dict[str, dict]:
    """The source's and the raw stack's items and intervals, from the baseline result."""
    out = {}
    for model in ("source", "raw"):
        items = {metric: np.array(baseline["evaluation"]["models"][model]["items"][metric], dtype=float)
                 for metric in METRICS}
        out[model] = {"items": items, "intervals": {m: interval(items[m], m) for m in METRICS}}
    return out


def meets_targets(point: dict, source: dict) -> dict[str, bool]:
    """Each target against the source's estimate (the instruction-following target is not measured on the curves)."""
    src = {metric: source["intervals"][metric].estimate for metric in METRICS}
    values = {metric: point["intervals"][metric].estimate for metric in METRICS}
    return {"loops": values["fixed_seq_rep_4"] <= src["fixed_seq_rep_4"] + LOOP_MARGIN,
            "perplexity": values["perplexity"] <= PERPLEXITY_FACTOR * src["perplexity"],
            "kl": values["kl_to_reference"] <= KL_TARGET}


# ---- comparisons at equal quality (equal length-controlled loop rate) --------------------------------------


def arm_curve(arm_points_list: list[dict], raw: dict) -> dict[str, list[np.ndarray]]:
    """The path an arm takes from the raw stack: metric -> items per point, the raw stack (step 0) first, then the
    arm's checkpoints in step order. Loop items are per prompt [prompts], KL and perplexity per row [rows, 2]."""
    ordered = sorted(arm_points_list, key=lambda point: point["step"])
    return {metric: [raw["items"][metric], *(point["items"][metric] for point in ordered)]
            for metric in CURVE_METRICS}


def values_at_level(loop_rates: np.ndarray, values: np.ndarray, level: float) -> np.ndarray:
    """Per curve (a row of points in step order: [curves, points] or one curve [points]), the value where its loop
    rate first falls to `level`: the first point at or below the level, interpolated linearly in loop rate with
    the point before it (which is above the level); a curve that starts at or below it gives its first value, one
    that never reaches it NaN. Returns [curves]."""
    loop_rates, values = np.atleast_2d(loop_rates), np.atleast_2d(values)
    at_or_below = loop_rates <= level
    first = at_or_below.argmax(axis=1)  # 0 also where no point is at or below; `reached` masks those
    reached = at_or_below.any(axis=1)
    curves, before = np.arange(len(first)), np.maximum(first - 1, 0)
    above_rate, below_rate = loop_rates[curves, before], loop_rates[curves, first]
    # The weight of the point before: 0 on an exact hit (the point's own value, exactly) and where the curve starts
    # at or below the level (there is no point before), else in (0, 1).
    weight_before = np.divide(level - below_rate, above_rate - below_rate, out=np.zeros(len(first)),
                              where=first > 0)
    at_level = values[curves, first] + weight_before * (values[curves, before] - values[curves, first])
    return np.where(reached, at_level, np.nan)


def at_loop_rate(curve: dict[str, list[np.ndarray]], level: float) -> dict[str, float]:
    """KL to the source and perplexity where the arm's curve (`arm_curve`) first falls to loop rate `level`
    (`values_at_level`; NaN where it never does)."""
    loop_rates = np.array([estimate(items, "fixed_loop_rate") for items in curve["fixed_loop_rate"]])
    return {metric: float(values_at_level(loop_rates, np.array([estimate(items, metric) for items in curve[metric]]),
                                          level)[0])
            for metric in ("kl_to_reference", "perplexity")}


def common_level(curve_a: dict[str, list[np.ndarray]], curve_b: dict[str, list[np.ndarray]]) -> float:
    """The lowest loop rate both arms reach on their curves (the larger of their minima): the best quality both
    attain."""
    return max(min(estimate(items, "fixed_loop_rate") for items in curve["fixed_loop_rate"])
               for curve in (curve_a, curve_b))


def resampled_kl_at_level(curve: dict[str, list[np.ndarray]], prompts: np.ndarray, rows: np.ndarray,
                          level: float) -> np.ndarray:
    """The curve's KL at loop rate `level` in each resample: `prompts` [resamples, num_prompts] indexes the loop
    items and `rows` [resamples, num_rows] the KL rows, the same for every point. Returns [resamples]."""
    loop_rates = np.stack([items[prompts].mean(axis=1) for items in curve["fixed_loop_rate"]], axis=1)
    kl = np.stack([items[rows, 0].sum(axis=1) / items[rows, 1].sum(axis=1) for items in curve["kl_to_reference"]],
                  axis=1)
    return values_at_level(loop_rates, kl, level)


def resample_indices(num_items: int, seed: int, num_resamples: int = RESAMPLES) -> np.ndarray:
    """evaluation/stats.py's resampled item indices [num_resamples, num_items] at `seed`: the resamples of every
    interval over the same items at that seed."""
    return np.concatenate(list(stats.resample_chunks(num_items, num_resamples, seed)))


@dataclass(frozen=True)
class EqualQuality:
    """Arm B against arm A at loop rate `level`: each one's KL and perplexity there, and the paired difference
    B − A in KL with its interval over the resamples in which both reach the level (`undefined_share`: the share
    of resamples in which either does not)."""

    level: float
    a: dict[str, float]
    b: dict[str, float]
    kl_difference: stats.Interval
    undefined_share: float

    @property
    def measured(self) -> bool:
        """Whether the interval is defined and excludes 0."""
        interval = self.kl_difference
        return math.isfinite(interval.low) and math.isfinite(interval.high) and interval.excludes_zero

    @property
    def verdict(self) -> str:
        if not self.measured:
            return "no difference measured"
        return "lower KL at equal loops" if self.kl_difference.high < 0 else "higher KL at equal loops"


def compare_at_equal_quality(curve_a: dict[str, list[np.ndarray]], curve_b: dict[str, list[np.ndarray]], *,
                             level: float | None = None, confidence: float = 0.95, seed: int = 0) -> EqualQuality:
    """B − A in KL at the loop rate `level` (default: `common_level`), paired: every resample takes the same
    prompts and the same KL rows for both arms (the items are the same prompts and rows for every model). The
    prompts are resampled at `seed` and the rows at `seed + 1`: the two are different item sets, resampled
    independently."""
    for metric in ("fixed_loop_rate", "kl_to_reference"):
        sizes = sorted({len(items) for items in (*curve_a[metric], *curve_b[metric])})
        if len(sizes) > 1:
            raise ValueError(f"{metric}: the two arms' checkpoints have {sizes} items; a paired comparison needs "
                             "every model scored on the same items (evaluate them with the same evaluation flags).")
    level = common_level(curve_a, curve_b) if level is None else level
    prompts = resample_indices(len(curve_a["fixed_loop_rate"][0]), seed)
    rows = resample_indices(len(curve_a["kl_to_reference"][0]), seed + 1)
    differences = (resampled_kl_at_level(curve_b, prompts, rows, level)
                   - resampled_kl_at_level(curve_a, prompts, rows, level))
    defined = differences[np.isfinite(differences)]
    at_a, at_b = at_loop_rate(curve_a, level), at_loop_rate(curve_b, level)
    difference = at_b["kl_to_reference"] - at_a["kl_to_reference"]
    low, high = (np.quantile(defined, [(1 - confidence) / 2, (1 + confidence) / 2]) if defined.size
                 else (math.nan, math.nan))
    return EqualQuality(level, at_a, at_b, stats.Interval(difference, float(low), float(high)),
                        1.0 - defined.size / differences.size)


# ---- the README -------------------------------------------------------------------------------------------


def _table(points: dict[str, list[dict]], refs: dict[str, dict]) -> list[str]:
    header = "| model | step | tokens | heal min | " + " | ".join(METRICS[m][0] for m in METRICS) + " | targets |"
    lines = [header, "|" + "---|" * (len(METRICS) + 5)]
    for name in ("source", "raw"):
        cells = " | ".join(refs[name]["intervals"][m].format() for m in METRICS)
        lines.append(f"| {name} | 0 | 0 | 0 | {cells} | |")
    for arm, arm_points_list in points.items():
        for point in arm_points_list:
            cells = []
            for metric in METRICS:
                cell = point["intervals"][metric].format()
                if len(point["per_seed"][metric]) > 1:
                    spread = point["per_seed"][metric]
                    cell += f" (seeds {min(spread):.3g}–{max(spread):.3g})"
                cells.append(cell)
            met = meets_targets(point, refs["source"])
            flags = ", ".join(name for name, ok in met.items() if ok) or "none"
            seeds = ",".join(map(str, point["seeds"]))
            lines.append(f"| {arm} (seeds {seeds}) | {point['step']} | {point['tokens']:,.0f} | "
                         f"{point['minutes']:.1f} | {' | '.join(cells)} | {flags} |")
    return lines


def _differences(points: dict[str, list[dict]], comparator: str) -> list[str]:
    """Every arm minus the comparator arm at the same steps, paired over items, for the four metrics."""
    if comparator not in points:
        return []
    base = {p["step"]: p["items"] for p in points[comparator]}
    pairs = [(arm, point["step"], point["items"], base[point["step"]]) for arm, arm_points_list in points.items()
             if arm != comparator for point in arm_points_list if point["step"] in base]
    return _difference_table(f"Paired differences, arm − {comparator} at the same step", pairs)


def _differences_from_source(points: dict[str, list[dict]], source: dict) -> list[str]:
    """Every checkpoint minus the source on the same items: how far each arm still is from the source."""
    pairs = [(arm, point["step"], point["items"], source["items"]) for arm, arm_points_list in points.items()
             for point in arm_points_list]
    return _difference_table("Paired differences, checkpoint − source", pairs)


def _difference_table(title: str, pairs: list[tuple[str, int, dict, dict]], metrics: dict = METRICS) -> list[str]:
    """One row per (arm, step, its items, the other's items): the paired difference of each metric."""
    if not pairs:
        return []
    lines = [f"{title} (95% bootstrap interval over items; bold where it excludes 0):", "",
             "| arm | step | " + " | ".join(metrics[m][0] for m in metrics) + " |",
             "|" + "---|" * (len(metrics) + 2)]
    for arm, step, items, other in pairs:
        cells = [_bold_if_measured(paired(items[metric], other[metric], metric)) for metric in metrics]
        lines.append(f"| {arm} | {step} | {' | '.join(cells)} |")
    return lines


def _bold_if_measured(difference: stats.Interval) -> str:
    return f"**{difference.format()}**" if difference.excludes_zero else difference.format()


def load_instructions(results_dir: Path) -> dict[str, dict]:
    """name ("source" or a run's name) -> its stored instruction-following result."""
    folder = results_dir / "instructions"
    paths = sorted(folder.glob("*.json")) if folder.is_dir() else []
    return {path.stem: json.loads(path.read_text()) for path in paths}


def _instruction_table(config, results: dict[str, dict]) -> list[str]:
    """Each arm's IFEval scores at its instruction steps (seed-mean per prompt), and the paired difference from the
    source's on the same prompts."""
    if "source" not in results:
        return []
    source = {m: np.array(results["source"]["evaluation"]["models"]["source"]["items"][m], dtype=float)
              for m in IF_METRICS}
    labels = [IF_METRICS[m][0] for m in IF_METRICS] + [f"− source: {IF_METRICS[m][0]}" for m in IF_METRICS]
    flags = " ".join(config.instruction_following["evaluation"])
    lines = ["## Instruction-following", "",
             f"IFEval's checkers on the held-out constraint prompts (`{flags}`). Paired differences from the source "
             "on the same prompts; bold where the interval excludes 0.", "",
             "| model | step | " + " | ".join(labels) + " |", "|" + "---|" * (2 + len(labels))]
    cells = " | ".join(interval(source[m], m).format() for m in IF_METRICS)
    lines.append(f"| source | – | {cells} |" + " |" * len(IF_METRICS))
    if "raw" in results:  # the raw stack: what the stacking lost before any heal
        raw = {m: np.array(results["raw"]["evaluation"]["models"]["raw"]["items"][m], dtype=float) for m in IF_METRICS}
        scores = [interval(raw[m], m).format() for m in IF_METRICS]
        diffs = [_bold_if_measured(paired(raw[m], source[m], m)) for m in IF_METRICS]
        lines.append(f"| raw | 0 | {' | '.join(scores)} | {' | '.join(diffs)} |")
    by_arm: dict[str, list[dict]] = defaultdict(list)
    for run in config.runs:
        if run.name in results:
            by_arm[run.arm].append(results[run.name])
    arm_items: dict[tuple[str, int], dict[str, np.ndarray]] = {}  # (arm, step) -> metric -> seed-mean items
    for arm, arm_results in by_arm.items():
        for model in sorted(arm_results[0]["evaluation"]["models"], key=step_of):
            items = {m: np.mean([np.array(r["evaluation"]["models"][model]["items"][m], dtype=float)
                                 for r in arm_results], axis=0) for m in IF_METRICS}
            arm_items[arm, step_of(model)] = items
            scores = [interval(items[m], m).format() for m in IF_METRICS]
            diffs = [_bold_if_measured(paired(items[m], source[m], m)) for m in IF_METRICS]
            seeds = ",".join(str(r["key"]["heal"]["heal"]["seed"]) for r in arm_results)
            lines.append(f"| {arm} (seeds {seeds}) | {step_of(model)} | {' | '.join(scores)} | {' | '.join(diffs)} |")
    return lines + _instruction_differences(arm_items, BEST_ARM)


def _instruction_differences(arm_items: dict[tuple[str, int], dict[str, np.ndarray]], comparator: str) -> list[str]:
    """Every other arm's IFEval scores minus the comparator's at the same step, paired over the same prompts."""
    pairs = [(arm, step, items, arm_items[comparator, step]) for (arm, step), items in arm_items.items()
             if arm != comparator and (comparator, step) in arm_items]
    table = _difference_table(f"Paired differences, arm − {comparator} at the same step", pairs, IF_METRICS)
    return ["", *table] if table else []


def twin_of(arm: str) -> str | None:
    """The unprotected arm a protected one is twinned with, the part before `+` ("sft+kfac-50" -> "sft"); None for
    an unprotected arm."""
    return arm.split("+", 1)[0] if "+" in arm else None


def equal_step(steps_a: list[int], steps_b: list[int]) -> int | None:
    """EQUAL_STEP if both arms reach it, else the last step both reach; None when they share no step."""
    common = set(steps_a) & set(steps_b)
    if not common:
        return None
    return EQUAL_STEP if EQUAL_STEP in common else max(common)


def arm_instruction_items(instructions: dict[str, dict], run_names: list[str], metric: str) -> dict[int, np.ndarray]:
    """step -> an IFEval metric's items at that step, the mean per prompt over the arm's runs with instruction
    results there."""
    by_step: dict[int, list[np.ndarray]] = defaultdict(list)
    for name in run_names:
        models = instructions[name]["evaluation"]["models"] if name in instructions else {}
        for model, result in models.items():
            by_step[step_of(model)].append(np.array(result["items"][metric], dtype=float))
    return {step: np.mean(items, axis=0) for step, items in by_step.items()}


def _equal_quality_lines(pairs: list[tuple[str, str]], points: dict[str, list[dict]], raw: dict,
                         columns: tuple[str, str]) -> list[str]:
    """For each (arm, against) pair: the table row of `compare_at_equal_quality` (arm − against), then one closing
    line per pair with the verdict."""
    arm_label, against_label = columns
    lines = [f"| {arm_label} | {against_label} | loop rate L | KL at L: {against_label} | KL at L: {arm_label} | "
             f"perplexity at L: {against_label} | perplexity at L: {arm_label} | "
             f"{arm_label} − {against_label}: KL at L | undefined |", "|" + "---|" * 9]
    verdicts = []
    for arm, against in pairs:
        result = compare_at_equal_quality(arm_curve(points[against], raw), arm_curve(points[arm], raw))
        kl, perplexity = "kl_to_reference", "perplexity"
        difference = result.kl_difference.format()
        lines.append(f"| {arm} | {against} | {result.level:.3g} | {result.a[kl]:.3g} | {result.b[kl]:.3g} | "
                     f"{result.a[perplexity]:.3g} | {result.b[perplexity]:.3g} | "
                     f"{f'**{difference}**' if result.measured else difference} | "
                     f"{result.undefined_share:.0%} |")
        verdicts.append(f"- {arm} against {against}: **{result.verdict}** (KL {difference} at loop rate "
                        f"{result.level:.3g}).")
    return [*lines, "", *verdicts]


def _equal_step_lines(pairs: list[tuple[str, str]], points: dict[str, list[dict]], runs: list[dict],
                      instructions: dict[str, dict]) -> list[str]:
    """protected − twin at the same step (EQUAL_STEP or the last both reach), paired over items, for the curves'
    metrics and IFEval prompt-level strict where both arms have instruction results at a common step."""
    run_names: dict[str, list[str]] = defaultdict(list)
    for run in runs:
        run_names[run["arm"]].append(run["name"])
    strict = "if_prompt_strict"
    lines = ["| protected | twin | step | " + " | ".join(METRICS[m][0] for m in METRICS) +
             f" | {IF_METRICS[strict][0]} (step) |", "|" + "---|" * (len(METRICS) + 4)]
    for arm, twin in pairs:
        steps = {name: {point["step"]: point for point in points[name]} for name in (arm, twin)}
        step = equal_step(list(steps[arm]), list(steps[twin]))
        cells = ["–" if step is None else
                 _bold_if_measured(paired(steps[arm][step]["items"][m], steps[twin][step]["items"][m], m))
                 for m in METRICS]
        scores = {name: arm_instruction_items(instructions, run_names[name], strict) for name in (arm, twin)}
        if_step = equal_step(list(scores[arm]), list(scores[twin]))
        cells.append("–" if if_step is None else
                     f"{_bold_if_measured(paired(scores[arm][if_step], scores[twin][if_step], strict))} ({if_step})")
        lines.append(f"| {arm} | {twin} | {step} | {' | '.join(cells)} |")
    return lines


EQUAL_QUALITY_METHOD = (
    "Each arm's curve is the raw stack (step 0) then its checkpoints in step order; its KL to the source (and "
    "perplexity) at loop rate L is where the curve first falls to L, interpolated linearly in loop rate between "
    "the two checkpoints around it. L is the lowest loop rate both arms reach: the best quality both attain. The "
    "difference has a 95% paired bootstrap interval (every resample takes the same prompts and the same KL rows "
    "for both arms), over the resamples in which both arms reach L; `undefined` is the share in which either does "
    "not. Bold where the interval excludes 0.")


def protection_section(points: dict[str, list[dict]], raw: dict, runs: list[dict],
                        instructions: dict[str, dict]) -> list[str]:
    """Each protected arm against its unprotected twin: at equal loop rate, then at equal steps. Nothing when no
    protected arm has its twin's results."""
    pairs = [(arm, twin_of(arm)) for arm in points if twin_of(arm) in points]
    if not pairs:
        return []
    return ["## Protection at equal quality", "",
            f"Each protected arm against its unprotected twin (the arm before `+`), protected − twin. "
            f"{EQUAL_QUALITY_METHOD}", "",
            *_equal_quality_lines(pairs, points, raw, ("protected", "twin")), "",
            f"At equal steps ({EQUAL_STEP}, or the last step both reach), protected − twin paired over items; bold "
            "where the interval excludes 0:", "",
            *_equal_step_lines(pairs, points, runs, instructions), ""]


def _arms_section(points: dict[str, list[dict]], raw: dict) -> list[str]:
    """Every other unprotected arm against BEST_ARM at equal loop rate. Nothing without BEST_ARM or another arm."""
    pairs = [(arm, BEST_ARM) for arm in points if twin_of(arm) is None and arm != BEST_ARM and BEST_ARM in points]
    if not pairs:
        return []
    return ["## Arms at equal quality", "",
            f"Every unprotected arm against {BEST_ARM}, arm − {BEST_ARM}. {EQUAL_QUALITY_METHOD}", "",
            *_equal_quality_lines(pairs, points, raw, ("arm", "against")), ""]


def write_study_report(config, results_dir: Path, preset: str = "study") -> Path:
    """results_dir/README.md, curves.png and pareto.png from the stored results (nothing is recomputed); `preset`
    names the study's command (`python -m demo --preset PRESET`)."""
    baseline, runs = load_results(results_dir)
    readme = results_dir / "README.md"
    if baseline is None:
        logger.info("no baseline result in %s yet: no report", results_dir)
        return readme
    refs = reference_points(baseline)
    points = arm_points(runs)
    instructions = load_instructions(results_dir)
    done = {run["name"] for run in runs}
    missing = [run.name for run in config.runs if run.name not in done]
    lines = [
        f"# {config.title} (generated by `python -m demo --preset {preset} --report`; do not edit)",
        "",
        f"Every value comes from recipes/demo/{preset}.yaml; `python -m demo --preset {preset}` runs what is missing "
        "below and rewrites this page. Each run's result, with per-item values, is in runs/.",
        "",
        "| arm | what it is |",
        "|---|---|",
        *(f"| {arm.name} | {arm.description} |" for arm in config.arms.values()),
        "",
        f"Budget per arm: `{json.dumps(config.heal)}` on top of recipes/demo/heal.yaml; "
        f"{config.num_train_prompts} training rows. Evaluation: `{' '.join(config.evaluation)}`.",
        "",
        f"Runs stored: {', '.join(sorted(done)) or 'none'}. Still to run: {', '.join(missing) or 'none'}.",
        "",
        *_machine_lines(baseline, runs),
        "",
        "## Curves",
        "",
        "Estimates with 95% bootstrap intervals over items (prompts, rows, passages). `targets` lists the ones met: "
        f"loops (seq-rep-4 ≤ source + {LOOP_MARGIN}), perplexity (≤ {PERPLEXITY_FACTOR}× source), "
        f"kl (≤ {KL_TARGET}).",
        "",
        *_table(points, refs),
        "",
        "![curves](curves.png)",
        "",
        "![pareto](pareto.png)",
        "",
        *_differences_from_source(points, refs["source"]),
        "",
        *_differences(points, "sft"),
        "",
        *_differences(points, BEST_ARM),
        "",
        *protection_section(points, refs["raw"], runs, instructions),
        *_arms_section(points, refs["raw"]),
        *_instruction_table(config, instructions),
        *_task_table(baseline, runs),
        "",
    ]
    results_dir.mkdir(parents=True, exist_ok=True)
    plot_curves(points, refs, results_dir / "curves.png")
    plot_pareto(points, refs, results_dir / "pareto.png")
    readme.write_text("\n".join(lines))
    return readme


def _machine_lines(baseline: dict, runs: list[dict]) -> list[str]:
    lines = ["Wall time and peak resident memory of each run (peak RSS per stage: the conversion and the stacking "
             "in the baseline's row; – where a result predates the record). A load average above the core count "
             "means other work shared the CPU, and the times overstate the run's own.", "",
             "| run | heal (s) | evaluate (s) | peak RSS (MiB) | machine | load average (15 min, at the end) |",
             "|---|---|---|---|---|---|"]
    for result in [baseline, *runs]:
        seconds, machine = result["wall_seconds"], result["machine"]
        peaks = ", ".join(f"{stage} {mib if mib is not None else '–'}"
                          for stage, mib in result.get("peak_rss_mib", {}).items()) or "–"
        lines.append(f"| {result['name']} | {seconds.get('heal', 0):.0f} | {seconds['evaluate']:.0f} | {peaks} | "
                     f"{machine['processor']}, {machine['cpu_count']} cores, {machine['torch_threads']} threads, "
                     f"torch {machine['torch']} | {machine.get('load_average_15min', 'not recorded')} |")
    return lines


# ---- lm-eval tasks (higher is better), when the evaluation flags name some -------------------------------------


def _task_table(baseline: dict, runs: list[dict]) -> list[str]:
    """Each lm-eval task metric (`task/acc`) of the source, the raw stack and every run's checkpoints (seed-mean per
    document), with the paired difference from the source on the same documents. Nothing without tasks."""
    source = baseline["evaluation"]["models"]["source"]["items"]
    metrics = [metric for metric in source if metric.endswith("/acc")]
    if not metrics:
        return []
    lines = ["## lm-eval tasks", "", "Accuracy over the task's documents (higher is better), and the paired "
             "difference from the source on the same documents; bold where the interval excludes 0.", "",
             "| model | step | " + " | ".join(f"{m} | − source" for m in metrics) + " |",
             "|" + "---|" * (2 + 2 * len(metrics))]
    rows = [("source", "–", "source", [baseline]), ("raw", "0", "raw", [baseline])]  # (label, step, model, results)
    by_arm: dict[str, list[dict]] = defaultdict(list)
    for run in runs:
        by_arm[run["arm"]].append(run)
    for arm, arm_runs in by_arm.items():
        label = f"{arm} (seeds {','.join(str(run['seed']) for run in arm_runs)})"
        models = sorted((m for m in arm_runs[0]["evaluation"]["models"] if m.startswith("step")), key=step_of)
        rows += [(label, str(step_of(model)), model, arm_runs) for model in models]
    for label, step, model, results in rows:
        cells = []
        for metric in metrics:
            items = np.mean([np.array(r["evaluation"]["models"][model]["items"][metric], dtype=float)
                             for r in results], axis=0)
            difference = stats.paired_mean_difference(items, np.array(source[metric], dtype=float),
                                                      num_resamples=RESAMPLES)
            cells += [stats.bootstrap_mean(items, num_resamples=RESAMPLES).format(),
                      "–" if model == "source" else _bold_if_measured(difference)]
        lines.append(f"| {label} | {step} | {' | '.join(cells)} |")
    return ["", *lines]


# ---- plots ------------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# Markers of the protections (the part of an arm's name after `+`); unprotected arms are drawn with "o".
PROTECTION_MARKERS = ("s", "^", "v", "D", "P", "p", "h", "<", ">", "d")


def arm_styles(arms: list[str]) -> dict[str, dict[str, str]]:
    """arm -> its line's matplotlib style: an unprotected arm has a colour of its own, a solid line and round
    markers; a protected arm its twin's colour, a dashed line and its protection's marker (the same protection has
    the same marker whatever the twin)."""
    twins = list(dict.fromkeys(arm.partition("+")[0] for arm in arms))
    protections = sorted({arm.partition("+")[2] for arm in arms if "+" in arm})
    styles = {}
    for arm in arms:
        twin, _, protection = arm.partition("+")
        colour = f"C{twins.index(twin) % 10}"  # matplotlib's default cycle has 10 colours
        marker = PROTECTION_MARKERS[protections.index(protection) % len(PROTECTION_MARKERS)] if protection else "o"
        styles[arm] = {"color": colour, "marker": marker, "linestyle": "--" if protection else "-"}
    return styles


def plot_curves(points: dict[str, list[dict]], refs: dict[str, dict], path: Path) -> None:
    """One panel per metric against training tokens (log scale), one line per arm (`arm_styles`) with its 95%
    band; the source as a dashed black line and the raw stack as a dotted one."""
    plt = _pyplot()
    styles = arm_styles(list(points))
    figure, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 3.6))
    for axis, metric in zip(axes, METRICS):
        for arm, arm_points_list in points.items():
            x = [p["tokens"] for p in arm_points_list]
            y = [p["intervals"][metric].estimate for p in arm_points_list]
            low = [p["intervals"][metric].low for p in arm_points_list]
            high = [p["intervals"][metric].high for p in arm_points_list]
            axis.plot(x, y, label=arm, **styles[arm])
            axis.fill_between(x, low, high, color=styles[arm]["color"], alpha=0.15)
        for name, style in (("source", "--"), ("raw", ":")):
            axis.axhline(refs[name]["intervals"][metric].estimate, color="black", linestyle=style, label=name)
        axis.set_xscale("log")
        axis.tick_params(axis="x", which="minor", labelbottom=False)  # a decade's minor labels overlap
        axis.set_xlabel("training tokens")
        axis.set_title(f"{METRICS[metric][0]} (lower is better)", fontsize=9)
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_pareto(points: dict[str, list[dict]], refs: dict[str, dict], path: Path) -> None:
    """KL to the source against the length-controlled seq-rep-4, every checkpoint of every arm joined in step order
    (`arm_styles`: a protected arm in its twin's colour, dashed, with its protection's marker), its last step
    labelled; the source sits at KL 0."""
    plt = _pyplot()
    styles = arm_styles(list(points))
    figure, axis = plt.subplots(figsize=(5.5, 4.2))
    for arm, arm_points_list in points.items():
        ordered = sorted(arm_points_list, key=lambda point: point["step"])
        x = [p["intervals"]["fixed_seq_rep_4"].estimate for p in ordered]
        y = [p["intervals"]["kl_to_reference"].estimate for p in ordered]
        axis.plot(x, y, label=arm, **styles[arm])
        axis.annotate(str(ordered[-1]["step"]), (x[-1], y[-1]), fontsize=7)
    for name, marker in (("source", "*"), ("raw", "X")):
        intervals = refs[name]["intervals"]
        axis.scatter([intervals["fixed_seq_rep_4"].estimate], [intervals["kl_to_reference"].estimate], color="black",
                     marker=marker, s=80, label=name, zorder=3)
    axis.axhline(KL_TARGET, color="grey", linewidth=0.8, linestyle="--")
    axis.axvline(refs["source"]["intervals"]["fixed_seq_rep_4"].estimate + LOOP_MARGIN, color="grey", linewidth=0.8,
                 linestyle="--")
    axis.set_xlabel("seq-rep-4 at 96 tokens (lower is better)")
    axis.set_ylabel("KL to the source, nats/token (lower is better)")
    # Beside the axes: with a dozen protected arms a legend inside would hide the points.
    axis.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
