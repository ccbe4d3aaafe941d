"""Clustering: k-means quality and determinism, nearest centroids, label-free K, markers."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from scrcl_cli import clustering
from scrcl_cli.graphs import knn_cosine, knn_to_adjacency
from scrcl_cli.metrics import ari


def _blobs(n=600, k=5, d=12, seed=0, noise=0.3):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)) * 3
    y = rng.integers(k, size=n)
    return centers[y] + noise * rng.normal(size=(n, d)), y


def test_kmeans_same_seed_same_labels_and_recovers_blobs():
    x, y = _blobs()
    a = clustering.cosine_kmeans(x, 5, seed=3)
    b = clustering.cosine_kmeans(x, 5, seed=3)
    assert np.array_equal(a.labels, b.labels)
    assert ari(y, a.labels) > 0.95
    np.testing.assert_allclose(np.linalg.norm(a.centroids, axis=1), 1.0, rtol=1e-9)


def test_kmeans_handles_more_clusters_than_distinct_points():
    x = np.repeat(np.eye(3), 10, axis=0)
    res = clustering.cosine_kmeans(x, 5, seed=0)
    assert res.labels.max() < 5 and np.isfinite(res.centroids).all()
    assert len(np.unique(res.labels)) == 5  # empty clusters were re-seeded


def test_nearest_centroid_reproduces_converged_kmeans_labels():
    x, _ = _blobs(seed=1)
    res = clustering.cosine_kmeans(x, 5, seed=0)
    labels, conf = clustering.nearest_centroid(x, res.centroids)
    assert np.array_equal(labels, res.labels)
    assert conf.min() > 0.5


def test_leiden_recovers_planted_communities():
    x, y = _blobs(n=800, k=6, noise=0.5, seed=2)
    labels = clustering.leiden(knn_to_adjacency(knn_cosine(x, 15)), seed=0)
    assert ari(y, labels) > 0.9


def test_choose_n_clusters_finds_planted_k_without_labels():
    x, _ = _blobs(n=900, k=7, noise=0.4, seed=4)
    k, info = clustering.choose_n_clusters(x, seed=0)
    assert k == 7 and info["cells_used"] == 900
    # Above sample_size the count comes from a fixed subsample's graph, and agrees here.
    k_sub, info_sub = clustering.choose_n_clusters(x, seed=0, sample_size=400)
    assert k_sub == 7 and info_sub["cells_used"] == 400


def test_choose_n_clusters_on_real_cells_is_near_the_annotated_count():
    """pbmc68k_reduced (700 cells, 10 annotated types): the label-free count lands within ±30 %."""
    import anndata
    from conftest import EXAMPLE

    from scrcl_cli.preprocessing import prepare

    a = anndata.read_h5ad(EXAMPLE)
    prep = prepare(sp.csr_matrix(a.X), list(a.var_names))
    k, _ = clustering.choose_n_clusters(prep.lognorm, seed=0)
    n_types = a.obs["cell_type"].nunique()  # evaluation only
    assert abs(k - n_types) <= 0.3 * n_types
    # Training passes its own cell graph instead of searching it again: same count.
    from scrcl_cli.graphs import cell_graph

    assert clustering.choose_n_clusters(prep.lognorm, seed=0, adj=cell_graph(prep.lognorm, 15))[0] == k


def test_marker_table_ranks_the_gene_specific_to_each_cluster_first():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 50)
    x = rng.poisson(0.2, size=(150, 6)).astype(float)
    for c in range(3):
        x[labels == c, c] += 5
    rows = clustering.marker_table(sp.csr_matrix(np.log1p(x)), [f"g{i}" for i in range(6)], labels, n_top=2)
    firsts = {r[0]: r[2] for r in rows if r[1] == 1}
    assert firsts == {"0": "g0", "1": "g1", "2": "g2"}


def test_kmeans_on_a_subsample_then_all_rows_finds_the_same_partition():
    """Above sample_size the restarts run on a subsample; the final Lloyd run covers every row."""
    x, y = _blobs(n=3000, k=6, seed=2)
    full = clustering.cosine_kmeans(x, 6, seed=0)
    sub = clustering.cosine_kmeans(x, 6, seed=0, sample_size=500)
    assert sub.labels.shape == (3000,)
    assert ari(full.labels, sub.labels) > 0.99 and ari(y, sub.labels) > 0.95


def test_euclidean_kmeans_matches_sklearn_inertia_and_keeps_scale():
    """Euclidean k-means (the gcn-pca embedding's) reaches sklearn's KMeans inertia on blobs whose
    norms differ, where spherical k-means would merge clusters along a ray."""
    from sklearn.cluster import KMeans

    x, y = _blobs(n=800, k=6, seed=4)
    x = np.vstack([x, 3 * x[:100]])  # scaled copies: same directions, other clusters for Euclidean k-means
    res = clustering.kmeans(x, 6, seed=0, metric="euclidean")
    ref = KMeans(6, n_init=10, random_state=0).fit(x)
    assert res.inertia <= ref.inertia_ * 1.001
    assert ari(ref.labels_, res.labels) > 0.95
    sums = np.vstack([x[res.labels == c].mean(0) for c in range(6)])
    np.testing.assert_allclose(res.centroids, sums, rtol=1e-9, atol=1e-9)  # plain means, not unit rows


def test_euclidean_assignment_confidence_is_one_at_a_centroid_and_zero_midway():
    cents = np.array([[0.0, 0.0], [2.0, 0.0]])
    x = np.array([[0.0, 0.0], [1.0, 0.0], [0.5, 0.0], [2.0, 1.0]])
    labels, conf = clustering.nearest_centroid(x, cents, "euclidean")
    assert labels.tolist()[0] == 0 and labels.tolist()[3] == 1
    np.testing.assert_allclose(conf[[0, 1, 2]], [1.0, 0.0, 1 - 0.5 / 1.5], atol=1e-6)
    one = clustering.assignment_confidence(x, cents[:1], np.zeros(4, dtype=np.int64), "euclidean")
    assert np.all(one == 1.0)  # a single cluster: nothing to be confused with


def test_ward_merge_matches_scipy_ward_linkage_with_unit_and_integer_weights():
    from scipy.cluster.hierarchy import fcluster, linkage

    x, _ = _blobs(n=80, k=6, d=4, seed=5, noise=1.0)
    for k in (2, 5, 9):
        ref = fcluster(linkage(x, "ward"), k, "maxclust")
        assert ari(ref, clustering.ward_merge(x, np.ones(80), k)) == 1.0
    # A point of weight w is w coincident cells: scipy on the repeated rows cuts the same groups.
    w = np.random.default_rng(0).integers(1, 4, size=30)
    pts = x[:30]
    rep = np.repeat(pts, w, axis=0)
    for k in (3, 7):
        ours = clustering.ward_merge(pts, w, k)
        ref = fcluster(linkage(rep, "ward"), k, "maxclust")
        assert ari(np.repeat(ours, w), ref) == 1.0


def test_ward_kmeans_is_a_kmeans_fixed_point_and_recovers_blobs():
    x, y = _blobs(n=900, k=6, seed=6, noise=0.6)
    res = clustering.ward_kmeans(x, 6, seed=0)
    assert ari(y, res.labels) > 0.95
    labels, _ = clustering.nearest_centroid(x, res.centroids, "euclidean")
    assert np.array_equal(labels, res.labels)  # `cluster` reassigns new cells by these centroids
    sums = np.vstack([x[res.labels == c].mean(0) for c in range(6)])
    np.testing.assert_allclose(res.centroids, sums, rtol=1e-9, atol=1e-9)
    assert np.array_equal(res.labels, clustering.ward_kmeans(x, 6, seed=0).labels)
    tiny = clustering.ward_kmeans(x[:4], 6, seed=0)  # k above N: one cluster per cell
    assert sorted(tiny.labels.tolist()) == [0, 1, 2, 3]


def test_ward_kmeans_with_fewer_distinct_rows_than_microclusters_fills_every_cluster():
    """8 distinct points repeated: scikit-learn leaves most of the 50 microclusters empty; the
    merge skips them and every one of the 5 clusters still gets cells, at a Lloyd fixed point."""
    pts = np.random.default_rng(3).normal(size=(8, 3)) * 5
    x = np.repeat(pts, 20, axis=0)
    res = clustering.ward_kmeans(x, 5, seed=0)
    assert np.isfinite(res.centroids).all() and sorted(np.unique(res.labels).tolist()) == [0, 1, 2, 3, 4]
    labels, _ = clustering.nearest_centroid(x, res.centroids, "euclidean")
    assert np.array_equal(labels, res.labels)
    three = clustering.ward_kmeans(np.repeat(pts[:3], 10, axis=0), 5, seed=0)  # fewer distinct rows than k
    assert np.isfinite(three.centroids).all() and three.labels.max() < 5


def test_ward_kmeans_does_not_depend_on_scikit_learns_thread_count():
    from threadpoolctl import threadpool_limits

    x, _ = _blobs(n=2000, k=8, seed=9, noise=0.8)
    with threadpool_limits(limits=1):
        one = clustering.ward_kmeans(x, 8, seed=2)
    with threadpool_limits(limits=2):
        two = clustering.ward_kmeans(x, 8, seed=2)
    assert np.array_equal(one.labels, two.labels)
    assert np.array_equal(one.centroids, two.centroids)  # exact means summed in row order


def test_ward_kmeans_agrees_with_itself_across_seeds_more_than_kmeans_on_real_cells():
    """pbmc68k_reduced, 30 PCs of the log-normalised HVGs, K = 10: the partition that k-means++
    restarts reach depends on the seed; the Ward start much less (measured 0.80 vs 0.90)."""
    import itertools

    import anndata
    from conftest import EXAMPLE
    from sklearn.decomposition import PCA

    from scrcl_cli.preprocessing import prepare

    a = anndata.read_h5ad(EXAMPLE)
    x = PCA(30, random_state=0).fit_transform(prepare(sp.csr_matrix(a.X), list(a.var_names)).lognorm.toarray())

    def agreement(f):
        runs = [f(s).labels for s in range(5)]
        return np.mean([ari(p, q) for p, q in itertools.combinations(runs, 2)])

    ward = agreement(lambda s: clustering.ward_kmeans(x, 10, seed=s))
    plain = agreement(lambda s: clustering.kmeans(x, 10, seed=s, metric="euclidean"))
    assert ward > 0.85 and ward > plain + 0.05


def test_cluster_embedding_uses_ward_for_euclidean_and_kmeans_for_cosine():
    x, _ = _blobs(n=500, k=5, seed=7)
    assert np.array_equal(clustering.cluster_embedding(x, 5, seed=1, metric="euclidean").labels,
                          clustering.ward_kmeans(x, 5, seed=1).labels)
    assert np.array_equal(clustering.cluster_embedding(x, 5, seed=1, metric="cosine").labels,
                          clustering.cosine_kmeans(x, 5, seed=1).labels)


def test_ward_kmeans_above_sample_size_starts_from_a_subsample_and_labels_every_row():
    x, y = _blobs(n=3000, k=6, seed=8, noise=0.6)
    full = clustering.ward_kmeans(x, 6, seed=0)
    sub = clustering.ward_kmeans(x, 6, seed=0, sample_size=400)
    assert sub.labels.shape == (3000,)
    assert ari(full.labels, sub.labels) > 0.99 and ari(y, sub.labels) > 0.95


def _rare_hidden_by_smoothing() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(embedding (206, 4), unsmoothed input (206, 30), rare mask (206,)): two big groups of 100 cells
    apart in both; six rare cells sit inside the first big group in the embedding (as smoothing
    leaves them) but apart from it in the unsmoothed input."""
    rng = np.random.default_rng(0)
    n_big, n_rare = 100, 6
    emb = np.vstack([rng.normal(0, 1, (n_big, 4)), rng.normal(0, 1, (n_big, 4)) + 12, rng.normal(0, 1, (n_rare, 4))])
    raw = np.vstack([rng.normal(0, 1, (n_big, 30)), rng.normal(0, 1, (n_big, 30)), rng.normal(0, 1, (n_rare, 30))])
    raw[n_big:2 * n_big, :10] += 6
    raw[2 * n_big:, 10:20] += 6
    rare = np.zeros(2 * n_big + n_rare, dtype=bool)
    rare[2 * n_big:] = True
    return emb, raw, rare


def test_joint_embedding_blocks_have_equal_total_variance_before_the_weight():
    emb, raw, _ = _rare_hidden_by_smoothing()
    u = clustering.unsmoothed_components(raw, n_components=5)
    z = clustering.joint_embedding(emb, u, 0.5)
    assert z.shape == (206, 4 + 5)
    assert z[:, :4].var(0).sum() == pytest.approx(1.0)
    assert z[:, 4:].var(0).sum() == pytest.approx(0.25)


def test_unsmoothed_components_same_for_sparse_and_dense():
    _, raw, _ = _rare_hidden_by_smoothing()
    raw = np.maximum(raw, 0)
    dense = clustering.unsmoothed_components(raw, n_components=5)
    sparse = clustering.unsmoothed_components(sp.csr_matrix(raw), n_components=5)
    assert np.allclose(np.abs(dense), np.abs(sparse), atol=1e-8)  # signs of components are arbitrary


def test_cluster_embedding_with_unsmoothed_component_isolates_rare_cells():
    emb, raw, rare = _rare_hidden_by_smoothing()
    alone = clustering.cluster_embedding(emb, 3, seed=0, metric="euclidean").labels
    joint = clustering.cluster_embedding(emb, 3, seed=0, metric="euclidean", unsmoothed=raw, unsmoothed_weight=1.0)
    # On the embedding alone no cluster holds the rare cells apart; with the unsmoothed PCA one is exactly them.
    assert not any(np.array_equal(alone == c, rare) for c in range(3))
    assert any(np.array_equal(joint.labels == c, rare) for c in range(3))
    # Centroids stay in the embedding's space: each cluster's mean of the embedding.
    assert joint.centroids.shape == (3, 4)
    for c in range(3):
        assert np.allclose(joint.centroids[c], emb[joint.labels == c].mean(0))
    # Weight 0 is the embedding alone, whatever is passed.
    zero = clustering.cluster_embedding(emb, 3, seed=0, metric="euclidean", unsmoothed=raw, unsmoothed_weight=0.0)
    assert np.array_equal(zero.labels, alone)


def test_unsmoothed_components_scale_genes_to_unit_variance_first():
    """Scaled: the PCA of the z-scored genes (reference: numpy's SVD of the standardised matrix)."""
    rng = np.random.default_rng(1)
    raw = np.maximum(rng.normal(0, 1, (80, 12)) * rng.uniform(0.1, 20, 12), 0)
    raw[:, 3] = 2.0  # a constant gene stays as it is (and contributes nothing)
    got = clustering.unsmoothed_components(sp.csr_matrix(raw), n_components=4)
    sd = raw.std(0)
    z = (raw - raw.mean(0)) / np.where(sd > 0, sd, 1.0)
    u, s, _ = np.linalg.svd(z, full_matrices=False)
    want = u[:, :4] * s[:4]
    # 1e-5: the covariance comes from a Gram matrix of float32 products (graphs.gram_matrix)
    assert np.allclose(np.abs(got), np.abs(want), atol=1e-5)
    unscaled = clustering.unsmoothed_components(raw, n_components=4, scale=False)
    assert not np.allclose(np.abs(unscaled), np.abs(want), atol=1e-3)  # scaling changed the components


def test_cluster_embedding_reuses_a_given_gram_matrix_with_the_same_result():
    """Training passes the model input's Gram matrix (computed for the gene graph): same labels."""
    from scrcl_cli import graphs

    emb, raw, _ = _rare_hidden_by_smoothing()
    raw = sp.csr_matrix(np.maximum(raw, 0), dtype=np.float32)
    own = clustering.cluster_embedding(emb, 3, seed=0, metric="euclidean", unsmoothed=raw, unsmoothed_weight=0.5)
    given = clustering.cluster_embedding(
        emb, 3, seed=0, metric="euclidean", unsmoothed=raw, unsmoothed_weight=0.5, unsmoothed_gram=graphs.gram_matrix(raw)
    )
    assert np.array_equal(own.labels, given.labels)


def test_unsmoothed_components_match_scikit_learn_on_real_data():
    """The Gram-matrix PCA of the scaled genes equals scikit-learn's sparse scaler + covariance PCA
    (the implementation it replaced) on a real dataset, up to each component's sign."""
    import anndata as ad
    from conftest import shared
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    from scrcl_cli.preprocessing import prepare

    a = ad.read_h5ad(shared("pbmc68k_reduced_700.h5ad"))
    x = prepare(sp.csr_matrix(a.X, dtype=np.float32), [str(g) for g in a.var_names]).model_input
    got = clustering.unsmoothed_components(x, n_components=20)
    want = PCA(20, svd_solver="covariance_eigh").fit_transform(StandardScaler(with_mean=False).fit_transform(sp.csr_matrix(x, dtype=np.float64)))
    scale = np.abs(want).max(0)
    assert (np.abs(np.abs(got) - np.abs(want)).max(0) / scale).max() < 1e-3


def test_unsmoothed_weight_default_is_on_with_k_given_only():
    from scrcl_cli import config

    assert config.TrainConfig().unsmoothed_weight is None
    assert config.unsmoothed_weight(None, k_given=True) == config.UNSMOOTHED_WEIGHT_K_GIVEN == 0.5
    assert config.unsmoothed_weight(None, k_given=False) == 0.0
    assert config.unsmoothed_weight(0.0, k_given=True) == 0.0  # an explicit weight always wins
    assert config.unsmoothed_weight(2.0, k_given=False) == 2.0
