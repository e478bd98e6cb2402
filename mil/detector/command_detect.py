"""`mil detect --images PATHS --checkpoint CKPT --out CELLS` (or `--classical`): a predicted cell table.

With `--cells` the detections are scored against that table's boxes: AP@0.5 and mAP@[.5:.95] for every class.
The classical baseline knows one class (a nucleated cell), so it is scored against the boxes of each class in turn
(on BCCD it finds the WBCs, not the RBCs or platelets); its settings are the options under "classical".
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from mil.detector.classical import ClassicalConfig

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
    parser.add_argument("--device", default="cpu", help="torch device: cpu or cuda")
    parser.add_argument(
        "--nms-iou", type=float, help="non-maximum suppression overlap of the detector (default: its checkpoint's)"
    )
    parser.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        help="test-time augmentation: the field and its mirror images, merged by weighted box fusion (2-3x the "
        "time; default: the checkpoint's setting, on unless it was trained with tta off)",
    )
    c = ClassicalConfig()
    group = parser.add_argument_group("classical", "settings of --classical (pixels of the image as read)")
    group.add_argument("--sigma", type=float, default=c.sigma, help="Gaussian smoothing of the nucleus channel")
    group.add_argument("--min-area", type=int, default=c.min_area, help="smaller nucleus blobs are dropped (debris)")
    group.add_argument("--max-area", type=int, default=c.max_area, help="larger nucleus blobs are dropped (none)")
    group.add_argument(
        "--min-distance", type=int, default=c.min_distance, help="least distance of two nuclei the watershed splits"
    )
    group.add_argument("--expand", type=float, default=c.expand, help="cell box = nucleus box grown by this factor")
    group.add_argument(
        "--threshold-offset", type=float, default=c.threshold_offset, help="added to Otsu's threshold, in channel stds"
    )
    group.add_argument(
        "--no-split", action="store_true", help="keep touching nuclei whole (no watershed split; lobed nuclei)"
    )


def classical_config(args: argparse.Namespace):
    from mil.detector.classical import ClassicalConfig

    return ClassicalConfig(
        sigma=args.sigma,
        min_area=args.min_area,
        max_area=args.max_area,
        min_distance=args.min_distance,
        expand=args.expand,
        threshold_offset=args.threshold_offset,
        split_touching=not args.no_split,
    )


def score(table, truth, classes: tuple[str, ...], *, agnostic: bool) -> dict:
    """Per-class AP@0.5 and mAP@[.5:.95]; a class-agnostic detection table is scored against each class's boxes."""
    from mil.cell_table import CellTable
    from mil.detector.evaluate import evaluate_table

    if not agnostic:
        return evaluate_table(table, truth, classes)
    names = sorted({r["label"] for r in truth.rows if r.get("label")}) or ["cell"]
    metrics = evaluate_table(table, truth)  # every box, whatever its class
    metrics["ap50_per_class"], metrics["ap_per_class"] = {}, {}
    if names != ["cell"]:
        for name in names:
            m = evaluate_table(table, CellTable(rows=[r for r in truth.rows if r.get("label") == name]))
            metrics["ap50_per_class"][name], metrics["ap_per_class"][name] = m["map_50"], m["map"]
    metrics["scored_as"] = "class-agnostic detections against all boxes (map) and each class's boxes (per class)"
    return metrics


def run(args: argparse.Namespace) -> int:
    from mil.cell_table import read_cell_table, unsafe_patient_id_reason
    from mil.detector.command_train import per_class_line
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
            args.checkpoint,
            tile_size=args.tile_size,
            overlap=args.overlap,
            device=args.device,
            nms_iou=args.nms_iou,
            tta=args.tta,
        )
    classical = classical_config(args) if args.classical else None
    table = detect_images(
        images, detector=detector, classical=classical, min_score=args.min_score if detector else 0.0, progress=True
    )
    table.write(args.out)
    print(f"{len(table)} cells on {len(images)} images -> {args.out}")
    if truth is not None:
        from mil.atomic import atomic_write_text

        classes = detector.config.classes if detector else ("cell",)
        metrics = score(table, truth, classes, agnostic=tuple(classes) == ("cell",))
        out = Path(args.out).with_suffix(".metrics.json")
        atomic_write_text(out, json.dumps(metrics, indent=2) + "\n")
        line = f"against {args.cells}: AP@0.5 {metrics['map_50']:.3f}, mAP@[.5:.95] {metrics['map']:.3f}"
        if metrics["ap50_per_class"]:
            line += f"; per class AP@0.5 / mAP@[.5:.95]: {per_class_line(metrics)}"
        print(f"{line} ({out})")
    return 0
