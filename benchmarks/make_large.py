"""Resample the cells of a real dataset to any size N (up to 1,000,000) for scaling benchmarks.

Each output cell is a real cell of the source file, picked uniformly with replacement, whose
counts are redrawn from a multinomial over that cell's own gene proportions at that cell's own
library size (total count). So every resampled cell has the library size and expression profile
of a real cell, with fresh sampling noise, and duplicates of one source cell are not identical.
The source label is kept in ``obs['cell_type']`` (evaluation only) and the source cell's name
in ``obs['source_cell']``.

Memory stays bounded: cells are generated and appended to the ``.h5ad`` in blocks of
``BLOCK`` cells (X as CSR float32, appended with anndata's on-disk sparse dataset), so peak
memory is the source matrix plus one block, whatever N is. The output depends only on
(source, N, seed): each block draws from its own seeded stream.

Usage:
    python -m benchmarks make-large -n 200000 -o bench/pbmc_200k.h5ad
    python -m benchmarks make-large -n 1000000 -o bench/pbmc_1m.h5ad --seed 1

Library use (other benchmarks): ``resample(load_source(path), n, seed)`` returns CSR + labels
in memory; ``write_resampled(...)`` writes the file.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

log = logging.getLogger("make_large")

REPO = Path(__file__).resolve().parents[1]
_DATA = next((d for d in (REPO.parent / "shared" / "data", REPO / "shared" / "data") if d.is_dir()),
             REPO.parent / "shared" / "data")  # ../shared/data beside the checkout, or shared/ inside it
DEFAULT_SOURCE = _DATA / "pbmc_10x_4k_top2000.h5ad"
BLOCK = 20_000  # cells per RNG stream and per write; fixed so the output does not depend on it
MAX_N = 1_000_000


@dataclass(frozen=True)
class Source:
    """A real count matrix to resample: CSR int64 counts (cells with >= 1 count only)."""

    counts: sp.csr_matrix  # (n_src, G), integer values stored as int64
    labels: np.ndarray  # (n_src,) str
    obs_names: np.ndarray  # (n_src,) str
    var_names: list[str]
    path: str

    @property
    def library(self) -> np.ndarray:
        return np.asarray(self.counts.sum(axis=1)).ravel().astype(np.int64)


def load_source(path: Path | str = DEFAULT_SOURCE, label_key: str = "cell_type") -> Source:
    """Read a raw-count `.h5ad`; refuses non-integer X (multinomial resampling needs counts)."""
    import anndata

    a = anndata.read_h5ad(path)
    x = sp.csr_matrix(a.X)
    x.sum_duplicates()
    x.eliminate_zeros()
    if x.data.size and not np.all(np.equal(np.mod(x.data, 1), 0)):
        raise SystemExit(f"error: {path} does not hold integer counts; pick a raw-count dataset")
    keep = np.diff(x.indptr) > 0
    x = sp.csr_matrix(x[keep], dtype=np.int64)
    labels = a.obs[label_key].astype(str).to_numpy()[keep] if label_key in a.obs else np.full(keep.sum(), "NA")
    return Source(counts=x, labels=labels, obs_names=np.asarray(a.obs_names)[keep], var_names=list(map(str, a.var_names)),
                  path=str(path))


def _picks(n_src: int, n: int, seed: int) -> np.ndarray:
    return np.random.default_rng([seed, 0]).integers(0, n_src, size=n)


def _resample_block(src: Source, picks: np.ndarray, rng: np.random.Generator) -> sp.csr_matrix:
    """Multinomial redraw of the picked cells, rows in the order of `picks`. CSR float32."""
    x = src.counts
    lib = src.library
    m = picks.size
    # Group the picks by source cell so each source cell costs one vectorised multinomial call.
    order = np.argsort(picks, kind="stable")
    uniq, first, cnt = np.unique(picks[order], return_index=True, return_counts=True)
    nnz_src = np.diff(x.indptr)
    row_nnz = np.empty(m, dtype=np.int64)
    row_nnz[order] = np.repeat(nnz_src[uniq], cnt)
    indptr = np.zeros(m + 1, dtype=np.int64)
    np.cumsum(row_nnz, out=indptr[1:])
    data = np.empty(indptr[-1], dtype=np.float32)
    indices = np.empty(indptr[-1], dtype=np.int32)
    for s, f, c in zip(uniq, first, cnt):
        lo, hi = x.indptr[s], x.indptr[s + 1]
        vals = x.data[lo:hi]
        draws = rng.multinomial(lib[s], vals / vals.sum(), size=int(c))  # (c, nnz_s)
        pos = indptr[order[f:f + c]][:, None] + np.arange(hi - lo)  # (c, nnz_s) slots of these rows
        data[pos] = draws
        indices[pos] = x.indices[lo:hi]
    out = sp.csr_matrix((data, indices, indptr), shape=(m, x.shape[1]))
    out.eliminate_zeros()  # genes that drew 0 this time
    return out


def iter_blocks(src: Source, n: int, seed: int) -> Iterator[tuple[np.ndarray, sp.csr_matrix]]:
    """Yield (source indices, CSR float32 counts) for consecutive blocks of the N output cells."""
    if not 1 <= n <= MAX_N:
        raise SystemExit(f"error: N must be between 1 and {MAX_N}, got {n}")
    picks = _picks(src.counts.shape[0], n, seed)
    for b, start in enumerate(range(0, n, BLOCK)):
        p = picks[start:start + BLOCK]
        yield p, _resample_block(src, p, np.random.default_rng([seed, 1, b]))


def resample(src: Source, n: int, seed: int = 0) -> tuple[sp.csr_matrix, np.ndarray]:
    """All N resampled cells in memory: CSR float32 (N, G) counts and the source label of each."""
    xs, ps = [], []
    for p, x in iter_blocks(src, n, seed):
        xs.append(x)
        ps.append(p)
    picks = np.concatenate(ps)
    return sp.csr_matrix(sp.vstack(xs, format="csr"), dtype=np.float32), src.labels[picks]


def write_resampled(src: Source, n: int, out: Path, seed: int = 0, *, compression: str | None = None) -> dict:
    """Write N resampled cells to `out` (.h5ad, X CSR float32), block by block."""
    import anndata
    import h5py
    import pandas as pd
    from anndata.io import sparse_dataset, write_elem

    t = time.perf_counter()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    picks = _picks(src.counts.shape[0], n, seed)
    cats = sorted(set(src.labels))
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical(src.labels[picks], categories=cats), "source_cell": src.obs_names[picks].astype(str)},
        index=pd.Index([f"r{i}" for i in range(n)]),
    )
    del picks
    skeleton = anndata.AnnData(X=None, obs=obs, var=pd.DataFrame(index=pd.Index(src.var_names)))
    skeleton.uns["source"] = {
        "resampled_from": Path(src.path).name, "n_source_cells": int(src.counts.shape[0]), "seed": int(seed),
        "method": "cells picked uniformly with replacement; counts redrawn multinomially at each cell's own library size",
        "generator": "benchmarks/make_large.py",
    }
    skeleton.write_h5ad(tmp)
    del skeleton, obs
    kw = {"compression": compression} if compression else {}
    nnz = 0
    with h5py.File(tmp, "a") as f:
        for i, (_, x) in enumerate(iter_blocks(src, n, seed)):
            x.indptr = x.indptr.astype(np.int64)  # 64-bit indptr: appends past 2^31 entries stay valid
            if i == 0:
                write_elem(f, "X", x, dataset_kwargs=kw)
            else:
                sparse_dataset(f["X"]).append(x)
            nnz += x.nnz
            log.info("%d / %d cells written", min(n, (i + 1) * BLOCK), n)
    tmp.replace(out)
    return {"n_cells": n, "n_genes": len(src.var_names), "nnz": int(nnz), "seconds": round(time.perf_counter() - t, 2),
            "bytes": out.stat().st_size}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--n-cells", type=int, required=True, help=f"output cells, 1..{MAX_N}")
    ap.add_argument("-o", "--output", type=Path, required=True, help="output .h5ad (keep it out of git: /tmp)")
    ap.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="raw-count .h5ad with obs['cell_type']")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compression", choices=["gzip", "lzf"], default=None, help="HDF5 compression of X (default none)")
    ap.add_argument("--label-key", default="cell_type")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    src = load_source(args.source, args.label_key)
    info = write_resampled(src, args.n_cells, args.output, args.seed, compression=args.compression)
    print(f"wrote {args.output}: {info['n_cells']} cells x {info['n_genes']} genes, {info['nnz']} nonzeros, "
          f"{info['bytes'] / 2**20:.0f} MiB, {info['seconds']} s (source {Path(src.path).name}, seed {args.seed})")


if __name__ == "__main__":
    main()
