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
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
# ../shared/data beside the checkout (the main checkout), else MIL_DATA or /work/shared/data (worktrees).
DATA = next(
    (p for p in (REPO.parent / "shared" / "data", Path(os.environ.get("MIL_DATA", "/work/shared/data"))) if p.exists()),
    REPO.parent / "shared" / "data",
)

BUDGETS = {
    # pixel_scale, epochs of the BCCD detector (0: the defaults of mil train-detector); the PBC classifier settings
    # run (PBC_VARIANTS); synth sizes.
    "quick": {"bccd_scale": 0.0, "bccd_epochs": 0, "pbc_variants": ["default"], "synth_patients": 30,
              "synth_det_epochs": 3, "synth_clf_epochs": 6, "synth_crop": 48},
    "full": {"bccd_scale": 1.0, "bccd_epochs": 24, "pbc_variants": ["default"], "synth_patients": 60,
             "synth_det_epochs": 20, "synth_clf_epochs": 30, "synth_crop": 96},
}  # fmt: skip


def _save(out: Path, results: dict) -> None:
    from mil.atomic import atomic_write_text

    atomic_write_text(out / "results.json", json.dumps(results, indent=2, default=str) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k != "details"}, indent=2, default=str), flush=True)


def per_class_agnostic(found, truth, classes: tuple[str, ...]) -> dict:
    """A class-agnostic detector (the classical one) scored against the boxes of each class in turn."""
    from mil.cell_table import CellTable
    from mil.detector.evaluate import evaluate_table

    scores = {}
    for name in classes:
        m = evaluate_table(found, CellTable(rows=[r for r in truth.rows if r["label"] == name]))
        scores[name] = {"ap50": round(m["map_50"], 4), "ap_coco": round(m["map"], 4)}
    return scores


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
    lists = {
        name: (root / "ImageSets" / "Main" / f"{name}.txt").read_text().split() for name in ("train", "val", "test")
    }
    classes = ("Platelets", "RBC", "WBC")
    # The defaults of `mil train-detector` (image scale and anchors from the training boxes, 12 epochs, smear
    # augmentation); --budget full only changes the device.
    config = DetectorConfig(classes=classes, pixel_scale=budget["bccd_scale"])
    tc = DetectorTrainConfig(
        seed=seed, device=device, **({"epochs": budget["bccd_epochs"]} if budget["bccd_epochs"] else {})
    )
    load_before = os.getloadavg()
    start = time.perf_counter()
    result = train_detector(cells, out_dir=out / "detector", config=config, train_config=tc, patients=lists["train"])
    train_s = time.perf_counter() - start
    load_after = os.getloadavg()
    config = result.config
    # The inference NMS overlap is chosen on val.txt (87 images neither trained on nor tested): red cells touch.
    val = CellTable(rows=[r for r in cells.rows if r["patient_id"] in set(lists["val"])])
    val_images = sorted({(r["image_path"], r["patient_id"]) for r in val.rows})
    detector = CellDetector.load(result.checkpoint, tile_size=1024, overlap=128, device=device, tta=False)
    val_map = {}
    for nms in (0.5, 0.6, 0.7):
        detector.set_nms_iou(nms)
        m = evaluate_table(detect_images(val_images, detector=detector, progress=True), val, classes)
        val_map[nms] = {"map_50": round(m["map_50"], 4), "ap50_per_class": m["ap50_per_class"]}
        print(f"val.txt, NMS IoU {nms}: {val_map[nms]}", flush=True)
    chosen = max(val_map, key=lambda k: val_map[k]["map_50"])
    detector.set_nms_iou(chosen)
    val_by_score = {}  # then the lowest score reported, on val.txt too
    for score in (0.05, 0.01, 0.001):
        detector.set_score_threshold(score)
        m = evaluate_table(detect_images(val_images, detector=detector, progress=True), val, classes)
        val_by_score[score] = {"map_50": round(m["map_50"], 4), "ap50_per_class": m["ap50_per_class"]}
        print(f"val.txt, NMS IoU {chosen}, score threshold {score}: {val_by_score[score]}", flush=True)
    chosen_score = max(val_by_score, key=lambda k: val_by_score[k]["map_50"])
    detector.set_score_threshold(chosen_score)
    val_by_tta = {False: val_by_score[chosen_score]}  # then test-time augmentation (the default of `mil detect`)
    detector.config.tta = True
    m = evaluate_table(detect_images(val_images, detector=detector, progress=True), val, classes)
    val_by_tta[True] = {"map_50": round(m["map_50"], 4), "ap50_per_class": m["ap50_per_class"]}
    print(f"val.txt, NMS IoU {chosen}, score {chosen_score}, with test-time augmentation: {val_by_tta[True]}")
    chosen_tta = max(val_by_tta, key=lambda k: val_by_tta[k]["map_50"])
    detector.config.tta = chosen_tta
    test = set(lists["test"])
    truth = CellTable(rows=[r for r in cells.rows if r["patient_id"] in test])
    images = sorted({(r["image_path"], r["patient_id"]) for r in truth.rows})
    start = time.perf_counter()
    predicted = detect_images(images, detector=detector, progress=True)
    trained = evaluate_table(predicted, truth, classes)
    detect_s = time.perf_counter() - start
    detector.config.tta = not chosen_tta  # the other setting on the test list too, reported beside (not chosen by it)
    start = time.perf_counter()
    other = evaluate_table(detect_images(images, detector=detector, progress=True), truth, classes)
    other_s = time.perf_counter() - start
    detector.config.tta = chosen_tta
    start = time.perf_counter()
    classical_found = {"tuned": detect_images(images, classical=BCCD_CLASSICAL), "default": detect_images(images)}
    classical = {name: per_class_agnostic(found, truth, classes) for name, found in classical_found.items()}
    classical_s = time.perf_counter() - start
    history = result.history
    steps = len(history["step_loss"])
    results = {
        "dataset": "BCCD (VOC), train.txt -> test.txt",
        "train_images": len(set(lists["train"]) & set(cells.patients())),
        "test_images": len(images),
        "detector": {"backbone": config.backbone, "init": config.resolved_init(), "pixel_scale": config.pixel_scale,
                     "smallest_anchor": config.smallest_anchor, "epochs": tc.epochs, "steps": steps,
                     "train_seconds": round(train_s), "steps_per_s": round(steps / sum(history["epoch_seconds"]), 3),
                     "detect_seconds": round(detect_s), "threads": __import__("torch").get_num_threads(),
                     "load_1_5_15_before": load_before, "load_1_5_15_after": load_after},
        "val_nms_choice": {"val_map_50_by_nms_iou": val_map, "chosen_nms_iou": chosen,
                           "val_map_50_by_score_threshold": val_by_score, "chosen_score_threshold": chosen_score,
                           "val_map_50_by_tta": {str(k): v for k, v in val_by_tta.items()}, "chosen_tta": chosen_tta},
        "test_with_tta_" + str(not chosen_tta).lower(): {"map_50": other["map_50"], "map_coco": other["map"],
                                                         "ap50_per_class": other["ap50_per_class"],
                                                         "detect_seconds": round(other_s)},
        "ap50_per_class": trained["ap50_per_class"],
        "ap_coco_per_class": trained["ap_per_class"],
        "map_50": trained["map_50"],
        "map_coco": trained["map"],
        "classical_per_class": classical,
        "classical_seconds": round(classical_s),
        "classical_config": str(BCCD_CLASSICAL),
        "loss_per_epoch": history["epoch_loss"],
        "epoch_seconds": history["epoch_seconds"],
    }  # fmt: skip
    _save(out, results)
    return results


