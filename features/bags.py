"""Per-patient HDF5 bags of cell embeddings (PRODUCT.md 2.3): schema, atomic writer, validator and readers (a
folder of bags, its manifest and consistency checks: features.bag_directory).

A bag counts as done only when it validates (RELIABILITY.md promise 1): the writer goes through
mil.atomic.atomic_path, re-opens the temporary file and checks row counts, width, finiteness and digests
before the rename. `features` is the dataset name CLAM, TRIDENT and torchmil read, so bags open there too.

A bag is what it says it is (promise 7; features/integrity.py): it records the patient id it was written for
(the file name must match) and a digest of each array; every read refuses data stored outside the file, and
features beyond +-65504 (promise 10).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from features.integrity import (
    BagProblem,
    array_digest,
    digest_problems,
    header_problems,
    magnitude_problem,
    storage_problem,
)
from mil import __version__
from mil.atomic import atomic_path
from mil.errors import ConfigError, InputError, listing

SCHEMA_VERSION = 2  # 2 added `digests`; bags of schema 1 are recomputed by `mil extract`
BAG_SUFFIX = ".h5"
MANIFEST_NAME = "manifest.json"
FEATURE_DTYPES = ("float16", "float32")
REQUIRED_DATASETS = ("features", "boxes", "image_index", "image_paths", "cell_id", "label")
REQUIRED_ATTRS = (
    "schema_version",
    "patient_id",
    "encoder",
    "encoder_config",
    "cell_table_fingerprint",
    "package_version",
    "created",
    "label_classes",
    "skipped",
    "digests",
)
# Attributes stored as JSON text in the file and handed out decoded in Bag.attrs.
JSON_ATTRS = ("encoder_config", "label_classes", "skipped", "preprocess", "digests")
ARRAY_NAMES = (*REQUIRED_DATASETS, "cell_probs")  # every dataset a reader of bags touches


def config_dict(config: Any) -> dict:
    """An encoder config as a plain dict, whether given as EncoderConfig, dict or JSON text."""
    if config is None:
        return {}
    if hasattr(config, "to_dict"):
        return dict(config.to_dict())
    if isinstance(config, str):
        return json.loads(config) if config else {}
    return dict(config)


def canonical_json(value: Any) -> str:
    """Key-sorted JSON: two configs are the same exactly when these strings are equal."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=list)


@dataclass
class Bag:
    """One patient's cells: embeddings plus where each cell came from. Row i of every array is cell i."""

    patient_id: str
    features: np.ndarray  # (N, D) float16 | float32
    boxes: np.ndarray  # (N, 4) int32 x0 y0 x1 y1 in source-image pixels
    image_index: np.ndarray  # (N,) int32 into image_paths
    image_paths: list[str]  # (M,)
    cell_id: list[str]  # (N,)
    label: np.ndarray  # (N,) int64, -1 unknown, index into attrs["label_classes"]
    cell_probs: np.ndarray | None = None  # (N, C) float32 from a cell-classifier encoder
    attrs: dict = field(default_factory=dict)

    @property
    def num_cells(self) -> int:
        return int(self.features.shape[0])

    @property
    def feature_dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def encoder_config(self) -> dict:
        return config_dict(self.attrs.get("encoder_config"))

    @property
    def label_classes(self) -> list[str]:
        return list(self.attrs.get("label_classes") or [])

    @property
    def skipped(self) -> list[dict]:
        return list(self.attrs.get("skipped") or [])


def _array_problems(bag: Bag) -> list[str]:
    """Shape and range problems of an in-memory bag (the same rules validate_bag applies to a file)."""
    problems = []
    feats = np.asarray(bag.features)
    if feats.ndim != 2:
        return [f"features has shape {feats.shape}; it must be (cells, dim)"]
    n, dim = feats.shape
    if n == 0:
        problems.append("has no cells (an empty patient); a bag needs at least one cell")
    shapes = {
        "boxes": (np.asarray(bag.boxes).shape, (n, 4)),
        "image_index": (np.asarray(bag.image_index).shape, (n,)),
        "cell_id": ((len(bag.cell_id),), (n,)),
        "label": (np.asarray(bag.label).shape, (n,)),
    }
    if bag.cell_probs is not None:
        probs = np.asarray(bag.cell_probs)
        shapes["cell_probs"] = (probs.shape, (n, probs.shape[1] if probs.ndim == 2 else -1))
    for name, (got, want) in shapes.items():
        if tuple(got) != want:
            problems.append(f"{name} has shape {tuple(got)} but features has {n} rows; expected {want}")
    declared = config_dict(bag.attrs.get("encoder_config")).get("embed_dim")
    if declared is not None and int(declared) != dim:
        problems.append(f"features has dim {dim} but the encoder config declares embed_dim {declared}")
    index = np.asarray(bag.image_index)
    if index.size and (index.min() < 0 or index.max() >= len(bag.image_paths)):
        problems.append(f"image_index spans {index.min()}..{index.max()} but there are {len(bag.image_paths)} images")
    labels = np.asarray(bag.label)
    n_classes = len(bag.attrs.get("label_classes") or [])
    if labels.size and (labels.min() < -1 or labels.max() >= n_classes):
        problems.append(f"label spans {labels.min()}..{labels.max()} but label_classes has {n_classes} classes")
    return problems


