"""COCO object-detection JSON (`images`, `annotations` with `bbox` = [x, y, width, height], `categories`).

Input: one JSON file, or a folder whose `*.json` / `annotations/*.json` are all read (for example a
train/val pair). Image files are looked up from each `file_name` relative to the JSON's folder, its parent,
an `images/` folder beside either, or the COCO-2017 image folder named after the JSON (`val2017/` for
`instances_val2017.json`). COCO boxes are continuous pixel coordinates from 0, so x0 = x, x1 = x + width
(rounded to whole pixels and clipped into the image's declared width and height). The label is the
category name; a detector's result file with `score` fills `det_score`.
"""

from __future__ import annotations

import json
from pathlib import Path

from mil.cell_table import CellTable
from mil.errors import InputError
from mil.labels import LabelMap
from mil.readers.common import (
    Problems,
    apply_labels,
    box_in_image,
    cell_row,
    keep_patients_with_cells,
    number,
    resolve_label_map,
)
from mil.readers.patients import assign_patients
from mil.readers.registry import register_reader


def _json_files(input: Path) -> list[Path]:
    if input.is_file():
        return [input]
    files = sorted([*input.glob("*.json"), *input.glob("annotations/*.json")])
    if not files:
        raise InputError(f"no COCO JSON under {input}; pass the .json file or a folder holding it")
    return files


def _image_path(file_name: str, js: Path, root: Path) -> Path:
    if Path(file_name).is_absolute():
        return Path(file_name)
    base, up = js.parent, js.parent.parent
    folders = [base, up, base / "images", up / "images", root, root / "images", up / js.stem.split("_")[-1]]
    for folder in folders:
        if (folder / file_name).is_file():
            return folder / file_name
    return base / file_name  # not found: validation names the file at its most likely place


def _load(js: Path) -> dict:
    try:
        doc = json.loads(js.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{js} is not valid JSON ({e}); repair the file or export it again") from e
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(doc.get(k), list)]
    if missing:
        raise InputError(
            f"{js} lacks the COCO list(s) {missing}; a COCO detection file has images, annotations, categories"
        )
    return doc


@register_reader("coco")
def read_coco(
    input: Path,
    *,
    label_map: LabelMap | None = None,
    patient_from: str = "image",
    patients_csv: Path | None = None,
):
    """COCO detection JSON (bbox [x, y, w, h]); a .json file or a folder of them."""
    root = input if input.is_dir() else input.parent
    files = _json_files(input)
    problems = Problems(f"COCO annotations {input}")
    docs = [(js, _load(js)) for js in files]
    images: dict[tuple[Path, object], tuple[Path, tuple[int, int] | None]] = {}
    for js, doc in docs:
        for k, im in enumerate(doc["images"]):
            if "id" not in im or "file_name" not in im:
                problems.add(f"{js} images[{k}]: needs 'id' and 'file_name'; add them")
                continue
            size = (int(im["width"]), int(im["height"])) if im.get("width") and im.get("height") else None
            images[(js, im["id"])] = (_image_path(str(im["file_name"]), js, root), size)
    assignment, patients = assign_patients(
        sorted({path for path, _ in images.values()}),
        root,
        patient_from=patient_from,
        patients_csv=patients_csv,
        problems=problems,
    )
    rows, where = [], []
    for js, doc in docs:
        categories = {c.get("id"): str(c.get("name", "")).strip() for c in doc["categories"]}
        prefix = f"{js.stem}:" if len(docs) > 1 else ""
        for k, ann in enumerate(doc["annotations"]):
            place = f"{js} annotations[{k}] (id {ann.get('id', '?')})"
            image = images.get((js, ann.get("image_id")))
            if image is None:
                problems.add(
                    f"{place}: image_id {ann.get('image_id')!r} is not in 'images'; add the image or fix the id"
                )
                continue
            if ann.get("category_id") not in categories:
                problems.add(f"{place}: category_id {ann.get('category_id')!r} is not in 'categories'; fix the id")
                continue
            bbox = ann.get("bbox")
            if not isinstance(bbox, list) or len(bbox) != 4:
                problems.add(f"{place}: bbox is {bbox!r}; COCO needs [x, y, width, height]")
                continue
            x, y, w, h = (number(v, place, "bbox", problems) for v in bbox)
            if None in (x, y, w, h):
                continue
            path, size = image
            box = box_in_image((x, y, x + w, y + h), size, place, problems)
            if box is None or path not in assignment:
                continue
            score = ann.get("score")
            rows.append(
                cell_row(
                    cell_id=f"{prefix}{ann.get('id', k)}",
                    patient_id=assignment[path],
                    image=path,
                    box=box,
                    raw_label=categories[ann["category_id"]],
                    source="coco",
                    det_score=float(score) if score is not None else None,
                )
            )
            where.append(place)
    apply_labels(rows, resolve_label_map(label_map, "dataset", [r["raw_label"] for r in rows]), where, problems)
    problems.raise_if_any()
    return CellTable(rows=rows), keep_patients_with_cells(patients, rows, "images without annotations")
