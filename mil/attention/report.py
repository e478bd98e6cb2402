"""Build the attention report from per-patient attention records (see `PatientAttention`)."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mil.atomic import atomic_write_text
from mil.attention import figures, html
from mil.attention.faithfulness import (
    DeletionCurve,
    attention_entropy,
    bootstrap_mean_ci,
    cue_enrichment,
    deletion_curve,
)
from mil.progress import track


@dataclass
class PatientAttention:
    """One patient's attention over its cells, with what is needed to show the cells."""

    patient_id: str
    true: str
    predicted: str
    attention: np.ndarray  # (N,) or (K,N) for multi-branch heads, rows aligned with the bag
    boxes: np.ndarray  # (N,4) x0 y0 x1 y1
    image_paths: list[str]  # per cell, the field image it was cropped from
    cell_type: list[str]  # per cell: predicted type where a classifier gave one, else the ground-truth label
    truth: list[str]  # per cell ground-truth label ('' unknown)
    features: np.ndarray | None = None  # (N,D), needed for deletion curves
    cue: np.ndarray | None = None  # (N,) bool ground-truth morphology-only cue (synthetic cohorts)
    branch_names: list[str] = field(default_factory=list)
    probability: float | None = None  # of the predicted diagnosis (calibrated where the results have it)
    interval: tuple[float, float] | None = None  # [min, max] of that probability over the ensemble's members
    prediction_set: str | None = None  # the conformal prediction set, e.g. "AML, CML"

    def confidence_text(self) -> str:
        """'0.82 [0.75, 0.90]' (probability and the interval over members), '-' without either."""
        if self.probability is None:
            return "-"
        text = f"{self.probability:.2f}"
        return text + (f" [{self.interval[0]:.2f}, {self.interval[1]:.2f}]" if self.interval else "")

    @property
    def score(self) -> np.ndarray:
        """Attention per cell, summed over branches for multi-branch heads."""
        return self.attention.sum(axis=0) if self.attention.ndim == 2 else self.attention


Predict = Callable[[str, np.ndarray], np.ndarray]  # (patient_id, features (n,D)) -> probs (C,)


def _caption(p: PatientAttention, i: int) -> str:
    truth = p.truth[i]
    text = p.cell_type[i] or "?"
    if truth and truth != p.cell_type[i]:
        text += f" (gt {truth})"
    if p.cue is not None and p.cue[i]:
        text += " *cue"
    return text[:28]


