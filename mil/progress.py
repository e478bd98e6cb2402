"""One progress helper for every long stage: a tqdm bar on a terminal, plain timed lines in a log file.

A user who runs `mil demo` on a terminal sees bars; a batch job that writes to a file gets one plain line every
`MIL_PROGRESS_SECONDS` (default 10 s) instead of carriage returns, so no stage is silent for long in a log:

    extract: 1200/5160 cells, 84.1 cells/s, ETA 47 s

Training loops (classifier, detector, heads, pretraining) use `EpochLine`, a Lightning callback that prints one
line per epoch with the loss, the validation metric, the seconds and the ETA of the run, plus the same timed
heartbeat inside a long epoch. `MIL_PROGRESS=0` silences both (tests that read stdout), `MIL_PROGRESS=bar` /
`plain` forces a style. Everything goes to stderr: stdout keeps the results a user may pipe.

Importing this module is cheap (no torch, no Lightning): `EpochLine` is built on first use, so `mil synth`,
`mil cells` and `mil verify` can show progress without paying for Lightning's import.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

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


_OPEN_BARS = [0]  # tqdm bars open now: a line printed meanwhile must go through tqdm.write, not across a bar


def echo(message: str, file=None) -> None:
    """One line on `file` (default stderr), above a progress bar when one is open, whatever the progress style."""
    file = sys.stderr if file is None else file
    if _OPEN_BARS[0]:
        from tqdm import tqdm

        tqdm.write(message, file=file)
    else:
        print(message, file=file, flush=True)


def say(message: str) -> None:
    """One line on stderr unless progress is off: the plain voice of long stages."""
    if style() != "off":
        echo(message)


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
            _OPEN_BARS[0] += 1

    def update(self, n: int = 1, postfix: str | None = None, timed_line: bool = True) -> None:
        """Add `n` done; `timed_line=False` for a caller that says its own lines (`announce`) in a log."""
        self.done += n
        if postfix is not None:
            self.postfix = postfix
        if self._bar is not None:
            if postfix is not None:
                self._bar.set_postfix_str(postfix, refresh=False)
            self._bar.update(n)
        elif self.mode == "plain" and timed_line and time.perf_counter() - self._last >= interval():
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

    def eta(self) -> float | None:
        """Seconds left at the rate so far (None before any work or without a total)."""
        elapsed = time.perf_counter() - self.start
        if self.total is None or self.done <= 0 or elapsed <= 0:
            return None
        return (self.total - self.done) * elapsed / self.done

    def announce(self, what: str, eta: float | None = None, always: bool = True) -> None:
        """Say what comes next, with the count and ETA, on every call (not timed): for few, long steps such as
        the fits of `mil compare`: "compare: seed 0 fold 2/5 abmil (7/30 fits, ETA 3 min 10 s)". `eta` overrides
        the estimate from the rate so far (a caller that knows the steps differ in cost). `always=False`: only
        when the last line is older than the interval (quick steps between long ones)."""
        if self.mode == "off" or (not always and time.perf_counter() - self._last < interval()):
            return
        eta = self.eta() if eta is None else eta
        of = f"/{self.total}" if self.total is not None else ""
        left = f", ETA {duration(eta)}" if eta is not None else ""
        if self._bar is not None:
            self._bar.set_postfix_str(what, refresh=True)
        else:
            say(f"{self.desc}: {what} ({self.done + 1}{of} {self.unit}{left})")
            self._last = time.perf_counter()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            _OPEN_BARS[0] -= 1

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


def __getattr__(name: str):
    # EpochLine is a Lightning callback; Lightning (and torch) are imported only when a training loop asks for it.
    if name == "EpochLine":
        import lightning as L

        cls = type("EpochLine", (_EpochLine, L.Callback), {"__module__": __name__, "__doc__": _EpochLine.__doc__})
        globals()["EpochLine"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _EpochLine:
    """One line per training epoch (loss, validation metric, seconds, ETA) and a heartbeat inside long epochs.

    `loss` and `metrics` name the logged values to look for, first found wins; a module that keeps its own sums
    can pass `read(trainer, module) -> dict` instead. `after_module=True`: the module logs its metrics in its own
    `on_train_epoch_end` (which Lightning calls after this callback's), so the line waits for the next epoch's
    start or the end of training. `min_seconds`: at most one line per that many seconds (the last epoch always
    gets its line), for runs of many short epochs such as the fits of `mil compare`.
    """

    def __init__(
        self,
        desc: str,
        loss: tuple[str, ...] = ("train_loss_epoch", "train_loss", "loss"),
        metrics: tuple[str, ...] = ("val_macro_f1", "val_auroc", "val_map", "val_loss"),
        read=None,
        enabled: bool = True,
        after_module: bool = False,
        min_seconds: float = 0.0,
    ) -> None:
        self.desc, self.loss, self.metrics, self.read = desc, loss, metrics, read
        self.enabled = enabled and style() != "off"
        self.after_module, self.min_seconds = after_module, min_seconds
        self.run_start = self.epoch_start = self._last = time.perf_counter()
        self._said = float("-inf")
        self._pending: int | None = None  # the epoch whose line waits for the module's metrics (after_module)
        self.epochs_timed: list[float] = []
        self._bar: Progress | None = None

    def on_fit_start(self, trainer, module) -> None:
        self.run_start = time.perf_counter()

    def on_train_epoch_start(self, trainer, module) -> None:
        self._flush(trainer, module, final=False)
        self.epoch_start = self._last = time.perf_counter()
        if self.enabled and trainer.is_global_zero:  # one voice under DDP
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
        if self.after_module:
            self._pending = trainer.current_epoch
            return
        seconds = time.perf_counter() - self.epoch_start
        self.epochs_timed.append(seconds)
        last = trainer.current_epoch + 1 >= (trainer.max_epochs or 0) or trainer.should_stop
        self._line(trainer, module, trainer.current_epoch, seconds, final=last)

    def on_train_end(self, trainer, module) -> None:
        self._flush(trainer, module, final=True)

    def _flush(self, trainer, module, final: bool) -> None:
        if self._pending is None:
            return
        epoch, self._pending = self._pending, None
        seconds = time.perf_counter() - self.epoch_start
        self.epochs_timed.append(seconds)
        self._line(trainer, module, epoch, seconds, final=final or epoch + 1 >= (trainer.max_epochs or 0))

    def _line(self, trainer, module, epoch: int, seconds: float, final: bool) -> None:
        if (
            not self.enabled
            or not trainer.is_global_zero
            or (not final and time.perf_counter() - self._said < self.min_seconds)
        ):
            return
        self._said = time.perf_counter()
        values = self._values(trainer, module)
        parts = [f"{self.desc} epoch {epoch + 1}/{trainer.max_epochs}"]
        found = _metric(values, self.loss)
        if found:
            parts.append(f"loss {found[1]:.4f}")
        for name in self.metrics:
            if name in values:
                with contextlib.suppress(TypeError, ValueError):
                    if float(values[name]) != float(values[name]):
                        continue  # NaN: not defined this epoch (e.g. AUROC of a one-class validation split)
                    parts.append(f"{name.replace('_', '-')} {float(values[name]):.4f}")  # val-loss, not a 2nd "loss"
        parts.append(duration(seconds))
        left = (trainer.max_epochs or 0) - (epoch + 1)
        if left > 0 and trainer.max_epochs and trainer.max_epochs > 0 and not final:
            recent = self.epochs_timed[-3:]
            parts.append(f"ETA {duration(left * sum(recent) / len(recent))}")
        say(", ".join(parts))
