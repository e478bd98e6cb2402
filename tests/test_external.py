"""External validation, patient covariates and `mil predict` (issue: real cohorts), on small bags written by the
production writer. Metrics are not the point here: what is fitted on whom, what is refused, and that `mil predict`
reproduces `mil compare`'s external probabilities."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
from test_compare import DIAGNOSES, fake_bag, read_csv

from features.bags import write_bag
from mil.cell_table import PatientTable
from mil.cli import main
from mil.compare import load_compare_config, run_compare
from mil.covariates import fit_covariates, perfect_separators
from mil.errors import ConfigError
from mil.predict.run import run_predict
from mil.protocol import make_external_splits, read_splits

FAST = ["--seeds", "2", "--n-boot", "100", "--max-epochs", "3"]


def write_two_cohorts(root, n: int = 24, seed: int = 0, dim_of=None):
    """Patients P00.. with cohort D (3 of 4) or V (1 of 4), an age that follows the diagnosis a little, a sex,
    and a lymph_count with one missing value in each cohort."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        pid, dx = f"P{i:02d}", i % len(DIAGNOSES)
        write_bag(root / "bags" / f"{pid}.h5", fake_bag(pid, dx, rng))
        rows.append(
            {
                "patient_id": pid,
                "diagnosis": DIAGNOSES[dx],
                "cohort": "V" if i % 4 == 0 else "D",
                "age": f"{30 + 5 * dx + rng.normal() * 6:.1f}",
                "sex": "F" if rng.random() < 0.5 else "M",
                "lymph_count": "" if i in (1, 4) else f"{2 + dx + rng.normal():.2f}",
                "site_note": "x",
            }
        )
    PatientTable(rows=rows).write(root / "patients.csv")
    return root / "bags", root / "patients.csv", rows


def test_external_split_trains_and_selects_on_the_training_cohort_only():
    train = {f"D{i}": DIAGNOSES[i % 3] for i in range(18)}
    test = {f"V{i}": DIAGNOSES[i % 3] for i in range(6)}
    splits = make_external_splits(train, test, train_where="cohort=D", test_where="cohort=V", seeds=3)
    assert splits.is_external and len(splits.splits) == 3
    for fs in splits.splits:
        assert set(fs.test) == set(test)  # every seed scores every external patient
        assert set(fs.train) | set(fs.val) == set(train)  # the whole training cohort, val drawn from it
        assert not (set(fs.val) & set(test))  # early stopping never sees the test cohort
        assert fs.name == f"seed{fs.seed}_external"
    assert len({fs.val for fs in splits.splits}) > 1  # seeds draw different inner validation patients
    with pytest.raises(ConfigError, match="match both"):
        make_external_splits(train, {"D0": "ALL"}, train_where="a=1", test_where="b=2")
    with pytest.raises(ConfigError, match="never saw"):
        make_external_splits(train, {"V9": "MDS"}, train_where="a=1", test_where="b=2")


def test_compare_external_writes_external_results_and_refuses_a_cv_split_file(tmp_path, capsys):
    bags, patients, rows = write_two_cohorts(tmp_path)
    out = tmp_path / "ext"
    args = ["compare", "--bags", str(bags), "--patients", str(patients), "--out", str(out), "--heads"]
    ext = ["--train-where", "cohort=D", "--test-where", "cohort=V", "--folds", "3"]
    assert main(args + ["count.logreg,mean", *ext, "--with-internal-cv", *FAST]) == 0
    printed = capsys.readouterr().out
    assert "patient-table columns not used by this run: age, sex, lymph_count, site_note" in printed
    splits = read_splits(out / "splits.json")
    external = sorted(r["patient_id"] for r in rows if r["cohort"] == "V")
    assert splits.kind == "external" and splits.test_patients == external
    predictions = read_csv(out / "predictions.csv")
    assert sorted({r["patient_id"] for r in predictions}) == external  # only external patients are scored
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# External validation: trained on 18 patients (cohort=D), tested on 6 patients")
    assert "External vs internal CV of the training cohort" in summary
    internal = read_splits(out / "internal_cv" / "splits.json")
    assert internal.kind == "cv" and set(internal.patients) == {r["patient_id"] for r in rows if r["cohort"] == "D"}
    assert sorted(p.name for p in (out / "models" / "mean").iterdir()) == ["seed0_external.pt", "seed1_external.pt"]
    assert main(args + ["count.logreg,mean", *ext, *FAST]) == 0  # a rerun into the same folder reuses its splits
    assert "splits reused" in capsys.readouterr().out
    assert (out / "models" / "count.logreg" / "seed0_external.skops").exists()

    # the same folder asked for a k-fold is refused: a split file of another kind
    assert main(args + ["count.logreg", "--folds", "3", *FAST]) == 2
    assert "holds an external split (train cohort=D, test cohort=V)" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="but this run asks for a 3-fold split"):
        run_compare(load_compare_config(None, heads="count.logreg", folds=3, seeds=2), bags=bags,
                    patients=patients, out=out, log=lambda *_: None)  # fmt: skip


