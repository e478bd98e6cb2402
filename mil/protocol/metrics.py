"""Patient-level classification metrics in plain numpy (fast enough to recompute 1000s of times in a bootstrap).

All take integer targets `y_true` (P,) in 0..C-1 and probabilities `probs` (P, C); the prediction is the argmax.
A class that no patient of the sample carries has no sensitivity and no AUROC (NaN); macro averages skip NaN,
matching sklearn's `roc_auc_score(..., multi_class="ovr", average="macro")` on the classes present.
"""

from __future__ import annotations

import numpy as np

from mil.auroc import auroc_ovr, binary_auroc  # noqa: F401  (binary_auroc: re-exported)

SCALAR_METRICS = ("macro_f1", "balanced_accuracy", "auroc", "ece", "accuracy")


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) counts, rows = true class, columns = predicted class."""
    idx = np.asarray(y_true, dtype=np.int64) * num_classes + np.asarray(y_pred, dtype=np.int64)
    return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1), np.nan)


def scores_from_confusion(cm: np.ndarray) -> dict[str, np.ndarray | float]:
    tp = np.diag(cm).astype(float)
    support = cm.sum(axis=1).astype(float)
    predicted = cm.sum(axis=0).astype(float)
    total = cm.sum()
    sensitivity = _safe_div(tp, support)
    tn = total - support - predicted + tp
    specificity = _safe_div(tn, total - support)
    # F1 of a class nobody has and nobody predicts is undefined; sklearn counts it as 0 in the macro mean
    # only when it is in `labels`. We average over classes present in truth or prediction, like sklearn's default.
    denom = support + predicted
    f1 = _safe_div(2 * tp, denom)
    present = denom > 0
    return {
        "macro_f1": float(np.mean(np.nan_to_num(f1[present]))) if present.any() else float("nan"),
        "balanced_accuracy": float(np.nanmean(sensitivity)) if np.isfinite(sensitivity).any() else float("nan"),
        "accuracy": float(tp.sum() / total) if total else float("nan"),
        "sensitivity": sensitivity,
        "specificity": specificity,
    }


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, n_bins: int = 10) -> float:
    """Top-label ECE: confidence vs accuracy in `n_bins` equal-width bins, weighted by bin size."""
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == np.asarray(y_true)).astype(float)
    bins = np.minimum((conf * n_bins).astype(np.int64), n_bins - 1)
    count = np.bincount(bins, minlength=n_bins).astype(float)
    gap = np.abs(
        np.bincount(bins, weights=correct, minlength=n_bins) - np.bincount(bins, weights=conf, minlength=n_bins)
    )
    return float(gap.sum() / max(count.sum(), 1.0))


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, *, n_bins: int = 10) -> dict:
    """Every metric of the protocol for one set of patient predictions.

    Returns scalars (macro_f1, balanced_accuracy, auroc, ece, accuracy), per-class arrays (sensitivity,
    specificity, auroc_per_class) and the confusion matrix.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or len(probs) != len(y_true):
        raise ValueError(f"probs must be (patients, classes) matching y_true; got {probs.shape} and {y_true.shape}")
    num_classes = probs.shape[1]
    cm = confusion_matrix(y_true, probs.argmax(axis=1), num_classes)
    out = scores_from_confusion(cm)
    per_class_auc = auroc_ovr(y_true, probs)
    out["auroc_per_class"] = per_class_auc
    out["auroc"] = float(np.nanmean(per_class_auc)) if np.isfinite(per_class_auc).any() else float("nan")
    out["ece"] = expected_calibration_error(y_true, probs, n_bins=n_bins)
    out["confusion"] = cm
    return out
