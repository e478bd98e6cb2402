"""`mil probe` on synthetic features written through the production bag writer: its numbers are those of a
scikit-learn probe written here independently, a better encoder wins the paired comparison, and the patient
probe and the picture are written."""

from __future__ import annotations

import csv
import warnings

import numpy as np
import pytest

from features.bags import Bag, write_bag
from mil.cell_table import PatientTable
from mil.cli import main

CLASSES = ["blast", "lymphocyte", "neutrophil"]
PATIENTS = [f"P{i:02d}" for i in range(10)]
DIM = 16


def write_folder(root, name: str, signal: float, seed: int) -> None:
    """One bag per patient: 12 cells, label 0..2 (two unlabelled), features = signal * class centre + noise, plus a
    shift by diagnosis so the patient probe has something to find."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(size=(len(CLASSES), DIM))
    folder = root / name
    for p, pid in enumerate(PATIENTS):
        labels = np.array([i % 3 for i in range(12)], dtype=np.int64)
        labels[:2] = -1  # unlabelled cells: in the patient mean, never in the cell probes
        x = signal * centres[np.maximum(labels, 0)] + rng.normal(size=(12, DIM))
        x[:, 0] += 1.5 * (p % 2)  # diagnosis B patients are shifted
        bag = Bag(
            patient_id=pid,
            features=x.astype(np.float32),
            boxes=np.tile(np.array([0, 0, 10, 10], dtype=np.int32), (12, 1)),
            image_index=(np.arange(12) // 4).astype(np.int32),
            image_paths=[f"/data/{pid}_{k}.png" for k in range(3)],
            cell_id=[f"{pid}:{i}" for i in range(12)],
            label=labels,
            attrs={
                "encoder_config": {"name": f"{name}.test", "embed_dim": DIM, "input_size": 32},
                "label_classes": CLASSES,
                "cell_table_fingerprint": "x",
            },
        )
        write_bag(folder / f"{pid}.h5", bag)


def independent_probe(root, name: str):
    """What the probe promises, in plain scikit-learn: patients sorted, cells in bag order, labelled cells only."""
    import h5py
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score, f1_score
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    xs, ys, gs, means = [], [], [], []
    for pid in PATIENTS:
        with h5py.File(root / name / f"{pid}.h5", "r") as f:
            x, y = f["features"][()].astype(np.float64), f["label"][()]
        means.append(x.mean(0))
        xs.append(x[y >= 0])
        ys.append(y[y >= 0])
        gs += [pid] * int((y >= 0).sum())
    x, y, g = np.concatenate(xs), np.concatenate(ys), np.array(gs)
    out = {}
    splits = list(StratifiedGroupKFold(n_splits=5, shuffle=True, random_state=0).split(x, y, g))
    for kind in ("knn", "linear"):
        predicted = np.zeros(len(y), dtype=int)
        for train, test in splits:
            if kind == "knn":
                model = KNeighborsClassifier(n_neighbors=20, metric="cosine")
            else:
                model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, class_weight="balanced"))
            predicted[test] = model.fit(x[train], y[train]).predict(x[test])
        out[kind] = predicted
        out[f"{kind}_macro_f1"] = f1_score(y, predicted, average="macro")
        out[f"{kind}_balanced_accuracy"] = balanced_accuracy_score(y, predicted)
    dx = np.array([p % 2 for p in range(len(PATIENTS))])
    xp, predicted = np.stack(means), np.zeros(len(dx), dtype=int)
    for train, test in StratifiedKFold(n_splits=5, shuffle=True, random_state=0).split(xp, dx):
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, class_weight="balanced"))
        predicted[test] = model.fit(xp[train], dx[train]).predict(xp[test])
    out["patient_macro_f1"] = f1_score(dx, predicted, average="macro")
    out["patient_balanced_accuracy"] = balanced_accuracy_score(dx, predicted)
    return out


@pytest.fixture
def folders(tmp_path):
    write_folder(tmp_path, "good", signal=2.0, seed=1)
    write_folder(tmp_path, "noise", signal=0.0, seed=2)
    rows = [{"patient_id": pid, "diagnosis": "AB"[p % 2]} for p, pid in enumerate(PATIENTS)]
    PatientTable(rows=rows).write(tmp_path / "patients.csv")
    return tmp_path


def test_probe_reproduces_an_independent_sklearn_probe(folders, monkeypatch):
    monkeypatch.setenv("MIL_PROGRESS", "0")
    out = folders / "probe"
    argv = ["probe", "--bags", str(folders / "noise"), str(folders / "good"), "--patients",
            str(folders / "patients.csv"), "--out", str(out), "--n-boot", "200", "--plot", "none"]  # fmt: skip
    assert main(argv) == 0
    rows = {r["encoder"]: r for r in csv.DictReader((out / "probe.csv").read_text().splitlines())}
    assert list(rows) == ["noise", "good"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in rows:
            expected = independent_probe(folders, name)
            for key in ("knn_macro_f1", "knn_balanced_accuracy", "linear_macro_f1", "linear_balanced_accuracy",
                        "patient_macro_f1", "patient_balanced_accuracy"):  # fmt: skip
                assert abs(float(rows[name][key]) - expected[key]) < 1e-6, (name, key)
                assert float(rows[name][f"{key}_lo"]) <= float(rows[name][key]) + 1e-9
            predictions = list(csv.DictReader((out / "predictions.csv").read_text().splitlines()))
            assert [CLASSES.index(r[f"{name}_knn"]) for r in predictions] == expected["knn"].tolist()
    good = rows["good"]
    assert rows["good"]["cells"] == "100" and good["grouped_by"] == "patient"
    # The class signal wins the paired comparison against noise on the same cells, with a CI above 0.
    assert float(good["knn_diff_lo"]) > 0 and float(good["linear_diff_lo"]) > 0
    assert "knn_diff_diff" not in rows["noise"] or rows["noise"]["knn_diff_diff"] == ""
    table = (out / "probe.md").read_text()
    assert "| good |" in table and "(reference)" in table and "patient macro-F1" in table


def test_probe_groups_by_image_without_patients_and_draws_a_map(folders, monkeypatch):
    from mil.probe.probe import ProbeSettings
    from mil.probe.runner import run_probe

    monkeypatch.setenv("MIL_PROGRESS", "0")
    settings = ProbeSettings(n_folds=15, n_boot=20)  # 10 patients cannot fill 15 folds: images (30) can
    result = run_probe([folders / "good"], out=folders / "p2", settings=settings, plot="tsne")
    assert result.rows[0]["grouped_by"] == "image"
    assert result.plot is not None and result.plot.stat().st_size > 1000
