"""`mil extract`: embed every cell of a cell table into one crash-safe HDF5 bag per patient.

Resumable by construction: a patient is skipped only when its bag validates and records the same
cell-table fingerprint, encoder config, preprocessing, label classes and dtype as this run; anything
else (missing, truncated, stale) is recomputed. Batches never span patients, so a patient's bag does
not depend on which other patients were done in this run (resume and shards give identical arrays).

One run per folder (RELIABILITY.md promise 8, mil.locks): a second `mil extract` into a folder that a live
run fills is refused naming it (pid, host, start). Shards hold the folder together, each its own share; a
shard with other settings (encoder config, preprocessing, dtype, labels, shard count) is refused while
others run. Temporary files are removed only when their writer is gone.

Scale out: `--shard I/N` takes every N-th patient of the sorted list, so N processes fill one folder
together, each writing only its own patients' bags (and its own run report):

    sbatch --array=0-7 --wrap 'mil extract --cells cells.csv --encoder dinobloom_s.v1 --weights ds.pth \
        --out bags/dinobloom_s --device cuda --shard auto'            # SLURM array: shard = task id
    torchrun --nproc-per-node 4 -m mil.cli extract ... --device cuda --shard auto   # cuda:LOCAL_RANK each
    for i in 0 1 2 3; do CUDA_VISIBLE_DEVICES=$i mil extract ... --device cuda --shard $i/4 & done; wait
    mil verify bags/dinobloom_s
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from features.bag_directory import check_encoder_width, write_manifest
from features.bags import (
    Bag,
    bag_path,
    canonical_json,
    config_dict,
    read_bag_header,
    validate_bag,
    write_bag,
)
from features.cropping import FieldCrops, ImageJob, keep_item, worker_init
from features.integrity import NOT_A_BAG
from mil import threads
from mil.atomic import atomic_write_text
from mil.cell_table import CellTable, read_cell_table, unsafe_patient_id_reason
from mil.errors import ConfigError, InputError, listing
from mil.labels import DEFAULT_LABEL_MAP, DROP, identity_label_map, load_label_map
from mil.locks import OutputLock, output_lock
from mil.progress import Progress


@dataclass
class ExtractConfig:
    cells: Path
    encoder: str
    out: Path
    weights: str | None = None
    input_size: int | None = None
    batch_size: int = 64
    workers: int | None = None  # None: chosen from the device and the CPU count
    shard: tuple[int, int] = (0, 1)
    device: str = "cpu"
    dtype: str = "float32"
    context: float = 0.0  # box margin, as a fraction of the box size on each side
    label_map: Path | None = None
    progress: bool | None = None  # False: silent; else mil.progress (a bar on a terminal, plain lines in a log)
    stain_norm: str | None = None  # None: off; "reinhard": each field matched to stain_reference (features/stain.py)
    stain_reference: Path | None = None
    verbose: bool = False  # one line per bag written (new ones too), for a log that records every patient


@dataclass
class ExtractReport:
    done: list[str] = field(default_factory=list)
    up_to_date: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    skipped_cells: dict[str, list[dict]] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)  # why a patient was (re)computed
    cells_embedded: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def parse_shard(text: str, env: dict[str, str] | None = None) -> tuple[int, int]:
    """'I/N' -> (I, N) with 0 <= I < N; 'auto' reads torchrun's RANK/WORLD_SIZE or a SLURM array's task id."""
    if text == "auto":
        env = dict(os.environ if env is None else env)
        if "WORLD_SIZE" in env and "RANK" in env:
            text = f"{env['RANK']}/{env['WORLD_SIZE']}"
        elif "SLURM_ARRAY_TASK_COUNT" in env and "SLURM_ARRAY_TASK_ID" in env:
            first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
            text = f"{int(env['SLURM_ARRAY_TASK_ID']) - first}/{env['SLURM_ARRAY_TASK_COUNT']}"
        else:
            return 0, 1
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError as e:
        raise ConfigError(f"--shard {text!r} must be I/N, e.g. 0/4 for the first of four shards") from e
    if count < 1 or not 0 <= index < count:
        raise ConfigError(f"--shard {text!r}: need 0 <= I < N (shards are numbered from 0)")
    return index, count


def resolve_device(device: str, env: dict[str, str] | None = None) -> str:
    """'cuda' under torchrun means this process's own GPU (LOCAL_RANK); anything else is kept."""
    env = os.environ if env is None else env
    if device == "cuda" and "LOCAL_RANK" in env:
        return f"cuda:{int(env['LOCAL_RANK'])}"
    return device


