"""Spatial (ST) variant of scRCL: preprocessing, spatial graph, neighbour-vote refinement, plot.

Spatial preprocessing, graph and neighbour vote of the scRCL reference. numpy/scipy/scikit-learn only (matplotlib inside
`plot_domains`); torch is never imported here.

- `highly_variable_seurat_v3` is scanpy's ``highly_variable_genes(flavor="seurat_v3")``. Its
  loess trend is a port of the 1-D path of Cleveland, Grosse and Shyu's ``dloess`` (the code
  behind ``skmisc.loess``, which scanpy calls): same k-d tree, same local quadratic fits at
  the cell vertices, same cubic Hermite interpolation between them. The runtime therefore
  needs no scikit-misc; `tests/test_spatial.py` compares both the trend and the gene set
  against skmisc and scanpy.
- `prepare_spatial` / `scale_with`: seurat_v3 HVGs on counts -> normalize 1e4 -> log1p ->
  divide by the per-gene standard deviation (no centring) -> clip at 10, as
  ``sc.pp.scale(zero_center=False, max_value=10)``. The standard deviations are returned so
  that a new section is scaled with the training section's values.
- `spatial_graph`: k nearest other spots from a KD-tree (no N x N matrix), union-symmetrised.
- `refine_labels`: the reference's ``refine_label``, vectorised.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from .errors import ScrclError
from .graphs import knn_to_adjacency
from .preprocessing import Prepared, mean_var, nonzero_masks, normalize_log1p

log = logging.getLogger(__name__)

__all__ = [
    "SpatialPrepared",
    "gene_std",
    "highly_variable_seurat_v3",
    "loess_1d",
    "nearest_others",
    "plot_domains",
    "prepare_spatial",
    "refine_labels",
    "scale_with",
    "spatial_graph",
]

MAX_VALUE = 10.0
_EPS = np.finfo(np.float64).eps


# ----------------------------------------------------------------------------- loess


def _local_quadratic(x: np.ndarray, y: np.ndarray, q: float, nf: int, span: float) -> tuple[float, float]:
    """Value and slope at `q` of dloess's local quadratic fit (Fortran ``ehg127``).

    The nf nearest points get tricube weights on the distance to the nf-th one; the weighted
    least-squares problem is solved with column equilibration and an SVD pseudo-inverse whose
    cut-off is 100 * eps * the largest singular value, as ``ehg127`` does.
    """
    dist = (x - q) * (x - q)
    rho = np.partition(dist, nf - 1)[nf - 1] * max(1.0, span)
    if rho <= 0:
        raise ScrclError(
            "the loess trend of the seurat_v3 gene selection has a zero-width neighbourhood (too many genes share one mean)",
            "Select more genes with --n-top-genes, or keep all genes",
        )
    near = dist < rho  # the nf-th point and any tie with it get weight 0 in ehg127
    r = np.sqrt(dist[near] / rho)
    w = np.sqrt((1.0 - r * r * r) ** 3)
    dx = x[near] - q
    b = np.column_stack([w, w * dx, w * (dx * dx)])
    eta = w * y[near]
    colnorm = np.sqrt((b * b).sum(axis=0))
    colnorm[colnorm <= 0] = 1.0
    u, sigma, vt = np.linalg.svd(b / colnorm, full_matrices=False)
    tol = sigma[0] * (100 * _EPS)
    gamma = np.where(sigma > tol, (u.T @ eta) / np.where(sigma > 0, sigma, 1.0), 0.0)
    coef = (vt.T @ gamma) / colnorm
    return float(coef[0]), float(coef[1])


def loess_1d(x: np.ndarray, y: np.ndarray, *, span: float = 0.3, cell: float = 0.2) -> np.ndarray:
    """Fitted values of a degree-2 gaussian loess of `y` on `x`, as ``skmisc.loess.loess(x, y,
    span=span, degree=2).fit()`` returns them (surface "interpolate", no robustness iterations).

    x, y: float64, shape (n,). Returns the fitted values at `x`, shape (n,).

    The k-d tree (``ehg126``/``ehg124``): the bounding interval, widened by 0.5 % of the range
    on each side, is split breadth-first at the median point (moved off runs of ties) while a
    cell holds more than floor(n * span * cell) points. At every cell boundary (vertex) a local
    quadratic gives a value and a slope; each x is then the cubic Hermite interpolation of its
    cell's two vertices (``ehg128``). The loop runs over vertices, of which there are about
    2 / (span * cell) = 33, never over points.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n = x.size
    nf = min(n, int(np.floor(n * span + 1e-5)))
    if nf < 4:  # ehg182(104): a local quadratic needs more points than its 3 coefficients
        raise ScrclError(f"loess needs more points than {n}", "Keep more genes for the seurat_v3 selection")
    fc = int(np.floor(n * (span * cell)))
    nvmax = max(200, n)
    xs = np.sort(x)

    lo, hi = xs[0], xs[-1]
    mu = 0.005 * max(hi - lo, 1e-10 * max(abs(lo), abs(hi)) + 1e-30)
    box = (lo - mu, hi + mu)
    splits: list[float] = []
    cells = [(0, n - 1, box[0], box[1])]  # (first, last point in sorted order, lower, upper vertex)
    nc, nv, p = 1, 2, 0
    while p < len(cells):  # breadth-first, as ehg124 walks its cell array
        first, last, v_lo, v_hi = cells[p]
        p += 1
        if last - first + 1 <= fc or nvmax < nc + 2 or nvmax < nv + 1:
            continue
        m = (first + last) // 2
        offset = 0
        while first <= m + offset < last:  # all ties go with the upper son
            if xs[m + offset] == xs[m + offset + 1]:
                offset = -offset
                if offset >= 0:
                    offset += 1
            else:
                m += offset
                break
        split = xs[m]
        if split in (v_lo, v_hi):
            continue
        splits.append(split)
        cells.append((first, m, v_lo, split))
        cells.append((m + 1, last, split, v_hi))
        nc += 2
        nv += 1

    vertices = np.array([box[0], *sorted(splits), box[1]])
    fits = np.array([_local_quadratic(x, y, v, nf, span) for v in vertices])
    # ehg128 descends with "z <= split -> lower son": cell j covers (vertices[j], vertices[j+1]].
    j = np.clip(np.searchsorted(vertices[1:-1], x, side="left"), 0, vertices.size - 2)
    v0, v1 = vertices[j], vertices[j + 1]
    width = v1 - v0
    h = (x - v0) / width
    phi0 = (1 - h) ** 2 * (1 + 2 * h)
    phi1 = h**2 * (3 - 2 * h)
    psi0 = h * (1 - h) ** 2
    psi1 = h**2 * (h - 1)
    return phi0 * fits[j, 0] + phi1 * fits[j + 1, 0] + (psi0 * fits[j, 1] + psi1 * fits[j + 1, 1]) * width


