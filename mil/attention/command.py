"""`mil attention --results RESULTS --out REPORT`: galleries, overlays, cohort views and deletion curves."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", required=True, type=Path, help="a `mil compare` results folder")
    parser.add_argument("--out", required=True, type=Path, help="report folder (index.html + a page per patient)")
    parser.add_argument("--head", default="abmil", help="attention head of the comparison to show (default abmil)")
    parser.add_argument("--bags", type=Path, help="bag directory (default: the one the comparison used)")
    parser.add_argument("--cells", type=Path, help="cell table; its extra columns (e.g. auer_rod) mark cue cells")
    parser.add_argument("--top-k", type=int, default=8, help="cells per gallery row (default 8)")
    parser.add_argument("--max-patients", type=int, help="report only the first N patients")


def run(args: argparse.Namespace) -> int:
    from mil.attention.load import report_from_results
    from mil.locks import command_folder

    start = time.perf_counter()
    with command_folder(args.out, command="mil attention"):  # one run per report folder (RELIABILITY 8)
        summary = report_from_results(
            args.results,
            args.out,
            head=args.head,
            bags=args.bags,
            cells=args.cells,
            top_k=args.top_k,
            max_patients=args.max_patients,
        )
    for key in (
        "patients",
        "mean_entropy",
        "deletion_area",
        "deletion_area_ci_low",
        "deletion_area_ci_high",
        "cue_enrichment_top10",
        "cue_enrichment_ci_low",
        "cue_enrichment_ci_high",
    ):
        if key in summary:
            print(f"{key:>24}: {summary[key]:.4g}" if isinstance(summary[key], float) else f"{key:>24}: {summary[key]}")
    print(f"report: {args.out / 'index.html'} ({time.perf_counter() - start:.1f} s)")
    return 0
