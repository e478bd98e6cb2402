"""`mil extract` and `mil verify`: bags per patient, labels, resume, shards, corrupt images, torchmil."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from features.bag_directory import BagDirectory
from features.bags import bag_path, read_bag, validate_bag
from features.extract import ExtractConfig, parse_shard, resolve_device, run_extract, shard_patients
from mil.atomic import leftover_temp_files
from mil.cell_table import CellTable
from mil.cli import main as mil_main
from mil.errors import ConfigError

torch.set_num_threads(1)
LABELS = ("myeloblast", "lymphocyte", "segmented_neutrophil", "erythrocyte")


def make_cohort(
    root: Path,
    *,
    patients: int = 3,
    cells: int = 12,
    cells_per_image: int = 4,
    side: int = 64,
    labels: tuple[str, ...] = LABELS,
    seed: int = 0,
) -> Path:
    """Small PNG fields with coloured blobs and a cell table written by the production writer."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for p in range(patients):
        pid = f"P{p:02d}"
        for c in range(cells):
            k = c // cells_per_image
            image = root / "images" / f"{pid}_{k}.png"
            if c % cells_per_image == 0:
                field = rng.integers(150, 230, size=(side, side, 3), dtype=np.uint8)
                Image.fromarray(field).save(image)
            arr = np.array(Image.open(image))
            w = int(rng.integers(8, 16))
            x0, y0 = (int(v) for v in rng.integers(0, side - w, size=2))
            arr[y0 : y0 + w, x0 : x0 + w] = rng.integers(40, 200, size=3, dtype=np.uint8)
            Image.fromarray(arr).save(image)
            label = labels[int(rng.integers(len(labels)))] if c % 5 else ""
            rows.append(
                {
                    "cell_id": f"{pid}-{c}",
                    "patient_id": pid,
                    "image_path": str(image),
                    "x0": x0,
                    "y0": y0,
                    "x1": x0 + w,
                    "y1": y0 + w,
                    "label": label,
                    "raw_label": label,
                    "source": "test",
                }
            )
    return CellTable(rows=rows).write(root / "cells.csv")


def extract(cells: Path, out: Path, **kw) -> object:
    config = ExtractConfig(
        cells=cells, encoder=kw.pop("encoder", "resnet18.random"), out=out, input_size=32, batch_size=8, workers=0
    )
    for k, v in kw.items():
        setattr(config, k, v)
    return run_extract(config, log=lambda msg: None)


def bag_arrays(folder: Path) -> dict[str, dict[str, np.ndarray]]:
    directory = BagDirectory(folder)
    out = {}
    for pid in directory.patients():
        bag = directory.load(pid)
        out[pid] = {"features": bag.features, "boxes": bag.boxes, "label": bag.label, "cell_id": np.array(bag.cell_id)}
    return out


def assert_same_bags(a: Path, b: Path) -> None:
    bags_a, bags_b = bag_arrays(a), bag_arrays(b)
    assert sorted(bags_a) == sorted(bags_b) and bags_a
    for pid in bags_a:
        for key in bags_a[pid]:
            np.testing.assert_array_equal(bags_a[pid][key], bags_b[pid][key], err_msg=f"{pid} {key}")


def test_extract_writes_one_valid_bag_per_patient_with_labels(tmp_path):
    cells = make_cohort(tmp_path)
    report = extract(cells, tmp_path / "bags")
    assert sorted(report.done) == ["P00", "P01", "P02"] and not report.failed
    bag = read_bag(bag_path(tmp_path / "bags", "P01"))
    assert bag.features.shape == (12, 512) and bag.features.dtype == np.float32
    assert bag.attrs["encoder"] == "resnet18.random" and bag.encoder_config["input_size"] == 32
    # Labels of the default label map are stored as its class indices; unlabelled cells are -1.
    classes = bag.label_classes
    assert "myeloblast" in classes and len(classes) == 33
    rows = {r["cell_id"]: r for r in _rows(cells)}
    for cid, lab in zip(bag.cell_id, bag.label):
        want = rows[cid]["label"]
        assert (lab == -1) if not want else classes[lab] == want
    assert bag.image_paths and bag.image_index.max() < len(bag.image_paths)
    manifest = json.loads((tmp_path / "bags" / "manifest.json").read_text())
    assert manifest["feature_dim"] == 512 and manifest["encoder"] == "resnet18.random"
    assert not leftover_temp_files(tmp_path / "bags")


