"""Feature standardisation for attention heads: fold statistics (robust to one extreme bag), and optional
per-patient or per-group (e.g. per-centre) z-scoring against stain and scanner shift.

`standardize` (default on) z-scores every cell with the mean and std of the fold's training cells. A bag whose
feature scale is far from the others' (a broken encoder run, a bag of another encoder that slipped through) is
left out of those statistics with a warning, so one bad bag cannot collapse every other patient's features.

`standardize_by` (default off) first z-scores each patient's cells with statistics of a group of cells:
  patient   the patient's own cells (removes any per-slide offset, and with it patient-level level shifts)
  COLUMN    the cells of all patients sharing this patient-table value (e.g. `centre`): each centre is brought
            to zero mean and unit variance. The statistics use the group's unlabelled cells only, never a
            diagnosis; for a new centre `mil predict` computes them on that centre's cells (the one statistic that
            is, by design, fitted on new patients).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from mil.errors import ConfigError

OUTLIER_RATIO = 100.0  # a bag whose RMS feature is 100x the median bag's is left out of the fold statistics
CONSTANT = 1e-6  # a feature whose std is at most this is constant here: it is centred, not scaled


def safe_scale(std: np.ndarray) -> np.ndarray:
    """std + 1e-6, but 1 for a constant feature. Dividing a feature that is constant in the fitting cells by ~1e-6
    would blow up every other cell's tiny deviation a millionfold (as scikit-learn's StandardScaler, scale 1)."""
    return np.where(std > CONSTANT, std + CONSTANT, 1.0)


def _bag_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return x.mean(axis=0), safe_scale(x.std(axis=0))


def fold_statistics(arrays: list[np.ndarray], log=print) -> tuple[np.ndarray, np.ndarray]:
    """(shift, scale) over the cells of `arrays` (training bags), leaving out bags of an extreme scale."""
    rms = np.array([float(np.sqrt(np.mean(np.square(a)))) if a.size else 0.0 for a in arrays])
    typical = float(np.median(rms)) if len(rms) else 0.0
    keep = [i for i, r in enumerate(rms) if typical == 0 or r <= OUTLIER_RATIO * typical]
    if len(keep) < len(arrays):
        log(
            f"warning: {len(arrays) - len(keep)} training bag(s) have features over {OUTLIER_RATIO:g}x the typical "
            f"scale (RMS {max(rms):.3g} vs median {typical:.3g}) and are left out of the standardisation statistics; "
            "check them with `mil verify`"
        )
    cells = np.concatenate([arrays[i] for i in keep])
    return cells.mean(axis=0), safe_scale(cells.std(axis=0))


def group_of(table: dict[str, dict], column: str) -> dict[str, str]:
    """patient -> value of `column`; a patient without a value is an error (its group is unknown)."""
    missing = sorted(p for p, row in table.items() if not str(row.get(column, "")).strip())
    if missing:
        raise ConfigError(
            f"standardize_by {column!r}: patients {missing[:10]} have no {column} value; fill it in the patient table"
        )
    return {p: str(row[column]).strip() for p, row in table.items()}


def feature_normaliser(by: str | None, loaded: dict, table: dict[str, dict]) -> Callable[[str], np.ndarray]:
    """patient -> its cells (N, D) float64 after `standardize_by` (identity when it is None); cached."""
    raw = {p: np.asarray(bag.features, dtype=np.float64) for p, bag in loaded.items()}
    if by is None:
        return raw.__getitem__
    if by == "patient":
        out = {}
        for p, x in raw.items():
            mean, std = _bag_stats(x)
            out[p] = (x - mean) / std
        return out.__getitem__
    columns = list(next(iter(table.values()), {}))
    if by not in columns:
        raise ConfigError(f"standardize_by {by!r} is neither 'patient' nor a patient-table column ({columns})")
    group = group_of({p: table[p] for p in raw}, by)
    stats = {}
    for g in sorted(set(group.values())):
        stats[g] = _bag_stats(np.concatenate([raw[p] for p in raw if group[p] == g]))
    return {p: (x - stats[group[p]][0]) / stats[group[p]][1] for p, x in raw.items()}.__getitem__
