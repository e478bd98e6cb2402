"""`mil extract --stain-norm reinhard`: LAB statistics matched, provenance, mixed bags, cache, off = unchanged."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_extract import assert_same_bags, extract

from features.bag_directory import BagDirectory
from features.bags import bag_path, read_bag
from features.stain import file_sha256, fit_stain_norm, lab_statistics
from mil.cell_table import CellTable, read_cell_table
from mil.cli import main as mil_main
from mil.errors import ConfigError, InputError

torch.set_num_threads(1)
ENCODER = "morphology.handcrafted"  # measures colour, so normalisation must change its embeddings


def smear_field(rng: np.random.Generator, side: int = 96) -> np.ndarray:
    """A pale pink background with purple nuclei and pink erythrocytes, smooth as a real field."""
    field = np.empty((side, side, 3), dtype=np.float64)
    field[:] = (232, 214, 222)
    field += rng.normal(0, 4, size=field.shape)
    yy, xx = np.mgrid[:side, :side]
    for k in range(10):
        cy, cx = rng.integers(8, side - 8, size=2)
        r = rng.integers(5, 10)
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
        field[inside] = (120, 60, 150) if k % 2 else (215, 120, 130)
    return np.clip(field, 0, 255).astype(np.uint8)


def shifted(image: np.ndarray, gain: tuple[float, float, float], offset: tuple[float, float, float]) -> np.ndarray:
    """Another stain or scanner: a per-channel gain and offset (what `mil synth --stain-shift` varies)."""
    return np.clip(image.astype(np.float64) * gain + offset, 0, 255).astype(np.uint8)


def save(path: Path, image: np.ndarray) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


def two_centre_table(root: Path, *, seed: int = 0) -> tuple[Path, Path]:
    """Patients P00-P02 on fields of one stain, P03 on colour-shifted copies; plus a reference field."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(4):
        pid = f"P{p:02d}"
        for f in range(2):
            field = smear_field(rng)
            if p == 3:
                field = shifted(field, (0.85, 1.05, 0.8), (10, -15, 25))
            image = save(root / "images" / f"{pid}_{f}.png", field)
            for c in range(3):
                x0, y0 = int(rng.integers(0, 70)), int(rng.integers(0, 70))
                rows.append(
                    {
                        "cell_id": f"{pid}-{f}-{c}",
                        "patient_id": pid,
                        "image_path": str(image),
                        "x0": x0,
                        "y0": y0,
                        "x1": x0 + 24,
                        "y1": y0 + 24,
                        "label": "",
                        "source": "test",
                    }
                )
    reference = save(root / "reference.png", smear_field(rng))
    return CellTable(rows=rows).write(root / "cells.csv"), reference


def test_reinhard_brings_colour_shifted_copies_to_the_reference_statistics(tmp_path):
    from torchstain.numpy.normalizers import NumpyReinhardNormalizer

    rng = np.random.default_rng(1)
    field = smear_field(rng, side=128)
    a = shifted(field, (1.1, 0.85, 1.0), (5, -10, 20))
    b = shifted(field, (0.85, 1.05, 0.8), (10, -15, 25))
    norm = fit_stain_norm("reinhard", save(tmp_path / "ref.png", smear_field(rng, side=128)))
    before = np.abs(np.subtract(*(lab_statistics(x)[0] for x in (a, b)))).max()
    mean_a, std_a = lab_statistics(norm(a))
    mean_b, std_b = lab_statistics(norm(b))
    assert before > 5  # the shift moves a LAB mean by more than 5 units
    np.testing.assert_allclose(mean_a, mean_b, atol=1.0)
    np.testing.assert_allclose(std_a, std_b, atol=1.0)
    np.testing.assert_allclose(mean_a, norm.lab_mean, atol=1.5)  # and both land on the reference
    # Step for step torchstain's own normaliser: the same uint8 image.
    library = NumpyReinhardNormalizer()
    library.target_means = np.asarray(norm.lab_mean, dtype=np.float32)
    library.target_stds = np.asarray(norm.lab_std, dtype=np.float32)
    np.testing.assert_array_equal(library.normalize(a), norm(a))


