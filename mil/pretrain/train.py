"""`pretrain`: self-supervised training of a cell encoder on the crops of a cell table, resumable after a kill.

The run folder machinery is the classifier's (mil.runs.prepare_run_dir, mil.checkpointing, and the
per-(seed, epoch) sampler and in-epoch checkpoint of mil.classifier.resume): killed at any point, the same call
resumes from `out/run/checkpoints/last.ckpt` and ends with the weights of an uninterrupted run; a finished run is
reused. The outputs: `encoder.safetensors` (an `ssl.file` encoder whose config record comes from this run),
`config.json`, `history.json` and `loss.png`.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mil.atomic import atomic_write_text
from mil.cell_table import CellTable
from mil.errors import InputError
from mil.pretrain.config import PretrainConfig
from mil.runs import CHECKPOINT_DIR, FINISHED_FILE, load_checkpoint, prepare_run_dir, run_digest, weight_settings
from mil.tracking import wandb_logger

RUN_DIR = "run"
ENCODER_FILE = "encoder.safetensors"


@dataclass
class PretrainResult:
    encoder: Path  # encoder.safetensors: `mil extract --encoder ssl.file --weights <this>`
    history: dict
    fingerprint: str
    seconds: float  # wall time of the training this call did (0 when a finished run was reused)
    state: str  # fresh | resume | finished


def data_config(arch: str) -> dict:
    """Mean, std of timm's pretrained cfg for `arch` (what a random init of it is recorded with)."""
    import timm

    from features.encoders.timm_encoders import check_arch

    check_arch(arch)
    cfg = timm.models.get_pretrained_cfg(arch)
    mean = tuple(getattr(cfg, "mean", None) or (0.485, 0.456, 0.406))
    std = tuple(getattr(cfg, "std", None) or (0.229, 0.224, 0.225))
    return {"mean": [float(v) for v in mean], "std": [float(v) for v in std]}


def crops_of(cells: CellTable, crop_size: int) -> tuple[list[str], np.ndarray]:
    """(cell ids, (N, S, S, 3) uint8 crops) of every cell of the table, labelled or not, in cell-id order."""
    from mil.classifier.data import load_crops

    rows = sorted(cells.rows, key=lambda r: str(r["cell_id"]))
    if len(rows) < 2:
        raise InputError(f"the cell table has {len(rows)} cell(s); pretraining needs at least 2 (better thousands)")
    return [str(r["cell_id"]) for r in rows], load_crops(rows, crop_size=crop_size)


def _fingerprint(config: PretrainConfig, module, cell_ids: list[str], crops: np.ndarray) -> str:
    digest = run_digest({"config": weight_settings(config)}, module)
    digest.update(json.dumps(cell_ids).encode())
    digest.update(np.ascontiguousarray(crops).tobytes())
    return digest.hexdigest()


def pretrain(cells: CellTable, *, out_dir: str | Path, config: PretrainConfig | None = None) -> PretrainResult:
    import lightning as L

    from features.encoders.ssl import save_ssl_encoder
    from mil.pretrain.module import PretrainModule

    config = config or PretrainConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    norm = data_config(config.arch)
    cell_ids, crops = crops_of(cells, config.crop_size)
    if len(crops) < config.batch_size * max(1, config.devices):
        raise InputError(
            f"{len(crops)} cells are fewer than one batch of {config.batch_size} per device; "
            f"lower --batch-size to {max(2, len(crops) // max(1, config.devices))} or give more cells"
        )
    L.seed_everything(config.seed, workers=True, verbose=False)
    module = PretrainModule(config)
    fingerprint = _fingerprint(config, module, cell_ids, crops)
    run_dir = out_dir / RUN_DIR
    state = prepare_run_dir(run_dir, fingerprint, config)
    seconds = 0.0
    if state != "finished":
        start = time.perf_counter()
        resume_from = run_dir / CHECKPOINT_DIR / "last.ckpt" if state == "resume" else None
        _fit(module, config, crops=crops, norm=norm, run_dir=run_dir, resume_from=resume_from)
        seconds = time.perf_counter() - start
    fix = f"delete {run_dir} to train afresh (or run with --no-resume)"
    last = load_checkpoint(run_dir / CHECKPOINT_DIR / "last.ckpt", what="pretraining checkpoint", fix=fix)
    module.load_state_dict(last["state_dict"])
    history = {k: list(v) for k, v in last.get("history", {}).items()}
    if state != "finished":
        finished = {"epochs": len(history.get("train_loss", [])), "seconds_last_call": round(seconds, 1)}
        atomic_write_text(run_dir / FINISHED_FILE, json.dumps(finished) + "\n")
    trained_seconds = json.loads((run_dir / FINISHED_FILE).read_text()).get("seconds_last_call")
    run_record = {
        "method": config.method,
        "run_dir": str(run_dir.resolve()),
        "fingerprint": fingerprint,
        "epochs": len(history.get("train_loss", [])),
        "steps": int(last.get("global_step", 0)),
        "cells": len(cell_ids),
        "cell_table_fingerprint": CellTable.fingerprint(cells.rows),
        "config": config.to_dict(),
    }
    encoder_path = out_dir / ENCODER_FILE
    save_ssl_encoder(
        encoder_path,
        model=module.encoder(),
        arch=config.arch,
        input_size=config.crop_size,
        mean=norm["mean"],
        std=norm["std"],
        interpolation="bilinear",  # crops are cut with bilinear resizing (mil.classifier.data.crop_box)
        pretrain=run_record,
    )
    _write_outputs(out_dir, config, history, seconds=trained_seconds, state=state)
    return PretrainResult(encoder=encoder_path, history=history, fingerprint=fingerprint, seconds=seconds, state=state)