def _patient_page(
    out: Path, p: PatientAttention, cache: figures.FieldCache, top_k: int, curve: DeletionCurve | None, max_fields: int
) -> dict:
    slug = html.patient_slug(p.patient_id)
    fig_dir = out / "figures" / slug
    crops = [cache.crop(p.image_paths[i], p.boxes[i]) for i in range(len(p.boxes))]
    captions = [_caption(p, i) for i in range(len(p.boxes))]
    figs = []
    branches = [("all branches" if p.attention.ndim == 2 else "attention", p.score)]
    if p.attention.ndim == 2:
        names = p.branch_names or [f"branch {k}" for k in range(p.attention.shape[0])]
        branches += list(zip(names, p.attention))
    for b, (name, scores) in enumerate(branches):
        path = figures.gallery(
            fig_dir / f"gallery_{b}.png",
            scores=scores,
            crops=crops,
            captions=captions,
            title=f"{p.patient_id}: {name}",
            top_k=top_k,
        )
        figs.append((path, f"top and bottom {top_k} cells by attention ({name})"))
    # Fields ranked by the attention mass they hold: the ones that drove the prediction come first.
    mass: dict[str, float] = defaultdict(float)
    for path, s in zip(p.image_paths, p.score):
        mass[path] += float(s)
    vmax = float(p.score.max())
    for rank, field_path in enumerate(sorted(mass, key=mass.get, reverse=True)[:max_fields]):
        idx = [i for i, ip in enumerate(p.image_paths) if ip == field_path]
        path = figures.field_overlay(
            fig_dir / f"field_{rank}.png",
            image=cache.get(field_path),
            boxes=p.boxes[idx],
            scores=p.score[idx],
            vmax=vmax,
            title=f"{Path(field_path).name}: {mass[field_path]:.2f} of the attention mass",
        )
        figs.append((path, f"field {Path(field_path).name}, boxes coloured by attention"))
    if curve is not None:
        path = figures.deletion_plot(
            fig_dir / "deletion.png",
            fractions=curve.fractions,
            attention=curve.attention,
            random=curve.random,
            title=f"deletion, area between = {curve.area_between:.3f}",
        )
        figs.append((path, "deletion curve: most-attended cells removed first vs random removal"))
    order = np.argsort(-p.score, kind="stable")[:top_k]
    top_rows = [
        [i, f"{p.score[i]:.4f}", p.cell_type[i], p.truth[i] or "-", "yes" if (p.cue is not None and p.cue[i]) else "-"]
        for i in order
    ]
    verdict = "ok" if p.true == p.predicted else "wrong"
    confidence = ""
    if p.probability is not None:
        confidence = f"; probability {html.esc(p.confidence_text())}"
        confidence += " (interval: lowest and highest over the ensemble's models)" if p.interval else ""
    if p.prediction_set is not None:
        confidence += f"; conformal prediction set <b>{{{html.esc(p.prediction_set)}}}</b>"
    body = (
        f'<p><a href="../index.html">&larr; cohort</a></p><h1>Patient {html.esc(p.patient_id)}</h1>'
        f"<p>true diagnosis <b>{html.esc(p.true)}</b>, predicted "
        f'<b class="{verdict}">{html.esc(p.predicted)}</b>{confidence}; {len(p.boxes)} cells; '
        f"normalised attention entropy {attention_entropy(p.attention):.3f}</p>"
        + "".join(html.figure("../" + path.relative_to(out).as_posix(), cap) for path, cap in figs)
        + "<h2>Most-attended cells</h2>"
        + html.table(["row", "attention", "cell type", "ground truth", "cue"], top_rows)
    )
    html.write_page(out / "patients" / f"{slug}.html", f"Attention: {p.patient_id}", body)
    return {"slug": slug}


def build_report(
    patients: list[PatientAttention],
    out: str | Path,
    *,
    title: str = "Attention over cells",
    head: str = "",
    predict: Predict | None = None,
    top_k: int = 8,
    max_fields: int = 3,
    blast_types: tuple[str, ...] = ("myeloblast", "lymphoblast", "monoblast", "unknown_blast"),
    cue_diagnosis: str = "AML",
    seed: int = 0,
) -> dict:
    """Write REPORT/index.html, a page per patient, PNG figures and summary.json; return the summary."""
    out = Path(out)
    (out / "patients").mkdir(parents=True, exist_ok=True)
    cache = figures.FieldCache()
    curves: dict[str, DeletionCurve] = {}
    rows = []
    for p in track(patients, "attention report", "patients"):
        curve = None
        if predict is not None and p.features is not None and len(p.boxes) > 1:
            curve = deletion_curve(p.features, p.attention, lambda f, pid=p.patient_id: predict(pid, f), seed=seed)
            curves[p.patient_id] = curve
        info = _patient_page(out, p, cache, top_k, curve, max_fields)
        cache = figures.FieldCache()  # one patient's fields at a time in memory
        rows.append(
            [
                html.link(f"patients/{info['slug']}.html", p.patient_id),
                p.true,
                p.predicted,
                p.confidence_text(),
                p.prediction_set if p.prediction_set is not None else "-",
                len(p.boxes),
                f"{attention_entropy(p.attention):.3f}",
                f"{curve.area_between:.3f}" if curve else "-",
            ]
        )
    summary = _cohort(out, patients, curves, blast_types, cue_diagnosis, seed)
    summary["head"] = head
    index = (
        f"<h1>{html.esc(title)}</h1><p>head <b>{html.esc(head)}</b>; {len(patients)} patients. "
        "Attention is the head's weight on each cell; the deletion area is the mean drop in the predicted "
        "class's probability when the most-attended cells are removed first, beyond random removal "
        "(positive: attention points at cells that matter).</p>"
        + _summary_html(summary)
        + "".join(html.figure(src, cap) for src, cap in summary.pop("_figures"))
        + "<h2>Patients</h2>"
        + html.table(
            [
                "patient",
                "true",
                "predicted",
                "probability [members]",
                "prediction set",
                "cells",
                "entropy",
                "deletion area",
            ],
            rows,
            raw_columns=(0,),
        )  # fmt: skip
    )
    html.write_page(out / "index.html", title, index)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=float))
    return summary


