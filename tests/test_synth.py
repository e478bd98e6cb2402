"""`mil synth`: config strictness, determinism, the Zenodo layout, compositions, label noise and the cue."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mil.cli import main
from mil.errors import ConfigError
from mil.synth.cohort import all_classes, expected_compositions, nucleated_classes
from mil.synth.config import config_from_dict, load_synth_config
from mil.synth.writer import write_cohort

SMALL = ["--field-width", "256", "--field-height", "256", "--quiet"]


def _rows(path: Path, delimiter: str = ",") -> list[dict]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh, delimiter=delimiter))


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _synth(out: Path, seed: int, *extra: str) -> Path:
    argv = ["synth", "--out", str(out), "--seed", str(seed), "--patients", "2", "--fields-per-patient", "2"]
    assert main(argv + ["--cells-per-field", "12", *SMALL, *extra]) == 0
    return out


def test_default_config_meets_the_issue() -> None:
    config = load_synth_config()
    assert config.patients >= 30 and (config.field_width, config.field_height) == (512, 512)
    assert config.fields_per_patient * config.cells_per_field >= 150
    assert {d.name for d in config.diagnoses} == {"ALL", "AML", "CML"}
    for name, share in expected_compositions(config).items():
        assert share.sum() == pytest.approx(1.0)
        assert (share > 0).all(), f"{name}: every nucleated class must be possible"
    expected = expected_compositions(config.replace(overlap=0.0))  # each diagnosis's own composition
    idx = {c: i for i, c in enumerate(nucleated_classes())}
    blasts = [idx[c] for c in ("myeloblast", "lymphoblast", "monoblast", "unknown_blast")]
    baso_eo = [i for c, i in idx.items() if "eosinophil" in c or "basophil" in c]
    assert expected["ALL"][idx["lymphoblast"]] > 0.3
    assert expected["AML"][idx["myeloblast"]] + expected["AML"][idx["monoblast"]] > 0.3
    assert expected["CML"][blasts].sum() < 0.1
    assert expected["CML"][baso_eo].sum() > 2 * max(expected["ALL"][baso_eo].sum(), expected["AML"][baso_eo].sum())


def test_unknown_or_invalid_keys_name_the_key_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['patinets'\].*valid keys:.*patients"):
        config_from_dict({"patinets": 3})
    bad = tmp_path / "bad.yaml"
    bad.write_text("diagnoses:\n  ALL:\n    proportion: 1\n    composition: {lymphoblast: 1}\n    colour: red\n")
    with pytest.raises(
        ConfigError, match=r"bad.yaml diagnoses.ALL: unknown key\(s\) \['colour'\]; valid keys:.*composition"
    ):
        load_synth_config(bad)
    base = load_synth_config()
    with pytest.raises(ConfigError, match=r"background names \['blastocyte'\].*valid:"):
        base.replace(background={"blastocyte": 1.0})
    with pytest.raises(ConfigError, match=r"overlap must lie in \[0, 1\]"):
        base.replace(overlap=1.5)
    with pytest.raises(ConfigError, match=r"does not exist"):
        load_synth_config(tmp_path / "missing.yaml")


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path: Path) -> None:
    a = _digest(_synth(tmp_path / "a", 7))
    b = _digest(_synth(tmp_path / "b", 7))
    c = _digest(_synth(tmp_path / "c", 8))
    assert a == b
    assert any(name.endswith(".png") for name in a) and "cells.csv" in a
    assert a["cells.csv"] != c["cells.csv"]
    assert all(a[name] != c[name] for name in a if name.endswith(".png"))


def test_layout_and_boxes_inside_images(tmp_path: Path) -> None:
    out = _synth(tmp_path / "s", 0)
    rois = {r["roi_id"]: r for r in _rows(out / "rois.csv")}
    cells = _rows(out / "cells.csv")
    clinical = _rows(out / "clinical.csv", delimiter=";")
    zenodo = "cell_id,slide_id,roi_id,x1,x2,y1,y2,consensus_label,label_session_1,label_session_2"
    assert list(cells[0])[:10] == zenodo.split(",")
    assert "auer_rod" in cells[0]
    # the Zenodo release's columns first, then the centre and the synthetic covariates
    zenodo_clinical = ["patient_id", "age", "ncit_concept_code", "leukemia_type", "leukemia_subtype"]
    covariates = [c.name for c in load_synth_config().covariates]
    assert list(clinical[0]) == zenodo_clinical + ["centre"] + covariates
    assert (out / "clinical.csv").read_text().splitlines()[0].count(";") == 5 + len(covariates)
    assert len(rois) == 4 and len(clinical) == 2 and len(cells) == 4 * (12 + 1)
    assert len({c["cell_id"] for c in cells}) == len(cells)
    for roi in rois.values():
        with Image.open(out / roi["image"]) as im:
            assert im.mode == "RGB" and im.size == (int(roi["width"]), int(roi["height"]))
    for c in cells:
        roi = rois[c["roi_id"]]
        x1, x2, y1, y2 = (int(c[k]) for k in ("x1", "x2", "y1", "y2"))
        assert 0 <= x1 < x2 <= int(roi["width"]) and 0 <= y1 < y2 <= int(roi["height"]), c
        assert c["consensus_label"] in all_classes()
    assert "cue_fraction:" in (out / "README.txt").read_text()
    assert load_synth_config(out / "synth_config.yaml") == load_synth_config().replace(
        patients=2, fields_per_patient=2, cells_per_field=12, field_width=256, field_height=256
    )
    assert not list(out.rglob(".*.tmp"))


def _cohort(tmp_path: Path, name: str, **changes) -> tuple[dict, list[dict]]:
    # few, crowded fields with a thin erythrocyte background: the composition needs cells, not pixels
    config = load_synth_config().replace(
        fields_per_patient=2, cells_per_field=45, field_width=352, field_height=352, erythrocyte_density=0.15, **changes
    )
    write_cohort(config, tmp_path / name, seed=3, progress=False)
    diagnosis = {r["patient_id"]: r["leukemia_type"] for r in _rows(tmp_path / name / "clinical.csv", ";")}
    patient_of = {r["roi_id"]: r["patient_id"] for r in _rows(tmp_path / name / "rois.csv")}
    cells = _rows(tmp_path / name / "cells.csv")
    for c in cells:
        c["diagnosis"] = diagnosis[patient_of[c["roi_id"]]]
    return config, cells


def _shares(cells: list[dict], diagnosis: str) -> tuple[np.ndarray, int]:
    names = nucleated_classes()
    labels = [c["consensus_label"] for c in cells if c["diagnosis"] == diagnosis and c["consensus_label"] in names]
    counts = np.array([labels.count(n) for n in names], dtype=np.float64)
    return counts / len(labels), len(labels)


def test_compositions_follow_the_config_and_overlap_one_makes_them_equal(tmp_path: Path) -> None:
    # a huge concentration removes patient-to-patient spread: what remains is multinomial sampling
    config, cells = _cohort(tmp_path, "o0", patients=12, overlap=0.0, patient_concentration=1e7)
    for name, expected in expected_compositions(config).items():
        observed, n = _shares(cells, name)
        bound = 4.5 * np.sqrt(expected * (1 - expected) / n) + 1.5 / n
        worst = np.argmax(np.abs(observed - expected) - bound)
        assert np.all(np.abs(observed - expected) <= bound), (name, nucleated_classes()[worst], observed[worst])
    idx = {c: i for i, c in enumerate(nucleated_classes())}
    assert _shares(cells, "ALL")[0][idx["lymphoblast"]] > 0.3
    aml = _shares(cells, "AML")[0]
    assert aml[idx["myeloblast"]] + aml[idx["monoblast"]] > 0.3

    config, cells = _cohort(tmp_path, "o1", patients=12, overlap=1.0, patient_concentration=1e7)
    expected = expected_compositions(config)
    for name in expected:
        np.testing.assert_allclose(expected[name], expected["ALL"], atol=1e-12)
    (p, n), (q, m) = _shares(cells, "ALL"), _shares(cells, "AML")
    pooled = (p * n + q * m) / (n + m)
    assert np.all(np.abs(p - q) <= 4.5 * np.sqrt(pooled * (1 - pooled) * (1 / n + 1 / m)) + 2.0 / min(n, m))


def _rod_pixels(image: np.ndarray, c: dict) -> int:
    crop = image[int(c["y1"]) : int(c["y2"]), int(c["x1"]) : int(c["x2"])].astype(np.float32)
    od = -np.log((crop + 1) / 256)
    # an Auer rod absorbs green far more than red: redder and denser than any chromatin
    return int(((od[..., 1] > 2.0) & (od[..., 1] > 2.3 * od[..., 0])).sum())


def test_auer_rod_cue_marks_only_aml_blasts_and_is_visible(tmp_path: Path) -> None:
    config, cells = _cohort(tmp_path, "cue", patients=6, overlap=1.0, cue_fraction=0.5)
    flagged = [c for c in cells if c["auer_rod"] == "1"]
    assert flagged and all(c["diagnosis"] == "AML" and c["true_label"] in config.cue_classes for c in flagged)
    eligible = [c for c in cells if c["diagnosis"] == "AML" and c["true_label"] in config.cue_classes]
    share = len(flagged) / len(eligible)
    assert abs(share - 0.5) <= 4.5 * np.sqrt(0.25 / len(eligible))
    # with overlap 1 the counts are equal across diagnoses, yet every AML patient carries the cue
    patient_of = {r["roi_id"]: r["patient_id"] for r in _rows(tmp_path / "cue" / "rois.csv")}
    aml = {patient_of[c["roi_id"]] for c in cells if c["diagnosis"] == "AML"}
    assert aml and {patient_of[c["roi_id"]] for c in flagged} == aml
    # the cue is in the pixels, not only in the CSV: rod-coloured pixels appear on flagged cells alone
    images: dict[str, np.ndarray] = {}
    rois = {r["roi_id"]: r["image"] for r in _rows(tmp_path / "cue" / "rois.csv")}
    for c in cells:
        if c["true_label"] in config.cue_classes and c["roi_id"] not in images:
            images[c["roi_id"]] = np.asarray(Image.open(tmp_path / "cue" / rois[c["roi_id"]]))
    rods = [_rod_pixels(images[c["roi_id"]], c) for c in flagged]
    blasts = [c for c in cells if c["true_label"] in config.cue_classes and c["auer_rod"] == "0"]
    plain = [_rod_pixels(images[c["roi_id"]], c) for c in blasts]
    assert np.median(rods) > max(3, np.percentile(plain, 95))

    config, cells = _cohort(tmp_path, "nocue", patients=3, cue=False)
    assert all(c["auer_rod"] == "0" for c in cells)


def test_label_noise_and_unlabelled_share(tmp_path: Path) -> None:
    _, cells = _cohort(tmp_path, "noisy", patients=3, label_noise=0.3, unlabelled_fraction=0.2)
    labelled = [c for c in cells if c["consensus_label"]]
    unlabelled = len(cells) - len(labelled)
    assert abs(unlabelled / len(cells) - 0.2) <= 4.5 * np.sqrt(0.16 / len(cells))
    wrong = sum(c["consensus_label"] != c["true_label"] for c in labelled) / len(labelled)
    assert abs(wrong - 0.3) <= 4.5 * np.sqrt(0.21 / len(labelled))
    assert all(c["consensus_label"] in all_classes() for c in labelled)


def test_cli_help_describes_every_option(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["synth", "--help"])
    text = capsys.readouterr().out
    for option in ("--out", "--seed", "--config", "--patients", "--overlap", "--label-noise", "--cue-fraction"):
        assert option in text
    assert "--no-cue" in text and "progress" in text


def test_cohort_goes_through_the_zenodo_reader(tmp_path: Path) -> None:
    """The demo path: `mil synth` output read by `mil cells --format zenodo` like the real release."""
    pytest.importorskip("mil.readers.zenodo")
    out = _synth(tmp_path / "s", 1, "--label-noise", "0.2")
    assert main(["cells", "--format", "zenodo", "--input", str(out), "--out", str(tmp_path / "cells")]) == 0
    table = _rows(tmp_path / "cells" / "cells.csv")
    synth = {r["cell_id"]: r for r in _rows(out / "cells.csv")}
    assert len(table) == len(synth)
    for row in table:
        src = synth[row["cell_id"]]
        assert (row["x0"], row["y0"], row["x1"], row["y1"]) == (src["x1"], src["y1"], src["x2"], src["y2"])
        assert row["label"] == src["consensus_label"] and row["auer_rod"] == src["auer_rod"]
    diagnoses = {r["patient_id"]: r["diagnosis"] for r in _rows(tmp_path / "cells" / "patients.csv")}
    clinical = {r["patient_id"]: r["leukemia_type"] for r in _rows(out / "clinical.csv", delimiter=";")}
    assert diagnoses == clinical
