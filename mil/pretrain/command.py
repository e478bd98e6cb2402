"""`mil pretrain`: self-supervised pretraining (DINO or SimCLR) of a cell encoder on a cell table's crops."""

from __future__ import annotations

import argparse
from pathlib import Path

from mil.tracking import WANDB_MODES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from mil.pretrain.config import METHODS, PretrainConfig

    d = PretrainConfig()
    parser.add_argument("--cells", required=True, type=Path, help="cell table CSV; its labels are never read")
    parser.add_argument("--method", default=d.method, choices=METHODS, help="self-supervised objective (lightly)")
    parser.add_argument("--arch", default=d.arch, help="any timm architecture (random init)")
    parser.add_argument("--out", required=True, type=Path, help="output folder: encoder.safetensors, loss.png, run/")
    parser.add_argument("--crop-size", type=int, default=d.crop_size, help="encoder input side in pixels")
    parser.add_argument("--max-epochs", type=int, default=d.max_epochs, help="training epochs")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="crops per step and device")
    parser.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate (cosine schedule)")
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    parser.add_argument("--temperature", type=float, default=d.temperature, help="SimCLR NT-Xent temperature")
    parser.add_argument("--local-views", type=int, default=d.local_views, help="DINO local crops per cell")
    parser.add_argument("--momentum", type=float, default=d.momentum, help="DINO teacher EMA momentum at the start")
    parser.add_argument("--min-scale", type=float, default=d.min_scale, help="smallest view, share of the crop area")
    parser.add_argument("--max-steps", type=int, default=d.max_steps, help="stop after this many steps (-1: none)")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of weights, order and views")
    parser.add_argument("--devices", type=int, default=d.devices, help="devices (processes, DDP when more than 1)")
    parser.add_argument("--accelerator", default=d.accelerator, help="cpu, gpu or auto (Lightning)")
    parser.add_argument("--num-workers", type=int, default=d.num_workers, help="data-loader workers")
    parser.add_argument(
        "--wandb", default=d.wandb, choices=list(WANDB_MODES), help="log the run to wandb (offline needs no account)"
    )
    parser.add_argument(
        "--no-resume", action="store_true", help="train from scratch even when --out holds the same run (out/run/)"
    )


def run(args: argparse.Namespace) -> int:
    from mil.cell_table import read_cell_table
    from mil.pretrain.config import PretrainConfig
    from mil.pretrain.train import pretrain
    from mil.progress import duration

    config = PretrainConfig(
        method=args.method,
        arch=args.arch,
        crop_size=args.crop_size,
        max_epochs=args.max_epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        temperature=args.temperature,
        local_views=args.local_views,
        momentum=args.momentum,
        min_scale=args.min_scale,
        max_steps=args.max_steps,
        seed=args.seed,
        devices=args.devices,
        accelerator=args.accelerator,
        num_workers=args.num_workers,
        wandb=args.wandb,
        resume=not args.no_resume,
    )
    result = pretrain(read_cell_table(args.cells), out_dir=args.out, config=config)
    losses = result.history.get("train_loss", [])
    done = "reused the finished run" if result.state == "finished" else f"trained {duration(result.seconds)}"
    last = f", last loss {losses[-1]:.4f}" if losses else ""
    print(f"{config.method} {config.arch}: {len(losses)} epoch(s), {done}{last}; loss curve {args.out / 'loss.png'}")
    print(f"encoder: ssl.file --weights {result.encoder}")
    return 0
