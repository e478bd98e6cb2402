"""Patient covariates (age, sex, blood counts) as a numeric matrix, fitted on training patients only.

`fit_covariates(rows, columns)` learns, from the training patients' rows of the patient table, how to encode
each named column: numeric columns are z-scored with the training mean and std; categorical ones are one-hot
over the training categories (a category first seen in new patients encodes as all zeros); a missing value is
imputed with the training mean (numeric) or left all-zero (categorical), and a 0/1 missing-indicator column is
added for every column that has a missing value among the training patients. The fitted encoder is a plain
dict (`to_dict`/`from_dict`), saved with every model, so `mil predict` encodes new patients with the training
statistics and never refits on them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from mil.errors import ConfigError, InputError, listing

MISSING = ("", "na", "nan", "none", "null", "n/a", "?")
COVARIATES_FORMAT = "cytomil-covariates/1"


def parse_columns(columns: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """'age,sex' or ['age', 'sex'] -> ['age', 'sex']; repeats are an error."""
    if not columns:
        return []
    names = [c.strip() for c in columns.split(",")] if isinstance(columns, str) else [str(c).strip() for c in columns]
    names = [c for c in names if c]
    repeated = sorted({c for c in names if names.count(c) > 1})
    if repeated:
        raise ConfigError(f"covariates repeat {repeated}; name each column once")
    return names


def _missing(value) -> bool:
    return value is None or str(value).strip().lower() in MISSING


def _number(value) -> float | None:
    try:
        x = float(str(value).strip())
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def check_columns(table_columns: list[str], columns: list[str], where: str) -> None:
    """A named covariate that the patient table lacks is an error listing the table's columns."""
    absent = [c for c in columns if c not in table_columns]
    if absent:
        raise ConfigError(
            f"covariate column(s) {absent} are not in {where}; its columns are {table_columns}. "
            "Fix --covariates (or the config key covariates)."
        )
    reserved = [c for c in columns if c in ("patient_id", "diagnosis")]
    if reserved:
        raise ConfigError(f"{reserved} cannot be a covariate: the diagnosis and the id are what is predicted")


@dataclass
class CovariateEncoder:
    """How each covariate column becomes numbers; fitted on training patients (see the module docstring)."""

    columns: list[str]
    kinds: dict[str, str] = field(default_factory=dict)  # column -> "numeric" | "categorical"
    mean: dict[str, float] = field(default_factory=dict)
    std: dict[str, float] = field(default_factory=dict)
    categories: dict[str, list[str]] = field(default_factory=dict)
    indicator: dict[str, bool] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        """One name per output column, e.g. age, sex=F, sex=M, lymph_count, lymph_count_missing."""
        out = []
        for c in self.columns:
            out += [c] if self.kinds[c] == "numeric" else [f"{c}={v}" for v in self.categories[c]]
            if self.indicator[c]:
                out.append(f"{c}_missing")
        return out

    @property
    def width(self) -> int:
        return len(self.names)

    def transform(self, rows: list[dict], *, role: str = "patients") -> np.ndarray:
        """(P, width) float64 for `rows` (patient-table rows), with the training statistics."""
        out = np.zeros((len(rows), self.width))
        problems = []
        for i, row in enumerate(rows):
            j = 0
            for c in self.columns:
                value = row.get(c)
                gone = _missing(value)
                if self.kinds[c] == "numeric":
                    x = self.mean[c] if gone else _number(value)
                    if x is None:
                        problems.append(f"{role} patient {row.get('patient_id')}: {c} = {value!r} is not a number")
                        x = self.mean[c]
                    out[i, j] = (x - self.mean[c]) / self.std[c]
                    j += 1
                else:
                    cats = self.categories[c]
                    if not gone and str(value).strip() in cats:
                        out[i, j + cats.index(str(value).strip())] = 1.0
                    j += len(cats)
                if self.indicator[c]:
                    out[i, j] = float(gone)
                    j += 1
        if problems:
            raise InputError(f"{len(problems)} covariate value(s) cannot be read:\n{listing(problems)}")
        return out

    def to_dict(self) -> dict:
        return {
            "format": COVARIATES_FORMAT,
            "columns": list(self.columns),
            "kinds": dict(self.kinds),
            "mean": dict(self.mean),
            "std": dict(self.std),
            "categories": {k: list(v) for k, v in self.categories.items()},
            "indicator": dict(self.indicator),
        }

    @classmethod
    def from_dict(cls, data: dict) -> CovariateEncoder:
        if data.get("format") != COVARIATES_FORMAT:
            raise InputError(f"not a {COVARIATES_FORMAT} record (format {data.get('format')!r})")
        return cls(
            columns=list(data["columns"]),
            kinds=dict(data["kinds"]),
            mean={k: float(v) for k, v in data["mean"].items()},
            std={k: float(v) for k, v in data["std"].items()},
            categories={k: list(v) for k, v in data["categories"].items()},
            indicator={k: bool(v) for k, v in data["indicator"].items()},
        )


