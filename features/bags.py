"""Per-patient HDF5 bags of cell embeddings (PRODUCT.md 2.3): schema, atomic writer, validator, directory.

A bag counts as done only when it validates (RELIABILITY.md promise 1): the writer goes through
mil.atomic.atomic_path, re-opens the temporary file and checks row counts, width and finiteness before
the rename. `features` is the dataset name CLAM, TRIDENT and torchmil read, so bags open there too.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mil import __version__
from mil.atomic import atomic_path, atomic_write_text
from mil.errors import ConfigError, InputError, listing

SCHEMA_VERSION = 1
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
)
# Attributes stored as JSON text in the file and handed out decoded in Bag.attrs.
JSON_ATTRS = ("encoder_config", "label_classes", "skipped", "preprocess")
FLOAT16_MAX = float(np.finfo(np.float16).max)


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
    """Cast features to the stored dtype; NaN/inf and float16 overflow are refused naming patient and row."""
    feats = np.asarray(bag.features)
    where = f"bag of patient {bag.patient_id!r}"
    problem = _nonfinite_problem("features", feats.astype(np.float32, copy=False), bag.cell_id)
    if problem:
        raise InputError(f"{where}: {problem}; the encoder produced non-finite embeddings, nothing was written")
    if dtype == "float16":
        over = np.abs(feats.astype(np.float32, copy=False)) > FLOAT16_MAX
        if over.any():
            row = int(np.flatnonzero(over.any(axis=1))[0])
            raise InputError(
                f"{where}: features overflow float16 (|value| > {FLOAT16_MAX:.0f}) in row {row} "
                f"(cell {bag.cell_id[row]!r}); store them with --dtype float32"
            )
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

    def validate(tmp: Path) -> None:
        found = validate_bag(tmp)
        if found:
            raise OSError(f"bag {path} did not validate after writing:\n{listing(found)}")

    with atomic_path(path, validate) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("features", data=features)
        f.create_dataset("boxes", data=np.asarray(bag.boxes, dtype=np.int32).reshape(-1, 4))
        f.create_dataset("image_index", data=np.asarray(bag.image_index, dtype=np.int32))
        f.create_dataset("image_paths", data=[str(p) for p in bag.image_paths], dtype=text)
        f.create_dataset("cell_id", data=[str(c) for c in bag.cell_id], dtype=text)
        f.create_dataset("label", data=np.asarray(bag.label, dtype=np.int64))
        if bag.cell_probs is not None:
            f.create_dataset("cell_probs", data=np.asarray(bag.cell_probs, dtype=np.float32))
        for key, value in attrs.items():
            structured = key in JSON_ATTRS or isinstance(value, dict | list | tuple)
            f.attrs[key] = canonical_json(value) if structured else value
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


def _inspect(path: Path, *, full: bool) -> tuple[Bag | None, list[str]]:
    """Open a bag once: (the bag, its problems). Without `full` the big arrays are not read: `features`,
    `boxes`, `cell_probs` and the strings are zero-cost stand-ins of the stored shapes (quick checks)."""
    import h5py

    if not path.exists():
        return None, [f"{path} does not exist"]
    if path.stat().st_size == 0:
        return None, [f"{path} is empty (0 bytes): a killed writer or a failed copy"]
    try:
        with h5py.File(path, "r") as f:
            missing = [d for d in REQUIRED_DATASETS if d not in f]
            missing_attrs = [a for a in REQUIRED_ATTRS if a not in f.attrs]
            if missing or missing_attrs:
                return None, [f"{path} lacks dataset(s) {missing} and attribute(s) {missing_attrs}"]
            attrs = _decode_attrs(f.attrs)
            problems = []
            if attrs["schema_version"] != SCHEMA_VERSION:
                problems.append(f"{path} has schema_version {attrs['schema_version']}, expected {SCHEMA_VERSION}")
            if str(f["features"].dtype) not in FEATURE_DTYPES:
                problems.append(f"{path} features dtype {f['features'].dtype} is not one of {list(FEATURE_DTYPES)}")

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
        return None, [f"{path} cannot be read ({type(e).__name__}: {e}); it is truncated or corrupt"]
    problems += [f"{path}: {p}" for p in _array_problems(bag)]
    if full and bag.features.ndim == 2:
        for name, values in (("features", bag.features), ("cell_probs", bag.cell_probs)):
            problem = values is not None and _nonfinite_problem(
                name, values.astype(np.float32, copy=False), bag.cell_id
            )
            if problem:
                problems.append(f"{path}: {problem}")
    return bag, problems


def validate_bag(path: str | Path, *, full: bool = True) -> list[str]:
    """Every problem of a bag file (empty list = valid). `full` also reads the arrays to check NaN/inf.

    Truncated or corrupt files (0 B, a header only, half a file, one byte short) fail to open or to read.
    """
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


def read_bag_features(path: str | Path) -> np.ndarray:
    """Only the features (N, D) of a bag, what head training reads: checked for what training needs (the file
    opens, schema version, a non-empty 2-D float16/float32 array without NaN/inf); boxes, cell ids, labels and
    their shapes are not read (``read_bag`` and ``mil verify`` check those), which makes it ~4x faster on bags of a
    few hundred cells. An invalid file raises InputError naming it and the fix."""
    import h5py

    path = Path(path)
    if not path.exists():
        raise InputError(f"bag {path} does not exist; run `mil extract` to write it")
    problem = None
    try:
        with h5py.File(path, "r") as f:
            version = f.attrs.get("schema_version")
            features = f["features"][()] if "features" in f else None
    except Exception as e:  # h5py raises OSError, KeyError, ValueError... for damaged files
        problem = f"it cannot be read ({type(e).__name__}: {e}); it is truncated or corrupt"
    else:
        if features is None or version is None:
            problem = "it lacks the features dataset or the schema_version attribute"
        elif int(version) != SCHEMA_VERSION:
            problem = f"it has schema_version {version}, expected {SCHEMA_VERSION}"
        elif str(features.dtype) not in FEATURE_DTYPES or features.ndim != 2 or len(features) == 0:
            problem = f"its features are {features.dtype} of shape {features.shape}, not (cells >= 1, dim) float16/32"
        else:
            problem = _nonfinite_problem("features", features.astype(np.float32, copy=False))
    if problem:
        raise InputError(f"bag {path} is invalid: {problem}\nDelete it and run `mil extract` again to recompute it.")
    return features


def read_bag_header(path: str | Path) -> dict:
    """A bag's attributes plus num_cells, feature_dim and features_dtype, without reading the arrays."""
    import h5py

    with h5py.File(path, "r") as f:
        attrs = _decode_attrs(f.attrs)
        attrs["num_cells"], attrs["feature_dim"] = (int(s) for s in f["features"].shape)
        attrs["features_dtype"] = str(f["features"].dtype)
    return attrs