def _rows(cells: Path) -> list[dict]:
    from mil.cell_table import read_cell_table

    return read_cell_table(cells).rows


def test_labels_outside_the_label_map_keep_the_tables_own_classes_and_say_so_in_one_line(tmp_path):
    cells = make_cohort(tmp_path, patients=1, cells=8, labels=("RBC", "WBC", "Platelets"))
    config = ExtractConfig(cells=cells, encoder="morphology.handcrafted", out=tmp_path / "bags", workers=0)
    lines: list[str] = []
    run_extract(config, log=lines.append)
    bag = read_bag(bag_path(tmp_path / "bags", "P00"))
    assert bag.label_classes == ["Platelets", "RBC", "WBC"]
    assert set(bag.label.tolist()) <= {-1, 0, 1, 2}
    (note,) = [line for line in lines if "table's own" in line]
    counts = {lab: sum(r["label"] == lab for r in _rows(cells)) for lab in bag.label_classes}
    assert all(f"{lab} {n}" in note for lab, n in counts.items() if n) and "--label-map FILE" in note
    # Labels the map knows need no note.
    lines.clear()
    run_extract(
        ExtractConfig(
            cells=make_cohort(tmp_path / "known"),
            encoder="morphology.handcrafted",
            out=tmp_path / "known_bags",
            workers=0,
        ),
        log=lines.append,
    )
    assert not [line for line in lines if "table's own" in line]


def test_rerun_skips_valid_bags_and_recomputes_stale_ones(tmp_path):
    cells = make_cohort(tmp_path)
    out = tmp_path / "bags"
    extract(cells, out)
    again = extract(cells, out)
    assert again.done == [] and sorted(again.up_to_date) == ["P00", "P01", "P02"] and again.cells_embedded == 0
    # Moving one cell's box changes exactly that patient's fingerprint.
    table = CellTable(rows=_rows(cells))
    row = next(r for r in table.rows if r["patient_id"] == "P01")
    row["x1"] -= 1
    table.write(cells)
    changed = extract(cells, out)
    assert changed.done == ["P01"] and changed.reasons["P01"].startswith("stale")
    # Another dtype makes every bag stale.
    assert sorted(extract(cells, out, dtype="float16").done) == ["P00", "P01", "P02"]
    assert read_bag(bag_path(out, "P00")).features.dtype == np.float16


def test_shards_together_give_the_same_bags_as_one_process(tmp_path):
    cells = make_cohort(tmp_path, patients=5, cells=6)
    extract(cells, tmp_path / "one")
    for i in range(2):
        extract(cells, tmp_path / "sharded", shard=(i, 2))
    assert_same_bags(tmp_path / "one", tmp_path / "sharded")
    parts = [shard_patients([f"p{i}" for i in range(7)], i, 3) for i in range(3)]
    assert sorted(sum(parts, [])) == [f"p{i}" for i in range(7)] and not set(parts[0]) & set(parts[1])
    assert parse_shard("1/4") == (1, 4)
    assert parse_shard("auto", {"RANK": "2", "WORLD_SIZE": "3"}) == (2, 3)
    slurm = {"SLURM_ARRAY_TASK_ID": "11", "SLURM_ARRAY_TASK_MIN": "10", "SLURM_ARRAY_TASK_COUNT": "4"}
    assert parse_shard("auto", slurm) == (1, 4) and parse_shard("auto", {}) == (0, 1)
    assert resolve_device("cuda", {"LOCAL_RANK": "3"}) == "cuda:3" and resolve_device("cpu", {}) == "cpu"
    for bad in ("4/4", "x", "1/0"):
        with pytest.raises(ConfigError, match="shard"):
            parse_shard(bad)


