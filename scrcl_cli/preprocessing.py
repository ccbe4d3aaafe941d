"""Scanpy-compatible preprocessing for scRCL's SC variant, in numpy/scipy.

Hand-written so that the inference image needs no scanpy (and its numba/llvmlite weight);
`tests/test_preprocessing.py` proves the HVG set and values match scanpy on shared datasets.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from ._utils import VALUE_BLOCK
from .config import Expression, InputMode
from .errors import ScrclError

log = logging.getLogger(__name__)

TARGET_SUM = 1e4


def nonzero_masks(x: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """Cells with at least one count and genes seen in at least one cell.

    x: CSR, shape (n_cells, n_genes). Returns two boolean masks, shapes (n_cells,), (n_genes,).
    """
    x = sp.csr_matrix(x)
    nz = x.data != 0
    if nz.all():  # no stored zeros (the usual case): a cell with entries has counts
        cells = np.diff(x.indptr) > 0
    else:
        cells = np.bincount(np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))[nz], minlength=x.shape[0]) > 0
    seen = np.zeros(x.shape[1], dtype=np.int64)
    for a in range(0, x.nnz, VALUE_BLOCK):  # bincount widens the indices to int64: by blocks
        seen += np.bincount(x.indices[a : a + VALUE_BLOCK][nz[a : a + VALUE_BLOCK]], minlength=x.shape[1])
    return cells, seen > 0


def normalize_log1p(x: sp.csr_matrix, target_sum: float = TARGET_SUM) -> sp.csr_matrix:
    """Scale each cell to `target_sum` total counts, then log1p (scanpy normalize_total + log1p).

    x: CSR float, shape (n_cells, n_genes). Cells with zero total stay zero.
    Returns a new CSR float32 matrix of the same shape.
    """
    x = sp.csr_matrix(x, dtype=np.float32, copy=True)
    totals = np.asarray(x.sum(axis=1), dtype=np.float64).ravel()
    scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
    # In place on the copy, with one float32 temporary the size of the nonzeros: at ten million
    # cells each further nonzero-sized array would be 6 GB (12 GB in float64).
    x.data *= np.repeat(scale.astype(np.float32), np.diff(x.indptr))
    np.log1p(x.data, out=x.data)
    return x


def mean_var(x: sp.csr_matrix, transform: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene mean and unbiased variance, float64 (G,) each, of x: CSR (N, G); scanpy's ``_get_mean_var`` formula.

    transform: an elementwise function applied to the stored values in float64 first (it must map
    0 to 0), e.g. np.expm1. The sums run over blocks of stored values, so the float64 copies are
    128 MiB each, not 8 bytes per stored value (12 GB at ten million cells).
    """
    n, g = x.shape
    total = np.zeros(g)
    squares = np.zeros(g)
    for a in range(0, x.nnz, VALUE_BLOCK):
        data = x.data[a : a + VALUE_BLOCK].astype(np.float64)
        if transform is not None:
            data = transform(data)
        idx = x.indices[a : a + VALUE_BLOCK]
        total += np.bincount(idx, weights=data, minlength=g)
        squares += np.bincount(idx, weights=data * data, minlength=g)
    mean = total / n
    var = squares / n - mean**2
    if n > 1:
        var *= n / (n - 1)
    return mean, var


