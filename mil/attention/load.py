"""Read what `mil compare` saved for an attention head into `PatientAttention` records and build the report.

Inputs under RESULTS: predictions.csv (true and predicted diagnosis), attention/<head>/<patient>.npy
((seeds, N) or (seeds, C, N), rows aligned with the bag), models/<head>/<fold>.pt (head bundles, for
deletion curves), splits.json (which fold tested which patient) and config.yaml (the bag directory).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import yaml

from mil.attention.report import PatientAttention, build_report
from mil.errors import InputError
from mil.progress import track


def _predictions(results: Path, head: str, seed: int | None) -> dict[str, dict]:
    """Rows of one head: of `seed` in a comparison, of the ensemble in a `mil predict` folder (seed None)."""
    path = results / "predictions.csv"
    if not path.exists():
        raise InputError(f"{path} is missing; run `mil compare ... --out {results}` first")
    with path.open(newline="") as f:
        if seed is None:
            rows = [r for r in csv.DictReader(f) if r["head"] == head and r["model"] == "ensemble"]
        else:
            rows = [r for r in csv.DictReader(f) if r["head"] == head and int(r["seed"]) == seed]
    if not rows:
        raise InputError(f"{path} has no predictions of head {head!r} for seed {seed}; pick a head that was compared")
    return {r["patient_id"]: r for r in rows}


def _member_rows(results: Path, head: str) -> dict[str, list[dict]]:
    """patient -> every member model's row of `head` (each seed of a comparison; each model of `mil predict`)."""
    with (results / "predictions.csv").open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["head"] == head and r.get("model", "") != "ensemble"]
    members: dict[str, list[dict]] = {}
    for r in rows:
        members.setdefault(r["patient_id"], []).append(r)
    return members


def _confidence(row: dict, members: list[dict]) -> dict:
    """The predicted diagnosis' (calibrated, where calibrated) probability, its [min, max] over the member
    models (more than one member) and the conformal set, for the attention report; empty keys where absent."""
    column = next((f"{k}_{row['predicted']}" for k in ("cal", "prob") if f"{k}_{row['predicted']}" in row), None)
    if column is None:
        return {}
    values = [float(m[column]) for m in members if m.get(column)]
    out = {"probability": float(row[column])}
    if len(values) > 1:
        out["interval"] = (min(values), max(values))
    if "set" in row:
        out["prediction_set"] = row["set"].replace("|", ", ") or "(empty)"
        if row.get("set_classwise", row["set"]) != row["set"]:
            out["prediction_set"] += f" (class-conditional: {row['set_classwise'].replace('|', ', ') or 'empty'})"
    return out


def _cell_extras(cells: Path | None) -> dict[str, dict]:
    if cells is None:
        return {}
    from mil.cell_table import read_cell_table

    return {r["cell_id"]: r for r in read_cell_table(cells).rows}


def load_patients(
    results: str | Path,
    *,
    head: str,
    bags: str | Path | None = None,
    cells: str | Path | None = None,
    max_patients: int | None = None,
    with_models: bool = True,
) -> tuple[list[PatientAttention], dict]:
    """Records for every patient tested in the first seed, and a map patient -> head bundle (may be empty)."""
    from mil.protocol.splits import read_splits

    results = Path(results)
    config = yaml.safe_load((results / "config.yaml").read_text()) if (results / "config.yaml").exists() else {}
    bags = Path(bags or config.get("bags") or "")
    if not bags or not bags.is_dir():
        raise InputError(f"the bag directory of {results} is unknown or missing ({bags}); pass --bags BAGS")
    if config.get("predict"):  # a `mil predict` folder: the ensemble, models from the comparison it applied
        return _load_predicted(results, config, head, bags, cells, max_patients, with_models)
    splits = read_splits(results / "splits.json")
    seed = splits.seeds[0]
    predictions = _predictions(results, head, seed)
    att_dir, directory, extras, classes = _shared_inputs(results, head, bags, cells, config)
    fold_of = {p: fs for fs in splits.splits if fs.seed == seed for p in fs.test}
    members = _member_rows(results, head)
    bundles: dict = {}
    records = []
    for pid in track(sorted(predictions)[: max_patients or None], "attention: read bags", "bags"):
        bag = directory.load(pid)
        attention = np.load(att_dir / f"{pid}.npy")[0]  # first seed: (N,) or (C,N)
        records.append(_record(pid, bag, attention, predictions[pid], extras, classes, members.get(pid, [])))
        bundle_path = results / "models" / head / f"{fold_of[pid].name}.pt"
        if with_models and bundle_path.exists():
            if bundle_path not in bundles:
                bundles[bundle_path] = _runnable_bundle(bundle_path)
            bundles[pid] = bundles[bundle_path]
    return records, {p: b for p, b in bundles.items() if isinstance(p, str) and b is not None}


