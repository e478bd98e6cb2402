"""A May-Grunwald-Giemsa-like palette and per-patient stain and scanner variation.

Colours compose as optical densities (Beer-Lambert): a stain's OD is -ln(transmitted / white), overlapping
material adds OD, and the image is white * exp(-OD). That is why stacked cells darken naturally and why a
per-channel OD gain reads as a stain-batch hue shift rather than a flat colour cast.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

# Transmitted colour (RGB, 0-255) of each stained material at unit density.
COLOURS: dict[str, tuple[int, int, int]] = {
    "chromatin": (92, 42, 122),  # azure-eosin purple of condensed chromatin
    "chromatin_fine": (138, 88, 168),  # open blast chromatin: lighter, redder
    "nucleolus": (176, 168, 212),  # pale blue-grey holes in the chromatin
    "cyto_basophilic": (84, 116, 192),  # ribosome-rich deep blue (proerythroblast, plasma cell)
    "cyto_blue": (128, 158, 214),  # blasts, lymphocytes
    "cyto_pale_blue": (186, 204, 232),  # lymphocyte rim, sky blue
    "cyto_grey_blue": (168, 170, 204),  # monocytes: ground-glass grey-blue
    "cyto_lilac": (226, 200, 218),  # mature neutrophil cytoplasm
    "cyto_polychromatic": (176, 158, 192),  # haemoglobin meets ribosomes: grey-lilac
    "cyto_pink": (234, 176, 186),  # haemoglobinised cytoplasm, megakaryocyte cytoplasm
    "rbc": (226, 140, 146),  # erythrocyte
    "gran_azurophilic": (146, 36, 112),  # primary granules, red-purple
    "gran_neutrophilic": (188, 128, 176),  # fine secondary granules, lilac
    "gran_eosinophilic": (236, 118, 52),  # large orange-red granules
    "gran_basophilic": (52, 18, 88),  # dark purple-black granules
    "auer": (150, 28, 84),  # Auer rod: fused azurophilic granules
    "platelet": (146, 84, 170),  # thrombocyte granulomere
    "platelet_rim": (200, 196, 228),  # thrombocyte hyalomere
    "debris": (120, 70, 100),  # phagocytosed material in macrophages
    "plasma": (246, 240, 242),  # the thin protein film between cells
}


def optical_density(rgb: tuple[int, int, int]) -> np.ndarray:
    """OD vector (3,) of a transmitted colour."""
    return -np.log(np.clip(np.asarray(rgb, dtype=np.float32), 1.0, 255.0) / 255.0)


OD: dict[str, np.ndarray] = {name: optical_density(rgb) for name, rgb in COLOURS.items()}


@dataclass(frozen=True)
class Stain:
    """One patient's stain batch and scanner: OD gains, white level, blur and sensor noise.

    The last three fields are a centre's systematic difference (mil.synth.shift); their defaults change nothing.
    """

    channel_gain: np.ndarray  # (3,) per-channel OD gain: hue of the stain batch
    intensity: float  # overall stain strength
    white: np.ndarray  # (3,) scanner white balance, 0-255
    blur_sigma: float  # optics / focus
    noise_sigma: float  # sensor noise, grey levels
    mixing: np.ndarray | None = None  # (3, 3) OD -> OD: the centre's stain recipe (eosin / methylene-blue balance)
    tone_gamma: float = 1.0  # scanner tone curve: out = 255 * (in / 255) ** tone_gamma
    jpeg_quality: int = 0  # the scanner's JPEG compression (0 = lossless)

    def od(self, material: str) -> np.ndarray:
        base = OD[material] if self.mixing is None else self.mixing @ OD[material]
        return base * self.channel_gain * self.intensity

    def replace(self, **changes) -> Stain:
        return replace(self, **changes)


def sample_stain(rng: np.random.Generator, variation: float) -> Stain:
    """A patient's stain; variation=0 gives the same mid-range stain for everyone."""
    v = float(variation)
    gain = 1.0 + v * rng.normal(0.0, 0.07, size=3)
    return Stain(
        channel_gain=np.clip(gain, 0.75, 1.25).astype(np.float32),
        intensity=float(np.clip(1.0 + v * rng.normal(0.0, 0.08), 0.75, 1.25)),
        white=np.clip(246.0 + v * rng.normal(0.0, 3.0, size=3), 225.0, 255.0).astype(np.float32),
        blur_sigma=float(0.6 + v * rng.uniform(-0.25, 0.35)),
        noise_sigma=float(1.6 + v * rng.uniform(-0.4, 0.8)),
    )


def render(od: np.ndarray, stain: Stain, rng: np.random.Generator) -> np.ndarray:
    """OD canvas (H, W, 3) -> uint8 RGB image through the patient's optics and sensor."""
    from scipy.ndimage import gaussian_filter

    od = gaussian_filter(od, sigma=(stain.blur_sigma, stain.blur_sigma, 0.0), mode="nearest")
    image = stain.white * np.exp(-od)
    image += rng.normal(0.0, stain.noise_sigma, size=image.shape[:2])[..., None].astype(np.float32)
    if stain.tone_gamma != 1.0:
        image = 255.0 * (np.clip(image, 0.0, 255.0) / 255.0) ** np.float32(stain.tone_gamma)
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return jpeg_roundtrip(image, stain.jpeg_quality) if stain.jpeg_quality else image


def jpeg_roundtrip(image: np.ndarray, quality: int) -> np.ndarray:
    """The image as a scanner that stores JPEG delivers it: 4:2:0 chroma, block artefacts, softer detail."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=int(quality), subsampling=2)
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("RGB"))
