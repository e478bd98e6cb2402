"""Classifier metrics on held-out cells: macro-F1, macro one-vs-rest AUROC, balanced accuracy, per class."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from mil.atomic import atomic_path


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, class_names: list[str]) -> dict:
    """Metrics of probabilities (N, C) against integer targets (N,).

    AUROC is one-vs-rest averaged over the classes that occur in `y_true` (a class without positives has no
    AUROC); the classes left out are listed, so a reader sees when the average covers fewer than C classes.
    """
    from sklearn.metrics import (
        balanced_accuracy_score,
        confusion_matrix,
        f1_score,
        precision_recall_fscore_support,
        roc_auc_score,
    )

    y_true = np.asarray(y_true, dtype=np.int64)
    labels = list(range(len(class_names)))
    y_pred = probs.argmax(axis=1)
    present = sorted(set(y_true.tolist()))
    aucs = {}
    for c in present:
        positives = y_true == c
        if 0 < positives.sum() < len(y_true):
            aucs[class_names[c]] = float(roc_auc_score(positives, probs[:, c]))
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    return {
        "n_cells": int(len(y_true)),
        # Macro over the classes present in the held-out truth: a class absent there cannot be scored.
        "macro_f1": float(f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)),
        "macro_auroc": float(np.mean(list(aucs.values()))) if aucs else float("nan"),
        "auroc_classes_left_out": [class_names[c] for c in labels if class_names[c] not in aucs],
        "balanced_accuracy": _balanced_accuracy(balanced_accuracy_score, y_true, y_pred),
        "accuracy": float((y_pred == y_true).mean()) if len(y_true) else float("nan"),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
                "auroc": aucs.get(name),
            }
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def write_confusion_png(matrix: list[list[int]], class_names: list[str], path: str | Path, title: str) -> Path:
    """Row-normalised confusion matrix (rows: truth) with counts, written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = np.asarray(matrix, dtype=float)
    rows = m.sum(axis=1, keepdims=True)
    norm = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
    side = max(4.0, 0.35 * len(class_names) + 2)
    fig, ax = plt.subplots(figsize=(side, side))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(class_names)), class_names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(class_names)), class_names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    if len(class_names) <= 12:
        for i in range(len(class_names)):
            for j in range(len(class_names)):
                if m[i, j]:
                    ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=7)
    fig.tight_layout()
    path = Path(path)

    def validate(tmp: Path) -> None:
        if tmp.read_bytes()[:8] != b"\x89PNG\r\n\x1a\n":
            raise OSError(f"{path} is not a PNG")

    with atomic_path(path, validate) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def _balanced_accuracy(score, y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean recall over the classes in ``y_true``. A prediction of a class absent from the held-out truth is
    expected with 33 classes and few patients (it counts as an error); sklearn's warning about it is dropped."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        return float(score(y_true, y_pred))
