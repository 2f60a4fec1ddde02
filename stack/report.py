"""Human-readable plan: what --dry-run prints and what a real run logs before writing."""

from __future__ import annotations

import math

from .plan import StackPlan


def parameter_breakdown(plan: StackPlan) -> list[tuple[str, int]]:
    """(group, parameter count) per the architecture's groups, like the model card's breakdown."""
    counts = {label: 0 for label, _ in plan.architecture.param_groups}
    counts["other"] = 0
    for tensor in plan.tensors:
        label = next((label for label, prefixes in plan.architecture.param_groups
                      if tensor.name.startswith(prefixes)), "other")
        counts[label] += math.prod(tensor.shape)
    return [(label, count) for label, count in counts.items() if count]


def _count(parameters: int) -> str:
    return f"{parameters / 1e9:.3f}B" if parameters >= 1e9 else f"{parameters / 1e6:.3f}M"


def format_plan(plan: StackPlan) -> str:
    lines = [
        f"stack plan: {plan.source_model} ({plan.architecture.name}, {plan.source_num_layers} layers) -> "
        f"{len(plan.slots)} slots, {plan.num_kv_shared_layers} KV-shared",
        "",
        f"{'slot':>4}  {'src':>4}  {'attention':<18} {'kv':<10} {'graft':<6} seam",
    ]
    for slot in plan.slots:
        graft = f"L{slot.kv_graft_from}" if slot.kv_graft_from is not None else ""
        lines.append(f"{slot.index:>4}  {slot.source_layer:>4}  {slot.attention_type:<18} {slot.kv_role:<10} "
                     f"{graft:<6} {'*' if slot.on_seam else ''}")
    lines.append("")
    seams = [f"slot {s.slot} (L{s.from_layer} -> L{s.to_layer})" for s in plan.seams]
    lines.append("seams: " + (", ".join(seams) or "none"))
    grafts = [s for s in plan.slots if s.kv_graft_from is not None]
    graft_text = [f"slot {s.index} (L{s.source_layer}) <- k/v of L{s.kv_graft_from}" for s in grafts]
    lines.append("KV grafts: " + (", ".join(graft_text) or "none"))
    lines.append("")
    total = sum(math.prod(t.shape) for t in plan.tensors)
    lines.append(f"parameters: {_count(total)}")
    for label, count in parameter_breakdown(plan):
        lines.append(f"  {label:<22} {_count(count):>9}  {100 * count / total:5.1f}%")
    lines.append(f"output: {plan.total_bytes / 1e9:.3f} GB in {len(plan.shards)} shard(s), "
                 f"{len(plan.tensors)} tensors")
    return "\n".join(lines)
