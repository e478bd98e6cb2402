"""`mil train-detector --cells CELLS --out DIR`: Faster R-CNN on the boxes of a cell table."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from mil.detector.model import DetectorConfig, list_backbones
    from mil.detector.train import DetectorTrainConfig

    d, t = DetectorConfig(), DetectorTrainConfig()
    parser.add_argument("--cells", required=True, help="cell table CSV whose boxes are the training targets")
    parser.add_argument("--out", required=True, help="output folder: detector.pt, history.json, metrics.json")
    parser.add_argument("--backbone", default=d.backbone, choices=list_backbones())
    parser.add_argument(
        "--init", default=d.init, choices=["random", "imagenet"], help="imagenet: efficientnet_lite0_fpn"
    )
    parser.add_argument(
        "--classes",
        default="cell",
        help="'cell' = class-agnostic (default); 'labels' = one class per label in the table; or NAME,NAME,...",
    )
    parser.add_argument("--pixel-scale", type=float, default=d.pixel_scale, help="resize images by this factor")
    parser.add_argument("--smallest-anchor", type=int, default=d.smallest_anchor)
    parser.add_argument("--epochs", type=int, default=t.epochs)
    parser.add_argument("--batch-size", type=int, default=t.batch_size)
    parser.add_argument("--lr", type=float, default=t.lr)
    parser.add_argument("--max-steps", type=int, default=t.max_steps)
    parser.add_argument("--seed", type=int, default=t.seed)
    parser.add_argument("--device", default=t.device)
    parser.add_argument(
        "--no-resume", action="store_true", help="train from scratch even when --out holds the same run (out/run/)"
    )
    parser.add_argument(
        "--holdout-fraction",
        type=float,
        default=0.0,
        help="hold out this fraction of patients and report AP@0.5 on their images (0 = train on all)",
    )


def run(args: argparse.Namespace) -> int:
    from sklearn.model_selection import GroupShuffleSplit

    from mil.atomic import atomic_write_text
    from mil.cell_table import read_cell_table
    from mil.detector.evaluate import evaluate_table
    from mil.detector.model import DetectorConfig
    from mil.detector.predict import CellDetector, detect_images
    from mil.detector.train import DetectorTrainConfig, train_detector
    from mil.labels import classes_of

    cells = read_cell_table(args.cells)
    if args.classes == "cell":
        classes = ("cell",)
    elif args.classes == "labels":
        classes = tuple(classes_of(cells.rows))
    else:
        classes = tuple(c.strip() for c in args.classes.split(",") if c.strip())
    config = DetectorConfig(
        backbone=args.backbone,
        init=args.init,
        classes=classes,
        pixel_scale=args.pixel_scale,
        smallest_anchor=args.smallest_anchor,
    )
    tc = DetectorTrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        max_steps=args.max_steps,
        seed=args.seed,
        device=args.device,
        verbose=True,
        resume=not args.no_resume,
    )
    patients, held_out = cells.patients(), []
    if args.holdout_fraction > 0:
        split = GroupShuffleSplit(n_splits=1, test_size=args.holdout_fraction, random_state=args.seed)
        train_idx, test_idx = next(split.split(patients, groups=patients))
        patients, held_out = [patients[i] for i in train_idx], [patients[i] for i in test_idx]
    result = train_detector(cells, out_dir=args.out, config=config, train_config=tc, patients=patients)
    losses = result.history["epoch_loss"]
    print(f"trained on {len(patients)} patients: loss {losses[0]:.3f} -> {losses[-1]:.3f}; {result.checkpoint}")
    if held_out:
        from mil.cell_table import CellTable

        truth = CellTable(rows=[r for r in cells.rows if r["patient_id"] in set(held_out)])
        images = sorted({(r["image_path"], r["patient_id"]) for r in truth.rows})
        detector = CellDetector.load(result.checkpoint, device=args.device)
        predicted = detect_images(images, detector=detector)
        metrics = evaluate_table(predicted, truth, classes)
        metrics["held_out_patients"] = held_out
        atomic_write_text(Path(args.out) / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        per_class = ", ".join(f"{k} {v:.3f}" for k, v in metrics["ap50_per_class"].items())
        print(
            f"held-out {len(held_out)} patients: AP@0.5 {metrics['map_50']:.3f} ({per_class}), mAP {metrics['map']:.3f}"
        )
    return 0
