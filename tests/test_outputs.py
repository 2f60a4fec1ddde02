"""Nothing lost: every stage refuses an output folder it did not write (unless --force), before loading
anything, and replacing an output never leaves OUT missing or the old output stranded beside it."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

import core.outputs as outputs
from core.outputs import MARKER_NAME, OutputExistsError, guard_output_dir, marker_stage, staged_output

from .conftest import SEED_RECIPE, run_stack
from .fisher_support import rows_for, write_jsonl


def user_folder(path: Path) -> Path:
    path.mkdir()
    (path / "notes.txt").write_text("the user's own file")
    return path


def assert_untouched(folder: Path) -> None:
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]
    assert (folder / "notes.txt").read_text() == "the user's own file"


def assert_refused(caplog, folder: Path, command: str) -> None:
    assert f"output {folder} already exists and was not written by `{command}` (it holds notes.txt)" in caplog.text
    assert "pass --force to replace it" in caplog.text


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name)


def previous_output(out: Path) -> Path:
    out.mkdir()
    (out / "result.txt").write_text("old")
    return out


def write_new(out: Path, stage: str = "fisher") -> None:
    with staged_output(out, stage=stage) as tmp:
        (tmp / "result.txt").write_text("new")


# ---------------------------------------------------------------------------------------------------
# The guard


def test_guard_accepts_missing_empty_and_own_folders_and_refuses_the_rest(tmp_path):
    guard_output_dir(tmp_path / "missing", "fisher", force=False)
    (tmp_path / "empty").mkdir()
    guard_output_dir(tmp_path / "empty", "fisher", force=False)
    write_new(tmp_path / "ours", stage="fisher")
    assert marker_stage(tmp_path / "ours") == "fisher"
    guard_output_dir(tmp_path / "ours", "fisher", force=False)  # a rerun replaces it

    with pytest.raises(OutputExistsError, match=r"was written by `python -m fisher`, not `python -m evaluation`"):
        guard_output_dir(tmp_path / "ours", "eval", force=False)
    folder = user_folder(tmp_path / "user")
    for name in ("a", "b", "c", "d"):
        (folder / name).mkdir()
    with pytest.raises(OutputExistsError, match=r"\(it holds a/, b/, c/ and 2 more\); pass --force"):
        guard_output_dir(folder, "stack", force=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputExistsError, match=r"\(it is a file\)"):
        guard_output_dir(tmp_path / "file", "stack", force=False)
    (folder / MARKER_NAME).write_text("not json")  # an unreadable marker proves nothing
    with pytest.raises(OutputExistsError, match="was not written by `python -m stack`"):
        guard_output_dir(folder, "stack", force=False)
    guard_output_dir(folder, "stack", force=True)


def test_the_marker_names_the_stage_that_wrote_the_folder_even_over_a_copied_one(tmp_path):
    """The stacker copies its source's extra files, a source's marker included: the last word must be the stage's."""
    out = tmp_path / "out"
    with staged_output(out, stage="stack") as tmp:
        (tmp / MARKER_NAME).write_text(json.dumps({"stage": "fisher"}))
    assert json.loads((out / MARKER_NAME).read_text()) == {"stage": "stack", "written_by": "python -m stack"}
    with pytest.raises(ValueError, match="unknown output stage 'fishr'"), staged_output(out, stage="fishr"):
        pass


# ---------------------------------------------------------------------------------------------------
# The atomic replace


def test_an_existing_output_is_exchanged_in_one_step(tmp_path, monkeypatch):
    out = previous_output(tmp_path / "out")
    exchanges, renames = [], []
    real_exchange, real_replace = getattr(outputs, "_exchange", None), os.replace

    def exchange(first, second):
        exchanges.append((Path(first).name, Path(second).name))
        real_exchange(first, second)

    def replace(source, target):
        renames.append((Path(source).name, Path(target).name))
        real_replace(source, target)

    monkeypatch.setattr(outputs, "_exchange", exchange, raising=False)
    monkeypatch.setattr(os, "replace", replace)
    write_new(out)
    assert exchanges == [(f".out.partial-{os.getpid()}", "out")] and renames == []  # OUT never missing
    assert (out / "result.txt").read_text() == "new" and leftovers(tmp_path) == []


def test_a_failed_exchange_keeps_the_old_output(tmp_path, monkeypatch):
    out = previous_output(tmp_path / "out")

    def exchange(first, second):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(outputs, "_exchange", exchange, raising=False)
    with pytest.raises(OSError, match="Input/output error"):
        write_new(out)
    assert (out / "result.txt").read_text() == "old" and leftovers(tmp_path) == []


@pytest.fixture
def no_exchange(monkeypatch):
    """A C library without renameat2 (or a filesystem refusing the flag): the two-rename fallback."""
    monkeypatch.setattr(outputs, "_renameat2", lambda: None, raising=False)


def test_without_exchange_two_renames_replace_the_output(tmp_path, no_exchange):
    out = previous_output(tmp_path / "out")
    write_new(out)
    assert (out / "result.txt").read_text() == "new" and leftovers(tmp_path) == []


def test_without_exchange_a_failed_second_rename_puts_the_old_output_back(tmp_path, monkeypatch, no_exchange):
    out = previous_output(tmp_path / "out")
    real_replace = os.replace

    def replace(source, target):
        if ".partial-" in Path(source).name:  # the new output moving into place
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="cross-device"):
        write_new(out)
    assert (out / "result.txt").read_text() == "old" and leftovers(tmp_path) == []


