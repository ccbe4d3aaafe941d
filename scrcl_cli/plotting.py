"""Pictures of an embedding: a 2-D layout of the cells coloured by cluster (and by any other labels).

The layout is igraph's Fruchterman-Reingold on the cells' kNN graph in the embedding, the
force-directed picture scanpy users know from ``sc.tl.draw_graph``; it is seeded from the
explicit `seed`, so the same call draws the same picture.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

MAX_LAYOUT_CELLS = 20_000


def layout_2d(embedding: np.ndarray, *, seed: int, n_neighbors: int = 15, n_iter: int = 500) -> np.ndarray:
    """Force-directed 2-D coordinates (N, 2) of the rows of `embedding` (N, D) on their kNN graph."""
    import igraph as ig
    from sklearn.neighbors import NearestNeighbors

    x = np.asarray(embedding, dtype=np.float64)
    n = x.shape[0]
    if n < 3:
        return np.column_stack([np.arange(n, dtype=np.float64), np.zeros(n)])
    k = min(n_neighbors, n - 1)
    nbrs = NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x, return_distance=False)[:, 1:]
    edges = {(min(i, j), max(i, j)) for i, row in enumerate(nbrs) for j in row if i != j}
    graph = ig.Graph(n=n, edges=sorted(edges))
    rng = np.random.default_rng(seed)
    start = rng.normal(size=(n, 2)).tolist()
    layout = graph.layout_fruchterman_reingold(seed=start, niter=n_iter)
    return np.asarray(layout.coords, dtype=np.float64)


def plot_embedding(
    embedding: np.ndarray,
    labels: np.ndarray,
    path: Path,
    *,
    seed: int,
    title: str = "",
    overwrite: bool = False,
    extra: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write a PNG of the 2-D layout of `embedding` (N, D) coloured by `labels` (N,), one panel per labelling.

    `extra` adds panels coloured by other labels (e.g. published cell types). At most
    20,000 cells are drawn (a seeded random subset beyond that). Written atomically.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .io.output import atomic_path

    n = embedding.shape[0]
    keep = np.arange(n)
    if n > MAX_LAYOUT_CELLS:
        keep = np.sort(np.random.default_rng(seed).choice(n, MAX_LAYOUT_CELLS, replace=False))
        log.info("--plot draws %d of %d cells", MAX_LAYOUT_CELLS, n)
    xy = layout_2d(embedding[keep], seed=seed)
    panels = {"scrcl cluster": np.asarray(labels)[keep]}
    for name, values in (extra or {}).items():
        panels[name] = np.asarray(values)[keep]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.6), squeeze=False)
    size = max(1.0, 30_000 / max(len(keep), 1) ** 1.1)
    for ax, (name, values) in zip(axes[0], panels.items()):
        cats = sorted({str(v) for v in values}, key=lambda c: (len(c), c))
        cmap = plt.get_cmap("tab20" if len(cats) > 10 else "tab10")
        for i, cat in enumerate(cats):
            sel = np.array([str(v) == cat for v in values])
            ax.scatter(xy[sel, 0], xy[sel, 1], s=size, color=cmap(i % cmap.N), label=cat, linewidths=0)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{title}\n{name}" if title else name, fontsize=9)
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, markerscale=2, frameon=False)
    fig.tight_layout()
    path = Path(path)
    try:
        with atomic_path(path, overwrite=overwrite) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
    return path
