"""The `mil` command's shared behaviour: --threads on every command, defaults in --help, no empty folder left."""

import torch

from mil import cli, threads


def test_every_command_takes_threads_and_shows_defaults():
    for name in cli.COMMANDS:
        parser = cli.command_parser(name)
        assert any("--threads" in a.option_strings for a in parser._actions), name
    text = cli.command_parser("train-classifier").format_help()
    assert "(default: tf_efficientnet_lite0)" in " ".join(text.split())


def test_threads_order_is_flag_then_env_then_affinity(monkeypatch):
    monkeypatch.delenv("MIL_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert 1 <= threads.resolve() <= threads.available_cores()
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.resolve() == 3
    monkeypatch.setenv("MIL_THREADS", "1")
    assert threads.resolve() == 1
    assert threads.resolve(2) == 2
    assert threads.resolve(0) == threads.available_cores()


def test_auto_counts_only_idle_cores(monkeypatch):
    samples = iter([(100, 1000), (150, 1200)])  # 50 of 200 jiffies idle: a quarter of the machine is free
    monkeypatch.setattr(threads, "_cpu_times", lambda: next(samples))
    monkeypatch.setattr(threads, "available_cores", lambda: 4)
    monkeypatch.setattr(threads.time, "sleep", lambda s: None)
    assert threads.idle_cores() == 1
    samples = iter([(0, 0), (0, 100)])  # every core busy: still one thread
    assert threads.idle_cores() == 1
    samples = iter([(0, 0), (100, 100)])
    assert threads.idle_cores() == 4
    before = torch.get_num_threads()
    try:
        assert threads.apply(1) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_a_failed_command_leaves_no_empty_output_folder(tmp_path, capsys):
    out = tmp_path / "results"
    code = cli.main(
        ["compare", "--bags", str(tmp_path / "no_bags"), "--patients", str(tmp_path / "p.csv"), "--out", str(out)]
    )
    assert code == 2 and "error:" in capsys.readouterr().err
    assert not out.exists()


def test_a_failed_command_keeps_a_folder_that_was_there(tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    cli.main(["compare", "--bags", str(tmp_path / "no_bags"), "--patients", str(tmp_path / "p.csv"), "--out", str(out)])
    assert (out / "notes.txt").read_text() == "mine"


def test_only_lock_files_and_empty_folders_are_removed(tmp_path):
    empty = tmp_path / "a"
    (empty / "models" / "abmil").mkdir(parents=True)
    (empty / ".mil.lock").write_text("")
    cli._remove_if_empty(empty)
    assert not empty.exists()
    kept = tmp_path / "b"
    (kept / "models").mkdir(parents=True)
    (kept / "models" / "x.pt").write_text("weights")
    cli._remove_if_empty(kept)
    assert (kept / "models" / "x.pt").exists()


def test_lending_threads_to_a_side_process_and_giving_them_back(monkeypatch):
    monkeypatch.setattr(threads, "_chosen", None)  # library use: `apply` never ran
    monkeypatch.setattr(threads, "available_cores", lambda: 4)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        assert threads.lend(2) == 2 and torch.get_num_threads() == 2 and threads.chosen() == 2
        assert threads.loader_workers() == 0  # 2 threads here + 2 lent: no spare core for workers
        threads.give_back()
        assert torch.get_num_threads() == 4 and threads.chosen() == 4
        assert threads.lend(9) == 1  # never all of them: this process keeps one
        threads.give_back()
    finally:
        threads.give_back()
        torch.set_num_threads(before)
