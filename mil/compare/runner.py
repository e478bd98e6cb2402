"""Run every head of a comparison on the same splits and collect out-of-fold (or external) predictions.

Order of work: bags (one encoder, checked) + patient table -> cohort -> splits.json (made once, reused: k-fold,
or an external split by a patient-table column) -> for each seed and outer fold: covariates encoded with the
fold's training patients (mil.covariates) -> every count head (fit on train + val, no early stopping needed)
and every attention head (mil.heads.train.fit_predict, early stopping on val) -> probabilities of the fold's
test patients, and each fold's calibration fitted on patients it does not test (mil.compare.trust) -> metrics,
CIs, paired tests, calibration, conformal sets and abstention (mil.compare.report). Every fitted model is saved
under models/<head>/<fold> with what it needs to score new patients (`mil predict`), its calibration included.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mil.atomic import atomic_path
from mil.compare.config import CompareConfig
from mil.compare.normalise import feature_normaliser, fold_statistics
from mil.compare.trust import attention_trust, count_trust
from mil.count import (
    build_count_data,
    count_head_class,
    create_count_head,
    is_count_head,
    list_count_heads,
    load_groups,
)
from mil.count.differential import check_crossfit, crossfit_folder, trained_patients
from mil.count.persist import save_count_model
from mil.errors import ConfigError, InputError, listing, refuse_unknown_keys
from mil.progress import Progress
from mil.protocol import Splits, crossfit_plan, load_or_create_external_splits, load_or_create_splits
from mil.provenance import bag_provenance


@dataclass
class CompareResult:
    """Out-of-fold predictions of every head: probs[head] is (seeds, patients, classes) in `patients` order."""

    patients: list[str]
    classes: list[str]
    y_true: np.ndarray
    splits: Splits
    probs: dict[str, np.ndarray] = field(default_factory=dict)
    fold_of: np.ndarray | None = None  # (seeds, patients) outer fold that tested each patient
    kinds: dict[str, str] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)  # bag directory and patient table, for `mil attention`
    provenance: dict = field(default_factory=dict)  # encoder config + preprocessing of the bags (mil.provenance)
    covariates: list[str] = field(default_factory=list)  # encoded covariate names of the last fold (report)
    calibrated: dict[str, np.ndarray] = field(default_factory=dict)  # like probs, after each fold's calibration
    trust: dict[str, dict] = field(default_factory=dict)  # head -> fold name -> mil.compare.trust.FoldTrust
    internal: CompareResult | None = None  # the training cohort's own k-fold, with --with-internal-cv


def _check_heads(config: CompareConfig) -> dict[str, str]:
    from mil.heads import list_heads

    kinds, unknown = {}, []
    for name in config.heads:
        if is_count_head(name):
            kinds[name] = "count"
        elif name in list_heads():
            kinds[name] = "attention"
        else:
            unknown.append(name)
    unknown += [f"{n} (in count_heads options)" for n in config.count_heads if not is_count_head(n)]
    unknown += [f"{n} (in attention_heads options)" for n in config.attention_heads if n not in list_heads()]
    if unknown:
        raise ConfigError(
            f"unknown head(s) {unknown}; count heads: {', '.join(list_count_heads())}; "
            f"attention heads: {', '.join(list_heads())}"
        )
    return kinds


def _cohort(bag_patients: list[str], table: dict[str, dict], patients_csv: Path, log) -> tuple[dict, list[str]]:
    """patient -> diagnosis of the patients with both a valid bag and a diagnosis; list the others."""
    no_row = sorted(set(bag_patients) - set(table))
    if no_row:
        raise InputError(
            f"{len(no_row)} bag(s) have no row in {patients_csv}:\n{listing(no_row)}\n"
            "Add the patients with their diagnosis, or move their bags out of the bag directory."
        )
    dropped = sorted(set(table) - set(bag_patients))
    if dropped:
        log(f"note: {len(dropped)} patient(s) of {patients_csv} have no valid bag and are left out: {dropped[:10]}")
    return {p: table[p]["diagnosis"].strip() for p in bag_patients}, dropped


def parse_where(condition: str) -> tuple[str, set[str]]:
    """'cohort=Discovery' or 'centre=A,B' -> ('cohort', {'Discovery'}); anything else is a ConfigError."""
    column, sep, values = str(condition).partition("=")
    wanted = {v.strip() for v in values.split(",") if v.strip()}
    if not sep or not column.strip() or not wanted:
        raise ConfigError(f"{condition!r} is not COLUMN=VALUE[,VALUE...] (e.g. cohort=Discovery or centre=A,B)")
    return column.strip(), wanted


def _select(cohort: dict[str, str], table: dict[str, dict], condition: str, where: str) -> dict[str, str]:
    column, wanted = parse_where(condition)
    columns = list(next(iter(table.values()), {}))
    if column not in columns:
        raise ConfigError(f"{condition!r}: {where} has no column {column!r}; its columns are {columns}")
    return {p: dx for p, dx in cohort.items() if str(table[p].get(column, "")).strip() in wanted}


def _external_cohorts(config: CompareConfig, cohort: dict[str, str], table: dict[str, dict], where: str, log):
    train = _select(cohort, table, config.train_where, where)
    test = _select(cohort, table, config.test_where, where)
    neither = sorted(set(cohort) - set(train) - set(test))
    if neither:
        log(
            f"note: {len(neither)} patient(s) match neither {config.train_where} nor {config.test_where} "
            f"and are left out: {neither[:10]}"
        )
    return train, test


def _note_unused_columns(columns: list[str], config: CompareConfig, log) -> None:
    used = {"patient_id", "diagnosis", *config.covariates}
    for condition in (config.train_where, config.test_where):
        if condition:
            used.add(parse_where(condition)[0])
    if config.standardize_by not in (None, "patient"):
        used.add(config.standardize_by)
    unused = [c for c in columns if c not in used]
    if unused:
        log(
            f"note: patient-table columns not used by this run: {', '.join(unused)} "
            "(--covariates gives columns to the heads; --train-where/--test-where splits by one)"
        )


def _save_npy(path: Path, array: np.ndarray) -> None:
    def validate(tmp: Path) -> None:
        if np.load(tmp).shape != array.shape:
            raise OSError(f"{path} did not read back with shape {array.shape}")

    with atomic_path(path, validate) as tmp, tmp.open("wb") as f:
        np.save(f, array)


def _train_config(config: CompareConfig, seed: int, head_kwargs: dict | None = None):
    from mil.heads.train import TrainConfig

    known = set(TrainConfig.__dataclass_fields__)
    refuse_unknown_keys(config.train, known, "compare config section train (TrainConfig)")
    options = {**config.train, "seed": int(config.train.get("seed", 0)) + seed}
    if head_kwargs:
        options["head_kwargs"] = {**config.train.get("head_kwargs", {}), **head_kwargs}
    for key, value in (("devices", config.devices), ("accelerator", config.accelerator), ("wandb", config.wandb)):
        if key in known:
            options[key] = value
    return TrainConfig(**options)


def _count_data_for_fold(config: CompareConfig, fold: dict, groups, group_by, n_seeds: int):
    """Count inputs for one fold from that fold's cross-fitted classifier bags, checked for leakage."""
    from features.bag_directory import BagDirectory

    folder = crossfit_folder(Path(config.cell_probs_per_fold), fold, n_seeds)
    directory = BagDirectory(folder)
    bags = {p: directory.load(p) for p in directory.patients()}
    if not bags:
        raise InputError(f"cross-fitted bag folder {folder} holds no valid bag")
    check_crossfit(fold, trained_patients(folder, next(iter(bags.values()))), where=str(folder))
    for bag in bags.values():  # every bag may carry its own record; all must be clean
        found = trained_patients(folder, bag)
        if found is not None:
            check_crossfit(fold, found, where=f"{folder} (patient {bag.patient_id})")
    return build_count_data(bags, source=config.counts, group_by=group_by, groups=groups)


