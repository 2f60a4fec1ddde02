"""Benchmark the stacker against the machine's I/O floor and against mergekit.

    .venv/bin/python -m bench.stack_bench [--scratch DIR] [--scale S] [--only e6b|llama|all]

Cases e6b (a random E4B-shaped checkpoint, 42 -> 66 layers; `--scale` < 1 shrinks its widths for small disks)
and llama (24 -> 36 layers, also by mergekit), each tool a child process, against a fsynced plain copy. Prints
a markdown table and writes it to SCRATCH/results.json. Disk needs, method and results: docs/benchmarks.md,
section "Stacker: `make bench-stack`".
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from bench.checkpoints import (
    SyntheticModel,
    bf16_bytes,
    completion_marker,
    ensure_checkpoint,
    gemma4_e4b,
    llama_24,
    tensor_shapes,
)
from bench.measure import drop_page_cache, files_bytes, flush_to_disk, io_floor, run_child
from bench.mergekit_env import ensure_mergekit
from core.cli import setup_logging

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
E6B_SLICES = [(0, 18), (10, 26), (18, 34), (26, 42)]  # half-open source layer ranges: 42 -> 66 layers
LLAMA_SLICES = [(0, 12), (6, 18), (12, 24)]  # 24 -> 36 layers
E4B_MODEL_ID = "google/gemma-4-E4B-it"  # recipe placeholder; --source points the stacker at the local copy

# Decoder-layer tensors of the text model (not the vision/audio towers' layers), for the byte estimate.
DECODER_LAYER = re.compile(r"^model\.(?:language_model\.)?layers\.(\d+)\.")
# Gemma-4 PLE tensors packed with one block per decoder layer.
PER_LAYER_PACKED = ("embed_tokens_per_layer.weight", "per_layer_model_projection.weight")


@dataclass
class Row:
    case: str
    tool: str
    wall_s: float
    flush_s: float  # os.sync() right after the tool exited: its writes still in the page cache
    peak_rss_mb: float  # 10^6 bytes
    written_gb: float  # all files in the output folder, 10^9 bytes
    floor_s: float = float("nan")  # I/O floor timed after the tools; set once all tools have run
    floor_before_s: float | None = None  # I/O floor timed before the tools, where the page cache could not be dropped

    @property
    def ratio(self) -> float:
        return self.wall_s / self.floor_s


@dataclass(frozen=True)
class ToolRun:
    tool: str
    command: list[str]
    out_dir: Path


def passthrough_recipe(model: str, slices: list[tuple[int, int]]) -> dict:
    """A mergekit passthrough recipe stacking `slices` (half-open layer ranges) of `model`."""
    return {
        "merge_method": "passthrough",
        "dtype": "bfloat16",
        "slices": [{"sources": [{"model": model, "layer_range": [start, stop]}]} for start, stop in slices],
    }


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def stacker_command(recipe: Path, out_dir: Path, source: Path | None = None) -> list[str]:
    command = [sys.executable, "-m", "stack", str(recipe), "--out", str(out_dir), "--force"]
    return command + ["--source", str(source)] if source else command


def estimate_output_bytes(shapes: dict[str, tuple[int, ...]], slices: list[tuple[int, int]], num_layers: int) -> int:
    """Bytes of the stacked weights: each output layer copies its source layer, the PLE tensors grow by
    one block per output layer, everything else is copied once. Leaves out the K/V that the stacker
    grafts into formerly KV-shared Gemma-4 layers (a few MB each), so it is a little low there."""
    source_layers = [layer for start, stop in slices for layer in range(start, stop)]
    total = 0
    for name, shape in shapes.items():
        match = DECODER_LAYER.match(name)
        if match:
            total += bf16_bytes(shape) * source_layers.count(int(match.group(1)))
        elif name.endswith(PER_LAYER_PACKED):
            total += bf16_bytes(shape) * len(source_layers) // num_layers
        else:
            total += bf16_bytes(shape)
    return total


def prepare_source(model: SyntheticModel, source_dir: Path, slices: list[tuple[int, int]], scratch: Path) -> int:
    """Generate the source checkpoint unless cached, after checking that it and one stacked output
    fit on the disk (fail now rather than an hour in). Returns the estimated output weight bytes."""
    shapes = tensor_shapes(model)
    output_bytes = estimate_output_bytes(shapes, slices, num_layers=model.config.get_text_config().num_hidden_layers)
    source_bytes = 0 if completion_marker(source_dir).is_file() else sum(bf16_bytes(s) for s in shapes.values())
    free = shutil.disk_usage(scratch).free
    if free < source_bytes + output_bytes:
        raise SystemExit(f"{model.name}: needs {(source_bytes + output_bytes) / 1e9:.1f} GB free in {scratch}, "
                         f"has {free / 1e9:.1f} GB; free some space, pass a smaller --scale, or skip it with --only")
    ensure_checkpoint(model, source_dir)
    return output_bytes


def bench_case(case: str, runs: list[ToolRun], source_dir: Path, estimated_bytes: int, scratch: Path) -> list[Row]:
    """Time each tool run, then the I/O floor for our stacker's output size. Outputs are deleted."""
    source_files = sorted(source_dir.glob("*.safetensors"))
    floor_file = scratch / "floor"
    floor_before_s = None
    if not drop_page_cache():
        floor_before_s = io_floor(source_files, floor_file, estimated_bytes)

    rows = []
    weights_bytes = {}  # tool -> bytes of the *.safetensors it wrote
    for run in runs:
        shutil.rmtree(run.out_dir, ignore_errors=True)
        drop_page_cache()
        child = run_child(run.command, scratch / "logs" / f"{run.out_dir.name}.log")
        flush_s = flush_to_disk()
        written_gb = files_bytes(run.out_dir) / 1e9
        rows.append(Row(case, run.tool, child.wall_s, flush_s, child.peak_rss_bytes / 1e6, written_gb))
        weights_bytes[run.tool] = files_bytes(run.out_dir, "*.safetensors")
        logger.info("%s %s: %.1f s, peak RSS %.0f MB", case, run.tool, child.wall_s, child.peak_rss_bytes / 1e6)
        shutil.rmtree(run.out_dir)

    drop_page_cache()
    floor_s = io_floor(source_files, floor_file, weights_bytes["ours"])
    for row in rows:
        row.floor_s, row.floor_before_s = floor_s, floor_before_s
    return rows


