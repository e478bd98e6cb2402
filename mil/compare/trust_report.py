"""What a comparison reports about how far to trust each head: ensembles of its seed models (external runs),
calibration (ECE and Brier before/after, reliability diagram), conformal prediction sets (coverage overall and
per diagnosis, set size), abstention (risk-coverage curve and its area) and, for two diagnoses, balanced
accuracy at the argmax and at the threshold chosen on held-out patients.

Everything downstream of calibration (sets, abstention, thresholds) uses the calibrated probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mil.compare.runner import CompareResult
from mil.compare.trust import FoldTrust, ensemble_sets, ensemble_threshold_predictions
from mil.protocol.abstention import REPORTED_COVERAGES, at_coverage, risk_coverage
from mil.protocol.calibration import balanced_accuracy, brier_score, reliability_bins
from mil.protocol.conformal import coverage, format_set
from mil.protocol.metrics import expected_calibration_error

ENSEMBLE_SUFFIX = ".ensemble"


@dataclass
class HeadTrust:
    """One row of the trust tables: a head's per-seed models, or (name ending .ensemble) their ensemble."""

    name: str
    head: str
    probs: np.ndarray  # (S, P, C) raw; S = 1 for an ensemble
    calibrated: np.ndarray  # (S, P, C)
    sets: np.ndarray  # (S, P, C) bool, marginal
    sets_classwise: np.ndarray  # (S, P, C) bool, class-conditional
    threshold_predicted: np.ndarray | None  # (S, P) binary, or None
    methods: list[str]
    temperatures: list[float]
    members: int = 1
    spread: np.ndarray | None = None  # (P, C) sd of the members' raw probabilities (ensembles)


def _fold_trusts(result: CompareResult, head: str) -> list[tuple[int, list[int], FoldTrust]]:
    index = {p: i for i, p in enumerate(result.patients)}
    seeds = list(result.splits.seeds)
    return [
        (seeds.index(fs.seed), [index[p] for p in fs.test], result.trust[head][fs.name]) for fs in result.splits.splits
    ]


def head_trust(result: CompareResult, head: str, level: float) -> HeadTrust:
    calibrated = result.calibrated[head]
    sets = np.zeros(calibrated.shape, dtype=bool)
    classwise = np.zeros(calibrated.shape, dtype=bool)
    binary = len(result.classes) == 2
    thresholded = np.zeros(calibrated.shape[:2], dtype=np.int64) if binary else None
    folds = _fold_trusts(result, head)
    for s, rows, trust in folds:
        sets[s, rows] = trust.sets(calibrated[s, rows], level, classwise=False)
        classwise[s, rows] = trust.sets(calibrated[s, rows], level, classwise=True)
        if binary:
            called = trust.threshold_predictions(calibrated[s, rows])
            thresholded[s, rows] = called if called is not None else calibrated[s, rows].argmax(axis=1)
    return HeadTrust(
        name=head,
        head=head,
        probs=result.probs[head],
        calibrated=calibrated,
        sets=sets,
        sets_classwise=classwise,
        threshold_predicted=thresholded,
        methods=sorted({t.method for _, _, t in folds}),
        temperatures=[t.temperature for _, _, t in folds if t.temperature is not None],
    )


def ensemble_trust(member: HeadTrust, trusts: list[FoldTrust], level: float) -> HeadTrust:
    """Mean probability of the seed models (each scored every patient); sets at their mean threshold."""
    thresholded = ensemble_threshold_predictions(trusts, member.calibrated)
    return HeadTrust(
        name=member.head + ENSEMBLE_SUFFIX,
        head=member.head,
        probs=member.probs.mean(axis=0)[None],
        calibrated=member.calibrated.mean(axis=0)[None],
        sets=ensemble_sets(trusts, member.calibrated, level, False)[None],
        sets_classwise=ensemble_sets(trusts, member.calibrated, level, True)[None],
        threshold_predicted=None if thresholded is None else thresholded[None],
        methods=member.methods,
        temperatures=member.temperatures,
        members=member.probs.shape[0],
        spread=member.probs.std(axis=0),
    )


def trust_entries(result: CompareResult, level: float) -> dict[str, HeadTrust]:
    """Every head's row, each followed by its ensemble in an external run with more than one seed."""
    entries = {}
    for h in result.probs:
        entries[h] = head_trust(result, h, level)
        if result.splits.is_external and len(result.splits.seeds) > 1:
            trusts = [t for _, _, t in _fold_trusts(result, h)]  # one model per seed, all scoring every patient
            ensemble = ensemble_trust(entries[h], trusts, level)
            entries[ensemble.name] = ensemble
    return entries


