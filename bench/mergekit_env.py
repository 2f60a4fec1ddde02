"""mergekit in a throwaway virtualenv under the scratch directory; never a project dependency.

torch is installed first and pinned, from the wheel on this machine's disk: letting pip pick any
other torch for mergekit would download gigabytes of CUDA libraries. If the newest mergekit wanted
another torch, the pin makes pip fall back to an older mergekit that accepts this one.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.measure import run_child

logger = logging.getLogger(__name__)

TORCH_PIN = "torch==2.13.0"


@dataclass(frozen=True)
class MergekitEnv:
    venv: Path
    mergekit_version: str
    torch_version: str
    install_s: float | None  # wall seconds of the install; None when an earlier install was reused

    @property
    def mergekit_yaml(self) -> Path:
        return self.venv / "bin" / "mergekit-yaml"


def ensure_mergekit(venv: Path, log_dir: Path) -> MergekitEnv:
    """The mergekit venv at `venv`, installed unless a finished install is there."""
    marker = venv / "bench-install-complete"
    install_s = None
    if marker.is_file():
        logger.info("reusing mergekit venv %s", venv)
    else:
        install_s = _install(venv, log_dir)
        marker.touch()
    mergekit_version, torch_version = _versions(venv)
    if not torch_version.startswith(TORCH_PIN.split("==")[1]):
        raise RuntimeError(f"{venv} has torch {torch_version}, not {TORCH_PIN}; delete it and rerun")
    logger.info("mergekit %s with torch %s", mergekit_version, torch_version)
    return MergekitEnv(venv, mergekit_version, torch_version, install_s)


def _install(venv: Path, log_dir: Path) -> float:
    python = str(venv / "bin" / "python")
    constraints = venv / "torch-pin.txt"
    start = time.perf_counter()
    run_child([sys.executable, "-m", "venv", "--clear", str(venv)], log_dir / "mergekit-venv.log")
    constraints.write_text(TORCH_PIN + "\n")
    run_child([python, "-I", "-m", "pip", "install", TORCH_PIN], log_dir / "mergekit-pip-torch.log")
    run_child([python, "-I", "-m", "pip", "install", "mergekit", "-c", str(constraints)], log_dir / "mergekit-pip.log")
    seconds = time.perf_counter() - start
    logger.info("installed mergekit in %s in %.0f s", venv, seconds)
    return seconds


def _versions(venv: Path) -> tuple[str, str]:
    """(mergekit, torch) versions installed in `venv`, read from package metadata."""
    script = "import json, importlib.metadata as m; print(json.dumps([m.version('mergekit'), m.version('torch')]))"
    command = [str(venv / "bin" / "python"), "-I", "-c", script]  # -I: not the caller's folder or PYTHON* settings
    output = subprocess.run(command, check=True, capture_output=True, text=True)
    mergekit_version, torch_version = json.loads(output.stdout)
    return mergekit_version, torch_version
