"""Detect cells on images and write them as a cell table (det_score, source='detector') the features stage reads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mil.cell_table import CellTable
from mil.detector.classical import ClassicalConfig, classical_detect
from mil.detector.data import to_tensor
from mil.detector.model import DetectorConfig, load_detector
from mil.detector.tiling import Detections, detect_tiled
from mil.errors import InputError
from mil.images import load_rgb

TTA_FUSE_IOU = 0.55  # weighted box fusion's overlap for one cell seen in several views (its authors' default)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


@dataclass
class CellDetector:
    """A trained detector plus its config; `detect(image)` works on fields of any size through tiling."""

    model: torch.nn.Module
    config: DetectorConfig
    tile_size: int = 512  # network pixels (after pixel_scale)
    overlap: int = 128  # network pixels; must exceed the largest cell for the border rule of tiling.py
    device: str = "cpu"

    @classmethod
    def load(
        cls, checkpoint: str | Path, *, nms_iou: float | None = None, tta: bool | None = None, **kwargs
    ) -> CellDetector:
        """The detector of a checkpoint; `nms_iou` and `tta` override the checkpoint's inference settings."""
        model, config = load_detector(checkpoint)
        detector = cls(model=model, config=config, **kwargs)
        if nms_iou is not None:
            detector.set_nms_iou(nms_iou)
        if tta is not None:
            detector.config.tta = bool(tta)
        return detector

    def set_nms_iou(self, iou: float) -> None:
        """Overlap above which a lower-scored box of the same class is dropped (the network's and the tiles')."""
        self.config.nms_iou = float(iou)
        self.model.roi_heads.nms_thresh = float(iou)

    def set_score_threshold(self, score: float) -> None:
        """Lowest class score the network reports (a low one lengthens the precision-recall curve AP is read from)."""
        self.config.score_threshold = float(score)
        self.model.roi_heads.score_thresh = float(score)

    @torch.no_grad()
    def predict_tile(self, tile: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One network pass on an already scaled tile (h, w, 3) uint8 -> boxes in tile pixels."""
        self.model.to(self.device).eval()
        if not self.config.tta:
            out = self.model([to_tensor(tile).to(self.device)])[0]
            return out["boxes"].cpu().numpy(), out["scores"].cpu().numpy(), out["labels"].cpu().numpy()
        from mil.detector.tta import VIEWS, fuse, unview, view

        outs = self.model([to_tensor(view(tile, name)).to(self.device) for name in VIEWS])
        h, w = tile.shape[:2]
        boxes = np.concatenate([unview(o["boxes"].cpu().numpy(), name, w, h) for o, name in zip(outs, VIEWS)])
        scores = np.concatenate([o["scores"].cpu().numpy() for o in outs])
        labels = np.concatenate([o["labels"].cpu().numpy() for o in outs])
        boxes, scores, labels = fuse(boxes, scores, labels, n_views=len(VIEWS), iou=TTA_FUSE_IOU)
        keep = slice(0, self.config.detections_per_image)
        return boxes[keep], scores[keep], labels[keep]

    def detect(self, image: np.ndarray) -> Detections:
        """Cells of an RGB uint8 image, boxes in the image's own pixels."""
        from PIL import Image

        scale = self.config.pixel_scale
        scaled = image
        if scale != 1.0:
            size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
            scaled = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
        found = detect_tiled(
            self.predict_tile, scaled, tile_size=self.tile_size, overlap=self.overlap, nms_iou=self.config.nms_iou
        )
        found.boxes = found.boxes / scale
        return found


def find_images(paths: list[str | Path]) -> list[Path]:
    """Image files named directly or found (recursively, sorted) in the named folders."""
    found, missing = [], []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES)
        elif p.exists():
            found.append(p)
        else:
            missing.append(str(p))
    if missing:
        raise InputError(f"image path(s) do not exist: {missing}; name image files or folders of images")
    if not found:
        raise InputError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {[str(p) for p in paths]}")
    return found


def detect_images(
    images: list[tuple[str | Path, str]],
    *,
    detector: CellDetector | None = None,
    classical: ClassicalConfig | None = None,
    min_score: float = 0.0,
    progress: bool = False,
) -> CellTable:
    """(image path, patient id) pairs -> predicted cell table; the trained `detector` or, without one, the
    classical baseline. Boxes are clipped to the image and rounded to whole pixels. `progress` shows images/s
    (mil.progress: a bar on a terminal, timed lines in a log)."""
    from mil.progress import track

    rows = []
    for path, patient in track(images, "detect", "images", enabled=progress):
        path = Path(path).resolve()
        try:
            image = load_rgb(path)
        except Exception as e:  # PIL raises many types for a broken file
            raise InputError(f"image {path} (patient {patient!r}) cannot be read ({e}); fix or drop it") from e
        found = detector.detect(image) if detector is not None else classical_detect(image, classical)
        h, w = image.shape[:2]
        method = "fasterrcnn" if detector is not None else "classical"
        names = detector.config.classes if detector is not None else ("cell",)
        for k in range(len(found)):
            if found.scores[k] < min_score:
                continue
            x0, y0, x1, y1 = found.boxes[k]
            x0, y0 = max(0, int(np.floor(x0))), max(0, int(np.floor(y0)))
            x1, y1 = min(w, int(np.ceil(x1))), min(h, int(np.ceil(y1)))
            if x1 <= x0 or y1 <= y0:
                continue
            name = names[int(found.labels[k]) - 1]
            rows.append(
                {
                    "cell_id": f"{patient}:{path.stem}:det{k}",
                    "patient_id": patient,
                    "image_path": str(path),
                    "x0": x0,
                    "y0": y0,
                    "x1": x1,
                    "y1": y1,
                    # A class-agnostic detector knows no cell type: the classifier or a reader gives the label.
                    "label": "" if tuple(names) == ("cell",) else name,
                    "raw_label": "",
                    "det_score": round(float(found.scores[k]), 5),
                    "source": "detector",
                    "det_method": method,
                    "det_class": name,
                }
            )
    return CellTable(rows=rows)
