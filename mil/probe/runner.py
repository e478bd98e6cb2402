"""Probe several bag folders on the same cells and folds, write the table, the predictions and the picture."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mil.errors import InputError
from mil.probe.data import BagCells, cell_groups, labelled, load_bag_cells
from mil.probe.probe import (
    ProbeSettings,
    group_resamples,
    grouped_folds,
    out_of_fold,
    paired_difference,
    patient_probe,
    scored,
)

PROBES = ("knn", "linear")


@dataclass
class ProbeResult:
    rows: list[dict]
    markdown: str
    predictions: dict[str, dict[str, np.ndarray]]  # folder -> probe -> (N,) predicted class of the probed cells
    cell_ids: np.ndarray
    labels: np.ndarray
    plot: Path | None


def _same_cells(first: BagCells, other: BagCells, index: np.ndarray, other_index: np.ndarray) -> None:
    if first.classes != other.classes or not np.array_equal(first.cell_ids[index], other.cell_ids[other_index]):
        raise InputError(
            f"bag folders {first.name} and {other.name} hold other cells or label classes; probes are compared on "
            "the same cells: extract every folder from the same cell table (and label map)"
        )


def run_probe(
    bag_dirs: list[Path],
    *,
    out: Path,
    settings: ProbeSettings | None = None,
    patients: Path | None = None,
    cells: Path | None = None,
    max_cells: int | None = 20000,
    plot: str = "umap",
    plot_cells: int = 3000,
) -> ProbeResult:
    from mil.atomic import atomic_write_text
    from mil.progress import Progress, say

    settings = settings or ProbeSettings()
    out = Path(out)
    names = [Path(d).name for d in bag_dirs]
    if len(set(names)) != len(names):
        raise InputError(f"bag folders need distinct names (the table's rows): {names}")
    keep = None
    if cells is not None:
        from mil.cell_table import read_cell_table

        keep = {str(r["cell_id"]) for r in read_cell_table(cells).rows}
    diagnosis = None
    if patients is not None:
        from mil.cell_table import read_patient_table

        diagnosis = {r["patient_id"]: r.get("diagnosis", "") for r in read_patient_table(patients).rows}

    loaded = [load_bag_cells(d, keep_cells=keep) for d in bag_dirs]
    first = loaded[0]
    index = labelled(first, max_cells=max_cells, seed=settings.seed)
    if len(index) < settings.n_folds:
        raise InputError(
            f"{first.name}: {len(index)} labelled cell(s); the cell probes need at least {settings.n_folds}"
        )
    for other in loaded[1:]:
        _same_cells(first, other, index, labelled(other, max_cells=max_cells, seed=settings.seed))
    y = first.labels[index]
    groups, grouped_by = cell_groups(first, index, settings.n_folds)
    folds = grouped_folds(y, groups, settings)
    resamples = group_resamples(groups, settings)
    classes = np.unique(y)
    say(f"probe: {len(index)} labelled cells of {len(classes)} types, {len(np.unique(groups))} {grouped_by} groups, "
        f"{settings.n_folds} folds, {len(loaded)} encoder(s)")  # fmt: skip

    rows, predictions = [], {}
    steps = len(loaded) * (len(PROBES) + (diagnosis is not None))
    with Progress(steps, "probe", "probe") as bar:
        for bag in loaded:
            x = bag.features[index]
            row = {"encoder": bag.name, "name": bag.encoder.get("name", ""), "dim": int(x.shape[1]),
                   "cells": len(index), "grouped_by": grouped_by}  # fmt: skip
            predictions[bag.name] = {}
            for kind in PROBES:
                predicted = out_of_fold(kind, x, y, folds, settings)
                predictions[bag.name][kind] = predicted
                row.update({f"{kind}_{k}": v for k, v in scored(y, predicted, classes, resamples, settings).items()})
                if bag is not first:
                    diff = paired_difference(y, predicted, predictions[first.name][kind], classes, resamples, settings)
                    row.update({f"{kind}_diff_{k}": v for k, v in diff.items()})
                bar.update(1, postfix=f"{bag.name} {kind}")
            if diagnosis is not None:
                patient = patient_probe(bag.patient_means, diagnosis, settings)
                row.update({f"patient_{k}": v for k, v in patient.items() if k != "diagnoses"})
                bar.update(1, postfix=f"{bag.name} patients")
            rows.append(row)

    out.mkdir(parents=True, exist_ok=True)
    markdown = table_markdown(rows, reference=first.name, settings=settings)
    atomic_write_text(out / "probe.md", markdown + "\n")
    atomic_write_text(out / "probe.csv", _csv(rows))
    atomic_write_text(out / "probe.json", json.dumps({"settings": settings.__dict__, "rows": rows}, indent=2) + "\n")
    atomic_write_text(out / "predictions.csv", _predictions_csv(first, index, predictions))
    picture = None
    if plot != "none":
        from mil.probe.plot import write_embedding_png

        shown = labelled(first, max_cells=plot_cells, seed=settings.seed)  # the same cells in every panel
        panels = [(b.name, b.features[shown], b.labels[shown]) for b in loaded]
        say(f"probe: {plot.upper()} map of {len(shown)} cells per encoder")
        picture = write_embedding_png(panels, first.classes, out / f"{plot}.png", method=plot, seed=settings.seed)
    return ProbeResult(rows=rows, markdown=markdown, predictions=predictions, cell_ids=first.cell_ids[index],
                       labels=y, plot=picture)  # fmt: skip


def _ci(row: dict, key: str) -> str:
    if key not in row:
        return ""
    return f"{row[key]:.3f} [{row[key + '_lo']:.3f}, {row[key + '_hi']:.3f}]"


def _diff(row: dict, kind: str) -> str:
    key = f"{kind}_diff_diff"
    if key not in row:
        return "(reference)"
    star = "*" if row[f"{kind}_diff_lo"] > 0 or row[f"{kind}_diff_hi"] < 0 else ""
    return f"{row[key]:+.3f} [{row[f'{kind}_diff_lo']:+.3f}, {row[f'{kind}_diff_hi']:+.3f}]{star}"


def table_markdown(rows: list[dict], *, reference: str, settings: ProbeSettings) -> str:
    """One row per encoder: kNN and linear macro-F1 / balanced accuracy with CIs, paired difference to the first
    folder, and the patient probe where a patient table was given."""
    patient = any("patient_macro_f1" in r for r in rows)
    head = ["encoder", "dim", "kNN macro-F1", "kNN bal. acc.", "linear macro-F1", "linear bal. acc.",
            f"kNN macro-F1 - {reference}", f"linear macro-F1 - {reference}"]  # fmt: skip
    if patient:
        head += ["patient macro-F1", "patient bal. acc."]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["encoder"], str(r["dim"])]
        cells += [_ci(r, f"{kind}_{metric}") for kind in PROBES for metric in ("macro_f1", "balanced_accuracy")]
        cells += [_diff(r, kind) for kind in PROBES]
        if patient:
            cells += [_ci(r, "patient_macro_f1"), _ci(r, "patient_balanced_accuracy")]
        lines.append("| " + " | ".join(cells) + " |")
    r = rows[0]
    lines.append("")
    lines.append(
        f"{r['cells']} labelled cells, {settings.n_folds}-fold CV grouped by {r['grouped_by']}; "
        f"kNN cosine k={settings.k}, "
        f"logistic regression C={settings.C} on standardised features; {int(settings.level * 100)}% CIs from "
        f"{settings.n_boot} bootstrap replicates of the {r['grouped_by']}s; differences are paired (same cells, "
        "same replicates), * where the CI excludes 0."
    )
    return "\n".join(lines)


def _csv(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _predictions_csv(first: BagCells, index: np.ndarray, predictions: dict) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    columns = [f"{name}_{kind}" for name in predictions for kind in PROBES]
    writer.writerow(["cell_id", "patient_id", "label", *columns])
    for j, i in enumerate(index):
        preds = [first.classes[predictions[name][kind][j]] for name in predictions for kind in PROBES]
        writer.writerow([first.cell_ids[i], first.patients[i], first.classes[first.labels[i]], *preds])
    return buf.getvalue()
