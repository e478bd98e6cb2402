"""Helpers every reader shares: collecting problems, CSV columns, image headers, boxes and labels.

Readers collect every problem they find in the annotation files (CSV rows, XML objects, label lines) and
raise one InputError at the end, so a user fixes a dataset in one pass instead of one error per run.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from pathlib import Path

from mil.cell_table import MAX_COORDINATE, PatientTable, diagnosis_spelling_problems, pick_separator
from mil.errors import InputError, listing
from mil.labels import DEFAULT_LABEL_MAP, LabelMap, identity_label_map, load_label_map, normalize_label

log = logging.getLogger("mil.readers")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp")


class Problems:
    """Problems found while reading one dataset; `raise_if_any` turns them into one InputError."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.items: list[str] = []
        self.hints: list[str] = []

    def add(self, message: str, hint: str | None = None) -> None:
        self.items.append(message)
        if hint and hint not in self.hints:
            self.hints.append(hint)

    def __len__(self) -> int:
        return len(self.items)

    def raise_if_any(self) -> None:
        if self.items:
            hints = "".join(f"\n{h}" for h in self.hints)
            raise InputError(
                f"{len(self.items)} problem(s) reading {self.what}:\n{listing(self.items)}{hints}\n"
                "Fix them and run `mil cells` again (every problem found is listed above)."
            )


def absolute(path: Path) -> str:
    """Absolute path as written into the cell table (symlinks kept: the user's folder names stay)."""
    return os.path.abspath(path)


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def list_images(root: Path) -> list[Path]:
    """Image files under `root` (recursively, hidden files and folders skipped), sorted for a stable order."""
    found = []
    # followlinks: datasets are often assembled from symlinked folders.
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath) / f for f in filenames if is_image(Path(f))]
    return sorted(found)


def find_image(folder: Path, name: str) -> Path | None:
    """`folder/name`, or a file with the same stem and an image extension (tools drop or change extensions)."""
    exact = folder / name
    if exact.is_file():
        return exact
    stem = Path(name).stem if Path(name).suffix.lower() in IMAGE_EXTENSIONS else Path(name).name
    for ext in IMAGE_EXTENSIONS:
        for candidate in (folder / f"{stem}{ext}", folder / f"{stem}{ext.upper()}"):
            if candidate.is_file():
                return candidate
    return None


def image_size(path: Path, where: str, problems: Problems) -> tuple[int, int] | None:
    """(width, height) from the image header (PIL opens lazily: no pixels are decoded); None when unreadable."""
    from PIL import Image  # imported here: only readers that need image sizes pay for PIL

    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError:
        problems.add(f"{where}: image {path} does not exist; restore the file or fix the path")
    except Exception as e:  # PIL raises many types for a broken file
        problems.add(f"{where}: image {path} cannot be read ({type(e).__name__}: {e}); replace the file")
    return None


def read_csv_rows(
    path: Path, required: tuple[str, ...], *, what: str, delimiter: str | None = None
) -> list[tuple[int, dict]]:
    """Rows of a CSV as (line number, row) with stripped keys and values; missing columns are one clear error.

    `delimiter=None` picks ',', ';' (clinical tables exported in European locales) or tab by the header
    (``mil.cell_table.pick_separator``); a UTF-8 byte-order mark and CRLF line ends are read as they should be.
    """
    if not path.is_file():
        raise InputError(f"{what} {path} does not exist; it needs columns {', '.join(required)}")
    try:
        return _read_csv_rows(path, required, what=what, delimiter=delimiter)
    except UnicodeError as e:
        raise InputError(f"{what} {path} is not UTF-8 text ({e}); save it as UTF-8 CSV") from e


def _read_csv_rows(path: Path, required: tuple[str, ...], *, what: str, delimiter: str | None):
    with path.open(newline="", encoding="utf-8-sig") as f:
        header = f.readline()
        if delimiter is None:
            delimiter = pick_separator(header, required)
        f.seek(0)
        reader = csv.DictReader(f, delimiter=delimiter)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in required if c not in columns]
        if missing:
            raise InputError(
                f"{what} {path} lacks column(s) {', '.join(missing)} (found: {', '.join(columns) or 'no header'}; "
                f"separator {delimiter!r}); add them to its header row"
            )
        rows = []
        for raw in reader:
            if not any((v or "").strip() for v in raw.values() if isinstance(v, str)):
                continue  # blank line
            row = {(k or "").strip(): (v.strip() if isinstance(v, str) else "") for k, v in raw.items() if k}
            rows.append((reader.line_num, row))
    return rows


def resolve_label_map(label_map: LabelMap | None, default: str, raw_labels: list[str]) -> LabelMap:
    """The map to apply: the one given, else the format's default (the 33-class map, or the dataset's labels)."""
    if label_map is not None:
        return label_map
    if default == "default":
        return load_label_map()
    return identity_label_map(raw_labels)


def apply_labels(rows: list[dict], label_map: LabelMap, where: list[str], problems: Problems) -> None:
    """Set `label` from `raw_label` for every row; every unknown label goes into `problems` with its place.

    An empty raw label stays an unlabelled cell (label ''); a label the map sends to 'drop' is kept as 'drop'.
    Two classes that differ only in case or spaces ('WBC' and 'wbc', as a dataset's own labels can) are a
    problem too: kept apart they would silently split one cell type in two.
    """
    spelled: dict[str, tuple[str, str]] = {}  # normalised class -> (first spelling, where it was)
    hint = (
        f"Labels must be classes of label map {label_map.name!r} or raw labels it maps; pass --label-map FILE "
        f"with a map that names them (layout: {DEFAULT_LABEL_MAP}; map a label to 'drop' to keep but ignore it)."
    )
    for row, place in zip(rows, where, strict=True):
        raw = row["raw_label"]
        if not raw:
            row["label"] = ""
            continue
        label = label_map.lookup(raw)
        if label is None:
            problems.add(f"{place}: label {raw!r} is not in label map {label_map.name!r}", hint)
            row["label"] = ""
            continue
        row["label"] = label
        first, first_place = spelled.setdefault(normalize_label(label), (label, place))
        if label != first:
            problems.add(
                f"{place}: label {raw!r} differs from {first!r} ({first_place}) only in case or spaces; "
                "spell the class one way, or pass --label-map FILE that maps both spellings to one class"
            )


