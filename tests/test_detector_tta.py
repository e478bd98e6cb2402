"""Detector test-time augmentation: flipped views mapped back exactly, merged by weighted box fusion."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mil.detector.model import DetectorConfig
from mil.detector.predict import CellDetector
from mil.detector.tta import VIEWS, fuse, unview, view


def test_fusion_matches_a_hand_computed_case():
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [50, 50, 60, 60], [0, 0, 10, 10]], np.float32)
    scores = np.array([0.9, 0.6, 0.3, 0.8], np.float32)
    labels = np.array([1, 1, 1, 2])
    b, s, lab = fuse(boxes, scores, labels, n_views=3, iou=0.55)
    # The first two overlap (IoU 90/110): one box, the score-weighted mean of both; score mean(0.9, 0.6) x 2/3 views.
    # The others were seen once: their score x 1/3. Class 2 never merges with class 1.
    np.testing.assert_allclose(b, [[0.4, 0, 10.4, 10], [0, 0, 10, 10], [50, 50, 60, 60]], atol=1e-5)
    np.testing.assert_allclose(s, [0.5, 0.8 / 3, 0.1], atol=1e-6)
    assert lab.tolist() == [1, 2, 1]


def test_fusion_of_nothing_is_empty():
    b, s, lab = fuse(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64), n_views=3)
    assert b.shape == (0, 4) and len(s) == 0 and len(lab) == 0


@pytest.mark.parametrize("name", list(VIEWS))
def test_a_box_found_on_a_view_maps_back_to_the_tile(name):
    tile = np.zeros((40, 60, 3), np.uint8)
    tile[5:15, 20:32] = 255  # a cell at x 20..32, y 5..15
    seen = view(tile, name)
    ys, xs = np.nonzero(seen[..., 0])
    on_view = np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], np.float32)
    np.testing.assert_array_equal(unview(on_view, name, width=60, height=40), [[20, 5, 32, 15]])


class _BrightSquareFinder(torch.nn.Module):
    """A stand-in network: the box of the bright pixels of each input image, score 0.9, class 1."""

    def forward(self, images):
        out = []
        for img in images:
            ys, xs = torch.nonzero(img[0] > 0.5, as_tuple=True)
            box = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
            out.append({"boxes": box, "scores": torch.tensor([0.9]), "labels": torch.tensor([1])})
        return out


def test_tta_detector_sees_every_view_and_returns_the_cell_once_where_it_is():
    tile = np.zeros((64, 96, 3), np.uint8)
    tile[10:30, 50:70] = 255
    plain = CellDetector(model=_BrightSquareFinder(), config=DetectorConfig(classes=("cell",), tta=False))
    tta = CellDetector(model=_BrightSquareFinder(), config=DetectorConfig(classes=("cell",), tta=True))
    boxes, scores, _ = tta.predict_tile(tile)
    np.testing.assert_allclose(boxes, plain.predict_tile(tile)[0])
    np.testing.assert_allclose(boxes, [[50, 10, 70, 30]])
    np.testing.assert_allclose(scores, [0.9], atol=1e-6)  # found in all three views: the full score
