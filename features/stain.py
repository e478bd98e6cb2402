"""Colour (stain) normalisation at extraction: Reinhard's method through torchstain, off unless asked for.

Reinhard et al. (2001) match the mean and standard deviation of each LAB channel of an image to those of a
reference image. Here each *field image* is normalised once, before its cells are cropped, not each crop:
stain and scanner differences act on the whole smear, and a field (cells plus background) gives stable
statistics, whereas a single crop's statistics are those of its cell type (a dark blast, a pink
erythrocyte), so normalising crop by crop would wash out exactly the colour that tells cell types apart.

What was applied is recorded in every bag's `preprocess` attribute (method, the reference's sha256, its
fitted LAB statistics), so the bag directory's consistency check and the extract cache tell normalised bags
from plain ones and one reference from another.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mil.errors import ConfigError, InputError

STAIN_METHODS = ("reinhard",)
# A LAB channel flatter than this (in LAB units, L in 0..100) cannot be rescaled: a blank or grey image.
MIN_CHANNEL_STD = 0.01
STAT_DECIMALS = 4  # recorded statistics are rounded, and the rounded values are the ones applied


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _lab_channels(image: np.ndarray) -> list[np.ndarray]:
    """uint8 (H, W, 3) RGB -> [L, a, b] float32 planes in torchstain's units (L 0..100, a and b about 0)."""
    from torchstain.numpy.utils import lab_split, rgb2lab

    return list(lab_split(rgb2lab(image.astype("float32") / 255)))


def _lab_stats(channels: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    from torchstain.numpy.utils import get_mean_std

    stats = np.array([get_mean_std(c) for c in channels], dtype=np.float32)  # (3, 2)
    return stats[:, 0], stats[:, 1]


def lab_statistics(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(3,) means and (3,) standard deviations of an RGB image's L, a, b channels (what Reinhard matches)."""
    return _lab_stats(_lab_channels(image))


@dataclass(frozen=True)
class ReinhardNorm:
    """Maps a uint8 RGB image to one whose LAB means and stds are the reference's (picklable for workers)."""

    lab_mean: tuple[float, float, float]
    lab_std: tuple[float, float, float]
    reference_sha256: str

    def record(self) -> dict:
        """The provenance entry: everything that determines the output, nothing that does not (no path)."""
        return {
            "method": "reinhard",
            "reference_sha256": self.reference_sha256,
            "reference_lab_mean": list(self.lab_mean),
            "reference_lab_std": list(self.lab_std),
        }

    def __call__(self, image: np.ndarray, where: str = "image") -> np.ndarray:
        """torchstain's NumpyReinhardNormalizer.normalize, step by step so a flat field is refused, not NaN."""
        from torchstain.numpy.utils import lab2rgb, lab_merge, standardize

        channels = _lab_channels(image)
        means, stds = _lab_stats(channels)
        if not np.all(stds >= MIN_CHANNEL_STD):
            raise InputError(
                f"{where} has almost no colour variation (LAB std {np.round(stds, 4).tolist()}), so Reinhard "
                "normalisation is undefined for it; check the image, or extract without --stain-norm"
            )
        target_mean = np.asarray(self.lab_mean, dtype=np.float32)
        target_std = np.asarray(self.lab_std, dtype=np.float32)
        result = [
            standardize(x, mu, sd) * sd_t + mu_t
            for x, mu, sd, mu_t, sd_t in zip(channels, means, stds, target_mean, target_std)
        ]
        return (lab2rgb(lab_merge(*result)) * 255).astype("uint8")


def fit_stain_norm(method: str, reference: Path | None) -> ReinhardNorm:
    """The normaliser of `method` fitted on the reference image (torchstain's fit), checked and rounded."""
    from features.cropping import load_rgb

    if method not in STAIN_METHODS:
        raise ConfigError(f"--stain-norm {method!r} is not known; choose one of {', '.join(('none', *STAIN_METHODS))}")
    if reference is None:
        raise ConfigError(
            f"--stain-norm {method} needs --stain-reference IMAGE: a field image whose colours every bag should "
            "share (for external validation, one of the training centre's fields); there is no built-in reference"
        )
    reference = Path(reference)
    try:
        image = load_rgb(str(reference))
    except Exception as e:  # PIL raises many types for a broken or missing file
        raise InputError(
            f"--stain-reference {reference} cannot be read ({type(e).__name__}: {e}); give a PNG/JPEG/TIFF field image"
        ) from e
    from torchstain.numpy.normalizers import NumpyReinhardNormalizer

    fitted = NumpyReinhardNormalizer()
    fitted.fit(image)
    means = np.round(np.asarray(fitted.target_means, dtype=np.float64), STAT_DECIMALS)
    stds = np.round(np.asarray(fitted.target_stds, dtype=np.float64), STAT_DECIMALS)
    if not (np.all(np.isfinite(means)) and np.all(stds >= MIN_CHANNEL_STD)):
        raise InputError(
            f"--stain-reference {reference} has almost no colour variation (LAB std {stds.tolist()}); "
            "choose a field image with cells and background"
        )
    return ReinhardNorm(
        lab_mean=tuple(float(v) for v in means),
        lab_std=tuple(float(v) for v in stds),
        reference_sha256=file_sha256(reference),
    )
