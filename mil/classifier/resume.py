"""What makes a killed classifier run resume to the weights of an uninterrupted one (RELIABILITY promise 2).

A run keeps ``out_dir/run/``: ``run.json`` (the fingerprint of everything that decides the weights),
``checkpoints/last.ckpt`` (a full Lightning checkpoint) and ``best.ckpt`` (the best validation epoch's weights),
written atomically every ``LAST_EVERY_SECONDS`` (inside an epoch too) and at the end by ``ClassifierCheckpoint``,
and ``finished.json``. The folder logic is shared with the heads and the detector (``mil.runs.prepare_run_dir``):
the same fingerprint resumes or reuses, another discards the stale checkpoints.

Resume is exact because nothing random depends on how many epochs this process has run: the training order
(shuffled or class-balanced) is drawn from a generator seeded by (seed, epoch) when the epoch's first batch is
fetched, each index travels with its epoch to the dataset (augmentation is seeded per (seed, epoch, item), in
any worker process), and dropout's global stream is reseeded from (seed, epoch) at the epoch's first batch.
A checkpoint written inside an epoch records how many of its batches were done, the global RNG state and the
epoch's running loss; resumed, the sampler skips those batches of the same (seed, epoch) order and the next batch
starts from that RNG state. (With several devices the checkpoints stay at epoch ends: Lightning's distributed
sampler re-slices the order.)
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from mil.checkpointing import RunCheckpoint
from mil.runs import (
    epoch_seed,
    global_rng_state,
    load_checkpoint,
    restore_global_rng_state,
    run_digest,
    weight_settings,
)

RUN_DIR = "run"
# A killed run loses at most this much training (plus the epoch in progress); tests set it to 0 (every epoch).
LAST_EVERY_SECONDS = 60.0


class EpochSampler(torch.utils.data.Sampler):
    """All indices in a random order (or ``len(weights)`` draws with replacement, proportional to ``weights``)
    from a generator seeded by (seed, epoch) alone; yields ``(index, epoch)`` so the dataset seeds its
    augmentation with the same epoch, in whichever process it runs."""

    def __init__(self, n: int, *, seed: int, epoch_source: Callable[[], int], weights: np.ndarray | None = None):
        self.n = int(n)
        self.seed = seed
        self.epoch_source = epoch_source
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.double)
        self._resume: tuple[int, int] | None = None  # (epoch, indices already trained on) of a run resumed inside it

    def resume_at(self, epoch: int, done: int) -> None:
        """The next pass over ``epoch`` leaves out its first ``done`` indices (trained before the checkpoint)."""
        self._resume = (int(epoch), int(done))

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[int, int]]:
        # A generator: the epoch is read at the first fetch, after the trainer has moved to the new epoch
        # (a resumed run skips some epoch-start hooks, so no hook pushes it).
        epoch = int(self.epoch_source())
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, epoch, 0))
        if self.weights is None:
            order = torch.randperm(self.n, generator=generator)
        else:
            order = torch.multinomial(self.weights, self.n, replacement=True, generator=generator)
        skip = 0
        if self._resume is not None and self._resume[0] == epoch:
            skip = self._resume[1]
        self._resume = None
        for index in order.tolist()[skip:]:
            yield index, epoch


class ClassifierCheckpoint(RunCheckpoint):
    """``RunCheckpoint`` that also writes inside an epoch when ``every_seconds`` have passed (so a long epoch
    killed midway loses little), and at the end of a run cut short by ``max_steps`` mid-epoch (its own test for
    the last epoch sees only ``max_epochs`` and early stopping), so a finished run's files are its end.
    ``sampler`` (the training order) and ``batch_size`` let a run resumed inside an epoch skip what it trained."""

    def __init__(self, *, sampler: EpochSampler, batch_size: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.sampler, self.batch_size = sampler, int(batch_size)
        self._written_step = -1
        self._inside: dict | None = None  # written with last.ckpt while inside an epoch
        self._resume: dict | None = None  # read from last.ckpt: where inside its epoch the run goes on

    def state_dict(self) -> dict:
        return {**super().state_dict(), "inside": self._inside}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._resume = state_dict.get("inside")
        if self._resume is not None:
            self.sampler.resume_at(self._resume["epoch"], self._resume["batches"] * self.batch_size)

    def _flush(self, trainer) -> None:
        super()._flush(trainer)
        self._written_step = int(trainer.global_step)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        resume = self._resume
        if resume is not None and resume["epoch"] == trainer.current_epoch and resume["batches"] == batch_idx:
            restore_global_rng_state(resume["rng"])  # dropout goes on as if the run had not stopped
            pl_module._sums["train"] = list(resume["train_sums"])
        self._resume = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        last_of_epoch = batch_idx + 1 >= trainer.num_training_batches
        at_max_steps = 0 <= trainer.max_steps <= trainer.global_step
        if last_of_epoch or at_max_steps or trainer.world_size > 1:
            return  # the epoch-end (or end-of-run) write follows
        if time.monotonic() - self._last_write >= self.every_seconds:
            self._inside = {
                "epoch": int(trainer.current_epoch),
                "batches": batch_idx + 1,
                "rng": global_rng_state(),
                "train_sums": list(pl_module._sums["train"]),
            }
            try:
                self._flush(trainer)
            finally:
                self._inside = None

    def on_train_end(self, trainer, pl_module) -> None:
        if self._written_step != int(trainer.global_step):
            self._flush(trainer)


def run_fingerprint(config, class_names: list[str], split: dict, net: torch.nn.Module, parts: dict) -> str:
    """sha256 of what decides the trained weights: config, classes, split, the initial weights and, per part
    that trains or selects the epoch (``parts``: name -> (cell ids, crops, targets)), cells, pixels and labels."""
    settings = {"config": weight_settings(config), "classes": class_names, "split": split}
    digest = run_digest(settings, net)
    for name in sorted(parts):
        cell_ids, crops, targets = parts[name]
        digest.update(json.dumps([name, list(cell_ids)]).encode())
        digest.update(np.ascontiguousarray(crops).tobytes())
        digest.update(np.ascontiguousarray(targets, dtype=np.int64).tobytes())
    return digest.hexdigest()


def load_run(run_dir: Path, checkpoint_dir: str, has_val: bool) -> tuple[dict, dict, int]:
    """(weights to keep, history, best epoch) of a finished run: the best validation epoch, or the last epoch
    without validation (best epoch -1), as an uninterrupted run keeps them."""
    ckpt_dir = Path(run_dir) / checkpoint_dir
    fix = f"delete {run_dir} to train afresh (or run with --no-resume)"
    last = load_checkpoint(ckpt_dir / "last.ckpt", what="classifier training checkpoint", fix=fix)
    history = {k: list(v) for k, v in last.get("history", {}).items()}
    best_path = ckpt_dir / "best.ckpt"
    if has_val and best_path.exists():
        best = load_checkpoint(best_path, what="classifier training checkpoint", fix=fix)
        return best["state_dict"], history, int(best["epoch"])
    return last["state_dict"], history, -1
