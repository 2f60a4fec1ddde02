"""Stack a model's own layers into a deeper model.

    python -m stack recipes/e6b.yaml --source google/gemma-4-E4B-it --out out/gemma-4-E6B-it-raw
    python -m stack recipes/e6b.yaml --source /models/gemma-4-E4B-it --dry-run

`make raw` runs the first line; `make raw SOURCE=... OUT=...` overrides the two paths.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .architectures import UnsupportedArchitectureError
from .atomic import guard_output_dir
from .plan import PlanError, build_plan
from .recipe import RecipeError, load_recipe
from .report import format_plan
from .source import SourceError, open_source, open_source_headers
from .writer import check_output_dir, write_stack

logger = logging.getLogger("stack")

USER_ERRORS = (RecipeError, SourceError, PlanError, UnsupportedArchitectureError, FileExistsError)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stack", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe",
                        help="stack recipe YAML (mergekit passthrough format, plus an optional `stack:` block)")
    parser.add_argument("--source", help="source model: a local HF folder or a hub id; overrides the recipe's `model`")
    parser.add_argument("--out", type=Path, help="output folder (default: out/<recipe name>)")
    parser.add_argument("--dry-run", action="store_true",
                        help="read headers only and print the plan; write nothing. On a hub id the headers are read "
                        "through the hub API: only config.json is downloaded")
    parser.add_argument("--force", action="store_true", help="replace an --out that `python -m stack` did not write")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = args.out or Path("out") / Path(args.recipe).stem
    try:
        recipe = load_recipe(args.recipe, source_override=args.source)
        if not args.dry_run:
            guard_output_dir(out, "stack", args.force)  # before a hub source is downloaded
        # A dry run reads headers only: on a hub id, through the hub API, so no weights are downloaded.
        source = open_source_headers(recipe.model) if args.dry_run else open_source(recipe.model)
        if not args.dry_run:
            check_output_dir(out, source, args.force)  # fail before planning, not after
        plan = build_plan(recipe, source)
        print(format_plan(plan), flush=True)
        if args.dry_run:
            return 0
        write_stack(plan, source, out, force=args.force)
    except USER_ERRORS as error:
        logger.error("%s", error)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
