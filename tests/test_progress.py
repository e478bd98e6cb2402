"""The shared progress helper: plain timed lines in a file, silence on request, one line per epoch with an ETA."""

import lightning as L
import torch

from mil import progress


def test_plain_lines_come_at_the_interval_and_carry_rate_and_eta(monkeypatch, capsys):
    monkeypatch.setenv("MIL_PROGRESS", "plain")
    monkeypatch.setenv("MIL_PROGRESS_SECONDS", "0.5")
    now = [0.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: now[0])
    with progress.Progress(10, "extract", "cells") as bar:
        for _ in range(3):
            now[0] += 0.4
            bar.update(2)
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["extract: 4/10 cells, 5.0 cells/s, ETA 1 s"]


def test_off_prints_nothing(monkeypatch, capsys):
    monkeypatch.setenv("MIL_PROGRESS", "0")
    monkeypatch.setenv("MIL_PROGRESS_SECONDS", "0.5")
    assert list(progress.track(range(5), "x")) == [0, 1, 2, 3, 4]
    progress.say("hello")
    assert capsys.readouterr().err == ""


def test_duration_reads_well():
    assert [progress.duration(s) for s in (4.4, 65, 3725)] == ["4 s", "1 min 05 s", "1 h 02 min"]
    assert progress.duration(float("nan")) == "?"


class _Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, _):
        loss = self.layer(batch[0]).pow(2).mean()
        self.log("train_loss", loss, on_epoch=True, on_step=False)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_epoch_line_prints_one_line_per_epoch_with_loss_and_eta(monkeypatch, capsys):
    monkeypatch.setenv("MIL_PROGRESS", "plain")
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 2)), batch_size=4)
    trainer = L.Trainer(
        max_epochs=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[progress.EpochLine("tiny")],
        accelerator="cpu",
    )
    trainer.fit(_Tiny(), data)
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("tiny epoch")]
    assert len(lines) == 3
    assert lines[0].startswith("tiny epoch 1/3, loss ") and "ETA" in lines[0]
    assert "ETA" not in lines[2]
