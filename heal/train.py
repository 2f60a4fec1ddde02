"""Heal a raw stack: LoRA on the seam slots, Fisher-subspace protected, with TRL's SFTTrainer.

    accelerate launch heal/train.py recipes/heal.yaml
    python heal/train.py --config recipes/heal.yaml        # one process
    python heal/train.py recipes/heal.yaml --plan          # targets, protection and memory; no training

DeepSpeed on CPU (how the tests run ZeRO-2/3 with 2 processes over gloo):
    DS_ACCELERATOR=cpu accelerate launch --config_file recipes/accelerate/zero3.yaml --num_processes 2 \
        heal/train.py recipe.yaml

Outputs (adapter, protection.safetensors, metrics, merged/), resume and protection:
see docs/architecture.md, section "The heal (`heal/`)".
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

from fisher.data import DataError, check_chat_template, load_trl_datasets
from fisher.file import FisherFileError, load_fisher
from heal.card import heal_card, write_adapter_card
from heal.config import DISTILLATIONS, HealConfig, HealConfigError, config_to_dict, load_config
from heal.distill import (
    DistillationTrainer,
    DistillConfig,
    OnPolicyConfig,
    OnPolicyDistillationTrainer,
    TeacherError,
    check_same_tokenizer,
    load_teacher,
    resolve_teacher,
)
from heal.protection import (
    PROTECTION_FILE,
    ModuleProtection,
    ProtectionConfig,
    ProtectionError,
    attach,
    bake,
    bake_adapter_file,
    check_fisher_matches,
    check_fisher_provenance,
    load_protection,
    plan_difference,
    plan_protection,
    save_protection,
    slot_fisher,
)
from heal.targets import TargetError, explicit_targets, select_targets
from stack.atomic import staged_output
from stack.card import CARD_NAME
from stack.manifest import (
    MANIFEST_NAME,
    ManifestError,
    StackManifest,
    check_manifest_matches_config,
    load_manifest,
)
from stack.source import SourceError, check_data_present, open_source

logger = logging.getLogger("heal")

USER_ERRORS = (HealConfigError, TargetError, ProtectionError, TeacherError, FileNotFoundError, DataError, SourceError,
               FisherFileError)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="heal/train.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", nargs="?", help="heal recipe YAML (HealConfig and SFTConfig fields)")
    parser.add_argument("--config", help="the recipe, as a flag (alignment-handbook style)")
    parser.add_argument("--plan", action="store_true",
                        help="load no weights: print the targets, protection and peak GPU memory per rank for "
                        "ZeRO-2/3, then exit; heal.plan's options follow (--world-size, --gpu-memory-gb, --stack)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args, plan_options = parser.parse_known_args(argv)  # with --plan, the rest goes to heal.plan (--world-size ...)
    recipe = args.recipe or args.config
    if not recipe:
        parser.error("give the recipe: heal/train.py recipes/heal.yaml")
    if args.plan:
        from heal.plan import main as plan_main

        return plan_main([recipe, *plan_options])
    if plan_options:
        parser.error(f"unrecognized arguments: {' '.join(plan_options)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        heal, sft = load_config(recipe)
        _agree_on_world_size()
        run(heal, sft)
    except USER_ERRORS as error:
        logger.error("%s", error)
        return 2
    return 0


def _agree_on_world_size() -> None:
    """accelerate 1.15, DeepSpeed on a machine without CUDA (DS_ACCELERATOR=cpu, gloo): DeepSpeed brings up
    the process group, but PartialState finds no backend of its own and records 1 process, so every
    gather (TRL's metrics, saving) disagrees with the real world size. Take the ranks from
    torch.distributed when the two disagree; on GPUs they always agree and nothing changes."""
    import torch.distributed as dist
    from accelerate import PartialState

    state = PartialState()
    if dist.is_initialized() and state.num_processes != dist.get_world_size():
        logger.info("accelerate saw %d process(es), torch.distributed has %d: using torch.distributed's ranks",
                    state.num_processes, dist.get_world_size())
        state.num_processes, state.process_index = dist.get_world_size(), dist.get_rank()
        state.local_process_index = int(os.environ.get("LOCAL_RANK", dist.get_rank()))


def run(heal: HealConfig, sft) -> None:
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTTrainer

    logger.info("resolved config:\n%s", json.dumps(config_to_dict(heal, sft), indent=2, default=str))
    stack_dir = Path(heal.stack)
    # Everything that can be checked without the model is checked first: bad input fails in seconds,
    # not after a 24 GB load.
    manifest = _manifest(stack_dir, required=heal.targets is None or heal.protect)
    _check_stack_data(stack_dir)
    fisher = _fisher(heal, stack_dir, manifest) if heal.protect else None
    checkpoint = _last_checkpoint(sft)
    _check_resume_protection(checkpoint, heal.protect)
    if not heal.protect:
        _remove_stale_protection(Path(sft.output_dir))
    tokenizer = AutoTokenizer.from_pretrained(stack_dir)
    dataset = _dataset(heal, sft, tokenizer, stack_dir)
    teacher = _teacher_path(heal, manifest, tokenizer)
    dtype = torch.bfloat16 if sft.bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(stack_dir, dtype=dtype, quantization_config=_quantization(heal))
    if heal.targets:
        groups = explicit_targets(model, list(heal.targets))
    else:
        groups = select_targets(model, manifest, heal.modules, heal.seam_width, heal.all_layers)
    logger.info("LoRA targets (%d modules):\n%s", len(groups),
                "\n".join(f"  {group:<5} {name}" for name, group in groups.items()))
    plan = _protection_plan(heal, manifest, model, list(groups), fisher) if heal.protect else {}
    del fisher  # fp32, as large as the decoder's weights: planned, no longer needed
    _check_resume_plan(checkpoint, plan)
    shapes = _shapes(model, plan)
    for name, protection in plan.items():
        logger.info("protect %s: %s", name, protection.report(shapes[name]))

    rank = {"seam": heal.seam_r, "graft": heal.graft_r, "other": heal.other_r}
    alpha = {"seam": heal.seam_alpha, "graft": heal.graft_alpha, "other": heal.other_alpha}
    lora = LoraConfig(
        r=heal.seam_r, lora_alpha=heal.seam_alpha, lora_dropout=heal.lora_dropout, task_type="CAUSAL_LM",
        target_modules=list(groups),
        rank_pattern={f"^{name}$": rank[group] for name, group in groups.items()},
        alpha_pattern={f"^{name}$": alpha[group] for name, group in groups.items()},
    )
    trainer_kwargs = dict(model=model, args=sft, train_dataset=dataset, processing_class=tokenizer, peft_config=lora)
    if heal.protect:  # every checkpoint records the plan its adapter was trained and baked under
        trainer_kwargs["callbacks"] = [RecordProtection(plan, shapes, _protection_config(heal))]
    if teacher is None:
        trainer = SFTTrainer(**trainer_kwargs)
    else:
        distill = DistillConfig(heal.distill_alpha, heal.distill_temperature, heal.distill_tokens,
                                heal.distill_chunk_size)
        trainer_kwargs.update(teacher=load_teacher(teacher, dtype), distill=distill)
        if heal.objective == "onpolicy":
            onpolicy = OnPolicyConfig(heal.onpolicy_lmbda, heal.onpolicy_max_new_tokens, heal.onpolicy_temperature)
            trainer = OnPolicyDistillationTrainer(onpolicy=onpolicy, **trainer_kwargs)
        else:
            trainer = DistillationTrainer(**trainer_kwargs)
    if plan:
        attach(trainer.model, plan)
        # Zero the protected entries now: the masks give them exactly zero gradient, so AdamW's moments
        # stay 0 and decoupled weight decay keeps 0 at 0: every checkpoint's adapter is exact too.
        bake(trainer.model, plan)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()  # trainer_state.json: the per-step log history

    trainer.save_model(sft.output_dir)  # gathers ZeRO-3 partitions
    trainer.accelerator.wait_for_everyone()
    if trainer.accelerator.is_main_process:
        output_dir = Path(sft.output_dir)
        if plan:
            bake_adapter_file(output_dir / "adapter_model.safetensors", plan)
            save_protection(output_dir / PROTECTION_FILE, plan, shapes, _protection_config(heal))
        write_adapter_card(output_dir, heal, groups)  # in place of the empty template PEFT's save wrote
        if heal.merge:
            _write_merged(stack_dir, output_dir, tokenizer, heal_card("merged", heal, groups, output_dir))


def _dataset(heal: HealConfig, sft, tokenizer, stack_dir: Path):
    """The datasets in TRL's columns, mixed by weight; SFTTrainer trains on one format at a time."""
    from datasets import concatenate_datasets

    loaded = load_trl_datasets(heal.datasets, heal.num_examples, sft.seed, sft.dataset_text_field)
    parts = [part.remove_columns("_row") for part in loaded]
    for spec, part in zip(heal.datasets, parts):
        check_chat_template(part, spec, tokenizer, str(stack_dir))
    formats = {tuple(part.column_names) for part in parts}
    if len(formats) > 1:
        raise HealConfigError(f"the datasets mix TRL formats {sorted(formats)}; SFTTrainer trains on one format at a "
                              "time, so give datasets of one format (or convert them, e.g. text rows to messages)")
    return concatenate_datasets(parts)


def _teacher_path(heal: HealConfig, manifest: StackManifest | None, tokenizer) -> str | None:
    """The distillation teacher's checkpoint (None for objective: sft), checked against the student's tokenizer."""
    from transformers import AutoTokenizer

    if heal.objective not in DISTILLATIONS:
        return None
    teacher = resolve_teacher(heal.teacher, manifest)
    try:
        teacher_tokenizer = AutoTokenizer.from_pretrained(teacher)
    except OSError as error:  # a hub id that is not cached (offline) or does not exist
        raise TeacherError(f"teacher {teacher!r} cannot be loaded ({error}); "
                           "set `teacher:` to a local model folder") from None
    check_same_tokenizer(tokenizer, teacher_tokenizer, teacher)
    logger.info("distilling from %s (alpha %s, temperature %s, %s tokens)", teacher, heal.distill_alpha,
                heal.distill_temperature, heal.distill_tokens)
    if heal.objective == "onpolicy":
        logger.info("on-policy: the student generates the completions of a %s share of the batches (up to %d new "
                    "tokens, temperature %s)", heal.onpolicy_lmbda, heal.onpolicy_max_new_tokens,
                    heal.onpolicy_temperature)
    return teacher


def _quantization(heal: HealConfig):
    """QLoRA: NF4 base weights with bf16 compute, for single-GPU heals."""
    if not heal.load_in_4bit:
        return None
    if not torch.cuda.is_available():
        raise HealConfigError("load_in_4bit (QLoRA) needs a CUDA GPU and bitsandbytes (`pip install -e '.[qlora]'`); "
                              "set load_in_4bit: false to heal in bf16/fp32")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                              bnb_4bit_use_double_quant=True)