# Classifier settings compared on the PBC split (chosen by validation macro-F1, never by the test part). "default" is
# `mil train-classifier` without options; the others change only what their name says.
PBC_VARIANTS = {
    "default": {},
    "before": {"augment": "light", "max_epochs": 12, "warmup_epochs": 0, "label_smoothing": 0.0, "tta": False},
    "light_aug": {"augment": "light"},
    "no_smoothing": {"label_smoothing": 0.0},
    "epochs_15": {"max_epochs": 15},
    "crop_160": {"crop_size": 160},
    "linear_probe": {"mode": "linear_probe", "lr": 1e-2},
}


def frozen_imagenet_logreg(parts: dict, targets: dict, device: str) -> dict:
    """The baseline: frozen EfficientNet-Lite0 ImageNet features (its own 224 px) + a logistic regression whose C
    is chosen on the validation part. Returns probabilities per part and the chosen C."""
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from features.registry import create_encoder
    from mil.classifier.data import load_crops

    encoder = create_encoder("efficientnet_lite0.imagenet").to(device)
    side, mean, std = encoder.config.input_size, encoder.config.mean, encoder.config.std
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    feats = {}
    with torch.no_grad():
        for name, rows in parts.items():
            crops = load_crops(rows, crop_size=side)
            out = []
            for i in range(0, len(crops), 64):
                x = torch.from_numpy(crops[i : i + 64]).permute(0, 3, 1, 2).float() / 255.0
                out.append(encoder(((x - m) / s).to(device)).cpu())
            feats[name] = torch.cat(out).numpy()
    best = None
    for c in (0.01, 0.1, 1.0, 10.0):
        model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=3000))
        model.fit(feats["train"], targets["train"])
        f1 = f1_score(targets["val"], model.predict(feats["val"]), average="macro")
        if best is None or f1 > best[0]:
            best = (f1, c, model)
    _, c, model = best
    return {"C": c, "probs": {name: model.predict_proba(f).astype(np.float32) for name, f in feats.items()}}


