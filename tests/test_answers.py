"""heal.answers: the source's greedy answers against plain `generate` one prompt at a time, reruns and resumes
byte for byte (finished chunks not regenerated), seeded sampling from the full distribution, unfinished answers,
the output as heal data, and the CLI's errors."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from core.data import DatasetSpec, load_trl_datasets
from heal.answers import main
from stack.tiny import save_tiny_decoder

from .fisher_support import write_jsonl

CAP = 8  # tokens per answer: enough for the stopping model's stops, few enough to keep each run under a second


def prompt_rows() -> list[dict]:
    """Seven prompts in the three accepted formats, 1 to 9 words, so left padding differs within a batch."""
    return [
        {"prompt": "w1 w2 w3"},
        {"prompt": [{"role": "user", "content": "w10 w11 w12 w13 w14 w15 w16 w17 w18"}]},
        {"messages": [{"role": "user", "content": "w20"}, {"role": "assistant", "content": "w21 w22"}]},
        {"prompt": "w30 w31 w32 w33 w34"},
        {"messages": [{"role": "user", "content": "w40 w41"}, {"role": "assistant", "content": "w42"},
                      {"role": "user", "content": "w43 w44 w45"}]},
        {"prompt": "w50 w51 w52 w53 w54 w55 w56"},
        {"prompt": "w60 w61"},
    ]


def as_messages(row: dict) -> list[dict]:
    """The prompt messages of a row, trailing assistant turns dropped, written out independently of load_prompts."""
    if isinstance(row.get("prompt"), str):
        return [{"role": "user", "content": row["prompt"]}]
    messages = list(row.get("prompt") or row["messages"])
    while messages[-1]["role"] == "assistant":
        messages.pop()
    return messages


def stops_of(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id, tokenizer.get_vocab()["<end_of_turn>"]]


def generate_alone(model, tokenizer, messages, max_new_tokens):
    """One prompt, no padding, plain greedy model.generate, cut at the first stop token: (tokens, stopped)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        output = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                eos_token_id=stops_of(tokenizer), pad_token_id=tokenizer.pad_token_id)
    output = output[0, len(ids):].tolist()
    end = next((i for i, token in enumerate(output) if token in stops_of(tokenizer)), None)
    return output[:end], end is not None


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny random Llama whose EOS is the third token of prompt 0's greedy answer, so that some answers stop
    within CAP tokens and others run to it; its generation_config.json asks for top_k 1 (the tests check that
    sampling ignores it)."""
    folder = save_tiny_decoder(tmp_path_factory.mktemp("answers-source"), "llama", num_hidden_layers=2, seed=0)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokens, _ = generate_alone(model, tokenizer, as_messages(prompt_rows()[0]), CAP)
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(tokens[2])
    tokenizer.save_pretrained(folder)
    config = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**config, "top_k": 1}))
    return folder


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("answers-data") / "prompts.jsonl", prompt_rows())


def answer(source, prompts_file, out, *flags: str) -> int:
    return main(["--model", str(source), "--data", str(prompts_file), "--out", str(out),
                 "--max-new-tokens", str(CAP), "--batch-size", "3", "--device", "cpu", *flags])


def read_rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]


@pytest.fixture
def generate_calls(monkeypatch):
    """Counts the model's generate calls; set calls["fail_at"] = n to raise on the n-th (an interrupted run)."""
    calls = {"count": 0, "fail_at": None}
    original = LlamaForCausalLM.generate

    def counting(self, *args, **kwargs):
        calls["count"] += 1
        if calls["count"] == calls["fail_at"]:
            raise RuntimeError("interrupted")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LlamaForCausalLM, "generate", counting)
    return calls


