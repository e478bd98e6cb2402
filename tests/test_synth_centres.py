"""`mil synth` centres, stain/scanner shift and patient covariates: known answers for external validation."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from sklearn.metrics import roc_auc_score

from mil.cli import main
from mil.errors import ConfigError
from mil.synth.centres import assign_patients, resolve_centres
from mil.synth.config import DEFAULT_SYNTH_CONFIG, SynthConfig, config_from_dict, load_synth_config
from mil.synth.writer import clinical_table, write_cohort

TINY = dict(fields_per_patient=2, cells_per_field=10, field_width=192, field_height=192, erythrocyte_density=0.3)


def _rows(path: Path, delimiter: str = ",") -> list[dict]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh, delimiter=delimiter))


def _config(**yaml_keys) -> SynthConfig:
    """The default config with some YAML keys replaced, parsed the way a YAML file is."""
    return config_from_dict({**yaml.safe_load(DEFAULT_SYNTH_CONFIG.read_text()), **yaml_keys}, "test config")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _mean_lab(paths: list[Path]) -> np.ndarray:
    from skimage.color import rgb2lab

    return np.mean([rgb2lab(np.asarray(Image.open(p).convert("RGB"))).reshape(-1, 3).mean(0) for p in paths], axis=0)


def test_one_centre_cohort_is_the_cohort_from_before_centres(tmp_path: Path) -> None:
    """Pinned from the generator before centres and covariates existed: cells, ROIs and the Zenodo columns of
    clinical.csv are byte for byte what they were; only `centre` and the covariates are appended."""
    argv = ["synth", "--out", str(tmp_path), "--seed", "5", "--patients", "4", "--fields-per-patient", "2"]
    argv += ["--cells-per-field", "12", "--field-width", "256", "--field-height", "256", "--quiet"]
    assert main(argv) == 0
    assert _sha(tmp_path / "cells.csv") == "ce32e605a3bf4d4ba1ed12e8f22f50fb2bb5ef22fca57596e3ef1f16750210b1"
    assert _sha(tmp_path / "rois.csv") == "84c8c2a6b63a76425473a4612cc9af19842efc6187fa9cadd3e8b9fc1dd4bb37"
    zenodo = [";".join(line.split(";")[:5]) for line in (tmp_path / "clinical.csv").read_text().splitlines()]
    assert zenodo == [
        "patient_id;age;ncit_concept_code;leukemia_type;leukemia_subtype",
        "SYN001;13;C3174;CML;chronic phase",
        "SYN002;14;C3167;ALL;B-ALL",
        "SYN003;5;C3171;AML;acute myelomonocytic leukemia",
        "SYN004;13;C3167;ALL;T-ALL",
    ]
    assert {r["centre"] for r in _rows(tmp_path / "clinical.csv", ";")} == {"A"}


def test_centres_get_their_patients_prevalence_cells_and_settings() -> None:
    config = _config(
        patients=90,
        centres=3,
        centre_settings={
            "B": {"share": 2, "proportions": {"AML": 3, "ALL": 1}, "cells_per_patient_scale": 0.5},
            "C": {"stain_shift": 0.0, "unlabelled_fraction": 0.7},
        },
        stain_shift=0.8,
    )
    a, b, c = resolve_centres(config)
    assert [x.name for x in (a, b, c)] == ["A", "B", "C"] and (a.patients, b.patients, c.patients) == (23, 45, 22)
    assert (a.stain_shift, b.stain_shift, c.stain_shift) == (0.0, 0.8, 0.0)
    assert (a.fields_per_patient, b.fields_per_patient, c.fields_per_patient) == (4, 2, 4)
    assert (a.unlabelled_fraction, b.unlabelled_fraction, c.unlabelled_fraction) == (0.0, 0.0, 0.7)
    plan = assign_patients(config, np.random.default_rng(0))
    assert [centre.name for centre, _ in plan] == ["A"] * 23 + ["B"] * 45 + ["C"] * 22  # consecutive blocks
    counts = {(centre.name, dx): 0 for centre in (a, b, c) for dx in ("ALL", "AML", "CML")}
    for centre, dx in plan:
        counts[centre.name, dx] += 1
    assert (counts["B", "AML"], counts["B", "ALL"], counts["B", "CML"]) == (34, 11, 0)  # exactly 3:1, no CML
    assert (counts["A", "ALL"], counts["A", "AML"], counts["A", "CML"]) == (9, 8, 6)  # the diagnoses' 0.4/0.35/0.25
    rows = clinical_table(config, seed=1)
    assert [r["centre"] for r in rows] == [centre.name for centre, _ in assign_patients(config, _rng(1))]


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed]))


def test_two_centre_cohort_on_disk_honours_fields_labels_and_goes_through_zenodo(tmp_path: Path) -> None:
    settings = {"B": {"cells_per_patient_scale": 0.5, "unlabelled_fraction": 1.0}}
    config = _config(patients=4, centres=2, covariate_missing=0.3, centre_settings=settings, **TINY)
    summary = write_cohort(config, tmp_path / "cohort", seed=2, progress=False)
    assert summary.centres == {"A": {"ALL": 1, "AML": 1, "CML": 0}, "B": {"ALL": 1, "AML": 1, "CML": 0}}
    clinical = {r["patient_id"]: r for r in _rows(tmp_path / "cohort" / "clinical.csv", ";")}
    rois = _rows(tmp_path / "cohort" / "rois.csv")
    fields = {pid: sum(r["patient_id"] == pid for r in rois) for pid in clinical}
    assert {pid: (clinical[pid]["centre"], n) for pid, n in fields.items()} == {
        "SYN001": ("A", 2),
        "SYN002": ("A", 2),
        "SYN003": ("B", 1),
        "SYN004": ("B", 1),
    }
    patient_of = {r["roi_id"]: r["patient_id"] for r in rois}
    for cell in _rows(tmp_path / "cohort" / "cells.csv"):
        assert bool(cell["consensus_label"]) == (clinical[patient_of[cell["roi_id"]]]["centre"] == "A")
    # the config written beside the cohort regenerates it, centre settings and covariates included
    assert load_synth_config(tmp_path / "cohort" / "synth_config.yaml") == config

    # the zenodo reader carries the centre and every covariate column (blanks stay blank) into patients.csv
    assert main(["cells", "--format", "zenodo", "--input", str(tmp_path / "cohort"), "--out", str(tmp_path / "c")]) == 0
    patients = {r["patient_id"]: r for r in _rows(tmp_path / "c" / "patients.csv")}
    assert set(patients) == set(clinical)
    for pid, row in patients.items():
        assert row["diagnosis"] == clinical[pid]["leukemia_type"]
        for column in ["age", "centre"] + [c.name for c in config.covariates]:
            assert row[column] == clinical[pid][column], (pid, column)


def test_stain_shift_changes_only_the_colours_of_the_other_centres(tmp_path: Path) -> None:
    def cohort(name: str, shift: float, **yaml_keys) -> Path:
        config = _config(patients=4, centres=2, stain_shift=shift, **TINY, **yaml_keys)
        write_cohort(config, tmp_path / name, seed=4, progress=False)
        return tmp_path / name

    none, shifted = cohort("s0", 0.0), cohort("s1", 1.0)
    assert _sha(none / "cells.csv") == _sha(shifted / "cells.csv")  # same cells, boxes and labels at any shift
    centre = {r["patient_id"]: r["centre"] for r in _rows(none / "clinical.csv", ";")}
    images = {c: [r["image"] for r in _rows(none / "rois.csv") if centre[r["patient_id"]] == c] for c in "AB"}
    for image in images["A"]:  # the first centre is the reference: untouched
        assert _sha(none / image) == _sha(shifted / image)
    lab = {(c, s): _mean_lab([root / i for i in images[c]]) for c in "AB" for s, root in (("0", none), ("1", shifted))}
    same_patients = np.linalg.norm(lab["B", "1"] - lab["B", "0"])
    between_centres = np.linalg.norm(lab["B", "1"] - lab["A", "1"])
    without_shift = np.linalg.norm(lab["B", "0"] - lab["A", "0"])
    assert same_patients > 10 and between_centres > 10, (same_patients, between_centres)
    assert without_shift < 4, without_shift  # only patient-to-patient stain variation and content
    # a Reinhard-style match of per-channel LAB mean and std removes most of it
    from skimage.color import rgb2lab

    before, after = [], []
    for image in images["B"]:
        ref, moved = (rgb2lab(np.asarray(Image.open(root / image))) for root in (none, shifted))
        r, m = ref.reshape(-1, 3), moved.reshape(-1, 3)
        matched = (m - m.mean(0)) / m.std(0) * r.std(0) + r.mean(0)
        before.append(np.linalg.norm(m - r, axis=1).mean())
        after.append(np.linalg.norm(matched - r, axis=1).mean())
    assert np.mean(after) < 0.5 * np.mean(before), (before, after)

    # a centre's JPEG scanner: lossy pixels, same cells, same colours on average; the other centre untouched
    jpeg = cohort("jpeg", 0.0, centre_settings={"B": {"jpeg_quality": 40}})
    assert _sha(jpeg / "cells.csv") == _sha(none / "cells.csv")
    assert all(_sha(jpeg / i) == _sha(none / i) for i in images["A"])
    for image in images["B"]:
        a, b = (np.asarray(Image.open(root / image)).astype(float) for root in (none, jpeg))
        assert 0.5 < np.abs(a - b).mean() < 10
    assert np.linalg.norm(_mean_lab([jpeg / i for i in images["B"]]) - lab["B", "0"]) < 1.5


def _auroc(rows: list[dict], column: str, positive: str, negative: str) -> float:
    pairs = [
        (r["leukemia_type"] == positive, float(r[column])) for r in rows if r["leukemia_type"] in (positive, negative)
    ]
    return roc_auc_score([p for p, _ in pairs], [v for _, v in pairs])


def test_covariates_follow_the_diagnosis_only_at_strength_above_zero() -> None:
    base = load_synth_config().replace(patients=400)
    independent = clinical_table(base.replace(covariate_strength=0.0), seed=0)
    strong = clinical_table(base.replace(covariate_strength=2.0), seed=0)
    numeric = ["age", "wbc_count", "lymph_count", "platelet_count", "haemoglobin"]
    for column in numeric:
        for pos, neg in (("AML", "ALL"), ("CML", "ALL"), ("CML", "AML")):
            assert abs(_auroc(independent, column, pos, neg) - 0.5) < 0.12, (column, pos, neg)
    # wbc_count: AML and ALL lie strength * (0.5 - -0.5) = 2 SDs apart, AUROC ~ Phi(2 / sqrt 2) = 0.92
    assert 0.85 < 1 - _auroc(strong, "wbc_count", "AML", "ALL") < 0.97
    assert _auroc(strong, "platelet_count", "CML", "AML") > 0.85
    assert all(float(r["lymph_count"]) <= float(r["wbc_count"]) for r in strong)

    def male(rows, dx):
        return np.mean([r["sex"] == "M" for r in rows if r["leukemia_type"] == dx])

    assert abs(male(independent, "ALL") - male(independent, "AML")) < 0.15
    assert male(strong, "ALL") - male(strong, "AML") > 0.2
    # the same latent draws at every strength: the cells' diagnoses and the patients stay, values move
    assert [r["leukemia_type"] for r in independent] == [r["leukemia_type"] for r in strong]
    # and deterministic for a seed
    assert clinical_table(base.replace(covariate_strength=2.0), seed=0) == strong


def test_missing_share_is_honoured_and_leaves_the_other_values_alone() -> None:
    base = load_synth_config().replace(patients=300, covariate_strength=1.0)
    full = clinical_table(base, seed=3)
    holed = clinical_table(base.replace(covariate_missing=0.25), seed=3)
    columns = ["age"] + [c.name for c in base.covariates]
    blanks = [r[c] == "" for r in holed for c in columns]
    assert abs(np.mean(blanks) - 0.25) < 4.5 * np.sqrt(0.25 * 0.75 / len(blanks))
    for column in columns:
        assert any(r[column] == "" for r in holed) and all(r[column] != "" for r in full)
    for r, f in zip(holed, full):
        assert all(r[c] in ("", f[c]) for c in columns)
        assert (r["centre"], r["leukemia_type"]) == (f["centre"], f["leukemia_type"])


def test_binary_cohorts_from_the_yaml_or_the_cli(tmp_path: Path) -> None:
    spec = yaml.safe_load(DEFAULT_SYNTH_CONFIG.read_text())
    del spec["diagnoses"]["CML"]  # covariate effects naming CML are ignored, so nothing else needs editing
    path = tmp_path / "binary.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    config = load_synth_config(path).replace(patients=40, covariate_strength=2.0)
    rows = clinical_table(config, seed=0)
    assert {r["leukemia_type"] for r in rows} == {"AML", "ALL"}
    assert sum(r["leukemia_type"] == "AML" for r in rows) == round(40 * 0.35 / 0.75)
    assert 1 - _auroc(rows, "wbc_count", "AML", "ALL") > 0.8
    # the CLI's --diagnoses selects the same subset from the default YAML
    via_cli = load_synth_config().replace(patients=40, covariate_strength=2.0).only_diagnoses(["ALL", "AML"])
    assert [d.name for d in via_cli.diagnoses] == ["ALL", "AML"] and via_cli.cue
    assert clinical_table(via_cli, seed=0) == rows
    assert not load_synth_config().only_diagnoses(["ALL", "CML"]).cue  # the Auer-rod cue needs AML
    out = tmp_path / "cohort"
    argv = ["synth", "--out", str(out), "--patients", "4", "--fields-per-patient", "1", "--cells-per-field", "6"]
    assert main(argv + ["--field-width", "192", "--field-height", "192", "--diagnoses", "AML,ALL", "--quiet"]) == 0
    assert {r["leukemia_type"] for r in _rows(out / "clinical.csv", ";")} == {"AML", "ALL"}
    with pytest.raises(ConfigError, match=r"\['APL'\] not in the config's diagnoses"):
        load_synth_config().only_diagnoses(["AML", "APL"])


def test_invalid_centre_and_covariate_settings_name_the_fix() -> None:
    base = load_synth_config()
    with pytest.raises(ConfigError, match=r"centre_settings names centre 'C', but the cohort has centres \['A', 'B'\]"):
        _config(centres=2, centre_settings={"C": {}})
    with pytest.raises(ConfigError, match=r"centre_settings.B: unknown key\(s\) \['prevalence'\].*proportions"):
        _config(centres=2, centre_settings={"B": {"prevalence": {"AML": 1}}})
    with pytest.raises(ConfigError, match=r"centre_settings.B.proportions names \['APL'\]"):
        _config(centres=2, centre_settings={"B": {"proportions": {"APL": 1}}})
    with pytest.raises(ConfigError, match=r"centres must lie in \[1, 26\]"):
        base.replace(centres=0)
    with pytest.raises(ConfigError, match=r"covariates.crp must be a mapping with `kind` one of"):
        _config(covariates={"crp": {"kind": "gamma"}})
    with pytest.raises(ConfigError, match=r"covariates.crp \(lognormal\) needs \['sd'\]"):
        _config(covariates={"crp": {"kind": "lognormal", "median": 5}})
    bad_share = {"lymph": {"kind": "share", "of": "wbc", "mean": 0.3, "sd": 1}}
    with pytest.raises(ConfigError, match=r"covariates.lymph.of = 'wbc' must name a lognormal or normal covariate"):
        _config(covariates=bad_share)
    with pytest.raises(ConfigError, match=r"covariates \['centre'\] would overwrite a column"):
        _config(covariates={"centre": {"kind": "normal", "mean": 0, "sd": 1}})
    with pytest.raises(ConfigError, match=r"covariate_missing must lie in \[0, 1\]"):
        base.replace(covariate_missing=1.5)


def test_cli_help_names_the_centre_and_covariate_options(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["synth", "--help"])
    text = capsys.readouterr().out
    for option in ("--centres", "--stain-shift", "--covariate-strength", "--covariate-missing", "--diagnoses"):
        assert option in text
