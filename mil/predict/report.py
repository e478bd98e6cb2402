"""What `mil predict` writes: predictions.csv (every member model and the ensemble, with the spread across
members), attention/<head>/<patient>.npy (members stacked), summary.md/.csv when diagnoses are known,
predict.json (what was applied to what) and config.yaml (so `mil attention --results OUT` reads the folder)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml

from mil.atomic import atomic_write_text
from mil.compare.report import SUMMARY_METRICS, _fmt, _write_csv
from mil.compare.runner import _save_npy
from mil.predict.run import ENSEMBLE, PredictResult

PREDICT_FORMAT = "cytomil-predict/1"


def prediction_rows(result: PredictResult) -> tuple[list[str], list[list]]:
    header = ["patient_id", "head", "model", "members", "true", "predicted"]
    header += [f"prob_{c}" for c in result.classes] + [f"sd_{c}" for c in result.classes]
    rows = []
    for h, members in result.probs.items():
        entries = [(ENSEMBLE, result.ensemble(h), result.spread(h), len(members))]
        entries += [(name, probs, np.zeros_like(probs), 1) for name, probs in members.items()]
        for name, probs, spread, n in entries:
            for i, p in enumerate(result.patients):
                rows.append(
                    [p, h, name, n, result.truth.get(p, ""), result.classes[int(probs[i].argmax())]]
                    + [f"{v:.8f}" for v in probs[i]]
                    + [f"{v:.8f}" for v in spread[i]]
                )
    return header, rows


def _metrics(result: PredictResult, n_boot: int, seed: int) -> dict:
    from mil.protocol import bootstrap_metrics

    scored = [i for i, p in enumerate(result.patients) if p in result.truth]
    y = np.array([result.classes.index(result.truth[result.patients[i]]) for i in scored])
    return {h: bootstrap_metrics(y, result.ensemble(h)[scored][None], n_boot=n_boot, seed=seed) for h in result.probs}


def summary_markdown(result: PredictResult, per_head: dict, results: Path, bags: Path) -> str:
    n = sum(1 for p in result.patients if p in result.truth)
    lines = [
        f"# Predictions of {results} on {len(result.patients)} new patients ({bags})",
        "",
        f"Each head is the ensemble (mean probability) of its saved models; metrics over the {n} patients with a "
        "known diagnosis, 95% bootstrap CIs over patients.",
        "",
        "| head | models | " + " | ".join(name for _, name in SUMMARY_METRICS) + " |",
        "|---|---|" + "---|" * len(SUMMARY_METRICS),
    ]
    for h, b in per_head.items():
        cells = [f"{_fmt(b.point[k])} [{_fmt(b.lo[k])}, {_fmt(b.hi[k])}]" for k, _ in SUMMARY_METRICS]
        lines.append(f"| {h} | {len(result.probs[h])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_predictions(
    result: PredictResult, out: Path, *, results: Path, bags: Path, patients: Path | None, n_boot: int = 1000
) -> dict:
    """Every output file; returns the per-head bootstrap metrics (empty when no diagnosis is known)."""
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(out / "predictions.csv", *prediction_rows(result))
    for h, members in result.attention.items():
        names = list(members)
        for p in result.patients:
            _save_npy(out / "attention" / h / f"{p}.npy", np.stack([members[m][p] for m in names]))
    per_head = _metrics(result, n_boot, seed=0) if len({*result.truth.values()}) >= 1 and result.truth else {}
    if per_head:
        header = ["head", "models", "patients"] + [x for k, _ in SUMMARY_METRICS for x in (k, f"{k}_lo", f"{k}_hi")]
        rows = [
            [h, len(result.probs[h]), len(result.truth)]
            + [_fmt(v) for k, _ in SUMMARY_METRICS for v in (b.point[k], b.lo[k], b.hi[k])]
            for h, b in per_head.items()
        ]
        _write_csv(out / "summary.csv", header, rows)
        atomic_write_text(out / "summary.md", summary_markdown(result, per_head, results, bags))
    record = {
        "format": PREDICT_FORMAT,
        "results": str(results.resolve()),
        "bags": str(bags.resolve()),
        "patients": str(patients.resolve()) if patients else None,
        "heads": {h: list(m) for h, m in result.probs.items()},
        "classes": result.classes,
    }
    atomic_write_text(out / "predict.json", json.dumps(record, indent=1) + "\n", lambda p: json.loads(p.read_text()))
    resolved = {"bags": record["bags"], "patients": record["patients"], "classes": result.classes, "predict": True}
    atomic_write_text(out / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
    return per_head
