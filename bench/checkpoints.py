"""Synthetic checkpoints for the benchmarks: bf16 checkpoints with real tensor names and shapes and random bytes,
streamed into hand-written safetensors files from one reusable random buffer (no tensor or shard is ever held in
memory), and the tiny stacked E6B the heal benchmarks train. What each benchmark measures: docs/benchmarks.md.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import (
    Gemma4AudioConfig,
    Gemma4Config,
    Gemma4ForConditionalGeneration,
    Gemma4TextConfig,
    Gemma4VisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedConfig,
)

from core.files import encode_safetensors_header
from stack.__main__ import main as stack_main
from stack.plan import greedy_shards, saved_tensor_shapes
from stack.tiny import save_tiny_gemma4
from stack.writer import shard_file_names

logger = logging.getLogger(__name__)

SEED_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "e6b.yaml"

BF16_BYTES = 2
RANDOM_BUFFER_BYTES = 64 << 20  # 64 MiB of random bf16 values, reused for every tensor
HF_SHARD_BYTES = 5 * 10**9  # save_pretrained's default max_shard_size, "5GB"
DIM_MULTIPLE = 64  # scaled widths stay multiples of this, so head counts still divide them


@dataclass(frozen=True)
class SyntheticModel:
    """A model shape to generate: its config, its transformers class and its scale."""

    name: str  # for logs and the completion marker
    config: PreTrainedConfig
    model_class: type
    scale: float

    @property
    def shard_bytes(self) -> int:
        """Source shard size: HF's 5 GB, shrunk with the model so small runs still have several shards."""
        return max(1, int(HF_SHARD_BYTES * self.scale))


def scaled(dim: int, scale: float) -> int:
    """`dim * scale` rounded to a multiple of DIM_MULTIPLE (at least one); scale 1 keeps `dim`."""
    return max(DIM_MULTIPLE, round(dim * scale / DIM_MULTIPLE) * DIM_MULTIPLE)


def gemma4_e4b(scale: float) -> SyntheticModel:
    """Gemma-4 E4B: 42 layers (5 sliding + 1 full, x7), the last 18 KV-shared, PLE, vision and audio towers.

    `scale` shrinks the widths (hidden, FFN, both vocabularies, tower widths); depth, head counts,
    head dims, the PLE block width and the layer pattern stay real, so the stacker sees the same structure.
    """
    text = Gemma4TextConfig(
        hidden_size=scaled(2560, scale),
        num_hidden_layers=42,
        intermediate_size=scaled(10240, scale),
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=256,
        global_head_dim=512,  # full-attention layers
        vocab_size=scaled(262144, scale),
        vocab_size_per_layer_input=scaled(262144, scale),
        hidden_size_per_layer_input=256,
        num_kv_shared_layers=18,
        layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 7,
        tie_word_embeddings=True,
    )
    vision = Gemma4VisionConfig(hidden_size=scaled(768, scale), intermediate_size=scaled(3072, scale))
    audio = Gemma4AudioConfig(hidden_size=scaled(1024, scale), output_proj_dims=scaled(1536, scale))
    config = Gemma4Config(text_config=text, vision_config=vision, audio_config=audio, tie_word_embeddings=True)
    config.dtype = "bfloat16"
    return SyntheticModel("gemma4-e4b", config, Gemma4ForConditionalGeneration, scale)


def llama_24() -> SyntheticModel:
    """A 24-layer Llama, 0.81 GB in bf16: the mergekit comparison model. Small enough for any disk,
    so it is never scaled and the comparison means the same at every --scale."""
    config = LlamaConfig(hidden_size=1024, intermediate_size=3584, num_hidden_layers=24, num_attention_heads=16,
                         num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False)
    config.dtype = "bfloat16"
    return SyntheticModel("llama-24", config, LlamaForCausalLM, scale=1.0)


def tensor_shapes(model: SyntheticModel) -> dict[str, tuple[int, ...]]:
    """Every tensor `save_pretrained` would write, name -> shape, without allocating any weights: the model is
    built on the meta device, so tied weights are left out and Gemma-4's KV-shared layers have no
    k_proj/v_proj/k_norm, exactly as in a saved checkpoint."""
    return saved_tensor_shapes(model.config.to_dict())[1]


def bf16_bytes(shape: tuple[int, ...]) -> int:
    return math.prod(shape) * BF16_BYTES


def plan_shards(shapes: dict[str, tuple[int, ...]], max_bytes: int) -> list[list[str]]:
    """Shards of tensor names, cut the way the stacker cuts its output (stack.plan.greedy_shards)."""
    names = list(shapes)
    return [[names[i] for i in shard] for shard in greedy_shards([bf16_bytes(shapes[n]) for n in names], max_bytes)]


