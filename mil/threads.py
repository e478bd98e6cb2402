"""How many CPU threads a command uses: chosen from the cores it is given, never inherited by accident.

Order: `--threads N` on the command line, then `MIL_THREADS`, then `OMP_NUM_THREADS`, then **auto**: the cores this
process may run on (its CPU affinity, which a scheduler or `taskset` sets; not the machine's total) that are idle
when the command starts, measured over 0.2 s from /proc/stat, at least 1. On an idle 2-core machine auto gives 2;
beside one busy job, 1. `0` means every core this process may use, busy or not.

The choice sets torch's intra-op threads (one inter-op thread: the stages run one model at a time) and is what
data loaders read to size their workers (`loader_workers`), so threads x workers never exceeds it.

On a machine shared with other jobs, one thread per process is often fastest (see experiments/bench_extract.py).
"""

from __future__ import annotations

import contextlib
import os
import time

_chosen: int | None = None
_lent = 0  # threads handed to a side process (mil.pipeline.beside) until it ends


def available_cores() -> int:
    """The cores this process may run on (affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _from_env() -> int | None:
    for name in ("MIL_THREADS", "OMP_NUM_THREADS"):
        raw = os.environ.get(name, "").strip()
        if raw:
            try:
                value = int(raw)
            except ValueError:
                continue
            if value >= 0:
                return value
    return None


def _cpu_times() -> tuple[int, int] | None:
    """(idle, total) jiffies of all CPUs from /proc/stat, or None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return idle, sum(fields[:8])


def idle_cores(sample_s: float = 0.2) -> int:
    """Cores of this process's share that are idle now: the machine's idle fraction over `sample_s` seconds times
    the cores this process may use, rounded, at least 1 (all of them where /proc/stat is unavailable)."""
    cores = available_cores()
    before = _cpu_times()
    if before is None:
        return cores
    time.sleep(sample_s)
    after = _cpu_times()
    total = after[1] - before[1] if after else 0
    if not after or total <= 0:
        return cores
    idle_fraction = (after[0] - before[0]) / total
    return max(1, min(cores, int(idle_fraction * cores + 0.5)))


def resolve(requested: int | None = None) -> int:
    """The thread count a command should use (see the module docstring for the order)."""
    value = requested if requested is not None else _from_env()
    if value is None:
        return idle_cores()
    if value == 0:
        return available_cores()
    if value < 0:
        raise ValueError(f"--threads {value}: use a positive number, or 0 for every core this process may use")
    return value


def apply(requested: int | None = None) -> int:
    """Set torch's threads for this process and remember the choice; returns the count."""
    global _chosen
    import torch

    n = resolve(requested)
    torch.set_num_threads(n)
    with contextlib.suppress(RuntimeError):  # set once per process, before parallel work starts
        torch.set_num_interop_threads(1)
    _chosen = n
    return n


def chosen() -> int:
    """The count set by `apply` (less the threads lent to a side process), else torch's current count."""
    if _chosen is not None:
        return max(1, _chosen - _lent)
    import torch

    return torch.get_num_threads()


def lend(n: int) -> int:
    """Hand `n` of this process's threads to a side process: torch here keeps the rest (at least 1), and
    `loader_workers` counts the lent ones as busy. Returns the threads kept; `give_back` undoes it."""
    global _chosen, _lent
    import torch

    if _chosen is None:  # library use without `apply`: pin today's count, so give_back restores it
        _chosen = torch.get_num_threads()
    total = _chosen
    _lent = max(0, min(int(n), total - 1))
    torch.set_num_threads(max(1, total - _lent))
    return max(1, total - _lent)


def give_back() -> None:
    """The side process ended: torch here uses every chosen thread again."""
    global _lent
    import torch

    _lent = 0
    torch.set_num_threads(chosen())


def loader_workers(requested: int | None = None) -> int:
    """Data-loader workers for a training loop: `requested` if given, else 0 (in-process) when one thread is
    chosen, else one worker per spare core beyond the torch threads, at most 4."""
    if requested is not None and requested >= 0:
        return requested
    spare = available_cores() - chosen() - _lent
    return max(0, min(4, spare))
