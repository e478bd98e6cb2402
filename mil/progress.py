"""One progress helper for every long stage: a tqdm bar on a terminal, plain timed lines in a log file.

A user who runs `mil demo` on a terminal sees bars; a batch job that writes to a file gets one plain line every
`MIL_PROGRESS_SECONDS` (default 10 s) instead of carriage returns, so no stage is silent for long in a log:

    extract: 1200/5160 cells, 84.1 cells/s, ETA 47 s

Training loops (classifier, detector, heads, pretraining) use `EpochLine`, a Lightning callback that prints one
line per epoch with the loss, the validation metric, the seconds and the ETA of the run, plus the same timed
heartbeat inside a long epoch. `MIL_PROGRESS=0` silences both (tests that read stdout), `MIL_PROGRESS=bar` /
`plain` forces a style. Everything goes to stderr: stdout keeps the results a user may pipe.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

import lightning as L

DEFAULT_SECONDS = 10.0


def style() -> str:
    """'bar' on a terminal, 'plain' in a file or pipe, 'off' when MIL_PROGRESS=0; MIL_PROGRESS=bar|plain forces it."""
    forced = os.environ.get("MIL_PROGRESS", "").strip().lower()
    if forced in ("0", "off", "false", "no"):
        return "off"
    if forced in ("bar", "plain"):
        return forced
    return "bar" if sys.stderr.isatty() else "plain"


def interval() -> float:
    """Seconds between plain progress lines (MIL_PROGRESS_SECONDS, default 10)."""
    try:
        return max(0.5, float(os.environ.get("MIL_PROGRESS_SECONDS", DEFAULT_SECONDS)))
    except ValueError:
        return DEFAULT_SECONDS


def duration(seconds: float) -> str:
    """12 s, 3 min 05 s, 1 h 02 min: short and unambiguous."""
    if seconds != seconds or seconds < 0:  # NaN or negative
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


def say(message: str) -> None:
    """One line on stderr unless progress is off: the plain voice of long stages."""
    if style() != "off":
        print(message, file=sys.stderr, flush=True)


class Progress:
    """Counts work done of `total` (None when unknown); a bar on a terminal, timed plain lines otherwise.

    Use as a context manager or call `close()`; `update(n)` adds work, `postfix` adds a short text to the line.
    """

    def __init__(self, total: int | None, desc: str, unit: str = "it", *, enabled: bool = True) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.mode = style() if enabled else "off"
        self.done = 0
        self.postfix = ""
        self.start = self._last = time.perf_counter()
        self._bar = None
        if self.mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=False)

    def update(self, n: int = 1, postfix: str | None = None) -> None:
        self.done += n
        if postfix is not None:
            self.postfix = postfix
        if self._bar is not None:
            if postfix is not None:
                self._bar.set_postfix_str(postfix, refresh=False)
            self._bar.update(n)
        elif self.mode == "plain" and time.perf_counter() - self._last >= interval():
            self._last = time.perf_counter()
            say(self.line())

    def line(self) -> str:
        elapsed = time.perf_counter() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        of = f"/{self.total}" if self.total is not None else ""
        text = f"{self.desc}: {self.done}{of} {self.unit}, {rate:.1f} {self.unit}/s"
        if self.total is not None and rate > 0:
            text += f", ETA {duration((self.total - self.done) / rate)}"
        else:
            text += f", {duration(elapsed)}"
        return text + (f", {self.postfix}" if self.postfix else "")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def track(items: Iterable, desc: str, unit: str = "it", total: int | None = None, enabled: bool = True) -> Iterator:
    """`for x in track(xs, "attention report", "patient")`: Progress around an iterable."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Progress(total, desc, unit, enabled=enabled) as bar:
        for item in items:
            yield item
            bar.update(1)


def _metric(metrics: dict, names: tuple[str, ...]) -> tuple[str, float] | None:
    for name in names:
        value = metrics.get(name)
        if value is not None:
            try:
                return name, float(value)
            except (TypeError, ValueError):
                continue
    return None


class EpochLine(L.Callback):
    """One line per training epoch (loss, validation metric, seconds, ETA) and a heartbeat inside long epochs.

    `loss` and `metrics` name the logged values to look for, first found wins; a module that keeps its own sums
    can pass `read(trainer, module) -> dict` instead.
    """

    def __init__(
        self,
        desc: str,
        loss: tuple[str, ...] = ("train_loss_epoch", "train_loss", "loss"),
        metrics: tuple[str, ...] = ("val_macro_f1", "val_auroc", "val_map", "val_loss"),
        read=None,
        enabled: bool = True,
    ) -> None:
        self.desc, self.loss, self.metrics, self.read = desc, loss, metrics, read
        self.enabled = enabled and style() != "off"
        self.run_start = self.epoch_start = self._last = time.perf_counter()
        self.epochs_timed: list[float] = []
        self._bar: Progress | None = None

    def on_fit_start(self, trainer, module) -> None:
        self.run_start = time.perf_counter()

    def on_train_epoch_start(self, trainer, module) -> None:
        self.epoch_start = self._last = time.perf_counter()
        if self.enabled:
            total = trainer.num_training_batches
            total = int(total) if isinstance(total, int | float) and total != float("inf") else None
            self._bar = Progress(total, f"{self.desc} epoch {trainer.current_epoch + 1}/{trainer.max_epochs}", "step")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self._bar is not None:
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            self._bar.update(1, postfix=f"loss {float(loss):.4f}" if loss is not None else None)

    def _values(self, trainer, module) -> dict:
        if self.read is not None:
            return dict(self.read(trainer, module))
        return {k: v for k, v in trainer.callback_metrics.items()}

    def on_train_epoch_end(self, trainer, module) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        seconds = time.perf_counter() - self.epoch_start
        self.epochs_timed.append(seconds)
        if not self.enabled:
            return
        values = self._values(trainer, module)
        parts = [f"{self.desc} epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"]
        found = _metric(values, self.loss)
        if found:
            parts.append(f"loss {found[1]:.4f}")
        for name in self.metrics:
            if name in values:
                with contextlib.suppress(TypeError, ValueError):
                    label = "val-loss" if name == "val_loss" else name.removeprefix("val_").replace("_", "-")
                    parts.append(f"{label} {float(values[name]):.4f}")
        parts.append(duration(seconds))
        left = (trainer.max_epochs or 0) - (trainer.current_epoch + 1)
        if left > 0 and trainer.max_epochs and trainer.max_epochs > 0:
            recent = self.epochs_timed[-3:]
            parts.append(f"ETA {duration(left * sum(recent) / len(recent))}")
        say(", ".join(parts))