def test_covariate_encoder_imputes_one_hots_and_uses_training_rows_only():
    train = [
        {"patient_id": "a", "age": "10", "sex": "F", "wbc": "1"},
        {"patient_id": "b", "age": "20", "sex": "M", "wbc": ""},
        {"patient_id": "c", "age": "30", "sex": "F", "wbc": "3"},
    ]
    enc = fit_covariates(train, ["age", "sex", "wbc"])
    assert enc.names == ["age", "sex=F", "sex=M", "wbc", "wbc_missing"]
    assert enc.mean["age"] == 20.0 and enc.std["age"] == pytest.approx(np.std([10, 20, 30]))
    assert enc.mean["wbc"] == 2.0  # from the training values present only
    new = [{"patient_id": "z", "age": "1000", "sex": "X", "wbc": ""}]  # an extreme age, an unseen sex, missing wbc
    row = enc.transform(new)[0]
    assert row[0] == pytest.approx((1000 - 20) / np.std([10, 20, 30]))  # training statistics, never refitted
    assert list(row[1:3]) == [0.0, 0.0]  # unseen category: all zeros
    assert row[3] == 0.0 and row[4] == 1.0  # imputed with the training mean (z = 0), indicator set
    assert type(enc).from_dict(enc.to_dict()).transform(new).tolist() == enc.transform(new).tolist()


def test_fold_covariate_statistics_come_from_the_folds_training_patients(tmp_path, monkeypatch):
    """Each fold's encoder is fitted on exactly its train + val patients (spied on the runner)."""
    from mil.compare import runner

    bags, patients, rows = write_two_cohorts(tmp_path)
    seen = []
    real = runner._fit_fold_covariates

    def spy(config, table, fit_on):
        seen.append(sorted(fit_on))
        return real(config, table, fit_on)

    monkeypatch.setattr(runner, "_fit_fold_covariates", spy)
    config = load_compare_config(None, heads="count.logreg", folds=3, seeds=1, covariates="age,sex,lymph_count")
    result = run_compare(config, bags=bags, patients=patients, out=tmp_path / "cv", log=lambda *_: None)
    for fs, fitted in zip(result.splits.splits, seen):
        assert fitted == sorted(fs.train + fs.val) and not set(fitted) & set(fs.test)
    assert "count.covariates" in result.probs  # the clinical baseline joins every comparison with covariates
    assert result.covariates == ["age", "sex=F", "sex=M", "lymph_count", "lymph_count_missing"]


