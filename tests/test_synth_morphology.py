"""Simple hand-made features of cell crops for the synth morphology test (colour, size, shape, texture).

Deliberately independent of the `features` package: the test asks whether the generator draws real
morphology, which a few lines of classical image analysis must be able to see.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def _stats(values: np.ndarray, k: int) -> list[float]:
    if values.size == 0:
        return [0.0] * k
    return list(values.mean(axis=0)) if values.ndim > 1 else [float(values.mean())]


def crop_features(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """Feature vector of the cell in `box` (x0, y0, x1, y1) of an RGB uint8 image."""
    x0, y0, x1, y1 = box
    crop = image[y0:y1, x0:x1].astype(np.float32)
    h, w = crop.shape[:2]
    od = -np.log((crop + 1.0) / 256.0)  # optical density: stains add up here
    yy, xx = np.mgrid[0:h, 0:w]
    inside = ((xx + 0.5 - w / 2) / (w / 2)) ** 2 + ((yy + 0.5 - h / 2) / (h / 2)) ** 2 <= 1.0
    r, g, b = od[..., 0], od[..., 1], od[..., 2]
    total = od.sum(-1)
    # chromatin absorbs green most and blue least; orange eosinophil granules absorb blue most
    nucleus = inside & (g > 0.75) & (g > 1.1 * r) & (b < g)
    cell = inside & (total > 0.45)
    cytoplasm = cell & ~nucleus
    n_in, n_nuc = max(int(inside.sum()), 1), int(nucleus.sum())

    feats: list[float] = [np.log(h), np.log(w), np.log(h * w), max(h, w) / max(min(h, w), 1)]
    feats += list(od[inside].mean(0)) + list(od[inside].std(0))
    feats += [n_nuc / n_in, cell.sum() / n_in]
    feats += _stats(od[nucleus], 3) + _stats(od[cytoplasm], 3)
    cyto = od[cytoplasm]
    feats += [float((cyto[:, 0] / (cyto[:, 1] + 1e-3)).mean()) if len(cyto) else 0.0]
    feats += [float((cyto[:, 2] / (cyto[:, 1] + 1e-3)).mean()) if len(cyto) else 0.0]

    # texture: chromatin variation and high-frequency (granular) energy
    detail = total - ndimage.gaussian_filter(total, 1.5)
    feats += [float(total[nucleus].std()) if n_nuc else 0.0, float(np.abs(detail[nucleus]).mean()) if n_nuc else 0.0]
    feats += [float(np.abs(detail[cytoplasm]).mean()) if cytoplasm.any() else 0.0]
    feats += [float((cell & (total > 3.2)).sum() / n_in)]  # very dark spots: basophil granules, pyknosis
    feats += [float((cell & (b > g) & (b > 0.9)).sum() / n_in)]  # orange-red eosinophil granules
    feats += [float((inside & (total < 0.35)).sum() / n_in)]  # pale holes: vacuoles, halo, background

    # nuclear shape: lobes, solidity, elongation, position
    labels, n = ndimage.label(nucleus)
    sizes = ndimage.sum(nucleus, labels, range(1, n + 1)) if n else np.zeros(0)
    big = sizes[sizes >= 4]
    feats += [float(len(big)), float(np.log1p(len(big)))]
    if n_nuc >= 4:
        ys, xs = np.nonzero(nucleus)
        cov = np.cov(np.stack([xs, ys]))
        ev = np.sort(np.linalg.eigvalsh(cov))
        feats += [float(np.sqrt(ev[0] / max(ev[1], 1e-6)))]
        cy, cx = ys.mean(), xs.mean()
        feats += [float(np.hypot(cx - w / 2, cy - h / 2) / max(h, w))]
        filled = ndimage.binary_fill_holes(nucleus)
        hull_area = _hull_area(xs, ys)
        feats += [float(filled.sum() / max(hull_area, 1.0))]
        eroded = ndimage.binary_erosion(nucleus)
        feats += [float((nucleus & ~eroded).sum() / np.sqrt(n_nuc))]  # boundary / sqrt(area): lobulation
    else:
        feats += [0.0, 0.0, 0.0, 0.0]
    return np.asarray(feats, dtype=np.float64)


def _hull_area(xs: np.ndarray, ys: np.ndarray) -> float:
    from scipy.spatial import ConvexHull, QhullError

    pts = np.unique(np.stack([xs, ys], 1), axis=0).astype(np.float64)
    if len(pts) < 3:
        return float(len(pts))
    try:
        return float(ConvexHull(pts).volume) + 0.5 * len(pts) ** 0.5 * 2
    except QhullError:
        return float(len(pts))


def _cohort_features(out, seed: int) -> tuple[np.ndarray, np.ndarray]:
    import csv

    from PIL import Image

    from mil.synth.cohort import nucleated_classes
    from mil.synth.config import DiagnosisConfig, load_synth_config
    from mil.synth.writer import write_cohort

    # every class equally often, so each of the 33 has enough crops to train and to score
    uniform = DiagnosisConfig(name="X", proportion=1.0, ncit_concept_code="", subtypes=(), composition={})
    config = load_synth_config().replace(
        patients=3,
        fields_per_patient=3,
        cells_per_field=60,
        labelled_erythrocytes_per_field=2,
        label_noise=0.0,
        session_disagreement=0.0,
        cue=False,
        background={c: 1.0 for c in nucleated_classes()},
        diagnoses=(uniform,),
    )
    write_cohort(config, out, seed=seed, progress=False)
    with (out / "rois.csv").open() as fh:
        images = {r["roi_id"]: np.asarray(Image.open(out / r["image"]).convert("RGB")) for r in csv.DictReader(fh)}
    features, labels = [], []
    with (out / "cells.csv").open() as fh:
        for r in csv.DictReader(fh):
            box = (int(r["x1"]), int(r["y1"]), int(r["x2"]), int(r["y2"]))
            features.append(crop_features(images[r["roi_id"]], box))
            labels.append(r["consensus_label"])
    return np.stack(features), np.asarray(labels)


def test_classes_are_drawn_with_real_morphology(tmp_path) -> None:
    """Logistic regression on colour/size/shape/texture statistics, trained on one seed, tested on another."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from mil.labels import load_label_map

    label_map = load_label_map()
    x_train, y_train = _cohort_features(tmp_path / "train", seed=1)
    x_test, y_test = _cohort_features(tmp_path / "test", seed=2)
    assert set(y_train) == set(y_test) == set(label_map.classes)  # every class appears

    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.3, max_iter=2000))
    predicted = model.fit(x_train, y_train).predict(x_test)
    lineage = {c: group for group, members in label_map.groups.items() for c in members}
    lineage_accuracy = float(np.mean([lineage[a] == lineage[b] for a, b in zip(y_test, predicted)]))
    macro_f1 = float(f1_score(y_test, predicted, average="macro", labels=list(label_map.classes)))
    print(f"lineage accuracy {lineage_accuracy:.3f}, 33-class macro-F1 {macro_f1:.3f} on {len(y_test)} crops")
    assert lineage_accuracy >= 0.9
    assert macro_f1 >= 0.5
    # and it is the morphology, not luck: shuffled training labels fall to chance
    shuffled = np.random.default_rng(0).permutation(y_train)
    chance = f1_score(y_test, model.fit(x_train, shuffled).predict(x_test), average="macro", zero_division=0)
    assert chance < 0.2
