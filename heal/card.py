"""The heal's model cards: README.md of the adapter (output_dir, in place of PEFT's empty template) and of the
merged model (output_dir/merged), from the heal's own records.

    python -m heal.card RECIPE [--eval EVAL_JSON] [--key value]   # (re)write both cards, e.g. after an evaluation

Which fact comes from which file: docs/architecture.md, section "Model cards".
"""

from __future__ import annotations

import json
import logging
import re
import statistics
import sys
from pathlib import Path

from core.cards import CARD_NAME, display_path, ranges, render_card, source_facts
from core.cli import setup_logging
from core.outputs import write_file_atomic
from heal.config import DISTILLATIONS, HealConfig, HealConfigError, recipe_parser
from heal.protection import PROTECTION_FILE
from stack.manifest import MANIFEST_NAME, ManifestError, load_manifest

logger = logging.getLogger(__name__)

RELATIONS = {"adapter": "adapter", "merged": "finetune"}  # the Hub's base_model_relation of each card
GROUPS = ("seam", "graft", "other")  # heal/targets.py's LoRA groups


def write_adapter_card(output_dir: Path, heal: HealConfig, groups: dict[str, str], eval_path: Path | None = None):
    """output_dir/README.md, replacing the template PEFT's save_pretrained wrote there."""
    write_file_atomic(Path(output_dir) / CARD_NAME, heal_card("adapter", heal, groups, output_dir, eval_path))


def heal_card(kind: str, heal: HealConfig, groups: dict[str, str], output_dir: Path,
              eval_path: Path | None = None) -> str:
    """The card of the adapter (kind "adapter") or of the merged model ("merged"). `groups`: {module: group} as
    heal/train.py selected the LoRA targets."""
    output_dir, stack_dir = Path(output_dir), Path(heal.stack)
    base = _stack_facts(stack_dir)
    evaluation = _evaluation(output_dir, eval_path)
    data = {
        "base_model": base["hub_id"],
        "base_model_relation": RELATIONS[kind],
        "license": base["license"],
        "library_name": "peft" if kind == "adapter" else "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["depth-upscale", "merge", "lora", heal.objective, *base["tags"]],
    }
    body = [
        f"# {output_dir.name}" + (" (LoRA adapter)" if kind == "adapter" else " (merged)"),
        "",
        *_base_section(kind, base, output_dir),
        *_objective_section(heal),
        *_lora_section(heal, groups),
        *_protection_section(heal, groups, output_dir),
        *_data_section(heal),
        *_training_section(output_dir),
        *_evaluation_section(evaluation),
    ]
    return render_card(data, "\n".join(body))


# ---- the base -----------------------------------------------------------------------------------------------


def _stack_facts(stack_dir: Path) -> dict:
    """The raw stack's source hub id, license and tags: from the stack's card front matter when it has one,
    else from stack.json's source as the stacker would (a hub id; a local folder stays unnamed)."""
    from huggingface_hub import metadata_load

    manifest = load_manifest(stack_dir) if (stack_dir / MANIFEST_NAME).is_file() else None
    card = stack_dir / CARD_NAME
    if card.is_file():
        meta = metadata_load(card) or {}
        hub_id, license_ = meta.get("base_model"), meta.get("license")
        tags = [tag for tag in meta.get("tags") or [] if tag not in ("depth-upscale", "merge", "raw")]
    else:
        model = manifest.source.model if manifest else None
        facts = source_facts(model, Path(model) if Path(model).is_dir() else None) if model else None
        hub_id, license_, tags = (facts.hub_id, facts.license, []) if facts else (None, None, [])
    return {"hub_id": hub_id, "license": license_, "tags": tags, "manifest": manifest,
            "stack": display_path(stack_dir, placeholder=f"<raw stack folder {stack_dir.name}>")}


def _base_section(kind: str, base: dict, output_dir: Path) -> list[str]:
    source = f"`{base['hub_id']}`" if base["hub_id"] else "a local source model (no hub id known)"
    manifest = base["manifest"]
    shape = (f" ({manifest.source.num_hidden_layers} → {manifest.num_hidden_layers} layers, seams at slots "
             f"{ranges([seam.slot for seam in manifest.seams])})" if manifest else "")
    lines = ["## Base", "", f"The raw stack `{base['stack']}`{shape}, depth-upscaled from {source} by "
             "`python -m stack`; its own card describes the slots, seams and grafts."]
    if kind == "adapter":
        lines += ["", "This adapter applies to the raw stack, not to the source model (their layer counts differ): "
                  "`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(RAW_STACK), ADAPTER)`. "
                  "`merged/` holds the stack with it merged in."]
    else:
        lines += ["", "This folder is that stack with the heal's LoRA adapter merged into its weights (the adapter "
                  f"is the parent folder, `{output_dir.name}/`): the same tensors and `stack.json` as the raw stack, "
                  "loadable with `AutoModelForCausalLM.from_pretrained`."]
    return lines + [""]


