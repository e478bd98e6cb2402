"""Detection metrics with torchmetrics: AP@0.5 per class, and COCO mAP@[.5:.95]."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from mil.cell_table import CellTable
from mil.detector.tiling import Detections


def detection_metrics(
    predictions: list[Detections], targets: list[tuple[np.ndarray, np.ndarray]], class_names: tuple[str, ...]
) -> dict:
    """predictions[i] and targets[i] = (boxes (K, 4), labels (K,) 1-based) belong to the same image.

    Returns map_50 (also as ap50) and map (COCO) over classes, and ap50 / ap per class name. Up to 1000 detections
    per image count (dense smears hold hundreds of cells; COCO's default 100 would cap recall).
    """
    from torchmetrics.detection import MeanAveragePrecision

    preds = [
        {
            "boxes": torch.as_tensor(p.boxes, dtype=torch.float32).reshape(-1, 4),
            "scores": torch.as_tensor(p.scores, dtype=torch.float32),
            "labels": torch.as_tensor(p.labels, dtype=torch.int64),
        }
        for p in predictions
    ]
    target = [
        {
            "boxes": torch.as_tensor(b, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.as_tensor(lab, dtype=torch.int64),
        }
        for b, lab in targets
    ]
    out: dict = {}
    for key, thresholds in (("ap50", [0.5]), ("ap", None)):
        metric = MeanAveragePrecision(
            iou_type="bbox", iou_thresholds=thresholds, class_metrics=True, max_detection_thresholds=[1, 100, 1000]
        )
        metric.update(preds, target)
        result = metric.compute()
        out["map_50" if key == "ap50" else "map"] = float(result["map"])
        classes = result["classes"].reshape(-1).tolist()
        per_class = result["map_per_class"].reshape(-1).tolist()
        out[f"{key}_per_class"] = {class_names[int(c) - 1]: float(v) for c, v in zip(classes, per_class)}
    out["ap50"] = out["map_50"]  # the name the demo and reports print: AP@0.5 averaged over classes
    out["n_images"] = len(predictions)
    out["n_targets"] = int(sum(len(lab) for _, lab in targets))
    out["n_predictions"] = int(sum(len(p) for p in predictions))
    return out


def evaluate_table(
    predicted: CellTable, truth: CellTable, class_names: tuple[str, ...] = ("cell",), label_column: str = "det_class"
) -> dict:
    """Score a predicted cell table against a ground-truth one on the images of the ground truth.

    class_names == ('cell',) scores class-agnostically; otherwise truth rows are matched by `label` and predicted
    rows by `label_column`.
    """
    agnostic = tuple(class_names) == ("cell",)
    index = {c: i + 1 for i, c in enumerate(class_names)}

    def grouped(table: CellTable, column: str, scored: bool) -> dict[str, list[tuple]]:
        groups: dict[str, list[tuple]] = defaultdict(list)
        for r in table.rows:
            cls = 1 if agnostic else index.get(r.get(column, ""))
            if cls is None:
                continue
            score = r.get("det_score")
            groups[str(r["image_path"])].append(
                (r["x0"], r["y0"], r["x1"], r["y1"], cls, 1.0 if score is None or not scored else float(score))
            )
        return groups

    truth_by_image = grouped(truth, "label", scored=False)
    pred_by_image = grouped(predicted, label_column, scored=True)
    predictions, targets = [], []
    for image in sorted({str(r["image_path"]) for r in truth.rows}):
        t = np.array(truth_by_image.get(image, []), dtype=np.float64).reshape(-1, 6)
        p = np.array(pred_by_image.get(image, []), dtype=np.float64).reshape(-1, 6)
        predictions.append(
            Detections(p[:, :4].astype(np.float32), p[:, 5].astype(np.float32), p[:, 4].astype(np.int64))
        )
        targets.append((t[:, :4].astype(np.float32), t[:, 4].astype(np.int64)))
    return detection_metrics(predictions, targets, tuple(class_names))