def checkpoint_file_names(count: int) -> list[str]:
    """As save_pretrained names them: one file is model.safetensors, several are numbered."""
    return ["model.safetensors"] if count == 1 else shard_file_names(count)


class RandomBytes:
    """A buffer of N(0, 0.02) bf16 values; each tensor is streamed from it at its own start offset."""

    def __init__(self, nbytes: int = RANDOM_BUFFER_BYTES, seed: int = 0):
        self._buffer = bytearray(nbytes)
        values = torch.frombuffer(self._buffer, dtype=torch.bfloat16)  # shares memory with the bytearray
        values.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(seed))
        self._view = memoryview(self._buffer)

    def write(self, f, nbytes: int, start: int, progress: tqdm) -> None:
        """Write `nbytes` bytes to `f`, reading the buffer from `start` and wrapping around."""
        position = (start % len(self._buffer)) & ~1  # even, so every bf16 value stays whole
        while nbytes:
            count = min(nbytes, len(self._buffer) - position)
            f.write(self._view[position : position + count])
            progress.update(count)
            nbytes -= count
            position = 0


def write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], names: list[str],
                      random_bytes: RandomBytes, progress: tqdm) -> None:
    """One safetensors file: 8-byte little-endian header length, JSON header, then the tensors' bytes
    back to back in header order. The header is space-padded so the data starts 8-byte aligned."""
    with open(path, "wb") as f:
        f.write(encode_safetensors_header([(name, "BF16", shapes[name]) for name in names]))
        for index, name in enumerate(names):
            # A different start per tensor (a large odd multiple of 2 bytes) so tensors differ.
            random_bytes.write(f, bf16_bytes(shapes[name]), start=index * 2_000_006, progress=progress)


def write_index(directory: Path, shapes: dict[str, tuple[int, ...]], shards: list[list[str]],
                files: list[str]) -> None:
    """model.safetensors.index.json, as transformers writes it for a sharded checkpoint."""
    weight_map = {name: file for names, file in zip(shards, files, strict=True) for name in names}
    index = {"metadata": {"total_size": sum(bf16_bytes(s) for s in shapes.values())}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def completion_marker(directory: Path) -> Path:
    """DIR.complete.json marks a finished checkpoint DIR: written last, and outside DIR, so the stacker (which
    copies every non-weight file of its source) never sees it."""
    return directory.with_name(directory.name + ".complete.json")


def ensure_checkpoint(model: SyntheticModel, directory: Path) -> int:
    """Generate `model` in `directory` unless a complete one of the same scale is there.
    Returns the checkpoint's tensor bytes."""
    shapes = tensor_shapes(model)
    total_bytes = sum(bf16_bytes(s) for s in shapes.values())
    marker = completion_marker(directory)
    expected = {"model": model.name, "scale": model.scale, "total_size": total_bytes}
    if marker.is_file() and json.loads(marker.read_text()) == expected:
        logger.info("%s: reusing %s (%.2f GB)", model.name, directory, total_bytes / 1e9)
        return total_bytes

    marker.unlink(missing_ok=True)
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    model.config.architectures = [model.model_class.__name__]  # as save_pretrained of a model records it
    model.config.save_pretrained(directory)
    GenerationConfig.from_model_config(model.config).save_pretrained(directory)

    shards = plan_shards(shapes, model.shard_bytes)
    files = checkpoint_file_names(len(shards))
    random_bytes = RandomBytes()
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"generate {model.name}") as progress:
        for names, file in zip(shards, files, strict=True):
            write_safetensors(directory / file, shapes, names, random_bytes, progress)
    if len(files) > 1:
        write_index(directory, shapes, shards, files)
    marker.write_text(json.dumps(expected) + "\n")
    logger.info("%s: wrote %s (%.2f GB in %d shard(s))", model.name, directory, total_bytes / 1e9, len(files))
    return total_bytes


def tiny_e6b(scratch: Path, **text_overrides) -> Path | None:
    """A fresh `scratch` holding stack.tiny's E4B-shaped Gemma-4 (`text_overrides` on its text config) in e4b/ and
    its E6B by the seed recipe in e6b/: the stack's folder, or None when the stacker failed (its log says why)."""
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    source = save_tiny_gemma4(scratch / "e4b", **text_overrides)
    stack = scratch / "e6b"
    if stack_main([str(SEED_RECIPE), "--source", str(source), "--out", str(stack)]) != 0:
        return None
    return stack
