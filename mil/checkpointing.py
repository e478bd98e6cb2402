"""Lightning checkpointing shared by the Lightning trainers (attention heads, cell classifier): ``AtomicCheckpointIO``
and ``RunCheckpoint``. The run-folder logic without Lightning is in ``mil.runs``.

``AtomicCheckpointIO`` makes every ``trainer.save_checkpoint`` atomic and every load ``weights_only=True``.

``RunCheckpoint``: fewer checkpoint writes with the same resume guarantee.
Lightning's two ModelCheckpoint callbacks wrote ``last.ckpt`` every epoch and ``best.ckpt`` at every
improvement, each atomically (temp file, fsync, re-read with ``weights_only=True``, rename): on a short CPU
run that was ~10% of the wall time. Here the best epoch's weights are copied in memory when the monitor improves
and both files are written together, best first, when ``every_seconds`` have passed since the last write
and at the last epoch (max_epochs reached or early stopping).
The files on disk therefore always describe one point of the run: ``last.ckpt`` of epoch e and the best
epoch up to e. A run killed later loses at most ``every_seconds`` of training (plus the epoch in progress):
it resumes from that ``last.ckpt`` and replays the epochs after e exactly (cells, batch order and dropout
depend only on seed and epoch), so it ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Checkpoint

from mil.runs import load_checkpoint, write_checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints are written to a temp file, re-read with weights_only=True, then renamed (RELIABILITY 1, 6)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        write_checkpoint(path, checkpoint)

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        fix = f"delete {Path(path).parent.parent} to train afresh (or run with --no-resume)"
        return load_checkpoint(path, what="training checkpoint", fix=fix, map_location=map_location or "cpu")


class RunCheckpoint(Checkpoint):
    """``last.ckpt`` and (with a monitor) ``best.ckpt`` in ``dirpath``; a ``Checkpoint`` subclass, so Lightning
    calls it after EarlyStopping at each epoch end and it sees whether this epoch is the last one.
    ``last.ckpt`` is a full Lightning checkpoint (resume starts there); ``best.ckpt`` holds the best epoch's
    weights: state_dict, epoch, global_step, monitor and best_score."""

    def __init__(
        self,
        *,
        dirpath: str | Path,
        monitor: str | None,
        mode: str = "min",
        every_seconds: float = 60.0,
    ) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode={mode!r}: use 'min' or 'max'")
        self.dirpath = Path(dirpath)
        self.monitor = monitor
        self.mode = mode
        self.every_seconds = float(every_seconds)
        self.best_score: float | None = None
        self.best_epoch: int | None = None
        self._pending_best: bytes | None = None  # serialised best checkpoint not yet on disk
        self._last_write = time.monotonic()

    @property
    def state_key(self) -> str:
        return f"RunCheckpoint[monitor={self.monitor}]"

    def state_dict(self) -> dict:
        return {"best_score": self.best_score, "best_epoch": self.best_epoch}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best_score = state_dict.get("best_score")
        self.best_epoch = state_dict.get("best_epoch")

    def _improved(self, value: float) -> bool:
        if not math.isfinite(value):
            return False  # a NaN loss is never the best epoch
        if self.best_score is None:
            return True
        return value < self.best_score if self.mode == "min" else value > self.best_score

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        epoch = int(trainer.current_epoch)
        if self.monitor is not None and self.monitor in trainer.callback_metrics:
            value = float(trainer.callback_metrics[self.monitor])
            if self._improved(value):
                self.best_score, self.best_epoch = value, epoch
                if trainer.is_global_zero:  # copied now (the weights change in place from the next step on)
                    self._pending_best = {
                        "epoch": epoch,
                        "global_step": int(trainer.global_step),
                        "monitor": self.monitor,
                        "best_score": value,
                        "state_dict": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
                    }
        final = trainer.should_stop or epoch + 1 >= int(trainer.max_epochs or 0)
        due = time.monotonic() - self._last_write >= self.every_seconds
        if final or due:
            self._flush(trainer)

    def _flush(self, trainer) -> None:
        if self._pending_best is not None and trainer.is_global_zero:
            write_checkpoint(self.dirpath / "best.ckpt", self._pending_best)
        self._pending_best = None
        trainer.strategy.barrier("RunCheckpoint.best")
        trainer.save_checkpoint(self.dirpath / "last.ckpt", weights_only=False)  # rank 0, via AtomicCheckpointIO
        self._last_write = time.monotonic()
