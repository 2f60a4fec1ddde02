"""The heal's trainer: TRL's SFTTrainer with Fisher-subspace protection applied at the start and at every save, or
with the soft Fisher penalty added to every training loss.

See docs/architecture.md, section "The heal (`heal/`)".
"""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback
from trl import SFTTrainer

from heal.ewc import FisherPenalty
from heal.protection import Protection, attach, bake


class HealTrainer(SFTTrainer):
    """An SFTTrainer that, given a `protection`, applies its plan in the LoRA factors' forward (coordinate masks or
    subspace projections), bakes it into the weights, and finishes every folder it saves (each checkpoint-N/ and
    the final output_dir) the same way: adapter file baked, protection.safetensors beside it. Given a `penalty`
    (protection: ewc), it adds λ · Σ F̃ ΔW² to every training loss (compute_loss) and records the penalty beside
    every save. Without either, SFTTrainer."""

    def __init__(self, *, protection: Protection | None = None, penalty: FisherPenalty | None = None,
                 **sft_trainer_kwargs):
        super().__init__(**sft_trainer_kwargs)
        self.protection = protection
        self.penalty = penalty
        self.add_callback(_ResumedTokenCount(self))
        if penalty is not None:
            penalty.attach(self.model)
        if protection is not None:
            attach(self.model, protection.plan)
            # Bake now. Coordinates: the masks give the zeroed entries exactly zero gradient, so AdamW's moments
            # stay 0 and decoupled weight decay keeps 0 at 0: the weights in memory stay exact too. Subspaces:
            # AdamW's per-entry scaling moves the weights back into the bases (the forward projects them out),
            # so there the saves' bake is what makes the files exact.
            bake(self.model, protection.plan)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The objective's loss (objective_loss) plus, in training with a penalty, its share of λ · Σ F̃ ΔW²
        (FisherPenalty.loss_term), the step's penalty logged as `ewc_penalty` beside the loss (which includes it).
        The objectives' trainers override objective_loss, not this, so each pays the penalty once."""
        if self.penalty is None or not self.model.training:
            return self.objective_loss(model, inputs, return_outputs, num_items_in_batch)
        with self.penalty.collecting():
            result = self.objective_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, outputs = result if return_outputs else (result, None)
        term, penalty = self.penalty.loss_term(self.accumulation_divisor(num_items_in_batch), loss.device)
        self._metrics["train"]["ewc_penalty"].append(penalty)
        loss = loss + term
        return (loss, outputs) if return_outputs else loss

    def objective_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The heal objective's loss: SFTTrainer's, on the data's labels; heal/distill.py's trainers override it."""
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def accumulation_divisor(self, num_items_in_batch) -> int:
        """What a per-micro-batch mean added to the loss must be divided by for the optimizer step to count it once:
        the accumulation steps when the loss is already scaled for them (normalised by num_items_in_batch, the
        step's label count; Trainer.training_step then leaves it alone), else 1 (training_step divides it)."""
        scaled = self.loss_is_scaled_for_ga
        if scaled is None:  # as Trainer.training_step decides
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or \
                self.compute_loss_func is not None
        return self.current_gradient_accumulation_steps if scaled else 1

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The Trainer's save, then the protection's (or penalty's) finish of the saved folder. Checkpoints
        (_save_checkpoint) and pushes (push_to_hub) save through here too. Under ZeRO-3 every rank takes part in
        the Trainer's gather of the partitions, and only the writing process (args.should_save) writes the files:
        that process finishes them, after its own write returned; no other rank reads them."""
        super().save_model(output_dir, _internal_call)
        for finisher in (self.protection, self.penalty):
            if finisher is not None and self.args.should_save:
                finisher.finish_saved_folder(Path(output_dir or self.args.output_dir))


class _ResumedTokenCount(TrainerCallback):
    """TRL counts the logged `num_tokens` in the trainer object (SFTTrainer._total_train_tokens, from 0), not in the
    saved state: a resumed heal would log the tokens since the resume as if they were all. At the start of training,
    after the Trainer has loaded the checkpoint's state (every ZeRO stage alike), the count restarts from the last
    logged value: exact when the checkpoint's step is a logging step (the study saves at multiples of logging_steps),
    else short by the tokens of the steps between that log and the checkpoint."""

    def __init__(self, trainer: SFTTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        logged = [entry["num_tokens"] for entry in state.log_history if "num_tokens" in entry]
        if logged:
            self.trainer._total_train_tokens = logged[-1]
