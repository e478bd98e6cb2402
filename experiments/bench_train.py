"""Benchmark of attention-MIL training: our ABMIL loop (mil.heads.train.fit_predict) against torchmil's
ABMIL trained by torchmil's own Trainer and fed by torchmil's own ProcessedMILDataset, on the same bags.

    .venv/bin/python experiments/bench_train.py [--patients 120] [--holdout 400] [--epochs 12] [--repeats 5]
                                                [--threads 1] [--lr X] [--ours 512:32-true,...]

Bags: a synthetic binary cohort (torchmil's ABMIL is binary), D=384 features per cell (DinoBloom-S
width), 50-400 cells per patient, written once by the production writer features.bags.write_bag; the
positive class has 4-10% "cue" cells shifted along one direction. torchmil reads the same
.h5 files (its ProcessedMILDataset with file_ext=".h5"; labels live in a second folder of .h5 files).
Same architecture (gated attention, hidden 128, attention 128, dropout 0.25 after the projection),
same optimiser (AdamW with one lr for both, by default TrainConfig's, wd 1e-2), same batch size, same
number of epochs (no early stop), and both keep the epoch with the best validation AUROC. Two throughputs
(train bags x epochs / seconds): "train steps" times only the training part of each epoch in both loops
(from HeadModule.on_train_epoch_start to the start of its on_train_epoch_end, where our validation,
logging and checkpoints run; torchmil's Trainer._shared_loop in train mode); "end-to-end" times the same
work on both sides: ours from reading the bags (read_bag_features, which validates each) through fit_predict
(training, per-epoch validation, checkpoints, restoring the best epoch, predicting the validation and test
bags), torchmil from building the model through Trainer.train (its lazy bag reads, training, per-epoch
validation), get_best_model and predicting the validation and test bags through its dataset and collate_fn.
The runs are interleaved (ours, torchmil, ours, ...) so load from other processes hits both alike; medians
of the repeats (one seed each) are reported, with the median of the per-repeat ratios.

Quality: AUROC of every final model on the validation (20) and test (20) patients, and on --holdout extra
patients of the same generator, scored after the clock stops (ours by re-opening the finished run, which
fit_predict reuses without training). 20 patients resolve AUROC to 0.01 steps with a spread of ~0.05
between seeds; the holdout difference (ours - torchmil, mean over repeats) comes with a 95% paired
bootstrap interval over its patients.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

DIM, HIDDEN = 384, 128
TRAIN_SECONDS = [0.0]  # time inside training epochs (steps: data, forward, backward, optimiser), both loops


def instrument_loops() -> None:
    """Time the training part of each epoch, excluding validation, checkpoints and setup, in both loops."""
    from torchmil.utils.trainer import Trainer

    from mil.heads.module import HeadModule

    epoch_start = [0.0]

    def started(self) -> None:
        epoch_start[0] = time.perf_counter()

    epoch_end = HeadModule.on_train_epoch_end

    def ended(self) -> None:  # our validation, logging and checkpoints run from here on
        TRAIN_SECONDS[0] += time.perf_counter() - epoch_start[0]
        epoch_end(self)

    HeadModule.on_train_epoch_start = started
    HeadModule.on_train_epoch_end = ended
    shared_loop = Trainer._shared_loop

    def timed_loop(self, dataloader, epoch=0, mode="train"):
        begin = time.perf_counter()
        metrics = shared_loop(self, dataloader, epoch=epoch, mode=mode)
        if mode == "train":
            TRAIN_SECONDS[0] += time.perf_counter() - begin
        return metrics

    Trainer._shared_loop = timed_loop


def write_cohort(root: Path, *, patients: int, seed: int) -> tuple[list[str], dict[str, int]]:
    """Bags via write_bag, plus torchmil's label files; returns patient ids and their labels."""
    import h5py

    from features.bags import Bag, write_bag

    rng = np.random.default_rng(seed)
    direction = rng.normal(size=DIM).astype(np.float32)
    direction /= np.linalg.norm(direction)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    ids, labels = [], {}
    for p in range(patients):
        pid, target = f"P{p:04d}", p % 2
        n = int(rng.integers(50, 401))
        features = rng.normal(size=(n, DIM)).astype(np.float32)
        if target:
            cue = rng.choice(n, size=max(2, int(n * rng.uniform(0.04, 0.10))), replace=False)
            features[cue] += 3.0 * direction
        bag = Bag(
            patient_id=pid,
            features=features,
            boxes=np.tile(np.array([0, 0, 8, 8], dtype=np.int32), (n, 1)),
            image_index=np.zeros(n, dtype=np.int32),
            image_paths=[f"fields/{pid}.png"],
            cell_id=[f"{pid}-{i}" for i in range(n)],
            label=np.full(n, -1, dtype=np.int64),
            attrs={"encoder": "bench.synthetic", "encoder_config": {"name": "bench.synthetic", "embed_dim": DIM}},
        )
        write_bag(root / "bags" / f"{pid}.h5", bag, dtype="float32")
        with h5py.File(root / "labels" / f"{pid}.h5", "w") as f:
            f.create_dataset("labels", data=np.float32(target))
        ids.append(pid)
        labels[pid] = target
    return ids, labels


