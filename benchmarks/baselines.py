"""Standard-pipeline baselines for benchmarks/accuracy.py (benchmark-only: scanpy, leidenalg, igraph).

The scanpy tutorial pipeline, fixed for every dataset:
normalize_total(1e4) -> log1p -> 2000 seurat HVGs -> scale(max_value=10) -> PCA 50 ->
15-NN graph (UMAP connectivities) -> Leiden. Three clusterings are read from it:

- ``leiden_r1``: Leiden at resolution 1.0 (label-free),
- ``leiden_k``: Leiden with the resolution bisected until it gives K clusters,
- ``kmeans_k``: k-means with K on the PCA.

Two deliberate departures from calling ``sc.pp.neighbors`` / ``sc.tl.leiden``:

- the kNN search is exact (sklearn ``NearestNeighbors``, the cell counted among its 15
  neighbours as scanpy does) and the weights come from scanpy's own UMAP connectivity
  function. ``sc.pp.neighbors`` in scanpy 1.11.5 with scipy 1.17 crashes on >= 8192 cells
  (``csr_array`` has no ``getnnz``;), and its approximate path below that
  keeps self loops; the exact search gives the same graph at every size.
- Leiden runs in leidenalg directly on an undirected weighted igraph graph
  (``RBConfigurationVertexPartition``, iterated to convergence), the model scanpy's
  ``flavor="leidenalg"`` uses, without depending on scanpy's wrapper.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import scipy.sparse as sp

if TYPE_CHECKING:
    from anndata import AnnData

log = logging.getLogger(__name__)

Expression = Literal["counts", "continuous", "log"]


@dataclass(frozen=True)
class Embedding:
    """PCA of one dataset and the graph built on it."""

    pca: np.ndarray  # shape (n_obs, n_comps), float32
    connectivities: sp.csr_matrix  # shape (n_obs, n_obs), symmetric, UMAP weights
    n_hvg: int
    seconds_pca: float  # normalize ... PCA
    seconds_graph: float  # kNN search + connectivities


def standard_pca(adata: AnnData, *, expression: Expression, seed: int, n_top_genes: int = 2000,
                 n_comps: int = 50) -> tuple[np.ndarray, int]:
    """Scanpy standard preprocessing up to the PCA; `adata` is not modified.

    expression: ``counts`` and ``continuous`` (TPM, RPKM) are normalised to 1e4 per cell and
    log1p-transformed; ``log`` data are used as they are (normalising log values is wrong).
    Returns the PCA, shape (n_obs, min(n_comps, n_obs - 1, n_hvg - 1)), and the HVG count.
    """
    import scanpy as sc

    a = adata.copy()
    a.X = sp.csr_matrix(a.X, dtype=np.float32)
    # All-zero genes carry nothing and give NaN dispersions; scrcl-cli drops them too.
    sc.pp.filter_genes(a, min_cells=1)
    if expression != "log":
        sc.pp.normalize_total(a, target_sum=1e4)
        sc.pp.log1p(a)
    sc.pp.highly_variable_genes(a, flavor="seurat", n_top_genes=min(n_top_genes, a.n_vars))
    a = a[:, a.var["highly_variable"].to_numpy()].copy()
    sc.pp.scale(a, max_value=10)
    comps = min(n_comps, a.n_obs - 1, a.n_vars - 1)
    sc.pp.pca(a, n_comps=comps, random_state=seed)
    return np.asarray(a.obsm["X_pca"], dtype=np.float32), int(a.n_vars)


def knn_connectivities(x: np.ndarray, *, n_neighbors: int = 15) -> sp.csr_matrix:
    """Exact kNN (the cell included, as in scanpy) and scanpy's UMAP connectivities.

    x: shape (n_obs, n_features). Returns a symmetric CSR, shape (n_obs, n_obs), no self loops.
    """
    from scanpy.neighbors._connectivity import umap as umap_connectivities
    from sklearn.neighbors import NearestNeighbors

    n, k = x.shape[0], min(n_neighbors, x.shape[0])
    dist, idx = NearestNeighbors(n_neighbors=k).fit(x).kneighbors(x)
    idx, dist = _self_first(idx, dist)
    conn = umap_connectivities(idx, dist, n_obs=n, n_neighbors=k)
    conn = sp.csr_matrix(conn)
    conn.setdiag(0)
    conn.eliminate_zeros()
    return conn


def _self_first(idx: np.ndarray, dist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Put each cell first among its own neighbours, at distance exactly 0.

    UMAP takes rho (its local scale) as the first non-zero distance in the row, the cell itself
    included. Rounding leaves the self distance at ~1e-6 instead of 0 for many cells (61% on
    baron), and rho then collapses to that rounding error, which changes those cells' edge
    weights by up to 0.7. With exact zeros every cell's rho is its nearest other cell, as UMAP
    intends. A cell tied with a duplicate may also be listed after it, or not at all.
    """
    n, k = idx.shape
    idx, dist = idx.copy(), dist.copy()
    rows = np.arange(n)
    for r in np.flatnonzero(idx[:, 0] != rows):
        others = [j for j in range(k) if idx[r, j] != r][: k - 1]
        idx[r] = np.concatenate([[r], idx[r, others]])
        dist[r] = np.concatenate([[0.0], dist[r, others]])
    dist[:, 0] = 0.0
    return idx, dist


