"""The typed, strict config of a comparison: unknown keys are errors; the resolved config is saved with results."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mil.errors import ConfigError, refuse_unknown_keys

CONFIG_DIR = Path(__file__).resolve().parent.parent.parent / "configs"
DEFAULT_COMPARE_CONFIG = CONFIG_DIR / "compare.yaml"
WANDB_MODES = ("disabled", "offline", "online")
COUNT_SOURCES = ("truth", "hard", "soft")
# Facts a results folder's config.yaml records beside the options (inputs, split hash, classes); reading that
# file back as --config skips them, so a run can be repeated from its own record.
RECORDED_KEYS = ("bags", "patients", "splits_sha256", "classes", "bag_provenance")


@dataclass
class CompareConfig:
    """Every knob of `mil compare`; configs/compare.yaml documents each one."""

    heads: list[str] = field(default_factory=lambda: ["count.logreg", "count.rf", "count.meta", "mean", "abmil"])
    folds: int = 5
    seeds: int = 3
    seed: int = 0
    val_fraction: float = 0.2
    counts: str = "truth"
    group_by: str | None = None
    groups: str | None = None
    cell_probs_per_fold: str | None = None
    n_boot: int = 1000
    ci_level: float = 0.95
    ece_bins: int = 10
    conformal_level: float = 0.9
    standardize: bool = True
    standardize_by: str | None = None
    train_where: str | None = None
    test_where: str | None = None
    with_internal_cv: bool = False
    covariates: list[str] = field(default_factory=list)
    allow_separating_covariates: bool = False
    count_heads: dict = field(default_factory=dict)
    attention_heads: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    devices: int = 1
    accelerator: str = "cpu"
    wandb: str = "disabled"

    def __post_init__(self) -> None:
        problems = []
        if isinstance(self.heads, str):
            self.heads = [h.strip() for h in self.heads.split(",") if h.strip()]
        from mil.covariates import parse_columns

        try:
            self.covariates = parse_columns(self.covariates)
        except ConfigError as e:
            problems.append(str(e))
        if bool(self.train_where) != bool(self.test_where):
            problems.append("an external split needs both train_where and test_where (e.g. cohort=Discovery)")
        if self.with_internal_cv and not self.external:
            problems.append("with_internal_cv needs an external split (train_where and test_where)")
        if not self.heads:
            problems.append("heads is empty; name at least one head, e.g. count.logreg,abmil")
        if len(set(self.heads)) != len(self.heads):
            problems.append(f"heads repeat: {self.heads}")
        if self.counts not in COUNT_SOURCES:
            problems.append(f"counts {self.counts!r} is not one of {COUNT_SOURCES}")
        if self.wandb not in WANDB_MODES:
            problems.append(f"wandb {self.wandb!r} is not one of {WANDB_MODES}")
        if self.cell_probs_per_fold and self.counts == "truth":
            problems.append("cell_probs_per_fold needs counts hard or soft (ground-truth counts need no classifier)")
        if not 0.5 < self.ci_level < 1.0:
            problems.append(f"ci_level {self.ci_level} must lie between 0.5 and 1")
        if not 0.5 <= self.conformal_level < 1.0:
            problems.append(f"conformal_level {self.conformal_level} must lie in [0.5, 1), e.g. 0.9 for 90% sets")
        if self.n_boot < 100:
            problems.append(f"n_boot {self.n_boot} is too few for a 95% interval; use at least 100 (1000 default)")
        if self.devices < 1:
            problems.append(f"devices {self.devices} must be >= 1")
        for key in ("count_heads", "attention_heads", "train"):
            if not isinstance(getattr(self, key), dict):
                problems.append(f"{key} must be a mapping")
        if problems:
            raise ConfigError("compare config:\n" + "\n".join(f"  - {p}" for p in problems))

    @property
    def external(self) -> bool:
        return bool(self.train_where and self.test_where)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_compare_config(path: str | Path | None = None, **overrides) -> CompareConfig:
    """Read a YAML config (default configs/compare.yaml) and apply overrides (CLI flags; None = not given)."""
    path = Path(path) if path else DEFAULT_COMPARE_CONFIG
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as e:
        raise ConfigError(f"compare config {path} does not exist; start from {DEFAULT_COMPARE_CONFIG}") from e
    if not isinstance(spec, dict):
        raise ConfigError(f"compare config {path} must be a YAML mapping of key: value")
    known = {f.name for f in dataclasses.fields(CompareConfig)}
    spec = {k: v for k, v in spec.items() if k not in RECORDED_KEYS}
    refuse_unknown_keys(spec, known, f"compare config {path}")
    spec.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return CompareConfig(**spec)
    except TypeError as e:
        raise ConfigError(f"compare config {path}: {e}") from e
