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
    from stack.plan import saved_tensor_shapes
    from stack.source import encode_safetensors_header

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _, shapes = saved_tensor_shapes(config.to_dict())
    header = encode_safetensors_header([(name, "BF16", shape) for name, shape in shapes.items()])
    (directory / "model.safetensors").write_bytes(header)
    config.save_pretrained(directory)
    return directory


def assert_protection_holds(raw_dir: Path, healed_dir: Path) -> None:
    """The merged model's protected columns and rows (healed_dir/protection.safetensors) equal the raw
    stack's bit for bit, and every protected module trained elsewhere."""
    from heal.protection import PROTECTION_FILE, load_protection

    raw, merged = load_tensors(raw_dir), load_tensors(healed_dir / "merged")
    plan = load_protection(healed_dir / PROTECTION_FILE)
    assert plan
    for module, protection in plan.items():
        name = f"{module}.weight"
        assert torch.equal(merged[name][:, protection.inputs], raw[name][:, protection.inputs]), name
        assert torch.equal(merged[name][protection.outputs, :], raw[name][protection.outputs, :]), name
        assert not torch.equal(merged[name], raw[name]), f"{name} did not train"