def test_cli_extract_then_verify_reports_a_table_and_fails_on_a_bad_bag(tmp_path, capsys):
    cells = make_cohort(tmp_path, patients=2, cells=5)
    out = tmp_path / "bags"
    args = ["extract", "--cells", str(cells), "--encoder", "morphology.handcrafted", "--out", str(out)]
    assert mil_main([*args, "--input-size", "32", "--workers", "0", "--no-progress"]) == 0
    assert "2 bag(s) written" in capsys.readouterr().out
    assert mil_main(["verify", str(out)]) == 0
    table = capsys.readouterr().out
    assert "patient" in table and "P00" in table and "morphology.handcrafted" in table
    bag_path(out, "P01").write_bytes(b"not hdf5")
    assert mil_main(["verify", str(out)]) == 1
    assert "INVALID" in capsys.readouterr().out


def test_bags_open_with_torchmil_and_plain_h5py(tmp_path):
    h5py = pytest.importorskip("h5py")
    cells = make_cohort(tmp_path, patients=2, cells=5)
    out = tmp_path / "bags"
    extract(cells, out, encoder="morphology.handcrafted")
    with h5py.File(bag_path(out, "P00"), "r") as f:
        assert f["features"].shape[0] == 5
    datasets = pytest.importorskip("torchmil.datasets")
    # torchmil reads `features` straight out of each <patient>.h5 of the bag directory.
    dataset = datasets.ProcessedMILDataset(features_path=str(out), bag_keys=["X"], file_ext=".h5", verbose=False)
    assert len(dataset) == 2
    np.testing.assert_array_equal(dataset[0]["X"].numpy(), read_bag(bag_path(out, "P00")).features)


def test_corrupt_images_are_skipped_with_reasons_and_an_empty_patient_fails_alone(tmp_path):
    cells = make_cohort(tmp_path, patients=3, cells=30, cells_per_image=1)
    table = _rows(cells)
    for r in [r for r in table if r["patient_id"] == "P00"][:3]:
        Path(r["image_path"]).write_bytes(b"\x89PNG broken")
    for r in [r for r in table if r["patient_id"] == "P01"]:
        Path(r["image_path"]).write_bytes(b"")
    out = tmp_path / "bags"
    report = extract(cells, out, encoder="morphology.handcrafted")
    bag = read_bag(bag_path(out, "P00"))
    assert bag.num_cells == 27 and len(bag.skipped) == 3
    assert all("cannot be read" in s["reason"] and s["image"] for s in bag.skipped)
    assert len(report.skipped_cells["P00"]) == 3
    assert "empty patient 'P01'" in report.failed["P01"] and not bag_path(out, "P01").exists()
    assert "P02" in report.done and validate_bag(bag_path(out, "P02")) == []
    saved = json.loads((out / "extract_report.json").read_text())
    assert "P01" in saved["failed"] and len(saved["skipped_cells"]["P00"]) == 3
    code = mil_main(
        ["extract", "--cells", str(cells), "--encoder", "morphology.handcrafted", "--out", str(out), "--workers", "0"]
    )
    assert code == 1  # the summary names the failed patient; the good bags stay up to date


def test_encoder_of_another_width_is_refused_before_any_compute(tmp_path, monkeypatch):
    cells = make_cohort(tmp_path, patients=1, cells=4)
    out = tmp_path / "bags"
    extract(cells, out)
    import features.cropping

    def no_crops(*a, **k):
        raise AssertionError("crops were made before the width check")

    monkeypatch.setattr(features.cropping.FieldCrops, "__getitem__", no_crops)
    with pytest.raises(ConfigError, match="512-dim bags"):
        extract(cells, out, encoder="morphology.handcrafted")
    # An entry that declares its width is refused before its weights are even looked for.
    with pytest.raises(ConfigError, match="384-dim embeddings but .* 512-dim bags"):
        extract(cells, out, encoder="dinobloom_s.v1", weights=str(tmp_path / "absent.pth"))


