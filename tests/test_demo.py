"""`mil demo` end to end on a tiny config: every stage runs and writes what the README promises."""

from __future__ import annotations

import json

import pytest
import yaml

from mil.cli import main
from mil.demo import DEFAULT_CONFIG, FULL_CONFIG, load_demo_config
from mil.errors import ConfigError

TINY = {
    "seed": 0,
    "cells": {
        "synth": {
            "patients": 12,
            "fields_per_patient": 1,
            "cells_per_field": 12,
            "field_width": 256,
            "field_height": 256,
        }
    },
    "detect": {
        "mode": "evaluate",
        "ignore_labels": ["erythrocyte"],
        "backbone": "mobilenetv3_large_fpn",
        "init": "random",
        "pixel_scale": 0.5,
        "epochs": 1,
        "max_steps": 2,
        "train_fraction": 0.3,
    },
    "classify": {
        "arch": "resnet18",
        "init": "random",
        "tta": False,
        "crop_size": 32,
        "max_epochs": 1,
        "max_steps": 2,
        "batch_size": 32,
    },
    "extract": {"encoder": "morphology.handcrafted", "input_size": 32},
    "compare": {
        "heads": ["count.logreg", "count.meta", "mean", "abmil"],
        "folds": 3,
        "seeds": 1,
        "n_boot": 100,
        "train": {"max_epochs": 1, "hidden_dim": 16},
    },
    "attention": {"head": "abmil", "top_k": 4, "max_patients": 4},
}


def test_shipped_demo_configs_load():
    for path in (DEFAULT_CONFIG, FULL_CONFIG):
        assert load_demo_config(path).compare["heads"]


def test_unknown_demo_key_is_named(tmp_path):
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump({**TINY, "detect": {**TINY["detect"], "epochz": 1}}))
    with pytest.raises(ConfigError, match="section detect.*'epochz' -> did you mean 'epochs'"):
        load_demo_config(path)


def test_tiny_demo_runs_every_stage(tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    assert main(["demo", "--out", str(tmp_path / "demo"), "--config", str(config)]) == 0
    out = tmp_path / "demo"
    text = (out / "pipeline_summary.md").read_text()
    for head in ("count.logreg", "count.meta", "mean", "abmil"):
        assert f"| {head} |" in text
    assert "predicted counts" in text and "ground-truth counts" in text
    summary = json.loads((out / "pipeline_summary.json").read_text())
    for key in ("detector_ap50", "classical_ap50", "classifier_macro_f1", "classifier_macro_auroc"):
        assert 0.0 <= summary["figures"][key] <= 1.0
    assert (out / "report" / "index.html").exists()
    assert (out / "results" / "splits.json").read_bytes() == (out / "results_predicted" / "splits.json").read_bytes()
    assert "attention report:" in capsys.readouterr().out
