"""Verifiable instruction following: IFEval's checkers (Zhou et al. 2023, "Instruction-Following Evaluation for
Large Language Models"), for the subset of its instructions that needs no language detector and no NLTK data,
written out from IFEval's definitions rather than imported. `load_instruction_prompts` validates an IFEval JSONL
before anything is generated; `score_responses` gives IFEval's four numbers (prompt- and instruction-level,
strict and loose). The row format, the scores and the one deviation from IFEval: docs/architecture.md, section
"IFEval: `evaluation/ifeval.py`".
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from core.files import JsonlError, numbered_jsonl

# IFEval's comparison relations for length constraints: "less than" is <, "at least" is >=.
RELATIONS = ("less than", "at least")
POSTSCRIPT_MARKERS = ("P.S.", "P.P.S")  # IFEval's two markers, each with its own pattern
END_PHRASES = ("Any other questions?", "Is there anything else I can help with?")  # IFEval's _ENDING_OPTIONS


class InstructionError(ValueError):
    """An instruction prompt file, row or kwargs is malformed; the message names the file, row and id."""


# ---------------------------------------------------------------- the checks, each IFEval's check_following


def count_words(text: str) -> int:
    return len(re.findall(r"\w+", text))


def is_lowercase(response: str) -> bool:
    return response.islower()


def is_uppercase(response: str) -> bool:
    return response.isupper()


def has_no_comma(response: str) -> bool:
    return "," not in response


def has_keywords(response: str, keywords: Sequence[str]) -> bool:
    # IFEval searches each keyword as a regular expression, case-insensitively, anywhere (no word boundary).
    return all(re.search(keyword, response, flags=re.IGNORECASE) for keyword in keywords)


def has_word_count(response: str, num_words: int, relation: str) -> bool:
    words = count_words(response)
    return words < num_words if relation == "less than" else words >= num_words


def ends_with(response: str, end_phrase: str) -> bool:
    # IFEval strips whitespace, then surrounding double quotes, and compares lowercased.
    return response.strip().strip('"').lower().endswith(end_phrase.strip().lower())


def has_postscript(response: str, postscript_marker: str) -> bool:
    pattern = r"\s*p\.\s?p\.\s?s.*$" if postscript_marker == "P.P.S" else r"\s*p\.\s?s\..*$"
    return bool(re.findall(pattern, response.lower(), flags=re.MULTILINE))


def is_quoted(response: str) -> bool:
    response = response.strip()
    return len(response) > 1 and response[0] == '"' and response[-1] == '"'


def has_bullets(response: str, num_bullets: int) -> bool:
    # Markdown bullets "* item" (not "**bold**") and "- item", each at the start of a line; the count is exact.
    stars = re.findall(r"^\s*\*[^\*].*$", response, flags=re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", response, flags=re.MULTILINE)
    return len(stars) + len(dashes) == num_bullets


def has_title(response: str) -> bool:
    return any(title.lstrip("<").rstrip(">").strip() for title in re.findall(r"<<[^\n]+>>", response))


def is_json(response: str) -> bool:
    response = response.strip()
    for fence in ("```json", "```Json", "```JSON", "```"):
        response = response.removeprefix(fence)
    try:
        json.loads(response.removesuffix("```").strip())
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------- the registry


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _keyword_list(value: object) -> bool:
    if not isinstance(value, list) or not value or not all(isinstance(k, str) and k.strip() for k in value):
        return False
    try:
        for keyword in value:
            re.compile(keyword)
    except re.error:
        return False
    return True


@dataclass(frozen=True)
class Instruction:
    """One IFEval instruction: its check, the kwargs it takes (name -> validity test, with what it expects),
    and its text in IFEval's words (`describe`), so a prompt set and its scoring cannot drift apart."""

    check: Callable[..., bool]
    template: str  # str.format'ed with the kwargs
    args: tuple[tuple[str, Callable[[object], bool], str], ...] = ()

    def describe(self, **kwargs) -> str:
        shown = {key: " and ".join(f'"{k}"' for k in value) if isinstance(value, list) else value
                 for key, value in kwargs.items()}
        return self.template.format(**shown)


