"""Measurements: a child process's wall time and peak RSS, the page cache, and the I/O floor.

The I/O floor is the time a plain copy takes to read every source byte and write as many bytes as
the stack writes, fsynced: no tool that reads the source and writes the output can beat it by much.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

COPY_CHUNK_BYTES = 64 << 20  # 64 MiB reads and writes for the floor copy
LOG_TAIL_BYTES = 4000  # how much of a failed child's log to show


@dataclass(frozen=True)
class ChildRun:
    wall_s: float
    peak_rss_bytes: int  # the child's own maximum resident set size


class ChildFailed(RuntimeError):
    pass


def run_child(command: list[str], log_path: Path) -> ChildRun:
    """Run `command` with stdout and stderr to `log_path`; time it and take its peak RSS from wait4,
    which reports on that one child (getrusage(RUSAGE_CHILDREN) would keep the max over all children)."""
    logger.info("running %s (log: %s)", " ".join(command), log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        redirect = [(os.POSIX_SPAWN_DUP2, log.fileno(), 1), (os.POSIX_SPAWN_DUP2, log.fileno(), 2)]
        start = time.perf_counter()
        pid = os.posix_spawnp(command[0], command, os.environ, file_actions=redirect)
        _, status, usage = os.wait4(pid, 0)
        wall_s = time.perf_counter() - start
    exit_code = os.waitstatus_to_exitcode(status)
    if exit_code != 0:
        raise ChildFailed(f"{' '.join(command)} exited with {exit_code}; end of {log_path}:\n{_tail(log_path)}")
    return ChildRun(wall_s=wall_s, peak_rss_bytes=usage.ru_maxrss * 1024)  # ru_maxrss is in KiB on Linux


def _tail(path: Path) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - LOG_TAIL_BYTES))
        return f.read().decode(errors="replace")


def drop_page_cache() -> bool:
    """Flush dirty pages and drop the page cache, so the next phase reads from disk.
    Returns False where that is not allowed (unprivileged, or a read-only /proc in a sandbox)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as error:
        logger.warning("could not drop the page cache (%s); timings run with a warm cache", error)
        return False
    return True


def flush_to_disk() -> float:
    """Seconds that os.sync() takes: the write-back a tool left in the page cache when it exited."""
    start = time.perf_counter()
    os.sync()
    return time.perf_counter() - start


def files_bytes(directory: Path, pattern: str = "*") -> int:
    """Total size of the files in `directory` matching `pattern`, in bytes."""
    return sum(p.stat().st_size for p in directory.glob(pattern) if p.is_file())


def io_floor(source_files: list[Path], scratch_file: Path, output_bytes: int) -> float:
    """Seconds to read the source files in order (again from the first if needed) while writing
    their bytes to `scratch_file` until it holds `output_bytes`, then fsync. Deletes the file after.

    Every stack benchmarked here writes more than it reads, so the copy reads every source byte."""
    buffer = bytearray(COPY_CHUNK_BYTES)
    view = memoryview(buffer)
    written = 0  # bytes
    start = time.perf_counter()
    with open(scratch_file, "wb") as out:  # buffered: large writes go straight through, retried until whole
        while written < output_bytes:
            for path in source_files:
                with open(path, "rb", buffering=0) as source:
                    while written < output_bytes and (count := source.readinto(view)):
                        count = min(count, output_bytes - written)
                        out.write(view[:count])
                        written += count
        out.flush()
        os.fsync(out.fileno())
    seconds = time.perf_counter() - start
    scratch_file.unlink()
    logger.info("I/O floor: %.2f GB written in %.2f s", written / 1e9, seconds)
    return seconds


def bench_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A benchmark's command line, its module docstring as the help text."""
    return argparse.ArgumentParser(prog=prog, description=description,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table, the first column left-aligned and the others (numbers) right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
