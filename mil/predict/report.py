"""What `mil predict` writes: predictions.csv (every member model and the ensemble, with the spread across
members, calibrated probabilities, conformal sets and the referral flag), attention/<head>/<patient>.npy (members
stacked), summary.md/.csv when diagnoses are known (a second row per head without the referred patients),
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
from mil.protocol.abstention import refer_below
from mil.protocol.conformal import coverage, format_set

PREDICT_FORMAT = "cytomil-predict/1"
REFERRED = " (referred left out)"


def _entries(result: PredictResult, h: str, level: float):
    """(model, probs, spread, members, calibrated, sets, classwise sets) of the ensemble, then of each member."""
    members = result.probs[h]
    yield (ENSEMBLE, result.ensemble(h), result.spread(h), len(members), result.calibrated_ensemble(h),
           result.ensemble_sets(h, level, False), result.ensemble_sets(h, level, True))  # fmt: skip
    for name, probs in members.items():
        sets = [result.member_sets(h, name, level, cw) for cw in (False, True)]
        yield name, probs, np.zeros_like(probs), 1, result.calibrated[h][name], *sets


def prediction_rows(
    result: PredictResult, level: float = 0.9, refer_threshold: float | None = None
) -> tuple[list[str], list[list]]:
    c = result.classes
    header = ["patient_id", "head", "model", "members", "true", "predicted"]
    header += [f"prob_{x}" for x in c] + [f"sd_{x}" for x in c] + [f"cal_{x}" for x in c]
    header += ["set", "set_classwise", "referred"] + (["predicted_threshold"] if len(c) == 2 else [])
    rows = []
    for h in result.probs:
        for name, probs, spread, n, calibrated, sets, classwise in _entries(result, h, level):
            referred = refer_below(calibrated, refer_threshold) if refer_threshold is not None else None
            called = _threshold_calls(result, h, name, calibrated) if len(c) == 2 else None
            for i, p in enumerate(result.patients):
                rows.append(
                    [p, h, name, n, result.truth.get(p, ""), c[int(probs[i].argmax())]]
                    + [f"{v:.8f}" for v in probs[i]]
                    + [f"{v:.8f}" for v in spread[i]]
                    + [f"{v:.8f}" for v in calibrated[i]]
                    + [format_set(sets[i], c), format_set(classwise[i], c)]
                    + ["" if referred is None else int(referred[i])]
                    + ([] if len(c) != 2 else ["" if called is None else c[int(called[i])]])
                )
    return header, rows


def _threshold_calls(result: PredictResult, head: str, model: str, calibrated: np.ndarray) -> np.ndarray | None:
    """Two diagnoses: the call at the stored binary threshold (the ensemble: at its members' mean threshold)."""
    trusts = list(result.trust[head].values()) if model == ENSEMBLE else [result.trust[head][model]]
    if any(t.threshold is None for t in trusts):
        return None
    return (calibrated[:, 1] >= float(np.mean([t.threshold for t in trusts]))).astype(np.int64)


def _metrics(result: PredictResult, n_boot: int, seed: int, level: float, refer_threshold: float | None) -> dict:
    """Bootstrap metrics of each head's ensemble over the patients with a known diagnosis (and, with a referral
    threshold, a second row over those not referred), with the conformal sets' coverage."""
    from mil.protocol import bootstrap_metrics

    scored = np.array([i for i, p in enumerate(result.patients) if p in result.truth], dtype=np.int64)
    y = np.array([result.classes.index(result.truth[result.patients[i]]) for i in scored], dtype=np.int64)
    out = {}
    for h in result.probs:
        probs, calibrated = result.ensemble(h)[scored], result.calibrated_ensemble(h)[scored]
        sets = {cw: result.ensemble_sets(h, level, cw)[scored] for cw in (False, True)}
        keep = np.ones(len(scored), dtype=bool)
        rows = [("", keep)]
        if refer_threshold is not None:
            keep = ~refer_below(calibrated, refer_threshold)
            rows.append((REFERRED, keep))
        for suffix, kept in rows:
            if not kept.any():
                continue
            out[h + suffix] = {
                "boot": bootstrap_metrics(y[kept], probs[kept][None], n_boot=n_boot, seed=seed),
                "patients": int(kept.sum()),
                "sets": coverage(y[kept], sets[False][kept], len(result.classes)),
                "sets_classwise": coverage(y[kept], sets[True][kept], len(result.classes)),
            }
    return out


def summary_markdown(result: PredictResult, per_head: dict, results: Path, bags: Path, level: float = 0.9) -> str:
    n = sum(1 for p in result.patients if p in result.truth)
    lines = [
        f"# Predictions of {results} on {len(result.patients)} new patients ({bags})",
        "",
        f"Each head is the ensemble (mean probability) of its saved models; metrics over the {n} patients with a "
        "known diagnosis, 95% bootstrap CIs over patients.",
        "",
        "| head | models | patients | " + " | ".join(name for _, name in SUMMARY_METRICS) + " |",
        "|---|---|---|" + "---|" * len(SUMMARY_METRICS),
    ]
    for h, m in per_head.items():
        b = m["boot"]
        cells = [f"{_fmt(b.point[k])} [{_fmt(b.lo[k])}, {_fmt(b.hi[k])}]" for k, _ in SUMMARY_METRICS]
        models = len(result.probs[h.removesuffix(REFERRED)])
        lines.append(f"| {h} | {models} | {m['patients']} | " + " | ".join(cells) + " |")
    pct = int(round(level * 100))
    lines += [
        "",
        f"## Conformal prediction sets ({pct}%; ensemble: its mean probability at the members' mean threshold)",
        "",
        "| head | coverage | mean set size | class-cond. coverage | "
        + " | ".join(f"{c} (class-cond.)" for c in result.classes)
        + " | class-cond. set size |",
        "|---|---|---|---|" + "---|" * len(result.classes) + "---|",
    ]
    for h, m in per_head.items():
        a, b = m["sets"], m["sets_classwise"]
        per = " | ".join(_fmt(v) for v in b["coverage_per_class"])
        lines.append(
            f"| {h} | {_fmt(a['coverage'])} | {_fmt(a['set_size'])} | {_fmt(b['coverage'])} | {per} | "
            f"{_fmt(b['set_size'])} |"
        )
    return "\n".join(lines) + "\n"


def write_predictions(
    result: PredictResult,
    out: Path,
    *,
    results: Path,
    bags: Path,
    patients: Path | None,
    n_boot: int = 1000,
    level: float = 0.9,
    refer_threshold: float | None = None,
) -> dict:
    """Every output file; returns the per-head metrics (empty when no diagnosis is known): each head's ensemble,
    and with `refer_threshold` the same without the patients whose top calibrated probability is below it."""
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(out / "predictions.csv", *prediction_rows(result, level, refer_threshold))
    for h, members in result.attention.items():
        names = list(members)
        for p in result.patients:
            _save_npy(out / "attention" / h / f"{p}.npy", np.stack([members[m][p] for m in names]))
    per_head = _metrics(result, n_boot, 0, level, refer_threshold) if result.truth else {}
    if per_head:
        header = ["head", "models", "patients"] + [x for k, _ in SUMMARY_METRICS for x in (k, f"{k}_lo", f"{k}_hi")]
        header += ["coverage", "set_size", "coverage_classwise", "set_size_classwise"]
        rows = [
            [h, len(result.probs[h.removesuffix(REFERRED)]), m["patients"]]
            + [_fmt(v) for k, _ in SUMMARY_METRICS for v in (m["boot"].point[k], m["boot"].lo[k], m["boot"].hi[k])]
            + [_fmt(m[key][x]) for key in ("sets", "sets_classwise") for x in ("coverage", "set_size")]
            for h, m in per_head.items()
        ]
        _write_csv(out / "summary.csv", header, rows)
        atomic_write_text(out / "summary.md", summary_markdown(result, per_head, results, bags, level))
    record = {
        "format": PREDICT_FORMAT,
        "results": str(results.resolve()),
        "bags": str(bags.resolve()),
        "patients": str(patients.resolve()) if patients else None,
        "heads": {h: list(m) for h, m in result.probs.items()},
        "classes": result.classes,
        "conformal_level": level,
        "refer_below": refer_threshold,
    }
    atomic_write_text(out / "predict.json", json.dumps(record, indent=1) + "\n", lambda p: json.loads(p.read_text()))
    resolved = {"bags": record["bags"], "patients": record["patients"], "classes": result.classes, "predict": True}
    atomic_write_text(out / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
    return per_head