def fit_covariates(rows: list[dict], columns: list[str]) -> CovariateEncoder:
    """Learn the encoding of `columns` from the training patients' `rows` only."""
    encoder = CovariateEncoder(columns=list(columns))
    problems = []
    for c in columns:
        present = [r.get(c) for r in rows if not _missing(r.get(c))]
        if not present:
            problems.append(f"{c}: no training patient has a value")
            continue
        numbers = [_number(v) for v in present]
        encoder.indicator[c] = len(present) < len(rows)
        if all(x is not None for x in numbers):
            values = np.asarray(numbers, dtype=np.float64)
            encoder.kinds[c] = "numeric"
            encoder.mean[c] = float(values.mean())
            encoder.std[c] = float(values.std()) if values.std() > 0 else 1.0
        else:
            encoder.kinds[c] = "categorical"
            encoder.categories[c] = sorted({str(v).strip() for v in present})
    if problems:
        raise InputError(f"covariates cannot be fitted:\n{listing(problems)}")
    return encoder


def perfect_separators(rows: list[dict], columns: list[str], diagnoses: list[str]) -> list[str]:
    """Covariates that on their own separate the training diagnoses perfectly (a likely leak of the label).

    Numeric: every diagnosis occupies its own interval of values, no two overlapping. Categorical: every
    category holds one diagnosis only, and at least two diagnoses are told apart. Missing values are ignored.
    """
    found = []
    for c in columns:
        pairs = [(r.get(c), dx) for r, dx in zip(rows, diagnoses) if not _missing(r.get(c))]
        if len({dx for _, dx in pairs}) < 2:
            continue
        numbers = [_number(v) for v, _ in pairs]
        if all(x is not None for x in numbers):
            spans = {}
            for x, (_, dx) in zip(numbers, pairs):
                lo, hi = spans.get(dx, (x, x))
                spans[dx] = (min(lo, x), max(hi, x))
            ordered = sorted(spans.values())
            if all(a[1] < b[0] for a, b in zip(ordered, ordered[1:])):
                found.append(f"{c} (each diagnosis in its own range: {_ranges(spans)})")
        else:
            by_value: dict[str, set] = {}
            for v, dx in pairs:
                by_value.setdefault(str(v).strip(), set()).add(dx)
            if all(len(d) == 1 for d in by_value.values()):
                found.append(f"{c} (each value names one diagnosis: {dict(sorted(by_value.items()))})")
    return found


def _ranges(spans: dict) -> str:
    return ", ".join(f"{dx} {lo:g}..{hi:g}" for dx, (lo, hi) in sorted(spans.items(), key=lambda kv: kv[1]))


def refuse_leaks(rows: list[dict], columns: list[str], diagnoses: list[str], *, allow: bool, where: str) -> None:
    """ConfigError for covariates that restate the diagnosis, unless `allow` (--allow-separating-covariates)."""
    found = perfect_separators(rows, columns, diagnoses)
    if found and not allow:
        raise ConfigError(
            f"covariate(s) separate the diagnoses of {where} perfectly on their own, which usually means they "
            f"restate the diagnosis (a subtype column, a diagnosis code):\n{listing(found)}\n"
            "Drop them from --covariates, or pass --allow-separating-covariates if the column is a real covariate."
        )
