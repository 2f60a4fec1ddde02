"""Per-example squared gradients of the decoder's Linear weights, from one batched backward.

A forward hook on each tracked Linear keeps its input X; a hook on its output receives G in the backward and adds
(G_bᵀ X_b)² per example b into an fp32 sum, a few examples at a time (with `factors: true`, also the K-FAC factors
X_bᵀ X_b and G_bᵀ G_b). Non-finite examples are subtracted again by a second backward (`Accumulator.correction`).
The formulas, the memory and the correction: docs/architecture.md, section "The Fisher stage (`fisher/`)".
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from core.logits import LogitHead, token_log_likelihoods

from .config import ConfigError


def _exact(g: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    return torch.bmm(g.transpose(1, 2), x), True  # per-example gradients [b, out, in], to be squared


def _per_token(g: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    return torch.bmm(g.square().transpose(1, 2), x.square()), False  # already squares [b, out, in]


# estimator -> fn(G [b, T, out], X [b, T, in]) -> (per-example matrices, whether they still need squaring)
PER_EXAMPLE = {"exact": _exact, "per_token": _per_token}


class FactorSums:
    """The K-FAC sums of some tracked Linears, fp32: A = Σ x xᵀ [in, in] and G = Σ g gᵀ [out, out] over the
    non-padding positions of every added example, and T, the number of those positions (int64), per module.
    The means are A / T and G / T (`mean`)."""

    def __init__(self, names: list[str]):
        self.names = set(names)
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, torch.Tensor] = {}  # 0-d int64

    def to(self, name: str, module: nn.Linear | None) -> None:
        """Create (zeros) or move `name`'s sums to `module`'s weight device; to the CPU when `module` is None."""
        if name not in self.inputs:
            out_features, in_features = module.weight.shape
            device = module.weight.device
            self.inputs[name] = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
            self.outputs[name] = torch.zeros(out_features, out_features, dtype=torch.float32, device=device)
            self.tokens[name] = torch.zeros((), dtype=torch.int64, device=device)
            return
        device = module.weight.device if module is not None else torch.device("cpu")
        for sums in (self.inputs, self.outputs, self.tokens):
            sums[name] = sums[name].to(device)

    def add(self, name: str, x: torch.Tensor, g: torch.Tensor, positions: torch.Tensor, sign: float) -> None:
        """Add (sign +1) or subtract (-1) one example: x [T, in] and g [T, out] fp32, positions [T] bool."""
        weight = positions.to(x.dtype)[:, None]  # padding rows contribute nothing (x is not 0 there)
        x, g = x * weight, g * weight
        self.inputs[name].addmm_(x.T, x, alpha=sign)
        self.outputs[name].addmm_(g.T, g, alpha=sign)
        self.tokens[name] += int(sign) * positions.sum()

    def mean(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A / T, G / T) of one module: the second moments per token."""
        tokens = int(self.tokens[name])
        if tokens <= 0:
            raise RuntimeError(f"internal: the K-FAC factors of {name} saw no token")
        return self.inputs[name] / tokens, self.outputs[name] / tokens


class Accumulator:
    """Σ over examples of the squared per-example gradient of each tracked Linear weight, in fp32; with `factors`,
    also the K-FAC sums of the modules it names, for the same examples."""

    def __init__(self, modules: dict[str, nn.Linear], estimator: str = "exact", examples_per_chunk: int = 1,
                 factors: FactorSums | None = None):
        self.modules = modules
        self.names = {module: name for name, module in modules.items()}
        # name -> fp32 [out, in], created on the weight's device when the module is first hooked
        self.sums: dict[str, torch.Tensor] = {}
        self.per_example = PER_EXAMPLE[estimator]
        self.chunk = examples_per_chunk
        self.factors = factors
        # [B, T] bool, the current batch's non-padding positions (the factors count those only); set per forward
        self.positions: torch.Tensor | None = None
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
        factor_names = [name for name in names if self.factors is not None and name in self.factors.names]
        for name in factor_names:
            self.factors.to(name, self.modules[name])
        handles = [self.modules[name].register_forward_hook(self._on_forward) for name in names]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            if offload:
                for name in names:
                    self.sums[name] = self.sums[name].cpu()
                for name in factor_names:
                    self.factors.to(name, None)

    def _on_forward(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if output.requires_grad:  # False in a no-grad pass (e.g. the first pass of gradient checkpointing)
            name, x, positions = self.names[module], args[0].detach(), self.positions
            if self.factors is not None and name in self.factors.names and positions is None:
                raise RuntimeError("internal: K-FAC factors need Accumulator.positions set before the forward")
            output.register_hook(lambda g: self._on_gradient(name, x, g, positions))

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

    def _on_gradient(self, name: str, x: torch.Tensor, g: torch.Tensor, positions: torch.Tensor | None) -> None:
        subtracting = self._subtract is not None
        include = self._subtract[name] if subtracting else self._include
        sign = -1.0 if subtracting else 1.0
        total = self.sums[name]
        factors = self.factors if self.factors is not None and name in self.factors.names else None
        for start in range(0, g.shape[0], self.chunk):
            rows = slice(start, start + self.chunk)
            use = include[rows]
            if not use.any():
                continue
            chunk_g, chunk_x = g[rows].float(), x[rows].float()  # [b, T, out], [b, T, in]
            matrices, needs_square = self.per_example(chunk_g, chunk_x)
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
                if factors is not None:
                    factors.add(name, chunk_x[i], chunk_g[i], positions[rows][i], sign)


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
    layer_of = decoder_layer_of(model, modules)
    size, extra = divmod(len(layers), count)
    bounds = [i * size + min(i, extra) for i in range(count + 1)]  # the first `extra` groups get one more layer
    return [[name for name in modules if bounds[g] <= layer_of[name] < bounds[g + 1]] for g in range(count)]


def decoder_layer_of(model: nn.Module, modules: dict[str, nn.Linear]) -> dict[str, int]:
    """The decoder layer index of each module in `modules`, by name."""
    index_of = {module: index for index, layer in enumerate(model.get_decoder().layers) for module in layer.modules()}
    return {name: index_of[module] for name, module in modules.items()}


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