def _check_single_classifier(bags: Path, loaded: dict, plan: dict, log) -> None:
    """Counts from one classifier's cell_probs: refuse when it records training on a test patient of any fold."""
    trained = trained_patients(bags, next(iter(loaded.values())))
    if trained is None:
        log(
            "warning: counts come from cell_probs of a classifier that does not record its training patients; "
            "unless it was cross-fitted, test patients leak. Use --cell-probs-per-fold (mil.protocol.crossfit_plan)."
        )
        return
    for fold in plan.values():
        check_crossfit(fold, trained, where=str(bags))


def run_compare(
    config: CompareConfig,
    *,
    bags: str | Path,
    patients: str | Path,
    out: str | Path,
    log=print,
    only: set[str] | None = None,
) -> CompareResult:
    """Train and evaluate every head of `config.heads` on the same splits; write splits.json, attention, models.

    `only`: restrict the cohort to these patients (the internal CV of an external comparison's training cohort).
    """
    from features.bag_directory import BagDirectory
    from mil.cell_table import read_patient_table
    from mil.covariates import check_columns, refuse_leaks

    out = Path(out)
    if config.wandb != "disabled":
        os.environ["WANDB_MODE"] = config.wandb  # offline/online only when asked; never a login prompt
    kinds = _check_heads(config)
    directory = BagDirectory(bags)
    directory.check_consistent()
    bag_patients = directory.patients()
    if not bag_patients:
        raise InputError(f"bag directory {bags} holds no valid bag; run `mil extract` first")
    patient_table = read_patient_table(Path(patients))
    table = patient_table.by_id()
    columns = list(patient_table.rows[0]) if patient_table.rows else []
    check_columns(columns, config.covariates, str(patients))
    cohort, dropped = _cohort(bag_patients, table, Path(patients), log)
    if only is not None:
        cohort = {p: dx for p, dx in cohort.items() if p in only}
    else:
        _note_unused_columns(columns, config, log)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"seeds": config.seeds, "seed": config.seed, "val_fraction": config.val_fraction}
    if config.external and only is None:
        train_cohort, test_cohort = _external_cohorts(config, cohort, table, str(patients), log)
        cohort = {**train_cohort, **test_cohort}
        splits, created = load_or_create_external_splits(
            out / "splits.json",
            train_cohort,
            test_cohort,
            train_where=config.train_where,
            test_where=config.test_where,
            **settings,
        )
    else:
        splits, created = load_or_create_splits(out / "splits.json", cohort, folds=config.folds, **settings)
    log(
        f"splits {'written' if created else 'reused'}: {out / 'splits.json'} ({splits.describe().split(' ', 1)[1]}, "
        f"sha256 {splits.sha256[:12]})"
    )
    if config.covariates:
        fit_on = sorted({p for fs in splits.splits for p in fs.train + fs.val})
        refuse_leaks(
            [table[p] for p in fit_on],
            config.covariates,
            [cohort[p] for p in fit_on],
            allow=config.allow_separating_covariates,
            where="the training patients",
        )
        if "count.covariates" not in kinds:
            kinds["count.covariates"] = "count"
            log("note: covariates given, so the covariate-only head count.covariates joins the comparison")
    heads = list(kinds)
    order = splits.test_patients
    classes = sorted(set(cohort.values()))
    target = {p: classes.index(dx) for p, dx in cohort.items()}
    y_true = np.array([target[p] for p in order], dtype=np.int64)
    loaded = {p: directory.load(p) for p in splits.patients}

    groups = load_groups(config.groups) if config.groups else None
    group_by = load_groups(config.group_by) if config.group_by else None
    count_heads = [h for h in heads if kinds[h] == "count"]
    shared_counts = None
    if count_heads and not config.cell_probs_per_fold:
        shared_counts = build_count_data(
            loaded,
            source=config.counts,
            group_by=group_by,
            groups=groups,
            require_labels=any(count_head_class(h).reads_differential for h in count_heads),
        )
    plan = {f["name"]: f for f in crossfit_plan(splits)}
    if shared_counts is not None and config.counts != "truth":
        _check_single_classifier(Path(bags), loaded, plan, log)

    n_seeds, index = len(splits.seeds), {p: i for i, p in enumerate(order)}
    result = CompareResult(
        patients=order,
        classes=classes,
        y_true=y_true,
        splits=splits,
        kinds=kinds,
        dropped=dropped,
        fold_of=np.full((n_seeds, len(order)), -1),
        sources={"bags": str(Path(bags).resolve()), "patients": str(Path(patients).resolve())},
        provenance=bag_provenance(directory),
    )
    for h in heads:
        result.probs[h] = np.full((n_seeds, len(order), len(classes)), np.nan)
        result.calibrated[h] = np.full((n_seeds, len(order), len(classes)), np.nan)
        result.trust[h] = {}
        result.seconds[h] = 0.0
    attention: dict[str, dict[str, list]] = {h: {} for h in heads if kinds[h] == "attention"}
    norm = feature_normaliser(config.standardize_by, loaded, table)

    fits = Progress(len(splits.splits) * len(heads), "compare" if only is None else "compare, internal CV", "fits")
    fitted = dict.fromkeys(heads, 0)
    for k, fs in enumerate(splits.splits):
        s = splits.seeds.index(fs.seed)
        test_rows = [index[p] for p in fs.test]
        result.fold_of[s, test_rows] = fs.fold
        fit_on = list(fs.train + fs.val)
        encoder = _fit_fold_covariates(config, table, fit_on)
        if encoder is not None:
            result.covariates = encoder.names
        counts = shared_counts
        if count_heads and config.cell_probs_per_fold:
            counts = _count_data_for_fold(config, plan[fs.name], groups, group_by, n_seeds)
        if counts is not None and encoder is not None:
            counts = counts.with_covariates(encoder.transform([table[p] for p in counts.patients]))
        scores = []
        where = "external test" if splits.is_external else f"fold {fs.fold + 1}/{splits.folds}"
        for j, h in enumerate(heads):
            left = [heads[i % len(heads)] for i in range(k * len(heads) + j, len(splits.splits) * len(heads))]
            eta = _eta(left, result.seconds, fitted)
            # every attention fit is announced, count fits (milliseconds) only the first and then every interval
            fits.announce(f"seed {fs.seed} {where} {h}", eta=eta, always=kinds[h] != "count" or not fits.done)
            start = time.perf_counter()
            if kinds[h] == "count":
                head = create_count_head(h, seed=fs.seed, **config.count_heads.get(h, {}))
                y_fit = np.array([target[p] for p in fit_on])
                fit_data, test_data = counts.take(fit_on), counts.take(list(fs.test))
                head.fit(fit_data, y_fit, num_classes=len(classes))
                probs = head.predict_proba(test_data)
                trust, calibrated_model, calibrated = count_trust(
                    head, fit_data, y_fit, test_data, num_classes=len(classes), seed=fs.seed * 1000 + fs.fold,
                    patients=fit_on,
                )  # fmt: skip
                save_count_model(
                    out / "models" / h / fs.name,
                    head,
                    options=config.count_heads.get(h, {}),
                    classes=classes,
                    names=counts.names,
                    encoder=encoder,
                    meta=_model_meta(config, fs),
                    calibrated=calibrated_model,
                    calibration=trust.to_dict(),
                )
            else:
                probs, att, trust = _fit_attention(h, config, fs, loaded, target, classes, out, norm, encoder, table)
                calibrated = trust.calibrate(probs)
                for p, a in att.items():
                    attention[h].setdefault(p, []).append(np.asarray(a, dtype=np.float32))
            result.probs[h][s, test_rows] = probs
            result.calibrated[h][s, test_rows] = calibrated
            result.trust[h][fs.name] = trust
            result.seconds[h] += time.perf_counter() - start
            fitted[h] += 1
            fits.update(1, timed_line=False)
            acc = float((probs.argmax(axis=1) == y_true[test_rows]).mean())
            scores.append(f"{h} {acc:.2f}")
        log(f"[{k + 1}/{len(splits.splits)}] seed {fs.seed} {where}: test accuracy {', '.join(scores)}")

    fits.close()
    for h, per_patient in attention.items():
        for p, arrays in per_patient.items():
            _save_npy(out / "attention" / h / f"{p}.npy", np.stack(arrays))  # (seeds, N) or (seeds, C, N)
    missing = [h for h, pr in result.probs.items() if np.isnan(pr).any()]
    if missing:
        raise RuntimeError(f"heads {missing} left patients without an out-of-fold prediction (a bug; please report)")
    if config.external and config.with_internal_cv and only is None:
        log(f"internal CV of the training cohort ({config.train_where}) in {out / 'internal_cv'}")
        result.internal = run_compare(
            config, bags=bags, patients=patients, out=out / "internal_cv", log=log, only=set(train_cohort)
        )
    return result


