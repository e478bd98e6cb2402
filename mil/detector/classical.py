"""A zero-training detector: nucleus colour threshold + watershed (scikit-image), the baseline every trained
detector should beat. Nuclei of MGG-stained cells are the darkest blue-violet structures of a smear; the
haematoxylin-like channel of a colour deconvolution separates them from pink erythrocytes and background."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mil.detector.tiling import Detections


@dataclass(frozen=True)
class ClassicalConfig:
    sigma: float = 1.5  # Gaussian smoothing of the nucleus channel (pixels)
    min_area: int = 40  # smaller blobs are debris or platelets (pixels of the analysed image)
    max_area: int | None = None
    min_distance: int = 9  # minimal distance between two nuclei centres for the watershed split
    expand: float = 1.4  # a cell box is the nucleus box grown by this factor around its centre
    threshold_offset: float = 0.0  # added to Otsu's threshold (in units of the channel's std)
    split_touching: bool = True


def nucleus_channel(image: np.ndarray) -> np.ndarray:
    """(H, W) float: high on violet nuclei. Haematoxylin of a colour deconvolution minus eosin, min-max scaled."""
    from skimage.color import rgb2hed

    hed = rgb2hed(image[..., :3])
    channel = hed[..., 0] - 0.5 * hed[..., 1]
    lo, hi = np.percentile(channel, [1, 99.9])
    return np.clip((channel - lo) / max(hi - lo, 1e-6), 0, 1)


def classical_detect(image: np.ndarray, config: ClassicalConfig | None = None) -> Detections:
    """Boxes of nucleated cells in an RGB uint8 image; score = how far the nucleus lies above the threshold."""
    from scipy import ndimage as ndi
    from skimage.feature import peak_local_max
    from skimage.filters import gaussian, threshold_otsu
    from skimage.measure import label, regionprops
    from skimage.morphology import disk, opening, remove_small_objects
    from skimage.segmentation import watershed

    config = config or ClassicalConfig()
    h, w = image.shape[:2]
    channel = gaussian(nucleus_channel(image), sigma=config.sigma)
    if float(channel.max() - channel.min()) < 1e-3:  # a blank field has no nuclei
        return Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))
    threshold = threshold_otsu(channel) + config.threshold_offset * float(channel.std())
    mask = opening(channel > threshold, disk(1))
    mask = remove_small_objects(mask, max_size=max(1, config.min_area - 1))
    if config.split_touching:
        distance = ndi.distance_transform_edt(mask)
        peaks = peak_local_max(distance, min_distance=config.min_distance, labels=label(mask), exclude_border=False)
        markers = np.zeros(mask.shape, dtype=np.int32)
        markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
        regions = watershed(-distance, markers, mask=mask)
    else:
        regions = label(mask)
    boxes, scores = [], []
    for region in regionprops(regions, intensity_image=channel):
        if region.area < config.min_area or (config.max_area and region.area > config.max_area):
            continue
        y0, x0, y1, x1 = region.bbox
        cx, cy, half_w, half_h = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
        half_w, half_h = half_w * config.expand, half_h * config.expand
        box = [max(0.0, cx - half_w), max(0.0, cy - half_h), min(float(w), cx + half_w), min(float(h), cy + half_h)]
        boxes.append(box)
        scores.append(float(np.clip((region.intensity_mean - threshold) / max(1 - threshold, 1e-6), 1e-3, 1.0)))
    if not boxes:
        return Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))
    return Detections(
        np.array(boxes, dtype=np.float32), np.array(scores, dtype=np.float32), np.ones(len(boxes), dtype=np.int64)
    )