def trust_metrics(t: HeadTrust, y: np.ndarray, classes: list[str], n_bins: int) -> dict:
    """Point values, averaged over seeds (coverage pooled over seeds)."""
    S = t.probs.shape[0]
    out = {
        "ece": np.mean([expected_calibration_error(y, t.probs[s], n_bins) for s in range(S)]),
        "ece_calibrated": np.mean([expected_calibration_error(y, t.calibrated[s], n_bins) for s in range(S)]),
        "brier": np.mean([brier_score(y, t.probs[s]) for s in range(S)]),
        "brier_calibrated": np.mean([brier_score(y, t.calibrated[s]) for s in range(S)]),
        "temperature": float(np.mean(t.temperatures)) if t.temperatures else float("nan"),
        "calibration": ",".join(t.methods),
    }
    yy = np.tile(y, S)
    for key, sets in (("", t.sets), ("_classwise", t.sets_classwise)):
        cov = coverage(yy, sets.reshape(-1, len(classes)), len(classes))
        out[f"coverage{key}"] = cov["coverage"]
        out[f"set_size{key}"] = cov["set_size"]
        out[f"empty_sets{key}"] = cov["empty"]
        for c, name in enumerate(classes):
            out[f"coverage{key}_{name}"] = cov["coverage_per_class"][c]
    curves = [risk_coverage(y, t.calibrated[s]) for s in range(S)]
    out["aurc"] = float(np.mean([c["aurc"] for c in curves]))
    for level in REPORTED_COVERAGES:
        pct = int(round(level * 100))
        out[f"accuracy_at_{pct}"] = float(np.mean([at_coverage(c, level, "accuracy") for c in curves]))
        out[f"macro_f1_at_{pct}"] = float(np.mean([at_coverage(c, level, "macro_f1") for c in curves]))
    if t.threshold_predicted is not None:
        k = len(classes)
        out["balanced_accuracy_argmax"] = np.mean(
            [balanced_accuracy(y, t.calibrated[s].argmax(1), k) for s in range(S)]
        )
        out["balanced_accuracy_threshold"] = np.mean(
            [balanced_accuracy(y, t.threshold_predicted[s], k) for s in range(S)]
        )
    out["_curves"] = curves
    return out


CSV_KEYS = ("calibration", "temperature", "ece_calibrated", "brier", "brier_calibrated", "coverage", "set_size",
            "coverage_classwise", "set_size_classwise", "aurc")  # fmt: skip


def csv_columns(classes: list[str]) -> list[str]:
    cols = list(CSV_KEYS) + [f"coverage_classwise_{c}" for c in classes]
    cols += [f"{m}_at_{int(round(v * 100))}" for v in REPORTED_COVERAGES[1:] for m in ("accuracy", "macro_f1")]
    if len(classes) == 2:
        cols += ["balanced_accuracy_argmax", "balanced_accuracy_threshold"]
    return cols


def csv_values(metrics: dict, classes: list[str]) -> list[str]:
    return [v if isinstance(v, str) else _fmt(v) for v in (metrics[c] for c in csv_columns(classes))]


def _fmt(x: float) -> str:
    return "nan" if not np.isfinite(x) else f"{x:.3f}"


