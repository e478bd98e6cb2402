"""`mil attention` on what `mil compare` wrote: synth -> cells -> extract -> compare -> report, through the CLI."""

from __future__ import annotations

import json

import pytest

from mil.cli import main


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    synth = ["synth", "--out", str(root / "cohort"), "--seed", "3", "--patients", "12", "--fields-per-patient", "1"]
    assert main([*synth, "--cells-per-field", "12", "--field-width", "256", "--field-height", "256", "--quiet"]) == 0
    assert main(["cells", "--format", "zenodo", "--input", str(root / "cohort"), "--out", str(root / "cells")]) == 0
    cells = root / "cells" / "cells.csv"
    assert (
        main(["extract", "--cells", str(cells), "--encoder", "morphology.handcrafted", "--out", str(root / "bags")])
        == 0
    )
    compare = ["compare", "--bags", str(root / "bags"), "--patients", str(root / "cells" / "patients.csv")]
    assert (
        main(
            [
                *compare,
                "--heads",
                "abmil,clam_mb",
                "--folds",
                "3",
                "--seeds",
                "1",
                "--max-epochs",
                "2",
                "--n-boot",
                "100",
                "--out",
                str(root / "results"),
            ]
        )
        == 0
    )
    return root


@pytest.mark.parametrize("head", ["abmil", "clam_mb"])
def test_report_from_compare_results_has_every_patient_and_deletion_curves(compared, head, capsys):
    out = compared / f"report_{head}"
    code = main(
        [
            "attention",
            "--results",
            str(compared / "results"),
            "--head",
            head,
            "--cells",
            str(compared / "cells" / "cells.csv"),
            "--out",
            str(out),
            "--top-k",
            "4",
        ]
    )
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["patients"] == 12 and summary["head"] == head
    assert "deletion_area" in summary  # head bundles were saved by compare and rerun here
    assert len(list((out / "patients").glob("*.html"))) == 12
    assert (out / "figures" / "cohort" / "deletion.png").exists()
    if head == "clam_mb":  # one gallery per diagnosis branch besides the summed one
        first = sorted(p for p in (out / "figures").iterdir() if p.name != "cohort")[0]
        assert len(list(first.glob("gallery_*.png"))) == 1 + 3  # ALL, AML, CML


def test_unknown_head_is_named(compared, capsys):
    code = main(
        ["attention", "--results", str(compared / "results"), "--head", "transmil", "--out", str(compared / "nope")]
    )
    assert code == 2
    assert "transmil" in capsys.readouterr().err


def test_attention_on_external_results_and_on_predictions(tmp_path):
    """A 2-centre cohort through the CLI: external compare (train A, test B) -> `mil attention` on its results,
    then `mil predict` on centre B's bags -> `mil attention` on the prediction folder (ensemble attention)."""
    import shutil

    from mil.cell_table import read_patient_table

    synth = ["synth", "--out", str(tmp_path / "cohort"), "--seed", "5", "--patients", "16", "--centres", "2"]
    assert main([*synth, "--fields-per-patient", "1", "--cells-per-field", "10", "--field-width", "256",
                 "--field-height", "256", "--stain-shift", "0", "--quiet"]) == 0  # fmt: skip
    assert main(["cells", "--format", "zenodo", "--input", str(tmp_path / "cohort"), "--out", str(tmp_path / "c")]) == 0
    cells, patients = tmp_path / "c" / "cells.csv", tmp_path / "c" / "patients.csv"
    bags = tmp_path / "bags"
    assert main(["extract", "--cells", str(cells), "--encoder", "morphology.handcrafted", "--out", str(bags)]) == 0
    results = tmp_path / "results"
    assert main(["compare", "--bags", str(bags), "--patients", str(patients), "--heads", "abmil", "--train-where",
                 "centre=A", "--test-where", "centre=B", "--seeds", "2", "--max-epochs", "2", "--n-boot", "100",
                 "--out", str(results)]) == 0  # fmt: skip
    centre_b = sorted(r["patient_id"] for r in read_patient_table(patients).rows if r["centre"] == "B")
    report = tmp_path / "report_external"
    assert main(["attention", "--results", str(results), "--head", "abmil", "--out", str(report)]) == 0
    summary = json.loads((report / "summary.json").read_text())
    assert summary["patients"] == len(centre_b) and "deletion_area" in summary

    new_bags = tmp_path / "new_bags"
    new_bags.mkdir()
    for p in centre_b:
        shutil.copy(bags / f"{p}.h5", new_bags / f"{p}.h5")
    predicted = tmp_path / "predicted"
    assert main(["predict", "--results", str(results), "--bags", str(new_bags), "--patients", str(patients),
                 "--out", str(predicted), "--n-boot", "100"]) == 0  # fmt: skip
    report = tmp_path / "report_predicted"
    assert main(["attention", "--results", str(predicted), "--head", "abmil", "--out", str(report)]) == 0
    summary = json.loads((report / "summary.json").read_text())
    assert summary["patients"] == len(centre_b)
    assert len(list((report / "patients").glob("*.html"))) == len(centre_b)