def test_an_absent_covariate_and_a_separating_one_are_refused(tmp_path, capsys):
    bags, patients, rows = write_two_cohorts(tmp_path)
    base = ["compare", "--bags", str(bags), "--patients", str(patients), "--heads", "count.logreg", "--folds", "3"]
    assert main(base + ["--out", str(tmp_path / "a"), "--covariates", "age,hb", *FAST]) == 2
    assert "covariate column(s) ['hb'] are not in" in capsys.readouterr().err
    for r in rows:
        r["subtype"] = {"ALL": "B-ALL", "AML": "AML-M2", "CML": "CML-CP"}[r["diagnosis"]]
    PatientTable(rows=rows).write(patients)
    assert main(base + ["--out", str(tmp_path / "b"), "--covariates", "age,subtype", *FAST]) == 2
    err = capsys.readouterr().err
    assert "restate the diagnosis" in err and "subtype" in err and "--allow-separating-covariates" in err
    assert main(base + ["--out", str(tmp_path / "c"), "--covariates", "subtype", "--allow-separating-covariates",
                        *FAST]) == 0  # fmt: skip
    numeric = [{"x": str(v)} for v in (1, 2, 3, 10, 11, 12)]
    assert perfect_separators(numeric, ["x"], ["a", "a", "a", "b", "b", "b"])
    assert not perfect_separators(numeric, ["x"], ["a", "b", "a", "b", "a", "b"])


def test_predict_reproduces_the_external_probabilities_and_refuses_other_bags(tmp_path, capsys):
    bags, patients, rows = write_two_cohorts(tmp_path)
    config = load_compare_config(
        None,
        heads="count.logreg,count.rf,mean,abmil",
        seeds=2,
        n_boot=100,
        train_where="cohort=D",
        test_where="cohort=V",
        covariates="age,sex,lymph_count",
    )
    config.train = {**config.train, "max_epochs": 3}
    out = tmp_path / "ext"
    compared = run_compare(config, bags=bags, patients=patients, out=out, log=lambda *_: None)
    from mil.compare.report import write_report

    write_report(compared, config, out)
    held_back = tmp_path / "held_back"  # the external cohort's bags, on their own, as new patients
    held_back.mkdir()
    for p in compared.patients:
        shutil.copy(bags / f"{p}.h5", held_back / f"{p}.h5")
    predicted = run_predict(results=out, bags=held_back, patients=patients, log=lambda *_: None)
    assert predicted.patients == compared.patients
    for head in compared.probs:
        for s, seed in enumerate(compared.splits.seeds):
            member = predicted.probs[head][f"seed{seed}_external"]
            np.testing.assert_allclose(member, compared.probs[head][s], atol=1e-6, rtol=0)
        np.testing.assert_allclose(predicted.ensemble(head), compared.probs[head].mean(axis=0), atol=1e-6, rtol=0)

    # the CLI writes the ensemble and every member, and the ensemble equals the members' mean
    assert main(["predict", "--results", str(out), "--bags", str(held_back), "--patients", str(patients),
                 "--out", str(tmp_path / "pred"), "--n-boot", "100"]) == 0  # fmt: skip
    table = read_csv(tmp_path / "pred" / "predictions.csv")
    for head in compared.probs:
        for p in compared.patients:
            mine = [r for r in table if r["head"] == head and r["patient_id"] == p]
            ens = next(r for r in mine if r["model"] == "ensemble")
            members = [r for r in mine if r["model"] != "ensemble"]
            assert len(members) == 2 and int(ens["members"]) == 2
            for c in compared.classes:
                assert float(ens[f"prob_{c}"]) == pytest.approx(np.mean([float(m[f"prob_{c}"]) for m in members]))
    assert (tmp_path / "pred" / "summary.md").read_text().startswith("# Predictions of")
    assert np.load(tmp_path / "pred" / "attention" / "abmil" / f"{compared.patients[0]}.npy").shape[0] == 2

    # one model instead of the ensemble
    one = run_predict(results=out, bags=held_back, patients=patients, model="seed1_external", log=lambda *_: None)
    assert list(one.probs["mean"]) == ["seed1_external"]

    # bags of another encoder are refused, naming both configs
    other = tmp_path / "other"
    rng = np.random.default_rng(1)
    for p in compared.patients[:2]:
        bag = fake_bag(p, 0, rng)
        bag.attrs["encoder_config"] = {"name": "other.encoder", "embed_dim": 6}
        write_bag(other / f"{p}.h5", bag)
    with pytest.raises(ConfigError, match="another encoder or preprocessing") as e:
        run_predict(results=out, bags=other, patients=patients, log=lambda *_: None)
    assert "fake.test" in str(e.value) and "other.encoder" in str(e.value)