# ---- what was trained, and how ----------------------------------------------------------------------------------


def _objective_section(heal: HealConfig) -> list[str]:
    lines = ["## Objective", ""]
    if heal.objective not in DISTILLATIONS:
        return lines + ["`sft`: cross-entropy on the data's labels (TRL's SFTTrainer loss).", ""]
    teacher = ("the source model named in stack.json" if heal.teacher is None
               else f"`{display_path(Path(heal.teacher), placeholder=Path(heal.teacher).name)}`")
    on = ("the student's own completions (on-policy)" if heal.objective == "onpolicy"
          else "the data's tokens, teacher-forced")
    lines += [f"`{heal.objective}`: loss = α · T² · KL(teacher ‖ student) + (1 − α) · CE, the KL between "
              f"the temperature-T softmaxes on {on} (heal/distill.py); teacher {teacher}.", "",
              "| setting | value |", "|---|---|", f"| distill_alpha (α) | {heal.distill_alpha} |",
              f"| distill_temperature (T) | {heal.distill_temperature} |",
              f"| distill_tokens | {heal.distill_tokens} |"]
    if heal.objective == "onpolicy":
        lines += [f"| onpolicy_lmbda | {heal.onpolicy_lmbda} |",
                  f"| onpolicy_max_new_tokens | {heal.onpolicy_max_new_tokens} |",
                  f"| onpolicy_temperature | {heal.onpolicy_temperature} |"]
    return lines + [""]


