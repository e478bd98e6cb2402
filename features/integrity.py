"""What makes a bag trustworthy (RELIABILITY.md promises 7 and 10): content digests, in-file storage, sane values.

Each array of a bag has an xxh3-128 digest (`digests` attribute), computed once at write: xxh3 reads ~26 GB/s
against BLAKE2b's ~0.65 GB/s on this project's machine, so checking a 4 MB bag costs ~0.2 ms instead of ~6 ms
(the validated read itself takes ~9 ms). Before any data is touched, a dataset that a reader would follow out
of the file (an external or soft link, a virtual dataset, external raw storage) is refused: a bag folder from
elsewhere cannot make the framework read other files. Features beyond +-65504 are refused: no encoder gives
such values (the registered deep encoders stay within +-6 even on noise input, the handcrafted morphology
encoder within ~2e4 at 224 px), 65504 is float16's largest value, so a bag's dtype never decides whether it is
accepted, and a bag of 1e30 never reaches a head's standardisation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

FLOAT16_MAX = float(np.finfo(np.float16).max)
FEATURE_LIMIT = FLOAT16_MAX  # |feature| above it: no encoder produces it (module docstring)
DIGEST_ALGORITHM = "xxh3_128"
NOT_A_BAG = "not a bag (no cytomil attributes)"
SCALE_OUTLIER_FACTOR = 10.0


class BagProblem(str):
    """One problem of a bag file, as text, with its kind: damaged | outside | renamed | old | stranger.

    `outside` (a dataset stored outside the file), `renamed` (another patient's id) and `old` (no digests) make a
    directory unusable for training as a whole; `stranger` (not a bag at all) is ignored with a note; `damaged`
    bags are left out (and recomputed by `mil extract`)."""

    kind: str
    files: tuple[str, ...]  # the file names a directory-level problem (`duplicate`) is about

    def __new__(cls, text: str, kind: str = "damaged", files: tuple[str, ...] = ()) -> BagProblem:
        problem = super().__new__(cls, text)
        problem.kind, problem.files = kind, tuple(files)
        return problem


def array_digest(values: Any) -> str:
    """`xxh3_128:<hex>` of an array as stored (dtype, shape, bytes); a list of strings by their UTF-8 bytes."""
    import xxhash

    h = xxhash.xxh3_128()
    if isinstance(values, list | tuple) or (isinstance(values, np.ndarray) and values.dtype.kind in "OUS"):
        texts = [str(v) for v in values]  # lengths in characters + the joined text: one list, one digest
        h.update(b"utf-8 strings")
        h.update(np.fromiter(map(len, texts), dtype="<i8", count=len(texts)))
        h.update("".join(texts).encode("utf-8"))
    else:
        array = np.ascontiguousarray(values)
        h.update(f"{array.dtype.str}{array.shape}".encode())
        h.update(array)
    return f"{DIGEST_ALGORITHM}:{h.hexdigest()}"


def magnitude_problem(values: np.ndarray, cell_ids: list[str] | None = None) -> str | None:
    over = np.abs(values) > FEATURE_LIMIT  # (N, D); NaN compares False and is reported by _nonfinite_problem
    if not over.any():
        return None
    rows = np.flatnonzero(over.any(axis=1))
    first = int(rows[0])
    who = f" (cell {cell_ids[first]!r})" if cell_ids is not None and first < len(cell_ids) else ""
    return (
        f"features exceed +-{FEATURE_LIMIT:.0f} in {len(rows)} row(s), first row {first}{who}, largest "
        f"|value| {float(np.abs(values[rows]).max()):.3g}: no encoder produces such values (the encoder, its "
        "weights or its input are broken)"
    )


def storage_problem(f: Any, path: Path, names: tuple[str, ...]) -> BagProblem | None:
    """A dataset a reader would follow out of the file (an external or soft link, a virtual dataset, external raw
    storage), found from the link and the dataset's creation properties, before any of its data is touched."""
    import h5py
    from h5py import h5d, h5l

    for name in names:
        key = name.encode()
        if not f.id.links.exists(key):  # looks at the link only, never follows it
            continue
        kind = f.id.links.get_info(key).type
        what = None
        if kind == h5l.TYPE_EXTERNAL:
            link = f.get(name, getlink=True)
            what = f"an external link to {link.filename}:{link.path}"
        elif kind == h5l.TYPE_SOFT:
            what = f"a soft link to {f.get(name, getlink=True).path}"
        elif kind != h5l.TYPE_HARD:
            what = "a user-defined link"
        elif f.get(name, getclass=True) is not h5py.Dataset:
            what = "not a dataset"
        else:
            plist = f[name].id.get_create_plist()
            if plist.get_layout() == h5d.VIRTUAL:
                what = "a virtual dataset (its data lives in other files)"
            elif plist.get_external_count():
                files = sorted({plist.get_external(i)[0].decode() for i in range(plist.get_external_count())})
                what = f"stored in external raw file(s) {files}"
        if what is not None:
            return BagProblem(
                f"{path}: dataset {name!r} is {what}, not data stored in the bag file; cytomil reads only a bag's "
                "own data. Run `mil extract` again to recompute it.",
                "outside",
            )
    return None


def digest_problems(path: Path, arrays: dict[str, Any], recorded: dict | None) -> list[BagProblem]:
    """The arrays (name -> values as read) that do not match the digests a bag records."""
    recorded = dict(recorded or {})
    problems = []
    for name, values in arrays.items():
        if name not in recorded:
            problems.append(BagProblem(f"{path}: {name} has no recorded digest; run `mil extract` again"))
        elif array_digest(values) != recorded[name]:
            problems.append(
                BagProblem(
                    f"{path}: {name} does not match its recorded digest (edited after writing, or damaged on disk); "
                    "run `mil extract` again to recompute it"
                )
            )
    return problems


def header_problems(f: Any, path: Path, expected: str | None, schema_version: int) -> list[BagProblem]:
    """Problems seen in the attributes alone: not a bag, an older or newer schema, another patient's id."""
    attrs = f.attrs
    if "schema_version" not in attrs and "patient_id" not in attrs:
        return [
            BagProblem(
                f"{path} is {NOT_A_BAG}: `mil extract` did not write it. Training ignores it; move it out of the "
                "bag folder to silence this note.",
                "stranger",
            )
        ]
    version = attrs.get("schema_version")
    if version is not None and int(version) < schema_version:
        return [
            BagProblem(
                f"{path} was written by an older version of cytomil (schema {int(version)}, no content digest); run "
                "`mil extract` again with the same settings into this folder: it recomputes such bags.",
                "old",
            )
        ]
    if version is not None and int(version) > schema_version:
        return [BagProblem(f"{path} has schema_version {int(version)}, expected {schema_version}: upgrade cytomil")]
    recorded = attrs.get("patient_id")
    recorded = recorded.decode() if isinstance(recorded, bytes) else recorded
    if expected is not None and recorded is not None and str(recorded) != expected:
        return [
            BagProblem(
                f"{path} records patient {str(recorded)!r} but is named for {expected!r}: a renamed or copied bag, "
                "whose cells would train under the wrong diagnosis. Give it back its name, or run `mil extract` again: "
                "it recomputes this patient's bag.",
                "renamed",
            )
        ]
    return []


def feature_scale(features: np.ndarray) -> float:
    """A bag's feature scale: the root mean square of its values (float64, so no overflow)."""
    return float(np.sqrt(np.mean(np.square(features, dtype=np.float64))))


def scale_outliers(scales: dict[str, float], factor: float = SCALE_OUTLIER_FACTOR) -> dict[str, float]:
    """Bags (of 3 or more) whose feature scale is more than `factor` times above or below the median bag's:
    name -> scale / median. One encoder gives bags of one scale; a bag far off was made differently (other
    preprocessing, a broken image source) and would dominate a fold's standardisation."""
    if len(scales) < 3:
        return {}
    median = float(np.median(list(scales.values())))
    if median <= 0:
        return {}
    return {k: v / median for k, v in scales.items() if v > factor * median or v < median / factor}
