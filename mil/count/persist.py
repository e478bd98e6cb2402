"""Fitted count heads on disk, without pickle: the scikit-learn estimator through skops (loaded with an explicit
list of trusted scikit-learn and numpy types, RELIABILITY promise 6), and a JSON record of what it saw.

models/<head>/<fold>.skops  the estimator (skops zip)
models/<head>/<fold>.json   head name and options, classes, differential column names, the covariate encoder
                            fitted on the fold's training patients, the fold's patients, and its calibration record
                            (mil.compare.trust: conformal scores, binary threshold)
models/<head>/<fold>.calibrated.skops  the head's CalibratedClassifierCV (sigmoid, cross-validated within the
                            fold's training patients), when it could be fitted
"""

from __future__ import annotations

import json
from pathlib import Path

from mil.atomic import atomic_path, atomic_write_text
from mil.errors import InputError

COUNT_MODEL_FORMAT = "cytomil-count-head/1"
TRUSTED_PREFIXES = ("sklearn.", "numpy.", "scipy.")


def _write_estimator(path: Path, estimator) -> None:
    import skops.io as sio

    data = sio.dumps(estimator)

    def readable(tmp: Path) -> None:
        _load_estimator(tmp.read_bytes(), where=str(tmp))

    with atomic_path(path, readable) as tmp:
        tmp.write_bytes(data)


def save_count_model(
    stem: Path,
    head,
    *,
    options: dict,
    classes: list[str],
    names: list[str],
    encoder,
    meta: dict,
    calibrated=None,
    calibration: dict | None = None,
):
    """Write `stem`.skops (and `stem`.calibrated.skops) and `stem`.json atomically; the JSON last, so a model
    counts as saved once it exists."""
    stem = Path(stem)
    _write_estimator(stem.with_suffix(".skops"), head.model)
    if calibrated is not None:
        _write_estimator(_calibrated_path(stem), calibrated)
    record = {
        "format": COUNT_MODEL_FORMAT,
        "head": head.head_name,
        "options": dict(options),
        "seed": int(head.seed),
        "num_classes": int(head.num_classes),
        "classes": list(classes),
        "names": list(names),
        "covariates": encoder.to_dict() if encoder is not None else None,
        "meta": dict(meta),
        "calibration": calibration,
        "calibrated_model": _calibrated_path(stem).name if calibrated is not None else None,
    }
    atomic_write_text(
        stem.with_suffix(".json"), json.dumps(record, indent=1) + "\n", lambda p: json.loads(p.read_text())
    )


def _load_estimator(data: bytes, where: str):
    import skops.io as sio

    try:
        untrusted = sio.get_untrusted_types(data=data)
    except Exception as e:  # a damaged or foreign file: say which, never a traceback
        raise InputError(f"{where} is not a skops model file ({type(e).__name__}: {e}); rerun `mil compare`") from e
    foreign = [t for t in untrusted if not t.startswith(TRUSTED_PREFIXES)]
    if foreign:
        raise InputError(f"{where} holds types that are not scikit-learn's: {foreign}; it was not written by cytomil")
    return sio.loads(data, trusted=untrusted)


def load_count_model(stem: Path):
    """(fitted count head, record dict) of `stem` (.json + .skops)."""
    from mil.count.registry import create_count_head

    stem = Path(stem)
    try:
        record = json.loads(stem.with_suffix(".json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"count model {stem.with_suffix('.json')} cannot be read ({e}); rerun `mil compare`") from e
    if record.get("format") != COUNT_MODEL_FORMAT:
        raise InputError(f"{stem.with_suffix('.json')} is not a {COUNT_MODEL_FORMAT} record")
    head = create_count_head(record["head"], seed=record["seed"], **record["options"])
    head.num_classes = int(record["num_classes"])
    path = stem.with_suffix(".skops")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputError(f"count model {path} is missing ({e}); rerun `mil compare`") from e
    head.model = _load_estimator(data, where=str(path))
    return head, record


def _calibrated_path(stem: Path) -> Path:
    return stem.with_name(stem.name + ".calibrated.skops")


def load_calibrated_model(stem: Path, record: dict):
    """The calibrated estimator a count model's record names, or None (saved without one)."""
    if not record.get("calibrated_model"):
        return None
    path = Path(stem).with_name(record["calibrated_model"])
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputError(f"calibrated count model {path} is missing ({e}); rerun `mil compare`") from e
    return _load_estimator(data, where=str(path))
