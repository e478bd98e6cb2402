"""95% bootstrap confidence intervals over patients, and the paired bootstrap test between two heads.

Predictions come as `probs` (S, P, C): S repeated seeds, each giving one out-of-fold prediction for every one
of the P patients. A metric's point value is its mean over seeds; one bootstrap replicate resamples *patients*
(the same draw for every seed, and for both heads of a paired test) and again averages over seeds, so the
interval reflects patient-to-patient variation, the unit a new cohort would change.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import numpy as np

from mil.protocol.metrics import SCALAR_METRICS, classification_metrics, confusion_matrix, scores_from_confusion

PER_CLASS_METRICS = ("sensitivity", "specificity")
CONFUSION_METRICS = ("macro_f1", "balanced_accuracy", "accuracy")


@dataclass
class BootstrapResult:
    """Point value (mean over seeds) and the [lo, hi] interval of each scalar and per-class metric."""

    point: dict[str, float | np.ndarray]
    lo: dict[str, float | np.ndarray]
    hi: dict[str, float | np.ndarray]
    confusion: np.ndarray  # (C, C) summed over seeds
    n_boot: int
    level: float


@dataclass
class PairedResult:
    """Macro-F1 of head a minus head b on the same patients: point, CI and two-sided bootstrap p-value."""

    head_a: str
    head_b: str
    metric: str
    diff: float
    lo: float
    hi: float
    p_value: float
    n_boot: int


def _as_seeds(probs: np.ndarray) -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float64)
    return probs[None] if probs.ndim == 2 else probs


def _seed_mean(y_true: np.ndarray, probs: np.ndarray, idx: np.ndarray, n_bins: int) -> dict:
    per_seed = [classification_metrics(y_true[idx], p[idx], n_bins=n_bins) for p in probs]
    out = {}
    for key in (*SCALAR_METRICS, *PER_CLASS_METRICS):
        with _quiet_nan():
            out[key] = np.nanmean(np.stack([np.asarray(m[key], dtype=float) for m in per_seed]), axis=0)
    out["confusion"] = np.sum([m["confusion"] for m in per_seed], axis=0)
    return out


@contextlib.contextmanager
def _quiet_nan():
    """np.nanmean warns on all-NaN slices (a class absent from a replicate); that NaN is the right answer."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _resamples(n_patients: int, n_boot: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n_patients, size=(n_boot, n_patients))


def bootstrap_metrics(
    y_true: np.ndarray, probs: np.ndarray, *, n_boot: int = 1000, level: float = 0.95, seed: int = 0, n_bins: int = 10
) -> BootstrapResult:
    """Percentile bootstrap CIs of every protocol metric, resampling patients with a seeded generator."""
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = _as_seeds(probs)
    point = _seed_mean(y_true, probs, np.arange(len(y_true)), n_bins)
    confusion = point.pop("confusion")
    reps: dict[str, list] = {k: [] for k in point}
    for idx in _resamples(len(y_true), n_boot, seed):
        m = _seed_mean(y_true, probs, idx, n_bins)
        for k in reps:
            reps[k].append(m[k])
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    lo, hi = {}, {}
    for k, values in reps.items():
        with _quiet_nan():
            a, b = np.nanpercentile(np.stack(values), q, axis=0)
        lo[k], hi[k] = (float(a), float(b)) if np.ndim(a) == 0 else (a, b)
    point = {k: (float(v) if np.ndim(v) == 0 else v) for k, v in point.items()}
    return BootstrapResult(point=point, lo=lo, hi=hi, confusion=confusion, n_boot=n_boot, level=level)


def paired_bootstrap(
    y_true: np.ndarray,
    probs_a: np.ndarray,
    probs_b: np.ndarray,
    *,
    head_a: str = "a",
    head_b: str = "b",
    metric: str = "macro_f1",
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> PairedResult:
    """Paired bootstrap of metric(a) - metric(b): both heads are scored on the same resampled patients.

    The p-value is two-sided: twice the share of replicates on the far side of 0 (with the +1 correction so it
    is never exactly 0), capped at 1.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    probs_a, probs_b = _as_seeds(probs_a), _as_seeds(probs_b)
    if probs_a.shape != probs_b.shape:
        raise ValueError(f"paired test needs predictions of the same patients: {probs_a.shape} vs {probs_b.shape}")
    full = np.arange(len(y_true))
    if metric in CONFUSION_METRICS:  # fast path: argmax once, a bincount per replicate
        num_classes = probs_a.shape[-1]
        pred_a, pred_b = probs_a.argmax(axis=-1), probs_b.argmax(axis=-1)  # (S, P)

        def score(pred: np.ndarray, idx: np.ndarray) -> float:
            per_seed = [scores_from_confusion(confusion_matrix(y_true[idx], p[idx], num_classes))[metric] for p in pred]
            return float(np.mean(per_seed))

        def diff(idx: np.ndarray) -> float:
            return score(pred_a, idx) - score(pred_b, idx)
    else:

        def diff(idx: np.ndarray) -> float:
            return float(_seed_mean(y_true, probs_a, idx, 10)[metric] - _seed_mean(y_true, probs_b, idx, 10)[metric])

    point = diff(full)
    reps = np.array([diff(idx) for idx in _resamples(len(y_true), n_boot, seed)])
    reps = reps[np.isfinite(reps)]
    lo, hi = np.percentile(reps, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
    below = (np.sum(reps <= 0) + 1) / (len(reps) + 1)
    above = (np.sum(reps >= 0) + 1) / (len(reps) + 1)
    p = float(min(1.0, 2 * min(below, above)))
    return PairedResult(
        head_a=head_a, head_b=head_b, metric=metric, diff=point, lo=float(lo), hi=float(hi), p_value=p, n_boot=n_boot
    )
