"""A centre's systematic stain and scanner difference, applied on top of each patient's own stain variation.

A centre other than the first has its own staining recipe and scanner. At strength S (`stain_shift`):
  - stain recipe: the eosin and methylene-blue components of every material's optical density are scaled
    (colour deconvolution in OD space: OD' = B diag(1 + S e, 1 + S b, 1) B^-1 OD), plus per-channel OD gains
    and an overall stain strength;
  - scanner: white balance and brightness (a per-channel scale of the white level), a tone curve
    (gamma) and slightly softer optics (+0.25 S px blur).
It is a colour and intensity transform (cell shapes, sizes and positions are unchanged), so per-channel LAB
mean/std matching (Reinhard normalisation) removes most of it. JPEG compression, which colour normalisation
cannot undo, is a separate per-centre setting (`jpeg_quality`), off unless asked for. Nothing here draws from
the patient's random stream: a patient's cells and layout are the same at every strength; only colours change.

Centre B has the hand-set profile below; centres C, D, ... get profiles of the same size in other directions,
drawn from a stream that depends on the centre alone (not on the seed), so every cohort's B (or C) looks alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mil.synth.palette import Stain, optical_density

# Unit OD directions of the two dyes of May-Grunwald-Giemsa: eosin (pink-orange) and methylene blue / azure.
EOSIN = optical_density((240, 110, 160))
METHYLENE_BLUE = optical_density((60, 120, 210))


@dataclass(frozen=True)
class Profile:
    """A centre's difference at strength 1 (each entry scales linearly with the strength)."""

    eosin: float  # relative change of the eosin component of every OD
    blue: float  # relative change of the methylene-blue component
    channel_gain: tuple[float, float, float]  # relative per-channel OD gain (R, G, B)
    intensity: float  # relative overall stain strength
    white: tuple[float, float, float]  # relative white level per channel (white balance and brightness)
    gamma: float  # change of the tone-curve exponent
    blur: float  # extra blur sigma in pixels


# A warm, eosin-heavy stain with weaker blue (paler, redder nuclei), on a yellowish, darker, softer scanner.
CENTRE_B = Profile(
    eosin=0.4,
    blue=-0.25,
    channel_gain=(-0.08, 0.0, 0.1),
    intensity=-0.1,
    white=(0.0, -0.03, -0.1),
    gamma=0.3,
    blur=0.25,
)


def profile(centre_index: int) -> Profile | None:
    """The profile of centre `centre_index` (0 = the reference centre, which has none)."""
    if centre_index <= 0:
        return None
    if centre_index == 1:
        return CENTRE_B
    rng = np.random.default_rng(np.random.SeedSequence([0x5C1F7, int(centre_index)]))

    def vary(x):
        x = np.asarray(x, dtype=np.float64)
        return x * rng.choice([-1.0, 1.0], size=x.shape) * rng.uniform(0.6, 1.2, size=x.shape)

    b = CENTRE_B
    return Profile(
        eosin=float(vary(b.eosin)),
        blue=float(vary(b.blue)),
        channel_gain=tuple(float(v) for v in vary(b.channel_gain[::-1])),
        intensity=float(vary(b.intensity)),
        white=tuple(float(v) for v in -np.abs(vary(b.white[::-1]))),  # a white level can only drop below 255
        gamma=float(vary(b.gamma)),
        blur=float(b.blur * rng.uniform(0.6, 1.2)),
    )


def _mixing(eosin: float, blue: float) -> np.ndarray:
    """OD -> OD matrix that scales the eosin and methylene-blue components of an OD vector."""
    e = EOSIN / np.linalg.norm(EOSIN)
    b = METHYLENE_BLUE / np.linalg.norm(METHYLENE_BLUE)
    basis = np.stack([e, b, np.cross(e, b)], axis=1).astype(np.float64)
    scale = np.diag([max(1.0 + eosin, 0.1), max(1.0 + blue, 0.1), 1.0])
    return (basis @ scale @ np.linalg.inv(basis)).astype(np.float32)


def shift_stain(stain: Stain, centre_index: int, strength: float, jpeg_quality: int = 0) -> Stain:
    """The patient's stain as centre `centre_index` shows it at shift `strength` (0: unchanged, same object),
    stored as JPEG of `jpeg_quality` (0 = lossless)."""
    if jpeg_quality:
        stain = stain.replace(jpeg_quality=int(jpeg_quality))
    p = profile(centre_index)
    s = float(strength)
    if p is None or s == 0.0:
        return stain
    gain = np.clip(1.0 + s * np.asarray(p.channel_gain), 0.3, 3.0).astype(np.float32)
    white = np.clip(stain.white * (1.0 + s * np.asarray(p.white)), 80.0, 255.0).astype(np.float32)
    return stain.replace(
        channel_gain=(stain.channel_gain * gain).astype(np.float32),
        intensity=float(stain.intensity * max(1.0 + s * p.intensity, 0.3)),
        white=white,
        blur_sigma=float(stain.blur_sigma + s * p.blur),
        mixing=_mixing(s * p.eosin, s * p.blue),
        tone_gamma=float(max(1.0 + s * p.gamma, 0.3)),
    )
