"""Encoders: self-supervised (mil pretrain DINO and SimCLR) vs ImageNet vs random vs the supervised classifier.

    .venv/bin/python experiments/encoders.py --out results/encoders

1. PBC sample (../shared/data/pbc-sample, 800 crops, 8 classes, read with `mil cells --format imagefolder`; every
   image is its own patient, so the probe folds are image-grouped): `mil pretrain` SimCLR and DINO (resnet18,
   64 px, epochs sized for about 15 CPU minutes each on the shared build machine), the cell classifier
   (`mil train-classifier` with its defaults, image-grouped split), and bags of `resnet18.random`,
   `efficientnet_lite0.imagenet` (64 and 96 px), both SSL encoders and the classifier.
   `mil probe` on all 800 cells (the classifier excluded: it trained on most of them), and again on the
   classifier's held-out images only (val + test, no cell the classifier trained on) with all encoders.
2. Synthetic cue cohort (`mil synth`, AML vs ALL at --overlap 1 with Auer rods on a share of AML blasts: only the
   cells tell the diagnoses apart): the same encoders, trained on PBC, applied to its cells (transfer; no encoder
   saw a synthetic cell), `mil probe` of the cell types and of the diagnosis (mean pooling), and `mil compare`
   of the `mean` and `abmil` heads.

Every step is cached (pretraining, classifier, bags, comparisons resume or are reused), so a rerun after a kill
goes on. Wall and CPU seconds of every step it ran and the machine's load go to OUT/timings.json; OUT/summary.md
collects the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data"
PBC = Path(os.environ.get("PBC_SAMPLE", DATA / "pbc-sample"))

# name -> mil pretrain options; resnet18 at 64 px, epochs sized for at most ~15 CPU minutes each (SimCLR's 6 epochs
# took 10 CPU minutes, 24 wall minutes on the loaded 2-core machine).
PRETRAIN = {
    "simclr": ["--method", "simclr", "--arch", "resnet18", "--crop-size", "64", "--max-epochs", "6"],
    # DINO costs ~1.6x SimCLR per epoch (two global and two local views, and the teacher): 3 epochs fit the budget;
    # batch 32 doubles the steps and momentum 0.9 lets the EMA teacher move in so few of them (0.99**24 = 0.79).
    "dino": [
        "--method",
        "dino",
        "--arch",
        "resnet18",
        "--crop-size",
        "64",
        "--max-epochs",
        "3",
        "--batch-size",
        "32",
        "--local-views",
        "2",
        "--momentum",
        "0.9",
    ],
}


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Timings:
    """OUT/timings.json: wall and CPU seconds per step, with the 1-minute load average at its start and end."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {}

    def run(self, name: str, argv: list[str], *, done: Path | None = None) -> None:
        from mil.atomic import atomic_write_text
        from mil.cli import main

        if done is not None and done.exists():
            print(f"[{name}] done before ({done}); reused", flush=True)
            return
        load0, wall0, cpu0 = os.getloadavg()[0], time.perf_counter(), _cpu()
        print(f"[{name}] mil {' '.join(argv)}", flush=True)
        if main(argv) != 0:
            raise SystemExit(f"step {name} failed: mil {' '.join(argv)}")
        self.data[name] = {
            "wall_s": round(time.perf_counter() - wall0, 1),
            "cpu_s": round(_cpu() - cpu0, 1),
            "load_start": round(load0, 2),
            "load_end": round(os.getloadavg()[0], 2),
        }
        atomic_write_text(self.path, json.dumps(self.data, indent=2) + "\n")


def held_out_cells(classifier: Path, cells_csv: Path, out_csv: Path) -> Path:
    """The cell table of the classifier's val + test patients: no cell the classifier was trained on."""
    from mil.cell_table import CellTable, read_cell_table

    split = json.loads((classifier / "metrics.json").read_text())["split"]
    keep = set(split["val"]) | set(split["test"])
    table = read_cell_table(cells_csv)
    CellTable(rows=[r for r in table.rows if r["patient_id"] in keep]).write(out_csv)
    return out_csv


