"""Heal a raw stack: LoRA on the seam slots, Fisher-subspace protected, with TRL's SFTTrainer.

    accelerate launch heal/train.py recipes/heal.yaml
    python heal/train.py --config recipes/heal.yaml        # one process
    python heal/train.py recipes/heal.yaml --plan          # targets, protection and memory; no training
    python heal/train.py recipes/heal.yaml --max_steps 10  # any HealConfig or SFTConfig field as --key value

Outputs (adapter, protection.safetensors, metrics, merged/), resume, protection and DeepSpeed on the CPU:
docs/architecture.md, section "The heal (`heal/`)".
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

import torch

from core.cards import CARD_NAME
from core.checkpoint import SourceError, check_data_present, open_source
from core.cli import ConfigParser, log_config, setup_logging
from core.data import DataError, check_chat_template, load_trl_datasets
from core.outputs import staged_output
from fisher.factors import FactorsFileError, ModuleFactors, load_factors
from fisher.file import FisherFileError, load_fisher
from heal.card import heal_card, write_adapter_card
from heal.config import DISTILLATIONS, HealConfig, HealConfigError, config_to_dict, load_config, recipe_parser
from heal.distill import (
    DistillationTrainer,
    OnPolicyDistillationTrainer,
    TeacherError,
    check_same_tokenizer,
    load_teacher,
    resolve_teacher,
)
from heal.ewc import FisherPenalty
from heal.protection import (
    PROTECTION_FILE,
    ModulePlan,
    Protection,
    ProtectionError,
    check_factor_layers,
    check_fisher_matches,
    check_fisher_provenance,
    load_protection,
    plan_difference,
    protected_modules,
    protection_plan,
)
from heal.targets import TargetError, explicit_targets, select_targets, target_slots
from heal.trainer import HealTrainer
from stack.manifest import (
    MANIFEST_NAME,
    ManifestError,
    StackManifest,
    check_manifest_matches_config,
    load_manifest,
)

logger = logging.getLogger("heal")

USER_ERRORS = (HealConfigError, TargetError, ProtectionError, TeacherError, FileNotFoundError, DataError, SourceError,
               FisherFileError, FactorsFileError)


def make_parser() -> ConfigParser:
    parser = recipe_parser("heal/train.py", __doc__)
    parser.add_argument("--plan", action="store_true",
                        help="load no weights: print the targets, protection and peak GPU memory per rank for "
                        "ZeRO-2/3, then exit; heal.plan's options follow (--world-size, --gpu-memory-gb, --margin)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--plan" in argv:  # the rest goes to heal.plan (--world-size ...), which reads the recipe the same way
        from heal.plan import main as plan_main

        return plan_main([arg for arg in argv if arg != "--plan"])
    overrides, args = make_parser().parse(argv)
    setup_logging()
    try:
        heal, sft = load_config(args.config, **overrides)
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
    """The heal, top to bottom: check the inputs, build the targets, the protection and the trainer, train, save."""
    from transformers import AutoTokenizer

    log_config(logger, config_to_dict(heal, sft))
    # Everything that can be checked without the model is checked first: bad input fails in seconds,
    # not after a 24 GB load.
    manifest, fisher = _check_inputs(heal)
    checkpoint = _resume_checkpoint(heal, sft)
    tokenizer = AutoTokenizer.from_pretrained(heal.stack)
    dataset = _load_dataset(heal, sft, tokenizer)
    teacher = _teacher_path(heal, manifest, tokenizer)
    model = _load_model(heal, sft)
    groups = _build_targets(heal, manifest, model)
    protection = _build_protection(heal, manifest, model, groups, fisher, checkpoint) if heal.protect else None
    del fisher  # fp32, as large as the decoder's weights (or the stored bases): planned, no longer needed
    trainer = _build_trainer(heal, sft, model, tokenizer, dataset, groups, teacher, protection)
    _train(trainer, checkpoint)
    _save(trainer, heal, groups, tokenizer)


def _check_inputs(heal: HealConfig) -> tuple[StackManifest | None, dict | None]:
    """Checks the stack (its manifest, and every shard holding its weights' bytes) and, with protect, loads the
    Fisher (or its K-FAC factors) and checks it against the stack's source. Returns (the manifest, None if the
    stack has none and needs none; the Fisher tensors or factors by source name, None without protect)."""
    stack_dir = Path(heal.stack)
    manifest = _manifest(stack_dir, required=heal.targets is None or heal.protect)
    _check_stack_data(stack_dir)
    fisher = _fisher(heal, stack_dir, manifest) if heal.protect else None
    return manifest, fisher


def _resume_checkpoint(heal: HealConfig, sft) -> str | None:
    """The checkpoint this run resumes from (None: a fresh start), refused if it was written with protection
    switched the other way; an unprotected heal also removes a stale protection.safetensors from output_dir."""
    checkpoint = _last_checkpoint(sft)
    _check_resume_protection(checkpoint, heal.protect)
    if not heal.protect:
        _remove_stale_protection(Path(sft.output_dir))
    return checkpoint


def _load_model(heal: HealConfig, sft):
    """The raw stack, in the training dtype (4-bit NF4 with load_in_4bit)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(heal.stack, dtype=_dtype(sft), quantization_config=_quantization(heal))


