"""The `idc` reader: BoneMarrowWSI-PediatricLeukemia as hosted on NCI Imaging Data Commons (PRODUCT.md 2.1).

Input is a folder (any nesting) of DICOM files: VL Whole Slide Microscopy Images and Microscopy Bulk
Simple Annotations over them. Each annotation object is matched to its slide by the referenced series,
instance, frame of reference or (single-slide) study. Groups whose label is a cell type give boxes; the
consensus group wins when groups exist per annotation session, and every session's raw label is kept in
a `label_session_N` column. The pixels of each region of interest are read from the slide with wsidicom
and written as PNG under `<out_dir>/rois/`; cell boxes in the cell table are pixels of that PNG.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mil.cell_table import CellTable, PatientTable
from mil.errors import ConfigError, InputError
from mil.labels import LabelMap, normalize_label
from mil.readers.common import Problems, apply_labels, cell_row, read_csv_rows, resolve_label_map
from mil.readers.registry import register_reader

log = logging.getLogger("mil.readers.idc")

WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
ANN_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.91.1"
CLINICAL_COLUMNS = ("patient_id", "leukemia_type")
# Words of concepts that say "a cell" without saying which type (the IDC conversion writes unlabelled boxes
# as 'haematological_structure', "Structure of haematological system"): such boxes are cells with no label.
GENERIC_WORDS = {"cell", "cells", "nucleated", "blood", "unlabelled", "unlabeled", "unclassified", "all", "none"}
GENERIC_WORDS |= {"annotation", "annotations", "box", "boxes", "bounding", "detection", "only", "of", "system"}
GENERIC_WORDS |= {"structure", "haematological", "hematological"}
# Measurement concepts that carry identifiers. The IDC conversion uses EFO "single cell identifier" (older
# releases DCM "Identifier") for cells, DCM "Referenced Region of Interest Identifier" for a cell's ROI and
# DCM "Image Region" for the ROI rectangles' own ids.
CELL_ID_NAMES = {"cell_id", "cellid", "cell_identifier", "single_cell_identifier", "identifier", "cell_number"}
ROI_ID_NAMES = {"roi_id", "roiid", "roi_identifier", "roi_number", "region_of_interest_identifier"}
ROI_ID_NAMES |= {"referenced_region_of_interest_identifier", "image_region"}
ROI_GROUP = re.compile(
    r"^(roi|rois|region_of_interest|regions_of_interest|field_of_view|monolayer|selected_region)(_\d+)?$"
)
SESSION = re.compile(r"(?:session|annotator|rater|reader)[\s_\-#]*(\d+)", re.IGNORECASE)
SESSION_TOKENS = re.compile(
    r"(?<![a-z])(?:(?:session|annotator|rater|reader)[\s_\-#]*\d+|consensus|labels?|group)(?![a-z])", re.IGNORECASE
)
# A raw label of the vocabulary that contains the word "consensus" without naming the consensus session.
NO_CONSENSUS = re.compile(r"no[\s_\-]*consensus[\s_\-]*found", re.IGNORECASE)


@dataclass
class SlideSeries:
    """One slide: its DICOM files (all pyramid levels) and the level-0 header."""

    series_uid: str
    files: list[Path] = field(default_factory=list)
    headers: list = field(default_factory=list)

    @property
    def base(self):
        return max(self.headers, key=lambda h: int(h.TotalPixelMatrixColumns))

    @property
    def size(self) -> tuple[int, int]:
        return int(self.base.TotalPixelMatrixColumns), int(self.base.TotalPixelMatrixRows)

    @property
    def slide_id(self) -> str:
        return str(getattr(self.base, "ContainerIdentifier", "") or self.series_uid)


@dataclass
class Cell:
    box: np.ndarray  # (4,) x0 y0 x1 y1 float, level-0 pixels
    cell_id: str | None
    roi_id: str | None
    labels: dict[str, str] = field(default_factory=dict)  # session key ('consensus', 'session_1', '') -> raw
    where: dict[str, str] = field(default_factory=dict)  # session key -> file, group and index it came from


def _scan(root: Path) -> tuple[dict[str, SlideSeries], list[Path]]:
    """Slides by series UID and annotation files under `root`; other files (and non-DICOM ones) are ignored."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    slides: dict[str, SlideSeries] = {}
    annotations: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            try:
                header = pydicom.dcmread(path, stop_before_pixels=True)
            except (InvalidDicomError, OSError, ValueError):
                continue
            sop_class = str(getattr(header, "SOPClassUID", ""))
            if sop_class == ANN_SOP_CLASS:
                annotations.append(path)
            elif sop_class == WSI_SOP_CLASS:
                series = slides.setdefault(str(header.SeriesInstanceUID), SlideSeries(str(header.SeriesInstanceUID)))
                series.files.append(path)
                if "VOLUME" in list(getattr(header, "ImageType", [])):
                    series.headers.append(header)
    return {k: v for k, v in slides.items() if v.headers}, annotations


