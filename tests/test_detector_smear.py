"""Detector on real smears: boxes follow flips and rotations by 90 degrees exactly, the image scale and anchors
come from the training boxes, training prints one line per epoch, `mil detect` shows images/s, the classical
baseline's settings are options and it is scored per class, and every option has help text."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_detector import TINY, write_fields

from mil.cell_table import read_cell_table


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.mark.parametrize("seed", range(8))
def test_augmented_boxes_enclose_the_augmented_pixels(seed):
    from mil.detector.data import SmearAugment, augment_field

    image = torch.zeros(3, 30, 50)
    boxes = torch.tensor([[4.0, 6.0, 14.0, 11.0], [30.0, 2.0, 47.0, 28.0]])
    for k, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
        image[k, y0:y1, x0:x1] = 1.0  # object k lives in channel k
    out, moved = augment_field(image, boxes, SmearAugment(stain_gain=0, brightness=0, contrast=0),
                               torch.Generator().manual_seed(seed))  # fmt: skip
    for k in range(2):
        ys, xs = torch.nonzero(out[k] > 0.5, as_tuple=True)
        found = [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
        assert found == pytest.approx(moved[k].tolist()), (seed, k)


def test_scale_and_anchors_follow_the_smallest_class():
    from mil.detector.anchors import box_stats, derive_pixel_scale, derive_smallest_anchor
    from mil.detector.data import DetectionSample

    rng = np.random.default_rng(0)
    sides = np.concatenate([rng.uniform(36, 44, 50), rng.uniform(95, 110, 200)])  # platelets, red cells
    boxes = np.stack([np.zeros_like(sides), np.zeros_like(sides), sides, sides], 1).astype(np.float32)
    labels = np.array([1] * 50 + [2] * 200)
    stats = box_stats([DetectionSample("x.png", "p", boxes, labels)], ("platelet", "rbc"))
    assert stats.smallest()[0] == "platelet"
    scale = derive_pixel_scale(stats)
    assert 16 / 44 < scale < 16 / 36 and derive_smallest_anchor(stats, scale) == 16
    tiny = box_stats([DetectionSample("x.png", "p", boxes[:50] / 4, labels[:50])], ("platelet", "rbc"))
    assert derive_pixel_scale(tiny) == 1.0  # never enlarged: up-scaling adds no detail


def test_train_cli_derives_the_scale_prints_epoch_lines_and_per_class_ap(tmp_path, capfd, monkeypatch):
    from mil.cli import main

    monkeypatch.setenv("MIL_PROGRESS", "plain")
    write_fields(tmp_path, n_patients=4)
    out = tmp_path / "det"
    args = ["train-detector", "--cells", str(tmp_path / "cells.csv"), "--out", str(out), "--backbone", "tiny_fpn"]
    assert main([*args, "--classes", "labels", "--epochs", "2", "--holdout-fraction", "0.25"]) == 0
    printed = capfd.readouterr()
    assert "image scale 1 and smallest anchor" in printed.err  # cells of 14-20 px: no down-scaling
    assert "detector epoch 1/2, loss" in printed.err and "map-50" in printed.err and "ETA" in printed.err
    assert "per class AP@0.5 / mAP@[.5:.95]: blast" in printed.out
    history = json.loads((out / "history.json").read_text())
    assert history["config"]["pixel_scale"] == 1.0 and len(history["history"]["val_map_50"]) == 2
    assert len(history["history"]["epoch_seconds"]) == 2


def test_classical_options_reach_the_detector_and_it_is_scored_per_class(tmp_path, capfd, monkeypatch):
    from mil.cli import main

    cells = write_fields(tmp_path, n_patients=2)
    monkeypatch.setenv("MIL_PROGRESS", "plain")
    monkeypatch.setattr("mil.progress.interval", lambda: 0.0)
    out = tmp_path / "classical.csv"
    common = ["detect", "--cells", str(tmp_path / "cells.csv"), "--classical", "--out", str(out)]
    assert main([*common, "--min-area", "10", "--expand", str(1 / 0.6)]) == 0
    printed = capfd.readouterr()
    assert "detect: 2/2 images" in printed.err and "images/s" in printed.err
    metrics = json.loads(out.with_suffix(".metrics.json").read_text())
    assert set(metrics["ap50_per_class"]) == {"blast", "lymphocyte"} and metrics["map_50"] >= 0.9
    assert "blast" in printed.out and "per class" in printed.out
    n_default = len(read_cell_table(out))
    assert main([*common, "--min-area", "100000"]) == 0  # a minimum area above every nucleus: nothing found
    assert len(read_cell_table(out)) == 0 < n_default == len(cells)


@pytest.mark.parametrize("command", ["train-detector", "detect"])
def test_every_option_has_help_text(command):
    import argparse
    import importlib

    from mil.cli import COMMANDS

    parser = argparse.ArgumentParser()
    importlib.import_module(COMMANDS[command][0]).add_arguments(parser)
    missing = [a.option_strings for a in parser._actions if a.option_strings != ["-h", "--help"] and not a.help]
    assert missing == []


def test_tiny_config_keys_still_build():
    from mil.detector.model import DetectorConfig, build_detector

    model = build_detector(DetectorConfig(**TINY, pixel_scale=1.0))
    assert sum(p.numel() for p in model.parameters()) > 0
