"""What a bag directory was made with (encoder config and preprocessing), recorded with every comparison's models
so that `mil predict` refuses new bags of another encoder or preprocessing, naming both."""

from __future__ import annotations

import json

from mil.errors import ConfigError


def bag_provenance(directory) -> dict:
    """{"encoder_config": ..., "preprocess": ...} of a features.bags.BagDirectory (manifest, else first bag)."""
    from features.bags import config_dict, read_bag_header, validate_bag

    manifest = directory.manifest
    if manifest is not None:
        return {"encoder_config": manifest["encoder_config"], "preprocess": manifest.get("preprocess") or {}}
    for p in directory.files():
        if not validate_bag(p, full=False):
            header = read_bag_header(p)
            return {
                "encoder_config": config_dict(header["encoder_config"]),
                "preprocess": header.get("preprocess") or {},
            }
    return {}


def _canonical(record: dict) -> str:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), default=str)


def check_same_provenance(trained: dict, new: dict, *, trained_where: str, new_where: str) -> None:
    """ConfigError naming both configs when new bags differ in encoder or preprocessing from the training bags."""
    if not trained:
        return  # results of an older version record nothing to compare with
    if _canonical(trained) != _canonical(new):
        raise ConfigError(
            "the new bags were made with another encoder or preprocessing than the bags the models were trained on:\n"
            f"  trained on ({trained_where}): {_canonical(trained)}\n"
            f"  new bags ({new_where}): {_canonical(new)}\n"
            "Extract the new patients with the same `mil extract` settings (encoder, --input-size, normalisation)."
        )
