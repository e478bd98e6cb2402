"""The reader registry and the `mil cells` command; each format's round trips are in test_readers_<kind>.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from reader_files import boxes_of, png, voc_dataset, zenodo_dataset

from mil.cell_table import read_cell_table, read_patient_table
from mil.cli import main
from mil.errors import ConfigError
from mil.labels import load_label_map
from mil.readers import get_reader, list_readers, read_dataset, register_reader
from mil.readers import registry as reader_registry

BUILTIN = ("coco", "imagefolder", "patient-folders", "voc", "yolo", "zenodo")


def test_registry_lists_every_builtin_format_and_refuses_unknown_names():
    assert set(BUILTIN) <= set(list_readers())
    with pytest.raises(ConfigError) as e:
        get_reader("pascal")
    for name in BUILTIN:
        assert name in str(e.value)
    assert get_reader("zenodo").carries_diagnosis and get_reader("zenodo").default_label_map == "default"
    assert not get_reader("voc").carries_diagnosis and get_reader("voc").default_label_map == "dataset"
    assert get_reader("voc").options == ["patient_from", "patients_csv", "voc_origin"]


def test_registering_a_name_twice_is_an_error():
    with pytest.raises(ConfigError, match="registered twice"):

        @register_reader("voc")
        def another_voc(input, *, label_map=None):
            raise AssertionError("never called")


def test_missing_idc_module_gives_a_clear_error(monkeypatch):
    monkeypatch.setattr(reader_registry, "OPTIONAL_MODULES", {"idc-test": "mil.readers.no_such_module"})
    monkeypatch.setattr(reader_registry, "_UNAVAILABLE", {})
    monkeypatch.setattr(reader_registry, "_loaded", False)
    with pytest.raises(ConfigError, match=r"'idc-test' cannot be read here: its module mil.readers.no_such_module"):
        get_reader("idc-test")
    assert "idc-test" not in list_readers()


def test_an_option_the_format_does_not_take_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not take --voc-origin"):
        read_dataset("zenodo", tmp_path, voc_origin=1)


def test_mil_cells_writes_tables_that_read_back(tmp_path, capsys):
    root = zenodo_dataset(tmp_path / "zenodo")
    out = tmp_path / "out"
    assert main(["cells", "--format", "zenodo", "--input", str(root), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2 patients, 3 images, 5 cells" in printed
    assert "myeloblast" in printed and "(unlabelled)" in printed and "AML" in printed
    cells = read_cell_table(out / "cells.csv")
    assert boxes_of(cells)["c1"] == (3, 4, 20, 30)
    assert cells.rows[0]["auer_rod"] == "1" and cells.rows[0]["label"] == "myeloblast"
    patients = read_patient_table(out / "patients.csv")
    assert patients.diagnoses() == ["ALL", "AML"]
    assert not list(out.glob(".*.tmp"))


def test_mil_cells_voc_with_options(tmp_path, capsys):
    voc_dataset(tmp_path / "voc")
    out = tmp_path / "out"
    argv = ["cells", "--format", "voc", "--input", str(tmp_path / "voc"), "--out", str(out), "--voc-origin", "1"]
    assert main([*argv, "--no-check-images"]) == 0
    assert "2 patients, 2 images, 4 cells" in capsys.readouterr().out
    assert boxes_of(read_cell_table(out / "cells.csv"))["field_a:0"] == (10, 20, 40, 45)


def test_help_describes_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["cells", "--help"])
    text = capsys.readouterr().out
    for option in ("--format", "--input", "--out", "--label-map", "--patients-csv", "--patient-from", "--voc-origin"):
        assert option in text
    assert "--no-check-images" in text
    for name in BUILTIN:
        assert f"  {name} " in text  # each format listed with its one-line description


def test_mil_cells_hands_reader_options_and_out_to_readers_that_take_them(tmp_path, monkeypatch, capsys):
    seen = {}

    def read_fake(input, *, label_map=None, out_dir=None, clinical=None, roi_padding=32):
        """A reader that writes images of its own under --out (as idc writes its ROI PNGs)."""
        seen.update(input=input, out_dir=out_dir, clinical=clinical, roi_padding=roi_padding)
        image = png(out_dir / "rois" / "r.png", (16, 16))
        from mil.cell_table import CellTable, PatientTable

        row = {"cell_id": "c", "patient_id": "p", "image_path": str(image), "x0": 0, "y0": 0, "x1": 8, "y1": 8}
        return CellTable(rows=[{**row, "label": "", "raw_label": "", "det_score": None, "source": "fake"}]), (
            PatientTable(rows=[{"patient_id": "p", "diagnosis": "AML"}])
        )

    spec = reader_registry.ReaderSpec("fake", read_fake, "fake", True, "default")
    monkeypatch.setitem(reader_registry._READERS, "fake", spec)
    out = tmp_path / "out"
    argv = ["cells", "--format", "fake", "--input", str(tmp_path), "--out", str(out), "--clinical", "c.csv"]
    assert main([*argv, "--roi-padding", "4"]) == 0
    assert seen == {"input": tmp_path, "out_dir": out, "clinical": Path("c.csv"), "roi_padding": 4}
    assert (out / "cells.csv").exists()
    assert main([*argv, "--voc-origin", "0"]) == 2
    assert "format 'fake' does not take --voc-origin" in capsys.readouterr().err


def test_a_synthetic_cohort_reads_through_the_zenodo_reader(tmp_path, capsys):
    pytest.importorskip("mil.synth.command")
    synth = ["synth", "--out", str(tmp_path / "synth"), "--seed", "3", "--patients", "3", "--quiet"]
    small = ["--fields-per-patient", "1", "--cells-per-field", "8", "--field-width", "192", "--field-height", "192"]
    assert main([*synth, *small]) == 0
    assert main(["cells", "--format", "zenodo", "--input", str(tmp_path / "synth"), "--out", str(tmp_path / "c")]) == 0
    cells, patients = read_cell_table(tmp_path / "c" / "cells.csv"), read_patient_table(tmp_path / "c" / "patients.csv")
    assert len(patients) == 3 and set(patients.diagnoses()) <= {"ALL", "AML", "CML"}
    classes = set(load_label_map().classes) | {"drop", ""}
    assert {r["label"] for r in cells.rows} <= classes
    assert all(r["auer_rod"] in ("0", "1") for r in cells.rows)  # the cue's ground truth passes through
    with open(tmp_path / "synth" / "cells.csv") as f:
        assert len(cells) == sum(1 for _ in f) - 1
