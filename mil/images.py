"""The one image loader: every stage that reads pixels (extraction crops, classifier crops, detector training and
inference, report galleries) reads a smear field through ``load_rgb``, so an image means the same everywhere and
keeps its real range (RELIABILITY promise 10).

Every image becomes 8-bit RGB (H, W, 3) by these rules; what none of them fits is refused by name:

- 8-bit RGB, greyscale (``L``), bilevel (``1``), ``YCbCr``, ``HSV``: Pillow's conversion. ``CMYK`` through its
  embedded ICC profile when it has one, else Pillow's plain formula.
- palette (``P``): its colours; with transparency (``P``, ``PA``) and alpha (``LA``, ``RGBA``): composited over
  white, the empty glass of a brightfield smear (a fully opaque image is unchanged).
- 16-bit and 32-bit integers (``I;16``, ``I;16B``, ``I``; 16-bit RGB TIFF through tifffile) are scaled by their bit
  depth: the significant bits the file declares (PNG ``sBIT``, TIFF ``MaxSampleValue``), otherwise the smallest
  camera depth of 8, 10, 12, 14 or 16 bits that holds the brightest pixel, so a 12-bit camera's field with values
  up to 4,000 becomes 0..249, not white. Never stretched to the image's own minimum and maximum: two fields of one
  camera keep their relative brightness. Negative values or values beyond 16 bits are refused.
- float (``F``): values in [0, 1] are scaled by 255; whole numbers up to 65,535 follow the integer rule; NaN,
  infinity, negative values and other ranges are refused.
- refused: ``LAB`` and other colour spaces, and 16-bit-per-channel RGB PNGs (Pillow keeps only their high byte;
  save them as 16-bit TIFF or 8-bit PNG).
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from mil.errors import InputError

SENSOR_BITS = (8, 10, 12, 14, 16)
PLAIN = ("RGB", "L", "1", "YCbCr", "HSV", "RGBX")
ALPHA = ("LA", "La", "RGBA", "RGBa", "PA")
INTEGER = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class ImageModeError(InputError):
    """An image whose pixels cannot be turned into 8-bit RGB faithfully."""


def load_rgb(path: str | Path) -> np.ndarray:
    """Decode an image fully (a truncated file fails here, not later) as uint8 (H, W, 3) RGB by the module's rules."""
    from PIL import Image

    with Image.open(path) as im:
        if _high_byte_only(im):
            if im.format == "TIFF":
                import tifffile

                return array_to_rgb8(tifffile.imread(path), f"image {path}", bits=_declared_bits(im, path))
            raise ImageModeError(
                f"image {path} is a 16-bit-per-channel {im.mode} {im.format}, of which Pillow reads only the high "
                "byte; save it as a 16-bit TIFF or an 8-bit PNG"
            )
        im.load()
        return image_to_rgb8(im, f"image {path}", bits=_declared_bits(im, path))


def image_to_rgb8(im, name: str, *, bits: int | None = None) -> np.ndarray:
    """A decoded PIL image as uint8 (H, W, 3) RGB; ``name`` says which image in an error.

    Always an array of its own (``np.array``, not ``np.asarray``): Pillow's buffer is read-only, and a crop that
    spans the whole image (a crop dataset) would reach ``torch.from_numpy`` read-only, which warns on every run.
    """
    mode = im.mode
    if mode == "RGB":
        return np.array(im)
    if mode == "CMYK":
        return np.array(_cmyk_to_rgb(im))
    if mode in PLAIN:
        return np.array(im.convert("RGB"))
    if mode in ALPHA or (mode == "P" and "transparency" in im.info):
        return _over_white(np.asarray(im.convert("RGBA")))
    if mode == "P":
        return np.array(im.convert("RGB"))
    if mode in INTEGER or mode == "F":
        return array_to_rgb8(np.asarray(im), name, bits=bits)
    raise ImageModeError(f"{name} has pixel mode {mode!r}, which cannot be read as RGB faithfully; save it as RGB")