def _match_slide(ann, slides: dict[str, SlideSeries]) -> tuple[SlideSeries | None, object]:
    """The slide an annotation object refers to, and the referenced image header (its coordinates' frame)."""
    series_uids = [str(s.SeriesInstanceUID) for s in getattr(ann, "ReferencedSeriesSequence", [])]
    instance_uids = [str(r.ReferencedSOPInstanceUID) for r in getattr(ann, "ReferencedImageSequence", [])]
    instance_uids += [
        str(r.ReferencedSOPInstanceUID)
        for s in getattr(ann, "ReferencedSeriesSequence", [])
        for r in getattr(s, "ReferencedInstanceSequence", [])
    ]
    candidates = [slides[u] for u in series_uids if u in slides]
    candidates += [s for s in slides.values() if any(str(h.SOPInstanceUID) in instance_uids for h in s.headers)]
    frame = str(getattr(ann, "FrameOfReferenceUID", ""))
    candidates += [s for s in slides.values() if frame and str(getattr(s.base, "FrameOfReferenceUID", "")) == frame]
    if not candidates:
        in_study = [s for s in slides.values() if str(s.base.StudyInstanceUID) == str(ann.StudyInstanceUID)]
        candidates = in_study if len(in_study) == 1 else []
    if not candidates:
        return None, None
    slide = candidates[0]
    referenced = [h for h in slide.headers if str(h.SOPInstanceUID) in instance_uids]
    return slide, (referenced[0] if referenced else slide.base)


def _to_level0(ann, group, slide: SlideSeries, referenced) -> list[np.ndarray]:
    """Each annotation's points as (n, 2) column/row in level-0 pixels of the slide."""
    import highdicom as hd

    coordinate_type = ann.annotation_coordinate_type
    graphic = group.get_graphic_data(coordinate_type)
    if coordinate_type.value == "3D":
        # Slide coordinates (mm) -> continuous pixel coordinates of the total pixel matrix.
        to_image = hd.spatial.ReferenceToImageTransformer.for_image(slide.base, for_total_pixel_matrix=True)
        return [to_image(np.asarray(points, np.float64))[:, :2] for points in graphic]
    # 2D coordinates are pixels of the referenced image, which may be a lower pyramid level.
    scale = slide.size[0] / int(referenced.TotalPixelMatrixColumns)
    return [np.asarray(points, np.float64)[:, :2] * scale for points in graphic]


def _identifiers(group, names: set[str]) -> list[str | None] | None:
    """Per-annotation identifiers from the group's measurement whose concept is one of `names`."""
    concepts, values, _ = group.get_measurements()
    for j, concept in enumerate(concepts):
        keys = {normalize_label(concept.meaning), normalize_label(concept.value)}
        if keys & names:
            return [None if math.isnan(v) else (str(int(v)) if float(v).is_integer() else str(v)) for v in values[:, j]]
    return None


def _session_in(text: str) -> str | None:
    """'consensus', 'session_N', or None when the text names no annotation session."""
    if "consensus" in NO_CONSENSUS.sub(" ", text).lower():
        return "consensus"
    match = SESSION.search(text)
    return f"session_{int(match.group(1))}" if match else None


