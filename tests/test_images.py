"""RELIABILITY promise 10, inputs keep their meaning: every image mode becomes 8-bit RGB with its real range through
the one loader (mil.images.load_rgb), or is refused by name; cells on a 16-bit field are no longer white crops."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import tifffile
from PIL import Image

from mil.images import ImageModeError, image_to_rgb8, load_rgb

RNG = np.random.default_rng(0)


def write_png(path, values: np.ndarray, *, colour_type: int, sbit: bytes | None = None) -> None:
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit RGB), optionally with an sBIT chunk."""
    height, width = values.shape[:2]
    rows = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0))
    extra = chunk(b"sBIT", sbit) if sbit else b""
    data = b"\x89PNG\r\n\x1a\n" + header + extra + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    path.write_bytes(data)


def grey(rgb: np.ndarray) -> np.ndarray:
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    return rgb[..., 0]


def test_promise10_16bit_png_I16_is_scaled_by_its_camera_depth_not_clipped_white(tmp_path):
    values = RNG.integers(0, 4001, size=(6, 7)).astype(np.uint16)  # a 12-bit camera: values up to ~4,000
    Image.fromarray(values).save(tmp_path / "field.png")
    with Image.open(tmp_path / "field.png") as im:
        assert im.mode == "I;16"
    out = grey(load_rgb(tmp_path / "field.png"))
    np.testing.assert_array_equal(out, np.rint(values / 4095 * 255).astype(np.uint8))
    assert out.max() < 255  # before: every pixel above 255 clipped to white


def test_promise10_declared_significant_bits_win_over_the_brightest_pixel(tmp_path):
    values = RNG.integers(0, 1001, size=(5, 5)).astype(np.uint16)  # a dim 12-bit field: max below 1,023
    write_png(tmp_path / "dim.png", values, colour_type=0, sbit=bytes([12]))
    np.testing.assert_array_equal(grey(load_rgb(tmp_path / "dim.png")), np.rint(values / 4095 * 255))
    write_png(tmp_path / "silent.png", values, colour_type=0)  # no sBIT: 10 bits is the smallest depth holding 1,000
    np.testing.assert_array_equal(grey(load_rgb(tmp_path / "silent.png")), np.rint(values / 1023 * 255))


def test_promise10_16bit_big_endian_I16B_and_32bit_I_follow_the_same_rule():
    values = RNG.integers(0, 16001, size=(4, 6)).astype(np.uint16)  # a 14-bit camera
    expected = np.rint(values / 16383 * 255).astype(np.uint8)
    big = Image.frombytes("I;16B", (6, 4), values.astype(">u2").tobytes())
    np.testing.assert_array_equal(grey(image_to_rgb8(big, "big-endian")), expected)
    wide = Image.fromarray(values.astype(np.int32))
    assert wide.mode == "I"
    np.testing.assert_array_equal(grey(image_to_rgb8(wide, "32-bit")), expected)
    an_8bit_image_in_16 = Image.fromarray(np.array([[0, 100, 255]], dtype=np.uint16))
    np.testing.assert_array_equal(grey(image_to_rgb8(an_8bit_image_in_16, "8 in 16")), [[0, 100, 255]])
    with pytest.raises(ImageModeError, match="negative"):
        image_to_rgb8(Image.fromarray(np.array([[-5, 10]], dtype=np.int32)), "signed")
    with pytest.raises(ImageModeError, match="beyond 16 bits"):
        image_to_rgb8(Image.fromarray(np.array([[0, 70000]], dtype=np.int32)), "wide")


def test_promise10_float_F_images_in_0_1_or_whole_counts_else_refused(tmp_path):
    unit = RNG.random((4, 5)).astype(np.float32)
    tifffile.imwrite(tmp_path / "unit.tif", unit)
    with Image.open(tmp_path / "unit.tif") as im:
        assert im.mode == "F"
    np.testing.assert_array_equal(grey(load_rgb(tmp_path / "unit.tif")), np.rint(unit.astype(np.float64) * 255))
    counts = np.array([[0.0, 1000.0, 4095.0]], dtype=np.float32)
    np.testing.assert_array_equal(grey(image_to_rgb8(Image.fromarray(counts), "counts")), [[0, 62, 255]])
    for bad, message in ((np.array([[0.0, np.nan]]), "NaN"), (np.array([[0.0, 3.7]]), "no known range")):
        with pytest.raises(ImageModeError, match=message):
            image_to_rgb8(Image.fromarray(bad.astype(np.float32)), "float field")


def test_promise10_palette_P_keeps_its_colours_and_transparency_is_white(tmp_path):
    rgb = RNG.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
    palette = Image.fromarray(rgb).quantize(colors=8)
    palette.save(tmp_path / "palette.png")
    with Image.open(tmp_path / "palette.png") as im:
        assert im.mode == "P"
        expected = np.asarray(im.convert("RGB"))
    np.testing.assert_array_equal(load_rgb(tmp_path / "palette.png"), expected)
    palette.info["transparency"] = 0  # palette index 0 is see-through
    see_through = np.asarray(palette) == 0
    out = image_to_rgb8(palette, "transparent palette")
    assert see_through.any() and (out[see_through] == 255).all()
    np.testing.assert_array_equal(out[~see_through], expected[~see_through])


