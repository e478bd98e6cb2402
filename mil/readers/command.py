"""`mil cells`: read a dataset into DIR/cells.csv and DIR/patients.csv, validate both, print a summary."""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from pathlib import Path

from mil.cell_table import (
    NO_DIAGNOSIS_FIX,
    CellTable,
    PatientTable,
    validate_cell_table,
    validate_patient_table,
)
from mil.errors import InputError, MilError
from mil.labels import load_label_map
from mil.readers.patients import PATIENT_FROM
from mil.readers.registry import get_reader, list_readers, unavailable_readers

DESCRIPTION = """\
Read a dataset into the cell table (one row per cell: patient, image, box, label) and the patient table
(one row per patient: diagnosis and covariates), write both atomically as DIR/cells.csv and DIR/patients.csv,
and check them: every problem (unreadable image, box outside its image or of zero area, unknown label,
duplicate or unsafe patient id, patient without diagnosis) is listed at once, naming file and row.

Label maps: zenodo and idc map raw labels to the 33 classes of configs/label_map.yaml (the raw label stays
in raw_label); the other formats keep the dataset's own labels unless --label-map is given.
Patients: coco, yolo, voc and imagefolder make each image its own patient (id = file stem) unless
--patient-from folder or --patients-csv says otherwise; zenodo reads them from rois.csv and clinical.csv;
patient-folders from <root>/<patient>/ folders plus --patients-csv.
"""


# CLI options handed to the reader (flag --patients-csv -> keyword patients_csv).
READER_OPTIONS = (
    "patients_csv", "patient_from", "voc_origin", "clinical", "roi_padding", "max_roi_size", "classes",
)  # fmt: skip


def _formats_help() -> str:
    lines = []
    for name in list_readers():
        lines.append(f"  {name:<16} {get_reader(name).summary}")
    for name, why in unavailable_readers().items():
        lines.append(f"  {name:<16} (unavailable here: {why})")
    return "formats:\n" + "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    parser.epilog = _formats_help()
    from mil.cli import DefaultsShown

    # the description's line breaks kept, and every default shown like in every other command
    parser.formatter_class = type("CellsHelp", (DefaultsShown, argparse.RawDescriptionHelpFormatter), {})
    formats = list_readers() + list(unavailable_readers())
    parser.add_argument("--format", required=True, choices=sorted(formats), help="input format (see below)")
    parser.add_argument("--input", required=True, type=Path, help="dataset root folder (or annotation file)")
    parser.add_argument("--out", required=True, type=Path, help="output folder for cells.csv and patients.csv")
    parser.add_argument(
        "--label-map",
        type=Path,
        help="label map YAML (layout of configs/label_map.yaml); default: the 33-class map for zenodo/idc, "
        "the dataset's own labels for the other formats",
    )
    parser.add_argument(
        "--patients-csv",
        type=Path,
        help="patient-folders: CSV patient_id,diagnosis[,covariates] (required); coco/yolo/voc/imagefolder: "
        "CSV image,patient_id[,diagnosis,...] mapping each image (relative path, file name or stem) to a patient",
    )
    parser.add_argument(
        "--patient-from",
        choices=PATIENT_FROM,
        help="coco/yolo/voc: patient id from the image file stem (default) or from its parent folder",
    )
    parser.add_argument(
        "--voc-origin",
        type=int,
        choices=(0, 1),
        help="voc: 1 (default) = VOC devkit 1-based inclusive boxes, stored as x0=xmin-1, x1=xmax; "
        "0 = 0-based boxes, stored as in the file",
    )
    parser.add_argument(
        "--clinical",
        type=Path,
        help="idc: the ';'-separated clinical CSV (patient_id;age;ncit_concept_code;leukemia_type;leukemia_subtype) "
        "that gives each patient's diagnosis where the DICOM files do not",
    )
    parser.add_argument(
        "--roi-padding", type=int, help="idc: pixels added around each region of interest read from the slide"
    )
    parser.add_argument("--max-roi-size", type=int, help="idc: largest side in pixels of a region read from the slide")
    parser.add_argument(
        "--classes",
        help="yolo: class names from this data.yaml / classes.txt, or NAME,NAME,... (class 0 first), instead of "
        "the file the reader finds (it names the file it used)",
    )
    parser.add_argument(
        "--no-check-images",
        action="store_true",
        help="skip opening every image to check it is readable and holds its boxes (faster; not recommended)",
    )


