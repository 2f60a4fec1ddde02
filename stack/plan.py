"""The stack plan: every output slot, tensor and config field, decided before any byte is written.

Planning reads only config.json and safetensors headers. It validates the topology (ranges,
attention types, KV sharing) and then checks the planned tensor names and shapes against the
model transformers would build from the planned config (on the meta device, so no memory). A
plan that would load with missing, unexpected or mismatched keys never reaches the writer.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

from core.checkpoint import SourceCheckpoint
from core.files import TensorInfo, tensor_nbytes

from .architectures import Architecture, architecture_for
from .recipe import Recipe

logger = logging.getLogger(__name__)

FULL_ATTENTION = "full_attention"
_RECIPE_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


class PlanError(ValueError):
    pass


# ---- what each output slot is -------------------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    index: int
    source_layer: int
    attention_type: str
    # KV role at run time: "own" computes its K/V; "producer" also stores it for the shared tail
    # (transformers' "store"); "reuse" reads the producer's K/V and has no k/v weights; "grafted"
    # computes its own K/V with k_proj/v_proj/k_norm taken from layer `kv_graft_from`, because its
    # source layer was a KV consumer and had none. A grafted slot can also be a producer: then its
    # role is "producer" and `kv_graft_from` is still set.
    kv_role: str
    kv_graft_from: int | None
    on_seam: bool


@dataclass(frozen=True)
class Seam:
    slot: int  # first slot after the discontinuity
    from_layer: int  # source layer of slot - 1
    to_layer: int  # source layer of slot


# ---- how each output tensor is made ----------------------------------------------------------------


@dataclass(frozen=True)
class Copy:
    """The output tensor is the source tensor's bytes, unchanged."""

    source: TensorInfo


@dataclass(frozen=True)
class GatherBlocks:
    """Output = concat over k of block `indices[k]` of the source, blocks of `block` along `axis`."""

    source: TensorInfo
    axis: int
    block: int
    indices: tuple[int, ...]


@dataclass(frozen=True)
class OutputTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    op: Copy | GatherBlocks

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)


@dataclass(frozen=True)
class StackPlan:
    """Everything `write_stack` executes and stack.json records: the slots and seams, every output tensor as an
    operation on source bytes, their assignment to shards, and the output config."""

    architecture: Architecture
    source_model: str
    source_num_layers: int
    slots: tuple[Slot, ...]
    seams: tuple[Seam, ...]
    tensors: tuple[OutputTensor, ...]
    shards: tuple[tuple[OutputTensor, ...], ...]
    config: dict[str, Any]  # output config.json
    recipe: Recipe

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def num_kv_shared_layers(self) -> int:
        return sum(slot.kv_role == "reuse" for slot in self.slots)


# ---- planning -------------------------------------------------------------------------------------


def build_plan(recipe: Recipe, source: SourceCheckpoint) -> StackPlan:
    arch = architecture_for(source.config.get("model_type"), source.model)
    text = _text_config(source.config, arch, source.model)
    num_layers = int(text["num_hidden_layers"])
    _check_ranges(recipe, num_layers, source.model)
    _check_dtype(recipe, source)

    layer_types, kv_modes = _source_layer_facts(source.config, num_layers)
    source_layers = recipe.source_layers
    slot_types = layer_types or [FULL_ATTENTION] * num_layers
    seams = _seams(source_layers)
    slots = _plan_slots(arch, source, source_layers, seams, slot_types, kv_modes, recipe.options.kv_graft_source)
    tensors = _plan_tensors(arch, source, text, slots, num_layers)
    config = _plan_config(source.config, arch, slots, layer_types)
    plan = StackPlan(
        architecture=arch,
        source_model=source.model,
        source_num_layers=num_layers,
        slots=slots,
        seams=seams,
        tensors=tensors,
        shards=_assign_shards(tensors, recipe.options.max_shard_bytes),
        config=config,
        recipe=recipe,
    )
    check_against_transformers(plan)
    return plan


def _text_config(config: dict[str, Any], arch: Architecture, model: str) -> dict[str, Any]:
    text = config.get(arch.text_config_key) if arch.text_config_key else config
    if not isinstance(text, dict) or "num_hidden_layers" not in text:
        where = f"config.json[{arch.text_config_key!r}]" if arch.text_config_key else "config.json"
        raise PlanError(f"model {model!r}: {where} has no num_hidden_layers; is this a {arch.name} checkpoint?")
    return text


