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
