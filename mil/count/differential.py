"""The per-patient cell differential (share of each class or group) and bag metadata, as count-head inputs.

Three sources of a cell's class, as a hematologist's count or a classifier's:
  truth  the bag's `label` (ground truth; -1 = unlabelled, not counted),
  hard   argmax of the bag's `cell_probs` (a classifier's calls),
  soft   the sum of `cell_probs` (expected counts).
With classifier counts, each test patient must be counted by a classifier that never saw it: `crossfit_bags`
loads one bag directory per outer fold and refuses a fold whose classifier was trained on its test patients.
Training patients of that fold are counted by the same fold classifier, as a deployed pipeline would count them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from mil.errors import ConfigError, InputError, listing

SOURCES = ("truth", "hard", "soft")
META_NAMES = ("log_cell_count", "labelled_fraction")
UNGROUPED = "ungrouped"


def _json_attr(attrs: dict, key: str, default=None):
    value = attrs.get(key, default)
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def prob_classes(bag) -> list[str]:
    """Names of the `cell_probs` columns: recorded by the classifier encoder, else the bag's label classes."""
    attrs = bag.attrs
    for key in ("cell_probs_classes", "class_names"):
        names = _json_attr(attrs, key)
        if names:
            return list(names)
    extra = (_json_attr(attrs, "encoder_config", {}) or {}).get("extra") or {}
    if extra.get("class_names"):
        return list(extra["class_names"])
    return list(_json_attr(attrs, "label_classes", []) or [])


def cell_counts(bag, source: str) -> tuple[np.ndarray, list[str]]:
    """(K,) counts of the cells of one bag per class, and the class names, from `source`."""
    if source not in SOURCES:
        raise ConfigError(f"counts source {source!r} is not one of {SOURCES}")
    if source == "truth":
        classes = list(_json_attr(bag.attrs, "label_classes", []) or [])
        label = np.asarray(bag.label, dtype=np.int64)
        if not classes:
            raise InputError(f"bag of patient {bag.patient_id!r} has no label_classes attribute; re-extract it")
        return np.bincount(label[label >= 0], minlength=len(classes)).astype(np.float64), classes
    if bag.cell_probs is None:
        raise InputError(
            f"bag of patient {bag.patient_id!r} has no cell_probs, so --counts {source} cannot count it; extract "
            "with the classifier encoder (classifier.file) or use --counts truth"
        )
    probs = np.asarray(bag.cell_probs, dtype=np.float64)
    classes = prob_classes(bag)
    if len(classes) != probs.shape[1]:
        raise InputError(
            f"bag of patient {bag.patient_id!r}: cell_probs has {probs.shape[1]} columns, "
            f"but {len(classes)} class names are recorded"
        )
    if source == "hard":
        return np.bincount(probs.argmax(axis=1), minlength=len(classes)).astype(np.float64), classes
    return probs.sum(axis=0), classes


def bag_meta(bag) -> np.ndarray:
    """(2,) what a shortcut could ride on: log(1 + cells in the bag), share of cells with a label."""
    label = np.asarray(bag.label)
    n = len(label)
    return np.array([np.log1p(n), float((label >= 0).mean()) if n else 0.0])


def load_groups(path: str | Path | None) -> dict[str, tuple[str, ...]]:
    """Groups of classes from a YAML file with a `groups:` mapping (a label map, or a file of groups only)."""
    from mil.labels import DEFAULT_LABEL_MAP, normalize_label

    path = Path(path) if path else DEFAULT_LABEL_MAP
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as e:
        raise ConfigError(f"groups file {path} does not exist; pass a YAML file with a `groups:` mapping") from e
    groups = spec.get("groups") if isinstance(spec, dict) else None
    if not isinstance(groups, dict) or not groups:
        raise ConfigError(f"groups file {path} has no `groups:` mapping of name -> [class, ...]")
    return {str(k): tuple(normalize_label(c) for c in v) for k, v in groups.items()}


@dataclass
class CountData:
    """Count-head inputs of a list of patients: differential (P, K) shares, column names, bag metadata (P, 2)."""

    patients: list[str]
    differential: np.ndarray
    names: list[str]
    meta: np.ndarray
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)
    covariates: np.ndarray | None = None  # (P, K) encoded patient covariates (mil.covariates), when a run uses them

    def take(self, patients: list[str] | tuple[str, ...]) -> CountData:
        index = {p: i for i, p in enumerate(self.patients)}
        missing = [p for p in patients if p not in index]
        if missing:
            raise InputError(f"no counts for patient(s) {missing[:10]}; their bags are missing or invalid")
        rows = [index[p] for p in patients]
        covariates = None if self.covariates is None else self.covariates[rows]
        return CountData(list(patients), self.differential[rows], self.names, self.meta[rows], self.groups, covariates)

    def with_covariates(self, covariates: np.ndarray | None) -> CountData:
        """The same patients with (P, K) covariates attached (rows in `patients` order)."""
        if covariates is not None and len(covariates) != len(self.patients):
            raise ValueError(f"covariates have {len(covariates)} rows for {len(self.patients)} patients")
        return CountData(self.patients, self.differential, self.names, self.meta, self.groups, covariates)

    def share(self, group: str) -> np.ndarray:
        """(P,) share of `group`: a column of the differential, or the sum of the group's class columns."""
        if group in self.names:
            return self.differential[:, self.names.index(group)]
        if group in self.groups:
            cols = [self.names.index(c) for c in self.groups[group] if c in self.names]
            if cols:
                return self.differential[:, cols].sum(axis=1)
        known = sorted(set(self.names) | set(self.groups))
        raise ConfigError(f"ratio group {group!r} is neither a class nor a group here; choose one of {known}")


