"""Cell-classifier runs survive a kill (RELIABILITY promise 2): a SIGKILLed training rerun with the same command
ends with the weights of an uninterrupted run, a finished run is reused, changed config or data starts afresh."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from limits import HANG_GUARD_S
from PIL import Image
from test_classifier import write_cohort

from mil.classifier import resume
from mil.classifier.train import ClassifierConfig, train_classifier, train_crossfitted

REPO = Path(__file__).resolve().parent.parent
SPLIT = {"train": ["P0", "P1", "P2", "P3"], "val": ["P4"], "test": ["P5"]}
EPOCHS = 14


@pytest.fixture(autouse=True)
def _one_thread_and_a_checkpoint_per_epoch(monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.setattr(resume, "LAST_EVERY_SECONDS", 0.0)


def tiny_config(**overrides) -> ClassifierConfig:
    # The weighted sampler, augmentation and the cosine schedule all have to replay exactly on resume.
    values = dict(
        arch="test_resnet",
        init="random",
        tta=False,
        crop_size=32,
        max_epochs=EPOCHS,
        batch_size=16,
        lr=3e-3,
        imbalance="sampler",
    )
    return ClassifierConfig(**{**values, "seed": 1, **overrides})


TRAIN_SCRIPT = textwrap.dedent(
    """
    import sys, json, numpy as np, torch
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    torch.set_num_threads(1)
    from test_classifier import read_cell_table
    from test_classifier_resume import SPLIT, tiny_config
    from mil.classifier import resume
    from mil.classifier.model import CellClassifierModule
    from mil.classifier.train import train_classifier
    resume.LAST_EVERY_SECONDS = 0.0  # a checkpoint after every epoch, so the kill lands between two of them
    root = Path(sys.argv[1])
    epochs, step = [], CellClassifierModule.training_step  # the epochs this process trains
    def counted(self, batch, batch_idx):
        if batch_idx == 0:
            epochs.append(self.current_epoch)
        return step(self, batch, batch_idx)
    CellClassifierModule.training_step = counted
    result = train_classifier(read_cell_table(root / "cells.csv"), out_dir=root / "killed", config=tiny_config(),
                              split=SPLIT)
    np.save(root / "killed" / "probs.npy", result.test_probs)
    (root / "killed" / "history.json").write_text(json.dumps(dict(result.history, trained=epochs)))
    """
)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)


@pytest.mark.slow
def test_training_killed_mid_run_resumes_to_the_same_weights(tmp_path):
    import json

    cells = write_cohort(tmp_path)
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT.format(tests=str(REPO / "tests")))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    victim = subprocess.Popen([sys.executable, str(script), str(tmp_path)], env=env)
    # The uninterrupted reference trains here meanwhile (same seed, one thread): one interpreter start-up less.
    reference = train_classifier(cells, out_dir=tmp_path / "clean", config=tiny_config(), split=SPLIT)
    last = tmp_path / "killed" / "run" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + HANG_GUARD_S  # a hang guard: the loop ends when the child does
    while victim.poll() is None and time.monotonic() < deadline:
        if last.exists() and torch.load(last, weights_only=True)["epoch"] >= 2:
            victim.send_signal(signal.SIGKILL)  # a real kill, inside epoch 3 or later
            break
        time.sleep(0.02)
    victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL, "the training finished before it could be killed"
    assert not (tmp_path / "killed" / "run" / "finished.json").exists()
    killed_at = torch.load(last, weights_only=True)["epoch"]
    assert killed_at < EPOCHS - 1
    subprocess.run([sys.executable, str(script), str(tmp_path)], check=True, env=env, timeout=HANG_GUARD_S)
    for name in ("last.ckpt", "best.ckpt"):
        a = torch.load(tmp_path / "clean" / "run" / "checkpoints" / name, weights_only=True)
        b = torch.load(tmp_path / "killed" / "run" / "checkpoints" / name, weights_only=True)
        assert a["epoch"] == b["epoch"]
        _assert_same_weights(a["state_dict"], b["state_dict"])
    _assert_same_weights(
        torch.load(reference.checkpoint, weights_only=True)["state_dict"],
        torch.load(tmp_path / "killed" / "classifier.pt", weights_only=True)["state_dict"],
    )
    np.testing.assert_allclose(reference.test_probs, np.load(tmp_path / "killed" / "probs.npy"), atol=1e-6)
    history = json.loads((tmp_path / "killed" / "history.json").read_text())
    assert history.pop("trained") == list(range(killed_at + 1, EPOCHS))  # resumed, not started over
    assert history["best_epoch"] == reference.history["best_epoch"]
    np.testing.assert_allclose(history["train_loss"], reference.history["train_loss"], atol=1e-6)
    assert len(history["val_loss"]) == EPOCHS


# Holds the process right after its first checkpoint inside an epoch (epoch 0, after batch 1 of 2), so the test's
# SIGKILL lands there whatever the speed of the machine; the rerun (no HOLD) finishes the run.
INSIDE_SCRIPT = textwrap.dedent(
    """
    import os, sys, time, numpy as np, torch
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    torch.set_num_threads(1)
    from test_classifier import read_cell_table
    from test_classifier_resume import SPLIT, tiny_config
    from mil.classifier import resume
    from mil.classifier.train import train_classifier
    resume.LAST_EVERY_SECONDS = 0.0
    flush = resume.ClassifierCheckpoint._flush
    def held(self, trainer):
        flush(self, trainer)
        if self._inside is not None and os.environ.get("HOLD"):
            print("HELD", self._inside["epoch"], self._inside["batches"], flush=True)
            time.sleep(600)
    resume.ClassifierCheckpoint._flush = held
    root = Path(sys.argv[1])
    result = train_classifier(read_cell_table(root / "cells.csv"), out_dir=root / "killed",
                              config=tiny_config(max_epochs=3), split=SPLIT)
    np.save(root / "killed" / "probs.npy", result.test_probs)
    """
)


@pytest.mark.slow
def test_promise2_training_killed_inside_the_first_epoch_resumes_to_the_same_weights(tmp_path):
    """A long one-epoch run killed before the epoch's end keeps what it trained (checkpoints on time, inside an
    epoch): the rerun goes on at the next batch and ends with the weights of an uninterrupted run."""
    cells = write_cohort(tmp_path)
    script = tmp_path / "inside.py"
    script.write_text(INSIDE_SCRIPT.format(tests=str(REPO / "tests")))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    victim = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path)], env={**env, "HOLD": "1"}, stdout=subprocess.PIPE, text=True
    )
    reference = train_classifier(cells, out_dir=tmp_path / "clean", config=tiny_config(max_epochs=3), split=SPLIT)
    held = victim.stdout.readline().split()
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=60)
    assert held == ["HELD", "0", "1"], held
    last = torch.load(tmp_path / "killed" / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 0 and last["global_step"] == 1  # one batch of the first epoch, kept
    subprocess.run([sys.executable, str(script), str(tmp_path)], check=True, env=env, timeout=HANG_GUARD_S)
    _assert_same_weights(
        torch.load(reference.checkpoint, weights_only=True)["state_dict"],
        torch.load(tmp_path / "killed" / "classifier.pt", weights_only=True)["state_dict"],
    )
    np.testing.assert_allclose(reference.test_probs, np.load(tmp_path / "killed" / "probs.npy"), atol=1e-6)
    history = torch.load(tmp_path / "killed" / "run" / "checkpoints" / "last.ckpt", weights_only=True)["history"]
    np.testing.assert_allclose(history["train_loss"], reference.history["train_loss"], atol=1e-6)


def test_a_finished_run_is_reused_without_training(tmp_path):
    cells = write_cohort(tmp_path)
    config = tiny_config(max_epochs=3, imbalance="weighted_loss")
    first = train_classifier(cells, out_dir=tmp_path / "clf", config=config, split=SPLIT)
    last = tmp_path / "clf" / "run" / "checkpoints" / "last.ckpt"
    written = last.stat().st_mtime_ns
    again = train_classifier(cells, out_dir=tmp_path / "clf", config=config, split=SPLIT)
    assert last.stat().st_mtime_ns == written  # no training step, no checkpoint
    assert again.history == first.history
    np.testing.assert_array_equal(again.test_probs, first.test_probs)
    # Cross-fitting: a rerun reuses every finished fold.
    folds = [(["P2", "P3", "P4", "P5"], ["P0", "P1"]), (["P0", "P1", "P4", "P5"], ["P2", "P3"])]
    crossfit = tiny_config(max_epochs=1, val_fraction=0.25)
    before = train_crossfitted(cells, folds, out_dir=tmp_path / "cf", config=crossfit)
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "cf").glob("fold_*/run/checkpoints/last.ckpt")}
    after = train_crossfitted(cells, folds, out_dir=tmp_path / "cf", config=crossfit)
    assert len(stamps) == 2 and all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    assert all(np.array_equal(before.probs[c], after.probs[c]) for c in before.probs)


def test_changed_config_or_data_discards_the_stale_run(tmp_path):
    cells = write_cohort(tmp_path)
    short = tiny_config(max_epochs=2)
    old = _weights(train_classifier(cells, out_dir=tmp_path / "reused", config=short, split=SPLIT).checkpoint)
    # Another learning rate in the same folder trains anew: the same weights as in an empty folder.
    changed = tiny_config(max_epochs=2, lr=1e-2)
    reused = train_classifier(cells, out_dir=tmp_path / "reused", config=changed, split=SPLIT)
    fresh = train_classifier(cells, out_dir=tmp_path / "fresh_lr", config=changed, split=SPLIT)
    _assert_same_weights(_weights(reused.checkpoint), _weights(fresh.checkpoint))
    assert any(not torch.equal(old[k], v) for k, v in _weights(reused.checkpoint).items())
    old = _weights(reused.checkpoint)
    # New pixels in a training patient's image (same cell table) are noticed too.
    image = np.asarray(Image.open(tmp_path / "P0.png")).copy()
    image[image < 200] //= 2
    Image.fromarray(image).save(tmp_path / "P0.png")
    reused = train_classifier(cells, out_dir=tmp_path / "reused", config=changed, split=SPLIT)
    fresh = train_classifier(cells, out_dir=tmp_path / "fresh_pixels", config=changed, split=SPLIT)
    _assert_same_weights(_weights(reused.checkpoint), _weights(fresh.checkpoint))
    assert any(not torch.equal(old[k], v) for k, v in _weights(reused.checkpoint).items())


def test_loader_workers_do_not_change_what_is_learned(tmp_path):
    cells = write_cohort(tmp_path)
    alone = train_classifier(cells, out_dir=tmp_path / "w0", config=tiny_config(max_epochs=2), split=SPLIT)
    workers = train_classifier(
        cells, out_dir=tmp_path / "w2", config=tiny_config(max_epochs=2, num_workers=2), split=SPLIT
    )
    _assert_same_weights(_weights(alone.checkpoint), _weights(workers.checkpoint))


DDP_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {tests!r})
    torch.set_num_threads(1)
    from pathlib import Path
    from test_classifier import write_cohort
    from mil.classifier.train import ClassifierConfig, train_classifier
    if __name__ == "__main__":  # Lightning's "ddp" launcher runs this file once per rank
        root = Path(sys.argv[1])
        cells = write_cohort(root, n_patients=6, cells_per_class=3)
        config = ClassifierConfig(arch="test_resnet", init="random", crop_size=32, max_epochs=2, batch_size=4,
                                  devices=2, test_fraction=0.2)
        result = train_classifier(cells, out_dir=root / "out", config=config)
        print("RESULT", result.history["best_epoch"], [round(v, 6) for v in result.history["val_loss"]], flush=True)
    """
)


@pytest.mark.slow
def test_two_cpu_processes_agree_on_the_best_epoch(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(tests=str(REPO / "tests")))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=HANG_GUARD_S
    )
    assert done.returncode == 0, done.stderr[-2000:]
    results = [line for line in done.stdout.splitlines() if line.startswith("RESULT")]
    # A smoke test of the per-epoch sampler under DDP (untested before): both ranks finish and keep the same epoch.
    assert len(results) == 2 and results[0] == results[1], results
    assert (tmp_path / "out" / "classifier.pt").exists()