def paired_bootstrap_f1(y, probs_a, probs_b, n_boot: int = 2000, seed: int = 0) -> dict:
    """Macro-F1(a) - macro-F1(b) on the same crops: point, 95% percentile CI over crop resamples, share <= 0."""
    import numpy as np
    from sklearn.metrics import f1_score

    pa, pb = probs_a.argmax(1), probs_b.argmax(1)
    labels = np.unique(y)
    point = f1_score(y, pa, average="macro") - f1_score(y, pb, average="macro")
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n_boot):
        i = rng.integers(0, len(y), len(y))
        fa = f1_score(y[i], pa[i], labels=labels, average="macro", zero_division=0)
        diffs.append(fa - f1_score(y[i], pb[i], labels=labels, average="macro", zero_division=0))
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return {"diff": round(float(point), 4), "ci95": [round(float(lo), 4), round(float(hi), 4)],
            "share_le_0": round(float(np.mean(np.asarray(diffs) <= 0)), 4), "n_boot": n_boot}  # fmt: skip


def run_pbc(out: Path, budget: dict, device: str, seed: int) -> dict:
    import numpy as np

    from mil.classifier.data import labelled_rows, patient_split
    from mil.classifier.metrics import classification_metrics
    from mil.classifier.predict import load_classifier, predict_crops
    from mil.classifier.train import ClassifierConfig, train_classifier
    from mil.labels import classes_of
    from mil.readers.registry import read_dataset

    cells, _ = read_dataset("imagefolder", DATA / "pbc-sample")  # patient_id = image: no donor ids exist
    class_names = list(classes_of(cells.rows))
    rows = labelled_rows(cells.rows, class_names)
    split = patient_split(rows, val_fraction=0.15, test_fraction=0.25, seed=seed)
    parts = {k: [r for r in rows if r["patient_id"] in set(v)] for k, v in split.items()}
    targets = {k: np.array([class_names.index(r["label"]) for r in v]) for k, v in parts.items()}
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    results.update({
        "dataset": "PBC sample (800 crops, 8 classes); split by image: the sample has no donor ids",
        "split_sizes": {k: len(v) for k, v in split.items()},
    })  # fmt: skip
    start = time.perf_counter()
    base = frozen_imagenet_logreg(parts, targets, device)
    base_metrics = {k: classification_metrics(targets[k], base["probs"][k], class_names) for k in ("val", "test")}
    results["baseline_frozen_imagenet_logreg"] = {
        "C": base["C"], "seconds": round(time.perf_counter() - start),
        "val_macro_f1": base_metrics["val"]["macro_f1"], "test_macro_f1": base_metrics["test"]["macro_f1"],
        "test_macro_auroc": base_metrics["test"]["macro_auroc"],
    }  # fmt: skip
    _save(out, results)
    variants = results.setdefault("variants", {})
    for name in budget["pbc_variants"]:
        config = ClassifierConfig(**{**PBC_VARIANTS[name], "seed": seed, "verbose": True,
                                     "accelerator": "gpu" if device == "cuda" else "cpu"})  # fmt: skip
        load_before = os.getloadavg()
        start = time.perf_counter()
        result = train_classifier(cells, out_dir=out / f"classifier_{name}", config=config, split=split)
        seconds = time.perf_counter() - start
        clf = load_classifier(result.checkpoint)
        from mil.classifier.data import load_crops

        entry = {"config": {k: v for k, v in config.to_dict().items() if k in PBC_VARIANTS[name] or name == "default"},
                 "train_seconds": round(seconds), "load_1_5_15_before": load_before,
                 "load_1_5_15_after": os.getloadavg(), "best_epoch": result.history.get("best_epoch"),
                 "threads": __import__("torch").get_num_threads()}  # fmt: skip
        for part in ("val", "test"):
            crops = load_crops(parts[part], crop_size=config.crop_size)
            for tta in (False, True):
                probs = predict_crops(clf.net, crops, mean=clf.mean, std=clf.std, tta=tta)
                m = classification_metrics(targets[part], probs, class_names)
                key = f"{part}_macro_f1" + ("_tta" if tta else "")
                entry[key] = m["macro_f1"]
                if tta == config.tta:
                    entry[f"{part}_scored"] = {"macro_f1": m["macro_f1"], "macro_auroc": m["macro_auroc"],
                                               "balanced_accuracy": m["balanced_accuracy"]}  # fmt: skip
                    if part == "test":
                        np.save(out / f"classifier_{name}" / "test_probs.npy", probs)
                        if name == "default":
                            entry["per_class_recall"] = {k: v["recall"] for k, v in m["per_class"].items()}
        if name == "default":
            test_probs = np.load(out / "classifier_default" / "test_probs.npy")
            results["default_minus_baseline_test"] = paired_bootstrap_f1(
                targets["test"], test_probs, base["probs"]["test"], seed=seed
            )
        variants[name] = entry
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
        # the settings of the figures in docs/real_data.md (before the few-label defaults)
        augment="light", label_smoothing=0.0, warmup_epochs=0, tta=False,
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


