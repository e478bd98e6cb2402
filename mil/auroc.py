"""AUROC in plain numpy, shared by the heads' validation (every epoch) and the protocol's metrics (every
bootstrap draw): both need it fast and identical."""

from __future__ import annotations

import numpy as np


def binary_auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC of ``scores`` for the boolean labels ``positive``, ties counted one half: the Mann-Whitney U
    statistic from average ranks, equal to sklearn's roc_auc_score (tested). NaN without both positives and
    negatives. numpy only: every training epoch's validation calls it and sklearn's checks cost more."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    # Average rank (1-based) of each run of equal scores.
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], len(scores)]
    ranks = np.empty(len(scores), dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def auroc_ovr(y_true: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """One-vs-rest AUROC per class (C,), NaN for a class absent from (or the only class of) the sample."""
    y_true = np.asarray(y_true)
    return np.array([binary_auroc(probs[:, c], y_true == c) for c in range(probs.shape[1])])