def _check_ranges(recipe: Recipe, num_layers: int, model: str) -> None:
    for i, spec in enumerate(recipe.slices):
        start, stop = spec.layer_range
        if stop > num_layers:
            raise PlanError(
                f"slices[{i}]: layer_range [{start}, {stop}) reaches layer {stop - 1}, but model {model!r} has "
                f"{num_layers} layers (0..{num_layers - 1}); ranges are half-open, so the last valid stop is "
                f"{num_layers}"
            )


def _check_dtype(recipe: Recipe, source: SourceCheckpoint) -> None:
    if recipe.dtype is None:
        return
    wanted = _RECIPE_DTYPES.get(str(recipe.dtype))
    if wanted is None:
        raise PlanError(f"recipe dtype {recipe.dtype!r} is not one of {sorted(_RECIPE_DTYPES)}")
    # The weights' dtype is the one holding most bytes: a few small tensors (scalars, clip bounds) may be F32.
    bytes_by_dtype: dict[str, int] = {}
    for info in source.tensors.values():
        bytes_by_dtype[info.dtype] = bytes_by_dtype.get(info.dtype, 0) + info.nbytes
    stored = max(bytes_by_dtype, key=bytes_by_dtype.get)
    if stored != wanted:
        raise PlanError(
            f"recipe dtype {recipe.dtype!r} but model {source.model!r} stores its weights as {stored}; the stacker "
            "copies bytes and never casts, so drop `dtype` from the recipe or set it to the checkpoint's dtype"
        )


def _source_layer_facts(config: dict[str, Any], num_layers: int) -> tuple[list[str] | None, list[str | None]]:
    """Attention type and KV-sharing mode of each source layer, as transformers derives them.

    layer_types is None for families without the field (Llama): every layer is full attention.
    """
    text = _transformers_config(config).get_text_config()
    layer_types = getattr(text, "layer_types", None)
    kv_modes = list(text.kv_sharing_modes) if hasattr(text, "kv_sharing_modes") else [None] * num_layers
    return (list(layer_types) if layer_types else None), kv_modes


def _transformers_config(config: dict[str, Any]):
    from transformers import CONFIG_MAPPING

    return CONFIG_MAPPING[config["model_type"]].from_dict(copy.deepcopy(config))


def _plan_slots(
    arch: Architecture,
    source: SourceCheckpoint,
    source_layers: list[int],
    seams: tuple[Seam, ...],
    layer_types: list[str],
    kv_modes: list[str | None],
    kv_graft_source: str,
) -> tuple[Slot, ...]:
    types = [layer_types[j] for j in source_layers]
    last = len(types) - 1
    if arch.last_layer_type and types[last] != arch.last_layer_type:
        good = [j for j, t in enumerate(layer_types) if t == arch.last_layer_type]
        raise PlanError(
            f"slot {last} (the last layer) comes from source layer {source_layers[last]}, a {types[last]} layer, but "
            f"{arch.name} requires the last layer to be {arch.last_layer_type}. End the last slice just after a "
            f"{arch.last_layer_type} layer: its stop must be one of {[j + 1 for j in good]}"
        )
    consumer = [arch.kv_sharing is not None and kv_modes[j] == "reuse" for j in source_layers]
    first_shared = len(source_layers) - _trailing_true(consumer)
    producers = _producers(types, first_shared, source_layers) if arch.kv_sharing else {}
    seam_slots = {seam.slot for seam in seams}
    slots = []
    for i, j in enumerate(source_layers):
        graft_from = None
        if consumer[i] and i < first_shared:  # a consumer layer now before the shared tail must compute K/V
            graft_from = _graft_donor(source, arch, i, j, layer_types, kv_modes, kv_graft_source)
        if i >= first_shared:
            role = "reuse"
        elif producers.get(types[i]) == i:
            role = "producer"
        else:
            role = "grafted" if graft_from is not None else "own"
        slots.append(Slot(i, j, types[i], role, graft_from, on_seam=i in seam_slots or i + 1 in seam_slots))
    return tuple(slots)


def _trailing_true(flags: list[bool]) -> int:
    count = 0
    for flag in reversed(flags):
        if not flag:
            break
        count += 1
    return count


def _producers(types: list[str], first_shared: int, source_layers: list[int]) -> dict[str, int]:
    """Last non-shared slot of each attention type; every type in the shared tail must have one."""
    producers = {t: i for i, t in enumerate(types[:first_shared])}
    for i in range(first_shared, len(types)):
        if types[i] not in producers:
            raise PlanError(
                f"slot {i} (source layer {source_layers[i]}, {types[i]}) is in the KV-shared tail (slots "
                f"{first_shared}..{len(types) - 1}) and must read {types[i]} K/V from an earlier slot, but no slot "
                f"before {first_shared} is a {types[i]} layer that computes K/V. Put a slice that contains a "
                f"{types[i]} KV-producing source layer before the trailing KV-consumer run"
            )
    return producers