# ----------------------------------------------------------------------------- genes


def highly_variable_seurat_v3(counts: sp.csr_matrix, n_top_genes: int, *, span: float = 0.3) -> np.ndarray:
    """Seurat v3 (``vst``) highly variable genes on raw counts, as scanpy's
    ``highly_variable_genes(flavor="seurat_v3", n_top_genes=n_top_genes)`` with one batch.

    counts: CSR, shape (n_cells, n_genes), raw counts. Returns a boolean mask, shape (n_genes,).

    A loess of log10 variance on log10 mean (non-constant genes) gives each gene an expected
    standard deviation s; counts are clipped at mean + s * sqrt(n_cells); the variance of the
    clipped, standardised counts ranks the genes. Every gene is kept when `n_top_genes` >=
    n_genes (osmFISH's 33 genes), as scanpy does, without fitting the trend.
    """
    x = sp.csr_matrix(counts)
    n, g = x.shape
    if x.nnz and not np.array_equal(x.data, np.round(x.data)):
        log.warning("seurat_v3 expects raw counts, but X holds non-integer values")
    if n_top_genes >= g:
        return np.ones(g, dtype=bool)
    mean, var = mean_var(x)
    not_const = var > 0
    if not_const.sum() < 4:
        raise ScrclError(f"only {int(not_const.sum())} genes vary across cells", "Check that X holds raw counts")
    fitted = np.zeros(g)
    fitted[not_const] = loess_1d(np.log10(mean[not_const]), np.log10(var[not_const]), span=span)
    reg_std = np.sqrt(10**fitted)
    clip = reg_std * np.sqrt(n) + mean
    clipped = np.minimum(x.data.astype(np.float64), clip[x.indices])
    sq_sum = np.bincount(x.indices, weights=clipped * clipped, minlength=g)
    total = np.bincount(x.indices, weights=clipped, minlength=g)
    norm_var = (1 / ((n - 1) * np.square(reg_std))) * (n * np.square(mean) + sq_sum - 2 * total * mean)
    # scanpy: argsort twice gives ranks (same default sort kind, so the same tie order).
    ranks = np.argsort(np.argsort(-norm_var))
    return ranks < n_top_genes


# ----------------------------------------------------------------------------- scaling


def gene_std(lognorm: sp.csr_matrix) -> np.ndarray:
    """Per-gene standard deviation (ddof = 1, zero replaced by 1), as ``sc.pp.scale`` uses.

    lognorm: CSR (N, G). Returns float64, shape (G,).
    """
    _, var = mean_var(sp.csr_matrix(lognorm))
    std = np.sqrt(np.maximum(var, 0.0))
    std[std == 0] = 1.0
    return std


