"""Abstention: refer the least confident patients to a hematologist and score the rest.

Patients are ranked by their top probability; at coverage c the most confident ceil(c P) are kept. The
risk-coverage curve (Geifman & El-Yaniv 2017) is the error (1 - accuracy) of the kept patients against c, and its
area (AURC, lower is better) summarises how well confidence orders right before wrong calls; the macro-F1 of the
kept patients is reported beside it.
"""

from __future__ import annotations

import numpy as np

from mil.protocol.metrics import confusion_matrix, scores_from_confusion

REPORTED_COVERAGES = (1.0, 0.9, 0.8, 0.7, 0.5)


def risk_coverage(y: np.ndarray, probs: np.ndarray) -> dict[str, np.ndarray | float]:
    """coverage (P,), accuracy (P,), macro_f1 (P,) of the k most confident patients for k = 1..P, and the AURC."""
    y = np.asarray(y, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    order = np.argsort(-probs.max(axis=1), kind="stable")
    predicted = probs.argmax(axis=1)[order]
    truth = y[order]
    n = len(y)
    correct = np.cumsum(predicted == truth)
    kept = np.arange(1, n + 1)
    accuracy = correct / kept
    f1 = np.array([scores_from_confusion(confusion_matrix(truth[:k], predicted[:k], probs.shape[1]))["macro_f1"]
                   for k in kept])  # fmt: skip
    return {"coverage": kept / n, "accuracy": accuracy, "macro_f1": f1, "aurc": float(np.mean(1.0 - accuracy))}


def at_coverage(curve: dict, level: float, key: str = "accuracy") -> float:
    """The metric of the most confident ceil(level P) patients."""
    n = len(curve["coverage"])
    k = max(1, int(np.ceil(level * n - 1e-9)))
    return float(curve[key][k - 1])


def refer_below(probs: np.ndarray, threshold: float) -> np.ndarray:
    """(P,) bool: patients whose top probability is below `threshold` (referred to a hematologist)."""
    return np.asarray(probs, dtype=np.float64).max(axis=1) < float(threshold)