def _last_checkpoint(sft) -> str | None:
    """Resume from the newest checkpoint in output_dir, if there is one (a rerun continues, never restarts)."""
    from transformers.trainer_utils import get_last_checkpoint

    output_dir = Path(sft.output_dir)
    last = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
    if last:
        logger.info("resuming from %s", last)
    return last


def _check_resume_protection(checkpoint: str | None, protect: bool) -> None:
    """A checkpoint's adapter was trained and baked under the protection plan recorded beside it (RecordProtection);
    resuming it with protection switched on or off would load entries the new plan does not hold at zero, or
    protect coordinates that already moved."""
    if checkpoint is None:
        return
    recorded = (Path(checkpoint) / PROTECTION_FILE).is_file()
    if recorded != protect:
        written = "with" if recorded else "without"
        _refuse_resume(checkpoint, f"it was written {written} Fisher protection, and this run has "
                                   f"protect: {str(protect).lower()}")


def _check_resume_plan(checkpoint: str | None, plan: dict[str, ModuleProtection]) -> None:
    """The recorded plan must be this run's, coordinate for coordinate (another Fisher, mass_share or target
    set gives another plan)."""
    record = Path(checkpoint or "") / PROTECTION_FILE
    if checkpoint is None or not record.is_file():
        return
    difference = plan_difference(load_protection(record), plan)
    if difference:
        _refuse_resume(checkpoint, f"{difference} ({record} against this run's plan)")


