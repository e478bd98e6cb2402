"""`mil train-classifier --cells CELLS --out DIR`: train on held-out patients, print and write the metrics.

The defaults are the best setting measured on the PBC sample (docs/real_data.md): EfficientNet-Lite0 from its
ImageNet weights, 128 px, strong smear augmentation, label smoothing, 30 epochs with warm-up and cosine decay,
test-time flips. 15% of the patients validate; no test part unless --test-fraction asks for one.
"""

from __future__ import annotations

import argparse

# Help text of every ClassifierConfig field the command exposes (argparse shows each default beside it).
HELP = {
    "arch": "timm architecture of a 'random' or 'imagenet' init (an encoder init brings its own)",
    "init_weights": "weights file of an --init encoder that needs one (DinoBloom, ARCH.file, a `mil pretrain` run)",
    "crop_size": "side in pixels each cell box is resized to (a ViT encoder needs a multiple of its patch, e.g. 14)",
    "max_epochs": "training epochs (the schedule warms up, then decays the learning rate to 0 at the last)",
    "warmup_epochs": "epochs of linear learning-rate warm-up",
    "batch_size": "crops per optimizer step",
    "lr": "peak learning rate (AdamW)",
    "weight_decay": "AdamW weight decay",
    "label_smoothing": "cross-entropy label smoothing (0 = none)",
    "val_fraction": "share of patients held out for validation: it chooses the kept epoch and is scored",
    "test_fraction": "share of patients held out for a final test (0 = none: every other patient trains)",
    "patience": "stop after this many epochs without a better validation loss (0 = train every epoch)",
    "max_steps": "stop after this many optimizer steps (smoke runs; -1 = no limit)",
    "seed": "seed of the split, the initial head, the data order and the augmentation",
    "devices": "devices for Lightning (GPUs with --accelerator gpu)",
    "num_workers": "data-loader worker processes (0 = load in the training process)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from mil.classifier.data import AUGMENT
    from mil.classifier.model import INITS
    from mil.classifier.train import IMBALANCE, MODES, ClassifierConfig
    from mil.tracking import WANDB_MODES

    d = ClassifierConfig()
    parser.add_argument("--cells", required=True, help="cell table CSV with a label column")
    parser.add_argument("--out", required=True, help="output folder: classifier.pt, metrics.json, confusion PNGs")
    parser.add_argument(
        "--label-map",
        help="label map YAML: its class list fixes the classifier's classes and order (default: labels found)",
    )
    parser.add_argument(
        "--init",
        default=d.init,
        help=f"initial weights: {' or '.join(INITS)} (EfficientNet-Lite0's offline ImageNet weights), or any "
        "encoder name from `mil encoders` (e.g. dinobloom_s.v1 or a `mil pretrain` encoder, with --init-weights)",
    )
    parser.add_argument(
        "--mode",
        default=d.mode,
        choices=list(MODES),
        help="finetune: train every layer; linear_probe: train only a linear head on the frozen encoder",
    )
    parser.add_argument(
        "--imbalance",
        default=d.imbalance,
        choices=list(IMBALANCE),
        help="class balance: weighted_loss (inverse class frequency), sampler (class-balanced draws) or none",
    )
    parser.add_argument(
        "--augment",
        default=d.augment,
        choices=list(AUGMENT),
        help="strong: any rotation, zoom, hue/saturation/gamma/stain jitter, blur; light: flips, 90-degree "
        "rotations, mild stain jitter; none",
    )
    for name, help_text in HELP.items():
        value = getattr(d, name)
        kind = str if name == "init_weights" else type(value)
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=value, help=help_text)
    parser.add_argument(
        "--no-tta", action="store_true", help="predict each crop once instead of averaging its 8 flips/rotations"
    )
    parser.add_argument(
        "--no-resume", action="store_true", help="train from scratch even when --out holds the same run (out/run/)"
    )
    parser.add_argument("--accelerator", default=d.accelerator, help="cpu, gpu or auto (Lightning)")
    parser.add_argument(
        "--wandb", default=d.wandb, choices=list(WANDB_MODES), help="log the run to wandb (offline needs no account)"
    )


def run(args: argparse.Namespace) -> int:
    from mil.cell_table import read_cell_table
    from mil.classifier.train import ClassifierConfig, train_classifier
    from mil.labels import load_label_map

    values = {name: getattr(args, name) for name in HELP}
    config = ClassifierConfig(
        **values,
        init=args.init,
        mode=args.mode,
        imbalance=args.imbalance,
        augment=args.augment,
        tta=not args.no_tta,
        accelerator=args.accelerator,
        wandb=args.wandb,
        verbose=True,
        resume=not args.no_resume,
    )
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
