"""Feature standardisation of attention heads: per-patient and per-centre z-scoring (against stain shift) and fold
statistics that one extreme bag cannot collapse (RELIABILITY 10, issue 14 case 4)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from mil.compare.normalise import feature_normaliser, fold_statistics
from mil.errors import ConfigError


def bags_of(arrays: dict) -> dict:
    return {p: SimpleNamespace(features=a) for p, a in arrays.items()}


def test_per_centre_standardisation_uses_each_centres_cells_and_removes_a_centre_shift():
    rng = np.random.default_rng(0)
    cells = {f"A{i}": rng.normal(size=(30, 4)) for i in range(3)}
    cells |= {f"B{i}": 5.0 + 3.0 * rng.normal(size=(30, 4)) for i in range(3)}  # centre B: shifted and scaled
    table = {p: {"patient_id": p, "centre": p[0]} for p in cells}
    norm = feature_normaliser("centre", bags_of(cells), table)
    for centre in "AB":
        pooled = np.concatenate([norm(p) for p in cells if p[0] == centre])
        np.testing.assert_allclose(pooled.mean(axis=0), 0.0, atol=1e-9)
        np.testing.assert_allclose(pooled.std(axis=0), 1.0, atol=1e-4)
    raw_b = np.concatenate([cells[p] for p in cells if p[0] == "B"])
    expected = (cells["B0"] - raw_b.mean(axis=0)) / (raw_b.std(axis=0) + 1e-6)
    np.testing.assert_allclose(norm("B0"), expected)  # statistics of centre B's cells only
    with pytest.raises(ConfigError, match="neither 'patient' nor a patient-table column"):
        feature_normaliser("site", bags_of(cells), table)
    table["A0"]["centre"] = ""
    with pytest.raises(ConfigError, match="no centre value"):
        feature_normaliser("centre", bags_of(cells), table)


def test_per_patient_standardisation_and_off():
    rng = np.random.default_rng(1)
    cells = {"P1": 2.0 + rng.normal(size=(20, 3)), "P2": rng.normal(size=(20, 3))}
    table = {p: {"patient_id": p} for p in cells}
    norm = feature_normaliser("patient", bags_of(cells), table)
    np.testing.assert_allclose(norm("P1").mean(axis=0), 0.0, atol=1e-9)
    np.testing.assert_array_equal(feature_normaliser(None, bags_of(cells), table)("P1"), cells["P1"])


def test_fold_statistics_leave_out_one_extreme_bag_with_a_warning():
    rng = np.random.default_rng(2)
    arrays = [rng.normal(size=(25, 4)) for _ in range(9)]
    clean_shift, clean_scale = fold_statistics(arrays, log=lambda *_: None)
    lines = []
    shift, scale = fold_statistics([*arrays, 1e30 * np.ones((25, 4))], log=lines.append)
    np.testing.assert_allclose(shift, clean_shift)
    np.testing.assert_allclose(scale, clean_scale)  # the other patients' features keep their scale
    assert len(lines) == 1 and "left out of the standardisation" in lines[0]
    fold_statistics(arrays, log=lines.append)
    assert len(lines) == 1  # no warning without an outlier


def test_a_feature_constant_in_the_fitting_cells_is_centred_not_blown_up():
    """A dead feature (std 0 in training) must not divide another centre's small deviations by 1e-6."""
    rng = np.random.default_rng(3)
    train = [np.column_stack([rng.normal(size=20), np.zeros(20)]) for _ in range(4)]
    shift, scale = fold_statistics(train, log=lambda *_: None)
    assert scale[1] == 1.0 and scale[0] == pytest.approx(np.concatenate(train)[:, 0].std() + 1e-6)
    test = np.column_stack([rng.normal(size=20), np.full(20, 0.01)])
    assert np.abs((test - shift) / scale).max() < 10
