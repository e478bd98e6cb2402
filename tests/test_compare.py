"""`mil compare` end to end on small bags written by the production writer (features.bags.write_bag)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from features.bags import Bag, write_bag
from mil.cell_table import PatientTable
from mil.cli import main
from mil.compare import load_compare_config, run_compare
from mil.errors import ConfigError, InputError
from mil.protocol import crossfit_plan, read_splits

CLASSES = ["myeloblast", "lymphoblast", "segmented_neutrophil", "lymphocyte"]
DIAGNOSES = ["ALL", "AML", "CML"]
COMPOSITION = np.array([[0.05, 0.6, 0.15, 0.2], [0.6, 0.05, 0.15, 0.2], [0.05, 0.05, 0.7, 0.2]])
COUNT_HEADS = "count.logreg,count.rf,count.ratio,count.meta"


def fake_bag(pid: str, dx: int, rng: np.random.Generator, n: int = 24, with_probs: bool = False, **attrs) -> Bag:
    label = rng.choice(len(CLASSES), size=n, p=COMPOSITION[dx])
    centers = np.eye(len(CLASSES), 6) * 2.0  # each cell type has its own embedding center
    features = (centers[label] + 0.5 * rng.normal(size=(n, 6))).astype(np.float32)
    probs = None
    if with_probs:
        logits = rng.normal(size=(n, len(CLASSES)))
        logits[np.arange(n), label] += 3.0
        probs = (np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)).astype(np.float32)
    return Bag(
        patient_id=pid,
        features=features,
        boxes=np.tile([0, 0, 8, 8], (n, 1)).astype(np.int32),
        image_index=np.zeros(n, dtype=np.int32),
        image_paths=["field.png"],
        cell_id=[f"{pid}:{i}" for i in range(n)],
        label=label.astype(np.int64),
        cell_probs=probs,
        attrs={"label_classes": CLASSES, "encoder_config": {"name": "fake.test", "embed_dim": 6}, **attrs},
    )


def write_cohort(root, n_per_class: int = 5, seed: int = 0, with_probs: bool = False, bag_dir: str = "bags", **attrs):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_per_class * len(DIAGNOSES)):
        pid, dx = f"P{i:02d}", i % len(DIAGNOSES)
        write_bag(root / bag_dir / f"{pid}.h5", fake_bag(pid, dx, rng, with_probs=with_probs, **attrs))
        rows.append({"patient_id": pid, "diagnosis": DIAGNOSES[dx], "age": str(5 + i)})
    PatientTable(rows=rows).write(root / "patients.csv")
    return root / bag_dir, root / "patients.csv"


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def compare(bags, patients, out, *extra) -> int:
    args = ["compare", "--bags", str(bags), "--patients", str(patients), "--out", str(out)]
    return main(args + ["--folds", "3", "--seeds", "2", "--n-boot", "100", *extra])


def test_count_heads_write_every_result_and_a_rerun_reproduces_them(tmp_path, capsys):
    bags, patients = write_cohort(tmp_path)
    assert compare(bags, patients, tmp_path / "a", "--heads", COUNT_HEADS) == 0
    out = tmp_path / "a"
    for name in ("summary.md", "summary.csv", "paired.csv", "predictions.csv", "splits.json", "config.yaml",
                 "roc.png", "confusion_count.logreg.png"):  # fmt: skip
        assert (out / name).stat().st_size > 0, name
    summary = {r["head"]: r for r in read_csv(out / "summary.csv")}
    assert list(summary) == COUNT_HEADS.split(",")
    logreg = summary["count.logreg"]
    assert float(logreg["macro_f1_lo"]) <= float(logreg["macro_f1"]) <= float(logreg["macro_f1_hi"])
    assert float(logreg["macro_f1"]) >= 0.9  # compositions are distinct: counts suffice
    assert logreg["splits_sha256"] == read_splits(out / "splits.json").sha256
    predictions = read_csv(out / "predictions.csv")
    assert len(predictions) == 4 * 2 * 15
    assert {"patient_id", "seed", "fold", "head", "true", "predicted", "prob_ALL", "prob_CML"} <= set(predictions[0])
    assert len(read_csv(out / "paired.csv")) == 6  # every pair of 4 heads
    assert "count.logreg" in capsys.readouterr().out
    # the recorded config reads back as a config (strict, recorded facts skipped)
    assert load_compare_config(out / "config.yaml").heads == COUNT_HEADS.split(",")

    # the same command again (fresh folder): byte-identical splits, identical metrics
    assert compare(bags, patients, tmp_path / "b", "--heads", COUNT_HEADS) == 0
    assert (out / "splits.json").read_bytes() == (tmp_path / "b" / "splits.json").read_bytes()
    again = read_csv(tmp_path / "b" / "summary.csv")
    for row in again:
        row.pop("seconds")
        assert row == {k: v for k, v in summary[row["head"]].items() if k != "seconds"}
    assert (out / "predictions.csv").read_bytes() == (tmp_path / "b" / "predictions.csv").read_bytes()
    # into the same folder: the split file is reused as it is
    assert compare(bags, patients, out, "--heads", "count.logreg") == 0
    assert "splits reused" in capsys.readouterr().out
    # another seed: other splits
    assert compare(bags, patients, tmp_path / "c", "--heads", "count.logreg", "--seed", "5") == 0
    assert read_splits(tmp_path / "c" / "splits.json").sha256 != read_splits(out / "splits.json").sha256


def test_a_changed_cohort_is_refused_against_the_existing_split_file(tmp_path, capsys):
    bags, patients = write_cohort(tmp_path)
    assert compare(bags, patients, tmp_path / "out", "--heads", "count.logreg") == 0
    rows = read_csv(patients)
    rows[0]["diagnosis"] = "CML" if rows[0]["diagnosis"] != "CML" else "AML"
    PatientTable(rows=rows).write(patients)
    assert compare(bags, patients, tmp_path / "out", "--heads", "count.logreg") == 2
    assert "another cohort" in capsys.readouterr().err


def test_strict_config_and_unknown_heads(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("heads: [count.logreg]\nfoldz: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key\(s\) \['foldz'\].*did you mean 'folds'"):
        load_compare_config(bad)
    with pytest.raises(ConfigError, match="wandb"):
        load_compare_config(None, wandb="always")
    bags, patients = write_cohort(tmp_path)
    config = load_compare_config(None, heads="count.logreg,count.nope")
    with pytest.raises(ConfigError, match="abmil"):  # the message lists the valid heads of both kinds
        run_compare(config, bags=bags, patients=patients, out=tmp_path / "out", log=lambda _: None)


def test_attention_heads_share_the_splits_and_save_attention(tmp_path):
    torch.set_num_threads(1)
    bags, patients = write_cohort(tmp_path, n_per_class=4)
    config = load_compare_config(None, heads="count.logreg,mean,abmil", folds=2, seeds=1, n_boot=100)
    config.train = {**config.train, "max_epochs": 2, "patience": 2, "hidden_dim": 8, "max_cells_train": 16}
    result = run_compare(config, bags=bags, patients=patients, out=tmp_path / "out", log=lambda _: None)
    from mil.compare.report import write_report

    write_report(result, config, tmp_path / "out")
    assert set(result.probs) == {"count.logreg", "mean", "abmil"}
    np.testing.assert_allclose(result.probs["abmil"].sum(axis=-1), 1.0, atol=1e-5)
    attention = np.load(tmp_path / "out" / "attention" / "abmil" / "P00.npy")
    assert attention.shape == (1, 24)  # (seeds, cells)
    np.testing.assert_allclose(attention.sum(axis=-1), 1.0, atol=1e-5)
    assert list((tmp_path / "out" / "logs" / "abmil").glob("seed0_fold*/**/metrics.csv"))  # Lightning CSV logs
    summary = {r["head"]: r["kind"] for r in read_csv(tmp_path / "out" / "summary.csv")}
    assert summary == {"count.logreg": "count", "mean": "attention", "abmil": "attention"}
    # a fresh run of the same seeded job trains to the same predictions (CPU, deterministic)
    config.heads = ["abmil"]
    again = run_compare(config, bags=bags, patients=patients, out=tmp_path / "again", log=lambda _: None)
    np.testing.assert_array_equal(again.probs["abmil"], result.probs["abmil"])


def write_crossfit_dirs(root, splits, *, leak: bool = False):
    """One bag folder per outer fold, as a cross-fitted classifier would leave them, with its training patients."""
    for k, fold in enumerate(crossfit_plan(splits)):
        folder = root / "crossfit" / fold["name"]
        write_cohort(root / "crossfit", with_probs=True, seed=k, bag_dir=fold["name"])
        trained = fold["train_patients"] + (fold["test_patients"][:1] if leak and k == 1 else [])
        (folder / "train_patients.json").write_text(json.dumps(trained))
    return root / "crossfit"


def test_cross_fitted_counts_are_checked_for_leakage(tmp_path, capsys):
    bags, patients = write_cohort(tmp_path, with_probs=True)
    out = tmp_path / "out"
    assert compare(bags, patients, out, "--heads", "count.logreg", "--counts", "hard") == 0
    splits = read_splits(out / "splits.json")
    clean = write_crossfit_dirs(tmp_path / "clean", splits)
    assert (
        compare(bags, patients, out, "--heads", "count.logreg", "--counts", "soft", "--cell-probs-per-fold", str(clean))
        == 0
    )
    leaky = write_crossfit_dirs(tmp_path / "leaky", splits, leak=True)
    code = compare(
        bags, patients, out, "--heads", "count.logreg", "--counts", "soft", "--cell-probs-per-fold", str(leaky)
    )
    assert code == 2
    assert "trained on 1 of its test patient" in capsys.readouterr().err
    with pytest.raises(InputError, match="missing"):
        config = load_compare_config(None, heads="count.logreg", folds=3, seeds=2, counts="hard",
                                     cell_probs_per_fold=str(tmp_path / "nowhere"), n_boot=100)  # fmt: skip
        run_compare(config, bags=bags, patients=patients, out=out, log=lambda _: None)


def test_one_classifier_that_saw_the_test_patients_is_refused(tmp_path, capsys):
    everyone = [f"P{i:02d}" for i in range(15)]
    bags, patients = write_cohort(tmp_path, with_probs=True, classifier_train_patients=json.dumps(everyone))
    assert compare(bags, patients, tmp_path / "out", "--heads", "count.logreg", "--counts", "hard") == 2
    assert "was trained on" in capsys.readouterr().err
