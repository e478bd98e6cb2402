"""Classify the cells of a cell table with a classifier checkpoint: predicted label + one probability per class."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mil.cell_table import CellTable


@dataclass
class LoadedClassifier:
    """A classifier ready to predict: network in eval mode plus the preprocessing its checkpoint records."""

    net: torch.nn.Module
    arch: str
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: list[str]
    tta: bool = False  # average the 8 flips/rotations by 90 degrees (what the checkpoint was scored with)


def save_checkpoint(
    path: str | Path,
    *,
    net: torch.nn.Module,
    arch: str,
    input_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    class_names: list[str],
    extra: dict | None = None,
    tta: bool = False,
    timm_kwargs: dict | None = None,
) -> Path:
    """Write the classifier checkpoint (cytomil-classifier/1) with the encoder package's writer, so the encoder
    `classifier.file` reads exactly what the classifier wrote; atomic, loads with weights_only=True."""
    from features.encoders.classifier import save_classifier_checkpoint

    save_classifier_checkpoint(
        path,
        model=net,
        arch=arch,
        input_size=int(input_size),
        mean=list(mean),
        std=list(std),
        class_names=list(class_names),
        interpolation="bilinear",  # crops are resized bilinearly in training (data.crop_box)
        extra=extra,
        tta=tta,
        timm_kwargs=timm_kwargs,
    )
    return Path(path)


def load_classifier(path: str | Path) -> LoadedClassifier:
    """Read a checkpoint written by `save_checkpoint` (never unpickles code: weights_only=True)."""
    from features.encoders.classifier import load_classifier_checkpoint

    net, meta = load_classifier_checkpoint(path)
    return LoadedClassifier(
        net=net,
        arch=meta["arch"],
        input_size=int(meta["input_size"]),
        mean=tuple(meta["mean"]),
        std=tuple(meta["std"]),
        class_names=list(meta["class_names"]),
        tta=bool(meta.get("tta", False)),
    )


def dihedral(x: torch.Tensor) -> list[torch.Tensor]:
    """The 8 flips/rotations by 90 degrees of a batch (B, 3, S, S): a smear has no up, left or handedness."""
    rotations = [torch.rot90(x, k, dims=(-2, -1)) for k in range(4)]
    return rotations + [r.flip(-1) for r in rotations]


@torch.no_grad()
def predict_crops(
    net: torch.nn.Module,
    crops: np.ndarray,
    *,
    mean,
    std,
    batch_size: int = 256,
    device: str = "cpu",
    tta: bool = False,
    progress=None,
) -> np.ndarray:
    """uint8 crops (N, S, S, 3) -> softmax probabilities (N, C), float32, rows summing to 1.

    `tta` averages the probabilities of the 8 dihedral views of each crop; `progress` (a mil.progress.Progress)
    is advanced by the crops of every batch."""
    net = net.to(device).eval()
    m = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    out = []
    for start in range(0, len(crops), batch_size):
        x = torch.from_numpy(crops[start : start + batch_size]).to(device)
        x = (x.permute(0, 3, 1, 2).float() / 255.0 - m) / s  # (B, 3, S, S)
        views = dihedral(x) if tta else [x]
        probs = torch.stack([torch.softmax(net(v).float(), dim=1) for v in views]).mean(0)  # (B, C)
        out.append(probs.cpu())
        if progress is not None:
            progress.update(len(x))
    if not out:
        return np.zeros((0, 0), dtype=np.float32)
    return torch.cat(out).numpy().astype(np.float32)


def predict_rows(
    classifier: LoadedClassifier, rows: list[dict], *, batch_size: int = 256, progress: bool = False
) -> np.ndarray:
    """Probabilities (N, C) for cell-table rows, cropped exactly as in training.

    Images are decoded and cropped in chunks of about 2000 cells, so a large table needs little memory and
    `progress` shows cells/s from the start (mil.progress: a bar on a terminal, timed lines in a log)."""
    from mil.classifier.data import load_crops
    from mil.progress import Progress

    if not rows:
        return np.zeros((0, len(classifier.class_names)), dtype=np.float32)
    chunks = _image_chunks(rows, 2000)
    out = np.zeros((len(rows), len(classifier.class_names)), dtype=np.float32)
    with Progress(len(rows), "classify", "cells", enabled=progress) as bar:
        for idx in chunks:
            crops = load_crops([rows[i] for i in idx], crop_size=classifier.input_size)
            out[idx] = predict_crops(
                classifier.net, crops, mean=classifier.mean, std=classifier.std, batch_size=batch_size,
                tta=classifier.tta, progress=bar,
            )  # fmt: skip
    return out


def _image_chunks(rows: list[dict], size: int) -> list[np.ndarray]:
    """Row indices in chunks of about `size`, never splitting an image (each image is decoded once)."""
    by_image: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_image.setdefault(str(r["image_path"]), []).append(i)
    chunks, current = [], []
    for idx in by_image.values():
        current += idx
        if len(current) >= size:
            chunks.append(np.array(current))
            current = []
    if current:
        chunks.append(np.array(current))
    return chunks


def with_predictions(cells: CellTable, probs_by_cell: dict[str, np.ndarray], class_names: list[str]) -> CellTable:
    """A copy of the table with pred_label and prob_<class> columns; cells without a prediction get empty ones."""
    rows = []
    for r in cells.rows:
        row = dict(r)
        p = probs_by_cell.get(r["cell_id"])
        row["pred_label"] = class_names[int(np.argmax(p))] if p is not None else ""
        for i, name in enumerate(class_names):
            row[f"prob_{name}"] = f"{float(p[i]):.6f}" if p is not None else ""
        rows.append(row)
    return CellTable(rows=rows)


def classify_cells(
    cells: CellTable,
    checkpoint: str | Path,
    *,
    out: str | Path | None = None,
    batch_size: int = 256,
    tta: bool | None = None,
    progress: bool = False,
) -> CellTable:
    """Predict every cell of `cells`; write the result atomically to `out` when given. `tta` None keeps the
    checkpoint's choice (test-time flips/rotations when it was trained with them)."""
    classifier = load_classifier(checkpoint)
    if tta is not None:
        classifier.tta = tta
    probs = predict_rows(classifier, cells.rows, batch_size=batch_size, progress=progress)
    table = with_predictions(cells, {r["cell_id"]: p for r, p in zip(cells.rows, probs)}, classifier.class_names)
    if out is not None:
        table.write(out)
    return table
