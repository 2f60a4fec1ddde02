"""Reading tiny checkpoints back in tests, independently of the stacker's own reader."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file


def load_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(Path(directory).glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def load_config(directory: Path) -> dict:
    return json.loads((Path(directory) / "config.json").read_text())


def loading_info(directory: Path, model_class=None):
    """Load with transformers and return (model, info) where info lists missing/unexpected/mismatched keys."""
    from transformers import AutoModelForCausalLM

    model, info = (model_class or AutoModelForCausalLM).from_pretrained(directory, output_loading_info=True)
    return model.eval(), info


def assert_loads_clean(directory: Path, model_class=None):
    model, info = loading_info(directory, model_class)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set(), info
    assert info["mismatched_keys"] == set() and info["error_msgs"] == [], info
    # transformers ignores some unexpected keys silently (KV tensors of shared layers): compare the files
    # with the names save_pretrained would write for the loaded model.
    from transformers.core_model_loading import revert_weight_conversion

    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    saved_names = revert_weight_conversion(model, {n: t for n, t in model.state_dict().items() if n not in tied})
    assert set(load_tensors(directory)) == set(saved_names)
    return model


def logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def write_header_only_checkpoint(directory: Path, config) -> Path:
    """A checkpoint whose shard holds a valid safetensors header and no tensor data at all.

    Names and shapes are those transformers would save for `config` (built on the meta device), in bf16.
    Planning and --dry-run must work on it; anything that reads tensor data must fail.
    """
    from core.files import encode_safetensors_header
    from stack.plan import saved_tensor_shapes

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _, shapes = saved_tensor_shapes(config.to_dict())
    header = encode_safetensors_header([(name, "BF16", shape) for name, shape in shapes.items()])
    (directory / "model.safetensors").write_bytes(header)
    config.save_pretrained(directory)
    return directory


def assert_protection_holds(raw_dir: Path, healed_dir: Path) -> None:
    """The merged model holds the protection recorded in healed_dir/protection.safetensors, and every protected
    module trained elsewhere. Coordinates: its protected columns and rows equal the raw stack's bit for bit.
    kfac: ΔW U and Vᵀ ΔW are within kfac_bounds."""
    from heal.protection import PROTECTION_FILE, load_protection

    raw, merged = load_tensors(raw_dir), load_tensors(healed_dir / "merged")
    plan = load_protection(healed_dir / PROTECTION_FILE)
    assert plan
    for module, protection in plan.items():
        name = f"{module}.weight"
        if protection.kind == "kfac":
            residuals = subspace_residuals(merged[name] - raw[name], protection)
            bounds = kfac_bounds(merged[name], raw[name], protection)
            assert all(r <= b for r, b in zip(residuals, bounds)), f"{name}: |ΔW U|, |Vᵀ ΔW| {residuals} > {bounds}"
        else:
            assert torch.equal(merged[name][:, protection.inputs], raw[name][:, protection.inputs]), name
            assert torch.equal(merged[name][protection.outputs, :], raw[name][protection.outputs, :]), name
        assert not torch.equal(merged[name], raw[name]), f"{name} did not train"


# kfac's fp32 guarantee (docs/architecture.md, "Exactness"): |ΔW U|max and |Vᵀ ΔW|max at most this share of
# |ΔW|max; the tiny heals measure a few 1e-8 on the adapter and at most a few 1e-7 on an fp32 merge.
KFAC_RELATIVE_BOUND = 1e-5


def subspace_residuals(delta: torch.Tensor, protection) -> tuple[float, float]:
    """(|ΔW U|max, |Vᵀ ΔW|max) for ΔW [out, in] and a SubspaceProtection's bases, in float64."""
    delta = delta.double()
    return (_largest(delta @ protection.input_basis.double()),
            _largest(protection.output_basis.double().T @ delta))


def kfac_bounds(merged: torch.Tensor, raw: torch.Tensor, protection) -> tuple[float, float]:
    """What kfac's guarantee allows |ΔW U|max and |Vᵀ ΔW|max on a merged weight read from disk (ΔW = merged − raw):
    KFAC_RELATIVE_BOUND · |ΔW|max, plus the merge's roundings to the checkpoint's dtype (PEFT rounds ΔW, then
    W + ΔW): each entry off by at most u · (|merged|max + |ΔW|max), u = eps / 2, summed by a basis column's
    1-norm. On a bf16 checkpoint that rounding term dominates; on fp32 it is below the relative term."""
    delta = merged.double() - raw.double()
    rounding = torch.finfo(merged.dtype).eps / 2 * (_largest(merged.double()) + _largest(delta))

    def bound(basis: torch.Tensor) -> float:
        return KFAC_RELATIVE_BOUND * _largest(delta) + rounding * _largest(basis.double().abs().sum(0))

    return bound(protection.input_basis), bound(protection.output_basis)


def _largest(values: torch.Tensor) -> float:
    return float(values.abs().max()) if values.numel() else 0.0
