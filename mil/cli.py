"""The `mil` command. Each subcommand lives in its own module with `add_arguments(parser)` and `run(args)`;
only the module of the command being run is imported, so `mil --help` is instant and a broken
optional dependency breaks one command, not all of them."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
import threading
from pathlib import Path

from mil import __version__, threads
from mil.errors import MilError

# command -> (module, one-line help). Add a command by adding a row and writing the module.
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("mil.synth.command", "write a synthetic bone-marrow cohort in the Zenodo layout"),
    "cells": (
        "mil.readers.command",
        "read a dataset (zenodo, idc, coco, yolo, voc, imagefolder, ...) into a cell table",
    ),
    "encoders": ("features.commands.encoders", "list the registered encoders with dim, input size and weights"),
    "extract": ("features.commands.extract", "embed every cell into one HDF5 bag per patient (cached, resumable)"),
    "verify": ("features.commands.verify", "check every bag of a directory; non-zero exit when any is invalid"),
    "compare": ("mil.compare.command", "train and compare count-based and attention-MIL heads on the same splits"),
    "predict": ("mil.predict.command", "apply the heads a comparison saved to new patients (ensemble by default)"),
    "heads": ("mil.heads.command", "list the registered diagnosis heads"),
    "train-classifier": ("mil.classifier.command_train", "train the cell-type classifier on a cell table"),
    "pretrain": ("mil.pretrain.command", "self-supervised pretraining (DINO, SimCLR) of a cell encoder"),
    "probe": ("mil.probe.command", "kNN and linear probes: how good each encoder is for cells and patients"),
    "classify": ("mil.classifier.command_classify", "write predicted labels and probabilities into a cell table"),
    "train-detector": ("mil.detector.command_train", "train the Faster R-CNN cell detector"),
    "detect": ("mil.detector.command_detect", "detect cells on images and write a cell table"),
    "attention": ("mil.attention.command", "attention galleries, overlays, faithfulness and an HTML report"),
    "demo": ("mil.demo", "the whole pipeline on the built-in synthetic cohort"),
    "run": ("mil.pipeline.command", "the whole pipeline from one YAML file, each stage cached and resumable"),
    "init": ("mil.pipeline.init", "write a commented pipeline file for your own data (then `mil run FILE`)"),
}


class Stopped(BaseException):
    """SIGTERM or SIGINT arrived. Raised in the main thread by the handler, so every ``finally`` and
    ``atomic_path`` clean-up on the way out runs (RELIABILITY promise 9). A BaseException, like KeyboardInterrupt,
    so no ``except Exception`` swallows it; not a KeyboardInterrupt, because Lightning turns that into exit 1."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
        self.exit_code = 128 + signum  # the shell's convention: 143 for SIGTERM, 130 for SIGINT


@contextlib.contextmanager
def _stop_on_signals():
    """SIGTERM and SIGINT raise ``Stopped`` in this process; a second signal exits at once (its clean-up is cut
    short, and a rerun removes what is left). Lightning adds its own SIGTERM handler during training and calls
    this one after it: without it, Lightning ends the run with a SystemExit of status 0 and a scheduler counts a
    stopped run as a success. Forked children (data-loader workers) keep the default action."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    owner = os.getpid()
    received: list[int] = []

    def handler(signum, frame) -> None:
        if os.getpid() != owner:  # a forked child: what it would do without this handler
            if signum == signal.SIGINT:
                signal.default_int_handler(signum, frame)  # KeyboardInterrupt, which loader workers end on quietly
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if received:
            os._exit(128 + signum)
        received.append(signum)
        if hasattr(signal, "SIGCHLD"):
            # Loader workers die of the same signal (it goes to the process group): torch's SIGCHLD handler
            # would raise "worker killed by signal" from inside the clean-up. The process is ending anyway.
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        raise Stopped(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def _quiet_defaults() -> None:
    # No hub, no login prompt: the framework is offline-first.
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("WANDB_SILENT", "true")


def _top_parser() -> argparse.ArgumentParser:
    lines = "\n".join(f"  {name:<17} {text}" for name, (_, text) in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="mil",
        description="Leukemia cytology MIL: cells -> bags -> diagnosis heads -> attention.",
        epilog=f"commands:\n{lines}\n\n`mil COMMAND --help` for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("command", nargs="?", help="one of the commands below")
    return parser


def main(argv: list[str] | None = None) -> int:
    _quiet_defaults()
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    if not argv or argv[0].startswith("-"):
        top.parse_args(argv)
        top.print_help()
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        top.error(f"unknown command {name!r}; choose one of: {', '.join(COMMANDS)}")
    parser = command_parser(name)
    args = parser.parse_args(rest)
    out = _out_folder(args)
    fresh = out is not None and not out.exists()
    code = 1
    try:
        threads.apply(getattr(args, "threads", None))
        with _stop_on_signals():
            code = int(module_run(name, args) or 0)
    except MilError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except Stopped as e:
        name = signal.Signals(e.signum).name
        print(f"stopped by {name}; temporary files removed; run the same command again to resume", file=sys.stderr)
        code = e.exit_code
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        code = 130
    finally:
        if code != 0 and fresh:
            _remove_if_empty(out)
    return code


class DefaultsShown(argparse.HelpFormatter):
    """Every option's default in `--help`, unless its help already names it or there is none to name."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        hidden = action.default is None or action.default is False or action.default == argparse.SUPPRESS  # 0 shows
        if "default" in text or hidden or not action.option_strings:
            return text
        if action.nargs == 0:  # store_true / store_false flags
            return text
        return f"{text} (default: %(default)s)"


def command_parser(name: str) -> argparse.ArgumentParser:
    """The parser of `mil NAME`: the module's options, `--threads`, and every default shown in `--help`."""
    module_name, text = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"mil {name}", description=text, formatter_class=DefaultsShown)
    module.add_arguments(parser)
    if not any("--threads" in a.option_strings for a in parser._actions):
        parser.add_argument(
            "--threads",
            type=int,
            default=None,
            help="CPU threads for torch (0 = every core this process may use; default: $MIL_THREADS, else "
            f"$OMP_NUM_THREADS, else the idle ones of the {threads.available_cores()} cores this process may use)",
        )
    return parser


def module_run(name: str, args: argparse.Namespace):
    return importlib.import_module(COMMANDS[name][0]).run(args)


def _out_folder(args: argparse.Namespace) -> Path | None:
    """The folder a command writes (its `--out`), when that is a folder rather than a file."""
    out = getattr(args, "out", None)
    if out is None:
        return None
    out = Path(out)
    return None if out.suffix.lower() in (".csv", ".json", ".yaml", ".yml", ".md") else out


def _remove_if_empty(folder: Path) -> None:
    """A failed command leaves no empty output folder behind: only lock files and empty sub-folders are removed,
    never a file the command or the user wrote."""
    if not folder.is_dir():
        return
    for root, dirs, files in os.walk(folder, topdown=False):
        if any(not f.startswith(".mil.") or not f.endswith(".lock") for f in files):
            return
        for d in dirs:
            if (Path(root) / d).exists():
                return
        for f in files:
            with contextlib.suppress(OSError):
                (Path(root) / f).unlink()
        with contextlib.suppress(OSError):
            Path(root).rmdir()


if __name__ == "__main__":
    sys.exit(main())
