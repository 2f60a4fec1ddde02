"""Where instruction importance lives: Fisher mass per layer and module type, and how concentrated it is."""

from __future__ import annotations

import math
import re
from collections import defaultdict
from pathlib import Path

import torch

_LAYER = re.compile(r"layers\.(\d+)\.")
TOP_FRACTIONS = (0.01, 0.10)


def module_type(name: str) -> str:
    """'model.layers.3.self_attn.q_proj.weight' -> 'q_proj'."""
    return name.rsplit(".", 2)[-2]


def layer_index(name: str) -> int:
    return int(_LAYER.search(name).group(1))


def mass_share_of_top(values: torch.Tensor, fraction: float) -> float:
    """Share of the total held by the largest `fraction` of the entries (at least one entry)."""
    flat = values.flatten().double()
    total = flat.sum()
    if total <= 0:
        return 0.0
    return float(flat.topk(max(1, math.ceil(fraction * flat.numel()))).values.sum() / total)


def summarize(fisher: dict[str, torch.Tensor]) -> dict:
    """Mass per layer and module type, and per module the share of mass on the top 1% / 10% of
    input coordinates (column sums) and output coordinates (row sums)."""
    per_layer: dict[int, dict[str, float]] = defaultdict(dict)
    modules = {}
    for name, values in fisher.items():
        mass = float(values.double().sum())
        per_layer[layer_index(name)][module_type(name)] = mass
        modules[name] = {
            "mass": mass,
            **{f"top{round(f * 100)}pct_inputs": mass_share_of_top(values.sum(0), f) for f in TOP_FRACTIONS},
            **{f"top{round(f * 100)}pct_outputs": mass_share_of_top(values.sum(1), f) for f in TOP_FRACTIONS},
        }
    total = sum(m["mass"] for m in modules.values())
    per_type: dict[str, float] = defaultdict(float)
    for masses in per_layer.values():
        for kind, mass in masses.items():
            per_type[kind] += mass
    return {
        "total_mass": total,
        "mass_per_layer": {str(layer): sum(masses.values()) for layer, masses in sorted(per_layer.items())},
        "mass_per_layer_and_type": {str(layer): masses for layer, masses in sorted(per_layer.items())},
        "mass_per_type": dict(sorted(per_type.items(), key=lambda kv: -kv[1])),
        "concentration": _concentration_by_type(modules),
        "modules": modules,
    }


def _concentration_by_type(modules: dict[str, dict]) -> dict[str, dict[str, float]]:
    """Mass-weighted mean of each module type's top-coordinate shares."""
    out: dict[str, dict[str, float]] = {}
    by_type = defaultdict(list)
    for name, stats in modules.items():
        by_type[module_type(name)].append(stats)
    for kind, entries in sorted(by_type.items()):
        weight = sum(e["mass"] for e in entries) or 1.0
        keys = [k for k in entries[0] if k.startswith("top")]
        out[kind] = {k: sum(e[k] * e["mass"] for e in entries) / weight for k in keys}
    return out


def plot(summary: dict, path: Path, title: str) -> None:
    """Three panels: mass per layer and module type; mass per module type; concentration per type."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [int(k) for k in summary["mass_per_layer_and_type"]]
    kinds = list(summary["mass_per_type"])
    fig, (ax_layers, ax_types, ax_conc) = plt.subplots(1, 3, figsize=(18, 5),
                                                        gridspec_kw={"width_ratios": [3, 1.3, 1.7]})
    for kind in kinds:  # lines on a log axis: per-layer mass spans orders of magnitude
        masses = [summary["mass_per_layer_and_type"][str(layer)].get(kind) for layer in layers]
        ax_layers.plot([layer for layer, m in zip(layers, masses) if m], [m for m in masses if m], marker=".",
                       label=kind)
    ax_layers.set_yscale("log")
    ax_layers.set(xlabel="layer", ylabel="Fisher mass (sum of the diagonal)",
                  title="Fisher mass per layer and module type")
    ax_layers.legend(fontsize=7, ncol=3)
    ax_types.barh(kinds[::-1], [summary["mass_per_type"][k] for k in kinds[::-1]])
    ax_types.set(xlabel="Fisher mass", title="per module type")
    ax_types.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
    conc = summary["concentration"]
    columns = ["top1pct_inputs", "top10pct_inputs", "top1pct_outputs", "top10pct_outputs"]
    width = 0.2
    for i, column in enumerate(columns):
        ax_conc.bar([x + i * width for x in range(len(conc))], [conc[k][column] for k in conc], width, label=column)
    ax_conc.set_xticks([x + 1.5 * width for x in range(len(conc))], list(conc), rotation=45, ha="right", fontsize=7)
    ax_conc.set(ylim=(0, 1), ylabel="share of the module's mass", title="mass on the top coordinates")
    ax_conc.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
