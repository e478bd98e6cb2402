"""Train the Faster R-CNN cell detector on the boxes of a cell table (any reader's, or the synthetic cohort's)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from mil.atomic import atomic_write_text
from mil.cell_table import CellTable
from mil.detector.data import DetectionDataset, collate, samples_from_cells
from mil.detector.model import DetectorConfig, build_detector, save_detector
from mil.errors import ConfigError, InputError


@dataclass
class DetectorTrainConfig:
    epochs: int = 10
    batch_size: int = 4
    lr: float = 1e-3  # AdamW; cosine decay after a linear warm-up
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    augment: bool = True
    max_steps: int = -1  # stop after this many optimizer steps (tests, smoke runs); -1 = no limit
    seed: int = 0
    device: str = "cpu"
    verbose: bool = False  # one line per epoch on stdout

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("epochs and batch_size must be at least 1")


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
) -> DetectorResult:
    """Fit on every image of `patients` (default: all) and write detector.pt + history.json to `out_dir`."""
    config = config or DetectorConfig()
    tc = train_config or DetectorTrainConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    samples = samples_from_cells(cells, config.classes, patients)
    if not samples:
        raise InputError("no images to train the detector on; the cell table (or the chosen patients) is empty")
    torch.manual_seed(tc.seed)
    np.random.seed(tc.seed)
    model = build_detector(config).to(tc.device)
    model.train()
    dataset = DetectionDataset(samples=samples, pixel_scale=config.pixel_scale, augment=tc.augment, seed=tc.seed)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=tc.batch_size,
        shuffle=True,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(tc.seed),
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    total = tc.epochs * len(loader) if tc.max_steps < 0 else min(tc.max_steps, tc.epochs * len(loader))

    def lr_factor(step: int) -> float:
        if step < tc.warmup_steps:
            return (step + 1) / tc.warmup_steps
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - tc.warmup_steps) / max(1, total - tc.warmup_steps))))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    history: dict[str, list[float]] = {"step_loss": [], "epoch_loss": []}
    step = 0
    for epoch in range(tc.epochs):
        dataset.epoch = epoch
        losses = []
        for images, targets in loader:
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
            step += 1
            if step >= total:
                break
        history["epoch_loss"].append(float(np.mean(losses)) if losses else float("nan"))
        if tc.verbose:
            print(
                f"detector epoch {epoch + 1}/{tc.epochs}: loss {history['epoch_loss'][-1]:.4f} ({step} steps)",
                flush=True,
            )
        if step >= total:
            break
    model.eval()
    checkpoint = save_detector(out_dir / "detector.pt", model=model, config=config, extra={"steps": step})
    summary = {"config": asdict(config), "train_config": asdict(tc), "images": len(samples), "history": history}
    atomic_write_text(out_dir / "history.json", json.dumps(summary, indent=2) + "\n")
    return DetectorResult(checkpoint=checkpoint, config=config, history=history)
