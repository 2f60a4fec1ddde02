"""demo/study.py and demo/study_report.py without training: the study YAML loads and every run's heal recipe is a
valid heal config; a result is reused only under its own hash (paths do not count, values do); the report's
numbers come from the stored items."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from demo import protection_report, study, study_report
from demo.run import STUDY_PRESETS, study_preset
from heal.config import load_config

from .conftest import run_stack

MACHINE = {"processor": "x86_64", "cpu_count": 2, "torch_threads": 2, "torch": "2.13.0", "load_average_15min": 1.0}
DATA_HASHES = {"instruct_train.jsonl": "aa", "prompts.jsonl": "bb"}


@pytest.fixture(scope="module")
def config():
    return study.load_study()


@pytest.mark.parametrize("preset", sorted(STUDY_PRESETS))
def test_every_study_recipe_loads_and_every_run_is_a_valid_heal(preset, tmp_path):
    """Each run's heal recipe (recipes/demo/heal.yaml + the study's budget + the arm) passes heal.config as is."""
    config = study.load_study(STUDY_PRESETS[preset])
    assert config.runs and all(run.arm in config.arms for run in config.runs)
    names = [run.name for run in config.runs]
    assert len(names) == len(set(names)), "two runs would write the same result file"
    base = yaml.safe_load((study.RECIPES / "heal.yaml").read_text())
    for run in config.runs:
        arm = config.arms[run.arm]
        recipe = {**base, "num_examples": None, **config.heal, **arm.heal, "seed": run.seed,
                  "stack": str(tmp_path), "datasets": [{"path": str(tmp_path / "data.jsonl")}],
                  "fisher": str(tmp_path / "fisher.safetensors") if arm.heal.get("protect") else None,
                  "output_dir": str(tmp_path / run.name)}
        path = tmp_path / f"{run.name}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        heal, sft = load_config(path)
        assert heal.protect == bool(arm.heal.get("protect"))
        assert sft.max_steps == arm.heal.get("max_steps", config.heal["max_steps"]) and sft.seed == run.seed
        # A constant rate after warmup: checkpoint N is the same adapter as a heal stopped at N (--arm --steps).
        assert sft.lr_scheduler_type.value == "constant_with_warmup"
        assert all(step % sft.save_steps == 0 for step in config.eval_steps)


def _write_study(tmp_path: Path, edit) -> Path:
    raw = yaml.safe_load(study.STUDY_RECIPE.read_text())
    edit(raw)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("edit, named", [
    (lambda raw: raw.update(learning_rate=1.0), "learning_rate"),
    (lambda raw: raw["runs"].append({"arm": "nosuch", "seed": 0}), "nosuch"),
    (lambda raw: raw["arms"]["sft"].update(data="web"), "'web'"),
    (lambda raw: raw.update(eval_steps=[30]), "[30]"),
    (lambda raw: raw["arms"]["sft"].update(lr=1), "lr"),
    (lambda raw: raw["answers"].pop("greedy"), "'greedy'"),
])
def test_a_bad_study_recipe_is_refused_naming_the_key(tmp_path, edit, named):
    with pytest.raises(study.StudyConfigError, match=named.replace("[", r"\[").replace("]", r"\]")):
        study.load_study(_write_study(tmp_path, edit))


def test_a_result_is_reused_only_under_its_own_hash(config, tmp_path):
    run = config.runs[0]
    key = study.run_key(config, run, DATA_HASHES)
    study.write_result(tmp_path, run.name, {"name": run.name, "key_hash": study.key_hash(key)})
    assert study.stored_result(tmp_path, run.name, study.key_hash(key)) is not None

    # A changed budget, another seed, another data file or another evaluation: another hash, so the run re-runs.
    changed = [
        dataclasses.replace(config, heal={**config.heal, "learning_rate": 3e-4}),
        dataclasses.replace(config, evaluation=(*config.evaluation, "--seed", "1")),
    ]
    hashes = {study.key_hash(study.run_key(c, run, DATA_HASHES)) for c in changed}
    hashes.add(study.key_hash(study.run_key(config, dataclasses.replace(run, seed=run.seed + 1), DATA_HASHES)))
    hashes.add(study.key_hash(study.run_key(config, run, {**DATA_HASHES, "prompts.jsonl": "cc"})))
    assert study.key_hash(key) not in hashes and len(hashes) == 4
    for stale in hashes:
        assert study.stored_result(tmp_path, run.name, stale) is None
    # Paths are not part of the key: another work folder or results folder reuses the result.
    assert study.run_key(dataclasses.replace(config, results_dir=Path("elsewhere")), run, DATA_HASHES) == key
    assert sorted(path.name for path in tmp_path.iterdir()) == [f"{run.name}.json"]  # no temp file left


def test_every_stage_folder_is_named_by_what_shapes_it(config, tmp_path):
    """A changed setting gets a new folder, never a stale one reused: the heal's folder follows the heal's key only
    (another evaluation re-evaluates the same checkpoints), the evaluation's the whole run key, the answers' their
    settings. Switched off (folders named by the run alone), the changed evaluation would reuse the old eval.json."""
    space = study.Workspace(tmp_path, config, tmp_path / "cache")
    space.data_hashes = DATA_HASHES
    run = next(r for r in config.runs if config.arms[r.arm].data == "greedy")

    def folders(c):
        heal = space.keyed(f"runs/{run.name}", study.heal_key(c, run, DATA_HASHES))
        evaluation = space.keyed(f"evals/{run.name}", study.run_key(c, run, DATA_HASHES))
        answers = space.keyed("answers-greedy", study.answers_key(c, "greedy", DATA_HASHES))
        return heal, evaluation, answers

    heal, evaluation, answers = folders(config)
    assert heal.parent == tmp_path / "runs" and heal.name.startswith(f"{run.name}-")
    other_eval = folders(dataclasses.replace(config, evaluation=(*config.evaluation, "--seed", "1")))
    assert other_eval[0] == heal and other_eval[1] != evaluation and other_eval[2] == answers
    other_lr = folders(dataclasses.replace(config, heal={**config.heal, "learning_rate": 3e-4}))
    assert other_lr[0] != heal and other_lr[1] != evaluation and other_lr[2] == answers
    greedy = {**config.answers["greedy"], "max_new_tokens": 64}
    other_answers = folders(dataclasses.replace(config, answers={**config.answers, "greedy": greedy}))
    assert len({heal, evaluation, answers} & set(other_answers)) == 0
    # The stack recipe is part of every key: a changed raw stack re-runs the heals too.
    assert "stack" in study.heal_key(config, run, DATA_HASHES) and "stack" in study.baseline_key(config, DATA_HASHES)


def test_the_study_presets_are_routed_to_their_study():
    assert study_preset(["--preset", "study", "--report"]) == "study"
    assert study_preset(["--preset=study"]) == "study"
    assert study_preset(["--budget-minutes", "0", "--preset", "gemma3"]) == "gemma3"
    assert study_preset(["--preset=gemma3"]) == "gemma3"
    assert study_preset(["--preset", "full"]) is None
    assert study_preset(["--workdir", "study"]) is None


def test_the_smollm2_studys_stored_results_keep_their_keys(config):
    """Every result stored in docs/study (runs/ and instructions/) is current: its key, recomputed from
    recipes/demo/study.yaml with the data hashes it recorded, is the stored key and has the stored hash. A change to
    a key dict (a new entry, even a default one; a renamed field) would re-run every stored run."""
    runs = {run.name: run for run in config.runs}
    results_dir = study.REPO / config.results_dir
    stored = {path: json.loads(path.read_text()) for folder in ("runs", "instructions")
              for path in sorted((results_dir / folder).glob("*.json"))}
    assert {path.parent.name for path in stored} == {"runs", "instructions"}
    for path, result in stored.items():
        data, run = result["key"]["data"], runs.get(path.stem)
        if path.parent.name == "instructions":
            raw = path.stem == "raw"
            key = study.raw_instructions_key(config, data) if raw else study.instructions_key(config, run, data)
        else:
            key = study.baseline_key(config, data) if path.stem == "baseline" else study.run_key(config, run, data)
        assert key == result["key"], path
        assert study.key_hash(key) == result["key_hash"], path


# ---- the gemma3 study: a base model, healed by continued pretraining ----------------------------------------


@pytest.fixture(scope="module")
def gemma3():
    return study.load_study(STUDY_PRESETS["gemma3"])


@pytest.mark.parametrize("edit, named", [
    (lambda raw: raw.update(prompt_words=24), "prompt_words"),
    (lambda raw: raw.update(plain_text={"words": 24}), "plain_text"),
    (lambda raw: raw.update(source="gemma-2b"), "gemma-2b"),
    (lambda raw: raw.update(stack_recipe="nosuch.yaml"), "nosuch.yaml"),
    (lambda raw: raw["arms"]["sft"].update(data="web"), "'web'"),
    (lambda raw: raw.pop("num_train_prompts"), "num_train_prompts"),
])
def test_a_bad_gemma3_recipe_is_refused_naming_the_key(tmp_path, edit, named):
    raw = yaml.safe_load(STUDY_PRESETS["gemma3"].read_text())
    edit(raw)
    path = tmp_path / "gemma3.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(study.StudyConfigError, match=named):
        study.load_study(path)


def test_the_gemma3_stack_recipe_ends_on_a_full_attention_layer(gemma3, tmp_path):
    """recipes/demo/gemma3-stack.yaml on an 18-layer gemma3_text of Gemma-3-270M's layer pattern (sliding x5, full)
    x3: the stacker, which requires the last layer to be full attention, accepts it; 26 layers."""
    from stack.tiny import save_tiny_decoder

    source = save_tiny_decoder(tmp_path / "source", "gemma3_text", num_hidden_layers=18)
    layer_types = json.loads((source / "config.json").read_text())["layer_types"]
    assert [i for i, kind in enumerate(layer_types) if kind == "full_attention"] == [5, 11, 17]
    assert run_stack(study.RECIPES / gemma3.stack_recipe, source, tmp_path / "raw") == 0
    assert json.loads((tmp_path / "raw" / "config.json").read_text())["num_hidden_layers"] == 26


def _data_folder(space: study.Workspace, passages: list[str]) -> None:
    space.data.mkdir(parents=True)
    for name in ("text_train.jsonl", "text_heldout.jsonl"):
        (space.data / name).write_text("".join(json.dumps({"text": text, "work": "w"}) + "\n" for text in passages))
    space.data_hashes = {"text_heldout.jsonl": "ab" * 32}


def test_the_gemma3_runs_train_on_text_and_are_evaluated_as_a_base_model(gemma3, config, tmp_path):
    """CPT rows are the first num_train_prompts passages; the loops continue passage openings as plain text, the KL
    is on the held-out text, and the lm-eval tasks' folder is passed. The SmolLM2 study keeps its chat inputs."""
    space = study.Workspace(tmp_path / "gemma3", gemma3, tmp_path / "cache")
    passages = [f"passage {i}, first line\nand its second line" for i in range(gemma3.num_train_prompts + 5)]
    _data_folder(space, passages)
    assert all(arm.data == "text" for arm in gemma3.arms.values()) and gemma3.instruction_following is None
    train = space.train_data("text").read_text().splitlines()
    assert [json.loads(row)["text"] for row in train] == passages[:gemma3.num_train_prompts]
    inputs = [str(flag) for flag in space.evaluation_inputs()]
    assert inputs[inputs.index("--instruct") + 1] == inputs[inputs.index("--text") + 1] == str(
        space.data / "text_heldout.jsonl")
    assert inputs[inputs.index("--tasks-dir") + 1] == str(space.data / "lm_eval_tasks")
    prompts = [json.loads(row) for row in Path(inputs[inputs.index("--prompts") + 1]).read_text().splitlines()]
    assert prompts[0] == {"text": passages[-1]} and len(prompts) == len(passages)  # under prompt_words: whole
    chat = study.Workspace(tmp_path / "study", config, tmp_path / "cache")
    assert [str(flag) for flag in chat.evaluation_inputs()] == [
        "--prompts", str(chat.data / "prompts.jsonl"), "--instruct", str(chat.data / "instruct_heldout.jsonl"),
        "--text", str(chat.data / "text_heldout.jsonl")]


