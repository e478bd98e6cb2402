"""Conformal prediction sets (mil.protocol.conformal) against crepes, their coverage guarantee, and the ensembles,
sets and referral of `mil compare` / `mil predict` recomputed from predictions.csv (issue 12)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from test_compare import read_csv
from test_external import write_two_cohorts

from mil.cli import main
from mil.protocol import classification_metrics
from mil.protocol.conformal import ConformalCalibration, conformal_quantile, coverage, majority_sets


def _probs(rng, n, c=3, sharp=2.0):
    z = rng.normal(size=(n, c)) * sharp
    return np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)


@pytest.mark.parametrize("n,level", [(20, 0.9), (37, 0.9), (50, 0.8), (101, 0.95), (8, 0.85)])
def test_sets_match_crepes_without_smoothing(n, level):
    """crepes includes a diagnosis when its p-value (#{cal >= s} + 1)/(n + 1) >= 1 - level; away from the
    boundary where (n + 1)(1 - level) is a whole number that is exactly the split-conformal quantile rule."""
    crepes = pytest.importorskip("crepes")
    rng = np.random.default_rng(n)
    cal_probs, y_cal = _probs(rng, n), rng.integers(0, 3, n)
    test_probs = _probs(rng, 200)
    cal = ConformalCalibration.from_probs(cal_probs, y_cal)
    assert not float((n + 1) * (1 - level)).is_integer()
    theirs = crepes.ConformalClassifier().fit(cal.scores).predict_set(1 - test_probs, confidence=level, smoothing=False)
    np.testing.assert_array_equal(cal.sets(test_probs, level), theirs.astype(bool))
    # class-conditional: crepes' Mondrian classifier with the calibration diagnoses as categories, asked per diagnosis
    mondrian = crepes.ConformalClassifier().fit(cal.scores, bins=cal.labels)
    for c in range(3):
        if not (cal.labels == c).any():
            continue
        p = mondrian.predict_p(1 - test_probs[:, c], bins=np.full(len(test_probs), c), smoothing=False)
        n_c = int((cal.labels == c).sum())
        if float((n_c + 1) * (1 - level)).is_integer():
            continue  # crepes' >= keeps one more calibration rank there (conservative); see the next test
        np.testing.assert_array_equal(cal.sets(test_probs, level, classwise=True)[:, c], p >= 1 - level)


def test_quantile_rank_and_boundaries():
    scores = np.arange(1, 10) / 10  # 0.1 .. 0.9, n = 9
    assert conformal_quantile(scores, 0.9) == pytest.approx(0.9)  # rank ceil(10 * 0.9) = 9
    assert conformal_quantile(scores, 0.8) == pytest.approx(0.8)
    assert conformal_quantile(scores, 0.95) == float("inf")  # rank 10 > 9: every diagnosis
    assert conformal_quantile(np.array([]), 0.9) == float("inf")
    cal = ConformalCalibration(scores=np.array([0.2, 0.3]), labels=np.array([0, 0]), num_classes=2)
    # class 0: rank ceil(3 x 0.6) = 2, q = 0.3 < 0.9; class 1 has no calibration patient: always in the set
    assert cal.sets(np.array([[0.1, 0.9]]), 0.6, classwise=True).tolist() == [[False, True]]
    assert majority_sets(np.array([[[1, 0, 1]], [[1, 1, 0]], [[0, 0, 1]]])).tolist() == [[True, False, True]]


def test_split_conformal_covers_at_the_level_on_exchangeable_patients():
    """Averaged over many draws, coverage lies in [level, level + 1/(n+1)] (both variants, every diagnosis)."""
    rng = np.random.default_rng(0)
    n, level, hits, hits_c = 59, 0.9, [], []
    for _ in range(300):
        true = _probs(rng, n + 100, sharp=1.5)  # each patient's diagnosis is drawn from its own probabilities
        y = np.array([rng.choice(3, p=p) for p in true])
        cal = ConformalCalibration.from_probs(true[:n], y[:n])
        hits.append(cal.sets(true[n:], level)[np.arange(100), y[n:]])
        hits_c.append(cal.sets(true[n:], level, classwise=True)[np.arange(100), y[n:]])
    assert level - 0.01 <= np.mean(hits) <= level + 1 / (n + 1) + 0.01
    assert level - 0.01 <= np.mean(hits_c) <= level + 0.05
    report = coverage(np.array([0, 1, 1]), np.array([[1, 0], [1, 0], [1, 1]], dtype=bool))
    assert report["coverage"] == pytest.approx(2 / 3) and report["coverage_per_class"].tolist() == [1.0, 0.5]
    assert report["set_size"] == pytest.approx(4 / 3) and report["empty"] == 0.0


def _thresholds(out, head, seed, level, classwise):
    """A saved model's conformal thresholds, recomputed from the calibration scores stored with it."""
    import json

    import torch

    if head.startswith("count."):
        record = json.loads((out / "models" / head / f"seed{seed}_external.json").read_text())["calibration"]
    else:
        path = out / "models" / head / f"seed{seed}_external.pt"
        record = torch.load(path, weights_only=True)["meta"]["calibration"]
    scores, labels = np.array(record["conformal"]["scores"]), np.array(record["conformal"]["labels"])
    if not classwise:
        return np.full(3, conformal_quantile(scores, level))
    return np.array([conformal_quantile(scores[labels == c], level) for c in range(3)])


def _set_hit(row, dx):
    return dx in row.split("|") if row else False


def test_ensemble_rows_and_sets_are_recomputed_from_predictions_csv(tmp_path):
    bags, patients, rows = write_two_cohorts(tmp_path, n=32)
    out = tmp_path / "ext"
    args = ["compare", "--bags", str(bags), "--patients", str(patients), "--out", str(out), "--heads",
            "count.logreg,mean", "--train-where", "cohort=D", "--test-where", "cohort=V", "--seeds", "3",
            "--n-boot", "100", "--max-epochs", "3", "--conformal-level", "0.8"]  # fmt: skip
    assert main(args) == 0
    table = read_csv(out / "predictions.csv")
    summary = {r["head"]: r for r in read_csv(out / "summary.csv")}
    assert list(summary) == ["count.logreg", "count.logreg.ensemble", "mean", "mean.ensemble"]
    classes = ["ALL", "AML", "CML"]
    for head in ("count.logreg", "mean"):
        members = [r for r in table if r["head"] == head]
        ensemble = [r for r in table if r["head"] == f"{head}.ensemble"]
        assert len(members) == 3 * len(ensemble) and {r["seed"] for r in ensemble} == {"all"}
        by_patient = {}
        for r in members:
            by_patient.setdefault(r["patient_id"], []).append(r)
        for r in ensemble:
            mine = by_patient[r["patient_id"]]
            assert int(r["members"]) == 3
            for c in classes:  # the ensemble is the mean of its members (raw and calibrated), sd their spread
                values = [float(m[f"prob_{c}"]) for m in mine]
                assert float(r[f"prob_{c}"]) == pytest.approx(np.mean(values), abs=1e-6)
                assert float(r[f"sd_{c}"]) == pytest.approx(np.std(values), abs=1e-6)
                assert float(r[f"cal_{c}"]) == pytest.approx(np.mean([float(m[f"cal_{c}"]) for m in mine]), abs=1e-6)
            for key, classwise in (("set", False), ("set_classwise", True)):  # mean probability, mean threshold
                limit = np.mean([_thresholds(out, head, m["seed"], 0.8, classwise) for m in mine], axis=0)
                expected = {c for k, c in enumerate(classes) if 1 - float(r[f"cal_{c}"]) <= limit[k] + 1e-6}
                assert set(filter(None, r[key].split("|"))) == expected
        # the ensemble row's metrics, recomputed from predictions.csv
        y = np.array([classes.index(r["true"]) for r in ensemble])
        probs = np.array([[float(r[f"prob_{c}"]) for c in classes] for r in ensemble])
        m = classification_metrics(y, probs)
        row = summary[f"{head}.ensemble"]
        for key in ("macro_f1", "balanced_accuracy", "accuracy", "auroc", "ece"):
            assert float(row[key]) == pytest.approx(m[key], abs=1.5e-3), key
        for name, rows_ in ((head, members), (f"{head}.ensemble", ensemble)):  # coverage from the set columns
            hits = [_set_hit(r["set"], r["true"]) for r in rows_]
            assert float(summary[name]["coverage"]) == pytest.approx(np.mean(hits), abs=1.5e-3)
            sizes = [len(r["set_classwise"].split("|")) if r["set_classwise"] else 0 for r in rows_]
            assert float(summary[name]["set_size_classwise"]) == pytest.approx(np.mean(sizes), abs=1.5e-3)
    text = (out / "summary.md").read_text()
    for section in ("## Calibration", "## Conformal prediction sets (80%", "## Abstention"):
        assert section in text
    for name in ("reliability_mean.png", "reliability_mean.ensemble.png", "risk_coverage_count.logreg.png"):
        assert (out / name).stat().st_size > 0

    # mil predict on the external patients: the same calibrated ensemble and sets, and referral
    held_back = tmp_path / "held_back"
    held_back.mkdir()
    external = sorted({r["patient_id"] for r in ensemble})
    for p in external:
        shutil.copy(bags / f"{p}.h5", held_back / f"{p}.h5")
    pred = tmp_path / "pred"
    assert main(["predict", "--results", str(out), "--bags", str(held_back), "--patients", str(patients),
                 "--out", str(pred), "--n-boot", "100", "--refer-below", "0.7"]) == 0  # fmt: skip
    predicted = read_csv(pred / "predictions.csv")
    for head in ("count.logreg", "mean"):
        ours = {r["patient_id"]: r for r in predicted if r["head"] == head and r["model"] == "ensemble"}
        theirs = {r["patient_id"]: r for r in table if r["head"] == f"{head}.ensemble"}
        for p in external:
            for c in classes:
                assert float(ours[p][f"cal_{c}"]) == pytest.approx(float(theirs[p][f"cal_{c}"]), abs=1e-5)
            assert ours[p]["set"] == theirs[p]["set"]  # level 0.8 read from the comparison's config
            assert ours[p]["set_classwise"] == theirs[p]["set_classwise"]
            top = max(float(ours[p][f"cal_{c}"]) for c in classes)
            assert ours[p]["referred"] == str(int(top < 0.7))
        kept = [p for p in external if ours[p]["referred"] == "0"]
        rows_ = {r["head"]: r for r in read_csv(pred / "summary.csv")}
        if kept:
            second = rows_[f"{head} (referred left out)"]
            assert int(second["patients"]) == len(kept)
            y = np.array([classes.index(ours[p]["true"]) for p in kept])
            probs = np.array([[float(ours[p][f"prob_{c}"]) for c in classes] for p in kept])
            assert float(second["accuracy"]) == pytest.approx(float((probs.argmax(1) == y).mean()), abs=1.5e-3)
    assert "(referred left out)" in (pred / "summary.md").read_text()

    # the attention report's records carry the probability, the interval over members and the set
    from mil.attention.load import load_patients

    records, _ = load_patients(pred, head="mean", with_models=False)
    ours = {r["patient_id"]: r for r in predicted if r["head"] == "mean" and r["model"] == "ensemble"}
    for record in records:
        row = ours[record.patient_id]
        column = f"cal_{row['predicted']}"
        values = [float(r[column]) for r in predicted if r["head"] == "mean" and r["model"] != "ensemble"
                  and r["patient_id"] == record.patient_id]  # fmt: skip
        assert record.probability == pytest.approx(float(row[column]))
        assert record.interval == pytest.approx((min(values), max(values)))
        assert record.prediction_set.startswith(row["set"].replace("|", ", ") or "(empty)")
    assert main(["predict", "--results", str(out), "--bags", str(held_back), "--out", str(tmp_path / "x"),
                 "--refer-below", "1.5"]) == 2  # fmt: skip


def test_attention_report_shows_probability_interval_and_set(tmp_path):
    from test_attention_report import _patient

    from mil.attention.report import build_report

    shown = _patient(tmp_path, "p1", "AML", seed=1)
    shown.probability, shown.interval, shown.prediction_set = 0.8123, (0.7, 0.9), "AML, CML"
    bare = _patient(tmp_path, "p2", "ALL", seed=2)
    build_report([shown, bare], tmp_path / "report", head="abmil", top_k=4)
    index = (tmp_path / "report" / "index.html").read_text()
    assert "probability [members]" in index and "0.81 [0.70, 0.90]" in index and "AML, CML" in index
    page = next(p for p in (tmp_path / "report" / "patients").glob("p1-*.html")).read_text()
    assert "probability 0.81 [0.70, 0.90]" in page and "conformal prediction set <b>{AML, CML}</b>" in page
    assert "conformal" not in next((tmp_path / "report" / "patients").glob("p2-*.html")).read_text()
