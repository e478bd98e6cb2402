"""The shared protocol: seeded patient splits (hash, reuse, refusal, no leakage), metrics, bootstrap, paired test."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score
from sklearn.metrics import confusion_matrix as sk_confusion

from mil.errors import ConfigError, InputError
from mil.protocol import (
    bootstrap_metrics,
    classification_metrics,
    crossfit_plan,
    expected_calibration_error,
    load_or_create_splits,
    make_splits,
    paired_bootstrap,
    read_splits,
)
from mil.protocol.splits import write_splits


def cohort(n=30, classes=("ALL", "AML", "CML")) -> dict[str, str]:
    return {f"P{i:03d}": classes[i % len(classes)] for i in range(n)}


def test_same_seed_gives_byte_identical_split_files_and_another_seed_differs(tmp_path):
    a = write_splits(tmp_path / "a.json", make_splits(cohort(), folds=5, seeds=3, seed=0))
    b = write_splits(tmp_path / "b.json", make_splits(cohort(), folds=5, seeds=3, seed=0))
    c = write_splits(tmp_path / "c.json", make_splits(cohort(), folds=5, seeds=3, seed=1))
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    assert read_splits(a).sha256 == json.loads(a.read_text())["sha256"]
    assert read_splits(a).sha256 != read_splits(c).sha256


@pytest.mark.parametrize("n, folds", [(30, 5), (17, 3), (50, 10)])
def test_no_patient_is_in_two_of_train_val_test_and_every_seed_tests_everyone_once(n, folds):
    patients = cohort(n)
    splits = make_splits(patients, folds=folds, seeds=3, seed=7)
    assert len(splits.splits) == folds * 3
    for seed in splits.seeds:
        tested = []
        for fs in (x for x in splits.splits if x.seed == seed):
            train, val, test = set(fs.train), set(fs.val), set(fs.test)
            assert not (train & test) and not (val & test) and not (train & val)
            assert train | val | test == set(patients)
            assert val, "an inner validation split exists for early stopping"
            # stratified: every diagnosis is in every test fold when each has >= folds patients
            assert {patients[p] for p in test} == set(patients.values())
            tested += fs.test
        assert sorted(tested) == sorted(patients)


def test_crossfit_plan_never_trains_on_a_fold_test_patient():
    splits = make_splits(cohort(), folds=5, seeds=2)
    plan = crossfit_plan(splits)
    assert len(plan) == 10
    for fold in plan:
        assert not set(fold["train_patients"]) & set(fold["test_patients"])
        assert set(fold["train_patients"]) | set(fold["test_patients"]) == set(cohort())


def test_splits_are_reused_when_they_match_and_refused_otherwise(tmp_path):
    path = tmp_path / "splits.json"
    first, created = load_or_create_splits(path, cohort(), folds=5, seeds=2)
    before = path.read_bytes()
    again, created_again = load_or_create_splits(path, cohort(), folds=5, seeds=2)
    assert created and not created_again
    assert again.sha256 == first.sha256 and path.read_bytes() == before
    changed = dict(cohort(), P000="CML")
    with pytest.raises(ConfigError, match="P000.*diagnosis"):
        load_or_create_splits(path, changed, folds=5, seeds=2)
    with pytest.raises(ConfigError, match="P999.*new"):
        load_or_create_splits(path, {**cohort(), "P999": "ALL"}, folds=5, seeds=2)
    with pytest.raises(ConfigError, match="folds=5"):
        load_or_create_splits(path, cohort(), folds=3, seeds=2)
    data = json.loads(path.read_text())
    data["splits"][0]["test"].append(data["splits"][0]["train"].pop())  # a hand edit that leaks
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match="sha256"):
        load_or_create_splits(path, cohort(), folds=5, seeds=2)


def test_too_few_patients_of_a_diagnosis_names_it_and_the_fix():
    with pytest.raises(ConfigError, match=r"(?s)CML: 2 patient.*--folds"):
        make_splits({**cohort(12, ("ALL", "AML")), "X1": "CML", "X2": "CML"}, folds=5)


def random_predictions(seed=0, n=80, c=3):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    probs = rng.dirichlet(np.ones(c), n)
    probs[np.arange(n), y] += rng.uniform(0, 0.8, n)  # better than chance, imperfect
    return y, probs / probs.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_equal_sklearn(seed):
    y, probs = random_predictions(seed)
    pred = probs.argmax(axis=1)
    m = classification_metrics(y, probs)
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"), abs=1e-12)
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred), abs=1e-12)
    assert m["auroc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"), abs=1e-12)
    np.testing.assert_array_equal(m["confusion"], sk_confusion(y, pred, labels=[0, 1, 2]))
    cm = m["confusion"]
    for c in range(3):
        tp, fn = cm[c, c], cm[c].sum() - cm[c, c]
        fp = cm[:, c].sum() - cm[c, c]
        tn = cm.sum() - tp - fn - fp
        assert m["sensitivity"][c] == pytest.approx(tp / (tp + fn))
        assert m["specificity"][c] == pytest.approx(tn / (tn + fp))


def test_expected_calibration_error_on_known_cases():
    y = np.array([0, 0, 1, 1])
    assert expected_calibration_error(y, np.eye(2)[y]) == 0.0  # confident and right
    # always 0.8 confident, right half of the time: gap 0.3
    probs = np.array([[0.8, 0.2], [0.2, 0.8], [0.8, 0.2], [0.2, 0.8]])
    assert expected_calibration_error(y, probs) == pytest.approx(0.3)


def test_bootstrap_is_seeded_and_brackets_the_point():
    y, probs = random_predictions(0)
    other_seed = 0.7 * probs + 0.3 * np.random.default_rng(9).dirichlet(np.ones(3), len(y))
    seeds = np.stack([probs, other_seed])  # (seeds, patients, classes)
    a = bootstrap_metrics(y, seeds, n_boot=200, seed=3)
    b = bootstrap_metrics(y, seeds, n_boot=200, seed=3)
    c = bootstrap_metrics(y, seeds, n_boot=200, seed=4)
    for key in a.lo:
        np.testing.assert_array_equal(a.lo[key], b.lo[key])
        np.testing.assert_array_equal(a.hi[key], b.hi[key])
    assert a.lo["macro_f1"] != c.lo["macro_f1"]
    for key in ("macro_f1", "balanced_accuracy", "auroc", "ece"):
        assert a.lo[key] <= a.point[key] <= a.hi[key]
    assert a.hi["macro_f1"] - a.lo["macro_f1"] > 0.02  # 80 patients cannot pin macro-F1 down
    assert a.confusion.sum() == 2 * len(y)
    perfect = bootstrap_metrics(y, np.eye(3)[y], n_boot=100)
    assert perfect.lo["macro_f1"] == perfect.hi["macro_f1"] == 1.0


def test_paired_test_finds_a_real_gap_and_none_between_equal_heads():
    y, probs = random_predictions(1, n=120)
    same = paired_bootstrap(y, probs, probs.copy(), n_boot=300)
    assert same.diff == 0.0 and same.lo == 0.0 and same.hi == 0.0 and same.p_value == 1.0
    good = 0.5 * probs + 0.5 * np.eye(3)[y]
    gap = paired_bootstrap(y, good, probs, head_a="good", head_b="plain", n_boot=300)
    assert gap.diff > 0 and gap.lo > 0 and gap.p_value < 0.05
    auc = paired_bootstrap(y, good, probs, metric="auroc", n_boot=100)
    assert auc.diff > 0


def test_a_cohort_with_one_diagnosis_is_a_clear_error():
    """RELIABILITY 4 (issue 14, case 8): one diagnosis is a ConfigError naming it, not a scikit-learn traceback."""
    with pytest.raises(ConfigError, match=r"single diagnosis \(AML\).*at least two"):
        make_splits({f"P{i}": "AML" for i in range(10)}, folds=3, seeds=1)
