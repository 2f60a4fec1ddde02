"""evaluation.ifeval: IFEval's checkers on hand-made responses, strict and loose, its two aggregations, and the
validation of prompt files."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from evaluation.ifeval import (
    INSTRUCTIONS,
    InstructionError,
    InstructionPrompt,
    load_instruction_prompts,
    score_responses,
)

# id -> (kwargs, a response that follows it, one that does not, strictly or loosely)
CASES = {
    "change_case:english_lowercase": ({}, "the sky is blue because air scatters blue light.", "The sky is blue."),
    "change_case:english_capital": ({}, "THE SKY IS BLUE.", "THE SKY IS Blue."),
    "punctuation:no_comma": ({}, "Yes it is and it rains a lot.", "Yes, it is."),
    "keywords:existence": ({"keywords": ["garden", "water"]}, "Water the Garden daily.", "Water the lawn daily."),
    "length_constraints:number_words": (
        {"num_words": 5, "relation": "less than"}, "Four words, no more.", "This answer has five words."),
    "startend:end_checker": (
        {"end_phrase": "Any other questions?"}, 'Paris.\n"Any other questions?"', "Any other questions? Paris."),
    "detectable_content:postscript": ({"postscript_marker": "P.S."}, "Hi.\n\nP.S. Bye.", "Hi.\n\nPS Bye."),
    "startend:quotation": ({}, '  "It is four."  ', '"It is four.'),
    "detectable_format:number_bullet_lists": (
        # Four bullets: no loose variant (a line cut, asterisks gone) leaves exactly two.
        {"num_bullets": 2}, "Two:\n* one\n- two\n**bold** is not a bullet", "Four:\n* one\n* two\n* three\n* four"),
    "detectable_format:title": ({}, "<<The Sea>>\nIt is wide.", "<< >>\nIt is wide."),
    "detectable_format:json_format": ({}, '```json\n{"answer": 4}\n```', "The answer: {4}"),
}


def prompt(instruction_id: str, kwargs: dict, key: str = "k") -> InstructionPrompt:
    return InstructionPrompt(key, "Say something.", (instruction_id,), (kwargs,))


def test_cases_cover_every_instruction():
    assert set(CASES) == set(INSTRUCTIONS)


@pytest.mark.parametrize("instruction_id", sorted(CASES))
def test_each_checker_passes_and_fails(instruction_id):
    kwargs, good, bad = CASES[instruction_id]
    scores = score_responses([prompt(instruction_id, kwargs)] * 2, [good, bad])
    assert scores.prompt_strict == [True, False]
    assert scores.prompt_loose == [True, False]  # the failing response fails in every loose variant too
    assert scores.instruction_strict == scores.instruction_loose == [(1, 1), (0, 1)]


def test_edge_cases():
    pps = prompt("detectable_content:postscript", {"postscript_marker": "P.P.S"})
    at_least = prompt("length_constraints:number_words", {"num_words": 3, "relation": "at least"})
    lower, upper = prompt("change_case:english_lowercase", {}), prompt("change_case:english_capital", {})
    scores = score_responses(
        [pps, pps, at_least, at_least, lower, upper],
        # IFEval's case checks are str.islower / str.isupper: a response with no letters is neither.
        ["Hi.\np. p. s. more", "Hi.\nP.S. more", "a b c", "a b", "42.", "42."],
    )
    assert scores.prompt_strict == [True, False, True, False, False, False]


@pytest.mark.parametrize(
    ("instruction_id", "kwargs", "response"),
    [
        # IFEval's loose variants: a preamble line dropped, a sign-off line dropped, asterisks removed.
        ("change_case:english_lowercase", {}, "Sure! Here it is:\nthe sky is blue."),
        ("startend:quotation", {}, '"The sky is blue."\nI hope this helps.'),
        ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Paris.\n**Any other questions?**"),
        ("punctuation:no_comma", {}, "Sure, here you go:\nno commas here\nThanks, bye"),
    ],
)
def test_loose_forgives_what_strict_does_not(instruction_id, kwargs, response):
    scores = score_responses([prompt(instruction_id, kwargs)], [response])
    assert scores.prompt_strict == [False]
    assert scores.prompt_loose == [True]


def test_empty_response_follows_nothing():
    # "" is trivially comma-free and has "less than 5 words"; IFEval still counts it as not following.
    prompts = [prompt("punctuation:no_comma", {}), prompt("length_constraints:number_words",
                                                         {"num_words": 5, "relation": "less than"})]
    scores = score_responses(prompts, ["", "  \n"])
    assert scores.prompt_strict == scores.prompt_loose == [False, False]


def test_prompt_and_instruction_level_aggregation():
    both = InstructionPrompt("a", "p", ("punctuation:no_comma", "change_case:english_lowercase"), ({}, {}))
    one = InstructionPrompt("b", "p", ("startend:quotation",), ({},))
    # both followed; one of two followed; none of one followed.
    scores = score_responses([both, both, one], ["all lowercase no commas", "All Caps no commas", "no quotes"])
    assert scores.prompt_strict == [True, False, False]
    assert scores.instruction_strict == [(2, 2), (1, 2), (0, 1)]
    accuracies = scores.accuracies()
    assert accuracies["prompt_strict"] == pytest.approx(1 / 3)
    # followed / total over all instructions, 3 / 5 (a mean of per-prompt shares would give 0.5)
    assert accuracies["instruction_strict"] == pytest.approx(3 / 5)
    assert accuracies["prompt_loose"] == pytest.approx(1 / 3)
    assert accuracies["instruction_loose"] == pytest.approx(3 / 5)
    assert scores.by_instruction()["punctuation:no_comma"] == {"count": 2, "strict": 1.0, "loose": 1.0}
    assert math.isnan(score_responses([], []).accuracies()["prompt_strict"])
    with pytest.raises(ValueError, match="2 instruction prompts but 1 responses"):
        score_responses([one, one], ["x"])


def write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def row(ids: list, kwargs: list, key: str = "1") -> dict:
    return {"key": key, "prompt": "Say something.", "instruction_id_list": ids, "kwargs": kwargs}


def test_load_round_trips_and_drops_nulls(tmp_path):
    # The HF copy of IFEval gives every kwarg of every instruction, null where unused.
    path = write_rows(tmp_path / "if.jsonl", [
        row(["length_constraints:number_words", "punctuation:no_comma"],
            [{"num_words": 50, "relation": "at least", "keywords": None}, {"num_words": None}]),
    ])
    [loaded] = load_instruction_prompts(path)
    assert loaded == InstructionPrompt(
        "1", "Say something.", ("length_constraints:number_words", "punctuation:no_comma"),
        ({"num_words": 50, "relation": "at least"}, {}))
    assert loaded.to_json() == row(list(loaded.instruction_ids), list(loaded.kwargs))


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (row(["keywords:frequency"], [{}]), "instruction id 'keywords:frequency' is not supported"),
        (row(["length_constraints:number_words"], [{"num_words": 50, "relation": "at most"}]),
         "'length_constraints:number_words': kwarg 'relation' must be one of"),
        (row(["length_constraints:number_words"], [{"num_words": 50}]),
         "'length_constraints:number_words': takes kwargs ['num_words', 'relation'], got ['num_words']"),
        (row(["detectable_format:number_bullet_lists"], [{"num_bullets": True}]),
         "kwarg 'num_bullets' must be a positive integer"),
        (row(["punctuation:no_comma"], [{"keywords": ["x"]}]), "'punctuation:no_comma': takes kwargs []"),
        (row(["punctuation:no_comma", "startend:quotation"], [{}]), "a kwargs list of one dict per id"),
        ({"key": "1", "prompt": "p", "kwargs": []}, "lacks ['instruction_id_list']"),
        ('{"key": 1,', "not valid JSON"),
    ],
)
def test_bad_row_names_file_row_and_id(tmp_path, bad, message):
    path = write_rows(tmp_path / "if.jsonl", [row(["punctuation:no_comma"], [{}]), bad])
    with pytest.raises(InstructionError, match=re.escape(f"{path}, row 2: ") + ".*" + re.escape(message)):
        load_instruction_prompts(path)


def test_empty_file_is_an_error(tmp_path):
    with pytest.raises(InstructionError, match="holds no instruction prompts"):
        load_instruction_prompts(write_rows(tmp_path / "if.jsonl", []))