def encoders(pbc: Path) -> dict[str, list[str]]:
    """Bag folder name -> mil extract options."""
    return {
        "resnet18.random": ["--encoder", "resnet18.random", "--input-size", "64"],
        "lite0.imagenet-64": ["--encoder", "efficientnet_lite0.imagenet", "--input-size", "64"],
        "lite0.imagenet-96": ["--encoder", "efficientnet_lite0.imagenet", "--input-size", "96"],
        **{
            f"ssl-{m}": ["--encoder", "ssl.file", "--weights", str(pbc / f"pretrain_{m}" / "encoder.safetensors")]
            for m in PRETRAIN
        },  # fmt: skip
        "classifier": ["--encoder", "classifier.file", "--weights", str(pbc / "classifier" / "classifier.pt")],
    }


def extract_all(t: Timings, where: str, cells_csv: Path, bags: Path, table: dict) -> list[Path]:
    folders = []
    for name, options in table.items():
        folder = bags / name
        argv = ["extract", "--cells", str(cells_csv), "--out", str(folder), "--no-progress", *options]
        t.run(f"{where} extract {name}", argv, done=folder / "extract_report.json")
        folders.append(folder)
    return folders


def main_experiment(args: argparse.Namespace) -> None:
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    t = Timings(out / "timings.json")
    pbc = out / "pbc"
    cells = pbc / "cells" / "cells.csv"
    if not PBC.is_dir():
        raise SystemExit(f"{PBC} is absent: this experiment needs the PBC sample (../shared/data/pbc-sample)")
    t.run("pbc cells", ["cells", "--format", "imagefolder", "--input", str(PBC), "--out", str(pbc / "cells")],
          done=cells)  # fmt: skip
    for method, options in PRETRAIN.items():
        target = pbc / f"pretrain_{method}"
        t.run(f"pbc pretrain {method}", ["pretrain", "--cells", str(cells), "--out", str(target), *options],
              done=target / "run" / "finished.json")  # fmt: skip
    classifier = pbc / "classifier"
    t.run("pbc train-classifier (defaults)", ["train-classifier", "--cells", str(cells), "--out", str(classifier)],
          done=classifier / "classifier.pt")  # fmt: skip
    table = encoders(pbc)
    folders = extract_all(t, "pbc", cells, pbc / "bags", table)
    unsupervised = [f for f in folders if f.name != "classifier"]
    t.run("pbc probe (800 cells)", ["probe", "--bags", *map(str, unsupervised), "--out", str(pbc / "probe_all")],
          done=pbc / "probe_all" / "probe.json")  # fmt: skip
    held = held_out_cells(classifier, cells, pbc / "held_out_cells.csv")
    t.run("pbc probe (classifier's held-out images)",
          ["probe", "--bags", *map(str, folders), "--cells", str(held), "--out", str(pbc / "probe_held_out"),
           "--plot", "none"], done=pbc / "probe_held_out" / "probe.json")  # fmt: skip

    if args.skip_synth:
        return
    synth = out / "synth"
    scells = synth / "cells" / "cells.csv"
    config = synth_config(synth, ["AML", "ALL"])
    t.run("synth cohort", ["synth", "--out", str(synth / "cohort"), "--seed", "1", "--patients", str(args.patients),
                           "--fields-per-patient", "2", "--overlap", "1.0", "--cue-fraction", "0.6", "--config",
                           str(config), "--quiet"], done=synth / "cohort")  # fmt: skip
    cells_argv = ["cells", "--format", "zenodo", "--input", str(synth / "cohort"), "--out", str(synth / "cells")]
    t.run("synth cells", cells_argv, done=scells)
    patients = synth / "cells" / "patients.csv"
    # Most telling first (a rerun with fewer --synth-encoders leaves the rest out): extract, then compare, per encoder.
    sfolders = []
    for name in args.synth_encoders.split(","):
        folder = extract_all(t, "synth", scells, synth / "bags", {name: table[name]})[0]
        sfolders.append(folder)
        t.run(f"synth compare {name}",
              ["compare", "--bags", str(folder), "--patients", str(patients), "--heads", "mean,abmil", "--folds", "5",
               "--seeds", "1", "--out", str(synth / "compare" / name)],
              done=synth / "compare" / name / "summary.md")  # fmt: skip
    t.run("synth probe", ["probe", "--bags", *map(str, sfolders), "--patients", str(patients), "--out",
                          str(synth / "probe")], done=synth / "probe" / "probe.json")  # fmt: skip
    summary(out)


