"""The DICOM side of the `idc` reader: find slides and bulk annotation objects, and read annotation groups
into cells (level-0 pixel boxes, ids, a raw label per annotation session) and ROI rectangles.

It follows the layout of the dataset's conversion for Imaging Data Commons (one annotation object per
session, named in ClinicalTrialSeriesID and the series description; one group per raw label, the label as
group label and a SNOMED concept as property type; cell and ROI ids as measurements; ROI rectangles in an
object of their own) and also reads groups that name their session in the group label ("Session 2 - ...").
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mil.labels import LabelMap, normalize_label
from mil.readers.common import Problems

log = logging.getLogger("mil.readers.idc")

WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
ANN_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.91.1"
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


def scan_dicom(root: Path) -> tuple[dict[str, SlideSeries], list[Path]]:
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


def _without_session(text: str) -> str:
    """'consensus: myelocytic_blast' -> 'myelocytic_blast'; 'Session 2 - Prolymphocyte' -> 'prolymphocyte'."""
    if NO_CONSENSUS.search(text):
        return "no_consensus_found"  # a label of the vocabulary, whose "consensus" names no session
    return normalize_label(SESSION_TOKENS.sub(" ", text)).strip("_:|/-")


def _raw_label(group, label_map: LabelMap) -> str:
    """The group's cell type as a raw label: '' for a generic 'cell' group; unknown names stay for the check.

    Only whole names are looked up (never a class found inside a longer label), so an unknown label is
    listed by the label check instead of being read as a class it happens to contain.
    """
    meaning = str(group.annotated_property_type.meaning)
    description = str(getattr(group, "AnnotationGroupDescription", "") or "")
    # The group label first: the IDC conversion writes the dataset's own raw label there, the coded type
    # beside it is a coarser SNOMED concept ('myelocytic_blast' -> "Myeloblast").
    for text in (group.label, _without_session(group.label), meaning, _without_session(description)):
        if text and label_map.lookup(text) is not None:
            return normalize_label(text)
    # Nothing known: the coded type names the cell unless it is generic ('Cell'), then the group label does.
    if not _is_generic(meaning):
        return normalize_label(meaning)
    label = _without_session(group.label)
    return "" if _is_generic(label) else label


def _is_generic(text: str) -> bool:
    """'Cell', 'unlabelled cells', '': a box of some cell whose type the group does not say."""
    return set(re.split(r"[\W_]+", normalize_label(text))) - {""} <= GENERIC_WORDS


def _is_roi_group(group) -> bool:
    names = [group.annotated_property_type.meaning, SESSION_TOKENS.sub(" ", group.label)]
    return any(ROI_GROUP.match(normalize_label(n).strip("_")) for n in names)


def read_annotation_file(
    path: Path, slides: dict[str, SlideSeries], label_map: LabelMap, problems: Problems
) -> tuple[SlideSeries | None, list[Cell], dict[str, np.ndarray]]:
    """Cells and ROI rectangles (level-0 pixels) of one annotation file."""
    import highdicom as hd
    import pydicom

    try:
        ann = hd.ann.MicroscopyBulkSimpleAnnotations.from_dataset(pydicom.dcmread(path))
    except Exception as e:  # pydicom and highdicom raise many types for a broken object
        problems.add(f"{path}: bulk annotations cannot be read ({type(e).__name__}: {e}); download the file again")
        return None, [], {}
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


def merge_cells(cells: list[Cell], problems: Problems) -> list[Cell]:
    """One record per cell: the same cell in a consensus and in session groups carries each group's label."""
    merged: dict[tuple, Cell] = {}
    for cell in cells:
        key = ("id", cell.cell_id) if cell.cell_id else ("box", cell.roi_id, tuple(np.round(cell.box).astype(int)))
        if key not in merged:
            merged[key] = cell
            continue
        kept = merged[key]
        kept.roi_id = kept.roi_id or cell.roi_id
        for session, raw in cell.labels.items():
            if raw and kept.labels.get(session) and kept.labels[session] != raw:
                problems.add(
                    f"{cell.where[session]}: cell {cell.cell_id or key[2]} is labelled {raw!r} here and "
                    f"{kept.labels[session]!r} in {kept.where[session]}; keep one label per cell and session"
                )
            elif raw or session not in kept.labels:
                kept.labels[session], kept.where[session] = raw, cell.where[session]
    return list(merged.values())


def choose_label_source(cells: list[Cell], slide: str) -> str:
    """Which session's labels to use: the consensus, else labels given without a session, else the first one."""
    sessions = {s for c in cells for s, raw in c.labels.items() if raw}
    if "consensus" in sessions or not sessions:
        return "consensus"
    if "" in sessions:
        return ""
    first = min(sessions, key=lambda s: int(s.split("_")[1]))
    log.warning(
        "slide %s has no consensus annotations; its labels are those of %s (every session's labels are kept "
        "in label_session_N columns, and label_source says which one was used)",
        slide,
        first,
    )
    return first
