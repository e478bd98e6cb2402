"""`mil classify --cells CELLS --checkpoint CKPT --out CELLS2`: add pred_label and prob_<class> columns."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cells", required=True, help="cell table CSV to classify")
    parser.add_argument("--checkpoint", required=True, help="classifier checkpoint (classifier.pt of train-classifier)")
    parser.add_argument("--out", required=True, help="output cell table CSV (written atomically)")
    parser.add_argument("--batch-size", type=int, default=256, help="crops per forward pass")
    tta = parser.add_mutually_exclusive_group()
    tta.add_argument(
        "--tta", dest="tta", action="store_true", default=None,
        help="average the 8 flips/rotations of each crop (default: as the checkpoint was trained and scored)",
    )  # fmt: skip
    tta.add_argument("--no-tta", dest="tta", action="store_false", help="predict each crop once (8x faster)")


def run(args: argparse.Namespace) -> int:
    from mil.cell_table import read_cell_table
    from mil.classifier.predict import classify_cells

    cells = read_cell_table(args.cells)
    table = classify_cells(
        cells, args.checkpoint, out=args.out, batch_size=args.batch_size, tta=args.tta, progress=True
    )
    counts: dict[str, int] = {}
    for r in table.rows:
        counts[r["pred_label"]] = counts.get(r["pred_label"], 0) + 1
    top = ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])[:8])
    print(f"classified {len(table)} cells -> {args.out} (most predicted: {top})")
    return 0
