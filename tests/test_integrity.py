"""RELIABILITY.md promises 7 and 10 (issue 14, cases 1, 2, 4 and 10): a bag is what it says it is, only data stored
inside the bag file is read, values no encoder produces are refused, and a stray non-bag file is named as such."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from test_bags import make_bag
from test_compare import compare, write_cohort
from test_extract import bag_arrays, extract, make_cohort

from features.bag_directory import BagDirectory
from features.bags import bag_path, read_bag, read_bag_features, read_bag_header, validate_bag, write_bag
from features.integrity import NOT_A_BAG, array_digest
from mil.cli import main as mil_main
from mil.errors import InputError

ENCODER = "morphology.handcrafted"  # no weights, fast


def _verify(folder: Path, capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = mil_main(["verify", str(folder)])
    return code, capsys.readouterr().out


def _extracted(tmp_path: Path, patients: int = 3) -> tuple[Path, Path]:
    cells = make_cohort(tmp_path / "cohort", patients=patients, cells=5, side=48)
    out = tmp_path / "bags"
    extract(cells, out, encoder=ENCODER)
    return cells, out


def test_promise7_swapped_bags_are_refused_everywhere_and_extract_recomputes_them(tmp_path, capsys):
    """Case 1: A.h5 <-> B.h5 renamed. verify and training refuse them naming the files; extract rewrites both."""
    cells, out = _extracted(tmp_path)
    clean = bag_arrays(out)
    a, b = bag_path(out, "P00"), bag_path(out, "P01")
    a.rename(tmp_path / "swap.h5")
    b.rename(a)
    (tmp_path / "swap.h5").rename(b)
    code, text = _verify(out, capsys)
    assert code == 1 and "WRONG NAME" in text
    assert "P00.h5 records patient 'P01' but is named for 'P00'" in text and "P01.h5 records patient 'P00'" in text
    with pytest.raises(InputError, match=r"(?s)not what they say.*P00\.h5 records patient 'P01'.*P01\.h5"):
        BagDirectory(out).check_consistent()
    for read in (read_bag, read_bag_features):
        with pytest.raises(InputError, match="renamed or copied bag"):
            read(a)
    report = extract(cells, out, encoder=ENCODER)
    assert sorted(report.done) == ["P00", "P01"] and report.up_to_date == ["P02"]
    assert "records patient" in report.reasons["P00"]
    after = bag_arrays(out)
    for pid in clean:
        np.testing.assert_array_equal(after[pid]["features"], clean[pid]["features"])
    assert _verify(out, capsys)[0] == 0


def test_promise7_compare_refuses_a_renamed_bag_naming_it(tmp_path, capsys):
    """Case 1: `mil compare` never trains one patient's diagnosis on another's cells."""
    bags, patients = write_cohort(tmp_path)
    bag_path(bags, "P03").unlink()
    bag_path(bags, "P04").rename(bag_path(bags, "P03"))  # P04's cells under P03's name
    assert compare(bags, patients, tmp_path / "results", "--heads", "count.logreg") == 2
    err = capsys.readouterr().err
    assert "P03.h5 records patient 'P04' but is named for 'P03'" in err
    assert not (tmp_path / "results" / "summary.csv").exists()


def test_promise7_a_copy_under_a_new_patient_name_is_a_duplicate(tmp_path, capsys):
    """Case 1: one patient's cells copied as another's (even with the recorded id edited) are refused."""
    for pid in ("P1", "P2", "P3"):
        write_bag(tmp_path / f"{pid}.h5", make_bag(pid))
    shutil.copy(tmp_path / "P1.h5", tmp_path / "P9.h5")
    code, text = _verify(tmp_path, capsys)
    assert code == 1 and "P9.h5 records patient 'P1'" in text
    with h5py.File(tmp_path / "P9.h5", "r+") as f:
        f.attrs["patient_id"] = "P9"  # the copy now claims to be P9
    code, text = _verify(tmp_path, capsys)
    assert code == 1 and "DUPLICATE" in text and "P1.h5, P9.h5" in text and "identical features" in text
    with pytest.raises(InputError, match=r"P1\.h5, P9\.h5 .* hold identical features"):
        BagDirectory(tmp_path).check_consistent()


def test_promise7_one_edited_float_is_found_and_only_that_bag_recomputed(tmp_path, capsys):
    """Case 1: a float of `features` edited in place fails its digest in verify, training and extract's cache."""
    cells, out = _extracted(tmp_path)
    before = read_bag(bag_path(out, "P01")).features
    with h5py.File(bag_path(out, "P01"), "r+") as f:
        f["features"][2, 3] += 0.5
    code, text = _verify(out, capsys)
    assert code == 1 and "P01.h5: features does not match its recorded digest" in text
    with pytest.raises(InputError, match="do not match their recorded digest"):
        read_bag_features(bag_path(out, "P01"))
    with pytest.raises(InputError, match="does not match its recorded digest"):
        BagDirectory(out).load("P01")
    report = extract(cells, out, encoder=ENCODER)
    assert report.done == ["P01"] and "recorded digest" in report.reasons["P01"]
    np.testing.assert_array_equal(read_bag(bag_path(out, "P01")).features, before)