def _summary_html(s: dict) -> str:
    rows = [
        [k, f"{v:.4g}" if isinstance(v, float) else v]
        for k, v in s.items()
        if not k.startswith("_") and not isinstance(v, dict | list)
    ]
    return "<h2>Cohort</h2>" + html.table(["measure", "value"], rows)


def _cohort(
    out: Path,
    patients: list[PatientAttention],
    curves: dict[str, DeletionCurve],
    blast_types: tuple[str, ...],
    cue_diagnosis: str,
    seed: int,
) -> dict:
    fig_dir = out / "figures" / "cohort"
    summary: dict = {"patients": len(patients), "_figures": []}
    diagnoses = sorted({p.true for p in patients})
    types = sorted({t for p in patients for t in p.cell_type if t})
    if types:
        matrix = np.zeros((len(diagnoses), len(types)))
        for d, dx in enumerate(diagnoses):
            group = [p for p in patients if p.true == dx]
            for p in group:
                share = p.score / p.score.sum()
                for t, cell_type in enumerate(types):
                    matrix[d, t] += share[np.array(p.cell_type) == cell_type].sum() / len(group)
        path = figures.mass_by_type_heatmap(
            fig_dir / "mass_by_type.png",
            matrix=matrix,
            diagnoses=diagnoses,
            cell_types=types,
            title="attention mass per cell type, by diagnosis",
        )
        summary["_figures"].append(("figures/cohort/mass_by_type.png", "attention mass per cell type"))
        summary["mass_by_type"] = {dx: dict(zip(types, matrix[d].round(4).tolist())) for d, dx in enumerate(diagnoses)}
        del path
    entropy = defaultdict(list)
    blast_share, blast_att = defaultdict(list), defaultdict(list)
    for p in patients:
        entropy[p.true].append(attention_entropy(p.attention))
        is_blast = np.isin(np.array(p.cell_type), blast_types)
        blast_share[p.true].append(float(is_blast.mean()))
        blast_att[p.true].append(float((p.score / p.score.sum())[is_blast].sum()))
    figures.entropy_histogram(
        fig_dir / "entropy.png", entropy_by_diagnosis=dict(entropy), title="attention entropy per patient"
    )
    figures.scatter_by_diagnosis(
        fig_dir / "blasts.png",
        x=dict(blast_share),
        y=dict(blast_att),
        xlabel="blast ratio (count-based view)",
        ylabel="attention mass on blasts",
        title="attention vs the blast count",
    )
    summary["_figures"] += [
        ("figures/cohort/entropy.png", "attention entropy"),
        ("figures/cohort/blasts.png", "attention on blasts vs blast ratio"),
    ]
    summary["mean_entropy"] = float(np.mean([v for vs in entropy.values() for v in vs]))
    if curves:
        areas = np.array([c.area_between for c in curves.values()])
        mean, lo, hi = bootstrap_mean_ci(areas, seed=seed)
        summary.update(deletion_area=mean, deletion_area_ci_low=lo, deletion_area_ci_high=hi)
        att = np.stack([c.attention for c in curves.values()])
        rnd = np.stack([c.random for c in curves.values()])
        fr = next(iter(curves.values())).fractions
        figures.deletion_plot(
            fig_dir / "deletion.png",
            fractions=fr,
            attention=att.mean(0),
            random=rnd.mean(0),
            attention_band=np.quantile(att, [0.25, 0.75], axis=0),
            random_band=np.quantile(rnd, [0.25, 0.75], axis=0),
            title=f"cohort deletion, area {mean:.3f} [{lo:.3f}, {hi:.3f}]",
        )
        summary["_figures"].append(("figures/cohort/deletion.png", "cohort deletion curves (IQR bands)"))
    with_cue = [p for p in patients if p.cue is not None and p.true == cue_diagnosis and p.true == p.predicted]
    factors = [f for p in with_cue if (f := cue_enrichment(p.attention, p.cue, 10)) is not None]
    if factors:
        mean, lo, hi = bootstrap_mean_ci(np.array(factors), seed=seed)
        summary.update(
            cue_enrichment_top10=mean, cue_enrichment_ci_low=lo, cue_enrichment_ci_high=hi, cue_patients=len(factors)
        )
    return summary