def bag_path(bag_dir: str | Path, patient_id: str) -> Path:
    return Path(bag_dir) / f"{patient_id}{BAG_SUFFIX}"


def write_manifest(bag_dir: str | Path, *, encoder_config: Any, preprocess: dict | None = None) -> Path:
    """Record which encoder a bag directory holds (atomic), so a mismatch is caught before any compute."""
    cfg = config_dict(encoder_config)
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "encoder": cfg.get("name", ""),
        "feature_dim": cfg.get("embed_dim"),
        "encoder_config": cfg,
        "preprocess": preprocess or {},
        "package_version": __version__,
    }
    path = Path(bag_dir) / MANIFEST_NAME
    atomic_write_text(
        path, json.dumps(manifest, indent=2, sort_keys=True) + "\n", validate=lambda p: json.loads(p.read_text())
    )
    return path


def read_manifest(bag_dir: str | Path) -> dict | None:
    path = Path(bag_dir) / MANIFEST_NAME
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"bag manifest {path} is not valid JSON ({e}); delete it, `mil extract` rewrites it") from e


def _describe(config: dict, preprocess: dict | None) -> str:
    return canonical_json({"encoder_config": config, "preprocess": preprocess or {}})


class BagDirectory:
    """A folder of bags of one encoder. Invalid files are not listed as patients; `verify` reports them."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise InputError(f"bag directory {self.path} does not exist; create it with `mil extract --out {path}`")

    def files(self) -> list[Path]:
        return sorted(p for p in self.path.glob(f"*{BAG_SUFFIX}") if not p.name.startswith("."))

    def patients(self) -> list[str]:
        """Sorted ids of the bags that open and have consistent shapes (NaN checks happen in load)."""
        return sorted(p.name[: -len(BAG_SUFFIX)] for p in self.files() if not validate_bag(p, full=False))

    def load(self, patient_id: str) -> Bag:
        return read_bag(bag_path(self.path, patient_id))

    def _first_header(self) -> dict:
        for p in self.files():
            if not validate_bag(p, full=False):
                return read_bag_header(p)
        raise InputError(f"bag directory {self.path} holds no valid bag; run `mil extract --out {self.path}` first")

    @property
    def manifest(self) -> dict | None:
        return read_manifest(self.path)

    @property
    def encoder_config(self) -> dict:
        manifest = self.manifest
        if manifest is not None:
            return manifest["encoder_config"]
        return config_dict(self._first_header()["encoder_config"])

    @property
    def feature_dim(self) -> int:
        manifest = self.manifest
        if manifest is not None and manifest.get("feature_dim") is not None:
            return int(manifest["feature_dim"])
        return int(self._first_header()["feature_dim"])

    def check_consistent(self) -> None:
        """Raise ConfigError naming both configs when bags of different encoders or preprocessing are mixed."""
        reference: tuple[str, str] | None = None
        manifest = self.manifest
        if manifest is not None:
            reference = (str(self.path / MANIFEST_NAME), _describe(manifest["encoder_config"], manifest["preprocess"]))
        for p in self.files():
            if validate_bag(p, full=False):
                continue
            header = read_bag_header(p)
            desc = _describe(config_dict(header["encoder_config"]), header.get("preprocess"))
            if reference is None:
                reference = (str(p), desc)
            elif desc != reference[1]:
                raise ConfigError(
                    f"bag directory {self.path} mixes encoders or preprocessing:\n"
                    f"  {reference[0]}: {reference[1]}\n  {p}: {desc}\n"
                    "Extract every patient with one encoder and preprocessing (rerunning `mil extract` with the same "
                    "--encoder, --context and --stain-norm/--stain-reference into this folder recomputes the stale "
                    "bags), or use one folder per encoder and preprocessing."
                )


def check_encoder_width(bag_dir: str | Path, encoder_config: Any) -> None:
    """Refuse an encoder whose width differs from the bags already in `bag_dir`, before any compute."""
    bag_dir = Path(bag_dir)
    if not bag_dir.is_dir():
        return
    cfg = config_dict(encoder_config)
    width = cfg.get("embed_dim")
    manifest = read_manifest(bag_dir)
    found: tuple[str, int] | None = None
    if manifest is not None and manifest.get("feature_dim") is not None:
        found = (f"{bag_dir / MANIFEST_NAME} (encoder {manifest.get('encoder')!r})", int(manifest["feature_dim"]))
    else:
        for p in BagDirectory(bag_dir).files():
            if not validate_bag(p, full=False):
                header = read_bag_header(p)
                found = (f"{p} (encoder {header.get('encoder')!r})", header["feature_dim"])
                break
    if found is not None and width is not None and int(width) != found[1]:
        raise ConfigError(
            f"encoder {cfg.get('name')!r} gives {width}-dim embeddings but {found[0]} holds {found[1]}-dim bags; "
            f"one folder holds one encoder's bags: choose another --out folder, or delete {bag_dir} to re-extract"
        )
