"""Round trips of the single-cell crop readers (imagefolder, patient-folders)."""

from __future__ import annotations

from pathlib import Path

import pytest
from reader_files import png

from mil.readers import read_dataset


def test_imagefolder_round_trip(tmp_path):
    sizes = {"basophil/b1.jpg": (30, 32), "basophil/b2.jpg": (31, 33), "monocyte/m1.png": (40, 41)}
    for rel, size in sizes.items():
        png(tmp_path / rel, size)
    (tmp_path / "README.txt").write_text("not an image")
    cells, patients = read_dataset("imagefolder", tmp_path)
    assert [(r["label"], r["patient_id"], r["x1"], r["y1"]) for r in cells.rows] == [
        ("basophil", "b1", 30, 32),
        ("basophil", "b2", 31, 33),
        ("monocyte", "m1", 40, 41),
    ]
    assert all((r["x0"], r["y0"]) == (0, 0) for r in cells.rows)
    assert len(patients) == 3


def test_imagefolder_with_patients_csv_mapping_images_to_patients(tmp_path):
    for rel in ("basophil/b1.jpg", "basophil/b2.jpg", "monocyte/m1.png"):
        png(tmp_path / "data" / rel, (20, 20))
    (tmp_path / "map.csv").write_text(
        "image,patient_id,diagnosis,age\nbasophil/b1.jpg,pA,AML,3\nb2.jpg,pA,AML,3\nm1,pB,ALL,5\n"
    )
    cells, patients = read_dataset("imagefolder", tmp_path / "data", patients_csv=tmp_path / "map.csv")
    assert [r["patient_id"] for r in cells.rows] == ["pA", "pA", "pB"]
    assert patients.rows == [
        {"patient_id": "pA", "diagnosis": "AML", "age": "3"},
        {"patient_id": "pB", "diagnosis": "ALL", "age": "5"},
    ]


@pytest.mark.parametrize("cell_type_level", [True, False])
def test_patient_folders_round_trip(tmp_path, cell_type_level):
    layout = {"pt_1": ["myeloblast", "myeloblast", "lymphocyte"], "pt_2": ["monocyte"]}
    for pid, types in layout.items():
        for k, cell_type in enumerate(types):
            rel = f"{pid}/{cell_type}/cell_{k}.tif" if cell_type_level else f"{pid}/cell_{k}.tif"
            png(tmp_path / "root" / rel, (24 + k, 26))
    (tmp_path / "patients.csv").write_text("patient_id;diagnosis;wbc\npt_1;AML;12.5\npt_2;ALL;3.1\npt_3;CML;9\n")
    cells, patients = read_dataset("patient-folders", tmp_path / "root", patients_csv=tmp_path / "patients.csv")
    by_image = {(r["patient_id"], Path(r["image_path"]).name): r for r in cells.rows}
    assert sorted(by_image) == [
        ("pt_1", "cell_0.tif"),
        ("pt_1", "cell_1.tif"),
        ("pt_1", "cell_2.tif"),
        ("pt_2", "cell_0.tif"),
    ]
    for (pid, name), r in by_image.items():
        k = int(name[5])
        assert (r["x0"], r["y0"], r["x1"], r["y1"]) == (0, 0, 24 + k, 26)
        assert r["label"] == (layout[pid][k] if cell_type_level else "")
    assert patients.rows == [
        {"patient_id": "pt_1", "diagnosis": "AML", "wbc": "12.5"},
        {"patient_id": "pt_2", "diagnosis": "ALL", "wbc": "3.1"},
    ]