def test_flat_images_are_refused_naming_the_option_and_a_flat_field_skips_its_cells(tmp_path):
    grey = np.full((32, 32, 3), 200, dtype=np.uint8)
    with pytest.raises(InputError, match="stain-reference .* colour variation"):
        fit_stain_norm("reinhard", save(tmp_path / "grey.png", grey))
    with pytest.raises(ConfigError, match="needs --stain-reference IMAGE"):
        fit_stain_norm("reinhard", None)
    with pytest.raises(ConfigError, match="choose one of none, reinhard"):
        fit_stain_norm("macenko", tmp_path / "grey.png")
    cells, reference = two_centre_table(tmp_path)
    first = next(r for r in read_cell_table(cells).rows if r["patient_id"] == "P00")
    save(Path(first["image_path"]), grey)
    report = extract(cells, tmp_path / "bags", encoder=ENCODER, stain_norm="reinhard", stain_reference=reference)
    reasons = [s["reason"] for s in report.skipped_cells["P00"]]
    assert len(reasons) == 3 and all("no colour variation" in r and "--stain-norm" in r for r in reasons)
    assert read_bag(bag_path(tmp_path / "bags", "P00")).num_cells == 3


def test_provenance_records_method_reference_sha256_and_statistics(tmp_path):
    cells, reference = two_centre_table(tmp_path)
    out = tmp_path / "bags"
    extract(cells, out, encoder=ENCODER, stain_norm="reinhard", stain_reference=reference)
    norm = fit_stain_norm("reinhard", reference)
    want = {
        "context": 0.0,
        "stain_norm": {
            "method": "reinhard",
            "reference_sha256": file_sha256(reference),
            "reference_lab_mean": list(norm.lab_mean),
            "reference_lab_std": list(norm.lab_std),
        },
    }
    assert read_bag(bag_path(out, "P03")).attrs["preprocess"] == want
    assert json.loads((out / "manifest.json").read_text())["preprocess"] == want
    report = json.loads((out / "extract_report.json").read_text())
    assert report["stain_norm"] == {"method": "reinhard", "reference": str(reference)}
    BagDirectory(out).check_consistent()
    # DataLoader workers get the fitted normaliser by pickling: the same bags as the main process.
    extract(cells, tmp_path / "workers", encoder=ENCODER, stain_norm="reinhard", stain_reference=reference, workers=2)
    assert_same_bags(out, tmp_path / "workers")


def test_bags_with_and_without_normalisation_or_of_two_references_are_not_mixed(tmp_path):
    cells, reference = two_centre_table(tmp_path)
    other = save(tmp_path / "other.png", shifted(smear_field(np.random.default_rng(7)), (0.9, 1.0, 1.1), (0, 0, 0)))
    extract(cells, tmp_path / "plain", encoder=ENCODER)
    extract(cells, tmp_path / "ref", encoder=ENCODER, stain_norm="reinhard", stain_reference=reference)
    extract(cells, tmp_path / "other", encoder=ENCODER, stain_norm="reinhard", stain_reference=other)
    for into, source in (("plain", "ref"), ("ref", "plain"), ("ref", "other")):
        mixed = shutil.copytree(tmp_path / into, tmp_path / f"{into}+{source}")
        shutil.copy(bag_path(tmp_path / source, "P00"), bag_path(mixed, "P00"))
        with pytest.raises(ConfigError, match="mixes encoders or preprocessing") as refused:
            BagDirectory(mixed).check_consistent()
        assert "--stain-norm" in str(refused.value) and str(refused.value).count('"preprocess"') == 2


