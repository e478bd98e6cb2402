"""The cell table (one row per cell) and the patient table (one row per patient): the pipeline's hub.

Both are plain CSV files a user can open and edit (PRODUCT.md 2). Readers and the detector write them,
the features stage and the heads read them. Image paths are written absolute; a relative path in a
hand-edited table is taken relative to the table's own folder.
"""

from __future__ import annotations

import csv
import hashlib
import io
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mil.atomic import atomic_path
from mil.errors import InputError, listing
from mil.progress import track

CELL_COLUMNS = (
    "cell_id",
    "patient_id",
    "image_path",
    "x0",
    "y0",
    "x1",
    "y1",
    "label",
    "raw_label",
    "det_score",
    "source",
)
REQUIRED_CELL_COLUMNS = ("patient_id", "image_path", "x0", "y0", "x1", "y1")
BOX_COLUMNS = ("x0", "y0", "x1", "y1")
PATIENT_COLUMNS = ("patient_id", "diagnosis")
# File names made from a patient id must fit the 255-byte name limit of common file systems: the bag `ID.h5`, and
# the temporary file it is written through (`.ID.h5.XXXXXXXX.tmp`, plus room for an owner tag), so 200 bytes.
MAX_PATIENT_ID_BYTES = 200
SEPARATORS = (",", ";", "\t")


def unsafe_patient_id_reason(pid: str) -> str | None:
    """Why a patient id cannot name a file in an output folder, or None when it can."""
    if pid is None or pid == "":
        return "is empty"
    size = len(pid.encode("utf-8", "surrogatepass"))
    if size > MAX_PATIENT_ID_BYTES:
        return (
            f"is {size} bytes long (UTF-8); at most {MAX_PATIENT_ID_BYTES} bytes, so that its bag file name "
            "(ID.h5) and temporary file name stay within the file system's 255-byte limit"
        )
    if pid != pid.strip():
        return "has leading or trailing spaces"
    for ch in ("/", "\\", "\x00"):
        if ch in pid:
            return f"contains {ch!r} (a path separator would let it escape the output folder)"
    if pid.startswith("."):
        return "starts with '.' (it would name a hidden or parent folder)"
    if any(ord(c) < 32 for c in pid):
        return "contains a control character"
    return None


@dataclass
class CellTable:
    """Rows of cells. Box coordinates are ints; `label` is '' where unknown; extra columns are kept."""

    rows: list[dict] = field(default_factory=list)
    path: Path | None = None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def columns(self) -> list[str]:
        extra = []
        for row in self.rows[:1]:
            extra = [k for k in row if k not in CELL_COLUMNS]
        return list(CELL_COLUMNS) + extra

    def patients(self) -> list[str]:
        return sorted({r["patient_id"] for r in self.rows})

    def by_patient(self) -> dict[str, list[dict]]:
        groups: dict[str, list[dict]] = defaultdict(list)
        for r in self.rows:
            groups[r["patient_id"]].append(r)
        return dict(sorted(groups.items()))

    @staticmethod
    def boxes(rows: list[dict]) -> np.ndarray:
        return np.array([[r[c] for c in BOX_COLUMNS] for r in rows], dtype=np.int32).reshape(-1, 4)

    @staticmethod
    def fingerprint(rows: list[dict]) -> str:
        """sha256 of the rows that define a bag (image, box, id, label): changes exactly when they do."""
        h = hashlib.sha256()
        for r in rows:
            key = (r.get("cell_id", ""), str(r["image_path"]), r["x0"], r["y0"], r["x1"], r["y1"], r.get("label", ""))
            h.update(repr(key).encode())
        return h.hexdigest()

    def write(self, path: str | Path) -> Path:
        """Write atomically as CSV; the file is re-read before it replaces `path`."""
        path = Path(path)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for r in self.rows:
            writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in self.columns})
        n = len(self.rows)

        def validate(tmp: Path) -> None:
            if len(read_cell_table(tmp, resolve_relative_to=path.parent)) != n:
                raise OSError(f"cell table {path} did not read back with {n} rows")

        with atomic_path(path, validate) as tmp:
            tmp.write_text(buf.getvalue(), encoding="utf-8")
        self.path = path
        return path


def pick_separator(header: str, required: tuple[str, ...]) -> str:
    """The separator of a CSV header line among ',', ';' and tab: the one whose split holds every ``required``
    column (spreadsheets in European locales write ';', others tabs), else the most frequent one (',' when none)."""
    fitting = [s for s in SEPARATORS if set(required) <= {c.strip() for c in header.rstrip("\r\n").split(s)}]
    candidates = fitting or list(SEPARATORS)
    return max(candidates, key=lambda s: (header.count(s), s == ","))


