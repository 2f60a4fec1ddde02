"""The soft Fisher penalty (`protection: ewc`): the heal's loss gains

    λ · Σ_modules Σ_ij F̃_ij (ΔW_ij)²,   ΔW = scale · B A  (the module's LoRA update, scale = lora_alpha / r as PEFT
                                                          applies it, read off each LoRA layer)

EWC-style (Kirkpatrick et al. 2017), with F̃ the source's diagonal Fisher mapped onto the slots (heal/protection.py
`slot_fisher`) and divided by its mean over every entry of the penalised modules. Nothing is masked or baked: the
update may move any entry, at a price. `plan_ewc` (heal/protection.py, beside the other protections' planners)
builds F̃, `FisherPenalty.attach` puts the penalty into the LoRA B factors' forward, and HealTrainer.compute_loss
adds it to the loss.

See docs/architecture.md, section "The soft Fisher penalty: `protection: ewc`".
"""

from __future__ import annotations

import dataclasses
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from heal.config import HealConfig
from heal.protection import PROTECTION_FILE, PenalisedModule, lora_layers, save_protection

logger = logging.getLogger(__name__)


def fisher_distance(lora_a: torch.Tensor, lora_b: torch.Tensor, fisher: torch.Tensor, scale: float) -> torch.Tensor:
    """Σ_ij F̃_ij (ΔW_ij)², ΔW = scale · B A, in fp32 (autocast off): A [r, in], B [out, r], F̃ [out, in]."""
    with torch.autocast(lora_a.device.type, enabled=False):
        delta = scale * (lora_b.float() @ lora_a.float())
        return (fisher.float() * delta.square()).sum()


