"""Which patient an image belongs to, for formats that do not say it (COCO, YOLO, VOC, ImageFolder).

By default every image is its own patient (patient id = image file stem), which is right for detection sets
of unrelated fields such as BCCD. `patient_from="folder"` takes the image's parent folder instead, and a
patients CSV maps each image to a patient explicitly (and may carry a diagnosis and covariates).
"""

from __future__ import annotations

from pathlib import Path

from mil.cell_table import PatientTable, unsafe_patient_id_reason
from mil.errors import ConfigError, InputError
from mil.readers.common import Problems, read_csv_rows

PATIENT_FROM = ("image", "folder")
IMAGE_COLUMNS = ("image", "image_path", "filename", "file_name")
RENAME = "rename it to letters, digits, '-', '_' or '.'"


def _image_keys(image: Path, root: Path) -> list[str]:
    """Names a patients CSV may use for an image, most specific first."""
    keys = [image.name, image.stem]
    if image.is_relative_to(root):
        keys.insert(0, image.relative_to(root).as_posix())
    return keys


def _from_csv(images: list[Path], root: Path, path: Path, problems: Problems) -> tuple[dict[Path, str], list[dict]]:
    rows = read_csv_rows(path, ("patient_id",), what="patients CSV")
    columns = list(rows[0][1]) if rows else []
    image_column = next((c for c in IMAGE_COLUMNS if c in columns), None)
    if image_column is None and rows:
        raise InputError(
            f"patients CSV {path} has no image column (found: {', '.join(columns)}); for this format it maps "
            f"images to patients, so add a column named one of {', '.join(IMAGE_COLUMNS)}"
        )
    by_key: dict[str, tuple[int, dict]] = {}
    for line, row in rows:
        key = Path(row[image_column]).as_posix()
        if key in by_key and by_key[key][1]["patient_id"] != row["patient_id"]:
            problems.add(
                f"{path}:{line}: image {key!r} is given patient {row['patient_id']!r} here and "
                f"{by_key[key][1]['patient_id']!r} on line {by_key[key][0]}; keep one row per image"
            )
        by_key.setdefault(key, (line, row))
    assignment, facts, unmapped = {}, {}, []
    for image in images:
        hit = next((by_key[k] for k in _image_keys(image, root) if k in by_key), None)
        if hit is None:
            unmapped.append(image)
            continue
        line, row = hit
        pid = row["patient_id"]
        reason = unsafe_patient_id_reason(pid)
        if reason:
            problems.add(f"{path}:{line}: patient id {pid!r} {reason}; {RENAME}")
            continue
        assignment[image] = pid
        patient = {k: v for k, v in row.items() if k != image_column}
        if pid in facts and facts[pid][1].get("diagnosis", "") != patient.get("diagnosis", ""):
            problems.add(
                f"{path}:{line}: patient {pid!r} has diagnosis {patient.get('diagnosis')!r} here and "
                f"{facts[pid][1].get('diagnosis')!r} on line {facts[pid][0]}; a patient has one diagnosis"
            )
        facts.setdefault(pid, (line, patient))
    for image in unmapped:
        problems.add(f"{image}: image is not in patients CSV {path}; add a row naming it in column {image_column!r}")
    return assignment, [facts[p][1] for p in sorted(facts)]


def assign_patients(
    images: list[Path],
    root: Path,
    *,
    patient_from: str = "image",
    patients_csv: Path | None = None,
    problems: Problems,
) -> tuple[dict[Path, str], PatientTable]:
    """image -> patient id for every image, and the patient table of those patients.

    Diagnosis stays empty unless the patients CSV has a `diagnosis` column (its other columns are kept as
    patient covariates). Problems (unmapped images, unsafe ids, two images claiming one patient id) go into
    `problems` with the file they come from.
    """
    if patient_from not in PATIENT_FROM:
        raise ConfigError(f"--patient-from {patient_from!r} is not one of {', '.join(PATIENT_FROM)}")
    if patients_csv is not None:
        assignment, rows = _from_csv(images, root, Path(patients_csv), problems)
        for row in rows:
            row.setdefault("diagnosis", "")
        return assignment, PatientTable(rows=rows)
    assignment, claimed = {}, {}
    for image in images:
        pid = image.stem if patient_from == "image" else image.parent.name
        reason = unsafe_patient_id_reason(pid)
        if reason:
            problems.add(f"{image}: patient id {pid!r} (from the {patient_from} name) {reason}; {RENAME}")
            continue
        if patient_from == "image" and pid in claimed and claimed[pid] != image:
            problems.add(
                f"{image}: patient id {pid!r} (the file stem) is also the stem of {claimed[pid]}; two images "
                "cannot be one patient by name alone: rename one, or pass --patient-from folder or --patients-csv"
            )
            continue
        claimed.setdefault(pid, image)
        assignment[image] = pid
    rows = [{"patient_id": pid, "diagnosis": ""} for pid in sorted(set(assignment.values()))]
    return assignment, PatientTable(rows=rows)
