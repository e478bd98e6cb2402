"""The cache rule of `mil run`: one record per finished stage in OUT/pipeline/<stage>.json.

A record holds the stage's digest (its section, the seed and the digests of the stages it reads), what the stage
measured (figures), the paths it handed on (artifacts) and the size and mtime of the files it wrote. A stage is
*cached* when its record has this run's digest and every recorded file is still there unchanged: it is then not
run at all. Otherwise it runs, and the code it calls resumes as the separate commands do (finished classifier and
detector runs are reused, valid bags are kept, finished head runs are reused), so a stage killed midway or changed
redoes only what changed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from mil.atomic import atomic_write_text

RECORD_DIR = "pipeline"
RECORD_VERSION = 1


def digest(payload: dict) -> str:
    return hashlib.sha256(
        json.dumps({"v": RECORD_VERSION, **payload}, sort_keys=True, default=str).encode()
    ).hexdigest()


def input_fingerprint(path: str | Path, limit: int = 200_000) -> list:
    """Names, sizes and mtimes of the files under `path` (or of the one file): a changed input reruns the stage."""
    path = Path(path)
    if path.is_file():
        st = path.stat()
        return [[path.name, st.st_size, st.st_mtime_ns]]
    found = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            p = Path(root) / name
            try:
                st = p.stat()
            except OSError:
                continue
            found.append([str(p.relative_to(path)), st.st_size, st.st_mtime_ns])
            if len(found) >= limit:
                return found
    return found


def _stat(path: Path) -> list[int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


class Records:
    def __init__(self, out: Path) -> None:
        self.folder = out / RECORD_DIR

    def path(self, stage: str) -> Path:
        return self.folder / f"{stage}.json"

    def load(self, stage: str) -> dict | None:
        try:
            return json.loads(self.path(stage).read_text())
        except (OSError, ValueError):
            return None

    def cached(self, stage: str, stage_digest: str) -> dict | None:
        """The record when the stage can be reused as it is, else None."""
        record = self.load(stage)
        if not record or record.get("digest") != stage_digest:
            return None
        for name, stat in record.get("files", {}).items():
            if _stat(Path(name)) != stat:
                return None
        return record

    def write(self, stage: str, stage_digest: str, *, figures: dict, artifacts: dict, files: list[Path]) -> None:
        record = {
            "digest": stage_digest,
            "figures": figures,
            "artifacts": {k: (str(v) if isinstance(v, Path) else v) for k, v in artifacts.items()},
            "files": {str(f): _stat(Path(f)) for f in files if Path(f).exists()},
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path(stage), json.dumps(record, indent=2, sort_keys=True) + "\n")

    def forget(self, stage: str) -> None:
        self.path(stage).unlink(missing_ok=True)
