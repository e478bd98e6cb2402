"""Figures of attention over cells (matplotlib, Agg backend, saved as PNG for papers and the report)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from mil.atomic import atomic_path
from mil.images import load_rgb

# zlib level 1, not Pillow's 6: a report writes a few hundred smear pictures, and with level 6 the whole report took
# 1.6x as long for files 9% smaller (`experiments/bench_attention.py --png-levels 1 6`). Lossless either way.
PNG_LEVEL = 1


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight", pil_kwargs={"compress_level": PNG_LEVEL})
    _plt().close(fig)
    return path


class FieldCache:
    """Decodes each smear field once per report, however many cells of it are shown."""

    def __init__(self) -> None:
        self._images: dict[str, np.ndarray] = {}

    def get(self, path: str) -> np.ndarray:
        if path not in self._images:
            self._images[path] = load_rgb(path)
        return self._images[path]

    def crop(self, path: str, box, margin: int = 4) -> np.ndarray:
        img = self.get(path)
        x0, y0, x1, y1 = (int(v) for v in box)
        h, w = img.shape[:2]
        return img[max(0, y0 - margin) : min(h, y1 + margin), max(0, x0 - margin) : min(w, x1 + margin)]


def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _save_image(image: Image.Image, path: Path) -> Path:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", compress_level=PNG_LEVEL)
    return path


_INFERNO: list[tuple[int, int, int]] = []


def _colour(value: float, vmax: float) -> tuple[int, int, int]:
    """The inferno colour of value / vmax (clipped to [0, 1]) as 8-bit RGB, from a 256-entry table built once:
    `matplotlib.colormaps[name]` copies and re-initialises the map on every lookup (a third of the report's CPU)."""
    if not _INFERNO:
        import matplotlib

        rgb = matplotlib.colormaps["inferno"](np.linspace(0.0, 1.0, 256))[:, :3]
        _INFERNO.extend(tuple(int(c * 255) for c in row) for row in rgb)
    fraction = min(max(value / max(vmax, 1e-12), 0.0), 1.0)
    return _INFERNO[min(int(fraction * 256), 255)]  # as matplotlib indexes a float


TILE = 96  # gallery cell side in pixels


def gallery(
    path: Path,
    *,
    scores: np.ndarray,
    crops: list[np.ndarray],
    captions: list[str],
    title: str,
    top_k: int = 8,
) -> Path:
    """Two rows: the top-k and the bottom-k cells by attention, each with its score and caption.

    Drawn with PIL, not matplotlib: a report has a gallery per patient and branch, and PIL composes them cheaply.
    """
    from PIL import ImageDraw

    order = np.argsort(-scores, kind="stable")
    k = min(top_k, len(order))
    rows = [("highest attention", order[:k]), ("lowest attention", order[::-1][:k])]
    label_w, title_h, caption_h = 22, 22, 28
    row_h = TILE + caption_h
    canvas = Image.new("RGB", (label_w + k * (TILE + 4), title_h + 2 * row_h + 4), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 4), title[:120], fill="black", font=_font(13))
    for r, (label, idx) in enumerate(rows):
        y = title_h + r * row_h
        strip = Image.new("RGB", (row_h, label_w), "white")
        ImageDraw.Draw(strip).text((4, 4), label, fill="#555555", font=_font(11))
        canvas.paste(strip.rotate(90, expand=True), (0, y))
        for c, i in enumerate(idx):
            x = label_w + c * (TILE + 4)
            crop = Image.fromarray(np.ascontiguousarray(crops[i]))
            zoom = TILE / max(crop.size)  # small cells are enlarged, big ones shrunk, aspect kept
            crop = crop.resize((max(1, round(crop.width * zoom)), max(1, round(crop.height * zoom))), Image.BICUBIC)
            canvas.paste(crop, (x + (TILE - crop.width) // 2, y + (TILE - crop.height) // 2))
            draw.text((x, y + TILE + 1), f"{scores[i]:.3f}", fill="black", font=_font(11))
            draw.text((x, y + TILE + 14), captions[i][:16], fill="#333333", font=_font(10))
    return _save_image(canvas, path)


def field_overlay(
    path: Path, *, image: np.ndarray, boxes: np.ndarray, scores: np.ndarray, vmax: float, title: str
) -> Path:
    """The smear field with every cell's box coloured by attention (inferno), and a colour bar."""
    from PIL import ImageDraw

    field = Image.fromarray(np.ascontiguousarray(image)).convert("RGB")
    zoom = max(1.0, 512 / max(field.size))  # small fields are enlarged so boxes and text stay readable
    if zoom > 1:
        field = field.resize((round(field.width * zoom), round(field.height * zoom)), Image.NEAREST)
        boxes = np.asarray(boxes, float) * zoom
    bar_w, title_h = 70, 22
    canvas = Image.new("RGB", (field.width + bar_w, field.height + title_h + 16), "white")
    canvas.paste(field, (0, title_h))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 4), title[:120], fill="black", font=_font(13))
    width = max(2, round(min(field.size) / 170))
    for (x0, y0, x1, y1), s in sorted(zip(np.asarray(boxes).tolist(), scores.tolist()), key=lambda t: t[1]):
        draw.rectangle((x0, y0 + title_h, x1 - 1, y1 - 1 + title_h), outline=_colour(s, vmax), width=width)
    top, bottom = title_h + 10, title_h + field.height - 10
    for y in range(top, bottom):  # colour bar: high attention at the top
        draw.line((field.width + 8, y, field.width + 22, y), fill=_colour((bottom - y) / (bottom - top) * vmax, vmax))
    draw.text((field.width + 26, top - 6), f"{vmax:.3f}", fill="black", font=_font(11))
    draw.text((field.width + 26, bottom - 8), "0", fill="black", font=_font(11))
    draw.text((field.width + 4, bottom + 2), "attention", fill="black", font=_font(11))
    return _save_image(canvas, path)


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