def _session_of_file(ann) -> str:
    """The IDC conversion writes one annotation object per session and names it in ClinicalTrialSeriesID
    ('consensus', '1', '2', 'detection-only') and in the series description; '' when none is named."""
    trial_series = str(getattr(ann, "ClinicalTrialSeriesID", "") or "").strip()
    if trial_series.isdigit():
        return f"session_{int(trial_series)}"
    texts = [trial_series] + [str(getattr(ann, k, "") or "") for k in ("SeriesDescription", "ContentDescription")]
    return next((s for s in map(_session_in, texts) if s), "")


def _known_in(text: str, label_map: LabelMap) -> str | None:
    """The longest raw label or class of the map named in `text` ('Session 2 - Myelocytic Blast' names one)."""
    normalized = f"_{normalize_label(text)}_"
    names = sorted({*label_map.classes, *label_map.mapping}, key=len, reverse=True)
    return next((n for n in names if f"_{n}_" in normalized), None)


def _raw_label(group, label_map: LabelMap) -> str:
    """The group's cell type as a raw label: '' for a generic 'cell' group; unknown names stay for the check."""
    meaning = str(group.annotated_property_type.meaning)
    # The group label first: the IDC conversion writes the dataset's own raw label there, the coded type
    # beside it is a coarser SNOMED concept ('myelocytic_blast' -> "Myeloblast").
    texts = [group.label, meaning, str(getattr(group, "AnnotationGroupDescription", "") or "")]
    for text in texts:
        if label_map.lookup(text) is not None:
            return normalize_label(text)
        known = _known_in(text, label_map)
        if known:
            return known
    # Nothing known: the coded type names the cell unless it is generic ('Cell'), then the group label does.
    if not _is_generic(meaning):
        return normalize_label(meaning)
    label = normalize_label(SESSION_TOKENS.sub(" ", NO_CONSENSUS.sub(" ", group.label))).strip("_:|/")
    return "" if _is_generic(label) else label


def _is_generic(text: str) -> bool:
    """'Cell', 'unlabelled cells', '': a box of some cell whose type the group does not say."""
    return set(re.split(r"[\W_]+", normalize_label(text))) - {""} <= GENERIC_WORDS


def _is_roi_group(group) -> bool:
    names = [group.annotated_property_type.meaning, SESSION_TOKENS.sub(" ", group.label)]
    return any(ROI_GROUP.match(normalize_label(n).strip("_")) for n in names)


def _read_annotations(
    path: Path, slides: dict[str, SlideSeries], label_map: LabelMap, problems: Problems
) -> tuple[SlideSeries | None, list[Cell], dict[str, np.ndarray]]:
    """Cells and ROI rectangles (level-0 pixels) of one annotation file."""
    import highdicom as hd
    import pydicom

    ann = hd.ann.MicroscopyBulkSimpleAnnotations.from_dataset(pydicom.dcmread(path))
    slide, referenced = _match_slide(ann, slides)
    if slide is None:
        refs = [str(s.SeriesInstanceUID) for s in getattr(ann, "ReferencedSeriesSequence", [])]
        problems.add(
            f"{path}: refers to slide series {refs or '(none)'} of study {ann.StudyInstanceUID}, which is not among "
            "the DICOM files read; put the slide's whole-slide image files under --input"
        )
        return None, [], {}
    if str(getattr(ann, "PixelOriginInterpretation", "VOLUME")) == "FRAME":
        problems.add(f"{path}: coordinates relative to single frames (FRAME) are not read; export them as VOLUME")
        return None, [], {}
    cells: list[Cell] = []
    rois: dict[str, np.ndarray] = {}
    file_session = _session_of_file(ann)
    for group in ann.get_annotation_groups():
        where = f"{path.name} group {group.number} ({group.label!r})"
        if group.graphic_type.value == "POINT":
            problems.add(f"{where}: POINT annotations give no box; the cell table needs rectangles or polygons")
            continue
        points = _to_level0(ann, group, slide, referenced)
        boxes = [np.array([p[:, 0].min(), p[:, 1].min(), p[:, 0].max(), p[:, 1].max()]) for p in points]
        if _is_roi_group(group):
            roi_ids = _identifiers(group, ROI_ID_NAMES | {"identifier"}) or [None] * len(boxes)
            for i, box in enumerate(boxes):
                rois[roi_ids[i] or f"{group.number}.{i + 1}"] = box
            continue
        roi_ids = _identifiers(group, ROI_ID_NAMES) or [None] * len(boxes)
        cell_ids = _identifiers(group, CELL_ID_NAMES) or [None] * len(boxes)
        session = _session_in(f"{group.label} {getattr(group, 'AnnotationGroupDescription', '')}") or file_session
        raw = _raw_label(group, label_map)
        for i, box in enumerate(boxes):
            cell = Cell(box=box, cell_id=cell_ids[i], roi_id=roi_ids[i])
            cell.labels[session], cell.where[session] = raw, f"{where} annotation {i + 1}"
            cells.append(cell)
    return slide, cells, rois


