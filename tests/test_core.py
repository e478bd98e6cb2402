"""The hub contracts: label map, cell table, patient table, atomic writes, CLI dispatch."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mil.atomic import atomic_path, atomic_torch_save, atomic_write_text, leftover_temp_files
from mil.cell_table import (
    CellTable,
    PatientTable,
    read_cell_table,
    read_patient_table,
    unsafe_patient_id_reason,
    validate_cell_table,
)
from mil.cli import COMMANDS, main
from mil.errors import InputError
from mil.labels import identity_label_map, load_label_map, normalize_label


def test_default_label_map_has_33_classes_and_groups_cover_them():
    lm = load_label_map()
    assert lm.num_classes == 33
    grouped = [c for g in lm.groups.values() for c in g]
    assert sorted(grouped) == sorted(lm.classes)
    assert lm.lookup("myelocytic_blast") == "myeloblast"
    assert lm.lookup("Segmented Neutrophil") == "segmented_neutrophil"  # case/space variants are one label
    assert lm.lookup("artifact") == "drop"
    assert normalize_label(" Giant-Platelet ") == "giant_platelet"


def test_unknown_labels_are_all_listed_at_once():
    lm = load_label_map()
    with pytest.raises(InputError) as e:
        lm.apply(["lymphocyte", "alien_cell", "", "robot"], where=["a.csv:2", "a.csv:3", "a.csv:4", "a.csv:5"])
    msg = str(e.value)
    assert "a.csv:3" in msg and "alien_cell" in msg and "a.csv:5" in msg and "robot" in msg
    assert "--label-map" in msg


def test_identity_map_keeps_dataset_labels():
    lm = identity_label_map(["WBC", "RBC", "WBC", "Platelets"])
    assert lm.classes == ("Platelets", "RBC", "WBC")
    assert lm.apply(["RBC"]) == ["RBC"]


@pytest.mark.parametrize("pid", ["../x", "a/b", "a\\b", "..", ".hidden", "", " p1"])
def test_unsafe_patient_ids_are_named(pid):
    assert unsafe_patient_id_reason(pid)


def test_html_like_patient_ids_are_allowed_in_tables():
    # Escaping is the report's job; only ids that would escape a folder are refused.
    assert unsafe_patient_id_reason("<script>alert(1)<script>") is None


def _table(tmp_path, n=3, size=(64, 48)):
    img = tmp_path / "field.png"
    Image.fromarray(np.zeros((size[1], size[0], 3), np.uint8)).save(img)
    rows = [
        {
            "cell_id": f"c{i}",
            "patient_id": "p1",
            "image_path": str(img),
            "x0": 2 * i,
            "y0": 1,
            "x1": 2 * i + 5,
            "y1": 9,
            "label": "lymphocyte",
            "raw_label": "lymphocyte",
            "source": "test",
            "extra": i,
        }
        for i in range(n)
    ]
    return CellTable(rows=rows)


def test_cell_table_round_trip_keeps_extra_columns_and_fingerprint(tmp_path):
    table = _table(tmp_path)
    table.write(tmp_path / "cells.csv")
    back = read_cell_table(tmp_path / "cells.csv")
    assert len(back) == 3 and back.rows[1]["extra"] == "1"
    assert CellTable.fingerprint(back.rows) == CellTable.fingerprint(table.rows)
    back.rows[0]["x1"] += 1
    assert CellTable.fingerprint(back.rows) != CellTable.fingerprint(table.rows)
    assert leftover_temp_files(tmp_path) == []


def test_relative_image_paths_resolve_against_the_table_folder(tmp_path):
    (tmp_path / "cells.csv").write_text("patient_id,image_path,x0,y0,x1,y1\np1,field.png,0,0,4,4\n")
    assert read_cell_table(tmp_path / "cells.csv").rows[0]["image_path"] == str(tmp_path / "field.png")


def test_validation_lists_every_bad_row_with_file_and_fix(tmp_path):
    table = _table(tmp_path)
    table.rows[0]["x1"] = 500  # outside the 64x48 image
    table.rows[1]["x1"] = table.rows[1]["x0"]  # zero area
    table.rows[2]["image_path"] = str(tmp_path / "missing.png")
    with pytest.raises(InputError) as e:
        validate_cell_table(table, where="cells.csv")
    msg = str(e.value)
    assert "row 2" in msg and "outside its 64x48 image" in msg
    assert "row 3" in msg and "zero or negative area" in msg
    assert "row 4" in msg and "missing.png" in msg and "does not exist" in msg


def test_unreadable_image_is_named(tmp_path):
    table = _table(tmp_path, n=1)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    table.rows[0]["image_path"] = str(bad)
    with pytest.raises(InputError, match="broken.png.*cannot be read"):
        validate_cell_table(table)


def test_patient_table_problems(tmp_path):
    path = tmp_path / "patients.csv"
    path.write_text("patient_id,diagnosis\np1,AML\np1,ALL\n../x,CML\np3,\n")
    with pytest.raises(InputError) as e:
        read_patient_table(path)
    msg = str(e.value)
    assert "row 3" in msg and "repeats row 2" in msg
    assert "'../x'" in msg and "path separator" in msg
    assert "row 5" in msg and "no diagnosis" in msg
    PatientTable(rows=[{"patient_id": "p1", "diagnosis": "AML"}]).write(tmp_path / "ok.csv")
    assert read_patient_table(tmp_path / "ok.csv").diagnoses() == ["AML"]


def test_atomic_write_leaves_old_file_when_validation_fails(tmp_path):
    target = tmp_path / "report.txt"
    atomic_write_text(target, "old")

    def refuse(_):
        raise ValueError("bad content")

    with pytest.raises(ValueError), atomic_path(target, refuse) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "old"
    assert leftover_temp_files(tmp_path) == []


def test_the_same_checkpoint_saved_twice_is_the_same_bytes(tmp_path):
    # Bags record their encoder checkpoint's sha256: a rewrite of unchanged weights must not make them stale.
    import hashlib

    import torch

    obj = {"state_dict": {"w": torch.arange(6.0).reshape(2, 3)}, "extra": {"classes": ["a", "b"]}}
    digests = set()
    for name in ("a.pt", "b.pt", "a.pt"):
        atomic_torch_save(obj, tmp_path / name, validate=lambda p: torch.load(p, weights_only=True))
        digests.add(hashlib.sha256((tmp_path / name).read_bytes()).hexdigest())
    assert len(digests) == 1 and leftover_temp_files(tmp_path) == []
    assert torch.equal(torch.load(tmp_path / "a.pt", weights_only=True)["state_dict"]["w"], obj["state_dict"]["w"])


def test_cli_lists_every_command(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_cli_unknown_command_names_valid_ones():
    proc = subprocess.run(
        [sys.executable, "-m", "mil.cli", "frobnicate"], capture_output=True, text=True, env={**os.environ}
    )
    assert proc.returncode != 0 and "synth" in proc.stderr and "frobnicate" in proc.stderr
