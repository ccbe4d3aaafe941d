"""The approximate kNN search of `train` and `embed` above 50,000 cells: faiss's inverted-file index
(`graphs.knn_cosine_approx`) against pynndescent, recall and time.

Both search the same 50-component PCA scores (`graphs.pca_scores` of the log-normalised model
genes, as `inference.query_graph` does) of a resampled query (benchmarks/make_large.py) for the
k = 15 cosine neighbours (the cell itself included). Recall: the share of the exact k - 1
nearest other cells found, over a random sample of query cells searched exactly. pynndescent's
first call compiles its numba kernels; that time is reported apart, from a search of 2,000 cells
before the timed one. Both use `--threads` threads (faiss through OpenMP, pynndescent n_jobs).

Usage:
    python -m benchmarks knn --sizes 50000,200000 --md bench/knn.md
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent

from benchmarks import make_large
from benchmarks.benchutil import cpu_name, emit_markdown, loadavg


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([np.intersect1d(f, e).size / e.size for f, e in zip(found, exact)]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="50000,200000")
    ap.add_argument("--k", type=int, default=15)
    ap.add_argument("--sample", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=2, help="faiss OpenMP threads and pynndescent n_jobs")
    ap.add_argument("--source", default=str(make_large.DEFAULT_SOURCE))
    ap.add_argument("--workdir", type=Path, default=Path("bench_knn"))
    ap.add_argument("--md", type=Path, default=None)
    args = ap.parse_args(argv)
    import anndata
    import scipy.sparse as sp

    from scrcl_cli import graphs
    from scrcl_cli._utils import unit_rows
    from scrcl_cli.preprocessing import lognormalize

    args.workdir.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks knn " + " ".join(sys.argv[1:] if argv is None else argv)
    rows_md = []
    t = time.perf_counter()
    import faiss
    import pynndescent

    faiss.omp_set_num_threads(args.threads)
    warm = np.random.default_rng(0).random((2000, 50)).astype(np.float32)
    pynndescent.NNDescent(warm, metric="cosine", n_neighbors=args.k, random_state=0, n_jobs=args.threads).neighbor_graph
    compile_s = time.perf_counter() - t
    src = None
    for n in [int(s) for s in args.sizes.split(",")]:
        q = args.workdir / f"query_n{n}.h5ad"
        if not q.exists():
            src = src or make_large.load_source(args.source)
            make_large.write_resampled(src, n, q, 0)
        a = anndata.read_h5ad(q)
        x = lognormalize(sp.csr_matrix(a.X, dtype=np.float32), "counts")
        t = time.perf_counter()
        feats = graphs.pca_scores(x, 50)
        pca_s = time.perf_counter() - t
        unit = unit_rows(feats, np.float32)
        kk = args.k - 1
        rows = np.random.default_rng(1).choice(n, size=min(args.sample, n), replace=False)
        exact = graphs.knn_cosine_rows(unit, rows, kk)
        t = time.perf_counter()
        own = graphs.knn_cosine_approx(unit, args.k, seed=0)
        own_s = time.perf_counter() - t
        t = time.perf_counter()
        index = pynndescent.NNDescent(feats, metric="cosine", n_neighbors=args.k, random_state=0, n_jobs=args.threads)
        idx, _ = index.neighbor_graph
        nnd_s = time.perf_counter() - t
        # pynndescent lists the cell itself first (distance 0); drop it wherever it stands.
        nnd = np.array([[j for j in r if j != i][:kk] for i, r in zip(rows, idx[rows])])
        rows_md.append((n, pca_s, own_s, recall(own[rows], exact), nnd_s, recall(nnd, exact)))
        print(rows_md[-1], flush=True)
    lines = [f"Command: `{command}`", "",
             f"CPU: {cpu_name()}; k = {args.k}; faiss {faiss.__version__} with {args.threads} OpenMP threads; "
             f"pynndescent {pynndescent.__version__} with n_jobs {args.threads}, "
             f"its numba compile (first call, 2,000 cells) {compile_s:.1f} s; recall over {args.sample:,} cells; "
             f"load average {loadavg():.1f} at the end.", "",
             "| N | PCA s | faiss IVF (graphs.knn_cosine_approx) s | recall | pynndescent s | recall |",
             "|---|---|---|---|---|---|"]
    for n, p, o, ro, d, rd in rows_md:
        lines.append(f"| {n:,} | {p:.1f} | {o:.1f} | {ro:.3f} | {d:.1f} | {rd:.3f} |")
    emit_markdown("\n".join(lines) + "\n", args.md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
