"""Benchmark of `mil extract`: end-to-end cells/s against the bare encoder forward, and bag read speed.

    .venv/bin/python experiments/bench_extract.py [--encoder resnet18.random] [--input-size 96] [--device cpu]

End to end = `run_extract` on a fresh folder: cell-table read, PNG/JPEG decode (once per field), crop,
transform, forward, HDF5 write with validate + fsync + rename. Model construction and process start are
excluded (once per run, not per cell). The bare forward runs the same encoder on random tensors of exactly
the batch shapes extraction used, in the same process, interleaved with the extraction runs so that load
from other processes on a shared machine hits both alike. One more run per repeat normalises every field's
colours first (`--stain-norm reinhard`, one of the cohort's fields as reference) to show that option's cost.
Reads: `read_bag` (validates, reads every array) and plain h5py `features` against np.load of the same
arrays saved as .npy, and `read_bag_features` (what training reads) with and without the check of its
recorded xxh3 digest (`--skip-extract` runs only the reads).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def make_fields(root: Path, *, patients: int, cells: int, per_field: int, side: int, fmt: str, seed: int) -> Path:
    """Fields with dark blobs as cells and a cell table written by the production writer."""
    from PIL import Image

    from mil.cell_table import CellTable

    rng = np.random.default_rng(seed)
    (root / "fields").mkdir(parents=True, exist_ok=True)
    rows = []
    grid = int(np.ceil(np.sqrt(per_field)))
    step = side // grid
    for p in range(patients):
        pid = f"B{p:03d}"
        for f in range((cells + per_field - 1) // per_field):
            field = rng.integers(170, 235, size=(side, side, 3), dtype=np.uint8)
            path = root / "fields" / f"{pid}_{f}.{fmt}"
            for k in range(min(per_field, cells - f * per_field)):
                w = int(rng.integers(step // 2, step - 2))
                x0 = (k % grid) * step + int(rng.integers(0, step - w))
                y0 = (k // grid) * step + int(rng.integers(0, step - w))
                field[y0 : y0 + w, x0 : x0 + w] = rng.integers(60, 160, size=3, dtype=np.uint8)
                rows.append(
                    {
                        "cell_id": f"{pid}-{f}-{k}",
                        "patient_id": pid,
                        "image_path": str(path),
                        "x0": x0,
                        "y0": y0,
                        "x1": x0 + w,
                        "y1": y0 + w,
                        "label": "",
                        "source": "bench",
                    }
                )
            Image.fromarray(field).save(path, quality=90) if fmt == "jpg" else Image.fromarray(field).save(path)
    return CellTable(rows=rows).write(root / "cells.csv")


def batch_sizes(cells_per_patient: list[int], batch: int) -> list[int]:
    """The batch shapes extraction runs: each patient's cells in chunks of `batch` (batches never span patients)."""
    return [min(batch, n - s) for n in cells_per_patient for s in range(0, n, batch)]


