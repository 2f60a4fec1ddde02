"""The evaluation's files: eval.json (every number, interval, per-item value and text), eval.md (tables of
estimates with 95% intervals and of paired differences, then the samples) and eval.png (bars with whiskers)."""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

from core.outputs import guard_output_dir, staged_output
from evaluation.stats import Interval

logger = logging.getLogger(__name__)

# Which way each metric is better, for the plot titles (task metrics are accuracies: higher). Also the order
# of the columns; metrics not listed (the lm-eval tasks') follow.
DIRECTION = {
    "fixed_seq_rep_4": "lower is better",
    "fixed_loop_rate": "lower is better",
    "seq_rep_4": "lower is better",
    "loop_rate": "lower is better",
    "distinct_2": "higher is better",
    "mean_length": "",
    "length_ratio": "closer to 1 is better",
    "stopped_share": "",
    "kl_to_reference": "lower is better",
    "perplexity": "lower is better",
    "if_prompt_strict": "higher is better",
    "if_prompt_loose": "higher is better",
    "if_instruction_strict": "higher is better",
    "if_instruction_loose": "higher is better",
}


def write_report(results: dict, out_dir: Path, force: bool = False) -> Path:
    """eval.json, eval.md and eval.png in out_dir, which appears whole or not at all; a folder that an earlier
    evaluation did not write is replaced only with `force`."""
    out_dir = Path(out_dir)
    guard_output_dir(out_dir, "eval", force)  # again at the end: the folder may have appeared during the run
    with staged_output(out_dir, stage="eval") as staging:
        (staging / "eval.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
        (staging / "eval.md").write_text(markdown_report(results))
        plot_metrics(results, staging / "eval.png")
    logger.info("wrote %s", out_dir)
    return out_dir


def metric_names(results: dict) -> list[str]:
    """Metrics that at least one model has a value for: the built-in ones in DIRECTION's order, then the tasks'."""
    names: dict[str, None] = {}
    for model in results["models"].values():
        names.update({name: None for name, value in model["metrics"].items() if value is not None})
    return [name for name in DIRECTION if name in names] + [name for name in names if name not in DIRECTION]


def _cell(result: dict, name: str) -> str:
    if result["metrics"].get(name) is None:
        return "—"
    if name not in result["intervals"]:  # a pooled metric (distinct_2): an estimate without an interval
        return f"{result['metrics'][name]:.3g} (pooled, no interval)"
    return Interval(result["metrics"][name], *result["intervals"][name]).format()


def _difference_cell(row: dict | None) -> str:
    if row is None:
        return "—"
    interval = Interval(row["estimate"], row["low"], row["high"])
    return interval.format() if interval.excludes_zero else f"no difference measured ({interval.format()})"


def _fenced(text: str) -> str:
    # A fence longer than any backtick run inside, so that generated backticks cannot close it.
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}\n{text}\n{fence}"


def markdown_report(results: dict) -> str:
    names = metric_names(results)
    reference = results["reference"]
    lines = ["# Evaluation", "", f"Reference: `{reference}`" if reference else "No reference model.", "",
             "Each cell: estimate [95% bootstrap interval over prompts, rows or documents].", ""]
    lines += ["| model | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for model, result in results["models"].items():
        lines.append(f"| {model} | " + " | ".join(_cell(result, name) for name in names) + " |")
    lines += _differences_table(results["differences"])
    config = results["config"]
    if results["prompts"]:
        lines += ["", "## Samples", "", f"Greedy, natural stop, at most {config['max_new_tokens']} new tokens"
                  + (f"; then the first {config['fixed_new_tokens']} tokens with every stop token suppressed."
                     if config["fixed_new_tokens"] else ".")]
        for index, prompt in enumerate(results["prompts"]):
            lines += ["", f"### Prompt {index}", "", _fenced(prompt)]
            for model, result in results["models"].items():
                lines += ["", f"**{model}**", "", _fenced(result["continuations"][index])]
                if result.get("fixed_continuations"):
                    lines += ["", f"**{model}**, {config['fixed_new_tokens']} tokens", "",
                              _fenced(result["fixed_continuations"][index])]
    return "\n".join(lines) + "\n"


def _differences_table(rows: list[dict]) -> list[str]:
    """One line per pair of models (a − b), one column per headline metric."""
    if not rows:
        return []
    metrics = list(dict.fromkeys(row["metric"] for row in rows))
    by_pair: dict[tuple[str, str], dict[str, dict]] = {}
    for row in rows:
        by_pair.setdefault((row["a"], row["b"]), {})[row["metric"]] = row
    lines = ["", "## Differences", "", "a − b on the same items, paired 95% bootstrap interval.", "",
             "| a − b | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    for (a, b), cells in by_pair.items():
        lines.append(f"| {a} − {b} | " + " | ".join(_difference_cell(cells.get(m)) for m in metrics) + " |")
    return lines


def plot_metrics(results: dict, path: Path) -> None:
    """One small bar chart per metric, the models side by side, whiskers at the 95% interval."""
    import matplotlib

    matplotlib.use("Agg")  # no display: write the file only
    import matplotlib.pyplot as plt

    names = metric_names(results)
    models = list(results["models"])
    columns = min(4, max(1, len(names)))
    rows = max(1, math.ceil(len(names) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.8 * rows), squeeze=False)
    for axis, name in zip(axes.flat, names):
        values, low, high = [], [], []
        for model in models:
            value = results["models"][model]["metrics"].get(name)
            bounds = results["models"][model]["intervals"].get(name, [value, value])
            values.append(math.nan if value is None else value)
            # A percentile interval need not contain its estimate: a whisker then has no length on that side.
            low.append(0.0 if value is None else max(0.0, value - bounds[0]))
            high.append(0.0 if value is None else max(0.0, bounds[1] - value))
        axis.bar(range(len(models)), values, yerr=[low, high], capsize=3, color=[f"C{i}" for i in range(len(models))])
        axis.set_xticks(range(len(models)), models, rotation=30, ha="right", fontsize=8)
        direction = DIRECTION.get(name, "higher is better")  # the rest are lm-eval accuracies
        axis.set_title(f"{name}\n({direction})" if direction else name, fontsize=9)
    for axis in list(axes.flat)[len(names):]:
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
