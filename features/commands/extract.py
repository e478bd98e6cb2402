"""`mil extract`: one HDF5 bag per patient from a cell table and a registered encoder (resumable, shardable)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cells", required=True, type=Path, help="cell table CSV (from `mil cells` or `mil detect`)")
    parser.add_argument(
        "--encoder", required=True, help="registered encoder name, e.g. resnet18.random (`mil encoders`)"
    )
    parser.add_argument("--weights", default=None, help="local weights file for encoders that need one")
    parser.add_argument("--input-size", type=int, default=None, help="crop side in pixels (default: the encoder's)")
    parser.add_argument("--out", required=True, type=Path, help="bag directory (one encoder per directory)")
    parser.add_argument("--batch-size", type=int, default=64, help="crops per encoder forward pass")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: by device and CPUs)")
    parser.add_argument(
        "--shard",
        default="0/1",
        help="I/N: the I-th of N disjoint shares of the patients (0-based); auto: from torchrun or a SLURM array",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda (under torchrun: cuda:LOCAL_RANK) or cuda:k")
    parser.add_argument("--dtype", default="float32", choices=("float16", "float32"), help="stored feature type")
    parser.add_argument("--context", type=float, default=0.0, help="margin around each box, fraction of its size")
    parser.add_argument("--label-map", type=Path, default=None, help="label map YAML (default configs/label_map.yaml)")
    parser.add_argument(
        "--stain-norm",
        default="none",
        choices=("none", "reinhard"),
        help="colour normalisation of each field image before cropping (default none); reinhard: match the LAB "
        "mean/std of --stain-reference (recorded in every bag)",
    )
    parser.add_argument(
        "--stain-reference", type=Path, default=None, help="reference field image for --stain-norm reinhard"
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="one line per bag written; without it only recomputed bags and skipped cells get a line (progress "
        "counts the rest)",
    )
    bar = parser.add_mutually_exclusive_group()
    bar.add_argument(
        "--progress",
        dest="progress",
        action="store_true",
        default=None,
        help="show progress (the default: a bar on a terminal, a plain line every MIL_PROGRESS_SECONDS in a log)",
    )
    bar.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar or progress lines")


def run(args: argparse.Namespace) -> int:
    from features.extract import ExtractConfig, parse_shard, run_extract

    config = ExtractConfig(
        cells=args.cells,
        encoder=args.encoder,
        out=args.out,
        weights=args.weights,
        input_size=args.input_size,
        batch_size=args.batch_size,
        workers=args.workers,
        shard=parse_shard(args.shard),
        device=args.device,
        dtype=args.dtype,
        context=args.context,
        label_map=args.label_map,
        progress=args.progress,
        stain_norm=None if args.stain_norm == "none" else args.stain_norm,
        stain_reference=args.stain_reference,
        verbose=args.verbose,
    )
    report = run_extract(config)
    skipped = sum(len(v) for v in report.skipped_cells.values())
    rate = report.cells_embedded / report.seconds if report.seconds else 0.0
    print(
        f"{len(report.done)} bag(s) written, {len(report.up_to_date)} up to date, {len(report.failed)} failed; "
        f"{report.cells_embedded} cells embedded ({rate:.0f} cells/s), {skipped} cell(s) skipped"
    )
    if report.failed:
        lines = "\n".join(f"  - {pid}: {why}" for pid, why in sorted(report.failed.items()))
        print(f"{len(report.failed)} patient(s) failed; the other bags are complete:\n{lines}", file=sys.stderr)
        return 1
    return 0
