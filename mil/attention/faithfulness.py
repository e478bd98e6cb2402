"""Does attention point at cells that matter? Deletion curves and cue enrichment.

Deletion: remove the most-attended cells first and watch the probability of the predicted diagnosis fall;
compare with removing cells in random order. Attention that is faithful falls faster, so the attention
curve lies below the random one and the area between them (random minus attention) is positive.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

DEFAULT_FRACTIONS = tuple(np.round(np.arange(0.0, 0.91, 0.1), 2))


@dataclass(frozen=True)
class DeletionCurve:
    fractions: np.ndarray  # (F,) share of cells removed
    attention: np.ndarray  # (F,) prob of the originally predicted class, most-attended removed first
    random: np.ndarray  # (F,) the same with cells removed in random order (mean over repeats)

    @property
    def area_between(self) -> float:
        """Mean gap random - attention over the fractions (trapezoid on [0, max fraction], normalised)."""
        gap = self.random - self.attention
        span = float(self.fractions[-1] - self.fractions[0]) or 1.0
        return float(np.trapezoid(gap, self.fractions) / span)


def _keep_after_removal(order: np.ndarray, fraction: float) -> np.ndarray:
    n = len(order)
    n_remove = min(int(round(fraction * n)), n - 1)  # always keep one cell: an empty bag has no prediction
    return np.sort(order[n_remove:])


def deletion_curve(
    features: np.ndarray,
    attention: np.ndarray,
    predict: Callable[[np.ndarray], np.ndarray],
    *,
    target: int | None = None,
    fractions: tuple[float, ...] = DEFAULT_FRACTIONS,
    repeats: int = 5,
    seed: int = 0,
) -> DeletionCurve:
    """features (N,D); attention (N,) or (K,N) (summed over branches); predict(features (n,D)) -> probs (C,)."""
    score = attention.sum(axis=0) if attention.ndim == 2 else attention  # (N,)
    if target is None:
        target = int(np.argmax(predict(features)))
    by_attention = np.argsort(-score, kind="stable")
    rng = np.random.default_rng(seed)
    random_orders = [rng.permutation(len(score)) for _ in range(repeats)]
    att_curve, rnd_curve = [], []
    for f in fractions:
        att_curve.append(predict(features[_keep_after_removal(by_attention, f)])[target])
        rnd_curve.append(np.mean([predict(features[_keep_after_removal(o, f)])[target] for o in random_orders]))
    return DeletionCurve(np.asarray(fractions, float), np.asarray(att_curve, float), np.asarray(rnd_curve, float))


def bootstrap_mean_ci(values: np.ndarray, *, n_boot: int = 2000, seed: int = 0, alpha: float = 0.05):
    """Mean and percentile-bootstrap CI over patients."""
    values = np.asarray(values, float)
    if len(values) == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = rng.choice(values, size=(n_boot, len(values)), replace=True).mean(axis=1)
    return float(values.mean()), float(np.quantile(means, alpha / 2)), float(np.quantile(means, 1 - alpha / 2))


def cue_enrichment(attention: np.ndarray, cue: np.ndarray, top_k: int = 10) -> float | None:
    """Share of cue-carrying cells among the top-k attended cells divided by their share in the bag.

    None when the bag has no cue cell (the ratio is undefined there, not zero).
    """
    score = attention.sum(axis=0) if attention.ndim == 2 else attention
    cue = np.asarray(cue, bool)
    base = cue.mean()
    if base == 0:
        return None
    top = np.argsort(-score, kind="stable")[: min(top_k, len(score))]
    return float(cue[top].mean() / base)


def attention_entropy(attention: np.ndarray) -> float:
    """Entropy normalised by log(N): 1 = uniform over cells, 0 = all mass on one cell."""
    score = attention.sum(axis=0) if attention.ndim == 2 else attention
    p = score / score.sum()
    n = len(p)
    if n <= 1:
        return 0.0
    return float(-(p * np.log(np.clip(p, 1e-12, None))).sum() / np.log(n))
