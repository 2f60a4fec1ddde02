"""Outputs appear whole or not at all, replace only what their own stage wrote, and never strand the old output.

A stage writes into a temp folder beside OUT; staged_output drops a marker (MARKER_NAME, {"stage": ...}) into it
and swaps it into place at the end. guard_output_dir, called before any model or data is loaded, refuses an OUT
that is not empty and was not written by the same stage, unless the user passed --force.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)

MARKER_NAME = ".e6b-output.json"  # {"stage": NAME, "written_by": COMMAND}; no timestamp, so outputs stay reproducible

# Every stage that writes an output folder -> the command that writes it, as named in error messages.
STAGES = {
    "stack": "python -m stack",
    "from-gguf": "python -m stack.from_gguf",
    "fisher": "python -m fisher",
    "eval": "python -m evaluation",
    "heal-merged": "heal/train.py",
    "answers": "python -m heal.answers",
    "demo-data": "python -m demo.data",
    "demo-results": "python -m demo",
    "protection-report": "python -m demo.protection_report",
    "demo": "python -m demo",  # the demo's work folder: marked when the demo starts, since it fills it stage by stage
}

AT_FDCWD = -100  # linux/fcntl.h: paths relative to the working directory
RENAME_EXCHANGE = 2  # linux/fs.h: swap the two names in one step
# renameat2 errors that mean "no exchange here" (old kernel or libc, or a filesystem without it): use two renames.
NO_EXCHANGE_ERRNOS = frozenset({errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP})
PREVIEW_ENTRIES = 3  # names of a refused folder's entries shown in the error


class OutputExistsError(FileExistsError):
    """OUT holds something its stage did not write; every CLI reports it and exits with 2."""


def guard_output_dir(out_dir: Path, stage: str, force: bool) -> None:
    """Accept a missing or empty OUT, or one the same stage wrote (a rerun replaces it); refuse anything else
    unless `force`. Cheap: call it before loading any model or data, so a wrong --out fails in seconds."""
    out_dir = Path(out_dir)
    command = STAGES[stage]
    if force or not os.path.lexists(out_dir):
        return
    entries = sorted(os.listdir(out_dir)) if out_dir.is_dir() else None
    if entries == []:
        return
    written_by = marker_stage(out_dir)
    if written_by == stage:
        return
    if written_by in STAGES:
        origin = f"was written by `{STAGES[written_by]}`, not `{command}`"
    else:
        origin = f"was not written by `{command}`"
    content = "is a file" if entries is None else "holds " + _preview(out_dir, entries)
    raise OutputExistsError(f"output {out_dir} already exists and {origin} (it {content}); "
                            f"pass --force to replace it, or choose another output folder")


def mark_output_dir(out_dir: Path, stage: str) -> None:
    """Mark a folder that its stage fills in place (the demo's work folder) rather than swaps in whole."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    _write_marker(Path(out_dir), stage)


def _write_marker(folder: Path, stage: str) -> None:
    if stage not in STAGES:
        raise ValueError(f"internal: unknown output stage {stage!r}; add it to core.outputs.STAGES")
    (folder / MARKER_NAME).write_text(json.dumps({"stage": stage, "written_by": STAGES[stage]}) + "\n")


def marker_stage(out_dir: Path) -> str | None:
    """The stage named by OUT's marker; None without a readable one."""
    try:
        return json.loads((Path(out_dir) / MARKER_NAME).read_text())["stage"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _preview(out_dir: Path, entries: list[str]) -> str:
    shown = [name + "/" if (out_dir / name).is_dir() else name for name in entries[:PREVIEW_ENTRIES]]
    more = len(entries) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more else "")


def write_file_atomic(path: Path, text: str) -> None:
    """One file, written beside under a temp name and renamed: on disk it is whole or absent."""
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


@contextmanager
def staged_output(out_dir: Path, *, stage: str) -> Iterator[Path]:
    """Yield a fresh temp folder beside `out_dir`. If the block finishes, the temp folder, marked as `stage`'s,
    replaces `out_dir` (an existing one is swapped out in one step, then deleted); if it raises, the temp folder
    is deleted and `out_dir` is untouched. At every instant `out_dir` holds the old output or the new one."""
    if stage not in STAGES:
        raise ValueError(f"internal: unknown output stage {stage!r}; add it to core.outputs.STAGES")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _recover_stranded(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    _remove(tmp)
    tmp.mkdir()
    try:
        yield tmp
        # Written last, so a copied-in marker (the stacker copies its source's extra files) is overwritten.
        _write_marker(tmp, stage)
        _swap_into_place(tmp, out_dir)
    finally:
        _remove(tmp)  # a failed attempt, or after an exchange the previous output


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    """Move `tmp` to `out_dir`. An existing `out_dir` is exchanged with `tmp` atomically where the kernel and
    filesystem allow (it then sits at `tmp`); elsewhere it is moved aside, and back if the second rename fails."""
    if not os.path.lexists(out_dir):
        os.replace(tmp, out_dir)
        return
    try:
        _exchange(tmp, out_dir)
        return
    except OSError as error:
        if error.errno not in NO_EXCHANGE_ERRNOS:
            raise
        logger.debug("no atomic exchange for %s (%s); replacing it with two renames", out_dir, error)
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        os.replace(old, out_dir)  # put the previous output back: OUT is never left missing
        raise
    _remove(old)


def _exchange(first: Path, second: Path) -> None:
    """Swap two paths in one step: renameat2(RENAME_EXCHANGE) (Linux >= 3.15, glibc >= 2.28)."""
    renameat2 = _renameat2()
    if renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not in this C library")
    if renameat2(AT_FDCWD, os.fsencode(first), AT_FDCWD, os.fsencode(second), RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(first), None, str(second))


@functools.cache
def _renameat2():
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # no C library to open, or one without renameat2 (musl < 1.2.2, macOS)
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def _recover_stranded(out_dir: Path) -> None:
    """Undo a run killed between the two renames of the fallback: OUT missing, its previous output at
    .NAME.old-PID. Restore the newest such folder to OUT; older ones (and all of them when OUT exists) are
    outputs already replaced, so they are deleted."""
    pattern = re.compile(re.escape(f".{out_dir.name}.old-") + r"\d+")
    stranded = [path for path in out_dir.parent.iterdir() if pattern.fullmatch(path.name)]
    stranded.sort(key=lambda path: path.lstat().st_ctime)  # ctime: when the rename moved it aside
    if stranded and not os.path.lexists(out_dir):
        logger.warning("%s is missing and %s holds its previous output (a run stopped while replacing it); "
                       "restoring it", out_dir, stranded[-1])
        os.replace(stranded.pop(), out_dir)
    for path in stranded:
        logger.warning("deleting %s: an output of %s already replaced, left by a run that stopped", path, out_dir)
        _remove(path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)  # a file or link swapped out of OUT: remove the link, never its target