def highly_variable_seurat(lognorm: sp.csr_matrix, n_top_genes: int, n_bins: int = 20) -> np.ndarray:
    """Seurat-flavour highly variable genes on log1p data (scanpy's default flavour).

    lognorm: CSR, shape (n_cells, n_genes), natural-log log1p of normalised counts.
    Returns a boolean mask, shape (n_genes,). Genes are ranked by dispersion normalised within
    20 equal-width bins of log mean expression; ties at the cut-off are all kept, as scanpy does.
    """
    x = sp.csr_matrix(lognorm)
    mean, var = mean_var(x, np.expm1)
    mean[mean == 0] = 1e-12
    with np.errstate(divide="ignore", invalid="ignore"):
        disp = var / mean
        disp[disp == 0] = np.nan
        disp = np.log(disp)
    logmean = np.log1p(mean)

    # pandas.cut(bins=n) semantics: equal-width, right-closed bins, left edge moved by 0.1%.
    lo, hi = logmean.min(), logmean.max()
    if hi == lo:
        edges = np.linspace(lo - 0.001 * abs(lo), hi + 0.001 * abs(hi), n_bins + 1)
    else:
        edges = np.linspace(lo, hi, n_bins + 1)
        edges[0] -= (hi - lo) * 0.001
    bins = np.clip(np.searchsorted(edges, logmean, side="left") - 1, 0, n_bins - 1)

    avg = np.full(n_bins, np.nan)
    dev = np.full(n_bins, np.nan)
    for b in np.unique(bins):  # at most n_bins iterations
        d = disp[bins == b]
        d = d[~np.isnan(d)]
        if d.size:
            avg[b] = d.mean()
        if d.size > 1:
            dev[b] = d.std(ddof=1)
    # Bins holding one gene: scanpy sets that gene's normalised dispersion to 1.
    one = np.isnan(dev) & ~np.isnan(avg)
    dev[one] = avg[one]
    avg[one] = 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        norm = (disp - avg[bins]) / dev[bins]

    valid = norm[~np.isnan(norm)]
    n = min(n_top_genes, x.shape[1], valid.size)
    if n == 0:
        raise ScrclError("no gene varies across cells", "Check that X holds expression values")
    cutoff = np.sort(valid)[::-1][n - 1]
    return np.nan_to_num(norm, nan=-np.inf) >= cutoff


@dataclass(frozen=True)
class Prepared:
    """Preprocessed training data.

    genes: selected gene names in model order, length G.
    cell_mask: kept cells of the input, shape (n_obs,).
    lognorm: log-normalised HVG matrix, CSR (N, G); the cell graph is built on it.
    model_input: the matrix fed to the model, CSR (N, G): raw HVG values ("counts") or `lognorm`.
    """

    genes: list[str]
    cell_mask: np.ndarray
    lognorm: sp.csr_matrix
    model_input: sp.csr_matrix


def lognormalize(x: sp.csr_matrix, expression: Expression) -> sp.csr_matrix:
    """Log-normalised values: normalize+log1p for counts/continuous, unchanged for log input."""
    if expression == "log":
        return sp.csr_matrix(x, dtype=np.float32)
    return normalize_log1p(x)


def prepare(
    x: sp.csr_matrix,
    var_names: list[str],
    *,
    n_top_genes: int = 2000,
    input_mode: InputMode = "lognorm",
    expression: Expression = "counts",
) -> Prepared:
    """Filter empty cells and genes, log-normalise, select HVGs, build the model input.

    x: CSR, shape (n_obs, n_vars), validated by `data.validate_adata`.
    """
    cells, genes = nonzero_masks(x)
    n_cells_dropped, n_genes_dropped = int((~cells).sum()), int((~genes).sum())
    if n_cells_dropped or n_genes_dropped:
        log.info("dropped %d all-zero cells and %d all-zero genes", n_cells_dropped, n_genes_dropped)
    if not cells.any() or not genes.any():
        raise ScrclError("every cell or every gene has zero counts", "Check that X holds expression values")
    # Only the rows and columns that go: each copy of X is 12 GB at ten million cells.
    xf = sp.csr_matrix(x if cells.all() else x[cells])
    xf = xf if genes.all() else sp.csr_matrix(xf[:, genes])
    names = [n for n, keep in zip(var_names, genes) if keep]
    lognorm = lognormalize(xf, expression)
    hvg = highly_variable_seurat(lognorm, n_top_genes)
    idx = np.flatnonzero(hvg)
    log.info("selected %d highly variable genes of %d", idx.size, len(names))
    # Never the caller's X itself (log input may pass through unchanged): the result is ours to keep.
    whole = idx.size == lognorm.shape[1] and not np.may_share_memory(lognorm.data, xf.data)
    lognorm_hvg = lognorm if whole else sp.csr_matrix(lognorm[:, idx])
    model_input = lognorm_hvg if input_mode == "lognorm" else sp.csr_matrix(xf[:, idx], dtype=np.float32)
    return Prepared(
        genes=[names[i] for i in idx],
        cell_mask=cells,
        lognorm=lognorm_hvg,
        model_input=model_input,
    )


def transform_query(x_aligned_lognorm: sp.csr_matrix, x_aligned_raw: sp.csr_matrix, input_mode: InputMode) -> sp.csr_matrix:
    """Model input for query cells already aligned to the model genes (`io.h5ad.gene_selection`)."""
    return x_aligned_lognorm if input_mode == "lognorm" else sp.csr_matrix(x_aligned_raw, dtype=np.float32)
