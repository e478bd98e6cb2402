"""Patient-level splits, repeated over seeds: stratified outer k-fold with an inner validation split (kind
`cv`), or an external split chosen by a patient-table column (kind `external`: train on one cohort, with the
inner validation split drawn from it alone, and test every patient of the other).

Made once per cohort and written to `splits.json` with a sha256 over its canonical content; every head of a
comparison reads the same file, and every result carries its hash. The assignment is our own few lines of
numpy (not sklearn's splitter) so the file stays byte-identical across library versions for the same seed.
Leakage is impossible by construction: a seed's outer test folds partition the cohort, and train/val are
drawn from the complement of the test fold; `check_no_leakage` re-proves it on every load.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mil.atomic import atomic_path
from mil.errors import ConfigError, InputError, listing

SPLITS_FORMAT = "cytomil-splits/1"
SPLIT_KINDS = ("cv", "external")


@dataclass(frozen=True)
class FoldSplit:
    """One outer fold of one seed: patients to fit on, to stop early on, and to test on."""

    seed: int
    fold: int
    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]
    kind: str = "cv"

    @property
    def name(self) -> str:
        return f"seed{self.seed}_external" if self.kind == "external" else f"seed{self.seed}_fold{self.fold}"

    def to_dict(self) -> dict:
        return {
            "seed": self.seed,
            "fold": self.fold,
            "train": list(self.train),
            "val": list(self.val),
            "test": list(self.test),
        }


@dataclass(frozen=True)
class Splits:
    """Every fold of every seed for one cohort (patient id -> diagnosis), with the hash of the whole."""

    cohort: tuple[tuple[str, str], ...]
    folds: int
    seeds: tuple[int, ...]
    val_fraction: float
    splits: tuple[FoldSplit, ...]
    kind: str = "cv"
    external: tuple[tuple[str, str], ...] = ()  # sorted (key, value): (("test_where", "..."), ("train_where", "..."))

    def content(self) -> dict:
        out = {
            "format": SPLITS_FORMAT,
            "folds": self.folds,
            "seeds": list(self.seeds),
            "val_fraction": self.val_fraction,
            "cohort": [list(pair) for pair in self.cohort],
            "splits": [s.to_dict() for s in self.splits],
        }
        if self.kind != "cv":  # a k-fold file keeps the exact content (and hash) it had before external splits
            out["kind"] = self.kind
            out["external"] = dict(self.external)
        return out

    @property
    def is_external(self) -> bool:
        return self.kind == "external"

    @property
    def test_patients(self) -> list[str]:
        """Patients with an out-of-fold (cv) or external (external) prediction, in cohort order."""
        tested = {p for fs in self.splits for p in fs.test}
        return [p for p in self.patients if p in tested]

    def describe(self) -> str:
        if self.is_external:
            where = dict(self.external)
            return f"an external split (train {where['train_where']}, test {where['test_where']})"
        return f"a {self.folds}-fold split"

    @property
    def sha256(self) -> str:
        canonical = json.dumps(self.content(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(canonical.encode()).hexdigest()

    @property
    def patients(self) -> list[str]:
        return [pid for pid, _ in self.cohort]

    @property
    def diagnoses(self) -> dict[str, str]:
        return dict(self.cohort)

    def to_json(self) -> str:
        return json.dumps({**self.content(), "sha256": self.sha256}, sort_keys=True, indent=1) + "\n"


def _cohort(patients: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((str(p), str(d)) for p, d in patients.items()))


def _check_settings(seeds: int, val_fraction: float) -> None:
    if seeds < 1:
        raise ConfigError(f"seeds={seeds}: at least one seed is needed")
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction={val_fraction}: it must lie strictly between 0 and 1")


def _check_diagnoses(by_class: dict[str, list[str]], where: str) -> None:
    if len(by_class) < 2:
        found = next(iter(by_class), "none")
        raise ConfigError(
            f"{where} has a single diagnosis ({found}); a diagnosis head needs at least two. Check the patient "
            "table's diagnosis column, or add patients of another diagnosis."
        )


def _inner_val(rest: dict[str, list[str]], val_fraction: float, rng: np.random.Generator) -> list[str]:
    """Stratified inner validation patients drawn from `rest` (diagnosis -> patients); >= 1 left to train on."""
    val: list[str] = []
    for ids in rest.values():
        n_val = int(round(val_fraction * len(ids)))
        n_val = min(max(n_val, 1 if len(ids) >= 2 else 0), len(ids) - 1)  # keep >= 1 to train on
        val += [ids[i] for i in rng.permutation(len(ids))[:n_val]]
    return val


def make_splits(
    patients: dict[str, str], *, folds: int = 5, seeds: int = 3, seed: int = 0, val_fraction: float = 0.2
) -> Splits:
    """Stratified outer `folds`-fold for seeds `seed .. seed+seeds-1`; the inner val set is stratified too."""
    if folds < 2:
        raise ConfigError(f"folds={folds}: an outer k-fold needs at least 2 folds")
    _check_settings(seeds, val_fraction)
    cohort = _cohort(patients)
    by_class: dict[str, list[str]] = {}
    for pid, dx in cohort:
        by_class.setdefault(dx, []).append(pid)
    _check_diagnoses(by_class, "the cohort")
    small = [f"{dx}: {len(ids)} patient(s)" for dx, ids in sorted(by_class.items()) if len(ids) < folds]
    if small:
        raise ConfigError(
            f"stratified {folds}-fold needs at least {folds} patients per diagnosis:\n{listing(small)}\n"
            f"Use fewer folds (--folds) or remove the rare diagnosis from the patient table."
        )
    out = []
    for s in range(seed, seed + seeds):
        rng = np.random.default_rng(s)
        fold_of: dict[str, int] = {}
        offset = 0
        for dx in sorted(by_class):
            ids = [by_class[dx][i] for i in rng.permutation(len(by_class[dx]))]
            for j, pid in enumerate(ids):
                fold_of[pid] = (offset + j) % folds
            offset = (offset + len(ids)) % folds  # the next class starts where this one stopped: folds stay even
        for f in range(folds):
            test = sorted(p for p, k in fold_of.items() if k == f)
            rest = {dx: [p for p in ids if fold_of[p] != f] for dx, ids in sorted(by_class.items())}
            val_set = set(val := _inner_val(rest, val_fraction, rng))
            train = sorted(p for ids in rest.values() for p in ids if p not in val_set)
            out.append(FoldSplit(seed=s, fold=f, train=tuple(train), val=tuple(sorted(val)), test=tuple(test)))
    splits = Splits(
        cohort=cohort, folds=folds, seeds=tuple(range(seed, seed + seeds)), val_fraction=val_fraction, splits=tuple(out)
    )
    check_no_leakage(splits)
    return splits


def make_external_splits(
    train_cohort: dict[str, str],
    test_cohort: dict[str, str],
    *,
    train_where: str,
    test_where: str,
    seeds: int = 3,
    seed: int = 0,
    val_fraction: float = 0.2,
) -> Splits:
    """Per seed: train + an inner validation split drawn from `train_cohort` only; test = all of `test_cohort`.

    Model selection (early stopping) never sees a test-cohort patient; each seed's model is fitted on the whole
    training cohort (train + val) and scores every patient of the test cohort.
    """
    _check_settings(seeds, val_fraction)
    overlap = sorted(set(train_cohort) & set(test_cohort))
    if overlap:
        raise ConfigError(
            f"{len(overlap)} patient(s) match both {train_where} and {test_where}:\n{listing(overlap)}\n"
            "An external split needs disjoint cohorts: make the two conditions exclusive."
        )
    for where, group in ((train_where, train_cohort), (test_where, test_cohort)):
        if not group:
            raise ConfigError(f"no patient with a valid bag matches {where}; check the column and value")
    by_class: dict[str, list[str]] = {}
    for pid, dx in _cohort(train_cohort):
        by_class.setdefault(dx, []).append(pid)
    _check_diagnoses(by_class, f"the training cohort ({train_where})")
    unseen = sorted(set(test_cohort.values()) - set(by_class))
    if unseen:
        raise ConfigError(
            f"the test cohort ({test_where}) has diagnoses {unseen} that no training patient ({train_where}) has; "
            "a head cannot predict a diagnosis it never saw. Drop those patients or widen the training cohort."
        )
    test = tuple(sorted(test_cohort))
    out = []
    for s in range(seed, seed + seeds):
        val_set = set(_inner_val(by_class, val_fraction, np.random.default_rng(s)))
        train = tuple(sorted(p for ids in by_class.values() for p in ids if p not in val_set))
        out.append(FoldSplit(seed=s, fold=0, train=train, val=tuple(sorted(val_set)), test=test, kind="external"))
    splits = Splits(
        cohort=_cohort({**train_cohort, **test_cohort}),
        folds=1,
        seeds=tuple(range(seed, seed + seeds)),
        val_fraction=val_fraction,
        splits=tuple(out),
        kind="external",
        external=tuple(sorted({"train_where": train_where, "test_where": test_where}.items())),  # as read back
    )
    check_no_leakage(splits)
    return splits


def check_no_leakage(splits: Splits) -> None:
    """Raise when any patient sits in two of train/val/test of a fold, or the test sets are not what the kind says:
    a seed's k-fold test folds cover every patient once; an external split tests the same patients in every seed."""
    problems = []
    everyone = set(splits.patients)
    if splits.is_external:
        everyone_tested = set(splits.splits[0].test) if splits.splits else set()
    for s in splits.seeds:
        tested: list[str] = []
        for fs in (x for x in splits.splits if x.seed == s):
            tr, va, te = set(fs.train), set(fs.val), set(fs.test)
            for a, b, name in ((tr, te, "train and test"), (va, te, "val and test"), (tr, va, "train and val")):
                if a & b:
                    problems.append(f"{fs.name}: patients {sorted(a & b)[:5]} are in both {name}")
            if (tr | va | te) != everyone:
                problems.append(
                    f"{fs.name}: train+val+test is not the cohort (missing {sorted(everyone - tr - va - te)[:5]})"
                )
            tested += fs.test
        if splits.is_external:
            if set(tested) != everyone_tested:
                problems.append(f"seed {s}: the external test cohort differs from the other seeds'")
        elif sorted(tested) != sorted(everyone):
            problems.append(f"seed {s}: the test folds do not cover every patient exactly once")
    if problems:
        raise InputError(f"splits leak patients between training and test:\n{listing(problems)}")


