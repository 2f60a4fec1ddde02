"""Self-distillation: the stacked student learns the source model's token distributions.

`objective: distill` (DistillationTrainer): loss = alpha · KL(teacher ‖ student) + (1 − alpha) · CE, the KL at a
temperature, teacher-forced on the training batch. `objective: onpolicy` (OnPolicyDistillationTrainer): the KL on
the student's own generations. The KL comes from both models' final hidden states, a chunk of positions at a
time, so no [N, vocab] logits are built. The formula, the memory and the teacher under DeepSpeed:
docs/architecture.md, section "Objectives: `sft` and `distill`".
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import torch
from torch import nn
from trl.models.utils import unwrap_model_for_generation
from trl.trainer.utils import maybe_gather_lm_head_ctx

from core.logits import HiddenCapture, LogitHead
from core.tokens import pad_batch, pad_id, stop_token_ids, vocabulary_difference
from heal.config import HealConfig
from heal.trainer import HealTrainer
from stack.manifest import StackManifest

logger = logging.getLogger(__name__)


class TeacherError(ValueError):
    pass


def token_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher ‖ student) per position, from logits [..., vocab] -> [...], in fp32 (the unchunked reference)."""
    log_p = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    log_q = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    return temperature**2 * (log_p.exp() * (log_p - log_q)).sum(-1)


# ---- the chunked KL over the LM heads (core.logits.LogitHead: z = softcap(h Wᵀ + b)) ---------------------


class _ChunkedKL(torch.autograd.Function):
    """Σ_t KL_t over positions, `chunk` positions at a time; the gradient w.r.t. the student's hidden
    states is computed in the forward, chunk by chunk, so no [N, vocab] tensor outlives its chunk."""

    @staticmethod
    def forward(ctx, student_hidden, teacher_hidden, student_head: LogitHead, teacher_head: LogitHead,
                temperature: float, chunk: int):
        total = torch.zeros((), dtype=torch.float32, device=student_hidden.device)
        grad = torch.empty_like(student_hidden) if ctx.needs_input_grad[0] else None
        for start in range(0, student_hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            z_student = student_head.logits(student_hidden[rows])
            with torch.no_grad():
                log_p = torch.log_softmax(teacher_head.logits(teacher_hidden[rows]) / temperature, dim=-1)
            log_q = torch.log_softmax(z_student / temperature, dim=-1)
            p = log_p.exp()
            total += temperature**2 * (p * (log_p - log_q)).sum()
            if grad is not None:
                # d KL_t / d z_student = T² · (q − p) / T = T · (q − p)
                grad[rows] = student_head.backward_through(temperature * (log_q.exp() - p), z_student).to(grad.dtype)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad,) = ctx.saved_tensors
        return grad_total * grad, None, None, None, None, None


def chunked_kl_sum(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, student_head: LogitHead,
                   teacher_head: LogitHead, temperature: float = 1.0, chunk_size: int = 256) -> torch.Tensor:
    """Σ over positions of KL(teacher ‖ student), from final hidden states [N, hidden] of both models."""
    if student_head.weight.requires_grad or (student_head.bias is not None and student_head.bias.requires_grad):
        raise ValueError("the distillation KL treats the student's LM head as frozen, but it requires grad; "
                         "keep lm_head out of the LoRA targets and frozen")
    return _ChunkedKL.apply(student_hidden, teacher_hidden.detach(), student_head, teacher_head, temperature,
                            chunk_size)


# ---- the teacher -------------------------------------------------------------------------------------------


def resolve_teacher(teacher: str | None, manifest: StackManifest | None) -> str:
    """The teacher's checkpoint: `teacher:` if given, else the stack's source model from stack.json."""
    if teacher is None:
        if manifest is None:
            raise TeacherError("objective: distill/onpolicy needs a teacher: set `teacher:` (a model folder), or heal "
                               "a stack whose stack.json records its source model")
        teacher = manifest.source.model
        origin = "the source model recorded in stack.json"
    else:
        origin = "`teacher:`"
    path = Path(teacher)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise TeacherError(f"teacher {teacher!r} ({origin}) has no config.json: not a model folder")
        return str(path)
    if path.is_absolute() or teacher.startswith((".", "~")) or teacher.count("/") != 1:
        raise TeacherError(f"teacher checkpoint {teacher!r} ({origin}) is missing; set `teacher:` to the folder of "
                           "the source model (the model the stack was built from)")
    return teacher  # a hub id: from_pretrained fetches it, or fails offline with its own message


