"""The protections' comparison (docs/protection/): every protected arm of the SmolLM2 study against its unprotected
twin, at equal steps and at equal loop rate, with one Pareto plot per twin, from the runs of both result sets.

    python -m demo.protection_report      # docs/protection/README.md and pareto.png, from the stored results

The CPU study (recipes/demo/study.yaml, docs/study/) and the GPU study (study-gpu.yaml, docs/study-gpu/) run the same
arms on the same data at the same seeds in float32, so they measure the same models; each affords different runs
(the twins' three seeds ran on the GPU, some protections only on the CPU). The page pools them: a run stored in
both is taken once, from the first result set, and only after its items agree in both (`check_same_measurement`),
so the premise is checked on every run the two sets share rather than assumed.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from core.outputs import OutputExistsError, guard_output_dir, staged_output
from demo import study_report
from demo.run import REPO, STUDY_PRESETS
from demo.study import load_study, setup_logging

logger = logging.getLogger(__name__)

# The presets whose results pool, the first preferred where a run is in both (it holds the twins' seeds).
POOLED_PRESETS = ("study-gpu", "study")
# Two result sets measure the same model when every item agrees to this share of the metric's largest item: the
# generated text (loop items) is the same, and the summed nats differ by float32 reduction order (about 6e-5 of the
# largest KL item between the CPU and the GPU on the runs both stored).
ITEM_TOLERANCE = 1e-3


class PoolingError(ValueError):
    """Two result sets that disagree on a run both stored."""


def check_same_measurement(first: dict, other: dict, dirs: tuple[Path, Path]) -> float:
    """Raise PoolingError unless `other` (a stored run, baseline or instruction result) has the items of `first`
    at every model and metric both hold, within ITEM_TOLERANCE of the metric's largest item. Returns the largest
    difference found, as that share."""
    largest = 0.0
    name = first["name"]
    for model, result in first["evaluation"]["models"].items():
        other_items = other["evaluation"]["models"].get(model, {}).get("items", {})
        for metric, values in result["items"].items():
            if metric not in other_items:
                continue
            a, b = np.array(values, dtype=float), np.array(other_items[metric], dtype=float)
            if a.shape != b.shape:
                raise PoolingError(f"run {name!r}, model {model!r}, metric {metric!r}: {a.shape[0]} items in "
                                   f"{dirs[0]} but {b.shape[0]} in {dirs[1]}; the two result sets were evaluated "
                                   "differently and cannot be pooled")
            scale = max(float(np.abs(a).max(initial=0.0)), 1e-12)
            share = float(np.abs(a - b).max(initial=0.0)) / scale
            if share > ITEM_TOLERANCE:
                index = np.unravel_index(np.abs(a - b).argmax(), a.shape)
                raise PoolingError(f"run {name!r}, model {model!r}, metric {metric!r}, item {index[0]}: "
                                   f"{a[index]:.6g} in {dirs[0]} but {b[index]:.6g} in {dirs[1]}; the two result "
                                   "sets do not measure the same model, so their runs cannot be paired (re-run one)")
            largest = max(largest, share)
    return largest


def _pool(named: list[tuple[Path, dict[str, dict]]]) -> tuple[dict[str, dict], dict[str, Path], list[float]]:
    """name -> result from the first set that stores it, where each came from, and for every result stored again
    in a later set its largest item difference (`check_same_measurement`)."""
    pooled: dict[str, dict] = {}
    origin: dict[str, Path] = {}
    gaps = []
    for folder, results in named:
        for name, result in results.items():
            if name in pooled:
                gaps.append(check_same_measurement(pooled[name], result, (origin[name], folder)))
            else:
                pooled[name], origin[name] = result, folder
    return pooled, origin, gaps


def pooled_results(results_dirs: list[Path]) -> dict:
    """The baseline, runs and instruction results of every set in `results_dirs`, each name taken once (from the
    first set that stores it, checked against every other), with where each run came from, how many results were
    stored twice and their largest item difference."""
    runs, instructions = [], []
    for folder in results_dirs:
        baseline, folder_runs = study_report.load_results(folder)
        stored = {run["name"]: run for run in folder_runs}
        if baseline is not None:
            stored["baseline"] = baseline
        runs.append((folder, stored))
        instructions.append((folder, study_report.load_instructions(folder)))
    pooled_runs, origin, run_gaps = _pool(runs)
    pooled_instructions, _, instruction_gaps = _pool(instructions)
    if "baseline" not in pooled_runs:
        raise PoolingError(f"no baseline result in {', '.join(map(str, results_dirs))}: run a study first")
    gaps = run_gaps + instruction_gaps
    return {"baseline": pooled_runs.pop("baseline"), "runs": list(pooled_runs.values()),
            "instructions": pooled_instructions, "origin": origin, "shared": len(gaps),
            "largest_gap": max(gaps, default=0.0)}


def protection_points(runs: list[dict]) -> dict[str, list[dict]]:
    """study_report.arm_points of the protected arms whose twin has results, and of those twins."""
    points = study_report.arm_points(runs)
    protected = [arm for arm in points if study_report.twin_of(arm) in points]
    twins = list(dict.fromkeys(study_report.twin_of(arm) for arm in protected))
    return {arm: points[arm] for arm in sorted(twins + protected)}


def write_protection_report(results_dirs: list[Path], out_dir: Path) -> Path:
    """out_dir/README.md and pareto.png, written in a folder beside out_dir that then replaces it whole."""
    pooled = pooled_results(results_dirs)
    refs = study_report.reference_points(pooled["baseline"])
    points = protection_points(pooled["runs"])
    runs = [run for run in pooled["runs"] if run["arm"] in points]
    sets = ", ".join(str(folder.relative_to(REPO) if folder.is_relative_to(REPO) else folder)
                     for folder in results_dirs)
    lines = [
        "# The protections against their unprotected twins (generated by `python -m demo.protection_report`; do not "
        "edit)", "",
        f"Pooled from {sets}: every run stored in these result sets, each taken once (from the first set that "
        f"stores it). The {pooled['shared']} results stored in more than one set agree item for item within "
        f"{pooled['largest_gap']:.1e} of each metric's largest item (`check_same_measurement` refuses a gap above "
        f"{ITEM_TOLERANCE:g}), so the sets measure the same models and their runs pair across machines.",
        "", "| arm | seeds | stored in |", "|---|---|---|",
        *(f"| {arm} | {','.join(map(str, point_list[0]['seeds']))} | "
          f"{', '.join(sorted({pooled['origin'][run['name']].name for run in runs if run['arm'] == arm}))} |"
          for arm, point_list in points.items()),
        "",
        *study_report.protection_section(points, refs["raw"], runs, pooled["instructions"]),
        "KL to the source against the length-controlled seq-rep-4, one panel per twin (black) with its protections "
        "(each protection has one colour and marker in every panel), every checkpoint in step order, the last one "
        "labelled; the source is the star, the dashed lines the targets, and the raw stack lies off the axes "
        f"(seq-rep-4 {refs['raw']['intervals']['fixed_seq_rep_4'].estimate:.2f}, "
        f"KL {refs['raw']['intervals']['kl_to_reference'].estimate:.2f}):", "",
        "![KL against seq-rep-4, each twin and its protections](pareto.png)",
    ]
    with staged_output(out_dir, stage="protection-report") as staging:
        plot_protection_pareto(points, refs, staging / "pareto.png")
        (staging / "README.md").write_text("\n".join(lines) + "\n")
    return out_dir / "README.md"


def plot_protection_pareto(points: dict[str, list[dict]], refs: dict[str, dict], path: Path) -> None:
    """One panel per twin: KL to the source against the length-controlled seq-rep-4 at every checkpoint, the twin
    solid black, each protection dashed in its own colour and marker (the same in every panel), the source as a
    star and the targets as dashed lines."""
    plt = study_report._pyplot()
    twins = [arm for arm in points if study_report.twin_of(arm) is None]
    protections = sorted({arm.partition("+")[2] for arm in points if "+" in arm})
    figure, axes = plt.subplots(1, len(twins), figsize=(4.6 * len(twins), 4.0), squeeze=False)
    source = refs["source"]["intervals"]
    for axis, twin in zip(axes[0], twins):
        for arm in [twin, *(a for a in points if study_report.twin_of(a) == twin)]:
            protection = arm.partition("+")[2]
            index = protections.index(protection) if protection else None
            style = ({"color": "black", "marker": "o", "linestyle": "-"} if index is None else
                     {"color": f"C{index % 10}", "linestyle": "--",
                      "marker": study_report.PROTECTION_MARKERS[index % len(study_report.PROTECTION_MARKERS)]})
            ordered = sorted(points[arm], key=lambda point: point["step"])
            x = [p["intervals"]["fixed_seq_rep_4"].estimate for p in ordered]
            y = [p["intervals"]["kl_to_reference"].estimate for p in ordered]
            axis.plot(x, y, label=protection or f"{twin} (no protection)", **style)
            axis.annotate(str(ordered[-1]["step"]), (x[-1], y[-1]), fontsize=7)
        axis.scatter([source["fixed_seq_rep_4"].estimate], [0.0], color="black", marker="*", s=80, label="source",
                     zorder=3)
        axis.axhline(study_report.KL_TARGET, color="grey", linewidth=0.8, linestyle="--")
        axis.axvline(source["fixed_seq_rep_4"].estimate + study_report.LOOP_MARGIN, color="grey", linewidth=0.8,
                     linestyle="--")
        axis.set_title(twin, fontsize=10)
        axis.set_xlabel("seq-rep-4 at 96 tokens (lower is better)")
        axis.legend(fontsize=7)
    axes[0][0].set_ylabel("KL to the source, nats/token (lower is better)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.protection_report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "protection",
                        help="the page's folder, replaced whole (one this command did not write only with --force)")
    parser.add_argument("--force", action="store_true", help="replace an --out folder this command did not write")
    args = parser.parse_args(argv)
    setup_logging()
    results_dirs = [REPO / load_study(STUDY_PRESETS[preset]).results_dir for preset in POOLED_PRESETS]
    try:
        guard_output_dir(args.out, "protection-report", args.force)
        logger.info("report: %s", write_protection_report(results_dirs, args.out))
    except (PoolingError, OutputExistsError) as error:
        logger.error("%s", error)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
