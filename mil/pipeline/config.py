"""The pipeline file of `mil run`: one YAML for cells -> [detect] -> [classify] -> extract -> compare -> [predict]
-> attention. Strict: an unknown section or key is an error naming the valid ones (and the closest to a typo).

Each section is one stage. `cells` is required; every other stage runs when its section is there and does not say
`skip: true`. A stage section takes the keys of the code it calls (DetectorConfig / DetectorTrainConfig,
ClassifierConfig, ExtractConfig, CompareConfig, ...) plus the few that say how the stages connect; `mil init`
writes a commented template.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mil.errors import ConfigError, refuse_unknown_keys

STAGES = ("cells", "detect", "classify", "extract", "compare", "predict", "attention")
TOP_KEYS = ("out", "seed", *STAGES)
# Reader options of `mil cells` (flag --patients-csv -> key patients_csv), shared by `cells` and `predict`.
READER_KEYS = ("format", "input", "label_map", "patients_csv", "patient_from", "voc_origin", "clinical",
               "roi_padding", "max_roi_size", "check_images")  # fmt: skip
# beside (mode evaluate, default true): the detector trains and is scored in a second process while the later
# stages go on with the annotated cells (mil.pipeline.beside), when the run has 2 or more threads.
DETECT_OWN = ("skip", "mode", "checkpoint", "train_fraction", "ignore_labels", "min_score",
              "classical_fields_per_patient", "beside")  # fmt: skip
# Keys that change how a stage runs, not what it computes: left out of the stage's digest (its cache key).
NOT_DIGESTED = {"detect": ("beside",)}
DETECT_TRAIN = ("epochs", "batch_size", "lr", "weight_decay", "warmup_steps", "augment", "max_steps", "device")
DETECT_MODES = ("evaluate", "apply")
CLASSIFY_OWN = ("skip", "mode", "method")
CLASSIFY_MODES = ("crossfit", "single")
# finetune: the CNN of `mil train-classifier` (ClassifierConfig keys); linear: a frozen encoder's features (the
# bags of `encoder`, shared with the extract stage when it is the same encoder) and a logistic-regression head.
CLASSIFY_METHODS = ("finetune", "linear")
LINEAR_KEYS = ("encoder", "input_size", "C", "max_iter")
EXTRACT_KEYS = ("skip", "encoder", "weights", "input_size", "batch_size", "workers", "device", "dtype", "context",
                "stain_norm", "stain_reference")  # fmt: skip
COMPARE_OWN = ("skip", "config", "predicted_counts")
PREDICTED_COUNTS = ("soft", "hard", "none")
PREDICT_KEYS = ("skip", *READER_KEYS, "cells", "patients", "heads", "model", "n_boot", "level", "refer_below")
ATTENTION_KEYS = ("skip", "head", "top_k", "max_patients", "results")
ATTENTION_RESULTS = ("compare", "predict")
# Paths inside a pipeline file are relative to the file's folder (so a copied project keeps working).
PATH_KEYS = {
    "cells": ("input", "label_map", "patients_csv", "clinical"),
    "detect": ("checkpoint",),
    "extract": ("weights", "stain_reference"),
    "compare": ("config", "group_by", "groups"),
    "predict": ("input", "label_map", "patients_csv", "clinical", "cells", "patients"),
}


@dataclass
class PipelineConfig:
    """A parsed pipeline file: each stage's section (None = skipped), with paths resolved."""

    path: Path
    out: Path | None
    seed: int
    cells: dict
    detect: dict | None = None
    classify: dict | None = None
    extract: dict | None = None
    compare: dict | None = None
    predict: dict | None = None
    attention: dict | None = None
    raw: dict = field(default_factory=dict)

    def section(self, stage: str) -> dict | None:
        return getattr(self, stage)

    def planned(self) -> list[str]:
        """The stages this file runs, in order."""
        return [s for s in STAGES if self.section(s) is not None]


def load_pipeline(path: str | Path) -> PipelineConfig:
    """Read and check a pipeline file; every problem of every section in one ConfigError."""
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as e:
        raise ConfigError(f"pipeline file {path} does not exist; write one with `mil init --out {path}`") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"pipeline file {path} is not valid YAML: {e}") from e
    if not isinstance(spec, dict):
        raise ConfigError(f"pipeline file {path} must be a YAML mapping of sections (cells:, extract:, ...)")
    return parse_pipeline(spec, path)


def parse_pipeline(spec: dict, path: Path) -> PipelineConfig:
    problems: list[str] = []

    def check(keys, known, what: str) -> None:
        try:
            refuse_unknown_keys(keys, known, what)
        except ConfigError as e:
            problems.append(str(e))

    where = f"pipeline file {path}"
    check(spec, TOP_KEYS, where)
    sections: dict[str, dict | None] = {}
    for stage in STAGES:
        value = spec.get(stage)
        if value is None or (isinstance(value, dict) and value.get("skip")):
            sections[stage] = None
            continue
        if not isinstance(value, dict):
            problems.append(f"{where}: section {stage!r} must be a mapping of key: value (or left out)")
            sections[stage] = None
            continue
        sections[stage] = {k: v for k, v in value.items() if k != "skip"}
    if sections["cells"] is None:
        problems.append(f"{where}: section 'cells' is required (synth: {{...}}, or format: + input:)")
    base = path.parent
    for stage, value in sections.items():
        if value is None:
            continue
        check(value, _known_keys(stage), f"{where}, section {stage}")
        for key in PATH_KEYS.get(stage, ()):
            if isinstance(value.get(key), str) and value[key]:
                value[key] = str(_resolve(value[key], base))
    problems += _check_values(sections, where)
    if problems:
        raise ConfigError("\n".join(problems))
    out = spec.get("out")
    return PipelineConfig(
        path=path,
        out=_resolve(out, base) if out else None,
        seed=int(spec.get("seed", 0) or 0),
        raw=spec,
        **sections,
    )


