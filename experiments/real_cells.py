"""Detector and classifier on real cells (BCCD, PBC sample) and on the synthetic cohort; prints and saves figures.

    .venv/bin/python experiments/real_cells.py --parts bccd pbc synth --out results/real_cells

- bccd: Faster R-CNN (EfficientNet-Lite0 ImageNet backbone + FPN) trained on BCCD's ImageSets/Main/train.txt
  images, AP@0.5 per class (RBC, WBC, Platelets) and COCO mAP on test.txt; the classical nucleus-threshold
  detector scored against the WBC boxes (it finds nucleated cells, and WBCs are BCCD's nucleated cells).
- pbc: 8-class classifier on ../shared/data/pbc-sample. The sample has no donor ids: every image is one cell of an
  unknown donor, so the split is by image (stratified), which is the only patient-free split it allows.
- synth: `mil synth` cohort; detector AP@0.5 and classifier macro-F1 / macro AUROC on held-out patients.

Sized for a shared 2-core CPU (--budget quick): images are downscaled, backbones are light; --budget full uses
more epochs and full resolution (GPU). Results go to OUT/<part>/results.json; docs/real_data.md records them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data"

BUDGETS = {
    # pixel_scale, epochs of the BCCD detector; epochs, crop of the PBC classifier; synth sizes.
    "quick": {"bccd_scale": 0.3, "bccd_epochs": 2, "pbc_epochs": 12, "pbc_crop": 128, "synth_patients": 30,
              "synth_det_epochs": 3, "synth_clf_epochs": 6, "synth_crop": 48},
    "full": {"bccd_scale": 1.0, "bccd_epochs": 24, "pbc_epochs": 30, "pbc_crop": 224, "synth_patients": 60,
             "synth_det_epochs": 20, "synth_clf_epochs": 30, "synth_crop": 96},
}  # fmt: skip


def _save(out: Path, results: dict) -> None:
    from mil.atomic import atomic_write_text

    atomic_write_text(out / "results.json", json.dumps(results, indent=2, default=str) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k != "details"}, indent=2, default=str), flush=True)


def run_bccd(out: Path, budget: dict, device: str, seed: int) -> dict:
    from mil.cell_table import CellTable
    from mil.detector.classical import ClassicalConfig
    from mil.detector.evaluate import evaluate_table
    from mil.detector.model import DetectorConfig
    from mil.detector.predict import CellDetector, detect_images
    from mil.detector.train import DetectorTrainConfig, train_detector
    from mil.readers.registry import read_dataset

    root = DATA / "bccd" / "BCCD"
    # Chosen on the first 60 images of train.txt (WBC AP@0.5 0.862 there; defaults 0.133): BCCD's WBCs are large
    # cells with lobed nuclei, so no watershed split, a large minimum area, and a cell box 1.5x the nucleus box.
    BCCD_CLASSICAL = ClassicalConfig(split_touching=False, min_area=600, expand=1.5, sigma=2.0)  # noqa: N806
    cells, _ = read_dataset("voc", root)  # patient_id = image stem (BCCD has no patient ids)
    lists = {name: (root / "ImageSets" / "Main" / f"{name}.txt").read_text().split() for name in ("train", "test")}
    classes = ("Platelets", "RBC", "WBC")
    config = DetectorConfig(
        backbone="efficientnet_lite0_fpn", init="imagenet", classes=classes, pixel_scale=budget["bccd_scale"]
    )
    tc = DetectorTrainConfig(
        epochs=budget["bccd_epochs"], batch_size=4, lr=5e-4, warmup_steps=10, seed=seed, device=device, verbose=True
    )
    start = time.perf_counter()
    result = train_detector(cells, out_dir=out / "detector", config=config, train_config=tc, patients=lists["train"])
    train_s = time.perf_counter() - start
    test = set(lists["test"])
    truth = CellTable(rows=[r for r in cells.rows if r["patient_id"] in test])
    images = sorted({(r["image_path"], r["patient_id"]) for r in truth.rows})
    start = time.perf_counter()
    detector = CellDetector.load(result.checkpoint, tile_size=1024, overlap=128, device=device)
    predicted = detect_images(images, detector=detector)
    trained = evaluate_table(predicted, truth, classes)
    detect_s = time.perf_counter() - start
    start = time.perf_counter()
    wbc_truth = CellTable(rows=[r for r in truth.rows if r["label"] == "WBC"])
    classical = evaluate_table(detect_images(images, classical=BCCD_CLASSICAL), wbc_truth)
    classical_default = evaluate_table(detect_images(images), wbc_truth)
    classical_s = time.perf_counter() - start
    results = {
        "dataset": "BCCD (VOC), train.txt -> test.txt",
        "train_images": len(set(lists["train"]) & set(cells.patients())),
        "test_images": len(images),
        "detector": {"backbone": config.backbone, "init": config.init, "pixel_scale": config.pixel_scale,
                     "epochs": tc.epochs, "train_seconds": round(train_s), "detect_seconds": round(detect_s)},
        "ap50_per_class": trained["ap50_per_class"],
        "map_50": trained["map_50"],
        "map_coco": trained["map"],
        "classical_wbc_ap50": classical["map_50"],
        "classical_wbc_map_coco": classical["map"],
        "classical_seconds": round(classical_s),
        "classical_config": str(BCCD_CLASSICAL),
        "classical_default_config_wbc_ap50": classical_default["map_50"],
        "loss_first_last_epoch": [result.history["epoch_loss"][0], result.history["epoch_loss"][-1]],
    }  # fmt: skip
    _save(out, results)
    return results


def run_pbc(out: Path, budget: dict, device: str, seed: int) -> dict:
    from mil.classifier.train import ClassifierConfig, train_classifier
    from mil.readers.registry import read_dataset

    cells, _ = read_dataset("imagefolder", DATA / "pbc-sample")  # patient_id = image: no donor ids exist
    config = ClassifierConfig(
        arch="tf_efficientnet_lite0",
        init="imagenet",
        crop_size=budget["pbc_crop"],
        max_epochs=budget["pbc_epochs"],
        batch_size=32,
        lr=1e-3,
        val_fraction=0.15,
        test_fraction=0.25,
        seed=seed,
        accelerator="gpu" if device == "cuda" else "cpu",
        verbose=True,
    )
    start = time.perf_counter()
    result = train_classifier(cells, out_dir=out / "classifier", config=config)
    m = result.metrics
    results = {
        "dataset": "PBC sample (800 crops, 8 classes); split by image: the sample has no donor ids",
        "split_sizes": {k: len(v) for k, v in result.split.items()},
        "classifier": {"arch": config.arch, "init": config.init, "crop": config.crop_size, "epochs": config.max_epochs,
                       "train_seconds": round(time.perf_counter() - start)},
        "test_macro_f1": m["macro_f1"],
        "test_macro_auroc": m["macro_auroc"],
        "test_balanced_accuracy": m["balanced_accuracy"],
        "per_class_recall": {k: v["recall"] for k, v in m["per_class"].items()},
        "confusion_png": str(out / "classifier" / "confusion_test.png"),
    }  # fmt: skip
    _save(out, results)
    return results


def run_synth(out: Path, budget: dict, device: str, seed: int) -> dict:
    from mil.cell_table import CellTable
    from mil.classifier.data import patient_split
    from mil.classifier.train import ClassifierConfig, train_classifier
    from mil.detector.evaluate import evaluate_table
    from mil.detector.model import DetectorConfig
    from mil.detector.predict import CellDetector, detect_images
    from mil.detector.train import DetectorTrainConfig, train_detector
    from mil.readers.registry import read_dataset
    from mil.synth.config import load_synth_config
    from mil.synth.writer import write_cohort

    cohort = out / "cohort"
    if not (cohort / "cells.csv").exists():
        write_cohort(load_synth_config().replace(patients=budget["synth_patients"]), cohort, seed=seed, progress=False)
    cells, patients = read_dataset("zenodo", cohort)
    split = patient_split(cells.rows, val_fraction=0.15, test_fraction=0.2, seed=seed)
    # Only a few erythrocytes per field carry a box: the detector learns the nucleated cells, the reference
    # study's detection target, and is scored on them.
    nucleated = CellTable(rows=[r for r in cells.rows if r["label"] not in ("erythrocyte", "drop")])
    config = DetectorConfig(backbone="efficientnet_lite0_fpn", init="imagenet", pixel_scale=0.75, smallest_anchor=12)
    tc = DetectorTrainConfig(
        epochs=budget["synth_det_epochs"],
        batch_size=4,
        lr=5e-4,
        warmup_steps=20,
        seed=seed,
        device=device,
        verbose=True,
    )
    start = time.perf_counter()
    if (out / "detector" / "detector.pt").exists() and (out / "detector" / "history.json").exists():
        det_checkpoint = out / "detector" / "detector.pt"  # a finished detector of an earlier run: reuse it
        det_train_s = None
    else:
        det = train_detector(nucleated, out_dir=out / "detector", config=config, train_config=tc,
                             patients=split["train"] + split["val"])  # fmt: skip
        det_checkpoint, det_train_s = det.checkpoint, round(time.perf_counter() - start)
    det_history = json.loads((out / "detector" / "history.json").read_text())
    held_out = CellTable(rows=[r for r in nucleated.rows if r["patient_id"] in set(split["test"])])
    images = sorted({(r["image_path"], r["patient_id"]) for r in held_out.rows})
    detector = CellDetector.load(det_checkpoint, tile_size=1024, overlap=128, device=device)
    det_metrics = evaluate_table(detect_images(images, detector=detector), held_out)
    classical_metrics = evaluate_table(detect_images(images), held_out)

    clf_config = ClassifierConfig(
        arch="tf_efficientnet_lite0", init="imagenet", crop_size=budget["synth_crop"],
        max_epochs=budget["synth_clf_epochs"], batch_size=64, lr=2e-3, seed=seed,
        accelerator="gpu" if device == "cuda" else "cpu",
        verbose=True,
    )  # fmt: skip
    start = time.perf_counter()
    clf = train_classifier(cells, out_dir=out / "classifier", config=clf_config, split=split)
    m = clf.metrics
    results = {
        "dataset": f"mil synth, {len(patients)} patients, seed {seed}; held-out patients {split['test']}",
        "detector": {"backbone": config.backbone, "pixel_scale": config.pixel_scale, "epochs": tc.epochs,
                     "train_seconds": det_train_s,
                     "loss_per_epoch": det_history["history"]["epoch_loss"]},
        "detector_ap50_held_out": det_metrics["map_50"],
        "detector_map_coco_held_out": det_metrics["map"],
        "classical_ap50_held_out": classical_metrics["map_50"],
        "classifier": {"arch": clf_config.arch, "crop": clf_config.crop_size, "epochs": clf_config.max_epochs,
                       "classes": len(clf.class_names), "train_seconds": round(time.perf_counter() - start)},
        "classifier_macro_f1_held_out": m["macro_f1"],
        "classifier_macro_auroc_held_out": m["macro_auroc"],
        "classifier_balanced_accuracy_held_out": m["balanced_accuracy"],
        "classifier_test_cells": m["n_cells"],
        "auroc_classes_left_out": m["auroc_classes_left_out"],
    }  # fmt: skip
    _save(out, results)
    return results


PARTS = {"bccd": run_bccd, "pbc": run_pbc, "synth": run_synth}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    parser.add_argument("--out", default="results/real_cells")
    parser.add_argument("--budget", choices=list(BUDGETS), default="quick")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    # One thread: on a shared, oversubscribed machine two OpenMP threads per process ran 5-10x slower, not faster.
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default)")
    args = parser.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    for part in args.parts:
        if part in ("bccd", "pbc") and not (DATA / ("bccd" if part == "bccd" else "pbc-sample")).exists():
            print(f"skip {part}: {DATA} lacks its data (it is never copied into the repository)")
            continue
        out = Path(args.out) / part
        out.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        print(f"== {part} ({args.budget}) ==", flush=True)
        PARTS[part](out, BUDGETS[args.budget], args.device, args.seed)
        print(f"== {part} done in {time.perf_counter() - start:.0f} s ==", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
