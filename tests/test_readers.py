"""Round trips of every reader through files written in the format's own layout (or by its own library),
the reader registry, and the `mil cells` command."""

from __future__ import annotations

import csv
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from PIL import Image

from mil.cell_table import read_cell_table, read_patient_table
from mil.cli import main
from mil.errors import ConfigError
from mil.labels import load_label_map
from mil.readers import get_reader, list_readers, read_dataset, register_reader
from mil.readers import registry as reader_registry

BUILTIN = ("coco", "imagefolder", "patient-folders", "voc", "yolo", "zenodo")


def png(path: Path, size: tuple[int, int], colour=(200, 120, 160)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def boxes_of(cells) -> dict[str, tuple[int, int, int, int]]:
    return {r["cell_id"]: (r["x0"], r["y0"], r["x1"], r["y1"]) for r in cells.rows}


# ---------------------------------------------------------------- registry


def test_registry_lists_every_builtin_format_and_refuses_unknown_names():
    assert set(BUILTIN) <= set(list_readers())
    with pytest.raises(ConfigError) as e:
        get_reader("pascal")
    for name in BUILTIN:
        assert name in str(e.value)
    assert get_reader("zenodo").carries_diagnosis and get_reader("zenodo").default_label_map == "default"
    assert not get_reader("voc").carries_diagnosis and get_reader("voc").default_label_map == "dataset"
    assert get_reader("voc").options == ["patient_from", "patients_csv", "voc_origin"]


def test_registering_a_name_twice_is_an_error():
    with pytest.raises(ConfigError, match="registered twice"):

        @register_reader("voc")
        def another_voc(input, *, label_map=None):
            raise AssertionError("never called")


def test_missing_idc_module_gives_a_clear_error(monkeypatch):
    monkeypatch.setattr(reader_registry, "OPTIONAL_MODULES", {"idc-test": "mil.readers.no_such_module"})
    monkeypatch.setattr(reader_registry, "_UNAVAILABLE", {})
    monkeypatch.setattr(reader_registry, "_loaded", False)
    with pytest.raises(ConfigError, match=r"'idc-test' cannot be read here: its module mil.readers.no_such_module"):
        get_reader("idc-test")
    assert "idc-test" not in list_readers()


def test_an_option_the_format_does_not_take_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not take --voc-origin"):
        read_dataset("zenodo", tmp_path, voc_origin=1)


# ---------------------------------------------------------------- VOC


def write_voc(path: Path, filename: str, size: tuple[int, int], objects: list[tuple[str, tuple]]) -> None:
    """A Pascal VOC annotation as the VOC devkit and LabelImg write it (1-based inclusive pixel boxes)."""
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "JPEGImages"
    ET.SubElement(root, "filename").text = filename
    sz = ET.SubElement(root, "size")
    for tag, v in zip(("width", "height", "depth"), (*size, 3)):
        ET.SubElement(sz, tag).text = str(v)
    for name, (xmin, ymin, xmax, ymax) in objects:
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = name
        ET.SubElement(obj, "difficult").text = "0"
        bb = ET.SubElement(obj, "bndbox")
        for tag, v in zip(("xmin", "ymin", "xmax", "ymax"), (xmin, ymin, xmax, ymax)):
            ET.SubElement(bb, tag).text = str(v)
    path.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(root).write(path)


def voc_dataset(root: Path) -> dict:
    objects = {
        "field_a": [("WBC", (11, 21, 40, 45)), ("RBC", (1, 1, 64, 48)), ("RBC", (30, 30, 30, 30))],
        "field_b": [("Platelets", (5, 6, 9, 12))],
    }
    for stem, objs in objects.items():
        png(root / "JPEGImages" / f"{stem}.jpg", (64, 48))
        write_voc(root / "Annotations" / f"{stem}.xml", f"{stem}.jpg", (64, 48), objs)
    return objects


def test_voc_round_trip_one_based_boxes(tmp_path):
    objects = voc_dataset(tmp_path / "voc")
    cells, patients = read_dataset("voc", tmp_path / "voc")
    expected = {
        f"{stem}:{k}": (xmin - 1, ymin - 1, xmax, ymax)
        for stem, objs in objects.items()
        for k, (_, (xmin, ymin, xmax, ymax)) in enumerate(objs)
    }
    assert boxes_of(cells) == expected  # the one-pixel box (30,30,30,30) keeps its pixel
    assert [r["label"] for r in cells.rows] == ["WBC", "RBC", "RBC", "Platelets"]
    assert {p["patient_id"] for p in patients.rows} == {"field_a", "field_b"}
    assert all(p["diagnosis"] == "" for p in patients.rows)
    assert all(Path(r["image_path"]).is_absolute() and Path(r["image_path"]).exists() for r in cells.rows)


def test_voc_zero_based_origin_keeps_file_coordinates_and_clips(tmp_path):
    png(tmp_path / "JPEGImages" / "f.png", (64, 48))
    write_voc(
        tmp_path / "Annotations" / "f.xml", "f.png", (64, 48), [("WBC", (0, 0, 10, 10)), ("WBC", (50, 40, 70, 49))]
    )
    cells, _ = read_dataset("voc", tmp_path, voc_origin=0)
    assert list(boxes_of(cells).values()) == [(0, 0, 10, 10), (50, 40, 64, 48)]


def test_voc_patient_from_folder(tmp_path):
    for patient, stem in (("p1", "a"), ("p1", "b"), ("p2", "c")):
        png(tmp_path / patient / f"{stem}.png", (32, 32))
        write_voc(tmp_path / patient / f"{stem}.xml", f"{stem}.png", (32, 32), [("WBC", (2, 2, 20, 20))])
    cells, patients = read_dataset("voc", tmp_path, patient_from="folder")
    assert [p["patient_id"] for p in patients.rows] == ["p1", "p2"]
    assert [r["patient_id"] for r in cells.rows] == ["p1", "p1", "p2"]


# ---------------------------------------------------------------- COCO


def coco_doc(image_dir: Path) -> dict:
    png(image_dir / "s1.png", (80, 60))
    png(image_dir / "s2.png", (80, 60))
    return {
        "images": [
            {"id": 1, "file_name": "s1.png", "width": 80, "height": 60},
            {"id": 2, "file_name": "s2.png", "width": 80, "height": 60},
            {"id": 3, "file_name": "s3_empty.png", "width": 80, "height": 60},
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 7, "bbox": [4.0, 5.0, 20.0, 10.0], "area": 200, "iscrowd": 0},
            {"id": 11, "image_id": 1, "category_id": 8, "bbox": [30.4, 12.6, 9.2, 7.0], "area": 64.4, "iscrowd": 0},
            {"id": 12, "image_id": 2, "category_id": 7, "bbox": [70, 50, 15, 15], "area": 225, "iscrowd": 0},
        ],
        "categories": [{"id": 7, "name": "myeloblast"}, {"id": 8, "name": "lymphocyte"}],
    }


