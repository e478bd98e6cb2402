"""External validation under stain shift, and what patient covariates add: 2-centre synthetic cohorts with a known
answer.

One cohort design, drawn twice with the same seed (same patients, cells and covariates): centre B stained and
scanned like centre A (`--stain-shift 0`), and differently (`--stain-shift S`). Every `mil compare` trains on
centre A and tests on every patient of centre B (`--train-where centre=A --test-where centre=B`):

  shift table        {no shift, stain shift, stain shift + each tool}: the tools are Reinhard colour normalisation
                     at extraction (`mil extract --stain-norm reinhard`, reference: a centre-A field), and
                     per-centre / per-patient feature standardisation in the heads (`--standardize-by`);
                     the no-shift run also reports the training centre's internal CV (`--with-internal-cv`);
  covariates table   on the unshifted cohort, {cells only, covariates only, cells + covariates}, with the paired
                     macro-F1 test of each head with covariates against itself without them and against the
                     covariate-only head (the two runs share their split file, so the test is paired).

    .venv/bin/python experiments/external_shift.py --out runs/external_shift

Steps already done (cohorts, cell tables, bags, results) are reused; the tables go to OUT/external_shift.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

HEADS = ["count.logreg", "count.rf", "count.meta", "mean", "abmil"]
COVARIATES = "age,sex,wbc_count,lymph_count"
EXTERNAL = ["--train-where", "centre=A", "--test-where", "centre=B"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/external_shift", help="working folder (cohorts, bags, results)")
    p.add_argument("--patients", type=int, default=240, help="patients over both centres")
    p.add_argument("--fields-per-patient", type=int, default=1)
    p.add_argument("--cells-per-field", type=int, default=40)
    p.add_argument("--overlap", type=float, default=0.8, help="synth overlap: cells carry part of the diagnosis")
    p.add_argument("--stain-shift", type=float, default=1.0, help="strength of centre B's stain/scanner shift")
    p.add_argument("--covariate-strength", type=float, default=1.0)
    p.add_argument("--covariate-missing", type=float, default=0.05)
    p.add_argument("--covariates", default=COVARIATES)
    p.add_argument("--encoder", default="efficientnet_lite0.imagenet")
    p.add_argument("--input-size", type=int, default=64)
    p.add_argument("--heads", default=",".join(HEADS))
    p.add_argument("--seeds", type=int, default=2, help="seeds of each external run (and of the covariate CV)")
    p.add_argument("--folds", type=int, default=5, help="folds of the internal and covariate CVs")
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--seed", type=int, default=3, help="seed of the synthetic cohort")
    return p.parse_args(argv)


def run(command: list[str]) -> None:
    from mil.cli import main

    if main(command) != 0:
        raise SystemExit(f"`mil {' '.join(command)}` failed")


def cohort(root: Path, shift: float, args) -> tuple[Path, Path]:
    """Synthetic 2-centre cohort -> cell table (each step skipped when done)."""
    cells = root / "cells" / "cells.csv"
    if not cells.exists():
        run(["synth", "--out", str(root / "synth"), "--seed", str(args.seed), "--patients", str(args.patients),
             "--fields-per-patient", str(args.fields_per_patient), "--cells-per-field", str(args.cells_per_field),
             "--overlap", str(args.overlap), "--centres", "2", "--stain-shift", str(shift),
             "--covariate-strength", str(args.covariate_strength), "--covariate-missing", str(args.covariate_missing),
             "--quiet"])  # fmt: skip
        run(["cells", "--format", "zenodo", "--input", str(root / "synth"), "--out", str(root / "cells")])
    return cells, root / "cells" / "patients.csv"


def reference_field(cells: Path, patients: Path) -> str:
    """The first field of the first centre-A patient: the colour reference of Reinhard normalisation."""
    from mil.cell_table import read_cell_table, read_patient_table

    centre_a = {r["patient_id"] for r in read_patient_table(patients).rows if r.get("centre") == "A"}
    return next(r["image_path"] for r in read_cell_table(cells).rows if r["patient_id"] in centre_a)


def extract(cells: Path, out: Path, args, *extra: str) -> Path:
    run(["extract", "--cells", str(cells), "--encoder", args.encoder, "--input-size", str(args.input_size),
         "--out", str(out), "--no-progress", *extra])  # fmt: skip
    return out


def compare(bags: Path, patients: Path, out: Path, args, *extra: str, heads: str | None = None, train=None):
    """One `mil compare` (reused when its summary exists); returns (result, per-head bootstrap, seconds)."""
    from mil.compare import load_compare_config, run_compare
    from mil.compare.command import add_arguments
    from mil.compare.report import write_report

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cli = parser.parse_args(["--bags", str(bags), "--patients", str(patients), "--out", str(out),
                             "--heads", heads or args.heads, "--seeds", str(args.seeds), "--folds", str(args.folds),
                             "--n-boot", str(args.n_boot), *extra])  # fmt: skip
    keys = ("heads", "folds", "seeds", "n_boot", "train_where", "test_where", "with_internal_cv", "covariates",
            "standardize_by")  # fmt: skip
    config = load_compare_config(None, **{k: getattr(cli, k) for k in keys})
    config.train = {**config.train, **(train or {})}
    start = time.perf_counter()
    result = run_compare(config, bags=bags, patients=patients, out=out, log=lambda line: print(f"  {line}"))
    per_head, _ = write_report(result, config, out)
    internal = None
    if result.internal is not None:
        from mil.compare.report import evaluate

        internal, _ = evaluate(result.internal, config)
    return result, per_head, internal, time.perf_counter() - start


def cell(b, key: str) -> str:
    return f"{b.point[key]:.3f} [{b.lo[key]:.3f}, {b.hi[key]:.3f}]"


def shift_table(rows: list[tuple[str, dict, float]], heads: list[str]) -> list[str]:
    lines = [
        "| condition | " + " | ".join(heads) + " | minutes |",
        "|---|" + "---|" * (len(heads) + 1),
    ]
    for name, per_head, seconds in rows:
        cells = [cell(per_head[h], "macro_f1") + f" / {per_head[h].point['auroc']:.3f}" for h in heads]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {seconds / 60:.1f} |")
    return lines


def paired(result_a, result_b, head_a: str, head_b: str, label_a: str, label_b: str, args):
    from mil.protocol import paired_bootstrap

    assert result_a.splits.sha256 == result_b.splits.sha256, "paired runs must share their split file"
    assert result_a.patients == result_b.patients
    p = paired_bootstrap(result_a.y_true, result_a.probs[head_a], result_b.probs[head_b], head_a=label_a,
                         head_b=label_b, n_boot=args.n_boot)  # fmt: skip
    mark = " *" if p.lo > 0 or p.hi < 0 else ""
    return f"| {label_a} - {label_b} | {p.diff:+.3f}{mark} [{p.lo:+.3f}, {p.hi:+.3f}] | {p.p_value:.3f} |"


def main(argv=None) -> int:
    args = parse_args(argv)
    from mil.atomic import atomic_write_text

    root = Path(args.out)
    heads = args.heads.split(",")
    start = time.perf_counter()
    print("== cohorts", flush=True)
    cells0, patients0 = cohort(root / "no_shift", 0.0, args)
    cells1, patients1 = cohort(root / "stain_shift", args.stain_shift, args)
    print("== bags", flush=True)
    bags0 = extract(cells0, root / "no_shift" / "bags", args)
    bags1 = extract(cells1, root / "stain_shift" / "bags", args)
    reference = reference_field(cells1, patients1)
    bags1n = extract(cells1, root / "stain_shift" / "bags_reinhard", args, "--stain-norm", "reinhard",
                     "--stain-reference", reference)  # fmt: skip
    print("== external comparisons", flush=True)
    runs = root / "results"
    no_shift, ns_heads, ns_internal, t0 = compare(bags0, patients0, runs / "no_shift", args, *EXTERNAL,
                                                  "--with-internal-cv")  # fmt: skip
    rows = [("no shift", ns_heads, t0)]
    if ns_internal is not None:
        rows.append(("no shift, internal CV of centre A", ns_internal, 0.0))
    conditions = [
        ("stain shift", bags1, ()),
        ("stain shift + Reinhard at extraction", bags1n, ()),
        ("stain shift + per-centre standardisation", bags1, ("--standardize-by", "centre")),
        ("stain shift + per-patient standardisation", bags1, ("--standardize-by", "patient")),
    ]
    for name, bags, extra in conditions:
        folder = runs / name.replace(" + ", "_").replace(" ", "_").replace("-", "_")
        _, per_head, _, seconds = compare(bags, patients1, folder, args, *EXTERNAL, *extra)
        rows.append((name, per_head, seconds))

    print("== covariates", flush=True)
    cov_heads = ",".join(h for h in ("count.logreg", "abmil") if h in heads)
    cells_only, co_heads, _, t1 = compare(bags0, patients0, runs / "cells_only", args, heads=cov_heads)
    with_cov, wc_heads, _, t2 = compare(bags0, patients0, runs / "cells_covariates", args, "--covariates",
                                        args.covariates, heads=cov_heads)  # fmt: skip
    cov_rows = [("covariates only (count.covariates)", "count.covariates", wc_heads, with_cov)]
    for h in cov_heads.split(","):
        cov_rows += [(f"{h}, cells only", h, co_heads, cells_only), (f"{h}, cells + covariates", h, wc_heads, with_cov)]
    if "abmil" in cov_heads:  # the default covariate_fusion (offset) against covariates trained with the head
        _, joint_heads, _, _ = compare(bags0, patients0, runs / "cells_covariates_joint", args, "--covariates",
                                       args.covariates, heads="abmil", train={"covariate_fusion": "joint"})  # fmt: skip
        cov_rows.append(("abmil, cells + covariates (covariate_fusion: joint)", "abmil", joint_heads, None))
    tests = []
    for h in cov_heads.split(","):
        tests.append(paired(with_cov, cells_only, h, h, f"{h} + covariates", f"{h} cells only", args))
        tests.append(paired(with_cov, with_cov, h, "count.covariates", f"{h} + covariates", "covariates only", args))

    minutes = (time.perf_counter() - start) / 60
    text = [
        f"## External validation under stain shift ({args.encoder} at {args.input_size} px; {args.patients} "
        f"patients in 2 centres, synth seed {args.seed}, overlap {args.overlap}, stain shift {args.stain_shift}; "
        f"train centre A, test centre B, {args.seeds} seeds; {minutes:.0f} min in all)",
        "",
        "macro-F1 [95% CI over the test patients] / AUROC; count heads count ground-truth labels, so the stain "
        "cannot move them.",
        "",
        *shift_table(rows, heads),
        "",
        f"## Covariates ({args.covariates}; covariate strength {args.covariate_strength}, "
        f"{args.covariate_missing:.0%} missing; {args.folds}-fold x {args.seeds} seeds on the unshifted cohort, "
        f"{(t1 + t2) / 60:.1f} min)",
        "",
        "| head | macro-F1 | balanced acc. | AUROC |",
        "|---|---|---|---|",
        *[
            f"| {name} | {cell(ph[h], 'macro_f1')} | {cell(ph[h], 'balanced_accuracy')} | {cell(ph[h], 'auroc')} |"
            for name, h, ph, _ in cov_rows
        ],  # fmt: skip
        "",
        "| paired macro-F1 test | difference [95% CI] | p |",
        "|---|---|---|",
        *tests,
        "",
        "`*`: the CI excludes 0.",
    ]
    atomic_write_text(root / "external_shift.md", "\n".join(text) + "\n")
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