def check_same_tokenizer(student_tokenizer, teacher_tokenizer, teacher: str) -> None:
    """Distillation compares distributions token by token: both models must index the same vocabulary."""
    difference = vocabulary_difference(teacher_tokenizer, student_tokenizer)
    if difference is not None:
        raise TeacherError(f"teacher {teacher!r} has another tokenizer than the student: {difference}; distillation "
                           "needs the same tokenizer (name the source model as `teacher:`)")


def load_teacher(teacher: str, dtype: torch.dtype) -> nn.Module:
    """The frozen teacher, in eval mode. Under ZeRO-3 (the HF DeepSpeed config is active) from_pretrained
    already partitions it; `TeacherForward` prepares it for inference once the accelerator exists."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=dtype)
    model.requires_grad_(False)
    return model.eval()


class TeacherForward:
    """Runs the teacher on the student's inputs and returns its final hidden states [B, L, H]."""

    def __init__(self, teacher: nn.Module, accelerator):
        self.head = LogitHead.of(teacher)
        self._capture = HiddenCapture(teacher)
        if accelerator.state.deepspeed_plugin is not None:
            from trl.models.utils import prepare_deepspeed

            self.model = prepare_deepspeed(teacher, accelerator)  # inference engine: ZeRO-3 partitioned, else stage 0
        else:
            self.model = teacher.to(accelerator.device)

    @torch.no_grad()
    def hidden(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        model_inputs = {key: inputs[key] for key in ("input_ids", "attention_mask", "position_ids") if key in inputs}
        # The head runs on one position only. An index tensor, not the int 1: Gemma-4's backbone reads an int
        # logits_to_keep as licence to drop the other positions before its KV-shared layers.
        last = torch.tensor([inputs["input_ids"].shape[1] - 1], device=inputs["input_ids"].device)
        self.model(**model_inputs, use_cache=False, logits_to_keep=last)
        return self._capture.take()


# ---- the trainer -------------------------------------------------------------------------------------------


class DistillationTrainer(HealTrainer):
    """A HealTrainer whose loss is alpha · KL(teacher ‖ student) + (1 − alpha) · CE, with alpha, the temperature,
    the tokens counted and the chunk size from `heal` (its distill_* fields)."""

    def __init__(self, *, teacher: nn.Module, heal: HealConfig, **heal_trainer_kwargs):
        super().__init__(**heal_trainer_kwargs)
        self.heal = heal
        self.teacher = TeacherForward(teacher, self.accelerator)
        student = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        self.student_head = LogitHead.of(student)
        self._student_hidden = HiddenCapture(student)  # TRL's fused forward calls student.base_model

    def objective_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ce = super().objective_loss(model, inputs, return_outputs, num_items_in_batch)
        ce, outputs = ce if return_outputs else (ce, None)
        kl_sum, count, positions = self._kl_sum(inputs)
        kl = kl_sum / self._kl_normalizer(positions, num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        local_mean = kl_sum.detach() / count.clamp(min=1)
        self._metrics[mode]["distill_kl"].append(self.accelerator.gather_for_metrics(local_mean).mean().item())
        loss = self.heal.distill_alpha * kl + (1 - self.heal.distill_alpha) * ce
        return (loss, outputs) if return_outputs else loss

    def _kl_sum(self, inputs):
        """Σ KL over the counted positions of this micro-batch, their number, and the position mask."""
        student_hidden = self._student_hidden.take()[:, :-1]  # position t predicts token t+1
        teacher_hidden = self.teacher.hidden(inputs)[:, :-1]
        positions = self._positions(inputs)
        heads = (self.student_head.weight, self.student_head.bias, self.teacher.head.weight, self.teacher.head.bias)
        with maybe_gather_lm_head_ctx(*heads):  # ZeRO-3: the heads are partitioned outside their forward
            kl_sum = chunked_kl_sum(student_hidden[positions], teacher_hidden[positions].to(student_hidden.device),
                                    self.student_head, self.teacher.head, self.heal.distill_temperature,
                                    self.heal.distill_chunk_size)
        return kl_sum, positions.sum(), positions

    def _positions(self, inputs) -> torch.Tensor:
        """[B, L-1] bool: the positions whose next token the KL counts."""
        if self.heal.distill_tokens == "loss":
            return inputs["labels"][:, 1:] != -100
        if "attention_mask" not in inputs:
            raise TeacherError("distill_tokens: all needs an attention_mask (padding-free batches have none); "
                               "use distill_tokens: loss or padding_free: false")
        return inputs["attention_mask"][:, 1:].bool()

    def _kl_normalizer(self, positions, num_items_in_batch):
        """Normalize the KL like TRL normalizes its CE, so alpha mixes two per-token means.

        "loss" tokens: by the label-token count of the whole (accumulated, all-rank) batch, times the
        number of processes (DDP averages the gradients; TRL's CE does the same). "all" tokens: a
        per-micro-batch mean, divided by the accumulation steps when the Trainer leaves that to the loss.
        """
        if self.heal.distill_tokens == "loss":
            if num_items_in_batch is None:
                return positions.sum().clamp(min=1)
            scale = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
            return torch.as_tensor(num_items_in_batch, device=positions.device).clamp(min=1) / scale
        return self._micro_batch_normalizer(positions, num_items_in_batch)

    def _micro_batch_normalizer(self, positions, num_items_in_batch):
        """A per-micro-batch mean, divided by the accumulation steps when the Trainer leaves that to the loss."""
        return positions.sum().clamp(min=1) * self.accumulation_divisor(num_items_in_batch)


# ---- on-policy distillation --------------------------------------------------------------------------------


def prompt_tokens(inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Each row's prompt: its tokens before the first label token (the whole row if it has none, i.e. the
    completion was truncated away). Rows are right padded (TRL's collator)."""
    prompts = []
    for row, (ids, labels, mask) in enumerate(zip(inputs["input_ids"], inputs["labels"], inputs["attention_mask"])):
        length = int(mask.sum())
        labelled = (labels[:length] != -100).nonzero()
        prompt_length = int(labelled[0]) if len(labelled) else length
        if prompt_length == 0:
            raise TeacherError(f"objective: onpolicy needs a prompt in every row, but row {row} of the batch has "
                               "labels from its first token (no prompt to generate from); use prompt/completion rows "
                               "(completion_only_loss: true) or messages rows with assistant_only_loss: true")
        prompts.append(ids[:prompt_length])
    return prompts


def cut_at_stop(generated: torch.Tensor, stops: list[int]) -> torch.Tensor:
    """[new] -> the tokens up to and including the first stop token (all of them if none was generated);
    generate fills a finished row with padding after its stop."""
    hits = torch.isin(generated, torch.tensor(stops, device=generated.device)).nonzero()
    return generated[: int(hits[0]) + 1] if len(hits) else generated


def completion_batch(prompts: list[torch.Tensor], completions: list[torch.Tensor],
                     pad: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask [B, L] of prompt + completion, and labels: the completion's
    tokens, -100 on the prompt and the padding."""
    device = prompts[0].device
    rows = [torch.cat([p, c]).tolist() for p, c in zip(prompts, completions)]
    input_ids, attention_mask = pad_batch(rows, pad, side="right")
    labels = torch.full_like(input_ids, -100)
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        labels[row, len(prompt): len(prompt) + len(completion)] = completion.cpu()
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device),
            "labels": labels.to(device)}


def generation_kwargs(heal: HealConfig, stops: list[int], pad: int) -> dict:
    """generate's settings: sampling from the student's own distribution at onpolicy_temperature (greedy at 0),
    up to onpolicy_max_new_tokens. Whatever truncation or penalty the checkpoint's generation_config.json would
    fill in is switched off (transformers 5 takes every value not passed from it)."""
    greedy = heal.onpolicy_temperature == 0
    sampling = {"do_sample": False} if greedy else {"do_sample": True, "temperature": heal.onpolicy_temperature}
    return dict(max_new_tokens=heal.onpolicy_max_new_tokens, num_beams=1, top_k=0, top_p=1.0, min_p=0.0,
                repetition_penalty=1.0, no_repeat_ngram_size=0, eos_token_id=stops, pad_token_id=pad, use_cache=True,
                **sampling)


class OnPolicyDistillationTrainer(DistillationTrainer):
    """On-policy distillation (GKD, Agarwal et al. 2024; TRL's GKDTrainer with beta = 0): with probability
    onpolicy_lmbda per training micro-batch, the student generates the completion of each row's prompt and the
    KL(teacher ‖ student) is taken on the student's own tokens, the teacher forced on them. Greedy loops are
    an exposure-bias failure: teacher-forced on the data, the student never trains on the states it loops in.
    Other micro-batches, and evaluation, are the teacher-forced distillation of DistillationTrainer.

    An on-policy micro-batch's KL is a mean over its generated tokens (the Trainer's num_items_in_batch counted
    the data's labels). Its sequences can exceed max_length by up to onpolicy_max_new_tokens. The onpolicy_*
    settings are `heal`'s (HealConfig checks that distill_alpha is 1: a CE term on the student's own tokens
    teaches nothing)."""

    def __init__(self, **distillation_trainer_kwargs):
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled():  # generation would need the partitioned weights gathered every step
            raise TeacherError("objective: onpolicy needs generation, unsupported under ZeRO-3 here; use ZeRO-2 or a "
                               "single process")
        super().__init__(**distillation_trainer_kwargs)
        if self.padding_free:
            raise TeacherError("objective: onpolicy rebuilds padded batches from the student's generations; set "
                               "padding_free: false (and packing: false)")
        self._on_policy_batch = False
        self._draw_step, self._micro_batch = -1, 0  # the optimizer step being drawn for, and its micro-batch
        self._stops, self._pad = stop_token_ids(self.processing_class), pad_id(self.processing_class)
        self._generation = generation_kwargs(self.heal, self._stops, self._pad)

    def objective_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._on_policy_batch = False
        if self.model.training:
            self._on_policy_batch = self._draw_on_policy()
            self._metrics["train"]["onpolicy_share"].append(float(self._on_policy_batch))
        if self._on_policy_batch:
            inputs = self._student_batch(model, inputs)
        return super().objective_loss(model, inputs, return_outputs, num_items_in_batch)

    def _draw_on_policy(self) -> bool:
        """Whether this training micro-batch is on-policy: a draw seeded by (seed, optimizer step, micro-batch within
        the step) rather than taken from one stream, so a heal resumed from a checkpoint draws what the uninterrupted
        heal drew (a stream would restart at the resumed step). Every rank draws the same."""
        step = self.state.global_step  # optimizer steps done: the same for every micro-batch of the next step
        self._micro_batch = self._micro_batch + 1 if step == self._draw_step else 0
        self._draw_step = step
        return random.Random(f"{self.args.seed}:{step}:{self._micro_batch}").random() < self.heal.onpolicy_lmbda

    def _kl_normalizer(self, positions, num_items_in_batch):
        if self._on_policy_batch:  # num_items_in_batch counted the data's label tokens, not the generated ones
            return self._micro_batch_normalizer(positions, num_items_in_batch)
        return super()._kl_normalizer(positions, num_items_in_batch)

    def _student_batch(self, model, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The micro-batch rebuilt as each row's prompt followed by the student's completion of it."""
        prompts = prompt_tokens(inputs)
        completions = self.generate_completions(model, prompts)
        lengths = torch.tensor([len(c) for c in completions], dtype=torch.float32, device=prompts[0].device)
        mean_length = self.accelerator.gather_for_metrics(lengths).mean().item()
        self._metrics["train"]["onpolicy_new_tokens"].append(mean_length)
        return completion_batch(prompts, completions, self._pad)

    def generate_completions(self, model, prompts: list[torch.Tensor]) -> list[torch.Tensor]:
        """The student's completion of each prompt (adapters active, eval mode, no grad), cut after its first
        stop token. Left padded, so every prompt ends in the last column, where generation continues."""
        input_ids, attention_mask = pad_batch([p.tolist() for p in prompts], self._pad, side="left")
        device = prompts[0].device
        # Activation checkpointing is switched off for generate, then back on with the trainer's kwargs.
        checkpointing = {"gradient_checkpointing_kwargs": self.args.gradient_checkpointing_kwargs}
        with unwrap_model_for_generation(model, self.accelerator, **checkpointing) as student:
            was_training = student.training
            student.eval()
            try:
                with torch.no_grad():
                    output = student.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                              **self._generation)
            finally:
                student.train(was_training)
        return [cut_at_stop(row, self._stops) for row in output[:, input_ids.shape[1]:]]
