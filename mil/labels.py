"""Label maps: raw annotation labels -> the training classes (PRODUCT.md 2.2)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mil.errors import ConfigError, InputError, listing, refuse_unknown_keys

DROP = "drop"
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_LABEL_MAP = CONFIG_DIR / "label_map.yaml"
# Cell-table labels that are no class: unlabelled cells and cells the label map drops.
IGNORED_LABELS = ("", DROP)


def classes_of(rows: list[dict]) -> list[str]:
    """The sorted class names present among labelled rows; sorted so the index does not depend on row order."""
    return sorted({r.get("label", "") for r in rows} - set(IGNORED_LABELS))


def normalize_label(raw: str) -> str:
    """Case, spaces and hyphens do not make a new label: 'Segmented Neutrophil' == 'segmented_neutrophil'."""
    return re.sub(r"[\s\-]+", "_", str(raw).strip()).lower()


@dataclass(frozen=True)
class LabelMap:
    """Ordered training classes, the raw->class map, and named groups of classes."""

    name: str
    classes: tuple[str, ...]
    mapping: dict[str, str] = field(default_factory=dict)
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(set(self.classes)) != len(self.classes):
            raise ConfigError(f"label map {self.name!r}: class names repeat in `classes`")
        bad = sorted({c for c in self.mapping.values() if c != DROP and c not in self.classes})
        bad += sorted({c for g in self.groups.values() for c in g if c not in self.classes})
        if bad:
            raise ConfigError(f"label map {self.name!r} maps to names that are not classes: {bad}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def index(self, class_name: str) -> int:
        return self.classes.index(class_name)

    def lookup(self, raw: str) -> str | None:
        """Class of a raw label (or 'drop'); None when the map does not know it."""
        key = normalize_label(raw)
        if key in self.classes:
            return key
        return self.mapping.get(key)

    def apply(self, raw_labels: list[str], where: list[str] | None = None) -> list[str]:
        """Map every raw label; an empty raw label stays empty (an unlabelled cell).

        Raises one InputError listing *every* unknown label with its row, never the first one only.
        """
        out, problems = [], []
        for i, raw in enumerate(raw_labels):
            if raw is None or str(raw).strip() == "":
                out.append("")
                continue
            cls = self.lookup(raw)
            if cls is None:
                loc = where[i] if where else f"row {i}"
                problems.append(f"{loc}: label {raw!r}")
                out.append("")
            else:
                out.append(cls)
        if problems:
            raise InputError(
                f"{len(problems)} label(s) are not in label map {self.name!r}:\n{listing(problems)}\n"
                "Fix the labels, or pass --label-map FILE with a map that names them "
                f"(see {DEFAULT_LABEL_MAP} for the layout; map a label to 'drop' to keep but ignore it)."
            )
        return out

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "classes": list(self.classes),
            "map": dict(self.mapping),
            "groups": {k: list(v) for k, v in self.groups.items()},
        }


def load_label_map(path: str | Path | None = None) -> LabelMap:
    """Read a label map YAML (default: configs/label_map.yaml)."""
    path = Path(path) if path else DEFAULT_LABEL_MAP
    try:
        spec = yaml.safe_load(path.read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"label map {path} does not exist; pass an existing YAML file to --label-map") from e
    refuse_unknown_keys(spec, ("name", "classes", "map", "groups"), f"label map {path}")
    if not spec.get("classes"):
        raise ConfigError(f"label map {path} has no `classes` list")
    return LabelMap(
        name=spec.get("name", path.stem),
        classes=tuple(normalize_label(c) for c in spec["classes"]),
        mapping={normalize_label(k): (normalize_label(v)) for k, v in (spec.get("map") or {}).items()},
        groups={k: tuple(normalize_label(c) for c in v) for k, v in (spec.get("groups") or {}).items()},
    )


def identity_label_map(raw_labels: list[str], name: str = "as-found") -> LabelMap:
    """A map that keeps a dataset's own labels (for BCCD's RBC/WBC/Platelets, PBC's 8 classes, ...).

    Labels keep their spelling; the classes are sorted so the index does not depend on row order.
    """
    classes = tuple(sorted({str(r).strip() for r in raw_labels if r is not None and str(r).strip()}))
    return _IdentityLabelMap(name=name, classes=classes)


class _IdentityLabelMap(LabelMap):
    def lookup(self, raw: str) -> str | None:
        raw = str(raw).strip()
        return raw if raw in self.classes else None