def _merge(cells: list[Cell], problems: Problems) -> list[Cell]:
    """One record per cell: the same cell in a consensus and in session groups carries each group's label."""
    merged: dict[tuple, Cell] = {}
    for cell in cells:
        key = ("id", cell.cell_id) if cell.cell_id else ("box", cell.roi_id, tuple(np.round(cell.box).astype(int)))
        if key not in merged:
            merged[key] = cell
            continue
        kept = merged[key]
        for session, raw in cell.labels.items():
            if raw and kept.labels.get(session) and kept.labels[session] != raw:
                problems.add(
                    f"{cell.where[session]}: cell {cell.cell_id or key[2]} is labelled {raw!r} here and "
                    f"{kept.labels[session]!r} in {kept.where[session]}; keep one label per cell and session"
                )
            elif raw or session not in kept.labels:
                kept.labels[session], kept.where[session] = raw, cell.where[session]
    return list(merged.values())


def _label_source(cells: list[Cell]) -> str:
    """Which session's labels to use: the consensus, else labels given without a session, else the first one."""
    sessions = {s for c in cells for s, raw in c.labels.items() if raw}
    if "consensus" in sessions or not sessions:
        return "consensus"
    if "" in sessions:
        return ""
    first = min(sessions, key=lambda s: int(s.split("_")[1]))
    log.warning("no consensus annotation group found; using the labels of %s (other sessions kept as columns)", first)
    return first


def _roi_regions(
    cells: list[Cell], rois: dict[str, np.ndarray], size: tuple[int, int], padding: int, max_roi_size: int
) -> dict[str, tuple[int, int, int, int]]:
    """Integer ROI rectangles on level 0; every cell gets a `roi_id` whose rectangle holds it."""
    for cell in cells:
        if cell.roi_id is None:
            cx, cy = (cell.box[0] + cell.box[2]) / 2, (cell.box[1] + cell.box[3]) / 2
            inside = [r for r, b in rois.items() if b[0] <= cx <= b[2] and b[1] <= cy <= b[3]]
            # No ROI given: cells are grouped on a grid so that a region never grows past max_roi_size.
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


def _clinical(path: Path | None) -> dict[str, dict]:
    if path is None:
        return {}
    rows = read_csv_rows(Path(path), CLINICAL_COLUMNS, what="clinical table", delimiter=None)
    return {row["patient_id"]: row for _, row in rows}


