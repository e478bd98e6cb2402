"""Cell crops for extraction: decode each field image once, cut every cell box of it, transform the crops.

A `FieldCrops` item is one field image with all of its cells, so a DataLoader worker decodes the image
once however many cells it holds. A cell whose image cannot be decoded or whose box does not fit is
skipped with a reason (recorded in the bag and the run report, never silently). Images are read by
``mil.images.load_rgb``: 16-bit, float and palette fields keep their real range, other modes are refused by name.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from mil.errors import InputError
from mil.images import load_rgb


@dataclass(frozen=True)
class ImageJob:
    """The cells of one patient that lie on one field image."""

    patient_index: int  # position of the patient in the run's work list
    image_index: int  # index into that patient's image_paths
    image_path: str
    rows: tuple[int, ...]  # positions of the cells in the patient's rows
    boxes: np.ndarray  # (n, 4) int x0 y0 x1 y1


def context_box(box: np.ndarray, context: float, width: int, height: int) -> tuple[int, int, int, int]:
    """Grow a box by `context` times its size on each side (surroundings help cell typing), clipped to the image."""
    x0, y0, x1, y1 = (int(v) for v in box)
    if context > 0:
        dx, dy = round((x1 - x0) * context), round((y1 - y0) * context)
        x0, y0, x1, y1 = x0 - dx, y0 - dy, x1 + dx, y1 + dy
    return max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)


def box_problem(box: np.ndarray, width: int, height: int) -> str | None:
    x0, y0, x1, y1 = (int(v) for v in box)
    if x1 <= x0 or y1 <= y0:
        return f"box ({x0},{y0},{x1},{y1}) has zero or negative area; fix the box in the cell table"
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        return f"box ({x0},{y0},{x1},{y1}) lies outside the {width}x{height} image; clip or fix the box"
    return None


class FieldCrops(Dataset):
    """Item i: the transformed crops of every cell on field image i (one decode per image).

    Returns a dict with `job` (index into jobs), `crops` (n_ok, 3, S, S), `rows` (n_ok,) positions in the
    patient's rows of the crops, and `skipped` [(row, reason)].
    """

    def __init__(
        self,
        *,
        jobs: list[ImageJob],
        transform: Callable[[np.ndarray], torch.Tensor],
        context: float = 0.0,
        out_dtype: torch.dtype = torch.float32,
        stain_norm: Callable[..., np.ndarray] | None = None,
    ) -> None:
        self.jobs = jobs
        self.transform = transform
        self.context = context
        self.out_dtype = out_dtype
        self.stain_norm = stain_norm  # applied to the whole field before cropping (features/stain.py says why)

    def __len__(self) -> int:
        return len(self.jobs)

    def _all_skipped(self, i: int, reason: str) -> dict:
        rows = self.jobs[i].rows
        return {"job": i, "crops": None, "rows": np.zeros(0, dtype=np.int64), "skipped": [(r, reason) for r in rows]}

    def __getitem__(self, i: int) -> dict:
        job = self.jobs[i]
        skipped: list[tuple[int, str]] = []
        try:
            image = load_rgb(job.image_path)
        except Exception as e:  # PIL raises many types for a broken or missing file
            reason = f"image {job.image_path} cannot be read ({type(e).__name__}: {e}); replace the file"
            return self._all_skipped(i, reason)
        if self.stain_norm is not None:
            try:
                image = self.stain_norm(image, where=f"field image {job.image_path}")
            except InputError as e:
                return self._all_skipped(i, str(e))
        height, width = image.shape[:2]
        crops, rows = [], []
        for row, box in zip(job.rows, job.boxes):
            problem = box_problem(box, width, height)
            if problem:
                skipped.append((row, problem))
                continue
            x0, y0, x1, y1 = context_box(box, self.context, width, height)
            crops.append(self.transform(image[y0:y1, x0:x1]))  # (3, S, S)
            rows.append(row)
        stacked = torch.stack(crops).to(self.out_dtype) if crops else None  # (n_ok, 3, S, S)
        return {"job": i, "crops": stacked, "rows": np.asarray(rows, dtype=np.int64), "skipped": skipped}


def keep_item(item: dict) -> dict:
    """DataLoader collate for batch_size=None: keep the item as it is (a module-level function pickles)."""
    return item


def worker_init(_: int) -> None:
    # Workers share the CPU with the encoder: one thread each, or they oversubscribe the cores.
    torch.set_num_threads(1)
    threading.excepthook = _quiet_when_the_receiver_left(threading.excepthook)


def _quiet_when_the_receiver_left(previous):
    """A worker hands its crops to the main process through multiprocessing's file-descriptor sharer, a thread of
    the worker. When the main process stops (SIGTERM to the job) in the middle of a hand-over, that thread's
    connection breaks and it prints a traceback just before the worker dies of the same signal: noise in the log
    of a cleanly stopped run (RELIABILITY promise 9). Those errors are dropped; every other thread error is not."""

    from multiprocessing import AuthenticationError  # a hand-over cut in the middle of its handshake

    def hook(args) -> None:
        frames, tb = [], args.exc_traceback
        while tb is not None:
            frames.append(tb.tb_frame.f_code.co_filename)
            tb = tb.tb_next
        sharer = any(f.endswith(os.path.join("multiprocessing", "resource_sharer.py")) for f in frames)
        if sharer and issubclass(args.exc_type, (EOFError, OSError, AuthenticationError)):
            return
        previous(args)

    return hook
