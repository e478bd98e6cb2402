"""Centres of a synthetic cohort: which patients each one has, with which diagnoses, cells and labels.

Centres are named A, B, C, ... and hold consecutive patients (A's first). Each gets its share of the patients
(largest remainder) and, within it, exactly proportional diagnoses from its own proportions, shuffled. With
one centre the assignment is exactly that of a single-site cohort of the same seed.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any

import numpy as np

from mil.errors import ConfigError, refuse_unknown_keys

CENTRE_KEYS = ("share", "stain_shift", "cells_per_patient_scale", "unlabelled_fraction", "proportions", "jpeg_quality")
MAX_CENTRES = len(string.ascii_uppercase)


def centre_names(n: int) -> tuple[str, ...]:
    return tuple(string.ascii_uppercase[:n])


@dataclass(frozen=True, kw_only=True)
class CentreConfig:
    """Overrides for one centre (configs/synth.yaml, `centre_settings`); None = the cohort-wide value."""

    name: str
    share: float = 1.0
    stain_shift: float | None = None
    cells_per_patient_scale: float = 1.0
    unlabelled_fraction: float | None = None
    proportions: dict[str, float] | None = None
    jpeg_quality: int = 0

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"share": self.share, "cells_per_patient_scale": self.cells_per_patient_scale}
        for key in ("stain_shift", "unlabelled_fraction"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.proportions is not None:
            out["proportions"] = dict(self.proportions)
        if self.jpeg_quality:
            out["jpeg_quality"] = self.jpeg_quality
        return out

    def problems(self, diagnoses: list[str]) -> list[str]:
        where, out = f"centre_settings.{self.name}", []
        if self.share < 0:
            out.append(f"{where}.share must be >= 0 (got {self.share})")
        if self.stain_shift is not None and self.stain_shift < 0:
            out.append(f"{where}.stain_shift must be >= 0 (got {self.stain_shift})")
        if self.cells_per_patient_scale <= 0:
            out.append(f"{where}.cells_per_patient_scale must be > 0 (got {self.cells_per_patient_scale})")
        if not 0 <= self.jpeg_quality <= 95:
            out.append(f"{where}.jpeg_quality must lie in [1, 95], or 0 for lossless (got {self.jpeg_quality})")
        if self.unlabelled_fraction is not None and not 0 <= self.unlabelled_fraction <= 1:
            out.append(f"{where}.unlabelled_fraction must lie in [0, 1] (got {self.unlabelled_fraction})")
        if self.proportions is not None:
            unknown = sorted(set(self.proportions) - set(diagnoses))
            if unknown:
                out.append(f"{where}.proportions names {unknown}, which are not diagnoses {diagnoses}")
            if any(v < 0 for v in self.proportions.values()) or sum(self.proportions.values()) <= 0:
                out.append(f"{where}.proportions must be >= 0 and not all 0 (diagnoses left out get 0)")
        return out


def centre_from_dict(name: str, spec: Any, source: str) -> CentreConfig:
    if not isinstance(spec, dict):
        raise ConfigError(f"{source}: centre_settings.{name} must be a mapping with keys {list(CENTRE_KEYS)}")
    refuse_unknown_keys(spec, CENTRE_KEYS, f"{source} centre_settings.{name}")
    try:
        kwargs: dict[str, Any] = {"name": str(name)}
        for key in ("share", "stain_shift", "cells_per_patient_scale", "unlabelled_fraction"):
            if spec.get(key) is not None:
                kwargs[key] = float(spec[key])
        if spec.get("jpeg_quality") is not None:
            kwargs["jpeg_quality"] = int(spec["jpeg_quality"])
        if spec.get("proportions") is not None:
            kwargs["proportions"] = {str(k): float(v) for k, v in spec["proportions"].items()}
    except (TypeError, ValueError, AttributeError) as e:
        raise ConfigError(f"{source}: centre_settings.{name} has a value of the wrong type ({e})") from e
    return CentreConfig(**kwargs)


@dataclass(frozen=True, kw_only=True)
class Centre:
    """A centre as the generator uses it: every setting resolved."""

    index: int
    name: str
    patients: int
    stain_shift: float
    fields_per_patient: int
    unlabelled_fraction: float
    proportions: tuple[float, ...]  # one per diagnosis of the config, in its order
    jpeg_quality: int = 0


def largest_remainder(weights: list[float] | np.ndarray, total: int) -> np.ndarray:
    """Integer counts summing to `total`, proportional to `weights` (ties go to the earlier entry)."""
    share = np.asarray(weights, dtype=np.float64)
    share = share / share.sum() * total
    counts = np.floor(share).astype(int)
    for i in np.argsort(-(share - counts), kind="stable")[: total - counts.sum()]:
        counts[i] += 1
    return counts


def resolve_centres(config) -> list[Centre]:
    """Every centre of `config` (a SynthConfig) with its patients and resolved settings."""
    settings = {c.name: c for c in config.centre_settings}
    names = centre_names(config.centres)
    specs = [settings.get(n) for n in names]
    shares = [s.share if s else 1.0 for s in specs]
    if sum(shares) <= 0:
        raise ConfigError("centre_settings: every centre has share 0; give at least one centre a share > 0")
    counts = largest_remainder(shares, config.patients)
    centres = []
    for i, (name, spec, n) in enumerate(zip(names, specs, counts)):
        default_shift = 0.0 if i == 0 else config.stain_shift
        proportions = tuple(d.proportion for d in config.diagnoses)
        if spec and spec.proportions is not None:
            proportions = tuple(spec.proportions.get(d.name, 0.0) for d in config.diagnoses)
        scale = spec.cells_per_patient_scale if spec else 1.0
        centres.append(
            Centre(
                index=i,
                name=name,
                patients=int(n),
                stain_shift=default_shift if spec is None or spec.stain_shift is None else spec.stain_shift,
                fields_per_patient=max(1, int(round(config.fields_per_patient * scale))),
                unlabelled_fraction=(
                    config.unlabelled_fraction
                    if spec is None or spec.unlabelled_fraction is None
                    else spec.unlabelled_fraction
                ),
                proportions=proportions,
                jpeg_quality=spec.jpeg_quality if spec else 0,
            )
        )
    return centres


def assign_patients(config, rng: np.random.Generator) -> list[tuple[Centre, str]]:
    """(centre, diagnosis) of every patient in index order; one rng shuffles each centre's diagnoses in turn."""
    out: list[tuple[Centre, str]] = []
    names = [d.name for d in config.diagnoses]
    for centre in resolve_centres(config):
        if centre.patients == 0:
            continue
        counts = largest_remainder(centre.proportions, centre.patients)
        diagnoses = [name for name, n in zip(names, counts) for _ in range(n)]
        out += [(centre, diagnoses[i]) for i in rng.permutation(len(diagnoses))]
    return out