INSTRUCTIONS: dict[str, Instruction] = {
    "change_case:english_lowercase": Instruction(
        is_lowercase,
        "Your entire response should be in English, and in all lowercase letters. No capital letters are allowed."),
    "change_case:english_capital": Instruction(
        is_uppercase, "Your entire response should be in English, and in all capital letters."),
    "punctuation:no_comma": Instruction(has_no_comma, "In your entire response, refrain from the use of any commas."),
    "keywords:existence": Instruction(
        has_keywords, "Include keywords {keywords} in the response.",
        (("keywords", _keyword_list, "a non-empty list of keywords (strings, each a valid regular expression)"),)),
    "length_constraints:number_words": Instruction(
        has_word_count, "Answer with {relation} {num_words} words.",
        (("num_words", _positive_int, "a positive integer"),
         ("relation", lambda value: value in RELATIONS, f"one of {list(RELATIONS)}"))),
    "startend:end_checker": Instruction(
        ends_with,
        "Finish your response with this exact phrase {end_phrase}. No other words should follow this phrase.",
        (("end_phrase", lambda value: isinstance(value, str) and bool(value.strip()), "a non-empty string"),)),
    "detectable_content:postscript": Instruction(
        has_postscript,
        "At the end of your response, please explicitly add a postscript starting with {postscript_marker}",
        (("postscript_marker", lambda value: value in POSTSCRIPT_MARKERS, f"one of {list(POSTSCRIPT_MARKERS)}"),)),
    "startend:quotation": Instruction(is_quoted, "Wrap your entire response with double quotation marks."),
    "detectable_format:number_bullet_lists": Instruction(
        has_bullets,
        "Your answer must contain exactly {num_bullets} bullet points. Use the markdown bullet points such as:\n"
        "* This is point 1. \n* This is point 2",
        (("num_bullets", _positive_int, "a positive integer"),)),
    "detectable_format:title": Instruction(
        has_title, "Your answer must contain a title, wrapped in double angular brackets, such as <<poem of joy>>."),
    "detectable_format:json_format": Instruction(
        is_json, "Entire output should be wrapped in JSON format. You can use markdown ticks such as ```."),
}

# IFEval's INSTRUCTION_CONFLICTS restricted to INSTRUCTIONS, made symmetric: pairs never asked of one prompt.
CONFLICTS = frozenset({
    frozenset({"change_case:english_lowercase", "change_case:english_capital"}),
    frozenset({"startend:quotation", "detectable_format:title"}),
    *(frozenset({"detectable_format:json_format", other}) for other in INSTRUCTIONS
      if other not in {"detectable_format:json_format", "keywords:existence"}),
})


def kwargs_problem(instruction_id: str, kwargs: dict) -> str | None:
    """What is wrong with `kwargs` for this instruction, or None; nulls are absent keys, as in IFEval."""
    args = INSTRUCTIONS[instruction_id].args
    given = {key for key, value in kwargs.items() if value is not None}
    expected = {name for name, _, _ in args}
    if given != expected:
        return f"takes kwargs {sorted(expected)}, got {sorted(given)}"
    for name, valid, wanted in args:
        if not valid(kwargs[name]):
            return f"kwarg {name!r} must be {wanted}, got {kwargs[name]!r}"
    return None


def checks_passed(instruction_id: str, kwargs: dict, response: str) -> bool:
    """IFEval's strict test of one instruction: an empty response follows nothing."""
    return bool(response.strip()) and INSTRUCTIONS[instruction_id].check(response, **kwargs)


