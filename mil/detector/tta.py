"""Test-time augmentation for the detector: a smear has no up or left, so a field seen flipped is the same field.

The network runs on the tile and on its mirror images (`VIEWS`); each view's boxes are mapped back to the tile and
the views are merged by weighted box fusion (Solovyev et al. 2021, as in the `ensemble-boxes` package): boxes of
one class that overlap by `iou` or more across views form a cluster, the fused box is the score-weighted mean of
the cluster's boxes, and its score the cluster's mean score times the share of views that found it, so a cell seen
in every view outranks one seen in a single view. Written here rather than taken from `ensemble-boxes` (no release
since 2022; it brings numba and pandas): the part used is the 40 lines below, tested on a hand-computed case.
"""

from __future__ import annotations

import numpy as np

# name -> flip the tile's width axis, its height axis
VIEWS = {"identity": (False, False), "hflip": (True, False), "vflip": (False, True)}


def view(tile: np.ndarray, name: str) -> np.ndarray:
    """The tile (h, w, 3) as `name` sees it."""
    flip_w, flip_h = VIEWS[name]
    out = tile[:, ::-1] if flip_w else tile
    return np.ascontiguousarray(out[::-1] if flip_h else out)


def unview(boxes: np.ndarray, name: str, width: int, height: int) -> np.ndarray:
    """Boxes (K, 4) x0 y0 x1 y1 found on view `name` of a (height, width) tile -> boxes on the tile itself."""
    flip_w, flip_h = VIEWS[name]
    out = np.array(boxes, dtype=np.float32).reshape(-1, 4)
    if flip_w:
        out[:, [0, 2]] = width - out[:, [2, 0]]
    if flip_h:
        out[:, [1, 3]] = height - out[:, [3, 1]]
    return out


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    lt = np.maximum(box[:2], boxes[:, :2])
    rb = np.minimum(box[2:], boxes[:, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=1)
    area = (box[2:] - box[:2]).prod()
    areas = (boxes[:, 2:] - boxes[:, :2]).prod(axis=1)
    return inter / np.maximum(area + areas - inter, 1e-9)


def fuse(
    boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, *, n_views: int, iou: float = 0.55
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted box fusion of the boxes of `n_views` views, pooled: (K,4), (K,), (K,) -> fused, by score."""
    out_boxes, out_scores, out_labels = [], [], []
    for label in np.unique(labels):
        sel = labels == label
        b, s = boxes[sel].astype(np.float64), scores[sel].astype(np.float64)
        order = np.argsort(-s, kind="stable")
        fused = np.zeros((0, 4))  # the clusters' current fused boxes
        weighted, weight, members = [], [], []  # per cluster: sum(score * box), sum(score), [scores]
        for i in order:
            if len(fused):
                overlap = _iou(b[i], fused)
                j = int(np.argmax(overlap))
                if overlap[j] >= iou:
                    weighted[j] += s[i] * b[i]
                    weight[j] += s[i]
                    members[j].append(s[i])
                    fused[j] = weighted[j] / weight[j]
                    continue
            weighted.append(s[i] * b[i])
            weight.append(s[i])
            members.append([s[i]])
            fused = np.vstack([fused, b[i][None]])
        for k in range(len(members)):
            out_boxes.append(fused[k])
            out_scores.append(np.mean(members[k]) * min(len(members[k]), n_views) / n_views)
            out_labels.append(label)
    if not out_boxes:
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64)
    order = np.argsort(-np.array(out_scores), kind="stable")
    return (
        np.array(out_boxes, np.float32)[order],
        np.array(out_scores, np.float32)[order],
        np.array(out_labels, np.int64)[order],
    )