def scale_with(lognorm: sp.csr_matrix, std: np.ndarray, max_value: float = MAX_VALUE) -> sp.csr_matrix:
    """Divide each gene by `std` and clip at `max_value`, no centring (zeros stay zero).

    lognorm: CSR (N, G); std: shape (G,), from `gene_std` on the training section.
    Returns CSR float32 (N, G), equal to ``sc.pp.scale(zero_center=False, max_value=max_value)``
    when `std` comes from the same matrix.
    """
    x = sp.csr_matrix(lognorm, dtype=np.float32, copy=True)
    std = np.asarray(std, dtype=np.float64)
    if std.shape != (x.shape[1],):
        raise ScrclError(f"{std.size} gene standard deviations for {x.shape[1]} genes", "Use the model's gene list")
    x.data = np.minimum(x.data.astype(np.float64) / std[x.indices], max_value).astype(np.float32)
    return x


@dataclass(frozen=True)
class SpatialPrepared(Prepared):
    """Preprocessed spatial section.

    genes: seurat_v3 HVG names in model order, length G; cell_mask: kept spots, (n_obs,).
    lognorm: log1p of counts normalised to 1e4 over all genes, HVG columns, CSR (N, G).
    model_input: `lognorm` / gene_std clipped at max_value, CSR float32 (N, G).
    gene_std: per-gene standard deviation of `lognorm`, float64 (G,); store it with the model.
    """

    gene_std: np.ndarray
    max_value: float = MAX_VALUE


def prepare_spatial(
    counts: sp.csr_matrix,
    var_names: list[str],
    n_top_genes: int = 3000,
    *,
    max_value: float = MAX_VALUE,
) -> SpatialPrepared:
    """seurat_v3 HVGs on counts -> normalize 1e4 -> log1p -> scale without centring, clip.

    counts: CSR, shape (n_obs, n_vars), raw counts. All-zero spots and genes are dropped first
    (logged), as in SC mode. Library sizes come from all genes, as in the reference, which
    normalises before subsetting to the HVGs.
    """
    cells, genes = nonzero_masks(counts)
    if not cells.any() or not genes.any():
        raise ScrclError("every spot or every gene has zero counts", "Check that X holds raw counts")
    dropped = int((~cells).sum()), int((~genes).sum())
    if any(dropped):
        log.info("dropped %d all-zero spots and %d all-zero genes", *dropped)
    x = sp.csr_matrix(sp.csr_matrix(counts)[cells][:, genes])
    names = [n for n, keep in zip(var_names, genes) if keep]
    hvg = np.flatnonzero(highly_variable_seurat_v3(x, n_top_genes))
    log.info("selected %d seurat_v3 highly variable genes of %d", hvg.size, len(names))
    lognorm = sp.csr_matrix(normalize_log1p(x)[:, hvg])
    std = gene_std(lognorm)
    return SpatialPrepared(
        genes=[names[i] for i in hvg],
        cell_mask=cells,
        lognorm=lognorm,
        model_input=scale_with(lognorm, std, max_value),
        gene_std=std,
        max_value=max_value,
    )


# ----------------------------------------------------------------------------- neighbours


def _check_coords(coords: np.ndarray) -> np.ndarray:
    c = np.asarray(coords, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] == 0 or c.shape[1] == 0:
        raise ScrclError(f"spot coordinates have shape {c.shape}, expected (n_spots, 2)", "Pass obsm['spatial']")
    if not np.all(np.isfinite(c)):
        raise ScrclError("spot coordinates hold NaN or infinite values", "Drop those spots or fix obsm['spatial']")
    return c


def nearest_others(coords: np.ndarray, k: int) -> np.ndarray:
    """The k nearest *other* spots of every spot, nearest first; exact ties go to the lower index.

    coords: shape (N, d). Returns int64 (N, min(k, N-1)). A KD-tree finds the candidates, so
    memory is O(N * k), never N x N. The spot itself is excluded by index, so a second spot at
    the same position still counts as a neighbour. Squared distances are recomputed for the
    candidates, so integer grid coordinates tie exactly and the order does not depend on the
    tree: the result equals a stable argsort of each row of the full distance matrix.
    """
    from sklearn.neighbors import KDTree

    c = _check_coords(coords)
    n = c.shape[0]
    k = min(int(k), n - 1)
    if k <= 0:
        return np.empty((n, 0), dtype=np.int64)
    tree = KDTree(c)
    dist, _ = tree.query(c, k=k + 1)
    # Every point within the (k+1)-th distance: this catches all ties at the boundary.
    radius = dist[:, -1] * (1 + 1e-9) + 1e-12
    cand = tree.query_radius(c, r=radius)
    lengths = np.fromiter((a.size for a in cand), dtype=np.int64, count=n)
    rows = np.repeat(np.arange(n), lengths)
    cols = np.concatenate(cand).astype(np.int64)
    keep = rows != cols
    rows, cols = rows[keep], cols[keep]
    diff = c[rows] - c[cols]
    d2 = (diff * diff).sum(axis=1)
    order = np.lexsort((cols, d2, rows))
    rows, cols = rows[order], cols[order]
    # Each row keeps at least k candidates (k + 1 queried points minus itself, at most).
    counts = np.bincount(rows, minlength=n)
    start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    idx = start[:, None] + np.arange(k)[None, :]
    return cols[idx]


