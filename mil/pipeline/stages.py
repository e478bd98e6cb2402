"""The stages of `mil run`, each calling the code its separate command calls.

A stage takes the run's `Context` (the pipeline file, the output folder, the seed, what earlier stages handed on)
and returns a `StageResult`: its figures, what it hands on (artifacts: the cell table later stages read, the bag
folder, the results folder, ...) and the files whose change makes its record stale. Folder layout under OUT:
cohort/ (synth), cells/, detector/, classifier/ + crossfit/, bags/<encoder>/, results/ (+ results_predicted/),
predict/ + predicted/, report/.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from mil.atomic import atomic_write_text
from mil.errors import ConfigError
from mil.pipeline.config import DETECT_OWN, DETECT_TRAIN, PipelineConfig
from mil.progress import say


@dataclass
class Context:
    config: PipelineConfig
    out: Path
    seed: int
    artifacts: dict = field(default_factory=dict)

    def path(self, key: str) -> Path:
        return Path(self.artifacts[key])


@dataclass
class StageResult:
    figures: dict = field(default_factory=dict)
    artifacts: dict = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    headline: str = ""  # what the stage's header line names (e.g. the encoder)


def _read_cells(section: dict, out_dir: Path) -> tuple[Path, Path, dict]:
    """A reader's tables, validated as `mil cells` validates them, written to out_dir."""
    from mil.labels import load_label_map
    from mil.readers.command import READER_OPTIONS, summary, validate
    from mil.readers.registry import get_reader

    reader = get_reader(section["format"])
    label_map = load_label_map(section["label_map"]) if section.get("label_map") else None
    options = {k: section[k] for k in READER_OPTIONS if section.get(k) is not None}
    for key in ("patients_csv", "clinical"):
        if key in options:
            options[key] = Path(options[key])
    if "out_dir" in reader.options:
        options["out_dir"] = out_dir
    cells, patients = reader(section["input"], label_map=label_map, **options)
    require = reader.carries_diagnosis or any(r.get("diagnosis") for r in patients.rows)
    validate(
        cells,
        patients,
        require_diagnosis=require,
        check_images=bool(section.get("check_images", True)),
        where=f"{section['format']} input {section['input']}",
    )
    print(summary(cells, patients))
    figures = {"patients": len(patients), "cells": len(cells)}
    return cells.write(out_dir / "cells.csv"), patients.write(out_dir / "patients.csv"), figures


def stage_cells(ctx: Context) -> StageResult:
    section = ctx.config.cells
    if "synth" not in section:
        cells_csv, patients_csv, figures = _read_cells(section, ctx.out / "cells")
    else:
        from mil.cell_table import validate_cell_table, validate_patient_table
        from mil.readers.registry import read_dataset
        from mil.synth.config import DEFAULT_SYNTH_CONFIG, config_from_dict
        from mil.synth.writer import write_cohort

        spec = {**yaml.safe_load(DEFAULT_SYNTH_CONFIG.read_text()), **(section.get("synth") or {})}
        summary = write_cohort(config_from_dict(spec, "pipeline cells.synth"), ctx.out / "cohort", seed=ctx.seed)
        say("cells: reading the synthetic cohort with the zenodo reader")
        cells, patients = read_dataset("zenodo", ctx.out / "cohort")
        validate_patient_table(patients, where="synthetic patients")
        validate_cell_table(cells, patients, where="synthetic cells")
        cells_csv = cells.write(ctx.out / "cells" / "cells.csv")
        patients_csv = patients.write(ctx.out / "cells" / "patients.csv")
        figures = {"patients": len(patients), "cells": len(cells)}
        print(f"{len(patients)} patients, {len(cells)} cells, {summary.fields} fields; diagnoses {summary.diagnoses}")
    return StageResult(
        figures=figures,
        artifacts={"cells_csv": cells_csv, "patients_csv": patients_csv, "source_cells_csv": cells_csv},
        files=[cells_csv, patients_csv],
    )


def has_diagnoses(patients_csv: Path) -> bool:
    from mil.cell_table import read_patient_table

    return any(r.get("diagnosis") for r in read_patient_table(patients_csv, validate=False).rows)


