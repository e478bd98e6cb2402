"""Crash-safe writes: temp file in the same folder, close, validate, fsync, rename.

"Done" means "validates": a reader that finds the final path can trust it, because the rename is
the last step and happens only after the content was re-read and checked.

A temporary file's name carries its writer (`.NAME.XXXXXXXX.pid123@host.tmp`), so a clean-up can tell a
live writer's file from one whose writer is gone (RELIABILITY.md promise 8; `mil.locks`). A full disk
(ENOSPC, EDQUOT, or EFBIG from a file-size limit) is a DiskFullError naming the path; the temporary file
is removed and the final path is left as it was (promise 9).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import socket
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from mil.errors import MilError

TMP_SUFFIX = ".tmp"
NAME_MAX = 255  # bytes of one file name on Linux and macOS file systems
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_OWNER = re.compile(r"\.pid(?P<pid>\d+)@(?P<host>[A-Za-z0-9_-]{1,32})" + re.escape(TMP_SUFFIX) + "$")
_UMASK = os.umask(0)
os.umask(_UMASK)  # read once at import: os.umask can only be read by setting it


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a closed file (or a folder's entries) to disk."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if Path(path).is_dir() else os.O_RDONLY
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DiskFullError(MilError):
    """No space left where a file was being written; nothing was half-written."""


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS


def disk_full_error(path: str | os.PathLike, error: OSError) -> DiskFullError:
    why = {errno.EFBIG: " (a file-size limit, ulimit -f, was reached)", errno.EDQUOT: " (disk quota exceeded)"}
    return DiskFullError(
        f"no space left on device writing {path}{why.get(error.errno, '')}; nothing was half-written. "
        "Free space there (or choose another output folder) and run the same command again: it resumes."
    )


def this_host() -> str:
    """The host name as it appears in temporary-file names and lock records (at most 32 safe characters)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:32] or "host"


@dataclass(frozen=True)
class TempOwner:
    pid: int
    host: str


def temp_owner(path: str | os.PathLike) -> TempOwner | None:
    """The writer recorded in a temporary file's name; None for a name without one (written by an older version)."""
    match = _OWNER.search(Path(path).name)
    return TempOwner(int(match["pid"]), match["host"]) if match else None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def owner_gone(path: str | os.PathLike) -> bool | None:
    """True when the temporary file's writer ran on this host and no longer runs; False when it still runs (or is
    this process); None when that cannot be told from here (no owner in the name, or another host)."""
    owner = temp_owner(path)
    if owner is None or owner.host != this_host():
        return None
    return owner.pid != os.getpid() and not pid_alive(owner.pid)


def _temp_prefix_suffix(final: Path) -> tuple[str, str]:
    suffix = f".pid{os.getpid()}@{this_host()}{TMP_SUFFIX}"
    room = NAME_MAX - len(suffix) - 8 - 2  # mkstemp adds 8 random characters; two dots around the name
    name = final.name.encode()[:room].decode("utf-8", "ignore")  # a very long name is cut in the temp name only
    return f".{name}.", suffix


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, validate: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `final`; on success validate it, fsync and rename it over `final`.

    The caller writes and *closes* the temporary file inside the `with` block. `validate(path)` raises
    when the content is wrong; then the temporary file is removed and `final` is left untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    prefix, suffix = _temp_prefix_suffix(final)
    try:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=final.parent)
    except OSError as e:
        if is_disk_full(e):
            raise disk_full_error(final, e) from e
        raise
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if validate is not None:
            validate(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; a finished file gets the usual mode
        fsync_path(tmp)
        os.replace(tmp, final)
        fsync_path(final.parent)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if is_disk_full(e):
            raise disk_full_error(final, e) from e
        raise


def atomic_write_text(final: str | os.PathLike, text: str, validate: Callable[[Path], None] | None = None) -> None:
    with atomic_path(final, validate) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_bytes(final: str | os.PathLike, data: bytes) -> None:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


def leftover_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Temporary files in `folder`: a killed writer's, or a live one's (`mil.locks` tells them apart). Nothing
    counts them as done."""
    return sorted(Path(folder).glob(f".*{TMP_SUFFIX}"))


def atomic_torch_save(obj, final: str | os.PathLike, validate: Callable[[Path], None] | None = None) -> None:
    """``torch.save`` through ``atomic_path``. It writes to an open file, not to the temporary path: given a path,
    torch names the archive's inner folder after the file, so the random temp name made every save of the same
    object different bytes, and a checkpoint's sha256 (which bags record for their encoder) changed on every
    rewrite, marking unchanged bags stale. It serialises into memory first: torch reports a failed write as a
    RuntimeError, while a plain write of the bytes gives the OSError that becomes a DiskFullError."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_path(final, validate) as tmp, open(tmp, "wb") as f:
        f.write(buffer.getbuffer())
