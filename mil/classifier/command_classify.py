"""`mil classify --cells CELLS --checkpoint CKPT --out CELLS2`: add pred_label and prob_<class> columns."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cells", required=True, help="cell table CSV to classify")
    parser.add_argument("--checkpoint", required=True, help="classifier checkpoint (classifier.pt of train-classifier)")
    parser.add_argument("--out", required=True, help="output cell table CSV (written atomically)")
    parser.add_argument("--batch-size", type=int, default=256)


def run(args: argparse.Namespace) -> int:
    from mil.cell_table import read_cell_table
    from mil.classifier.predict import classify_cells

    cells = read_cell_table(args.cells)
    table = classify_cells(cells, args.checkpoint, out=args.out, batch_size=args.batch_size)
    counts: dict[str, int] = {}
    for r in table.rows:
        counts[r["pred_label"]] = counts.get(r["pred_label"], 0) + 1
    top = ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])[:8])
    print(f"classified {len(table)} cells -> {args.out} (most predicted: {top})")
    return 0
