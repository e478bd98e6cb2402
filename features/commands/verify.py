"""`mil verify BAGS`: check every bag of a directory and print a table; non-zero exit when any is invalid."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bags", type=Path, help="bag directory written by `mil extract`")
    parser.add_argument("--quick", action="store_true", help="skip reading the arrays (no NaN/inf check)")


def run(args: argparse.Namespace) -> int:
    from features.bags import BagDirectory, read_bag_header, validate_bag
    from mil.errors import ConfigError

    directory = BagDirectory(args.bags)
    files = directory.files()
    if not files:
        print(f"{args.bags} holds no bag (*.h5); run `mil extract --out {args.bags}` first")
        return 1
    rows, invalid = [], []
    for path in files:
        problems = validate_bag(path, full=not args.quick)
        if problems:
            invalid.append((path, problems))
            rows.append((path.stem, "-", "-", "-", "INVALID"))
            continue
        header = read_bag_header(path)
        status = f"ok ({len(header['skipped'] or [])} skipped)" if header.get("skipped") else "ok"
        rows.append(
            (header["patient_id"], str(header["num_cells"]), str(header["feature_dim"]), header["encoder"], status)
        )
    head = ("patient", "cells", "dim", "encoder", "status")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip())
    try:
        directory.check_consistent()
        mixed = None
    except ConfigError as e:
        mixed = str(e)
    print(f"\n{len(files) - len(invalid)} valid, {len(invalid)} invalid bag(s) in {args.bags}")
    stain = ((directory.manifest or {}).get("preprocess") or {}).get("stain_norm")
    if stain:
        print(f"colour normalisation: {stain['method']} to the reference with sha256 {stain['reference_sha256']}")
    for path, problems in invalid:
        print(f"{path.name}: " + "; ".join(problems))
    if invalid:
        print("Run the same `mil extract` command again: it recomputes exactly the invalid bags.")
    if mixed:
        print(mixed)
    return 1 if invalid or mixed else 0
