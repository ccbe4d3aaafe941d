"""Cell and gene graphs and graph smoothing, without any N x N matrix.

All graphs are `scipy.sparse.csr_matrix`. The kNN search is exact up to `EXACT_KNN_MAX` cells:
chunked cosine similarity (rows x all cells, a chunk at a time, so memory is O(chunk * N)); above,
faiss's inverted-file index (`knn_cosine_approx`). It runs on a 50-component PCA of the
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

    Dense float32 row blocks are multiplied by BLAS (on the CPU, multi-threaded) or on a CUDA
    `torch.device`, and summed in float64. At 200,000 cells x 2,000 genes on 2 CPU cores this
    takes 3.4 s against 14.1 s for scipy's single-threaded sparse product, which also summed
    every row in float32 (docs/benchmarks.md, "Inference throughput").
    """
    n, g = x.shape
    if device is None:
        acc64 = np.zeros((g, g), dtype=np.float64)
        rows = max(1, (1 << 22) // max(g, 1))  # 16 MiB float32 blocks: measured as fast as 64 MiB
        for start in range(0, n, rows):
            blk = x[start : min(n, start + rows)]
            dense = blk.toarray() if sp.issparse(blk) else blk  # type: ignore[union-attr]
            dense = np.asarray(dense, dtype=np.float32)
            acc64 += dense.T @ dense
        return acc64
    import torch

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


def pca_projection(
    x: sp.csr_matrix | np.ndarray, n_comps: int = 50, *, gram: np.ndarray | None = None, standardize: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """The centred PCA of x's rows as a linear map, from the gene-gene covariance.

    x: shape (N, G). gram: `gram_matrix(x)` when the caller has it. standardize: first divide each
    gene by its standard deviation (population, as scanpy's ``pp.scale``; genes that do not vary
    keep scale 1), which is the PCA of the gene correlation matrix. Returns loadings (G, d) and
    offset (d,), both float64, d = min(n_comps, G), such that the scores are ``x @ loadings -
    offset``: the scaling is folded into the loadings, so x is not copied (and the Gram matrix
    densifies it a row block at a time).
    The eigendecomposition is deterministic (no seed), and each component's largest loading is
    positive, so the result does not depend on the LAPACK build.
    """
    n, g = x.shape
    mean = np.asarray(x.mean(axis=0), dtype=np.float64).ravel()
    gram = gram_matrix(x) if gram is None else gram
    cov = gram / n - np.outer(mean, mean)
    inv_sd = np.ones(g)
    if standardize:
        var = np.diag(cov)
        # The Gram matrix sums float32 products, so a constant gene's variance comes out as
        # rounding (~1e-7 of its mean square), not 0: below that it is treated as constant.
        varies = var > 1e-6 * np.maximum(np.diag(gram) / max(n, 1), np.finfo(np.float64).tiny)
        inv_sd[varies] = 1.0 / np.sqrt(var[varies])
        cov = cov * np.outer(inv_sd, inv_sd)
    vals, vecs = np.linalg.eigh(cov)
    top = vecs[:, np.argsort(vals)[::-1][: min(n_comps, g)]]
    top *= np.sign(top[np.argmax(np.abs(top), axis=0), np.arange(top.shape[1])])
    loadings = top * inv_sd[:, None]
    return loadings, mean @ loadings


def pca_scores(x: sp.csr_matrix | np.ndarray, n_comps: int = 50, *, gram: np.ndarray | None = None) -> np.ndarray:
    """Centred PCA scores from the gene-gene covariance, without densifying `x` whole.

    x: shape (N, G). gram: `gram_matrix(x)` when the caller has it. Returns float32 scores,
    shape (N, min(n_comps, G)). Memory O(G^2 + N*n_comps). The covariance eigendecomposition is
    deterministic, so no seed is needed (`pca_projection`).
    """
    loadings, offset = pca_projection(x, n_comps, gram=gram)
    return (np.asarray(x @ loadings) - offset).astype(np.float32)


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


def knn_cosine_approx(
    unit: np.ndarray,
    k: int,
    *,
    seed: int = 0,
    n_lists: int | None = None,
    n_probe: int | None = None,
    candidates: int = 3_500,
    block: int = 16384,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Approximate cosine kNN in O(N) memory, from faiss's inverted-file index (IVF-Flat).

    unit: unit rows, float32 (N, d), so the inner product is the cosine; k: neighbours including
    the cell itself. faiss's k-means (seeded by `seed`, on a fixed sample of 40 cells per list)
    splits the cells into `n_lists` lists (default 4 sqrt(N)); each cell is compared exactly with
    the cells of its `n_probe` nearest lists, by default as many as hold about `candidates` cells,
    so the work per cell stays the same at any N (32 lists at 200,000 cells, 14 at 1,000,000) and
    the search time grows linearly. Returns int64 (N, k-1), nearest first, the cell itself
    excluded. The result does not depend on the thread count. Recall of the exact neighbours and
    time are in the README ("kNN search").
    """
    faiss = _import_faiss()
    n, d = unit.shape
    kk = k - 1
    unit = np.ascontiguousarray(unit, dtype=np.float32)
    lists = max(1, min(n // 40, int(4 * np.sqrt(n)))) if n_lists is None else max(1, min(n_lists, n))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, lists, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    index.cp.niter = 20
    index.cp.max_points_per_centroid = 40
    rng = np.random.default_rng(seed)
    index.train(unit[np.sort(rng.choice(n, size=min(n, 40 * lists), replace=False))])
    index.add(unit)
    probe = int(np.ceil(candidates * lists / n)) if n_probe is None else n_probe
    index.nprobe = max(1, min(probe, lists))
    out = np.empty((n, kk), dtype=np.int64)
    for start in range(0, n, block):
        stop = min(n, start + block)
        _, found = index.search(unit[start:stop], k)
        out[start:stop] = _drop_self(found, np.arange(start, stop), unit)
        if progress:
            progress(stop, n)
    return out


def _import_faiss() -> Any:
    """faiss, made safe to run beside torch and scikit-learn on macOS and Windows.

    There the faiss-cpu, torch and scikit-learn wheels each bundle their own OpenMP runtime, and
    the second one to start aborts the process ("OMP: Error #15", reported to faiss-wheels on GitHub).
    On those platforms faiss runs on one thread, which gives the same neighbours (the search does
    not depend on the thread count), and the duplicate runtime is allowed unless the user set
    KMP_DUPLICATE_LIB_OK. On Linux the wheels bring GNU OpenMP, which makes no such check (CPU
    training beside torch runs there, docs/benchmarks.md), so nothing changes.
    """
    import os
    import sys

    if sys.platform in ("darwin", "win32") and "KMP_DUPLICATE_LIB_OK" not in os.environ:
        log.debug("faiss on %s: allowing a second OpenMP runtime and using one thread", sys.platform)
        os.environ["KMP_DUPLICATE_LIB_OK"] = "TRUE"
    import faiss

    if sys.platform in ("darwin", "win32"):
        faiss.omp_set_num_threads(1)
    return faiss


def _drop_self(found: np.ndarray, rows: np.ndarray, unit: np.ndarray) -> np.ndarray:
    """Each row's k-1 nearest other cells from a search of k that usually found the cell itself.

    found: (B, k) cell indices from faiss, nearest first, -1 where the probed lists held fewer
    than k cells; rows: (B,) the cells searched. A row without its own index drops its last
    entry; a row left short is searched exactly (rare: the probed lists hold thousands of cells),
    in blocks of `_CHUNK_ELEMENTS` similarities.
    """
    kk = found.shape[1] - 1
    is_self = found == rows[:, None]
    # The cell itself, or else the last entry, is removed; the order of the rest is kept.
    drop = np.where(is_self.any(1), is_self.argmax(1), kk)
    keep = np.ones(found.shape, dtype=bool)
    keep[np.arange(found.shape[0]), drop] = False
    out = found[keep].reshape(found.shape[0], kk)
    short = np.flatnonzero((out < 0).any(1))
    if short.size:
        out[short] = knn_cosine_rows(unit, rows[short], kk)
    return out


def knn_cosine_rows(unit: np.ndarray, rows: np.ndarray, kk: int) -> np.ndarray:
    """Exact cosine neighbours of some cells: the `kk` nearest other rows of `unit` for each of
    `rows`, nearest first.

    unit: unit rows, float32 (N, d); rows: int (R,). Returns int64 (R, kk). The similarities are
    formed in blocks of `_CHUNK_ELEMENTS`, so memory stays bounded at any N.
    """
    out = np.empty((rows.size, kk), dtype=np.int64)
    step = max(1, _CHUNK_ELEMENTS // unit.shape[0])
    for s in range(0, rows.size, step):
        part = rows[s : s + step]
        sim = unit[part] @ unit.T
        sim[np.arange(part.size), part] = -np.inf
        top = np.argpartition(-sim, kk - 1, axis=1)[:, :kk]
        order = np.argsort(-np.take_along_axis(sim, top, 1), axis=1, kind="stable")
        out[s : s + part.size] = np.take_along_axis(top, order, 1)
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


def _reserve_disk(path: Any) -> None:
    """Allocate a memory-mapped file's blocks now: a full disk is then an OSError (ENOSPC) here,
    not a SIGBUS that kills the process when a page of the map is first written. File systems
    without allocation (or systems without posix_fallocate) keep the file sparse."""
    import errno
    import os

    if not hasattr(os, "posix_fallocate"):
        return
    with open(path, "r+b") as fh:
        try:
            os.posix_fallocate(fh.fileno(), 0, os.fstat(fh.fileno()).st_size)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise OSError(exc.errno, os.strerror(exc.errno), str(path)) from None


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

        out = {}
        for t in wanted:
            path = Path(out_dir) / f"smoothed_t{t}.npy"
            out[t] = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, g))
            _reserve_disk(path)
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


# Rows per copy of a smoothed column block back to the host: keeps the host's transient copy at
# (65,536, block) instead of (N, block), 10 GB at ten million cells.
_ROWS_TO_HOST = 65_536


def block_width(n: int, g: int, block: int, free_bytes: int) -> int:
    """Columns per smoothing pass on a GPU with `free_bytes` free: at least `block`, at most G, and
    as many as two dense float32 (N, width) arrays (the block and its product) in 40 % of it.

    Fewer passes mean fewer sparse products and, out of core, fewer rewrites of every page of the
    row-major files: with all G columns in one pass each file is written once, front to back.
    """
    fit = int(0.4 * free_bytes) // (2 * 4 * max(n, 1))
    return max(1, min(g, max(block, fit)))


def _smooth_powers_torch(
    x: sp.spmatrix | np.ndarray, a_hat: sp.csr_matrix, wanted: list[int], out: dict[int, np.ndarray], block: int, device: Any
) -> None:
    """`smooth_powers` on a torch device: fills `out` (t -> float32 (N, G)) in place.

    Each column block travels sparse and is made dense on the device, and comes back in row
    chunks, so the host holds no dense (N, block) array and no column-major copy of x.
    """
    import torch

    a_t = torch_csr(a_hat, device)
    n, g = x.shape
    if getattr(device, "type", None) == "cuda":
        block = block_width(n, g, block, int(torch.cuda.mem_get_info(device)[0]))
    xs = sp.csr_matrix(x) if sp.issparse(x) else np.asarray(x)
    for c0 in range(0, g, block):
        c1 = min(g, c0 + block)
        if sp.issparse(xs):
            y = torch_csr(xs[:, c0:c1], device).to_dense()
        else:
            y = torch.from_numpy(np.ascontiguousarray(xs[:, c0:c1], dtype=np.float32)).to(device)
        for step in range(wanted[-1] + 1):
            if step:
                y = a_t @ y
            if step in out:
                for r0 in range(0, n, _ROWS_TO_HOST):
                    out[step][r0 : r0 + _ROWS_TO_HOST, c0:c1] = y[r0 : r0 + _ROWS_TO_HOST].cpu().numpy()


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
