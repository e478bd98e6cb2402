"""Shared fixtures. Tests run offline: no model hub, no wandb login."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
# One torch thread per test process (set before torch is imported; subprocesses inherit it): `-n 2` then fills the
# two cores without oversubscribing them, and the suite behaves the same on a busy machine (issue 13, item 7).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_data(name: str) -> Path:
    """A folder of ../shared/data, or skip the test cleanly when it is absent."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} is absent (real data lives in ../shared/data and is never copied into the repo)")
    return path
