"""RELIABILITY.md promise 8 (issue 14, cases 6 and 10): two runs never corrupt each other, and clean-up removes
only temporary files whose writer is gone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from limits import HANG_GUARD_S
from test_compare import compare, write_cohort
from test_extract import assert_same_bags, extract, make_cohort

from features.bag_directory import BagDirectory, read_manifest
from features.bags import read_bag_header
from mil.atomic import atomic_path, leftover_temp_files, temp_owner, this_host
from mil.cli import main as mil_main
from mil.locks import LOCK_NAME, FolderBusyError, output_lock

REPO = Path(__file__).resolve().parent.parent
ENCODER = "morphology.handcrafted"


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_promise8_a_second_run_is_refused_naming_the_first(tmp_path, capsys):
    """Case 6: the refusal names the holder's command, pid, host and start time; nothing is written."""
    cells = make_cohort(tmp_path / "cohort", patients=2, cells=4, side=48)
    out = tmp_path / "bags"
    with output_lock(out, command="mil extract"):
        args = ["extract", "--cells", str(cells), "--encoder", ENCODER, "--out", str(out), "--no-progress"]
        assert mil_main([*args, "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert f"output folder {out} is in use by `mil extract` (pid {os.getpid()} on host {this_host()}, started " in err
    assert "UTC" in err and "Wait for it to finish, or choose another output folder" in err
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]
    assert mil_main([*args, "--workers", "0"]) == 0  # released: the same command now runs


def test_promise8_the_lock_dies_with_its_process_and_waiters_get_it(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from mil.locks import output_lock\n"
         "with output_lock(sys.argv[1], command='mil compare'):\n    print('held', flush=True); time.sleep(600)",
         str(tmp_path)],
        env=_env(), stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    with (
        pytest.raises(FolderBusyError, match=rf"`mil compare` \(pid {holder.pid} on host "),
        output_lock(tmp_path, command="mil attention", wait=0.3, log=lambda m: None),
    ):
        pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    holder.stdout.close()
    notes: list[str] = []
    with output_lock(tmp_path, command="mil attention", wait=600, log=notes.append) as lock:
        assert lock.exclusive and lock.owner.pid == os.getpid()
    assert json.loads((tmp_path / LOCK_NAME).read_text() or "{}") == {}  # released: no stale owner left


def test_promise8_shards_share_a_folder_but_not_a_shard_nor_other_settings(tmp_path):
    """Shards keep working in parallel; a copy of a running shard, a shard with other settings, and a run of the
    whole folder are refused naming the shard(s) that run."""
    with output_lock(tmp_path, command="mil extract", part="shard 0/2", settings="A"):
        with output_lock(tmp_path, command="mil extract", part="shard 1/2", settings="A") as other:
            assert not other.exclusive and [o.part for o in other.live_parts()] == ["shard 0/2"]
        refused = {
            r"`mil extract` shard 0/2 \(pid": {"part": "shard 0/2", "settings": "A"},
            r"shard 0/2 .* with other settings than this mil extract shard 1/2": {"part": "shard 1/2", "settings": "B"},
            r"in use by `mil extract` shard 0/2": {"wait": 0.2, "log": lambda m: None},
        }
        for message, options in refused.items():
            with pytest.raises(FolderBusyError, match=message), output_lock(tmp_path, command="mil extract", **options):
                pass
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_NAME]  # part files go with their shard
    with output_lock(tmp_path, command="mil extract"):
        pass


def test_promise8_temp_names_record_their_writer_and_fit_any_final_name(tmp_path):
    for name in ("P01.h5", "x" * 250 + ".h5"):
        with atomic_path(tmp_path / name) as tmp:
            owner = temp_owner(tmp)
            assert owner is not None and owner.pid == os.getpid() and owner.host == this_host()
            assert len(tmp.name.encode()) <= 255
            tmp.write_text("done")
        assert (tmp_path / name).read_text() == "done"
    assert leftover_temp_files(tmp_path) == []


def _orphans(folder: Path) -> list[Path]:
    """Temporary files as a killed writer leaves them: one named for a dead pid of this host, one without owner."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f".summary.md.k1llxxxx.pid{_dead_pid()}@{this_host()}.tmp", folder / ".roc.png.oldstyle.tmp"]
    for path in paths:
        path.write_text("half")
    return paths


def test_case10_a_compare_rerun_removes_what_a_killed_one_left_and_spares_live_writers(tmp_path, capsys):
    """Case 10: `.tmp` files of a killed `mil compare` go on the rerun, in subfolders too; a live writer's file,
    and the files of another command's output folder nested inside (its own lock), are kept."""
    bags, patients = write_cohort(tmp_path)
    out = tmp_path / "results"
    killed = _orphans(out) + _orphans(out / "models" / "count.logreg")
    live = out / f".predictions.csv.l1vexxxx.pid{os.getppid()}@{this_host()}.tmp"
    live.write_text("being written")
    nested = out / "report"
    (nested / LOCK_NAME).parent.mkdir()
    (nested / LOCK_NAME).touch()
    nested_tmp = _orphans(nested)
    assert compare(bags, patients, out, "--heads", "count.logreg") == 0
    assert "removed 4 temporary file(s) left by an interrupted run" in capsys.readouterr().out
    assert not any(p.exists() for p in killed)
    assert live.exists() and all(p.exists() for p in nested_tmp)


def test_case10_an_attention_rerun_removes_what_a_killed_one_left(tmp_path, capsys):
    bags, patients = write_cohort(tmp_path)
    assert compare(bags, patients, tmp_path / "results", "--heads", "count.logreg") == 0
    report = tmp_path / "report"
    killed = _orphans(report) + _orphans(report / "patients")
    capsys.readouterr()
    # The comparison has no attention head, so the report itself fails; the clean-up came first.
    assert mil_main(["attention", "--results", str(tmp_path / "results"), "--out", str(report)]) == 2
    captured = capsys.readouterr()
    assert "removed 4 temporary file(s)" in captured.out and "has no predictions of head 'abmil'" in captured.err
    assert not any(p.exists() for p in killed)


def _extract_command(cells: Path, out: Path, size: int) -> list[str]:
    return [
        sys.executable, "-m", "mil.cli", "extract", "--cells", str(cells), "--encoder", ENCODER, "--out", str(out),
        "--input-size", str(size), "--workers", "0", "--batch-size", "4", "--no-progress",
    ]  # fmt: skip


@pytest.mark.parametrize("sizes", [(32, 32), (32, 40)], ids=["same settings", "different input size"])
def test_promise8_two_real_extract_processes_into_one_folder(tmp_path, sizes):
    """Case 6: two `mil extract` started together into one folder end with identical valid bags matching the
    manifest, or one clear refusal; never a crash, a deleted live temporary file, or a mismatched manifest."""
    cells = make_cohort(tmp_path / "cohort", patients=6, cells=8, cells_per_image=4, side=48)
    out = tmp_path / "bags"
    procs = [
        subprocess.Popen(_extract_command(cells, out, s), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for s in sizes
    ]  # fmt: skip
    results = [(p.wait(timeout=HANG_GUARD_S), *p.communicate()) for p in procs]
    for code, _, err in results:
        assert code in (0, 2), err
        assert "Traceback" not in err and "Error:" not in err.replace("error: output folder", "")
        if code == 2:
            assert f"error: output folder {out} is in use by `mil extract` (pid " in err
    assert any(code == 0 for code, _, _ in results)
    assert mil_main(["verify", str(out)]) == 0
    manifest = read_manifest(out)
    directory = BagDirectory(out)
    assert len(directory.patients()) == 6 and leftover_temp_files(out) == []
    for path in directory.files():
        assert read_bag_header(path)["encoder_config"] == manifest["encoder_config"]
    # The bags are those of one clean run with the settings the manifest records.
    clean = tmp_path / "clean"
    extract(cells, clean, encoder=ENCODER, input_size=manifest["encoder_config"]["input_size"], batch_size=4)
    assert_same_bags(clean, out)