def _graft_donor(
    source: SourceCheckpoint,
    arch: Architecture,
    slot: int,
    layer: int,
    layer_types: list[str],
    kv_modes: list[str | None],
    kv_graft_source: str,
) -> int:
    """Source layer whose k_proj/v_proj/k_norm a KV-consumer layer gets when its slot must produce K/V."""
    if kv_graft_source == "checkpoint":
        missing = [p for p in ("self_attn.k_proj.", "self_attn.v_proj.") if not _layer_tensors(source, arch, layer, p)]
        if missing:
            raise PlanError(
                f"slot {slot} needs K/V weights for source layer {layer} (a KV consumer) and kv_graft_source is "
                f"'checkpoint', but model {source.model!r} has no {arch.layer_prefix}{layer}.{missing[0]}* tensor. "
                "Use kv_graft_source: producer"
            )
        return layer
    same_type_producers = [k for k, mode in enumerate(kv_modes)
                           if mode == "store" and layer_types[k] == layer_types[layer]]
    return same_type_producers[-1]


def _layer_tensors(source: SourceCheckpoint, arch: Architecture, layer: int, sub_prefix: str = "") -> list[TensorInfo]:
    prefix = f"{arch.layer_prefix}{layer}.{sub_prefix}"
    return [info for name, info in source.tensors.items() if name.startswith(prefix)]


def _seams(source_layers: list[int]) -> tuple[Seam, ...]:
    return tuple(
        Seam(i, source_layers[i - 1], source_layers[i])
        for i in range(1, len(source_layers))
        if source_layers[i] != source_layers[i - 1] + 1
    )


def _plan_tensors(
    arch: Architecture, source: SourceCheckpoint, text: dict[str, Any], slots: tuple[Slot, ...], num_layers: int
) -> tuple[OutputTensor, ...]:
    block_tensors = {f"{arch.text_prefix}{b.suffix}": b for b in arch.layer_block_tensors}
    out: list[OutputTensor] = []
    for name in sorted(source.tensors):
        info = source.tensors[name]
        if name.startswith(arch.layer_prefix):
            continue
        if name in block_tensors:
            out.append(_gather_layer_blocks(info, block_tensors[name], text, slots, num_layers, source.model))
        else:
            out.append(OutputTensor(name, info.dtype, info.shape, Copy(info)))
    for slot in slots:
        out.extend(_slot_tensors(arch, source, slot))
    return tuple(out)


def _gather_layer_blocks(info, spec, text, slots, num_layers, model) -> OutputTensor:
    block = int(text[spec.block_size_field])
    if info.shape[spec.axis] != num_layers * block:
        raise PlanError(
            f"tensor {info.name!r} of model {model!r} has shape {list(info.shape)}; expected dim {spec.axis} = "
            f"num_hidden_layers × {spec.block_size_field} = {num_layers} × {block}. "
            "Is the config from another checkpoint?"
        )
    shape = list(info.shape)
    shape[spec.axis] = len(slots) * block
    indices = tuple(slot.source_layer for slot in slots)
    return OutputTensor(info.name, info.dtype, tuple(shape), GatherBlocks(info, spec.axis, block, indices))


def _slot_tensors(arch: Architecture, source: SourceCheckpoint, slot: Slot) -> list[OutputTensor]:
    """Slot i's tensors: source layer j's, renamed; K/V weights dropped (reuse) or grafted."""
    src_prefix = f"{arch.layer_prefix}{slot.source_layer}."
    out_prefix = f"{arch.layer_prefix}{slot.index}."
    picked: dict[str, TensorInfo] = {}
    for info in _layer_tensors(source, arch, slot.source_layer):
        suffix = info.name[len(src_prefix):]
        if not (arch.is_kv_tensor(suffix) and (slot.kv_role == "reuse" or slot.kv_graft_from is not None)):
            picked[suffix] = info
    if slot.kv_graft_from is not None:
        donor_prefix = f"{arch.layer_prefix}{slot.kv_graft_from}."
        for info in _layer_tensors(source, arch, slot.kv_graft_from):
            if arch.is_kv_tensor(info.name[len(donor_prefix):]):
                picked[info.name[len(donor_prefix):]] = info
    return [OutputTensor(out_prefix + suffix, info.dtype, info.shape, Copy(info))
            for suffix, info in sorted(picked.items())]


