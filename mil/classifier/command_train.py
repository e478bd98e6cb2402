"""`mil train-classifier --cells CELLS --out DIR`: train on held-out patients, print and write the metrics."""

from __future__ import annotations

import argparse
from dataclasses import fields


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from mil.classifier.train import IMBALANCE, ClassifierConfig

    defaults = ClassifierConfig()
    parser.add_argument("--cells", required=True, help="cell table CSV with a label column")
    parser.add_argument("--out", required=True, help="output folder: classifier.pt, metrics.json, confusion PNGs")
    parser.add_argument(
        "--label-map",
        help="label map YAML: its class list fixes the classifier's classes and order (default: labels found)",
    )
    parser.add_argument(
        "--arch", default=defaults.arch, help="timm architecture (tf_efficientnet_lite0 with --init imagenet)"
    )
    parser.add_argument("--init", default=defaults.init, choices=["random", "imagenet"])
    parser.add_argument("--imbalance", default=defaults.imbalance, choices=list(IMBALANCE))
    for f in fields(ClassifierConfig):
        if f.name in ("arch", "init", "imbalance", "augment", "accelerator", "verbose", "resume"):
            continue
        parser.add_argument(
            f"--{f.name.replace('_', '-')}", type=type(getattr(defaults, f.name)), default=getattr(defaults, f.name)
        )
    parser.add_argument("--no-augment", action="store_true", help="train without flips, rotations and stain jitter")
    parser.add_argument(
        "--no-resume", action="store_true", help="train from scratch even when --out holds the same run (out/run/)"
    )
    parser.add_argument("--accelerator", default=defaults.accelerator, help="cpu, gpu or auto (Lightning)")


def run(args: argparse.Namespace) -> int:
    from mil.cell_table import read_cell_table
    from mil.classifier.train import ClassifierConfig, train_classifier
    from mil.labels import load_label_map

    flags = ("augment", "verbose", "resume")
    values = {f.name: getattr(args, f.name) for f in fields(ClassifierConfig) if f.name not in flags}
    config = ClassifierConfig(**values, augment=not args.no_augment, verbose=True, resume=not args.no_resume)
    cells = read_cell_table(args.cells)
    class_names = list(load_label_map(args.label_map).classes) if args.label_map else None
    result = train_classifier(cells, out_dir=args.out, config=config, class_names=class_names)
    for name, m in (("val", result.val_metrics), ("test", result.metrics)):
        if m:
            print(
                f"{name} ({len(result.split[name])} patients, {m['n_cells']} cells): macro-F1 {m['macro_f1']:.3f}  "
                f"macro AUROC {m['macro_auroc']:.3f}  balanced accuracy {m['balanced_accuracy']:.3f}"
            )
    print(f"checkpoint: {result.checkpoint} (encoder: classifier.file --weights {result.checkpoint})")
    return 0