def splits_from_dict(data: dict, where: str = "splits") -> Splits:
    if data.get("format") != SPLITS_FORMAT:
        raise InputError(f"{where} is not a {SPLITS_FORMAT} file (format {data.get('format')!r}); delete it to remake")
    kind = str(data.get("kind", "cv"))
    if kind not in SPLIT_KINDS:
        raise InputError(f"{where} has kind {kind!r}, not one of {SPLIT_KINDS}; delete it to remake the splits")
    try:
        splits = Splits(
            kind=kind,
            external=tuple(sorted((str(k), str(v)) for k, v in (data.get("external") or {}).items())),
            cohort=tuple((str(p), str(d)) for p, d in data["cohort"]),
            folds=int(data["folds"]),
            seeds=tuple(int(s) for s in data["seeds"]),
            val_fraction=float(data["val_fraction"]),
            splits=tuple(
                FoldSplit(
                    seed=int(x["seed"]),
                    fold=int(x["fold"]),
                    train=tuple(x["train"]),
                    val=tuple(x["val"]),
                    test=tuple(x["test"]),
                    kind=kind,
                )
                for x in data["splits"]
            ),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"{where} is malformed ({type(e).__name__}: {e}); delete it to remake the splits") from e
    stored = data.get("sha256")
    if stored != splits.sha256:
        raise InputError(
            f"{where}: stored sha256 {stored} does not match its content ({splits.sha256}); the file was edited "
            "or damaged. Restore it, or delete it to remake the splits (results made with the old file then differ)."
        )
    check_no_leakage(splits)
    return splits


