"""Single-cell crops grouped by patient: `<root>/<patient>/[<cell type>/]<img>` plus a patients CSV.

The layout of SCEMILA-style AML datasets: one folder per patient holding that patient's cell crops,
optionally split into one folder per cell type (the folder name is then the cell's label). The patients
CSV (`patient_id,diagnosis[,covariates...]`, ',' or ';' separated) gives each patient's diagnosis; its
other columns (age, blood counts, ...) are kept in the patient table as covariates.

One cell per image, its box covering the whole image (size read from the image header).
"""

from __future__ import annotations

from pathlib import Path

from mil.cell_table import CellTable, PatientTable, unsafe_patient_id_reason
from mil.errors import ConfigError, InputError
from mil.labels import LabelMap
from mil.progress import track
from mil.readers.common import (
    Problems,
    apply_labels,
    cell_row,
    check_patient_rows,
    flat_name,
    image_size,
    keep_patients_with_cells,
    list_images,
    read_csv_rows,
    resolve_label_map,
)
from mil.readers.registry import register_reader

RENAME = "rename it to letters, digits, '-', '_' or '.'"


def read_patients_csv(path: Path, problems: Problems) -> tuple[dict[str, int], PatientTable]:
    """patient id -> CSV line, and the table; duplicate/unsafe ids and missing diagnoses go into `problems`."""
    rows = read_csv_rows(path, ("patient_id", "diagnosis"), what="patients CSV")
    check_patient_rows(rows, path, problems)
    lines: dict[str, int] = {}
    for line, row in rows:
        lines.setdefault(row["patient_id"], line)
    seen: set[str] = set()
    unique = [row for _, row in rows if not (row["patient_id"] in seen or seen.add(row["patient_id"]))]
    return lines, PatientTable(rows=unique)


@register_reader("patient-folders", carries_diagnosis=True)
def read_patient_folders(input: Path, *, label_map: LabelMap | None = None, patients_csv: Path | None = None):
    """Crops grouped by patient: <root>/<patient>/[<cell type>/]<img> plus --patients-csv (patient_id,diagnosis)."""
    if patients_csv is None:
        raise ConfigError(
            "the patient-folders format needs --patients-csv FILE with columns patient_id,diagnosis "
            "(one row per patient folder)"
        )
    if not input.is_dir():
        raise InputError(f"patient-folders input {input} is not a folder; expected <root>/<patient>/[<type>/]<img>")
    problems = Problems(f"patient folders under {input}")
    lines, patients = read_patients_csv(Path(patients_csv), problems)
    images = list_images(input)
    if not images:
        raise InputError(f"no images under {input}; expected <root>/<patient>/[<cell type>/]<img>")
    rows, where, missing = [], [], {}
    for image in track(images, "read patient-folders", "images"):
        parts = image.relative_to(input).parts
        if len(parts) == 1:
            problems.add(f"{image}: image lies directly in the root; move it into its patient's folder")
            continue
        if len(parts) > 3:
            problems.add(
                f"{image}: nested {len(parts) - 1} folders deep; the layout is <root>/<patient>/[<cell type>/]<img>"
            )
            continue
        pid = parts[0]
        reason = unsafe_patient_id_reason(pid)
        if reason:
            problems.add(f"{input / pid}: patient folder name {pid!r} {reason}; {RENAME}")
            continue
        if pid not in lines:
            missing.setdefault(pid, image)
            continue
        size = image_size(image, str(image), problems)
        if size is None:
            continue
        rows.append(
            cell_row(
                cell_id=flat_name(image, input),
                patient_id=pid,
                image=image,
                box=(0, 0, size[0], size[1]),
                raw_label=parts[1] if len(parts) == 3 else "",
                source="patient-folders",
            )
        )
        where.append(str(image))
    for pid in sorted(missing):
        problems.add(f"{input / pid}: patient {pid!r} has no row in {patients_csv}; add its patient_id and diagnosis")
    apply_labels(rows, resolve_label_map(label_map, "dataset", [r["raw_label"] for r in rows]), where, problems)
    problems.raise_if_any()
    return CellTable(rows=rows), keep_patients_with_cells(patients, rows, f"rows of {patients_csv} without a folder")