def _stratified_subset(patients: dict[str, str], fraction: float, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    chosen = []
    for dx in sorted(set(patients.values())):
        ids = sorted(p for p, d in patients.items() if d == dx)
        rng.shuffle(ids)
        chosen += ids[: max(1, round(fraction * len(ids)))]
    return sorted(chosen)


def stage_detect(ctx: Context) -> StageResult:
    """evaluate: train on some patients' boxes, detect on the others', score AP@0.5 (the annotated cells go on);
    apply: detect every image (with `checkpoint`, or a detector trained on all boxes) and go on with those cells."""
    from mil.cell_table import CellTable, read_cell_table, read_patient_table
    from mil.detector.evaluate import evaluate_table
    from mil.detector.model import DetectorConfig
    from mil.detector.predict import CellDetector
    from mil.detector.train import DetectorTrainConfig, train_detector
    from mil.progress import track

    opts = ctx.config.detect
    mode = opts.get("mode", "evaluate")
    device = opts.get("device", "cpu")
    cells = read_cell_table(ctx.path("cells_csv"))
    ignore = set(opts.get("ignore_labels", []))
    boxes = CellTable(rows=[r for r in cells.rows if r.get("label", "") not in ignore])
    det_config = DetectorConfig.from_dict({k: v for k, v in opts.items() if k not in (*DETECT_OWN, *DETECT_TRAIN)})
    train_config = DetectorTrainConfig(
        **{k: opts[k] for k in DETECT_TRAIN if k in opts and k != "device"}, seed=ctx.seed, device=device, verbose=True
    )
    out = ctx.out / "detector"
    figures: dict = {}
    if mode == "evaluate":
        with_cells = sorted({r["patient_id"] for r in boxes.rows})
        dx = {r["patient_id"]: r.get("diagnosis") or "?" for r in read_patient_table(ctx.path("patients_csv")).rows}
        train_ids = _stratified_subset(
            {p: dx.get(p, "?") for p in with_cells}, opts.get("train_fraction", 0.3), ctx.seed
        )
        result = train_detector(boxes, out_dir=out, config=det_config, train_config=train_config, patients=train_ids)
        held_out = CellTable(rows=[r for r in boxes.rows if r["patient_id"] not in set(train_ids)])
        images = sorted({(r["image_path"], r["patient_id"]) for r in held_out.rows})
        detector = CellDetector.load(result.checkpoint, device=device)
        found = _detect_tracked(images, detector, "detect held-out fields", track)
        # AP is scored over every detection (its ranking is the point); the written table keeps the confident ones.
        detected = CellTable(rows=[r for r in found.rows if r["det_score"] >= opts.get("min_score", 0.5)])
        detected_csv = detected.write(out / "detected_cells.csv")
        metrics = evaluate_table(found, held_out)
        # The zero-training baseline (watershed) costs ~0.25 s of CPU a field: it may be scored on the first
        # `classical_fields_per_patient` fields of each held-out patient (0 = every field).
        per_patient = int(opts.get("classical_fields_per_patient", 0))
        baseline_images = _first_fields(images, per_patient) if per_patient > 0 else images
        baseline_truth = CellTable(
            rows=[r for r in held_out.rows if r["image_path"] in {i for i, _ in baseline_images}]
        )
        classical = evaluate_table(_detect_tracked(baseline_images, None, "classical baseline", track), baseline_truth)
        figures["detector_ap50"] = round(float(metrics["map_50"]), 3)
        figures["classical_ap50"] = round(float(classical["map_50"]), 3)
        figures["detector_patients_train_test"] = f"{len(train_ids)}/{len(with_cells) - len(train_ids)}"
        atomic_write_text(out / "metrics.json", json.dumps({"detector": metrics, "classical": classical}, indent=2))
        figures["classical_fields"] = len(baseline_images)
        print(
            f"AP@0.5 on {len(images)} held-out fields: Faster R-CNN {metrics['map_50']:.3f}; "
            f"classical baseline {classical['map_50']:.3f} on {len(baseline_images)} of them"
        )
        return StageResult(figures=figures, files=[detected_csv, out / "metrics.json"])
    checkpoint = opts.get("checkpoint")
    if not checkpoint:
        checkpoint = train_detector(boxes, out_dir=out, config=det_config, train_config=train_config).checkpoint
    images = sorted({(r["image_path"], r["patient_id"]) for r in cells.rows})
    detector = CellDetector.load(checkpoint, device=device)
    found = _detect_tracked(images, detector, "detect fields", track)
    detected = CellTable(rows=[r for r in found.rows if r["det_score"] >= opts.get("min_score", 0.5)])
    detected_csv = detected.write(out / "detected_cells.csv")
    figures["detected_cells"] = len(detected)
    print(f"{len(detected)} cells detected on {len(images)} fields -> {detected_csv} (the cells of the next stages)")
    return StageResult(figures=figures, artifacts={"cells_csv": detected_csv}, files=[detected_csv])


def hands_nothing_on(stage: str, config: PipelineConfig) -> bool:
    """Whether no later stage reads `stage`'s output: the detector in mode evaluate (the later stages go on with
    the annotated cells; it only measures AP)."""
    section = config.section(stage) or {}
    return stage == "detect" and section.get("mode", "evaluate") == "evaluate"


def runs_beside(stage: str, config: PipelineConfig) -> bool:
    """Whether `stage` may run in a second process beside the later stages (mil.pipeline.beside): one that hands
    nothing on, unless its section says `beside: false`."""
    return hands_nothing_on(stage, config) and (config.section(stage) or {}).get("beside", True)


def _first_fields(images: list[tuple[str, str]], n: int) -> list[tuple[str, str]]:
    kept, seen = [], {}
    for path, patient in images:  # sorted by path: a patient's fields in their order
        if seen.get(patient, 0) < n:
            kept.append((path, patient))
            seen[patient] = seen.get(patient, 0) + 1
    return kept


def _detect_tracked(images, detector, desc: str, track):
    from mil.cell_table import CellTable
    from mil.detector.predict import detect_images

    rows = []
    for item in track(images, desc, "field"):
        rows += detect_images([item], detector=detector).rows
    return CellTable(rows=rows)


def compare_config(ctx: Context, **extra):
    """The CompareConfig of this pipeline: configs/compare.yaml (or compare.config), the section, the seed."""
    from mil.compare.config import load_compare_config

    section = {k: v for k, v in (ctx.config.compare or {}).items() if k not in ("config", "predicted_counts")}
    return load_compare_config((ctx.config.compare or {}).get("config"), **{**section, "seed": ctx.seed, **extra})


def _splits(ctx: Context):
    from mil.cell_table import read_patient_table
    from mil.protocol.splits import load_or_create_splits

    compare = compare_config(ctx)
    cohort = {r["patient_id"]: r["diagnosis"] for r in read_patient_table(ctx.path("patients_csv")).rows}
    splits, _ = load_or_create_splits(
        ctx.out / "results" / "splits.json",
        cohort,
        folds=compare.folds,
        seeds=compare.seeds,
        seed=compare.seed,
        val_fraction=compare.val_fraction,
    )
    return splits


def stage_classify(ctx: Context) -> StageResult:
    """crossfit: one classifier per outer fold of the comparison, trained on that fold's training patients only
    (so no patient is counted by a model that saw it), then per-fold bags of its probabilities; single: one
    classifier on a patient-grouped train/val/test split, its predictions written into the cell table."""
    from mil.cell_table import read_cell_table
    from mil.classifier.metrics import classification_metrics
    from mil.classifier.train import ClassifierConfig, train_classifier, train_crossfitted
    from mil.labels import load_label_map

    opts = {k: v for k, v in ctx.config.classify.items() if k not in ("mode", "method")}
    cells = read_cell_table(ctx.path("cells_csv"))
    present = {r.get("label", "") for r in cells.rows}
    shipped = [c for c in load_label_map().classes if c in present]
    classes = shipped if len(shipped) >= 2 else sorted(p for p in present if p and p != "drop")
    figures: dict = {}
    mode = ctx.config.classify.get("mode", "crossfit")
    if mode == "crossfit" and not has_diagnoses(ctx.path("patients_csv")):
        say("classify: no patient has a diagnosis, so there are no outer folds to cross-fit on: mode single")
        mode = "single"
    if mode == "single":
        from mil.classifier.predict import classify_cells

        config = ClassifierConfig.from_dict({**opts, "seed": ctx.seed, "verbose": True})
        result = train_classifier(cells, out_dir=ctx.out / "classifier", config=config, class_names=classes)
        for name, m in (("val", result.val_metrics), ("test", result.metrics)):
            if m:
                figures[f"classifier_{name}_macro_f1"] = round(float(m["macro_f1"]), 3)
                figures[f"classifier_{name}_macro_auroc"] = round(float(m["macro_auroc"]), 3)
        classified = ctx.out / "classifier" / "cells_classified.csv"
        classify_cells(cells, result.checkpoint, out=classified)
        print(f"classifier {result.checkpoint}: {figures}; predictions in {classified}")
        return StageResult(figures=figures, artifacts={"cells_csv": classified}, files=[classified])

    from features.extract import ExtractConfig, run_extract
    from mil.protocol.splits import crossfit_plan

    splits = _splits(ctx)
    plan = crossfit_plan(splits)
    if ctx.config.classify.get("method", "finetune") == "linear":
        from mil.pipeline.linear import crossfit_linear

        figures, files = crossfit_linear(ctx, plan, classes, _extract_to)
        return StageResult(figures=figures, artifacts={"crossfit_dir": ctx.out / "crossfit"}, files=files)
    config = ClassifierConfig.from_dict({**opts, "seed": ctx.seed, "test_fraction": 0.0, "verbose": True})
    crossfit_dir = ctx.out / "crossfit"
    files = []
    for seed in sorted({f["seed"] for f in plan}):
        seed_plan = [f for f in plan if f["seed"] == seed]
        folds = [(f["train_patients"], f["test_patients"]) for f in seed_plan]
        say(f"classify: seed {seed}, {len(folds)} folds x {config.max_epochs} epochs")
        result = train_crossfitted(
            cells, folds, out_dir=ctx.out / "classifier" / f"seed{seed}", config=config, class_names=classes
        )
        if seed == plan[0]["seed"]:
            labelled = [r for r in cells.rows if r.get("label") in classes]
            y = np.array([classes.index(r["label"]) for r in labelled])
            probs = np.stack([result.probs[r["cell_id"]] for r in labelled])
            metrics = classification_metrics(y, probs, classes)
            figures["classifier_macro_f1"] = round(float(metrics["macro_f1"]), 3)
            figures["classifier_macro_auroc"] = round(float(metrics["macro_auroc"]), 3)
            print(
                f"held-out patients' cells: macro-F1 {metrics['macro_f1']:.3f}, "
                f"macro AUROC {metrics['macro_auroc']:.3f}"
            )
        for fold, fold_result in zip(seed_plan, result.folds):
            folder = crossfit_dir / fold["name"]
            say(f"classify: bags of fold {fold['name']} (counts from its classifier)")
            run_extract(
                ExtractConfig(
                    cells=ctx.path("cells_csv"),
                    encoder="classifier.file",
                    weights=str(fold_result.checkpoint),
                    out=folder,
                )
            )
            atomic_write_text(folder / "train_patients.json", json.dumps(fold["train_patients"]))
            files += [folder / "manifest.json", folder / "train_patients.json"]
    return StageResult(figures=figures, artifacts={"crossfit_dir": crossfit_dir}, files=files)


def _extract_to(ctx: Context, cells_csv: Path, out: Path, **override):
    from features.extract import ExtractConfig, run_extract

    opts = dict(ctx.config.extract or {})
    if override:  # another encoder than the extract stage's (the linear classifier's): its own name and size
        for key in ("encoder", "weights", "input_size"):
            opts.pop(key, None)
        opts.update({k: v for k, v in override.items() if v is not None})
    encoder = opts.pop("encoder", None) or "morphology.handcrafted"
    if opts.get("stain_reference"):
        opts["stain_reference"] = Path(opts["stain_reference"])
    return run_extract(ExtractConfig(cells=cells_csv, encoder=encoder, out=out, **opts))


def stage_extract(ctx: Context) -> StageResult:
    encoder = ctx.config.extract.get("encoder", "morphology.handcrafted")
    bags = ctx.out / "bags" / encoder
    report = _extract_to(ctx, ctx.path("cells_csv"), bags)
    figures = {}
    if report.cells_embedded:  # all bags reused (e.g. made by the linear classifier): no rate to give
        figures["cells_per_second"] = round(report.cells_embedded / max(report.seconds, 1e-9), 1)
    if report.failed:
        figures["failed_patients"] = len(report.failed)
    return StageResult(figures=figures, artifacts={"bags": bags}, files=[bags / "manifest.json"], headline=encoder)


def stage_compare(ctx: Context) -> StageResult:
    from mil.compare.report import write_report
    from mil.compare.runner import run_compare
    from mil.count.registry import is_count_head
    from mil.locks import command_folder

    if not has_diagnoses(ctx.path("patients_csv")):
        raise ConfigError(
            f"compare needs a diagnosis per patient, and {ctx.path('patients_csv')} has none: give cells a "
            "patients_csv (image,patient_id,diagnosis or patient_id,diagnosis), or remove the compare section"
        )
    crossfit = ctx.artifacts.get("crossfit_dir")
    main = compare_config(ctx)
    if main.counts != "truth" and crossfit and not main.cell_probs_per_fold:
        main.cell_probs_per_fold = str(crossfit)
    results = ctx.out / "results"
    with command_folder(results, command="mil run (compare)"):
        result = run_compare(main, bags=ctx.path("bags"), patients=ctx.path("patients_csv"), out=results)
        write_report(result, main, results)
    artifacts = {"results": results}
    files = [results / "summary.csv", results / "splits.json"]
    predicted = (ctx.config.compare or {}).get("predicted_counts", "soft")
    count_heads = [h for h in main.heads if is_count_head(h)]
    if crossfit and main.counts == "truth" and predicted != "none" and count_heads:
        say(f"compare: count heads on {predicted} counts of the cross-fitted classifier")
        config = compare_config(ctx, counts=predicted, heads=count_heads, cell_probs_per_fold=str(crossfit))
        second = ctx.out / "results_predicted"
        second.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(results / "splits.json", second / "splits.json")
        with command_folder(second, command="mil run (compare, predicted counts)"):
            result = run_compare(config, bags=ctx.path("bags"), patients=ctx.path("patients_csv"), out=second)
            write_report(result, config, second)
        artifacts["results_predicted"] = second
        files.append(second / "summary.csv")
    return StageResult(artifacts=artifacts, files=files)


def stage_predict(ctx: Context) -> StageResult:
    """The new patients of the section (a reader's input or a cell table) -> bags of the same encoder ->
    every saved model of the comparison (the ensemble), as `mil predict`."""
    from mil.locks import command_folder
    from mil.predict.report import write_predictions
    from mil.predict.run import read_results_config, run_predict
    from mil.protocol.conformal import check_level

    opts = ctx.config.predict
    results = ctx.path("results")
    if opts.get("cells"):
        cells_csv, patients_csv = Path(opts["cells"]), Path(opts["patients"]) if opts.get("patients") else None
    else:
        cells_csv, patients_csv, _ = _read_cells(opts, ctx.out / "predict" / "cells")
        if not has_diagnoses(patients_csv) and not opts.get("patients_csv"):
            patients_csv = None
    bags = ctx.out / "predict" / "bags"
    _extract_to(ctx, cells_csv, bags)
    level = check_level(opts.get("level") or read_results_config(results).get("conformal_level", 0.9))
    heads = opts.get("heads")
    if isinstance(heads, str):
        heads = [h.strip() for h in heads.split(",") if h.strip()]
    result = run_predict(results=results, bags=bags, patients=patients_csv, heads=heads, model=opts.get("model"))
    out = ctx.out / "predicted"
    with command_folder(out, command="mil run (predict)"):
        write_predictions(
            result,
            out,
            results=results,
            bags=bags,
            patients=patients_csv,
            n_boot=int(opts.get("n_boot", 1000)),
            level=level,
            refer_threshold=opts.get("refer_below"),
        )
    print(f"predictions of {len(result.patients)} patients in {out / 'predictions.csv'}")
    return StageResult(
        figures={"predicted_patients": len(result.patients)},
        artifacts={"predicted": out, "predict_cells_csv": cells_csv},
        files=[out / "predictions.csv"],
    )


def stage_attention(ctx: Context) -> StageResult:
    from mil.attention.load import report_from_results
    from mil.locks import command_folder

    opts = ctx.config.attention
    on_predict = opts.get("results", "compare") == "predict"
    results = ctx.path("predicted" if on_predict else "results")
    cells = ctx.path("predict_cells_csv" if on_predict else "cells_csv")
    report = ctx.out / "report"
    with command_folder(report, command="mil run (attention)"):
        summary = report_from_results(
            results,
            report,
            head=opts.get("head", "abmil"),
            cells=cells,
            top_k=int(opts.get("top_k", 8)),
            max_patients=opts.get("max_patients"),
        )
    figures = {k: round(float(summary[k]), 3) for k in ("cue_enrichment_top10", "deletion_area") if k in summary}
    return StageResult(figures=figures, artifacts={"report": report}, files=[report / "index.html"])


STAGE_FUNCTIONS = {
    "cells": stage_cells,
    "detect": stage_detect,
    "classify": stage_classify,
    "extract": stage_extract,
    "compare": stage_compare,
    "predict": stage_predict,
    "attention": stage_attention,
}
HEADERS = {
    "cells": "cells",
    "detect": "detector",
    "classify": "cell classifier",
    "extract": "extract bags",
    "compare": "compare heads",
    "predict": "predict new patients",
    "attention": "attention report",
}
