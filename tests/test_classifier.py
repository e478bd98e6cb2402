"""Cell classifier: tiny training improves its loss, splits keep patients apart, the checkpoint is an encoder and a
count source, `mil classify` writes predictions, cross-fitting never predicts a patient with its own model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mil.cell_table import CellTable, read_cell_table, validate_cell_table

CLASSES = ("blast", "lymphocyte", "neutrophil")
# Colour and radius per class: separable, so a few CPU steps are enough to learn something.
LOOK = {"blast": ((120, 40, 160), 9), "lymphocyte": ((40, 40, 120), 5), "neutrophil": ((200, 120, 170), 7)}


def write_cohort(root, *, n_patients=6, cells_per_class=3, seed=0) -> CellTable:
    """Per patient one 96x96 field with coloured disks, through the production writer (CellTable.write)."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        img = np.full((96, 96, 3), 235, dtype=np.uint8)
        yy, xx = np.mgrid[:96, :96]
        slots = [(16 + 22 * (k % 4), 16 + 22 * (k // 4)) for k in range(len(CLASSES) * cells_per_class)]
        for k, (cx, cy) in enumerate(slots):
            label = CLASSES[k % len(CLASSES)]
            colour, radius = LOOK[label]
            jitter = rng.integers(-15, 16, size=3)
            img[(xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2] = np.clip(np.array(colour) + jitter, 0, 255)
            rows.append(
                {
                    "cell_id": f"P{p}:{k}",
                    "patient_id": f"P{p}",
                    "image_path": str(root / f"P{p}.png"),
                    "x0": cx - 10,
                    "y0": cy - 10,
                    "x1": cx + 10,
                    "y1": cy + 10,
                    "label": label,
                    "raw_label": label,
                    "source": "test",
                }
            )
        Image.fromarray(img).save(root / f"P{p}.png")
    table = CellTable(rows=rows)
    table.write(root / "cells.csv")
    return read_cell_table(root / "cells.csv")


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def test_patient_split_keeps_patients_apart(tmp_path):
    from mil.classifier.data import patient_split

    cells = write_cohort(tmp_path, n_patients=10)
    split = patient_split(cells.rows, val_fraction=0.2, test_fraction=0.2, seed=0)
    parts = [set(split[k]) for k in ("train", "val", "test")]
    assert parts[0] & parts[1] == set() and parts[0] & parts[2] == set() and parts[1] & parts[2] == set()
    assert set().union(*parts) == set(cells.patients())
    assert all(len(p) >= 1 for p in parts)
    assert patient_split(cells.rows, val_fraction=0.2, test_fraction=0.2, seed=0) == split


def test_augment_keeps_shape_and_range():
    from mil.classifier.data import AugmentConfig, smear_augment

    x = torch.rand(3, 16, 16)
    out = smear_augment(x, AugmentConfig(), torch.Generator().manual_seed(0))
    assert out.shape == x.shape and float(out.min()) >= 0 and float(out.max()) <= 1
    assert not torch.equal(out, x)


@pytest.mark.parametrize("imbalance", ["weighted_loss", "sampler"])
def test_tiny_classifier_loss_decreases_and_writes_outputs(tmp_path, imbalance):
    from mil.classifier.train import ClassifierConfig, train_classifier

    cells = write_cohort(tmp_path)
    config = ClassifierConfig(
        arch="test_resnet",
        init="random",
        crop_size=32,
        max_epochs=6,
        batch_size=16,
        lr=3e-3,
        imbalance=imbalance,
        seed=1,
    )
    split = {"train": ["P0", "P1", "P2", "P3"], "val": ["P4"], "test": ["P5"]}
    result = train_classifier(cells, out_dir=tmp_path / "clf", config=config, split=split)
    losses = result.history["train_loss"]
    assert len(losses) == 6 and losses[-1] < losses[0]
    # The weights kept are those of the epoch with the lowest validation loss.
    assert result.history["best_epoch"] == int(np.argmin(result.history["val_loss"]))
    assert result.class_names == list(CLASSES)
    assert set(result.test_cell_ids) == {r["cell_id"] for r in cells.rows if r["patient_id"] == "P5"}
    assert np.allclose(result.test_probs.sum(axis=1), 1, atol=1e-5)
    for key in ("macro_f1", "macro_auroc", "balanced_accuracy", "per_class", "confusion_matrix"):
        assert key in result.metrics
    assert set(result.metrics["per_class"]) == set(CLASSES)
    assert np.asarray(result.metrics["confusion_matrix"]).sum() == len(result.test_cell_ids)
    summary = json.loads((tmp_path / "clf" / "metrics.json").read_text())
    assert summary["split"] == split
    assert (tmp_path / "clf" / "confusion_test.png").read_bytes()[:4] == b"\x89PNG"
    ckpt = torch.load(result.checkpoint, weights_only=True)
    assert ckpt["format"] == "cytomil-classifier/1" and ckpt["class_names"] == list(CLASSES)
    assert ckpt["arch"] == "test_resnet" and ckpt["input_size"] == 32


def test_split_with_patient_in_two_parts_is_refused(tmp_path):
    from mil.classifier.train import ClassifierConfig, train_classifier
    from mil.errors import InputError

    cells = write_cohort(tmp_path, n_patients=3)
    with pytest.raises(InputError, match="P1"):
        train_classifier(
            cells,
            out_dir=tmp_path / "x",
            config=ClassifierConfig(arch="test_resnet", init="random", crop_size=32),
            split={"train": ["P0", "P1"], "val": ["P1"], "test": ["P2"]},
        )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny trained checkpoint shared by the encoder / count-source / CLI tests."""
    from mil.classifier.train import ClassifierConfig, train_classifier

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("trained")
    cells = write_cohort(root, n_patients=4)
    config = ClassifierConfig(arch="test_resnet", init="random", crop_size=32, max_epochs=2, batch_size=16)
    split = {"train": ["P0", "P1"], "val": ["P2"], "test": ["P3"]}
    return root, cells, train_classifier(cells, out_dir=root / "clf", config=config, split=split)


def test_checkpoint_is_a_count_source_and_classify_cli_writes_columns(trained, tmp_path):
    from mil.cli import main

    root, cells, result = trained
    out = tmp_path / "cells_pred.csv"
    code = main(
        ["classify", "--cells", str(root / "cells.csv"), "--checkpoint", str(result.checkpoint), "--out", str(out)]
    )
    assert code == 0
    table = read_cell_table(out)
    validate_cell_table(table)
    assert len(table) == len(cells)
    probs = np.array([[float(r[f"prob_{c}"]) for c in CLASSES] for r in table.rows])
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-4)
    assert all(r["pred_label"] == CLASSES[int(np.argmax(p))] for r, p in zip(table.rows, probs))
    assert [r["label"] for r in table.rows] == [r["label"] for r in cells.rows]


def test_checkpoint_loads_as_encoder(trained):
    registry = pytest.importorskip("features.registry")
    if "classifier.file" not in registry.list_encoders():
        pytest.skip("encoder classifier.file is not registered yet")
    from mil.classifier.predict import load_classifier, predict_rows

    root, cells, result = trained
    encoder = registry.create_encoder("classifier.file", weights=str(result.checkpoint))
    assert encoder.config.input_size == 32
    assert list(encoder.class_names) == list(CLASSES)
    from features.preprocess import crop_transform
    from mil.classifier.data import load_crops

    crops = load_crops(cells.rows[:5], crop_size=64)
    transform = crop_transform(encoder.config)
    x = torch.stack([transform(c) for c in crops])
    with torch.no_grad():
        emb = encoder(x)
        probs = encoder.cell_probs(x)
    assert emb.shape == (5, encoder.config.embed_dim) and torch.isfinite(emb).all()
    assert torch.allclose(probs.sum(dim=1), torch.ones(5), atol=1e-5)
    # The encoder and `mil classify` agree on the class of each cell (same weights, same class order).
    ours = predict_rows(load_classifier(result.checkpoint), cells.rows[:5])
    assert (probs.numpy().argmax(1) == ours.argmax(1)).mean() >= 0.8


def test_crossfitted_predicts_each_patient_with_the_model_that_never_saw_it(tmp_path):
    from mil.classifier.train import ClassifierConfig, train_crossfitted

    cells = write_cohort(tmp_path, n_patients=4, cells_per_class=2)
    # An unlabelled cell of a test patient is predicted too (the count source counts all cells).
    rows = cells.rows + [dict(cells.rows[0], cell_id="P0:unlabelled", label="")]
    cells = CellTable(rows=rows)
    folds = [(["P2", "P3"], ["P0", "P1"]), (["P0", "P1"], ["P2", "P3"])]
    config = ClassifierConfig(
        arch="test_resnet", init="random", crop_size=32, max_epochs=1, batch_size=16, val_fraction=0.5
    )
    result = train_crossfitted(cells, folds, out_dir=tmp_path / "cf", config=config)
    assert set(result.probs) == {r["cell_id"] for r in rows}
    assert result.fold_of_patient == {"P0": 0, "P1": 0, "P2": 1, "P3": 1}
    for k, fold in enumerate(result.folds):
        trained_on = set(fold.split["train"]) | set(fold.split["val"])
        assert trained_on.isdisjoint(folds[k][1])
    assert all(abs(float(p.sum()) - 1) < 1e-5 for p in result.probs.values())
    table = result.table(cells)
    assert all(r["pred_label"] in CLASSES for r in table.rows)


def test_train_classifier_cli_writes_checkpoint_and_metrics(tmp_path, capfd, monkeypatch):
    from mil.cli import main

    monkeypatch.setenv("MIL_PROGRESS", "plain")
    write_cohort(tmp_path, n_patients=5, cells_per_class=2)
    out = tmp_path / "run"
    args = ["train-classifier", "--cells", str(tmp_path / "cells.csv"), "--out", str(out), "--arch", "test_resnet"]
    assert main([*args, "--init", "random", "--crop-size", "32", "--max-epochs", "1", "--test-fraction", "0.2"]) == 0
    assert (out / "classifier.pt").exists() and json.loads((out / "config.json").read_text())["arch"] == "test_resnet"
    printed = capfd.readouterr()
    assert "macro-F1" in printed.out
    # The epoch line (mil.progress.EpochLine) and the stated split go to stderr.
    assert "classifier epoch 1/1, loss" in printed.err and "macro-f1" in printed.err and "val-loss" in printed.err
    assert "--val-fraction 0.15 and --test-fraction 0.2" in printed.err
    for banner in ("GPU available", "Tip:", "LeafSpec", "weights_only"):  # Lightning's noise stays out (mil.quiet)
        assert banner not in printed.out + printed.err, banner


def test_metrics_and_split_stay_quiet_about_rare_classes():
    import warnings

    from mil.classifier.data import patient_split
    from mil.classifier.metrics import classification_metrics

    probs = np.eye(3)[[0, 1, 2, 2]]  # class 2 predicted, absent from the truth: an error, not a warning
    rows = [
        {"patient_id": f"P{p}", "label": "rare" if p == 0 and i == 0 else "common"} for p in range(12) for i in range(5)
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metrics = classification_metrics(np.array([0, 1, 0, 1]), probs, ["a", "b", "c"])
        split = patient_split(rows, val_fraction=0.15, test_fraction=0.2, seed=0)
    assert metrics["balanced_accuracy"] == 0.5
    assert sorted(split["train"] + split["val"] + split["test"]) == sorted({r["patient_id"] for r in rows})
