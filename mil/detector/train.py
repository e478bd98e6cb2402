"""Train the Faster R-CNN cell detector on the boxes of a cell table (any reader's, or the synthetic cohort's).

A run keeps ``out_dir/run/`` like the classifier and the heads: ``run.json`` (fingerprint of configs, images,
boxes and initial weights), ``checkpoints/last.ckpt`` (model, optimizer, schedule, epoch, history; written
atomically every ``LAST_EVERY_SECONDS``, inside an epoch too, and at the end) and ``finished.json``. Killed, the
same call resumes where ``last.ckpt`` left off, at the next batch of its epoch, and ends with the weights of an
uninterrupted run: the image order and the global RNG (the RPN's anchor sampling) are seeded per (seed, epoch),
never carried over from earlier epochs, and a checkpoint inside an epoch keeps the RNG state of its next batch.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from mil.atomic import atomic_write_text
from mil.cell_table import CellTable
from mil.detector.anchors import box_stats, derive_pixel_scale, derive_smallest_anchor
from mil.detector.data import DetectionDataset, collate, samples_from_cells
from mil.detector.model import DetectorConfig, build_detector, save_detector
from mil.errors import ConfigError, InputError
from mil.progress import EpochLine, say
from mil.runs import (
    CHECKPOINT_DIR,
    FINISHED_FILE,
    epoch_seed,
    global_rng_state,
    load_checkpoint,
    prepare_run_dir,
    restore_global_rng_state,
    run_digest,
    weight_settings,
    write_checkpoint,
)
from mil.tracking import WandbRun

RUN_DIR = "run"
# A killed run loses at most this much training (plus the epoch in progress); tests set it to 0 (every epoch).
LAST_EVERY_SECONDS = 60.0


@dataclass
class DetectorTrainConfig:
    epochs: int = 12
    batch_size: int = 4
    lr: float = 5e-4  # AdamW; cosine decay after a linear warm-up
    weight_decay: float = 1e-4
    warmup_steps: int = 30
    augment: bool = True  # flips, rotations by 90 degrees, stain/brightness/contrast jitter (data.SmearAugment)
    max_steps: int = -1  # stop after this many optimizer steps (tests, smoke runs); -1 = no limit
    seed: int = 0
    device: str = "cpu"
    verbose: bool = True  # one line per epoch (loss, validation AP, seconds, ETA) and a heartbeat on stderr
    resume: bool = True  # reuse a finished run / continue from out_dir/run/checkpoints/last.ckpt of the same run
    wandb: str = "disabled"  # 'offline' | 'online' | 'disabled' (mil.tracking)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("epochs and batch_size must be at least 1")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class DetectorResult:
    checkpoint: Path
    config: DetectorConfig
    history: dict = field(default_factory=dict)  # step_loss (every step), epoch_loss (mean per epoch)


def train_detector(
    cells: CellTable,
    *,
    out_dir: str | Path,
    config: DetectorConfig | None = None,
    train_config: DetectorTrainConfig | None = None,
    patients: list[str] | None = None,
    val_cells: CellTable | None = None,
) -> DetectorResult:
    """Fit on every image of `patients` (default: all) and write detector.pt + history.json to `out_dir`.

    A pixel_scale or smallest_anchor of 0 is derived from the training boxes (mil.detector.anchors). With
    `val_cells`, AP@0.5 on their images is measured after every epoch (history `val_map_50`, the epoch line).
    """
    config = config or DetectorConfig()
    tc = train_config or DetectorTrainConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    samples = samples_from_cells(cells, config.classes, patients)
    if not samples:
        raise InputError("no images to train the detector on; the cell table (or the chosen patients) is empty")
    config = resolve_from_boxes(config, samples, verbose=tc.verbose)
    torch.manual_seed(tc.seed)
    np.random.seed(tc.seed)
    model = build_detector(config).to(tc.device)
    model.train()
    dataset = DetectionDataset(samples=samples, pixel_scale=config.pixel_scale, augment=tc.augment, seed=tc.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    batches = math.ceil(len(dataset) / tc.batch_size)
    total = tc.epochs * batches if tc.max_steps < 0 else min(tc.max_steps, tc.epochs * batches)

    def lr_factor(step: int) -> float:
        if step < tc.warmup_steps:
            return (step + 1) / tc.warmup_steps
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - tc.warmup_steps) / max(1, total - tc.warmup_steps))))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    history: dict[str, list[float]] = {"step_loss": [], "epoch_loss": [], "epoch_seconds": [], "val_map_50": []}
    step, start = 0, 0
    inside: dict | None = None  # where a checkpoint written inside an epoch left off
    run_dir = out_dir / RUN_DIR
    last = run_dir / CHECKPOINT_DIR / "last.ckpt"
    state = prepare_run_dir(run_dir, _fingerprint(config, tc, samples, model), tc)
    if state != "fresh":
        fix = f"delete {run_dir} to train afresh (or run with --no-resume)"
        saved = load_checkpoint(last, what="detector training checkpoint", fix=fix, map_location=tc.device)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        step, start, history = (
            saved["step"],
            saved["epoch"] + 1,
            {"val_map_50": [], "epoch_seconds": [], **saved["history"]},
        )
        if saved.get("inside") is not None:
            start, inside = saved["epoch"], saved["inside"]
    written = time.monotonic()

    def save(epoch: int, losses: list[float], *, done_in_epoch: int | None = None) -> None:
        """last.ckpt; ``done_in_epoch`` batches of ``epoch`` done (None: the epoch is closed)."""
        progress = {"epoch": epoch, "step": step, "history": history}
        if done_in_epoch is not None:
            progress["inside"] = {"batches": done_in_epoch, "losses": list(losses), "rng": global_rng_state()}
        states = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
        write_checkpoint(last, {**progress, **states, "scheduler": scheduler.state_dict()})

    tracker = WandbRun(tc.wandb, run_dir, name=out_dir.name, config={"detector": asdict(config), "train": asdict(tc)})
    line = _EpochLoop(EpochLine("detector", metrics=("val_map_50",), enabled=tc.verbose), tc.epochs, batches)
    line.start()
    for epoch in range(start, tc.epochs if step < total else start):
        line.epoch_start(epoch)
        epoch_began = time.perf_counter()
        dataset.epoch = epoch
        # Image order and the RPN's anchor sampling depend on (seed, epoch) only: a resumed epoch replays exactly.
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(epoch_seed(tc.seed, epoch, 0)))
        torch.manual_seed(epoch_seed(tc.seed, epoch, 1))
        skip = int(inside["batches"]) if inside is not None else 0  # resumed inside this epoch: its next batch
        losses = list(inside["losses"]) if inside is not None else []
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=tc.batch_size, sampler=order.tolist()[skip * tc.batch_size :], collate_fn=collate
        )
        batch_iter = iter(loader)  # draws its base seed from the global RNG: before the saved state is restored
        if inside is not None:
            restore_global_rng_state(inside["rng"])
            inside = None
        for done, (images, targets) in enumerate(batch_iter, start=skip + 1):
            images = [im.to(tc.device) for im in images]
            targets = [{k: v.to(tc.device) for k, v in t.items()} for t in targets]
            loss_parts = model(images, targets)  # dict of RPN and box-head losses
            loss = sum(loss_parts.values())
            if not torch.isfinite(loss):
                raise InputError(f"detector loss became {float(loss)} at step {step}; lower --lr or check the boxes")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 10.0)
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
            history["step_loss"].append(losses[-1])
            line.batch_end(losses[-1])
            step += 1
            if step >= total:
                break
            if done < batches and time.monotonic() - written >= LAST_EVERY_SECONDS:
                save(epoch, losses, done_in_epoch=done)  # a long epoch killed midway loses little
                written = time.monotonic()
        history["epoch_loss"].append(float(np.mean(losses)) if losses else float("nan"))
        history["epoch_seconds"].append(round(time.perf_counter() - epoch_began, 2))  # training steps only
        metrics = {"loss": history["epoch_loss"][-1]}
        if val_cells is not None and len(val_cells):
            history["val_map_50"].append(_validate(model, config, val_cells, tc.device))
            metrics["val_map_50"] = history["val_map_50"][-1]
            model.train()
        line.epoch_end(metrics)
        tracker.log({"epoch": epoch + 1, **metrics, "lr": scheduler.get_last_lr()[0]}, step=step)
        final = step >= total or epoch + 1 == tc.epochs
        if final or time.monotonic() - written >= LAST_EVERY_SECONDS:
            save(epoch, losses)
            written = time.monotonic()
        if final:
            break
    tracker.finish()
    if state != "finished":
        atomic_write_text(run_dir / FINISHED_FILE, json.dumps({"steps": step}) + "\n")
    model.eval()
    checkpoint = save_detector(out_dir / "detector.pt", model=model, config=config, extra={"steps": step})
    summary = {"config": asdict(config), "train_config": asdict(tc), "images": len(samples), "history": history}
    atomic_write_text(out_dir / "history.json", json.dumps(summary, indent=2) + "\n")
    return DetectorResult(checkpoint=checkpoint, config=config, history=history)


def resolve_from_boxes(config: DetectorConfig, samples: list, *, verbose: bool = True) -> DetectorConfig:
    """`config` with a pixel_scale / smallest_anchor of 0 replaced by the values the training boxes call for."""
    if config.pixel_scale > 0 and config.smallest_anchor > 0:
        return config
    stats = box_stats(samples, config.classes)
    scale = config.pixel_scale or derive_pixel_scale(stats)
    anchor = config.smallest_anchor or derive_smallest_anchor(stats, scale)
    if verbose:
        name, _ = stats.smallest()
        say(
            f"detector: image scale {scale:g} and smallest anchor {anchor} px from the training boxes "
            f"(smallest class {name}; at that scale: {stats.describe(scale)}); set --pixel-scale / --smallest-anchor "
            "to override"
        )
    return replace(config, pixel_scale=scale, smallest_anchor=anchor)


def _validate(model: torch.nn.Module, config: DetectorConfig, cells: CellTable, device: str) -> float:
    """AP@0.5 over classes on the images of `cells` (whole images at the training scale)."""
    from mil.detector.evaluate import evaluate_table
    from mil.detector.predict import CellDetector, detect_images

    model.eval()
    images = sorted({(r["image_path"], r["patient_id"]) for r in cells.rows})
    # No test-time augmentation here: this AP picks the kept epoch, and the flipped views would triple its cost.
    detector = CellDetector(model=model, config=replace(config, tta=False), tile_size=4096, overlap=128, device=device)
    return float(evaluate_table(detect_images(images, detector=detector), cells, config.classes)["map_50"])


class _EpochLoop:
    """Drives mil.progress.EpochLine from this plain training loop (it is a Lightning callback)."""

    def __init__(self, line: EpochLine, epochs: int, batches: int) -> None:
        self.line = line
        self.trainer = SimpleNamespace(current_epoch=0, max_epochs=epochs, num_training_batches=batches,
                                       callback_metrics={}, is_global_zero=True, should_stop=False)  # fmt: skip

    def start(self) -> None:
        self.line.on_fit_start(self.trainer, None)

    def epoch_start(self, epoch: int) -> None:
        self.trainer.current_epoch = epoch
        self.line.on_train_epoch_start(self.trainer, None)

    def batch_end(self, loss: float) -> None:
        self.line.on_train_batch_end(self.trainer, None, {"loss": loss}, None, 0)

    def epoch_end(self, metrics: dict) -> None:
        self.trainer.callback_metrics = dict(metrics)
        self.line.on_train_epoch_end(self.trainer, None)


def _fingerprint(config: DetectorConfig, tc: DetectorTrainConfig, samples: list, model: torch.nn.Module) -> str:
    """sha256 of what decides the trained weights: both configs, every image's bytes and boxes, initial weights."""
    architecture = {k: v for k, v in asdict(config).items() if k != "tta"}  # inference only: same weights either way
    digest = run_digest({"config": architecture, "train": weight_settings(tc)}, model)
    for sample in samples:
        digest.update(json.dumps([sample.image_path, sample.patient_id]).encode())
        try:
            digest.update(Path(sample.image_path).read_bytes())
        except OSError as e:
            raise InputError(f"image {sample.image_path} cannot be read ({e}); fix or remove its rows") from e
        digest.update(np.ascontiguousarray(sample.boxes, dtype=np.float32).tobytes())
        digest.update(np.ascontiguousarray(sample.labels, dtype=np.int64).tobytes())
    return digest.hexdigest()
