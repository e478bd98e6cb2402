"""Tiled inference on fields larger than one network input: overlapping tiles, then one NMS across tiles.

A cell cut by a tile border appears whole in a neighbouring tile when the overlap exceeds the largest cell, so
a detection that touches a tile border lying inside the image is a fragment: it is dropped where a whole
detection covers it, and NMS removes the duplicates that whole cells in the overlap produce.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

# predict(tile uint8 (h, w, 3)) -> boxes (K, 4) in tile pixels, scores (K,), labels (K,)
TilePredictor = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]


@dataclass
class Detections:
    boxes: np.ndarray  # (K, 4) float32 x0 y0 x1 y1
    scores: np.ndarray  # (K,) float32
    labels: np.ndarray  # (K,) int64, 1-based

    def __len__(self) -> int:
        return len(self.scores)


def tile_origins(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets covering [0, length) with tiles of `tile` that overlap by at least `overlap`."""
    if overlap >= tile:
        raise ValueError(f"overlap {overlap} must be smaller than the tile size {tile}")
    if length <= tile:
        return [0]
    n = int(np.ceil((length - overlap) / (tile - overlap)))
    # Spread the tiles evenly so the last one ends at the border (no sliver tile at the end).
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def detect_tiled(
    predict: TilePredictor,
    image: np.ndarray,
    *,
    tile_size: int,
    overlap: int,
    nms_iou: float = 0.5,
    edge_margin: float = 2.0,
    fragment_cover: float = 0.6,
) -> Detections:
    """Run `predict` on overlapping tiles of `image` (H, W, 3) and merge the detections in image pixels."""
    from torchvision.ops import batched_nms

    h, w = image.shape[:2]
    all_boxes, all_scores, all_labels, all_cut = [], [], [], []
    for y in tile_origins(h, tile_size, overlap):
        for x in tile_origins(w, tile_size, overlap):
            tile = image[y : y + tile_size, x : x + tile_size]
            boxes, scores, labels = predict(tile)
            if len(boxes) == 0:
                continue
            boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
            th, tw = tile.shape[:2]
            # Touching a tile border that is not an image border: the cell may continue in the next tile.
            cut = (
                ((boxes[:, 0] <= edge_margin) & (x > 0))
                | ((boxes[:, 1] <= edge_margin) & (y > 0))
                | ((boxes[:, 2] >= tw - edge_margin) & (x + tw < w))
                | ((boxes[:, 3] >= th - edge_margin) & (y + th < h))
            )
            all_boxes.append(boxes + np.array([x, y, x, y], dtype=np.float32))
            all_scores.append(np.asarray(scores, dtype=np.float32))
            all_labels.append(np.asarray(labels, dtype=np.int64))
            all_cut.append(cut)
    if not all_boxes:
        return Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))
    boxes = torch.from_numpy(np.concatenate(all_boxes))
    scores = torch.from_numpy(np.concatenate(all_scores))
    labels = torch.from_numpy(np.concatenate(all_labels))
    cut = torch.from_numpy(np.concatenate(all_cut))
    # Whole detections first: a fragment is dropped when a whole box of the same class covers most of it.
    whole, frag = ~cut, cut
    keep_frag = torch.ones(int(frag.sum()), dtype=torch.bool)
    if frag.any() and whole.any():
        fb, wb = boxes[frag], boxes[whole]
        lt = torch.maximum(fb[:, None, :2], wb[None, :, :2])  # (F, W, 2)
        rb = torch.minimum(fb[:, None, 2:], wb[None, :, 2:])
        inter = (rb - lt).clamp(min=0).prod(dim=2)  # (F, W)
        area = (fb[:, 2:] - fb[:, :2]).clamp(min=1e-6).prod(dim=1)  # (F,)
        same = labels[frag][:, None] == labels[whole][None, :]
        keep_frag = ~(((inter / area[:, None]) >= fragment_cover) & same).any(dim=1)
    mask = whole.clone()
    mask[frag] = keep_frag
    boxes, scores, labels = boxes[mask], scores[mask], labels[mask]
    keep = batched_nms(boxes, scores, labels, nms_iou)
    keep = keep[torch.argsort(scores[keep], descending=True)]
    return Detections(boxes[keep].numpy(), scores[keep].numpy(), labels[keep].numpy())
