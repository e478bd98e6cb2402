"""`mil probe`: kNN and linear probes of the cell labels in several bag folders, side by side, and a patient-level
mean-pooling probe of the diagnosis; one table with one row per bag folder (encoder) and a UMAP picture."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from mil.probe.plot import METHODS
    from mil.probe.probe import ProbeSettings

    d = ProbeSettings()
    parser.add_argument("--bags", required=True, nargs="+", type=Path, help="bag folders, one per encoder")
    parser.add_argument("--out", required=True, type=Path, help="output folder: probe.md, probe.csv, embedding PNG")
    parser.add_argument(
        "--patients", type=Path, default=None, help="patient table CSV with `diagnosis`: adds the patient probe"
    )
    parser.add_argument(
        "--cells", type=Path, default=None, help="probe only the cells of this cell table (e.g. held-out cells)"
    )
    parser.add_argument("--folds", type=int, default=d.n_folds, help="grouped cross-validation folds")
    parser.add_argument("--k", type=int, default=d.k, help="neighbours of the kNN probe (cosine)")
    parser.add_argument("--C", type=float, default=d.C, help="inverse L2 strength of the linear probe")
    parser.add_argument("--max-iter", type=int, default=d.max_iter, help="iterations of the linear probe's solver")
    parser.add_argument("--n-boot", type=int, default=d.n_boot, help="bootstrap replicates of every CI")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of folds, bootstrap and the map")
    parser.add_argument("--max-cells", type=int, default=20000, help="probe at most this many labelled cells")
    parser.add_argument("--plot", default="umap", choices=METHODS, help="2-D map of the cell embeddings")
    parser.add_argument("--plot-cells", type=int, default=3000, help="cells per panel of the map")


def run(args: argparse.Namespace) -> int:
    from mil.probe.probe import ProbeSettings
    from mil.probe.runner import run_probe

    settings = ProbeSettings(n_folds=args.folds, k=args.k, C=args.C, max_iter=args.max_iter, n_boot=args.n_boot,
                             seed=args.seed)  # fmt: skip
    result = run_probe(
        args.bags,
        out=args.out,
        settings=settings,
        patients=args.patients,
        cells=args.cells,
        max_cells=args.max_cells,
        plot=args.plot,
        plot_cells=args.plot_cells,
    )
    print(result.markdown)
    print(
        f"wrote {args.out / 'probe.md'}, probe.csv, predictions.csv" + (f", {result.plot.name}" if result.plot else "")
    )
    return 0