def _group_matrix(classes: list[str], groups: dict[str, tuple[str, ...]]) -> tuple[np.ndarray, list[str]]:
    """(K, G) 0/1 matrix summing class shares into group shares; classes in no group go to 'ungrouped'."""
    unknown = sorted({c for members in groups.values() for c in members if c not in classes})
    if unknown:
        raise ConfigError(f"groups name classes the bags do not have: {unknown}; the bags' classes are {classes}")
    names = list(groups)
    covered = {c for members in groups.values() for c in members}
    if any(c not in covered for c in classes):
        names.append(UNGROUPED)
    matrix = np.zeros((len(classes), len(names)))
    for j, name in enumerate(names):
        members = groups.get(name) or [c for c in classes if c not in covered]
        for c in members:
            matrix[classes.index(c), j] = 1.0
    return matrix, names


def _refuse_unlabelled(patients: list[str], counts: np.ndarray) -> None:
    """Ground-truth counts of a bag without a labelled cell are all zero: count heads would score chance, silently."""
    empty = [p for p, row in zip(patients, counts) if row.sum() == 0]
    if not empty:
        return
    n = len(patients)
    who = f"none of the {n} bag(s) has a" if len(empty) == n else f"{len(empty)} of the {n} bag(s) have no"
    shown = ", ".join(empty[:10]) + (f" and {len(empty) - 10} more" if len(empty) > 10 else "")
    raise InputError(
        f"count heads with --counts truth count the cells' labels, but {who} labelled cell (every label "
        f"is -1): {shown}. Their differential would be all zero and the count heads "
        "would score chance. Either give those cells labels (column `label` of the cell table, then `mil extract` "
        "again), or count with a cell classifier: `mil train-classifier` on labelled cells, `mil extract --encoder "
        "classifier.file --weights CLASSIFIER.pt` (bags with cell_probs; `mil classify` shows its calls), then "
        "`--counts hard` or `--counts soft`; or leave the count heads out (attention heads need no labels)."
    )


def build_count_data(
    bags: dict[str, object],
    *,
    source: str = "truth",
    group_by: dict | None = None,
    groups: dict[str, tuple[str, ...]] | None = None,
    require_labels: bool = True,
) -> CountData:
    """Count data of every patient of `bags` (patient id -> Bag).

    `require_labels`: refuse bags without a labelled cell (truth counts); off when only heads that never read
    the differential run (count.meta, count.covariates).
    `group_by`: when given, shares are over these groups (+ 'ungrouped') instead of the classes.
    `groups`: named groups the ratio head may ask for (default: those of configs/label_map.yaml).
    """
    patients = sorted(bags)
    if not patients:
        raise InputError("no bags to count; check --bags")
    rows, classes, problems = [], None, []
    for pid in patients:
        counts, names = cell_counts(bags[pid], source)
        if classes is None:
            classes = names
        elif names != classes:
            problems.append(f"patient {pid!r}: classes {names[:5]}... differ from {classes[:5]}...")
        rows.append(counts)
    if problems:
        raise InputError(f"bags disagree on their cell classes (mixed label maps?):\n{listing(problems)}")
    counts = np.stack(rows)
    if source == "truth" and require_labels:
        _refuse_unlabelled(patients, counts)
    total = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, total, out=np.zeros_like(counts), where=total > 0)
    names = list(classes)
    if group_by:
        matrix, names = _group_matrix(names, group_by)
        shares = shares @ matrix
    meta = np.stack([bag_meta(bags[p]) for p in patients])
    if groups is None:
        groups = load_groups(None)
    return CountData(patients, shares, names, meta, dict(groups if group_by is None else {**groups, **group_by}))


def trained_patients(folder: Path, bag) -> list[str] | None:
    """Patients the fold's classifier was trained on: train_patients.json beside the bags, or the bag attrs."""
    sidecar = folder / "train_patients.json"
    if sidecar.exists():
        return list(json.loads(sidecar.read_text()))
    found = _json_attr(bag.attrs, "classifier_train_patients")
    if found:
        return list(found)
    extra = (_json_attr(bag.attrs, "encoder_config", {}) or {}).get("extra") or {}
    return list(extra["train_patients"]) if extra.get("train_patients") else None


def check_crossfit(fold: dict, trained_on: list[str] | None, where: str) -> None:
    """Refuse a fold whose classifier saw one of the fold's test patients (or does not say whom it saw)."""
    if trained_on is None:
        raise InputError(
            f"{where}: the classifier's training patients are not recorded, so leakage cannot be ruled out; write "
            "them to train_patients.json in that folder (or the bags' attr classifier_train_patients), using "
            "mil.protocol.crossfit_plan(splits) to choose them"
        )
    leaked = sorted(set(trained_on) & set(fold["test_patients"]))
    if leaked:
        raise InputError(
            f"{where}: the classifier of {fold['name']} was trained on {len(leaked)} of its test patient(s) "
            f"{leaked[:10]}; retrain it on the fold's train_patients from mil.protocol.crossfit_plan(splits)"
        )


def crossfit_folder(root: Path, fold: dict, n_seeds: int) -> Path:
    """DIR/seed{S}_fold{F}; with a single seed DIR/fold{F} is accepted too."""
    candidates = [root / fold["name"]] + ([root / f"fold{fold['fold']}"] if n_seeds == 1 else [])
    for c in candidates:
        if c.is_dir():
            return c
    raise InputError(f"cross-fitted probabilities for {fold['name']} are missing: expected folder {candidates[0]}")
