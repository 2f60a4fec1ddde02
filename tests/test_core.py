"""core/: the helpers every stage shares, each against an independent reference (hashlib, safetensors, literal
tensors) or the exact error it must raise."""

from __future__ import annotations

import hashlib
import json
import re
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from core.cli import package_versions
from core.data import DataError, dataset_specs
from core.files import (
    JsonlError,
    encode_safetensors_header,
    jsonl_text,
    numbered_jsonl,
    read_jsonl,
    read_safetensors_header,
    sha256_file,
)
from core.tokens import pad_batch, pad_id, stop_token_ids, vocabulary_difference

# ---- files ---------------------------------------------------------------------------------------------------


def test_sha256_file_is_hashlibs_whatever_the_chunk(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(bytes(range(256)) * 41)  # 10,496 bytes: several chunks of 1,000, the last one short
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert sha256_file(path) == sha256_file(path, chunk_bytes=1000) == expected


def test_read_jsonl_gives_the_objects_in_order_and_skips_blank_lines(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\n  \n{"b": "ü"}\n')
    assert read_jsonl(path) == [{"a": 1}, {"b": "ü"}]
    assert numbered_jsonl(path) == [(1, {"a": 1}), (4, {"b": "ü"})]


@pytest.mark.parametrize("content, line, problem", [
    ('{"a": 1}\n\n{"a": \n', 3, "not valid JSON"),
    ('{"a": 1}\n[1, 2]\n', 2, "expected a JSON object, got list"),
    ("\n\n", None, "no rows"),
])
def test_read_jsonl_errors_name_the_file_and_the_line(tmp_path, content, line, problem):
    path = tmp_path / "rows.jsonl"
    path.write_text(content)
    where = f"{path}" if line is None else f"{path} line {line}"
    with pytest.raises(JsonlError, match=re.escape(f"{where}: {problem}")) as caught:
        read_jsonl(path)
    assert caught.value.line == line and caught.value.problem.startswith(problem)


def test_read_jsonl_of_a_missing_file_names_it(tmp_path):
    with pytest.raises(JsonlError, match=re.escape(f"{tmp_path / 'absent.jsonl'}: no such file")):
        read_jsonl(tmp_path / "absent.jsonl")


def test_jsonl_text_reads_back_and_keeps_non_ascii(tmp_path):
    rows = [{"text": "naïve — ok"}, {"n": [1, 2]}]
    text = jsonl_text(rows)
    assert text.splitlines()[0] == '{"text": "naïve — ok"}' and text.endswith("\n")
    (tmp_path / "rows.jsonl").write_text(text)
    assert read_jsonl(tmp_path / "rows.jsonl") == rows


def test_an_encoded_header_with_its_data_is_a_safetensors_file_safetensors_reads(tmp_path):
    tensors = {"b": torch.arange(6, dtype=torch.float32).reshape(2, 3), "a": torch.tensor([7, 8], dtype=torch.int64)}
    layout = [("b", "F32", (2, 3)), ("a", "I64", (2,))]  # stored in this order, not by name
    path = tmp_path / "model.safetensors"
    path.write_bytes(encode_safetensors_header(layout) + b"".join(tensors[name].numpy().tobytes()
                                                                   for name, _, _ in layout))
    loaded = load_file(path)
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    header = read_safetensors_header(path)
    data_start = path.stat().st_size - 6 * 4 - 2 * 8
    assert [(info.dtype, info.shape, info.offset, info.nbytes) for info in header.values()] == [
        ("F32", (2, 3), data_start, 24), ("I64", (2,), data_start + 24, 16)]


# ---- data ----------------------------------------------------------------------------------------------------


def test_dataset_specs_name_the_entry_and_the_unknown_key():
    assert dataset_specs([{"path": "a.jsonl", "weight": 2}], "r.yaml")[0].weight == 2
    with pytest.raises(DataError, match=re.escape("r.yaml: datasets[1]: unknown key(s) ['splitt']")):
        dataset_specs([{"path": "a.jsonl"}, {"path": "b.jsonl", "splitt": "test"}], "r.yaml")
    with pytest.raises(DataError, match=re.escape("r.yaml: datasets must be a list")):
        dataset_specs({"path": "a.jsonl"}, "r.yaml")


# ---- tokens --------------------------------------------------------------------------------------------------


def test_pad_batch_right_and_left_exactly():
    sequences = [[5, 6, 7], [8]]
    ids, mask = pad_batch(sequences, pad=0, side="right")
    assert torch.equal(ids, torch.tensor([[5, 6, 7], [8, 0, 0]]))
    assert torch.equal(mask, torch.tensor([[1, 1, 1], [1, 0, 0]]))
    ids, mask = pad_batch(sequences, pad=-100, side="left")
    assert torch.equal(ids, torch.tensor([[5, 6, 7], [-100, -100, 8]]))
    assert torch.equal(mask, torch.tensor([[1, 1, 1], [0, 0, 1]]))
    assert ids.dtype == mask.dtype == torch.long


def test_pad_id_is_the_pad_token_else_eos():
    assert pad_id(SimpleNamespace(pad_token_id=3, eos_token_id=1)) == 3
    assert pad_id(SimpleNamespace(pad_token_id=0, eos_token_id=1)) == 0  # id 0 is a pad id, not "none"
    assert pad_id(SimpleNamespace(pad_token_id=None, eos_token_id=1)) == 1


class Vocab(SimpleNamespace):
    """A tokenizer as far as these rules look at one: its vocabulary and its EOS id."""

    def get_vocab(self) -> dict[str, int]:
        return dict(self.vocab)


def test_stop_tokens_are_eos_and_the_known_end_of_turn_tokens_present():
    tokenizer = Vocab(vocab={"<eos>": 1, "<end_of_turn>": 7, "<|im_end|x>": 8, "w": 9}, eos_token_id=1)
    assert stop_token_ids(tokenizer) == [1, 7]
    assert stop_token_ids(Vocab(vocab={"<|eot_id|>": 4}, eos_token_id=None)) == [4]


def test_vocabulary_difference_names_the_first_differing_id():
    words = {"<pad>": 0, "a": 1, "b": 2}
    assert vocabulary_difference(Vocab(vocab=words), Vocab(vocab=dict(words))) is None
    extra = Vocab(vocab={**words, "<extra>": 3})
    difference = vocabulary_difference(extra, Vocab(vocab=words))
    assert difference == "4 tokens against 3, first difference at id 3 ('<extra>')"
    swapped = Vocab(vocab={"<pad>": 0, "a": 2, "b": 1})
    assert "first difference at id 1 (" in vocabulary_difference(swapped, Vocab(vocab=words))


def test_the_heal_and_the_evaluation_refuse_a_differing_vocabulary_in_their_own_terms(tmp_path):
    from evaluation.config import EvalError
    from evaluation.run import check_models
    from heal.distill import TeacherError, check_same_tokenizer
    from stack.tiny import save_tiny_tokenizer

    student, teacher = Vocab(vocab={"a": 0, "b": 1}), Vocab(vocab={"a": 0, "b": 1, "<extra>": 2})
    check_same_tokenizer(student, Vocab(vocab={"a": 0, "b": 1}), "same")
    with pytest.raises(TeacherError, match=re.escape("teacher 'other' has another tokenizer than the student: "
                                                     "3 tokens against 2, first difference at id 2 ('<extra>')")):
        check_same_tokenizer(student, teacher, "other")
    folders = {name: tmp_path / name for name in ("small", "large")}
    for (name, folder), vocab_size in zip(folders.items(), (300, 301)):
        save_tiny_tokenizer(folder, vocab_size)
        (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(EvalError, match=re.escape("model 'large': its tokenizer's vocabulary differs from 'small''s: "
                                                  "301 tokens against 300, first difference at id 300 ('w294')")):
        check_models(folders, reference=None)


def test_a_package_that_is_not_installed_is_recorded_as_such():
    # The project run from a checkout (PYTHONPATH, no install) once failed a Fisher run after its work, here.
    import torch

    versions = package_versions("torch", "no-such-distribution")
    assert versions == {"torch": torch.__version__, "no-such-distribution": "not installed"}