def _dtype(sft) -> torch.dtype:
    return torch.bfloat16 if sft.bf16 else torch.float32


def _build_targets(heal: HealConfig, manifest: StackManifest | None, model) -> dict[str, str]:
    """{module name: LoRA group}: the explicit `targets:`, else the seam slots and grafted K/V from stack.json."""
    if heal.targets:
        groups = explicit_targets(model, list(heal.targets))
    else:
        groups = select_targets(model, manifest, heal.modules, heal.seam_width, heal.all_layers)
    logger.info("LoRA targets (%d modules):\n%s", len(groups),
                "\n".join(f"  {group:<5} {name}" for name, group in groups.items()))
    return groups


def _build_protection(heal: HealConfig, manifest: StackManifest, model, groups: dict[str, str],
                      fisher: dict, checkpoint: str | None) -> Protection | FisherPenalty:
    """The plan of the targeted modules it protects (protect_modules): their protected coordinates from the
    Fisher, their protected bases from the K-FAC factors, or their normalised Fisher for the penalty (ewc), mapped
    onto the stack's slots; a resumed checkpoint must have been trained under the same plan."""
    if not heal.reads_factors:  # the factors were checked against the stack as they loaded (_factors)
        check_fisher_matches(fisher, _source_shapes(model, manifest), manifest.source.model)
    plan = protection_plan(fisher, manifest, _shapes(model, protected_modules(list(groups), heal.protect_modules)),
                           heal)
    _check_resume_plan(checkpoint, plan)
    shapes = _shapes(model, plan)
    for name, protection in plan.items():
        logger.info("protect %s: %s", name, protection.report(shapes[name]))
    return FisherPenalty(plan, shapes, heal) if heal.protection == "ewc" else Protection(plan, shapes, heal)


def _build_trainer(heal: HealConfig, sft, model, tokenizer, dataset, groups: dict[str, str], teacher: str | None,
                   protection: Protection | FisherPenalty | None) -> HealTrainer:
    """LoRA on `groups`, protected (or penalised: a FisherPenalty) when `protection` is given; SFT, or distillation
    from `teacher`."""
    penalised = isinstance(protection, FisherPenalty)
    kwargs = dict(model=model, args=sft, train_dataset=dataset, processing_class=tokenizer,
                  peft_config=_lora_config(heal, groups), protection=None if penalised else protection,
                  penalty=protection if penalised else None)
    if teacher is None:
        return HealTrainer(**kwargs)
    trainer_class = OnPolicyDistillationTrainer if heal.objective == "onpolicy" else DistillationTrainer
    return trainer_class(teacher=load_teacher(teacher, _dtype(sft)), heal=heal, **kwargs)


