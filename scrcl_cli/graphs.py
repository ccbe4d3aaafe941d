"""Cell and gene graphs and graph smoothing, without any N x N matrix.

All graphs are `scipy.sparse.csr_matrix`. The kNN search is exact: chunked cosine similarity
(rows x all cells, a chunk at a time, so memory is O(chunk * N)), on a 50-component PCA of the
log-normalised HVGs (as scanpy's pipeline does), or on the HVGs themselves below `pca_threshold`
cells (models of format <= 2 made before the PCA became the default record 10,000 there).
torch is used for the search only when a CUDA device is passed.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.sparse as sp

from ._utils import unit_rows

log = logging.getLogger(__name__)

# Search on the PCA at every N. Cosine kNN on the raw 2000-HVG profiles gave a much noisier graph
# (share of edges joining cells of one annotated type, pbmc_10x_4k 0.74 vs 0.84 on the PCA,
# mouse_bladder 0.61 vs 0.84, pollen 0.67 vs 0.90; docs/defaults.md).
PCA_THRESHOLD = 0
_CHUNK_ELEMENTS = 1 << 25  # similarity entries per chunk (128 MiB in float32)
# Above this many cells the CPU search is approximate (`knn_cosine_approx`): the exact one costs
# N^2 comparisons, about 16 minutes at 200,000 cells on 2 cores (docs/benchmarks.md, "Inference throughput").
EXACT_KNN_MAX = 50_000


def gram_matrix(x: sp.csr_matrix | np.ndarray, *, device: Any = None) -> np.ndarray:
    """X^T X as float64 (G, G), for x of shape (N, G), in O(G^2) memory besides x.

    On the CPU, scipy's sparse product (float32, then widened). With a CUDA `torch.device`,
    dense float32 row blocks of at most 512 MiB are multiplied on the GPU and summed in float64,
    which at a million cells takes seconds instead of minutes of single-threaded scipy.
    """
    if device is None:
        gram = x.T @ x
        gram = gram.toarray() if sp.issparse(gram) else np.asarray(gram)
        return gram.astype(np.float64)
    import torch

    n, g = x.shape
    acc = torch.zeros((g, g), dtype=torch.float64, device=device)
    rows = max(1, (1 << 27) // max(g, 1))
    for start in range(0, n, rows):
        blk = _dense_block(x, start, min(n, start + rows), device)
        acc += (blk.T @ blk).double()
    return acc.cpu().numpy()


def _dense_block(x: sp.csr_matrix | np.ndarray, start: int, stop: int, device: Any) -> Any:
    """Rows start:stop of x as a dense float32 torch tensor on `device` (densified there)."""
    import torch

    if not sp.issparse(x):
        return torch.from_numpy(np.ascontiguousarray(x[start:stop], dtype=np.float32)).to(device)
    return torch_csr(x[start:stop], device).to_dense()


def torch_csr(m: sp.spmatrix, device: Any) -> Any:
    """A scipy sparse matrix as a float32 torch sparse CSR tensor on `device`."""
    import torch

    c = sp.csr_matrix(m, dtype=np.float32)
    with warnings.catch_warnings():  # torch calls its CSR support "beta"; the products used here are stable
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
        # torch 2.11 on CUDA still says the checks are "implicitly disabled" although
        # check_invariants=False opts out (seen on GPUs); scipy CSR is valid.
        warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled", category=UserWarning)
        return torch.sparse_csr_tensor(
            torch.from_numpy(c.indptr.astype(np.int64)),
            torch.from_numpy(c.indices.astype(np.int64)),
            torch.from_numpy(c.data),
            size=c.shape,
            check_invariants=False,
        ).to(device)


def pca_scores(x: sp.csr_matrix | np.ndarray, n_comps: int = 50, *, gram: np.ndarray | None = None) -> np.ndarray:
    """Centred PCA scores from the gene-gene covariance, without densifying `x`.

    x: shape (N, G). gram: `gram_matrix(x)` when the caller has it. Returns float32 scores,
    shape (N, min(n_comps, G)). Memory O(G^2 + N*n_comps). The covariance eigendecomposition is
    deterministic, so no seed is needed.
    """
    n, g = x.shape
    mean = np.asarray(x.mean(axis=0), dtype=np.float64).ravel()
    gram = gram_matrix(x) if gram is None else gram
    cov = gram / n - np.outer(mean, mean)
    vals, vecs = np.linalg.eigh(cov)
    top = vecs[:, np.argsort(vals)[::-1][: min(n_comps, g)]]
    # Fix the sign of each component so results do not depend on the LAPACK build.
    top *= np.sign(top[np.argmax(np.abs(top), axis=0), np.arange(top.shape[1])])
    scores = np.asarray(x @ top) - mean @ top
    return scores.astype(np.float32)


def knn_cosine(
    feats: np.ndarray,
    n_neighbors: int,
    *,
    device: Any = None,
    progress: Callable[[int, int], None] | None = None,
    exact_max: int | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Cosine k nearest neighbours, each cell counted as its own first neighbour.

    feats: dense, shape (N, d). n_neighbors: k including the cell itself (scanpy convention).
    device: a CUDA `torch.device` to search exactly on the GPU at any N; None searches with
    numpy: exactly up to `exact_max` cells (default `EXACT_KNN_MAX`), approximately above
    (`knn_cosine_approx`, seeded by `seed`), as the exact CPU search is quadratic in N.
    Returns int64 indices of the k-1 nearest *other* cells, shape (N, k-1), nearest first.
    """
    n = feats.shape[0]
    k = min(n_neighbors, n)
    unit = unit_rows(feats, np.float32)
    if device is None and n > (EXACT_KNN_MAX if exact_max is None else exact_max):
        log.info("approximate kNN search (%d cells, more than %d)", n, EXACT_KNN_MAX if exact_max is None else exact_max)
        return knn_cosine_approx(unit, k, seed=seed, progress=progress)
    out = np.empty((n, k - 1), dtype=np.int64)
    if device is not None:
        import torch

        # The GPU holds larger similarity blocks than host RAM budgets for (1 GiB here).
        chunk = max(1, min(n, (_CHUNK_ELEMENTS << 3) // max(n, 1)))
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
    chunk = max(1, min(n, _CHUNK_ELEMENTS // max(n, 1)))
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


def _top_sorted(sim: np.ndarray, idx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k largest of `sim` (R, C) with their `idx` (R, C), largest first
    (ties: lower candidate index first, so the result does not depend on candidate order)."""
    if sim.shape[1] > k:
        part = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        sim, idx = np.take_along_axis(sim, part, 1), np.take_along_axis(idx, part, 1)
    order = np.lexsort((idx, -sim), axis=1)
    return np.take_along_axis(sim, order, 1), np.take_along_axis(idx, order, 1)


def _reverse_neighbours(nbrs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Up to k cells that list each cell among their neighbours, (N, k) int64, padded with the
    cell itself; a random choice when more do, so hubs do not inflate the candidate lists."""
    n, k = nbrs.shape
    src = np.repeat(np.arange(n), k)
    dst = nbrs.ravel()
    order = np.lexsort((rng.random(dst.size), dst))
    src, dst = src[order], dst[order]
    start = np.searchsorted(dst, np.arange(n))
    rank = np.arange(dst.size) - start[dst]
    out = np.repeat(np.arange(n, dtype=np.int64)[:, None], k, axis=1)
    keep = rank < k
    out[dst[keep], rank[keep]] = src[keep]
    return out


def knn_cosine_approx(
    unit: np.ndarray,
    k: int,
    *,
    seed: int = 0,
    list_size: int = 2000,
    n_refine: int = 3,
    block: int = 4096,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Approximate cosine kNN in O(N) memory and time, for N where the exact search is too slow.

    unit: unit rows, float32 (N, d); k: neighbours including the cell itself. Two stages, both
    vectorised over blocks of cells:
    1. Partition: spherical k-means (on a subsample) splits the cells into about N / list_size
       lists; every cell is compared exactly with the cells of its two most similar lists.
    2. Refinement (NN-descent, Dong et al. 2011): `n_refine` rounds in which every cell is
       compared with its neighbours' neighbours, keeping the k-1 most similar; it stops early
       when fewer than 0.1 % of the entries change.
    Returns int64 (N, k-1), nearest first, the cell itself excluded. Deterministic given `seed`.
    Recall against the exact search is measured in docs/benchmarks.md.
    """
    from sklearn.cluster import KMeans

    n, kk = unit.shape[0], k - 1
    rng = np.random.default_rng(seed)
    n_lists = max(2, n // list_size)
    sample = unit[np.sort(rng.choice(n, size=min(n, 40 * n_lists), replace=False))]
    # k-means on unit rows, centroids re-normalised: the lists of a spherical k-means, from scikit-learn.
    km = KMeans(n_clusters=n_lists, n_init=1, max_iter=25, random_state=seed).fit(sample)
    cents = km.cluster_centers_ / np.maximum(np.linalg.norm(km.cluster_centers_, axis=1, keepdims=True), 1e-12)
    cents = cents.astype(np.float32)
    top2 = np.empty((n, 2), dtype=np.int64)
    for s in range(0, n, block * 4):
        sim = unit[s : s + block * 4] @ cents.T
        best = np.argpartition(-sim, 1, axis=1)[:, :2]
        swap = np.take_along_axis(sim, best, 1)
        top2[s : s + block * 4] = np.where((swap[:, :1] >= swap[:, 1:]), best, best[:, ::-1])
    cand_s = np.full((n, 2 * kk), -np.inf, dtype=np.float32)
    cand_i = np.tile(np.arange(n, dtype=np.int64)[:, None], (1, 2 * kk))
    # Cells grouped by their first and by their second list, so each list finds its own in O(1).
    members = [np.argsort(top2[:, slot], kind="stable") for slot in (0, 1)]
    bounds = [np.searchsorted(top2[m, slot], np.arange(n_lists + 1)) for slot, m in enumerate(members)]
    for lst in range(n_lists):  # one vectorised block per list; lists hold ~list_size cells
        db = members[0][bounds[0][lst] : bounds[0][lst + 1]]
        if db.size == 0:
            continue
        for slot in (0, 1):
            q = members[slot][bounds[slot][lst] : bounds[slot][lst + 1]]
            if q.size == 0:
                continue
            sim = unit[q] @ unit[db].T
            if slot == 0:  # q is db itself; as a second list, db never holds the query cells
                np.fill_diagonal(sim, -np.inf)
            s_top, i_top = _top_sorted(sim, np.broadcast_to(db, sim.shape), min(kk, db.size))
            cand_s[q, slot * kk : slot * kk + s_top.shape[1]] = s_top
            cand_i[q, slot * kk : slot * kk + i_top.shape[1]] = i_top
    _, nbrs = _top_sorted(cand_s, cand_i, kk)
    for rnd in range(n_refine):
        changed = 0
        new = np.empty_like(nbrs)
        both = np.concatenate([nbrs, _reverse_neighbours(nbrs, rng)], axis=1)
        for s in range(0, n, block):
            rows = np.arange(s, min(n, s + block))
            cand = np.concatenate([both[rows], nbrs[both[rows]].reshape(rows.size, -1)], axis=1)
            cand.sort(axis=1)
            sim = np.einsum("rd,rcd->rc", unit[rows], unit[cand])
            dup = np.zeros(cand.shape, dtype=bool)
            dup[:, 1:] = cand[:, 1:] == cand[:, :-1]
            sim[dup | (cand == rows[:, None])] = -np.inf
            _, new[rows] = _top_sorted(sim, cand, kk)
            changed += int((new[rows] != nbrs[rows]).sum())
        nbrs = new
        log.info("kNN refinement round %d: %.3f%% of neighbour entries changed", rnd + 1, 100 * changed / nbrs.size)
        if progress:
            progress(n * (rnd + 1) // n_refine, n)
        if changed < 1e-3 * nbrs.size:
            break
    return nbrs


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
    gram: np.ndarray | None = None,
) -> sp.csr_matrix:
    """Cosine kNN cell graph on the 50-component PCA of log-normalised HVG expression.

    Below `pca_threshold` cells the search runs on the expression itself (old models only).

    lognorm: shape (N, G); gram: its `gram_matrix` when the caller has it; device: a CUDA
    `torch.device` for the Gram matrix and an exact search at any N. Returns the binary
    symmetric adjacency A, CSR (N, N), no self loops.
    """
    n = lognorm.shape[0]
    if n >= pca_threshold:
        log.info("cell graph: cosine kNN on 50 principal components of %d cells", n)
        feats = pca_scores(lognorm, 50, gram=gram_matrix(lognorm, device=device) if gram is None else gram)
    else:
        feats = lognorm.toarray() if sp.issparse(lognorm) else np.asarray(lognorm)  # type: ignore[union-attr]
    nbrs = knn_cosine(feats, n_neighbors, device=device, progress=progress)
    return knn_to_adjacency(nbrs)


def gene_graph(x: sp.csr_matrix | np.ndarray, n_neighbors: int = 5, *, gram: np.ndarray | None = None) -> sp.csr_matrix:
    """Normalised propagation matrix of the directed gene kNN graph.

    x: unsmoothed model input, shape (N, G). Each gene points to its `n_neighbors` nearest genes
    (Euclidean over cells, itself included). As in PyG's GCNConv, messages go source -> target
    and both ends are normalised by in-degree: P[j, i] = 1 / sqrt(deg_j * deg_i) for an edge i -> j.
    gram: `gram_matrix(x)` when the caller has it.
    Returns P, CSR float32, shape (G, G), so that the layer is ``P @ (X^T W)``.
    """
    g = x.shape[1]
    gram = gram_matrix(x) if gram is None else gram
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
    x: sp.spmatrix | np.ndarray,
    a_hat: sp.csr_matrix,
    powers: list[int] | tuple[int, ...],
    *,
    block: int = 256,
    device: Any = None,
    out_dir: Any = None,
) -> dict[int, np.ndarray]:
    """Â^t x for every t in `powers`, from one chain of max(powers) sparse products.

    x: (N, G), sparse or dense. a_hat: `gcn_norm` output (N, N). Returns float32 dense (N, G) per
    power. Columns are smoothed in blocks of `block`, so besides the outputs only two (N, block)
    arrays are alive; each column's sums run in the same order as in `smooth`, so the values
    equal ``smooth(x, a_hat, t)`` cast to float32. With a CUDA `torch.device` the products run
    there in float32 (equal to the CPU values to float32 rounding, not bitwise).

    out_dir: a directory (path-like) to hold the outputs as memory-mapped ``smoothed_t{t}.npy``
    files instead of in memory (out-of-core training: the OS pages rows in and out, so host
    memory does not grow as N x G); the caller removes the directory.
    """
    n, g = x.shape
    wanted = sorted(set(int(t) for t in powers))
    if out_dir is None:
        out = {t: np.empty((n, g), dtype=np.float32) for t in wanted}
    else:
        from pathlib import Path

        out = {
            t: np.lib.format.open_memmap(Path(out_dir) / f"smoothed_t{t}.npy", mode="w+", dtype=np.float32, shape=(n, g))
            for t in wanted
        }
    if device is not None:
        _smooth_powers_torch(x, a_hat, wanted, out, block, device)
        return out
    for c0 in range(0, g, block):
        c1 = min(g, c0 + block)
        y = x[:, c0:c1]
        y = y.toarray() if sp.issparse(y) else np.array(y)  # type: ignore[union-attr]
        for step in range(wanted[-1] + 1):
            if step:
                y = a_hat @ y
            if step in out:
                out[step][:, c0:c1] = y
    return out


def _smooth_powers_torch(
    x: sp.spmatrix | np.ndarray, a_hat: sp.csr_matrix, wanted: list[int], out: dict[int, np.ndarray], block: int, device: Any
) -> None:
    """`smooth_powers` on a torch device: fills `out` (t -> float32 (N, G)) in place."""
    import torch

    a_t = torch_csr(a_hat, device)
    xc = sp.csc_matrix(x, dtype=np.float32) if sp.issparse(x) else np.asarray(x, dtype=np.float32)
    g = x.shape[1]
    for c0 in range(0, g, block):
        c1 = min(g, c0 + block)
        cols = xc[:, c0:c1]
        y = torch.from_numpy(cols.toarray() if sp.issparse(cols) else np.ascontiguousarray(cols)).to(device)  # type: ignore[union-attr]
        for step in range(wanted[-1] + 1):
            if step:
                y = a_t @ y
            if step in out:
                out[step][:, c0:c1] = y.cpu().numpy()


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
