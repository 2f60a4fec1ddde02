"""The study's report, from the stored results alone (docs/study/runs/*.json): README.md with the curves' table,
the targets, the paired differences between arms, and two plots: curves.png (each metric against training tokens,
one line per arm) and pareto.png (KL to the source against the length-controlled loop rate, every checkpoint).

Runs of one arm at several seeds are averaged per item (per prompt, row or passage) before any interval, so an
arm's interval is over items of the seed-mean, and the seed-to-seed spread (min-max of the per-seed estimates)
is reported beside it.
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
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


def load_results(results_dir: Path) -> tuple[dict | None, list[dict]]:
    runs_dir = results_dir / "runs"
    paths = sorted(runs_dir.glob("*.json")) if runs_dir.is_dir() else []
    results = [json.loads(path.read_text()) for path in paths]
    baseline = next((r for r in results if r["name"] == "baseline"), None)
    return baseline, [r for r in results if r["name"] != "baseline"]


def step_of(model_name: str) -> int:
    return int(model_name.removeprefix("step"))


def tokens_at(train_log: list[dict], step: int) -> float:
    """Training tokens seen by `step` (TRL logs the running count as num_tokens every logging_steps)."""
    seen = [entry["num_tokens"] for entry in train_log if "num_tokens" in entry and entry["step"] <= step]
    return seen[-1] if seen else math.nan


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
    base = {p["step"]: p for p in points[comparator]}
    pairs = [(arm, point, base[point["step"]]["items"]) for arm, arm_points_list in points.items()
             if arm != comparator for point in arm_points_list if point["step"] in base]
    return _difference_table(f"Paired differences, arm − {comparator} at the same step", pairs)


def _differences_from_source(points: dict[str, list[dict]], source: dict) -> list[str]:
    """Every checkpoint minus the source on the same items: how far each arm still is from the source."""
    pairs = [(arm, point, source["items"]) for arm, arm_points_list in points.items() for point in arm_points_list]
    return _difference_table("Paired differences, checkpoint − source", pairs)


def _difference_table(title: str, pairs: list[tuple[str, dict, dict]]) -> list[str]:
    if not pairs:
        return []
    lines = [f"{title} (95% bootstrap interval over items; bold where it excludes 0):", "",
             "| arm | step | " + " | ".join(METRICS[m][0] for m in METRICS) + " |",
             "|" + "---|" * (len(METRICS) + 2)]
    for arm, point, other in pairs:
        cells = []
        for metric in METRICS:
            diff = paired(point["items"][metric], other[metric], metric)
            cells.append(f"**{diff.format()}**" if diff.excludes_zero else diff.format())
        lines.append(f"| {arm} | {point['step']} | {' | '.join(cells)} |")
    return lines


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
    by_arm: dict[str, list[dict]] = defaultdict(list)
    for run in config.runs:
        if run.name in results:
            by_arm[run.arm].append(results[run.name])
    for arm, arm_results in by_arm.items():
        for model in sorted(arm_results[0]["evaluation"]["models"], key=step_of):
            items = {m: np.mean([np.array(r["evaluation"]["models"][model]["items"][m], dtype=float)
                                 for r in arm_results], axis=0) for m in IF_METRICS}
            scores = [interval(items[m], m).format() for m in IF_METRICS]
            diffs = [paired(items[m], source[m], m) for m in IF_METRICS]
            diffs = [f"**{d.format()}**" if d.excludes_zero else d.format() for d in diffs]
            seeds = ",".join(str(r["key"]["heal"]["heal"]["seed"]) for r in arm_results)
            lines.append(f"| {arm} (seeds {seeds}) | {step_of(model)} | {' | '.join(scores)} | {' | '.join(diffs)} |")
    return lines


def write_study_report(config, results_dir: Path) -> Path:
    """results_dir/README.md, curves.png and pareto.png from the stored results (nothing is recomputed)."""
    baseline, runs = load_results(results_dir)
    readme = results_dir / "README.md"
    if baseline is None:
        logger.info("no baseline result in %s yet: no report", results_dir)
        return readme
    refs = reference_points(baseline)
    points = arm_points(runs)
    done = {run["name"] for run in runs}
    missing = [run.name for run in config.runs if run.name not in done]
    lines = [
        "# The heal study (generated by `python -m demo --preset study --report`; do not edit)",
        "",
        "Every value comes from recipes/demo/study.yaml; `python -m demo --preset study` runs what is missing "
        "below and rewrites this page. Each run's result, with per-item values, is in runs/.",
        "",
        "| arm | what it is |",
        "|---|---|",
        *(f"| {arm.name} | {arm.description} |" for arm in config.arms.values()),
        "",
        f"Budget per arm: `{json.dumps(config.heal)}` on top of recipes/demo/heal.yaml; "
        f"{config.num_train_prompts} training prompts. Evaluation: `{' '.join(config.evaluation)}`.",
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
        *_instruction_table(config, load_instructions(results_dir)),
        "",
    ]
    results_dir.mkdir(parents=True, exist_ok=True)
    plot_curves(points, refs, results_dir / "curves.png")
    plot_pareto(points, refs, results_dir / "pareto.png")
    readme.write_text("\n".join(lines))
    return readme


def _machine_lines(baseline: dict, runs: list[dict]) -> list[str]:
    lines = ["Wall time of each run. A load average above the core count means other work shared the CPU, and the "
             "times overstate the run's own.", "",
             "| run | heal (s) | evaluate (s) | machine | load average (15 min, at the end) |",
             "|---|---|---|---|---|"]
    for result in [baseline, *runs]:
        seconds, machine = result["wall_seconds"], result["machine"]
        lines.append(f"| {result['name']} | {seconds.get('heal', 0):.0f} | {seconds['evaluate']:.0f} | "
                     f"{machine['processor']}, {machine['cpu_count']} cores, {machine['torch_threads']} threads, "
                     f"torch {machine['torch']} | {machine.get('load_average_15min', 'not recorded')} |")
    return lines


# ---- plots ------------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(points: dict[str, list[dict]], refs: dict[str, dict], path: Path) -> None:
    """One panel per metric against training tokens (log scale), one line per arm with its 95% band; the source
    as a dashed line and the raw stack as a dotted one."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 3.6))
    for axis, metric in zip(axes, METRICS):
        for index, (arm, arm_points_list) in enumerate(points.items()):
            x = [p["tokens"] for p in arm_points_list]
            y = [p["intervals"][metric].estimate for p in arm_points_list]
            low = [p["intervals"][metric].low for p in arm_points_list]
            high = [p["intervals"][metric].high for p in arm_points_list]
            axis.plot(x, y, marker="o", color=f"C{index}", label=arm)
            axis.fill_between(x, low, high, color=f"C{index}", alpha=0.15)
        for name, style in (("source", "--"), ("raw", ":")):
            axis.axhline(refs[name]["intervals"][metric].estimate, color="black", linestyle=style, label=name)
        axis.set_xscale("log")
        axis.set_xlabel("training tokens")
        axis.set_title(f"{METRICS[metric][0]} (lower is better)", fontsize=9)
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_pareto(points: dict[str, list[dict]], refs: dict[str, dict], path: Path) -> None:
    """KL to the source against the length-controlled seq-rep-4, every checkpoint of every arm (the path of each
    arm drawn in step order); the source sits at KL 0."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(5.5, 4.2))
    for index, (arm, arm_points_list) in enumerate(points.items()):
        x = [p["intervals"]["fixed_seq_rep_4"].estimate for p in arm_points_list]
        y = [p["intervals"]["kl_to_reference"].estimate for p in arm_points_list]
        axis.plot(x, y, marker="o", color=f"C{index}", label=arm)
        axis.annotate(str(arm_points_list[-1]["step"]), (x[-1], y[-1]), fontsize=7)
    for name, marker in (("source", "*"), ("raw", "X")):
        intervals = refs[name]["intervals"]
        axis.scatter([intervals["fixed_seq_rep_4"].estimate], [intervals["kl_to_reference"].estimate], color="black",
                     marker=marker, s=80, label=name, zorder=3)
    axis.axhline(KL_TARGET, color="grey", linewidth=0.8, linestyle="--")
    axis.axvline(refs["source"]["intervals"]["fixed_seq_rep_4"].estimate + LOOP_MARGIN, color="grey", linewidth=0.8,
                 linestyle="--")
    axis.set_xlabel("seq-rep-4 at 96 tokens (lower is better)")
    axis.set_ylabel("KL to the source, nats/token (lower is better)")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