def _nonfinite_problem(name: str, values: np.ndarray, cell_ids: list[str] | None = None) -> str | None:
    bad = ~np.isfinite(values)
    if not bad.any():
        return None
    rows = np.flatnonzero(bad.reshape(bad.shape[0], -1).any(axis=1))
    first = int(rows[0])
    who = f" (cell {cell_ids[first]!r})" if cell_ids is not None and first < len(cell_ids) else ""
    return f"{name} has NaN/inf in {len(rows)} row(s), first row {first}{who}"


def _prepare_features(bag: Bag, dtype: str) -> np.ndarray:
    """Cast features to the stored dtype; NaN/inf and values beyond FEATURE_LIMIT are refused naming patient and
    row (FEATURE_LIMIT is float16's largest value, so the cast never overflows)."""
    feats = np.asarray(bag.features)
    where = f"bag of patient {bag.patient_id!r}"
    as32 = feats.astype(np.float32, copy=False)
    problem = _nonfinite_problem("features", as32, bag.cell_id)
    if problem:
        raise InputError(f"{where}: {problem}; the encoder produced non-finite embeddings, nothing was written")
    problem = magnitude_problem(as32, bag.cell_id)
    if problem:
        raise InputError(f"{where}: {problem}; nothing was written")
    return feats.astype(dtype, copy=False)


def write_bag(path: str | Path, bag: Bag, *, dtype: str | None = None) -> Path:
    """Write a bag atomically: temp file beside `path`, re-open and validate, fsync, rename.

    `dtype` (float16 | float32) is the stored feature type; default: the dtype of bag.features.
    Standard attributes (schema version, patient id, package version, creation time) are filled in.
    """
    import h5py  # heavy; only needed when bags are written or read

    path = Path(path)
    dtype = dtype or str(np.asarray(bag.features).dtype)
    if dtype not in FEATURE_DTYPES:
        raise ConfigError(f"bag dtype {dtype!r} is not supported; choose one of {list(FEATURE_DTYPES)}")
    attrs = {k: v for k, v in bag.attrs.items() if v is not None}  # None: "not given", the default applies
    attrs.setdefault("encoder", config_dict(attrs.get("encoder_config")).get("name", ""))
    attrs.setdefault("encoder_config", {})
    attrs.setdefault("cell_table_fingerprint", "")
    attrs.setdefault("label_classes", [])
    attrs.setdefault("skipped", [])
    attrs.update(schema_version=SCHEMA_VERSION, patient_id=bag.patient_id, package_version=__version__)
    attrs.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    bag = Bag(**{**bag.__dict__, "attrs": attrs})
    problems = _array_problems(bag)
    if problems:
        raise InputError(f"bag of patient {bag.patient_id!r} is malformed, nothing was written:\n{listing(problems)}")
    features = _prepare_features(bag, dtype)
    if bag.cell_probs is not None:
        problem = _nonfinite_problem("cell_probs", np.asarray(bag.cell_probs, dtype=np.float32), bag.cell_id)
        if problem:
            raise InputError(f"bag of patient {bag.patient_id!r}: {problem}; nothing was written")
    text = h5py.string_dtype("utf-8")
    arrays: dict[str, Any] = {
        "features": features,
        "boxes": np.asarray(bag.boxes, dtype=np.int32).reshape(-1, 4),
        "image_index": np.asarray(bag.image_index, dtype=np.int32),
        "image_paths": [str(p) for p in bag.image_paths],
        "cell_id": [str(c) for c in bag.cell_id],
        "label": np.asarray(bag.label, dtype=np.int64),
    }
    if bag.cell_probs is not None:
        arrays["cell_probs"] = np.asarray(bag.cell_probs, dtype=np.float32)
    attrs["digests"] = {name: array_digest(values) for name, values in arrays.items()}

    def validate(tmp: Path) -> None:
        found = _inspect(tmp, full=True, patient_id=bag.patient_id)[1]
        if found:
            raise OSError(f"bag {path} did not validate after writing:\n{listing(found)}")

    # Built in memory, written by one plain write: HDF5 never meets a full disk (its error cascade at close could
    # end the process); a full disk is then an ordinary OSError, which atomic_path turns into DiskFullError.
    with atomic_path(path, validate) as tmp:
        with h5py.File(tmp.name, "w", driver="core", backing_store=False) as f:
            for name, values in arrays.items():
                f.create_dataset(name, data=values, dtype=text if isinstance(values, list) else None)
            for key, value in attrs.items():
                structured = key in JSON_ATTRS or isinstance(value, dict | list | tuple)
                f.attrs[key] = canonical_json(value) if structured else value
            f.flush()
            image = f.id.get_file_image()
        with open(tmp, "wb") as out:
            out.write(image)
    return path


