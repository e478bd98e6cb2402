"""The cross-fitted *linear* cell classifier of `classify: {method: linear}`: a frozen encoder and a logistic-regression
head per outer fold.

The encoder's bags are extracted once (into the extract stage's folder when it is the same encoder, so that stage
then reuses every bag), and per fold a standardised multinomial logistic regression (class-balanced, as the CNN's
weighted loss) is fitted on the labelled cells of the fold's training patients only. Every cell of every patient is
then scored by each fold's head and written as that fold's bag folder (`crossfit/<fold>/`, the bags with
`cell_probs` and `train_patients.json`), the layout `mil compare --cell-probs-per-fold` reads and checks for
leakage. A fitted head is saved as JSON (scaler and coefficients; no pickle) in `classifier/linear/<fold>.json`.
Against fine-tuning the CNN (method finetune) it costs a forward pass of the encoder per cell instead of a forward
and backward pass per cell and epoch and fold: the demo's classifier stage went from ~600 to a few CPU seconds.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

from mil.atomic import atomic_write_text
from mil.progress import say


def crossfit_linear(ctx, plan: list[dict], classes: list[str], extract_to) -> tuple[dict, list[Path]]:
    """Fit, score and write every fold of `plan`; returns (figures, files written)."""
    from features.bag_directory import BagDirectory, read_manifest, write_manifest
    from features.bags import bag_path, write_bag
    from mil.classifier.metrics import classification_metrics

    opts = ctx.config.classify
    extract = ctx.config.extract or {}
    encoder = opts.get("encoder", extract.get("encoder", "morphology.handcrafted"))
    size = opts.get("input_size", extract.get("input_size") if encoder == extract.get("encoder") else None)
    shared = encoder == extract.get("encoder", "morphology.handcrafted") and size == extract.get("input_size")
    folder = ctx.out / "bags" / encoder if shared else ctx.out / "classifier" / "features" / encoder
    say(f"classify: {encoder} features of every cell -> {folder}" + (" (shared with extract)" if shared else ""))
    report = extract_to(ctx, ctx.path("cells_csv"), folder, encoder=encoder, input_size=size)
    directory = BagDirectory(folder)
    bags = {p: directory.load(p) for p in directory.patients()}
    bag_classes = next(iter(bags.values())).label_classes
    index = {c: i for i, c in enumerate(classes)}
    # bag label -> position in `classes` (-1: unlabelled, or a class the classifier does not learn)
    to_class = np.array([index.get(c, -1) for c in bag_classes] + [-1], dtype=np.int64)
    targets = {p: to_class[np.where(b.label >= 0, b.label, len(bag_classes))] for p, b in bags.items()}
    figures: dict = {}
    if report.cells_embedded:
        figures["cells_per_second"] = round(report.cells_embedded / max(report.seconds, 1e-9), 1)
    files: list[Path] = []
    out_of_fold: dict[str, np.ndarray] = {}
    first_seed = plan[0]["seed"]
    manifest = read_manifest(folder) or {}
    for fold in plan:
        train = [p for p in fold["train_patients"] if p in bags]
        head = _fit(
            np.concatenate([bags[p].features[targets[p] >= 0] for p in train]),
            np.concatenate([targets[p][targets[p] >= 0] for p in train]),
            n_classes=len(classes),
            C=float(opts.get("C", 1.0)),
            max_iter=int(opts.get("max_iter", 300)),
        )
        record = ctx.out / "classifier" / "linear" / f"{fold['name']}.json"
        record.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(record, json.dumps({**head, "classes": classes, "encoder": encoder,
                                              "train_patients": fold["train_patients"]}))  # fmt: skip
        fold_dir = ctx.out / "crossfit" / fold["name"]
        fold_dir.mkdir(parents=True, exist_ok=True)
        for pid, bag in bags.items():
            probs = _predict(head, bag.features)
            if fold["seed"] == first_seed and pid in set(fold["test_patients"]):
                out_of_fold[pid] = probs
            bag.cell_probs = probs.astype(np.float32)
            bag.attrs = {**bag.attrs, "cell_probs_classes": classes, "classifier": f"linear:{record.name}"}
            write_bag(bag_path(fold_dir, pid), bag)
        if manifest.get("encoder_config") is not None:
            write_manifest(fold_dir, encoder_config=manifest["encoder_config"], preprocess=manifest.get("preprocess"))
        atomic_write_text(fold_dir / "train_patients.json", json.dumps(fold["train_patients"]))
        files += [record, fold_dir / "train_patients.json"]
        say(f"classify: {fold['name']}: linear head on {sum(int((targets[p] >= 0).sum()) for p in train)} cells")
    y = np.concatenate([targets[p][targets[p] >= 0] for p in sorted(out_of_fold)])
    probs = np.concatenate([out_of_fold[p][targets[p] >= 0] for p in sorted(out_of_fold)])
    metrics = classification_metrics(y, probs, classes)
    figures["classifier_macro_f1"] = round(float(metrics["macro_f1"]), 3)
    figures["classifier_macro_auroc"] = round(float(metrics["macro_auroc"]), 3)
    print(f"held-out patients' cells: macro-F1 {metrics['macro_f1']:.3f}, macro AUROC {metrics['macro_auroc']:.3f}")
    return figures, files


def _fit(x: np.ndarray, y: np.ndarray, *, n_classes: int, C: float, max_iter: int) -> dict:
    """Standardise, then a class-balanced multinomial logistic regression; the head as plain numbers."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    from mil import threads

    x = x.astype(np.float64)
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale[scale == 0] = 1.0  # a constant feature stays unscaled (as StandardScaler)
    model = LogisticRegression(C=C, max_iter=max_iter, class_weight="balanced")
    # BLAS threads beyond the command's --threads spin against each other on a shared machine
    with threadpool_limits(threads.chosen() or 1), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=ConvergenceWarning)
        model.fit((x - mean) / scale, y)
    coef = np.zeros((n_classes, x.shape[1]))
    intercept = np.full(n_classes, -1e4)  # a class no training cell had is never predicted
    if len(model.classes_) > 2:
        coef[model.classes_], intercept[model.classes_] = model.coef_, model.intercept_
    else:  # sklearn's binary head is p(second) = sigmoid(w x + b): logits (0, w x + b)
        coef[model.classes_[1]], intercept[model.classes_] = model.coef_[0], (0.0, model.intercept_[0])
    return {"mean": mean.tolist(), "scale": scale.tolist(), "coef": coef.tolist(), "intercept": intercept.tolist()}


def _predict(head: dict, features: np.ndarray) -> np.ndarray:
    x = (features.astype(np.float64) - np.asarray(head["mean"])) / np.asarray(head["scale"])
    logits = x @ np.asarray(head["coef"]).T + np.asarray(head["intercept"])  # (N, C)
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)