def test_a_run_killed_between_the_two_renames_is_recovered_by_the_next(tmp_path, caplog):
    stranded = previous_output(tmp_path / ".out.old-123")  # OUT moved aside, then the process died
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="the next run fails too"), staged_output(out, stage="fisher"):
        raise RuntimeError("the next run fails too")
    assert (out / "result.txt").read_text() == "old" and not stranded.exists()
    assert f"{out} is missing and {stranded} holds its previous output" in caplog.text

    replaced = previous_output(tmp_path / ".out.old-456")  # killed after the second rename: already replaced
    write_new(out)
    assert (out / "result.txt").read_text() == "new" and not replaced.exists() and leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------------
# Each stage's CLI: refused before anything loads (exit 2), replaced with --force, rerun over its own output


def fisher_recipe(path: Path, model: Path, data: Path) -> Path:
    path.write_text(yaml.safe_dump({"model": str(model), "datasets": [{"path": str(data)}], "max_length": 32}))
    return path


def test_fisher_cli(e4b_fisher, tmp_path, caplog):
    from fisher.__main__ import main

    data = write_jsonl(tmp_path / "text.jsonl", rows_for("text", 2))
    out = user_folder(tmp_path / "out")
    # A model that cannot load: the refusal must come first, not the model's error.
    recipe = fisher_recipe(tmp_path / "f.yaml", tmp_path / "no-model", data)
    assert main([str(recipe), "--out", str(out)]) == 2
    assert_refused(caplog, out, "python -m fisher")
    assert_untouched(out)

    caplog.clear()
    assert main([str(recipe), "--out", str(out), "--force"]) == 2  # --force gets past the guard, to the model's error
    assert "no-model" in caplog.text and "already exists" not in caplog.text
    assert_untouched(out)  # a run that fails leaves the folder as it was

    # compute_and_write's real output (conftest's e4b_fisher) is marked as the Fisher's: a rerun may replace it.
    assert marker_stage(e4b_fisher.parent) == "fisher"
    guard_output_dir(e4b_fisher.parent, "fisher", force=False)


def test_evaluate_cli(tiny_llama, tmp_path, caplog):
    from evaluation.__main__ import main

    text = write_jsonl(tmp_path / "text.jsonl", rows_for("text", 2))
    out = user_folder(tmp_path / "out")
    assert main(["--model", f"m={tmp_path / 'no-model'}", "--out", str(out)]) == 2  # a model that cannot load
    assert_refused(caplog, out, "python -m evaluation")
    assert_untouched(out)

    args = ["--model", f"m={tiny_llama}", "--text", str(text), "--max-length", "16", "--out", str(out)]
    assert main([*args, "--force"]) == 0
    assert (out / "eval.json").is_file() and not (out / "notes.txt").exists() and leftovers(tmp_path) == []
    guard_output_dir(out, "eval", force=False)  # a rerun may replace it


def test_demo_data_cli(tmp_path, caplog, monkeypatch):
    from demo import data

    out = user_folder(tmp_path / "out")

    def read_a_package():
        raise AssertionError("the packages were read before the output folder was checked")

    with monkeypatch.context() as patch:
        patch.setattr(data, "gsm8k_problems", read_a_package)
        assert data.main([str(out), "--cache-dir", str(tmp_path / "cache")]) == 2
    assert_refused(caplog, out, "python -m demo.data")
    assert_untouched(out)
    assert not (tmp_path / "cache").exists()

    assert data.main([str(out), "--force", "--max-train", "4", "--max-heldout", "4", "--max-task-rows", "4"]) == 0
    assert (out / "data.json").is_file() and not (out / "notes.txt").exists() and leftovers(tmp_path) == []
    guard_output_dir(out, "demo-data", force=False)  # a rerun may replace it


def test_stacker_refuses_before_opening_the_source(tmp_path, caplog):
    """Before a hub source would be downloaded; the rest of the refusal is tests/test_cli.py's."""
    out = user_folder(tmp_path / "out")
    assert run_stack(SEED_RECIPE, tmp_path / "no-model", out) == 2
    assert_refused(caplog, out, "python -m stack")
    assert_untouched(out)


def test_stacker_marks_its_output_truly_and_replaces_its_own_without_force(tiny_e4b, tmp_path):
    """A source carrying another stage's marker (copied along with its tokenizer files) must not make the
    stack look foreign."""
    source = tmp_path / "source"
    shutil.copytree(tiny_e4b, source)
    (source / MARKER_NAME).write_text(json.dumps({"stage": "fisher"}))
    out = tmp_path / "out"
    assert run_stack(SEED_RECIPE, source, out) == 0
    assert marker_stage(out) == "stack"
    assert run_stack(SEED_RECIPE, source, out) == 0
    assert leftovers(tmp_path) == []


def test_gguf_conversion_cli(tmp_path, caplog):
    from stack.from_gguf import main

    out = user_folder(tmp_path / "out")
    gguf = tmp_path / "model.gguf"  # never read: the refusal comes first
    gguf.write_bytes(b"")
    assert main([str(gguf), str(out)]) == 2
    assert_refused(caplog, out, "python -m stack.from_gguf")
    assert_untouched(out)


def test_demo_refuses_a_work_folder_it_did_not_write(tmp_path, caplog):
    from demo.run import main as demo_main

    workdir = tmp_path / "out"
    (workdir / "raw").mkdir(parents=True)
    (workdir / "raw" / "stack.json").write_text("{}")
    assert demo_main(["--workdir", str(workdir)]) == 2  # refused before any stage: nothing filled or deleted
    assert "was not written by `python -m demo`" in caplog.text and str(workdir) in caplog.text
    assert (workdir / "raw" / "stack.json").read_text() == "{}"
    assert not (workdir / MARKER_NAME).exists()
