"""The `idc` reader: BoneMarrowWSI-PediatricLeukemia as hosted on NCI Imaging Data Commons (PRODUCT.md 2.1).

Input is a folder (any nesting) of DICOM files: VL Whole Slide Microscopy Images and Microscopy Bulk
Simple Annotations over them. Each annotation object is matched to its slide by the referenced series,
instance, frame of reference or (single-slide) study. Groups whose label is a cell type give boxes; the
consensus group wins when groups exist per annotation session, and every session's raw label is kept in
a `label_session_N` column. The pixels of each region of interest are read from the slide with wsidicom
and written as PNG under `<out_dir>/rois/`; cell boxes in the cell table are pixels of that PNG.
Reading the DICOM objects lives in mil/readers/idc_annotations.py; this module makes the ROIs and tables.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from mil.cell_table import CellTable, PatientTable
from mil.errors import ConfigError, InputError
from mil.labels import LabelMap
from mil.readers.common import Problems, apply_labels, cell_row, check_patient_rows, read_csv_rows, resolve_label_map
from mil.readers.idc_annotations import (
    Cell,
    SlideSeries,
    choose_label_source,
    merge_cells,
    read_annotation_file,
    scan_dicom,
)
from mil.readers.registry import register_reader

CLINICAL_COLUMNS = ("patient_id", "leukemia_type")


def _roi_regions(
    cells: list[Cell], rois: dict[str, np.ndarray], size: tuple[int, int], padding: int, max_roi_size: int
) -> dict[str, tuple[int, int, int, int]]:
    """Integer ROI rectangles on level 0; every cell gets a `roi_id` whose rectangle holds it."""
    for cell in cells:
        if cell.roi_id is None:
            cx, cy = (cell.box[0] + cell.box[2]) / 2, (cell.box[1] + cell.box[3]) / 2
            inside = [r for r, b in rois.items() if b[0] <= cx <= b[2] and b[1] <= cy <= b[3]]
            # No ROI given: cells are grouped on a grid, so a made region stays about max_roi_size wide
            # however far apart the cells of a slide lie.
            cell.roi_id = inside[0] if inside else f"auto_{int(cy // max_roi_size)}_{int(cx // max_roi_size)}"
    regions = {}
    by_roi = defaultdict(list)
    for cell in cells:
        by_roi[cell.roi_id].append(cell.box)
    for roi_id, boxes in by_roi.items():
        if roi_id in rois:
            x0, y0, x1, y1 = rois[roi_id]
        else:
            stack = np.stack(boxes)
            x0, y0 = stack[:, :2].min(axis=0) - padding
            x1, y1 = stack[:, 2:].max(axis=0) + padding
        regions[roi_id] = (
            max(0, math.floor(x0)),
            max(0, math.floor(y0)),
            min(size[0], math.ceil(x1)),
            min(size[1], math.ceil(y1)),
        )
    return regions


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "x"


def _write_roi(wsi, region: tuple[int, int, int, int], png: Path) -> None:
    from PIL import Image

    from mil.atomic import atomic_path

    x0, y0, x1, y1 = region
    image = wsi.read_region((x0, y0), 0, (x1 - x0, y1 - y0)).convert("RGB")

    def validate(tmp: Path) -> None:
        with Image.open(tmp) as im:
            if im.size != image.size:
                raise OSError(f"ROI image {png} did not read back as {image.size[0]}x{image.size[1]}")

    with atomic_path(png, validate) as tmp:
        image.save(tmp, format="PNG")


def _clinical(path: Path | None, problems: Problems) -> tuple[dict[str, dict], list[str]]:
    """patient_id -> row of a ';'-separated clinical CSV (the Zenodo clinical.csv), and its covariate columns."""
    if path is None:
        return {}, []
    rows = read_csv_rows(Path(path), CLINICAL_COLUMNS, what="clinical table")
    check_patient_rows(rows, Path(path), problems, diagnosis_column="leukemia_type")
    covariates = [c for c in (rows[0][1] if rows else {}) if c not in CLINICAL_COLUMNS]
    return {row["patient_id"]: row for _, row in rows}, covariates


def _patient_row(header, clinical: dict[str, dict], covariates: list[str]) -> dict:
    """Diagnosis from the clinical CSV, else from the DICOM patient-study module (text or code), else ''."""
    found = clinical.get(str(header.PatientID), {})
    coded = getattr(header, "AdmittingDiagnosesCodeSequence", None)
    diagnosis = found.get("leukemia_type") or str(getattr(header, "AdmittingDiagnosesDescription", "") or "")
    row = {"patient_id": str(header.PatientID), "diagnosis": diagnosis or (str(coded[0].CodeMeaning) if coded else "")}
    row.update({c: found.get(c, "") for c in covariates})
    return row


def _box_in_roi(box: np.ndarray, region: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """A level-0 float box as integer pixels of its ROI image (clipped to it; may come out empty)."""
    rx0, ry0, rx1, ry1 = region
    # Edges a quarter pixel off an integer are that integer (3D coordinates come back as float32 mm).
    x0, y0 = (math.floor(v + 0.25) for v in box[:2])
    x1, y1 = (math.ceil(v - 0.25) for v in box[2:])
    return max(x0, rx0) - rx0, max(y0, ry0) - ry0, min(x1, rx1) - rx0, min(y1, ry1) - ry0


def _slide_rows(
    slide: SlideSeries, cells: list[Cell], regions: dict, pngs: dict, patient_id: str, sessions: list[str], problems
) -> tuple[list[dict], list[str]]:
    """Cell-table rows of one slide and, for each, the annotation it came from (for the label check)."""
    source = choose_label_source(cells, slide.slide_id)
    rows, where = [], []
    for i, cell in enumerate(cells):
        chosen = source if cell.labels.get(source) else ""
        place = cell.where.get(chosen) or next(iter(cell.where.values()))
        box = _box_in_roi(cell.box, regions[cell.roi_id])
        if box[2] <= box[0] or box[3] <= box[1]:
            problems.add(f"{place}: box {tuple(np.round(cell.box, 1))} has no pixel inside the slide or its ROI")
            continue
        rows.append(
            cell_row(
                cell_id=cell.cell_id or f"{pngs[cell.roi_id].stem}:{i}",
                patient_id=patient_id,
                image=pngs[cell.roi_id],
                box=box,
                raw_label=cell.labels.get(chosen, ""),
                source="idc",
                slide_id=slide.slide_id,
                roi_id=cell.roi_id,
                label_source=source or "unsessioned",
                **{f"label_{s}": cell.labels.get(s, "") for s in sessions},
            )
        )
        where.append(place)
    return rows, where


@register_reader("idc", carries_diagnosis=True, default_label_map="default")
def read_idc(
    input: Path,
    *,
    label_map: LabelMap | None = None,
    out_dir: Path | None = None,
    clinical: Path | None = None,
    roi_padding: int = 32,
    max_roi_size: int = 2048,
) -> tuple[CellTable, PatientTable]:
    """DICOM bulk simple annotations over DICOM whole-slide images (BoneMarrowWSI on Imaging Data Commons).

    out_dir: ROI images are written to out_dir/rois/ (required: inputs may be read-only).
    clinical: ';'-separated clinical CSV; diagnosis = leukemia_type, other columns become covariates.
        Without it (or for a patient it lacks) the diagnosis is the DICOM AdmittingDiagnosesDescription/Code.
    roi_padding: pixels around the cells of a region made where the annotations give none.
    max_roi_size: cells without a given ROI are grouped on a grid of this many pixels, so a made region
        spans at most this plus one cell and the padding on each side.
    """
    if out_dir is None:
        raise ConfigError(
            "the idc reader writes the pixels of each region of interest as PNG under OUT/rois/ and needs an "
            "output folder (inputs may be read-only); pass --out DIR (Python: out_dir=DIR)"
        )
    if roi_padding < 0 or max_roi_size < 1:
        raise ConfigError(f"roi_padding must be >= 0 and max_roi_size >= 1 (got {roi_padding}, {max_roi_size})")
    input = Path(input)
    if not input.is_dir():
        raise InputError(f"--input {input} is not a folder; pass the folder that holds the DICOM files")
    slides, annotation_files = scan_dicom(input)
    if not slides or not annotation_files:
        raise InputError(
            f"{input} holds {len(slides)} whole-slide image series and {len(annotation_files)} bulk annotation "
            "file(s); the idc format needs both (download the slide series with their ANN series)"
        )
    label_map = resolve_label_map(label_map, "default", [])
    problems = Problems(f"DICOM folder {input}")
    per_slide: dict[str, tuple[SlideSeries, list[Cell], dict]] = {}
    for path in annotation_files:
        slide, cells, rois = read_annotation_file(path, slides, label_map, problems)
        if slide is not None:
            entry = per_slide.setdefault(slide.series_uid, (slide, [], {}))
            entry[1].extend(cells)
            entry[2].update(rois)
    sessions = {s for _, cells, _ in per_slide.values() for c in cells for s in c.labels if s.startswith("session_")}
    sessions = sorted(sessions, key=lambda s: int(s.split("_")[1]))
    clinical_rows, covariates = _clinical(clinical, problems)
    rows, where, patients, to_write = [], [], {}, []
    for slide, cells, rois in per_slide.values():
        cells = merge_cells(cells, problems)
        regions = _roi_regions(cells, rois, slide.size, roi_padding, max_roi_size)
        for roi_id, (x0, y0, x1, y1) in list(regions.items()):
            if x1 <= x0 or y1 <= y0:
                problems.add(f"slide {slide.slide_id}: ROI {roi_id!r} has no pixel inside the slide; fix its rectangle")
                del regions[roi_id]
        cells = [c for c in cells if c.roi_id in regions]
        patient = _patient_row(slide.base, clinical_rows, covariates)
        patients.setdefault(patient["patient_id"], patient)
        # ROI images are named by patient, slide and ROI; the series hash keeps two slides' ROIs apart.
        series_hash = hashlib.sha1(slide.series_uid.encode()).hexdigest()[:8]
        stem = f"{_safe(patient['patient_id'])}__{_safe(slide.slide_id)}-{series_hash}"
        pngs = {r: Path(out_dir) / "rois" / f"{stem}__{_safe(r)}.png" for r in regions}
        slide_rows, slide_where = _slide_rows(slide, cells, regions, pngs, patient["patient_id"], sessions, problems)
        rows += slide_rows
        where += slide_where
        to_write.append((slide, regions, pngs))
    apply_labels(rows, label_map, where, problems)
    problems.raise_if_any()
    import wsidicom.errors  # imported here: only reading pixels needs wsidicom
    from pydicom.errors import InvalidDicomError
    from wsidicom import WsiDicom

    errors = vars(wsidicom.errors).values()
    read_errors = (InvalidDicomError, ValueError, KeyError, IndexError)
    read_errors += tuple(c for c in errors if isinstance(c, type) and issubclass(c, Exception))

    for slide, regions, pngs in to_write:  # every slide is tried, so one error lists every broken slide
        try:
            with WsiDicom.open(slide.files) as wsi:
                for roi_id, region in regions.items():
                    _write_roi(wsi, region, pngs[roi_id])
        except read_errors as e:
            problems.add(
                f"slide {slide.slide_id} ({len(slide.files)} DICOM file(s) in {slide.files[0].parent}) cannot be "
                f"read by wsidicom ({type(e).__name__}: {e}); download its series again"
            )
    problems.raise_if_any()
    return CellTable(rows=rows), PatientTable(rows=list(patients.values()))
