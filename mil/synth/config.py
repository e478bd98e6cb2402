"""The synthetic cohort's config: a strict dataclass loaded from YAML (configs/synth.yaml).

Unknown keys are errors that list the valid ones, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mil.errors import ConfigError, refuse_unknown_keys
from mil.labels import CONFIG_DIR, load_label_map
from mil.synth.centres import MAX_CENTRES, CentreConfig, centre_from_dict, centre_names
from mil.synth.covariates import CovariateConfig, covariate_from_dict

DEFAULT_SYNTH_CONFIG = CONFIG_DIR / "synth.yaml"


@dataclass(frozen=True, kw_only=True)
class DiagnosisConfig:
    """One diagnosis: its share of the patients and the leukemic cells it adds to the background marrow."""

    name: str
    proportion: float
    ncit_concept_code: str
    subtypes: tuple[str, ...]
    composition: dict[str, float]

    def to_dict(self) -> dict:
        return {
            "proportion": self.proportion,
            "ncit_concept_code": self.ncit_concept_code,
            "subtypes": list(self.subtypes),
            "composition": dict(self.composition),
        }


@dataclass(frozen=True, kw_only=True)
class SynthConfig:
    """Every knob of `mil synth`. See configs/synth.yaml for what each one means and its default."""

    patients: int = 30
    fields_per_patient: int = 4
    cells_per_field: int = 42
    field_width: int = 512
    field_height: int = 512
    erythrocyte_density: float = 0.55
    labelled_erythrocytes_per_field: int = 1
    unlabelled_fraction: float = 0.0
    overlap: float = 0.2
    patient_concentration: float = 150.0
    label_noise: float = 0.0
    session_disagreement: float = 0.05
    cue: bool = True
    cue_diagnosis: str = "AML"
    cue_classes: tuple[str, ...] = ("myeloblast", "monoblast")
    cue_fraction: float = 0.3
    stain_variation: float = 1.0
    age_range: tuple[int, int] = (1, 18)
    background: dict[str, float] = field(default_factory=dict)
    diagnoses: tuple[DiagnosisConfig, ...] = ()
    centres: int = 1
    stain_shift: float = 1.0
    centre_settings: tuple[CentreConfig, ...] = ()
    covariate_strength: float = 0.0
    covariate_missing: float = 0.0
    age_effect: dict[str, float] = field(default_factory=dict)
    covariates: tuple[CovariateConfig, ...] = ()

    def __post_init__(self) -> None:
        problems = []
        for name in ("patients", "fields_per_patient", "cells_per_field"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.field_width < 192 or self.field_height < 192:
            problems.append(f"field size must be at least 192x192 (got {self.field_width}x{self.field_height})")
        for name in ("overlap", "label_noise", "session_disagreement", "cue_fraction", "unlabelled_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                problems.append(f"{name} must lie in [0, 1] (got {value})")
        if self.patient_concentration <= 0:
            problems.append(f"patient_concentration must be > 0 (got {self.patient_concentration})")
        if self.stain_variation < 0:
            problems.append(f"stain_variation must be >= 0 (got {self.stain_variation})")
        if self.erythrocyte_density < 0 or self.labelled_erythrocytes_per_field < 0:
            problems.append("erythrocyte_density and labelled_erythrocytes_per_field must be >= 0")
        if not self.diagnoses:
            problems.append("`diagnoses` is empty; name at least one diagnosis with its composition")
        if self.age_range[0] > self.age_range[1]:
            problems.append(f"age_range must be [low, high] with low <= high (got {list(self.age_range)})")
        classes = set(load_label_map().classes) - {"erythrocyte"}
        where = [("background", self.background)] + [
            (f"diagnoses.{d.name}.composition", d.composition) for d in self.diagnoses
        ]
        for place, comp in where:
            unknown = sorted(set(comp) - classes)
            if unknown:
                problems.append(
                    f"{place} names {unknown}, which are not nucleated classes of configs/label_map.yaml "
                    f"(erythrocytes are set by erythrocyte_density); valid: {sorted(classes)}"
                )
            if any(w < 0 for w in comp.values()):
                problems.append(f"{place} has a negative weight")
        names = [d.name for d in self.diagnoses]
        if self.cue and self.cue_diagnosis not in names:
            problems.append(f"cue_diagnosis {self.cue_diagnosis!r} is not one of the diagnoses {names}")
        bad_cue = sorted(set(self.cue_classes) - classes)
        if bad_cue:
            problems.append(f"cue_classes {bad_cue} are not nucleated classes")
        if self.diagnoses and sum(d.proportion for d in self.diagnoses) <= 0:
            problems.append("the diagnoses' proportions sum to 0")
        problems += self._centre_and_covariate_problems(names)
        if problems:
            raise ConfigError(
                "synth config is invalid:\n"
                + "\n".join(f"  - {p}" for p in problems)
                + f"\nFix them in the YAML config (documented in {DEFAULT_SYNTH_CONFIG}) or the matching --option."
            )

    def _centre_and_covariate_problems(self, diagnoses: list[str]) -> list[str]:
        problems = []
        if not 1 <= self.centres <= MAX_CENTRES:
            problems.append(f"centres must lie in [1, {MAX_CENTRES}] (got {self.centres})")
        if self.stain_shift < 0:
            problems.append(f"stain_shift must be >= 0 (got {self.stain_shift})")
        names = centre_names(max(1, min(self.centres, MAX_CENTRES)))
        for c in self.centre_settings:
            if c.name not in names:
                problems.append(
                    f"centre_settings names centre {c.name!r}, but the cohort has centres {list(names)}; "
                    f"raise `centres` (--centres) or remove it"
                )
            problems += c.problems(diagnoses)
        if self.covariate_strength < 0:
            problems.append(f"covariate_strength must be >= 0 (got {self.covariate_strength})")
        if not 0.0 <= self.covariate_missing <= 1.0:
            problems.append(f"covariate_missing must lie in [0, 1] (got {self.covariate_missing})")
        columns = [c.name for c in self.covariates]
        fixed = {"patient_id", "age", "ncit_concept_code", "leukemia_type", "leukemia_subtype", "centre"}
        taken = sorted(set(columns) & fixed)
        if taken:
            problems.append(f"covariates {taken} would overwrite a column of clinical.csv; rename them")
        numeric = [c.name for c in self.covariates if c.kind in ("lognormal", "normal")]
        for c in self.covariates:
            problems += c.problems(numeric)
        return problems

    def only_diagnoses(self, names: list[str] | tuple[str, ...]) -> SynthConfig:
        """The same cohort with only the named diagnoses (e.g. AML and ALL for a binary task).

        Their proportions keep their ratios; covariate effects, age effects and per-centre proportions of the
        dropped diagnoses go with them, and the Auer-rod cue goes if its diagnosis is dropped.
        """
        known = [d.name for d in self.diagnoses]
        unknown = [n for n in names if n not in known]
        if unknown or not names:
            raise ConfigError(f"--diagnoses {list(names)}: {unknown or 'none'} not in the config's diagnoses {known}")
        keep = set(names)

        def only(mapping):
            return {k: v for k, v in mapping.items() if k in keep}

        centres = tuple(
            c if c.proportions is None else dataclasses.replace(c, proportions=only(c.proportions))
            for c in self.centre_settings
        )
        return dataclasses.replace(
            self,
            diagnoses=tuple(d for d in self.diagnoses if d.name in keep),
            cue=self.cue and self.cue_diagnosis in keep,
            age_effect=only(self.age_effect),
            covariates=tuple(dataclasses.replace(c, effect=only(c.effect)) for c in self.covariates),
            centre_settings=centres,
        )

    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("diagnoses", "centre_settings", "covariates"):
                value = {d.name: d.to_dict() for d in value}
            elif isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, dict):
                value = dict(value)
            out[f.name] = value
        return out

    def replace(self, **changes: Any) -> SynthConfig:
        """A copy with some knobs changed (None values are ignored, so CLI options can be passed as they are)."""
        changes = {k: v for k, v in changes.items() if v is not None}
        valid = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - valid)
        if unknown:
            raise ConfigError(f"unknown synth option(s) {unknown}; valid: {sorted(valid)}")
        return dataclasses.replace(self, **changes)


_DIAGNOSIS_KEYS = ("proportion", "ncit_concept_code", "subtypes", "composition")


def _diagnosis(name: str, spec: Any, source: str) -> DiagnosisConfig:
    if not isinstance(spec, dict):
        raise ConfigError(f"{source}: diagnoses.{name} must be a mapping with keys {list(_DIAGNOSIS_KEYS)}")
    refuse_unknown_keys(spec, _DIAGNOSIS_KEYS, f"{source} diagnoses.{name}")
    return DiagnosisConfig(
        name=str(name),
        proportion=float(spec.get("proportion", 1.0)),
        ncit_concept_code=str(spec.get("ncit_concept_code", "")),
        subtypes=tuple(str(s) for s in spec.get("subtypes") or ()),
        composition={str(k): float(v) for k, v in (spec.get("composition") or {}).items()},
    )


def _mapping(value: Any, key: str, source: str):
    if value is None:
        return []
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: {key} must be a mapping of names to settings (got {type(value).__name__})")
    return list(value.items())


def config_from_dict(spec: dict, source: str = "synth config") -> SynthConfig:
    """Build a SynthConfig from a parsed YAML mapping; unknown keys raise ConfigError naming them."""
    if not isinstance(spec, dict):
        raise ConfigError(f"{source}: expected a mapping of knobs at the top level")
    valid = {f.name: f for f in dataclasses.fields(SynthConfig)}
    refuse_unknown_keys(spec, valid, source)
    kwargs: dict[str, Any] = {}
    for key, value in spec.items():
        if key == "diagnoses":
            kwargs[key] = tuple(_diagnosis(name, d, source) for name, d in (value or {}).items())
        elif key == "centre_settings":
            kwargs[key] = tuple(centre_from_dict(str(name), c, source) for name, c in _mapping(value, key, source))
        elif key == "covariates":
            kwargs[key] = tuple(covariate_from_dict(str(name), c, source) for name, c in _mapping(value, key, source))
        elif key in ("background", "age_effect"):
            kwargs[key] = {str(k): float(v) for k, v in (value or {}).items()}
        elif key in ("cue_classes",):
            kwargs[key] = tuple(str(v) for v in value)
        elif key == "age_range":
            kwargs[key] = (int(value[0]), int(value[1]))
        elif key == "cue":
            kwargs[key] = bool(value)
        else:
            default = valid[key].default
            try:
                kwargs[key] = type(default)(value)
            except (TypeError, ValueError) as e:
                raise ConfigError(f"{source}: {key} = {value!r} is not a {type(default).__name__}") from e
    return SynthConfig(**kwargs)


def load_synth_config(path: str | Path | None = None) -> SynthConfig:
    """Read a synth YAML config (default: configs/synth.yaml)."""
    path = Path(path) if path else DEFAULT_SYNTH_CONFIG
    try:
        spec = yaml.safe_load(path.read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"synth config {path} does not exist; pass an existing YAML file to --config") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"synth config {path} is not valid YAML: {e}") from e
    return config_from_dict(spec or {}, source=str(path))
