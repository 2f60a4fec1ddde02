"""evaluate_models: every model scored on the same inputs, one model loaded at a time, then every metric's
estimate and 95% interval from its per-item values, and paired intervals for the differences between models."""

from __future__ import annotations

import gc
import itertools
import json
import logging
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.tokens import pad_id, vocabulary_difference
from evaluation import ifeval, stats
from evaluation.config import EvalConfig, EvalError, resolve_device, resolve_dtype
from evaluation.generation import greedy_continuations
from evaluation.inputs import load_instruct, load_prompts, load_texts, prompt_text
from evaluation.likelihood import (
    Backbone,
    ReferenceStates,
    encode_response_examples,
    encode_texts,
    kl_rows,
    nll_rows,
    reference_states,
)
from evaluation.lm_eval_tasks import lm_eval_items
from evaluation.metrics import distinct_n, ends_in_loop, seq_rep_n

logger = logging.getLogger(__name__)

# Metrics whose items are (numerator, denominator) rows: the metric is Σ numerators / Σ denominators, transformed.
RATIO_METRICS = {"kl_to_reference": None, "perplexity": math.exp, "if_instruction_strict": None,
                 "if_instruction_loose": None}
# Metrics whose every pair of models gets a paired interval for its difference (and every lm-eval task metric).
HEADLINE = ("fixed_seq_rep_4", "fixed_loop_rate", "kl_to_reference", "perplexity", "if_prompt_strict",
            "if_instruction_loose")


ADAPTER_CONFIG = "adapter_config.json"