def read_splits(path: str | Path) -> Splits:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise InputError(f"split file {path} does not exist") from e
    except json.JSONDecodeError as e:
        raise InputError(f"split file {path} is not valid JSON ({e}); delete it to remake the splits") from e
    return splits_from_dict(data, where=str(path))


def write_splits(path: str | Path, splits: Splits) -> Path:
    """Atomic write; the temporary file is re-read and its hash checked before it replaces `path`."""
    path = Path(path)
    with atomic_path(path, validate=lambda tmp: read_splits(tmp)) as tmp:
        tmp.write_text(splits.to_json(), encoding="utf-8")
    return path


def _cohort_difference(stored: Splits, cohort: tuple[tuple[str, str], ...]) -> list[str]:
    old, new = dict(stored.cohort), dict(cohort)
    diff = [f"patient {p!r} is new (not in the split file)" for p in sorted(set(new) - set(old))]
    diff += [f"patient {p!r} is gone (in the split file only)" for p in sorted(set(old) - set(new))]
    diff += [
        f"patient {p!r}: diagnosis {old[p]!r} in the split file, {new[p]!r} now"
        for p in sorted(set(old) & set(new))
        if old[p] != new[p]
    ]
    return diff


def load_or_create_splits(
    path: str | Path,
    patients: dict[str, str],
    *,
    folds: int = 5,
    seeds: int = 3,
    seed: int = 0,
    val_fraction: float = 0.2,
) -> tuple[Splits, bool]:
    """Reuse `path` when it matches this cohort and these settings, else make and write it; refuse a mismatch.

    Returns (splits, created).
    """
    path = Path(path)
    wanted = make_splits(patients, folds=folds, seeds=seeds, seed=seed, val_fraction=val_fraction)
    return _load_or_write(path, wanted)


