"""Patients, their compositions, and the smear fields that show them.

Randomness is drawn from one stream per patient (SeedSequence([seed, patient_index])), so a patient's
fields depend only on the seed, the config and its index: two runs give byte-identical output.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mil.labels import load_label_map
from mil.synth.centres import Centre
from mil.synth.config import SynthConfig
from mil.synth.covariates import draw_covariates, shifted_age
from mil.synth.draw import Sprite, draw_cell, draw_erythrocytes, erythrocyte_half
from mil.synth.morphology import ERYTHROCYTE_RADIUS, MORPHOLOGY
from mil.synth.palette import Stain, render, sample_stain
from mil.synth.shift import shift_stain

ERYTHROCYTE = "erythrocyte"


def all_classes() -> tuple[str, ...]:
    """The 33 classes of the default label map, in label-map order."""
    return load_label_map().classes


def nucleated_classes() -> tuple[str, ...]:
    """Classes a composition is made of: every class but the erythrocyte (set by erythrocyte_density)."""
    return tuple(c for c in all_classes() if c != ERYTHROCYTE)


def expected_compositions(config: SynthConfig) -> dict[str, np.ndarray]:
    """Expected class shares (over nucleated_classes()) of each diagnosis after `overlap` is applied.

    A diagnosis's own composition is background + its leukemic weights, normalised; `overlap` blends every
    diagnosis toward the mean of all of them, so overlap=1 makes them identical (a count sees nothing).
    """
    names = nucleated_classes()
    background = np.array([config.background.get(c, 0.0) for c in names], dtype=np.float64)
    own = {}
    for d in config.diagnoses:
        w = background + np.array([d.composition.get(c, 0.0) for c in names], dtype=np.float64)
        own[d.name] = w / w.sum()
    mean = np.mean(list(own.values()), axis=0)
    return {name: (1 - config.overlap) * p + config.overlap * mean for name, p in own.items()}


@dataclass(kw_only=True)
class Cell:
    """One labelled (or unlabelled) cell of a field, box in field pixels (x0, y0, x1, y1 exclusive)."""

    cell_id: str
    box: tuple[int, int, int, int]
    true_label: str
    consensus_label: str
    label_session_1: str
    label_session_2: str
    auer_rod: int


@dataclass(kw_only=True)
class Field:
    roi_id: str
    image: np.ndarray  # (H, W, 3) uint8
    cells: list[Cell] = field(default_factory=list)


@dataclass(kw_only=True)
class Patient:
    patient_id: str
    slide_id: str
    diagnosis: str
    subtype: str
    ncit_concept_code: str
    age: int
    centre: str = "A"
    covariates: dict[str, str] = field(default_factory=dict)  # age and every covariate, '' where missing
    fields: list[Field] = field(default_factory=list)


def _place(sprites: list[Sprite], width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """Centres (n, 2) as (x, y) for sprites, largest first, keeping every patch inside the image.

    Cells may touch: the minimum gap shrinks only when a crowded field leaves no free spot.
    """
    centres = np.zeros((len(sprites), 2), dtype=np.int64)
    radii = np.array([s.radius for s in sprites])
    order = np.argsort(-radii, kind="stable")
    placed: list[int] = []
    for i in order:
        s = sprites[i]
        lo = s.half
        hi_x, hi_y = width - s.half - 1, height - s.half - 1
        chosen = None
        for factor in (1.0, 0.9, 0.8, 0.7, 0.6, 0.45, 0.3, 0.0):
            cand = np.stack([rng.integers(lo, hi_x + 1, 48), rng.integers(lo, hi_y + 1, 48)], axis=1)
            if not placed:
                chosen = cand[0]
                break
            gap = np.hypot(*(cand[:, None, :] - centres[placed][None, :, :]).transpose(2, 0, 1))
            ok = np.all(gap >= factor * (s.radius + radii[placed])[None, :], axis=1)
            if ok.any():
                chosen = cand[int(np.argmax(ok))]
                break
        centres[i] = chosen
        placed.append(int(i))
    return centres


def _background(config: SynthConfig, stain: Stain, rng: np.random.Generator, cells: np.ndarray, radii: np.ndarray):
    """OD canvas (H + 2p, W + 2p, 3) with the plasma film and the erythrocyte background, and its padding p."""
    from scipy.spatial import cKDTree

    w, h = config.field_width, config.field_height
    target = int(config.erythrocyte_density * w * h / (np.pi * ERYTHROCYTE_RADIUS**2))
    half = erythrocyte_half()
    pad = 2 * half + 1  # room for erythrocytes cut by the field's edge
    # a thicker or thinner smear region across the field: low-frequency variation of the plasma film
    # (separable waves: as smooth as an interpolated grid at a fraction of the cost)
    waves = []
    for n in (h + 2 * pad, w + 2 * pad):
        t = np.arange(n, dtype=np.float32) / n
        waves.append(1 + 0.2 * np.sin(2 * np.pi * (rng.uniform(0.3, 1.2) * t + rng.uniform(0, 1))).astype(np.float32))
    film = waves[0][:, None] * waves[1][None, :]
    canvas = stain.od("plasma").astype(np.float32) * film[..., None]
    pts = rng.uniform(0, 1, (int(target * 1.6) + 1, 2)) * [w + 2 * half, h + 2 * half] - half
    keep = np.ones(len(pts), dtype=bool)
    if len(cells):
        gap = np.hypot(*(pts[:, None, :] - cells[None, :, :]).transpose(2, 0, 1))
        keep &= np.all(gap >= radii[None, :] + 0.55 * ERYTHROCYTE_RADIUS, axis=1)
    for _, j in sorted(cKDTree(pts).query_pairs(1.3 * ERYTHROCYTE_RADIUS)):
        keep[j] = False  # erythrocytes overlap a little in a monolayer, not stack
    idx = np.nonzero(keep)[0][:target]
    # a field's erythrocytes reuse a few dozen drawn discs: hundreds of distinct ones look no different
    od_rbc, _, _ = draw_erythrocytes(stain, rng, min(len(idx), 48))
    which = rng.integers(0, len(od_rbc), len(idx)) if len(od_rbc) else []
    for k, (px, py) in zip(which, pts[idx]):
        x, y = int(round(px)) + pad, int(round(py)) + pad
        canvas[y - half : y + half + 1, x - half : x + half + 1] += od_rbc[k]
    return canvas, pad


def _labels(true: str, config: SynthConfig, rng: np.random.Generator, classes: tuple[str, ...]) -> tuple[str, ...]:
    """(consensus, session 1, session 2): label noise swaps a label for another class at random."""

    def other(label: str) -> str:
        choice = classes[int(rng.integers(0, len(classes) - 1))]
        return choice if choice != label else classes[-1]

    consensus = other(true) if rng.random() < config.label_noise else true
    s1 = other(consensus) if rng.random() < config.session_disagreement else consensus
    s2 = other(consensus) if rng.random() < config.session_disagreement else consensus
    if rng.random() < config.unlabelled_fraction:
        return "", "", ""
    return consensus, s1, s2


def make_patient(
    config: SynthConfig,
    seed: int,
    index: int,
    diagnosis: str,
    id_width: int = 3,
    centre: Centre | None = None,
    *,
    draw_fields: bool = True,
) -> Patient:
    """One patient with all its fields drawn (draw_fields=False: its clinical facts alone, much faster).

    `centre` sets the fields per patient, the unlabelled share and the stain shift; None = the first centre
    of a single-site cohort (the config as it is).
    """
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))
    spec = next(d for d in config.diagnoses if d.name == diagnosis)
    pid = f"SYN{index + 1:0{id_width}d}"
    subtype = spec.subtypes[int(rng.integers(0, len(spec.subtypes)))] if spec.subtypes else ""
    age = shifted_age(
        int(rng.integers(config.age_range[0], config.age_range[1] + 1)),
        diagnosis,
        config.age_range,
        config.age_effect,
        config.covariate_strength,
    )
    covariates = draw_covariates(
        config.covariates,
        seed=seed,
        index=index,
        diagnosis=diagnosis,
        strength=config.covariate_strength,
        missing=config.covariate_missing,
        age=age,
    )
    patient = Patient(
        patient_id=pid,
        slide_id=f"{pid}_S1",
        diagnosis=diagnosis,
        subtype=subtype,
        ncit_concept_code=spec.ncit_concept_code,
        age=age,
        centre=centre.name if centre else "A",
        covariates=covariates,
    )
    if not draw_fields:
        return patient
    if centre is not None:
        config = config.replace(
            fields_per_patient=centre.fields_per_patient, unlabelled_fraction=centre.unlabelled_fraction
        )
    names, classes = nucleated_classes(), all_classes()
    expected = expected_compositions(config)[diagnosis]
    present = expected > 0
    share = np.zeros_like(expected)
    share[present] = rng.dirichlet(config.patient_concentration * expected[present])
    total = config.fields_per_patient * config.cells_per_field
    drawn = rng.choice(len(names), size=total, p=share / share.sum())
    stain = sample_stain(rng, config.stain_variation)
    if centre is not None:
        stain = shift_stain(stain, centre.index, centre.stain_shift, centre.jpeg_quality)
    for f in range(config.fields_per_patient):
        roi_id = f"{pid}_R{f + 1:02d}"
        field_classes = [names[i] for i in drawn[f * config.cells_per_field : (f + 1) * config.cells_per_field]]
        patient.fields.append(_make_field(config, rng, stain, roi_id, field_classes, diagnosis, classes))
    return patient


def _make_field(
    config: SynthConfig,
    rng: np.random.Generator,
    stain: Stain,
    roi_id: str,
    field_classes: list[str],
    diagnosis: str,
    classes: tuple[str, ...],
) -> Field:
    w, h = config.field_width, config.field_height
    cue_on = config.cue and diagnosis == config.cue_diagnosis
    sprites, truths, auer = [], [], []
    for name in field_classes:
        rod = bool(cue_on and name in config.cue_classes and rng.random() < config.cue_fraction)
        sprites.append(draw_cell(MORPHOLOGY[name], stain, rng, auer_rod=rod))
        truths.append(name)
        auer.append(int(rod))
    if config.labelled_erythrocytes_per_field:
        od, alpha, half = draw_erythrocytes(stain, rng, config.labelled_erythrocytes_per_field)
        for k in range(len(od)):
            sprites.append(Sprite(od=od[k], alpha=alpha[k], half=half, radius=ERYTHROCYTE_RADIUS))
            truths.append(ERYTHROCYTE)
            auer.append(0)
    centres = _place(sprites, w, h, rng)
    radii = np.array([s.radius for s in sprites])
    canvas, pad = _background(config, stain, rng, centres.astype(np.float64), radii)
    cells = []
    for k, (s, (cx, cy)) in enumerate(zip(sprites, centres)):
        y0, x0 = cy - s.half + pad, cx - s.half + pad
        region = canvas[y0 : y0 + 2 * s.half + 1, x0 : x0 + 2 * s.half + 1]
        a = s.alpha[..., None]
        region[...] = region * (1 - a) + s.od
        rows, cols = np.nonzero(s.alpha.max(axis=1) > 0.5)[0], np.nonzero(s.alpha.max(axis=0) > 0.5)[0]
        box = (
            int(cx - s.half + cols[0]),
            int(cy - s.half + rows[0]),
            int(cx - s.half + cols[-1] + 1),
            int(cy - s.half + rows[-1] + 1),
        )
        consensus, s1, s2 = _labels(truths[k], config, rng, classes)
        cells.append(
            Cell(
                cell_id=f"{roi_id}_C{k + 1:03d}",
                box=box,
                true_label=truths[k],
                consensus_label=consensus,
                label_session_1=s1,
                label_session_2=s2,
                auer_rod=auer[k],
            )
        )
    image = render(canvas[pad : pad + h, pad : pad + w], stain, rng)
    return Field(roi_id=roi_id, image=image, cells=cells)