def _refuse_resume(checkpoint: str, why: str) -> None:
    raise HealConfigError(f"cannot resume from {checkpoint}: {why}. Heal into a new output_dir, or delete "
                          f"{Path(checkpoint).parent}/checkpoint-* to start this heal over")


def _remove_stale_protection(output_dir: Path) -> None:
    """An unprotected heal into a folder holding an earlier protected heal's audit file: that file would
    describe a guarantee this adapter does not hold."""
    from accelerate import PartialState

    stale = output_dir / PROTECTION_FILE
    if stale.is_file() and PartialState().is_main_process:
        logger.warning("removing %s: this heal has protect: false, so that audit file would describe a guarantee "
                       "its adapter does not hold", stale)
        stale.unlink()


class RecordProtection(TrainerCallback):
    """Writes protection.safetensors (the plan) into every checkpoint-N/, on the main process, once the
    Trainer has saved it; _check_resume_* compare it with the plan of a run that resumes from there."""

    def __init__(self, plan: dict[str, ModuleProtection], shapes: dict[str, tuple[int, int]],
                 config: ProtectionConfig):
        self.plan, self.shapes, self.config = plan, shapes, config

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            save_protection(checkpoint / PROTECTION_FILE, self.plan, self.shapes, self.config)


def _manifest(stack_dir: Path, required: bool) -> StackManifest | None:
    if not (stack_dir / MANIFEST_NAME).is_file() and not required:
        return None
    try:
        manifest = load_manifest(stack_dir)
        check_manifest_matches_config(stack_dir, manifest)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{error}. Heal targets and Fisher protection come from the stack manifest: point "
                                "`stack:` at a folder written by `python -m stack`, or list the modules to train in "
                                "`targets:` with protect: false") from None
    except ManifestError as error:  # another format_version, or a stack.json that disagrees with config.json
        raise HealConfigError(str(error)) from None
    return manifest