def test_the_mix_rows_are_conversations_in_the_source_chat_template_alternating_with_passages(config, tiny_e4b,
                                                                                              tmp_path):
    """mix-distill's rows: half of the training conversations, each the exact text the source's chat template makes
    (so its special tokens and roles are what the evaluation's chat rows hold), alternating with half of the
    passages; the held-out passages never appear."""
    from transformers import AutoTokenizer

    space = study.Workspace(tmp_path / "study", config, tmp_path / "cache")
    space.source = tiny_e4b
    count = config.num_train_prompts
    passages = [f"passage {i}\nits second line" for i in range(count + 3)]
    _data_folder(space, passages)
    chats = [{"prompt": [{"role": "user", "content": f"question {i}"}],
              "completion": [{"role": "assistant", "content": f"answer {i}"}]} for i in range(count + 3)]
    (space.data / "instruct_train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in chats))
    (space.data / "text_heldout.jsonl").write_text(json.dumps({"text": "held out", "work": "h"}) + "\n")
    assert config.arms["mix-distill"].data == "mix" and config.arms["mix-distill"].heal["objective"] == "distill"

    rows = [json.loads(line)["text"] for line in space.train_data("mix").read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(tiny_e4b)
    rendered = [tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=False)
                for row in chats[: count // 2]]
    assert len(rows) == count and rows[0::2] == rendered and rows[1::2] == passages[: count // 2]
    assert "question 0" in rows[0] and "answer 0" in rows[0] and rows[0] != json.dumps(chats[0])
    assert not any("held out" in row for row in rows)


@pytest.mark.parametrize("adds_bos", [True, False])
def test_a_chat_text_row_starts_with_the_one_bos_the_evaluation_reads(adds_bos, tmp_path):
    """Gemma's chat template writes <bos>, and its tokenizer adds one to every text it encodes (as TRL encodes a text
    row): chat_text leaves the template's out, so the row's ids are the template's own ids, which the evaluation's
    chat rows hold. A tokenizer that adds none (SmolLM2's, whose bos_token opens its template) keeps the template's
    text. The negative control: the template's text as it is, encoded like a row, starts with two BOS."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    from stack.tiny import CHAT_TEMPLATE, save_tiny_tokenizer

    save_tiny_tokenizer(tmp_path, 64)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    tokenizer.chat_template = "{{ bos_token }}" + CHAT_TEMPLATE
    if adds_bos:
        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="<bos> $A", special_tokens=[("<bos>", tokenizer.bos_token_id)])
    messages = [{"role": "user", "content": "w1 w2"}, {"role": "assistant", "content": "w3"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    template_ids = tokenizer(rendered, add_special_tokens=False).input_ids  # evaluation.inputs.chat_ids

    row_ids = tokenizer(study.chat_text(tokenizer, messages)).input_ids
    assert row_ids == template_ids and row_ids.count(tokenizer.bos_token_id) == 1
    assert (tokenizer(rendered).input_ids[:2] == [tokenizer.bos_token_id] * 2) == adds_bos


def test_mix_rows_alternate_and_keep_the_longer_lists_tail():
    assert study.mix_rows([["a"], ["b"]], ["p", "q", "r"], render="".join) == ["a", "p", "b", "q", "r"]
    assert study.mix_rows([["a"], ["b"]], [], render="".join) == ["a", "b"]


def test_a_passage_opening_is_its_first_words_with_its_line_breaks():
    openings = study.passage_openings(["one two\nthree four five", "a b"], words=3)
    assert openings == [{"text": "a b"}, {"text": "one two\nthree"}]  # the last passage first


def test_the_plain_text_prompts_shape_the_gemma3_results_keys(gemma3):
    """plain_text is in the evaluation's keys (the baseline's and a run's), not in the heal's."""
    run = gemma3.runs[0]
    other = dataclasses.replace(gemma3, plain_text={"prompt_words": 12})
    assert study.baseline_key(other, DATA_HASHES) != study.baseline_key(gemma3, DATA_HASHES)
    assert study.run_key(other, run, DATA_HASHES) != study.run_key(gemma3, run, DATA_HASHES)
    assert study.heal_key(other, run, DATA_HASHES) == study.heal_key(gemma3, run, DATA_HASHES)
    assert study.heal_key(gemma3, run, DATA_HASHES)["source"] == "gemma-3-270m"


# ---- the report, from hand-made results with known values -------------------------------------------------


def _evaluation(models: dict[str, dict[str, list]]) -> dict:
    return {"models": {name: {"items": items} for name, items in models.items()}}


def _items(loop: float, kl: float, nll: float, n: int = 8) -> dict[str, list]:
    """n items whose every value is the given one: seq-rep, loop share, KL and NLL sums over 10 tokens each."""
    return {"fixed_seq_rep_4": [loop] * n, "fixed_loop_rate": [1.0 if loop > 0.2 else 0.0] * n,
            "kl_to_reference": [[kl * 10, 10]] * n, "perplexity": [[nll * 10, 10]] * n}


def _run(arm: str, seed: int, steps: dict[int, dict]) -> dict:
    return {"name": f"{arm}-s{seed}", "arm": arm, "seed": seed, "wall_seconds": {"heal": 600.0, "evaluate": 60.0},
            "machine": MACHINE,
            "train_log": [{"step": s, "num_tokens": 1000.0 * s} for s in range(5, 101, 5)],
            "evaluation": _evaluation({f"step{step}": items for step, items in steps.items()})}


def _instructions(name: str, model: str, strict: list[float], followed: list[int], heal_seed: int | None = None):
    """A stored instruction-following result: per prompt, prompt-level strict and (followed, 2) instruction pairs."""
    key = {} if heal_seed is None else {"heal": {"heal": {"seed": heal_seed}}}
    items = {"if_prompt_strict": strict, "if_instruction_loose": [[f, 2] for f in followed]}
    return {"name": name, "key": key, "evaluation": _evaluation({model: items})}


def test_instruction_following_of_each_arm_is_paired_with_the_best_arms_at_the_same_step(config, tmp_path):
    """arm − self-distill per prompt at a step both have; an arm without self-distill at that step gets no row."""
    write = study.write_result
    write(tmp_path / "instructions", "source", _instructions("source", "source", [1.0] * 16, [2] * 16))
    write(tmp_path / "instructions", "self-distill-s0",
          _instructions("self-distill-s0", "step200", [1.0, 0.0] * 8, [2, 1] * 8, heal_seed=0))
    write(tmp_path / "instructions", "sft-s0", _instructions("sft-s0", "step200", [1.0] * 16, [2] * 16, heal_seed=0))
    write(tmp_path / "instructions", "distill-s0",
          _instructions("distill-s0", "step100", [1.0] * 16, [2] * 16, heal_seed=0))
    lines = study_report._instruction_table(config, study_report.load_instructions(tmp_path))
    title = next(i for i, line in enumerate(lines) if line.startswith("Paired differences, arm − self-distill"))
    rows = [line for line in lines[title:] if line.startswith("| ") and not line.startswith("| arm")]
    assert len(rows) == 1 and rows[0].startswith("| sft | 200 |"), rows
    # sft passes every prompt, self-distill half of them: +0.5 prompt-level, +0.25 instruction-level, both measured.
    assert "**0.500 [" in rows[0] and "**0.250 [" in rows[0], rows[0]


def test_instruction_following_is_reported_against_the_source_on_the_same_prompts(config, tmp_path):
    """The source once, each run at its instruction steps; the paired difference is per prompt (here the arm fails
    exactly the prompts the source passes: -0.5 with no spread in the resamples' sign)."""
    study.write_result(tmp_path / "instructions", "source",
                       _instructions("source", "source", [1.0, 1.0, 0.0, 0.0] * 4, [2, 2, 1, 1] * 4))
    study.write_result(tmp_path / "instructions", "sft-s0",
                       _instructions("sft-s0", "step200", [0.0, 0.0, 0.0, 0.0] * 4, [1, 1, 1, 1] * 4, heal_seed=0))
    lines = study_report._instruction_table(config, study_report.load_instructions(tmp_path))
    source_row = next(line for line in lines if line.startswith("| source |"))
    sft_row = next(line for line in lines if line.startswith("| sft (seeds 0) | 200 |"))
    assert "0.500 [" in source_row and "0.750 [" in source_row  # 8/16 prompts; 24 of 32 instructions
    assert "0.000 [0.000, 0.000]" in sft_row and "**-0.500 [" in sft_row and "**-0.250 [" in sft_row
    assert not any(line.startswith("| raw |") for line in lines)
    # The raw stack's row, when stored: paired with the source like a run's (it passes a quarter of the prompts)
    study.write_result(tmp_path / "instructions", "raw",
                       _instructions("raw", "raw", [1.0, 0.0, 0.0, 0.0] * 4, [2, 1, 1, 1] * 4))
    lines = study_report._instruction_table(config, study_report.load_instructions(tmp_path))
    raw_row = next(line for line in lines if line.startswith("| raw | 0 |"))
    assert "0.250 [" in raw_row and "**-0.250 [" in raw_row
    # The raw stack's key is the source's plus the stack recipe: a changed stack re-scores it, the source stays.
    raw_key, source_key = study.raw_instructions_key(config, DATA_HASHES), study.instructions_key(config, None,
                                                                                                   DATA_HASHES)
    assert {k: v for k, v in raw_key.items() if k != "stack"} == source_key and raw_key["stack"]
    # An arm that stops before the instruction steps is scored at its last evaluated step.
    assert study.instruction_steps_of(config, "onpolicy") == [study.steps_of(config, "onpolicy")[-1]]
    assert study.instruction_steps_of(config, "sft") == list(config.instruction_following["steps"])
    # Its key follows the run's heal and the instruction flags, not the curve's evaluation flags.
    run = study.Run("sft", 0)
    key = study.instructions_key(config, run, DATA_HASHES)
    other_eval = dataclasses.replace(config, evaluation=(*config.evaluation, "--seed", "1"))
    assert study.instructions_key(other_eval, run, DATA_HASHES) == key
    other_flags = {**config.instruction_following, "evaluation": ("--max-new-tokens", "64")}
    assert study.instructions_key(dataclasses.replace(config, instruction_following=other_flags), run,
                                  DATA_HASHES) != key


def test_the_report_states_the_stored_numbers_and_the_targets(config, tmp_path):
    baseline = {"name": "baseline", "wall_seconds": {"evaluate": 30.0},
                "machine": MACHINE,
                "evaluation": _evaluation({"source": _items(0.10, 0.0, 4.0), "raw": _items(0.40, 1.0, 5.0)})}
    study.write_result(tmp_path / "runs", "baseline", baseline)
    # sft: seeds 0 and 1 differ; the seed-mean is what the table shows. self-distill meets every target at step 100.
    study.write_result(tmp_path / "runs", "sft-s0", _run("sft", 0, {50: _items(0.30, 0.5, 4.5),
                                                                      100: _items(0.20, 0.4, 4.4)}))
    study.write_result(tmp_path / "runs", "sft-s1", _run("sft", 1, {50: _items(0.34, 0.5, 4.5),
                                                                      100: _items(0.24, 0.4, 4.4)}))
    study.write_result(tmp_path / "runs", "self-distill-s0",
                       _run("self-distill", 0, {50: _items(0.2, 0.3, 4.2), 100: _items(0.12, 0.1, 4.05)}))
    readme = study_report.write_study_report(config, tmp_path)
    text = readme.read_text()
    rows = {line.split(" | ")[0] + "|" + line.split(" | ")[1]: line for line in text.splitlines()
            if line.startswith("| sft") or line.startswith("| self-distill")}
    assert "0.320 [0.320, 0.320] (seeds 0.3–0.34)" in rows["| sft (seeds 0,1)|50"]
    assert rows["| sft (seeds 0,1)|100"].endswith("| none |")
    # exp(4.05) = 57.4 <= 1.1 * exp(4.0) = 60.1; KL 0.1 <= 0.15; seq-rep 0.12 <= 0.10 + 0.05
    assert rows["| self-distill (seeds 0)|100"].endswith("| loops, perplexity, kl |")
    assert "| self-distill | 100 | **-0.100 [-0.100, -0.100]**" in text  # seq-rep 0.12 − mean(0.20, 0.24)
    assert "| self-distill | 100 | **0.0200 [0.0200, 0.0200]**" in text  # − the source's 0.10
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    points = study_report.arm_points(study_report.load_results(tmp_path)[1])
    assert points["sft"][1]["tokens"] == 100_000 and math.isclose(points["sft"][1]["minutes"], 10.0)


def test_the_report_tables_the_lm_eval_tasks_and_the_peak_memory(gemma3, tmp_path, monkeypatch):
    """A task's accuracy per model and step (seed-mean per document) and its paired difference from the source; the
    peak RSS of each stage a result records. A study without tasks (the SmolLM2 one) has no task section."""
    monkeypatch.setattr(study_report, "plot_curves", lambda *args: None)
    monkeypatch.setattr(study_report, "plot_pareto", lambda *args: None)
    task = "verse_next_line/acc"
    source, raw = _items(0.1, 0.0, 3.0), _items(0.4, 1.0, 4.0)
    source[task], raw[task] = [1.0, 1.0, 0.0, 0.0] * 2, [0.0] * 8
    baseline = {"name": "baseline", "wall_seconds": {"evaluate": 30.0}, "machine": MACHINE,
                "peak_rss_mib": {"convert": 3200, "stack": 410, "evaluate": 2900},
                "evaluation": _evaluation({"source": source, "raw": raw})}
    study.write_result(tmp_path / "runs", "baseline", baseline)
    for seed, hits in ((0, [1.0] * 8), (1, [0.0] * 8)):  # seed-mean: 0.5 on every document
        run = {**_run("sft", seed, {25: {**_items(0.2, 0.3, 3.5), task: hits}}),
               "peak_rss_mib": {"heal": 3500, "evaluate": None}}
        study.write_result(tmp_path / "runs", f"sft-s{seed}", run)
    text = study_report.write_study_report(gemma3, tmp_path, "gemma3").read_text()
    assert text.startswith(f"# {gemma3.title} (generated by `python -m demo --preset gemma3 --report`")
    lines = text[text.index("## lm-eval tasks"):].splitlines()
    assert next(line for line in lines if line.startswith("| source | – |")).endswith("| 0.500 [0.125, 0.875] | – |")
    raw_row = next(line for line in lines if line.startswith("| raw | 0 |"))
    assert "| 0.000 [0.000, 0.000] | **-0.500 [" in raw_row
    assert next(line for line in lines if line.startswith("| sft (seeds 0,1) | 25 |")).endswith(
        "| 0.500 [0.500, 0.500] | 0.000 [-0.375, 0.375] |")
    assert "| convert 3200, stack 410, evaluate 2900 |" in text and "| heal 3500, evaluate – |" in text
    baseline["evaluation"] = _evaluation({"source": _items(0.1, 0.0, 3.0), "raw": _items(0.4, 1.0, 4.0)})
    assert study_report._task_table(baseline, []) == []


def test_paired_difference_of_an_arm_with_itself_contains_zero():
    rng = np.random.default_rng(0)
    items = np.stack([rng.uniform(0, 5, 32), rng.integers(5, 20, 32)], axis=1)
    assert study_report.paired(items, items, "kl_to_reference").contains(0.0)
    loops = rng.uniform(0, 1, 32)
    assert study_report.paired(loops, loops, "fixed_seq_rep_4").contains(0.0)
    assert not study_report.paired(loops + 0.1, loops, "fixed_seq_rep_4").contains(0.0)


def test_a_run_file_is_json_of_what_was_written(tmp_path):
    path = study.write_result(tmp_path, "x", {"name": "x", "value": [1, 2]})
    assert json.loads(path.read_text()) == {"name": "x", "value": [1, 2]}


# ---- the report at equal quality: KL where the loop rate falls to a level, paired between arms --------------


def _loop_items(loop_rate: float, n: int = 8) -> list[float]:
    """n prompts, the first round(loop_rate * n) of them looping: the same prompts loop in every arm at a rate."""
    looping = round(loop_rate * n)
    return [1.0] * looping + [0.0] * (n - looping)


def _curve_items(loop_rate: float, kl: float, nll: float, n: int = 8) -> dict[str, list]:
    return {**_items(0.0, kl, nll, n), "fixed_loop_rate": _loop_items(loop_rate, n)}


def _curve(loop_rates: list[float], kl_rows: list[np.ndarray], nll: list[float] | None = None) -> dict:
    """An arm's curve (study_report.arm_curve's shape) from loop rates over 4 prompts, KL rows and NLLs per point."""
    nll = nll or [1.0] * len(loop_rates)
    return {"fixed_loop_rate": [np.array(_loop_items(rate, 4)) for rate in loop_rates],
            "kl_to_reference": kl_rows,
            "perplexity": [np.array([[value * 10, 10.0]] * 4) for value in nll]}


def test_the_value_at_a_loop_rate_is_read_where_the_curve_first_falls_to_it():
    values_at = study_report.values_at_level
    loops, kl = np.array([0.8, 0.6, 0.3, 0.1]), np.array([1.0, 0.8, 0.5, 0.4])
    assert math.isclose(values_at(loops, kl, 0.45)[0], 0.65)  # halfway from 0.6 to 0.3: halfway from 0.8 to 0.5
    assert values_at(loops, kl, 0.3)[0] == 0.5  # a checkpoint exactly at the level: its own value
    assert values_at(loops, kl, 0.8)[0] == 1.0  # the start is already at the level
    assert np.isnan(values_at(loops, kl, 0.05)[0])  # never reached
    # Non-monotone: the first crossing (0.8 -> 0.3: 0.6) is used, not the later one (0.6 -> 0.1: 0.62).
    wandering = np.array([0.8, 0.3, 0.6, 0.1]), np.array([1.0, 0.5, 0.9, 0.2])
    assert math.isclose(values_at(*wandering, 0.4)[0], 0.6)
    # Several curves at once, one row each, give what each gives alone.
    batch = values_at(np.stack([loops, wandering[0]]), np.stack([kl, wandering[1]]), 0.4)
    assert np.allclose(batch, [values_at(loops, kl, 0.4)[0], 0.6])
    # On items: loop rates 1, 0.5, 0.25 over 4 prompts; at 0.375, halfway between the last two points.
    curve = _curve([1.0, 0.5, 0.25], [np.array([[k * 10, 10.0]] * 3) for k in (2.0, 1.0, 0.5)], nll=[3.0, 2.0, 1.0])
    at = study_report.at_loop_rate(curve, 0.375)
    assert math.isclose(at["kl_to_reference"], 0.75) and math.isclose(at["perplexity"], (math.exp(2) + math.e) / 2)
    assert study_report.common_level(curve, _curve([1.0, 0.75], curve["kl_to_reference"][:2])) == 0.75


def _random_curve(rng: np.random.Generator, num_prompts: int = 32, num_rows: int = 24) -> dict:
    """A curve of 4 points whose loop rates fall (prompts looping with probability 0.9, 0.6, 0.4, 0.2) and whose KL
    rows vary widely from row to row (the spread that pairing cancels)."""
    row_kl = rng.uniform(0.0, 4.0, num_rows)
    tokens = rng.integers(5, 20, num_rows).astype(float)
    return {"fixed_loop_rate": [(rng.uniform(size=num_prompts) < p).astype(float) for p in (0.9, 0.6, 0.4, 0.2)],
            "kl_to_reference": [np.stack([row_kl * scale * tokens, tokens], axis=1) for scale in (1.0, 0.6, 0.5, 0.4)],
            "perplexity": [np.array([[20.0, 10.0]] * num_rows)] * 4}


def _shifted(curve: dict, shift: float) -> dict:
    """The same curve with every KL row raised by `shift` nats/token, so its KL is `shift` higher at every point."""
    return {**curve, "kl_to_reference": [items + np.stack([shift * items[:, 1], 0 * items[:, 1]], axis=1)
                                         for items in curve["kl_to_reference"]]}


def test_an_arm_at_equal_quality_differs_from_itself_by_nothing_and_from_a_shifted_copy_by_the_shift():
    curve = _random_curve(np.random.default_rng(0))
    itself = study_report.compare_at_equal_quality(curve, curve)
    assert itself.kl_difference.estimate == 0 and itself.kl_difference.contains(0.0)
    assert itself.kl_difference.high - itself.kl_difference.low < 1e-12
    assert itself.verdict == "no difference measured"
    higher = study_report.compare_at_equal_quality(curve, _shifted(curve, 0.05))
    assert math.isclose(higher.kl_difference.estimate, 0.05)
    assert math.isclose(higher.kl_difference.low, 0.05) and math.isclose(higher.kl_difference.high, 0.05)
    assert higher.verdict == "higher KL at equal loops"
    assert study_report.compare_at_equal_quality(_shifted(curve, 0.05), curve).verdict == "lower KL at equal loops"
    # The level is each curve's lowest loop rate: in a resample where that point rises above it, the level is not
    # reached, and that share is reported.
    assert higher.level == min(items.mean() for items in curve["fixed_loop_rate"])
    assert 0 < higher.undefined_share < 1


def test_the_comparison_at_equal_quality_pairs_the_items():
    """Two arms that share most of their per-row KL (row 7 is hard in both): resampling both with the same prompts
    and rows cancels what they share. Switched to separate resamples, the interval would be several times wider."""
    rng = np.random.default_rng(1)
    curve = _random_curve(rng)
    other = _shifted(curve, 0.05)
    other["kl_to_reference"] = [items + np.stack([rng.normal(0, 0.02, len(items)) * items[:, 1], 0 * items[:, 1]],
                                                 axis=1) for items in other["kl_to_reference"]]
    paired = study_report.compare_at_equal_quality(curve, other).kl_difference
    level = study_report.common_level(curve, other)
    num_prompts, num_rows = len(curve["fixed_loop_rate"][0]), len(curve["kl_to_reference"][0])
    unpaired = (study_report.resampled_kl_at_level(other, study_report.resample_indices(num_prompts, 10),
                                                   study_report.resample_indices(num_rows, 11), level)
                - study_report.resampled_kl_at_level(curve, study_report.resample_indices(num_prompts, 0),
                                                     study_report.resample_indices(num_rows, 1), level))
    low, high = np.quantile(unpaired[np.isfinite(unpaired)], [0.025, 0.975])
    assert paired.excludes_zero and not low > 0
    assert paired.high - paired.low < 0.25 * (high - low)


def _write_equal_quality_study(results_dir: Path, arms: dict[str, dict[int, tuple[float, float]]]) -> None:
    """A baseline and one seed-0 run per arm, each step's (loop rate, KL) given; perplexity the source's."""
    baseline = {"name": "baseline", "wall_seconds": {"evaluate": 30.0}, "machine": MACHINE,
                "evaluation": _evaluation({"source": _curve_items(0.0, 0.0, 4.0), "raw": _curve_items(1.0, 1.0, 5.0)})}
    study.write_result(results_dir / "runs", "baseline", baseline)
    for arm, steps in arms.items():
        study.write_result(results_dir / "runs", f"{arm}-s0", _run(arm, 0, {
            step: _curve_items(loop_rate, kl, 4.0) for step, (loop_rate, kl) in steps.items()}))


def test_the_report_compares_protected_arms_with_their_twins_at_equal_quality(config, tmp_path, monkeypatch):
    """sft+kfac-50 follows sft's loop rates with 0.3 less KL at every checkpoint: at the loop rate both reach
    (0.25) its KL is 0.3 lower; sft has 0.2 more than self-distill. Instruction results at step 100: the protected
    arm passes half the prompts, its twin none. (curves.png, two seconds of matplotlib, is drawn in the test
    above; pareto.png is drawn here, with a protected arm.)"""
    monkeypatch.setattr(study_report, "plot_curves", lambda *args: None)
    _write_equal_quality_study(tmp_path, {"sft": {50: (0.5, 0.6), 100: (0.25, 0.5)},
                                          "sft+kfac-50": {50: (0.5, 0.3), 100: (0.25, 0.2)},
                                          "self-distill": {50: (0.5, 0.4), 100: (0.25, 0.3)}})
    study.write_result(tmp_path / "instructions", "sft-s0",
                       _instructions("sft-s0", "step100", [0.0] * 16, [1] * 16, heal_seed=0))
    study.write_result(tmp_path / "instructions", "sft+kfac-50-s0",
                       _instructions("sft+kfac-50-s0", "step100", [1.0, 0.0] * 8, [2, 1] * 8, heal_seed=0))
    lines = study_report.write_study_report(config, tmp_path).read_text().splitlines()
    protection = lines[lines.index("## Protection at equal quality"):lines.index("## Arms at equal quality")]
    row = next(line for line in protection if line.startswith("| sft+kfac-50 | sft | 0.25 |"))
    assert "| 0.5 | 0.2 |" in row and "| **-0.300 [" in row
    assert any(line.startswith("- sft+kfac-50 against sft: **lower KL at equal loops** (KL -0.300 [")
               for line in protection)
    # At equal steps: 100, the last step both reach; KL -0.3 on every row, IFEval strict 0.5 higher on step 100.
    steps_row = next(line for line in protection if line.startswith("| sft+kfac-50 | sft | 100 |"))
    assert "**-0.300 [-0.300, -0.300]**" in steps_row and steps_row.endswith("** (100) |")
    assert "| **0.500 [" in steps_row
    arms = lines[lines.index("## Arms at equal quality"):]
    assert any(line.startswith("| sft | self-distill | 0.25 | 0.3 | 0.5 |") for line in arms)
    assert any(line.startswith("- sft against self-distill: **higher KL at equal loops**") for line in arms)
    assert not any(line.startswith("| sft+kfac-50 |") for line in arms)  # protected arms meet only their twin
    assert (tmp_path / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    styles = study_report.arm_styles(["sft", "sft+kfac-50", "self-distill", "self-distill+kfac-50", "sft+ewc-1e-4"])
    assert styles["sft+kfac-50"]["color"] == styles["sft"]["color"] != styles["self-distill"]["color"]
    assert styles["sft+kfac-50"]["marker"] == styles["self-distill+kfac-50"]["marker"] not in (
        styles["sft"]["marker"], styles["sft+ewc-1e-4"]["marker"])


def test_the_equal_quality_sections_are_left_out_without_the_arms_they_compare(tmp_path):
    _write_equal_quality_study(tmp_path, {"sft": {50: (0.5, 0.6)}, "self-distill": {50: (0.5, 0.4)},
                                          "self-distill+kfac-50": {50: (0.5, 0.3)}})
    baseline, runs = study_report.load_results(tmp_path)
    points, raw = study_report.arm_points(runs), study_report.reference_points(baseline)["raw"]
    assert study_report.protection_section({"sft": points["sft"], "self-distill": points["self-distill"]}, raw,
                                            runs, {}) == []
    # A protected arm whose twin has no results yet is not compared.
    assert study_report.protection_section({"sft": points["sft"],
                                             "self-distill+kfac-50": points["self-distill+kfac-50"]}, raw,
                                            runs, {}) == []
    assert study_report._arms_section({"sft": points["sft"]}, raw) == []
    assert study_report._arms_section({"self-distill": points["self-distill"]}, raw) == []
    assert study_report._arms_section(points, raw)[0] == "## Arms at equal quality"


# ---- the protections' page, pooled from both result sets (demo/protection_report.py) -------------------------


def _two_result_sets(tmp_path: Path, shared_kl: float = 0.5) -> tuple[Path, Path]:
    """gpu/: the baseline and sft at seeds 0 and 1; cpu/: the same baseline and sft-s0 (its step-100 KL
    `shared_kl`, gpu's being 0.5) with the protected sft+kfac-50, 0.3 below sft in KL at every checkpoint."""
    gpu, cpu = tmp_path / "gpu", tmp_path / "cpu"
    _write_equal_quality_study(gpu, {"sft": {50: (0.5, 0.6), 100: (0.25, 0.5)}})
    study.write_result(gpu / "runs", "sft-s1", _run("sft", 1, {50: _curve_items(0.5, 0.6, 4.0),
                                                                100: _curve_items(0.25, 0.5, 4.0)}))
    _write_equal_quality_study(cpu, {"sft": {50: (0.5, 0.6), 100: (0.25, shared_kl)},
                                     "sft+kfac-50": {50: (0.5, 0.3), 100: (0.25, 0.2)}})
    return gpu, cpu


def test_the_protection_page_pairs_a_protected_arm_with_its_twins_seeds_from_the_other_result_set(tmp_path):
    """sft+kfac-50 (cpu/) against sft's two seeds (gpu/); sft-s0, stored in both, counts once."""
    gpu, cpu = _two_result_sets(tmp_path)
    out = tmp_path / "page"
    lines = protection_report.write_protection_report([gpu, cpu], out).read_text().splitlines()
    assert "| sft | 0,1 | gpu |" in lines and "| sft+kfac-50 | 0 | cpu |" in lines
    assert any(line.startswith("| sft+kfac-50 | sft | 0.25 | 0.5 | 0.2 |") and "**-0.300 [" in line for line in lines)
    # The baseline and sft-s0 are stored twice, and agree exactly.
    assert any("The 2 results stored in more than one set agree item for item within 0.0e+00" in line
               for line in lines)
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG" and not list(tmp_path.glob(".page.partial*"))


@pytest.mark.parametrize("shared_kl, pooled", [(0.5 * (1 + 1e-5), True), (0.5 * 1.01, False)])
def test_result_sets_that_disagree_on_a_run_both_stored_are_not_pooled(tmp_path, shared_kl, pooled):
    """Within the tolerance (float32 reduction order) the sets pool; 1% apart on one KL item, the page is refused,
    naming the run, model and metric, and the previous page is left as it was."""
    gpu, cpu = _two_result_sets(tmp_path, shared_kl)
    out = tmp_path / "page"
    out.mkdir()
    (out / "README.md").write_text("the previous page\n")
    if pooled:
        protection_report.write_protection_report([gpu, cpu], out)
        assert "sft+kfac-50" in (out / "README.md").read_text()
        return
    refused = r"run 'sft-s0', model 'step100', metric 'kl_to_reference', item 0: 5 in .*gpu but 5.05 in .*cpu"
    with pytest.raises(protection_report.PoolingError, match=refused):
        protection_report.write_protection_report([gpu, cpu], out)
    assert (out / "README.md").read_text() == "the previous page\n"


def test_the_protection_page_refuses_to_replace_a_folder_it_did_not_write(tmp_path):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "mine.md").write_text("keep me\n")
    assert protection_report.main(["--out", str(out)]) == 2
    assert [path.name for path in out.iterdir()] == ["mine.md"]


# ---- the demo's presets (recipes/demo/presets.yaml) --------------------------------------------------------


def test_every_demo_preset_loads_and_its_arms_are_valid_heals(tmp_path):
    from demo.run import ARMS, PRESETS, load_presets

    assert set(PRESETS) == {"full", "reduced"} and PRESETS == load_presets()
    base = yaml.safe_load((study.RECIPES / "heal.yaml").read_text())
    for name, preset in PRESETS.items():
        for arm in preset.arms:
            recipe = {**base, **preset.heal, **ARMS[arm].overrides, "stack": str(tmp_path),
                      "datasets": [{"path": "x.jsonl"}], "output_dir": str(tmp_path / arm),
                      "fisher": "f.safetensors" if ARMS[arm].overrides["protect"] else None}
            path = tmp_path / f"{name}-{arm}.yaml"
            path.write_text(yaml.safe_dump(recipe))
            _, sft = load_config(path)
            assert sft.max_steps == preset.heal["max_steps"]


@pytest.mark.parametrize("edit, named", [
    (lambda raw: raw["full"].update(steps=3), "steps"),
    (lambda raw: raw["reduced"]["arms"].append("nosuch"), "nosuch"),
])
def test_a_bad_demo_preset_is_refused_naming_it(tmp_path, edit, named):
    from demo.run import RECIPES, PresetError, load_presets

    raw = yaml.safe_load((RECIPES / "presets.yaml").read_text())
    edit(raw)
    path = tmp_path / "presets.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(PresetError, match=named):
        load_presets(path)


def test_each_arm_is_evaluated_at_the_steps_it_reaches(config, tmp_path):
    """An arm stops at the study's max_steps, or at its own: earlier (on-policy) or later (a curve followed further).
    Its instruction-following is at the instruction steps it reaches and at its last step."""
    assert study.steps_of(config, "onpolicy") == [s for s in config.eval_steps if s <= 50]
    assert study.steps_of(config, "sft") == [s for s in config.eval_steps if s <= config.heal["max_steps"]]
    assert study.steps_of(config, "self-distill-800") == list(config.eval_steps)
    assert study.instruction_steps_of(config, "sft") == list(config.instruction_following["steps"])
    assert study.instruction_steps_of(config, "self-distill-800") == [*config.instruction_following["steps"], 800]
    # A stored 200-step run's key names the steps it was evaluated at, as before longer arms existed.
    assert study.run_key(config, study.Run("sft", 0), DATA_HASHES)["eval_steps"] == [50, 100, 200]
    with pytest.raises(study.StudyConfigError, match="'sft' stops at max_steps 10"):
        study.load_study(_write_study(tmp_path, lambda raw: raw["arms"]["sft"]["heal"].update(max_steps=10)))


def _finished_heal(space: study.Workspace, run: study.Run, steps: list[int], runtime: float) -> Path:
    """A finished heal folder of `run` as heal/train.py leaves it: its checkpoints, train_results, trainer_state."""
    folder = space.keyed(f"runs/{run.name}", study.heal_key(space.config, run, space.data_hashes))
    for step in steps:
        (folder / f"checkpoint-{step}").mkdir(parents=True)
        (folder / f"checkpoint-{step}" / "adapter_model.safetensors").write_text(f"adapter at {step}")
    (folder / "train_results.json").write_text(json.dumps({"train_runtime": runtime}))
    (folder / "trainer_state.json").write_text("{}")
    return folder


def test_a_longer_run_starts_from_the_shorter_runs_checkpoints_only_under_a_constant_rate(config, tmp_path):
    """self-distill-400's heal is self-distill's with max_steps 400: its folder gets self-distill's checkpoints, hard
    linked (no copy), and its heal time counts theirs. Another seed, a cosine schedule or a folder that has
    checkpoints of its own is left alone."""
    space = study.Workspace(tmp_path / "study", config, tmp_path / "cache")
    space.data_hashes = DATA_HASHES
    base = _finished_heal(space, study.Run("self-distill", 0), [50, 100, 150, 200], runtime=600.0)
    _finished_heal(space, study.Run("self-distill", 1), [50, 100, 150, 200], runtime=500.0)
    longer = study.Run("self-distill-400", 0)
    folder = space.keyed(f"runs/{longer.name}", study.heal_key(config, longer, DATA_HASHES))
    assert study.shorter_run(space, longer) == base
    study.extend_from_shorter_run(space, longer, folder)
    assert sorted(p.name for p in folder.glob("checkpoint-*")) == [f"checkpoint-{s}" for s in (100, 150, 200, 50)]
    linked, original = folder / "checkpoint-200" / "adapter_model.safetensors", base / "checkpoint-200" / \
        "adapter_model.safetensors"
    assert linked.read_text() == "adapter at 200" and os.path.samefile(linked, original)
    assert not folder.with_name(f"{folder.name}.extending").exists()
    (folder / "train_results.json").write_text(json.dumps({"train_runtime": 700.0}))  # what the resumed heal writes
    assert study.heal_seconds(folder) == 1300.0
    # A folder with checkpoints of its own (an interrupted heal of this run) is resumed as it is.
    (folder / "checkpoint-50" / "adapter_model.safetensors").unlink()
    study.extend_from_shorter_run(space, longer, folder)
    assert not (folder / "checkpoint-50" / "adapter_model.safetensors").exists()
    # No shorter run under another seed, nor under a rate that depends on max_steps.
    assert study.shorter_run(space, study.Run("self-distill-400", 2)) is None
    cosine = dataclasses.replace(config, heal={**config.heal, "lr_scheduler_type": "cosine"})
    space.config = cosine
    _finished_heal(space, study.Run("self-distill", 0), [50, 100, 150, 200], runtime=600.0)
    assert study.shorter_run(space, longer) is None


def test_a_rebuild_is_the_runs_heal_stopped_at_the_chosen_step(config, tmp_path):
    """`--arm A --steps N --seed S` heals with the run's own recipe, stopped at N and merged: with the constant
    rate, that is the run's checkpoint-N."""
    space = study.Workspace(tmp_path / "study", config, tmp_path / "cache")
    space.data.mkdir(parents=True)
    (space.data / "instruct_train.jsonl").write_text("".join(f'{{"row": {i}}}\n' for i in range(900)))
    run = study.Run("sft", 1)
    recipe = yaml.safe_load(space.heal_recipe(run, tmp_path / "runs" / run.name).read_text())
    rebuilt = yaml.safe_load(space.heal_recipe(run, tmp_path / "rebuild" / "x", max_steps=50, merge=True,
                                               save_strategy="no").read_text())
    changed = {key for key in recipe if recipe[key] != rebuilt[key]}
    assert changed == {"max_steps", "merge", "save_strategy", "output_dir"}
    assert (rebuilt["max_steps"], rebuilt["merge"], recipe["seed"]) == (50, True, 1)
    assert len(Path(recipe["datasets"][0]["path"]).read_text().splitlines()) == config.num_train_prompts


def test_answer_settings_become_the_answers_flags(config):
    from heal.answers import make_parser

    assert study.cli_flags({"max_new_tokens": 160, "keep_unfinished": True, "force": False}) == [
        "--max-new-tokens", 160, "--keep-unfinished"]
    for settings in config.answers.values():  # every YAML key is a flag python -m heal.answers accepts
        flags = [str(flag) for flag in study.cli_flags(settings)]
        make_parser().parse(["--model", "m", "--data", "d", "--out", "o", *flags])


def test_tokens_at_carries_the_count_over_a_resumed_heals_restart():
    steady = [{"step": s, "num_tokens": 100 * s} for s in (5, 10, 15, 20)]
    # resumed from checkpoint-10: TRL's count restarted from 0 there (the 15 and 20 entries are the new process's)
    resumed = steady[:2] + [{"step": 15, "num_tokens": 500}, {"step": 20, "num_tokens": 1000}]
    for log in (steady, resumed):
        assert [study_report.tokens_at(log, s) for s in (5, 10, 15, 20)] == [500, 1000, 1500, 2000]
    assert math.isnan(study_report.tokens_at(steady, 4))


# ---- a study on a base study (study-gpu), and several study processes at once ---------------------------------


def test_a_study_on_a_base_is_the_bases_recipe_with_its_own_keys_on_top(config, monkeypatch):
    gpu = study.load_study(STUDY_PRESETS["study-gpu"])
    assert gpu.results_dir != config.results_dir
    assert gpu.heal == {**config.heal, "use_cpu": False}  # merged key by key, not replaced
    assert gpu.arms == config.arms and gpu.eval_steps == config.eval_steps
    assert gpu.fisher == config.fisher and gpu.num_train_prompts == config.num_train_prompts
    # The same runs differ only where the GPU study says so: the device, and float32 answers.
    run = study.Run("self-distill", 0)
    cpu_key, gpu_key = study.heal_key(config, run, DATA_HASHES), study.heal_key(gpu, run, DATA_HASHES)
    assert {**gpu_key, "heal": {**gpu_key["heal"], "use_cpu": True}, "answers": cpu_key["answers"]} == cpu_key
    # Switched off (the base's heal replaced, not merged), the GPU study would have no budget at all.
    monkeypatch.setattr(study, "MERGED_KEYS", tuple(key for key in study.MERGED_KEYS if key != "heal"))
    with pytest.raises(study.StudyConfigError, match="heal has no max_steps or save_steps"):
        study.load_study(STUDY_PRESETS["study-gpu"])


def test_the_gemma3_gpu_study_is_gemma3s_on_the_gpu_in_float32(gemma3):
    gpu = study.load_study(STUDY_PRESETS["gemma3-gpu"])
    assert gpu.results_dir != gemma3.results_dir
    assert gpu.heal == {**gemma3.heal, "use_cpu": False}
    assert (gpu.arms, gpu.runs, gpu.plain_text, gpu.eval_steps) == (gemma3.arms, gemma3.runs, gemma3.plain_text,
                                                                   gemma3.eval_steps)
    assert list(gpu.evaluation) == [*gemma3.evaluation, "--dtype", "float32"]


@pytest.mark.parametrize("base, named", [("nosuch.yaml", "'nosuch.yaml' is not a file"),
                                         ("study-gpu.yaml", "cycle")])
def test_a_bad_base_is_refused_naming_it(tmp_path, monkeypatch, base, named):
    monkeypatch.setattr(study, "RECIPES", tmp_path)
    (tmp_path / "study-gpu.yaml").write_text(f"base: {base}\nresults_dir: x\n")
    with pytest.raises(study.StudyConfigError, match=named):
        study.load_study(tmp_path / "study-gpu.yaml")


def test_only_selects_the_named_parts_and_refuses_an_unknown_name(config, tmp_path):
    space = study.Workspace(tmp_path / "study", config, tmp_path / "cache")
    parts = study.study_parts(space, DATA_HASHES)
    assert [p.label for p in study.select_parts(config, parts, ["sft-s0", "raw"])] == [
        "instructions/raw", "runs/sft-s0", "instructions/sft-s0"]
    assert study.select_parts(config, parts, None) == parts
    with pytest.raises(study.StudyConfigError, match="--only sft-s9: not a part"):
        study.select_parts(config, parts, ["sft-s0", "sft-s9"])


def test_a_work_unit_keeps_a_curve_with_the_runs_that_continue_it():
    gpu = study.load_study(STUDY_PRESETS["study-gpu"])
    names = [*study.SHARED_PARTS, *(run.name for run in gpu.runs)]
    units = study.work_units(gpu, names, DATA_HASHES)
    assert units[0] == list(study.SHARED_PARTS)
    assert ["distill-s0", "distill-400-s0", "distill-800-s0"] in units
    assert ["self-distill-s0", "self-distill-400-s0", "self-distill-800-s0"] in units
    assert ["distill-s1"] in units and ["distill+fisher-s0"] in units  # another seed, another arm: alone
    assert sorted(name for unit in units for name in unit) == sorted(names)
    # Under a rate that depends on max_steps a longer run shares nothing with the shorter one: every run alone.
    cosine = dataclasses.replace(gpu, heal={**gpu.heal, "lr_scheduler_type": "cosine"})
    assert all(len(unit) == 1 for unit in study.work_units(cosine, names[3:], DATA_HASHES))


def test_a_unit_needs_the_answers_and_the_fisher_of_its_runs(config):
    assert study.unit_inputs(config, ["self-distill-s0", "self-distill-400-s0"]) == ["greedy"]
    assert study.unit_inputs(config, ["self-distill+kfac-50-s0"]) == ["greedy", "fisher"]
    assert study.unit_inputs(config, ["sft+fisher-s0"]) == ["fisher"]
    assert study.unit_inputs(config, ["sft-s0", *study.SHARED_PARTS]) == []


def _units_started(queue: list[list[str]], inputs: "study.SharedInputs", until) -> list[list[str]]:
    """next_ready_unit as run_parallel calls it when a slot is free, polled (as its loop does) until `until()`."""
    started = []
    for _ in range(3000):  # 30 s at most
        unit = study.next_ready_unit(queue, inputs)
        if unit is not None:
            started.append(unit)
        elif until():
            return started
        else:
            time.sleep(0.01)
    raise AssertionError(f"still waiting: {queue}, started {started}")


def test_an_input_that_fails_skips_the_units_that_need_it_once(config, tmp_path, monkeypatch):
    """The Fisher stage fails (it did, on a GPU): every unit that needs it is skipped, the stage is not run again
    for each of them, and the units that do not need it start."""
    made = []

    def make_input(space, name):
        made.append(name)
        if name == "fisher":
            raise SystemExit(1)

    monkeypatch.setattr(study, "make_input", make_input)
    inputs = study.SharedInputs(study.Workspace(tmp_path / "study", config, tmp_path / "cache"))
    queue = [["sft+fisher-s0"], ["self-distill+fisher-s0"], ["self-distill-s1"], ["sft-s1"]]
    started = _units_started(queue, inputs, until=lambda: not queue)
    inputs.close()
    assert started == [["self-distill-s1"], ["sft-s1"]] and inputs.state("fisher") == "failed"
    assert made == ["fisher", "greedy"]  # each input made once, in the order the units asked for them


def test_a_unit_waiting_for_its_input_lets_the_next_ready_one_start(config, tmp_path, monkeypatch):
    """While the Fisher is being made (210 s on the GPU), the units that do not need it start in the YAML's order,
    and the Fisher's units once it is made; when nothing is being made, the queue's order holds."""
    fisher_made = threading.Event()

    def make_input(space, name):
        if name == "fisher":
            assert fisher_made.wait(timeout=10)

    monkeypatch.setattr(study, "make_input", make_input)
    inputs = study.SharedInputs(study.Workspace(tmp_path / "study", config, tmp_path / "cache"))
    queue = [["sft+fisher-s0"], ["sft-s1"], ["sft+kfac-50-s0"], ["distill-s1"]]
    waiting = _units_started(queue, inputs, until=lambda: queue == [["sft+fisher-s0"], ["sft+kfac-50-s0"]])
    assert waiting == [["sft-s1"], ["distill-s1"]] and inputs.state("fisher") == "making"
    fisher_made.set()
    assert _units_started(queue, inputs, until=lambda: not queue) == [["sft+fisher-s0"], ["sft+kfac-50-s0"]]
    inputs.close()

    # An input already made (the stage returns at once) holds nothing back: the units start in the queue's order.
    in_order, made = [["sft+fisher-s0"], ["sft-s1"], ["sft+kfac-50-s0"]], study.SharedInputs(inputs.space)
    queue = list(in_order)
    assert _units_started(queue, made, until=lambda: not queue) == in_order
    made.close()
