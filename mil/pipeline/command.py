"""`mil run PIPELINE.yaml [--out DIR]`: every stage of the file in order, each cached and resumable."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pipeline", type=Path, help="pipeline YAML (write a template with `mil init --out FILE`)")
    parser.add_argument(
        "--out",
        type=Path,
        help="output folder (default: the file's `out:`, else <file stem>_out in the current folder)",
    )
    parser.add_argument("--seed", type=int, help="seed of every stage (default: the file's `seed:`, else 0)")


def run(args: argparse.Namespace) -> int:
    from mil.pipeline.config import load_pipeline
    from mil.pipeline.run import run_pipeline

    config = load_pipeline(args.pipeline)
    out = args.out or config.out or Path(f"{args.pipeline.stem}_out")
    run_pipeline(config, out, seed=args.seed, title=f"mil run {args.pipeline}")
    return 0