def loose_variants(response: str) -> list[str]:
    """IFEval's loose variants: the response with its first, last or both lines removed (a preamble such as
    "Sure, here it is:" or a sign-off), each with and without markdown asterisks."""
    lines = response.split("\n")
    cut = [response, "\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    return cut + [variant.replace("*", "") for variant in cut]


# ---------------------------------------------------------------- prompts


@dataclass(frozen=True)
class InstructionPrompt:
    key: str
    prompt: str
    instruction_ids: tuple[str, ...]
    kwargs: tuple[dict, ...]  # one per instruction id, nulls dropped

    def to_json(self) -> dict:
        return {"key": self.key, "prompt": self.prompt, "instruction_id_list": list(self.instruction_ids),
                "kwargs": list(self.kwargs)}


def parse_row(row: object) -> InstructionPrompt:
    """One IFEval row, validated; the InstructionError names what is wrong and the id it concerns."""
    if not isinstance(row, dict):
        raise InstructionError(f"is {type(row).__name__}, not a JSON object")
    missing = [key for key in ("key", "prompt", "instruction_id_list", "kwargs") if key not in row]
    if missing:
        raise InstructionError(f"lacks {missing} (IFEval rows hold key, prompt, instruction_id_list, kwargs)")
    ids, kwargs = row["instruction_id_list"], row["kwargs"]
    if not isinstance(row["prompt"], str) or not row["prompt"].strip():
        raise InstructionError("has an empty or non-string prompt")
    if not isinstance(ids, list) or not ids or not isinstance(kwargs, list) or len(kwargs) != len(ids):
        raise InstructionError("needs a non-empty instruction_id_list and a kwargs list of one dict per id")
    for instruction_id, arguments in zip(ids, kwargs):
        if instruction_id not in INSTRUCTIONS:
            supported = ", ".join(sorted(INSTRUCTIONS))
            raise InstructionError(f"instruction id {instruction_id!r} is not supported (supported: {supported})")
        problem = kwargs_problem(instruction_id, arguments) if isinstance(arguments, dict) else "kwargs is not a dict"
        if problem:
            raise InstructionError(f"instruction id {instruction_id!r}: {problem}")
    cleaned = tuple({key: value for key, value in arguments.items() if value is not None} for arguments in kwargs)
    return InstructionPrompt(str(row["key"]), row["prompt"], tuple(ids), cleaned)


def load_instruction_prompts(path: str | Path) -> list[InstructionPrompt]:
    """Every row of an IFEval-format JSONL, validated before any is used."""
    path = Path(path)
    try:
        rows = numbered_jsonl(path)
    except JsonlError as error:
        raise InstructionError(f"{path}, row {error.line}: {error.problem}; fix or remove the row") from None
    prompts = []
    for number, row in rows:
        try:
            prompts.append(parse_row(row))
        except InstructionError as error:
            raise InstructionError(f"{path}, row {number}: {error}; fix or remove the row") from None
    if not prompts:
        raise InstructionError(f"{path} holds no instruction prompts")
    return prompts


# ---------------------------------------------------------------- scoring


@dataclass(frozen=True)
class IFScores:
    """Per prompt, per instruction: whether each instruction was followed, strictly and loosely."""

    instruction_ids: tuple[tuple[str, ...], ...]
    strict: tuple[tuple[bool, ...], ...]
    loose: tuple[tuple[bool, ...], ...]

    @property
    def prompt_strict(self) -> list[bool]:
        return [all(marks) for marks in self.strict]

    @property
    def prompt_loose(self) -> list[bool]:
        return [all(marks) for marks in self.loose]

    @property
    def instruction_strict(self) -> list[tuple[int, int]]:
        return [(sum(marks), len(marks)) for marks in self.strict]

    @property
    def instruction_loose(self) -> list[tuple[int, int]]:
        return [(sum(marks), len(marks)) for marks in self.loose]

    def accuracies(self) -> dict[str, float]:
        """IFEval's four numbers: prompt-level = the share of prompts with every instruction followed;
        instruction-level = followed instructions / all instructions (a ratio of sums, not a mean of ratios)."""

        def ratio(pairs: list[tuple[int, int]]) -> float:
            total = sum(count for _, count in pairs)
            return sum(followed for followed, _ in pairs) / total if total else math.nan

        def mean(flags: list[bool]) -> float:
            return sum(flags) / len(flags) if flags else math.nan

        return {"prompt_strict": mean(self.prompt_strict), "prompt_loose": mean(self.prompt_loose),
                "instruction_strict": ratio(self.instruction_strict),
                "instruction_loose": ratio(self.instruction_loose)}

    def by_instruction(self) -> dict[str, dict[str, float]]:
        """Per instruction id: how often it was asked and followed (strict, loose), to see which carry signal."""
        table: dict[str, list[int]] = {}
        for ids, strict, loose in zip(self.instruction_ids, self.strict, self.loose):
            for instruction_id, passed, loosely in zip(ids, strict, loose):
                counts = table.setdefault(instruction_id, [0, 0, 0])
                counts[0], counts[1], counts[2] = counts[0] + 1, counts[1] + passed, counts[2] + loosely
        return {key: {"count": n, "strict": strict / n, "loose": loose / n}
                for key, (n, strict, loose) in sorted(table.items())}


def score_responses(prompts: Sequence[InstructionPrompt], responses: Sequence[str]) -> IFScores:
    """Check each response against its prompt's instructions; responses[i] answers prompts[i]."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} instruction prompts but {len(responses)} responses")
    strict, loose = [], []
    for prompt, response in zip(prompts, responses):
        variants = loose_variants(response)
        pairs = list(zip(prompt.instruction_ids, prompt.kwargs))
        strict.append(tuple(checks_passed(i, kw, response) for i, kw in pairs))
        loose.append(tuple(any(checks_passed(i, kw, variant) for variant in variants) for i, kw in pairs))
    return IFScores(tuple(prompt.instruction_ids for prompt in prompts), tuple(strict), tuple(loose))
