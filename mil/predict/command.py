"""`mil predict --results RESULTS --bags NEW_BAGS [--patients NEW_PATIENTS] --out OUT`."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", required=True, help="a `mil compare` output folder (its models/ are applied)")
    parser.add_argument("--bags", required=True, help="bag directory of the new patients (same encoder and settings)")
    parser.add_argument(
        "--patients",
        help="patient table of the new patients: needed for covariates; with diagnoses, metrics are reported",
    )
    parser.add_argument("--out", required=True, help="output folder: predictions.csv, attention/, summary.md")
    parser.add_argument("--heads", help="comma-separated heads to apply (default: every head of RESULTS)")
    parser.add_argument(
        "--model",
        help="apply one saved model (e.g. seed0_fold2 or seed0_external) instead of the ensemble of all of them",
    )
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap replicates for the CIs (default 1000)")


def run(args: argparse.Namespace) -> int:
    from mil.locks import output_lock
    from mil.predict.report import write_predictions
    from mil.predict.run import run_predict

    heads = [h.strip() for h in args.heads.split(",") if h.strip()] if args.heads else None
    out = Path(args.out)
    patients = Path(args.patients) if args.patients else None
    result = run_predict(results=args.results, bags=args.bags, patients=args.patients, heads=heads, model=args.model)
    with output_lock(out, command="mil predict") as lock:  # one run per output folder (RELIABILITY promise 8)
        if removed := lock.remove_orphaned_temp_files(recursive=True):
            print(f"removed {len(removed)} temporary file(s) left by an interrupted run")
        per_head = write_predictions(
            result, out, results=Path(args.results), bags=Path(args.bags), patients=patients, n_boot=args.n_boot
        )
    if per_head:
        print((out / "summary.md").read_text())
    print(f"predictions of {len(result.patients)} patients in {out / 'predictions.csv'}")
    return 0
