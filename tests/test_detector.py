"""Cell detector: a tiny Faster R-CNN improves its loss on CPU, checkpoints load with weights_only=True, detect
writes a valid cell table, tiled inference finds a cell cut by a tile border exactly once, the classical
baseline finds drawn nuclei, and AP is 1 for perfect predictions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mil.cell_table import CellTable, read_cell_table, validate_cell_table

BACKGROUND = (232, 214, 222)
NUCLEUS = (92, 44, 140)
CYTOPLASM = (190, 170, 215)


def draw_cell(img: np.ndarray, cx: int, cy: int, r: int) -> tuple[int, int, int, int]:
    """A nucleated cell: light cytoplasm disk with a dark violet nucleus; returns its box x0 y0 x1 y1."""
    h, w = img.shape[:2]
    yy, xx = np.mgrid[:h, :w]
    d2 = (xx - cx) ** 2 + (yy - cy) ** 2
    img[d2 <= r**2] = CYTOPLASM
    img[d2 <= (0.6 * r) ** 2] = NUCLEUS
    return max(0, cx - r), max(0, cy - r), min(w, cx + r + 1), min(h, cy + r + 1)


def write_fields(root, *, n_patients=3, size=64, seed=0) -> CellTable:
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        img = np.zeros((size, size, 3), dtype=np.uint8) + np.array(BACKGROUND, dtype=np.uint8)
        for k, (cx, cy) in enumerate([(16, 16), (46, 20), (24, 46), (48, 48)]):
            r = int(rng.integers(7, 10))
            x0, y0, x1, y1 = draw_cell(img, cx + int(rng.integers(-3, 4)), cy + int(rng.integers(-3, 4)), r)
            rows.append(
                {
                    "cell_id": f"P{p}:{k}",
                    "patient_id": f"P{p}",
                    "image_path": str(root / f"P{p}.png"),
                    "x0": x0,
                    "y0": y0,
                    "x1": x1,
                    "y1": y1,
                    "label": "blast" if k % 2 else "lymphocyte",
                    "source": "test",
                }
            )
        Image.fromarray(img).save(root / f"P{p}.png")
    CellTable(rows=rows).write(root / "cells.csv")
    return read_cell_table(root / "cells.csv")


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


TINY = {"backbone": "tiny_fpn", "fpn_channels": 32, "box_head_dim": 64, "smallest_anchor": 8}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from mil.detector.model import DetectorConfig
    from mil.detector.train import DetectorTrainConfig, train_detector

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("det")
    cells = write_fields(root)
    result = train_detector(
        cells,
        out_dir=root / "det",
        config=DetectorConfig(**TINY),
        train_config=DetectorTrainConfig(epochs=12, batch_size=3, lr=3e-3, warmup_steps=2, seed=0),
    )
    return root, cells, result


def test_tiny_detector_loss_decreases(trained):
    _, _, result = trained
    losses = result.history["epoch_loss"]
    assert len(losses) == 12
    assert np.mean(losses[-3:]) < np.mean(losses[:3])


def test_checkpoint_loads_with_weights_only(trained):
    from mil.detector.model import load_detector

    _, _, result = trained
    raw = torch.load(result.checkpoint, weights_only=True)
    assert raw["format"] == "cytomil-detector/1" and raw["config"]["backbone"] == "tiny_fpn"
    model, config = load_detector(result.checkpoint)
    assert config.classes == ("cell",) and not model.training


def test_detect_cli_writes_valid_cell_table(trained, tmp_path):
    from mil.cli import main

    root, cells, result = trained
    out = tmp_path / "pred.csv"
    args = ["detect", "--cells", str(root / "cells.csv"), "--checkpoint", str(result.checkpoint)]
    assert main([*args, "--out", str(out), "--min-score", "0.0", "--tile-size", "64", "--overlap", "24"]) == 0
    table = read_cell_table(out)
    validate_cell_table(table)
    assert all(r["source"] == "detector" and r["det_score"] is not None for r in table.rows)
    assert set(table.patients()) <= set(cells.patients())
    assert (tmp_path / "pred.metrics.json").exists()


def test_classical_detect_cli_on_image_folder(tmp_path):
    from mil.cli import main

    write_fields(tmp_path, n_patients=2)
    out = tmp_path / "classical.csv"
    assert main(["detect", "--images", str(tmp_path), "--classical", "--out", str(out)]) == 0
    table = read_cell_table(out)
    validate_cell_table(table)
    assert table.patients() == ["P0", "P1"]
    assert all(r["det_method"] == "classical" for r in table.rows)


def test_classical_baseline_finds_drawn_cells(tmp_path):
    from mil.detector.classical import ClassicalConfig, classical_detect
    from mil.detector.evaluate import evaluate_table

    cells = write_fields(tmp_path, n_patients=2)
    from mil.detector.predict import detect_images

    images = sorted({(r["image_path"], r["patient_id"]) for r in cells.rows})
    predicted = detect_images(images, classical=ClassicalConfig(expand=1.0 / 0.6, min_area=10))
    metrics = evaluate_table(predicted, cells)
    assert metrics["map_50"] >= 0.9
    blank = np.zeros((32, 32, 3), np.uint8) + np.array(BACKGROUND, np.uint8)
    assert len(classical_detect(blank)) == 0


def test_tiled_inference_finds_a_cell_cut_by_a_tile_border_exactly_once():
    from mil.detector.classical import ClassicalConfig, classical_detect
    from mil.detector.tiling import detect_tiled, tile_origins

    assert tile_origins(200, 128, 48) == [0, 72]
    img = np.zeros((120, 200, 3), np.uint8) + np.array(BACKGROUND, np.uint8)
    cut = draw_cell(img, 128, 60, 12)  # crosses the right border (x=128) of the first tile
    both = draw_cell(img, 100, 30, 8)  # lies whole in the overlap, so both tiles see it
    alone = draw_cell(img, 30, 90, 9)
    config = ClassicalConfig(expand=1.0 / 0.6, min_area=10, split_touching=False)
    # The first tile alone sees only a fragment of the cut cell: the case the merge must repair.
    first = classical_detect(img[:, :128], config)
    assert any(b[2] >= 126 for b in first.boxes)
    found = detect_tiled(
        lambda tile: (lambda d: (d.boxes, d.scores, d.labels))(classical_detect(tile, config)),
        img,
        tile_size=128,
        overlap=48,
    )
    assert len(found) == 3
    for truth in (cut, both, alone):
        ious = [_iou(truth, b) for b in found.boxes]
        assert sum(v > 0.5 for v in ious) == 1, (truth, found.boxes)


def test_tiled_trained_detector_on_a_large_field_writes_valid_table(trained, tmp_path):
    from mil.detector.predict import CellDetector, detect_images

    _, _, result = trained
    img = np.zeros((100, 160, 3), np.uint8) + np.array(BACKGROUND, np.uint8)
    for cx, cy in [(20, 20), (64, 50), (120, 70), (140, 20)]:
        draw_cell(img, cx, cy, 8)
    Image.fromarray(img).save(tmp_path / "field.png")
    detector = CellDetector.load(result.checkpoint, tile_size=64, overlap=24)
    table = detect_images([(tmp_path / "field.png", "F1")], detector=detector)
    table.write(tmp_path / "field.csv")
    validate_cell_table(read_cell_table(tmp_path / "field.csv"))


def test_perfect_predictions_score_ap_one_and_shifted_ones_less():
    from mil.detector.evaluate import detection_metrics
    from mil.detector.tiling import Detections

    boxes = np.array([[0, 0, 10, 10], [20, 20, 40, 40]], np.float32)
    labels = np.array([1, 2])
    perfect = Detections(boxes, np.array([0.9, 0.8], np.float32), labels)
    metrics = detection_metrics([perfect], [(boxes, labels)], ("rbc", "wbc"))
    assert metrics["map_50"] == pytest.approx(1.0) and metrics["ap50_per_class"] == {"rbc": 1.0, "wbc": 1.0}
    assert metrics["ap50"] == metrics["map_50"]
    shifted = Detections(boxes + np.array([6, 6, 6, 6], np.float32), perfect.scores, labels)
    assert detection_metrics([shifted], [(boxes, labels)], ("rbc", "wbc"))["map_50"] < 1.0


def test_unknown_backbone_lists_the_valid_ones():
    from mil.detector.model import DetectorConfig, build_detector
    from mil.errors import ConfigError

    with pytest.raises(ConfigError, match="resnet18_fpn"):
        build_detector(DetectorConfig(backbone="nope"))


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_train_detector_cli_with_held_out_patients(tmp_path, capsys):
    import json

    from mil.cli import main

    write_fields(tmp_path, n_patients=4)
    out = tmp_path / "run"
    args = ["train-detector", "--cells", str(tmp_path / "cells.csv"), "--out", str(out), "--backbone", "tiny_fpn"]
    assert main([*args, "--classes", "labels", "--max-steps", "2", "--holdout-fraction", "0.25"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["held_out_patients"]) == 1 and set(metrics["ap50_per_class"]) <= {"blast", "lymphocyte"}
    assert "AP@0.5" in capsys.readouterr().out
