"""morphology.handcrafted: colour, size, shape and texture statistics of a cell crop; no weights.

A baseline that needs nothing to download and whose dimensions a hematologist can read: how dark and
how purple the cell is, how large its nucleus is relative to the cell, how round and how compact each
is, and how grainy the chromatin looks. It runs in torch on the same normalised batches as every other
encoder (it de-normalises with its own config), so extraction has one code path.

Masks come from the crop itself: the background of a smear is the brightest part of a cell crop, the
cell is what is clearly darker than it, and the nucleus is the darkest part of the cell.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, reduce

from features.preprocess import denormalize
from features.registry import Encoder, EncoderConfig, register_encoder
from mil.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_SIDE = 64  # shape statistics are stable at 64 px and cost nothing

QUANTILES = (0.1, 0.5, 0.9)
COLOUR = [f"{c}_{s}" for c in ("r", "g", "b", "sat", "val") for s in ("mean", "std", "p10", "p50", "p90")]
HUE = ["hue_cos", "hue_sin"]
SHAPE = [
    f"{region}_{s}"
    for region in ("cell", "nucleus")
    for s in ("area", "dx", "dy", "eccentricity", "elongation", "extent", "compactness")
]
REGION_COLOUR = [f"{region}_{c}" for region in ("nucleus", "cytoplasm") for c in ("r", "g", "b")]
RATIOS = ["nc_ratio", "nucleus_darkness", "cell_contrast"]
TEXTURE = ["grad_energy", "grad_energy_nucleus", "local_var", "local_var_nucleus", "laplace_energy"]
FEATURE_NAMES = COLOUR + HUE + SHAPE + REGION_COLOUR + RATIOS + TEXTURE
EMBED_DIM = len(FEATURE_NAMES)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,P) or (B,C,P) values, (B,P) float mask -> (B,) or (B,C) mean over masked pixels (0 where empty)."""
    weight = mask.sum(-1).clamp_min(1.0)  # (B,)
    if values.dim() == 3:
        return (values * mask.unsqueeze(1)).sum(-1) / weight.unsqueeze(-1)
    return (values * mask).sum(-1) / weight


def _quantiles(values: torch.Tensor, qs: tuple[float, ...]) -> torch.Tensor:
    """(..., P) -> (len(qs), ...) linear-interpolated quantiles, as torch.quantile computes them.

    torch.quantile refuses inputs over 16M elements, which a batch of a few hundred crops exceeds.
    """
    ordered = values.sort(dim=-1).values
    pos = torch.tensor(qs, dtype=values.dtype, device=values.device) * (values.shape[-1] - 1)
    lo, frac = pos.floor().long(), pos - pos.floor()
    hi = (lo + 1).clamp_max(values.shape[-1] - 1)
    low, high = ordered[..., lo], ordered[..., hi]  # (..., Q)
    out = low + (high - low) * frac
    return rearrange(out, "... q -> q ...")


def _shape_stats(mask: torch.Tensor, side: int) -> torch.Tensor:
    """(B,S,S) float mask -> (B,7): area, centroid offset, eccentricity, elongation, extent, compactness."""
    coords = (torch.arange(side, dtype=mask.dtype, device=mask.device) + 0.5) / side - 0.5  # pixel centres in [-.5,.5]
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    m = rearrange(mask, "b h w -> b (h w)")
    x, y = rearrange(xs, "h w -> 1 (h w)"), rearrange(ys, "h w -> 1 (h w)")
    area = m.mean(-1)  # (B,) fraction of the crop
    n = m.sum(-1).clamp_min(1.0)
    cx, cy = (m * x).sum(-1) / n, (m * y).sum(-1) / n
    dx, dy = x - cx.unsqueeze(-1), y - cy.unsqueeze(-1)
    mu20, mu02, mu11 = (m * dx * dx).sum(-1) / n, (m * dy * dy).sum(-1) / n, (m * dx * dy).sum(-1) / n
    # Eigenvalues of the second-moment matrix: the ellipse with the region's inertia.
    half_trace, root = (mu20 + mu02) / 2, torch.sqrt(((mu20 - mu02) / 2) ** 2 + mu11**2)
    lam_max, lam_min = half_trace + root, (half_trace - root).clamp_min(0.0)
    eccentricity = torch.sqrt((1 - lam_min / lam_max.clamp_min(1e-8)).clamp(0.0, 1.0))
    elongation = torch.sqrt(lam_min / lam_max.clamp_min(1e-8))
    # Extent: area over the bounding box; a solidity proxy (lobed or irregular nuclei fill less of it).
    present = mask > 0.5
    rows, cols = present.any(2), present.any(1)  # (B,S)
    height = rows.float().sum(-1) / side
    width = cols.float().sum(-1) / side
    extent = area / (height * width).clamp_min(1.0 / side**2)
    # Compactness: boundary pixels relative to the perimeter of a disc of the same area (1 for a disc).
    eroded = -F.max_pool2d(-mask.unsqueeze(1), 3, stride=1, padding=1).squeeze(1)
    boundary = (mask - eroded).clamp_min(0).sum((1, 2)) / side
    compactness = boundary / (2 * torch.sqrt(torch.pi * area).clamp_min(1.0 / side))
    return torch.stack([area, cx, cy, eccentricity, elongation, extent, compactness], dim=-1)  # (B,7)