def bench_e6b(scratch: Path, scale: float) -> list[Row]:
    source_dir = scratch / "e4b"
    estimated = prepare_source(gemma4_e4b(scale), source_dir, E6B_SLICES, scratch)
    recipe = passthrough_recipe(E4B_MODEL_ID, E6B_SLICES) | {"stack": {"max_shard_size": "5GB"}}
    recipe_path = write_yaml(scratch / "e6b_bench.yaml", recipe)
    out_dir = scratch / "e6b"
    runs = [ToolRun("ours", stacker_command(recipe_path, out_dir, source=source_dir), out_dir)]
    return bench_case("E4B 42->66 (E6B)", runs, source_dir, estimated, scratch)


def bench_llama(scratch: Path) -> tuple[list[Row], dict]:
    """mergekit and our stacker on the same mergekit YAML. Also returns the mergekit install facts."""
    source_dir = scratch / "llama24"
    estimated = prepare_source(llama_24(), source_dir, LLAMA_SLICES, scratch)
    mergekit = ensure_mergekit(scratch / "mergekit-venv", scratch / "logs")
    recipe_path = write_yaml(scratch / "llama36.yaml", passthrough_recipe(str(source_dir), LLAMA_SLICES))
    runs = [
        ToolRun("mergekit", [str(mergekit.mergekit_yaml), str(recipe_path), str(scratch / "llama36-mergekit"),
                             "--lazy-unpickle", "--no-copy-tokenizer"], scratch / "llama36-mergekit"),
        ToolRun("ours", stacker_command(recipe_path, scratch / "llama36-ours"), scratch / "llama36-ours"),
    ]
    rows = bench_case("Llama 24->36", runs, source_dir, estimated, scratch)
    install = {"version": mergekit.mergekit_version, "torch": mergekit.torch_version, "install_s": mergekit.install_s}
    return rows, install


def markdown_table(rows: list[Row]) -> str:
    lines = [
        "| case | tool | wall s | + flush s | peak RSS MB | written GB | I/O floor s | wall / floor |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        floor = f"{row.floor_s:.2f}" if row.floor_before_s is None else f"{row.floor_before_s:.2f} / {row.floor_s:.2f}"
        lines.append(f"| {row.case} | {row.tool} | {row.wall_s:.2f} | {row.flush_s:.2f} | {row.peak_rss_mb:.0f} "
                     f"| {row.written_gb:.2f} | {floor} | {row.ratio:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.stack_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scratch", type=Path, default=REPO_ROOT / ".bench-scratch",
                        help="working folder: cached sources, the mergekit venv, logs, results.json")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="width scale of the E4B-shaped model; 1 = real E4B dims (default: %(default)s)")
    parser.add_argument("--only", choices=("e6b", "llama", "all"), default="all", help="which cases to run")
    args = parser.parse_args()
    setup_logging()
    if not 0 < args.scale <= 1:
        parser.error("--scale must be in (0, 1]")
    if not (REPO_ROOT / "stack" / "__main__.py").is_file():
        parser.error("the stacker (stack/__main__.py) is missing; nothing to benchmark")

    command_line = shlex.join([sys.executable, "-m", "bench.stack_bench", *sys.argv[1:]])
    scratch = args.scratch.resolve()
    scratch.mkdir(parents=True, exist_ok=True)
    os.environ["HF_HUB_OFFLINE"] = "1"  # the tools read local folders; never wait on a hub that is unreachable

    rows: list[Row] = []
    results: dict = {"command": command_line, "scale": args.scale, "cpus": os.cpu_count()}
    if args.only in ("e6b", "all"):
        rows += bench_e6b(scratch, args.scale)
    if args.only in ("llama", "all"):
        llama_rows, results["mergekit"] = bench_llama(scratch)
        rows += llama_rows
    results["page_cache_dropped"] = rows[0].floor_before_s is None
    results["rows"] = [asdict(row) | {"ratio": row.ratio} for row in rows]
    (scratch / "results.json").write_text(json.dumps(results, indent=2) + "\n")

    print(f"\n`{command_line}`\n")
    print(markdown_table(rows))
    if rows[0].floor_before_s is not None:
        print("\nThe page cache could not be dropped: I/O floor timed before / after the tools; the ratio uses after.")
    print(f"\nresults: {scratch / 'results.json'}")


if __name__ == "__main__":
    main()