def embed(adata: AnnData, *, expression: Expression, seed: int) -> Embedding:
    """PCA and graph for one dataset and seed."""
    t = time.perf_counter()
    pca, n_hvg = standard_pca(adata, expression=expression, seed=seed)
    t_pca = time.perf_counter() - t
    t = time.perf_counter()
    conn = knn_connectivities(pca)
    return Embedding(pca=pca, connectivities=conn, n_hvg=n_hvg, seconds_pca=t_pca,
                     seconds_graph=time.perf_counter() - t)


def _igraph(conn: sp.csr_matrix):
    import igraph as ig

    upper = sp.triu(conn, k=1).tocoo()
    g = ig.Graph(n=conn.shape[0], edges=np.column_stack([upper.row, upper.col]).tolist(), directed=False)
    g.es["weight"] = upper.data.astype(np.float64).tolist()
    return g


def leiden(conn: sp.csr_matrix, *, resolution: float, seed: int, graph=None) -> np.ndarray:
    """Leiden (leidenalg, RB configuration model) on the weighted graph; labels shape (n_obs,)."""
    import leidenalg

    g = graph if graph is not None else _igraph(conn)
    part = leidenalg.find_partition(g, leidenalg.RBConfigurationVertexPartition, weights="weight",
                                    resolution_parameter=resolution, n_iterations=-1, seed=seed)
    return np.asarray(part.membership, dtype=np.int64)


@dataclass(frozen=True)
class BisectResult:
    labels: np.ndarray
    resolution: float
    n_clusters: int
    n_runs: int


def leiden_bisect(conn: sp.csr_matrix, *, n_clusters: int, seed: int, max_runs: int = 40) -> BisectResult:
    """Leiden with the resolution bisected (on a log scale) until it gives `n_clusters`.

    The cluster count grows with the resolution but not strictly; when no resolution tried
    gives exactly `n_clusters`, the closest count wins (ties: the lower resolution).
    """
    g = _igraph(conn)
    tried: dict[float, np.ndarray] = {}

    def run(res: float) -> int:
        tried[res] = leiden(conn, resolution=res, seed=seed, graph=g)
        return int(tried[res].max()) + 1

    lo, hi = 0.05, 1.0
    n_lo, n_hi = run(lo), run(hi)
    while n_hi < n_clusters and hi < 100 and len(tried) < max_runs:
        lo, n_lo = hi, n_hi
        hi *= 2
        n_hi = run(hi)
    while n_lo > n_clusters and lo > 1e-4 and len(tried) < max_runs:
        hi, n_hi = lo, n_lo
        lo /= 2
        n_lo = run(lo)
    while n_lo != n_clusters and n_hi != n_clusters and len(tried) < max_runs:
        mid = float(np.sqrt(lo * hi))
        n_mid = run(mid)
        if n_mid < n_clusters:
            lo, n_lo = mid, n_mid
        else:
            hi, n_hi = mid, n_mid
        if hi / lo < 1 + 1e-6:
            break
    best = min(tried, key=lambda r: (abs(int(tried[r].max()) + 1 - n_clusters), r))
    labels = tried[best]
    return BisectResult(labels=labels, resolution=best, n_clusters=int(labels.max()) + 1, n_runs=len(tried))


def kmeans(x: np.ndarray, *, n_clusters: int, seed: int) -> np.ndarray:
    """sklearn k-means (k-means++, 10 inits, best inertia) on the PCA; labels shape (n_obs,)."""
    from sklearn.cluster import KMeans

    return KMeans(n_clusters=n_clusters, n_init=10, random_state=seed).fit_predict(x).astype(np.int64)
