"""A 2-D map of each encoder's cell embeddings (UMAP through umap-learn, or t-SNE), coloured by cell type."""

from __future__ import annotations

from pathlib import Path

import numpy as np

METHODS = ("umap", "tsne", "none")


def embed_2d(x: np.ndarray, *, method: str, seed: int) -> np.ndarray:
    """(N, D) -> (N, 2); cosine geometry, as the kNN probe sees it."""
    if method == "umap":
        import warnings

        import umap

        with warnings.catch_warnings():  # "n_jobs overridden to 1 by setting random_state": wanted, for a fixed map
            warnings.simplefilter("ignore")
            reducer = umap.UMAP(n_neighbors=min(15, len(x) - 1), metric="cosine", random_state=seed)
            return reducer.fit_transform(x)
    from sklearn.manifold import TSNE

    perplexity = float(min(30, max(2, len(x) // 4)))
    return TSNE(n_components=2, metric="cosine", init="pca", random_state=seed, perplexity=perplexity).fit_transform(x)


def write_embedding_png(
    panels: list[tuple[str, np.ndarray, np.ndarray]], classes: list[str], path: Path, *, method: str, seed: int
) -> Path:
    """One panel per (name, features, labels); a shared legend of the cell types."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mil.atomic import atomic_path

    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.0 * rows), dpi=110, squeeze=False)
    cmap = plt.get_cmap("tab20" if len(classes) > 10 else "tab10")
    for ax, (name, x, y) in zip(axes.flat, panels, strict=False):
        xy = embed_2d(x, method=method, seed=seed)
        for c in np.unique(y):
            mask = y == c
            ax.scatter(xy[mask, 0], xy[mask, 1], s=4, color=cmap(int(c) % cmap.N), label=classes[int(c)], alpha=0.8)
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    handles, labels = [], []
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label not in labels:
                handles.append(h)
                labels.append(label)
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=7, markerscale=3)
    fig.suptitle(f"cell embeddings ({method.upper()}, cosine), coloured by cell type", fontsize=10)
    fig.tight_layout(rect=(0, 0.06 + 0.02 * (len(labels) // 6), 1, 0.96))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