def run_bccd_speed(out: Path, budget: dict, device: str, seed: int) -> dict:
    """Training steps/s of the BCCD detector at a few image scales (a few steps each): the CPU trade-off table."""
    import os

    from mil.detector.model import DetectorConfig
    from mil.detector.train import DetectorTrainConfig, train_detector
    from mil.readers.registry import read_dataset

    root = DATA / "bccd" / "BCCD"
    cells, _ = read_dataset("voc", root)
    train = (root / "ImageSets" / "Main" / "train.txt").read_text().split()
    steps = int(os.environ.get("SPEED_STEPS", "6"))
    rows = []
    for backbone in os.environ.get("SPEED_BACKBONES", "efficientnet_lite0_fpn").split(","):
        for scale in [float(s) for s in os.environ.get("SPEED_SCALES", "0.4,0.5,0.65").split(",")]:
            config = DetectorConfig(backbone=backbone, init="imagenet" if "lite0" in backbone else "random",
                                    classes=("Platelets", "RBC", "WBC"), pixel_scale=scale)  # fmt: skip
            tc = DetectorTrainConfig(epochs=1, batch_size=4, max_steps=steps, seed=seed, device=device, resume=False)
            start = time.perf_counter()
            result = train_detector(cells, out_dir=out / f"{backbone}_{scale}", config=config, train_config=tc,
                                    patients=train[: 4 * steps])  # fmt: skip
            total_s = time.perf_counter() - start
            steps_done, step_s = len(result.history["step_loss"]), sum(result.history["epoch_seconds"])
            rows.append({"backbone": backbone, "scale": scale, "steps": steps_done, "step_seconds": round(step_s, 1),
                         "steps_per_s": round(steps_done / step_s, 3), "with_setup_seconds": round(total_s, 1),
                         "load_1min": round(os.getloadavg()[0], 2)})  # fmt: skip
            print(rows[-1], flush=True)
    results = {"speed": rows, "threads": __import__("torch").get_num_threads()}
    _save(out, results)
    return results


PARTS = {"bccd": run_bccd, "pbc": run_pbc, "synth": run_synth, "bccd-speed": run_bccd_speed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    parser.add_argument("--out", default="results/real_cells")
    parser.add_argument("--budget", choices=list(BUDGETS), default="quick")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pbc-variants", nargs="+", choices=list(PBC_VARIANTS), help="classifier settings to run")
    # One thread: on a shared, oversubscribed machine two OpenMP threads per process ran 5-10x slower, not faster.
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default)")
    args = parser.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    for part in args.parts:
        if part != "synth" and not (DATA / ("pbc-sample" if part == "pbc" else "bccd")).exists():
            print(f"skip {part}: {DATA} lacks its data (it is never copied into the repository)")
            continue
        out = Path(args.out) / part
        out.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        print(f"== {part} ({args.budget}) ==", flush=True)
        budget = dict(BUDGETS[args.budget], **({"pbc_variants": args.pbc_variants} if args.pbc_variants else {}))
        PARTS[part](out, budget, args.device, args.seed)
        print(f"== {part} done in {time.perf_counter() - start:.0f} s ==", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
