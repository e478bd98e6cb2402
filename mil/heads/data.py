"""Bags in memory for head training: records, per-epoch cell subsampling, padded collate with a mask,
and a length-bucketed batch sampler.

Randomness here never touches the global RNG: the cells drawn from a bag and the order of batches
depend only on (seed, epoch, bag), so a run resumed from a checkpoint sees the same data as an
uninterrupted one, and every DDP rank agrees on the batches before taking its share. The epoch is
read when data is fetched (``epoch_source``, e.g. the trainer's current epoch) rather than pushed by
a hook, because a resumed run skips some epoch-start hooks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from einops import rearrange
from torch.utils.data import Dataset, Sampler

from mil.errors import InputError


@dataclass
class BagRecord:
    """One patient's bag: cell features (N, D) float32, the diagnosis index and optional patient
    covariates (K,) such as age; when one record has covariates, every record of the run must."""

    patient_id: str
    features: np.ndarray
    target: int
    covariates: np.ndarray | None = None


def covariate_width(records: list[BagRecord], *, role: str) -> int:
    """K when every record carries K finite covariates, 0 when none does; anything else is an InputError."""
    widths = {None if r.covariates is None else np.asarray(r.covariates).reshape(-1).shape[0] for r in records}
    if not widths or widths == {None}:
        return 0
    problems = [f"{role} patient {r.patient_id}: no covariates" for r in records if r.covariates is None]
    if len(widths - {None}) > 1:
        problems.append(f"{role} records mix covariate counts {sorted(w for w in widths if w is not None)}")
    problems += [
        f"{role} patient {r.patient_id}: covariates hold NaN or inf (fill or drop the missing value)"
        for r in records
        if r.covariates is not None and not np.isfinite(np.asarray(r.covariates, dtype=np.float64)).all()
    ]
    if problems:
        raise InputError(f"{len(problems)} covariate problem(s):\n" + "\n".join(f"  - {p}" for p in problems))
    return next(iter(widths))


def check_records(records: list[BagRecord], *, num_classes: int, role: str) -> int:
    """Refuse empty bags, NaN features, mixed widths and out-of-range targets; return the feature width."""
    problems, widths = [], set()
    for r in records:
        f = np.asarray(r.features)
        if f.ndim != 2 or f.shape[0] == 0:
            problems.append(f"{role} patient {r.patient_id}: bag has shape {f.shape}, expected (N>0, D)")
            continue
        widths.add(f.shape[1])
        if not np.isfinite(f).all():
            problems.append(f"{role} patient {r.patient_id}: features hold NaN or inf; re-extract the bag")
        if not 0 <= int(r.target) < num_classes:
            problems.append(f"{role} patient {r.patient_id}: target {r.target} outside 0..{num_classes - 1}")
    if len(widths) > 1:
        problems.append(f"{role} bags mix feature widths {sorted(widths)}; use bags of one encoder")
    if problems:
        raise InputError(f"{len(problems)} problem(s) in the {role} bags:\n" + "\n".join(f"  - {p}" for p in problems))
    if not widths:
        raise InputError(f"no {role} bags given")
    return widths.pop()


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]))


class BagDataset(Dataset):
    """Items are (features (n, D) float tensor, target, index); in training, a bag over ``max_cells``
    cells is cut to a random subset, drawn anew each epoch (``set_epoch``) and kept in cell order."""

    def __init__(
        self,
        records: list[BagRecord],
        *,
        max_cells: int | None = None,
        seed: int = 0,
        epoch_source: Callable[[], int] | None = None,
    ) -> None:
        self.records = records
        self.epoch_source = epoch_source
        self.features = [torch.from_numpy(np.ascontiguousarray(r.features, dtype=np.float32)) for r in records]
        self.targets = [int(r.target) for r in records]
        self.covariates = [
            None if r.covariates is None else torch.as_tensor(np.asarray(r.covariates, dtype=np.float32).reshape(-1))
            for r in records
        ]
        self.max_cells = max_cells
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def lengths(self) -> list[int]:
        n = [len(f) for f in self.features]
        return [min(k, self.max_cells) for k in n] if self.max_cells else n

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int, torch.Tensor | None]:
        features = self.features[index]
        if self.max_cells and len(features) > self.max_cells:
            epoch = self.epoch_source() if self.epoch_source else self.epoch
            keep = np.sort(_rng(self.seed, epoch, index).choice(len(features), self.max_cells, replace=False))
            features = features[torch.from_numpy(keep)]
        return features, self.targets[index], index, self.covariates[index]


def pad_collate(items: list[tuple]) -> dict[str, torch.Tensor]:
    """Stack (features, target, index[, covariates]) items into x (B, N_max, D) zero-padded, mask (B, N_max)
    True = real cell, target (B,), index (B,), and covariates (B, K) when the items carry them."""
    longest = max(len(item[0]) for item in items)
    dim = items[0][0].shape[1]
    x = torch.zeros(len(items), longest, dim, dtype=items[0][0].dtype)
    mask = torch.zeros(len(items), longest, dtype=torch.bool)
    for row, item in enumerate(items):
        x[row, : len(item[0])] = item[0]
        mask[row, : len(item[0])] = True
    return {"x": x, "mask": mask, **_bag_facts(items)}


def _bag_facts(items: list[tuple]) -> dict[str, torch.Tensor]:
    """Per-bag entries shared by both collates: target (B,), index (B,), covariates (B, K) when items carry them."""
    facts = {
        "target": torch.tensor([item[1] for item in items], dtype=torch.long),
        "index": torch.tensor([item[2] for item in items], dtype=torch.long),
    }
    if len(items[0]) > 3 and items[0][3] is not None:
        facts["covariates"] = torch.stack([item[3] for item in items])  # (B, K)
    return facts


def packed_collate(items: list[tuple]) -> dict[str, torch.Tensor]:
    """The batch of ``pad_collate`` without the padded copy: cells (R, D) are the R real cells, bag by bag in
    cell order (the order of ``mask.nonzero()``), at positions (bag (R,), cell (R,)) of the padded batch
    described by mask (B, N_max); plus target (B,), index (B,) and covariates (B, K) when the items carry them.
    Heads take it through ``MilHead.forward_packed``; a packed head never builds (B, N_max, D) at all."""
    lengths = torch.tensor([len(item[0]) for item in items], dtype=torch.long)  # (B,)
    mask = torch.arange(int(lengths.max())) < rearrange(lengths, "b -> b 1")  # (B, N_max)
    bag, cell = mask.nonzero(as_tuple=True)  # (R,), (R,)
    return {
        "cells": torch.cat([item[0] for item in items]),  # (R, D)
        "bag": bag,
        "cell": cell,
        "mask": mask,
        **_bag_facts(items),
    }


def length_batches(
    records: list[BagRecord], *, max_cells: int, collate: Callable[[list[tuple]], dict] = pad_collate
) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """(record indices, collated batch) over all bags sorted by length, each batch holding at most ``max_cells``
    padded cells (and at least one bag): for evaluation, where a few large batches beat many small ones."""
    data = BagDataset(records)
    lengths = data.lengths()
    batch: list[int] = []
    for index in np.argsort(lengths, kind="stable").tolist():
        if batch and lengths[index] * (len(batch) + 1) > max_cells:  # sorted: this bag is the longest so far
            yield batch, collate([data[i] for i in batch])
            batch = []
        batch.append(index)
    if batch:
        yield batch, collate([data[i] for i in batch])


class LengthBucketSampler(Sampler[list[int]]):
    """Batches of bags of similar length, so big bags are not padded against small ones.

    Training: shuffle, cut into pools of ``pool_batches`` batches, sort each pool by length, cut into
    batches, shuffle the batch order. Evaluation (``shuffle=False``): sorted by length. With several
    DDP ranks every rank builds the same batch list and takes every ``num_replicas``-th batch; the list is
    padded by repeating its first batches so every rank runs the same number of steps.
    """

    def __init__(
        self,
        lengths: list[int],
        *,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        pool_batches: int = 8,
        num_replicas: int = 1,
        rank: int = 0,
        epoch_source: Callable[[], int] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.pool_batches = pool_batches
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.epoch_source = epoch_source

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _all_batches(self, epoch: int) -> list[list[int]]:
        order = np.arange(len(self.lengths))
        lengths = np.asarray(self.lengths)
        if not self.shuffle:
            order = order[np.argsort(lengths, kind="stable")]
            return [order[i : i + self.batch_size].tolist() for i in range(0, len(order), self.batch_size)]
        rng = _rng(self.seed, epoch, 7919)
        order = rng.permutation(order)
        pool = self.batch_size * self.pool_batches
        batches = []
        for start in range(0, len(order), pool):
            chunk = order[start : start + pool]
            chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
            batches += [chunk[i : i + self.batch_size].tolist() for i in range(0, len(chunk), self.batch_size)]
        return [batches[i] for i in rng.permutation(len(batches))]

    def __iter__(self):
        # A generator: the epoch is read at the first fetch, after the trainer has moved to the new epoch.
        batches = self._all_batches(self.epoch_source() if self.epoch_source else self.epoch)
        if self.num_replicas > 1:
            short = -len(batches) % self.num_replicas
            batches = batches + batches[:short]
            batches = batches[self.rank :: self.num_replicas]
        yield from batches

    def __len__(self) -> int:
        total = len(self._all_batches(0))  # the count does not depend on the epoch
        return -(-total // self.num_replicas)
