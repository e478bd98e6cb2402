"""Does a model that sees the cells beat the cell differential? Synthetic cohorts with a known answer.

Three cohorts from `mil synth`, each read with the Zenodo reader, embedded with one encoder and compared by
`mil compare` on the same splits:
  default          the generator's defaults (compositions differ by diagnosis; Auer rods on AML blasts):
                   ground-truth counts should suffice (criterion: count.logreg macro-F1 >= 0.9);
  cue_on_overlap   AML vs ALL with identical compositions (--overlap 1) and Auer rods on a share of AML blasts
                   (--cue-fraction, 0.6 here): only a head that sees the cells can tell AML (criterion: abmil
                   beats every count head, paired CI > 0);
  cue_off_overlap  the same without Auer rods: nothing separates the diagnoses, so no such gap.

    .venv/bin/python experiments/count_vs_attention.py --out runs/count_vs_attention

(about 5 min on 2 idle CPU cores, 25 on busy ones; `--cohorts cue_on_overlap,cue_off_overlap` runs the cue pair only)

Steps already done (a cohort's cell table, its bags) are reused; results go to OUT/<cohort>/results and the
tables to OUT/count_vs_attention.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# cohort -> (mil synth options, diagnoses kept from configs/synth.yaml; None = all three)
# The cue cohorts keep AML and ALL only: with three diagnoses at --overlap 1, ALL and CML are identical in every
# respect, so half of every training signal is noise and a 40-60 patient cohort cannot show whether a head saw the
# rods. With AML vs ALL, the cue is the one thing that separates the diagnoses.
COHORTS = {
    "default": ([], None),
    "cue_on_overlap": (["--overlap", "1.0"], ["ALL", "AML"]),
    "cue_off_overlap": (["--overlap", "1.0", "--no-cue"], ["ALL", "AML"]),
}
COUNT_HEADS = ["count.logreg", "count.rf", "count.gb", "count.ratio", "count.meta"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/count_vs_attention", help="working folder (cohorts, bags, results)")
    p.add_argument("--cohorts", default=",".join(COHORTS), help=f"subset of {', '.join(COHORTS)}")
    p.add_argument("--patients", type=int, default=60)
    p.add_argument("--fields-per-patient", type=int, default=3)
    p.add_argument("--cue-fraction", type=float, default=0.6, help="share of AML blasts with Auer rods (synth: 0.3)")
    p.add_argument("--encoder", default="morphology.handcrafted", help="e.g. morphology.handcrafted, resnet18.random")
    p.add_argument("--heads", default=",".join([*COUNT_HEADS, "mean", "abmil"]))
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seeds", type=int, default=1, help="k-fold repeats (1 keeps the run short on a CPU)")
    p.add_argument("--max-epochs", type=int, help="override train.max_epochs of configs/compare.yaml")
    p.add_argument("--seed", type=int, default=1, help="seed of the synthetic cohorts")
    return p.parse_args(argv)


def synth_config(root: Path, keep: list[str]) -> Path:
    """configs/synth.yaml with only the diagnoses in `keep` (their patient shares renormalised by the generator)."""
    import yaml

    from mil.atomic import atomic_write_text
    from mil.synth.config import DEFAULT_SYNTH_CONFIG

    spec = yaml.safe_load(DEFAULT_SYNTH_CONFIG.read_text())
    spec["diagnoses"] = {k: v for k, v in spec["diagnoses"].items() if k in keep}
    path = root / "synth.yaml"
    atomic_write_text(path, yaml.safe_dump(spec, sort_keys=False))
    return path


def prepare(name: str, args: argparse.Namespace, root: Path) -> tuple[Path, Path]:
    """Synth -> cell table -> bags, each skipped when its output is already there (extraction resumes)."""
    from mil.cli import main

    cells = root / "cells" / "cells.csv"
    if not cells.exists():
        options, keep = COHORTS[name]
        extra = ["--cue-fraction", str(args.cue_fraction)] if args.cue_fraction is not None else []
        if keep:
            extra += ["--config", str(synth_config(root, keep))]
        synth = ["synth", "--out", str(root / "synth"), "--seed", str(args.seed), "--patients", str(args.patients),
                 "--fields-per-patient", str(args.fields_per_patient), "--quiet", *options, *extra]  # fmt: skip
        for command in (
            synth,
            ["cells", "--format", "zenodo", "--input", str(root / "synth"), "--out", str(root / "cells")],
        ):
            if main(command) != 0:
                raise SystemExit(f"`mil {' '.join(command)}` failed")
    bags = root / f"bags_{args.encoder}"
    if main(["extract", "--cells", str(cells), "--encoder", args.encoder, "--out", str(bags), "--no-progress"]) != 0:
        raise SystemExit(f"extraction of cohort {name} failed")
    return bags, root / "cells" / "patients.csv"


def compare(name: str, args: argparse.Namespace, bags: Path, patients: Path, out: Path):
    from mil.compare import load_compare_config, run_compare
    from mil.compare.report import write_report

    config = load_compare_config(None, heads=args.heads, folds=args.folds, seeds=args.seeds, counts="truth")
    if args.max_epochs:
        config.train = {**config.train, "max_epochs": args.max_epochs}
    start = time.perf_counter()
    result = run_compare(config, bags=bags, patients=patients, out=out, log=lambda line: print(f"  {name}: {line}"))
    per_head, paired = write_report(result, config, out)
    return per_head, paired, time.perf_counter() - start


def table(name: str, per_head: dict, paired: list, seconds: float) -> list[str]:
    lines = [f"### {name} ({seconds / 60:.1f} min)", "", "| head | macro-F1 [95% CI] | balanced acc. | AUROC |",
             "|---|---|---|---|"]  # fmt: skip
    for head, b in per_head.items():
        f1 = f"{b.point['macro_f1']:.3f} [{b.lo['macro_f1']:.3f}, {b.hi['macro_f1']:.3f}]"
        lines.append(f"| {head} | {f1} | {b.point['balanced_accuracy']:.3f} | {b.point['auroc']:.3f} |")
    rows = [p for p in paired if p.head_a in ("abmil", "mean") and p.head_b.startswith("count.")]
    if rows:
        lines += ["", "| attention - count (macro-F1) | difference [95% CI] | p |", "|---|---|---|"]
        lines += [
            f"| {p.head_a} - {p.head_b} | {p.diff:+.3f} [{p.lo:+.3f}, {p.hi:+.3f}] | {p.p_value:.3f} |" for p in rows
        ]
    return lines + [""]


def criteria(results: dict) -> list[str]:
    out = []
    if "default" in results:
        f1 = results["default"][0]["count.logreg"].point["macro_f1"]
        verdict = "yes" if f1 >= 0.9 else "no"
        out.append(f"- default cohort, ground-truth counts: count.logreg macro-F1 {f1:.3f} (>= 0.9: {verdict})")
    for name in ("cue_on_overlap", "cue_off_overlap"):
        if name not in results:
            continue
        gaps = [p for p in results[name][1] if p.head_a == "abmil" and p.head_b.startswith("count.")]
        beats = all(p.lo > 0 for p in gaps) and bool(gaps)
        worst = min(gaps, key=lambda p: p.lo) if gaps else None
        detail = (
            f"smallest gap {worst.head_a} - {worst.head_b} {worst.diff:+.3f} [{worst.lo:+.3f}, {worst.hi:+.3f}]"
            if worst
            else ""
        )
        out.append(
            f"- {name}: abmil beats every count head with the paired CI above 0: {'yes' if beats else 'no'} ({detail})"
        )
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    from mil.atomic import atomic_write_text

    root = Path(args.out)
    for name in args.cohorts.split(","):
        if name not in COHORTS:
            raise SystemExit(f"unknown cohort {name!r}; choose from {', '.join(COHORTS)}")
        print(f"== {name}", flush=True)
        bags, patients = prepare(name, args, root / name)
        per_head, paired, seconds = compare(name, args, bags, patients, root / name / "results")
        # each cohort keeps its own table and verdict, so running a subset never erases the others' results
        cohort_text = "\n".join(table(name, per_head, paired, seconds) + criteria({name: (per_head, paired)}))
        atomic_write_text(root / name / "table.md", cohort_text + "\n")
    header = (
        f"## Count vs attention ({args.encoder}, {args.patients} patients per cohort, cue fraction "
        f"{args.cue_fraction}, {args.folds}-fold x {args.seeds} seed(s), ground-truth counts)\n"
    )
    done = [root / name / "table.md" for name in COHORTS if (root / name / "table.md").exists()]
    text = header + "\n" + "\n".join(p.read_text() for p in done)
    atomic_write_text(root / "count_vs_attention.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
