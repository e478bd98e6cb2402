"""Output a person can read (issue 13): progress lines, warnings that name the fix, no reprs, no empty tables."""

from __future__ import annotations

import json

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from reader_files import voc_dataset
from test_compare import compare, write_cohort

from mil import progress
from mil.cli import main
from mil.compare import load_compare_config, run_compare
from mil.compare.report import write_report
from mil.images import load_rgb


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "CMYK", "RGBA"])
def test_images_load_as_writable_arrays(tmp_path, mode):
    """A crop of a crop dataset is the whole image: a read-only array from Pillow reached torch.from_numpy, which
    warned 'The given NumPy array is not writable' on every extract."""
    path = tmp_path / ("cell.jpg" if mode in ("RGB", "L", "CMYK") else "cell.png")
    Image.new(mode, (6, 4)).save(path)
    rgb = load_rgb(path)
    assert rgb.shape == (4, 6, 3) and rgb.dtype == np.uint8 and rgb.flags.writeable


def test_synth_prints_counts_not_a_repr(tmp_path, capsys):
    args = ["synth", "--out", str(tmp_path / "c"), "--patients", "3", "--fields-per-patient", "1"]
    assert main([*args, "--cells-per-field", "4", "--field-width", "192", "--field-height", "192", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "CohortSummary(" not in out and "PosixPath" not in out
    assert out.startswith("wrote 3 patients (") and " fields, " in out and str(tmp_path / "c") in out


def test_cells_warns_at_once_when_diagnoses_are_missing_and_names_the_fix(tmp_path, capsys):
    voc_dataset(tmp_path / "voc")
    assert main(["cells", "--format", "voc", "--input", str(tmp_path / "voc"), "--out", str(tmp_path / "out")]) == 0
    warning = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1
    assert "no patient has a diagnosis (each image became its own patient)" in warning[0]
    assert "--patients-csv" in warning[0] and "image,patient_id,diagnosis" in warning[0]
    # with a patients CSV that gives the diagnoses there is nothing to warn about
    (tmp_path / "map.csv").write_text("image,patient_id,diagnosis\nfield_a.jpg,pa,AML\nfield_b.jpg,pa,AML\n")
    args = ["cells", "--format", "voc", "--input", str(tmp_path / "voc"), "--out", str(tmp_path / "out2")]
    assert main([*args, "--patients-csv", str(tmp_path / "map.csv")]) == 0
    assert "warning:" not in capsys.readouterr().err


def test_a_patient_table_without_any_diagnosis_is_one_line_not_one_per_patient(tmp_path, capsys):
    bags, patients = write_cohort(tmp_path, n_per_class=3)
    rows = patients.read_text().splitlines()
    patients.write_text("\n".join([rows[0]] + [",".join([r.split(",")[0], ""] + r.split(",")[2:]) for r in rows[1:]]))
    assert compare(bags, patients, tmp_path / "out", "--heads", "count.logreg") == 2
    err = capsys.readouterr().err
    assert "none of the 9 patients" in err and "--patients-csv" in err and len(err.splitlines()) <= 2


def test_a_one_head_comparison_says_paired_tests_need_two_heads(tmp_path, capsys):
    bags, patients = write_cohort(tmp_path, n_per_class=4)
    assert compare(bags, patients, tmp_path / "one", "--heads", "count.logreg") == 0
    summary = (tmp_path / "one" / "summary.md").read_text()
    assert "Paired tests need two heads" in summary and "| a | b | difference |" not in summary
    assert compare(bags, patients, tmp_path / "two", "--heads", "count.logreg,count.meta") == 0
    assert "| a | b | difference |" in (tmp_path / "two" / "summary.md").read_text()


def test_compare_announces_each_attention_fit_and_each_epoch_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MIL_PROGRESS", "plain")
    torch.set_num_threads(1)
    bags, patients = write_cohort(tmp_path, n_per_class=4)
    config = load_compare_config(None, heads="count.logreg,abmil", folds=2, seeds=1, n_boot=100)
    config.train = {**config.train, "max_epochs": 2, "patience": 2, "hidden_dim": 8, "max_cells_train": 16}
    result = run_compare(config, bags=bags, patients=patients, out=tmp_path / "out", log=lambda _: None)
    write_report(result, config, tmp_path / "out")
    err = capsys.readouterr().err.splitlines()
    assert "compare: seed 0 fold 1/2 count.logreg (1/4 fits)" in err  # the first fit, before any ETA exists
    announced = [line for line in err if line.startswith("compare: seed 0 fold") and " abmil (" in line]
    assert [line.split(" (")[1].split(",")[0] for line in announced] == ["2/4 fits", "4/4 fits"]
    assert all("ETA" in line for line in announced)
    epochs = [line for line in err if line.startswith("abmil seed0_fold")]
    # the last epoch of each fit always has its line, with this epoch's validation metrics (not the previous')
    assert [e.split(",")[0] for e in epochs if "epoch 2/2" in e] == ["abmil seed0_fold0 epoch 2/2"] + [
        "abmil seed0_fold1 epoch 2/2"
    ]
    history = json.loads((tmp_path / "out" / "logs" / "abmil" / "seed0_fold1" / "finished.json").read_text())
    assert history["best_epoch"] in (0, 1)
    last = next(e for e in epochs if e.startswith("abmil seed0_fold1 epoch 2/2"))
    assert "val-loss " in last and "nan" not in last  # this epoch's metrics; an undefined AUROC is left out


def test_extract_says_progress_and_recomputed_bags_not_a_line_per_new_bag(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MIL_PROGRESS", "plain")
    monkeypatch.setenv("MIL_PROGRESS_SECONDS", "0.5")
    synth = ["synth", "--out", str(tmp_path / "c"), "--patients", "3", "--fields-per-patient", "1", "--quiet"]
    assert main([*synth, "--cells-per-field", "4", "--field-width", "192", "--field-height", "192"]) == 0
    assert main(["cells", "--format", "zenodo", "--input", str(tmp_path / "c"), "--out", str(tmp_path / "t")]) == 0
    capsys.readouterr()
    args = ["extract", "--cells", str(tmp_path / "t" / "cells.csv"), "--encoder", "morphology.handcrafted"]
    args += ["--out", str(tmp_path / "b"), "--workers", "0"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "(missing)" not in err and "done SYN" not in err
    assert "3 to compute (3 new)" in err and " in shard " not in err
    # a changed cell table recomputes that patient's bag, and says why
    cells = (tmp_path / "t" / "cells.csv").read_text().splitlines()
    (tmp_path / "t" / "cells.csv").write_text("\n".join(cells[:-1]) + "\n")
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "2 up to date, 1 to compute (1 stale (cell_table_fingerprint changed))" in err
    assert "written: " in err and "(was stale (cell_table_fingerprint changed))" in err


def test_announce_counts_and_estimates(monkeypatch, capsys):
    monkeypatch.setenv("MIL_PROGRESS", "plain")
    now = [0.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: now[0])
    with progress.Progress(4, "compare", "fits") as fits:
        fits.announce("seed 0 fold 1/2 abmil")
        now[0] += 30
        fits.update(1, timed_line=False)
        fits.announce("seed 0 fold 2/2 abmil")
        fits.announce("quick", always=False)  # within the interval of the last line: not said
        fits.announce("seed 1 fold 1/2 abmil", eta=5.0)
    assert capsys.readouterr().err.splitlines() == [
        "compare: seed 0 fold 1/2 abmil (1/4 fits)",
        "compare: seed 0 fold 2/2 abmil (2/4 fits, ETA 1 min 30 s)",
        "compare: seed 1 fold 1/2 abmil (2/4 fits, ETA 5 s)",
    ]


class _LogsInItsOwnEpochEnd(L.LightningModule):
    """Like mil.heads.module.HeadModule: validation metrics are logged in the module's on_train_epoch_end."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, _):
        return self.layer(batch[0]).pow(2).mean()

    def on_train_epoch_end(self):
        self.log("val_loss", float(self.current_epoch + 1))
        self.log("val_auroc", float("nan"))  # undefined (one class in validation): left out of the line

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(callback, epochs=3):
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 2)), batch_size=4)
    trainer = L.Trainer(
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
        accelerator="cpu",
    )
    trainer.fit(_LogsInItsOwnEpochEnd(), data)


def test_epoch_line_after_module_reports_the_epoch_own_metric(monkeypatch, capsys):
    monkeypatch.setenv("MIL_PROGRESS", "plain")
    _fit(progress.EpochLine("tiny", after_module=True))
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("tiny epoch")]
    assert [x.split(", ")[0:2] for x in lines] == [
        ["tiny epoch 1/3", "val-loss 1.0000"],
        ["tiny epoch 2/3", "val-loss 2.0000"],
        ["tiny epoch 3/3", "val-loss 3.0000"],
    ]
    assert not any("auroc" in x or "nan" in x for x in lines)


def test_epoch_line_min_seconds_keeps_the_first_and_last(monkeypatch, capsys):
    monkeypatch.setenv("MIL_PROGRESS", "plain")
    _fit(progress.EpochLine("tiny", after_module=True, min_seconds=3600), epochs=4)
    lines = [x.split(",")[0] for x in capsys.readouterr().err.splitlines() if x.startswith("tiny epoch")]
    assert lines == ["tiny epoch 1/4", "tiny epoch 4/4"]


def test_progress_imports_without_lightning():
    import subprocess
    import sys

    code = "import sys, mil.progress; assert 'lightning' not in sys.modules and 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