def open_csv(path: Path, required: tuple[str, ...], *, what: str):
    """A csv.DictReader over ``path`` with its quirks handled, for use in a ``with`` block: a UTF-8 byte-order mark
    is dropped, CRLF line ends are read, the separator is picked by ``pick_separator`` and header names are
    stripped. A file that is not UTF-8 is an InputError naming it; a missing column is one naming the columns found
    and the separator used."""
    import contextlib

    raw = path.read_bytes()[:4]
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise InputError(f"{what} {path} is saved as UTF-16; save it as UTF-8 CSV (comma, ';' or tab separated)")

    @contextlib.contextmanager
    def reader():
        with path.open(newline="", encoding="utf-8-sig") as f:
            try:
                header = f.readline()
                separator = pick_separator(header, required)
                f.seek(0)
                rows = csv.DictReader(f, delimiter=separator)
                rows.fieldnames = [(c or "").strip() for c in (rows.fieldnames or [])]
                missing = [c for c in required if c not in rows.fieldnames]
                if missing:
                    found = ", ".join(rows.fieldnames) or "no header"
                    name = "tab" if separator == "\t" else repr(separator)
                    raise InputError(
                        f"{what} {path} lacks column(s) {missing} (found: {found}; separator {name}); "
                        f"it needs at least {list(required)} in its header row"
                    )
                yield rows
            except UnicodeDecodeError as e:
                raise InputError(
                    f"{what} {path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                    "save it as UTF-8 CSV"
                ) from e

    return reader()


def duplicate_cell_id_problems(rows: list[dict], where: str) -> list[str]:
    """One line per cell id given to more than one row, with the rows (header = row 1)."""
    lines: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        lines[r.get("cell_id", "")].append(i + 2)
    return [
        f"{where}: cell_id {cid!r} is on rows {', '.join(map(str, found[:10]))}"
        + (f" and {len(found) - 10} more" if len(found) > 10 else "")
        for cid, found in lines.items()
        if len(found) > 1
    ]


def diagnosis_spelling_problems(diagnoses: list[tuple[str, str]]) -> list[str]:
    """(place, diagnosis) pairs -> one line per diagnosis written more than one way (case, surrounding spaces) or
    with surrounding spaces: 'aml', 'AML' and ' AML' would otherwise be three classes."""
    spellings: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for place, diagnosis in diagnoses:
        if diagnosis and diagnosis.strip():
            spellings[diagnosis.strip().casefold()][diagnosis].append(place)
    problems = []
    for forms in spellings.values():
        if len(forms) > 1 or any(d != d.strip() for d in forms):
            shown = "; ".join(
                f"{d!r} ({', '.join(places[:3])}{', ...' if len(places) > 3 else ''})" for d, places in forms.items()
            )
            problems.append(
                f"diagnosis written {len(forms)} way(s) that differ only in case or spaces: {shown}; "
                "spell each diagnosis one way, without surrounding spaces"
            )
    return problems


# Box coordinates beyond this are no pixel of any image (and overflow the int32 box arrays of a bag).
MAX_COORDINATE = 2**31 - 1


def _parse_int(value: str, where: str, column: str, problems: list[str]) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        problems.append(f"{where}: column {column} is {value!r}, not a number")
        return 0
    if not abs(number) <= MAX_COORDINATE:  # also NaN, inf and 1e400 (which reads as inf)
        problems.append(f"{where}: column {column} is {value!r}, not a pixel coordinate; write a finite box in pixels")
        return 0
    return int(round(number))