def array_to_rgb8(values: np.ndarray, name: str, *, bits: int | None = None) -> np.ndarray:
    """(H, W), (H, W, 3) or (H, W, 4) integers or floats as uint8 (H, W, 3) RGB (module rules; alpha over white)."""
    if values.ndim == 3 and values.shape[2] == 4:
        rgb = _to_unit(values[..., :3], name, bits)
        alpha = _to_unit(values[..., 3:], name, bits)
        return _round8(rgb * alpha + (1.0 - alpha))
    if values.ndim == 2:
        values = values[..., None]
    if values.ndim != 3 or values.shape[2] not in (1, 3):
        raise ImageModeError(f"{name} has pixel array shape {values.shape}; give a greyscale, RGB or RGBA image")
    unit = _to_unit(values, name, bits)
    return _round8(np.broadcast_to(unit, (*unit.shape[:2], 3)))


def _to_unit(values: np.ndarray, name: str, bits: int | None) -> np.ndarray:
    """Values scaled to [0, 1] by the integer or float rule."""
    if values.dtype == np.uint8:
        return values.astype(np.float64) / 255.0
    if np.issubdtype(values.dtype, np.floating):
        values = values.astype(np.float64)
        if not np.isfinite(values).all():
            raise ImageModeError(f"{name} holds NaN or infinite pixel values; fix or replace the image")
        low, high = float(values.min()), float(values.max())
        if low >= 0 and high <= 1:
            return values
        if low < 0 or high > 2**16 - 1 or not np.array_equal(values, np.round(values)):
            raise ImageModeError(
                f"{name} is a float image with values {low:g} to {high:g}: no known range (floats are read as 0..1, "
                "or as whole 16-bit counts); save it as an 8- or 16-bit image"
            )
    low, high = int(values.min()), int(values.max())
    if low < 0:
        raise ImageModeError(f"{name} has negative pixel values (down to {low}); save it as an unsigned 8/16-bit image")
    if high > 2**16 - 1:
        raise ImageModeError(f"{name} has pixel values up to {high}, beyond 16 bits; save it as a 16-bit image")
    if bits is None or high > 2**bits - 1:
        bits = next(b for b in SENSOR_BITS if high <= 2**b - 1)
    return values.astype(np.float64) / (2**bits - 1)


def _round8(unit: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.clip(np.rint(unit * 255.0), 0, 255).astype(np.uint8))


def _over_white(rgba: np.ndarray) -> np.ndarray:
    """(H, W, 4) uint8 composited over white: exact where the alpha is 255."""
    alpha = rgba[..., 3:].astype(np.float64) / 255.0
    return _round8(rgba[..., :3].astype(np.float64) / 255.0 * alpha + (1.0 - alpha))


def _cmyk_to_rgb(im):
    profile = im.info.get("icc_profile")
    if profile:
        import io

        from PIL import ImageCms

        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
            return ImageCms.profileToProfile(im, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except (ImageCms.PyCMSError, OSError):
            pass  # a broken profile: Pillow's plain formula below
    return im.convert("RGB")


def _high_byte_only(im) -> bool:
    """Pillow decodes 16-bit-per-channel RGB(A) into 8-bit modes, keeping the high byte of each sample."""
    if im.mode not in ("RGB", "RGBA"):
        return False
    return any(";16" in str(tile.args[0] if isinstance(tile.args, tuple) else tile.args) for tile in im.tile)


def _declared_bits(im, path) -> int | None:
    """Significant bits per sample that the file declares: PNG sBIT or TIFF MaxSampleValue (None when silent)."""
    if im.format == "TIFF":
        maximum = getattr(im, "tag_v2", {}).get(281)
        maximum = max(maximum) if isinstance(maximum, tuple) else maximum
        return int(maximum).bit_length() if maximum and int(maximum) + 1 == 2 ** int(maximum).bit_length() else None
    if im.format == "PNG":
        return _png_sbit(path)
    return None


def _png_sbit(path) -> int | None:
    """The largest significant-bits value of a PNG's sBIT chunk (read from the chunks before the image data)."""
    with open(path, "rb") as f:
        if f.read(8) != b"\x89PNG\r\n\x1a\n":
            return None
        while header := f.read(8):
            if len(header) < 8:
                return None
            length, kind = struct.unpack(">I4s", header)
            if kind == b"sBIT":
                data = f.read(length)
                return max(data) if data else None
            if kind in (b"IDAT", b"IEND"):
                return None
            f.seek(length + 4, 1)  # the chunk's data and CRC
    return None