def test_promise7_compare_refuses_an_edited_bag_naming_it(tmp_path, capsys):
    bags, patients = write_cohort(tmp_path)
    with h5py.File(bag_path(bags, "P05"), "r+") as f:
        f["cell_id"][0] = "someone else"
    assert compare(bags, patients, tmp_path / "results", "--heads", "count.logreg") == 2
    assert "P05.h5: cell_id does not match its recorded digest" in capsys.readouterr().err


def _as_older_version(path: Path) -> None:
    with h5py.File(path, "r+") as f:
        f.attrs["schema_version"] = 1
        del f.attrs["digests"]


def test_promise7_bags_of_an_older_version_are_named_and_recomputed(tmp_path, capsys):
    """Bags without digests (schema 1): verify says so and how to fix it, training refuses, extract recomputes."""
    cells, out = _extracted(tmp_path)
    _as_older_version(bag_path(out, "P02"))
    code, text = _verify(out, capsys)
    assert code == 1 and "OLD VERSION" in text and "written by an older version of cytomil" in text
    assert "run `mil extract` again with the same settings" in text
    with pytest.raises(InputError, match="older version"):
        read_bag_features(bag_path(out, "P02"))
    with pytest.raises(InputError, match="older version"):
        BagDirectory(out).check_consistent()
    report = extract(cells, out, encoder=ENCODER)
    assert report.done == ["P02"] and report.reasons["P02"].startswith("stale (written by an older version")
    assert validate_bag(bag_path(out, "P02")) == []


def _store_outside(path: Path, how: str, elsewhere: Path) -> None:
    """Replace the bag's `features` by data that lives in another file, the three ways HDF5 allows."""
    with h5py.File(path, "r") as f:
        features = f["features"][()]
    with h5py.File(elsewhere.with_suffix(".h5"), "w") as f:
        f["features"] = features + 1.0
    features.astype("<f4").tofile(elsewhere.with_suffix(".raw"))
    with h5py.File(path, "r+") as f:
        del f["features"]
        if how == "external link":
            f["features"] = h5py.ExternalLink(str(elsewhere.with_suffix(".h5")), "features")
        elif how == "virtual dataset":
            layout = h5py.VirtualLayout(shape=features.shape, dtype="<f4")
            layout[:] = h5py.VirtualSource(str(elsewhere.with_suffix(".h5")), "features", shape=features.shape)
            f.create_virtual_dataset("features", layout)
        else:  # external raw storage: any file of the machine read as features
            f.create_dataset(
                "features",
                shape=features.shape,
                dtype="<f4",
                external=[(str(elsewhere.with_suffix(".raw")), 0, h5py.h5f.UNLIMITED)],
            )


@pytest.mark.parametrize("how", ["external link", "virtual dataset", "external raw storage"])
def test_promise7_data_stored_outside_the_bag_is_refused_on_every_read_path(tmp_path, capsys, how):
    """Case 2: verify, extract's cache check, training loads and header reads refuse to follow data elsewhere."""
    cells, out = _extracted(tmp_path)
    path = bag_path(out, "P00")
    _store_outside(path, how, tmp_path / "elsewhere")
    problems = validate_bag(path)
    assert len(problems) == 1 and problems[0].kind == "outside"
    assert "dataset 'features' is" in problems[0] and "not data stored in the bag file" in problems[0]
    for read in (read_bag, read_bag_features, read_bag_header):
        with pytest.raises(InputError, match="not data stored in the bag file"):
            read(path)
    with pytest.raises(InputError, match=r"P00\.h5: dataset 'features' is"):
        BagDirectory(out).check_consistent()  # what `mil compare` calls first
    code, text = _verify(out, capsys)
    assert code == 1 and "REFUSED: data outside the file" in text
    report = extract(cells, out, encoder=ENCODER)
    assert report.done == ["P00"] and "not data stored in the bag file" in report.reasons["P00"]
    with h5py.File(path, "r") as f:
        plist = f["features"].id.get_create_plist()
        assert not f["features"].is_virtual and plist.get_external_count() == 0
    assert validate_bag(path) == []


