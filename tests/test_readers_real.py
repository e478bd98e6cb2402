"""Acceptance on real data in ../shared/data (skipped when it is absent): BCCD as VOC, PBC as ImageFolder."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

from conftest import shared_data
from PIL import Image

from mil.cell_table import read_cell_table, read_patient_table
from mil.cli import main


def test_bccd_voc_counts_and_spot_checked_boxes(tmp_path, capsys):
    bccd = shared_data("bccd/BCCD")
    out = tmp_path / "bccd"
    assert main(["cells", "--format", "voc", "--input", str(bccd), "--out", str(out)]) == 0
    assert "364 patients, 364 images, 4888 cells" in capsys.readouterr().out
    cells = read_cell_table(out / "cells.csv")
    assert len({r["image_path"] for r in cells.rows}) == 364
    assert len(cells) == 4888
    assert Counter(r["label"] for r in cells.rows) == {"RBC": 4155, "WBC": 372, "Platelets": 361}
    assert len(read_patient_table(out / "patients.csv", validate=False)) == 364
    # Spot check: the boxes of two files, read here from the XML: VOC's 1-based inclusive pixels become
    # 0-based half-open (x0 = xmin - 1, x1 = xmax). 00338 holds a one-pixel box (xmin == xmax).
    for stem in ("BloodImage_00000", "BloodImage_00338"):
        doc = ET.parse(bccd / "Annotations" / f"{stem}.xml").getroot()
        expected = []
        for obj in doc.findall("object"):
            xmin, ymin, xmax, ymax = (int(obj.findtext(f"bndbox/{c}")) for c in ("xmin", "ymin", "xmax", "ymax"))
            expected.append((obj.findtext("name"), xmin - 1, ymin - 1, xmax, ymax))
        image = str((bccd / "JPEGImages" / f"{stem}.jpg").absolute())
        got = [(r["label"], r["x0"], r["y0"], r["x1"], r["y1"]) for r in cells.rows if r["image_path"] == image]
        assert got == expected
        assert {r["patient_id"] for r in cells.rows if r["image_path"] == image} == {stem}
    first = [r for r in cells.rows if r["patient_id"] == "BloodImage_00000"][0]
    assert (first["label"], first["x0"], first["y0"], first["x1"], first["y1"]) == ("WBC", 259, 176, 491, 376)


def test_pbc_imagefolder_800_rows_in_8_classes(tmp_path, capsys):
    pbc = shared_data("pbc-sample")
    out = tmp_path / "pbc"
    assert main(["cells", "--format", "imagefolder", "--input", str(pbc), "--out", str(out)]) == 0
    assert "800 patients, 800 images, 800 cells" in capsys.readouterr().out
    cells = read_cell_table(out / "cells.csv")
    assert len(cells) == 800
    counts = Counter(r["label"] for r in cells.rows)
    assert len(counts) == 8 and set(counts.values()) == {100}
    assert set(counts) == {p.name for p in pbc.iterdir() if p.is_dir()}
    for r in cells.rows[::97]:  # the box covers the whole crop, whatever its size
        with Image.open(r["image_path"]) as im:
            assert (r["x0"], r["y0"], r["x1"], r["y1"]) == (0, 0, *im.size)
        assert Path(r["image_path"]).parent.name == r["label"]
        assert r["patient_id"] == Path(r["image_path"]).stem