def _plan_config(
    config: dict[str, Any], arch: Architecture, slots: tuple[Slot, ...], layer_types: list[str] | None
) -> dict[str, Any]:
    """config.json with every per-layer field re-sequenced by source layer."""
    out = copy.deepcopy(config)
    text = out[arch.text_config_key] if arch.text_config_key else out
    sources = [slot.source_layer for slot in slots]
    num_layers = text["num_hidden_layers"]
    text["num_hidden_layers"] = len(slots)
    for key in arch.per_layer_list_fields:
        # A derived layer_types is written out too: transformers' default pattern is by index, the stack's is not.
        values = text.get(key, layer_types if key == "layer_types" else None)
        if isinstance(values, list) and len(values) == num_layers:
            text[key] = [values[j] for j in sources]
    for key in arch.per_layer_dict_fields:
        if key in text and text[key] is not None:
            by_layer = {int(k): v for k, v in text[key].items()}
            text[key] = {str(i): copy.deepcopy(by_layer[j]) for i, j in enumerate(sources) if j in by_layer}
    if arch.kv_sharing:
        text[arch.kv_sharing.count_field] = sum(slot.kv_role == "reuse" for slot in slots)
    return out


def greedy_shards(sizes: list[int], max_bytes: int) -> list[list[int]]:
    """Indices of `sizes`, in order, cut into shards: an item joins the current shard unless it
    would overflow a non-empty one (an item larger than max_bytes gets a shard of its own)."""
    shards: list[list[int]] = [[]]
    used = 0
    for index, size in enumerate(sizes):
        if shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(index)
        used += size
    return shards


def _assign_shards(tensors: tuple[OutputTensor, ...], max_bytes: int) -> tuple[tuple[OutputTensor, ...], ...]:
    return tuple(tuple(tensors[i] for i in shard) for shard in greedy_shards([t.nbytes for t in tensors], max_bytes))


# ---- the final check: does transformers agree? ----------------------------------------------------------


def saved_tensor_shapes(config: dict[str, Any]) -> tuple[str, dict[str, tuple[int, ...]]]:
    """The model class config.json names, and every tensor its save_pretrained would write
    (name -> shape), from a model built on the meta device: no weights are allocated."""
    import torch
    import transformers
    from transformers.core_model_loading import revert_weight_conversion

    architectures = config.get("architectures") or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    transformers_config = _transformers_config(config)
    with torch.device("meta"):
        if model_class:
            model = model_class(transformers_config)
        else:
            model = transformers.AutoModelForCausalLM.from_config(transformers_config)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    # Names as save_pretrained writes them: some families (Gemma-3) save legacy names and rename on load.
    saved = revert_weight_conversion(model, {n: t for n, t in model.state_dict().items() if n not in tied})
    return type(model).__name__, {name: tuple(t.shape) for name, t in saved.items()}


def check_against_transformers(plan: StackPlan) -> None:
    """Build the output model on the meta device and compare its keys and shapes with the plan."""
    model_name, expected = saved_tensor_shapes(plan.config)
    planned_shapes = {t.name: t.shape for t in plan.tensors}
    problems = [f"missing {n}" for n in sorted(expected.keys() - planned_shapes.keys())]
    problems += [f"unexpected {n}" for n in sorted(planned_shapes.keys() - expected.keys())]
    problems += [
        f"mismatched {n}: plan {list(planned_shapes[n])} vs model {list(expected[n])}"
        for n in sorted(expected.keys() & planned_shapes.keys())
        if planned_shapes[n] != expected[n]
    ]
    if problems:
        raise PlanError(
            f"the planned stack of {plan.source_model!r} would not load cleanly in {model_name} "
            f"({len(problems)} problem(s)): " + "; ".join(problems[:8])
        )
    _check_runtime_roles(plan, _transformers_config(plan.config).get_text_config())


def _check_runtime_roles(plan: StackPlan, text) -> None:
    """The attention type and KV role transformers will give each slot are the ones planned."""
    if getattr(text, "layer_types", None) is not None:
        planned = [slot.attention_type for slot in plan.slots]
        if list(text.layer_types) != planned:
            raise PlanError(f"transformers reads layer_types {list(text.layer_types)} from the planned config; "
                            f"the plan has {planned}")
    if hasattr(text, "kv_sharing_modes"):
        planned_modes = [{"reuse": "reuse", "producer": "store"}.get(slot.kv_role) for slot in plan.slots]
        if list(text.kv_sharing_modes) != planned_modes:
            raise PlanError(f"transformers reads kv_sharing_modes {text.kv_sharing_modes} from the planned config; "
                            f"the plan has {planned_modes}")
