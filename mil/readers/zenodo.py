"""BoneMarrowWSI-PediatricLeukemia as released on Zenodo (and as `mil synth` writes it).

Layout under ROOT:
  cells.csv     cell_id,slide_id,roi_id,x1,x2,y1,y2,consensus_label,label_session_1,label_session_2[,extra...]
                boxes in ROI-image pixels: x1=left, x2=right, y1=top, y2=bottom (the cell table's x0,x1,y0,y1)
  rois.csv      roi_id,slide_id,patient_id,image,width,height   (image relative to ROOT; default images/<roi_id>.png)
  clinical.csv  ';'-separated: patient_id;age;ncit_concept_code;leukemia_type;leukemia_subtype
  images/<roi_id>.png

The consensus label is mapped with the 33-class label map (configs/label_map.yaml) unless another map is
given; the raw consensus label stays in `raw_label`. Extra columns of cells.csv (the per-session labels,
slide and ROI ids, the synthetic `auer_rod` flag, ...) pass through into the cell table. The diagnosis is
`leukemia_type`; the other clinical columns are patient covariates.
"""

from __future__ import annotations

from pathlib import Path

from mil.cell_table import CELL_COLUMNS, CellTable, PatientTable, unsafe_patient_id_reason
from mil.errors import InputError
from mil.labels import LabelMap
from mil.readers.common import (
    Problems,
    apply_labels,
    box_in_image,
    cell_row,
    check_patient_rows,
    keep_patients_with_cells,
    number,
    read_csv_rows,
    resolve_label_map,
)
from mil.readers.registry import register_reader

CELL_FIELDS = ("cell_id", "roi_id", "x1", "x2", "y1", "y2", "consensus_label")
ROI_FIELDS = ("roi_id", "patient_id")
CLINICAL_FIELDS = ("patient_id", "leukemia_type")
RENAME = "rename it to letters, digits, '-', '_' or '.'"


def _read_rois(
    root: Path, patients: set[str], problems: Problems
) -> tuple[dict[str, tuple[str, Path, tuple | None]], set[str]]:
    """roi_id -> (patient id, image path, declared (width, height) or None), and the ROIs refused."""
    path = root / "rois.csv"
    rois: dict[str, tuple[str, Path, tuple | None]] = {}
    first: dict[str, int] = {}
    refused: set[str] = set()
    for line, row in read_csv_rows(path, ROI_FIELDS, what="Zenodo ROI table"):
        where, roi, pid = f"{path}:{line}", row["roi_id"], row["patient_id"]
        if roi in first:
            problems.add(f"{where}: roi_id {roi!r} repeats line {first[roi]}; keep one row per ROI")
            continue
        first[roi] = line
        reason = unsafe_patient_id_reason(pid)
        if reason:
            problems.add(f"{where}: patient id {pid!r} {reason}; {RENAME}")
            refused.add(roi)
            continue
        if pid not in patients:
            problems.add(f"{where}: patient {pid!r} is not in clinical.csv; add its row with its leukemia_type")
            refused.add(roi)
            continue
        size = None
        if row.get("width") and row.get("height"):
            w, h = number(row["width"], where, "width", problems), number(row["height"], where, "height", problems)
            size = (int(w), int(h)) if w and h else None
        rois[roi] = (pid, root / (row.get("image") or f"images/{roi}.png"), size)
    return rois, refused


@register_reader("zenodo", carries_diagnosis=True, default_label_map="default")
def read_zenodo(input: Path, *, label_map: LabelMap | None = None):
    """BoneMarrowWSI-PediatricLeukemia Zenodo layout: cells.csv, rois.csv, ';'-separated clinical.csv, images/."""
    if not input.is_dir():
        raise InputError(f"zenodo input {input} is not a folder; expected cells.csv, rois.csv, clinical.csv, images/")
    problems = Problems(f"Zenodo dataset {input}")
    clinical_path = input / "clinical.csv"
    clinical = read_csv_rows(clinical_path, CLINICAL_FIELDS, what="Zenodo clinical table")
    check_patient_rows(clinical, clinical_path, problems, diagnosis_column="leukemia_type")
    patient_rows: dict[str, dict] = {}
    for _, row in clinical:
        facts = {"patient_id": row["patient_id"], "diagnosis": row["leukemia_type"]}
        facts.update({k: v for k, v in row.items() if k not in ("patient_id", "leukemia_type")})
        patient_rows.setdefault(row["patient_id"], facts)
    rois, refused = _read_rois(input, set(patient_rows), problems)

    cells_path = input / "cells.csv"
    rows, where, first = [], [], {}
    for line, row in read_csv_rows(cells_path, CELL_FIELDS, what="Zenodo cell table"):
        place = f"{cells_path}:{line} (cell {row['cell_id']!r})"
        cid = row["cell_id"]
        if not cid:
            problems.add(f"{place}: cell_id is empty; give every cell a unique id")
            continue
        if cid in first:
            problems.add(f"{place}: cell_id {cid!r} repeats line {first[cid]}; cell ids must be unique")
            continue
        first[cid] = line
        if row["roi_id"] not in rois:
            # A refused ROI (unknown patient, unsafe id) was reported once, by its own line of rois.csv.
            if row["roi_id"] not in refused:
                problems.add(f"{place}: roi_id {row['roi_id']!r} is not in rois.csv; add the ROI or fix the id")
            continue
        pid, image, size = rois[row["roi_id"]]
        coords = [number(row[c], place, c, problems) for c in ("x1", "y1", "x2", "y2")]
        if any(c is None for c in coords):
            continue
        box = box_in_image(tuple(coords), size, place, problems, clip=False)
        if box is None:
            continue
        extra = {k: v for k, v in row.items() if k not in CELL_FIELDS[2:] and k not in CELL_COLUMNS}
        rows.append(
            cell_row(
                cell_id=cid,
                patient_id=pid,
                image=image,
                box=box,
                raw_label=row["consensus_label"],
                source="zenodo",
                **extra,
            )
        )
        where.append(place)
    apply_labels(rows, resolve_label_map(label_map, "default", []), where, problems)
    problems.raise_if_any()
    patients = PatientTable(rows=list(patient_rows.values()))
    return CellTable(rows=rows), keep_patients_with_cells(patients, rows, "clinical rows without cells")