def test_greedy_rows_are_the_source_answers_one_prompt_at_a_time(source, prompts_file, tmp_path):
    assert answer(source, prompts_file, tmp_path / "out", "--keep-unfinished") == 0
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(source)
    expected, stopped = [], []
    for index, row in enumerate(prompt_rows()):
        tokens, ended = generate_alone(model, tokenizer, as_messages(row), CAP)
        content = tokenizer.decode(tokens, skip_special_tokens=True)
        expected.append({"prompt": as_messages(row), "completion": [{"role": "assistant", "content": content}],
                         "prompt_index": index, "sample": 0})
        stopped.append(ended)
    assert read_rows(tmp_path / "out") == expected
    assert any(stopped) and not all(stopped)  # both kinds of answer are covered
    record = json.loads((tmp_path / "out" / "answers.json").read_text())
    assert record["counts"]["unfinished"] == stopped.count(False)
    assert record["settings"]["model"]["shard_sha256"].keys() == {"model.safetensors"}
    assert not (tmp_path / "out.partial").exists()  # the work folder goes once the output is in place


@pytest.mark.parametrize("mode", [[], ["--temperature", "1.0", "--num-samples", "2"]], ids=["greedy", "sampled"])
def test_rerun_and_resume_give_the_same_file(source, prompts_file, tmp_path, generate_calls, mode):
    """7 prompts in chunks of 3: three generate calls. An interrupted run leaves chunk 0; the resume generates
    only the other two, and its file equals an uninterrupted run's byte for byte, as does a second full run."""
    flags = ["--keep-unfinished", *mode]
    assert answer(source, prompts_file, tmp_path / "first", *flags) == 0
    assert answer(source, prompts_file, tmp_path / "second", *flags) == 0
    uninterrupted = (tmp_path / "first" / "answers.jsonl").read_bytes()
    assert (tmp_path / "second" / "answers.jsonl").read_bytes() == uninterrupted
    assert generate_calls["count"] == 6

    generate_calls.update(count=0, fail_at=2)
    with pytest.raises(RuntimeError, match="interrupted"):
        answer(source, prompts_file, tmp_path / "resumed", *flags)
    assert sorted(p.name for p in (tmp_path / "resumed.partial").glob("chunk-*")) == ["chunk-00000.jsonl"]
    generate_calls.update(count=0, fail_at=None)
    torch.manual_seed(12345)  # a resume runs in a new process, whose random state owes nothing to the first run
    assert answer(source, prompts_file, tmp_path / "resumed", *flags) == 0
    assert generate_calls["count"] == 2  # chunk 0 was read back, not regenerated
    assert (tmp_path / "resumed" / "answers.jsonl").read_bytes() == uninterrupted
    assert json.loads((tmp_path / "resumed" / "answers.json").read_text())["chunks_resumed"] == 1


def test_sampled_answers_follow_the_seed_and_the_full_distribution(source, prompts_file, tmp_path):
    sampled = ["--keep-unfinished", "--temperature", "1.0", "--num-samples", "3"]
    assert answer(source, prompts_file, tmp_path / "seed0", *sampled) == 0
    assert answer(source, prompts_file, tmp_path / "seed1", *sampled, "--seed", "1") == 0
    rows = read_rows(tmp_path / "seed0")
    assert [(row["prompt_index"], row["sample"]) for row in rows] == [(i, k) for i in range(7) for k in range(3)]
    assert rows != read_rows(tmp_path / "seed1")
    # The checkpoint's generation_config asks for top_k 1, which would make every sample the greedy answer:
    # the samples of a prompt differ only if the full distribution is sampled.
    answers = [row["completion"][0]["content"] for row in rows]
    assert all(len(set(answers[3 * i: 3 * i + 3])) > 1 for i in range(7))


def test_unfinished_answers_are_dropped_unless_kept(source, prompts_file, tmp_path):
    """At a 3-token cap only prompt 0's answer (two tokens, then the EOS) and any other that stops that early
    finish; the rest are dropped and counted, or kept with --keep-unfinished."""
    assert answer(source, prompts_file, tmp_path / "dropped", "--max-new-tokens", "3") == 0
    assert answer(source, prompts_file, tmp_path / "kept", "--max-new-tokens", "3", "--keep-unfinished") == 0
    dropped, kept = read_rows(tmp_path / "dropped"), read_rows(tmp_path / "kept")
    record = json.loads((tmp_path / "dropped" / "answers.json").read_text())["counts"]
    assert [row["prompt_index"] for row in kept] == list(range(7))
    assert dropped[0]["prompt_index"] == 0 and 0 < len(dropped) < 7
    assert dropped == [row for row in kept if row["prompt_index"] in {r["prompt_index"] for r in dropped}]
    assert record["unfinished_dropped"] == 7 - len(dropped) and record["answers_written"] == len(dropped)
    assert all(len(row["completion"][0]["content"].split()) == 3 for row in kept if row not in dropped)