def _check_stack_data(stack_dir: Path) -> None:
    """Every weight's bytes lie inside its shard (headers and a stat; no data read): a truncated copy of the
    stack fails here, naming the shard, not inside from_pretrained."""
    if not stack_dir.is_dir():
        raise HealConfigError(f"stack folder {stack_dir} does not exist; point `stack:` at a folder written by "
                              "`python -m stack`")
    check_data_present(open_source(str(stack_dir.resolve())))


def _fisher(heal: HealConfig, stack_dir: Path, manifest: StackManifest) -> dict[str, torch.Tensor]:
    """The Fisher tensors, checked before any model loads: format_version, finite and >= 0, and computed on
    the stack's source checkpoint (shard hashes)."""
    tensors, metadata = load_fisher(heal.fisher)
    check_fisher_provenance(heal.fisher, metadata, stack_dir / MANIFEST_NAME, manifest, heal.fisher_allow_other_source)
    return tensors


def _protection_config(heal: HealConfig) -> ProtectionConfig:
    return ProtectionConfig(mass_share=heal.mass_share, max_fraction=heal.max_fraction,
                            first_copy_only=heal.first_copy_only)


def _protection_plan(heal: HealConfig, manifest: StackManifest, model, modules: list[str],
                     fisher: dict[str, torch.Tensor]) -> dict[str, ModuleProtection]:
    check_fisher_matches(fisher, _source_shapes(model, manifest), manifest.source.model)
    return plan_protection(slot_fisher(fisher, manifest, heal.first_copy_only), modules, _protection_config(heal))


def _source_shapes(model, manifest: StackManifest) -> dict[str, tuple[int, ...]]:
    """Shape of each source-layer weight, read off the slots that hold it (K/V of grafted slots excluded)."""
    prefix = manifest.layer_prefix
    shapes = {}
    for name, param in model.named_parameters():
        if name.startswith(prefix):
            index, suffix = name[len(prefix):].split(".", 1)
            slot = manifest.slots[int(index)]
            if not manifest.is_grafted_kv(slot, suffix):
                shapes[f"{prefix}{slot.source_layer}.{suffix}"] = _shape(param)
    return shapes


def _shape(param) -> tuple[int, ...]:
    return tuple(getattr(param, "ds_shape", param.shape))  # ZeRO-3 partitions hold the full shape in ds_shape


def _shapes(model, plan) -> dict[str, tuple[int, int]]:
    return {name: _shape(model.get_submodule(name).weight) for name in plan}


def _write_merged(stack_dir: Path, output_dir: Path, tokenizer, card: str) -> None:
    """The healed full model from disk (raw stack + saved adapter), whatever ZeRO stage trained it:
    sharded like the raw stack, towers included, with the stack's manifest and its model card `card`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()  # training is over: load whole on this one process, not through ZeRO-3's zero.Init
    base = AutoModelForCausalLM.from_pretrained(stack_dir, dtype="auto")
    merged = PeftModel.from_pretrained(base, output_dir).merge_and_unload()
    with staged_output(output_dir / "merged", stage="heal-merged") as tmp:
        merged.save_pretrained(tmp, max_shard_size="5GB")
        tokenizer.save_pretrained(tmp)
        shutil.copyfile(stack_dir / MANIFEST_NAME, tmp / MANIFEST_NAME)
        (tmp / CARD_NAME).write_text(card)
    logger.info("wrote the merged model to %s", output_dir / "merged")


if __name__ == "__main__":
    sys.exit(main())
