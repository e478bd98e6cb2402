"""Write a synthetic cohort in the Zenodo layout of BoneMarrowWSI-PediatricLeukemia.

ROOT/images/<roi_id>.png, ROOT/rois.csv, ROOT/cells.csv (x1=left, x2=right, y1=top, y2=bottom, the
dataset's column order), ROOT/clinical.csv (';'-separated), ROOT/README.txt describing it and
ROOT/synth_config.yaml (the resolved config, loadable by `mil synth --config`).
Every file is written atomically; the CSVs come last, so a cells.csv on disk means a finished run.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from mil import __version__
from mil.atomic import atomic_path, atomic_write_text
from mil.errors import InputError
from mil.progress import track
from mil.synth.centres import assign_patients
from mil.synth.cohort import Patient, make_patient
from mil.synth.config import SynthConfig

CELL_COLUMNS = (
    "cell_id",
    "slide_id",
    "roi_id",
    "x1",
    "x2",
    "y1",
    "y2",
    "consensus_label",
    "label_session_1",
    "label_session_2",
    "auer_rod",
    "true_label",
)
ROI_COLUMNS = ("roi_id", "slide_id", "patient_id", "image", "width", "height")
CLINICAL_COLUMNS = ("patient_id", "age", "ncit_concept_code", "leukemia_type", "leukemia_subtype")


def clinical_columns(config: SynthConfig) -> tuple[str, ...]:
    """clinical.csv's columns: the Zenodo ones, then `centre` and the configured covariates."""
    return CLINICAL_COLUMNS + ("centre",) + tuple(c.name for c in config.covariates)


def clinical_row(patient: Patient) -> dict:
    return dict(
        patient_id=patient.patient_id,
        ncit_concept_code=patient.ncit_concept_code,
        leukemia_type=patient.diagnosis,
        leukemia_subtype=patient.subtype,
        centre=patient.centre,
        **patient.covariates,  # age (possibly blanked) and the covariates
    )


def clinical_table(config: SynthConfig, seed: int = 0) -> list[dict]:
    """The rows of clinical.csv that write_cohort writes for this config and seed, without drawing a cell."""
    plan = assign_patients(config, np.random.default_rng(np.random.SeedSequence([int(seed)])))
    width = max(3, len(str(config.patients)))
    return [
        clinical_row(make_patient(config, seed, i, diagnosis, id_width=width, centre=centre, draw_fields=False))
        for i, (centre, diagnosis) in enumerate(plan)
    ]


@dataclass
class CohortSummary:
    out: Path
    patients: int
    fields: int
    cells: int
    labelled_cells: int
    min_labelled_per_patient: int
    diagnoses: dict[str, int]
    centres: dict[str, dict[str, int]]  # centre -> diagnosis -> patients

    def __str__(self) -> str:
        """What a person reads (`mil synth`, the demo): counts per diagnosis and centre, fields, cells, folder."""
        counts = ", ".join(f"{k} {v}" for k, v in self.diagnoses.items())
        if len(self.centres) > 1:
            counts += "; " + "; ".join(
                f"centre {c}: " + ", ".join(f"{k} {v}" for k, v in n.items() if v) for c, n in self.centres.items()
            )
        return (
            f"{self.patients} patients ({counts}), {self.fields} fields, {self.cells} cells "
            f"({self.labelled_cells} labelled, >= {self.min_labelled_per_patient} per patient) in {self.out}"
        )


def _csv_text(columns: tuple[str, ...], rows: list[dict], delimiter: str = ",") -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, delimiter=delimiter, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _check_csv(columns: tuple[str, ...], n_rows: int, delimiter: str = ",") -> Callable[[Path], None]:
    def validate(path: Path) -> None:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh, delimiter=delimiter)
            header = next(reader)
            count = sum(1 for _ in reader)
        if tuple(header) != columns or count != n_rows:
            raise InputError(f"{path}: wrote {count} rows with header {header}, expected {n_rows} rows of {columns}")

    return validate


def _write_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    def validate(tmp: Path) -> None:
        with Image.open(tmp) as im:
            if im.size != (image.shape[1], image.shape[0]):
                raise InputError(f"{tmp}: PNG has size {im.size}, expected {image.shape[1]}x{image.shape[0]}")

    with atomic_path(path, validate) as tmp:
        # compress_level 1: the fields are noisy, so higher levels cost much time for little space
        Image.fromarray(image).save(tmp, format="PNG", compress_level=1)


