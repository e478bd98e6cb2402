"""Detector runs survive a crash (RELIABILITY promise 2): rerun after a crash inside the first epoch or between two
epochs, the same call ends with the weights of an uninterrupted run; a finished run is reused, not trained again."""

from __future__ import annotations

import pytest
import torch
from test_detector import TINY, write_fields

from mil.detector import train
from mil.detector.model import DetectorConfig
from mil.detector.train import DetectorTrainConfig, train_detector

SETTINGS = dict(epochs=4, batch_size=2, lr=3e-3, warmup_steps=2, seed=0)


class Crash(Exception):
    """Stands in for a kill right after a checkpoint was written."""


@pytest.fixture(autouse=True)
def _one_thread_and_a_checkpoint_per_step(monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.setattr(train, "LAST_EVERY_SECONDS", 0.0)


def _weights(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


# 3 fields, 2 per batch: 2 batches an epoch, a checkpoint after each. Write 1 is inside the first epoch (after its
# first batch, a long one-epoch run killed midway), write 2 closes it.
@pytest.mark.parametrize("crash_after", [1, 2], ids=["inside_the_first_epoch", "between_epochs"])
def test_crashed_detector_training_resumes_to_the_same_weights(tmp_path, monkeypatch, crash_after):
    cells = write_fields(tmp_path)
    run = dict(config=DetectorConfig(**TINY), train_config=DetectorTrainConfig(**SETTINGS))
    clean = train_detector(cells, out_dir=tmp_path / "clean", **run)
    writes = []

    def crash(path, checkpoint):
        write_checkpoint(path, checkpoint)
        writes.append((checkpoint["epoch"], checkpoint.get("inside") is not None))
        if len(writes) == crash_after:
            raise Crash

    write_checkpoint = train.write_checkpoint
    monkeypatch.setattr(train, "write_checkpoint", crash)
    with pytest.raises(Crash):
        train_detector(cells, out_dir=tmp_path / "crashed", **run)
    monkeypatch.setattr(train, "write_checkpoint", write_checkpoint)
    assert writes[-1] == (0, crash_after == 1)
    assert not (tmp_path / "crashed" / "run" / "finished.json").exists()
    resumed = train_detector(cells, out_dir=tmp_path / "crashed", **run)
    a, b = _weights(clean.checkpoint), _weights(resumed.checkpoint)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)
    for key in ("step_loss", "epoch_loss"):
        assert resumed.history[key] == pytest.approx(clean.history[key], abs=1e-6)
    # Finished: the same call again trains nothing and writes no checkpoint.
    last = tmp_path / "crashed" / "run" / "checkpoints" / "last.ckpt"
    stamp = last.stat().st_mtime_ns
    again = train_detector(cells, out_dir=tmp_path / "crashed", **run)
    assert last.stat().st_mtime_ns == stamp and again.history == resumed.history
    # Another seed in the same folder discards the stale run.
    other = dict(run, train_config=DetectorTrainConfig(**{**SETTINGS, "epochs": 1, "seed": 1}))
    reseeded = train_detector(cells, out_dir=tmp_path / "crashed", **other)
    assert len(reseeded.history["epoch_loss"]) == 1