def shard_patients(patients: list[str], index: int, count: int) -> list[str]:
    """Every count-th patient of the sorted list: disjoint, covering, deterministic, balanced."""
    return [p for i, p in enumerate(sorted(patients)) if i % count == index]


def label_classes(
    table: CellTable, label_map_path: Path | None, log: Callable[[str], None] | None = None
) -> tuple[list[str], dict[str, int]]:
    """Class list and label -> index, from the label map when it knows every label, else the table's own labels
    (said in one line with every label and its count, never silently).

    Computed on the whole table (before sharding) so every shard stores the same class list.
    """
    counts = Counter(r["label"] for r in table.rows if r["label"] and r["label"] != DROP)
    labels = sorted(counts)
    label_map = load_label_map(label_map_path)
    unknown = [lab for lab in labels if label_map.lookup(lab) is None]
    if unknown and label_map_path is not None:
        raise InputError(
            f"cell table {table.path} has labels that label map {label_map_path} does not know: {unknown}; "
            "add them to the map or leave --label-map out to keep the table's own labels"
        )
    if unknown:
        label_map = identity_label_map(labels, name="cell-table")
        found = ", ".join(f"{lab} {n}" for lab, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
        default = f"{DEFAULT_LABEL_MAP.parent.name}/{DEFAULT_LABEL_MAP.name}"
        (log or print)(
            f"note: {len(unknown)} of the {len(labels)} cell labels of {table.path} are not in label map {default} "
            f"(e.g. {unknown[0]!r}), so the bags keep the table's own {len(labels)} classes (label cells): {found}; "
            "pass --label-map FILE to map them to a map's classes"
        )
    index = {}
    for lab in labels:
        cls = label_map.lookup(lab)
        index[lab] = -1 if cls in (None, DROP) else label_map.index(cls)
    return list(label_map.classes), index


def choose_workers(device: str) -> int:
    """On a small CPU box the encoder needs every core, so crops are made in the main process."""
    cpus = threads.available_cores()  # the process's share (affinity), not the machine's total
    if device.startswith("cuda"):
        return max(1, min(16, cpus - 1))
    return 0 if cpus <= 4 else min(4, cpus // 4)


def bag_status(path: Path, *, expect: dict) -> str | None:
    """None when the bag at `path` is valid (digests included: an edited bag is recomputed) and matches `expect`;
    otherwise why it must be computed. A file there that is not a bag at all gives NOT_A_BAG first."""
    if not path.exists():
        return "missing"
    problems = validate_bag(path)
    if problems and problems[0].kind == "stranger":
        return f"{NOT_A_BAG}: {problems[0]}"
    if problems and problems[0].kind == "old":
        return "stale (written by an older version of cytomil, without content digests)"
    if problems:
        return f"invalid ({problems[0]})"
    header = read_bag_header(path)
    for key, want in expect.items():
        got = header.get("features_dtype" if key == "dtype" else key)
        if canonical_json(got) != canonical_json(want):
            return f"stale ({key} changed)"
    return None


def _report_name(shard: tuple[int, int]) -> str:
    index, count = shard
    return "extract_report.json" if count == 1 else f"extract_report.shard-{index}-of-{count}.json"


def _remove_temp_files(lock: OutputLock, patients: list[str], shard: tuple[int, int]) -> list[Path]:
    """Temp files whose writer is gone (mil.locks): any whose recorded writer no longer runs on this host; without
    a live writer's record, all when no other shard runs, else this shard's own patients' and report's."""
    own = (*(f".{p}.h5." for p in patients), f".{_report_name(shard)}.")
    return lock.remove_orphaned_temp_files(own=lambda tmp: tmp.name.startswith(own))


def _settings_fingerprint(enc_config: dict, preprocess: dict, classes: list[str], config: ExtractConfig) -> str:
    """What decides the bags of a folder: shards running together must agree on it."""
    settings = {"encoder_config": enc_config, "preprocess": preprocess, "label_classes": classes}
    settings.update(dtype=config.dtype, shards=config.shard[1])
    return hashlib.sha256(canonical_json(settings).encode()).hexdigest()[:16]


def _image_jobs(patient_index: int, rows: list[dict]) -> tuple[list[str], list[ImageJob]]:
    """Group a patient's cells by field image (first-seen order) so each image is decoded once."""
    by_image: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_image.setdefault(str(r["image_path"]), []).append(i)
    paths = list(by_image)
    jobs = [
        ImageJob(
            patient_index=patient_index,
            image_index=k,
            image_path=p,
            rows=tuple(by_image[p]),
            boxes=CellTable.boxes([rows[i] for i in by_image[p]]),
        )
        for k, p in enumerate(paths)
    ]
    return paths, jobs


class _Embedder:
    """Runs the encoder on one batch: inference mode; on CUDA bf16 autocast and channels_last."""

    def __init__(self, encoder, device: str) -> None:
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.encoder = encoder.to(self.device)
        if self.cuda:
            self.encoder = self.encoder.to(memory_format=torch.channels_last)
        self.with_probs = int(getattr(encoder, "num_classes", 0) or 0) > 0

    def __call__(self, x) -> tuple[np.ndarray, np.ndarray | None]:
        torch = self.torch
        with torch.inference_mode():
            x = x.to(self.device, non_blocking=True)
            if self.cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else contextlib.nullcontext()
            with autocast:
                if self.with_probs and hasattr(self.encoder, "embed_with_probs"):
                    feats, probs = self.encoder.embed_with_probs(x)  # (B, D), (B, C) from one backbone pass
                else:
                    feats = self.encoder(x)  # (B, D)
                    probs = self.encoder.cell_probs(x) if self.with_probs else None  # (B, C)
            feats = feats.float().cpu().numpy()
            probs = probs.float().cpu().numpy() if probs is not None else None
        return feats, probs


@dataclass
class _PatientWork:
    patient_id: str
    rows: list[dict]
    image_paths: list[str]
    images_left: int
    pending: list = field(default_factory=list)  # crop tensors not yet embedded
    pending_rows: list[np.ndarray] = field(default_factory=list)
    feats: list[np.ndarray] = field(default_factory=list)
    probs: list[np.ndarray] = field(default_factory=list)
    done_rows: list[np.ndarray] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)


def run_extract(config: ExtractConfig, *, log: Callable[[str], None] | None = None, encoder=None) -> ExtractReport:
    """Extract the bags of this shard's patients into config.out; returns what was done, kept and failed."""
    with contextlib.ExitStack() as held:  # the folder's lock, taken once the encoder config is known
        return _run_extract(config, log=log, encoder=encoder, held=held)


def _run_extract(config: ExtractConfig, *, log, encoder, held: contextlib.ExitStack) -> ExtractReport:
    import torch
    from torch.utils.data import DataLoader

    from features.preprocess import crop_transform
    from features.registry import create_encoder, resolve_entry

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    start = time.perf_counter()
    report = ExtractReport()
    if config.dtype not in ("float16", "float32"):
        raise ConfigError(f"--dtype {config.dtype!r}: choose float16 or float32")
    if config.batch_size < 1:
        raise ConfigError(f"--batch-size {config.batch_size} must be at least 1")
    if config.context < 0:
        raise ConfigError(f"--context {config.context} must be >= 0 (a fraction of the box size)")
    stain_norm = _stain_norm(config, log)  # before anything is written: a missing reference is refused first
    table = read_cell_table(config.cells)
    groups = table.by_patient()
    bad_ids = [f"patient id {p!r} {r}" for p in groups if (r := unsafe_patient_id_reason(p))]
    if bad_ids:
        raise InputError(f"cell table {config.cells} has unusable patient ids:\n{listing(bad_ids)}\nRename them.")
    classes, label_index = label_classes(table, config.label_map, log)
    patients = shard_patients(list(groups), *config.shard)

    # Width checked against the folder before any compute: from the registry entry when it declares one
    # (no weights loaded), and again from the built encoder's config before any crop is made.
    out = Path(config.out)
    if encoder is None:
        declared = resolve_entry(config.encoder)[0].embed_dim
        if declared is not None:
            check_encoder_width(out, {"name": config.encoder, "embed_dim": declared})
        encoder = create_encoder(config.encoder, weights=config.weights, input_size=config.input_size)
    enc_config = config_dict(encoder.config)
    check_encoder_width(out, enc_config)
    preprocess: dict = {"context": config.context}
    if stain_norm is not None:  # absent when off: bags made before the option existed stay up to date
        preprocess["stain_norm"] = stain_norm.record()
    part = f"shard {config.shard[0]}/{config.shard[1]}" if config.shard[1] > 1 else None
    settings = _settings_fingerprint(enc_config, preprocess, classes, config)
    lock = held.enter_context(output_lock(out, command="mil extract", part=part, settings=settings, log=log))
    removed = _remove_temp_files(lock, patients, config.shard)
    if removed:
        log(f"removed {len(removed)} temporary file(s) left by an interrupted run")
    write_manifest(out, encoder_config=enc_config, preprocess=preprocess)

    work: list[_PatientWork] = []
    jobs: list[ImageJob] = []
    for pid in patients:
        rows = groups[pid]
        expect = {
            "cell_table_fingerprint": CellTable.fingerprint(rows),
            "encoder_config": enc_config,
            "preprocess": preprocess,
            "label_classes": classes,
            "dtype": config.dtype,
        }
        reason = bag_status(bag_path(out, pid), expect=expect)
        if reason is None:
            report.up_to_date.append(pid)
            continue
        if reason.startswith(NOT_A_BAG):  # someone else's file under this patient's name: never overwrite it
            report.failed[pid] = f"{bag_path(out, pid)} is {NOT_A_BAG}; move it out of {out} and run again"
            log(f"FAILED {report.failed[pid]}")
            continue
        report.reasons[pid] = reason
        paths, patient_jobs = _image_jobs(len(work), rows)
        work.append(_PatientWork(patient_id=pid, rows=rows, image_paths=paths, images_left=len(patient_jobs)))
        jobs.extend(patient_jobs)
    why = Counter("new" if r == "missing" else r for r in report.reasons.values())
    todo = f"{len(work)} to compute" + (f" ({', '.join(f'{n} {r}' for r, n in why.items())})" if why else "")
    log(
        f"extract {config.encoder} -> {out}: {len(patients)} patient(s)"
        + (f" in shard {config.shard[0]}/{config.shard[1]}" if config.shard[1] > 1 else "")
        + f", {len(report.up_to_date)} up to date, {todo}"
    )

    embed = _Embedder(encoder, resolve_device(config.device))
    workers = config.workers if config.workers is not None else choose_workers(config.device)
    out_dtype = torch.bfloat16 if embed.cuda else torch.float32  # autocast casts to bf16 anyway; halves IPC
    dataset = FieldCrops(
        jobs=jobs,
        transform=crop_transform(encoder.config),
        context=config.context,
        out_dtype=out_dtype,
        stain_norm=stain_norm,
    )
    loader = DataLoader(
        dataset,
        batch_size=None,
        collate_fn=keep_item,
        num_workers=workers,
        worker_init_fn=worker_init if workers else None,
        pin_memory=embed.cuda,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )
    total = sum(len(w.rows) for w in work)
    # A bar on a terminal, a plain "extract: 1200/5160 cells, 84.1 cells/s, ETA 47 s" line every 10 s in a log.
    bar = Progress(total, "extract", "cells", enabled=config.progress is not False)
    bags_done = [0]

    def run_batches(w: _PatientWork, flush: bool) -> None:
        n_pending = sum(len(r) for r in w.pending_rows)
        if n_pending == 0 or (n_pending < config.batch_size and not flush):
            return
        crops = torch.cat(w.pending)  # (n_pending, 3, S, S)
        rows = np.concatenate(w.pending_rows)
        step = config.batch_size
        stop = n_pending if flush else n_pending - n_pending % step
        for s in range(0, stop, step):
            feats, probs = embed(crops[s : s + step])
            w.feats.append(feats)
            w.done_rows.append(rows[s : s + step])
            if probs is not None:
                w.probs.append(probs)
            bar.update(len(feats))
            report.cells_embedded += len(feats)
        w.pending = [crops[stop:]] if stop < n_pending else []
        w.pending_rows = [rows[stop:]] if stop < n_pending else []

    def finish(w: _PatientWork) -> None:
        run_batches(w, flush=True)
        if w.skipped:
            report.skipped_cells[w.patient_id] = w.skipped
        if not w.done_rows:
            report.failed[w.patient_id] = (
                f"empty patient {w.patient_id!r}: all {len(w.rows)} cell(s) were skipped "
                f"(first reason: {w.skipped[0]['reason']}); fix its images or remove it from the cell table"
            )
            log(f"FAILED {report.failed[w.patient_id]}")
            return
        idx = np.concatenate(w.done_rows)
        rows = [w.rows[i] for i in idx]
        path_index = {p: k for k, p in enumerate(w.image_paths)}
        bag = Bag(
            patient_id=w.patient_id,
            features=np.concatenate(w.feats),
            boxes=CellTable.boxes(rows),
            image_index=np.array([path_index[str(r["image_path"])] for r in rows], dtype=np.int32),
            image_paths=w.image_paths,
            cell_id=[str(r["cell_id"]) for r in rows],
            label=np.array([label_index.get(r["label"], -1) for r in rows], dtype=np.int64),
            cell_probs=np.concatenate(w.probs) if w.probs else None,
            attrs={
                "encoder": config.encoder,
                "encoder_config": enc_config,
                "preprocess": preprocess,
                "cell_table_fingerprint": CellTable.fingerprint(w.rows),
                "label_classes": classes,
                "skipped": w.skipped,
            },
        )
        try:
            write_bag(bag_path(out, w.patient_id), bag, dtype=config.dtype)
        except InputError as e:  # NaN or overflow: this patient fails, the others go on
            report.failed[w.patient_id] = str(e)
            log(f"FAILED {e}")
            return
        report.done.append(w.patient_id)
        bags_done[0] += 1
        bar.update(0, postfix=f"{bags_done[0]}/{len(work)} bags")
        note = f", {len(w.skipped)} cell(s) skipped" if w.skipped else ""
        if config.verbose or report.reasons[w.patient_id] != "missing" or note:  # else the progress line counts it
            why = "new bag" if report.reasons[w.patient_id] == "missing" else f"was {report.reasons[w.patient_id]}"
            log(f"bag {w.patient_id} written: {len(idx)} cells ({why}{note})")

    for item in loader:
        job = jobs[item["job"]]
        w = work[job.patient_index]
        for row, reason in item["skipped"]:
            w.skipped.append({"cell_id": str(w.rows[row]["cell_id"]), "image": job.image_path, "reason": reason})
            bar.update(1)
        if item["crops"] is not None:
            w.pending.append(item["crops"])
            w.pending_rows.append(item["rows"])
            run_batches(w, flush=False)
        w.images_left -= 1
        if w.images_left == 0:
            finish(w)
            # Free the patient's arrays: cohorts of thousands of patients must not pile up in memory.
            work[job.patient_index] = _PatientWork(w.patient_id, [], [], 0)
    bar.close()
    report.seconds = time.perf_counter() - start
    _write_report(out, config, report)
    return report


def _stain_norm(config: ExtractConfig, log: Callable[[str], None]):
    """The fitted normaliser of --stain-norm, or None when off; --stain-reference alone is an error."""
    if config.stain_norm in (None, "none"):
        if config.stain_reference is not None:
            raise ConfigError(
                f"--stain-reference {config.stain_reference} is only used with --stain-norm reinhard; add that "
                "option, or leave --stain-reference out to extract without colour normalisation"
            )
        return None
    from features.stain import fit_stain_norm

    norm = fit_stain_norm(config.stain_norm, config.stain_reference)
    log(
        f"stain normalisation {config.stain_norm}: every field image matched to {config.stain_reference} "
        f"(sha256 {norm.reference_sha256[:12]}, LAB mean {list(norm.lab_mean)}, std {list(norm.lab_std)})"
    )
    return norm


def _write_report(out: Path, config: ExtractConfig, report: ExtractReport) -> Path:
    """The run's report beside the bags; one per shard, so parallel shards never write the same file."""
    index, count = config.shard
    name = _report_name(config.shard)
    payload = {"encoder": config.encoder, "cells": str(config.cells), "shard": f"{index}/{count}", **report.to_dict()}
    if config.stain_norm not in (None, "none"):
        payload["stain_norm"] = {"method": config.stain_norm, "reference": str(config.stain_reference)}
    path = out / name
    atomic_write_text(
        path, json.dumps(payload, indent=2, default=str) + "\n", validate=lambda p: json.loads(p.read_text())
    )
    return path