def adapter_base(path: Path) -> Path | None:
    """The base model folder of a PEFT adapter folder (its adapter_config.json's base_model_name_or_path), or None
    when `path` is a full model. A heal's checkpoint-N/ is such a folder: evaluating one needs no merged copy."""
    config = Path(path) / ADAPTER_CONFIG
    if not config.is_file():
        return None
    base = json.loads(config.read_text()).get("base_model_name_or_path")
    if not base or not (Path(base) / "config.json").is_file():
        raise EvalError(f"adapter {path}: its base model {base!r} (base_model_name_or_path in {ADAPTER_CONFIG}) is "
                        "not a model folder here; heal again, or evaluate the merged model instead")
    return Path(base)


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    base = adapter_base(path)
    has_own = any((Path(path) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
    return AutoTokenizer.from_pretrained(path if base is None or has_own else base)


def load_model(path: Path, device: torch.device, dtype: torch.dtype):
    """A model folder, or a PEFT adapter folder merged into its base (in memory, in `dtype`)."""
    from transformers import AutoModelForCausalLM

    base = adapter_base(path)
    if base is None:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    from peft import PeftModel

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    return PeftModel.from_pretrained(model, path).merge_and_unload().to(device).eval()


def check_models(models: dict[str, Path], reference: str | None) -> dict[str, Any]:
    """Fail before any model is loaded: missing folders, an unknown reference, differing vocabularies
    (the KL compares distributions token by token, so the ids must mean the same). Returns the tokenizers."""
    if not models:
        raise EvalError("no models to evaluate")
    if reference is not None and reference not in models:
        raise EvalError(f"reference {reference!r} is not among the models ({', '.join(models)})")
    for name, path in models.items():
        if not (Path(path) / "config.json").is_file() and adapter_base(Path(path)) is None:
            raise EvalError(f"model {name!r}: {path} is neither a model folder (config.json) nor a PEFT adapter "
                            f"folder ({ADAPTER_CONFIG})")
    tokenizers = {name: load_tokenizer(Path(path)) for name, path in models.items()}
    baseline = reference if reference is not None else next(iter(models))
    for name, tokenizer in tokenizers.items():
        difference = vocabulary_difference(tokenizer, tokenizers[baseline])
        if difference is not None:
            raise EvalError(f"model {name!r}: its tokenizer's vocabulary differs from {baseline!r}'s: {difference}")
    return tokenizers


def _load_inputs(config: EvalConfig) -> dict[str, list]:
    if config.tasks and config.tasks_dir and not Path(config.tasks_dir).is_dir():
        raise EvalError(f"--tasks-dir {config.tasks_dir}: no such folder")
    try:
        instructions = ifeval.load_instruction_prompts(config.instructions) if config.instructions else []
    except (OSError, ifeval.InstructionError) as error:
        raise EvalError(f"--instructions: {error}") from None
    return {
        "prompts": load_prompts(config.prompts, config.num_prompts) if config.prompts else [],
        "instruct": load_instruct(config.instruct, config.num_rows) if config.instruct else [],
        "texts": load_texts(config.text, config.num_rows) if config.text else [],
        "instructions": instructions,
    }


def evaluate_models(models: dict[str, Path], reference: str | None, config: EvalConfig) -> dict:
    """Every metric for every model, with intervals, per-item values and the continuations as text. The
    reference (if any) is evaluated first; the KL keeps only its head and its hidden states at the response
    positions. Every model is loaded, scored and freed in turn."""
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    tokenizers = check_models(models, reference)
    inputs = _load_inputs(config)
    order = ([reference] if reference else []) + [name for name in models if name != reference]
    reference_kl: ReferenceStates | None = None
    results: dict[str, dict] = {}
    for name in order:
        logger.info("evaluating %s (%s) on %s in %s", name, models[name], device, dtype)
        model = load_model(Path(models[name]), device, dtype)
        results[name], states = _evaluate_one(model, tokenizers[name], name == reference, reference_kl, inputs,
                                              config)
        reference_kl = states if name == reference else reference_kl
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    _add_estimates(results, reference, config)
    return {
        "reference": reference,
        "config": {key: str(value) if isinstance(value, Path) else value for key, value in asdict(config).items()},
        "device": str(device), "dtype": str(dtype).removeprefix("torch."),
        "prompts": [prompt_text(prompt) for prompt in inputs["prompts"]],
        "instructions": [prompt.prompt for prompt in inputs["instructions"]],
        "models": {name: {"path": str(models[name]), **results[name]} for name in models},
        "differences": differences(results, reference, config),
    }


def _evaluate_one(model, tokenizer, is_reference: bool, reference_kl: ReferenceStates | None, inputs: dict,
                  config: EvalConfig) -> tuple[dict, ReferenceStates | None]:
    """One model's per-item values (and texts); with the reference, also what the others' KL needs of it."""
    items: dict[str, list] = {}
    result: dict[str, Any] = {"items": items, "pooled": {}}
    if inputs["prompts"]:
        generated = greedy_continuations(model, tokenizer, inputs["prompts"], config.max_new_tokens,
                                         config.fixed_new_tokens, config.generation_batch_size)
        _degeneration_items(generated, config, items, result["pooled"])
        result["continuations"] = [tokenizer.decode(c.tokens) for c in generated.natural]
        result["fixed_continuations"] = [tokenizer.decode(c.tokens) for c in generated.fixed]
    if inputs["instructions"]:
        prompts = [[{"role": "user", "content": prompt.prompt}] for prompt in inputs["instructions"]]
        natural = greedy_continuations(model, tokenizer, prompts, config.max_new_tokens, 0,
                                       config.generation_batch_size).natural
        result["if_responses"] = [tokenizer.decode(c.tokens, skip_special_tokens=True) for c in natural]
        scores = ifeval.score_responses(inputs["instructions"], result["if_responses"])
        items.update(if_prompt_strict=[float(x) for x in scores.prompt_strict],
                     if_prompt_loose=[float(x) for x in scores.prompt_loose],
                     if_instruction_strict=[list(pair) for pair in scores.instruction_strict],
                     if_instruction_loose=[list(pair) for pair in scores.instruction_loose])
    states = None
    backbone = Backbone(model) if inputs["instruct"] or inputs["texts"] else None
    if inputs["instruct"]:
        examples = encode_response_examples(tokenizer, inputs["instruct"], str(config.instruct), config.max_length)
        if is_reference:
            states = reference_states(backbone, examples, pad_id(tokenizer), config.batch_size)
            # KL(p ‖ p) = 0 by definition; the token counts keep the rows paired with the other models'.
            items["kl_to_reference"] = [[0.0, len(hidden)] for hidden in states.hidden]
        elif reference_kl is not None:
            items["kl_to_reference"] = [list(row) for row in kl_rows(
                backbone, reference_kl, examples, pad_id(tokenizer), config.batch_size, config.logit_chunk_size)]
    if inputs["texts"]:
        encoded = encode_texts(tokenizer, inputs["texts"], config.max_length)
        items["perplexity"] = [list(row) for row in nll_rows(backbone, encoded, pad_id(tokenizer), config.batch_size,
                                                             config.logit_chunk_size)]
    if config.tasks:
        items.update(lm_eval_items(model, tokenizer, config.tasks, config.tasks_dir, config.batch_size, config.seed,
                                   config.task_limit))
    return result, states


def _degeneration_items(generated, config: EvalConfig, items: dict, pooled: dict) -> None:
    loop = [ends_in_loop(c.tokens, c.stopped, config.max_period, config.min_repeats, config.min_tail)
            for c in generated.natural]
    items.update(seq_rep_4=[seq_rep_n(c.tokens, 4) for c in generated.natural], loop_rate=[float(x) for x in loop],
                 mean_length=[len(c.tokens) for c in generated.natural],
                 stopped_share=[float(c.stopped) for c in generated.natural])
    if generated.fixed:
        items.update(fixed_seq_rep_4=[seq_rep_n(c.tokens, 4) for c in generated.fixed],
                     fixed_loop_rate=[float(ends_in_loop(c.tokens, False, config.max_period, config.min_repeats,
                                                         config.min_tail)) for c in generated.fixed])
    # Pooled over continuations, so it has no per-item values and gets no interval: a bootstrap resample
    # repeats continuations, whose bigrams count again in the total but never as new distinct ones, so every
    # resample is biased low and the percentile interval can miss the estimate altogether (the demo's did).
    pooled["distinct_2"] = distinct_n([c.tokens for c in generated.natural], 2)


def _interval(items: list, metric: str, config: EvalConfig) -> stats.Interval:
    options = {"num_resamples": config.bootstrap_resamples, "seed": config.seed}
    if metric in RATIO_METRICS:
        numerators, denominators = zip(*items)
        return stats.bootstrap_ratio(numerators, denominators, transform=RATIO_METRICS[metric], **options)
    return stats.bootstrap_mean(items, **options)


def _add_estimates(results: dict[str, dict], reference: str | None, config: EvalConfig) -> None:
    """metrics {name: estimate} and intervals {name: [low, high]} for every model, from its items."""
    reference_lengths = results[reference]["items"].get("mean_length") if reference else None
    for result in results.values():
        intervals = {name: _interval(values, name, config) for name, values in result["items"].items()}

        if reference_lengths is not None and "mean_length" in result["items"]:
            # Σ lengths / the reference's Σ lengths over the same (resampled) prompts
            intervals["length_ratio"] = stats.bootstrap_ratio(
                result["items"]["mean_length"], reference_lengths,
                num_resamples=config.bootstrap_resamples, seed=config.seed)
        estimates = {name: interval.estimate for name, interval in intervals.items()}
        result["metrics"] = {**estimates, **result.pop("pooled")}
        result["intervals"] = {name: [interval.low, interval.high] for name, interval in intervals.items()}


def differences(results: dict[str, dict], reference: str | None, config: EvalConfig) -> list[dict]:
    """Paired intervals of a − b for the headline metrics: every model against the reference, and every two
    non-reference models. Rows are the same items for both (same prompts, rows, documents)."""
    others = [name for name in results if name != reference]
    pairs = [(name, reference) for name in others] if reference else []
    pairs += list(itertools.combinations(others, 2))
    out = []
    for a, b in pairs:
        items_a, items_b = results[a]["items"], results[b]["items"]
        for metric in items_a:
            if metric not in items_b or not (metric in HEADLINE or "/" in metric):
                continue
            interval = _paired(items_a[metric], items_b[metric], metric, config)
            out.append({"metric": metric, "a": a, "b": b, "estimate": interval.estimate, "low": interval.low,
                        "high": interval.high})
    return out


def _paired(items_a: list, items_b: list, metric: str, config: EvalConfig) -> stats.Interval:
    options = {"num_resamples": config.bootstrap_resamples, "seed": config.seed}
    if metric in RATIO_METRICS:
        num_a, den_a = np.array(items_a, dtype=float).T
        num_b, den_b = np.array(items_b, dtype=float).T
        return stats.paired_ratio_difference(num_a, den_a, num_b, den_b, transform=RATIO_METRICS[metric], **options)
    return stats.paired_mean_difference(items_a, items_b, **options)
