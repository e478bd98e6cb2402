"""Results of a comparison on disk: summary.md/.csv (each metric with its CI, and the trust measures of
mil.compare.trust_report), paired.csv, predictions.csv, config.yaml, roc.png, confusion_<head>.png,
reliability_<head>.png and risk_coverage_<head>.png. Every file is written atomically."""

from __future__ import annotations

import csv
import io
import itertools
from pathlib import Path

import numpy as np
import yaml

from mil.atomic import atomic_path, atomic_write_text
from mil.compare.config import CompareConfig
from mil.compare.runner import CompareResult
from mil.compare.trust_report import (
    ENSEMBLE_SUFFIX,
    csv_columns,
    csv_values,
    plot_reliability,
    plot_risk_coverage,
    prediction_columns,
    prediction_values,
    trust_entries,
    trust_metrics,
)
from mil.compare.trust_report import markdown as trust_markdown
from mil.protocol import BootstrapResult, PairedResult, bootstrap_metrics, paired_bootstrap

SUMMARY_METRICS = (
    ("macro_f1", "macro-F1"),
    ("balanced_accuracy", "balanced acc."),
    ("auroc", "AUROC (OvR)"),
    ("ece", "ECE"),
    ("accuracy", "accuracy"),
)


def _csv_text(header: list[str], rows: list[list]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    def validate(tmp: Path) -> None:
        with tmp.open(newline="") as f:
            if sum(1 for _ in csv.reader(f)) != len(rows) + 1:
                raise OSError(f"{path} did not read back with {len(rows)} rows")

    atomic_write_text(path, _csv_text(header, rows), validate)


def _fmt(x: float) -> str:
    return "nan" if not np.isfinite(x) else f"{x:.3f}"


def evaluate(result: CompareResult, config: CompareConfig) -> tuple[dict[str, BootstrapResult], list[PairedResult]]:
    """Bootstrap CIs per head, and the paired macro-F1 test for every pair (later head minus earlier head)."""
    per_head = {
        h: bootstrap_metrics(
            result.y_true, p, n_boot=config.n_boot, level=config.ci_level, seed=config.seed, n_bins=config.ece_bins
        )
        for h, p in result.probs.items()
    }
    paired = [
        paired_bootstrap(
            result.y_true,
            result.probs[b],
            result.probs[a],
            head_a=b,
            head_b=a,
            n_boot=config.n_boot,
            level=config.ci_level,
            seed=config.seed,
        )
        for a, b in itertools.combinations(list(result.probs), 2)
    ]
    return per_head, paired


def _kind(result: CompareResult, name: str) -> str:
    return result.kinds.get(name) or result.kinds[name.removesuffix(ENSEMBLE_SUFFIX)]


def summary_rows(
    result: CompareResult, per_head: dict[str, BootstrapResult], trust: dict[str, dict] | None = None
) -> tuple[list[str], list[list]]:
    header = ["head", "kind", "splits_sha256", "patients", "seeds"]
    for key, _ in SUMMARY_METRICS:
        header += [key, f"{key}_lo", f"{key}_hi"]
    for key in ("sensitivity", "specificity"):
        for c in result.classes:
            header += [f"{key}_{c}", f"{key}_{c}_lo", f"{key}_{c}_hi"]
    header.append("seconds")
    if trust:
        header += csv_columns(result.classes)
    rows = []
    for h, b in per_head.items():
        row = [h, _kind(result, h), result.splits.sha256, len(result.patients), len(result.splits.seeds)]
        for key, _ in SUMMARY_METRICS:
            row += [_fmt(b.point[key]), _fmt(b.lo[key]), _fmt(b.hi[key])]
        for key in ("sensitivity", "specificity"):
            for i in range(len(result.classes)):
                row += [_fmt(b.point[key][i]), _fmt(b.lo[key][i]), _fmt(b.hi[key][i])]
        row.append(f"{result.seconds.get(h.removesuffix(ENSEMBLE_SUFFIX), 0.0):.1f}")
        if trust:
            row += csv_values(trust[h], result.classes)
        rows.append(row)
    return header, rows


def _metric_table(result: CompareResult, per_head: dict[str, BootstrapResult]) -> list[str]:
    lines = [
        "| head | kind | " + " | ".join(name for _, name in SUMMARY_METRICS) + " |",
        "|---|---|" + "---|" * len(SUMMARY_METRICS),
    ]
    for h, b in per_head.items():
        cells = [f"{_fmt(b.point[k])} [{_fmt(b.lo[k])}, {_fmt(b.hi[k])}]" for k, _ in SUMMARY_METRICS]
        lines.append(f"| {h} | {_kind(result, h)} | " + " | ".join(cells) + " |")
    return lines


def _side_by_side(result: CompareResult, external: dict, internal: dict[str, BootstrapResult]) -> list[str]:
    """External metrics beside the training cohort's internal k-fold, head by head."""
    inner = result.internal
    lines = [
        "",
        f"## External vs internal CV of the training cohort ({inner.splits.folds}-fold x {len(inner.splits.seeds)} "
        f"seeds on {len(inner.patients)} patients; its own results in internal_cv/)",
        "",
        "| head | macro-F1 external | macro-F1 internal CV | AUROC external | AUROC internal CV |",
        "|---|---|---|---|---|",
    ]
    for h, b in external.items():
        i = internal.get(h)
        cells = []
        for key in ("macro_f1", "auroc"):
            cells.append(f"{_fmt(b.point[key])} [{_fmt(b.lo[key])}, {_fmt(b.hi[key])}]")
            cells.append("-" if i is None else f"{_fmt(i.point[key])} [{_fmt(i.lo[key])}, {_fmt(i.hi[key])}]")
        lines.append(f"| {h} | " + " | ".join(cells) + " |")
    return lines


def summary_markdown(
    result: CompareResult,
    per_head: dict[str, BootstrapResult],
    paired: list[PairedResult],
    config: CompareConfig,
    internal: dict[str, BootstrapResult] | None = None,
    trust_lines: list[str] | None = None,
) -> str:
    level = int(round(config.ci_level * 100))
    n_seeds = len(result.splits.seeds)
    if result.splits.is_external:
        where = dict(result.splits.external)
        n_train = len({p for fs in result.splits.splits for p in fs.train + fs.val})
        title = (
            f"# External validation: trained on {n_train} patients ({where['train_where']}), tested on "
            f"{len(result.patients)} patients ({where['test_where']}), {len(result.classes)} diagnoses "
            f"({', '.join(result.classes)}), {n_seeds} seeds"
        )
        scope = "CIs over the external patients"
        if n_seeds > 1:
            scope += f"; `<head>{ENSEMBLE_SUFFIX}` is the mean probability of the head's {n_seeds} seed models"
    else:
        title = (
            f"# Comparison: {len(result.patients)} patients, {len(result.classes)} diagnoses "
            f"({', '.join(result.classes)}), {result.splits.folds}-fold x {n_seeds} seeds"
        )
        scope = "CIs over patients"
    lines = [
        title,
        "",
        f"Splits sha256 `{result.splits.sha256}`; counts from `{config.counts}`; "
        f"{level}% bootstrap {scope} ({config.n_boot} replicates)."
        + (f" Covariates: {', '.join(result.covariates)}." if result.covariates else ""),
        "",
    ]
    lines += _metric_table(result, per_head)
    if result.internal is not None and internal is not None:
        lines += _side_by_side(result, per_head, internal)
    lines += ["", f"## Paired test of macro-F1 (a - b, {level}% CI, two-sided bootstrap p)", ""]
    if paired:
        lines += ["| a | b | difference | CI | p |", "|---|---|---|---|---|"]
        for p in paired:
            mark = " *" if p.lo > 0 or p.hi < 0 else ""
            lines.append(
                f"| {p.head_a} | {p.head_b} | {p.diff:+.3f}{mark} | [{p.lo:+.3f}, {p.hi:+.3f}] | {p.p_value:.3f} |"
            )
        lines += ["", "`*`: the CI excludes 0."]
    else:  # an empty table reads as a failed test
        lines.append("Paired tests need two heads; this comparison has one (add one to `--heads`, e.g. count.meta).")
    lines += [
        "",
        "## Sensitivity / specificity per diagnosis",
        "",
        "| head | " + " | ".join(result.classes) + " |",
        "|---|" + "---|" * len(result.classes),
    ]
    for h, b in per_head.items():
        cells = [
            f"{_fmt(b.point['sensitivity'][i])} / {_fmt(b.point['specificity'][i])}" for i in range(len(result.classes))
        ]
        lines.append(f"| {h} | " + " | ".join(cells) + " |")
    lines += trust_lines or []
    if result.dropped:
        lines += ["", f"Left out (no valid bag): {', '.join(result.dropped)}"]
    return "\n".join(lines) + "\n"


def prediction_rows(result: CompareResult, entries: dict | None = None) -> tuple[list[str], list[list]]:
    """One row per patient, seed and head (and per patient and `<head>.ensemble` in an external run)."""
    header = ["patient_id", "seed", "fold", "head", "true", "predicted"] + [f"prob_{c}" for c in result.classes]
    if entries:
        header += prediction_columns(result.classes)
    rows = []
    for name, probs in ((n, t.probs) for n, t in entries.items()) if entries else result.probs.items():
        ensemble = name not in result.probs
        for s in range(probs.shape[0]):
            for i, p in enumerate(result.patients):
                pr = probs[s, i]
                rows.append(
                    [
                        p,
                        "all" if ensemble else result.splits.seeds[s],
                        int(result.fold_of[s, i]),
                        name,
                        result.classes[result.y_true[i]],
                        result.classes[int(pr.argmax())],
                        *(f"{v:.6f}" for v in pr),
                    ]
                    + (prediction_values(entries[name], s, i, result.classes) if entries else [])
                )
    return header, rows


def _save_png(path: Path, fig) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp, tmp.open("wb") as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_roc(result: CompareResult, path: Path) -> None:
    """One-vs-rest ROC per diagnosis, one line per head; seeds pooled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    n = len(result.classes)
    fig, axes = plt.subplots(1, n, figsize=(4 * n, 4), squeeze=False)
    for c, (ax, name) in enumerate(zip(axes[0], result.classes)):
        for h, probs in result.probs.items():
            y = np.tile(result.y_true == c, len(result.splits.seeds))
            score = probs[:, :, c].reshape(-1)
            if y.all() or not y.any():
                continue
            fpr, tpr, _ = roc_curve(y, score)
            ax.plot(fpr, tpr, label=h)
        ax.plot([0, 1], [0, 1], color="grey", lw=0.5, ls="--")
        ax.set(title=f"{name} vs rest", xlabel="1 - specificity", ylabel="sensitivity")
        ax.legend(fontsize=7, loc="lower right")
    _save_png(path, fig)


def plot_confusion(result: CompareResult, head: str, confusion: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(result.classes)
    fig, ax = plt.subplots(figsize=(1.2 * n + 2, 1.2 * n + 1.5))
    ax.imshow(confusion, cmap="Blues")
    for i, j in itertools.product(range(n), range(n)):
        ax.text(
            j,
            i,
            int(confusion[i, j]),
            ha="center",
            va="center",
            color="white" if confusion[i, j] > confusion.max() / 2 else "black",
        )
    ax.set(
        xticks=range(n),
        yticks=range(n),
        xticklabels=result.classes,
        yticklabels=result.classes,
        xlabel="predicted",
        ylabel="true",
        title=f"{head} (summed over {len(result.splits.seeds)} seeds)",
    )
    _save_png(path, fig)


def write_report(
    result: CompareResult, config: CompareConfig, out: str | Path
) -> tuple[dict[str, BootstrapResult], list[PairedResult]]:
    """Every result file of a comparison; returns the per-head bootstrap results and the paired tests."""
    out = Path(out)
    per_head, paired = evaluate(result, config)
    entries = trust_entries(result, config.conformal_level)
    trust = {n: trust_metrics(t, result.y_true, result.classes, config.ece_bins) for n, t in entries.items()}
    per_head = {  # every head's row followed by its ensemble's (external runs)
        n: per_head[n]
        if n in per_head
        else bootstrap_metrics(
            result.y_true,
            t.probs,
            n_boot=config.n_boot,
            level=config.ci_level,
            seed=config.seed,
            n_bins=config.ece_bins,
        )
        for n, t in entries.items()
    }
    internal = None
    if result.internal is not None:
        internal, _ = write_report(result.internal, config, out / "internal_cv")
    _write_csv(out / "summary.csv", *summary_rows(result, per_head, trust))
    _write_csv(
        out / "paired.csv",
        ["head_a", "head_b", "metric", "diff", "lo", "hi", "p_value", "n_boot"],
        [
            [p.head_a, p.head_b, p.metric, f"{p.diff:.4f}", f"{p.lo:.4f}", f"{p.hi:.4f}", f"{p.p_value:.4f}", p.n_boot]
            for p in paired
        ],
    )
    _write_csv(out / "predictions.csv", *prediction_rows(result, entries))
    resolved = {
        **config.to_dict(),
        **result.sources,
        "splits_sha256": result.splits.sha256,
        "classes": result.classes,
        "heads": list(result.probs),
        "bag_provenance": result.provenance,
    }
    atomic_write_text(
        out / "config.yaml", yaml.safe_dump(resolved, sort_keys=False), lambda p: yaml.safe_load(p.read_text())
    )
    lines = trust_markdown(entries, trust, result.classes, config.conformal_level)
    atomic_write_text(out / "summary.md", summary_markdown(result, per_head, paired, config, internal, lines))
    plot_roc(result, out / "roc.png")
    for h, b in per_head.items():
        plot_confusion(result, h, b.confusion, out / f"confusion_{h}.png")
    for n, t in entries.items():
        plot_reliability(t, result.y_true, config.ece_bins, out / f"reliability_{n}.png", _save_png)
        plot_risk_coverage(n, trust[n]["_curves"], out / f"risk_coverage_{n}.png", _save_png)
    return per_head, paired
