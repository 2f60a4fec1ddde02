"""lm-eval-harness multiple-choice tasks on an already loaded model, on local data only, with each document's
score kept for the bootstrap."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from evaluation.config import EvalError


@contextmanager
def hub_offline() -> Iterator[None]:
    """Forbid hub access for the block. huggingface_hub and datasets read HF_HUB_OFFLINE at import time,
    which has happened by now, so the module constants are switched too (and everything restored after)."""
    import datasets.config
    import huggingface_hub.constants

    saved_env = {key: os.environ.get(key) for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    saved_flags = (huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE)
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    huggingface_hub.constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved_flags
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def lm_eval_items(model, tokenizer, tasks: Sequence[str], tasks_dir: Path | None = None, batch_size: int = 8,
                  seed: int = 0, limit: int | None = None) -> dict[str, list[float]]:
    """{"<task>/acc": [per document, in document order], "<task>/acc_norm": [...]} from lm-eval-harness; the
    task's score is the mean of its list.

    HFLM takes the model object as is. With a tasks_dir, only its tasks are indexed: lm-eval's built-in
    tasks are slow to index and would need the hub for their data anyway."""
    # Imported here: lm_eval is only needed with --tasks.
    import lm_eval
    from lm_eval.tasks import TaskManager

    from evaluation.lm_eval_scorer import SharedContextHFLM

    with hub_offline():
        task_manager = TaskManager(include_path=str(tasks_dir) if tasks_dir else None,
                                   include_defaults=tasks_dir is None)
        missing = [task for task in tasks if task not in task_manager.all_tasks]
        if missing:
            raise EvalError(f"lm-eval tasks not found in {tasks_dir or 'the built-in tasks'}: {', '.join(missing)}")
        # HFLM uses a passed-in model on its own device, and tokenizes with the tokenizer's own special-token defaults.
        lm = SharedContextHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        output = lm_eval.simple_evaluate(
            model=lm, tasks=list(tasks), task_manager=task_manager, log_samples=True, limit=limit,
            bootstrap_iters=0,  # lm-eval's stderrs are not used: evaluation/stats.py bootstraps the per-doc scores
            random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
        )
    items = {}
    for task, samples in output["samples"].items():
        samples = sorted(samples, key=lambda sample: sample["doc_id"])
        for metric in ("acc", "acc_norm"):
            if all(metric in sample for sample in samples):
                items[f"{task}/{metric}"] = [float(sample[metric]) for sample in samples]
    return items
