"""Cell crops from a cell table, smear augmentations, and patient-grouped splits.

Crops are cut once and kept in memory as uint8 arrays of `crop_size`: a cell table of tens of thousands of cells
fits, and every epoch then costs no image decoding (the slow part on a 2-core machine).
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mil.errors import InputError, listing
from mil.images import load_rgb


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentations that keep a smear a smear: no orientation exists, stains and scanners vary.

    `light` = flips, 90-degree rotations and a mild stain jitter; `strong` (the default of `mil train-classifier`)
    adds any rotation angle, a zoom, hue/saturation/gamma shifts and an occasional blur, which is what lets a few
    hundred labelled cells per class generalise across smears (see docs/real_data.md for the measured gain).
    """

    flips: bool = True
    rot90: bool = True
    # Per-channel multiplicative gain (stain strength) and additive shift (scanner white balance), in [0, 1] units.
    stain_gain: float = 0.08
    stain_shift: float = 0.04
    brightness: float = 0.1
    contrast: float = 0.1
    rotate_degrees: float = 0.0  # any angle up to this, reflect-padded (cells have no up)
    zoom: float = 0.0  # scale by 1 +- zoom around the centre (boxes are a little loose or tight)
    hue: float = 0.0  # hue shift, fraction of the colour circle +-
    saturation: float = 0.0  # saturation factor 1 +- this
    gamma: float = 0.0  # gamma 1 +- this
    blur_p: float = 0.0  # probability of a Gaussian blur (sigma 0.3-1 px: focus varies)

    @classmethod
    def named(cls, strength: str) -> AugmentConfig | None:
        if strength not in AUGMENT:
            raise ValueError(f"augment {strength!r} is unknown; choose one of {list(AUGMENT)}")
        if strength == "none":
            return None
        if strength == "light":
            return cls()
        return cls(
            stain_gain=0.12, stain_shift=0.05, brightness=0.12, contrast=0.15, rotate_degrees=180.0, zoom=0.1,
            hue=0.03, saturation=0.2, gamma=0.15, blur_p=0.2,
        )  # fmt: skip


AUGMENT = ("strong", "light", "none")


def labelled_rows(rows: list[dict], class_names: list[str] | tuple[str, ...]) -> list[dict]:
    """Rows whose label is one of `class_names` (unlabelled and 'drop' cells never train or score)."""
    known = set(class_names)
    return [r for r in rows if r.get("label", "") in known]


def crop_box(image: np.ndarray, box: tuple[int, int, int, int], crop_size: int) -> np.ndarray:
    """The box's pixels resized to crop_size x crop_size (bilinear), as the encoder's crop_transform sees a cell."""
    from PIL import Image

    h, w = image.shape[:2]
    x0, y0, x1, y1 = (int(v) for v in box)
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"box {box} has no pixels inside the {w}x{h} image")
    crop = Image.fromarray(image[y0:y1, x0:x1])
    return np.asarray(crop.resize((crop_size, crop_size), Image.BILINEAR), dtype=np.uint8)


def load_crops(rows: list[dict], *, crop_size: int) -> np.ndarray:
    """(N, S, S, 3) uint8 crops of the rows' boxes; each image is decoded once. Unreadable images: one error."""

    crops = np.zeros((len(rows), crop_size, crop_size, 3), dtype=np.uint8)
    by_image: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        by_image[str(r["image_path"])].append(i)
    problems = []
    for path, idx in by_image.items():
        try:
            image = load_rgb(path)
        except Exception as e:  # PIL raises many types for a broken file
            problems.append(f"image {path} ({len(idx)} cells, e.g. {rows[idx[0]].get('cell_id')}): {e}")
            continue
        for i in idx:
            try:
                crops[i] = crop_box(image, tuple(rows[i][c] for c in ("x0", "y0", "x1", "y1")), crop_size)
            except ValueError as e:
                problems.append(f"cell {rows[i].get('cell_id')} of {Path(path).name}: {e}")
    if problems:
        raise InputError(
            f"{len(problems)} cell(s) cannot be cropped:\n{listing(problems)}\n"
            "Fix image_path or the boxes in the cell table (validate it with mil.cell_table.validate_cell_table)."
        )
    return crops


def _rotate_zoom(x: torch.Tensor, degrees: float, scale: float) -> torch.Tensor:
    """Rotate (3, S, S) by `degrees` and zoom by `scale` about the centre; reflection fills the corners."""
    import math

    import torch.nn.functional as F

    a = math.radians(degrees)
    cos, sin = math.cos(a) / scale, math.sin(a) / scale
    theta = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=x.dtype).unsqueeze(0)  # (1, 2, 3)
    grid = F.affine_grid(theta, [1, *x.shape], align_corners=False)
    return F.grid_sample(x.unsqueeze(0), grid, mode="bilinear", padding_mode="reflection", align_corners=False)[0]