def test_coco_round_trip_checked_with_pycocotools(tmp_path):
    doc = coco_doc(tmp_path / "images")
    (tmp_path / "annotations").mkdir()
    ann_file = tmp_path / "annotations" / "instances.json"
    ann_file.write_text(json.dumps(doc))
    cells, patients = read_dataset("coco", tmp_path)
    assert boxes_of(cells) == {"10": (4, 5, 24, 15), "11": (30, 13, 40, 20), "12": (70, 50, 80, 60)}  # 12 clipped
    assert [r["label"] for r in cells.rows] == ["myeloblast", "lymphocyte", "myeloblast"]
    assert [p["patient_id"] for p in patients.rows] == ["s1", "s2"]  # s3 has no annotation: no patient
    pycocotools = pytest.importorskip("pycocotools.coco")
    coco = pycocotools.COCO(str(ann_file))
    by_id = {str(a["id"]): a for a in coco.loadAnns(coco.getAnnIds())}
    for r in cells.rows:
        ann = by_id[r["cell_id"]]
        image = coco.loadImgs(ann["image_id"])[0]
        assert Path(r["image_path"]).name == image["file_name"]
        assert coco.loadCats(ann["category_id"])[0]["name"] == r["label"]
        x, y, w, h = ann["bbox"]
        assert (r["x0"], r["y0"]) == (round(x), round(y))
        assert (r["x1"], r["y1"]) == (min(round(x + w), image["width"]), min(round(y + h), image["height"]))


def test_coco_folder_of_several_files_and_scores(tmp_path):
    doc = coco_doc(tmp_path)
    for ann in doc["annotations"]:
        ann["score"] = 0.5
    (tmp_path / "train.json").write_text(json.dumps(doc))
    (tmp_path / "val.json").write_text(json.dumps({**doc, "annotations": doc["annotations"][:1]}))
    cells, _ = read_dataset("coco", tmp_path)
    assert sorted(boxes_of(cells)) == ["train:10", "train:11", "train:12", "val:10"]
    assert {r["det_score"] for r in cells.rows} == {0.5}


# ---------------------------------------------------------------- YOLO


def yolo_line(cls: int, box: tuple, size: tuple[int, int]) -> str:
    x0, y0, x1, y1 = box
    w, h = size
    return f"{cls} {(x0 + x1) / 2 / w:.6f} {(y0 + y1) / 2 / h:.6f} {(x1 - x0) / w:.6f} {(y1 - y0) / h:.6f}"