def _fit(module, config: PretrainConfig, *, crops, norm, run_dir: Path, resume_from: Path | None) -> None:
    import lightning as L
    import torch

    from mil.checkpointing import AtomicCheckpointIO
    from mil.classifier import resume
    from mil.classifier.resume import ClassifierCheckpoint, EpochSampler
    from mil.pretrain.views import ViewDataset, view_transform
    from mil.progress import EpochLine
    from mil.quiet import quiet_lightning

    dataset = ViewDataset(crops=crops, transform=view_transform(config, **norm), seed=config.seed)
    sampler = EpochSampler(len(dataset), seed=config.seed, epoch_source=lambda: module.current_epoch)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=config.batch_size,
        sampler=sampler,
        num_workers=config.num_workers,
        drop_last=True,  # a batch of 1 has no negatives (SimCLR) and breaks BatchNorm
        persistent_workers=config.num_workers > 0,
    )
    checkpoint = ClassifierCheckpoint(
        dirpath=run_dir / CHECKPOINT_DIR,
        monitor=None,
        every_seconds=resume.LAST_EVERY_SECONDS,
        sampler=sampler,
        batch_size=config.batch_size,
    )

    def read(trainer, pl_module) -> dict:
        total, n = pl_module._sums["train"]  # callbacks run before the module closes the epoch
        return {"loss": total / n if n else float("nan")}

    callbacks = [checkpoint, EpochLine(f"pretrain {config.method}", read=read, enabled=config.verbose)]
    with quiet_lightning(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch ended.*")
        trainer = L.Trainer(
            max_epochs=config.max_epochs,
            max_steps=config.max_steps,
            accelerator=config.accelerator,
            devices=config.devices,
            logger=wandb_logger(config.wandb, run_dir, name=f"pretrain-{config.method}") or False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            callbacks=callbacks,
            default_root_dir=str(run_dir),
            plugins=[AtomicCheckpointIO()],
        )
        trainer.fit(module, loader, ckpt_path=str(resume_from) if resume_from else None, weights_only=True)


def _write_outputs(out_dir: Path, config: PretrainConfig, history: dict, *, seconds, state: str) -> None:
    atomic_write_text(out_dir / "config.json", json.dumps(config.to_dict(), indent=2) + "\n")
    # seconds: the training of the call that finished the run (a resumed run's earlier calls are not counted)
    record = {**history, "seconds_of_finishing_call": seconds, "state": state}
    atomic_write_text(out_dir / "history.json", json.dumps(record, indent=2) + "\n")
    write_loss_png(history.get("train_loss", []), out_dir / "loss.png", title=f"{config.method} on {config.arch}")


def write_loss_png(losses: list[float], path: Path, *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mil.atomic import atomic_path

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    ax.plot(range(1, len(losses) + 1), losses, marker="o", markersize=3)
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
