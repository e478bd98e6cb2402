"""Figures of attention over cells (matplotlib, Agg backend, saved as PNG for papers and the report)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from mil.atomic import atomic_path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return path


class FieldCache:
    """Decodes each smear field once per report, however many cells of it are shown."""

    def __init__(self) -> None:
        self._images: dict[str, np.ndarray] = {}

    def get(self, path: str) -> np.ndarray:
        if path not in self._images:
            with Image.open(path) as im:
                self._images[path] = np.asarray(im.convert("RGB"))
        return self._images[path]

    def crop(self, path: str, box, margin: int = 4) -> np.ndarray:
        img = self.get(path)
        x0, y0, x1, y1 = (int(v) for v in box)
        h, w = img.shape[:2]
        return img[max(0, y0 - margin) : min(h, y1 + margin), max(0, x0 - margin) : min(w, x1 + margin)]


def gallery(
    path: Path,
    *,
    scores: np.ndarray,
    crops: list[np.ndarray],
    captions: list[str],
    title: str,
    top_k: int = 8,
) -> Path:
    """Two rows: the top-k and the bottom-k cells by attention, each with its score and caption."""
    plt = _plt()
    order = np.argsort(-scores, kind="stable")
    k = min(top_k, len(order))
    rows = [("highest attention", order[:k]), ("lowest attention", order[::-1][:k])]
    fig, axes = plt.subplots(2, k, figsize=(1.6 * k, 4.0), squeeze=False)
    for r, (label, idx) in enumerate(rows):
        for c in range(k):
            ax = axes[r][c]
            ax.axis("off")
            if c >= len(idx):
                continue
            i = idx[c]
            ax.imshow(crops[i])
            ax.set_title(f"{scores[i]:.3f}\n{captions[i]}", fontsize=6)
        axes[r][0].text(
            -0.15, 0.5, label, transform=axes[r][0].transAxes, rotation=90, va="center", ha="right", fontsize=8
        )
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def field_overlay(
    path: Path, *, image: np.ndarray, boxes: np.ndarray, scores: np.ndarray, vmax: float, title: str
) -> Path:
    """The smear field with every cell's box coloured by attention, and a colour bar."""
    plt = _plt()
    import matplotlib
    from matplotlib import cm, colors
    from matplotlib.patches import Rectangle

    norm = colors.Normalize(vmin=0.0, vmax=max(vmax, 1e-12))
    cmap = matplotlib.colormaps["inferno"]
    fig, ax = plt.subplots(figsize=(5.5, 5.0))
    ax.imshow(image)
    for (x0, y0, x1, y1), s in zip(boxes, scores):
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=1.8, edgecolor=cmap(norm(s))))
    ax.axis("off")
    fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, fraction=0.046, pad=0.04, label="attention")
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def deletion_plot(
    path: Path,
    *,
    fractions: np.ndarray,
    attention: np.ndarray,
    random: np.ndarray,
    title: str,
    attention_band=None,
    random_band=None,
) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.2, 3.2))
    ax.plot(fractions, attention, "o-", color="#c0392b", label="most-attended removed first")
    ax.plot(fractions, random, "s--", color="#7f8c8d", label="random removal")
    if attention_band is not None:
        ax.fill_between(fractions, *attention_band, color="#c0392b", alpha=0.15)
    if random_band is not None:
        ax.fill_between(fractions, *random_band, color="#7f8c8d", alpha=0.15)
    ax.set_xlabel("fraction of cells removed")
    ax.set_ylabel("probability of predicted diagnosis")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def mass_by_type_heatmap(
    path: Path, *, matrix: np.ndarray, diagnoses: list[str], cell_types: list[str], title: str
) -> Path:
    """Mean share of attention mass per cell type (columns) for the patients of each true diagnosis (rows)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, 0.32 * len(cell_types)), 0.5 * len(diagnoses) + 2.2))
    im = ax.imshow(matrix, aspect="auto", cmap="magma")
    ax.set_xticks(range(len(cell_types)), cell_types, rotation=75, ha="right", fontsize=7)
    ax.set_yticks(range(len(diagnoses)), diagnoses, fontsize=8)
    fig.colorbar(im, ax=ax, label="share of attention mass")
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def entropy_histogram(path: Path, *, entropy_by_diagnosis: dict[str, list[float]], title: str) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.2, 3.2))
    bins = np.linspace(0, 1, 21)
    for dx, values in entropy_by_diagnosis.items():
        ax.hist(values, bins=bins, alpha=0.55, label=dx)
    ax.set_xlabel("normalised attention entropy (1 = uniform)")
    ax.set_ylabel("patients")
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def scatter_by_diagnosis(
    path: Path, *, x: dict[str, list[float]], y: dict[str, list[float]], xlabel: str, ylabel: str, title: str
) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.2, 3.4))
    for dx in x:
        ax.scatter(x[dx], y[dx], s=18, alpha=0.8, label=dx)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)