def test_predict_needs_the_patient_table_when_models_use_covariates(tmp_path):
    bags, patients, rows = write_two_cohorts(tmp_path)
    config = load_compare_config(None, heads="count.logreg", folds=3, seeds=1, n_boot=100, covariates="age")
    out = tmp_path / "cv"
    from mil.compare.report import write_report

    write_report(run_compare(config, bags=bags, patients=patients, out=out, log=lambda *_: None), config, out)
    with pytest.raises(ConfigError, match="use covariates .*age.*--patients"):
        run_predict(results=out, bags=bags, log=lambda *_: None)
    with open(tmp_path / "p.csv", "w", newline="") as f:
        csv.writer(f).writerows([["patient_id", "diagnosis", "age"]] + [[r["patient_id"], "", r["age"]] for r in rows])
    blind = run_predict(results=out, bags=bags, patients=tmp_path / "p.csv", log=lambda *_: None)
    assert blind.truth == {} and len(blind.patients) == len(rows)  # no diagnosis needed to predict


def test_predict_refuses_an_output_folder_another_run_holds(tmp_path, capsys):
    """RELIABILITY 8: a second run into a held folder is refused, naming the first."""
    from mil.locks import output_lock

    bags, patients, rows = write_two_cohorts(tmp_path)
    config = load_compare_config(None, heads="count.logreg", folds=3, seeds=1, n_boot=100)
    out = tmp_path / "cv"
    from mil.compare.report import write_report

    write_report(run_compare(config, bags=bags, patients=patients, out=out, log=lambda *_: None), config, out)
    with output_lock(tmp_path / "pred", command="mil predict"):
        code = main(["predict", "--results", str(out), "--bags", str(bags), "--out", str(tmp_path / "pred")])
    assert code == 2 and "mil predict" in capsys.readouterr().err
    assert main(["predict", "--results", str(out), "--bags", str(bags), "--out", str(tmp_path / "pred")]) == 0


def test_covariate_offset_is_a_logistic_regression_on_training_covariates_kept_fixed(tmp_path):
    """covariate_fusion='offset': the head's covariate weights are the training patients' logistic regression,
    frozen through training (the cells learn what the covariates do not explain); 'joint' trains them."""
    import torch
    from sklearn.linear_model import LogisticRegression

    from mil.heads.data import BagRecord
    from mil.heads.train import TrainConfig, fit_predict

    rng = np.random.default_rng(0)
    records = []
    for i in range(30):
        dx = i % 2
        bag = fake_bag(f"P{i:02d}", dx, rng)
        records.append(BagRecord(f"P{i:02d}", bag.features, dx, covariates=np.array([dx + rng.normal(), rng.normal()])))
    train, val, test = records[:20], records[20:25], records[25:]
    config = TrainConfig(max_epochs=3, batch_size=4, hidden_dim=16)
    result = fit_predict("mean", train=train, val=val, test=test, num_classes=2, config=config, log_dir=tmp_path / "o")
    state = torch.load(result.best_checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    weights = state["head.covariate_classifier.weight"].numpy()
    z = (np.stack([r.covariates for r in train]) - result.covariate_shift) / result.covariate_scale
    reference = LogisticRegression(max_iter=5000, class_weight="balanced", random_state=0)
    reference.fit(z, [r.target for r in train])
    np.testing.assert_allclose(weights[1] - weights[0], reference.coef_[0], atol=1e-5)
    joint = TrainConfig(max_epochs=3, batch_size=4, hidden_dim=16, covariate_fusion="joint")
    result = fit_predict("mean", train=train, val=val, test=test, num_classes=2, config=joint, log_dir=tmp_path / "j")
    state = torch.load(result.best_checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    assert not np.allclose(state["head.covariate_classifier.weight"].numpy()[1] - state[
        "head.covariate_classifier.weight"].numpy()[0], reference.coef_[0], atol=1e-3)  # fmt: skip