def fisher_distance_gradients(lora_a: torch.Tensor, lora_b: torch.Tensor, fisher: torch.Tensor,
                              scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(∂P/∂A [r, in], ∂P/∂B [out, r]) of P = fisher_distance, in fp32: with D = 2 · scale · F̃ ⊙ ΔW = ∂P/∂(BA),
    ∂P/∂A = Bᵀ D and ∂P/∂B = D Aᵀ."""
    with torch.autocast(lora_a.device.type, enabled=False):
        a, b = lora_a.float(), lora_b.float()
        weighted = 2 * scale * fisher.float() * (scale * (b @ a))
        return b.t() @ weighted, weighted @ a.t()


# ---- the penalty in the LoRA factors' forward ------------------------------------------------------------------


class _PenaltyGradient(torch.autograd.Function):
    """Identity on the B factor's output; its backward adds g · ∂P/∂A and g · ∂P/∂B to the factors' gradients, g the
    gradient the loss gives the penalty (FisherPenalty.gradient_scale).

    The gradient is taken here, in the backward of the factor's own output, because that is where ZeRO-3 has
    gathered B (and A, registered as B's external parameter); a penalty term differentiated from the loss would reach
    the factors outside any module's backward, when their partitions may be released. Under activation checkpointing
    one node's backward runs, once: reentrant, the recomputation's (the first forward ran without grad and built
    none); non-reentrant, the first forward's (the recomputation only refills its saved tensors)."""

    @staticmethod
    def forward(ctx, output, lora_a, lora_b, fisher, scale: float, penalty: FisherPenalty):
        ctx.save_for_backward(lora_a, lora_b, fisher)
        ctx.scale, ctx.penalty = scale, penalty
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output):
        lora_a, lora_b, fisher = ctx.saved_tensors
        grad_a, grad_b = fisher_distance_gradients(lora_a, lora_b, fisher, ctx.scale)
        scale = ctx.penalty.gradient_scale().to(grad_a.device)
        return grad_output, (scale * grad_a).to(lora_a.dtype), (scale * grad_b).to(lora_b.dtype), None, None, None


@dataclass(frozen=True)
class _Penalised:
    """What a penalised B factor needs besides its own weight. Not an nn.Module: A stays out of B's submodules,
    named_parameters and state_dict."""

    lora_a: nn.Linear  # the module's A factor [r, in]
    scale: float  # PEFT's lora_alpha / r for this module
    penalty: FisherPenalty


class PenalisedLinear(nn.Linear):
    """A LoRA B factor [out, r] whose forward, in training, also serves the penalty of its module's ΔW: it adds
    P = Σ F̃ ⊙ ΔW² to the penalty's collected terms while the trainer's loss forward runs, and routes P's gradient
    into A and B (_PenaltyGradient). Its forward is where ZeRO-3 has gathered B and A (registered as B's external
    parameter). F̃ is a non-persistent buffer: state_dict and PEFT's adapter files are unchanged."""

    ewc_fisher: torch.Tensor  # F̃ [out, in] in the base weight's dtype
    ewc: _Penalised

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = nn.functional.linear(x, self.weight, self.bias)
        if not self.training:
            return output
        lora_a, penalty = self.ewc.lora_a.weight, self.ewc.penalty
        if penalty.is_collecting:
            with torch.no_grad():
                penalty.add_term(fisher_distance(lora_a, self.weight, self.ewc_fisher, self.ewc.scale))
        if torch.is_grad_enabled() and (lora_a.requires_grad or self.weight.requires_grad):
            output = _PenaltyGradient.apply(output, lora_a, self.weight, self.ewc_fisher, self.ewc.scale, penalty)
        return output


def _fisher_dtype(lora_layer, lora_b: nn.Linear) -> torch.dtype:
    """F̃ is kept in the frozen base weight's dtype (bf16 in a bf16 heal: half the memory of fp32, and its 8-bit
    mantissa is ample for a weighting); a quantized base (QLoRA, uint8 storage) gives the adapter's dtype."""
    dtype = lora_layer.get_base_layer().weight.dtype
    return dtype if dtype.is_floating_point else lora_b.weight.dtype


# ---- the penalty's state across a training step --------------------------------------------------------------


class FisherPenalty:
    """A `protection: ewc` heal's penalty: its plan (PenalisedModule by module name, from plan_ewc), the [out, in]
    shape of each module, and the HealConfig that chose it (ewc_lambda is λ). `attach` puts it into a PEFT model,
    HealTrainer.compute_loss adds it to the loss, and `finish_saved_folder` records it beside every save.

    Each training forward of the loss runs inside `collecting()`: every penalised B factor adds its module's P.
    `loss_term` then returns what to add to the loss, including a zero-valued probe whose gradient, the same for
    every module's P, is what _PenaltyGradient multiplies ∂P/∂A and ∂P/∂B by. The probe is created after the whole
    forward, so the autograd engine (which runs the ready node created last first, and a leaf's gradient as soon
    as it is ready) computes its gradient before any module's backward; gradient_scale() refuses to guess if not."""

    def __init__(self, plan: dict[str, PenalisedModule], shapes: dict[str, tuple[int, int]], heal: HealConfig):
        self.plan, self.shapes, self.heal = plan, shapes, heal
        self.is_collecting = False
        self._terms: list[torch.Tensor] = []
        self._probe: torch.Tensor | None = None

    def attach(self, model: nn.Module, adapter: str = "default") -> None:
        """Make every penalised module's B factor a PenalisedLinear holding F̃ and the module's scale; under ZeRO-3,
        register A as B's external parameter, so DeepSpeed gathers both for B's forward and backward. F̃ then lives
        in the modules only (the plan keeps the audit's numbers)."""
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        for name, lora_layer in lora_layers(model, self.plan):
            lora_a, lora_b = lora_layer.lora_A[adapter], lora_layer.lora_B[adapter]
            fisher = self.plan[name].fisher.to(device=lora_b.weight.device, dtype=_fisher_dtype(lora_layer, lora_b))
            lora_b.__class__ = PenalisedLinear  # same parameters and names; only forward changes
            lora_b.register_buffer("ewc_fisher", fisher, persistent=False)
            lora_b.ewc = _Penalised(lora_a, float(lora_layer.scaling[adapter]), self)
            if is_deepspeed_zero3_enabled():
                import deepspeed

                deepspeed.zero.register_external_parameter(lora_b, lora_a.weight)
        self.plan = {name: dataclasses.replace(entry, fisher=None) for name, entry in self.plan.items()}
        entry = next(iter(self.plan.values()))
        logger.info("Fisher penalty on %d module(s): λ %s, F̃ = F / %.6g", len(self.plan), entry.ewc_lambda,
                    entry.fisher_mean)

    @contextmanager
    def collecting(self):
        """The penalised modules add their terms while the loss's forward runs (not in a checkpointed layer's
        recomputation, which the backward runs, after)."""
        self._terms, self.is_collecting = [], True
        try:
            yield
        finally:
            self.is_collecting = False

    def add_term(self, value: torch.Tensor) -> None:
        self._terms.append(value)

    def loss_term(self, micro_batches: int, device: torch.device) -> tuple[torch.Tensor, float]:
        """(what to add to this micro-batch's loss, the step's penalty λ · Σ F̃ ΔW² as a float), from the terms the
        forward just collected.

        The added value is λ · P / micro_batches, `micro_batches` being how many micro-batch losses the optimizer
        step sums as they are: the gradient accumulation steps when the loss is already scaled for them (the
        Trainer then leaves it alone), else 1 (the Trainer divides it). Either way each step pays λ · P once."""
        if not self._terms:
            raise RuntimeError("protection: ewc collected no penalty term in a training forward: no penalised LoRA "
                               "factor ran (were the adapters disabled?)")
        total = torch.stack([term.to(device) for term in self._terms]).sum()
        self._terms = []
        self._probe = torch.zeros((), device=device, requires_grad=True)
        weight = self.heal.ewc_lambda
        return weight / micro_batches * (total + self._probe), weight * float(total)

    def gradient_scale(self) -> torch.Tensor:
        """∂loss/∂P as the backward delivered it to the probe: λ / micro_batches times the Trainer's own scaling."""
        grad = None if self._probe is None else self._probe.grad
        if grad is None:
            raise RuntimeError("a penalised LoRA factor's backward ran before the Fisher penalty's loss term was "
                               "differentiated: its forward ran outside HealTrainer.compute_loss, or the autograd "
                               "engine ordered the backward otherwise")
        return grad

    def finish_saved_folder(self, folder: Path) -> None:
        """A folder the Trainer has just saved: record the penalty beside its adapter (protection.safetensors: the
        kind, λ, the normalisation constant and per module Σ F̃), which a resume checks. Nothing is baked."""
        save_protection(folder / PROTECTION_FILE, self.plan, self.shapes, self.heal)
