"""The cells of a bag folder as one matrix: features, labels, the group each cell's CV fold is drawn by, and
per-patient mean features for the diagnosis probe.

Order is part of the contract (a probe written independently reproduces the numbers): patients sorted by id, each
bag's cells in bag order. Cells are grouped by patient; a folder with fewer labelled patients than folds (a crop
dataset read with one patient for all, say) is grouped by image instead, so no image is in two folds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mil.errors import InputError


@dataclass
class BagCells:
    """Every cell of one bag folder (labelled or not) in probe order."""

    name: str  # the row label: the folder's name
    encoder: dict  # the folder's encoder config
    features: np.ndarray  # (N, D) float64
    labels: np.ndarray  # (N,) int64 into classes, -1 unlabelled
    classes: list[str]
    patients: np.ndarray  # (N,) str
    images: np.ndarray  # (N,) str: patient/image path
    cell_ids: np.ndarray  # (N,) str
    patient_means: dict[str, np.ndarray] = field(default_factory=dict)  # patient -> (D,) mean of all its cells


def load_bag_cells(bag_dir: str | Path, *, keep_cells: set[str] | None = None) -> BagCells:
    """Read every valid bag of `bag_dir`; `keep_cells` (cell ids) restricts the cell probes, not the patient means."""
    from features.bag_directory import BagDirectory

    directory = BagDirectory(bag_dir)
    patients = directory.patients()
    if not patients:
        raise InputError(f"bag directory {bag_dir} holds no valid bag; run `mil extract --out {bag_dir}` first")
    feats, labels, pids, images, ids, means = [], [], [], [], [], {}
    classes: list[str] | None = None
    for pid in patients:
        bag = directory.load(pid)
        if classes is None:
            classes = bag.label_classes
        elif bag.label_classes != classes:
            raise InputError(
                f"bags of {bag_dir} disagree on the label classes ({pid}: {bag.label_classes} vs {classes}); "
                "re-extract the folder with one cell table and label map"
            )
        x = np.asarray(bag.features, dtype=np.float64)  # (n, D)
        means[pid] = x.mean(axis=0)
        keep = np.ones(len(x), dtype=bool)
        if keep_cells is not None:
            keep = np.array([c in keep_cells for c in bag.cell_id], dtype=bool)
        feats.append(x[keep])
        labels.append(np.asarray(bag.label, dtype=np.int64)[keep])
        pids.extend([pid] * int(keep.sum()))
        paths = [f"{pid}/{bag.image_paths[i]}" for i in np.asarray(bag.image_index)]
        images.extend(p for p, k in zip(paths, keep, strict=True) if k)
        ids.extend(c for c, k in zip(bag.cell_id, keep, strict=True) if k)
    directory_config = directory.encoder_config
    return BagCells(
        name=Path(bag_dir).name,
        encoder=directory_config,
        features=np.concatenate(feats),
        labels=np.concatenate(labels),
        classes=list(classes or []),
        patients=np.array(pids, dtype=str),
        images=np.array(images, dtype=str),
        cell_ids=np.array(ids, dtype=str),
        patient_means=means,
    )


def labelled(cells: BagCells, *, max_cells: int | None = None, seed: int = 0) -> np.ndarray:
    """Indices of the labelled cells (label >= 0), at most `max_cells` of them (a seeded draw, kept in order)."""
    index = np.flatnonzero(cells.labels >= 0)
    if max_cells is not None and len(index) > max_cells:
        index = np.sort(np.random.default_rng(seed).choice(index, size=max_cells, replace=False))
    return index


def cell_groups(cells: BagCells, index: np.ndarray, n_folds: int) -> tuple[np.ndarray, str]:
    """(group of each cell in `index`, 'patient' or 'image'): patients when there are enough for the folds."""
    if len(np.unique(cells.patients[index])) >= n_folds:
        return cells.patients[index], "patient"
    return cells.images[index], "image"
