"""`mil demo`: the whole pipeline on the built-in synthetic cohort, in one command.

synthesize -> read (zenodo reader) -> train the detector and detect on held-out patients -> make the splits ->
cross-fitted cell classifier -> extract bags -> compare count heads (ground-truth and predicted counts) with
attention heads on the same splits -> attention report. Each stage writes into its own folder under --out,
and a final table says what each stage measured. Sized for 2 CPU cores by configs/demo.yaml.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from mil.atomic import atomic_write_text
from mil.errors import ConfigError
from mil.labels import CONFIG_DIR

DEFAULT_CONFIG = CONFIG_DIR / "demo.yaml"
FULL_CONFIG = CONFIG_DIR / "demo_full.yaml"
SECTIONS = {
    "seed": None,
    "synth": None,
    "detector": {
        "backbone",
        "init",
        "pixel_scale",
        "smallest_anchor",
        "epochs",
        "max_steps",
        "train_fraction",
        "device",
    },
    "classifier": None,
    "encoder": {"name", "input_size", "device"},
    "compare": None,
    "attention": {"head", "top_k", "max_patients"},
}


def load_demo_config(path: str | Path) -> dict:
    """Strict: unknown sections or keys are errors that name the valid ones."""
    path = Path(path)
    spec = yaml.safe_load(path.read_text()) or {}
    problems = [f"unknown section {k!r}; valid: {sorted(SECTIONS)}" for k in spec if k not in SECTIONS]
    for section, keys in SECTIONS.items():
        if keys and isinstance(spec.get(section), dict):
            problems += [f"{section}.{k} is unknown; valid: {sorted(keys)}" for k in spec[section] if k not in keys]
    if problems:
        raise ConfigError(f"demo config {path}:\n" + "\n".join(f"  - {p}" for p in problems))
    return spec


@dataclass
class Stages:
    """Timing and figures of each stage, printed at the end and saved as demo_summary.json."""

    seconds: dict[str, float] = field(default_factory=dict)
    figures: dict[str, float | str] = field(default_factory=dict)
    _start: float = 0.0

    def begin(self, name: str) -> None:
        self._start = time.perf_counter()
        print(f"\n== {name} ==", flush=True)

    def end(self, name: str) -> None:
        self.seconds[name] = round(time.perf_counter() - self._start, 1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (default demo_out)")
    parser.add_argument("--seed", type=int, help="seed of the cohort, splits and training (default from config)")
    parser.add_argument("--config", type=Path, help=f"demo config (default {DEFAULT_CONFIG.name})")
    parser.add_argument("--full", action="store_true", help=f"the larger config for a GPU ({FULL_CONFIG.name})")


def run(args: argparse.Namespace) -> int:
    config = load_demo_config(args.config or (FULL_CONFIG if args.full else DEFAULT_CONFIG))
    seed = int(args.seed if args.seed is not None else config.get("seed", 0))
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    stages = Stages()
    t0 = time.perf_counter()

    cells_csv, patients_csv = _synthesize_and_read(config, seed, out, stages)
    _detect(config, seed, out, cells_csv, stages)
    splits = _splits(config, seed, out, patients_csv)
    crossfit_dir = _classify(config, seed, out, cells_csv, splits, stages)
    bags = _extract(config, out, cells_csv, stages)
    tables = _compare(config, seed, out, bags, patients_csv, crossfit_dir, stages)
    report = _attention(config, out, cells_csv, stages)
    stages.seconds["total"] = round(time.perf_counter() - t0, 1)

    text = _final_table(tables, stages, report)
    atomic_write_text(out / "demo_summary.md", text)
    atomic_write_text(
        out / "demo_summary.json",
        json.dumps({"seconds": stages.seconds, "figures": stages.figures}, indent=2, sort_keys=True),
    )
    print("\n" + text)
    print(f"attention report: {report / 'index.html'}")
    return 0


def _synthesize_and_read(config: dict, seed: int, out: Path, stages: Stages) -> tuple[Path, Path]:
    from mil.cell_table import validate_cell_table, validate_patient_table
    from mil.readers.registry import read_dataset
    from mil.synth.config import DEFAULT_SYNTH_CONFIG, config_from_dict
    from mil.synth.writer import write_cohort

    stages.begin("synthesize")
    spec = {**yaml.safe_load(DEFAULT_SYNTH_CONFIG.read_text()), **(config.get("synth") or {})}
    summary = write_cohort(config_from_dict(spec, "demo synth"), out / "cohort", seed=seed)
    stages.end("synthesize")
    stages.begin("read cells (zenodo reader)")
    cells, patients = read_dataset("zenodo", out / "cohort")
    validate_patient_table(patients, where="demo patients")
    validate_cell_table(cells, patients, where="demo cells")
    cells_csv = cells.write(out / "cells" / "cells.csv")
    patients_csv = patients.write(out / "cells" / "patients.csv")
    stages.figures["patients"] = len(patients)
    stages.figures["cells"] = len(cells)
    print(f"{len(patients)} patients, {len(cells)} cells ({summary})")
    stages.end("read cells (zenodo reader)")
    return cells_csv, patients_csv


def _stratified_subset(patients: dict[str, str], fraction: float, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    chosen = []
    for dx in sorted(set(patients.values())):
        ids = sorted(p for p, d in patients.items() if d == dx)
        rng.shuffle(ids)
        chosen += ids[: max(1, round(fraction * len(ids)))]
    return sorted(chosen)


def _detect(config: dict, seed: int, out: Path, cells_csv: Path, stages: Stages) -> None:
    """Train on some patients' fields, detect on the others', score AP@0.5 against their true boxes."""
    from mil.cell_table import CellTable, read_cell_table, read_patient_table
    from mil.detector.evaluate import evaluate_table
    from mil.detector.model import DetectorConfig
    from mil.detector.predict import CellDetector, detect_images
    from mil.detector.train import DetectorTrainConfig, train_detector

    stages.begin("detector: train, detect held-out patients")
    opts = config.get("detector") or {}
    cells = read_cell_table(cells_csv)
    # The detector finds nucleated cells; the few boxed erythrocytes would teach it to box a random subset
    # of the erythrocyte background.
    nucleated = CellTable(rows=[r for r in cells.rows if r["label"] not in ("erythrocyte", "")])
    with_cells = sorted({r["patient_id"] for r in nucleated.rows})
    dx = {r["patient_id"]: r["diagnosis"] for r in read_patient_table(cells_csv.parent / "patients.csv").rows}
    train_ids = _stratified_subset({p: dx[p] for p in with_cells}, float(opts.get("train_fraction", 0.3)), seed)
    det_config = DetectorConfig.from_dict(
        {k: v for k, v in opts.items() if k not in ("epochs", "max_steps", "train_fraction", "device")}
    )
    train_config = DetectorTrainConfig(
        epochs=int(opts.get("epochs", 2)),
        max_steps=int(opts.get("max_steps", -1)),
        seed=seed,
        device=opts.get("device", "cpu"),
    )
    result = train_detector(
        nucleated, out_dir=out / "detector", config=det_config, train_config=train_config, patients=train_ids
    )
    held_out = CellTable(rows=[r for r in nucleated.rows if r["patient_id"] not in set(train_ids)])
    images = sorted({(r["image_path"], r["patient_id"]) for r in held_out.rows})
    found = detect_images(images, detector=CellDetector.load(result.checkpoint, device=opts.get("device", "cpu")))
    # AP is scored over every detection (its ranking is the point); the written table keeps the confident ones.
    detected = CellTable(rows=[r for r in found.rows if r["det_score"] >= 0.5])
    detected.write(out / "detector" / "detected_cells.csv")
    metrics = evaluate_table(found, held_out)
    classical = evaluate_table(detect_images(images), held_out)
    stages.figures["detector_ap50"] = round(float(metrics["map_50"]), 3)
    stages.figures["classical_ap50"] = round(float(classical["map_50"]), 3)
    stages.figures["detector_patients_train_test"] = f"{len(train_ids)}/{len(with_cells) - len(train_ids)}"
    print(
        f"AP@0.5 on {len(images)} held-out fields: Faster R-CNN {metrics['map_50']:.3f}, "
        f"classical baseline {classical['map_50']:.3f}"
    )
    stages.end("detector: train, detect held-out patients")


def _splits(config: dict, seed: int, out: Path, patients_csv: Path):
    from mil.cell_table import read_patient_table
    from mil.compare.config import load_compare_config
    from mil.protocol.splits import load_or_create_splits

    compare = load_compare_config(None, **_compare_overrides(config, seed))
    cohort = {r["patient_id"]: r["diagnosis"] for r in read_patient_table(patients_csv).rows}
    splits, _ = load_or_create_splits(
        out / "results" / "splits.json",
        cohort,
        folds=compare.folds,
        seeds=compare.seeds,
        seed=compare.seed,
        val_fraction=compare.val_fraction,
    )
    return splits


def _compare_overrides(config: dict, seed: int, **extra) -> dict:
    values = {**(config.get("compare") or {}), "seed": seed, **extra}
    return values


def _classify(config: dict, seed: int, out: Path, cells_csv: Path, splits, stages: Stages) -> Path:
    """Cross-fitted classifier: per outer fold, trained on that fold's training patients only."""
    from features.extract import ExtractConfig, run_extract
    from mil.cell_table import read_cell_table
    from mil.classifier.metrics import classification_metrics
    from mil.classifier.train import ClassifierConfig, train_crossfitted
    from mil.labels import load_label_map
    from mil.protocol.splits import crossfit_plan

    stages.begin("cell classifier (cross-fitted over the outer folds)")
    cells = read_cell_table(cells_csv)
    plan = crossfit_plan(splits)
    classes = [c for c in load_label_map().classes if any(r["label"] == c for r in cells.rows)]
    clf_config = ClassifierConfig.from_dict({**(config.get("classifier") or {}), "seed": seed, "test_fraction": 0.0})
    folds = [(f["train_patients"], f["test_patients"]) for f in plan]
    result = train_crossfitted(cells, folds, out_dir=out / "classifier", config=clf_config, class_names=classes)
    labelled = [r for r in cells.rows if r["label"] in classes]
    y = np.array([classes.index(r["label"]) for r in labelled])
    probs = np.stack([result.probs[r["cell_id"]] for r in labelled])
    metrics = classification_metrics(y, probs, classes)
    stages.figures["classifier_macro_f1"] = round(float(metrics["macro_f1"]), 3)
    stages.figures["classifier_macro_auroc"] = round(float(metrics["macro_auroc"]), 3)
    print(f"held-out patients' cells: macro-F1 {metrics['macro_f1']:.3f}, macro AUROC {metrics['macro_auroc']:.3f}")
    stages.end("cell classifier (cross-fitted over the outer folds)")

    stages.begin("per-fold classifier bags (counts from cross-fitted probabilities)")
    crossfit_dir = out / "crossfit"
    for fold, fold_result in zip(plan, result.folds):
        folder = crossfit_dir / fold["name"]
        run_extract(
            ExtractConfig(
                cells=cells_csv,
                encoder="classifier.file",
                weights=str(fold_result.checkpoint),
                out=folder,
                progress=False,
            )
        )
        atomic_write_text(folder / "train_patients.json", json.dumps(fold["train_patients"]))
    stages.end("per-fold classifier bags (counts from cross-fitted probabilities)")
    return crossfit_dir