def summary(cells: CellTable, patients: PatientTable) -> str:
    """Patients, images, cells, and cells per label (and patients per diagnosis where there are diagnoses)."""
    images = {r["image_path"] for r in cells.rows}
    text = [f"{len(patients)} patients, {len(images)} images, {len(cells)} cells"]
    labels = Counter(r.get("label") or "(unlabelled)" for r in cells.rows)
    text.append("cells per label:")
    text += [f"  {label:<28} {n}" for label, n in sorted(labels.items(), key=lambda kv: (-kv[1], kv[0]))]
    diagnoses = Counter(r.get("diagnosis") for r in patients.rows if r.get("diagnosis"))
    if diagnoses:
        text.append("patients per diagnosis:")
        text += [f"  {d:<28} {n}" for d, n in sorted(diagnoses.items())]
    return "\n".join(text)


def validate(cells: CellTable, patients: PatientTable, *, require_diagnosis: bool, check_images: bool, where: str):
    """The core checks of both tables; every problem of both in one error, nothing written."""
    failures = []
    if not cells.rows:
        failures.append(f"{where} holds no cells; check --input and --format")
    try:
        validate_patient_table(patients, where=f"patient table of {where}", require_diagnosis=require_diagnosis)
    except MilError as e:
        failures.append(str(e))
    try:
        validate_cell_table(cells, patients, check_images=check_images, where=f"cell table of {where}")
    except MilError as e:
        failures.append(str(e))
    if failures:
        raise InputError("\n".join(failures) + "\nNothing was written; fix the input and run `mil cells` again.")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="note: %(message)s", stream=sys.stderr)
    reader = get_reader(args.format)
    label_map = load_label_map(args.label_map) if args.label_map else None
    # Only options the user gave are passed: a reader that does not take one says so, naming the flag.
    options = {k: getattr(args, k) for k in READER_OPTIONS if getattr(args, k, None) is not None}
    if "out_dir" in reader.options:  # readers that write images of their own (idc's ROI PNGs) write them under --out
        options["out_dir"] = args.out
    cells, patients = reader(args.input, label_map=label_map, **options)
    # Diagnoses are required where the format carries them, and wherever a patients CSV gave any.
    require_diagnosis = reader.carries_diagnosis or any(r.get("diagnosis") for r in patients.rows)
    validate(
        cells,
        patients,
        require_diagnosis=require_diagnosis,
        check_images=not args.no_check_images,
        where=f"{args.format} input {args.input}",
    )
    cells_path = cells.write(args.out / "cells.csv")
    patients_path = patients.write(args.out / "patients.csv")
    print(summary(cells, patients))
    print(f"wrote {cells_path} and {patients_path}")
    warning = missing_diagnosis_warning(cells, patients, args)
    if warning:
        print(warning, file=sys.stderr)
    return 0


def missing_diagnosis_warning(cells: CellTable, patients: PatientTable, args: argparse.Namespace) -> str | None:
    """One line when patients lack a diagnosis, naming the fix: said here, not first at `mil compare`."""
    blank = [r["patient_id"] for r in patients.rows if not (r.get("diagnosis") or "").strip()]
    if not blank:
        return None
    images = {r["image_path"] for r in cells.rows}
    per_image = (
        " (each image became its own patient)"
        if args.patients_csv is None and len(patients) == len(images) and len(patients) > 1
        else ""
    )
    who = "no patient has" if len(blank) == len(patients) else f"{len(blank)} of {len(patients)} patients have"
    return f"warning: {who} a diagnosis{per_image}; `mil compare` needs one per patient. {NO_DIAGNOSIS_FIX}"
