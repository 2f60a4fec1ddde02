"""Which Linear modules of the raw stack get LoRA, and in which group, from stack.json.

Groups (each with its own rank and alpha):
  seam   every targeted projection of the slots within ±seam_width of a seam: for a seam at slot
         s (between s-1 and s), slots s-seam_width .. s+seam_width-1;
  graft  the K/V projections (the architecture row's K/V tensors that are Linear: k_proj, v_proj) of
         slots whose K/V weights were grafted from another layer;
  other  with all_layers: everything else.
"""

from __future__ import annotations

import re

from torch import nn

from stack.manifest import StackManifest


class TargetError(ValueError):
    pass


def select_targets(model: nn.Module, manifest: StackManifest, modules: tuple[str, ...], seam_width: int,
                   all_layers: bool = False) -> dict[str, str]:
    """{module name in the model: group} for every nn.Linear of the text decoder that is targeted."""
    prefix = manifest.layer_prefix
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)\.(.+)$")
    seam_slots = {slot.index for slot in manifest.slots_near_seams(seam_width)}
    groups, kinds = {}, set()
    for name, module in model.named_modules():
        match = pattern.match(name)
        if not (match and isinstance(module, nn.Linear)):
            continue
        slot, kind = int(match.group(1)), match.group(2)
        kinds.update({kind, kind.split(".")[-1]})
        if slot < len(manifest.slots) and manifest.is_grafted_kv(manifest.slots[slot], f"{kind}."):
            groups[name] = "graft"
        elif kind.split(".")[-1] in modules or kind in modules:
            if slot in seam_slots:
                groups[name] = "seam"
            elif all_layers:
                groups[name] = "other"
    unknown = [m for m in modules if m not in kinds]
    if unknown or not groups:
        raise TargetError(f"modules {unknown or list(modules)} match no Linear of the decoder layers under {prefix!r} "
                          f"(seam_width {seam_width}); the layers have {sorted(k for k in kinds if '.' not in k)}")
    return dict(sorted(groups.items()))


def target_slots(manifest: StackManifest, targets: tuple[str, ...] | None, seam_width: int,
                 all_layers: bool = False) -> set[int]:
    """The slots whose own (not grafted K/V) modules get LoRA, from stack.json and the recipe alone, before any
    model is built: the explicit `targets:`' slots, else the seam slots (every slot with all_layers)."""
    if not targets:  # as heal/train.py: no explicit targets, the seam slots
        slots = manifest.slots if all_layers else manifest.slots_near_seams(seam_width)
        return {slot.index for slot in slots}
    pattern = re.compile(rf"^{re.escape(manifest.layer_prefix)}(\d+)\.(.+)$")
    slot_kinds = [(int(match.group(1)), match.group(2)) for name in targets if (match := pattern.match(name))]
    return {slot for slot, kind in slot_kinds  # a slot index past the stack is explicit_targets' error, later
            if slot < len(manifest.slots) and not manifest.is_grafted_kv(manifest.slots[slot], f"{kind}.")}


def explicit_targets(model: nn.Module, names: list[str]) -> dict[str, str]:
    """An explicit `targets:` list (no stack.json needed): every name must be a Linear of the model."""
    linears = {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    missing = [name for name in names if name not in linears]
    if missing:
        raise TargetError(f"targets {missing[:3]} are not Linear modules of the model (e.g. "
                          f"{sorted(linears)[:2]}); give full module names")
    return {name: "other" for name in names}