def _decode_attrs(raw: Any) -> dict:
    attrs = {}
    for key, value in raw.items():
        if isinstance(value, bytes):
            value = value.decode("utf-8")
        if isinstance(value, np.generic):
            value = value.item()
        if key in JSON_ATTRS and isinstance(value, str):
            value = json.loads(value) if value else None
        attrs[key] = value
    return attrs


def _expected_patient(path: Path, patient_id: str | None) -> str | None:
    if patient_id is not None:
        return patient_id
    return path.name[: -len(BAG_SUFFIX)] if path.name.endswith(BAG_SUFFIX) else None


def _inspect(path: Path, *, full: bool, patient_id: str | None = None) -> tuple[Bag | None, list[BagProblem]]:
    """Open a bag once: (the bag, its problems). Without `full` the big arrays are not read: `features`,
    `boxes`, `cell_probs` and the strings are zero-cost stand-ins of the stored shapes (quick checks), and the
    digests are not checked. `patient_id`: the id the bag must record (default: its file name, `P01.h5` -> P01)."""
    import h5py

    if not path.exists():
        return None, [BagProblem(f"{path} does not exist")]
    if path.stat().st_size == 0:
        return None, [BagProblem(f"{path} is empty (0 bytes): a killed writer or a failed copy")]
    try:
        with h5py.File(path, "r") as f:
            header = header_problems(f, path, _expected_patient(path, patient_id), SCHEMA_VERSION)  # attributes only
            if header:
                return None, header
            outside = storage_problem(f, path, ARRAY_NAMES)
            if outside is not None:
                return None, [outside]
            missing = [d for d in REQUIRED_DATASETS if d not in f]
            missing_attrs = [a for a in REQUIRED_ATTRS if a not in f.attrs]
            if missing or missing_attrs:
                return None, [BagProblem(f"{path} lacks dataset(s) {missing} and attribute(s) {missing_attrs}")]
            attrs = _decode_attrs(f.attrs)
            problems = []
            if str(f["features"].dtype) not in FEATURE_DTYPES:
                problems.append(
                    BagProblem(f"{path} features dtype {f['features'].dtype} is not one of {list(FEATURE_DTYPES)}")
                )

            def array(name: str) -> np.ndarray:
                data = f[name]
                return data[()] if full else np.broadcast_to(np.zeros((), dtype=data.dtype), data.shape)

            bag = Bag(
                patient_id=str(attrs["patient_id"]),
                features=array("features"),
                boxes=array("boxes"),
                image_index=f["image_index"][()],
                image_paths=list(f["image_paths"].asstr()[()]) if full else [""] * len(f["image_paths"]),
                cell_id=list(f["cell_id"].asstr()[()]) if full else [""] * len(f["cell_id"]),
                label=f["label"][()],
                cell_probs=array("cell_probs") if "cell_probs" in f else None,
                attrs=attrs,
            )
    except Exception as e:  # h5py raises OSError, KeyError, ValueError... for damaged files
        return None, [BagProblem(f"{path} cannot be read ({type(e).__name__}: {e}); it is truncated or corrupt")]
    problems += [BagProblem(f"{path}: {p}") for p in _array_problems(bag)]
    if full and bag.features.ndim == 2:
        for name, values in (("features", bag.features), ("cell_probs", bag.cell_probs)):
            problem = values is not None and _nonfinite_problem(
                name, values.astype(np.float32, copy=False), bag.cell_id
            )
            if problem:
                problems.append(BagProblem(f"{path}: {problem}"))
        problem = magnitude_problem(bag.features.astype(np.float32, copy=False), bag.cell_id)
        if problem:
            problems.append(BagProblem(f"{path}: {problem}"))
        arrays = {name: getattr(bag, name) for name in ARRAY_NAMES if getattr(bag, name) is not None}
        problems += digest_problems(path, arrays, bag.attrs.get("digests"))
    return bag, problems


