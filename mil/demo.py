"""`mil demo`: the whole pipeline on the built-in synthetic cohort, in one command.

It runs configs/demo.yaml through `mil run`'s code (mil/pipeline/): synthesize -> read (zenodo reader) -> train
the detector and detect on held-out patients -> cross-fitted cell classifier and its per-fold bags -> extract bags
-> compare count heads (ground-truth and predicted counts) with attention heads on the same splits -> attention
report. `mil run configs/demo.yaml --out demo_out` is the same run, so the two cannot diverge.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mil.labels import CONFIG_DIR

DEFAULT_CONFIG = CONFIG_DIR / "demo.yaml"
FULL_CONFIG = CONFIG_DIR / "demo_full.yaml"
TITLE = "mil demo: diagnosis on the synthetic cohort"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder")
    parser.add_argument("--seed", type=int, help="seed of the cohort, splits and training (default from config)")
    parser.add_argument("--config", type=Path, help=f"a pipeline file instead of {DEFAULT_CONFIG.name}")
    parser.add_argument("--full", action="store_true", help=f"the larger config for a GPU ({FULL_CONFIG.name})")


def load_demo_config(path: str | Path):
    """The demo's pipeline file, checked as `mil run` checks every pipeline file."""
    from mil.pipeline.config import load_pipeline

    return load_pipeline(path)


def run(args: argparse.Namespace) -> int:
    from mil.pipeline.run import run_pipeline

    config = load_demo_config(args.config or (FULL_CONFIG if args.full else DEFAULT_CONFIG))
    run_pipeline(config, args.out, seed=args.seed, title=TITLE)
    return 0