@pytest.mark.parametrize("mode", ["LA", "RGBA"])
def test_promise10_alpha_LA_RGBA_opaque_unchanged_transparent_over_white(mode):
    channels = 2 if mode == "LA" else 4
    values = RNG.integers(0, 256, size=(4, 4, channels), dtype=np.uint8)
    values[..., -1] = 255
    opaque = image_to_rgb8(Image.fromarray(values, mode), mode)
    np.testing.assert_array_equal(opaque, np.asarray(Image.fromarray(values, mode).convert("RGB")))
    values[0, 0, -1], values[0, 1, -1] = 0, 128
    blended = image_to_rgb8(Image.fromarray(values, mode), mode)
    assert (blended[0, 0] == 255).all()  # fully transparent: the glass
    colour = (values[0, 1, 0] if mode == "LA" else values[0, 1, :3]).astype(np.float64)
    np.testing.assert_allclose(blended[0, 1], colour * 128 / 255 + 255 * (1 - 128 / 255), atol=0.5)


def test_promise10_cmyk_and_1bit_are_converted():
    cmyk = Image.fromarray(RNG.integers(0, 256, size=(3, 3, 4), dtype=np.uint8), "CMYK")
    np.testing.assert_array_equal(image_to_rgb8(cmyk, "cmyk"), np.asarray(cmyk.convert("RGB")))
    bits = Image.fromarray(np.array([[True, False], [False, True]]))
    assert bits.mode == "1"
    np.testing.assert_array_equal(grey(image_to_rgb8(bits, "bilevel")), [[255, 0], [0, 255]])


def test_promise10_unfaithful_modes_are_refused_by_name(tmp_path):
    with pytest.raises(ImageModeError, match="'LAB'"):
        image_to_rgb8(Image.new("LAB", (2, 2)), "image lab.tif")
    rgb48 = RNG.integers(0, 4001, size=(4, 4, 3)).astype(np.uint16)
    write_png(tmp_path / "rgb48.png", rgb48, colour_type=2)
    with pytest.raises(ImageModeError, match=r"rgb48\.png is a 16-bit-per-channel RGB PNG.*16-bit TIFF"):
        load_rgb(tmp_path / "rgb48.png")


def test_promise10_16bit_rgb_tiff_is_read_in_full_through_tifffile(tmp_path):
    rgb48 = RNG.integers(0, 4001, size=(4, 5, 3)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "rgb48.tif", rgb48, photometric="rgb")
    np.testing.assert_array_equal(load_rgb(tmp_path / "rgb48.tif"), np.rint(rgb48 / 4095 * 255))


def test_promise10_cells_on_a_16bit_field_are_embedded_as_cells_not_white_crops(tmp_path):
    """Issue 14 case 3: before, every crop of an I;16 field was white and every embedding identical."""
    from features.bags import read_bag
    from features.extract import ExtractConfig, run_extract
    from mil.cell_table import CellTable
    from mil.classifier.data import load_crops
    from mil.detector.data import load_scaled

    field = np.full((64, 64), 3800, dtype=np.uint16)  # bright glass of a 12-bit camera
    rows = []
    for k, (level, size) in enumerate([(300, 6), (1200, 10), (2500, 14), (600, 8)]):
        x0, y0 = 4 + 15 * k, 20
        field[y0 : y0 + size, x0 : x0 + size] = level
        box = {"x0": x0 - 1, "y0": y0 - 1, "x1": x0 + size + 1, "y1": y0 + size + 1}
        rows.append({"cell_id": f"P0-{k}", "patient_id": "P0", "image_path": str(tmp_path / "f.png"), **box})
    Image.fromarray(field).save(tmp_path / "f.png")
    CellTable(rows=rows).write(tmp_path / "cells.csv")
    # The detector's and the classifier's loaders read the same pixels as extraction.
    np.testing.assert_array_equal(load_scaled(str(tmp_path / "f.png"), 1.0), load_rgb(tmp_path / "f.png"))
    crops = load_crops(rows, crop_size=16)
    assert (crops < 250).any(axis=(1, 2, 3)).all()
    config = ExtractConfig(
        cells=tmp_path / "cells.csv", encoder="morphology.handcrafted", out=tmp_path / "bags", input_size=32, workers=0
    )
    report = run_extract(config, log=lambda line: None)
    assert report.failed == {} and report.skipped_cells.get("P0", []) == []
    features = read_bag(tmp_path / "bags" / "P0.h5").features
    assert len(features) == 4 and len({row.tobytes() for row in np.asarray(features)}) == 4
