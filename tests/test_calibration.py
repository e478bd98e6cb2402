"""Calibration (mil.protocol.calibration, mil.compare.trust): temperature scaling fitted on the inner validation
patients only and stored with the model, count heads' cross-validated calibration, binary thresholds, abstention."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_compare import fake_bag, read_csv, write_cohort

from features.bags import write_bag
from mil.cell_table import PatientTable
from mil.compare import load_compare_config, run_compare
from mil.compare.report import write_report
from mil.protocol.abstention import at_coverage, refer_below, risk_coverage
from mil.protocol.calibration import apply_temperature, brier_score, choose_threshold, fit_temperature
from mil.protocol.metrics import expected_calibration_error


def test_temperature_recovers_over_confidence_and_lowers_ece():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(4000, 3)) * 1.5
    true = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    y = np.array([rng.choice(3, p=p) for p in true])
    sharp = np.exp(3 * z) / np.exp(3 * z).sum(axis=1, keepdims=True)  # over-confident: logits x3
    t = fit_temperature(sharp[:2000], y[:2000])
    assert t == pytest.approx(3.0, rel=0.1)
    after = apply_temperature(sharp[2000:], t)
    assert (after.argmax(1) == sharp[2000:].argmax(1)).all()  # temperature never changes the call
    assert expected_calibration_error(y[2000:], after) < expected_calibration_error(y[2000:], sharp[2000:]) / 2
    assert brier_score(y[2000:], after) < brier_score(y[2000:], sharp[2000:])
    assert brier_score(np.array([0, 1]), np.array([[1.0, 0.0], [1.0, 0.0]])) == pytest.approx(1.0)
    assert fit_temperature(np.zeros((0, 3)), np.zeros(0)) == 1.0


def test_threshold_and_abstention_helpers():
    p = np.array([0.1, 0.2, 0.3, 0.35, 0.4, 0.9])
    positive = np.array([0, 0, 0, 1, 1, 1], dtype=bool)
    t = choose_threshold(p, positive)
    assert 0.3 < t <= 0.35  # separates the classes perfectly, where the argmax (0.5) misses two positives
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.55, 0.45]])
    y = np.array([0, 1, 1, 0])
    curve = risk_coverage(y, probs)  # confidence order: 0.9 (right), 0.8 (wrong), 0.6 (right), 0.55 (right)
    assert curve["accuracy"].tolist() == [1.0, 0.5, 2 / 3, 0.75]
    assert curve["aurc"] == pytest.approx(np.mean([0, 0.5, 1 / 3, 0.25]))
    assert at_coverage(curve, 1.0) == 0.75 and at_coverage(curve, 0.5) == 0.5
    assert refer_below(probs, 0.6).tolist() == [False, False, False, True]


def test_temperature_is_fitted_on_the_folds_validation_patients_only(tmp_path, monkeypatch):
    """The runner hands calibration the validation patients' probabilities (spied), never a test patient's; the
    temperature and conformal scores stored in each bundle are those of its fold's validation patients."""
    from mil.compare import runner
    from mil.heads.bundle import load_head_bundle

    torch.set_num_threads(1)
    bags, patients = write_cohort(tmp_path, n_per_class=6)
    seen = []
    real = runner.attention_trust

    def spy(val_probs, y_val, val_patients):
        seen.append((np.array(val_probs), np.array(y_val), list(val_patients)))
        return real(val_probs, y_val, val_patients)

    monkeypatch.setattr(runner, "attention_trust", spy)
    config = load_compare_config(None, heads="mean", folds=3, seeds=1, n_boot=100)
    config.train = {**config.train, "max_epochs": 3, "hidden_dim": 8}
    result = run_compare(config, bags=bags, patients=patients, out=tmp_path / "out", log=lambda *_: None)
    assert len(seen) == len(result.splits.splits)
    for fs, (val_probs, y_val, val_patients) in zip(result.splits.splits, seen):
        assert val_patients == list(fs.val) and not set(val_patients) & set(fs.test)
        assert len(val_probs) == len(fs.val)
        stored = load_head_bundle(tmp_path / "out" / "models" / "mean" / f"{fs.name}.pt").meta["calibration"]
        assert stored["calibration_patients"] == list(fs.val)
        assert stored["temperature"] == pytest.approx(fit_temperature(val_probs, y_val))
        assert len(stored["conformal"]["scores"]) == len(fs.val)
        trust = result.trust["mean"][fs.name]
        rows = [result.patients.index(p) for p in fs.test]
        np.testing.assert_allclose(result.calibrated["mean"][0, rows], trust.calibrate(result.probs["mean"][0, rows]))


