"""Patient covariates of a synthetic cohort: sex and blood counts whose dependence on the diagnosis is set by
`covariate_strength`, and a `covariate_missing` share of blank values.

Each covariate has a base distribution and, per diagnosis, an `effect`: the shift of that diagnosis's mean in
standard deviations of the covariate's latent normal variable (log scale for `lognormal`, logit of the share
for `share`) at covariate_strength 1; the shift is strength * effect. A categorical covariate's effect is a
logit shift per level. Values depend on the diagnosis only, never on the cells drawn: given the diagnosis a
covariate is independent noise, so it carries diagnostic information that the cells do not.

Randomness comes from its own stream per patient (SeedSequence([seed, index, COVARIATE_STREAM])), so the
cells and images of a patient do not change with any covariate knob, and the latent draws are shared across
strengths: raising the strength moves every patient's value, it does not redraw it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mil.errors import ConfigError, refuse_unknown_keys

COVARIATE_STREAM = 0xC0FA
KINDS = {
    "lognormal": ("median", "sd"),
    "normal": ("mean", "sd"),
    "share": ("of", "mean", "sd"),
    "categorical": ("levels",),
}
OPTIONAL = ("effect", "decimals", "min", "max")


@dataclass(frozen=True, kw_only=True)
class CovariateConfig:
    """One covariate column of clinical.csv (see configs/synth.yaml, `covariates`)."""

    name: str
    kind: str
    median: float = 0.0  # lognormal: median of the value
    mean: float = 0.0  # normal: mean; share: mean share of `of` (0 < mean < 1)
    sd: float = 1.0  # SD of the latent normal (log scale, logit scale or the value itself)
    of: str = ""  # share: the covariate this one is a share of
    levels: dict[str, float] = field(default_factory=dict)  # categorical: level -> base probability
    effect: dict[str, Any] = field(default_factory=dict)  # diagnosis -> SDs (or level -> logit shift)
    decimals: int = 1
    min: float | None = None
    max: float | None = None

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"kind": self.kind}
        for key in KINDS[self.kind]:
            value = getattr(self, key)
            out[key] = dict(value) if isinstance(value, dict) else value
        if self.kind != "categorical":
            out["decimals"] = self.decimals
            out.update({k: getattr(self, k) for k in ("min", "max") if getattr(self, k) is not None})
        out["effect"] = {d: dict(e) if isinstance(e, dict) else e for d, e in self.effect.items()}
        return out

    def problems(self, numeric: list[str]) -> list[str]:
        # effects of diagnoses the cohort lacks are ignored: one table serves every subset (e.g. AML vs ALL)
        where, out = f"covariates.{self.name}", []
        if self.kind == "categorical":
            if len(self.levels) < 2 or any(p <= 0 for p in self.levels.values()):
                out.append(f"{where}.levels must give at least 2 levels, each with a probability > 0")
            for d, shifts in self.effect.items():
                if not isinstance(shifts, dict) or set(shifts) - set(self.levels):
                    out.append(f"{where}.effect.{d} must map levels of {sorted(self.levels)} to logit shifts")
            return out
        if self.sd <= 0:
            out.append(f"{where}.sd must be > 0 (got {self.sd})")
        if self.kind == "lognormal" and self.median <= 0:
            out.append(f"{where}.median must be > 0 (got {self.median})")
        if self.kind == "share":
            if not 0 < self.mean < 1:
                out.append(f"{where}.mean is a share and must lie in (0, 1) (got {self.mean})")
            if self.of not in numeric:
                out.append(f"{where}.of = {self.of!r} must name a lognormal or normal covariate; valid: {numeric}")
        if any(isinstance(e, dict) for e in self.effect.values()):
            out.append(f"{where}.effect must map each diagnosis to a number (SDs at covariate_strength 1)")
        return out


def covariate_from_dict(name: str, spec: Any, source: str) -> CovariateConfig:
    if not isinstance(spec, dict) or spec.get("kind") not in KINDS:
        raise ConfigError(f"{source}: covariates.{name} must be a mapping with `kind` one of {sorted(KINDS)}")
    kind = spec["kind"]
    refuse_unknown_keys(spec, ("kind", *KINDS[kind], *OPTIONAL), f"{source} covariates.{name} ({kind})")
    missing = [k for k in KINDS[kind] if k not in spec]
    if missing:
        raise ConfigError(f"{source}: covariates.{name} ({kind}) needs {missing}")
    kwargs: dict[str, Any] = {"name": str(name), "kind": kind}
    try:
        for key in ("median", "mean", "sd", "min", "max"):
            if key in spec and spec[key] is not None:
                kwargs[key] = float(spec[key])
        if "decimals" in spec:
            kwargs["decimals"] = int(spec["decimals"])
        if kind == "share":
            kwargs["of"] = str(spec["of"])
        if kind == "categorical":
            kwargs["levels"] = {str(k): float(v) for k, v in spec["levels"].items()}
            kwargs["effect"] = {
                str(d): {str(k): float(v) for k, v in (e or {}).items()} for d, e in (spec.get("effect") or {}).items()
            }
        else:
            kwargs["effect"] = {str(d): float(e) for d, e in (spec.get("effect") or {}).items()}
    except (TypeError, ValueError, AttributeError) as e:
        raise ConfigError(f"{source}: covariates.{name} has a value of the wrong type ({e})") from e
    return CovariateConfig(**kwargs)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _clip(value: float, spec: CovariateConfig) -> float:
    if spec.min is not None:
        value = max(value, spec.min)
    if spec.max is not None:
        value = min(value, spec.max)
    return value


def shifted_age(
    draw: int, diagnosis: str, age_range: tuple[int, int], effect: dict[str, float], strength: float
) -> int:
    """The patient's age: its uniform draw moved by strength * effect SDs of the age range, kept inside it."""
    lo, hi = age_range
    shift = strength * effect.get(diagnosis, 0.0) * (hi - lo + 1) / math.sqrt(12.0)
    return int(min(max(round(draw + shift), lo), hi)) if shift else int(draw)


