"""Hand-written code against the well-kept library, in the same run.

    python -m benchmarks libraries [--parts communities,kmeans,large] [--data-dir ../shared/data]
                                   [--embeddings bench/cut/H256_E100_C2000] [--large-n 200000]
    python -m benchmarks libraries --parts scaled-pca --pca-h5ad bench/pbmc_1m.h5ad

communities: for each shared scRNA-seq dataset, the expression cell graph of `clustering.choose_n_clusters`
(cosine kNN on 50 PCs of the log-normalised HVGs) gets its communities at resolution 1 from the
hand-written Louvain the package used before and from Leiden (`clustering.leiden`: igraph + leidenalg, as scanpy uses); the table reports the
count of communities with >= 0.5 % of the cells (the label-free K), whether it lands within ±30 % of
the annotated count (labels are read only for this comparison), and the seconds of each.

kmeans: the K-given clustering of the euclidean embedding (`clustering.ward_kmeans`: k-means++
microclusters, weighted Ward merge, Lloyd over all rows) against the same steps done by scikit-learn's
KMeans (microclusters, and the final Lloyd from the merged start) and by scipy's unweighted Ward
linkage, on the trained embeddings `python -m benchmarks cut --stress` caches (labels, stored beside
each embedding, only score the result). large: the time of each at --large-n rows resampled from
one of those embeddings.

scaled-pca: the principal components of the scaled, unsmoothed model input that the K-given cut
clusters beside the embedding (`clustering.unsmoothed_components`: the package's blocked Gram matrix,
with the scaling folded into the loadings) against scikit-learn's sparse StandardScaler and
``covariance_eigh`` PCA, which computed them before, on every cell of --pca-h5ad (a raw-count file,
e.g. from `python -m benchmarks make-large`): seconds of each and the largest difference of the
components relative to each component's largest absolute score (up to sign).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from benchmarks.accuracy import DEFAULT_DATA, SPATIAL, detect_expression, manifest_datasets
from benchmarks.benchutil import cpu_name, emit_markdown, loadavg


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


def communities_part(data_dir: Path, seed: int) -> list[str]:
    """The markdown of the Louvain/Leiden comparison on every non-spatial shared dataset."""
    import anndata as ad

    from scrcl_cli import clustering, graphs
    from scrcl_cli.preprocessing import prepare

    lines = ["| dataset | cells | types | Louvain K | Leiden K | Louvain s | Leiden s |", "|---|---|---|---|---|---|---|"]
    hits = {"louvain": 0, "leiden": 0}
    names = [d for d in manifest_datasets(data_dir) if d not in SPATIAL]
    for name in names:
        a = ad.read_h5ad(data_dir / f"{name}.h5ad")
        truth = int(a.obs["cell_type"].nunique())
        prep = prepare(a.X, [str(v) for v in a.var_names], n_top_genes=2000, input_mode="lognorm",
                       expression=detect_expression(a.X)[0])
        adj = graphs.cell_graph(prep.lognorm, 15, pca_threshold=0)
        t = time.perf_counter()
        k_louvain = clustering.community_count(louvain_reference(adj, resolution=1.0, seed=seed), 0.005)
        s_louvain = time.perf_counter() - t
        t = time.perf_counter()
        k_leiden = clustering.community_count(clustering.leiden(adj, resolution=1.0, seed=seed), 0.005)
        s_leiden = time.perf_counter() - t
        for key, k in (("louvain", k_louvain), ("leiden", k_leiden)):
            hits[key] += abs(k - truth) <= 0.3 * truth
        lines.append(f"| {name} | {a.n_obs} | {truth} | {k_louvain} | {k_leiden} | {s_louvain:.2f} | {s_leiden:.2f} |")
        print(lines[-1], flush=True)
    lines += ["", f"within ±30 % of the annotated count: Louvain {hits['louvain']}/{len(names)}, "
              f"Leiden {hits['leiden']}/{len(names)}"]
    return lines


# ----------------------------------------------------------------------------- k-means and Ward merge

def ward_kmeans_steps(x: np.ndarray, k: int, *, seed: int, micro: str, merge: str, lloyd: str,
                      sample_size: int = 50_000) -> np.ndarray:
    """`clustering.ward_kmeans` with each of its steps chosen: labels (N,) of the rows of x (N, d).

    micro: "package" (`clustering.kmeans`, euclidean, 3 k-means++ restarts: the hand-written code
    `ward_kmeans` ran before) or "sklearn" (KMeans, n_init=3, as `ward_kmeans` now runs);
    merge: "weighted" (`clustering.ward_merge`, microclusters weighted by their cells) or "scipy"
    (`linkage(method="ward")` of the unweighted microcentroids: scipy and scikit-learn take no weights);
    lloyd: "package" (`clustering._lloyd`, the hand-written Lloyd) or "sklearn" (KMeans(init=start,
    n_init=1, tol=0), then the package's checking pass, as `ward_kmeans` now runs).
    Same subsample and microcluster count as `ward_kmeans`.
    """
    from scipy.cluster.hierarchy import fcluster, linkage

    from scrcl_cli import clustering

    xd = np.asarray(x, dtype=np.float64)
    n = xd.shape[0]
    k = max(1, min(k, n))
    rng = np.random.default_rng(seed)
    fit_on = xd if n <= sample_size else xd[np.sort(rng.choice(n, size=sample_size, replace=False))]
    m = min(fit_on.shape[0], max(k, min(10 * k, 2000)))
    if micro == "package":
        res = clustering.kmeans(fit_on, m, seed=seed, metric="euclidean", n_init=3, sample_size=sample_size)
        micro_labels, cents = res.labels, res.centroids
    else:
        micro_labels, cents = clustering._sklearn_kmeans(fit_on, m, seed=seed, init="k-means++", n_init=3,
                                                         max_iter=300, tol=1e-4)
    sizes = np.bincount(micro_labels, minlength=m).astype(np.float64)
    used = np.flatnonzero(sizes > 0)  # all of them on real cells; see `ward_kmeans`
    cents, sizes = cents[used], sizes[used]
    if merge == "weighted":
        group = clustering.ward_merge(cents, sizes, k)
    elif used.size <= k:
        group = np.arange(used.size)
    else:
        group = fcluster(linkage(cents, method="ward"), t=k, criterion="maxclust") - 1
    ind = sp.csr_matrix((sizes, (group, np.arange(used.size))), shape=(int(group.max()) + 1, used.size))
    start = (ind @ cents) / np.asarray(ind.sum(1))
    if lloyd == "sklearn":
        _, start = clustering._sklearn_kmeans(xd, start.shape[0], seed=seed, init=start, n_init=1, max_iter=300, tol=0.0)
    return clustering._lloyd(xd, start, 300, "euclidean", (xd * xd).sum(1)).labels


def _shipped(x: np.ndarray, k: int, *, seed: int) -> np.ndarray:
    from scrcl_cli import clustering

    return clustering.ward_kmeans(x, k, seed=seed).labels


# name -> labels (N,) of x (N, d) cut into k clusters with a seed.
VARIANTS: dict[str, Callable[..., np.ndarray]] = {
    "hand-written (before)": functools.partial(ward_kmeans_steps, micro="package", merge="weighted", lloyd="package"),
    "sklearn KMeans (ward_kmeans now)": _shipped,
    "scipy Ward, unweighted": functools.partial(ward_kmeans_steps, micro="package", merge="scipy", lloyd="package"),
    "sklearn KMeans + scipy Ward": functools.partial(ward_kmeans_steps, micro="sklearn", merge="scipy", lloyd="sklearn"),
}


def resample_rows(e: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """n rows (n, d) drawn with replacement from e (N, d), plus Gaussian noise of a tenth of each
    column's standard deviation, so that no two rows coincide: a large embedding of real cells."""
    rng = np.random.default_rng(seed)
    rows = e[rng.integers(e.shape[0], size=n)].astype(np.float64)
    return rows + 0.1 * e.std(0) * rng.standard_normal(rows.shape)


def kmeans_part(emb_dir: Path, *, seeds: list[int]) -> list[str]:
    """The markdown of the k-means/Ward comparison on every cached embedding in emb_dir."""
    import itertools

    from scrcl_cli.metrics import ari

    files = sorted(emb_dir.glob("*.npz"))
    if not files:
        raise SystemExit(f"error: no embeddings (*.npz) in {emb_dir}; `python -m benchmarks cut --stress` writes them "
                         "(bench/cut/<setting>/), pass that folder as --embeddings")
    runs: dict[tuple[str, str], list[Path]] = {}
    for f in files:  # <dataset>.<variant>.<training seed>.npz
        ds, variant, _ = f.name[: -len(".npz")].rsplit(".", 2)
        runs.setdefault((ds, variant), []).append(f)
    warm = np.load(files[0])["embedding"]
    for cut in VARIANTS.values():  # imports and first calls stay out of the timings
        cut(warm, 5, seed=0)
    stats: dict[tuple[str, str, str], dict[str, list[float]]] = {}
    for (ds, variant), paths in sorted(runs.items(), key=lambda kv: (kv[0][1] != "whole", kv[0][0])):
        for path in paths:
            d = np.load(path)
            e, y = d["embedding"], d["labels"].astype(str)  # labels only score the result
            k = int(np.unique(y).size)
            for name, cut in VARIANTS.items():
                rec = stats.setdefault((ds, variant, name), {"ari": [], "agree": [], "s": [], "n": []})
                labels = []
                for seed in seeds:
                    t = time.perf_counter()
                    labels.append(cut(e, k, seed=seed))
                    rec["s"].append(time.perf_counter() - t)
                    rec["ari"].append(ari(y, labels[-1]))
                rec["agree"].extend(ari(p, q) for p, q in itertools.combinations(labels, 2))
                rec["n"] = [e.shape[0], k]
        print(f"{ds}.{variant}: " + ", ".join(f"{v} ARI {np.mean(stats[(ds, variant, v)]['ari']):.3f}" for v in VARIANTS),
              flush=True)
    names = list(VARIANTS)
    lines = ["ARI against the annotated types with K = their count (mean over the cached embeddings of training "
             f"seeds and clustering seeds {','.join(map(str, seeds))}); agreement: mean pairwise ARI between the "
             "clustering seeds on one embedding; s: mean seconds per clustering.", "",
             "| dataset | cells | K | " + " | ".join(f"{v} ARI | agree | s" for v in names) + " |",
             "|---|---|---|" + "---|---|---|" * len(names)]
    means: dict[str, dict[str, list[float]]] = {v: {"ari": [], "agree": [], "s": []} for v in names}
    for (ds, variant) in sorted(runs, key=lambda dv: (dv[1] != "whole", dv[0])):
        first = stats[(ds, variant, names[0])]
        cells = [f"{ds} ({variant})", f"{first['n'][0]:,}", str(first["n"][1])]
        for v in names:
            rec = stats[(ds, variant, v)]
            vals = {key: float(np.mean(rec[key])) for key in ("ari", "agree", "s")}
            for key, val in vals.items():
                means[v][key].append(val)
            cells += [f"{vals['ari']:.3f}", f"{vals['agree']:.3f}", f"{vals['s']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("| **mean** | | | " + " | ".join(
        f"**{np.mean(means[v]['ari']):.3f}** | **{np.mean(means[v]['agree']):.3f}** | **{np.mean(means[v]['s']):.2f}**"
        for v in names) + " |")
    return lines


