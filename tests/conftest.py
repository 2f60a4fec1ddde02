"""Session fixtures: tiny random models built with transformers at test time (nothing downloaded)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a test must never reach the hub

from stack.__main__ import main as stack_main  # noqa: E402
from stack.tiny import save_tiny_decoder, save_tiny_gemma4  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SEED_RECIPE = REPO / "recipes" / "e6b.yaml"

# The card's mapping (../shared/seed-model-card.txt), written out independently of the recipe parser.
SEED_SOURCE_LAYERS = list(range(0, 18)) + list(range(10, 26)) + list(range(18, 34)) + list(range(26, 42))


def write_recipe(path: Path, layer_ranges: list[tuple[int, int]], model: str = "tiny", **stack_options) -> Path:
    recipe = {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": model, "layer_range": list(r)}]} for r in layer_ranges],
    }
    if stack_options:
        recipe["stack"] = stack_options
    path.write_text(yaml.safe_dump(recipe))
    return path


def run_stack(recipe: Path, source: Path, out: Path, *flags: str) -> int:
    return stack_main([str(recipe), "--source", str(source), "--out", str(out), *flags])


@pytest.fixture(scope="session")
def tiny_e4b(tmp_path_factory) -> Path:
    return save_tiny_gemma4(tmp_path_factory.mktemp("tiny-e4b"))


@pytest.fixture(scope="session")
def tiny_e6b(tiny_e4b, tmp_path_factory) -> Path:
    """The seed recipe (recipes/e6b.yaml) applied to the tiny E4B."""
    out = tmp_path_factory.mktemp("stacks") / "e6b"
    assert run_stack(SEED_RECIPE, tiny_e4b, out) == 0
    return out


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return save_tiny_decoder(tmp_path_factory.mktemp("tiny-llama"), "llama", num_hidden_layers=6)


@pytest.fixture(scope="session")
def e4b_fisher(tiny_e4b, tmp_path_factory):
    """fisher.safetensors of the tiny E4B, computed by fisher/ on a few conversations."""
    from fisher.__main__ import compute_and_write
    from fisher.config import config_from_dict
    from fisher.file import FISHER_FILE

    from .fisher_support import rows_for, write_jsonl

    folder = tmp_path_factory.mktemp("e4b-fisher")
    chat = write_jsonl(folder / "chat.jsonl", rows_for("messages", 8))
    compute_and_write(config_from_dict({"model": str(tiny_e4b), "datasets": [{"path": str(chat)}],
                                        "out": str(folder / "out"), "dtype": "float32", "max_length": 64}))
    return folder / "out" / FISHER_FILE


@pytest.fixture(scope="session")
def e4b_factors(tiny_e4b, tmp_path_factory):
    """fisher_factors.safetensors of the tiny E4B for every decoder Linear, from random PSD moments
    (fisher_support.random_factors), with the tiny E4B's shard hashes as its provenance."""
    from core.files import sha256_file
    from fisher.factors import FACTORS_FILE, save_factors

    from .checkpoints import load_tensors
    from .fisher_support import random_factors

    shapes = {name.removesuffix(".weight"): tuple(t.shape) for name, t in load_tensors(tiny_e4b).items()
              if name.startswith("model.language_model.layers.") and t.dim() == 2}
    shards = {path.name: sha256_file(path) for path in sorted(tiny_e4b.glob("*.safetensors"))}
    path = tmp_path_factory.mktemp("e4b-factors") / FACTORS_FILE
    save_factors(path, random_factors(shapes), {"model": str(tiny_e4b), "model_shard_sha256": shards})
    return path


@pytest.fixture(scope="session")
def source_fisher(tiny_e4b):
    """A positive stand-in Fisher keyed like fisher.safetensors: every 2-D decoder weight of the tiny E4B."""
    import torch

    from .checkpoints import load_tensors

    generator = torch.Generator().manual_seed(0)
    return {name: torch.rand(t.shape, generator=generator) ** 4 for name, t in load_tensors(tiny_e4b).items()
            if name.startswith("model.language_model.layers.") and t.dim() == 2}


def heal_recipe(path: Path, stack, fisher, chat, output_dir, **overrides) -> Path:
    """A few-step heal of a tiny stack on CPU; `overrides` replace any key."""
    recipe = {
        "stack": str(stack), "fisher": str(fisher) if fisher else None, "datasets": [{"path": str(chat)}],
        "seam_width": 1, "seam_r": 4, "seam_alpha": 8, "graft_r": 2, "graft_alpha": 4,
        "mass_share": 0.5, "max_fraction": 0.25,
        "merge": True, "output_dir": str(output_dir), "max_steps": 3, "per_device_train_batch_size": 2,
        "learning_rate": 5e-2, "weight_decay": 0.5, "max_length": 64, "logging_steps": 1, "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True, "bf16": False, "activation_checkpointing": False, "seed": 0, **overrides,
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