def _patient_row(header, clinical: dict[str, dict], with_clinical: bool) -> dict:
    pid = str(header.PatientID)
    row = {"patient_id": pid, "diagnosis": ""}
    if with_clinical:
        found = clinical.get(pid, {})
        row["diagnosis"] = found.get("leukemia_type", "")
        for column in ("age", "ncit_concept_code", "leukemia_subtype"):
            row[column] = found.get(column, "")
    if not row["diagnosis"]:
        # The DICOM patient-study module can state a diagnosis as text or as a code.
        coded = getattr(header, "AdmittingDiagnosesCodeSequence", None)
        row["diagnosis"] = str(getattr(header, "AdmittingDiagnosesDescription", "") or "") or (
            str(coded[0].CodeMeaning) if coded else ""
        )
    return row


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
    """DICOM bulk simple annotations over DICOM whole-slide images (BoneMarrowWSI on Imaging Data Commons)."""
    if out_dir is None:
        raise ConfigError(
            "the idc reader writes the pixels of each region of interest as PNG under OUT/rois/ and needs an "
            "output folder (inputs may be read-only); pass --out DIR (Python: out_dir=DIR)"
        )
    input = Path(input)
    if not input.is_dir():
        raise InputError(f"--input {input} is not a folder; pass the folder that holds the DICOM files")
    slides, annotation_files = _scan(input)
    if not slides or not annotation_files:
        raise InputError(
            f"{input} holds {len(slides)} whole-slide image series and {len(annotation_files)} bulk annotation "
            "file(s); the idc format needs both (download the slide series with their ANN series)"
        )
    label_map = resolve_label_map(label_map, "default", [])
    problems = Problems(f"DICOM folder {input}")
    per_slide: dict[str, tuple[SlideSeries, list[Cell], dict]] = {}
    for path in annotation_files:
        slide, cells, rois = _read_annotations(path, slides, label_map, problems)
        if slide is not None:
            entry = per_slide.setdefault(slide.series_uid, (slide, [], {}))
            entry[1].extend(cells)
            entry[2].update(rois)
    sessions = {s for _, cells, _ in per_slide.values() for c in cells for s in c.labels if s.startswith("session_")}
    sessions = sorted(sessions, key=lambda s: int(s.split("_")[1]))
    clinical_rows = _clinical(clinical)
    rows, where, patients, to_write = [], [], {}, []
    for slide, cells, rois in per_slide.values():
        cells = _merge(cells, problems)
        source = _label_source(cells)
        regions = _roi_regions(cells, rois, slide.size, roi_padding, max_roi_size)
        patient = _patient_row(slide.base, clinical_rows, clinical is not None)
        patients.setdefault(patient["patient_id"], patient)
        slide_key = f"{_safe(slide.slide_id)}-{hashlib.sha1(slide.series_uid.encode()).hexdigest()[:8]}"
        pngs = {
            r: Path(out_dir) / "rois" / f"{_safe(patient['patient_id'])}__{slide_key}__{_safe(r)}.png" for r in regions
        }
        for i, cell in enumerate(cells):
            chosen = source if cell.labels.get(source) else ""
            place = cell.where.get(chosen) or next(iter(cell.where.values()))
            rx0, ry0, rx1, ry1 = regions[cell.roi_id]
            # Edges a quarter pixel off an integer are that integer (3D coordinates come back as floats).
            x0, y0 = (math.floor(v + 0.25) for v in cell.box[:2])
            x1, y1 = (math.ceil(v - 0.25) for v in cell.box[2:])
            box = (max(x0, rx0) - rx0, max(y0, ry0) - ry0, min(x1, rx1) - rx0, min(y1, ry1) - ry0)
            if box[2] <= box[0] or box[3] <= box[1]:
                problems.add(f"{place}: box ({x0},{y0},{x1},{y1}) has no pixel inside the slide or its ROI")
                continue
            labels = {s: cell.labels.get(s, "") for s in sessions}
            rows.append(
                cell_row(
                    cell_id=cell.cell_id or f"{slide_key}:{i}",
                    patient_id=patient["patient_id"],
                    image=pngs[cell.roi_id],
                    box=box,
                    raw_label=cell.labels.get(chosen, ""),
                    source="idc",
                    slide_id=slide.slide_id,
                    roi_id=cell.roi_id,
                    label_source=source or "unsessioned",
                    **{f"label_{s}": raw for s, raw in labels.items()},
                )
            )
            where.append(place)
        to_write.append((slide, regions, pngs))
    apply_labels(rows, label_map, where, problems)
    problems.raise_if_any()
    from wsidicom import WsiDicom

    for slide, regions, pngs in to_write:
        with WsiDicom.open(slide.files) as wsi:
            for roi_id, region in regions.items():
                _write_roi(wsi, region, pngs[roi_id])
    return CellTable(rows=rows), PatientTable(rows=list(patients.values()))