def draw_covariates(
    covariates: tuple[CovariateConfig, ...],
    *,
    seed: int,
    index: int,
    diagnosis: str,
    strength: float,
    missing: float,
    age: int,
) -> dict[str, str]:
    """`age` and every covariate of one patient as the strings clinical.csv holds ('' = missing)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(index), COVARIATE_STREAM]))
    # one draw per covariate in config order, then the values: shares after the counts they are shares of
    draws = {spec.name: rng.random() if spec.kind == "categorical" else rng.standard_normal() for spec in covariates}
    values: dict[str, float] = {}
    out: dict[str, str] = {"age": str(age)}
    for spec in sorted(covariates, key=lambda c: c.kind == "share"):
        if spec.kind == "categorical":
            levels = list(spec.levels)
            shifts = spec.effect.get(diagnosis, {})
            logits = np.array([math.log(spec.levels[k]) + strength * shifts.get(k, 0.0) for k in levels])
            p = np.exp(logits - logits.max())
            cdf = np.cumsum(p / p.sum())
            values[spec.name] = min(int(np.searchsorted(cdf, draws[spec.name], side="right")), len(levels) - 1)
            continue
        z = draws[spec.name] + strength * spec.effect.get(diagnosis, 0.0)
        if spec.kind == "lognormal":
            value = spec.median * math.exp(spec.sd * z)
        elif spec.kind == "normal":
            value = spec.mean + spec.sd * z
        else:  # share of another covariate
            value = values[spec.of] * _sigmoid(math.log(spec.mean / (1 - spec.mean)) + spec.sd * z)
        # a share is taken of the value as written, so a lymphocyte count never exceeds the written wbc_count
        values[spec.name] = round(_clip(value, spec), max(spec.decimals, 0))
    for spec in covariates:  # columns in config order
        v = values[spec.name]
        out[spec.name] = list(spec.levels)[v] if spec.kind == "categorical" else f"{v:.{max(spec.decimals, 0)}f}"
    # missingness last, from the same stream: blanking never changes the other values
    for name in out:
        if rng.random() < missing:
            out[name] = ""
    return out
