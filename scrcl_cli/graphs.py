"""Cell and gene graphs and graph smoothing (method doc §1.2–1.4), without any N x N matrix.

All graphs are `scipy.sparse.csr_matrix`. The kNN search is exact: chunked cosine similarity
(rows x all cells, a chunk at a time, so memory is O(chunk * N)), on a 50-component PCA of the
log-normalised HVGs (as scanpy's pipeline does), or on the HVGs themselves below `pca_threshold`
cells (models of format <= 2 made before the PCA became the default record 10,000 there).
torch is used for the search only when a CUDA device is passed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.sparse as sp

log = logging.getLogger(__name__)

# Search on the PCA at every N. Cosine kNN on the raw 2000-HVG profiles gave a much noisier graph
# (share of edges joining cells of one annotated type, pbmc_10x_4k 0.74 vs 0.84 on the PCA,
# mouse_bladder 0.61 vs 0.84, pollen 0.67 vs 0.90; docs/defaults.md).
PCA_THRESHOLD = 0
_CHUNK_ELEMENTS = 1 << 25  # similarity entries per chunk (128 MiB in float32)


def pca_scores(x: sp.csr_matrix | np.ndarray, n_comps: int = 50) -> np.ndarray:
    """Centred PCA scores from the gene-gene covariance, without densifying `x`.

    x: shape (N, G). Returns float32 scores, shape (N, min(n_comps, G)). Memory O(G^2 + N*n_comps).
    The covariance eigendecomposition is deterministic, so no seed is needed.
    """
    n, g = x.shape
    mean = np.asarray(x.mean(axis=0), dtype=np.float64).ravel()
    gram = x.T @ x
    gram = gram.toarray() if sp.issparse(gram) else np.asarray(gram)
    cov = gram.astype(np.float64) / n - np.outer(mean, mean)
    vals, vecs = np.linalg.eigh(cov)
    top = vecs[:, np.argsort(vals)[::-1][: min(n_comps, g)]]
    # Fix the sign of each component so results do not depend on the LAPACK build.
    top *= np.sign(top[np.argmax(np.abs(top), axis=0), np.arange(top.shape[1])])
    scores = np.asarray(x @ top) - mean @ top
    return scores.astype(np.float32)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


def knn_cosine(
    feats: np.ndarray,
    n_neighbors: int,
    *,
    device: Any = None,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Exact cosine k nearest neighbours, each cell counted as its own first neighbour.

    feats: dense, shape (N, d). n_neighbors: k including the cell itself (scanpy convention).
    device: a CUDA `torch.device` to search on the GPU; None searches with numpy.
    Returns int64 indices of the k-1 nearest *other* cells, shape (N, k-1).
    """
    n = feats.shape[0]
    k = min(n_neighbors, n)
    unit = _unit_rows(np.asarray(feats, dtype=np.float32))
    chunk = max(1, min(n, _CHUNK_ELEMENTS // max(n, 1)))
    out = np.empty((n, k - 1), dtype=np.int64)
    if device is not None:
        import torch

        u = torch.from_numpy(unit).to(device)
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            sim = u[start:stop] @ u.T
            sim[torch.arange(stop - start, device=device), torch.arange(start, stop, device=device)] = float("inf")
            idx = torch.topk(sim, k, dim=1).indices
            out[start:stop] = idx[:, 1:].cpu().numpy()
            if progress:
                progress(stop, n)
        return out
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        sim = unit[start:stop] @ unit.T
        rows = np.arange(stop - start)
        sim[rows, np.arange(start, stop)] = np.inf  # the cell itself always ranks first
        part = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sim, part, axis=1), axis=1, kind="stable")
        out[start:stop] = np.take_along_axis(part, order, axis=1)[:, 1:]
        if progress:
            progress(stop, n)
    return out


def knn_to_adjacency(nbrs: np.ndarray) -> sp.csr_matrix:
    """Union-symmetrised, binarised adjacency without self loops from a neighbour table.

    nbrs: int64, shape (N, k). Returns CSR float32, shape (N, N), symmetric, values 1.
    """
    n, k = nbrs.shape
    rows = np.repeat(np.arange(n), k)
    cols = nbrs.ravel()
    keep = rows != cols
    a = sp.csr_matrix((np.ones(int(keep.sum()), dtype=np.float32), (rows[keep], cols[keep])), shape=(n, n))
    a = a.maximum(a.T).tocsr()
    a.data[:] = 1.0
    a.sort_indices()
    return a


def cell_graph(
    lognorm: sp.csr_matrix | np.ndarray,
    n_neighbors: int = 15,
    *,
    pca_threshold: int = PCA_THRESHOLD,
    device: Any = None,
    progress: Callable[[int, int], None] | None = None,
) -> sp.csr_matrix:
    """Cosine kNN cell graph on the 50-component PCA of log-normalised HVG expression.

    Below `pca_threshold` cells the search runs on the expression itself (old models only).

    lognorm: shape (N, G). Returns the binary symmetric adjacency A, CSR (N, N), no self loops.
    """
    n = lognorm.shape[0]
    if n >= pca_threshold:
        log.info("cell graph: cosine kNN on 50 principal components of %d cells", n)
        feats = pca_scores(lognorm, 50)
    else:
        feats = lognorm.toarray() if sp.issparse(lognorm) else np.asarray(lognorm)
    nbrs = knn_cosine(feats, n_neighbors, device=device, progress=progress)
    return knn_to_adjacency(nbrs)


