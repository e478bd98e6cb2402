"""`mil synth`: write a synthetic bone-marrow cohort in the Zenodo layout."""

from __future__ import annotations

import argparse
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        required=True,
        help="output folder (created if missing; files of the same names are overwritten, so use an empty folder)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives byte-identical output")
    parser.add_argument(
        "--config", default=None, help="synth YAML config (default: configs/synth.yaml; every knob is documented there)"
    )
    parser.add_argument("--patients", type=int, default=None, help="number of patients (overrides the config)")
    parser.add_argument("--fields-per-patient", type=int, default=None, help="smear fields (ROI images) per patient")
    parser.add_argument("--cells-per-field", type=int, default=None, help="nucleated cells drawn per field")
    parser.add_argument("--field-width", type=int, default=None, help="field width in pixels (default 512)")
    parser.add_argument("--field-height", type=int, default=None, help="field height in pixels (default 512)")
    parser.add_argument(
        "--overlap",
        type=float,
        default=None,
        help="0 = distinct compositions per diagnosis, 1 = identical (a cell count cannot separate them)",
    )
    parser.add_argument("--label-noise", type=float, default=None, help="share of labels replaced by another class")
    parser.add_argument("--cue-fraction", type=float, default=None, help="share of AML blasts that carry Auer rods")
    parser.add_argument("--no-cue", action="store_true", help="draw no morphology-only cue (no Auer rods)")
    parser.add_argument(
        "--stain-variation",
        type=float,
        default=None,
        help="scale of per-patient stain and scanner variation (0 = none)",
    )
    parser.add_argument(
        "--centres",
        type=int,
        default=None,
        help="number of centres (sites) A, B, ...; the patient table gets a `centre` column (default 1; per-centre "
        "prevalence, cells per patient and labelled share: centre_settings in the config)",
    )
    parser.add_argument(
        "--stain-shift",
        type=float,
        default=None,
        help="strength of the systematic stain and scanner difference of every centre but the first "
        "(0 = none, 1 = a clearly different site; default from the config)",
    )
    parser.add_argument(
        "--covariate-strength",
        type=float,
        default=None,
        help="how strongly age, sex and the blood counts depend on the diagnosis: the diagnosis-specific means "
        "move by this many times each covariate's `effect` SDs (0 = independent of the diagnosis)",
    )
    parser.add_argument(
        "--covariate-missing", type=float, default=None, help="share of covariate values left blank (missing)"
    )
    parser.add_argument(
        "--diagnoses",
        default=None,
        help="comma-separated subset of the config's diagnoses, e.g. AML,ALL for a binary cohort "
        "(their proportions keep their ratios; the Auer-rod cue goes if AML is left out)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar or progress lines")


def run(args: argparse.Namespace) -> int:
    from mil.synth.config import load_synth_config
    from mil.synth.writer import write_cohort

    config = load_synth_config(args.config).replace(
        patients=args.patients,
        fields_per_patient=args.fields_per_patient,
        cells_per_field=args.cells_per_field,
        field_width=args.field_width,
        field_height=args.field_height,
        overlap=args.overlap,
        label_noise=args.label_noise,
        cue_fraction=args.cue_fraction,
        cue=False if args.no_cue else None,
        stain_variation=args.stain_variation,
        centres=args.centres,
        stain_shift=args.stain_shift,
        covariate_strength=args.covariate_strength,
        covariate_missing=args.covariate_missing,
    )
    if args.diagnoses:
        config = config.only_diagnoses([d.strip() for d in args.diagnoses.split(",") if d.strip()])
    start = time.perf_counter()
    summary = write_cohort(config, args.out, seed=args.seed, progress=not args.quiet)
    print(f"wrote {summary} in {time.perf_counter() - start:.1f} s")
    return 0