def large_part(emb_dir: Path, sizes: list[int], large_from: str) -> list[str]:
    """Seconds of each implementation on rows resampled from one real embedding, K its annotated
    count, clustering seed 0; and how far the partitions differ from the hand-written one's."""
    from scrcl_cli.metrics import ari

    src = emb_dir / f"{large_from}.npz"
    if not src.exists():
        raise SystemExit(f"error: {src} not found; --large-from names a <dataset>.<variant>.<seed> in --embeddings")
    d = np.load(src)
    k = int(np.unique(d["labels"]).size)
    lines = [f"Rows resampled from {src.name} (noise 0.1 SD per column), K = {k}, seed 0:", "",
             "| rows | implementation | s | ARI to the hand-written labels |", "|---|---|---|---|"]
    for n in sizes:
        x = resample_rows(d["embedding"], n)
        ref = None
        for name, cut in VARIANTS.items():
            t = time.perf_counter()
            labels = cut(x, k, seed=0)
            sec = time.perf_counter() - t
            ref = labels if ref is None else ref
            lines.append(f"| {n:,} | {name} | {sec:.1f} | {ari(ref, labels):.3f} |")
            print(lines[-1], flush=True)
    return lines


def scaled_pca_part(path: Path) -> list[str]:
    """Seconds of the scaled PCA, package against scikit-learn, on every cell of one raw-count file."""
    import anndata as ad
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    from scrcl_cli import clustering
    from scrcl_cli.preprocessing import prepare

    a = ad.read_h5ad(path)
    x = prepare(sp.csr_matrix(a.X, dtype=np.float32), [str(g) for g in a.var_names]).model_input
    n, g = x.shape
    t = time.perf_counter()
    ref = PCA(50, svd_solver="covariance_eigh").fit_transform(StandardScaler(with_mean=False).fit_transform(
        sp.csr_matrix(x, dtype=np.float64)))
    t_ref = time.perf_counter() - t
    t = time.perf_counter()
    ours = clustering.unsmoothed_components(x)
    t_ours = time.perf_counter() - t
    # Per component, relative to its largest score: trailing components with nearly equal variances
    # may rotate into each other under rounding, so the first ten are reported apart.
    diff = np.abs(np.abs(ours) - np.abs(ref)).max(0) / np.abs(ref).max(0)
    lines = [f"{path.name}: {n:,} cells x {g:,} genes, {x.nnz:,} stored values, 50 components:", "",
             "| implementation | s | largest relative difference to scikit-learn, components 1-10 / 1-50 |",
             "|---|---|---|",
             f"| scikit-learn StandardScaler + PCA (covariance_eigh) | {t_ref:.1f} | – |",
             f"| clustering.unsmoothed_components (blocked Gram) | {t_ours:.1f} | {diff[:10].max():.1e} / {diff.max():.1e} |"]
    print("\n".join(lines), flush=True)
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks libraries", description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="communities,kmeans,large",
                    help="comma-separated: communities (Louvain/Leiden), kmeans (per dataset), large (k-means time at "
                         "--large-n), scaled-pca (the K-given cut's PCA on --pca-h5ad)")
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--seed", type=int, default=0, help="the communities' seed")
    ap.add_argument("--embeddings", type=Path, default=Path("bench/cut/H256_E100_C2000"),
                    help="folder of <dataset>.<whole|stress>.<seed>.npz that `python -m benchmarks cut` caches")
    ap.add_argument("--seeds", default="0,1,2", help="the clustering seeds on each embedding")
    ap.add_argument("--large-n", default="200000", help="comma-separated rows of the timings at large N (empty: none)")
    ap.add_argument("--large-from", default="cite_cbmc_top2000.whole.0", help="the embedding resampled for it")
    ap.add_argument("--pca-h5ad", type=Path, default=None, help="raw-count .h5ad of the scaled-pca part")
    ap.add_argument("--output", type=Path, default=None, help="also write the markdown report here")
    args = ap.parse_args(argv)
    parts = set(args.parts.split(","))
    known = {"communities", "kmeans", "large", "scaled-pca"}
    if parts - known:
        ap.error(f"--parts: unknown {sorted(parts - known)}")
    if "scaled-pca" in parts and (args.pca_h5ad is None or not args.pca_h5ad.is_file()):
        ap.error("--parts scaled-pca needs --pca-h5ad FILE, a raw-count .h5ad (python -m benchmarks make-large)")
    command = "python -m benchmarks libraries " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [f"Command: `{command.strip()}`", "", f"CPU: {cpu_name()}, {os.cpu_count()} cores; BLAS/OpenMP threads "
             f"{os.environ.get('OMP_NUM_THREADS', 'unset')}.", ""]
    if "communities" in parts:
        lines += ["## Label-free K: Louvain against Leiden", "", *communities_part(args.data_dir, args.seed), ""]
    if "kmeans" in parts:
        seeds = [int(s) for s in args.seeds.split(",")]
        lines += ["## K given: ward_kmeans, hand-written against scikit-learn and scipy", "",
                  *kmeans_part(args.embeddings, seeds=seeds), ""]
    sizes = [int(v) for v in args.large_n.split(",") if v.strip()]
    if "large" in parts and sizes:
        lines += ["## K given at large N: time", "", *large_part(args.embeddings, sizes, args.large_from), ""]
    if "scaled-pca" in parts:
        lines += ["## K given: the scaled PCA, package against scikit-learn", "", *scaled_pca_part(args.pca_h5ad), ""]
    lines.append(f"Load average at the end: {loadavg():.1f}.")
    emit_markdown("\n".join(lines) + "\n", args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