def gene_graph(x: sp.csr_matrix | np.ndarray, n_neighbors: int = 5) -> sp.csr_matrix:
    """Normalised propagation matrix of the directed gene kNN graph (method doc §1.3).

    x: unsmoothed model input, shape (N, G). Each gene points to its `n_neighbors` nearest genes
    (Euclidean over cells, itself included). As in PyG's GCNConv, messages go source -> target
    and both ends are normalised by in-degree: P[j, i] = 1 / sqrt(deg_j * deg_i) for an edge i -> j.
    Returns P, CSR float32, shape (G, G), so that the layer is ``P @ (X^T W)``.
    """
    g = x.shape[1]
    gram = x.T @ x
    gram = gram.toarray() if sp.issparse(gram) else np.asarray(gram)
    gram = gram.astype(np.float64)
    sq = np.diag(gram).copy()
    d2 = sq[:, None] + sq[None, :] - 2.0 * gram
    np.fill_diagonal(d2, -np.inf)  # self is always among the neighbours, as include_self=True
    k = min(n_neighbors, g)
    nbrs = np.argpartition(d2, k - 1, axis=1)[:, :k]
    src = np.repeat(np.arange(g), k)
    dst = nbrs.ravel()
    m = sp.csr_matrix((np.ones(src.size), (dst, src)), shape=(g, g))  # row = target
    deg = np.asarray(m.sum(axis=1)).ravel()
    dinv = 1.0 / np.sqrt(deg)
    p = sp.diags(dinv) @ m @ sp.diags(dinv)
    return sp.csr_matrix(p, dtype=np.float32)


def gcn_norm(adj: sp.csr_matrix) -> sp.csr_matrix:
    """Renormalised adjacency D^-1/2 (A + I) D^-1/2, D the degree matrix of A + I.

    adj: binary symmetric CSR (N, N) without self loops. Returns CSR float32 (N, N).
    """
    n = adj.shape[0]
    a = sp.csr_matrix(adj, dtype=np.float64) + sp.identity(n, format="csr")
    dinv = 1.0 / np.sqrt(np.asarray(a.sum(axis=1)).ravel())
    out = sp.diags(dinv) @ a @ sp.diags(dinv)
    out = sp.csr_matrix(out, dtype=np.float32)
    out.sort_indices()
    return out


def smooth(x: sp.csr_matrix | np.ndarray, a_hat: sp.csr_matrix, t: int) -> sp.csr_matrix | np.ndarray:
    """Graph low-pass filter Â^t x with t sparse products (t = 0 returns x unchanged).

    x: shape (N, G). a_hat: `gcn_norm` output, shape (N, N).
    """
    for _ in range(t):
        x = a_hat @ x
    return x


def smooth_powers(
    x: sp.spmatrix | np.ndarray, a_hat: sp.csr_matrix, powers: list[int] | tuple[int, ...], *, block: int = 256
) -> dict[int, np.ndarray]:
    """Â^t x for every t in `powers`, from one chain of max(powers) sparse products.

    x: (N, G), sparse or dense. a_hat: `gcn_norm` output (N, N). Returns float32 dense (N, G) per
    power. Columns are smoothed in blocks of `block`, so besides the outputs only two (N, block)
    arrays are alive; each column's sums run in the same order as in `smooth`, so the values
    equal ``smooth(x, a_hat, t)`` cast to float32.
    """
    n, g = x.shape
    wanted = sorted(set(int(t) for t in powers))
    out = {t: np.empty((n, g), dtype=np.float32) for t in wanted}
    for c0 in range(0, g, block):
        c1 = min(g, c0 + block)
        y = x[:, c0:c1]
        y = y.toarray() if sp.issparse(y) else np.array(y)
        for step in range(wanted[-1] + 1):
            if step:
                y = a_hat @ y
            if step in out:
                out[step][:, c0:c1] = y
    return out


def padded_neighbours(a_hat: sp.csr_matrix, self_cols: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Padded neighbour list of a normalised adjacency for gather-based aggregation.

    a_hat: CSR (B, M) with self loops: the whole graph (B = M), or the rows of B target cells
    over the M columns of their one-hop neighbourhood, where self_cols (B,) gives each target's
    own column (default: row i is column i). Returns nbr int64 (B, K) and w float32 (B, K), K
    the largest row length; row i lists its neighbours (itself first) and pads with itself and
    weight 0, so that ``(h[nbr] * w[..., None]).sum(1) == a_hat @ h`` for h of shape (M, H).
    """
    a = sp.csr_matrix(a_hat)
    n = a.shape[0]
    own = np.arange(n, dtype=np.int64) if self_cols is None else np.asarray(self_cols, dtype=np.int64)
    lengths = np.diff(a.indptr)
    k = int(lengths.max()) if n else 0
    rows = np.repeat(np.arange(n), lengths)
    # Put the cell itself first in each row: sort by (row, col != own col, col).
    order = np.lexsort((a.indices, a.indices != own[rows], rows))
    cols, vals = a.indices[order], a.data[order]
    pos = np.arange(rows.size) - np.repeat(a.indptr[:-1], lengths)
    nbr = np.repeat(own[:, None], k, axis=1)
    w = np.zeros((n, k), dtype=np.float32)
    nbr[rows, pos] = cols
    w[rows, pos] = vals
    return nbr, w