class MorphologyEncoder(Encoder):
    """(B,3,S,S) normalised -> (B, EMBED_DIM) handcrafted statistics; deterministic, no parameters."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        side = x.shape[-1]
        rgb = denormalize(x, self.config).clamp(0.0, 1.0)  # (B,3,S,S) in [0,1]
        flat = rearrange(rgb, "b c h w -> b c (h w)")  # (B,3,P)
        val, _ = flat.max(1)  # (B,P) HSV value
        low, _ = flat.min(1)
        sat = (val - low) / val.clamp_min(1e-6)  # (B,P) HSV saturation
        channels = torch.cat([flat, sat.unsqueeze(1), val.unsqueeze(1)], dim=1)  # (B,5,P)
        q = _quantiles(channels, QUANTILES)  # (3,B,5)
        colour = torch.stack([channels.mean(-1), channels.std(-1), *q], dim=-1)  # (B,5,5)
        colour = rearrange(colour, "b c s -> b (c s)")  # (B,25)

        # Hue as a saturation-weighted circular mean: MGG purple vs pink cytoplasm vs red erythrocytes.
        r, g, b_ = flat.unbind(1)  # (B,P) each
        angle = torch.atan2(torch.sqrt(torch.tensor(3.0)) * (g - b_), 2 * r - g - b_)
        weight = sat / sat.sum(-1, keepdim=True).clamp_min(1e-6)
        hue = torch.stack([(weight * angle.cos()).sum(-1), (weight * angle.sin()).sum(-1)], dim=-1)  # (B,2)

        gray = reduce(rgb, "b c h w -> b h w", "mean")  # (B,S,S)
        gflat = rearrange(gray, "b h w -> b (h w)")
        g_lo, g_hi = _quantiles(gflat, (0.02, 0.95))  # (B,) each
        contrast = (g_hi - g_lo).clamp_min(1e-3)
        # Cell: clearly darker than the background; nucleus: the darkest part of the cell.
        cell_cut = rearrange(g_hi - 0.25 * contrast, "b -> b 1 1")
        nucleus_cut = rearrange(g_lo + 0.35 * contrast, "b -> b 1 1")
        cell = (gray < cell_cut).float()  # (B,S,S)
        nucleus = (gray < nucleus_cut).float() * cell
        cytoplasm = cell - nucleus
        shape = torch.cat([_shape_stats(cell, side), _shape_stats(nucleus, side)], dim=-1)  # (B,14)

        n_flat, c_flat = rearrange(nucleus, "b h w -> b (h w)"), rearrange(cytoplasm, "b h w -> b (h w)")
        region_colour = torch.cat([_masked_mean(flat, n_flat), _masked_mean(flat, c_flat)], dim=-1)  # (B,6)
        nc_ratio = n_flat.sum(-1) / rearrange(cell, "b h w -> b (h w)").sum(-1).clamp_min(1.0)
        darkness = g_hi - _masked_mean(gflat, n_flat)
        ratios = torch.stack([nc_ratio, darkness, contrast], dim=-1)  # (B,3)

        # Texture: gradient energy and 3x3 local variance, over the crop and inside the nucleus (chromatin).
        g4 = gray.unsqueeze(1)  # (B,1,S,S)
        gx = F.pad(g4[..., :, 1:] - g4[..., :, :-1], (0, 1, 0, 0))
        gy = F.pad(g4[..., 1:, :] - g4[..., :-1, :], (0, 0, 0, 1))
        energy = rearrange((gx**2 + gy**2) * side**2, "b 1 h w -> b (h w)")  # scaled so it is size-independent
        local_mean = F.avg_pool2d(g4, 3, stride=1, padding=1, count_include_pad=False)
        local_sq = F.avg_pool2d(g4**2, 3, stride=1, padding=1, count_include_pad=False)
        local_var = rearrange((local_sq - local_mean**2).clamp_min(0), "b 1 h w -> b (h w)")
        laplace = rearrange((g4 - local_mean) ** 2, "b 1 h w -> b (h w)")
        texture = torch.stack(
            [
                energy.mean(-1),
                _masked_mean(energy, n_flat),
                local_var.mean(-1) * 100,
                _masked_mean(local_var, n_flat) * 100,
                laplace.mean(-1) * 100,
            ],
            dim=-1,
        )  # (B,5)
        out = torch.cat([colour, hue, shape, region_colour, ratios, texture], dim=-1)  # (B,EMBED_DIM)
        return torch.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)


@register_encoder(
    "morphology.handcrafted",
    description="colour, size, shape and texture statistics of the crop (a baseline that needs no weights)",
    embed_dim=EMBED_DIM,
    input_size=DEFAULT_SIDE,
    weights_source="none",
)
def morphology_handcrafted(arch: str, tag: str, *, weights: str | None, input_size: int | None) -> MorphologyEncoder:
    if weights is not None:
        raise ConfigError(f"{arch}.{tag} has no weights; drop --weights {weights}")
    config = EncoderConfig(
        name=f"{arch}.{tag}",
        arch=arch,
        tag=tag,
        input_size=int(input_size or DEFAULT_SIDE),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        interpolation="bilinear",
        embed_dim=EMBED_DIM,
        weights_source="none",
        extra={"features": FEATURE_NAMES},
    )
    return MorphologyEncoder(config=config)
