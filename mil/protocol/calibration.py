"""Calibration of patient probabilities: temperature scaling (attention heads, fitted on a fold's inner validation
patients), scikit-learn's cross-validated sigmoid calibration (count heads, fitted within a fold's training
patients), the Brier score, reliability bins, and the binary threshold chosen on held-out patients.

Temperature scaling (Guo et al. 2017) divides the logits by one scalar T > 0 fitted by minimising the negative
log-likelihood of held-out patients: T > 1 softens an over-confident head, and the argmax never changes. The
log-probabilities serve as logits (softmax is shift-invariant, so softmax(log p / T) is exact).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TEMPERATURE_BOUNDS = (0.1, 10.0)  # a separable validation set drives T to a bound: keep it sane


def log_probs(probs: np.ndarray) -> np.ndarray:
    return np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-300, None))


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T), row by row."""
    z = log_probs(probs) / float(temperature)
    z -= z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def nll(probs: np.ndarray, y: np.ndarray) -> float:
    probs = np.asarray(probs, dtype=np.float64)
    return float(-np.mean(log_probs(probs[np.arange(len(probs)), np.asarray(y, dtype=np.int64)])))


def fit_temperature(probs: np.ndarray, y: np.ndarray) -> float:
    """The T minimising the NLL of `probs` (held-out patients) on log T within TEMPERATURE_BOUNDS; 1 without any."""
    from scipy.optimize import minimize_scalar

    probs = np.asarray(probs, dtype=np.float64)
    if len(probs) == 0:
        return 1.0
    lo, hi = np.log(TEMPERATURE_BOUNDS)
    found = minimize_scalar(
        lambda t: nll(apply_temperature(probs, np.exp(t)), y),
        bounds=(lo, hi),
        method="bounded",
        options={"xatol": 1e-4},
    )
    return float(np.exp(found.x))


def brier_score(y: np.ndarray, probs: np.ndarray) -> float:
    """Multi-class Brier score: mean over patients of sum_c (p_c - [c is the diagnosis])^2 (0 best, 2 worst)."""
    probs = np.asarray(probs, dtype=np.float64)
    onehot = np.eye(probs.shape[1])[np.asarray(y, dtype=np.int64)]
    return float(((probs - onehot) ** 2).sum(axis=1).mean())


def reliability_bins(y: np.ndarray, probs: np.ndarray, n_bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-label (confidence, accuracy, count) per equal-width bin (NaN where a bin is empty)."""
    probs = np.asarray(probs, dtype=np.float64)
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == np.asarray(y)).astype(float)
    bins = np.minimum((conf * n_bins).astype(np.int64), n_bins - 1)
    count = np.bincount(bins, minlength=n_bins).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(bins, weights=conf, minlength=n_bins) / count
        accuracy = np.bincount(bins, weights=correct, minlength=n_bins) / count
    return mean_conf, accuracy, count


def choose_threshold(p_positive: np.ndarray, positive: np.ndarray) -> float:
    """Binary threshold on P(second diagnosis) maximising balanced accuracy on held-out patients (predict positive
    when p >= t); among equally good thresholds the one nearest 0.5. 0.5 when a class is missing."""
    p = np.asarray(p_positive, dtype=np.float64)
    pos = np.asarray(positive, dtype=bool)
    if pos.all() or not pos.any():
        return 0.5
    values = np.unique(p)
    candidates = np.unique(np.r_[0.5, (values[1:] + values[:-1]) / 2, values[0] - 1e-9, values[-1] + 1e-9])
    called = p[None, :] >= candidates[:, None]  # (T, P)
    sens = (called & pos).sum(axis=1) / pos.sum()
    spec = (~called & ~pos).sum(axis=1) / (~pos).sum()
    score = (sens + spec) / 2
    best = np.flatnonzero(np.isclose(score, score.max()))
    return float(candidates[best[np.argmin(np.abs(candidates[best] - 0.5))]])


def balanced_accuracy(y: np.ndarray, predicted: np.ndarray, num_classes: int) -> float:
    y, predicted = np.asarray(y), np.asarray(predicted)
    sens = [float((predicted[y == c] == c).mean()) for c in range(num_classes) if (y == c).any()]
    return float(np.mean(sens)) if sens else float("nan")


@dataclass
class CountCalibration:
    """A count head's CalibratedClassifierCV and the calibrated out-of-fold probabilities of its training patients."""

    model: object  # sklearn.calibration.CalibratedClassifierCV, fitted
    oof: np.ndarray  # (P, C) training patients, each from the calibrated pair whose estimator did not see it
    folds: int


def calibrate_count_head(head, data, y: np.ndarray, *, num_classes: int, seed: int, folds: int = 3):
    """Sigmoid calibration of a fitted count head by scikit-learn's CalibratedClassifierCV on the same (training)
    patients: k estimators, each calibrated on the patients it did not see (ensemble=True). Each training patient's
    out-of-fold probability comes from the pair whose estimator left it out; those are the held-out scores that
    calibrate the head's conformal sets and binary threshold. None when a diagnosis has fewer than 2 patients."""
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.model_selection import StratifiedKFold

    y = np.asarray(y, dtype=np.int64)
    present = np.bincount(y)[np.bincount(y) > 0]
    k = int(min(folds, present.min()))
    if k < 2 or len(present) < 2:
        return None
    x = head.inputs(data)
    cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=int(seed))
    model = CalibratedClassifierCV(head.estimator(), method="sigmoid", cv=cv, ensemble=True).fit(x, y)
    columns = np.asarray(model.classes_, dtype=np.int64)
    oof = np.zeros((len(y), num_classes))
    for (_, held_out), pair in zip(cv.split(x, y), model.calibrated_classifiers_):
        oof[np.ix_(held_out, columns)] = pair.predict_proba(x[held_out])
    return CountCalibration(model=model, oof=oof, folds=k)


def calibrated_count_proba(head, model, data, num_classes: int) -> np.ndarray:
    """(P, C) probabilities of a calibrated count model (a diagnosis unseen in training gets 0)."""
    seen = model.predict_proba(head.inputs(data))
    probs = np.zeros((len(seen), num_classes))
    probs[:, np.asarray(model.classes_, dtype=np.int64)] = seen
    return probs