def smear_augment(x: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Augment one crop (3, S, S) in [0, 1]; `generator` makes the draw reproducible per seed."""
    import torchvision.transforms.v2.functional as TF

    def uniform(scale: float, n: int = 1) -> torch.Tensor:
        return (torch.rand(n, generator=generator) * 2 - 1) * scale

    if config.flips and torch.rand(1, generator=generator).item() < 0.5:
        x = x.flip(-1)
    if config.flips and torch.rand(1, generator=generator).item() < 0.5:
        x = x.flip(-2)
    if config.rot90:
        k = int(torch.randint(0, 4, (1,), generator=generator).item())
        x = torch.rot90(x, k, dims=(-2, -1))
    if config.rotate_degrees or config.zoom:
        angle = float(uniform(config.rotate_degrees)) if config.rotate_degrees else 0.0
        x = _rotate_zoom(x, angle, 1 + float(uniform(config.zoom)) if config.zoom else 1.0)
    if config.hue:
        x = TF.adjust_hue(x, float(uniform(config.hue)))
    if config.saturation:
        x = TF.adjust_saturation(x, 1 + float(uniform(config.saturation)))
    gain = 1 + uniform(config.stain_gain, 3).view(3, 1, 1)
    shift = uniform(config.stain_shift, 3).view(3, 1, 1)
    x = x * gain + shift
    mean = x.mean()
    x = (x - mean) * (1 + uniform(config.contrast)) + mean + uniform(config.brightness)
    x = x.clamp(0, 1)
    if config.gamma:
        x = x ** (1 + float(uniform(config.gamma)))
    if config.blur_p and torch.rand(1, generator=generator).item() < config.blur_p:
        sigma = 0.3 + 0.7 * float(torch.rand(1, generator=generator))
        x = TF.gaussian_blur(x, kernel_size=[3, 3], sigma=[sigma, sigma])
    return x.clamp(0, 1)


class CropDataset(torch.utils.data.Dataset):
    """Crops + integer targets -> normalized float tensors (3, S, S); augmentation only when `augment` is set."""

    def __init__(
        self,
        *,
        crops: np.ndarray,
        targets: np.ndarray,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        augment: AugmentConfig | None = None,
        seed: int = 0,
    ) -> None:
        self.crops = crops
        self.targets = np.asarray(targets, dtype=np.int64)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.augment = augment
        self.seed = seed

    def __len__(self) -> int:
        return len(self.crops)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        # Training samplers give (index, epoch) (mil.classifier.resume.EpochSampler): the epoch travels with the
        # index, so worker processes and resumed runs seed the same augmentation without any epoch hook.
        i, epoch = item if isinstance(item, tuple) else (item, 0)
        x = torch.from_numpy(self.crops[i]).permute(2, 0, 1).float() / 255.0  # (3, S, S)
        if self.augment is not None:
            # Seeded per (epoch, item) so a run is reproducible with any number of loader workers.
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch * 100_003 + i)
            x = smear_augment(x, self.augment, g)
        return (x - self.mean) / self.std, int(self.targets[i])


def patient_split(rows: list[dict], *, val_fraction: float, test_fraction: float, seed: int) -> dict[str, list[str]]:
    """Patients -> train / val / test, no patient in two parts, stratified by each patient's majority class.

    StratifiedGroupKFold gives the test part (about `test_fraction` of patients), a second one the validation part
    from the rest; with too few patients per class it falls back to GroupShuffleSplit.
    """
    patients = sorted({r["patient_id"] for r in rows})
    if len(patients) < 3:
        raise InputError(
            f"a patient-grouped train/val/test split needs at least 3 patients, the cell table has {len(patients)}; "
            "pass an explicit split or add patients"
        )
    test = _group_part(rows, patients, test_fraction, seed)
    rest = [p for p in patients if p not in set(test)]
    val = _group_part([r for r in rows if r["patient_id"] in set(rest)], rest, val_fraction, seed + 1)
    train = [p for p in rest if p not in set(val)]
    return {"train": train, "val": sorted(val), "test": sorted(test)}


def _group_part(rows: list[dict], patients: list[str], fraction: float, seed: int) -> list[str]:
    from sklearn.model_selection import GroupShuffleSplit, StratifiedGroupKFold

    if fraction <= 0:
        return []
    n_part = max(1, round(fraction * len(patients)))
    if n_part >= len(patients):
        raise InputError(f"a part of {fraction:.0%} of {len(patients)} patients leaves none to train on")
    groups = np.array([r["patient_id"] for r in rows])
    labels = np.array([r.get("label", "") or "?" for r in rows])
    n_splits = max(2, round(len(patients) / n_part))
    try:
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        with warnings.catch_warnings():  # best effort: a rare cell class cannot reach every part, as sklearn warns
            warnings.filterwarnings("ignore", message="The least populated class in y has only")
            _, part_idx = next(splitter.split(np.zeros(len(rows)), labels, groups))
    except ValueError:
        splitter = GroupShuffleSplit(n_splits=1, test_size=n_part, random_state=seed)
        _, part_idx = next(splitter.split(np.zeros(len(rows)), labels, groups))
    return sorted({str(g) for g in groups[part_idx]})  # plain str: the split is saved in checkpoints
