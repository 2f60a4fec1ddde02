"""Per-example squared gradients of the decoder's Linear weights, from one batched backward.

For a Linear y = x Wᵀ and one example b with inputs X_b [T, in] and output gradients G_b [T, out]
(rows of the batch are independent, so G_b is ∂ℓ_b/∂y_b even when the loss sums the batch):

    ∂ℓ_b/∂W = G_bᵀ X_b          exact: accumulate (G_bᵀ X_b)²           [out, in]
                                per_token (approximate): (G_b²)ᵀ (X_b²) = Σ_t g_t² x_tᵀ²

A forward hook keeps X and puts a hook on the output; that hook receives G during backward and
adds the squares into an fp32 sum (fused: sum += P·P), `examples_per_chunk` examples at a time. Per-example gradients
therefore exist for one module and a few examples at once, never for the whole model. Weights
are frozen, so autograd never builds the (batch-summed, useless here) weight gradients.

Memory. The hooks keep every tracked module's input X until the backward, for all modules at once: gradient
checkpointing cannot free them (for E4B at batch 4 × 2048 tokens, bf16, ~14 GB; docs/benchmarks.md). A
per-layer-group pass (FisherConfig.layer_groups, fisher.run) hooks one contiguous group of decoder layers per
pass over the data, so those inputs and the fp32 sums on the device shrink to ~1/groups.

Non-finite per-example gradients are not added. Because the first module to see one may come after
others already added that example, such examples are then removed again by a second backward
over the same graph that subtracts exactly what was added (see `Accumulator.correction`).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .config import ConfigError
from .head import LogitHead, token_log_likelihoods


def _exact(g: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    return torch.bmm(g.transpose(1, 2), x), True  # per-example gradients [b, out, in], to be squared


def _per_token(g: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    return torch.bmm(g.square().transpose(1, 2), x.square()), False  # already squares [b, out, in]


# estimator -> fn(G [b, T, out], X [b, T, in]) -> (per-example matrices, whether they still need squaring)
PER_EXAMPLE = {"exact": _exact, "per_token": _per_token}


class Accumulator:
    """Σ over examples of the squared per-example gradient of each tracked Linear weight, in fp32."""

    def __init__(self, modules: dict[str, nn.Linear], estimator: str = "exact", examples_per_chunk: int = 1):
        self.modules = modules
        self.names = {module: name for name, module in modules.items()}
        # name -> fp32 [out, in], created on the weight's device when the module is first hooked
        self.sums: dict[str, torch.Tensor] = {}
        self.per_example = PER_EXAMPLE[estimator]
        self.chunk = examples_per_chunk
        self._subtract: dict[str, torch.Tensor] | None = None  # set during a correction backward
        self._include: torch.Tensor | None = None

    @contextmanager
    def hooked(self, names: list[str] | None = None, offload: bool = False):
        """Accumulate into the modules `names` (default: all) while inside. Their sums live on the weights'
        device meanwhile; `offload` moves them to CPU on exit (a per-layer-group pass: one group's on the device)."""
        names = list(self.modules) if names is None else names
        for name in names:
            weight = self.modules[name].weight
            previous = self.sums.get(name)
            self.sums[name] = (torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if previous is None
                               else previous.to(weight.device))
        handles = [self.modules[name].register_forward_hook(self._on_forward) for name in names]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            if offload:
                for name in names:
                    self.sums[name] = self.sums[name].cpu()

    def _on_forward(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if output.requires_grad:  # False in a no-grad pass (e.g. the first pass of gradient checkpointing)
            name, x = self.names[module], args[0].detach()
            output.register_hook(lambda g: self._on_gradient(name, x, g))

    @contextmanager
    def backward_pass(self, include: torch.Tensor):
        """One backward that adds the examples in `include` [B] (bool). Yields per-module masks of the
        examples actually added (finite), and collects the examples with a non-finite gradient."""
        self._include = include
        self.added = {name: torch.zeros_like(include) for name in self.modules}
        self.nonfinite = torch.zeros_like(include)
        try:
            yield self
        finally:
            self._include = None

    @contextmanager
    def correction(self, added: dict[str, torch.Tensor]):
        """A backward over the same graph whose loss holds only the examples to remove: subtracts, in
        each module, exactly the per-example squares the previous pass added for them."""
        self._subtract = added
        try:
            yield self
        finally:
            self._subtract = None

    def _on_gradient(self, name: str, x: torch.Tensor, g: torch.Tensor) -> None:
        subtracting = self._subtract is not None
        include = self._subtract[name] if subtracting else self._include
        sign = -1.0 if subtracting else 1.0
        total = self.sums[name]
        for start in range(0, g.shape[0], self.chunk):
            rows = slice(start, start + self.chunk)
            use = include[rows]
            if not use.any():
                continue
            matrices, needs_square = self.per_example(g[rows].float(), x[rows].float())
            flat = matrices.flatten(1)
            # One reduction per example: its Fisher mass, non-finite iff any entry (or the mass) is.
            mass = torch.linalg.vector_norm(flat, dim=1) if needs_square else flat.sum(1)
            finite = mass.isfinite()
            if not subtracting:
                self.nonfinite[rows] |= use & ~finite
                use = use & finite
                self.added[name][rows] |= use
            for i in use.nonzero().flatten().tolist():
                if needs_square:
                    total.addcmul_(matrices[i], matrices[i], value=sign)  # += sign · P², fused
                else:
                    total.add_(matrices[i], alpha=sign)


def decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear inside the text decoder's layers (attention, MLP, PLE gate/projection), by module name."""
    decoder = model.get_decoder()
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(model).__name__}: its decoder {type(decoder).__name__} has no `layers` ModuleList")
    prefix = next(name for name, module in model.named_modules() if module is layers)
    return {
        f"{prefix}.{name}": module
        for name, module in layers.named_modules()
        if isinstance(module, nn.Linear)
    }


def example_generator(seed: int, example_id: int, sample: int, device: torch.device) -> torch.Generator:
    """A generator that depends only on (seed, example, sample): label draws do not depend on batching or rank."""
    mixed = (seed * 0x9E3779B97F4A7C15 + example_id * 0xBF58476D1CE4E5B9 + sample * 0x94D049BB133111EB) % (2**63)
    return torch.Generator(device=device).manual_seed(mixed)


def layer_groups(model: nn.Module, modules: dict[str, nn.Linear], count: int) -> list[list[str]]:
    """The names in `modules`, split by decoder layer into `count` contiguous groups of (nearly) equal layer counts."""
    layers = model.get_decoder().layers
    if count > len(layers):
        raise ConfigError(f"layer_groups {count} is more than the decoder's {len(layers)} layers; "
                          f"use 1 to {len(layers)}")
    layer_of = {module: index for index, layer in enumerate(layers) for module in layer.modules()}
    size, extra = divmod(len(layers), count)
    bounds = [i * size + min(i, extra) for i in range(count + 1)]  # the first `extra` groups get one more layer
    return [[name for name, module in modules.items() if bounds[g] <= layer_of[module] < bounds[g + 1]]
            for g in range(count)]


def label_uniforms(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """For `true` mode: one uniform in [0, 1) per loss position of one example (labels [T], in order of position),
    from that example's generator; `sample_tokens` turns each into a draw from the model's distribution there."""
    return torch.rand(int((labels[1:] != -100).sum()), generator=generator, device=labels.device)


def per_example_log_likelihood(hidden: torch.Tensor, labels: torch.Tensor, head: LogitHead,
                               chunk_size: int) -> torch.Tensor:
    """ℓ_b = Σ over loss tokens of log p(label_t | prefix), per example: final hidden states [B, T, hidden],
    labels [B, T] -> fp32 [B]. The logits exist for `chunk_size` loss positions at a time, never for [B, T]."""
    targets = labels[:, 1:]
    mask = targets != -100  # position t predicts label t+1
    picked = token_log_likelihoods(hidden[:, :-1][mask], targets[mask], head, chunk_size)  # [N] loss positions
    rows = mask.nonzero()[:, 0]
    return torch.zeros(labels.shape[0], dtype=torch.float32, device=hidden.device).index_add(0, rows, picked)