def run_ours(
    root: Path,
    split: dict,
    labels: dict,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    log_dir: Path,
    max_cells: int,
    precision: str,
    lr: float,
):
    from features.bags import read_bag_features
    from mil.heads.data import BagRecord
    from mil.heads.train import TrainConfig, fit_predict

    def records(ids):
        return [BagRecord(pid, read_bag_features(root / "bags" / f"{pid}.h5"), labels[pid]) for pid in ids]

    TRAIN_SECONDS[0] = 0.0
    start = time.perf_counter()
    timed = {role: records(split[role]) for role in ("train", "val", "test")}
    config = TrainConfig(
        max_epochs=epochs,
        patience=epochs,
        batch_size=batch_size,
        hidden_dim=HIDDEN,
        seed=seed,
        monitor="val_auroc",
        max_cells_train=max_cells,
        precision=precision,
        lr=lr,
    )

    def run(test):
        return fit_predict(
            "abmil", train=timed["train"], val=timed["val"], test=test, num_classes=2, config=config, log_dir=log_dir
        )

    result = run(timed["val"] + timed["test"])
    seconds = time.perf_counter() - start
    probs = result.probs[:, 1]
    n_val = len(split["val"])
    scores = {"val": probs[:n_val], "test": probs[n_val:]}
    # Not timed: the finished run in log_dir is reused (no training) to score the large holdout cohort.
    scores["holdout"] = run(records(split["holdout"])).probs[:, 1]
    return seconds, TRAIN_SECONDS[0], len(result.history["epochs"]), scores


def run_torchmil(root: Path, split: dict, *, epochs: int, batch_size: int, seed: int, lr: float):
    import h5py
    import torch
    import torchmetrics
    from torch.utils.data import DataLoader
    from torchmil.data import collate_fn
    from torchmil.datasets import ProcessedMILDataset
    from torchmil.models import ABMIL
    from torchmil.utils.trainer import Trainer

    def read_file(path: str, key: str) -> np.ndarray:
        # torchmil's default reader slices with [:], which a scalar label dataset does not allow.
        with h5py.File(path, "r") as f:
            return np.asarray(f[key][()])

    def dataset(ids):
        return ProcessedMILDataset(
            features_path=str(root / "bags"),
            labels_path=str(root / "labels"),
            bag_names=ids,
            bag_keys=["X", "Y"],
            file_ext=".h5",
            read_file_fn=read_file,
            verbose=False,
        )

    torch.manual_seed(seed)
    TRAIN_SECONDS[0] = 0.0
    start = time.perf_counter()
    feat_ext = torch.nn.Sequential(torch.nn.Linear(DIM, HIDDEN), torch.nn.ReLU(), torch.nn.Dropout(0.25))
    model = ABMIL(in_shape=(DIM,), att_dim=HIDDEN, gated=True, feat_ext=feat_ext)
    train = DataLoader(dataset(split["train"]), batch_size=batch_size, shuffle=True, collate_fn=collate_fn)
    val = DataLoader(dataset(split["val"]), batch_size=batch_size, shuffle=False, collate_fn=collate_fn)
    trainer = Trainer(
        model,
        torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2),
        metrics_dict={"auroc": torchmetrics.AUROC(task="binary")},
        obj_metric="auroc",
        obj_metric_mode="max",
        device="cpu",
        disable_pbar=True,
        verbose=False,
    )
    trainer.train(max_epochs=epochs, train_dataloader=train, val_dataloader=val)
    best = trainer.get_best_model().eval()

    def predict(ids):  # torchmil's own path: its dataset, padded batches of its collate_fn, the model's mask
        data = dataset(ids)  # its items come in sorted bag-name order
        loader = DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)
        with torch.no_grad():
            scores = np.concatenate([torch.sigmoid(best(b["X"], b["mask"])).reshape(-1).numpy() for b in loader])
        by_name = dict(zip(data.bag_names, scores, strict=True))
        return np.array([by_name[i] for i in ids])

    scores = {"val": predict(split["val"]), "test": predict(split["test"])}  # the same work as fit_predict's test
    seconds = time.perf_counter() - start
    scores["holdout"] = predict(split["holdout"])  # not timed
    return seconds, TRAIN_SECONDS[0], scores


def auroc(scores: np.ndarray, ids: list[str], labels: dict) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score([labels[i] for i in ids], scores))


