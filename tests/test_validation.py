"""Bad input gets one clear error naming the file and row (RELIABILITY.md promise 4), and nothing is written.

Each test breaks one thing in a small dataset written in its format's layout and checks that the message
names the offending file (and line, object or annotation) and says what to do.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from reader_files import png, voc_dataset, write_voc, write_zenodo, zenodo_cell, zenodo_dataset

from mil.cli import main
from mil.errors import ConfigError, InputError
from mil.labels import load_label_map
from mil.readers import read_dataset

ROI = {"slide_id": "S1", "width": 64, "height": 64}
CLINICAL = {"age": 5, "ncit_concept_code": "C3171", "leukemia_subtype": ""}


def roi(roi_id: str, patient: str, **kw) -> dict:
    return {"roi_id": roi_id, "patient_id": patient, "image": f"images/{roi_id}.png", **ROI, **kw}


def patient(pid: str, diagnosis: str = "AML") -> dict:
    return {"patient_id": pid, **CLINICAL, "leukemia_type": diagnosis}


def run_cells(fmt: str, input: Path, out: Path, capsys, *extra: str) -> str:
    """Run `mil cells`, expect the user-error exit code, check nothing was written; return the message."""
    code = main(["cells", "--format", fmt, "--input", str(input), "--out", str(out), *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert not (out / "cells.csv").exists() and not (out / "patients.csv").exists()
    return err


# ---------------------------------------------------------------- images


def test_missing_image_names_the_file(tmp_path, capsys):
    voc_dataset(tmp_path / "voc")
    (tmp_path / "voc" / "JPEGImages" / "field_b.jpg").unlink()
    err = run_cells("voc", tmp_path / "voc", tmp_path / "out", capsys)
    assert "field_b.jpg does not exist" in err and "restore the file" in err
    assert "patient 'field_b'" in err


def test_unreadable_image_names_the_file(tmp_path, capsys):
    png(tmp_path / "crops" / "basophil" / "ok.png", (20, 20))
    (tmp_path / "crops" / "monocyte").mkdir()
    (tmp_path / "crops" / "monocyte" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but then nothing")
    err = run_cells("imagefolder", tmp_path / "crops", tmp_path / "out", capsys)
    assert f"{tmp_path / 'crops' / 'monocyte' / 'broken.png'} cannot be read" in err and "replace the file" in err


def test_unreadable_image_of_a_detection_set_names_the_file(tmp_path, capsys):
    voc_dataset(tmp_path / "voc")
    (tmp_path / "voc" / "JPEGImages" / "field_a.jpg").write_bytes(b"not a jpeg at all")
    err = run_cells("voc", tmp_path / "voc", tmp_path / "out", capsys)
    assert "field_a.jpg cannot be read" in err


# ---------------------------------------------------------------- boxes


def test_box_outside_its_image_names_the_row(tmp_path, capsys):
    root = write_zenodo(
        tmp_path / "z",
        cells=[
            zenodo_cell("c1", "R1", (3, 4, 20, 30), "monocyte"),
            zenodo_cell("c2", "R1", (50, 50, 70, 60), "monocyte"),
        ],
        rois=[roi("R1", "P1")],
        clinical=[patient("P1")],
    )
    err = run_cells("zenodo", root, tmp_path / "out", capsys)
    assert f"{root / 'cells.csv'}:3 (cell 'c2'): box (50,50,70,60) lies outside its 64x64 image" in err
    assert "c1" not in err


def test_box_outside_the_real_image_size_names_image_and_patient(tmp_path, capsys):
    # rois.csv declares no size here, so the check runs against the image itself.
    root = write_zenodo(
        tmp_path / "z",
        cells=[zenodo_cell("c1", "R1", (40, 10, 90, 30), "monocyte")],
        rois=[{"roi_id": "R1", "patient_id": "P1", "image": "images/R1.png"}],
        clinical=[patient("P1")],
    )
    err = run_cells("zenodo", root, tmp_path / "out", capsys)
    assert "patient 'P1', R1.png" in err and "box (40,10,90,30) lies outside its 64x64 image" in err


def test_voc_box_wholly_outside_names_the_object(tmp_path):
    png(tmp_path / "JPEGImages" / "f.png", (32, 32))
    write_voc(tmp_path / "Annotations" / "f.xml", "f.png", (32, 32), [("WBC", (1, 1, 9, 9)), ("RBC", (40, 40, 50, 50))])
    with pytest.raises(InputError) as e:
        read_dataset("voc", tmp_path)
    assert f"{tmp_path / 'Annotations' / 'f.xml'} object 2: box (39,39,50,50) lies outside its 32x32 image" in str(
        e.value
    )


@pytest.mark.parametrize("bbox", [[10, 10, 0, 5], [10, 10, 5, -2]])
def test_zero_area_box_names_the_annotation(tmp_path, bbox):
    png(tmp_path / "a.png", (32, 32))
    doc = {
        "images": [{"id": 1, "file_name": "a.png", "width": 32, "height": 32}],
        "annotations": [{"id": 5, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4]}]
        + [{"id": 6, "image_id": 1, "category_id": 1, "bbox": bbox}],
        "categories": [{"id": 1, "name": "cell"}],
    }
    (tmp_path / "c.json").write_text(json.dumps(doc))
    with pytest.raises(InputError) as e:
        read_dataset("coco", tmp_path / "c.json")
    assert f"{tmp_path / 'c.json'} annotations[1] (id 6): box" in str(e.value)
    assert "zero or negative area" in str(e.value)


def test_zero_area_box_in_zenodo_names_the_line(tmp_path):
    root = write_zenodo(
        tmp_path / "z",
        cells=[zenodo_cell("c1", "R1", (3, 4, 3, 30), "monocyte")],
        rois=[roi("R1", "P1")],
        clinical=[patient("P1")],
    )
    with pytest.raises(InputError, match=r"cells.csv:2 \(cell 'c1'\): box \(3,4,3,30\) has zero or negative area"):
        read_dataset("zenodo", root)


# ---------------------------------------------------------------- labels


def test_unknown_labels_are_all_listed_at_once(tmp_path, capsys):
    root = write_zenodo(
        tmp_path / "z",
        cells=[
            zenodo_cell("c1", "R1", (1, 1, 9, 9), "Segmented Neutrophil"),  # case/space variant: accepted
            zenodo_cell("c2", "R1", (1, 1, 9, 9), "myelo_blast"),
            zenodo_cell("c3", "R1", (1, 1, 9, 9), "monocyte"),
            zenodo_cell("c4", "R1", (1, 1, 9, 9), "hairy_cell"),
        ],
        rois=[roi("R1", "P1")],
        clinical=[patient("P1")],
    )
    err = run_cells("zenodo", root, tmp_path / "out", capsys)
    assert "2 problem(s)" in err
    assert f"{root / 'cells.csv'}:3 (cell 'c2'): label 'myelo_blast' is not in label map 'bmwsi33'" in err
    assert f"{root / 'cells.csv'}:5 (cell 'c4'): label 'hairy_cell'" in err
    assert "--label-map" in err and "Segmented Neutrophil" not in err


def test_unknown_labels_with_a_given_map_name_each_object(tmp_path):
    voc_dataset(tmp_path / "voc")
    (tmp_path / "map.yaml").write_text("name: wbc-only\nclasses: [WBC]\nmap: {RBC: drop}\n")
    with pytest.raises(InputError) as e:
        read_dataset("voc", tmp_path / "voc", label_map=load_label_map(tmp_path / "map.yaml"))
    assert "1 problem(s)" in str(e.value)
    assert f"{tmp_path / 'voc' / 'Annotations' / 'field_b.xml'} object 1: label 'Platelets'" in str(e.value)


def test_yolo_class_without_a_name_and_malformed_line_name_the_line(tmp_path):
    png(tmp_path / "x.png", (20, 20))
    (tmp_path / "classes.txt").write_text("RBC\n")
    (tmp_path / "x.txt").write_text("0 0.5 0.5 0.2 0.2\n3 0.5 0.5 0.2 0.2\n0 0.5 oops 0.2 0.2\n")
    with pytest.raises(InputError) as e:
        read_dataset("yolo", tmp_path)
    assert f"{tmp_path / 'x.txt'}:2: class 3 has no name in {tmp_path / 'classes.txt'}" in str(e.value)
    assert f"{tmp_path / 'x.txt'}:3: '0 0.5 oops 0.2 0.2' is not 'class cx cy w h' numbers" in str(e.value)


# ---------------------------------------------------------------- patients


def test_duplicate_patient_ids_in_clinical_csv_name_both_lines(tmp_path, capsys):
    root = write_zenodo(
        tmp_path / "z",
        cells=[zenodo_cell("c1", "R1", (1, 1, 9, 9), "monocyte")],
        rois=[roi("R1", "P1")],
        clinical=[patient("P1"), patient("P2", "ALL"), patient("P1", "CML")],
    )
    err = run_cells("zenodo", root, tmp_path / "out", capsys)
    assert f"{root / 'clinical.csv'}:4: patient id 'P1' repeats line 2; keep one row per patient" in err


def test_duplicate_patient_ids_in_patients_csv(tmp_path):
    png(tmp_path / "root" / "p1" / "a.png", (8, 8))
    (tmp_path / "patients.csv").write_text("patient_id,diagnosis\np1,AML\np1,AML\n")
    with pytest.raises(InputError, match=r"patients.csv:3: patient id 'p1' repeats line 2"):
        read_dataset("patient-folders", tmp_path / "root", patients_csv=tmp_path / "patients.csv")


def test_two_images_with_one_stem_are_not_silently_one_patient(tmp_path):
    png(tmp_path / "basophil" / "cell_1.png", (8, 8))
    png(tmp_path / "monocyte" / "cell_1.jpg", (8, 8))
    with pytest.raises(InputError) as e:
        read_dataset("imagefolder", tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "monocyte" / "cell_1.jpg") in msg and str(tmp_path / "basophil" / "cell_1.png") in msg
    assert "--patients-csv" in msg


@pytest.mark.parametrize("bad_id", ["../x", "a/b", "..", "a\\b", ".hidden"])
def test_unsafe_patient_id_in_rois_csv_names_the_line(tmp_path, capsys, bad_id):
    root = write_zenodo(
        tmp_path / "z",
        cells=[zenodo_cell("c1", "R1", (1, 1, 9, 9), "monocyte"), zenodo_cell("c2", "R2", (1, 1, 9, 9), "monocyte")],
        rois=[roi("R1", "P2"), roi("R2", bad_id)],
        clinical=[patient("P2"), patient(bad_id)],
    )
    err = run_cells("zenodo", root, tmp_path / "out", capsys)
    assert f"{root / 'rois.csv'}:3: patient id {bad_id!r}" in err
    assert f"{root / 'clinical.csv'}:3: patient id" in err
    assert "rename it" in err
    assert "cells.csv:3" not in err  # the cell of a refused ROI is not reported a second time


def test_unsafe_patient_id_in_a_patients_mapping(tmp_path):
    png(tmp_path / "data" / "blast" / "a.png", (8, 8))
    (tmp_path / "map.csv").write_text("image,patient_id\na.png,../../etc\n")
    with pytest.raises(InputError, match=r"map.csv:2: patient id '../../etc' (contains|starts with) .*; rename it"):
        read_dataset("imagefolder", tmp_path / "data", patients_csv=tmp_path / "map.csv")


def test_patients_without_diagnosis_are_listed(tmp_path, capsys):
    root = write_zenodo(
        tmp_path / "z",
        cells=[zenodo_cell("c1", "R1", (1, 1, 9, 9), "monocyte"), zenodo_cell("c2", "R2", (1, 1, 9, 9), "monocyte")],
        rois=[roi("R1", "P1"), roi("R2", "P2")],
        clinical=[patient("P1", ""), patient("P2", " ")],
    )
    err = run_cells("zenodo", root, tmp_path / "out", capsys)
    assert f"{root / 'clinical.csv'}:2: patient 'P1' has no leukemia_type" in err
    assert f"{root / 'clinical.csv'}:3: patient 'P2' has no leukemia_type" in err


def test_patient_without_diagnosis_in_patient_folders_csv(tmp_path):
    png(tmp_path / "root" / "p1" / "a.png", (8, 8))
    png(tmp_path / "root" / "p2" / "a.png", (8, 8))
    (tmp_path / "patients.csv").write_text("patient_id,diagnosis\np1,AML\n")
    (tmp_path / "more.csv").write_text("patient_id,diagnosis\np1,AML\np2,\n")
    with pytest.raises(InputError, match=r"root/p2: patient 'p2' has no row in .*patients.csv"):
        read_dataset("patient-folders", tmp_path / "root", patients_csv=tmp_path / "patients.csv")
    with pytest.raises(InputError, match=r"more.csv:3: patient 'p2' has no diagnosis"):
        read_dataset("patient-folders", tmp_path / "root", patients_csv=tmp_path / "more.csv")
    with pytest.raises(ConfigError, match="needs --patients-csv"):
        read_dataset("patient-folders", tmp_path / "root")


def test_a_detection_set_with_some_diagnoses_needs_them_all(tmp_path, capsys):
    voc_dataset(tmp_path / "voc")
    (tmp_path / "voc" / "JPEGImages" / "field_a.jpg").unlink()
    (tmp_path / "map.csv").write_text("image,patient_id,diagnosis\nfield_a.jpg,pa,AML\nfield_b.jpg,pb,\n")
    err = run_cells("voc", tmp_path / "voc", tmp_path / "out", capsys, "--patients-csv", str(tmp_path / "map.csv"))
    # Both tables' problems come in one message: the missing diagnosis and the missing image.
    assert "patient 'pb' has no diagnosis" in err
    assert "field_a.jpg does not exist" in err and "Nothing was written" in err


def test_images_missing_from_a_patients_mapping_are_listed(tmp_path):
    voc_dataset(tmp_path / "voc")
    (tmp_path / "map.csv").write_text("image,patient_id\nfield_a.jpg,pa\n")
    with pytest.raises(InputError, match=r"field_b.jpg: image is not in patients CSV"):
        read_dataset("voc", tmp_path / "voc", patients_csv=tmp_path / "map.csv")


# ---------------------------------------------------------------- malformed files


def test_malformed_csv_columns_name_file_and_columns(tmp_path):
    root = zenodo_dataset(tmp_path / "z")
    text = (root / "clinical.csv").read_text().replace("leukemia_type", "diagnosis_type")
    (root / "clinical.csv").write_text(text)
    with pytest.raises(InputError) as e:
        read_dataset("zenodo", root)
    msg = str(e.value)
    assert f"{root / 'clinical.csv'} lacks column(s) leukemia_type" in msg and "diagnosis_type" in msg


def test_non_numeric_coordinates_and_unknown_rois_name_their_lines(tmp_path):
    root = write_zenodo(
        tmp_path / "z",
        cells=[
            zenodo_cell("c1", "R1", ("abc", 1, 9, 9), "monocyte"),
            zenodo_cell("c2", "R9", (1, 1, 9, 9), "monocyte"),
            zenodo_cell("c2", "R1", (1, 1, 9, 9), "monocyte"),
        ],
        rois=[roi("R1", "P1"), roi("R2", "P7")],
        clinical=[patient("P1")],
    )
    with pytest.raises(InputError) as e:
        read_dataset("zenodo", root)
    msg = str(e.value)
    assert "4 problem(s)" in msg
    assert f"{root / 'rois.csv'}:3: patient 'P7' is not in clinical.csv" in msg
    assert f"{root / 'cells.csv'}:2 (cell 'c1'): x1 is 'abc', not a number" in msg
    assert f"{root / 'cells.csv'}:3 (cell 'c2'): roi_id 'R9' is not in rois.csv" in msg
    assert f"{root / 'cells.csv'}:4 (cell 'c2'): cell_id 'c2' repeats line 3" in msg


def test_broken_annotation_files_are_named(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InputError, match=r"bad.json is not valid JSON"):
        read_dataset("coco", tmp_path / "bad.json")
    (tmp_path / "voc" / "Annotations").mkdir(parents=True)
    (tmp_path / "voc" / "Annotations" / "f.xml").write_text("<annotation><object>")
    with pytest.raises(InputError, match=r"f.xml: not valid XML"):
        read_dataset("voc", tmp_path / "voc")


def test_patient_folders_layout_errors(tmp_path):
    png(tmp_path / "root" / "stray.png", (8, 8))
    png(tmp_path / "root" / "p1" / "blast" / "deep" / "a.png", (8, 8))
    (tmp_path / "patients.csv").write_text("patient_id,diagnosis\np1,AML\n")
    with pytest.raises(InputError) as e:
        read_dataset("patient-folders", tmp_path / "root", patients_csv=tmp_path / "patients.csv")
    assert "stray.png: image lies directly in the root" in str(e.value)
    assert "a.png: nested 3 folders deep" in str(e.value)


def test_unknown_format_lists_the_valid_ones(capsys):
    with pytest.raises(SystemExit):
        main(["cells", "--format", "tiff", "--input", ".", "--out", "x"])
    err = capsys.readouterr().err
    assert "invalid choice: 'tiff'" in err and "voc" in err and "zenodo" in err


def test_dataset_labels_that_differ_only_in_case_or_spaces_are_refused(tmp_path):
    png(tmp_path / "JPEGImages" / "f.png", (32, 32))
    objects = [("WBC", (1, 1, 9, 9)), ("wbc", (2, 2, 9, 9)), ("RBC", (3, 3, 9, 9))]
    write_voc(tmp_path / "Annotations" / "f.xml", "f.png", (32, 32), objects)
    with pytest.raises(InputError) as e:
        read_dataset("voc", tmp_path)
    msg = str(e.value)
    assert "1 problem(s)" in msg
    assert f"f.xml object 2: label 'wbc' differs from 'WBC' ({tmp_path / 'Annotations' / 'f.xml'} object 1)" in msg
    # With the 33-class map such variants are one class: 'Segmented Neutrophil' == 'segmented_neutrophil'.
    (tmp_path / "map.yaml").write_text("name: m\nclasses: [wbc, rbc]\n")
    cells, _ = read_dataset("voc", tmp_path, label_map=load_label_map(tmp_path / "map.yaml"))
    assert [r["label"] for r in cells.rows] == ["wbc", "wbc", "rbc"]
