"""Round trips of the detection-box readers (VOC, COCO, YOLO) through files in each format's own layout
(COCO checked with pycocotools)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from reader_files import boxes_of, coco_doc, png, voc_dataset, write_voc, yolo_line

from mil.readers import read_dataset


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


def test_yolo_names_the_class_file_it_used_and_takes_a_classes_override(tmp_path, caplog):
    import logging

    from mil.errors import InputError

    size = (50, 40)
    png(tmp_path / "x.jpg", size)
    (tmp_path / "classes.txt").write_text("RBC\nWBC\n")
    (tmp_path / "x.txt").write_text(yolo_line(1, (5, 5, 25, 25), size) + "\n" + yolo_line(0, (2, 2, 9, 9), size) + "\n")
    with caplog.at_level(logging.WARNING, logger="mil.readers"):
        cells, _ = read_dataset("yolo", tmp_path)
    assert [r["label"] for r in cells.rows] == ["WBC", "RBC"]
    assert "classes.txt" in caplog.text and "['RBC', 'WBC']" in caplog.text
    cells, _ = read_dataset("yolo", tmp_path, classes="platelet,lymphocyte")
    assert [r["label"] for r in cells.rows] == ["lymphocyte", "platelet"]
    (tmp_path / "other.yaml").write_text("names: [a, b]\n")
    cells, _ = read_dataset("yolo", tmp_path, classes=str(tmp_path / "other.yaml"))
    assert [r["label"] for r in cells.rows] == ["b", "a"]
    with pytest.raises(InputError, match="no such file"):
        read_dataset("yolo", tmp_path, classes=str(tmp_path / "missing.txt"))
    with pytest.raises(InputError, match="class 1 has no name in --classes"):
        read_dataset("yolo", tmp_path, classes="only")
