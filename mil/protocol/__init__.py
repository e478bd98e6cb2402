"""The one protocol every diagnosis head is judged by: patient-level splits, metrics, bootstrap CIs, paired test."""

from mil.protocol.bootstrap import BootstrapResult, PairedResult, bootstrap_metrics, paired_bootstrap
from mil.protocol.metrics import classification_metrics, confusion_matrix, expected_calibration_error
from mil.protocol.splits import (
    FoldSplit,
    Splits,
    crossfit_plan,
    load_or_create_external_splits,
    load_or_create_splits,
    make_external_splits,
    make_splits,
    read_splits,
)

__all__ = [
    "BootstrapResult",
    "FoldSplit",
    "PairedResult",
    "Splits",
    "bootstrap_metrics",
    "classification_metrics",
    "confusion_matrix",
    "crossfit_plan",
    "expected_calibration_error",
    "load_or_create_external_splits",
    "load_or_create_splits",
    "make_external_splits",
    "make_splits",
    "paired_bootstrap",
    "read_splits",
]
