"""RELIABILITY.md promises for extraction: kills, truncation, NaN, each with the same bags in the end."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_extract import assert_same_bags, extract, make_cohort

from features.bag_directory import BagDirectory
from features.bags import bag_path, read_bag, validate_bag
from features.registry import create_encoder
from mil.atomic import leftover_temp_files

REPO = Path(__file__).resolve().parent.parent
ENCODER = "morphology.handcrafted"  # needs no weights and starts fast; the point here is the file handling


def _command(cells: Path, out: Path) -> list[str]:
    base = [sys.executable, "-m", "mil.cli", "extract", "--cells", str(cells), "--encoder", ENCODER]
    return [
        *base,
        "--out",
        str(out),
        "--input-size",
        "32",
        "--workers",
        "0",
        "--batch-size",
        "4",
        "--no-progress",
        "--verbose",
    ]


def _env() -> dict:
    # One thread: identical numerics in every run, and a fair share of a small shared CPU.
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def _start(cells: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        _command(cells, out), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def _read_until_done_lines(proc: subprocess.Popen, count: int) -> list[float]:
    """Read the log until `count` bags were written after the run planned its work; their times."""
    times: list[float] = []
    planned = False
    for line in proc.stderr:
        planned = planned or " to compute" in line
        if planned and line.startswith("bag ") and " written: " in line:
            times.append(time.perf_counter())
        if planned and len(times) >= count:
            break
    return times


@pytest.mark.slow
def test_twenty_sigkills_then_reruns_give_the_clean_bags_and_leave_no_temp_files(tmp_path):
    cells = make_cohort(tmp_path, patients=30, cells=6, cells_per_image=6, side=48)
    proc = _start(cells, tmp_path / "clean")
    times = _read_until_done_lines(proc, 30)
    assert proc.wait() == 0 and len(times) == 30
    per_bag = float(np.median(np.diff(times)))  # one patient: crop, embed, write, validate, fsync, rename
    out = tmp_path / "killed"
    rng = random.Random(20)
    temp_seen = 0
    for kill in range(20):
        proc = _start(cells, out)
        if kill % 5 == 4:
            time.sleep(rng.uniform(0.0, 2.0))  # during startup or planning
        else:
            # At a random point inside the work of the first or second patient of this run.
            _read_until_done_lines(proc, rng.randint(0, 1))
            time.sleep(rng.uniform(0.0, per_bag))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        temp_seen += len(leftover_temp_files(out)) if out.exists() else 0
        # A final path is never a half-written file, whenever the kill came.
        for path in out.glob("*.h5") if out.exists() else []:
            assert validate_bag(path) == [], f"kill {kill} left an invalid final bag {path.name}"
    final = subprocess.run(_command(cells, out), cwd=REPO, env=_env(), capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    assert len(BagDirectory(out).patients()) == 30
    assert_same_bags(tmp_path / "clean", out)
    assert leftover_temp_files(out) == []
    print(f"20 kills, {temp_seen} temporary file(s) found after kills, all removed by the reruns")


@pytest.mark.parametrize("cut", ["0", "96", "half", "size-1"])
def test_truncated_bag_is_detected_and_only_that_patient_recomputed(tmp_path, cut):
    cells = make_cohort(tmp_path, patients=3, cells=6, side=48)
    out = tmp_path / "bags"
    extract(cells, out, encoder=ENCODER)
    before = read_bag(bag_path(out, "P01")).features
    path = bag_path(out, "P01")
    data = path.read_bytes()
    path.write_bytes(data[: {"0": 0, "96": 96, "half": len(data) // 2, "size-1": len(data) - 1}[cut]])
    assert validate_bag(path)
    report = extract(cells, out, encoder=ENCODER)
    assert report.done == ["P01"] and report.reasons["P01"].startswith("invalid")
    assert sorted(report.up_to_date) == ["P00", "P02"]
    np.testing.assert_array_equal(read_bag(path).features, before)


class _NaNOnSecondBatch(torch.nn.Module):
    """Wraps an encoder and spoils one value of its second batch (that is, the second patient's cells)."""

    def __init__(self, base) -> None:
        super().__init__()
        self.base, self.config, self.calls = base, base.config, 0

    def forward(self, x):
        out = self.base(x)  # (B, D)
        self.calls += 1
        if self.calls == 2:
            out = out.clone()
            out[1, 0] = float("nan")
        return out


def test_nan_embedding_fails_that_patient_only_naming_the_row(tmp_path):
    from features.extract import ExtractConfig, run_extract

    cells = make_cohort(tmp_path, patients=3, cells=5, side=48)
    out = tmp_path / "bags"
    encoder = _NaNOnSecondBatch(create_encoder(ENCODER, input_size=32))
    # Batches never span patients: with 5 cells each and batch size 8, the second batch is P01's.
    config = ExtractConfig(cells=cells, encoder=ENCODER, out=out, input_size=32, batch_size=8, workers=0)
    report = run_extract(config, log=lambda m: None, encoder=encoder)
    assert "P01" in report.failed and "row 1" in report.failed["P01"] and "NaN" in report.failed["P01"]
    assert "patient 'P01'" in report.failed["P01"]
    assert not bag_path(out, "P01").exists() and leftover_temp_files(out) == []
    assert sorted(report.done) == ["P00", "P02"]


def _small_then_big_cohort(root: Path) -> Path:
    """P00 with 3 cells (a ~10 KB bag), P01 with 120 (~44 KB): a limit between the two fails P01 only."""
    from mil.cell_table import CellTable, read_cell_table

    cells = make_cohort(root, patients=2, cells=120, cells_per_image=30, side=96)
    rows = [r for r in read_cell_table(cells).rows if r["patient_id"] == "P01" or int(r["cell_id"].split("-")[1]) < 3]
    return CellTable(rows=rows).write(cells)


def _assert_disk_full_handled(code: int, err: str, out: Path) -> None:
    assert code == 2, err
    assert f"error: no space left on device writing {out / 'P01.h5'}" in err and "nothing was half-written" in err
    assert "Traceback" not in err and "Segmentation" not in err and "HDF5-DIAG" not in err
    assert validate_bag(out / "P00.h5") == [] and not (out / "P01.h5").exists()
    assert leftover_temp_files(out) == []


def test_promise9_a_file_size_limit_is_a_plain_disk_full_error_and_a_rerun_finishes(tmp_path):
    """Case 7 of issue 14, with RLIMIT_FSIZE (`ulimit -f`): EFBIG is treated like ENOSPC. SIGXFSZ is ignored, as
    Python does at start, so the write fails with EFBIG instead of killing the process."""
    import resource

    cells = _small_then_big_cohort(tmp_path / "cohort")
    out = tmp_path / "bags"

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (24 * 1024, 24 * 1024))

    run = subprocess.run(
        _command(cells, out), cwd=REPO, env=_env(), capture_output=True, text=True, preexec_fn=limit_file_size
    )
    _assert_disk_full_handled(run.returncode, run.stderr, out)
    assert "a file-size limit, ulimit -f, was reached" in run.stderr
    again = subprocess.run(_command(cells, out), cwd=REPO, env=_env(), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert "1 up to date, 1 to compute" in again.stderr and validate_bag(out / "P01.h5") == []


def test_promise9_a_full_tmpfs_is_a_plain_disk_full_error(tmp_path):
    """Case 7 of issue 14 on a real full file system (ENOSPC): a 32 KB tmpfs in a private mount namespace."""
    import shutil

    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("mounting a tmpfs needs root and unshare(1); the RLIMIT_FSIZE test covers the same path")
    cells = _small_then_big_cohort(tmp_path / "cohort")
    mnt, copy = tmp_path / "mnt", tmp_path / "copy"
    mnt.mkdir()
    script = (
        'mount -t tmpfs -o size=32k tmpfs "$MNT" || exit 97\n'
        '"$@" > "$LOG.out" 2> "$LOG.err"; echo $? > "$LOG.rc"\n'
        'cp -a "$MNT/bags" "$COPY"\n'
    )
    env = {**_env(), "MNT": str(mnt), "COPY": str(copy), "LOG": str(tmp_path / "log")}
    command = _command(cells, mnt / "bags")
    done = subprocess.run(["unshare", "--mount", "sh", "-c", script, "sh", *command], cwd=REPO, env=env)
    if done.returncode != 0:
        pytest.skip(f"no private tmpfs here (unshare/mount exit {done.returncode})")
    err = (tmp_path / "log.err").read_text().replace(str(mnt / "bags"), str(copy))
    _assert_disk_full_handled(int((tmp_path / "log.rc").read_text()), err, copy)


def test_promise9_every_atomic_writer_turns_a_full_disk_into_one_plain_error(tmp_path):
    """Text, torch checkpoints and bags: DiskFullError naming the path, no temporary file, the old file kept."""
    script = """
import resource, signal, sys
from pathlib import Path
import numpy as np, torch
sys.path.insert(0, "tests")
from test_bags import make_bag
from features.bags import write_bag
from mil.atomic import DiskFullError, atomic_torch_save, atomic_write_text
out = Path(sys.argv[1])
atomic_write_text(out / "kept.txt", "old")
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))
writes = {
    "kept.txt": lambda: atomic_write_text(out / "kept.txt", "x" * 20000),
    "w.pt": lambda: atomic_torch_save({"w": torch.zeros(5000)}, out / "w.pt"),
    "P1.h5": lambda: write_bag(out / "P1.h5", make_bag("P1", n=200, dim=64)),
}
for name, write in writes.items():
    try:
        write()
    except DiskFullError as e:
        print(e)
"""
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], cwd=REPO, env=_env(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split(" (")[0] for line in lines] == [
        f"no space left on device writing {tmp_path / name}" for name in ("kept.txt", "w.pt", "P1.h5")
    ]
    assert (tmp_path / "kept.txt").read_text() == "old" and leftover_temp_files(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.txt"]
