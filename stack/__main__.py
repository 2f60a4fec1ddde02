"""Stack a model's own layers into a deeper model.

    python -m stack recipes/e6b.yaml --source google/gemma-4-E4B-it --out out/gemma-4-E6B-it-raw
    python -m stack recipes/e6b.yaml --source /models/gemma-4-E4B-it --dry-run --max_shard_size 2GB

`make raw` runs the first line; `make raw SOURCE=... OUT=...` overrides the two paths. Each field of the recipe's
`stack:` block (StackOptions) is also a --key value override.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from core.checkpoint import SourceError, open_source, open_source_headers
from core.cli import ConfigParser, exit_status, setup_logging
from core.outputs import guard_output_dir

from .architectures import UnsupportedArchitectureError
from .plan import PlanError, build_plan
from .recipe import RecipeError, StackOptions, load_recipe
from .report import format_plan
from .writer import check_output_dir, write_stack

logger = logging.getLogger("stack")

USER_ERRORS = (RecipeError, SourceError, PlanError, UnsupportedArchitectureError, FileExistsError)


def make_parser() -> ConfigParser:
    parser = ConfigParser(StackOptions, prog="python -m stack", description=__doc__,
                          config_help="stack recipe YAML (mergekit passthrough format, plus an optional `stack:` "
                          "block of StackOptions fields)")
    parser.add_argument("--source", help="source model: a local HF folder or a hub id; overrides the recipe's `model`")
    parser.add_argument("--out", type=Path, help="output folder (default: out/<recipe name>)")
    parser.add_argument("--dry-run", action="store_true",
                        help="read headers only and print the plan; write nothing. On a hub id the headers are read "
                        "through the hub API: only config.json is downloaded")
    parser.add_argument("--force", action="store_true", help="replace an --out that `python -m stack` did not write")
    return parser


def main(argv: list[str] | None = None) -> int:
    options, args = make_parser().parse(argv)
    setup_logging()
    return exit_status(lambda: stack(args, options), USER_ERRORS, logger)


def stack(args, options: StackOptions) -> None:
    """Plan the recipe on the source's headers and print it; then, unless a dry run, write the stack."""
    out = args.out or Path("out") / args.config.stem
    recipe = load_recipe(args.config, source_override=args.source, options=options)
    if not args.dry_run:
        guard_output_dir(out, "stack", args.force)  # before a hub source is downloaded
    # A dry run reads headers only: on a hub id, through the hub API, so no weights are downloaded.
    source = open_source_headers(recipe.model) if args.dry_run else open_source(recipe.model)
    if not args.dry_run:
        check_output_dir(out, source, args.force)  # fail before planning, not after
    plan = build_plan(recipe, source)
    print(format_plan(plan), flush=True)
    if not args.dry_run:
        write_stack(plan, source, out, force=args.force)

if __name__ == "__main__":
    sys.exit(main())