def _extract(config: dict, out: Path, cells_csv: Path, stages: Stages) -> Path:
    from features.extract import ExtractConfig, run_extract

    enc = config.get("encoder") or {}
    name = enc.get("name", "morphology.handcrafted")
    stages.begin(f"extract bags ({name})")
    bags = out / "bags" / name
    report = run_extract(
        ExtractConfig(
            cells=cells_csv, encoder=name, input_size=enc.get("input_size"), out=bags, device=enc.get("device", "cpu")
        )
    )
    stages.figures["cells_per_second"] = round(report.cells_embedded / max(report.seconds, 1e-9), 1)
    stages.end(f"extract bags ({name})")
    return bags


def _compare(config, seed, out, bags, patients_csv, crossfit_dir, stages) -> dict[str, list[dict]]:
    from mil.compare.config import load_compare_config
    from mil.compare.report import write_report
    from mil.compare.runner import run_compare
    from mil.count.registry import is_count_head

    stages.begin("compare heads (ground-truth counts, attention)")
    truth = load_compare_config(None, **_compare_overrides(config, seed, counts="truth"))
    result = run_compare(truth, bags=bags, patients=patients_csv, out=out / "results")
    write_report(result, truth, out / "results")
    stages.end("compare heads (ground-truth counts, attention)")

    stages.begin("compare count heads on predicted counts")
    count_heads = [h for h in truth.heads if is_count_head(h)]
    predicted = load_compare_config(
        None,
        **_compare_overrides(config, seed, counts="soft", heads=count_heads, cell_probs_per_fold=str(crossfit_dir)),
    )
    (out / "results_predicted").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(out / "results" / "splits.json", out / "results_predicted" / "splits.json")
    result = run_compare(predicted, bags=bags, patients=patients_csv, out=out / "results_predicted")
    write_report(result, predicted, out / "results_predicted")
    stages.end("compare count heads on predicted counts")
    return {
        "ground-truth counts": _read_csv(out / "results" / "summary.csv"),
        "predicted counts": _read_csv(out / "results_predicted" / "summary.csv"),
    }