def inspect_bag(path: str | Path, *, full: bool = True) -> tuple[Bag | None, list[BagProblem]]:
    """(the bag or None, its problems) from one read; what `mil verify` reports per file."""
    return _inspect(Path(path), full=full)


def validate_bag(path: str | Path, *, full: bool = True) -> list[BagProblem]:
    """Every problem of a bag file (empty list = valid). `full` also reads the arrays to check NaN/inf, magnitude
    and digests. Truncated or corrupt files (0 B, a header only, half a file, one byte short) fail to open or read;
    a file named for another patient, stored outside itself, or of an older schema is refused by its header."""
    return _inspect(Path(path), full=full)[1]


def read_bag(path: str | Path) -> Bag:
    """Read and validate a bag in one pass; an invalid file raises InputError naming it and the fix."""
    path = Path(path)
    bag, problems = _inspect(path, full=True)
    if problems or bag is None:
        raise InputError(
            f"bag {path} is invalid:\n{listing(problems)}\nDelete it and run `mil extract` again to recompute it."
        )
    return bag


def read_bag_features(path: str | Path, *, verify_digest: bool = True) -> np.ndarray:
    """Only the features (N, D) of a bag, what head training reads: checked for what training needs (the file
    opens, holds its own data, is the patient its name says, schema version, a non-empty 2-D float16/float32 array
    without NaN/inf or values beyond FEATURE_LIMIT, the recorded digest of `features`); boxes, cell ids, labels and
    their shapes are not read (``read_bag`` and ``mil verify`` check those), which makes it ~4x faster on bags of a
    few hundred cells. An invalid file raises InputError naming it and the fix. `verify_digest=False` skips the
    digest (only to measure what it costs: `experiments/bench_extract.py`)."""
    import h5py

    path = Path(path)
    if not path.exists():
        raise InputError(f"bag {path} does not exist; run `mil extract` to write it")
    problem = None
    try:
        with h5py.File(path, "r") as f:
            header = header_problems(f, path, _expected_patient(path, None), SCHEMA_VERSION)
            refused = header[0] if header else storage_problem(f, path, ARRAY_NAMES)
            if refused is None:
                version = f.attrs.get("schema_version")
                digests = f.attrs.get("digests")
                features = f["features"][()] if "features" in f else None
    except Exception as e:  # h5py raises OSError, KeyError, ValueError... for damaged files
        problem = f"it cannot be read ({type(e).__name__}: {e}); it is truncated or corrupt"
    else:
        if refused is not None:
            raise InputError(str(refused))
        if features is None or version is None or digests is None:
            problem = "it lacks the features dataset or the schema_version or digests attribute"
        elif str(features.dtype) not in FEATURE_DTYPES or features.ndim != 2 or len(features) == 0:
            problem = f"its features are {features.dtype} of shape {features.shape}, not (cells >= 1, dim) float16/32"
        else:
            as32 = features.astype(np.float32, copy=False)
            problem = _nonfinite_problem("features", as32) or magnitude_problem(as32)
            recorded = json.loads(digests).get("features") if problem is None and verify_digest else None
            if problem is None and verify_digest and recorded != array_digest(features):
                problem = "its features do not match their recorded digest (edited after writing, or damaged on disk)"
    if problem:
        raise InputError(f"bag {path} is invalid: {problem}\nDelete it and run `mil extract` again to recompute it.")
    return features


def read_bag_header(path: str | Path) -> dict:
    """A bag's attributes plus num_cells, feature_dim and features_dtype, without reading the arrays."""
    import h5py

    path = Path(path)
    with h5py.File(path, "r") as f:
        outside = storage_problem(f, path, ARRAY_NAMES)
        if outside is not None:
            raise InputError(str(outside))
        attrs = _decode_attrs(f.attrs)
        attrs["num_cells"], attrs["feature_dim"] = (int(s) for s in f["features"].shape)
        attrs["features_dtype"] = str(f["features"].dtype)
    return attrs


def bag_path(bag_dir: str | Path, patient_id: str) -> Path:
    return Path(bag_dir) / f"{patient_id}{BAG_SUFFIX}"