def _shared_inputs(results: Path, head: str, bags: Path, cells, config: dict):
    """The attention folder of `head`, the bag directory, the cell table's extra columns and the class names."""
    from features.bag_directory import BagDirectory

    att_dir = results / "attention" / head
    if not att_dir.is_dir():
        raise InputError(f"{att_dir} is missing: {head!r} saved no attention (is it an attention head?)")
    return att_dir, BagDirectory(bags), _cell_extras(Path(cells) if cells else None), list(config.get("classes") or [])


def _runnable_bundle(path: Path):
    """The head bundle for deletion curves, or None when it needs inputs beyond the bag (covariates, group
    statistics): the curves are then skipped with a note rather than computed on the wrong inputs."""
    from mil.heads.bundle import load_head_bundle

    bundle = load_head_bundle(path)
    if bundle.covariate_shift is not None or bundle.meta.get("standardize_by"):
        return None
    return bundle


def _load_predicted(results: Path, config: dict, head: str, bags, cells, max_patients, with_models):
    """Records of a `mil predict` folder: ensemble predictions, attention averaged over the member models."""
    import json

    record = json.loads((results / "predict.json").read_text())
    members = record["heads"].get(head)
    if not members:
        raise InputError(f"{results} has no predictions of head {head!r}; it has {sorted(record['heads'])}")
    predictions = _predictions(results, head, None)
    att_dir, directory, extras, classes = _shared_inputs(results, head, bags, cells, config)
    bundle = None
    first = Path(record["results"]) / "models" / head / f"{members[0]}.pt"
    if with_models and first.exists():
        bundle = _runnable_bundle(first)
    records, bundles = [], {}
    member_rows = _member_rows(results, head)
    for pid in track(sorted(predictions)[: max_patients or None], "attention: read bags", "bags"):
        attention = np.load(att_dir / f"{pid}.npy").mean(axis=0)  # members averaged: (N,) or (C,N)
        records.append(
            _record(pid, directory.load(pid), attention, predictions[pid], extras, classes, member_rows.get(pid, []))
        )
        if bundle is not None:
            bundles[pid] = bundle
    return records, bundles


def _record(
    pid: str, bag, attention: np.ndarray, row: dict, extras: dict, classes: list[str], members: list[dict] = ()
) -> PatientAttention:
    """One patient's attention record, with the bag's cells and the prediction row."""
    if attention.shape[-1] != len(bag.features):
        raise InputError(
            f"attention of {pid} has {attention.shape[-1]} cells, its bag {len(bag.features)}; "
            "the bags changed after `mil compare` ran - rerun it"
        )
    label_classes = list(bag.attrs.get("label_classes") or [])
    truth = [label_classes[i] if 0 <= i < len(label_classes) else "" for i in bag.label]
    cell_type = truth
    if bag.cell_probs is not None:
        from mil.count.differential import prob_classes

        names = prob_classes(bag)
        cell_type = [names[i] for i in bag.cell_probs.argmax(axis=1)]
    cue = None
    if extras and "auer_rod" in next(iter(extras.values())):
        cue = np.array([str(extras.get(c, {}).get("auer_rod", "0")) in ("1", "True", "true") for c in bag.cell_id])
    return PatientAttention(
        patient_id=pid,
        true=row["true"],
        predicted=row["predicted"],
        attention=attention,
        boxes=bag.boxes,
        image_paths=[bag.image_paths[i] for i in bag.image_index],
        cell_type=cell_type,
        truth=truth,
        features=np.asarray(bag.features, np.float32),
        cue=cue,
        branch_names=classes if attention.ndim == 2 else [],
        **_confidence(row, list(members)),
    )


def report_from_results(
    results: str | Path,
    out: str | Path,
    *,
    head: str = "abmil",
    bags: str | Path | None = None,
    cells: str | Path | None = None,
    top_k: int = 8,
    max_patients: int | None = None,
) -> dict:
    """The whole `mil attention` report for one head of a comparison; returns the cohort summary."""
    records, bundles = load_patients(results, head=head, bags=bags, cells=cells, max_patients=max_patients)
    predict = (lambda pid, features: bundles[pid].predict(features)) if len(bundles) == len(records) else None
    if predict is None:
        print(
            f"note: deletion curves skipped: {head} has no saved model for some patients of {results}, or its models "
            "need covariates or per-centre statistics beside the bag (deletion curves rerun a model on the bag alone)"
        )
    return build_report(records, out, title=f"Attention over cells: {head}", head=head, predict=predict, top_k=top_k)