def test_yolo_ultralytics_layout_with_data_yaml(tmp_path):
    size = (96, 64)
    truth = {
        "train/a": [(0, (10, 12, 30, 40)), (1, (50, 0, 96, 20))],
        "val/b": [(1, (0, 30, 17, 64))],
    }
    for stem, objs in truth.items():
        png(tmp_path / "images" / f"{stem}.png", size)
        txt = tmp_path / "labels" / f"{stem}.txt"
        txt.parent.mkdir(parents=True, exist_ok=True)
        txt.write_text("\n".join(yolo_line(c, b, size) for c, b in objs) + "\n")
    png(tmp_path / "images" / "val" / "background.png", size)  # no label file: not a patient
    (tmp_path / "data.yaml").write_text(
        "path: .\ntrain: images/train\nval: images/val\nnames:\n  0: blast\n  1: lymphocyte\n"
    )
    cells, patients = read_dataset("yolo", tmp_path)
    expected = {f"images__{s.replace('/', '__')}:{k}": b for s, objs in truth.items() for k, (_, b) in enumerate(objs)}
    assert boxes_of(cells) == expected
    assert [r["label"] for r in cells.rows] == ["blast", "lymphocyte", "lymphocyte"]
    assert [p["patient_id"] for p in patients.rows] == ["a", "b"]


def test_yolo_labelimg_layout_with_classes_txt_scores_and_polygons(tmp_path):
    size = (50, 40)
    png(tmp_path / "x.jpg", size)
    (tmp_path / "classes.txt").write_text("RBC\nWBC\n")
    (tmp_path / "x.txt").write_text(
        yolo_line(1, (5, 5, 25, 25), size) + " 0.875\n" + "0 0.1 0.25 0.3 0.25 0.3 0.5 0.1 0.5\n"
    )
    cells, _ = read_dataset("yolo", tmp_path)
    assert list(boxes_of(cells).values()) == [(5, 5, 25, 25), (5, 10, 15, 20)]
    assert [r["det_score"] for r in cells.rows] == [0.875, None]
    assert [r["label"] for r in cells.rows] == ["WBC", "RBC"]


# ---------------------------------------------------------------- Zenodo


def write_zenodo(root: Path, *, cells: list[dict], rois: list[dict], clinical: list[dict]) -> Path:
    """The Zenodo layout written by hand, as PRODUCT.md 2.1 and the shared interface describe it."""
    root.mkdir(parents=True, exist_ok=True)
    for roi in rois:
        if roi.get("image"):
            png(root / roi["image"], (int(roi.get("width") or 64), int(roi.get("height") or 64)))
    for name, rows, sep in (("cells.csv", cells, ","), ("rois.csv", rois, ","), ("clinical.csv", clinical, ";")):
        with (root / name).open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=sep)
            writer.writeheader()
            writer.writerows(rows)
    return root


def zenodo_cell(cid, roi, box, label, auer=0, s1=None, s2=None):
    x0, y0, x1, y1 = box
    return {
        "cell_id": cid,
        "slide_id": "S" + roi[1:],
        "roi_id": roi,
        "x1": x0,
        "x2": x1,
        "y1": y0,
        "y2": y1,
        "consensus_label": label,
        "label_session_1": s1 if s1 is not None else label,
        "label_session_2": s2 if s2 is not None else label,
        "auer_rod": auer,
    }


def zenodo_dataset(root: Path) -> Path:
    return write_zenodo(
        root,
        cells=[
            zenodo_cell("c1", "R1", (3, 4, 20, 30), "myelocytic_blast", auer=1),
            zenodo_cell("c2", "R1", (40, 40, 64, 64), "segmented_neutrophil", s2="neutrophilic_band"),
            zenodo_cell("c3", "R2", (0, 0, 10, 12), "artifact"),
            zenodo_cell("c4", "R3", (5, 5, 25, 25), ""),
            zenodo_cell("c5", "R3", (1, 2, 3, 4), "Lymphocytic Blast"),
        ],
        rois=[
            {
                "roi_id": "R1",
                "slide_id": "S1",
                "patient_id": "P01",
                "image": "images/R1.png",
                "width": 64,
                "height": 64,
            },
            {
                "roi_id": "R2",
                "slide_id": "S2",
                "patient_id": "P01",
                "image": "images/R2.png",
                "width": 64,
                "height": 64,
            },
            {
                "roi_id": "R3",
                "slide_id": "S3",
                "patient_id": "P02",
                "image": "images/R3.png",
                "width": 64,
                "height": 64,
            },
        ],
        clinical=[
            {
                "patient_id": "P01",
                "age": 7,
                "ncit_concept_code": "C3171",
                "leukemia_type": "AML",
                "leukemia_subtype": "M2",
            },
            {
                "patient_id": "P02",
                "age": 4,
                "ncit_concept_code": "C3167",
                "leukemia_type": "ALL",
                "leukemia_subtype": "",
            },
            {
                "patient_id": "P03",
                "age": 9,
                "ncit_concept_code": "C3174",
                "leukemia_type": "CML",
                "leukemia_subtype": "",
            },
        ],
    )


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


