"""`mil train-detector --cells CELLS --out DIR`: Faster R-CNN on the boxes of a cell table.

Defaults: EfficientNet-Lite0 FPN from its ImageNet weights, the image scale and the anchor sizes derived from the
training boxes (the smallest class reaches about 16 px), flips, rotations by 90 degrees and colour jitter, 12
epochs with warm-up and cosine decay. docs/real_data.md gives the BCCD figures and the CPU time.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from mil.detector.model import DetectorConfig, list_backbones
    from mil.detector.train import DetectorTrainConfig
    from mil.tracking import WANDB_MODES

    d, t = DetectorConfig(), DetectorTrainConfig()
    parser.add_argument("--cells", required=True, help="cell table CSV whose boxes are the training targets")
    parser.add_argument("--out", required=True, help="output folder: detector.pt, history.json, metrics.json")
    parser.add_argument("--backbone", default=d.backbone, choices=list_backbones(), help="timm backbone with an FPN")
    parser.add_argument(
        "--init",
        default=d.init,
        choices=["auto", "random", "imagenet"],
        help="backbone weights; auto = imagenet where the backbone has them (efficientnet_lite0_fpn)",
    )
    parser.add_argument(
        "--classes",
        default="cell",
        help="'cell' = class-agnostic; 'labels' = one class per label in the table; or NAME,NAME,...",
    )
    parser.add_argument(
        "--pixel-scale",
        type=float,
        default=d.pixel_scale,
        help="resize images by this factor (0 = derived from the training boxes: the smallest class reaches 16 px)",
    )
    parser.add_argument(
        "--smallest-anchor",
        type=int,
        default=d.smallest_anchor,
        help="anchor side of the finest FPN level in network pixels, doubling per level (0 = from the boxes)",
    )
    parser.add_argument("--epochs", type=int, default=t.epochs, help="passes over the training images")
    parser.add_argument("--batch-size", type=int, default=t.batch_size, help="images per optimizer step")
    parser.add_argument("--lr", type=float, default=t.lr, help="peak learning rate (AdamW, warm-up then cosine)")
    parser.add_argument("--warmup-steps", type=int, default=t.warmup_steps, help="steps of linear warm-up")
    parser.add_argument("--max-steps", type=int, default=t.max_steps, help="stop after this many steps (-1 = none)")
    parser.add_argument("--seed", type=int, default=t.seed, help="seed of the data order, augmentation and split")
    parser.add_argument("--device", default=t.device, help="torch device: cpu or cuda")
    parser.add_argument(
        "--no-augment", action="store_true", help="train without flips, rotations by 90 degrees and colour jitter"
    )
    parser.add_argument(
        "--no-resume", action="store_true", help="train from scratch even when --out holds the same run (out/run/)"
    )
    parser.add_argument(
        "--holdout-fraction",
        type=float,
        default=0.0,
        help="hold out this fraction of patients: AP@0.5 on their images after every epoch and at the end "
        "(0 = train on all)",
    )
    parser.add_argument(
        "--wandb", default="disabled", choices=list(WANDB_MODES), help="log losses and AP to wandb (offline: local)"
    )


def parse_classes(text: str, rows: list[dict]) -> tuple[str, ...]:
    from mil.labels import classes_of

    if text == "cell":
        return ("cell",)
    if text == "labels":
        return tuple(classes_of(rows))
    return tuple(c.strip() for c in text.split(",") if c.strip())


def per_class_line(metrics: dict) -> str:
    """'WBC AP@0.5 0.97 / mAP 0.71, ...' for every class scored."""
    return ", ".join(
        f"{name} {ap50:.3f} / {metrics['ap_per_class'].get(name, float('nan')):.3f}"
        for name, ap50 in metrics["ap50_per_class"].items()
    )


def run(args: argparse.Namespace) -> int:
    from sklearn.model_selection import GroupShuffleSplit

    from mil.atomic import atomic_write_text
    from mil.cell_table import CellTable, read_cell_table
    from mil.detector.evaluate import evaluate_table
    from mil.detector.model import DetectorConfig
    from mil.detector.predict import CellDetector, detect_images
    from mil.detector.train import DetectorTrainConfig, train_detector

    cells = read_cell_table(args.cells)
    classes = parse_classes(args.classes, cells.rows)
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
        warmup_steps=args.warmup_steps,
        augment=not args.no_augment,
        max_steps=args.max_steps,
        seed=args.seed,
        device=args.device,
        verbose=True,
        resume=not args.no_resume,
        wandb=args.wandb,
    )
    patients, held_out = cells.patients(), []
    if args.holdout_fraction > 0:
        split = GroupShuffleSplit(n_splits=1, test_size=args.holdout_fraction, random_state=args.seed)
        train_idx, test_idx = next(split.split(patients, groups=patients))
        patients, held_out = [patients[i] for i in train_idx], [patients[i] for i in test_idx]
    truth = CellTable(rows=[r for r in cells.rows if r["patient_id"] in set(held_out)]) if held_out else None
    result = train_detector(cells, out_dir=args.out, config=config, train_config=tc, patients=patients, val_cells=truth)
    losses = result.history["epoch_loss"]
    print(f"trained on {len(patients)} patients: loss {losses[0]:.3f} -> {losses[-1]:.3f}; {result.checkpoint}")
    if truth is not None:
        images = sorted({(r["image_path"], r["patient_id"]) for r in truth.rows})
        detector = CellDetector.load(result.checkpoint, device=args.device)
        predicted = detect_images(images, detector=detector, progress=True)
        metrics = evaluate_table(predicted, truth, classes)
        metrics["held_out_patients"] = held_out
        atomic_write_text(Path(args.out) / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        print(
            f"held-out {len(held_out)} patients: AP@0.5 {metrics['map_50']:.3f}, mAP@[.5:.95] {metrics['map']:.3f}; "
            f"per class AP@0.5 / mAP@[.5:.95]: {per_class_line(metrics)}"
        )
    return 0
