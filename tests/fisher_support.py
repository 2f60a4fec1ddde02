"""Test data in TRL's formats, a brute-force Fisher written independently of fisher/, and random K-FAC factors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from core.logits import sample_tokens
from fisher.estimator import example_generator, label_uniforms
from fisher.factors import ModuleFactors, top_eigenbasis


def words(rng: random.Random, count: int) -> str:
    return " ".join(f"w{rng.randrange(500)}" for _ in range(count))


def rows_for(format_name: str, count: int = 6, seed: int = 0) -> list[dict]:
    """Rows of varying length in one of TRL's dataset formats."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        question, answer = words(rng, rng.randint(2, 9)), words(rng, rng.randint(1, 7))
        if format_name == "messages":
            rows.append({"messages": [{"role": "user", "content": question},
                                      {"role": "assistant", "content": answer},
                                      {"role": "user", "content": words(rng, 2)},
                                      {"role": "assistant", "content": words(rng, 3)}]})
        elif format_name == "prompt_completion":
            rows.append({"prompt": question, "completion": " " + answer})
        elif format_name == "conversational_prompt_completion":
            rows.append({"prompt": [{"role": "user", "content": question}],
                         "completion": [{"role": "assistant", "content": answer}]})
        elif format_name == "text":
            rows.append({"text": question + " " + answer})
        else:
            raise ValueError(format_name)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def random_factors(shapes: dict[str, tuple[int, int]], seed: int = 0, decay: float = 0.8) -> dict[str, ModuleFactors]:
    """K-FAC factors for modules of the given [out, in] shapes: each side a random PSD moment Q diag(decay^i) Qᵀ
    (Q a random rotation), stored as fisher/ stores it (top_eigenbasis: 0.9 of the trace, at most 32 vectors)."""
    generator = torch.Generator().manual_seed(seed)

    def moment(dim: int) -> torch.Tensor:
        rotation, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
        return (rotation * decay ** torch.arange(dim, dtype=torch.float64)) @ rotation.T

    return {module: ModuleFactors(top_eigenbasis(moment(inputs), 0.9, 32), top_eigenbasis(moment(outputs), 0.9, 32))
            for module, (outputs, inputs) in sorted(shapes.items())}


def tracked_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """Weights of every nn.Linear in the text decoder layers, found by name, not by fisher/'s helper."""
    return {
        f"{name}.weight": module.weight
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and ".layers." in name and "tower" not in name
    }


def sample_labels(logits: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """`true` mode's labels for one example from its full logits [T, V] at once: at each loss position, a draw
    from the model's predictive distribution (label t is predicted from logits t-1). labels [T] -> [T]."""
    sampled = labels.clone()
    positions = (labels[1:] != -100).nonzero().squeeze(1) + 1
    sampled[positions] = sample_tokens(logits[positions - 1].float(), label_uniforms(labels, generator))
    return sampled


def brute_force_fisher(model, examples, mode="empirical", seed=0, num_samples=1) -> dict[str, torch.Tensor]:
    """Mean over examples (and label samples) of the squared gradient of each example's summed
    log-likelihood, one example at a time with plain autograd."""
    weights = tracked_weights(model)
    for weight in weights.values():
        weight.requires_grad_(True)
    sums = {name: torch.zeros_like(w, dtype=torch.float32) for name, w in weights.items()}
    for example in examples:
        input_ids, labels = torch.tensor([example.input_ids]), torch.tensor(example.labels)
        for sample in range(num_samples):
            logits = model(input_ids=input_ids).logits[0]
            if mode == "empirical":
                targets = labels
            else:
                generator = example_generator(seed, example.example_id, sample, logits.device)
                targets = sample_labels(logits.detach(), labels, generator)
            log_likelihood = -F.cross_entropy(logits[:-1].float(), targets[1:], ignore_index=-100, reduction="sum")
            for (name, _), grad in zip(weights.items(), torch.autograd.grad(log_likelihood, list(weights.values()))):
                sums[name] += grad.float().square()
    for weight in weights.values():
        weight.requires_grad_(False)
    return {name: total / (len(examples) * num_samples) for name, total in sums.items()}


def poison_layer(layer: int, only_there: bool):
    """A NaN output gradient at layer `layer`'s down_proj for rows holding token 7 ("w1"). `only_there`: zeroed
    again at its input, so only that module sees it (a later layer group finds it after earlier ones added it)."""
    def poison(model):
        captured = {}
        model.get_input_embeddings().register_forward_hook(lambda m, a, o: captured.update(ids=a[0]))

        def hook(module, args, output):
            rows = (captured["ids"] == 7).any(dim=1)
            if output.requires_grad and rows.any():
                output.register_hook(lambda g: torch.where(rows[:, None, None], torch.full_like(g, float("nan")), g))
                if only_there:
                    args[0].register_hook(torch.nan_to_num)

        model.model.layers[layer].mlp.down_proj.register_forward_hook(hook)
    return poison