def _attention(config: dict, out: Path, cells_csv: Path, stages: Stages) -> Path:
    from mil.attention.load import report_from_results

    opts = config.get("attention") or {}
    stages.begin("attention report")
    report = out / "report"
    summary = report_from_results(
        out / "results",
        report,
        head=opts.get("head", "abmil"),
        cells=cells_csv,
        top_k=int(opts.get("top_k", 8)),
        max_patients=opts.get("max_patients"),
    )
    for key in ("cue_enrichment_top10", "deletion_area"):
        if key in summary:
            stages.figures[key] = round(float(summary[key]), 3)
    stages.end("attention report")
    return report


def _read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _final_table(tables: dict[str, list[dict]], stages: Stages, report: Path) -> str:
    lines = [
        "# mil demo: diagnosis on the synthetic cohort",
        "",
        "| counts from | head | macro-F1 [95% CI] | balanced accuracy | AUROC |",
        "|---|---|---|---|---|",
    ]
    for source, rows in tables.items():
        for r in rows:
            kind = source if r["head"].startswith("count.") else "cells (attention-MIL / pooling)"
            lines.append(
                f"| {kind} | {r['head']} | {_ci(r, 'macro_f1')} | {_ci(r, 'balanced_accuracy')} | {_ci(r, 'auroc')} |"
            )
        # attention heads appear once, under the ground-truth run that trained them
        tables = {k: [r for r in v if r["head"].startswith("count.")] for k, v in tables.items()}
    lines += ["", "| stage figure | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(stages.figures.items())]
    lines += ["", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in stages.seconds.items()]
    lines += ["", f"Attention report: {report / 'index.html'}"]
    return "\n".join(lines) + "\n"


def _ci(row: dict, metric: str) -> str:
    value = row.get(metric, "")
    lo, hi = row.get(f"{metric}_lo", ""), row.get(f"{metric}_hi", "")
    return f"{value} [{lo}, {hi}]" if lo else str(value)
