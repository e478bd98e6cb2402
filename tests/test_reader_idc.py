"""Round trip of the `idc` reader through DICOM files written with pydicom (slide) and highdicom (annotations)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from dicom_fixtures import Disc, GroupSpec, draw_discs, write_annotations, write_slide
from PIL import Image

from mil.cell_table import read_cell_table, read_patient_table, validate_cell_table
from mil.errors import ConfigError, InputError
from mil.readers.idc import read_idc

# Seven cells at known places: five in ROI 1, two in ROI 2 (boxes are x0, y0, x1, y1 of level-0 pixels).
DISCS = [
    Disc(101, (40, 50, 70, 80), (120, 30, 140)),
    Disc(102, (100, 60, 124, 84), (90, 20, 120)),
    Disc(103, (150, 150, 190, 190), (60, 60, 150)),
    Disc(104, (60, 200, 84, 224), (30, 30, 90)),
    Disc(105, (220, 100, 250, 130), (180, 120, 170)),
    Disc(106, (330, 340, 360, 370), (50, 80, 160)),
    Disc(107, (400, 420, 430, 450), (200, 160, 200)),
    Disc(108, (440, 40, 470, 70), (150, 90, 90)),  # outside both ROIs: an unlabelled detection
]
ROIS = {1: (32, 40, 272, 240), 2: (320, 330, 480, 470)}
ROI_OF = {101: 1, 102: 1, 103: 1, 104: 1, 105: 1, 106: 2, 107: 2}
# Coded types as the IDC conversion of the dataset writes them beside the raw label.
MYELOBLAST = ("15622002", "SCT", "Myeloblast")
LYMPHOCYTE = ("56972008", "SCT", "Lymphocyte")
MONOCYTE = ("55918008", "SCT", "Monocyte")
HAEMATOLOGICAL = ("414387006", "SCT", "Structure of haematological system")


def _by_id(ids):
    return [d for d in DISCS if d.cell_id in ids]


def _group(label, ids, *, property_type="cell", graphic_type="POLYGON", with_roi=True, id_style="idc"):
    discs = _by_id(ids)
    return GroupSpec(
        label=label,
        boxes=[d.box for d in discs],
        property_type=property_type,
        cell_ids=[d.cell_id for d in discs],
        roi_ids=[ROI_OF[d.cell_id] for d in discs] if with_roi else None,
        graphic_type=graphic_type,
        id_style=id_style,
    )


@pytest.fixture(scope="module")
def pixels():
    return draw_discs(512, DISCS)


def _cohort_with_consensus(root, pixels):
    """The layout of the IDC conversion: one annotation object per session (consensus, session 1,
    detection-only) plus one of ROI rectangles; groups are named by raw label and carry ids as measurements."""
    slide = write_slide(root / "slides" / "P001", pixels, patient_id="P001")
    rois = GroupSpec(
        label="region_of_interest",
        property_type=("111099", "DCM", "Selected region"),
        boxes=list(ROIS.values()),
        roi_ids=list(ROIS),
        graphic_type="RECTANGLE",
        is_roi=True,
    )
    write_annotations(root / "ann" / "rois.dcm", slide.base, [rois], series_description="Monolayer regions of interest")
    consensus = [
        _group("myelocytic_blast", [101, 102, 103], property_type=MYELOBLAST),
        _group("lymphocyte", [104, 106], property_type=LYMPHOCYTE, graphic_type="RECTANGLE"),
        _group("no_consensus_found", [107], property_type=HAEMATOLOGICAL),
    ]
    write_annotations(root / "ann" / "consensus.dcm", slide.base, consensus, session="consensus")
    session_1 = [
        _group("myelocytic_blast", [101, 102], property_type=MYELOBLAST),
        _group("monocyte", [103, 104], property_type=MONOCYTE),
    ]
    write_annotations(root / "ann" / "session1.dcm", slide.base, session_1, session="1")
    detections = [
        _group("haematological_structure", [105], property_type=HAEMATOLOGICAL),
        _group("haematological_structure", [108], property_type=HAEMATOLOGICAL, with_roi=False),
    ]
    write_annotations(
        root / "ann" / "detections.dcm",
        slide.base,
        detections,
        session="detection-only",
        series_description="Unlabeled cell bounding boxes",
    )
    return slide


def test_consensus_labels_boxes_and_roi_pixels(tmp_path, pixels):
    _cohort_with_consensus(tmp_path / "in", pixels)
    clinical = tmp_path / "clinical.csv"
    clinical.write_text(
        "patient_id;age;ncit_concept_code;leukemia_type;leukemia_subtype\nP001;7;C3171;AML;M2\nP999;3;C3167;ALL;B\n"
    )
    out = tmp_path / "out"
    cells, patients = read_idc(tmp_path / "in", label_map=None, out_dir=out, clinical=clinical)

    rows = {r["cell_id"]: r for r in cells.rows}
    assert sorted(rows) == [str(d.cell_id) for d in DISCS]
    expected_raw = {101: "myelocytic_blast", 102: "myelocytic_blast", 103: "myelocytic_blast", 104: "lymphocyte"}
    expected_raw |= {105: "", 106: "lymphocyte", 107: "no_consensus_found", 108: ""}
    expected_label = {"myelocytic_blast": "myeloblast", "lymphocyte": "lymphocyte", "no_consensus_found": "drop"}
    # A cell outside every ROI gets a region of its own: its box padded by 32 px, clipped to the slide.
    rois = ROIS | {rows["108"]["roi_id"]: (440 - 32, 40 - 32, 470 + 32, 70 + 32)}
    for disc in DISCS:
        row = rows[str(disc.cell_id)]
        raw = expected_raw[disc.cell_id]
        assert row["patient_id"] == "P001"
        assert row["raw_label"] == raw
        assert row["label"] == expected_label.get(raw, "")
        assert row["source"] == "idc"
        assert row["label_source"] == "consensus"
        roi_id = ROI_OF.get(disc.cell_id, rows["108"]["roi_id"])
        assert row["roi_id"] == str(roi_id)
        rx0, ry0 = rois[roi_id][:2]
        x0, y0, x1, y1 = disc.box
        assert (row["x0"], row["y0"], row["x1"], row["y1"]) == (x0 - rx0, y0 - ry0, x1 - rx0, y1 - ry0)
        # The ROI PNG holds the slide's pixels, so the cell's crop equals the drawn disc region.
        with Image.open(row["image_path"]) as im:
            crop = np.asarray(im.convert("RGB"))[row["y0"] : row["y1"], row["x0"] : row["x1"]]
        assert np.array_equal(crop, pixels[y0:y1, x0:x1])
    # Every session's raw label travels as a column; cells a session did not label have it empty.
    assert rows["101"]["label_session_1"] == "myelocytic_blast"
    assert rows["103"]["label_session_1"] == "monocyte"
    assert rows["106"]["label_session_1"] == ""

    for roi_id, (x0, y0, x1, y1) in rois.items():
        image_path = next(r["image_path"] for r in cells.rows if r["roi_id"] == str(roi_id))
        assert image_path.startswith(str(out / "rois"))
        with Image.open(image_path) as im:
            assert np.array_equal(np.asarray(im.convert("RGB")), pixels[y0:y1, x0:x1])

    assert [(p["patient_id"], p["diagnosis"], p["age"], p["leukemia_subtype"]) for p in patients.rows] == [
        ("P001", "AML", "7", "M2")
    ]
    # The tables round-trip through the production writers and pass the core checks (images, boxes, ids).
    cells.write(out / "cells.csv")
    patients.write(out / "patients.csv")
    validate_cell_table(read_cell_table(out / "cells.csv"), read_patient_table(out / "patients.csv"))


def test_3d_coordinates_sessions_only_and_auto_roi(tmp_path, pixels, caplog):
    slide = write_slide(tmp_path / "in" / "slide", pixels, patient_id="P002", diagnosis="ALL")
    groups = [
        _group("Session 1 - Lymphocytic Blast", [101, 102, 103], with_roi=False, id_style="plain"),
        _group("Session 2 - Lymphocytic Blast", [101, 102], with_roi=False, id_style="plain"),
        _group("Session 2 - Prolymphocyte", [103], with_roi=False, id_style="plain"),
    ]
    write_annotations(tmp_path / "in" / "ann" / "a.dcm", slide.base, groups, coordinates="3D")
    with caplog.at_level(logging.WARNING, logger="mil.readers.idc"):
        cells, patients = read_idc(tmp_path / "in", label_map=None, out_dir=tmp_path / "out", roi_padding=8)
    assert "P002-slide has no consensus annotations; its labels are those of session_1" in caplog.text

    assert [p["diagnosis"] for p in patients.rows] == ["ALL"]  # from AdmittingDiagnosesDescription
    rows = {r["cell_id"]: r for r in cells.rows}
    assert sorted(rows) == ["101", "102", "103"]
    assert {r["label_source"] for r in cells.rows} == {"session_1"}  # no consensus: the first session, noted
    assert [rows[c]["label"] for c in ("101", "102", "103")] == ["lymphoblast"] * 3
    assert rows["103"]["label_session_2"] == "prolymphocyte"
    # No ROI given: one region around the cells, padded by 8 px; boxes survive mm -> pixel conversion.
    rx0, ry0, rx1, ry1 = 40 - 8, 50 - 8, 190 + 8, 190 + 8
    with Image.open(rows["101"]["image_path"]) as im:
        assert np.array_equal(np.asarray(im.convert("RGB")), pixels[ry0:ry1, rx0:rx1])
    for disc in _by_id([101, 102, 103]):
        row = rows[str(disc.cell_id)]
        x0, y0, x1, y1 = disc.box
        assert (row["x0"], row["y0"], row["x1"], row["y1"]) == (x0 - rx0, y0 - ry0, x1 - rx0, y1 - ry0)


def test_out_dir_required(tmp_path):
    with pytest.raises(ConfigError, match="--out"):
        read_idc(tmp_path, label_map=None, out_dir=None)


def test_2d_coordinates_of_a_lower_level_are_scaled_to_level_0(tmp_path, pixels):
    slide = write_slide(tmp_path / "in" / "slide", pixels, patient_id="P005")
    halved = GroupSpec(
        label="myelocytic_blast",
        boxes=[tuple(v / 2 for v in d.box) for d in _by_id([101, 103])],
        cell_ids=[101, 103],
        roi_ids=[1, 1],
    )
    rois = GroupSpec(label="region_of_interest", boxes=[tuple(v / 2 for v in ROIS[1])], roi_ids=[1], is_roi=True)
    write_annotations(tmp_path / "in" / "a.dcm", slide.levels[1], [rois, halved], session="consensus")
    cells, _ = read_idc(tmp_path / "in", label_map=None, out_dir=tmp_path / "out")
    rx0, ry0 = ROIS[1][:2]
    boxes = {r["cell_id"]: (r["x0"] + rx0, r["y0"] + ry0, r["x1"] + rx0, r["y1"] + ry0) for r in cells.rows}
    assert boxes == {str(d.cell_id): d.box for d in _by_id([101, 103])}


def test_bad_annotations_are_listed_together(tmp_path, pixels):
    slide = write_slide(tmp_path / "in" / "slide", pixels, patient_id="P003")
    groups = [
        _group("consensus: alien_cell", [101, 102]),
        _group("consensus: lymphocyte", [102]),  # cell 102 again, with another consensus label
        _group("consensus: lymphocyte", [104], graphic_type="POINT"),
    ]
    groups[2].boxes = [((x0 + x1) / 2, (y0 + y1) / 2) for x0, y0, x1, y1 in groups[2].boxes]
    write_annotations(tmp_path / "in" / "ann.dcm", slide.base, groups)
    # An annotation object over a slide that is not in the input folder.
    other = write_slide(tmp_path / "elsewhere", pixels[:256, :256], patient_id="P004", levels=1)
    write_annotations(tmp_path / "in" / "orphan.dcm", other.base, [_group("consensus: lymphocyte", [101])])

    with pytest.raises(InputError) as error:
        read_idc(tmp_path / "in", label_map=None, out_dir=tmp_path / "out")
    message = str(error.value)
    assert "ann.dcm group 1 ('consensus: alien_cell') annotation 1: label 'alien_cell'" in message
    assert "cell 102 is labelled 'lymphocyte' here and 'alien_cell'" in message
    assert "ann.dcm group 3 ('consensus: lymphocyte'): POINT annotations give no box" in message
    assert "orphan.dcm" in message and "--input" in message
    assert not (tmp_path / "out" / "rois").exists()  # nothing written when the input is refused


def test_truncated_slide_is_named(tmp_path, pixels):
    slide = write_slide(tmp_path / "in" / "slide", pixels, patient_id="P006")
    write_annotations(tmp_path / "in" / "a.dcm", slide.base, [_group("myelocytic_blast", [101])], session="consensus")
    with open(slide.files[0], "r+b") as f:  # cut level 0 inside its first tile: the header still reads
        f.truncate(5000)
    with pytest.raises(InputError, match=r"slide P006-slide \(2 DICOM file\(s\) in .*\) cannot be read by wsidicom"):
        read_idc(tmp_path / "in", label_map=None, out_dir=tmp_path / "out")


def test_registered_as_idc(tmp_path, pixels):
    from mil.readers.registry import get_reader, read_dataset

    try:
        spec = get_reader("idc")
    except ModuleNotFoundError as e:  # the registry imports every built-in reader module first
        pytest.skip(f"reader module {e.name} of another format is not in this checkout yet")
    assert spec.read is read_idc and spec.default_label_map == "default"
    assert {"out_dir", "clinical"} <= set(spec.options)
    _cohort_with_consensus(tmp_path / "in", pixels)
    cells, _ = read_dataset("idc", tmp_path / "in", out_dir=tmp_path / "out")
    assert len(cells) == len(DISCS)
    with pytest.raises(ConfigError, match="does not take"):
        read_dataset("idc", tmp_path / "in", out_dir=tmp_path / "out", no_such_option=1)


def test_mil_cells_command_reads_idc(tmp_path, pixels, capsys):
    from mil.cli import main

    _cohort_with_consensus(tmp_path / "in", pixels)
    clinical = tmp_path / "clinical.csv"
    clinical.write_text("patient_id;age;ncit_concept_code;leukemia_type;leukemia_subtype\nP001;7;C3171;AML;M2\n")
    out = tmp_path / "out"
    argv = ["cells", "--format", "idc", "--input", str(tmp_path / "in"), "--out", str(out), "--clinical", str(clinical)]
    assert main(argv) == 0, capsys.readouterr().err
    cells = read_cell_table(out / "cells.csv")
    assert sorted(r["cell_id"] for r in cells.rows) == [str(d.cell_id) for d in DISCS]
    assert {r["image_path"] for r in cells.rows} <= {str(p) for p in (out / "rois").glob("*.png")}
    assert [(p["patient_id"], p["diagnosis"]) for p in read_patient_table(out / "patients.csv").rows] == [
        ("P001", "AML")
    ]
