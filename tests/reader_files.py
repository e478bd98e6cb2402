"""Files in each reader format's own layout, written by the reader tests (test_readers*.py)."""

from __future__ import annotations

import csv
import xml.etree.ElementTree as ET
from pathlib import Path

from PIL import Image


def png(path: Path, size: tuple[int, int], colour=(200, 120, 160)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def boxes_of(cells) -> dict[str, tuple[int, int, int, int]]:
    return {r["cell_id"]: (r["x0"], r["y0"], r["x1"], r["y1"]) for r in cells.rows}


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


def yolo_line(cls: int, box: tuple, size: tuple[int, int]) -> str:
    x0, y0, x1, y1 = box
    w, h = size
    return f"{cls} {(x0 + x1) / 2 / w:.6f} {(y0 + y1) / 2 / h:.6f} {(x1 - x0) / w:.6f} {(y1 - y0) / h:.6f}"


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