def number(value: str, where: str, column: str, problems: Problems) -> float | None:
    try:
        result = float(value)
    except (TypeError, ValueError):
        problems.add(f"{where}: {column} is {value!r}, not a number; write a number")
        return None
    if not math.isfinite(result):  # 'inf', 'nan', and '1e400' (which reads as inf)
        problems.add(f"{where}: {column} is {value!r}, not a finite number; write a finite number")
        return None
    return result


def _pixel_coordinate(value) -> bool:
    try:
        return abs(float(value)) <= MAX_COORDINATE
    except (TypeError, ValueError, OverflowError):
        return False


def box_in_image(
    box: tuple[float, float, float, float],
    size: tuple[int, int] | None,
    where: str,
    problems: Problems,
    *,
    clip: bool = True,
) -> tuple[int, int, int, int] | None:
    """Round a box to pixels and clip it into its image; a box of no area, or wholly outside, is a problem.

    Clipping is right for detection annotations: tools let a box run a pixel past the border. A box that
    has no pixel inside the image is a wrong annotation, never something to clip into a sliver. With
    `clip=False` (formats whose contract is boxes inside their image) any pixel outside is a problem.
    """
    if not all(_pixel_coordinate(v) for v in box):  # inf, NaN, 1e400 (read as inf), None
        problems.add(f"{where}: box {tuple(box)} has a coordinate that is no pixel position; fix or delete it")
        return None
    x0, y0, x1, y1 = (math.floor(v + 0.5) for v in box)  # half up, not Python's half-to-even
    if x1 <= x0 or y1 <= y0:
        problems.add(f"{where}: box ({x0},{y0},{x1},{y1}) has zero or negative area; fix or delete the annotation")
        return None
    if size is not None:
        w, h = size
        if x1 <= 0 or y1 <= 0 or x0 >= w or y0 >= h or (not clip and (x0 < 0 or y0 < 0 or x1 > w or y1 > h)):
            problems.add(
                f"{where}: box ({x0},{y0},{x1},{y1}) lies outside its {w}x{h} image; fix or delete the annotation"
            )
            return None
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    return x0, y0, x1, y1


def flat_name(path: Path, root: Path) -> str:
    """A readable id from an image's path under `root`: 'train/img_01.png' -> 'train__img_01'."""
    try:
        rel = path.relative_to(root)
    except ValueError:
        rel = Path(path.name)
    return "__".join(rel.with_suffix("").parts)


def cell_row(
    *,
    cell_id: str,
    patient_id: str,
    image: Path,
    box: tuple[int, int, int, int],
    raw_label: str,
    source: str,
    det_score: float | None = None,
    **extra,
) -> dict:
    """One row of the cell table in the column names of mil.cell_table (extra columns are kept)."""
    x0, y0, x1, y1 = box
    row = {
        "cell_id": cell_id,
        "patient_id": patient_id,
        "image_path": absolute(image),
        "x0": x0,
        "y0": y0,
        "x1": x1,
        "y1": y1,
        "label": "",
        "raw_label": raw_label,
        "det_score": det_score,
        "source": source,
    }
    row.update(extra)
    return row


def keep_patients_with_cells(patients: PatientTable, rows: list[dict], why: str) -> PatientTable:
    """Drop patients without a single cell (a patient with no cells has no bag), saying how many went."""
    with_cells = {r["patient_id"] for r in rows}
    kept = [p for p in patients.rows if p["patient_id"] in with_cells]
    if len(kept) < len(patients.rows):
        gone = [p["patient_id"] for p in patients.rows if p["patient_id"] not in with_cells]
        shown = ", ".join(gone[:5]) + (f" and {len(gone) - 5} more" if len(gone) > 5 else "")
        log.warning("left out %d patient(s) with no cells (%s): %s", len(gone), why, shown)
    return PatientTable(rows=kept)


def check_patient_rows(
    rows: list[tuple[int, dict]], path: Path, problems: Problems, *, diagnosis_column: str = "diagnosis"
) -> None:
    """Duplicate or unsafe patient ids and missing diagnoses of a patients/clinical CSV, by file line."""
    from mil.cell_table import unsafe_patient_id_reason

    first: dict[str, int] = {}
    for line, row in rows:
        pid = row.get("patient_id", "")
        reason = unsafe_patient_id_reason(pid)
        if reason:
            problems.add(f"{path}:{line}: patient id {pid!r} {reason}; rename it to letters, digits, '-', '_' or '.'")
        if pid in first:
            problems.add(f"{path}:{line}: patient id {pid!r} repeats line {first[pid]}; keep one row per patient")
        first.setdefault(pid, line)
        if not row.get(diagnosis_column, "").strip():
            problems.add(f"{path}:{line}: patient {pid!r} has no {diagnosis_column}; fill it in or remove the row")
    for problem in diagnosis_spelling_problems([(f"line {line}", row.get(diagnosis_column, "")) for line, row in rows]):
        problems.add(f"{path}: {problem}")
