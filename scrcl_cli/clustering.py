"""k-means (cosine or Euclidean, k-means++ or Ward-initialised), nearest-centroid labels,
a label-free cluster count, and marker genes.

Fixes the reference's k-means: k-means++ seeding, several restarts
kept by final inertia, empty clusters re-seeded, its own RNG per call. Nothing here reads
labels; the cluster count is chosen from the expression alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from ._utils import unit_rows
from .errors import ScrclError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KMeansResult:
    """labels (N,) int64 in 0..k-1; centroids (k, d) (unit rows for cosine); inertia = sum of
    (1 - cos) for cosine, of squared Euclidean distances for euclidean."""

    labels: np.ndarray
    centroids: np.ndarray
    inertia: float


METRICS = ("cosine", "euclidean")
# The k-means metric of each clustering embedding (`TrainConfig.embedding`).
EMBEDDING_METRIC = {"gcn-pca": "euclidean", "fused": "cosine"}


def _sq_dist(x: np.ndarray, c: np.ndarray, x_sq: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances (N, k) from rows x (N, d) to c (k, d); x_sq: (N,) row norms squared."""
    return np.maximum(x_sq[:, None] - 2.0 * (x @ c.T) + (c * c).sum(1)[None, :], 0.0)


def _kmeanspp(x: np.ndarray, k: int, rng: np.random.Generator, x_sq: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    centers = [int(rng.integers(n))]
    # For unit vectors (cosine) the squared Euclidean distance is 2 (1 - cos): one formula serves both.
    d2 = _sq_dist(x, x[centers[0]][None, :], x_sq)[:, 0]
    for _ in range(1, k):
        total = d2.sum()
        nxt = int(rng.choice(n, p=d2 / total)) if total > 0 else int(rng.integers(n))
        centers.append(nxt)
        d2 = np.minimum(d2, _sq_dist(x, x[nxt][None, :], x_sq)[:, 0])
    return x[centers].copy()


def _lloyd(x: np.ndarray, c: np.ndarray, max_iter: int, metric: str, x_sq: np.ndarray) -> KMeansResult:
    k = c.shape[0]
    n = x.shape[0]
    labels = np.full(n, -1)
    for _ in range(max_iter):
        # score: larger is nearer (cosine similarity, or minus the squared distance)
        score = x @ c.T if metric == "cosine" else -_sq_dist(x, c, x_sq)
        new = score.argmax(1)
        best = score[np.arange(n), new]
        counts = np.bincount(new, minlength=k)
        for empty in np.flatnonzero(counts == 0):  # at most k iterations, rarely any
            far = int(np.argmin(best))
            new[far] = empty
            best[far] = np.inf
        if np.array_equal(new, labels):
            break
        labels = new
        # Cluster sums as a sparse indicator product: the same additions in the same row order
        # as np.add.at (bitwise equal), about 5x faster at a million cells.
        ind = sp.csr_matrix((np.ones(n), labels, np.arange(n + 1)), shape=(n, k)).T.tocsr()
        sums = ind @ x
        if metric == "cosine":
            c = unit_rows(sums)
        else:
            c = sums / np.maximum(np.bincount(labels, minlength=k), 1)[:, None]
    if metric == "cosine":
        inertia = float((1.0 - (x * c[labels]).sum(1)).sum())
    else:
        inertia = float(((x - c[labels]) ** 2).sum())
    return KMeansResult(labels=labels.astype(np.int64), centroids=c, inertia=inertia)


def check_n_clusters(k: int | None, n_cells: int) -> None:
    """A requested cluster count must not exceed the cells it partitions (a user error, not a clip)."""
    if k is not None and k > n_cells:
        raise ScrclError(
            f"--n-clusters {k} is more than the {n_cells} cells to cluster",
            f"Pass --n-clusters between 1 and {n_cells}, or leave it out to choose it from the data",
        )


def kmeans(
    x: np.ndarray,
    k: int,
    *,
    seed: int,
    metric: str = "cosine",
    n_init: int = 10,
    max_iter: int = 300,
    sample_size: int = 50_000,
) -> KMeansResult:
    """k-means on the rows of `x` (N, d) with k-means++ seeding and `n_init` restarts.

    metric "cosine": spherical k-means on the unit rows (the reference's clustering of the
    fused embedding); "euclidean": Lloyd's k-means, as sklearn's KMeans (the microclusters of
    `ward_kmeans`, which clusters the gcn-pca embedding).
    The restart with the smallest final inertia wins. Labels are renumbered by decreasing
    cluster size, so the output does not depend on which restart found them.
    Above `sample_size` rows the restarts run on a uniform random subsample of that size and
    the winner's centroids start one Lloyd run over all rows: at a million cells ten full
    restarts would take over ten minutes, while the subsample already fixes the centroids.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; one of {METRICS}")
    xu = unit_rows(x) if metric == "cosine" else np.asarray(x, dtype=np.float64)
    n = xu.shape[0]
    k = max(1, min(k, n))
    rng = np.random.default_rng(seed)
    fit_on = xu if n <= sample_size else xu[np.sort(rng.choice(n, size=sample_size, replace=False))]
    fit_sq = (fit_on * fit_on).sum(1)
    best: KMeansResult | None = None
    for _ in range(n_init):
        res = _lloyd(fit_on, _kmeanspp(fit_on, k, rng, fit_sq), max_iter, metric, fit_sq)
        if best is None or res.inertia < best.inertia - 1e-9:
            best = res
    assert best is not None
    if fit_on is not xu:
        best = _lloyd(xu, best.centroids, max_iter, metric, (xu * xu).sum(1))
    return _by_size(best, k)


def _by_size(res: KMeansResult, k: int) -> KMeansResult:
    """Renumber clusters by decreasing size (stable), so labels do not depend on how they were found."""
    order = np.argsort(-np.bincount(res.labels, minlength=k), kind="stable")
    remap = np.empty(k, dtype=np.int64)
    remap[order] = np.arange(k)
    return KMeansResult(labels=remap[res.labels], centroids=res.centroids[order], inertia=res.inertia)


def ward_merge(centroids: np.ndarray, weights: np.ndarray, k: int) -> np.ndarray:
    """Agglomerate M weighted points (M, d) into k groups by Ward's minimum-variance criterion.

    weights (M,) > 0 are the point masses (cells per microcluster). Each step merges the pair
    with the smallest increase of the within-group sum of squares, w_a w_b / (w_a + w_b) *
    |c_a - c_b|^2, and replaces it by its weighted mean: with unit weights this is
    `scipy.cluster.hierarchy.linkage(method="ward")` cut at k groups. Ties go to the lowest
    index pair. Returns the group (M,) int64 in 0..k-1 of each point. O(M^2) memory, O(M^3) time.
    """
    c = np.array(centroids, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64).copy()
    m = c.shape[0]
    group = np.arange(m)
    if k >= m:
        return group.astype(np.int64)
    alive = np.ones(m, dtype=bool)

    def cost_row(i: int) -> np.ndarray:
        row = w[i] * w / (w[i] + w) * ((c - c[i]) ** 2).sum(1)
        row[~alive] = np.inf
        row[i] = np.inf
        return row

    cost = np.vstack([cost_row(i) for i in range(m)])
    for _ in range(m - k):
        a, b = divmod(int(np.argmin(cost)), m)
        a, b = min(a, b), max(a, b)
        c[a] = (w[a] * c[a] + w[b] * c[b]) / (w[a] + w[b])
        w[a] += w[b]
        alive[b] = False
        group[group == b] = a
        cost[b, :] = np.inf
        cost[:, b] = np.inf
        row = cost_row(a)
        cost[a, :] = row
        cost[:, a] = row
    return np.unique(group, return_inverse=True)[1].astype(np.int64)


def _sklearn_kmeans(
    x: np.ndarray, k: int, *, seed: int, init: np.ndarray | str, n_init: int, max_iter: int, tol: float
) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's Lloyd k-means of the rows of x (N, d): labels (N,) and centres (k, d).

    Where x has fewer than k distinct rows scikit-learn warns and leaves clusters empty; the
    callers handle that, so the warning is not passed on.
    """
    import warnings

    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        km = KMeans(k, init=init, n_init=n_init, max_iter=max_iter, tol=tol, random_state=seed % 2**32).fit(x)
    return np.asarray(km.labels_, dtype=np.int64), np.asarray(km.cluster_centers_, dtype=np.float64)


def ward_kmeans(
    x: np.ndarray,
    k: int,
    *,
    seed: int,
    microclusters_per_cluster: int = 10,
    max_microclusters: int = 2000,
    max_iter: int = 300,
    sample_size: int = 50_000,
) -> KMeansResult:
    """Euclidean k-means started from a Ward agglomeration of k-means microclusters.

    x: (N, d). Cuts the rows (a uniform subsample of `sample_size` above that) into
    M = min(N, max(k, min(10 k, 2000))) microclusters (scikit-learn's KMeans, three k-means++
    restarts), merges their weighted centroids into k groups (`ward_merge`), and runs Lloyd's
    iterations over all rows from the k group means (scikit-learn's KMeans from that start, to
    convergence), so the result is a k-means fixed point (each row at its nearest centroid, what
    `nearest_centroid` reproduces).

    Why: on the gcn-pca embedding, k-means with k-means++ restarts lands in different minima of
    nearly equal inertia from run to run (cite_cbmc, one embedding: pairwise ARI 0.76-0.85 between
    seeds). Fine microclusters are reproducible and Ward's merge order is deterministic, which
    raised the three-seed agreement from 0.857 to 0.888 at the same accuracy (docs/defaults.md).
    scikit-learn's KMeans replaced the package's own for the microclusters and the final Lloyd at the
    same ARI and seed agreement, four times faster at 200,000 rows (`python -m benchmarks libraries`,
    README "Dependencies"); the Ward merge stays the package's, as no library merges weighted points.
    """
    xd = np.asarray(x, dtype=np.float64)
    n = xd.shape[0]
    k = max(1, min(k, n))
    # Above sample_size the microclusters come from a uniform subsample: they only place the start,
    # and Lloyd's iterations over all rows follow, so a full-data microcluster pass would be wasted.
    rng = np.random.default_rng(seed)
    fit_on = xd if n <= sample_size else xd[np.sort(rng.choice(n, size=sample_size, replace=False))]
    m = min(fit_on.shape[0], max(k, min(microclusters_per_cluster * k, max_microclusters)))
    micro_labels, micro_cents = _sklearn_kmeans(fit_on, m, seed=seed, init="k-means++", n_init=3, max_iter=max_iter, tol=1e-4)
    sizes = np.bincount(micro_labels, minlength=m).astype(np.float64)
    # A microcluster is empty only when the rows have fewer than M distinct values; a point of
    # weight 0 has no Ward cost, so only the others are merged.
    used = np.flatnonzero(sizes > 0)
    group = ward_merge(micro_cents[used], sizes[used], k)
    n_groups = int(group.max()) + 1
    # Each group's start is the mean of its cells: the size-weighted mean of its microcentroids.
    ind = sp.csr_matrix((sizes[used], (group, np.arange(used.size))), shape=(n_groups, used.size))
    start = (ind @ micro_cents[used]) / np.asarray(ind.sum(1))
    if n_groups < k:  # fewer distinct rows than k in the subsample: Lloyd re-seeds the copies
        start = np.vstack([start, np.repeat(start[-1:], k - n_groups, axis=0)])
    _, cents = _sklearn_kmeans(xd, k, seed=seed, init=start, n_init=1, max_iter=max_iter, tol=0.0)
    # A last pass of the package's Lloyd from scikit-learn's centres (one assignment, one update,
    # one check): the labels are then the nearest centroids by the distance `nearest_centroid`
    # computes, and the centroids their exact means summed in row order, which does not depend on
    # how many threads scikit-learn's sums used. It also re-seeds a cluster left empty.
    return _by_size(_lloyd(xd, cents, max_iter, "euclidean", (xd * xd).sum(1)), k)


# What `cluster_embedding` runs for each metric, as the manifest and uns['scrcl'] record it.
CLUSTER_ALGORITHM = {"euclidean": "ward-kmeans", "cosine": "spherical-kmeans"}


def unsmoothed_components(
    x: np.ndarray | sp.spmatrix, n_components: int = 50, *, scale: bool = True, gram: np.ndarray | None = None
) -> np.ndarray:
    """Principal components of the unsmoothed model input (log-normalised HVGs).

    x: (N, G) sparse or dense -> float64 (N, min(n_components, N - 1, G)). With `scale`, every
    gene is first divided by its standard deviation (unit variance, as scanpy's ``pp.scale`` but
    without its clip; constant genes are left as they are). The PCA is `graphs.pca_projection`:
    the eigenvectors of the G x G covariance (correlation when scaled) from the blocked Gram
    matrix, with the scaling folded into the loadings, so x is neither copied nor densified whole,
    memory stays linear in N and no seed is needed. At 1,000,000 cells x 2,000 genes on 2 cores
    this is several times faster than scikit-learn's sparse scaler and ``covariance_eigh`` PCA
    (docs/benchmarks.md, "Clustering at scale"). gram: `graphs.gram_matrix(x)` when the caller has
    it (training computed it for the gene graph).
    Why scaled: unscaled, a few highly expressed genes dominate the components and the rare types
    they were meant to keep apart are lost again (docs/defaults.md).
    """
    from .graphs import pca_projection

    n, g = x.shape
    d = max(1, min(n_components, n - 1, g))
    xs = sp.csr_matrix(x) if sp.issparse(x) else np.asarray(x)
    loadings, offset = pca_projection(xs, d, gram=gram, standardize=scale)
    return np.asarray(xs @ loadings, dtype=np.float64) - offset


def joint_embedding(embedding: np.ndarray, unsmoothed: np.ndarray, weight: float) -> np.ndarray:
    """Columns of the trained embedding (N, D) beside unsmoothed principal components (N, P).

    Each block is divided by the square root of its total variance, so both carry the same spread
    before `weight` scales the unsmoothed one: (N, D + P) float64.
    Why: the graph smoothing (and the GCN view) averages a rare type into its large neighbours,
    so on the embedding alone k-means splits a big type before a small one separates; the
    unsmoothed PCA keeps those cells apart (docs/defaults.md, "How the embedding is cut with K given").
    """
    e = np.asarray(embedding, dtype=np.float64)
    u = np.asarray(unsmoothed, dtype=np.float64)
    e = e / max(float(np.sqrt(e.var(0).sum())), 1e-12)
    u = u / max(float(np.sqrt(u.var(0).sum())), 1e-12)
    return np.hstack([e, weight * u])


def cluster_embedding(
    x: np.ndarray,
    k: int,
    *,
    seed: int,
    metric: str,
    unsmoothed: np.ndarray | sp.spmatrix | None = None,
    unsmoothed_weight: float = 0.0,
    unsmoothed_gram: np.ndarray | None = None,
) -> KMeansResult:
    """The clustering `train` and `cluster --denovo` apply to an embedding of `metric`.

    euclidean (gcn-pca): `ward_kmeans`; cosine (the fused embedding, and spatial mode whose
    defaults were chosen with it): spherical `kmeans` with k-means++ restarts.
    With `unsmoothed` (the unsmoothed model input, (N, G)) and `unsmoothed_weight` > 0 on a
    euclidean embedding, the cells are clustered on `joint_embedding` of x and the principal
    components of `unsmoothed`; the centroids returned are still in the space of x (each
    cluster's mean of x), so nearest-centroid mapping of new cells needs x alone.
    unsmoothed_gram: the Gram matrix of `unsmoothed` when the caller has it, so it is not summed again.
    """
    if metric == "euclidean":
        if unsmoothed is None or unsmoothed_weight <= 0:
            return ward_kmeans(x, k, seed=seed)
        z = joint_embedding(x, unsmoothed_components(unsmoothed, gram=unsmoothed_gram), unsmoothed_weight)
        res = ward_kmeans(z, k, seed=seed)
        xd = np.asarray(x, dtype=np.float64)
        n_k = res.centroids.shape[0]
        cents = np.vstack([xd[res.labels == c].mean(0) for c in range(n_k)])
        return KMeansResult(labels=res.labels, centroids=cents, inertia=res.inertia)
    return kmeans(x, k, seed=seed, metric=metric)


def cosine_kmeans(
    x: np.ndarray, k: int, *, seed: int, n_init: int = 10, max_iter: int = 300, sample_size: int = 50_000
) -> KMeansResult:
    """Spherical k-means: `kmeans` with metric "cosine"."""
    return kmeans(x, k, seed=seed, metric="cosine", n_init=n_init, max_iter=max_iter, sample_size=sample_size)


def _centroid_scores(x: np.ndarray, centroids: np.ndarray, metric: str) -> np.ndarray:
    """(N, k): cosine similarities (cosine) or Euclidean distances (euclidean), float64."""
    if metric == "cosine":
        return unit_rows(x) @ unit_rows(centroids).T
    xd = np.asarray(x, dtype=np.float64)
    return np.sqrt(_sq_dist(xd, np.asarray(centroids, dtype=np.float64), (xd * xd).sum(1)))


def _confidence(scores: np.ndarray, labels: np.ndarray, metric: str) -> np.ndarray:
    rows = np.arange(labels.size)
    if metric == "cosine":
        return scores[rows, labels].astype(np.float32)
    d = scores.copy()
    own = d[rows, labels]
    d[rows, labels] = np.inf
    nxt = d.min(1) if d.shape[1] > 1 else np.full(labels.size, np.inf)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.where(np.isfinite(nxt), 1.0 - own / np.maximum(nxt, 1e-300), 1.0)
    return np.clip(conf, 0.0, 1.0).astype(np.float32)


def assignment_confidence(x: np.ndarray, centroids: np.ndarray, labels: np.ndarray, metric: str = "cosine") -> np.ndarray:
    """How firmly each row of x (N, d) belongs to its cluster `labels` (N,), float32 (N,).

    cosine: the cosine similarity to its centroid (1 at the centroid). euclidean: 1 - d_own / d_next,
    with d_own the distance to its own centroid and d_next to the nearest other one (0 on a
    boundary, 1 at the centroid; 1 when there is a single cluster).
    """
    labels = np.asarray(labels, dtype=np.int64)
    return _confidence(_centroid_scores(x, centroids, metric), labels, metric)


def nearest_centroid(x: np.ndarray, centroids: np.ndarray, metric: str = "cosine") -> tuple[np.ndarray, np.ndarray]:
    """Label each row of x (N, d) with its nearest centroid (k, d) under `metric`.

    Returns labels (N,) int64 and `assignment_confidence` of that label (N,) float32, both from
    one (N, k) score matrix.
    """
    scores = _centroid_scores(x, centroids, metric)
    labels = (scores.argmax(1) if metric == "cosine" else scores.argmin(1)).astype(np.int64)
    return labels, _confidence(scores, labels, metric)


def leiden(adj: sp.csr_matrix, *, resolution: float = 1.0, seed: int = 0) -> np.ndarray:
    """Leiden communities (Traag et al. 2019) of an unweighted symmetric graph, as scanpy finds them.

    adj: CSR (N, N), symmetric; its upper triangle gives the edges (weights ignored, as the cell
    graph is binary). RB configuration model at `resolution`, iterated until stable, seeded.
    Returns labels (N,) int64. Uses igraph + leidenalg; `python -m benchmarks libraries` measures
    it against the hand-written Louvain it replaced.
    """
    import igraph as ig
    import leidenalg

    upper = sp.triu(sp.csr_matrix(adj), k=1).tocoo()
    graph = ig.Graph(n=adj.shape[0], edges=np.column_stack([upper.row, upper.col]).tolist())
    part = leidenalg.find_partition(
        graph, leidenalg.RBConfigurationVertexPartition, resolution_parameter=resolution, seed=int(seed) % 2**31, n_iterations=-1
    )
    return np.asarray(part.membership, dtype=np.int64)


def community_count(labels: np.ndarray, min_fraction: float = 0.005) -> int:
    """Communities (labels (N,) int) holding at least `min_fraction` of the N cells and at least 2
    cells, and at least 2: the cluster count a community partition suggests."""
    sizes = np.bincount(labels)
    return int(max(2, (sizes >= max(2.0, min_fraction * labels.size)).sum()))


def choose_n_clusters(
    lognorm: sp.csr_matrix | np.ndarray,
    *,
    seed: int,
    n_neighbors: int = 15,
    sample_size: int = 20_000,
    min_fraction: float = 0.005,
    adj: sp.csr_matrix | None = None,
) -> tuple[int, dict[str, float]]:
    """Label-free cluster count from the expression graph, the count scanpy users would get.

    lognorm: log-normalised HVG expression (N, G). Builds the cell graph exactly as training
    does (`graphs.cell_graph`: cosine kNN on 50 principal components; on a fixed random subsample
    of `sample_size` cells when N is larger), finds its Leiden communities at resolution 1
    (scanpy's default), and returns the number of
    communities holding at least `min_fraction` of the cells (at least 2), with a small record.

    Why not the embedding's own graph: the 2*O-dimensional scRCL embedding resolves finer
    structure than annotated types, and its communities over-split (pbmc_10x_4k: 20 for 8 types;
    docs/defaults.md), while the embedding still separates best once K is fixed.

    adj: that cell graph of all N cells when the caller already has it (training), so it is not
    searched twice; ignored above `sample_size`.
    """
    from .graphs import cell_graph

    n = lognorm.shape[0]
    rng = np.random.default_rng(seed)
    sub = np.sort(rng.choice(n, size=min(n, sample_size), replace=False))
    if adj is None or sub.size < n:
        adj = cell_graph(lognorm[sub] if sub.size < n else lognorm, min(n_neighbors, sub.size), pca_threshold=0)
    labels = leiden(adj, resolution=1.0, seed=seed)
    n_communities = int(labels.max()) + 1  # leiden numbers its communities 0..C-1
    k = min(community_count(labels, min_fraction), n)
    log.info("label-free cluster count: k=%d (Leiden communities of the expression kNN graph: %d)", k, n_communities)
    return k, {"leiden_communities": float(n_communities), "cells_used": float(sub.size)}


def marker_table(
    lognorm: sp.csr_matrix, genes: list[str], labels: np.ndarray, *, n_top: int = 10
) -> list[tuple[str, int, str, float, float, float]]:
    """Top marker genes per cluster by log2 fold change of mean expression, cluster vs rest.

    lognorm: CSR (N, G) log-normalised expression; labels (N,) int. Returns rows
    (cluster, rank, gene, log2fc, mean_in, frac_in) with rank 1 the strongest.
    """
    labels = np.asarray(labels)
    uniq = np.unique(labels)
    n = labels.size
    ind = sp.csr_matrix((np.ones(n), (np.searchsorted(uniq, labels), np.arange(n))), shape=(uniq.size, n))
    sizes = np.asarray(ind.sum(1)).ravel()
    x = sp.csr_matrix(lognorm)
    sums = np.asarray((ind @ x).todense())
    xb = x.copy()
    xb.data = (xb.data > 0).astype(np.float64)
    frac = np.asarray((ind @ xb).todense()) / sizes[:, None]
    total = sums.sum(0)
    mean_in = sums / sizes[:, None]
    rest = np.maximum(n - sizes, 1)[:, None]
    mean_out = (total[None, :] - sums) / rest
    # Fold change of the mean expression on the count scale with a pseudocount of 1, so that
    # genes barely seen outside a cluster do not dominate the ranking.
    lfc = np.log2((np.expm1(mean_in) + 1.0) / (np.expm1(mean_out) + 1.0))
    rows = []
    for ci, c in enumerate(uniq):  # one row block per cluster, K is small
        top = np.argsort(-lfc[ci], kind="stable")[:n_top]
        for r, gi in enumerate(top, 1):
            rows.append((str(c), r, genes[gi], float(lfc[ci, gi]), float(mean_in[ci, gi]), float(frac[ci, gi])))
    return rows