def test_promise7_compare_refuses_a_bag_that_links_outside(tmp_path, capsys):
    bags, patients = write_cohort(tmp_path)
    _store_outside(bag_path(bags, "P02"), "external link", tmp_path / "elsewhere")
    assert compare(bags, patients, tmp_path / "results", "--heads", "count.logreg") == 2
    assert "P02.h5: dataset 'features' is an external link to" in capsys.readouterr().err


def _rewrite_features(path: Path, features: np.ndarray) -> None:
    """Features changed and their digest made to match: a bag from a writer that did not check values."""
    with h5py.File(path, "r+") as f:
        del f["features"]
        f["features"] = features
        digests = json.loads(f.attrs["digests"])
        digests["features"] = array_digest(features)
        f.attrs["digests"] = json.dumps(digests)


def test_promise10_features_beyond_any_encoder_are_refused_by_verify_and_training(tmp_path, capsys):
    """Case 4: one bag of magnitude 1e30 is refused before it reaches a head's standardisation."""
    for pid in ("P1", "P2", "P3"):
        write_bag(tmp_path / f"{pid}.h5", make_bag(pid))
    huge = read_bag(tmp_path / "P2.h5").features * np.float32(1e30)
    _rewrite_features(tmp_path / "P2.h5", huge)
    code, text = _verify(tmp_path, capsys)
    assert code == 1 and "P2.h5: features exceed +-65504" in text and "no encoder produces such values" in text
    with pytest.raises(InputError, match=r"exceed \+-65504 in 6 row\(s\)"):
        read_bag_features(tmp_path / "P2.h5")


def test_promise10_verify_warns_about_a_bag_far_from_the_directory_scale(tmp_path, capsys):
    """Case 4: a bag within the bound but 1000x the others' scale is reported (a warning, exit 0)."""
    for pid in ("P1", "P2", "P3", "P4"):
        write_bag(tmp_path / f"{pid}.h5", make_bag(pid))
    _rewrite_features(tmp_path / "P3.h5", read_bag(tmp_path / "P3.h5").features * np.float32(1000))
    code, text = _verify(tmp_path, capsys)
    assert code == 0 and "warning: feature scale" in text and "P3 (" in text
    assert "P1 (" not in text and "P4 (" not in text


def test_case10_a_stray_h5_is_not_a_bag_and_training_ignores_it_with_a_note(tmp_path, capsys):
    """Case 10: a foreign `.h5` is reported as not a bag (never "INVALID, run extract again"), and ignored."""
    for pid in ("P1", "P2"):
        write_bag(tmp_path / f"{pid}.h5", make_bag(pid))
    with h5py.File(tmp_path / "clam_export.h5", "w") as f:
        f["coords"] = np.zeros((3, 2))
    code, text = _verify(tmp_path, capsys)
    assert code == 0 and "not a bag" in text and "INVALID" not in text
    assert f"clam_export.h5 is {NOT_A_BAG}: training ignores it" in text
    notes: list[str] = []
    directory = BagDirectory(tmp_path)
    directory.check_consistent(log=notes.append)
    assert directory.patients() == ["P1", "P2"]
    assert notes == [f"note: ignored {tmp_path / 'clam_export.h5'}: {NOT_A_BAG}"]


def test_case10_extract_never_overwrites_a_foreign_file_under_a_patients_name(tmp_path):
    cells = make_cohort(tmp_path / "cohort", patients=2, cells=4, side=48)
    out = tmp_path / "bags"
    out.mkdir()
    with h5py.File(bag_path(out, "P01"), "w") as f:
        f["mine"] = np.arange(3)
    before = bag_path(out, "P01").read_bytes()
    report = extract(cells, out, encoder=ENCODER)
    assert report.done == ["P00"] and f"is {NOT_A_BAG}; move it out" in report.failed["P01"]
    assert bag_path(out, "P01").read_bytes() == before
