"""Crash-safe writes: temp file in the same folder, close, validate, fsync, rename.

"Done" means "validates": a reader that finds the final path can trust it, because the rename is
the last step and happens only after the content was re-read and checked.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

TMP_SUFFIX = ".tmp"
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


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, validate: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `final`; on success validate it, fsync and rename it over `final`.

    The caller writes and *closes* the temporary file inside the `with` block. `validate(path)` raises
    when the content is wrong; then the temporary file is removed and `final` is left untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=TMP_SUFFIX, dir=final.parent)
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
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_text(final: str | os.PathLike, text: str, validate: Callable[[Path], None] | None = None) -> None:
    with atomic_path(final, validate) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_bytes(final: str | os.PathLike, data: bytes) -> None:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


def leftover_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Temporary files that a killed writer left behind (safe to delete: nothing counts them as done)."""
    return sorted(Path(folder).glob(f".*{TMP_SUFFIX}"))


def atomic_torch_save(obj, final: str | os.PathLike, validate: Callable[[Path], None] | None = None) -> None:
    """``torch.save`` through ``atomic_path``. It writes to an open file, not to the temporary path: given a path,
    torch names the archive's inner folder after the file, so the random temp name made every save of the same
    object different bytes, and a checkpoint's sha256 (which bags record for their encoder) changed on every
    rewrite, marking unchanged bags stale."""
    import torch

    with atomic_path(final, validate) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