def test_dataloader_workers_give_the_same_bags_as_the_main_process(tmp_path):
    cells = make_cohort(tmp_path, patients=2, cells=6, cells_per_image=3)
    extract(cells, tmp_path / "main", encoder="morphology.handcrafted")
    extract(cells, tmp_path / "workers", encoder="morphology.handcrafted", workers=2)
    assert_same_bags(tmp_path / "main", tmp_path / "workers")


def test_cell_classifier_encoder_stores_cell_probs(tmp_path):
    import timm

    from features.encoders.classifier import save_classifier_checkpoint

    classes = ["blast", "lymphocyte", "erythrocyte"]
    weights = tmp_path / "classifier.pt"
    save_classifier_checkpoint(
        weights,
        model=timm.create_model("resnet18", num_classes=3, pretrained=False),
        arch="resnet18",
        input_size=32,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        class_names=classes,
    )
    cells = make_cohort(tmp_path, patients=1, cells=5)
    extract(cells, tmp_path / "bags", encoder="classifier.file", weights=str(weights))
    bag = read_bag(bag_path(tmp_path / "bags", "P00"))
    assert bag.cell_probs.shape == (5, 3) and bag.features.shape == (5, 512)
    np.testing.assert_allclose(bag.cell_probs.sum(1), 1.0, rtol=1e-5)
    assert bag.encoder_config["extra"]["class_names"] == classes and bag.encoder_config["weights_sha256"]


def test_unsafe_patient_id_and_unknown_labels_are_refused_with_names(tmp_path):
    from mil.errors import InputError
    from mil.labels import DEFAULT_LABEL_MAP

    cells = make_cohort(tmp_path, patients=2, cells=3)
    table = CellTable(rows=_rows(cells))
    for r in table.rows:
        if r["patient_id"] == "P01":
            r["patient_id"] = "../escape"
    table.write(cells)
    with pytest.raises(InputError, match=r"'\.\./escape'"):
        extract(cells, tmp_path / "bags", encoder="morphology.handcrafted")
    assert not (tmp_path / "escape.h5").exists()
    cells = make_cohort(tmp_path / "b", patients=1, cells=3, labels=("Weird Cell",))
    # With an explicit label map, a label it does not know is an error naming the label (never a silent -1).
    with pytest.raises(InputError, match="Weird Cell"):
        extract(cells, tmp_path / "bags2", encoder="morphology.handcrafted", label_map=DEFAULT_LABEL_MAP)


def test_a_shard_removes_only_temp_files_whose_writer_is_gone(tmp_path):
    """Promise 8 (case 6 of issue 14): a shard never deletes a live writer's temporary file."""
    import os
    import subprocess
    import sys

    from features.extract import _remove_temp_files
    from mil.atomic import this_host
    from mil.locks import output_lock

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = this_host()
    names = {
        "no_owner_mine": ".P00.h5.a1.tmp",
        "no_owner_other_shard": ".P01.h5.b2.tmp",
        "dead_owner": f".P01.h5.c3xxxxxx.pid{int(dead.stdout)}@{host}.tmp",
        "live_owner": f".manifest.json.d4xxxxxx.pid{os.getppid()}@{host}.tmp",
        "my_report": ".extract_report.shard-0-of-2.json.e5.tmp",
    }
    for name in names.values():
        (tmp_path / name).write_text("partial")
    with (
        output_lock(tmp_path, command="mil extract", part="shard 1/2", settings="s"),  # another live shard
        output_lock(tmp_path, command="mil extract", part="shard 0/2", settings="s") as lock,
    ):
        removed = {p.name for p in _remove_temp_files(lock, ["P00"], (0, 2))}
    assert removed == {names["no_owner_mine"], names["dead_owner"], names["my_report"]}
    with output_lock(tmp_path, command="mil extract") as lock:  # alone in the folder: a writer without a record
        assert {p.name for p in _remove_temp_files(lock, [], (0, 1))} == {names["no_owner_other_shard"]}
    assert (tmp_path / names["live_owner"]).exists()  # its writer still runs