# ---------------------------------------------------------------- crops


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


# ---------------------------------------------------------------- the command


def test_mil_cells_writes_tables_that_read_back(tmp_path, capsys):
    root = zenodo_dataset(tmp_path / "zenodo")
    out = tmp_path / "out"
    assert main(["cells", "--format", "zenodo", "--input", str(root), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2 patients, 3 images, 5 cells" in printed
    assert "myeloblast" in printed and "(unlabelled)" in printed and "AML" in printed
    cells = read_cell_table(out / "cells.csv")
    assert boxes_of(cells)["c1"] == (3, 4, 20, 30)
    assert cells.rows[0]["auer_rod"] == "1" and cells.rows[0]["label"] == "myeloblast"
    patients = read_patient_table(out / "patients.csv")
    assert patients.diagnoses() == ["ALL", "AML"]
    assert not list(out.glob(".*.tmp"))


def test_mil_cells_voc_with_options(tmp_path, capsys):
    voc_dataset(tmp_path / "voc")
    out = tmp_path / "out"
    argv = ["cells", "--format", "voc", "--input", str(tmp_path / "voc"), "--out", str(out), "--voc-origin", "1"]
    assert main([*argv, "--no-check-images"]) == 0
    assert "2 patients, 2 images, 4 cells" in capsys.readouterr().out
    assert boxes_of(read_cell_table(out / "cells.csv"))["field_a:0"] == (10, 20, 40, 45)


def test_help_describes_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["cells", "--help"])
    text = capsys.readouterr().out
    for option in ("--format", "--input", "--out", "--label-map", "--patients-csv", "--patient-from", "--voc-origin"):
        assert option in text
    assert "--no-check-images" in text
    for name in BUILTIN:
        assert f"  {name} " in text  # each format listed with its one-line description


def test_mil_cells_hands_reader_options_and_out_to_readers_that_take_them(tmp_path, monkeypatch, capsys):
    seen = {}

    def read_fake(input, *, label_map=None, out_dir=None, clinical=None, roi_padding=32):
        """A reader that writes images of its own under --out (as idc writes its ROI PNGs)."""
        seen.update(input=input, out_dir=out_dir, clinical=clinical, roi_padding=roi_padding)
        image = png(out_dir / "rois" / "r.png", (16, 16))
        from mil.cell_table import CellTable, PatientTable

        row = {"cell_id": "c", "patient_id": "p", "image_path": str(image), "x0": 0, "y0": 0, "x1": 8, "y1": 8}
        return CellTable(rows=[{**row, "label": "", "raw_label": "", "det_score": None, "source": "fake"}]), (
            PatientTable(rows=[{"patient_id": "p", "diagnosis": "AML"}])
        )

    spec = reader_registry.ReaderSpec("fake", read_fake, "fake", True, "default")
    monkeypatch.setitem(reader_registry._READERS, "fake", spec)
    out = tmp_path / "out"
    argv = ["cells", "--format", "fake", "--input", str(tmp_path), "--out", str(out), "--clinical", "c.csv"]
    assert main([*argv, "--roi-padding", "4"]) == 0
    assert seen == {"input": tmp_path, "out_dir": out, "clinical": Path("c.csv"), "roi_padding": 4}
    assert (out / "cells.csv").exists()
    assert main([*argv, "--voc-origin", "0"]) == 2
    assert "format 'fake' does not take --voc-origin" in capsys.readouterr().err


def test_a_synthetic_cohort_reads_through_the_zenodo_reader(tmp_path, capsys):
    pytest.importorskip("mil.synth.command")
    synth = ["synth", "--out", str(tmp_path / "synth"), "--seed", "3", "--patients", "3", "--quiet"]
    small = ["--fields-per-patient", "1", "--cells-per-field", "8", "--field-width", "192", "--field-height", "192"]
    assert main([*synth, *small]) == 0
    assert main(["cells", "--format", "zenodo", "--input", str(tmp_path / "synth"), "--out", str(tmp_path / "c")]) == 0
    cells, patients = read_cell_table(tmp_path / "c" / "cells.csv"), read_patient_table(tmp_path / "c" / "patients.csv")
    assert len(patients) == 3 and set(patients.diagnoses()) <= {"ALL", "AML", "CML"}
    classes = set(load_label_map().classes) | {"drop", ""}
    assert {r["label"] for r in cells.rows} <= classes
    assert all(r["auer_rod"] in ("0", "1") for r in cells.rows)  # the cue's ground truth passes through
    with open(tmp_path / "synth" / "cells.csv") as f:
        assert len(cells) == sum(1 for _ in f) - 1