def _lora_config(heal: HealConfig, groups: dict[str, str]):
    """PEFT's LoraConfig: each targeted module gets its group's rank and alpha."""
    from peft import LoraConfig

    rank = {"seam": heal.seam_r, "graft": heal.graft_r, "other": heal.other_r}
    alpha = {"seam": heal.seam_alpha, "graft": heal.graft_alpha, "other": heal.other_alpha}
    return LoraConfig(
        r=heal.seam_r, lora_alpha=heal.seam_alpha, lora_dropout=heal.lora_dropout, task_type="CAUSAL_LM",
        target_modules=list(groups),
        rank_pattern={f"^{name}$": rank[group] for name, group in groups.items()},
        alpha_pattern={f"^{name}$": alpha[group] for name, group in groups.items()},
    )


def _train(trainer: HealTrainer, checkpoint: str | None) -> None:
    """Train, from `checkpoint` if given; the trainer saves (and protects) every checkpoint-N/ on its way."""
    result = trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()  # trainer_state.json: the per-step log history


def _save(trainer: HealTrainer, heal: HealConfig, groups: dict[str, str], tokenizer) -> None:
    """The adapter in output_dir, protected by the same save as every checkpoint, its model card, and with
    merge: the merged model."""
    output_dir = Path(trainer.args.output_dir)
    trainer.save_model(str(output_dir))  # every rank: ZeRO-3 gathers the partitions; one process writes
    trainer.accelerator.wait_for_everyone()
    if trainer.accelerator.is_main_process:
        write_adapter_card(output_dir, heal, groups)  # in place of the empty template PEFT's save wrote
        if heal.merge:
            _write_merged(Path(heal.stack), output_dir, tokenizer, heal_card("merged", heal, groups, output_dir))


def _load_dataset(heal: HealConfig, sft, tokenizer):
    """The datasets in TRL's columns, mixed by weight; SFTTrainer trains on one format at a time."""
    from datasets import concatenate_datasets

    loaded = load_trl_datasets(heal.datasets, heal.num_examples, sft.seed, sft.dataset_text_field)
    parts = [part.remove_columns("_row") for part in loaded]
    for spec, part in zip(heal.datasets, parts):
        check_chat_template(part, spec, tokenizer, heal.stack)
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
    """A checkpoint's adapter was trained and baked under the protection plan recorded beside it (HealTrainer's
    save); resuming it with protection switched on or off would load entries the new plan does not hold at zero, or
    protect coordinates that already moved."""
    if checkpoint is None:
        return
    recorded = (Path(checkpoint) / PROTECTION_FILE).is_file()
    if recorded != protect:
        written = "with" if recorded else "without"
        _refuse_resume(checkpoint, f"it was written {written} Fisher protection, and this run has "
                                   f"protect: {str(protect).lower()}")


def _check_resume_plan(checkpoint: str | None, plan: dict[str, ModulePlan]) -> None:
    """The recorded plan must be this run's, coordinate for coordinate or basis for basis (another Fisher or
    factors, protection kind, share or target set gives another plan)."""
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


def _fisher(heal: HealConfig, stack_dir: Path, manifest: StackManifest) -> dict:
    """The Fisher tensors (protection: coordinates, ewc) or its K-FAC factors (kfac), checked before any model loads:
    format_version, values, and computed on the stack's source checkpoint (shard hashes)."""
    if heal.reads_factors:
        return _factors(heal, stack_dir, manifest)
    tensors, metadata = load_fisher(heal.fisher)
    check_fisher_provenance(heal.fisher, metadata, stack_dir / MANIFEST_NAME, manifest, heal.fisher_allow_other_source)
    return tensors


def _factors(heal: HealConfig, stack_dir: Path, manifest: StackManifest) -> dict[str, ModuleFactors]:
    """The K-FAC factors by source module, with the same provenance check as the Fisher's, and covering the
    source layer of every slot the heal trains (module by module once the targets are built: plan_kfac)."""
    factors, metadata = load_factors(heal.factors_path)
    check_fisher_provenance(heal.factors_path, metadata, stack_dir / MANIFEST_NAME, manifest,
                            heal.fisher_allow_other_source)
    check_factor_layers(factors, manifest, target_slots(manifest, heal.targets, heal.seam_width, heal.all_layers),
                        heal)
    return factors


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


def _shapes(model, modules) -> dict[str, tuple[int, int]]:
    """[out, in] of each named module (a plan's keys or a list of names)."""
    return {name: _shape(model.get_submodule(name).weight) for name in modules}


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
