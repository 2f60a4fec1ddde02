"""Memory of the Fisher stage's K-FAC factors (`factors: true`): each decoder Linear [out, in] holds fp32 sums
A [in, in] and G [out, out], 4 · (in² + out²) bytes.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.fisher_factors_bench [--examples 8] [--length 128]

Prints
  1. that formula at full size: Gemma-4 E4B's decoder Linears (bench/checkpoints.py's dimensions), for every
     layer and for the source layers of the seed recipe's (recipes/e6b.yaml) seam slots at seam width 1 and 2,
     read from the headers-only stack of bench/headers_only_e6b.py;
  2. a measurement: `python -m fisher` on a model with E4B's structure (42 layers, 18 KV-shared, PLE, both
     attention types) and every width divided by ~10, run three times, each in its own process (peak RSS from
     wait4): factors false, factors for every layer, and factors with factor_stack (the seed recipe stacked from
     this model, seam width 2). The peak's growth over the plain run is set against the formula for that model.
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
from pathlib import Path

import yaml

from bench.measure import bench_parser, markdown_table, run_child
from core.cli import setup_logging

REPO = Path(__file__).resolve().parents[1]
SEED_RECIPE = REPO / "recipes" / "e6b.yaml"
LAYER_PREFIX = "model.language_model.layers."
SEAM_WIDTHS = (1, 2)
# E4B's text widths / ~10 (hidden 2560, ffn 10240, head_dim 256 / 512, PLE 256); depth and pattern stay real.
REDUCED_TEXT = dict(hidden_size=256, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=2,
                    head_dim=32, global_head_dim=64, hidden_size_per_layer_input=32)


def factor_bytes_per_layer(shapes: dict[str, tuple[int, ...]]) -> dict[int, int]:
    """Decoder layer -> Σ over its Linear weights [out, in] of 4 · (in² + out²) bytes (fp32 A and G)."""
    per_layer: dict[int, int] = {}
    for name, shape in shapes.items():
        if name.startswith(LAYER_PREFIX) and name.endswith(".weight") and len(shape) == 2:
            layer = int(name[len(LAYER_PREFIX):].split(".")[0])
            per_layer[layer] = per_layer.get(layer, 0) + 4 * (shape[0] ** 2 + shape[1] ** 2)
    return per_layer


def seam_layers(stack: Path, width: int) -> list[int]:
    from stack.manifest import load_manifest

    return sorted({slot.source_layer for slot in load_manifest(stack).slots_near_seams(width)})


def full_size_formula(scratch: Path) -> list[dict]:
    from bench.checkpoints import gemma4_e4b
    from bench.headers_only_e6b import build
    from stack.plan import saved_tensor_shapes

    _, shapes = saved_tensor_shapes(gemma4_e4b(scale=1.0).config.to_dict())
    per_layer = factor_bytes_per_layer(shapes)
    stack = build(scratch / "headers-only")
    rows = [{"selection": "every layer", "layers": len(per_layer), "gb": sum(per_layer.values()) / 1e9}]
    for width in SEAM_WIDTHS:
        layers = seam_layers(stack, width)
        rows.append({"selection": f"seam width {width}: source layers {layers}", "layers": len(layers),
                     "gb": sum(per_layer[layer] for layer in layers) / 1e9})
    return rows


def write_inputs(scratch: Path, examples: int, length: int) -> tuple[Path, Path, Path]:
    """The reduced-width model, the seed recipe's stack of it, and `examples` text rows of `length` words."""
    from stack.__main__ import main as stack_main
    from stack.tiny import save_tiny_gemma4

    model = save_tiny_gemma4(scratch / "model", **REDUCED_TEXT)
    stack = scratch / "stack"
    if stack_main([str(SEED_RECIPE), "--source", str(model), "--out", str(stack)]) != 0:
        raise RuntimeError(f"stacking {model} with {SEED_RECIPE} failed")
    rng = random.Random(0)
    data = scratch / "text.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(f"w{rng.randrange(500)}" for _ in range(length))}) + "\n"
                            for _ in range(examples)))
    return model, stack, data


def measure(scratch: Path, model: Path, stack: Path, data: Path, length: int) -> list[dict]:
    from core.files import read_safetensors_header

    shapes = {name: info.shape for name, info in read_safetensors_header(model / "model.safetensors").items()}
    per_layer = factor_bytes_per_layer(shapes)
    variants = [("factors: false", {}, []), ("factors: true", {"factors": True}, sorted(per_layer)),
                ("factors: true, factor_stack", {"factors": True, "factor_stack": str(stack)}, seam_layers(stack, 2))]
    rows = []
    for index, (label, options, layers) in enumerate(variants):
        recipe = scratch / f"fisher-{index}.yaml"
        recipe.write_text(yaml.safe_dump({"model": str(model), "datasets": [{"path": str(data)}], "dtype": "float32",
                                          "max_length": length + 8, "batch_size": 4,
                                          "out": str(scratch / f"out-{index}"), **options}))
        result = run_child([sys.executable, "-m", "fisher", str(recipe)], scratch / f"fisher-{index}.log")
        rows.append({"variant": label, "layers": len(layers), "formula_gb": sum(per_layer[i] for i in layers) / 1e9,
                     "peak_rss_gb": result.peak_rss_bytes / 1e9, "wall_s": result.wall_s})
    for row in rows:
        row["growth_gb"] = row["peak_rss_gb"] - rows[0]["peak_rss_gb"]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("python -m bench.fisher_factors_bench", __doc__)
    parser.add_argument("--examples", type=int, default=8, help="text rows fed to the Fisher")
    parser.add_argument("--length", type=int, default=128, help="words (tokens) per row")
    args = parser.parse_args(argv)
    setup_logging()
    with tempfile.TemporaryDirectory(prefix="fisher-factors-bench-") as scratch:
        formula = full_size_formula(Path(scratch))
        rows = measure(Path(scratch), *write_inputs(Path(scratch), args.examples, args.length), args.length)
    print(json.dumps({"full_size": formula, "reduced_width": rows}, indent=2))
    print()
    print(markdown_table(["E4B, full size", "layers", "fp32 A and G (GB)"],
                         [[row["selection"], str(row["layers"]), f"{row['gb']:.1f}"] for row in formula]))
    print()
    print(markdown_table(
        ["reduced width", "layers with factors", "formula (GB)", "peak RSS (GB)", "growth (GB)", "wall (s)"],
        [[row["variant"], str(row["layers"]), f"{row['formula_gb']:.3f}", f"{row['peak_rss_gb']:.3f}",
          f"{row['growth_gb']:.3f}", f"{row['wall_s']:.0f}"] for row in rows]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