def spatial_graph(coords: np.ndarray, k: int = 15) -> sp.csr_matrix:
    """Binary spatial kNN graph, union-symmetrised, no self loops.

    coords: spot positions, shape (N, 2) (any dimension works). Each spot links to its k
    nearest other spots (Euclidean; `nearest_others`), then A = max(A, A^T).
    Returns CSR float32 (N, N) with values 1. The reference builds a dense N x N distance matrix
    and an argsort per spot; this needs O(N * k) memory.
    """
    return knn_to_adjacency(nearest_others(coords, k))


def refine_labels(labels: np.ndarray, coords: np.ndarray, n_neighbours: int = 50) -> np.ndarray:
    """Neighbour-vote refinement (the reference's ``refine_label(..., radius=50)``).

    labels: shape (N,), any hashable values; coords: shape (N, d).
    Each spot takes the most frequent label among its `n_neighbours` nearest other spots
    (itself excluded, its own label not counted). Ties between labels go to the tied label
    seen first walking outwards from the spot, which is what the reference's
    ``max(neigh_type, key=neigh_type.count)`` does. Vectorised: O(N * n_neighbours) memory.
    Returns a new array of the same dtype; `labels` is not modified.
    """
    labels = np.asarray(labels)
    c = _check_coords(coords)
    if labels.shape != (c.shape[0],):
        raise ScrclError(f"{labels.size} labels for {c.shape[0]} spots", "Pass one label per spot")
    nbrs = nearest_others(c, n_neighbours)
    n, k = nbrs.shape
    if k == 0:
        return labels.copy()
    uniq, codes = np.unique(labels, return_inverse=True)
    codes = codes.reshape(-1)
    m = uniq.size
    votes = codes[nbrs]  # (N, k)
    rows = np.repeat(np.arange(n), k)
    counts = np.bincount(rows * m + votes.ravel(), minlength=n * m).reshape(n, m)
    first = np.full((n, m), k, dtype=np.int64)
    np.minimum.at(first, (rows, votes.ravel()), np.tile(np.arange(k), n))
    tied = counts == counts.max(axis=1, keepdims=True)
    winner = np.where(tied, first, k + 1).argmin(axis=1)
    return uniq[winner]


# ----------------------------------------------------------------------------- plot


def plot_domains(
    coords: np.ndarray,
    labels: np.ndarray,
    path: str | os.PathLike[str],
    title: str = "",
    *,
    point_size: float | None = None,
    dpi: int = 100,
    overwrite: bool = True,
) -> Path:
    """Draw the spots at their coordinates, coloured by label, and write a PNG to `path`.

    coords: (N, 2) image-style coordinates (y grows downwards, so the y axis is inverted);
    labels: (N,). Needs matplotlib (the ``plot`` extra). The file is written to a temporary
    name in the target folder and moved into place, so a failed plot leaves no partial file.
    Returns the path written.
    """
    try:
        import matplotlib as mpl

        mpl.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ScrclError("plotting needs matplotlib", "pip install 'scrcl-cli[plot]'") from e
    c = _check_coords(coords)
    labels = np.asarray(labels)
    if labels.shape != (c.shape[0],):
        raise ScrclError(f"{labels.size} labels for {c.shape[0]} spots", "Pass one label per spot")
    uniq, codes = np.unique(labels.astype(str), return_inverse=True)
    cmap = plt.get_cmap("tab10" if uniq.size <= 10 else "tab20")
    size = point_size if point_size is not None else max(1.0, 12000.0 / c.shape[0])
    fig, ax = plt.subplots(figsize=(5.6, 4.6))
    for i, name in enumerate(uniq):  # one scatter per label, for the legend (K is small)
        sel = codes == i
        ax.scatter(c[sel, 0], c[sel, 1], s=size, color=cmap(i % cmap.N), label=name, linewidths=0)
    ax.set_aspect("equal")
    ax.invert_yaxis()
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, markerscale=2.5 / max(size, 1) ** 0.5 * 2, frameon=False)
    fig.tight_layout()
    path = Path(path)
    from .io.output import atomic_path  # the package's one atomic-write path (permissions, signals, clean-up)

    try:
        with atomic_path(path, overwrite=overwrite) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        plt.close(fig)
    return path