def test_every_answer_unfinished_is_an_error_and_keeps_the_chunks(source, prompts_file, tmp_path, caplog,
                                                                  generate_calls):
    with caplog.at_level(logging.ERROR):
        assert answer(source, prompts_file, tmp_path / "out", "--max-new-tokens", "1") == 2
    assert "--keep-unfinished" in caplog.text and not (tmp_path / "out").exists()
    generate_calls["count"] = 0
    assert answer(source, prompts_file, tmp_path / "out", "--max-new-tokens", "1", "--keep-unfinished") == 0
    assert generate_calls["count"] == 0  # --keep-unfinished is applied when assembling: the chunks were reused


def test_output_is_heal_data(source, prompts_file, tmp_path):
    assert answer(source, prompts_file, tmp_path / "out", "--keep-unfinished") == 0
    path = tmp_path / "out" / "answers.jsonl"
    (dataset,) = load_trl_datasets((DatasetSpec(path=str(path)),), None, seed=0)
    # Prompt-completion rows: SFT's completion_only_loss then trains on the answer alone, as on the demo's data.
    assert dataset.column_names == ["prompt", "completion", "_row"]
    assert dataset["prompt"] == [as_messages(row) for row in prompt_rows()]
    assert all([message["role"] for message in completion] == ["assistant"] for completion in dataset["completion"])


def test_other_settings_are_refused_until_force(source, prompts_file, tmp_path, caplog, generate_calls):
    generate_calls["fail_at"] = 1
    with pytest.raises(RuntimeError):
        answer(source, prompts_file, tmp_path / "out")
    generate_calls["fail_at"] = None
    with caplog.at_level(logging.ERROR):
        assert answer(source, prompts_file, tmp_path / "out", "--seed", "5") == 2
    assert "seed was 0, now 5" in caplog.text and "out.partial" in caplog.text and "--force" in caplog.text
    assert answer(source, prompts_file, tmp_path / "out", "--seed", "5", "--force", "--keep-unfinished") == 0


def bad_data(tmp_path, content: str):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    return path


@pytest.mark.parametrize("case, expected", [
    ("missing model", ["nomodel", "no config.json"]),
    ("missing data", ["nodata.jsonl", "no such file"]),
    ("empty data", ["bad.jsonl", "empty"]),
    ("bad row", ["bad.jsonl row 1", "'prompt', 'messages' or 'text'"]),
    ("text row", ["bad.jsonl rows [1]", "plain {\"text\"} rows"]),
    ("greedy samples", ["--num-samples 2", "--temperature"]),
    ("negative temperature", ["--temperature must be 0", "-0.5"]),
    ("foreign out", ["notes.txt", "--force"]),
])
def test_errors_exit_2_and_name_the_problem(source, prompts_file, tmp_path, caplog, case, expected):
    model, data, out, flags = source, prompts_file, tmp_path / "out", []
    if case == "missing model":
        model = tmp_path / "nomodel"
    elif case == "missing data":
        data = tmp_path / "nodata.jsonl"
    elif case == "empty data":
        data = bad_data(tmp_path, "\n")
    elif case == "bad row":
        data = bad_data(tmp_path, '{"prompt": "w1"}\n{"question": "w2"}\n')
    elif case == "text row":  # a plain-text prompt, which the evaluation continues, has no chat answer to give
        data = bad_data(tmp_path, '{"prompt": "w1"}\n{"text": "w2 w3"}\n')
    elif case == "greedy samples":
        flags = ["--num-samples", "2"]
    elif case == "negative temperature":
        flags = ["--temperature", "-0.5"]
    else:
        out.mkdir()
        (out / "notes.txt").write_text("not an answers output")
    with caplog.at_level(logging.ERROR):
        assert answer(model, data, out, *flags) == 2
    for text in expected:
        assert text in caplog.text
    if case != "foreign out":
        assert not out.exists()

