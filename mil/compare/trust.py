"""Per-fold calibration of a head, fitted on patients the fold does not test, and what it gives the test patients:
calibrated probabilities, conformal prediction sets and (two diagnoses) a binary threshold.

Attention heads: temperature scaling, conformal scores and the threshold from the fold's inner validation patients
(the same patients that chose the early-stopping epoch). Count heads fit on train + val and have no held-out
patients: they are calibrated by scikit-learn's CalibratedClassifierCV within those training patients, and
their conformal scores and threshold come from the calibrated out-of-fold probabilities of the same patients
(cross-conformal, `mil.protocol.calibration.calibrate_count_head`). The record (`FoldTrust.to_dict`) is stored
with every saved model, so `mil predict` applies exactly the same calibration.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mil.protocol.calibration import (
    apply_temperature,
    calibrate_count_head,
    calibrated_count_proba,
    choose_threshold,
    fit_temperature,
)
from mil.protocol.conformal import ConformalCalibration
from mil.protocol.conformal import ensemble_sets as _ensemble_sets

TRUST_FORMAT = "cytomil-calibration/1"


@dataclass
class FoldTrust:
    """How one fitted model of a head is calibrated, with the held-out patients it was fitted on."""

    method: str  # "temperature" | "sigmoid-cv" | "none"
    temperature: float | None = None
    conformal: ConformalCalibration | None = None
    threshold: float | None = None  # binary: P(second diagnosis) >= threshold calls it
    calibration_patients: tuple[str, ...] = ()

    def calibrate(self, probs: np.ndarray) -> np.ndarray:
        """Temperature-scaled probabilities (count heads' calibrated probabilities come from their own model)."""
        return apply_temperature(probs, self.temperature) if self.temperature is not None else np.asarray(probs)

    def sets(self, calibrated: np.ndarray, level: float, classwise: bool) -> np.ndarray:
        """(P, C) conformal sets of calibrated probabilities; every diagnosis when nothing calibrated them."""
        if self.conformal is None or not len(self.conformal.scores):
            return np.ones(np.shape(calibrated), dtype=bool)
        return self.conformal.sets(calibrated, level, classwise)

    def threshold_predictions(self, calibrated: np.ndarray) -> np.ndarray | None:
        if self.threshold is None or np.shape(calibrated)[1] != 2:
            return None
        return (np.asarray(calibrated)[:, 1] >= self.threshold).astype(np.int64)

    def to_dict(self) -> dict:
        return {
            "format": TRUST_FORMAT,
            "method": self.method,
            "temperature": self.temperature,
            "conformal": self.conformal.to_dict() if self.conformal is not None else None,
            "threshold": self.threshold,
            "calibration_patients": list(self.calibration_patients),
        }

    @classmethod
    def from_dict(cls, data: dict | None) -> FoldTrust:
        """A stored record; a model saved before calibration existed reads as uncalibrated."""
        if not data:
            return cls(method="none")
        conformal = data.get("conformal")
        return cls(
            method=data["method"],
            temperature=data.get("temperature"),
            conformal=ConformalCalibration.from_dict(conformal) if conformal else None,
            threshold=data.get("threshold"),
            calibration_patients=tuple(data.get("calibration_patients") or ()),
        )


def _threshold(calibrated: np.ndarray, y: np.ndarray) -> float | None:
    return choose_threshold(calibrated[:, 1], np.asarray(y) == 1) if calibrated.shape[1] == 2 else None


def attention_trust(val_probs: np.ndarray | None, y_val: np.ndarray, val_patients) -> FoldTrust:
    """Temperature, conformal scores and threshold from the inner validation patients' probabilities."""
    if val_probs is None or not len(val_probs):
        return FoldTrust(method="none")
    temperature = fit_temperature(val_probs, y_val)
    calibrated = apply_temperature(val_probs, temperature)
    return FoldTrust(
        method="temperature",
        temperature=temperature,
        conformal=ConformalCalibration.from_probs(calibrated, y_val),
        threshold=_threshold(calibrated, y_val),
        calibration_patients=tuple(val_patients),
    )


def count_trust(head, fit_data, y_fit: np.ndarray, test_data, *, num_classes: int, seed: int, patients):
    """(FoldTrust, calibrated model or None, calibrated test probabilities) of a fitted count head."""
    fitted = calibrate_count_head(head, fit_data, y_fit, num_classes=num_classes, seed=seed)
    if fitted is None:
        return FoldTrust(method="none"), None, head.predict_proba(test_data)
    trust = FoldTrust(
        method=f"sigmoid-cv{fitted.folds}",
        conformal=ConformalCalibration.from_probs(fitted.oof, y_fit),
        threshold=_threshold(fitted.oof, y_fit),
        calibration_patients=tuple(patients),
    )
    return trust, fitted.model, calibrated_count_proba(head, fitted.model, test_data, num_classes)


def member_sets(trusts: list[FoldTrust], calibrated: np.ndarray, level: float, classwise: bool) -> np.ndarray:
    """(M, P, C) each member's sets of its own calibrated probabilities (M, P, C)."""
    return np.stack([t.sets(c, level, classwise) for t, c in zip(trusts, calibrated)])


def ensemble_sets(trusts: list[FoldTrust], calibrated: np.ndarray, level: float, classwise: bool) -> np.ndarray:
    """(P, C) sets of the members' mean calibrated probability (M, P, C) at their mean threshold."""
    return _ensemble_sets([t.conformal for t in trusts], np.asarray(calibrated).mean(axis=0), level, classwise)


def ensemble_threshold_predictions(trusts: list[FoldTrust], calibrated: np.ndarray) -> np.ndarray | None:
    """Binary: the ensemble's mean calibrated P(second) against the mean of the members' thresholds."""
    if calibrated.shape[-1] != 2 or any(t.threshold is None for t in trusts):
        return None
    threshold = float(np.mean([t.threshold for t in trusts]))
    return (calibrated.mean(axis=0)[:, 1] >= threshold).astype(np.int64)