def bare_forward(encoder, shapes: list[int], side: int, device: str) -> float:
    """Seconds for the encoder alone on random inputs of the given batch sizes (inputs made beforehand)."""
    import torch

    from features.extract import _Embedder

    embed = _Embedder(encoder, device)
    inputs = [torch.randn(n, 3, side, side) for n in shapes]
    start = time.perf_counter()
    for x in inputs:
        embed(x)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench_extract(args, work: Path) -> list[tuple[str, str]]:
    import torch

    from features.extract import ExtractConfig, run_extract
    from features.registry import create_encoder
    from mil.cell_table import read_cell_table

    cells = make_fields(
        work / "cohort",
        patients=args.patients,
        cells=args.cells,
        per_field=args.per_field,
        side=args.field_side,
        fmt=args.format,
        seed=0,
    )
    encoder = create_encoder(args.encoder, input_size=args.input_size)
    groups = read_cell_table(cells).by_patient()
    shapes = batch_sizes([len(r) for r in groups.values()], args.batch_size)
    n_cells = sum(shapes)
    bare_forward(encoder, shapes[:2], args.input_size, args.device)  # warm-up: lazy kernel selection
    # Warm-up extraction: the first run imports PIL plugins and h5py once per process, not per cell.
    small = make_fields(work / "warm", patients=1, cells=4, per_field=4, side=128, fmt=args.format, seed=1)
    warm = ExtractConfig(cells=small, encoder=args.encoder, out=work / "warm" / "bags", input_size=args.input_size)
    warm.workers, warm.device, warm.progress = args.workers, args.device, False
    run_extract(warm, log=lambda m: None, encoder=encoder)
    import torchstain.numpy.normalizers  # noqa: F401  (imported once here, not inside the first normalised run)

    bare, ours, bare_cpu, ours_cpu, normed, normed_cpu = [], [], [], [], [], []
    reference = sorted((work / "cohort" / "fields").iterdir())[0]  # one of the cohort's own fields
    for rep in range(args.repeats):
        cpu0 = cpu_seconds()
        bare.append(n_cells / bare_forward(encoder, shapes, args.input_size, args.device))
        bare_cpu.append(n_cells / (cpu_seconds() - cpu0))
        out = work / f"bags{rep}"
        config = ExtractConfig(
            cells=cells,
            encoder=args.encoder,
            out=out,
            input_size=args.input_size,
            batch_size=args.batch_size,
            workers=args.workers,
            device=args.device,
            dtype=args.dtype,
            progress=False,
        )
        cpu0, start = cpu_seconds(), time.perf_counter()
        report = run_extract(config, log=lambda m: None, encoder=encoder)
        seconds = time.perf_counter() - start
        ours_cpu.append(n_cells / (cpu_seconds() - cpu0))
        assert report.cells_embedded == n_cells and not report.failed
        ours.append(n_cells / seconds)
        if not args.skip_stain_norm:  # the same run with every field Reinhard-normalised before cropping
            config.out, config.stain_norm, config.stain_reference = work / f"normed{rep}", "reinhard", reference
            cpu0, start = cpu_seconds(), time.perf_counter()
            report = run_extract(config, log=lambda m: None, encoder=encoder)
            assert report.cells_embedded == n_cells and not report.failed
            normed.append(n_cells / (time.perf_counter() - start))
            normed_cpu.append(n_cells / (cpu_seconds() - cpu0))
        stain = f", with --stain-norm {normed[-1]:.0f} cells/s" if normed else ""
        print(
            f"  repeat {rep}: bare {bare[-1]:.0f} cells/s, end to end {ours[-1]:.0f} cells/s{stain} "
            f"(ratio {ours[-1] / bare[-1]:.2f}; per CPU-second {bare_cpu[-1]:.0f} vs {ours_cpu[-1]:.0f})",
            flush=True,
        )
    b, o = statistics.median(bare), statistics.median(ours)
    paired = statistics.median(x / y for x, y in zip(ours, bare))
    cpu_ratio = statistics.median(ours_cpu) / statistics.median(bare_cpu)
    workers = args.workers if args.workers is not None else "auto"
    what = f"{args.encoder} {args.input_size}px {args.device}, {args.format} fields, {n_cells} cells"
    what += f", batch {args.batch_size}"
    rows = [
        (f"bare encoder forward ({what})", f"{b:,.0f} cells/s"),
        (f"mil extract end to end (workers {workers}, threads {torch.get_num_threads()})", f"{o:,.0f} cells/s"),
        (f"end to end / bare forward, ratio of medians of {args.repeats}", f"{o / b:.2f}"),
        (f"end to end / bare forward, median of the {args.repeats} interleaved pairs", f"{paired:.2f}"),
        ("end to end / bare forward, cells per CPU-second of this process (robust to other load)", f"{cpu_ratio:.2f}"),
    ]
    if normed:
        n = statistics.median(normed)
        rows.append(
            (
                f"mil extract end to end with --stain-norm reinhard ({args.field_side}px fields, "
                f"{args.per_field} cells each)",
                f"{n:,.0f} cells/s ({n / o:.2f} of without; per CPU-second "
                f"{statistics.median(normed_cpu) / statistics.median(ours_cpu):.2f})",
            )
        )
    return rows


