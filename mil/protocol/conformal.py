"""Split conformal prediction sets for patients, marginal and class-conditional (Mondrian).

Score of a patient for a diagnosis c: 1 - p_c (the LAC / "least ambiguous set" score). Calibrated on n held-out
patients with scores s_1..s_n of their true diagnosis, the set of a new patient at level 1 - alpha holds every
diagnosis whose score is at most q, the ceil((n + 1)(1 - alpha))-th smallest calibration score (every diagnosis
when that rank exceeds n). Then P(true diagnosis in set) >= 1 - alpha for an exchangeable new patient, and
< 1 - alpha + 1/(n + 1) without ties. The class-conditional variant takes q_c from the calibration patients of
diagnosis c alone, so each diagnosis is covered at 1 - alpha, a rare one included (Vovk et al. 2005, Mondrian
conformal prediction). The p-value form of the same rule is crepes' `ConformalClassifier` without smoothing;
tests/test_conformal.py checks this implementation against it.

An ensemble of models, each calibrated on its own held-out patients (no patient is held out from all of them),
has no calibration set of its own: its set holds the diagnoses whose score under the ensemble's mean probability
is at most the mean of the members' thresholds (`ensemble_sets`). That carries no finite-sample guarantee; it
was measured in experiments/conformal_coverage.py (slightly conservative: the ensemble is better than each
member). The majority vote of the members' sets (`majority_sets`, >= 1 - 2 alpha guaranteed, Gasparin & Ramdas
2024) is kept for reference; with two members it is their union and covered 0.95 at 90% there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

TOLERANCE = 1e-9  # a score equal to the threshold up to float rounding (compare vs predict) is in the set


def lac_scores(probs: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(P,) nonconformity 1 - p_true of each patient."""
    probs = np.asarray(probs, dtype=np.float64)
    return 1.0 - probs[np.arange(len(probs)), np.asarray(y, dtype=np.int64)]


def conformal_quantile(scores: np.ndarray, level: float) -> float:
    """The ceil((n+1) level)-th smallest score; inf (every diagnosis) when n is too small for the level."""
    scores = np.sort(np.asarray(scores, dtype=np.float64))
    rank = math.ceil((len(scores) + 1) * level - 1e-12)
    return float("inf") if rank > len(scores) else float(scores[rank - 1])


def check_level(level: float) -> float:
    from mil.errors import ConfigError

    if not 0.5 <= float(level) < 1.0:
        raise ConfigError(f"conformal level {level} must lie in [0.5, 1), e.g. 0.9 for 90% prediction sets")
    return float(level)


@dataclass
class ConformalCalibration:
    """Scores of the true diagnosis of held-out calibration patients, with those diagnoses (indices)."""

    scores: np.ndarray  # (n,)
    labels: np.ndarray  # (n,) int
    num_classes: int

    @classmethod
    def from_probs(cls, probs: np.ndarray, y: np.ndarray) -> ConformalCalibration:
        probs = np.asarray(probs, dtype=np.float64)
        return cls(scores=lac_scores(probs, y), labels=np.asarray(y, dtype=np.int64), num_classes=probs.shape[1])

    def thresholds(self, level: float, classwise: bool = False) -> np.ndarray:
        """(C,) the score threshold of each diagnosis (the same for all in the marginal variant)."""
        if not classwise:
            return np.full(self.num_classes, conformal_quantile(self.scores, level))
        return np.array([conformal_quantile(self.scores[self.labels == c], level) for c in range(self.num_classes)])

    def sets(self, probs: np.ndarray, level: float, classwise: bool = False) -> np.ndarray:
        """(P, C) bool prediction sets of new patients' probabilities."""
        scores = 1.0 - np.asarray(probs, dtype=np.float64)
        return scores <= self.thresholds(level, classwise)[None, :] + TOLERANCE

    def to_dict(self) -> dict:
        return {
            "scores": [float(s) for s in self.scores],
            "labels": [int(v) for v in self.labels],
            "num_classes": int(self.num_classes),
        }

    @classmethod
    def from_dict(cls, data: dict) -> ConformalCalibration:
        return cls(
            scores=np.asarray(data["scores"], dtype=np.float64),
            labels=np.asarray(data["labels"], dtype=np.int64),
            num_classes=int(data["num_classes"]),
        )


def ensemble_sets(
    calibrations: list[ConformalCalibration | None], mean_probs: np.ndarray, level: float, classwise: bool = False
) -> np.ndarray:
    """(P, C) sets of an ensemble's mean probabilities at the mean of its members' thresholds (a member without a
    calibration has an infinite threshold: then every diagnosis is in every set)."""
    mean_probs = np.asarray(mean_probs, dtype=np.float64)
    rows = [
        c.thresholds(level, classwise) if c is not None and len(c.scores) else np.full(mean_probs.shape[1], np.inf)
        for c in calibrations
    ]
    return 1.0 - mean_probs <= np.mean(rows, axis=0)[None, :] + TOLERANCE


def majority_sets(member_sets: np.ndarray) -> np.ndarray:
    """(M, P, C) members' sets -> (P, C): the diagnoses at least half of the members hold."""
    member_sets = np.asarray(member_sets, dtype=bool)
    return member_sets.mean(axis=0) >= 0.5


def coverage(y: np.ndarray, sets: np.ndarray, num_classes: int | None = None) -> dict:
    """Empirical coverage (overall and per diagnosis), mean set size and the share of empty sets."""
    y = np.asarray(y, dtype=np.int64)
    sets = np.asarray(sets, dtype=bool)
    num_classes = num_classes or sets.shape[1]
    hit = sets[np.arange(len(y)), y]
    per_class = np.array([hit[y == c].mean() if (y == c).any() else np.nan for c in range(num_classes)])
    return {
        "coverage": float(hit.mean()) if len(y) else float("nan"),
        "coverage_per_class": per_class,
        "set_size": float(sets.sum(axis=1).mean()) if len(y) else float("nan"),
        "empty": float((sets.sum(axis=1) == 0).mean()) if len(y) else float("nan"),
    }


def format_set(row: np.ndarray, classes: list[str]) -> str:
    """'AML|CML' (diagnoses in the set, '|'-joined; '' for an empty set)."""
    return "|".join(c for c, keep in zip(classes, row) if keep)
