"""`mil init --out my.yaml`: a commented pipeline file for your own data; edit the two paths marked EDIT and run
`mil run my.yaml`."""

from __future__ import annotations

import argparse
from pathlib import Path

TEMPLATE = """\
# A cytomil pipeline file: `mil run {name}` runs every stage below in order, each cached and resumable
# (a rerun reuses the stages whose settings and inputs did not change; the first line printed says which).
# Every key is checked: an unknown key is an error that names the valid ones. Paths are relative to this file.
#
# To start: EDIT the two paths marked EDIT below (your data, and where the results go), then `mil run {name}`.
# Stages: cells -> [detect] -> [classify] -> extract -> compare -> [predict] -> attention.
# A stage runs when its section is there; `skip: true` (or deleting the section) leaves it out.
# compare, predict and attention need a diagnosis per patient: without one (e.g. a detection or crop dataset)
# they are skipped with a note; give `patients_csv` below to add diagnoses.

out: runs/my_pipeline       # EDIT: the output folder (or pass `mil run {name} --out DIR`)
seed: 0

cells:                      # your data -> cells/cells.csv + cells/patients.csv (as `mil cells`)
  format: {format}         # zenodo, idc, coco, yolo, voc, imagefolder, patient-folders (`mil cells --help`)
  input: path/to/your/data  # EDIT: the dataset's root folder (or annotation file)
  patients_csv: null        # CSV image,patient_id[,diagnosis,...] (coco/yolo/voc/imagefolder) or
                            # patient_id,diagnosis[,covariates] (patient-folders); null: each image its own patient
  label_map: null           # a label map YAML (layout of configs/label_map.yaml); null: the format's default
  # synth: {{patients: 30}}  # instead of format/input: the built-in synthetic cohort (see configs/demo.yaml)

detect:                     # Faster R-CNN on the cell table's boxes (as `mil train-detector` / `mil detect`)
  skip: true                # remove to run it
  mode: evaluate            # evaluate: train on train_fraction of the patients, AP@0.5 on the others (your
                            # annotated cells go on); apply: detect every image, those cells go on
  checkpoint: null          # apply only: detector.pt of `mil train-detector` (null: train one on all boxes)
  train_fraction: 0.3
  beside: true              # evaluate, 2+ threads: train and score in a second process while the later stages
                            # go on (they read the annotated cells, not the detector's); false: first, alone
  tta: true                 # detect on the field and its mirror images, fused (2-3x detection time, a bit more AP)
  backbone: efficientnet_lite0_fpn
  init: imagenet            # offline EfficientNet-Lite0 ImageNet weights
  pixel_scale: 1.0          # resize fields before the network (0.5-0.75 is about 2-4x faster on a CPU)
  epochs: 10
  device: cpu               # cuda on a GPU

classify:                   # the cell-type classifier (as `mil train-classifier` / `mil classify`)
  skip: true                # remove to run it (needs labelled cells)
  mode: crossfit            # crossfit: one model per outer fold of compare, so no patient is counted by a
                            # model that saw it (count heads then also run on predicted counts);
                            # single: one model on a patient split (data without diagnoses falls back to it)
  arch: tf_efficientnet_lite0
  init: imagenet
  crop_size: 64
  max_epochs: 10
  accelerator: cpu          # gpu on a GPU

extract:                    # one HDF5 bag per patient (as `mil extract`; `mil encoders` lists the encoders)
  encoder: morphology.handcrafted   # no weights needed; e.g. dinobloom_s.v1 with weights: PATH for real work
  input_size: 64
  device: cpu

compare:                    # count-based and attention-MIL heads on the same splits (as `mil compare`)
  heads: [count.logreg, count.rf, count.meta, mean, abmil]
  folds: 5
  seeds: 1
  counts: truth             # truth (labels), hard or soft (the classify stage's cross-fitted probabilities)
  predicted_counts: soft    # with classify crossfit: the count heads again on predicted counts (none: off)
  # any key of configs/compare.yaml: covariates, train_where/test_where, train: {{max_epochs: 30}}, ...

predict:                    # apply the saved heads to new patients (as `mil predict`)
  skip: true                # remove to run it
  format: {format}
  input: path/to/new/patients   # the new patients' data, read like cells (or cells: CELLS.csv)
  patients_csv: null        # their diagnoses, if known: then metrics with CIs are reported

attention:                  # galleries, overlays, deletion curves, index.html (as `mil attention`)
  head: abmil
  top_k: 8
  results: compare          # compare, or predict (the new patients)
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("pipeline.yaml"), help="the pipeline file to write")
    parser.add_argument(
        "--format",
        default="zenodo",
        help="input format the template reads (zenodo, idc, coco, yolo, voc, imagefolder, patient-folders)",
    )
    parser.add_argument("--force", action="store_true", help="overwrite an existing file")


def template(name: str = "pipeline.yaml", format: str = "zenodo") -> str:
    return TEMPLATE.format(name=name, format=format)


def run(args: argparse.Namespace) -> int:
    from mil.atomic import atomic_write_text
    from mil.errors import ConfigError
    from mil.pipeline.config import parse_pipeline
    from mil.readers.registry import get_reader

    get_reader(args.format)  # an unknown format is named here, not at `mil run`
    if args.out.exists() and not args.force:
        raise ConfigError(f"{args.out} exists; pass --force to overwrite it, or --out another file")
    text = template(args.out.name, args.format)
    import yaml

    parse_pipeline(yaml.safe_load(text), args.out)  # the template is always a valid pipeline file
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, text)
    print(f"wrote {args.out}: edit the two paths marked EDIT (out:, cells.input:), then `mil run {args.out}`")
    return 0