def _resolve(value: str, base: Path) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p


def _known_keys(stage: str) -> tuple[str, ...]:
    if stage == "cells":
        return ("skip", "synth", *READER_KEYS)
    if stage == "detect":
        from mil.detector.model import DetectorConfig

        return (*DETECT_OWN, *DETECT_TRAIN, *DetectorConfig.__dataclass_fields__)
    if stage == "classify":
        from mil.classifier.train import ClassifierConfig

        fields = [f for f in ClassifierConfig.__dataclass_fields__ if f not in ("seed", "verbose", "resume")]
        return (*CLASSIFY_OWN, *LINEAR_KEYS, *fields)
    if stage == "extract":
        return EXTRACT_KEYS
    if stage == "compare":
        from mil.compare.config import CompareConfig

        return (*COMPARE_OWN, *(f.name for f in dataclasses.fields(CompareConfig) if f.name != "seed"))
    if stage == "predict":
        return PREDICT_KEYS
    return ATTENTION_KEYS


def _check_values(sections: dict[str, dict | None], where: str) -> list[str]:
    problems = []
    cells = sections["cells"]
    if cells is not None:
        if "synth" in cells and "format" in cells:
            problems.append(f"{where}: cells has both synth and format; use one (synth: a built-in cohort)")
        elif "synth" not in cells and not ("format" in cells and "input" in cells):
            problems.append(f"{where}: cells needs `synth: {{}}` or `format:` and `input:` (e.g. format: voc)")
        if "synth" in cells and set(cells) - {"synth"}:
            problems.append(f"{where}: cells.synth takes no reader keys ({sorted(set(cells) - {'synth'})})")
    detect = sections["detect"]
    if detect is not None:
        mode = detect.get("mode", "evaluate")
        if mode not in DETECT_MODES:
            problems.append(f"{where}: detect.mode {mode!r} is not one of {list(DETECT_MODES)}")
        if mode == "evaluate" and detect.get("checkpoint"):
            problems.append(f"{where}: detect.checkpoint is for mode apply; mode evaluate trains its own detector")
        if not isinstance(detect.get("beside", True), bool):
            problems.append(f"{where}: detect.beside must be true or false")
        if not 0 < float(detect.get("train_fraction", 0.3)) < 1:
            problems.append(f"{where}: detect.train_fraction must lie in (0, 1)")
    classify = sections["classify"]
    if classify is not None:
        method = classify.get("method", "finetune")
        if method not in CLASSIFY_METHODS:
            problems.append(f"{where}: classify.method {method!r} is not one of {list(CLASSIFY_METHODS)}")
        own = set(LINEAR_KEYS) if method == "finetune" else set(classify) - {*CLASSIFY_OWN, *LINEAR_KEYS}
        wrong = sorted(own & set(classify))
        if wrong:
            problems.append(f"{where}: classify keys {wrong} do not apply to method {method!r}")
        if method == "linear" and classify.get("mode") == "single":
            problems.append(f"{where}: classify method linear is cross-fitted (mode crossfit) only")
    if classify is not None and classify.get("mode", "crossfit") not in CLASSIFY_MODES:
        problems.append(f"{where}: classify.mode {classify['mode']!r} is not one of {list(CLASSIFY_MODES)}")
    if classify is not None and classify.get("mode", "crossfit") == "crossfit" and sections["compare"] is None:
        problems.append(
            f"{where}: classify.mode crossfit uses the compare stage's outer folds; add a compare section, "
            "or set classify.mode: single (one classifier on a patient-grouped split)"
        )
    if sections["extract"] is None and any(sections[s] is not None for s in ("compare", "predict", "attention")):
        problems.append(f"{where}: compare, predict and attention read the bags of the extract stage; add extract:")
    compare = sections["compare"]
    if compare is not None and compare.get("predicted_counts", "soft") not in PREDICTED_COUNTS:
        problems.append(f"{where}: compare.predicted_counts must be one of {list(PREDICTED_COUNTS)}")
    predict = sections["predict"]
    if predict is not None:
        if sections["compare"] is None:
            problems.append(f"{where}: predict applies the heads the compare stage saved; add compare:")
        if bool(predict.get("cells")) == bool(predict.get("format")):
            problems.append(f"{where}: predict needs the new patients as `cells: CELLS.csv` or `format:` + `input:`")
    attention = sections["attention"]
    if attention is not None:
        results = attention.get("results", "compare")
        if results not in ATTENTION_RESULTS:
            problems.append(f"{where}: attention.results must be one of {list(ATTENTION_RESULTS)}")
        elif sections[results] is None:
            problems.append(f"{where}: attention.results is {results!r}, but that stage is not in the file")
    return problems