def test_count_heads_calibrate_within_training_patients_and_binary_thresholds(tmp_path):
    """Two diagnoses: count heads carry a CalibratedClassifierCV fitted on train + val, their conformal scores are
    out-of-fold probabilities of those patients, and summary reports balanced accuracy at argmax and threshold."""
    rng = np.random.default_rng(3)
    rows = []
    for i in range(30):
        pid, dx = f"B{i:02d}", int(i % 3 == 0)  # imbalanced: a third are AML
        write_bag(tmp_path / "bags" / f"{pid}.h5", fake_bag(pid, dx, rng))
        rows.append({"patient_id": pid, "diagnosis": ["ALL", "AML"][dx]})
    PatientTable(rows=rows).write(tmp_path / "patients.csv")
    config = load_compare_config(None, heads="count.logreg,count.rf", folds=3, seeds=1, n_boot=100)
    config.count_heads = {"count.rf": {"n_estimators": 30}}  # a small forest keeps the test fast
    out = tmp_path / "out"
    result = run_compare(config, bags=tmp_path / "bags", patients=tmp_path / "patients.csv", out=out,
                         log=lambda *_: None)  # fmt: skip
    write_report(result, config, out)
    for fs in result.splits.splits:
        record = json.loads((out / "models" / "count.rf" / f"{fs.name}.json").read_text())
        calibration = record["calibration"]
        assert calibration["method"].startswith("sigmoid-cv")
        assert sorted(calibration["calibration_patients"]) == sorted(fs.train + fs.val)
        assert len(calibration["conformal"]["scores"]) == len(fs.train + fs.val)
        assert 0.0 <= calibration["threshold"] <= 1.0
        assert (out / "models" / "count.rf" / f"{fs.name}.calibrated.skops").exists()
    summary = {r["head"]: r for r in read_csv(out / "summary.csv")}
    for head in ("count.logreg", "count.rf"):
        assert 0.0 <= float(summary[head]["balanced_accuracy_threshold"]) <= 1.0
        assert float(summary[head]["balanced_accuracy_argmax"]) >= 0.5
    predictions = read_csv(out / "predictions.csv")
    assert {r["predicted_threshold"] for r in predictions} <= {"ALL", "AML"}
    assert "## Binary threshold" in (out / "summary.md").read_text()

    # mil predict applies each fold's stored calibration: its model reproduces the comparison on its test patients
    from mil.cli import main

    assert main(["predict", "--results", str(out), "--bags", str(tmp_path / "bags"), "--out", str(tmp_path / "pred"),
                 "--n-boot", "100"]) == 0  # fmt: skip
    applied = {(r["head"], r["model"], r["patient_id"]): r for r in read_csv(tmp_path / "pred" / "predictions.csv")}
    for r in predictions:
        mine = applied[(r["head"], f"seed{r['seed']}_fold{r['fold']}", r["patient_id"])]
        for c in ("ALL", "AML"):
            assert float(mine[f"cal_{c}"]) == pytest.approx(float(r[f"cal_{c}"]), abs=1e-6)
        assert (mine["set"], mine["set_classwise"]) == (r["set"], r["set_classwise"])
        assert mine["predicted_threshold"] == r["predicted_threshold"]