def _eta(left: list[str], seconds: dict[str, float], fitted: dict[str, int]) -> float | None:
    """Seconds for the fits `left` (head names, one per fit): each head's mean so far, the mean of all fits for a
    head not fitted yet; None before the first fit. Count heads take milliseconds, attention heads minutes."""
    done = sum(fitted.values())
    if not done:
        return None
    overall = sum(seconds.values()) / done
    return sum(seconds[h] / fitted[h] if fitted[h] else overall for h in left)


def _model_meta(config: CompareConfig, fs) -> dict:
    return {
        "fold": fs.name,
        "train_patients": list(fs.train),
        "val_patients": list(fs.val),
        "test_patients": list(fs.test),
        "counts": config.counts,
        "group_by": config.group_by,
        "groups": config.groups,
        "standardize": config.standardize,
        "standardize_by": config.standardize_by,
    }


def _fit_fold_covariates(config: CompareConfig, table: dict[str, dict], fit_on: list[str]):
    """The covariate encoder of one fold, fitted on its training patients (train + val) only; None without any."""
    if not config.covariates:
        return None
    from mil.covariates import fit_covariates

    return fit_covariates([table[p] for p in fit_on], config.covariates)


def _fit_attention(name, config, fs, loaded, target, classes, out, norm, encoder, table):
    """One attention head on one fold: BagRecords from the bags, fit_predict, probs of the test patients.

    The head is passed by name so fit_predict builds it after seeding: its initial weights are reproducible.
    """
    from mil.heads.data import BagRecord
    from mil.heads.train import fit_predict

    shift, scale = 0.0, 1.0
    if config.standardize:  # z-score with the fold's training cells only: no statistic of a test patient leaks in
        shift, scale = fold_statistics([norm(p) for p in fs.train])
    covariates = {}
    if encoder is not None:
        every = list(fs.train + fs.val + fs.test)
        covariates = dict(zip(every, encoder.transform([table[p] for p in every]).astype(np.float32)))

    def records(ids):
        return [
            BagRecord(
                patient_id=p,
                features=((norm(p) - shift) / scale).astype(np.float32),
                target=int(target[p]),
                covariates=covariates.get(p),
            )
            for p in ids
        ]

    train_config = _train_config(config, fs.seed * 1000 + fs.fold, head_kwargs=config.attention_heads.get(name, {}))
    result = fit_predict(
        name,
        train=records(fs.train),
        val=records(fs.val),
        test=records(fs.test),
        num_classes=len(classes),
        config=train_config,
        log_dir=out / "logs" / name / fs.name,
        desc=f"{name} {fs.name}",
    )
    in_dim = int(np.asarray(loaded[fs.train[0]].features).shape[1])
    # calibration on the inner validation patients only (mil.compare.trust); stored so `mil predict` applies it
    trust = attention_trust(result.val_probs, np.array([target[p] for p in fs.val], dtype=np.int64), fs.val)
    meta = {
        **_model_meta(config, fs),
        "covariates": encoder.to_dict() if encoder is not None else None,
        "calibration": trust.to_dict(),
    }
    _save_bundle(
        out / "models" / name / f"{fs.name}.pt", name, train_config, result, in_dim, shift, scale, classes, meta
    )
    return np.asarray(result.probs, dtype=np.float64), result.attention, trust


def _save_bundle(path, name, train_config, result, in_dim, shift, scale, classes, meta) -> None:
    """The fold's trained head with its feature standardisation: `mil attention` reruns it for deletion curves."""

    from mil.heads.bundle import save_head_bundle

    if not result.best_checkpoint:
        return
    from mil.runs import load_checkpoint

    state = load_checkpoint(result.best_checkpoint, what="best checkpoint", fix="rerun `mil compare`")["state_dict"]
    head_state = {k.removeprefix("head."): v for k, v in state.items() if k.startswith("head.")}
    kwargs = {"hidden_dim": train_config.hidden_dim, "dropout": train_config.dropout, **train_config.head_kwargs}
    if result.covariate_shift is not None:
        kwargs["covariate_dim"] = int(len(result.covariate_shift))
    save_head_bundle(
        path,
        head_name=name,
        head_kwargs=kwargs,
        state_dict=head_state,
        in_dim=in_dim,
        classes=list(classes),
        shift=shift,
        scale=scale,
        covariate_shift=result.covariate_shift,
        covariate_scale=result.covariate_scale,
        meta=meta,
    )
