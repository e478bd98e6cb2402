"""Preprocessing derived from an encoder's config record: resize to `input_size`, then mean/std.

Nothing here is typed per encoder: the side, interpolation and normalisation all come from the
`EncoderConfig`, so an encoder and its bags can never disagree about how a crop was prepared.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from features.registry import EncoderConfig
from mil.errors import InputError


def _resize(x: torch.Tensor, size: int, interpolation: str) -> torch.Tensor:
    """(B,3,H,W) float in [0,1] -> (B,3,size,size)."""
    if x.shape[-2:] == (size, size):
        return x
    if interpolation == "nearest":
        return F.interpolate(x, size=(size, size), mode="nearest")
    # Antialias matches PIL's resize when a large crop is shrunk (timm's default path uses PIL).
    out = F.interpolate(x, size=(size, size), mode=interpolation, align_corners=False, antialias=True)
    return out.clamp_(0.0, 1.0) if interpolation == "bicubic" else out


def _stats(config: EncoderConfig, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(config.mean, dtype=x.dtype, device=x.device)
    std = torch.tensor(config.std, dtype=x.dtype, device=x.device)
    return rearrange(mean, "c -> 1 c 1 1"), rearrange(std, "c -> 1 c 1 1")


def normalize(x: torch.Tensor, config: EncoderConfig) -> torch.Tensor:
    """(B,3,H,W) float in [0,1] -> normalised with the config's mean/std."""
    mean, std = _stats(config, x)
    return (x - mean) / std


def denormalize(x: torch.Tensor, config: EncoderConfig) -> torch.Tensor:
    """Inverse of `normalize`: back to [0,1] RGB (used by encoders that measure colour)."""
    mean, std = _stats(config, x)
    return x * std + mean


def crop_transform(config: EncoderConfig) -> Callable[[np.ndarray], torch.Tensor]:
    """A callable: uint8 crop (H,W,3) -> float tensor (3,S,S), resized and normalised per `config`."""
    size, interpolation = config.input_size, config.interpolation

    def transform(crop: np.ndarray) -> torch.Tensor:
        if crop.ndim != 3 or crop.shape[2] != 3 or crop.dtype != np.uint8:
            raise InputError(
                f"crop must be uint8 HxWx3 RGB, got {crop.dtype} {crop.shape}; convert the image to RGB first"
            )
        if crop.shape[0] == 0 or crop.shape[1] == 0:
            raise InputError(f"empty crop {crop.shape}: the cell box lies outside its image or has zero size")
        x = torch.from_numpy(np.ascontiguousarray(crop))
        x = rearrange(x, "h w c -> 1 c h w").float().div_(255.0)
        x = _resize(x, size, interpolation)  # (1,3,S,S)
        return normalize(x, config)[0]  # (3,S,S)

    return transform


def batch_transform(config: EncoderConfig) -> Callable[[torch.Tensor], torch.Tensor]:
    """A callable for uint8 batches already at the input size: (B,S,S,3) uint8 -> (B,3,S,S) normalised.

    Lets extraction move uint8 crops to the device and normalise there (4x less host-to-device traffic).
    """
    size = config.input_size

    def transform(batch: torch.Tensor) -> torch.Tensor:
        x = rearrange(batch, "b h w c -> b c h w").float().div_(255.0)
        x = _resize(x, size, config.interpolation)  # (B,3,S,S)
        return normalize(x, config)

    return transform
