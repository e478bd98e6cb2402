"""A folder of bags: its manifest (which encoder and preprocessing it holds), the directory view training and
verify read (valid patients, consistency of encoders, integrity faults), and the width check made before any
compute. One bag's format, writer and readers are in `features.bags`."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from features.bags import (
    BAG_SUFFIX,
    MANIFEST_NAME,
    SCHEMA_VERSION,
    Bag,
    bag_path,
    canonical_json,
    config_dict,
    inspect_bag,
    read_bag,
    read_bag_header,
    validate_bag,
)
from features.integrity import NOT_A_BAG, BagProblem
from mil import __version__
from mil.atomic import atomic_write_text
from mil.errors import ConfigError, InputError, listing


def write_manifest(bag_dir: str | Path, *, encoder_config: Any, preprocess: dict | None = None) -> Path:
    """Record which encoder a bag directory holds (atomic), so a mismatch is caught before any compute."""
    cfg = config_dict(encoder_config)
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "encoder": cfg.get("name", ""),
        "feature_dim": cfg.get("embed_dim"),
        "encoder_config": cfg,
        "preprocess": preprocess or {},
        "package_version": __version__,
    }
    path = Path(bag_dir) / MANIFEST_NAME
    atomic_write_text(
        path, json.dumps(manifest, indent=2, sort_keys=True) + "\n", validate=lambda p: json.loads(p.read_text())
    )
    return path


def read_manifest(bag_dir: str | Path) -> dict | None:
    path = Path(bag_dir) / MANIFEST_NAME
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"bag manifest {path} is not valid JSON ({e}); delete it, `mil extract` rewrites it") from e


def _describe(config: dict, preprocess: dict | None) -> str:
    return canonical_json({"encoder_config": config, "preprocess": preprocess or {}})


class BagDirectory:
    """A folder of bags of one encoder. Invalid files are not listed as patients; `verify` reports them."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise InputError(f"bag directory {self.path} does not exist; create it with `mil extract --out {path}`")

    def files(self) -> list[Path]:
        return sorted(p for p in self.path.glob(f"*{BAG_SUFFIX}") if not p.name.startswith("."))

    def patients(self) -> list[str]:
        """Sorted ids of the bags that open and have consistent shapes (NaN checks happen in load)."""
        return sorted(p.name[: -len(BAG_SUFFIX)] for p in self.files() if not validate_bag(p, full=False))

    def load(self, patient_id: str) -> Bag:
        return read_bag(bag_path(self.path, patient_id))

    def _first_header(self) -> dict:
        for p in self.files():
            if not validate_bag(p, full=False):
                return read_bag_header(p)
        raise InputError(f"bag directory {self.path} holds no valid bag; run `mil extract --out {self.path}` first")

    @property
    def manifest(self) -> dict | None:
        return read_manifest(self.path)

    @property
    def encoder_config(self) -> dict:
        manifest = self.manifest
        if manifest is not None:
            return manifest["encoder_config"]
        return config_dict(self._first_header()["encoder_config"])

    @property
    def feature_dim(self) -> int:
        manifest = self.manifest
        if manifest is not None and manifest.get("feature_dim") is not None:
            return int(manifest["feature_dim"])
        return int(self._first_header()["feature_dim"])

    def integrity(self) -> tuple[list[BagProblem], list[Path]]:
        """(faults that make the directory unusable for training, files that are not bags), from headers only: a
        bag named for another patient, a dataset stored outside its file, a bag of an older schema (no digests),
        two bags with the same features (a copy under a new name). Each bag's digests are checked when it is
        loaded (read_bag), and by `mil verify`."""
        faults: list[BagProblem] = []
        strangers: list[Path] = []
        by_digest: dict[str, list[str]] = {}
        for p in self.files():
            bag, problems = inspect_bag(p, full=False)
            if any(q.kind == "stranger" for q in problems):
                strangers.append(p)
                continue
            faults += [q for q in problems if q.kind in ("outside", "renamed", "old")]
            digest = (bag.attrs.get("digests") or {}).get("features") if bag is not None and not problems else None
            if digest:
                by_digest.setdefault(digest, []).append(p.name)
        for names in by_digest.values():
            if len(names) > 1:
                faults.append(
                    BagProblem(
                        f"{', '.join(names)} in {self.path} hold identical features: a bag copied under another "
                        "patient's name puts one patient's cells in training and test. Delete the copies and run "
                        "`mil extract` again.",
                        "duplicate",
                        tuple(names),
                    )
                )
        return faults, strangers

    def check_consistent(self, *, log: Callable[[str], None] | None = None) -> None:
        """Refuse a directory that training cannot trust: bags that are not what they say (InputError naming the
        files, see `integrity`), or bags of different encoders or preprocessing (ConfigError naming both configs).
        Files that are not bags at all are ignored, with a note to `log` (default: stderr)."""
        faults, strangers = self.integrity()
        for p in strangers:
            (log or (lambda m: print(m, file=sys.stderr, flush=True)))(f"note: ignored {p}: {NOT_A_BAG}")
        if faults:
            raise InputError(
                f"bag directory {self.path} holds bags that are not what they say; fix them before training:\n"
                f"{listing(faults)}"
            )
        reference: tuple[str, str] | None = None
        manifest = self.manifest
        if manifest is not None:
            reference = (str(self.path / MANIFEST_NAME), _describe(manifest["encoder_config"], manifest["preprocess"]))
        for p in self.files():
            if validate_bag(p, full=False):
                continue
            header = read_bag_header(p)
            desc = _describe(config_dict(header["encoder_config"]), header.get("preprocess"))
            if reference is None:
                reference = (str(p), desc)
            elif desc != reference[1]:
                raise ConfigError(
                    f"bag directory {self.path} mixes encoders or preprocessing:\n"
                    f"  {reference[0]}: {reference[1]}\n  {p}: {desc}\n"
                    "Extract every patient with one encoder and preprocessing (rerunning `mil extract` with the same "
                    "--encoder, --context and --stain-norm/--stain-reference into this folder recomputes the stale "
                    "bags), or use one folder per encoder and preprocessing."
                )


def check_encoder_width(bag_dir: str | Path, encoder_config: Any) -> None:
    """Refuse an encoder whose width differs from the bags already in `bag_dir`, before any compute."""
    bag_dir = Path(bag_dir)
    if not bag_dir.is_dir():
        return
    cfg = config_dict(encoder_config)
    width = cfg.get("embed_dim")
    manifest = read_manifest(bag_dir)
    found: tuple[str, int] | None = None
    if manifest is not None and manifest.get("feature_dim") is not None:
        found = (f"{bag_dir / MANIFEST_NAME} (encoder {manifest.get('encoder')!r})", int(manifest["feature_dim"]))
    else:
        for p in BagDirectory(bag_dir).files():
            if not validate_bag(p, full=False):
                header = read_bag_header(p)
                found = (f"{p} (encoder {header.get('encoder')!r})", header["feature_dim"])
                break
    if found is not None and width is not None and int(width) != found[1]:
        raise ConfigError(
            f"encoder {cfg.get('name')!r} gives {width}-dim embeddings but {found[0]} holds {found[1]}-dim bags; "
            f"one folder holds one encoder's bags: choose another --out folder, or delete {bag_dir} to re-extract"
        )