def _readme(config: SynthConfig, seed: int, summary: CohortSummary) -> str:
    counts = ", ".join(f"{k}: {v}" for k, v in summary.diagnoses.items())
    centres = "".join(
        f"  centre {name}: " + ", ".join(f"{k}: {v}" for k, v in n.items()) + "\n"
        for name, n in summary.centres.items()
        if len(summary.centres) > 1
    )
    return (
        f"Synthetic bone-marrow cohort written by `mil synth` (cytomil {__version__}), seed {seed}.\n"
        f"{summary.patients} patients ({counts}), {summary.fields} fields, {summary.cells} cells, "
        f"{summary.labelled_cells} labelled (at least {summary.min_labelled_per_patient} per patient).\n"
        f"{centres}\n"
        "Layout (the Zenodo release of BoneMarrowWSI-PediatricLeukemia):\n"
        "  cells.csv     cell_id,slide_id,roi_id,x1,x2,y1,y2,consensus_label,label_session_1,label_session_2\n"
        "                + auer_rod (1 = the cell carries the morphology-only cue)\n"
        "                + true_label (the class drawn, before label noise; ground truth for checks)\n"
        "                boxes in ROI-image pixels: x1 left, x2 right, y1 top, y2 bottom (x2, y2 exclusive)\n"
        "  rois.csv      roi_id,slide_id,patient_id,image,width,height (image relative to this folder)\n"
        "  clinical.csv  patient_id;age;ncit_concept_code;leukemia_type;leukemia_subtype;centre;<covariates>\n"
        "                (';'-separated; a blank value is missing; configs/synth.yaml documents each covariate)\n"
        "  images/       one PNG per ROI (smear field)\n"
        "  synth_config.yaml  the config below; `mil synth --config synth_config.yaml --seed SEED` regenerates this\n\n"
        "Read it with: mil cells --format zenodo --input THIS_FOLDER --out CELLS_DIR\n\n"
        "Config used:\n" + yaml.safe_dump(config.to_dict(), sort_keys=False, width=110)
    )


def write_cohort(config: SynthConfig, out: str | Path, *, seed: int = 0, progress: bool = True) -> CohortSummary:
    """Generate every patient and write the Zenodo layout under `out`; returns counts for the user."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    plan = assign_patients(config, np.random.default_rng(np.random.SeedSequence([int(seed)])))
    width = max(3, len(str(config.patients)))
    cell_rows, roi_rows, clinical_rows, labelled = [], [], [], []
    for index in track(range(config.patients), "synth", "patients", enabled=progress):
        centre, diagnosis = plan[index]
        patient: Patient = make_patient(config, seed, index, diagnosis, id_width=width, centre=centre)
        n_labelled = 0
        for fld in patient.fields:
            _write_png(out / "images" / f"{fld.roi_id}.png", fld.image)
            roi_rows.append(
                dict(
                    roi_id=fld.roi_id,
                    slide_id=patient.slide_id,
                    patient_id=patient.patient_id,
                    image=f"images/{fld.roi_id}.png",
                    width=fld.image.shape[1],
                    height=fld.image.shape[0],
                )
            )
            for c in fld.cells:
                x0, y0, x1, y1 = c.box
                cell_rows.append(
                    dict(
                        cell_id=c.cell_id,
                        slide_id=patient.slide_id,
                        roi_id=fld.roi_id,
                        x1=x0,
                        x2=x1,
                        y1=y0,
                        y2=y1,
                        consensus_label=c.consensus_label,
                        label_session_1=c.label_session_1,
                        label_session_2=c.label_session_2,
                        auer_rod=c.auer_rod,
                        true_label=c.true_label,
                    )
                )
                n_labelled += bool(c.consensus_label)
        labelled.append(n_labelled)
        clinical_rows.append(clinical_row(patient))
    summary = CohortSummary(
        out=out,
        patients=config.patients,
        fields=len(roi_rows),
        cells=len(cell_rows),
        labelled_cells=int(sum(labelled)),
        min_labelled_per_patient=int(min(labelled)),
        diagnoses={d.name: sum(dx == d.name for _, dx in plan) for d in config.diagnoses},
        centres={
            c.name: {d.name: sum(cc.name == c.name and dx == d.name for cc, dx in plan) for d in config.diagnoses}
            for c in dict.fromkeys(cc for cc, _ in plan)
        },
    )
    atomic_write_text(out / "README.txt", _readme(config, seed, summary))
    # the resolved config, loadable by --config: the same seed and file regenerate this folder
    atomic_write_text(out / "synth_config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False, width=110))
    for name, columns, rows, delimiter in (
        ("rois.csv", ROI_COLUMNS, roi_rows, ","),
        ("clinical.csv", clinical_columns(config), clinical_rows, ";"),
        ("cells.csv", CELL_COLUMNS, cell_rows, ","),
    ):
        text = _csv_text(columns, rows, delimiter)
        atomic_write_text(out / name, text, validate=_check_csv(columns, len(rows), delimiter))
    return summary
