"""YOLO txt labels: one `class cx cy w h` line per object, normalised to the image size (0..1).

Layouts: Ultralytics (`<root>/images/<split>/x.jpg` with `<root>/labels/<split>/x.txt`) and Darknet/LabelImg
(`x.txt` beside `x.jpg`). Class names come from `names` in a `data.yaml` / `dataset.yaml` (or any YAML in the
root that has `names`), else from `classes.txt` / `obj.names` (one name per line) in the root or beside the
label files. A sixth value is taken as a detector's confidence (`det_score`); a longer line is an Ultralytics
segmentation polygon, whose bounding box is used. Pixels: x0 = (cx - w/2) * width, rounded and clipped.
An image without a label file has no cells (a background image) and is left out. The reader says which file
named the classes (several candidates may exist); `classes` (CLI `--classes`) overrides the search with a file
(data.yaml or classes.txt layout) or a comma-separated list of names, class 0 first.
"""

from __future__ import annotations

from pathlib import Path

from mil.cell_table import CellTable
from mil.errors import InputError
from mil.labels import LabelMap
from mil.progress import track
from mil.readers.common import (
    Problems,
    apply_labels,
    box_in_image,
    cell_row,
    flat_name,
    image_size,
    keep_patients_with_cells,
    list_images,
    log,
    resolve_label_map,
)
from mil.readers.patients import assign_patients
from mil.readers.registry import register_reader

YAML_NAMES = ("data.yaml", "dataset.yaml", "data.yml", "dataset.yml")
TXT_NAMES = ("classes.txt", "obj.names", "classes.names")


def label_file(image: Path) -> Path:
    """Ultralytics rule: the last `images` folder of the path becomes `labels`; else the .txt beside the image."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            candidate = Path(*parts[:i], "labels", *parts[i + 1 :]).with_suffix(".txt")
            if candidate.is_file():
                return candidate
            break
    return image.with_suffix(".txt")


def _names_from_yaml(path: Path) -> list[str] | None:
    import yaml

    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise InputError(f"{path} is not valid YAML ({e}); repair it or give the classes in classes.txt") from e
    names = spec.get("names") if isinstance(spec, dict) else None
    if isinstance(names, dict):  # Ultralytics writes {0: name, 1: name}
        return [str(names[k]) for k in sorted(names, key=int)]
    return [str(n) for n in names] if isinstance(names, list) else None


def names_from_option(classes: str | Path) -> tuple[list[str], str]:
    """`--classes`: a data.yaml / classes.txt file, or names separated by commas (class 0 first)."""
    path = Path(classes)
    if path.is_file():
        if path.suffix.lower() in (".yaml", ".yml"):
            names = _names_from_yaml(path)
            if not names:
                raise InputError(f"--classes {path} has no `names: [...]` list; add one or give a classes.txt")
        else:
            names = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        return names, str(path)
    if path.suffix.lower() in (".txt", ".names", ".yaml", ".yml"):
        raise InputError(f"--classes {classes}: no such file; give an existing classes.txt / data.yaml or NAME,NAME")
    names = [n.strip() for n in str(classes).split(",") if n.strip()]
    if not names:
        raise InputError("--classes is empty; give a classes.txt / data.yaml or NAME,NAME,...")
    return names, "--classes"


def class_names(root: Path, label_dirs: list[Path]) -> tuple[list[str], Path]:
    """The class names and the file they came from."""
    yamls = [root / n for n in YAML_NAMES] + sorted(root.glob("*.yaml")) + sorted(root.glob("*.yml"))
    for path in yamls:
        if path.is_file() and (names := _names_from_yaml(path)):
            return names, path
    for folder in [root, *label_dirs]:
        for name in TXT_NAMES:
            path = folder / name
            if path.is_file():
                return [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()], path
    raise InputError(
        f"no YOLO class names under {root}; write a data.yaml with `names: [...]` or a classes.txt "
        "with one class name per line (line k names class k)"
    )


def _parse_line(values: list[str], place: str, problems: Problems) -> tuple[int, tuple, float | None] | None:
    """(class, (x0, y0, x1, y1) normalised, score) of one label line, or None with the problem recorded."""
    try:
        cls, nums = int(values[0]), [float(v) for v in values[1:]]
    except ValueError:
        problems.add(f"{place}: {' '.join(values)!r} is not 'class cx cy w h' numbers; fix the line")
        return None
    if len(nums) in (4, 5):
        cx, cy, w, h = nums[:4]
        return cls, (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), (nums[4] if len(nums) == 5 else None)
    if len(nums) >= 6 and len(nums) % 2 == 0:  # segmentation polygon x1 y1 x2 y2 ...
        xs, ys = nums[0::2], nums[1::2]
        return cls, (min(xs), min(ys), max(xs), max(ys)), None
    problems.add(f"{place}: {len(values)} values; a YOLO line is 'class cx cy w h' (optionally a score, or a polygon)")
    return None


@register_reader("yolo")
def read_yolo(
    input: Path,
    *,
    label_map: LabelMap | None = None,
    patient_from: str = "image",
    patients_csv: Path | None = None,
    classes: str | Path | None = None,
):
    """YOLO txt labels (class cx cy w h, normalised) with class names from data.yaml or classes.txt."""
    if not input.is_dir():
        raise InputError(f"yolo input {input} is not a folder; expected images with .txt labels (Ultralytics layout)")
    labelled = [(image, label_file(image)) for image in list_images(input)]
    labelled = [(image, txt) for image, txt in labelled if txt.is_file()]
    if not labelled:
        raise InputError(f"no image under {input} has a YOLO .txt label file (labels/<split>/x.txt or x.txt beside x)")
    if classes is not None:
        names, names_file = names_from_option(classes)
    else:
        names, names_file = class_names(input, sorted({txt.parent for _, txt in labelled}))
    log.warning("yolo: class names %s from %s (override with --classes FILE or NAME,NAME,...)", names, names_file)
    problems = Problems(f"YOLO labels under {input}")
    assignment, patients = assign_patients(
        [image for image, _ in labelled], input, patient_from=patient_from, patients_csv=patients_csv, problems=problems
    )
    rows, where = [], []
    for image, txt in track(labelled, "read yolo", "images"):
        if image not in assignment:
            continue
        size = image_size(image, str(txt), problems)
        if size is None:
            continue
        for n, line in enumerate(txt.read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            place = f"{txt}:{n + 1}"
            parsed = _parse_line(line.split(), place, problems)
            if parsed is None:
                continue
            cls, (x0, y0, x1, y1), score = parsed
            if not 0 <= cls < len(names):
                problems.add(
                    f"{place}: class {cls} has no name in {names_file} ({len(names)} names); add it or pass --classes"
                )
                continue
            w, h = size
            box = box_in_image((x0 * w, y0 * h, x1 * w, y1 * h), size, place, problems)
            if box is None:
                continue
            rows.append(
                cell_row(
                    cell_id=f"{flat_name(image, input)}:{n}",
                    patient_id=assignment[image],
                    image=image,
                    box=box,
                    raw_label=names[cls],
                    source="yolo",
                    det_score=score,
                )
            )
            where.append(place)
    apply_labels(rows, resolve_label_map(label_map, "dataset", [r["raw_label"] for r in rows]), where, problems)
    problems.raise_if_any()
    return CellTable(rows=rows), keep_patients_with_cells(patients, rows, "empty label files")
