"""RELIABILITY promises 4 and 10 for the cell and patient tables: a UTF-8 byte-order mark, CRLF line ends and ';' or
tab separators are read as they should be (or named in the error), never silently change a column; diagnoses that
differ only in case or spaces, duplicate cell ids and patient ids too long for a file name are one clear error."""

from __future__ import annotations

import csv
import io

import pytest
from test_extract import make_cohort

from features.bags import bag_path
from mil.cell_table import (
    MAX_PATIENT_ID_BYTES,
    PatientTable,
    read_cell_table,
    read_patient_table,
    unsafe_patient_id_reason,
    validate_patient_table,
)
from mil.cli import main as mil_main
from mil.errors import InputError
from mil.readers.common import Problems, check_patient_rows, read_csv_rows


def rewrite(path, *, separator=",", bom=False, crlf=False, encoding="utf-8") -> None:
    """The same table as another tool would export it."""
    rows = list(csv.reader(path.read_text(encoding="utf-8").splitlines()))
    buf = io.StringIO()
    csv.writer(buf, delimiter=separator, lineterminator="\r\n" if crlf else "\n").writerows(rows)
    data = buf.getvalue().encode(encoding)
    path.write_bytes(("\ufeff".encode() if bom else b"") + data)


QUIRKS = {
    "bom_crlf": dict(bom=True, crlf=True),
    "semicolon": dict(separator=";"),
    "tab_bom": dict(separator="\t", bom=True),
    "semicolon_bom_crlf": dict(separator=";", bom=True, crlf=True),
}


@pytest.mark.parametrize("quirk", QUIRKS)
def test_promise10_cell_table_quirks_keep_every_column(tmp_path, quirk):
    cells = make_cohort(tmp_path, patients=2, cells=4)
    clean = read_cell_table(cells).rows
    rewrite(cells, **QUIRKS[quirk])
    quirky = read_cell_table(cells).rows
    assert [r["cell_id"] for r in quirky] == [r["cell_id"] for r in clean]  # before: lost under a BOM, silently
    assert quirky == clean


@pytest.mark.parametrize("quirk", QUIRKS)
def test_promise10_patient_table_quirks_are_read(tmp_path, quirk):
    path = tmp_path / "patients.csv"
    PatientTable(rows=[{"patient_id": "P1", "diagnosis": "AML"}, {"patient_id": "P2", "diagnosis": "ALL"}]).write(path)
    rewrite(path, **QUIRKS[quirk])
    assert read_patient_table(path).by_id() == {
        "P1": {"patient_id": "P1", "diagnosis": "AML"},
        "P2": {"patient_id": "P2", "diagnosis": "ALL"},
    }
    # The readers' CSVs (clinical tables, patients CSVs) take the same separators.
    assert [row["diagnosis"] for _, row in read_csv_rows(path, ("patient_id", "diagnosis"), what="csv")] == [
        "AML",
        "ALL",
    ]


def test_promise10_a_table_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "patients.csv"
    path.write_text("patient_id,diagnosis\nP1,AML\n", encoding="utf-16")
    with pytest.raises(InputError, match=r"patients\.csv is saved as UTF-16; save it as UTF-8"):
        read_patient_table(path)
    path.write_bytes("patient_id,diagnosis\nP1,Leucémie\n".encode("latin-1"))
    with pytest.raises(InputError, match=r"is not UTF-8 text \(byte 0xe9"):
        read_patient_table(path)
    with pytest.raises(InputError, match="not UTF-8"):
        read_csv_rows(path, ("patient_id",), what="patients CSV")


def test_promise10_a_missing_column_names_the_columns_found_and_the_separator(tmp_path):
    path = tmp_path / "patients.csv"
    path.write_text("patient;diagnosis\nP1;AML\n")
    with pytest.raises(
        InputError, match=r"lacks column\(s\) \['patient_id'\] \(found: patient, diagnosis; separator ';'"
    ):
        read_patient_table(path)


def test_promise4_diagnoses_differing_only_in_case_or_spaces_are_one_error_listing_them(tmp_path):
    path = tmp_path / "patients.csv"
    path.write_text("patient_id,diagnosis\nP1,AML\nP2,aml\nP3, AML\nP4,ALL\nP5,CML \n")
    with pytest.raises(InputError) as error:
        read_patient_table(path)
    message = str(error.value)
    assert "'AML' (row 2); 'aml' (row 3); ' AML' (row 4)" in message  # before: three classes
    assert "'CML ' (row 6)" in message and "'ALL'" not in message
    # The readers' clinical tables strip spaces, and still catch case variants, by file line.
    problems = Problems("test")
    check_patient_rows(
        [(2, {"patient_id": "P1", "diagnosis": "AML"}), (3, {"patient_id": "P2", "diagnosis": "Aml"})], path, problems
    )
    assert len(problems) == 1 and "'AML' (line 2); 'Aml' (line 3)" in problems.items[0]


def test_promise4_duplicate_cell_ids_are_one_error_listing_them(tmp_path, capsys):
    cells = make_cohort(tmp_path, patients=2, cells=4)
    text = cells.read_text().replace("P00-1,", "P00-0,").replace("P01-3,", "P01-2,")
    cells.write_text(text)
    with pytest.raises(InputError) as error:
        read_cell_table(cells)
    assert "cell_id 'P00-0' is on rows 2, 3" in str(error.value) and "cell_id 'P01-2' is on rows 8, 9" in str(
        error.value
    )
    # Extraction (which read the table without checking ids before) refuses it before any work, without a traceback.
    code = mil_main(
        ["extract", "--cells", str(cells), "--encoder", "morphology.handcrafted", "--out", str(tmp_path / "b")]
    )
    assert code == 2 and "cell_id 'P00-0' is on rows 2, 3" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_promise4_patient_ids_too_long_for_a_file_name_are_refused_with_the_limit(tmp_path, capsys):
    """Issue 14 case 8: a 300-character id ended in `OSError: File name too long` and no bag for anyone."""
    assert unsafe_patient_id_reason("P" * MAX_PATIENT_ID_BYTES) is None
    reason = unsafe_patient_id_reason("é" * 101)  # 202 bytes in UTF-8: bytes count, not characters
    assert reason and f"at most {MAX_PATIENT_ID_BYTES} bytes" in reason and "255-byte" in reason
    long_id = "P" * 300
    with pytest.raises(InputError, match=f"patient id '{long_id}' is 300 bytes long"):
        validate_patient_table(PatientTable(rows=[{"patient_id": long_id, "diagnosis": "AML"}]))
    cells = make_cohort(tmp_path, patients=2, cells=4)
    cells.write_text(cells.read_text().replace("P01", long_id))
    code = mil_main(
        ["extract", "--cells", str(cells), "--encoder", "morphology.handcrafted", "--out", str(tmp_path / "b")]
    )
    err = capsys.readouterr().err
    assert code == 2 and "is 300 bytes long (UTF-8); at most 200 bytes" in err and "Traceback" not in err
    assert not bag_path(tmp_path / "b", "P00").exists()
