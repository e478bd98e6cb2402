"""RELIABILITY promise 9, stopped means failed: SIGTERM and SIGINT sent to a real `mil` process make it remove its
temporary files and exit 143 / 130, inside Lightning's training loop too (which on its own ended a SIGTERM'd run
with status 0), and `mil demo` passes the status on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from limits import HANG_GUARD_S
from test_demo import TINY
from test_extract import make_cohort

from features.bags import validate_bag

REPO = Path(__file__).resolve().parent.parent
EXIT = {signal.SIGTERM: 143, signal.SIGINT: 130}


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def _temp_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.name.endswith(".tmp"))


# SIGINT as Ctrl-C sends it and SIGTERM as a scheduler does (to every process of the job, loader workers too).
CASES = {"SIGTERM": (signal.SIGTERM, "0", False), "SIGINT": (signal.SIGINT, "0", False)}
CASES["SIGTERM_to_the_group_with_workers"] = (signal.SIGTERM, "2", True)


@pytest.mark.parametrize("case", CASES)
def test_promise9_a_signalled_extract_exits_nonzero_and_leaves_no_temp_files(tmp_path, case):
    signum, workers, group = CASES[case]
    cells = make_cohort(tmp_path, patients=40, cells=6, cells_per_image=6, side=48)
    out = tmp_path / "bags"
    command = [sys.executable, "-m", "mil.cli", "extract", "--cells", str(cells), "--encoder", "morphology.handcrafted"]
    command += ["--out", str(out), "--input-size", "32", "--workers", workers, "--batch-size", "2", "--no-progress"]
    command += ["--verbose"]  # a line per bag written: the signal comes after the first
    proc = subprocess.Popen(
        command,
        cwd=REPO,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    log = []
    for line in proc.stderr:  # signalled while it writes: after the first bag of this run is done
        log.append(line)
        if line.startswith("bag ") and " written: " in line:
            break
    if group:
        os.killpg(proc.pid, signum)
    else:
        proc.send_signal(signum)
    log += proc.stderr.read().splitlines(keepends=True)
    assert proc.wait(timeout=HANG_GUARD_S) == EXIT[signum], "".join(log)
    assert f"stopped by {signum.name}" in "".join(log)
    assert "Traceback" not in "".join(log)  # nor "Exception ignored" from dying loader workers
    assert _temp_files(out) == []
    finished = sorted(out.glob("*.h5"))
    assert 1 <= len(finished) < 40, "the signal came after the work was done"
    assert all(validate_bag(path) == [] for path in finished)
    stamps = {path: path.stat().st_mtime_ns for path in finished}
    # Nothing that was finished is lost: the rerun computes only the rest.
    rerun = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert rerun.returncode == 0, rerun.stderr
    assert len(list(out.glob("*.h5"))) == 40
    assert all(path.stat().st_mtime_ns == stamp for path, stamp in stamps.items())


# A real SIGTERM sent to the process by itself at the first training step, so it lands inside Lightning's fit
# (Lightning installs its own SIGTERM handler there) whatever the speed of the machine.
SELF_SIGNAL = textwrap.dedent(
    """
    import os, signal, sys
    from mil.classifier.model import CellClassifierModule
    from mil.cli import main
    step = CellClassifierModule.training_step
    def stopped(self, batch, batch_idx):
        os.kill(os.getpid(), signal.SIGTERM)
        return step(self, batch, batch_idx)
    CellClassifierModule.training_step = stopped
    sys.exit(main(sys.argv[1:]))
    """
)


def _run_self_signalled(tmp_path: Path, args: list[str]) -> subprocess.CompletedProcess:
    script = tmp_path / "self_signal.py"
    script.write_text(SELF_SIGNAL)
    return subprocess.run(
        [sys.executable, str(script), *args], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=HANG_GUARD_S
    )


def test_promise9_sigterm_inside_lightning_training_exits_143(tmp_path):
    from test_classifier import write_cohort

    write_cohort(tmp_path)
    out = tmp_path / "clf"
    args = ["train-classifier", "--cells", str(tmp_path / "cells.csv"), "--out", str(out), "--arch", "test_resnet"]
    done = _run_self_signalled(
        tmp_path, [*args, "--init", "random", "--crop-size", "32", "--max-epochs", "2", "--batch-size", "8"]
    )
    assert done.returncode == 143, done.stderr[-3000:]
    assert "stopped by SIGTERM" in done.stderr
    assert not (out / "classifier.pt").exists() and not (out / "run" / "finished.json").exists()
    assert _temp_files(tmp_path) == []


@pytest.mark.slow
def test_promise9_a_sigterm_stopped_demo_exits_143(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "demo"
    done = _run_self_signalled(tmp_path, ["demo", "--out", str(out), "--config", str(config)])
    assert done.returncode == 143, done.stderr[-3000:]
    assert "== cell classifier" in done.stdout  # stopped in the classifier stage, after synth and detector
    assert "stopped by SIGTERM" in done.stderr
    assert not (out / "pipeline_summary.md").exists()
    assert _temp_files(out) == []


def _thread_error(exc: BaseException, filename: str):
    """The `threading.excepthook` argument of `exc` raised by code of `filename`."""
    import threading

    try:
        exec(compile("raise exc", filename, "exec"), {"exc": exc})
    except BaseException as e:  # noqa: BLE001 - any exception, as a thread would raise it
        return threading.ExceptHookArgs((type(e), e, e.__traceback__, None))
    raise AssertionError("nothing was raised")


def test_loader_worker_drops_only_the_fd_sharer_errors_of_a_stopped_hand_over():
    import os

    from features.cropping import _quiet_when_the_receiver_left

    seen = []
    hook = _quiet_when_the_receiver_left(seen.append)
    sharer = os.path.join("lib", "python3.11", "multiprocessing", "resource_sharer.py")
    hook(_thread_error(ConnectionResetError("peer gone"), sharer))  # the main process stopped mid hand-over
    hook(_thread_error(EOFError(), sharer))
    assert seen == []
    hook(_thread_error(ValueError("a bug"), sharer))  # not a broken connection: shown
    hook(_thread_error(ConnectionResetError("elsewhere"), os.path.join("mil", "other.py")))  # another thread: shown
    assert [type(a.exc_value) for a in seen] == [ValueError, ConnectionResetError]
