"""`mil detect --images PATHS --checkpoint CKPT --out CELLS` (or `--classical`): a predicted cell table."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", nargs="+", help="image files and/or folders of images")
    src.add_argument("--cells", help="detect on the images of this cell table (keeps its patient ids; scores AP)")
    how = parser.add_mutually_exclusive_group(required=True)
    how.add_argument("--checkpoint", help="detector.pt of `mil train-detector`")
    how.add_argument("--classical", action="store_true", help="zero-training nucleus threshold + watershed")
    parser.add_argument("--out", required=True, help="output cell table CSV")
    parser.add_argument("--patient-id", help="patient of every --images image (default: see --patient-from)")
    parser.add_argument(
        "--patient-from", choices=["stem", "parent"], default="stem", help="patient id from the file name or its folder"
    )
    parser.add_argument("--tile-size", type=int, default=512, help="tile side in network pixels")
    parser.add_argument("--overlap", type=int, default=128, help="tile overlap; keep it above the largest cell")
    parser.add_argument("--min-score", type=float, default=0.3, help="drop detections below this score")
    parser.add_argument("--device", default="cpu")


def run(args: argparse.Namespace) -> int:
    from mil.cell_table import read_cell_table, unsafe_patient_id_reason
    from mil.detector.evaluate import evaluate_table
    from mil.detector.predict import CellDetector, detect_images, find_images
    from mil.errors import InputError

    truth = None
    if args.cells:
        truth = read_cell_table(args.cells)
        images = sorted({(r["image_path"], r["patient_id"]) for r in truth.rows})
    else:
        paths = find_images(args.images)
        images = [(p, args.patient_id or (p.stem if args.patient_from == "stem" else p.parent.name)) for p in paths]
    bad = sorted({pid for _, pid in images if unsafe_patient_id_reason(pid)})
    if bad:
        raise InputError(f"patient id(s) {bad} cannot name bag files; pass --patient-id or rename the images")
    detector = None
    if args.checkpoint:
        detector = CellDetector.load(
            args.checkpoint, tile_size=args.tile_size, overlap=args.overlap, device=args.device
        )
    table = detect_images(images, detector=detector, min_score=args.min_score if detector else 0.0)
    table.write(args.out)
    print(f"{len(table)} cells on {len(images)} images -> {args.out}")
    if truth is not None:
        from mil.atomic import atomic_write_text

        classes = detector.config.classes if detector else ("cell",)
        metrics = evaluate_table(table, truth, classes)
        out = Path(args.out).with_suffix(".metrics.json")
        atomic_write_text(out, json.dumps(metrics, indent=2) + "\n")
        print(f"against {args.cells}: AP@0.5 {metrics['map_50']:.3f}, mAP {metrics['map']:.3f} ({out})")
    return 0