def read_cell_table(path: str | Path, resolve_relative_to: Path | None = None) -> CellTable:
    """Read a cell table CSV; every malformed row is listed in one error."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"cell table {path} does not exist; write one with `mil cells` or `mil detect`")
    base = resolve_relative_to or path.resolve().parent
    with open_csv(path, REQUIRED_CELL_COLUMNS, what="cell table") as reader:
        rows, problems = [], []
        for i, raw in enumerate(reader):
            where = f"{path}:{i + 2}"
            row = dict(raw)
            for c in BOX_COLUMNS:
                row[c] = _parse_int(raw[c], where, c, problems)
            image = Path(raw["image_path"])
            row["image_path"] = str(image if image.is_absolute() else (base / image))
            row["label"] = (raw.get("label") or "").strip()
            row["raw_label"] = raw.get("raw_label") or ""
            row["cell_id"] = raw.get("cell_id") or f"{raw['patient_id']}:{i}"
            score = raw.get("det_score")
            row["det_score"] = float(score) if score not in (None, "") else None
            row["source"] = raw.get("source") or ""
            rows.append(row)
    problems += duplicate_cell_id_problems(rows, str(path))
    if problems:
        raise InputError(f"cell table {path} has malformed rows:\n{listing(problems)}\nFix them and run again.")
    return CellTable(rows=rows, path=path)


@dataclass
class PatientTable:
    """patient_id -> facts (diagnosis and any covariates such as age or lab values)."""

    rows: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)

    def by_id(self) -> dict[str, dict]:
        return {r["patient_id"]: r for r in self.rows}

    def diagnoses(self) -> list[str]:
        return sorted({r["diagnosis"] for r in self.rows if r.get("diagnosis")})

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        columns = list(PATIENT_COLUMNS) + [k for k in (self.rows[0] if self.rows else {}) if k not in PATIENT_COLUMNS]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        n = len(self.rows)

        def validate(tmp: Path) -> None:
            if len(read_patient_table(tmp, validate=False)) != n:
                raise OSError(f"patient table {path} did not read back with {n} rows")

        with atomic_path(path, validate) as tmp:
            tmp.write_text(buf.getvalue(), encoding="utf-8")
        return path


def read_patient_table(path: str | Path, validate: bool = True) -> PatientTable:
    path = Path(path)
    if not path.exists():
        raise InputError(f"patient table {path} does not exist; `mil cells` writes it beside cells.csv")
    with open_csv(path, ("patient_id",), what="patient table") as reader:
        rows = [dict(r) for r in reader]
    table = PatientTable(rows=rows)
    if validate:
        validate_patient_table(table, where=str(path))
    return table


# What to do about a patient table without diagnoses (detection and crop datasets carry none): one sentence, shared
# by `mil cells` (a warning at once) and every command that needs the diagnoses (an error).
NO_DIAGNOSIS_FIX = (
    "Give each patient a diagnosis: for coco, yolo, voc and imagefolder data rerun `mil cells` with --patients-csv "
    "CSV (columns image,patient_id,diagnosis; one row per image, several images per patient), otherwise add a "
    "diagnosis column to the patient table."
)


def validate_patient_table(table: PatientTable, where: str = "patient table", require_diagnosis: bool = True) -> None:
    """Duplicate ids, unsafe ids and patients without diagnosis: all listed in one error."""
    problems, seen = [], {}
    if require_diagnosis and table.rows and not any((r.get("diagnosis") or "").strip() for r in table.rows):
        raise InputError(f"none of the {len(table.rows)} patients in {where} has a diagnosis. {NO_DIAGNOSIS_FIX}")
    for i, r in enumerate(table.rows):
        pid = r.get("patient_id", "")
        row = f"{where} row {i + 2}"
        reason = unsafe_patient_id_reason(pid)
        if reason:
            problems.append(f"{row}: patient id {pid!r} {reason}; rename it to letters, digits, '-', '_' or '.'")
        if pid in seen:
            problems.append(f"{row}: patient id {pid!r} repeats row {seen[pid] + 2}; each patient needs one row")
        seen.setdefault(pid, i)
        if require_diagnosis and not (r.get("diagnosis") or "").strip():
            problems.append(f"{row}: patient {pid!r} has no diagnosis; add it or remove the patient")
    places = [(f"row {i + 2}", r.get("diagnosis") or "") for i, r in enumerate(table.rows)]
    problems += [f"{where}: {p}" for p in diagnosis_spelling_problems(places)]
    if problems:
        raise InputError(f"{len(problems)} problem(s) in {where}:\n{listing(problems)}")


def validate_cell_table(
    cells: CellTable, patients: PatientTable | None = None, check_images: bool = True, where: str = "cell table"
) -> None:
    """Every problem of a cell table in one error: images, boxes, ids, patients without a patient row."""
    from PIL import Image  # imported here: validating is the only reason this module opens images

    problems: list[str] = []
    sizes: dict[str, tuple[int, int] | None] = {}
    seen_ids: dict[str, int] = {}
    bad_ids: set[str] = set()
    known = patients.by_id() if patients is not None else None
    for i, r in enumerate(track(cells.rows, "check cells and images", "cells")):
        row = f"{where} row {i + 2} (patient {r['patient_id']!r}, {Path(r['image_path']).name})"
        pid = r["patient_id"]
        reason = unsafe_patient_id_reason(pid)
        if reason and pid not in bad_ids:
            bad_ids.add(pid)
            problems.append(f"{row}: patient id {pid!r} {reason}; rename it to letters, digits, '-', '_' or '.'")
        if known is not None and pid not in known and pid not in bad_ids:
            bad_ids.add(pid)
            problems.append(f"{row}: patient {pid!r} is not in the patient table; add a row with its diagnosis")
        cid = r.get("cell_id", "")
        if cid in seen_ids:
            problems.append(f"{row}: cell_id {cid!r} repeats row {seen_ids[cid] + 2}; cell ids must be unique")
        seen_ids.setdefault(cid, i)
        x0, y0, x1, y1 = (r[c] for c in BOX_COLUMNS)
        if x1 <= x0 or y1 <= y0:
            problems.append(f"{row}: box ({x0},{y0},{x1},{y1}) has zero or negative area; x1 > x0 and y1 > y0 needed")
            continue
        if not check_images:
            continue
        img = r["image_path"]
        if img not in sizes:
            try:
                with Image.open(img) as im:
                    sizes[img] = im.size
            except FileNotFoundError:
                sizes[img] = None
                problems.append(f"{row}: image {img} does not exist; fix image_path or restore the file")
            except Exception as e:  # PIL raises many types for a broken file
                sizes[img] = None
                problems.append(f"{row}: image {img} cannot be read ({type(e).__name__}: {e}); replace the file")
        size = sizes[img]
        if size is not None and (x0 < 0 or y0 < 0 or x1 > size[0] or y1 > size[1]):
            problems.append(
                f"{row}: box ({x0},{y0},{x1},{y1}) lies outside its {size[0]}x{size[1]} image; clip or fix the box"
            )
    if problems:
        raise InputError(f"{len(problems)} problem(s) in {where}:\n{listing(problems)}")