def paired_auroc_difference(ours: list, theirs: list, positive: np.ndarray, *, seed: int) -> tuple:
    """Mean over repeats of AUROC(ours) - AUROC(theirs) on the holdout patients, with the protocol's 95% paired
    bootstrap (mil.protocol.bootstrap): each replicate resamples patients once and scores every repeat of both."""
    from mil.protocol.bootstrap import paired_bootstrap

    def as_probs(repeats):  # (repeats, patients, 2) from each repeat's positive-class scores
        scores = np.stack(repeats)
        return np.stack([1 - scores, scores], axis=-1)

    result = paired_bootstrap(positive.astype(np.int64), as_probs(ours), as_probs(theirs), metric="auroc", seed=seed)
    return result.diff, result.lo, result.hi


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=120, help="timed cohort: 4/6 train, 1/6 val, 1/6 test")
    parser.add_argument("--holdout", type=int, default=400, help="extra patients scored (untimed) by every model")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads for both loops")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=None, help="AdamW lr of both loops (default: TrainConfig's)")
    parser.add_argument(
        "--ours",
        default="512:32-true,512:bf16-mixed,128:32-true",
        help="comma-separated max_cells_train:precision variants of our loop (512:32-true is the TrainConfig default)",
    )
    args = parser.parse_args()

    import torch

    os.environ.setdefault("WANDB_MODE", "disabled")
    torch.set_num_threads(args.threads)
    instrument_loops()
    from mil.heads.train import TrainConfig

    lr = args.lr if args.lr is not None else TrainConfig().lr
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        root = Path(tmp)
        ids, labels = write_cohort(root, patients=args.patients + args.holdout, seed=args.seed)
        rng = np.random.default_rng(args.seed + 1)
        order = list(rng.permutation(ids[: args.patients]))
        n_val = n_test = args.patients // 6
        split = {
            "val": order[:n_val],
            "test": order[n_val : n_val + n_test],
            "train": order[n_val + n_test :],
            "holdout": ids[args.patients :],
        }
        n_train = len(split["train"])
        variants = [(int(c), p) for c, p in (v.split(":") for v in args.ours.split(","))]
        rows: dict[str, list] = {**{f"ours, max_cells_train={c}, {p}": [] for c, p in variants}, "torchmil": []}
        holdout: dict[str, list] = {name: [] for name in rows}  # holdout scores per repeat

        def record(name, epochs_ran, total, train_s, scores):
            rows[name].append(
                (
                    n_train * epochs_ran / train_s,
                    n_train * epochs_ran / total,
                    *(auroc(scores[role], split[role], labels) for role in ("val", "test", "holdout")),
                )
            )
            holdout[name].append(scores["holdout"])

        for rep in range(args.repeats):
            for cap, precision in variants:
                total, train_s, ran, scores = run_ours(
                    root,
                    split,
                    labels,
                    epochs=args.epochs,
                    batch_size=args.batch_size,
                    seed=args.seed + rep,
                    log_dir=root / f"ours{rep}-{cap}-{precision}",
                    max_cells=cap,
                    precision=precision,
                    lr=lr,
                )
                record(f"ours, max_cells_train={cap}, {precision}", ran, total, train_s, scores)
            total, train_s, scores = run_torchmil(
                root, split, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed + rep, lr=lr
            )
            record("torchmil", args.epochs, total, train_s, scores)
            print(
                f"repeat {rep + 1}: "
                + ", ".join(f"{k} {v[-1][0]:.1f} / {v[-1][1]:.1f} bags/s" for k, v in rows.items()),
                flush=True,
            )

    cpu = platform.processor() or platform.machine()
    print(f"\nmachine: {cpu}, {os.cpu_count()} cores, torch threads {args.threads}, load avg {os.getloadavg()}")
    print(
        f"cohort: {args.patients} patients ({n_train} train / {n_val} val / {n_test} test) + {args.holdout} holdout "
        f"(untimed), D={DIM}, 50-400 cells, hidden {HIDDEN}, batch {args.batch_size}, {args.epochs} epochs, "
        f"lr {lr:g}, {args.repeats} repeats"
    )
    reference = rows["torchmil"]

    def median(values, k):
        return statistics.median(v[k] for v in values)

    def paired(values, k):
        # Each repeat runs ours and torchmil back to back: the ratio within a repeat sees the same load.
        return statistics.median(v[k] / r[k] for v, r in zip(values, reference, strict=True))

    print(
        "\n| loop | training bags/s (train steps) | vs torchmil (medians; per-repeat) | end-to-end bags/s "
        "| vs torchmil (medians; per-repeat) | val AUROC | test AUROC | holdout AUROC (mean ± sd) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, values in rows.items():
        print(
            f"| {name} | {median(values, 0):.1f} ({', '.join(f'{v[0]:.0f}' for v in values)}) "
            f"| {median(values, 0) / median(reference, 0):.2f}x; {paired(values, 0):.2f}x "
            f"| {median(values, 1):.1f} ({', '.join(f'{v[1]:.0f}' for v in values)}) "
            f"| {median(values, 1) / median(reference, 1):.2f}x; {paired(values, 1):.2f}x "
            f"| {median(values, 2):.3f} | {median(values, 3):.3f} "
            f"| {np.mean([v[4] for v in values]):.3f} ± {np.std([v[4] for v in values]):.3f} |"
        )
    positive = np.array([labels[i] == 1 for i in split["holdout"]])
    print(
        f"\nholdout AUROC, ours - torchmil (mean over repeats, 95% paired bootstrap over the {args.holdout} patients):"
    )
    for name in rows:
        if name != "torchmil":
            mean, low, high = paired_auroc_difference(holdout[name], holdout["torchmil"], positive, seed=args.seed)
            print(f"  {name}: {mean:+.3f} [{low:+.3f}, {high:+.3f}]")


if __name__ == "__main__":
    main()
