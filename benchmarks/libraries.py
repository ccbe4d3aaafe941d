"""Hand-written code against the well-kept library, in the same run: the label-free cluster count.

    python -m benchmarks libraries [--data-dir ../shared/data]

For each shared scRNA-seq dataset, the expression cell graph of `clustering.choose_n_clusters`
(cosine kNN on 50 PCs of the log-normalised HVGs) gets its communities at resolution 1 from the
hand-written Louvain the package used before and from Leiden (`clustering.leiden`: igraph + leidenalg, as scanpy uses); the table reports the
count of communities with >= 0.5 % of the cells (the label-free K), whether it lands within ±30 % of
the annotated count (labels are read only for this comparison), and the seconds of each.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from benchmarks.accuracy import DEFAULT_DATA, SPATIAL, detect_expression, manifest_datasets


import scipy.sparse as sp


# The hand-written Louvain the package used before Leiden, kept here as the measured baseline.
def louvain_reference(adj: sp.csr_matrix, *, resolution: float = 1.0, seed: int = 0, max_levels: int = 10) -> np.ndarray:
    """Louvain modularity communities of a symmetric weighted graph (Blondel et al. 2008).

    adj: CSR (N, N), symmetric, non-negative, no self loops needed. Returns labels (N,) int64.
    The node loop is in Python, so callers pass graphs of at most some ten thousand nodes.
    """
    rng = np.random.default_rng(seed)
    n0 = adj.shape[0]
    member = np.arange(n0)
    graph = sp.csr_matrix(adj, dtype=np.float64)
    for _ in range(max_levels):
        n = graph.shape[0]
        k = np.asarray(graph.sum(axis=1)).ravel()
        m2 = k.sum()
        if m2 == 0:
            break
        comm = np.arange(n)
        tot = k.copy()
        self_w = graph.diagonal()
        moved_any = False
        for _pass in range(20):
            moved = 0
            for i in rng.permutation(n):
                lo, hi = graph.indptr[i], graph.indptr[i + 1]
                nbr, w = graph.indices[lo:hi], graph.data[lo:hi]
                keep = nbr != i
                cands, inv = np.unique(comm[nbr[keep]], return_inverse=True)
                w_to = np.bincount(inv, weights=w[keep], minlength=cands.size)
                ci = comm[i]
                tot[ci] -= k[i]
                w_own = w_to[cands == ci].sum()
                gain = w_to - resolution * tot[cands] * k[i] / m2
                best_gain = w_own - resolution * tot[ci] * k[i] / m2
                best = ci
                if cands.size:
                    j = int(np.argmax(gain))
                    if gain[j] > best_gain + 1e-12:
                        best = cands[j]
                comm[i] = best
                tot[best] += k[i]
                moved += int(best != ci)
            if moved == 0:
                break
            moved_any = True
        del self_w
        uniq, comm = np.unique(comm, return_inverse=True)
        member = comm[member]
        if not moved_any or uniq.size == n:
            break
        p = sp.csr_matrix((np.ones(n), (np.arange(n), comm)), shape=(n, uniq.size))
        graph = sp.csr_matrix(p.T @ graph @ p)
    return member.astype(np.int64)


def main(argv: list[str] | None = None) -> int:
    import anndata as ad

    from scrcl_cli import clustering, graphs
    from scrcl_cli.preprocessing import prepare

    ap = argparse.ArgumentParser(prog="python -m benchmarks libraries", description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print("| dataset | cells | types | Louvain K | Leiden K | Louvain s | Leiden s |")
    print("|---|---|---|---|---|---|---|")
    hits = {"louvain": 0, "leiden": 0}
    names = [d for d in manifest_datasets(args.data_dir) if d not in SPATIAL]
    for name in names:
        a = ad.read_h5ad(args.data_dir / f"{name}.h5ad")
        truth = int(a.obs["cell_type"].nunique())
        prep = prepare(a.X, [str(v) for v in a.var_names], n_top_genes=2000, input_mode="lognorm",
                       expression=detect_expression(a.X)[0])
        adj = graphs.cell_graph(prep.lognorm, 15, pca_threshold=0)
        t = time.perf_counter()
        k_louvain = clustering.community_count(louvain_reference(adj, resolution=1.0, seed=args.seed), 0.005)
        s_louvain = time.perf_counter() - t
        t = time.perf_counter()
        k_leiden = clustering.community_count(clustering.leiden(adj, resolution=1.0, seed=args.seed), 0.005)
        s_leiden = time.perf_counter() - t
        for key, k in (("louvain", k_louvain), ("leiden", k_leiden)):
            hits[key] += abs(k - truth) <= 0.3 * truth
        print(f"| {name} | {a.n_obs} | {truth} | {k_louvain} | {k_leiden} | {s_louvain:.2f} | {s_leiden:.2f} |", flush=True)
    print(f"\nwithin ±30 % of the annotated count: Louvain {hits['louvain']}/{len(names)}, "
          f"Leiden {hits['leiden']}/{len(names)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