def load_or_create_external_splits(
    path: str | Path, train_cohort: dict[str, str], test_cohort: dict[str, str], **settings
) -> tuple[Splits, bool]:
    """`load_or_create_splits` for an external split (settings as `make_external_splits`)."""
    return _load_or_write(Path(path), make_external_splits(train_cohort, test_cohort, **settings))


def _load_or_write(path: Path, wanted: Splits) -> tuple[Splits, bool]:
    folds, val_fraction = wanted.folds, wanted.val_fraction
    if not path.exists():
        write_splits(path, wanted)
        return wanted, True
    stored = read_splits(path)
    if (stored.kind, stored.external) != (wanted.kind, wanted.external):
        raise ConfigError(
            f"split file {path} holds {stored.describe()}, but this run asks for {wanted.describe()}. "
            "Write the results to a new --out folder (or delete the split file to make new splits)."
        )
    diff = _cohort_difference(stored, wanted.cohort)
    if diff:
        raise ConfigError(
            f"split file {path} was made for another cohort:\n{listing(diff, limit=20)}\n"
            "Write the results to a new --out folder, or delete the split file to make new splits "
            "(results made with the old splits are then no longer comparable)."
        )
    moved = sorted(set(stored.test_patients) ^ set(wanted.test_patients)) if wanted.is_external else []
    if moved:
        raise ConfigError(
            f"split file {path}: patients {moved[:10]} changed between the training and the test cohort. "
            "Write the results to a new --out folder, or delete the split file to make new splits."
        )
    settings = (stored.folds, stored.seeds, stored.val_fraction)
    if settings != (wanted.folds, wanted.seeds, wanted.val_fraction):
        raise ConfigError(
            f"split file {path} has folds={stored.folds}, seeds={list(stored.seeds)}, val_fraction="
            f"{stored.val_fraction}, but this run asks folds={folds}, seeds={list(wanted.seeds)}, "
            f"val_fraction={val_fraction}. Match the settings, or use a new --out folder."
        )
    return stored, False


def crossfit_plan(splits: Splits) -> list[dict]:
    """Per outer fold, the patients a cell classifier may be trained on (train + val) and those it must never see.

    A classifier that counts fold `name`'s test patients must be trained on `train_patients` only; the count
    heads check this against the training patients recorded with the classifier (mil.count.differential).
    """
    return [
        {
            "name": fs.name,
            "seed": fs.seed,
            "fold": fs.fold,
            "train_patients": sorted(fs.train + fs.val),
            "test_patients": list(fs.test),
        }
        for fs in splits.splits
    ]
