"""What an evaluation run reads and how: the EvalConfig, the error the CLI reports, the device and dtype."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


class EvalError(ValueError):
    """Bad input (a file, a row, a model folder, a flag); the CLI reports it and exits with 2."""


@dataclass(frozen=True)
class EvalConfig:
    prompts: Path | None = None  # JSONL of chat (or plain {"text"}) prompts, for the degeneration metrics
    instruct: Path | None = None  # JSONL of TRL "messages" (or plain {"text"}) rows, for kl_to_reference
    text: Path | None = None  # JSONL of {"text"} rows, for perplexity
    instructions: Path | None = None  # IFEval-format JSONL, for the verifiable-instruction accuracies
    tasks: tuple[str, ...] = ()  # lm-eval-harness task names
    tasks_dir: Path | None = None  # folder of task YAMLs; None: lm-eval's built-in tasks
    max_new_tokens: int = 160  # cap of the natural-stop continuations
    fixed_new_tokens: int = 96  # length of the length-controlled continuations (0: none)
    batch_size: int = 8  # rows per teacher-forced forward; on a GPU raise it: the logits are chunked, not the batch
    # prompts decoded together: on the CPU a decoding step costs about as much at 32 rows as at 8 (measured)
    generation_batch_size: int = 32
    max_length: int = 256  # tokens per --text row and per --instruct conversation
    logit_chunk_size: int = 256  # positions whose logits exist at once in the KL and the perplexity
    num_prompts: int | None = None  # use the first N prompts (None: all)
    num_rows: int | None = None  # use the first N rows of --instruct and of --text (None: all)
    task_limit: int | None = None  # lm-eval: the first N documents of each task (None: all)
    seed: int = 0  # lm-eval's seeds (few-shot sampling) and the bootstrap's
    bootstrap_resamples: int = 2000  # resamples of every interval
    device: str = "auto"  # auto | cuda | cpu
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    # ends_in_loop's parameters
    max_period: int = 16
    min_repeats: int = 3
    min_tail: int = 12

    def __post_init__(self):
        for name in ("max_new_tokens", "batch_size", "generation_batch_size", "max_length", "logit_chunk_size",
                     "bootstrap_resamples"):
            if getattr(self, name) < 1:
                raise EvalError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.fixed_new_tokens < 0:
            raise EvalError(f"fixed_new_tokens must be 0 (none) or more, got {self.fixed_new_tokens}")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """auto: cuda when available, else cpu. An explicit cuda without a GPU is an error, not a silent CPU run."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cuda", "cpu"):
        raise EvalError(f"--device {device!r}: expected auto, cuda or cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise EvalError("--device cuda: no CUDA device is available; use --device cpu or auto")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on a GPU, fp32 on the CPU (CPU bf16 matmuls are slow and lose precision for nothing)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise EvalError(f"--dtype {dtype!r}: expected auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]
