"""Round trips of the Zenodo reader (the AML cytomorphology layout) through files written in its layout."""

from __future__ import annotations

from pathlib import Path

from reader_files import boxes_of, zenodo_dataset

from mil.labels import load_label_map
from mil.readers import read_dataset


def test_zenodo_round_trip_maps_labels_and_keeps_extra_columns(tmp_path):
    root = zenodo_dataset(tmp_path / "zenodo")
    cells, patients = read_dataset("zenodo", root)
    assert boxes_of(cells) == {
        "c1": (3, 4, 20, 30),
        "c2": (40, 40, 64, 64),
        "c3": (0, 0, 10, 12),
        "c4": (5, 5, 25, 25),
        "c5": (1, 2, 3, 4),
    }
    by_id = {r["cell_id"]: r for r in cells.rows}
    assert [by_id[c]["label"] for c in ("c1", "c2", "c3", "c4", "c5")] == [
        "myeloblast",
        "segmented_neutrophil",
        "drop",
        "",
        "lymphoblast",
    ]
    assert by_id["c1"]["raw_label"] == "myelocytic_blast" and by_id["c1"]["auer_rod"] == "1"
    assert by_id["c2"]["label_session_2"] == "neutrophilic_band" and by_id["c2"]["roi_id"] == "R1"
    assert Path(by_id["c5"]["image_path"]) == (root / "images" / "R3.png").absolute()
    assert {r["source"] for r in cells.rows} == {"zenodo"}
    # P03 has no cells: no bag could ever be made, so it is not a patient of this cell table.
    assert [(p["patient_id"], p["diagnosis"], p["age"], p["leukemia_subtype"]) for p in patients.rows] == [
        ("P01", "AML", "7", "M2"),
        ("P02", "ALL", "4", ""),
    ]


def test_zenodo_with_a_custom_label_map(tmp_path):
    root = zenodo_dataset(tmp_path / "zenodo")
    (tmp_path / "map.yaml").write_text(
        "name: lineage\nclasses: [blast, granulocytic]\n"
        "map: {myelocytic_blast: blast, lymphocytic_blast: blast, segmented_neutrophil: granulocytic, artifact: drop}\n"
    )
    cells, _ = read_dataset("zenodo", root, label_map=load_label_map(tmp_path / "map.yaml"))
    assert [r["label"] for r in cells.rows] == ["blast", "granulocytic", "drop", "", "blast"]