def _burn(stop) -> None:
    """A CPU-bound busy loop until `stop` is set: the other job of a shared machine."""
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x += 1


def bench_threads(args, work: Path) -> list[tuple[str, str]]:
    """`mil extract` cells/s with the default thread choice (mil.threads auto), 1 thread and every core, on the
    idle machine and beside `--burn` CPU-bound processes; the settings alternate inside each repeat."""
    import multiprocessing as mp

    import torch

    from features.extract import ExtractConfig, run_extract
    from features.registry import create_encoder
    from mil import threads

    cells = make_fields(
        work / "tcohort",
        patients=args.patients,
        cells=args.cells,
        per_field=args.per_field,
        side=args.field_side,
        fmt=args.format,
        seed=2,
    )
    encoder = create_encoder(args.encoder, input_size=args.input_size)
    cores = threads.available_cores()
    rows = []
    for burners in sorted({0, args.burn}):
        stop = mp.Event()
        procs = [mp.Process(target=_burn, args=(stop,), daemon=True) for _ in range(burners)]
        for p in procs:
            p.start()
        time.sleep(1.0 if burners else 0.0)  # let the burners take their cores before auto looks
        try:
            auto = threads.resolve(None) if not os.environ.get("MIL_THREADS") else threads.resolve()
            settings = {f"default (auto: {auto})": auto, "1 thread": 1, f"all cores ({cores})": cores}
            rates: dict[str, list[float]] = {name: [] for name in settings}
            for rep in range(args.repeats):
                for name, n in settings.items():
                    torch.set_num_threads(n)
                    out = work / f"t{burners}_{rep}_{n}_{len(rates[name])}"
                    config = ExtractConfig(
                        cells=cells,
                        encoder=args.encoder,
                        out=out,
                        input_size=args.input_size,
                        batch_size=args.batch_size,
                        workers=0,
                        device="cpu",
                        progress=False,
                    )
                    start = time.perf_counter()
                    report = run_extract(config, log=lambda m: None, encoder=encoder)
                    rates[name].append(report.cells_embedded / (time.perf_counter() - start))
                    shutil.rmtree(out, ignore_errors=True)
        finally:
            stop.set()
            for p in procs:
                p.join()
        base = statistics.median(rates["1 thread"])
        load = f"load average {os.getloadavg()[0]:.1f}"
        where = (
            f"no added load ({load})"
            if not burners
            else f"+{burners} CPU-bound process{'es' if burners > 1 else ''} ({load})"
        )
        for name, values in rates.items():
            m = statistics.median(values)
            rows.append((f"threads, {where}: {name}", f"{m:,.0f} cells/s ({m / base:.2f} of 1 thread)"))
    return rows


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (DataLoader workers), user + system."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def bench_read(args, work: Path) -> list[tuple[str, str]]:
    import h5py

    from features.bags import ARRAY_NAMES, Bag, array_digest, read_bag, read_bag_features, write_bag

    rng = np.random.default_rng(1)
    folder = work / "read"
    names = [f"R{i:03d}" for i in range(args.read_bags)]
    for pid in names:
        n = args.read_cells
        bag = Bag(
            patient_id=pid,
            features=rng.normal(size=(n, args.read_dim)).astype(np.float32),
            boxes=rng.integers(0, 500, size=(n, 4)).astype(np.int32),
            image_index=np.zeros(n, dtype=np.int32),
            image_paths=["field.png"],
            cell_id=[f"{pid}-{i}" for i in range(n)],
            label=np.full(n, -1, dtype=np.int64),
            attrs={"encoder_config": {"name": "bench", "embed_dim": args.read_dim}},
        )
        write_bag(folder / f"{pid}.h5", bag)
        for key in ("features", "boxes", "image_index", "label"):
            np.save(folder / f"{pid}.{key}.npy", getattr(bag, key))

    def timed(fn, passes: int = 3) -> float:
        rates = []
        for _ in range(passes):
            start = time.perf_counter()
            for pid in names:
                fn(pid)
            rates.append(len(names) / (time.perf_counter() - start))
        return statistics.median(rates)

    def h5_features(pid: str) -> np.ndarray:
        with h5py.File(folder / f"{pid}.h5", "r") as f:
            return f["features"][()]

    full = timed(lambda pid: read_bag(folder / f"{pid}.h5"))
    plain = timed(h5_features)
    npy_all = timed(
        lambda pid: [np.load(folder / f"{pid}.{k}.npy") for k in ("features", "boxes", "image_index", "label")]
    )
    npy_feat = timed(lambda pid: np.load(folder / f"{pid}.features.npy"))
    # Interleaved passes, so that load from other processes hits both alike; median of 7 each. CPU seconds of this
    # process are what other processes' load disturbs least.
    with_digest, without, cpu = [], [], {True: [], False: []}
    for _ in range(7):
        for verify, rates in ((True, with_digest), (False, without)):
            cpu0 = time.process_time()
            rates.append(timed(lambda pid, v=verify: read_bag_features(folder / f"{pid}.h5", verify_digest=v), 1))
            cpu[verify].append(time.process_time() - cpu0)
    checked, unchecked = statistics.median(with_digest), statistics.median(without)
    ratios = [a / b for a, b in zip(with_digest, without)]
    cpu_ratio = statistics.median(cpu[False]) / statistics.median(cpu[True])
    bag = read_bag(folder / f"{names[0]}.h5")
    arrays = [getattr(bag, name) for name in ARRAY_NAMES if getattr(bag, name) is not None]
    start = time.perf_counter()
    for _ in range(20):
        for values in arrays:
            array_digest(values)
    all_digests_ms = (time.perf_counter() - start) / 20 * 1e3
    what = f"{args.read_bags} bags of {args.read_cells} x {args.read_dim} float32, warm page cache"
    return [
        (f"read_bag_features, digest checked (what training reads; {what})", f"{checked:,.0f} bags/s"),
        ("read_bag_features without the digest check", f"{unchecked:,.0f} bags/s"),
        (
            "digest check: rate with / without (median of 7 interleaved passes; per-pass range)",
            f"{checked / unchecked:.3f} ({min(ratios):.3f}-{max(ratios):.3f})",
        ),
        ("digest check: bags per CPU-second with / without (median of 7)", f"{cpu_ratio:.3f}"),
        (f"xxh3 digests of all {len(arrays)} arrays of one bag (read_bag, verify)", f"{all_digests_ms:.2f} ms"),
        (f"read_bag, validated, all arrays ({what})", f"{full:,.0f} bags/s"),
        ("np.load of the same 4 arrays from .npy", f"{npy_all:,.0f} bags/s"),
        ("h5py `features` only", f"{plain:,.0f} bags/s"),
        ("np.load `features` only", f"{npy_feat:,.0f} bags/s"),
    ]


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu}, {cores} cores available{gpu}, torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", default="resnet18.random")
    parser.add_argument("--input-size", type=int, default=96)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--patients", type=int, default=6)
    parser.add_argument("--cells", type=int, default=100, help="cells per patient")
    parser.add_argument("--per-field", type=int, default=25, help="cells per field image")
    parser.add_argument("--field-side", type=int, default=512)
    parser.add_argument("--format", default="png", choices=("png", "jpg"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--read-bags", type=int, default=20)
    parser.add_argument("--read-cells", type=int, default=2000)
    parser.add_argument("--read-dim", type=int, default=512)
    parser.add_argument("--skip-read", action="store_true")
    parser.add_argument("--skip-stain-norm", action="store_true", help="leave out the --stain-norm reinhard runs")
    parser.add_argument("--skip-extract", action="store_true", help="only the bag reads")
    parser.add_argument("--threads-sweep", action="store_true", help="only the thread rows: auto vs 1 vs all cores")
    parser.add_argument("--burn", type=int, default=1, help="CPU-bound processes beside the loaded thread rows")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temp folder)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_extract_", dir=args.workdir))
    try:
        if args.threads_sweep:
            rows = bench_threads(args, work)
            args.skip_read = True
        else:
            rows = [] if args.skip_extract else bench_extract(args, work)
        if not args.skip_read:
            rows += bench_read(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nMachine: {machine()}\n")
    print("| measurement | result |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
