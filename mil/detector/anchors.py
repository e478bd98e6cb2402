"""Training image scale and anchor sizes derived from the training boxes, so small cells (platelets) are seen.

A Faster R-CNN finds what its anchors and its finest feature map (stride 8 here) can hold: a platelet of 8 px
after down-scaling falls between anchors and sinks in the background. The rule:

- `pixel_scale`: the smallest class (by its 10th percentile of box side sqrt(w*h)) is brought to at least
  `min_object_px` (16) network pixels, never enlarged above 1 (up-scaling adds no detail) and never shrunk more than
  the speed wants; with small objects absent the images are scaled down until the smallest class reaches
  `min_object_px` (cheaper steps at no loss).
- `smallest_anchor`: about the 10th percentile side of the smallest class at that scale (an anchor side a bit below
  the box fits, the regression grows it), rounded to 2 px, at least 8; the anchors of level l are that times 2**l
  (and 1.5x), so five levels cover 1 to 40 times the smallest object.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mil.errors import InputError

MIN_OBJECT_PX = 16.0  # the smallest class's 10th-percentile side in network pixels (2 cells of the stride-8 map)
MIN_SCALE = 0.25
MAX_SCALE = 1.0


@dataclass(frozen=True)
class BoxStats:
    """Box sides (sqrt(w*h), original pixels) per class: n, 10th percentile, median, 90th percentile."""

    per_class: dict[str, tuple[int, float, float, float]]

    def smallest(self) -> tuple[str, float]:
        """(class, 10th-percentile side) of the class with the smallest boxes."""
        name = min(self.per_class, key=lambda c: self.per_class[c][1])
        return name, self.per_class[name][1]

    def describe(self, scale: float = 1.0) -> str:
        return "; ".join(
            f"{c} {n} boxes, side p10/median/p90 {p10 * scale:.0f}/{med * scale:.0f}/{p90 * scale:.0f} px"
            for c, (n, p10, med, p90) in sorted(self.per_class.items())
        )


def box_stats(samples, class_names: tuple[str, ...]) -> BoxStats:
    """Side statistics of the boxes of `samples` (DetectionSample list, labels 1-based into `class_names`)."""
    sides: dict[str, list[float]] = {}
    for s in samples:
        if not len(s.boxes):
            continue
        w = np.clip(s.boxes[:, 2] - s.boxes[:, 0], 1e-3, None)
        h = np.clip(s.boxes[:, 3] - s.boxes[:, 1], 1e-3, None)
        for label, side in zip(s.labels.tolist(), np.sqrt(w * h).tolist()):
            sides.setdefault(class_names[int(label) - 1], []).append(side)
    if not sides:
        raise InputError("the training images hold no boxes; a detector needs labelled cells to learn from")
    per_class = {c: (len(v), *(float(x) for x in np.percentile(np.asarray(v), [10, 50, 90]))) for c, v in sides.items()}
    return BoxStats(per_class=per_class)


def derive_pixel_scale(stats: BoxStats, min_object_px: float = MIN_OBJECT_PX) -> float:
    """The image scale that brings the smallest class to `min_object_px`, in [MIN_SCALE, MAX_SCALE], 2 decimals."""
    _, p10 = stats.smallest()
    return float(np.clip(round(min_object_px / max(p10, 1e-3), 2), MIN_SCALE, MAX_SCALE))


def derive_smallest_anchor(stats: BoxStats, pixel_scale: float) -> int:
    """Anchor side of the finest level: the smallest class's 10th-percentile side at `pixel_scale`, even, >= 8."""
    _, p10 = stats.smallest()
    return int(max(8, 2 * round(p10 * pixel_scale / 2)))