def _slot(name: str) -> int | None:
    """The decoder slot a module name lies in ('...layers.17.mlp.up_proj' -> 17), or None."""
    match = re.search(r"layers\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def _lora_section(heal: HealConfig, groups: dict[str, str]) -> list[str]:
    rank = {"seam": (heal.seam_r, heal.seam_alpha), "graft": (heal.graft_r, heal.graft_alpha),
            "other": (heal.other_r, heal.other_alpha)}
    lines = ["## LoRA targets", "", f"{len(groups)} Linear modules, in heal/targets.py's groups (seam: the slots "
             f"within ±{heal.seam_width} of a seam; graft: k/v of grafted slots; other: the rest), lora_dropout "
             f"{heal.lora_dropout}.", "", "| group | modules | rank | alpha | slots | module types |",
             "|---|---|---|---|---|---|"]
    for group in GROUPS:
        members = [name for name, member_group in groups.items() if member_group == group]
        if members:
            slots = ranges(list({slot for name in members if (slot := _slot(name)) is not None}))
            kinds = ", ".join(sorted({name.rsplit(".", 1)[-1] for name in members}))
            lines.append(f"| {group} | {len(members)} | {rank[group][0]} | {rank[group][1]} | {slots} | {kinds} |")
    return lines + [""]


def protection_report(output_dir: Path) -> dict | None:
    """protection.safetensors' metadata (kind, config, and per module the protected dims and the Fisher mass or
    energy covered), or None."""
    from safetensors import safe_open

    path = Path(output_dir) / PROTECTION_FILE
    if not path.is_file():
        return None
    with safe_open(path, "pt") as f:
        return json.loads(f.metadata()["protection"])


# Per protection kind, the audit report's keys: protected inputs, their covered share, protected outputs, theirs;
# and what the share is of.
_REPORT_KEYS = {"coordinates": (("protected_inputs", "input_mass_covered", "protected_outputs", "output_mass_covered"),
                                "mass"),
                "kfac": (("input_rank", "input_energy_covered", "output_rank", "output_energy_covered"), "energy")}


def _protection_section(heal: HealConfig, groups: dict[str, str], output_dir: Path) -> list[str]:
    report = protection_report(output_dir) if heal.protect else None
    if report is None:
        return ["## Protection", "", "None: this heal ran with `protect: false`; every targeted weight could move.",
                ""]
    kind, modules = report.get("kind", "coordinates"), report["modules"]  # audit files before `kind`: coordinates
    if kind == "ewc":
        return _penalty_section(report, heal, groups)
    (inputs_key, input_share, outputs_key, output_share), share = _REPORT_KEYS[kind]
    lines = ["## Protection", "", _protection_summary(kind, report["config"], heal), "",
             f"| group | modules protected | protected inputs | protected outputs | input {share} covered "
             f"(min / median / max) | output {share} covered (min / median / max) |", "|---|---|---|---|---|---|"]
    for group in GROUPS:
        members = [entry for name, entry in modules.items() if groups.get(name) == group]
        if members:
            total = sum(1 for member_group in groups.values() if member_group == group)
            inputs = f"{sum(m[inputs_key] for m in members):,} of {sum(m['in_features'] for m in members):,}"
            outputs = f"{sum(m[outputs_key] for m in members):,} of {sum(m['out_features'] for m in members):,}"
            lines.append(f"| {group} | {len(members)} of {total} | {inputs} | {outputs} | "
                         f"{_spread([m[input_share] for m in members])} | "
                         f"{_spread([m[output_share] for m in members])} |")
    unprotected = len(groups) - len(modules)
    if unprotected:
        left_out = ", or left out by protect_modules" if heal.protect_modules else ""
        lines += ["", f"{unprotected} targeted module(s) are unprotected: they have no source Fisher (grafted K/V, "
                  f"or duplicates with first_copy_only){left_out}."]
    return lines + [""]


def _penalty_section(report: dict, heal: HealConfig, groups: dict[str, str]) -> list[str]:
    """The card's protection section of a `protection: ewc` heal: the penalty, and how many modules of each group
    paid it."""
    modules = report["modules"]
    fisher_mean = next(iter(modules.values()))["fisher_mean"]
    lines = ["## Protection", "",
             "Soft Fisher penalty (heal/ewc.py, `protection: ewc`): nothing is held fixed, so every targeted weight "
             f"could move; training added ewc_lambda {report['config']['ewc_lambda']} · Σ F̃ ⊙ ΔW² to the loss, over "
             "the penalised modules' LoRA updates ΔW = (lora_alpha / r) · B A, with F̃ = F / "
             f"{fisher_mean:.6g}: the source Fisher mapped onto the slots, divided by its mean entry over those "
             f"modules (first_copy_only {str(report['config']['first_copy_only']).lower()}); Fisher: "
             f"`{Path(heal.fisher).name}`.", "", "| group | modules penalised |", "|---|---|"]
    for group in GROUPS:
        total = sum(1 for member_group in groups.values() if member_group == group)
        if total:
            lines.append(f"| {group} | {sum(1 for name in modules if groups.get(name) == group)} of {total} |")
    return lines + [""]


def _protection_summary(kind: str, config: dict, heal: HealConfig) -> str:
    first_copy_only = str(config["first_copy_only"]).lower()
    if kind == "kfac":
        return ("K-FAC eigen-subspace protection (heal/protection.py, heal/kfac.py): in every protected module, the "
                "LoRA factors are projected off the leading eigenvectors U of the source model's input second moment "
                "and V of its output-gradient second moment, so the merged update ΔW has ΔW U = 0 and Vᵀ ΔW = 0 up "
                "to floating-point roundoff (`protection.safetensors` holds U and V). Per module and side, the "
                f"fewest stored eigenvectors holding kfac_energy_share {config['kfac_energy_share']} of the trace, "
                f"capped at kfac_max_fraction {config['kfac_max_fraction']} of the dimension (first_copy_only "
                f"{first_copy_only}); factors: `{Path(config['factors']).name}`.")
    return ("Fisher-subspace protection (heal/protection.py): in every protected module, the source model's "
            "highest-Fisher input and output coordinates are masked in the LoRA factors, so the merged weights equal "
            "the raw stack's there, bit for bit (`protection.safetensors` lists them). Per module, the fewest "
            f"coordinates covering mass_share {config['mass_share']} of its Fisher mass, capped at max_fraction "
            f"{config['max_fraction']} of the dimension (first_copy_only {first_copy_only}); Fisher: "
            f"`{Path(heal.fisher).name}`.")


def _spread(values: list[float]) -> str:
    return f"{min(values):.3f} / {statistics.median(values):.3f} / {max(values):.3f}"


def _data_section(heal: HealConfig) -> list[str]:
    rows = "All rows" if heal.num_examples is None else f"{heal.num_examples} rows drawn"
    lines = ["## Data", "", f"{rows} from the mixture below (weights are relative shares).", "",
             "| dataset | split | weight | license |", "|---|---|---|---|"]
    for spec in heal.datasets:
        path = Path(spec.path)
        name = path.name if path.exists() else spec.path  # a local file by its name; a hub dataset by its id
        lines.append(f"| `{name}` | {spec.split} | {spec.weight} | {_data_licenses(path)} |")
    return lines + [""]


def _data_licenses(path: Path) -> str:
    """The licenses data.json (a manifest beside the data, as demo/data.py writes) lists for the data's sources."""
    manifest = path.parent / "data.json" if path.exists() else None
    if manifest is None or not manifest.is_file():
        return "not recorded"
    sources = json.loads(manifest.read_text()).get("sources") or {}
    licenses = [f"{entry.get('package', key)}: {entry['license']}" for key, entry in sources.items()
                if isinstance(entry, dict) and entry.get("license")]
    return "; ".join(licenses) + " (the data folder's sources, data.json)" if licenses else "not recorded"


# ---- what the run did -------------------------------------------------------------------------------------------


def _training_section(output_dir: Path) -> list[str]:
    results_path, state_path = output_dir / "train_results.json", output_dir / "trainer_state.json"
    if not (results_path.is_file() and state_path.is_file()):
        return ["## Training", "", "No train_results.json / trainer_state.json in the heal's folder.", ""]
    results, state = json.loads(results_path.read_text()), json.loads(state_path.read_text())
    logged = [entry for entry in state["log_history"] if "loss" in entry]
    tokens = max((entry["num_tokens"] for entry in state["log_history"] if "num_tokens" in entry), default=None)
    lines = ["## Training", "", "From trainer_state.json and train_results.json.", "", "| quantity | value |",
             "|---|---|", f"| optimizer steps | {state['global_step']} |", f"| epochs | {results['epoch']:.4g} |"]
    if tokens is not None:
        lines.append(f"| tokens trained on | {int(tokens):,} |")
    lines.append(f"| train loss (mean over the run) | {results['train_loss']:.4f} |")
    if logged:
        lines.append(f"| last logged loss (step {logged[-1]['step']}) | {logged[-1]['loss']:.4f} |")
    lines.append(f"| runtime | {results['train_runtime']:.1f} s |")
    return lines + [""]


def _evaluation(output_dir: Path, eval_path: Path | None) -> dict | None:
    """(results, this model's name in them) from the given eval.json or one found beside the heal."""
    candidates = [Path(eval_path)] if eval_path else [output_dir / "eval.json", output_dir / "eval" / "eval.json",
                                                      output_dir.parent / "eval" / "eval.json"]
    mine = {output_dir.resolve(), (output_dir / "merged").resolve()}
    for path in candidates:
        if not path.is_file():
            continue
        results = json.loads(path.read_text())
        names = [name for name, entry in results["models"].items() if Path(entry["path"]).resolve() in mine]
        if names:
            return {"results": results, "name": names[0]}
        if eval_path:
            raise HealConfigError(f"{path} evaluates {sorted(results['models'])}, none of them {output_dir} or its "
                                  "merged/ folder; pass the evaluation of this heal")
    return None


def _evaluation_section(evaluation: dict | None) -> list[str]:
    if evaluation is None:
        return []
    from evaluation.report import markdown_report

    results, name = evaluation["results"], evaluation["name"]
    reference = results["reference"]
    keep = [model for model in results["models"] if model in (reference, name)]
    pairs = {(name, reference), (reference, name)}
    subset = {**results, "models": {model: results["models"][model] for model in keep}, "prompts": [],
              "differences": [row for row in results["differences"] if (row["a"], row["b"]) in pairs]}
    # evaluation/report.py's own tables for this model and its reference, one heading level down, samples left out.
    heading, *rest = [f"#{line}" if line.startswith("#") else line for line in markdown_report(subset).splitlines()]
    return [heading, "", f"This model is `{name}` below, evaluated by `python -m evaluation`.", *rest, ""]


# ---- CLI -----------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    # The recipe (and overrides) the heal ran with: its output_dir holds the records.
    parser = recipe_parser("python -m heal.card", __doc__)
    parser.add_argument("--eval", type=Path, help="an eval.json of `python -m evaluation` that includes this heal")
    overrides, args = parser.parse(argv)
    setup_logging()
    from heal.plan import load_recipe, meta_model, plan_targets
    from heal.train import USER_ERRORS

    try:
        heal, sft = load_recipe(args.config, **overrides)
        output_dir = Path(sft.output_dir)
        if not (output_dir / "adapter_config.json").is_file():
            raise HealConfigError(f"{output_dir} holds no adapter: run the heal first (heal/train.py {args.config})")
        manifest = load_manifest(heal.stack) if heal.targets is None else None
        # The targets exactly as heal/train.py selected them, from a model built on the meta device (no weights).
        groups = {t.name: t.group for t in plan_targets(heal, meta_model(Path(heal.stack)), manifest)}
        write_adapter_card(output_dir, heal, groups, args.eval)
        if (output_dir / "merged").is_dir():
            write_file_atomic(output_dir / "merged" / CARD_NAME, heal_card("merged", heal, groups, output_dir,
                                                                           args.eval))
    except (*USER_ERRORS, ManifestError) as error:
        logger.error("%s", error)
        return 2
    logger.info("wrote %s", output_dir / CARD_NAME)
    return 0


if __name__ == "__main__":
    sys.exit(main())