def synth_config(root: Path, keep: list[str]) -> Path:
    """configs/synth.yaml with only the diagnoses in `keep` (as experiments/count_vs_attention.py does)."""
    import yaml

    from mil.atomic import atomic_write_text
    from mil.synth.config import DEFAULT_SYNTH_CONFIG

    spec = yaml.safe_load(DEFAULT_SYNTH_CONFIG.read_text())
    spec["diagnoses"] = {k: v for k, v in spec["diagnoses"].items() if k in keep}
    path = root / "synth.yaml"
    atomic_write_text(path, yaml.safe_dump(spec, sort_keys=False))
    return path


def summary(out: Path) -> None:
    """OUT/summary.md: the probe tables and the diagnosis macro-F1 of each encoder's mean and abmil heads."""
    from mil.atomic import atomic_write_text

    parts = []
    tables = {
        "PBC, all 800 cells": out / "pbc" / "probe_all" / "probe.md",
        "PBC, the classifier's held-out images": out / "pbc" / "probe_held_out" / "probe.md",
        "synthetic cue cohort (encoders trained on PBC)": out / "synth" / "probe" / "probe.md",
    }
    for title, path in tables.items():
        if path.exists():
            parts += [f"## {title}", "", path.read_text(), ""]
    compare = out / "synth" / "compare"
    if compare.is_dir():
        parts += ["## synthetic cue cohort: diagnosis macro-F1 [95% CI] (mil compare, 5 folds)", "",
                  "| encoder | mean | abmil |", "|---|---|---|"]  # fmt: skip
        for folder in sorted(compare.iterdir()):
            metrics = _head_f1(folder)
            parts.append(f"| {folder.name} | {metrics.get('mean', '')} | {metrics.get('abmil', '')} |")
    timings = json.loads((out / "timings.json").read_text()) if (out / "timings.json").exists() else {}
    parts += ["", "## time per step (wall s, CPU s, load at start and end)", "", "| step | wall | CPU | load |",
              "|---|---|---|---|"]  # fmt: skip
    parts += [
        f"| {k} | {v['wall_s']} | {v['cpu_s']} | {v['load_start']} - {v['load_end']} |" for k, v in timings.items()
    ]
    atomic_write_text(out / "summary.md", "\n".join(parts) + "\n")
    print("\n".join(parts))


def _head_f1(folder: Path) -> dict[str, str]:
    """head -> 'macro-F1 [lo, hi]' from a comparison's metrics.csv."""
    import csv

    path = folder / "summary.csv"
    if not path.exists():
        return {}
    found = {}
    for row in csv.DictReader(path.read_text().splitlines()):
        head = row.get("head", "")
        if "macro_f1" in row and head in ("mean", "abmil"):
            found[head] = (
                f"{float(row['macro_f1']):.3f} [{float(row['macro_f1_lo']):.3f}, {float(row['macro_f1_hi']):.3f}]"
            )
    return found


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "results" / "encoders", help="output folder")
    parser.add_argument("--patients", type=int, default=30, help="patients of the synthetic cue cohort")
    parser.add_argument("--skip-synth", action="store_true", help="the PBC part only")
    parser.add_argument(
        "--synth-encoders",
        default="resnet18.random,ssl-simclr,ssl-dino,lite0.imagenet-96,classifier",
        help="bag folders of the synthetic part, in the order they are made",
    )
    parser.add_argument("--summary-only", action="store_true", help="rewrite OUT/summary.md from what is there")
    args = parser.parse_args()
    if args.summary_only:
        summary(args.out.resolve())
    else:
        main_experiment(args)
