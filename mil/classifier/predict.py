"""Classify the cells of a cell table with a classifier checkpoint: predicted label + one probability per class."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mil.atomic import atomic_path
from mil.cell_table import CellTable
from mil.errors import InputError

CHECKPOINT_FORMAT = "cytomil-classifier/1"


@dataclass
class LoadedClassifier:
    """A classifier ready to predict: network in eval mode plus the preprocessing its checkpoint records."""

    net: torch.nn.Module
    arch: str
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: list[str]


def save_checkpoint(
    path: str | Path,
    *,
    net: torch.nn.Module,
    arch: str,
    input_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    class_names: list[str],
) -> Path:
    """Write the classifier checkpoint (format cytomil-classifier/1) atomically; it loads with weights_only=True.

    The encoder package's writer is used where it is installed, so the encoder `classifier.file` reads exactly
    what it writes; the fallback writes the same documented dict.
    """
    try:
        from features.encoders.classifier import save_classifier_checkpoint
    except ImportError:
        save_classifier_checkpoint = None
    state_dict = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    if save_classifier_checkpoint is not None:
        save_classifier_checkpoint(
            path,
            arch=arch,
            input_size=int(input_size),
            mean=list(mean),
            std=list(std),
            class_names=list(class_names),
            state_dict=state_dict,
        )
        return Path(path)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "arch": arch,
        "input_size": int(input_size),
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "class_names": list(class_names),
        "state_dict": state_dict,
    }

    def validate(tmp: Path) -> None:
        back = torch.load(tmp, map_location="cpu", weights_only=True)
        if back.get("format") != CHECKPOINT_FORMAT or len(back["state_dict"]) != len(state_dict):
            raise OSError(f"classifier checkpoint {path} did not read back")

    with atomic_path(path, validate) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_classifier(path: str | Path) -> LoadedClassifier:
    """Read a checkpoint written by `save_checkpoint` (never unpickles code: weights_only=True)."""
    import timm

    path = Path(path)
    if not path.exists():
        raise InputError(f"classifier checkpoint {path} does not exist; train one with `mil train-classifier`")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, pickle with code, not a torch file
        raise InputError(f"classifier checkpoint {path} cannot be read ({type(e).__name__}: {e}); retrain it") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint; write it with `mil train-classifier`")
    net = timm.create_model(ckpt["arch"], pretrained=False, num_classes=len(ckpt["class_names"]))
    net.load_state_dict(ckpt["state_dict"])
    net.eval()
    return LoadedClassifier(
        net=net,
        arch=ckpt["arch"],
        input_size=int(ckpt["input_size"]),
        mean=tuple(ckpt["mean"]),
        std=tuple(ckpt["std"]),
        class_names=list(ckpt["class_names"]),
    )


@torch.no_grad()
def predict_crops(
    net: torch.nn.Module, crops: np.ndarray, *, mean, std, batch_size: int = 256, device: str = "cpu"
) -> np.ndarray:
    """uint8 crops (N, S, S, 3) -> softmax probabilities (N, C), float32, rows summing to 1."""
    net = net.to(device).eval()
    m = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    out = []
    for start in range(0, len(crops), batch_size):
        x = torch.from_numpy(crops[start : start + batch_size]).to(device)
        x = x.permute(0, 3, 1, 2).float() / 255.0  # (B, 3, S, S)
        out.append(torch.softmax(net((x - m) / s).float(), dim=1).cpu())
    if not out:
        return np.zeros((0, 0), dtype=np.float32)
    return torch.cat(out).numpy().astype(np.float32)


def predict_rows(classifier: LoadedClassifier, rows: list[dict], *, batch_size: int = 256) -> np.ndarray:
    """Probabilities (N, C) for cell-table rows, cropped exactly as in training."""
    from mil.classifier.data import load_crops

    if not rows:
        return np.zeros((0, len(classifier.class_names)), dtype=np.float32)
    crops = load_crops(rows, crop_size=classifier.input_size)
    return predict_crops(classifier.net, crops, mean=classifier.mean, std=classifier.std, batch_size=batch_size)


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
    cells: CellTable, checkpoint: str | Path, *, out: str | Path | None = None, batch_size: int = 256
) -> CellTable:
    """Predict every cell of `cells`; write the result atomically to `out` when given."""
    classifier = load_classifier(checkpoint)
    probs = predict_rows(classifier, cells.rows, batch_size=batch_size)
    table = with_predictions(cells, {r["cell_id"]: p for r, p in zip(cells.rows, probs)}, classifier.class_names)
    if out is not None:
        table.write(out)
    return table
