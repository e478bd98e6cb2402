"""One run per output folder (RELIABILITY.md promise 8): `with output_lock(folder, command="mil compare"):`.

A second run into a folder that a live run holds waits (`wait` seconds) or is refused with a FolderBusyError
naming the first run: its command, pid, host, start time and command line. Parts of one job that fill a
folder together (`mil extract --shard I/N`) hold the folder *shared* and their own part *exclusively*, so
shards run in parallel, a second copy of one shard is refused, a shard started with other settings (encoder,
input size, dtype, shard count) is refused while another runs, and a run of the whole folder waits for all.

The locks are kernel `flock` locks on hidden files in the folder (`.mil.lock`, `.mil.part-NAME.lock`): the
kernel releases them when their process ends, however it ends (SIGKILL included), so a lock never outlives
its run and nothing has to be deleted by hand. (The `filelock` package gives exclusive kernel locks but
neither shared ones nor the owner's record; `fcntl` does both in a few lines.) The owner's record is JSON in
the lock file. Linux and macOS; on NFS, `flock` works across hosts on Linux (it maps to NFS byte-range locks).

Clean-up (`OutputLock.remove_orphaned_temp_files`) removes a temporary file only when its writer is gone:
the name records the writer's pid and host (mil.atomic); a file without one, or from another host, is removed
only when the lock proves that no other run works in the folder, or when the caller owns it (a shard's own
patients).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from mil.atomic import leftover_temp_files, owner_gone, pid_alive, this_host
from mil.errors import MilError

LOCK_NAME = ".mil.lock"
PART_PREFIX = ".mil.part-"
PART_SUFFIX = ".lock"
_READ_TRIES = 20  # an owner writes its record right after taking the lock; a reader retries for ~1 s


class FolderBusyError(MilError):
    """Another live run holds the output folder."""


@dataclass(frozen=True)
class LockOwner:
    """Who holds a lock: enough to find the process (pid, host) and to recognise the run (start, command line)."""

    pid: int
    host: str
    started: str
    command: str
    argv: str = ""
    part: str | None = None
    settings: str | None = None

    def describe(self) -> str:
        part = f" {self.part}" if self.part else ""
        gone = ""
        if self.host == this_host() and not pid_alive(self.pid):
            gone = "; that process has ended, a child of it still holds the lock and ends within seconds"
        line = f", command line: {self.argv}" if self.argv else ""
        return f"`{self.command}`{part} (pid {self.pid} on host {self.host}, started {self.started}{line}{gone})"


def _now_owner(command: str, part: str | None, settings: str | None) -> LockOwner:
    return LockOwner(
        pid=os.getpid(),
        host=this_host(),
        started=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        command=command,
        argv=" ".join(sys.argv)[:500],
        part=part,
        settings=settings,
    )


def _open(path: Path, *, create: bool) -> int:
    flags = os.O_RDWR | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0) | (os.O_CREAT if create else 0)
    return os.open(path, flags, 0o666)


def _try_flock(fd: int, kind: int) -> bool:
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _lock(path: Path, kind: int, *, create: bool = True) -> int | None:
    """An fd of `path` locked with `kind`, or None when another process holds it (or, without `create`, when it
    does not exist). A part file is unlinked by its owner at the end, maybe while we open it: then the lock is on
    a dead inode and we open the path again."""
    for _ in range(10):
        try:
            fd = _open(path, create=create)
        except FileNotFoundError:
            return None
        if not _try_flock(fd, kind):
            os.close(fd)
            return None
        try:
            same = os.fstat(fd).st_ino == os.stat(path, follow_symlinks=False).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)
    return None


def _write_owner(fd: int, owner: LockOwner) -> None:
    data = json.dumps(asdict(owner)).encode()
    with contextlib.suppress(OSError):  # a full disk must not stop the run: the lock itself needs no space
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)


def _read_owner(path: Path) -> LockOwner | None:
    for _ in range(_READ_TRIES):
        try:
            return LockOwner(**json.loads(path.read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError, OSError):  # being written, or empty: its owner writes it right away
            time.sleep(0.05)
    return None


def _held_by_other(path: Path) -> bool:
    fd = _lock(path, fcntl.LOCK_EX, create=False)
    if fd is None:
        return path.exists()
    os.close(fd)
    return False


def _unknown(what: str) -> LockOwner:
    return LockOwner(pid=0, host="?", started="?", command=f"a run whose record cannot be read ({what})")


def _part_files(folder: Path) -> list[Path]:
    return sorted(folder.glob(f"{PART_PREFIX}*{PART_SUFFIX}"))


def _live_parts(folder: Path, mine: Path | None = None) -> list[LockOwner]:
    owners = []
    for path in _part_files(folder):
        if path != mine and _held_by_other(path):
            owners.append(_read_owner(path) or _unknown(path.name))
    return owners


def _holders(folder: Path) -> list[LockOwner]:
    """Who holds `folder` now: the exclusive owner, or every live part; empty when it has just been released."""
    path = folder / LOCK_NAME
    fd = _lock(path, fcntl.LOCK_SH)
    if fd is not None:  # no exclusive owner: held shared, by parts
        os.close(fd)
        return _live_parts(folder)
    owner = _read_owner(path)
    if owner is None and _held_by_other(path):
        owner = _unknown(str(path))
    return [owner] if owner is not None else []


def _distributed_part(env: dict[str, str] | None = None) -> tuple[str, str] | None:
    """(part, settings) of a rank of a torchrun / Lightning "ddp" job, where every rank runs the whole command: the
    ranks share the folder; another job (another rendezvous) is refused."""
    env = dict(os.environ if env is None else env)
    if int(env.get("WORLD_SIZE", "1") or 1) <= 1 or "RANK" not in env:
        return None
    job = env.get("TORCHELASTIC_RUN_ID") or f"{env.get('MASTER_ADDR', '')}:{env.get('MASTER_PORT', '')}"
    return f"rank {env['RANK']} of {env['WORLD_SIZE']}", f"distributed job {job}"


def _part_slug(part: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", part).strip("-")[:80] or "part"


@dataclass
class OutputLock:
    """The held lock of one run; `exclusive` unless it is one part of a parallel job."""

    folder: Path
    owner: LockOwner
    exclusive: bool
    part_file: Path | None = None

    def live_parts(self) -> list[LockOwner]:
        """The other parts of the job that work in the folder now (empty for an exclusive lock)."""
        return [] if self.exclusive else _live_parts(self.folder, mine=self.part_file)

    def remove_orphaned_temp_files(self, *, recursive: bool = False, own: Callable[[Path], bool] | None = None):
        """Remove the temporary files whose writer is gone; returns them. `recursive` also looks in subfolders,
        except those that hold their own lock file (another command's output folder). `own(path)` marks files
        that only this run can be writing (a shard's own patients), removed whoever wrote them."""
        alone = self.exclusive or not self.live_parts()
        removed = []
        for folder in self._folders(recursive):
            for tmp in leftover_temp_files(folder):
                gone = owner_gone(tmp)
                if gone is None:  # no pid in the name, or written on another host
                    gone = alone or (own is not None and own(tmp))
                if gone:
                    with contextlib.suppress(FileNotFoundError):
                        tmp.unlink()
                        removed.append(tmp)
        return removed

    def _folders(self, recursive: bool) -> Iterator[Path]:
        yield self.folder
        if recursive:
            for root, dirs, _ in os.walk(self.folder):
                dirs[:] = sorted(d for d in dirs if not (Path(root) / d / LOCK_NAME).exists())
                for d in dirs:
                    yield Path(root) / d


def _busy_message(folder: Path, holders: list[LockOwner]) -> str:
    who = "; ".join(h.describe() for h in holders)
    return (
        f"output folder {folder} is in use by {who}. Wait for it to finish, or choose another output folder; "
        "the lock is released as soon as that process ends, even when it is killed."
    )


def _acquire(folder: Path, owner: LockOwner) -> tuple[OutputLock, tuple[int, ...]] | list[LockOwner]:
    """The lock and its fds, or the holders that stand in the way (empty: released meanwhile, try again)."""
    if owner.part is None:
        fd = _lock(folder / LOCK_NAME, fcntl.LOCK_EX)
        if fd is None:
            return _holders(folder)
        _write_owner(fd, owner)
        return OutputLock(folder=folder, owner=owner, exclusive=True), (fd,)
    fd = _lock(folder / LOCK_NAME, fcntl.LOCK_SH)
    if fd is None:
        return _holders(folder)
    part_file = folder / f"{PART_PREFIX}{_part_slug(owner.part)}{PART_SUFFIX}"
    part_fd = _lock(part_file, fcntl.LOCK_EX)
    if part_fd is None:
        os.close(fd)
        found = _read_owner(part_file)
        if found is None and _held_by_other(part_file):
            found = _unknown(str(part_file))
        return [found] if found is not None else []
    _write_owner(part_fd, owner)
    return OutputLock(folder=folder, owner=owner, exclusive=False, part_file=part_file), (fd, part_fd)


@contextlib.contextmanager
def output_lock(
    folder: str | os.PathLike,
    *,
    command: str,
    part: str | None = None,
    settings: str | None = None,
    wait: float = 0.0,
    log: Callable[[str], None] | None = None,
) -> Iterator[OutputLock]:
    """Hold `folder` (created when absent) for one run of `command` (e.g. "mil predict").

    `part` (e.g. "shard 0/4") makes this run one of several that fill the folder in parallel; `settings` (a
    fingerprint of what they produce) must then be the same for all of them. The ranks of a torchrun job are
    such parts by themselves. Another live run in the way: wait up to `wait` seconds for it, then
    FolderBusyError naming it.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if part is None and (distributed := _distributed_part()) is not None:
        part, settings = distributed
    owner = _now_owner(command, part, settings)
    deadline = time.monotonic() + wait
    announced = False
    ghosts = 0
    while True:
        got = _acquire(folder, owner)
        if isinstance(got, tuple):
            break
        if got and all(h.host == this_host() and not pid_alive(h.pid) for h in got) and ghosts < 20:
            ghosts += 1  # the record of a killed run, while another process probes the lock for a moment: retry
            got = []
        if got and time.monotonic() >= deadline:
            raise FolderBusyError(_busy_message(folder, got))
        if got and not announced:
            (log or (lambda m: print(m, file=sys.stderr, flush=True)))(
                f"waiting up to {wait:.0f} s for {'; '.join(h.describe() for h in got)} to finish with {folder}"
            )
            announced = True
        time.sleep(0.2 if got else 0.01)
    lock, fds = got
    try:
        if part is not None:
            other = [o for o in lock.live_parts() if o.settings != settings]
            if other:
                raise FolderBusyError(
                    f"output folder {folder} is being filled by {'; '.join(o.describe() for o in other)} with other "
                    f"settings than this {command} {part}; parts of one job need the same settings (and the same "
                    "number of parts). Wait for it to finish, or choose another output folder."
                )
        yield lock
    finally:
        if lock.part_file is not None:
            with contextlib.suppress(FileNotFoundError):
                lock.part_file.unlink()  # while still locked: a waiter then opens the path anew
        else:
            with contextlib.suppress(OSError):
                os.ftruncate(fds[0], 0)  # an empty record: no stale owner is ever named
        for fd in reversed(fds):
            os.close(fd)


@contextlib.contextmanager
def command_folder(folder: str | os.PathLike, *, command: str) -> Iterator[OutputLock]:
    """What `mil compare`, `mil attention` and `mil predict` do first: hold their output folder, then remove the
    temporary files a killed earlier run left in it (only those whose writer is gone)."""
    with output_lock(folder, command=command) as lock:
        if removed := lock.remove_orphaned_temp_files(recursive=True):
            print(f"removed {len(removed)} temporary file(s) left by an interrupted run")
        yield lock
