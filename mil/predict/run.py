"""Apply the models a comparison saved to new patients: every fold and seed model of each head, and their ensemble.

Inputs: RESULTS (a `mil compare` folder: config.yaml, models/<head>/<fold>.pt|.json), NEW_BAGS (bags of the same
encoder and preprocessing, checked against RESULTS' record), and an optional patient table (covariates, and the
diagnoses when the new patients' outcomes are known). Each model encodes covariates and standardises features
with the statistics it stored at training time; nothing is refitted on the new patients, except the per-group
statistics of `standardize_by COLUMN`, which by design describe the new patients' own centre.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from mil.errors import ConfigError, InputError, listing
from mil.progress import Progress, track

ENSEMBLE = "ensemble"


@dataclass
class Member:
    """One saved model of a head: its name (the fold, e.g. seed0_fold2), kind and what it stored."""

    head: str
    name: str
    kind: str  # "count" | "attention"
    path: Path


@dataclass
class PredictResult:
    patients: list[str]
    classes: list[str]
    truth: dict[str, str]  # patient -> diagnosis, for the patients whose diagnosis is known
    probs: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # head -> member -> (P, C)
    attention: dict[str, dict[str, dict[str, np.ndarray]]] = field(default_factory=dict)  # head -> member -> pid
    kinds: dict[str, str] = field(default_factory=dict)
    calibrated: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # head -> member -> (P, C)
    trust: dict[str, dict] = field(default_factory=dict)  # head -> member -> mil.compare.trust.FoldTrust

    def ensemble(self, head: str) -> np.ndarray:
        """(P, C) mean probability over the head's members."""
        return np.mean(np.stack(list(self.probs[head].values())), axis=0)

    def calibrated_ensemble(self, head: str) -> np.ndarray:
        """(P, C) mean of the members' calibrated probabilities."""
        return np.mean(np.stack(list(self.calibrated[head].values())), axis=0)

    def member_sets(self, head: str, member: str, level: float, classwise: bool) -> np.ndarray:
        """(P, C) conformal sets of one member, calibrated on the held-out patients of its training fold."""
        return self.trust[head][member].sets(self.calibrated[head][member], level, classwise)

    def ensemble_sets(self, head: str, level: float, classwise: bool) -> np.ndarray:
        """(P, C) sets of the calibrated ensemble at the members' mean threshold (mil.protocol.conformal)."""
        from mil.protocol.conformal import ensemble_sets

        members = list(self.probs[head])
        calibrations = [self.trust[head][m].conformal for m in members]
        return ensemble_sets(calibrations, self.calibrated_ensemble(head), level, classwise)

    def spread(self, head: str) -> np.ndarray:
        """(P, C) standard deviation of the members' probabilities (0 with one member)."""
        return np.std(np.stack(list(self.probs[head].values())), axis=0)


def read_results_config(results: Path) -> dict:
    path = results / "config.yaml"
    if not path.exists():
        raise InputError(f"{path} is missing: --results must be a `mil compare` output folder")
    config = yaml.safe_load(path.read_text()) or {}
    for key in ("classes", "heads"):
        if not config.get(key):
            raise InputError(f"{path} records no {key}; it was written by an older version: rerun `mil compare`")
    return config


def find_members(results: Path, heads: list[str], model: str | None) -> list[Member]:
    """Every saved model of `heads` (or the one named `model`); a head without a saved model is an error."""
    from mil.count import is_count_head

    members, problems = [], []
    for h in heads:
        folder = results / "models" / h
        kind = "count" if is_count_head(h) else "attention"
        pattern = "*.json" if kind == "count" else "*.pt"
        found = sorted(folder.glob(pattern))
        if model is not None:
            found = [p for p in found if p.stem == model]
        if not found:
            available = sorted({p.stem for p in folder.glob(pattern)})
            problems.append(f"{h}: no saved model{f' {model!r}' if model else ''} in {folder} (has: {available})")
        members += [Member(head=h, name=p.stem, kind=kind, path=p) for p in found]
    if problems:
        raise InputError(f"models to apply are missing:\n{listing(problems)}\nRerun `mil compare` into {results}.")
    return members


def _patient_rows(patients: Path | None, bag_patients: list[str]) -> dict[str, dict]:
    from mil.cell_table import read_patient_table, validate_patient_table

    if patients is None:
        return {p: {"patient_id": p} for p in bag_patients}
    table = read_patient_table(patients, validate=False)
    validate_patient_table(table, where=str(patients), require_diagnosis=False)
    rows = table.by_id()
    missing = sorted(set(bag_patients) - set(rows))
    if missing:
        raise InputError(
            f"{len(missing)} new bag(s) have no row in {patients}:\n{listing(missing)}\n"
            "Add the patients (diagnosis may stay empty), or move their bags out of the bag directory."
        )
    return rows