def markdown(entries: dict[str, HeadTrust], metrics: dict[str, dict], classes: list[str], level: float) -> list[str]:
    pct = int(round(level * 100))
    lines = [
        "",
        "## Calibration (ECE and Brier on the test patients, before -> after)",
        "",
        "Attention heads: temperature scaling fitted on each fold's inner validation patients; count heads: "
        "scikit-learn's CalibratedClassifierCV (sigmoid) cross-validated within each fold's training patients. "
        "Reliability diagrams: `reliability_<head>.png`.",
        "",
        "| head | calibration | mean temperature | ECE before | ECE after | Brier before | Brier after |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in metrics.items():
        lines.append(
            f"| {name} | {m['calibration']} | {_fmt(m['temperature'])} | {_fmt(m['ece'])} | "
            f"{_fmt(m['ece_calibrated'])} | {_fmt(m['brier'])} | {_fmt(m['brier_calibrated'])} |"
        )
    lines += [
        "",
        f"## Conformal prediction sets ({pct}%, split conformal on held-out patients of each fold)",
        "",
        "Marginal: one threshold for all diagnoses; class-conditional (Mondrian): one per diagnosis, so each "
        "diagnosis is covered. Ensembles: their mean probability at the members' mean threshold. "
        "Columns `set` and `set_classwise` of predictions.csv.",
        "",
        "| head | coverage | mean set size | empty | class-cond. coverage | "
        + " | ".join(f"{c} (class-cond.)" for c in classes)
        + " | class-cond. set size |",
        "|---|---|---|---|---|" + "---|" * len(classes) + "---|",
    ]
    for name, m in metrics.items():
        per = " | ".join(_fmt(m[f"coverage_classwise_{c}"]) for c in classes)
        lines.append(
            f"| {name} | {_fmt(m['coverage'])} | {_fmt(m['set_size'])} | {_fmt(m['empty_sets'])} | "
            f"{_fmt(m['coverage_classwise'])} | {per} | {_fmt(m['set_size_classwise'])} |"
        )
    cov = [int(round(v * 100)) for v in REPORTED_COVERAGES]
    lines += [
        "",
        "## Abstention (the least confident patients referred; accuracy / macro-F1 of the rest)",
        "",
        "AURC: area under the risk (1 - accuracy) vs coverage curve, lower is better; `risk_coverage_<head>.png`.",
        "",
        "| head | AURC | " + " | ".join(f"{c}% kept" for c in cov) + " |",
        "|---|---|" + "---|" * len(cov),
    ]
    for name, m in metrics.items():
        cells = [f"{_fmt(m[f'accuracy_at_{c}'])} / {_fmt(m[f'macro_f1_at_{c}'])}" for c in cov]
        lines.append(f"| {name} | {_fmt(m['aurc'])} | " + " | ".join(cells) + " |")
    if len(classes) == 2:
        lines += [
            "",
            f"## Binary threshold ({classes[1]} called when its calibrated probability >= the threshold chosen on "
            "held-out patients)",
            "",
            "| head | balanced acc. at argmax | balanced acc. at the chosen threshold |",
            "|---|---|---|",
        ]
        for name, m in metrics.items():
            lines.append(
                f"| {name} | {_fmt(m['balanced_accuracy_argmax'])} | {_fmt(m['balanced_accuracy_threshold'])} |"
            )
    return lines


def prediction_columns(classes: list[str]) -> list[str]:
    cols = ["members"] + [f"sd_{c}" for c in classes] + [f"cal_{c}" for c in classes] + ["set", "set_classwise"]
    return cols + (["predicted_threshold"] if len(classes) == 2 else [])


def prediction_values(t: HeadTrust, s: int, i: int, classes: list[str]) -> list:
    spread = t.spread[i] if t.spread is not None else np.zeros(len(classes))
    row = [t.members, *(f"{v:.6f}" for v in spread), *(f"{v:.6f}" for v in t.calibrated[s, i])]
    row += [format_set(t.sets[s, i], classes), format_set(t.sets_classwise[s, i], classes)]
    if len(classes) == 2:
        row.append(classes[int(t.threshold_predicted[s, i])] if t.threshold_predicted is not None else "")
    return row


def plot_reliability(t: HeadTrust, y: np.ndarray, n_bins: int, path, save) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    yy = np.tile(y, t.probs.shape[0])
    for label, probs, style in (("before", t.probs, "o--"), ("after", t.calibrated, "s-")):
        conf, acc, count = reliability_bins(yy, probs.reshape(len(yy), -1), n_bins)
        keep = count > 0
        ece = expected_calibration_error(yy, probs.reshape(len(yy), -1), n_bins)
        ax.plot(conf[keep], acc[keep], style, label=f"{label} (ECE {ece:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.5, ls="--")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top probability)", ylabel="accuracy",
           title=f"{t.name}: reliability ({n_bins} bins)")  # fmt: skip
    ax.legend(fontsize=8, loc="upper left")
    save(path, fig)


def plot_risk_coverage(name: str, curves: list[dict], path, save) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    n = min(len(c["coverage"]) for c in curves)
    coverage_grid = curves[0]["coverage"][:n]
    for key, label in (("accuracy", "accuracy"), ("macro_f1", "macro-F1")):
        ax.plot(coverage_grid, np.mean([c[key][:n] for c in curves], axis=0), label=label)
    aurc = np.mean([c["aurc"] for c in curves])
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="coverage (share of patients not referred)", ylabel="score of the kept",
           title=f"{name}: AURC {aurc:.3f}")  # fmt: skip
    ax.legend(fontsize=8, loc="lower left")
    save(path, fig)
