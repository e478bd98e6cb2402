"""Do the 90% conformal sets of `mil compare` cover 90% of new patients, and does temperature scaling fix an
over-confident head? Synthetic cohorts written by the production bag writer, cheap features.

Part 1 (coverage): per draw a cohort of 1,100 patients with imbalanced diagnoses (50/30/20%): 500 form the
training cohort (`cohort=D`, inner validation split 20%), 600 the external test cohort (`cohort=V`); `mil compare`'s
own runner and report code (external split, 2 seeds) with a count head (count.logreg: sigmoid-calibrated within
its training patients, cross-conformal scores) and an attention head (mean pooling: temperature and conformal
scores from the inner validation patients), and their seed ensembles (mean probability at the members' mean
threshold).
Reported: empirical coverage of the marginal sets and of the class-conditional sets per diagnosis, mean set size,
over the 600 test patients x 2 seeds of each draw, mean [min, max] over draws.

Part 2 (temperature): an over-confident attention head (abmil, no early stopping: trained without validation
patients for 50 epochs at a high learning rate and no weight decay, so its last epoch is kept) on 90 patients; the
temperature is fitted on 60 validation patients it never trained on (mil.compare.trust.attention_trust, the
function `mil compare` calls per fold) and applied to 600 test patients: ECE, Brier and NLL before and after
(compositions that separate the diagnoses better than in part 1).

    python experiments/conformal_coverage.py --out runs/conformal_coverage [--draws 4 --temperature-draws 2]

Prints both tables (markdown) and writes them to OUT/coverage.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CELL_TYPES = ["myeloblast", "lymphoblast", "segmented_neutrophil", "lymphocyte"]
DIAGNOSES = ["ALL", "AML", "CML"]
PREVALENCE = np.array([0.5, 0.3, 0.2])
# Overlapping compositions: a diagnosis is a matter of degree, so sets of more than one diagnosis occur.
COMPOSITION = np.array([[0.20, 0.40, 0.20, 0.20], [0.40, 0.20, 0.20, 0.20], [0.20, 0.20, 0.40, 0.20]])
# Part 2: compositions that separate the diagnoses better, so the over-confident head has something to be sure of.
DISTINCT = np.array([[0.10, 0.50, 0.20, 0.20], [0.50, 0.10, 0.20, 0.20], [0.10, 0.10, 0.60, 0.20]])
CELLS = 16


def write_cohort(root: Path, n: int, seed: int, cohorts: dict[str, int], composition=COMPOSITION):
    """n patients (diagnoses drawn with PREVALENCE), bags through features.bags.write_bag, a patient table with a
    `cohort` column: the first cohorts[name] patients go to each named cohort in order."""
    from features.bags import Bag, write_bag
    from mil.cell_table import PatientTable

    rng = np.random.default_rng(seed)
    names = [name for name, count in cohorts.items() for _ in range(count)]
    assert len(names) == n
    centers = np.eye(len(CELL_TYPES), 6) * 1.5
    rows = []
    for i in range(n):
        pid, dx = f"P{i:04d}", int(rng.choice(len(DIAGNOSES), p=PREVALENCE))
        label = rng.choice(len(CELL_TYPES), size=CELLS, p=composition[dx])
        features = (centers[label] + 0.7 * rng.normal(size=(CELLS, 6))).astype(np.float32)
        bag = Bag(
            patient_id=pid,
            features=features,
            boxes=np.tile([0, 0, 8, 8], (CELLS, 1)).astype(np.int32),
            image_index=np.zeros(CELLS, dtype=np.int32),
            image_paths=["field.png"],
            cell_id=[f"{pid}:{j}" for j in range(CELLS)],
            label=label.astype(np.int64),
            attrs={"label_classes": CELL_TYPES, "encoder_config": {"name": "synthetic.features", "embed_dim": 6}},
        )
        write_bag(root / "bags" / f"{pid}.h5", bag)
        rows.append({"patient_id": pid, "diagnosis": DIAGNOSES[dx], "cohort": names[i]})
    PatientTable(rows=rows).write(root / "patients.csv")
    return root / "bags", root / "patients.csv"


def coverage_draw(out: Path, draw: int, level: float) -> dict[str, dict]:
    from mil.compare import load_compare_config, run_compare
    from mil.compare.trust_report import trust_entries, trust_metrics

    root = out / f"coverage_draw{draw}"
    if not (root / "patients.csv").exists():
        write_cohort(root, 1100, seed=100 + draw, cohorts={"D": 500, "V": 600})
    shutil.rmtree(root / "results", ignore_errors=True)  # always a fresh comparison (the bags are reused)
    config = load_compare_config(
        None,
        heads="count.logreg,mean",
        seeds=2,
        seed=draw * 10,
        n_boot=100,
        train_where="cohort=D",
        test_where="cohort=V",
        conformal_level=level,
    )
    config.train = {**config.train, "max_epochs": 8, "patience": 3, "batch_size": 64, "max_cells_train": None}
    result = run_compare(config, bags=root / "bags", patients=root / "patients.csv", out=root / "results",
                         log=lambda *_: None)  # fmt: skip
    entries = trust_entries(result, level)
    return {n: trust_metrics(t, result.y_true, result.classes, config.ece_bins) for n, t in entries.items()}


def _cell(values: list[float]) -> str:
    return f"{np.mean(values):.3f} [{np.min(values):.3f}, {np.max(values):.3f}]"


def coverage_table(draws: list[dict[str, dict]], level: float) -> list[str]:
    pct = int(round(level * 100))
    lines = [
        f"| head | coverage ({pct}% sets) | mean set size | "
        + " | ".join(f"class-cond. coverage {d}" for d in DIAGNOSES)
        + " | class-cond. set size |",
        "|---|---|---|" + "---|" * len(DIAGNOSES) + "---|",
    ]
    for name in draws[0]:
        rows = [d[name] for d in draws]
        cells = [_cell([r["coverage"] for r in rows]), _cell([r["set_size"] for r in rows])]
        cells += [_cell([r[f"coverage_classwise_{d}"] for r in rows]) for d in DIAGNOSES]
        cells.append(_cell([r["set_size_classwise"] for r in rows]))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def temperature_draw(out: Path, draw: int) -> dict:
    """An over-confident abmil: trained on 90 patients without validation (last epoch kept), 50 epochs."""
    from features.bag_directory import BagDirectory
    from mil.cell_table import read_patient_table
    from mil.compare.trust import attention_trust
    from mil.heads.data import BagRecord
    from mil.heads.train import TrainConfig, fit_predict
    from mil.protocol.calibration import brier_score, nll
    from mil.protocol.metrics import expected_calibration_error

    root = out / f"temperature_draw{draw}"
    if not (root / "patients.csv").exists():
        write_cohort(root, 750, seed=200 + draw, cohorts={"train": 90, "val": 60, "test": 600}, composition=DISTINCT)
    shutil.rmtree(root / "abmil", ignore_errors=True)  # train again (fit_predict would reuse a finished run)
    bags = BagDirectory(root / "bags")
    table = read_patient_table(root / "patients.csv").rows

    def records(role):
        return [
            BagRecord(r["patient_id"], np.asarray(bags.load(r["patient_id"]).features), DIAGNOSES.index(r["diagnosis"]))
            for r in table
            if r["cohort"] == role
        ]

    train, val, test = records("train"), records("val"), records("test")
    config = TrainConfig(max_epochs=50, lr=0.01, weight_decay=0.0, dropout=0.0, hidden_dim=64, batch_size=16,
                         max_cells_train=None, seed=draw)  # fmt: skip
    fitted = fit_predict("abmil", train=train, val=[], test=val + test, num_classes=3, config=config,
                         log_dir=root / "abmil")  # fmt: skip
    val_probs, test_probs = fitted.probs[: len(val)], fitted.probs[len(val) :]
    y_val = np.array([r.target for r in val])
    y_test = np.array([r.target for r in test])
    trust = attention_trust(val_probs, y_val, [r.patient_id for r in val])
    after = trust.calibrate(test_probs)
    return {
        "temperature": trust.temperature,
        "ece": (expected_calibration_error(y_test, test_probs), expected_calibration_error(y_test, after)),
        "brier": (brier_score(y_test, test_probs), brier_score(y_test, after)),
        "nll": (nll(test_probs, y_test), nll(after, y_test)),
        "accuracy": float((test_probs.argmax(1) == y_test).mean()),
    }


def temperature_table(draws: list[dict]) -> list[str]:
    lines = [
        "| draw | fitted temperature | accuracy | ECE before | ECE after | Brier before | Brier after | NLL before | "
        "NLL after |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for i, d in enumerate(draws):
        lines.append(
            f"| {i} | {d['temperature']:.2f} | {d['accuracy']:.3f} | {d['ece'][0]:.3f} | **{d['ece'][1]:.3f}** | "
            f"{d['brier'][0]:.3f} | {d['brier'][1]:.3f} | {d['nll'][0]:.3f} | {d['nll'][1]:.3f} |"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/conformal_coverage")
    parser.add_argument("--draws", type=int, default=4, help="coverage cohorts (default 4)")
    parser.add_argument("--temperature-draws", type=int, default=2, help="over-confident heads (default 2)")
    parser.add_argument("--level", type=float, default=0.9)
    parser.add_argument("--part", choices=("all", "coverage", "temperature"), default="all")
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "disabled")
    import torch

    torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    start = time.perf_counter()
    if args.part in ("all", "coverage"):
        draws = []
        for d in range(args.draws):
            draws.append(coverage_draw(out, d, args.level))
            print(f"coverage draw {d + 1}/{args.draws} done ({time.perf_counter() - start:.0f} s)", flush=True)
        lines += [f"Coverage over {args.draws} draws (600 external test patients x 2 seeds each):", ""]
        lines += coverage_table(draws, args.level) + [""]
    if args.part in ("all", "temperature"):
        draws = []
        for d in range(args.temperature_draws):
            draws.append(temperature_draw(out, d))
            print(
                f"temperature draw {d + 1}/{args.temperature_draws} done ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
        lines += ["Temperature scaling of an over-confident abmil (600 test patients per draw):", ""]
        lines += temperature_table(draws) + [""]
    lines.append(f"({time.perf_counter() - start:.0f} s)")
    text = "\n".join(lines) + "\n"
    (out / "coverage.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
