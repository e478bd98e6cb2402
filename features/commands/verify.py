"""`mil verify BAGS`: check every bag of a directory and print a table; non-zero exit when any is invalid.

Checked per file (RELIABILITY.md promises 1, 7, 10): it opens and its shapes agree, every dataset is stored in
the file itself, the recorded patient id is the file name, the arrays match their recorded digests, no NaN/inf
and no value beyond +-65504. Across files: no two bags hold the same features, one encoder and preprocessing,
and bags whose feature scale is far from the directory's median are reported (a warning, exit 0). Files that
are not bags at all are listed and ignored (exit 0), as training ignores them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

STATUS = {
    "damaged": "INVALID",
    "outside": "REFUSED: data outside the file",
    "renamed": "WRONG NAME",
    "old": "OLD VERSION",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bags", type=Path, help="bag directory written by `mil extract`")
    parser.add_argument("--quick", action="store_true", help="skip reading the arrays (no NaN/inf, digest or scale)")


def _print_table(rows: list[tuple[str, ...]]) -> None:
    head = ("patient", "cells", "dim", "encoder", "status")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip())


def run(args: argparse.Namespace) -> int:
    from features.bag_directory import BagDirectory
    from features.bags import inspect_bag
    from features.integrity import NOT_A_BAG, SCALE_OUTLIER_FACTOR, feature_scale, scale_outliers
    from mil.errors import ConfigError, InputError
    from mil.progress import track

    directory = BagDirectory(args.bags)
    files = directory.files()
    if not files:
        print(f"{args.bags} holds no bag (*.h5); run `mil extract --out {args.bags}` first")
        return 1
    rows: dict[str, list[str]] = {}
    invalid, strangers, scales = [], [], {}
    for path in track(files, "verify", "bags"):
        bag, problems = inspect_bag(path, full=not args.quick)
        if problems:
            if problems[0].kind == "stranger":
                strangers.append(path)
                rows[path.name] = [path.stem, "-", "-", "-", "not a bag"]
            else:
                invalid.append((path, problems))
                rows[path.name] = [path.stem, "-", "-", "-", STATUS.get(problems[0].kind, "INVALID")]
            continue
        skipped = len(bag.skipped)
        rows[path.name] = [
            bag.patient_id,
            str(bag.num_cells),
            str(bag.feature_dim),
            str(bag.attrs.get("encoder", "")),
            f"ok ({skipped} skipped)" if skipped else "ok",
        ]
        if not args.quick:
            scales[path.stem] = feature_scale(bag.features)
    duplicates = [fault for fault in directory.integrity()[0] if fault.kind == "duplicate"]
    for name in (name for fault in duplicates for name in fault.files):
        rows[name][4] = "DUPLICATE"
    _print_table([tuple(r) for r in rows.values()])
    try:
        directory.check_consistent(log=lambda m: None)
        mixed = None
    except ConfigError as e:
        mixed = str(e)
    except InputError:  # bags that are not what they say: listed per file above
        mixed = None
    print(f"\n{len(files) - len(invalid) - len(strangers)} valid, {len(invalid)} invalid bag(s) in {args.bags}")
    stain = ((directory.manifest or {}).get("preprocess") or {}).get("stain_norm")
    if stain:
        print(f"colour normalisation: {stain['method']} to the reference with sha256 {stain['reference_sha256']}")
    for path, problems in invalid:
        print(f"{path.name}: " + "; ".join(problems))
    if invalid:
        print("Run the same `mil extract` command again: it recomputes exactly the invalid bags.")
    for fault in duplicates:
        print(fault)
    for path in strangers:
        print(f"{path.name} is {NOT_A_BAG}: training ignores it; move it out of {args.bags} to silence this note.")
    outliers = scale_outliers(scales)
    if outliers:
        median = float(np.median(list(scales.values())))
        listed = ", ".join(f"{pid} ({ratio:.3g}x)" for pid, ratio in sorted(outliers.items()))
        print(
            f"warning: feature scale (root mean square) more than {SCALE_OUTLIER_FACTOR:.0f}x away from the median "
            f"bag's (~{median:.3g}): {listed}. A bag made differently (other preprocessing, another image source) "
            "dominates a fold's standardisation; check how it was made, or delete it and run `mil extract` again."
        )
    if mixed:
        print(mixed)
    return 1 if invalid or duplicates or mixed else 0