def _count_probs(member: Member, bags: dict, rows: dict[str, dict], order: list[str]):
    """(probabilities, calibrated probabilities, FoldTrust) of one saved count model."""
    from mil.compare.trust import FoldTrust
    from mil.count import build_count_data, load_groups
    from mil.count.persist import load_calibrated_model, load_count_model
    from mil.covariates import CovariateEncoder
    from mil.protocol.calibration import calibrated_count_proba

    head, record = load_count_model(member.path.with_suffix(""))
    meta = record["meta"]
    group_by = load_groups(meta["group_by"]) if meta.get("group_by") else None
    groups = load_groups(meta["groups"]) if meta.get("groups") else None
    data = build_count_data(bags, source=meta["counts"], group_by=group_by, groups=groups).take(order)
    if data.names != record["names"]:
        raise ConfigError(
            f"{member.path}: the model counts classes {record['names'][:6]}..., the new bags {data.names[:6]}...; "
            "label the new cells with the same label map (or classifier) as the training cells"
        )
    if record.get("covariates"):
        encoder = CovariateEncoder.from_dict(record["covariates"])
        data = data.with_covariates(encoder.transform([rows[p] for p in order], role="new"))
    probs = head.predict_proba(data)
    model = load_calibrated_model(member.path.with_suffix(""), record)
    calibrated = probs if model is None else calibrated_count_proba(head, model, data, head.num_classes)
    return probs, calibrated, FoldTrust.from_dict(record.get("calibration"))


def _attention_probs(
    member: Member, bags: dict, rows: dict[str, dict], order: list[str], normalisers: dict, bar: Progress
):
    from mil.compare.normalise import feature_normaliser
    from mil.covariates import CovariateEncoder
    from mil.heads.bundle import load_head_bundle

    bundle = load_head_bundle(member.path)
    by = bundle.meta.get("standardize_by")
    if by not in normalisers:
        normalisers[by] = feature_normaliser(by, bags, rows)
    norm = normalisers[by]
    encoder = CovariateEncoder.from_dict(bundle.meta["covariates"]) if bundle.meta.get("covariates") else None
    covariates = encoder.transform([rows[p] for p in order], role="new") if encoder is not None else [None] * len(order)
    probs, attention = [], {}
    for p, cov in zip(order, covariates):
        prob, weights = bundle.predict_with_attention(norm(p), cov)
        probs.append(prob)
        attention[p] = np.asarray(weights, dtype=np.float32)
        bar.update(1)
    return np.stack(probs), attention, bundle.meta.get("calibration")


def run_predict(
    *,
    results: str | Path,
    bags: str | Path,
    patients: str | Path | None = None,
    heads: list[str] | None = None,
    model: str | None = None,
    log=print,
) -> PredictResult:
    """Probabilities of every member model (and so the ensemble) of each head for every valid bag of `bags`."""
    from features.bag_directory import BagDirectory
    from mil.provenance import bag_provenance, check_same_provenance

    results = Path(results)
    config = read_results_config(results)
    heads = heads or list(config["heads"])
    unknown = [h for h in heads if h not in config["heads"]]
    if unknown:
        raise ConfigError(f"heads {unknown} were not compared in {results}; it has {config['heads']}")
    members = find_members(results, heads, model)
    directory = BagDirectory(bags)
    directory.check_consistent()
    check_same_provenance(
        config.get("bag_provenance") or {},
        bag_provenance(directory),
        trained_where=str(config.get("bags")),
        new_where=str(bags),
    )
    order = directory.patients()
    if not order:
        raise InputError(f"bag directory {bags} holds no valid bag; run `mil extract` first")
    covariates = list(config.get("covariates") or [])
    if covariates and patients is None:
        raise ConfigError(
            f"the models of {results} use covariates {covariates}: pass the new patients' table with --patients "
            "(a missing value is imputed as in training, but a whole missing table is not)"
        )
    rows = _patient_rows(Path(patients) if patients else None, order)
    if covariates:
        from mil.covariates import check_columns

        check_columns(list(next(iter(rows.values()))), covariates, str(patients))
    loaded = {p: directory.load(p) for p in track(order, "predict: read bags", "bags")}
    classes = list(config["classes"])
    truth = {p: rows[p]["diagnosis"].strip() for p in order if (rows[p].get("diagnosis") or "").strip()}
    unseen = sorted({dx for dx in truth.values() if dx not in classes})
    if unseen:
        log(f"note: diagnoses {unseen} were not among the trained classes {classes}; those patients are not scored")
        truth = {p: dx for p, dx in truth.items() if dx in classes}
    result = PredictResult(patients=order, classes=classes, truth=truth)
    normalisers: dict = {}
    from mil.compare.trust import FoldTrust

    bar = Progress(len(members) * len(order), "predict", "patient-models")  # one per patient and saved model
    for i, m in enumerate(members):
        result.kinds[m.head] = m.kind
        if m.kind == "count":
            probs, calibrated, trust = _count_probs(m, loaded, rows, order)
            bar.update(len(order))
        else:
            probs, attention, record = _attention_probs(m, loaded, rows, order, normalisers, bar)
            result.attention.setdefault(m.head, {})[m.name] = attention
            trust = FoldTrust.from_dict(record)  # temperature fitted on the fold's validation patients
            calibrated = trust.calibrate(probs)
        result.probs.setdefault(m.head, {})[m.name] = probs
        result.calibrated.setdefault(m.head, {})[m.name] = calibrated
        result.trust.setdefault(m.head, {})[m.name] = trust
        log(f"[{i + 1}/{len(members)}] {m.head} {m.name}: {len(order)} patients")
    bar.close()
    return result
