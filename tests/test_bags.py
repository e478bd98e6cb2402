"""Bag schema, atomic writer and validator: a file counts as done only when it validates."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from features.bag_directory import BagDirectory, check_encoder_width, write_manifest
from features.bags import Bag, bag_path, read_bag, read_bag_features, read_bag_header, validate_bag, write_bag
from mil.atomic import leftover_temp_files
from mil.errors import ConfigError, InputError


def make_bag(
    pid: str = "P1", n: int = 6, dim: int = 8, encoder: str = "enc.a", seed: int | None = None, **attrs
) -> Bag:
    """A small valid bag; its cells differ per patient id unless `seed` is given."""
    rng = np.random.default_rng(zlib.crc32(pid.encode()) if seed is None else seed)
    return Bag(
        patient_id=pid,
        features=rng.normal(size=(n, dim)).astype(np.float32),
        boxes=rng.integers(0, 50, size=(n, 4)).astype(np.int32),
        image_index=np.arange(n, dtype=np.int32) % 2,
        image_paths=["/data/a.png", "/data/b.png"],
        cell_id=[f"{pid}-c{i}" for i in range(n)],
        label=np.array([i % 3 - 1 for i in range(n)], dtype=np.int64),
        cell_probs=rng.dirichlet(np.ones(3), size=n).astype(np.float32),
        attrs={
            "encoder_config": {"name": encoder, "embed_dim": dim, "input_size": 32},
            "label_classes": ["blast", "lymphocyte"],
            "cell_table_fingerprint": "abc",
            **attrs,
        },
    )


def test_round_trip_keeps_arrays_and_attributes(tmp_path):
    bag = make_bag(skipped=[{"cell_id": "x", "image": "/data/c.png", "reason": "cannot be read"}])
    path = write_bag(tmp_path / "P1.h5", bag)
    assert validate_bag(path) == []
    back = read_bag(path)
    for key in ("features", "boxes", "image_index", "label", "cell_probs"):
        np.testing.assert_array_equal(getattr(back, key), getattr(bag, key), err_msg=key)
    assert back.cell_id == bag.cell_id and back.image_paths == bag.image_paths
    assert back.boxes.dtype == np.int32 and back.label.dtype == np.int64
    assert back.attrs["schema_version"] == 2 and back.attrs["patient_id"] == "P1" and back.attrs["created"]
    assert set(back.attrs["digests"]) == {
        "features",
        "boxes",
        "image_index",
        "image_paths",
        "cell_id",
        "label",
        "cell_probs",
    }
    assert back.encoder_config["name"] == "enc.a" and back.attrs["encoder"] == "enc.a"
    assert back.label_classes == ["blast", "lymphocyte"] and back.skipped[0]["reason"] == "cannot be read"
    assert not leftover_temp_files(tmp_path)


def test_float16_storage(tmp_path):
    bag = make_bag()
    back = read_bag(write_bag(tmp_path / "P1.h5", bag, dtype="float16"))
    assert back.features.dtype == np.float16
    np.testing.assert_allclose(back.features, bag.features, atol=1e-2)
    assert read_bag_header(tmp_path / "P1.h5")["features_dtype"] == "float16"


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_writer_refuses_non_finite_features_naming_patient_and_row(tmp_path, bad):
    bag = make_bag(pid="P7")
    bag.features[4, 2] = bad
    with pytest.raises(InputError, match=r"patient 'P7'.*row 4 \(cell 'P7-c4'\)"):
        write_bag(tmp_path / "P7.h5", bag)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("value", [7e4, -1e30])
def test_writer_refuses_values_no_encoder_produces_naming_patient_and_row(tmp_path, dtype, value):
    """Promise 10 (case 4 of issue 14): beyond +-65504 (float16's largest value) is refused whatever the dtype."""
    bag = make_bag(pid="P3")
    bag.features[2, 0] = value
    with pytest.raises(InputError, match=r"patient 'P3'.*exceed \+-65504 in 1 row\(s\), first row 2 \(cell 'P3-c2'\)"):
        write_bag(tmp_path / "P3.h5", bag, dtype=dtype)
    assert not list(tmp_path.iterdir())
    bag.features[2, 0] = 65504.0  # the bound itself fits both dtypes
    assert read_bag(write_bag(tmp_path / "P3.h5", bag, dtype=dtype)).features[2, 0] == 65504.0


def test_writer_refuses_mismatched_rows_wrong_width_and_empty_bags(tmp_path):
    bag = make_bag()
    bag.boxes = bag.boxes[:-1]
    with pytest.raises(InputError, match="boxes has shape"):
        write_bag(tmp_path / "a.h5", bag)
    bag = make_bag()
    bag.attrs["encoder_config"]["embed_dim"] = 16
    with pytest.raises(InputError, match="declares embed_dim 16"):
        write_bag(tmp_path / "b.h5", bag)
    bag = make_bag(n=0)
    bag.cell_probs = None
    with pytest.raises(InputError, match="empty patient"):
        write_bag(tmp_path / "c.h5", bag)
    bag = make_bag()
    bag.label[0] = 5
    with pytest.raises(InputError, match="label_classes has 2"):
        write_bag(tmp_path / "d.h5", bag)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("cut", ["0", "96", "half", "size-1"])
def test_truncated_bags_are_detected(tmp_path, cut):
    path = write_bag(tmp_path / "P1.h5", make_bag(n=50, dim=64))
    data = path.read_bytes()
    keep = {"0": 0, "96": 96, "half": len(data) // 2, "size-1": len(data) - 1}[cut]
    path.write_bytes(data[:keep])
    problems = validate_bag(path)
    assert problems and "P1.h5" in problems[0]
    with pytest.raises(InputError, match="run `mil extract` again"):
        read_bag(path)
    with pytest.raises(InputError, match=r"P1\.h5 is invalid.*\n.*run `mil extract` again"):
        read_bag_features(path)
    assert BagDirectory(tmp_path).patients() == []


def test_read_bag_features_returns_the_features_and_refuses_what_training_cannot_use(tmp_path):
    import h5py

    bag = make_bag(n=7)
    path = write_bag(tmp_path / "P1.h5", bag)
    np.testing.assert_array_equal(read_bag_features(path), read_bag(path).features)
    assert read_bag_features(write_bag(tmp_path / "P2.h5", make_bag("P2"), dtype="float16")).dtype == np.float16
    with h5py.File(path, "r+") as f:  # damage written after validation: NaN in row 3, then an unknown schema
        f["features"][3, 1] = np.nan
    with pytest.raises(InputError, match=r"NaN/inf in 1 row\(s\), first row 3\n.*run `mil extract` again"):
        read_bag_features(path)
    with h5py.File(path, "r+") as f:
        f.attrs["schema_version"] = 99
    with pytest.raises(InputError, match="schema_version 99, expected 2: upgrade cytomil"):
        read_bag_features(path)
    with pytest.raises(InputError, match="does not exist"):
        read_bag_features(tmp_path / "P9.h5")


def test_directory_lists_valid_bags_and_refuses_mixed_encoders_naming_both(tmp_path):
    write_bag(tmp_path / "P1.h5", make_bag("P1"))
    write_bag(tmp_path / "P2.h5", make_bag("P2"))
    (tmp_path / "P3.h5").write_bytes(b"junk")
    directory = BagDirectory(tmp_path)
    assert directory.patients() == ["P1", "P2"] and directory.feature_dim == 8
    assert directory.encoder_config["name"] == "enc.a"
    directory.check_consistent()
    assert directory.load("P2").cell_id[0] == "P2-c0"
    write_bag(tmp_path / "P4.h5", make_bag("P4", encoder="enc.b"))
    with pytest.raises(ConfigError, match=r"(?s)mixes encoders.*enc\.a.*enc\.b"):
        directory.check_consistent()


def test_directory_refuses_mixed_preprocessing(tmp_path):
    write_bag(tmp_path / "P1.h5", make_bag("P1", preprocess={"context": 0.0}))
    write_bag(tmp_path / "P2.h5", make_bag("P2", preprocess={"context": 0.5}))
    with pytest.raises(ConfigError, match=r"(?s)P1\.h5.*context.*P2\.h5"):
        BagDirectory(tmp_path).check_consistent()


def test_encoder_width_check_uses_manifest_or_bags(tmp_path):
    write_bag(tmp_path / "P1.h5", make_bag("P1", dim=8))
    check_encoder_width(tmp_path, {"name": "enc.a", "embed_dim": 8})
    with pytest.raises(ConfigError, match=r"enc\.c.*16-dim.*8-dim bags"):
        check_encoder_width(tmp_path, {"name": "enc.c", "embed_dim": 16})
    write_manifest(tmp_path, encoder_config={"name": "enc.a", "embed_dim": 8})
    with pytest.raises(ConfigError, match="manifest.json"):
        check_encoder_width(tmp_path, {"name": "enc.c", "embed_dim": 16})
    check_encoder_width(tmp_path / "new", {"name": "enc.c", "embed_dim": 16})  # an absent folder is fine


def test_missing_directory_and_bag_path(tmp_path):
    with pytest.raises(InputError, match="mil extract"):
        BagDirectory(tmp_path / "absent")
    assert bag_path(tmp_path, "P1") == tmp_path / "P1.h5"
