"""Pascal VOC XML (`<root>/Annotations/*.xml` + `<root>/JPEGImages/`, or XML files beside their images).

Box convention: the VOC devkit numbers pixels from 1 and its boxes include both end pixels, so an object
covering pixels 0..9 of a 0-based image is written xmin=1, xmax=10. The cell table uses 0-based half-open
pixel boxes, so by default (`voc_origin=1`) x0 = xmin - 1, y0 = ymin - 1, x1 = xmax, y1 = ymax: width and
height are preserved (xmax - xmin + 1) and a box of one pixel (xmin == xmax, as BCCD has twice) keeps its
area. BCCD fits this convention exactly: its coordinates run from 1 to the image width/height, never 0.
For files written by tools that use 0-based half-open coordinates, pass `voc_origin=0` (`--voc-origin 0`)
and the coordinates are stored as they are in the file. Either way boxes are clipped into the image size
(`<size>` of the XML, or the image header when that is missing).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from mil.cell_table import CellTable
from mil.errors import ConfigError, InputError
from mil.labels import LabelMap
from mil.progress import track
from mil.readers.common import (
    Problems,
    apply_labels,
    box_in_image,
    cell_row,
    find_image,
    flat_name,
    image_size,
    keep_patients_with_cells,
    number,
    resolve_label_map,
)
from mil.readers.patients import assign_patients
from mil.readers.registry import register_reader


def _annotation_files(root: Path) -> tuple[Path, list[Path]]:
    """(folder the XML files are named relative to, the XML files)."""
    if root.is_file():
        return root.parent, [root]
    folder = root / "Annotations" if (root / "Annotations").is_dir() else root
    files = sorted(p for p in folder.rglob("*.xml") if not p.name.startswith("."))
    if not files:
        raise InputError(f"no VOC XML files under {root}; expected {root}/Annotations/*.xml (Pascal VOC layout)")
    return folder, files


def _image_for(xml: Path, doc: ET.Element, root: Path) -> Path:
    """The image of an annotation file: JPEGImages/<filename>, else beside the XML, else its <path>."""
    name = (doc.findtext("filename") or "").strip() or xml.stem
    folders = [root / "JPEGImages", xml.parent.parent / "JPEGImages", xml.parent, root]
    for folder in folders:
        found = find_image(folder, name) or find_image(folder, xml.stem)
        if found is not None:
            return found
    declared = Path((doc.findtext("path") or "").strip())
    if declared.is_absolute() and declared.is_file():
        return declared
    # Not found: keep the expected place, so validation names the missing file.
    return (root / "JPEGImages" if (root / "JPEGImages").is_dir() else xml.parent) / name


def _declared_size(doc: ET.Element) -> tuple[int, int] | None:
    try:
        w, h = int(float(doc.findtext("size/width"))), int(float(doc.findtext("size/height")))
    except (TypeError, ValueError):
        return None
    return (w, h) if w > 0 and h > 0 else None


@register_reader("voc")
def read_voc(
    input: Path,
    *,
    label_map: LabelMap | None = None,
    patient_from: str = "image",
    patients_csv: Path | None = None,
    voc_origin: int = 1,
):
    """Pascal VOC XML detection annotations (<root>/Annotations/*.xml, <root>/JPEGImages/*)."""
    if int(voc_origin) not in (0, 1):
        raise ConfigError(f"--voc-origin {voc_origin!r} must be 1 (VOC devkit, 1-based inclusive) or 0 (0-based)")
    shift = int(voc_origin)
    root = input if input.is_dir() else input.parent
    problems = Problems(f"VOC annotations under {input}")
    parsed = []
    folder, files = _annotation_files(input)
    for xml in track(files, "read voc", "annotations"):
        try:
            doc = ET.parse(xml).getroot()
        except ET.ParseError as e:
            problems.add(f"{xml}: not valid XML ({e}); repair or remove the file")
            continue
        parsed.append((xml, doc, _image_for(xml, doc, root)))
    images = list(dict.fromkeys(image for _, _, image in parsed))  # two XML files may annotate one image
    assignment, patients = assign_patients(
        images, root, patient_from=patient_from, patients_csv=patients_csv, problems=problems
    )
    rows, where = [], []
    for xml, doc, image in parsed:
        if image not in assignment:
            continue
        size = _declared_size(doc) or (image_size(image, str(xml), problems) if image.exists() else None)
        for k, obj in enumerate(doc.findall("object")):
            place = f"{xml} object {k + 1}"
            name = (obj.findtext("name") or "").strip()
            coords = [number(obj.findtext(f"bndbox/{c}"), place, c, problems) for c in ("xmin", "ymin", "xmax", "ymax")]
            if not name:
                problems.add(f"{place}: object has no <name>; add the cell's class")
            if any(c is None for c in coords) or not name:
                continue
            xmin, ymin, xmax, ymax = coords
            box = box_in_image((xmin - shift, ymin - shift, xmax, ymax), size, place, problems)
            if box is None:
                continue
            difficult = (obj.findtext("difficult") or "0").strip()
            rows.append(
                cell_row(
                    cell_id=f"{flat_name(xml, folder)}:{k}",
                    patient_id=assignment[image],
                    image=image,
                    box=box,
                    raw_label=name,
                    source="voc",
                    difficult=difficult,
                )
            )
            where.append(place)
    apply_labels(rows, resolve_label_map(label_map, "dataset", [r["raw_label"] for r in rows]), where, problems)
    problems.raise_if_any()
    return CellTable(rows=rows), keep_patients_with_cells(patients, rows, "images without objects")
