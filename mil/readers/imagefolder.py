"""Single-cell crops in ImageFolder layout: `<root>/<class>/<img>` (torchvision's layout, e.g. PBC).

One cell per image, its box covering the whole image (size read from the image header, no pixels decoded).
The class is the first folder below the root, as torchvision's ImageFolder takes it; an image directly in
the root is an unlabelled cell. Each image is its own patient (id = file stem) unless a patients CSV maps
images to patients; for crops grouped by patient use the `patient-folders` format instead.
"""

from __future__ import annotations

from pathlib import Path

from mil.cell_table import CellTable
from mil.errors import ConfigError, InputError
from mil.labels import LabelMap
from mil.progress import track
from mil.readers.common import (
    IMAGE_EXTENSIONS,
    Problems,
    apply_labels,
    cell_row,
    flat_name,
    image_size,
    keep_patients_with_cells,
    list_images,
    resolve_label_map,
)
from mil.readers.patients import assign_patients
from mil.readers.registry import register_reader


@register_reader("imagefolder")
def read_imagefolder(
    input: Path,
    *,
    label_map: LabelMap | None = None,
    patient_from: str = "image",
    patients_csv: Path | None = None,
):
    """Single-cell crops in <root>/<class>/<img>; each image is one cell and (by default) one patient."""
    if patient_from == "folder":
        raise ConfigError(
            "--patient-from folder would make each class folder a patient in the imagefolder layout; "
            "use --format patient-folders for <root>/<patient>/[<cell type>/]<img>, or --patients-csv"
        )
    if not input.is_dir():
        raise InputError(f"imagefolder input {input} is not a folder; expected <root>/<class>/<img>")
    images = list_images(input)
    if not images:
        raise InputError(f"no images under {input}; expected <root>/<class>/<img> ({' '.join(IMAGE_EXTENSIONS)})")
    problems = Problems(f"imagefolder {input}")
    assignment, patients = assign_patients(
        images, input, patient_from=patient_from, patients_csv=patients_csv, problems=problems
    )
    rows, where = [], []
    for image in track(images, "read imagefolder", "images"):
        if image not in assignment:
            continue
        size = image_size(image, str(image), problems)
        if size is None:
            continue
        parts = image.relative_to(input).parts
        rows.append(
            cell_row(
                cell_id=flat_name(image, input),
                patient_id=assignment[image],
                image=image,
                box=(0, 0, size[0], size[1]),
                raw_label=parts[0] if len(parts) > 1 else "",
                source="imagefolder",
            )
        )
        where.append(str(image))
    apply_labels(rows, resolve_label_map(label_map, "dataset", [r["raw_label"] for r in rows]), where, problems)
    problems.raise_if_any()
    return CellTable(rows=rows), keep_patients_with_cells(patients, rows, "no readable image")
