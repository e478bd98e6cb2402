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
    parser.add_argument(
        "--level", type=float, help="level of the conformal prediction sets (default: the comparison's, 0.9)"
    )
    parser.add_argument(
        "--refer-below",
        type=float,
        metavar="P",
        help="mark patients whose top calibrated probability is below P as referred (column referred); "
        "summary.md adds a row without them",
    )


def run(args: argparse.Namespace) -> int:
    from mil.errors import ConfigError
    from mil.locks import command_folder
    from mil.predict.report import write_predictions
    from mil.predict.run import read_results_config, run_predict
    from mil.protocol.conformal import check_level

    level = check_level(args.level if args.level is not None else read_results_config(Path(args.results)).get(
        "conformal_level", 0.9))  # fmt: skip
    if args.refer_below is not None and not 0.0 < args.refer_below <= 1.0:
        raise ConfigError(f"--refer-below {args.refer_below} must be a probability in (0, 1], e.g. 0.6")
    heads = [h.strip() for h in args.heads.split(",") if h.strip()] if args.heads else None
    out = Path(args.out)
    patients = Path(args.patients) if args.patients else None
    result = run_predict(results=args.results, bags=args.bags, patients=args.patients, heads=heads, model=args.model)
    with command_folder(out, command="mil predict"):  # one run per output folder (RELIABILITY promise 8)
        per_head = write_predictions(
            result,
            out,
            results=Path(args.results),
            bags=Path(args.bags),
            patients=patients,
            n_boot=args.n_boot,
            level=level,
            refer_threshold=args.refer_below,
        )
    if per_head:
        print((out / "summary.md").read_text())
    print(f"predictions of {len(result.patients)} patients in {out / 'predictions.csv'}")
    return 0