def test_a_changed_normalisation_recomputes_the_bags_and_the_same_one_keeps_them(tmp_path):
    cells, reference = two_centre_table(tmp_path)
    other = save(tmp_path / "other.png", shifted(smear_field(np.random.default_rng(7)), (0.9, 1.0, 1.1), (0, 0, 0)))
    out, everyone = tmp_path / "bags", ["P00", "P01", "P02", "P03"]
    plain = extract(cells, out, encoder=ENCODER)
    on = extract(cells, out, encoder=ENCODER, stain_norm="reinhard", stain_reference=reference)
    assert sorted(on.done) == everyone and set(on.reasons.values()) == {"stale (preprocess changed)"}
    again = extract(cells, out, encoder=ENCODER, stain_norm="reinhard", stain_reference=reference)
    assert again.done == [] and sorted(again.up_to_date) == everyone
    assert sorted(extract(cells, out, encoder=ENCODER, stain_norm="reinhard", stain_reference=other).done) == everyone
    off = extract(cells, out, encoder=ENCODER)
    assert sorted(off.done) == everyone and plain.cells_embedded == off.cells_embedded
    BagDirectory(out).check_consistent()


def test_off_by_default_leaves_bags_unchanged_and_on_changes_the_embeddings(tmp_path):
    from features.cropping import load_rgb
    from features.preprocess import crop_transform
    from features.registry import create_encoder

    cells, reference = two_centre_table(tmp_path)
    extract(cells, tmp_path / "plain", encoder=ENCODER)
    extract(cells, tmp_path / "normed", encoder=ENCODER, stain_norm="reinhard", stain_reference=reference)
    plain = read_bag(bag_path(tmp_path / "plain", "P03"))
    # The provenance of a plain bag is exactly what it was before the option existed: old bags stay up to date.
    assert plain.attrs["preprocess"] == {"context": 0.0}
    assert json.loads((tmp_path / "plain" / "manifest.json").read_text())["preprocess"] == {"context": 0.0}
    assert "stain_norm" not in json.loads((tmp_path / "plain" / "extract_report.json").read_text())
    # Off, the embeddings are the encoder's on the raw crops, bit for bit.
    encoder = create_encoder(ENCODER, input_size=32)
    transform = crop_transform(encoder.config)
    crops = []
    for box, k in zip(plain.boxes, plain.image_index):
        image = load_rgb(plain.image_paths[k])
        crops.append(transform(image[box[1] : box[3], box[0] : box[2]]))
    with torch.inference_mode():
        direct = encoder(torch.stack(crops)).float().numpy()
    np.testing.assert_array_equal(plain.features, direct)
    normed = read_bag(bag_path(tmp_path / "normed", "P03"))
    assert not np.allclose(normed.features, plain.features)


def test_cli_stain_options_and_their_refusals(tmp_path, capsys):
    cells, reference = two_centre_table(tmp_path)
    base = ["extract", "--cells", str(cells), "--encoder", ENCODER, "--input-size", "32", "--workers", "0"]
    assert mil_main([*base, "--out", str(tmp_path / "a"), "--stain-norm", "reinhard"]) == 2
    assert "--stain-norm reinhard needs --stain-reference IMAGE" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()  # refused before anything was written
    assert mil_main([*base, "--out", str(tmp_path / "b"), "--stain-reference", str(reference)]) == 2
    assert "only used with --stain-norm reinhard" in capsys.readouterr().err
    code = mil_main(
        [*base, "--out", str(tmp_path / "c"), "--stain-norm", "reinhard", "--stain-reference", str(reference)]
    )
    assert code == 0
    assert "stain normalisation reinhard" in capsys.readouterr().err
    assert read_bag(bag_path(tmp_path / "c", "P00")).attrs["preprocess"]["stain_norm"]["method"] == "reinhard"
    assert mil_main(["verify", str(tmp_path / "c")]) == 0
    assert f"colour normalisation: reinhard to the reference with sha256 {file_sha256(reference)}" in (
        capsys.readouterr().out
    )
