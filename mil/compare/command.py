"""`mil compare --bags BAGS --patients PATIENTS --heads count.logreg,abmil --out RESULTS`."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bags", required=True, help="bag directory of one encoder (from `mil extract`)")
    parser.add_argument("--patients", required=True, help="patient table CSV (patient_id, diagnosis, ...)")
    parser.add_argument("--out", required=True, help="results folder; its splits.json is reused when present")
    parser.add_argument(
        "--heads",
        help="comma-separated heads, e.g. count.logreg,count.meta,mean,abmil (`mil heads` lists every attention and "
        "count head; default: the config's heads)",
    )
    parser.add_argument("--config", help="YAML config (default configs/compare.yaml); unknown keys are errors")
    parser.add_argument("--folds", type=int, help="outer folds (default 5)")
    parser.add_argument("--seeds", type=int, help="repeats of the k-fold with seeds seed..seed+N-1 (default 3)")
    parser.add_argument("--seed", type=int, help="first seed (default 0)")
    parser.add_argument(
        "--counts",
        choices=("truth", "hard", "soft"),
        help="where count heads' differential comes from: ground-truth labels, a classifier's argmax or summed "
        "probabilities (default truth)",
    )
    parser.add_argument("--group-by", help="YAML with `groups:`: count heads see group shares instead of classes")
    parser.add_argument(
        "--cell-probs-per-fold",
        help="DIR with one bag folder per outer fold (DIR/seed{S}_fold{F}) from cross-fitted classifiers",
    )
    parser.add_argument(
        "--train-where",
        help="external validation: train on patients whose patient-table COLUMN=VALUE[,VALUE] (e.g. cohort=Discovery)",
    )
    parser.add_argument("--test-where", help="external validation: test on these patients (e.g. cohort=Validation)")
    parser.add_argument(
        "--with-internal-cv",
        action="store_true",
        default=None,
        help="with an external split: also run the k-fold on the training cohort alone, shown beside",
    )
    parser.add_argument(
        "--covariates", help="comma-separated patient-table columns given to every head, e.g. age,sex,lymph_count"
    )
    parser.add_argument(
        "--allow-separating-covariates",
        action="store_true",
        default=None,
        help="accept a covariate that separates the training diagnoses on its own (refused as a likely leak)",
    )
    parser.add_argument(
        "--standardize-by",
        help="attention heads: z-score each bag by its own cells (patient) or by a column's groups (e.g. centre)",
    )
    parser.add_argument("--max-epochs", type=int, help="attention heads: override train.max_epochs (default 30)")
    parser.add_argument("--n-boot", type=int, help="bootstrap replicates (default 1000)")
    parser.add_argument("--conformal-level", type=float, help="level of the conformal prediction sets (default 0.9)")
    parser.add_argument("--devices", type=int, help="attention heads train with Lightning DDP on N devices")
    parser.add_argument("--accelerator", help="cpu | gpu | auto (default from config: cpu)")
    parser.add_argument("--wandb", choices=("disabled", "offline", "online"), help="wandb logging (default disabled)")


def run(args: argparse.Namespace) -> int:
    from mil.compare.config import load_compare_config
    from mil.compare.report import write_report
    from mil.compare.runner import run_compare
    from mil.locks import command_folder

    config = load_compare_config(
        args.config,
        heads=args.heads,
        folds=args.folds,
        seeds=args.seeds,
        seed=args.seed,
        counts=args.counts,
        group_by=args.group_by,
        cell_probs_per_fold=args.cell_probs_per_fold,
        n_boot=args.n_boot,
        conformal_level=args.conformal_level,
        devices=args.devices,
        accelerator=args.accelerator,
        wandb=args.wandb,
        train_where=args.train_where,
        test_where=args.test_where,
        with_internal_cv=args.with_internal_cv,
        covariates=args.covariates,
        allow_separating_covariates=args.allow_separating_covariates,
        standardize_by=args.standardize_by,
    )
    if args.max_epochs is not None:
        config.train = {**config.train, "max_epochs": args.max_epochs}
    out = Path(args.out)
    with command_folder(out, command="mil compare"):  # one run per results folder (RELIABILITY promise 8)
        result = run_compare(config, bags=args.bags, patients=args.patients, out=out)
        write_report(result, config, out)
    print((out / "summary.md").read_text())
    print(f"results in {out}")
    return 0
