"""Detection samples from a cell table: one sample per image, every box of that image as a target."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch

from mil.cell_table import CellTable
from mil.errors import InputError, listing
from mil.images import load_rgb


@dataclass
class DetectionSample:
    image_path: str
    patient_id: str
    boxes: np.ndarray  # (K, 4) float32 x0 y0 x1 y1, pixels of the original image
    labels: np.ndarray  # (K,) int64, 1-based (0 is background)


def samples_from_cells(
    cells: CellTable, classes: tuple[str, ...], patients: list[str] | None = None
) -> list[DetectionSample]:
    """Group the table by image. classes == ('cell',) maps every box to class 1 (class-agnostic detection);
    otherwise each row's label must be one of `classes`, and all unknown labels are listed in one error."""
    agnostic = tuple(classes) == ("cell",)
    index = {c: i + 1 for i, c in enumerate(classes)}
    keep = set(patients) if patients is not None else None
    by_image: dict[str, list[dict]] = defaultdict(list)
    for r in cells.rows:
        if keep is None or r["patient_id"] in keep:
            by_image[str(r["image_path"])].append(r)
    problems = []
    samples = []
    for path, rows in sorted(by_image.items()):
        labels = []
        for r in rows:
            if agnostic:
                labels.append(1)
            elif r.get("label", "") in index:
                labels.append(index[r["label"]])
            else:
                problems.append(f"cell {r.get('cell_id')} of {path}: label {r.get('label', '')!r}")
        boxes = np.array([[r["x0"], r["y0"], r["x1"], r["y1"]] for r in rows], dtype=np.float32).reshape(-1, 4)
        samples.append(DetectionSample(path, rows[0]["patient_id"], boxes, np.array(labels, dtype=np.int64)))
    if problems:
        raise InputError(
            f"{len(problems)} cell(s) have labels that are not detector classes {list(classes)}:\n{listing(problems)}\n"
            "Train class-agnostic (--classes cell) or list every label with --classes."
        )
    return samples


def load_scaled(path: str, pixel_scale: float) -> np.ndarray:
    """RGB uint8 image resized by `pixel_scale` (the scale the network works at)."""
    from PIL import Image

    image = load_rgb(path)
    if pixel_scale == 1.0:
        return image
    im = Image.fromarray(image)
    size = (max(1, round(im.width * pixel_scale)), max(1, round(im.height * pixel_scale)))
    return np.asarray(im.resize(size, Image.BILINEAR), dtype=np.uint8)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).float() / 255.0  # (3, H, W)


@dataclass(frozen=True)
class SmearAugment:
    """Augmentations that keep a smear a smear: it has no up or left (flips, rotations by 90 degrees), and stains
    and scanners vary (per-channel gain, brightness, contrast). Boxes follow every geometric change exactly."""

    flips: bool = True
    rot90: bool = True
    stain_gain: float = 0.08  # per-channel multiplicative gain, +-
    brightness: float = 0.08  # additive, in [0, 1] units, +-
    contrast: float = 0.1  # +-


def augment_field(
    image: torch.Tensor, boxes: torch.Tensor, config: SmearAugment, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Image (3, H, W) in [0, 1] and its boxes (K, 4) x0 y0 x1 y1 -> augmented copies; seeded by `generator`."""

    def coin() -> bool:
        return torch.rand(1, generator=generator).item() < 0.5

    def uniform(scale: float, n: int = 1) -> torch.Tensor:
        return (torch.rand(n, generator=generator) * 2 - 1) * scale

    _, h, w = image.shape
    x0, y0, x1, y1 = boxes.unbind(1)
    if config.flips and coin():
        image, (x0, x1) = image.flip(-1), (w - x1, w - x0)
    if config.flips and coin():
        image, (y0, y1) = image.flip(-2), (h - y1, h - y0)
    if config.rot90 and coin():
        # Counter-clockwise by 90 degrees: pixel (x, y) of a W-wide image goes to (y, W - x); H and W swap.
        image = torch.rot90(image, 1, dims=(-2, -1))
        x0, y0, x1, y1 = y0, w - x1, y1, w - x0
    boxes = torch.stack([x0, y0, x1, y1], dim=1)
    if config.stain_gain or config.brightness or config.contrast:
        image = image * (1 + uniform(config.stain_gain, 3).view(3, 1, 1))
        mean = image.mean()
        image = (image - mean) * (1 + uniform(config.contrast)) + mean + uniform(config.brightness)
        image = image.clamp(0, 1)
    return image, boxes


class DetectionDataset(torch.utils.data.Dataset):
    """Scaled images (cached in memory after the first read) + scaled boxes; smear augmentation when augmenting."""

    def __init__(
        self,
        *,
        samples: list[DetectionSample],
        pixel_scale: float,
        augment: bool | SmearAugment,
        seed: int = 0,
    ) -> None:
        self.samples = samples
        self.pixel_scale = pixel_scale
        self.augment = (SmearAugment() if augment is True else augment) or None
        self.seed = seed
        self.epoch = 0
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict]:
        sample = self.samples[i]
        if i not in self._cache:
            try:
                self._cache[i] = load_scaled(sample.image_path, self.pixel_scale)
            except Exception as e:  # PIL raises many types for a broken file
                raise InputError(f"image {sample.image_path} cannot be read ({e}); fix or remove its rows") from e
        image = to_tensor(self._cache[i])  # (3, H, W)
        boxes = torch.from_numpy(sample.boxes * self.pixel_scale).reshape(-1, 4)  # (K, 4)
        if self.augment is not None:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 100_003 + i)
            image, boxes = augment_field(image, boxes, self.augment, g)
        return image, {"boxes": boxes.reshape(-1, 4), "labels": torch.from_numpy(sample.labels)}


def collate(batch):
    return tuple(zip(*batch))
