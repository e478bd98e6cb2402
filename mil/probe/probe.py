"""The probes: out-of-fold predictions of a kNN (cosine, k=20) and a logistic regression on frozen features, folds
drawn by group (patient or image), scored by macro-F1 and balanced accuracy with group-bootstrap CIs; the paired
bootstrap of the macro-F1 difference between two encoders on the same cells; and the patient-level diagnosis
probe on mean-pooled bags.

Every choice is fixed here so a probe written independently with scikit-learn reproduces the numbers:
StratifiedGroupKFold(n_folds, shuffle=True, random_state=seed) over the labelled cells in probe order,
KNeighborsClassifier(n_neighbors=min(k, n_train), metric="cosine"), and
make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter, class_weight="balanced")).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from mil.errors import InputError

METRICS = ("macro_f1", "balanced_accuracy")


@dataclass(frozen=True)
class ProbeSettings:
    n_folds: int = 5
    k: int = 20
    C: float = 1.0
    max_iter: int = 1000
    n_boot: int = 1000
    seed: int = 0
    level: float = 0.95


def grouped_folds(labels: np.ndarray, groups: np.ndarray, settings: ProbeSettings) -> list[np.ndarray]:
    """Test indices of each fold: no group in two folds, classes spread as evenly as the groups allow."""
    from sklearn.model_selection import StratifiedGroupKFold

    if len(np.unique(groups)) < settings.n_folds:
        raise InputError(
            f"{len(np.unique(groups))} groups (patients or images) cannot fill {settings.n_folds} folds; "
            f"lower --folds or give more patients"
        )
    splitter = StratifiedGroupKFold(n_splits=settings.n_folds, shuffle=True, random_state=settings.seed)
    with warnings.catch_warnings():  # a rare class that cannot reach every fold: best effort, as sklearn says
        warnings.filterwarnings("ignore", message="The least populated class in y has only")
        return [test for _, test in splitter.split(np.zeros(len(labels)), labels, groups)]


def knn_model(n_train: int, settings: ProbeSettings):
    from sklearn.neighbors import KNeighborsClassifier

    return KNeighborsClassifier(n_neighbors=min(settings.k, n_train), metric="cosine")


def linear_model(settings: ProbeSettings):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(
        StandardScaler(), LogisticRegression(C=settings.C, max_iter=settings.max_iter, class_weight="balanced")
    )


def out_of_fold(kind: str, x: np.ndarray, y: np.ndarray, folds: list[np.ndarray], settings: ProbeSettings):
    """(N,) predicted class of every cell by the model of the fold it was held out in."""
    from sklearn.exceptions import ConvergenceWarning

    predicted = np.full(len(y), -1, dtype=np.int64)
    every = np.arange(len(y))
    for test in folds:
        train = np.setdiff1d(every, test)
        model = knn_model(len(train), settings) if kind == "knn" else linear_model(settings)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # max_iter is the probe's budget, the same for all
            model.fit(x[train], y[train])
            predicted[test] = model.predict(x[test])
    return predicted


def scores(y: np.ndarray, predicted: np.ndarray, classes: np.ndarray) -> dict[str, float]:
    """Macro-F1 over `classes` (the classes of the probed cells; a class's F1 is 0 where undefined, as
    sklearn's f1_score(labels=classes, zero_division=0)) and balanced accuracy (mean recall over the classes
    present in `y`, as sklearn's balanced_accuracy_score). From one confusion matrix: the bootstrap calls this
    thousands of times."""
    from mil.protocol.metrics import confusion_matrix

    n = int(max(classes.max(), y.max(), predicted.max())) + 1
    cm = confusion_matrix(y, predicted, n).astype(float)  # (n, n) rows true, columns predicted
    tp, support, called = np.diag(cm), cm.sum(axis=1), cm.sum(axis=0)
    denominator = support + called
    f1 = np.divide(2 * tp, denominator, out=np.zeros(n), where=denominator > 0)
    present = support > 0
    return {
        "macro_f1": float(f1[classes].mean()),
        "balanced_accuracy": float((tp[present] / support[present]).mean()),
    }


def group_resamples(groups: np.ndarray, settings: ProbeSettings) -> list[np.ndarray]:
    """Cell indices of each bootstrap replicate: groups drawn with replacement, each with all its cells."""
    names, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(names))]
    draws = np.random.default_rng(settings.seed).integers(0, len(names), size=(settings.n_boot, len(names)))
    return [np.concatenate([members[g] for g in draw]) for draw in draws]


def _interval(values: list[float], level: float) -> tuple[float, float]:
    lo, hi = np.percentile(np.asarray(values), [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
    return float(lo), float(hi)


def scored(y, predicted, classes, resamples, settings: ProbeSettings) -> dict[str, float]:
    """Point value and CI of each metric: {"macro_f1": .., "macro_f1_lo": .., "macro_f1_hi": .., ...}."""
    point = scores(y, predicted, classes)
    reps = [scores(y[idx], predicted[idx], classes) for idx in resamples]
    out = {}
    for metric in METRICS:
        lo, hi = _interval([r[metric] for r in reps], settings.level)
        out.update({metric: point[metric], f"{metric}_lo": lo, f"{metric}_hi": hi})
    return out


def paired_difference(y, predicted_a, predicted_b, classes, resamples, settings: ProbeSettings) -> dict[str, float]:
    """Macro-F1 of a minus b on the same cells and the same group resamples: difference and its CI."""
    diff = scores(y, predicted_a, classes)["macro_f1"] - scores(y, predicted_b, classes)["macro_f1"]
    reps = [
        scores(y[idx], predicted_a[idx], classes)["macro_f1"] - scores(y[idx], predicted_b[idx], classes)["macro_f1"]
        for idx in resamples
    ]
    lo, hi = _interval(reps, settings.level)
    return {"diff": float(diff), "lo": lo, "hi": hi}


def patient_probe(means: dict[str, np.ndarray], diagnosis: dict[str, str], settings: ProbeSettings) -> dict:
    """Diagnosis from each patient's mean cell feature: logistic regression, stratified k-fold over patients,
    macro-F1 and balanced accuracy with patient-bootstrap CIs. Patients without a diagnosis are left out."""
    from sklearn.model_selection import StratifiedKFold

    pids = sorted(p for p in means if diagnosis.get(p))
    if not pids:
        raise InputError("no patient of the bags has a diagnosis in the patient table; check --patients")
    names = sorted({diagnosis[p] for p in pids})
    y = np.array([names.index(diagnosis[p]) for p in pids], dtype=np.int64)
    x = np.stack([means[p] for p in pids])  # (P, D)
    n_folds = min(settings.n_folds, int(np.bincount(y).min()))
    if len(names) < 2 or n_folds < 2:
        counts = dict(zip(names, np.bincount(y).tolist(), strict=True))
        raise InputError(f"the patient probe needs 2 diagnoses with 2 patients each; the bags' patients have {counts}")
    splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=settings.seed)
    folds = [test for _, test in splitter.split(x, y)]
    predicted = out_of_fold("linear", x, y, folds, settings)
    resamples = group_resamples(np.array(pids), settings)
    result = scored(y, predicted, np.arange(len(names)), resamples, settings)
    return {**result, "patients": len(pids), "folds": n_folds, "diagnoses": names}
