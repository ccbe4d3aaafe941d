"""Graphs: kNN structure, GCN normalisation, gene graph as PyG's GCNConv sees it, padding."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.neighbors import kneighbors_graph

from scrcl_cli import graphs
from scrcl_cli._utils import unit_rows


def _feats(n=120, d=20, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(4, d))
    return centers[rng.integers(4, size=n)] + 0.3 * rng.normal(size=(n, d))


def test_cell_graph_is_symmetric_binary_without_self_loops():
    a = graphs.cell_graph(sp.csr_matrix(np.abs(_feats())), n_neighbors=15)
    assert (a != a.T).nnz == 0
    assert a.diagonal().sum() == 0
    assert set(np.unique(a.data)) == {1.0}
    assert np.diff(a.indptr).min() >= 14  # 14 own neighbours before the union


def test_knn_cosine_matches_brute_force_ranking():
    x = _feats(80)
    got = graphs.knn_cosine(x, 6)
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = u @ u.T
    np.fill_diagonal(sim, -np.inf)
    want = np.argsort(-sim, axis=1)[:, :5]
    assert np.array_equal(np.sort(got, 1), np.sort(want, 1))


def test_knn_cosine_chunked_equals_single_chunk(monkeypatch):
    x = _feats(200)
    whole = graphs.knn_cosine(x, 15)
    monkeypatch.setattr(graphs, "_CHUNK_ELEMENTS", 200 * 7)
    assert np.array_equal(graphs.knn_cosine(x, 15), whole)


def test_knn_cosine_keeps_self_first_with_duplicate_rows():
    x = np.vstack([np.ones((5, 3)), _feats(20, 3)])
    nb = graphs.knn_cosine(x, 4)
    assert not np.any(nb == np.arange(25)[:, None])


def test_pca_scores_match_sklearn_up_to_sign():
    from sklearn.decomposition import PCA

    x = np.abs(_feats(300, 30))
    ours = graphs.pca_scores(sp.csr_matrix(x), 5)
    ref = PCA(5, svd_solver="full").fit_transform(x)
    np.testing.assert_allclose(np.abs(ours), np.abs(ref), atol=1e-4)


def test_gcn_norm_matches_dense_formula():
    a = graphs.knn_to_adjacency(graphs.knn_cosine(_feats(60), 5))
    dense = a.toarray() + np.eye(60)
    d = np.diag(1 / np.sqrt(dense.sum(1)))
    np.testing.assert_allclose(graphs.gcn_norm(a).toarray(), d @ dense @ d, rtol=1e-6)


def test_gene_graph_matches_pyg_gcnconv_normalisation():
    x = np.abs(_feats(50, 30, seed=3))
    a = kneighbors_graph(x.T, 5, mode="connectivity", include_self=True).toarray()
    # PyG: edge i -> j for j in kNN(i); target j aggregates, both ends normalised by in-degree.
    m = a.T
    deg = m.sum(1)
    want = m / np.sqrt(deg[:, None] * deg[None, :])
    np.testing.assert_allclose(graphs.gene_graph(sp.csr_matrix(x), 5).toarray(), want, rtol=1e-6)


@pytest.mark.parametrize("t", [0, 1, 3])
def test_smooth_applies_a_hat_t_times(t):
    a_hat = graphs.gcn_norm(graphs.knn_to_adjacency(graphs.knn_cosine(_feats(40), 5))).toarray()
    x = _feats(40, 7, seed=1)
    np.testing.assert_allclose(graphs.smooth(x, sp.csr_matrix(a_hat), t), np.linalg.matrix_power(a_hat, t) @ x, rtol=1e-5)


def test_padded_neighbours_reproduce_a_hat_product_with_self_first():
    a_hat = graphs.gcn_norm(graphs.knn_to_adjacency(graphs.knn_cosine(_feats(70), 6)))
    nbr, w = graphs.padded_neighbours(a_hat)
    h = _feats(70, 9, seed=2)
    np.testing.assert_allclose((h[nbr] * w[..., None]).sum(1), a_hat @ h, rtol=1e-5, atol=1e-6)
    assert np.array_equal(nbr[:, 0], np.arange(70))


def test_padded_neighbours_of_target_rows_over_their_neighbourhood():
    a_hat = graphs.gcn_norm(graphs.knn_to_adjacency(graphs.knn_cosine(_feats(70), 6)))
    targets = np.array([3, 10, 11, 40])
    rows = a_hat[targets]
    nodes = np.unique(rows.indices)
    local = sp.csr_matrix((rows.data, np.searchsorted(nodes, rows.indices), rows.indptr), shape=(4, nodes.size))
    nbr, w = graphs.padded_neighbours(local, np.searchsorted(nodes, targets))
    h = _feats(70, 9, seed=2)
    np.testing.assert_allclose((h[nodes][nbr] * w[..., None]).sum(1), (a_hat @ h)[targets], rtol=1e-5, atol=1e-6)
    assert np.array_equal(nodes[nbr[:, 0]], targets)  # each target first in its own row


@pytest.mark.parametrize("dense", [False, True])
def test_smooth_powers_equal_repeated_smoothing_bitwise(dense):
    x = sp.random(90, 300, density=0.1, format="csr", dtype=np.float32, random_state=3)
    a_hat = graphs.gcn_norm(graphs.knn_to_adjacency(graphs.knn_cosine(x.toarray(), 5)))
    got = graphs.smooth_powers(x.toarray() if dense else x, a_hat, (3, 0, 1), block=64)
    assert sorted(got) == [0, 1, 3]
    for t, arr in got.items():
        want = graphs.smooth(x.toarray(), a_hat, t)
        assert arr.dtype == np.float32 and np.array_equal(arr, np.asarray(want, dtype=np.float32))


def _real_pca(name: str):
    import anndata
    from conftest import shared

    from scrcl_cli.preprocessing import prepare

    a = anndata.read_h5ad(shared(name + ".h5ad"))
    prep = prepare(sp.csr_matrix(a.X, dtype=np.float32), [str(v) for v in a.var_names], n_top_genes=2000)
    return graphs.pca_scores(prep.lognorm, 50)


@pytest.mark.parametrize("name", ["pbmc_10x_4k_top2000", "cite_cbmc_top2000"])
def test_approximate_knn_recalls_the_exact_neighbours_on_real_cells(name):
    """The faiss inverted-file search that N > EXACT_KNN_MAX takes, at its default lists and probes."""
    feats = _real_pca(name)
    exact = graphs.knn_cosine(feats, 15)
    approx = graphs.knn_cosine_approx(unit_rows(feats, np.float32), 15)
    assert approx.shape == exact.shape and not np.any(approx == np.arange(len(feats))[:, None])
    assert all(len(set(r)) == r.size for r in approx)  # no neighbour listed twice
    recall = np.mean([len(set(a) & set(b)) for a, b in zip(approx, exact)]) / exact.shape[1]
    # Measured: 1.000 on both (106 and 215 lists, each cell against about 3,500 candidates).
    assert recall > 0.99
    # Nearest first, as in the exact search.
    u = unit_rows(feats, np.float32)
    sims = np.einsum("nd,nkd->nk", u, u[approx])
    assert np.all(np.diff(sims, axis=1) <= 1e-6)


def test_approximate_knn_with_few_probes_recalls_less_but_most():
    feats = _real_pca("cite_cbmc_top2000")
    exact = graphs.knn_cosine(feats, 15)
    approx = graphs.knn_cosine_approx(unit_rows(feats, np.float32), 15, n_probe=32)
    recall = np.mean([len(set(a) & set(b)) for a, b in zip(approx, exact)]) / exact.shape[1]
    # Measured 0.965 with 32 of 215 lists (1,280 candidates): the default's candidate count, not
    # the index alone, is what keeps the recall high.
    assert 0.9 < recall < 0.99


def test_faiss_runs_single_threaded_beside_other_openmp_runtimes_on_macos(monkeypatch):
    """On macOS and Windows the search must not start a second multi-threaded OpenMP runtime."""
    faiss = pytest.importorskip("faiss")
    before = faiss.omp_get_max_threads()
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.delenv("KMP_DUPLICATE_LIB_OK", raising=False)
    try:
        assert graphs._import_faiss().omp_get_max_threads() == 1
        assert os.environ["KMP_DUPLICATE_LIB_OK"] == "TRUE"
        monkeypatch.setenv("KMP_DUPLICATE_LIB_OK", "FALSE")  # a user's own setting is kept
        graphs._import_faiss()
        assert os.environ["KMP_DUPLICATE_LIB_OK"] == "FALSE"
    finally:
        faiss.omp_set_num_threads(before)


def test_approximate_knn_searches_short_rows_exactly():
    """A cell whose probed lists hold fewer than k cells gets its exact neighbours: with one cell
    per list and one probe, every row is short, so the result is the exact search."""
    x = _feats(300)
    got = graphs.knn_cosine_approx(unit_rows(x, np.float32), 8, n_lists=300, n_probe=1)
    np.testing.assert_array_equal(got, graphs.knn_cosine(x, 8))


def test_approximate_knn_is_deterministic_given_the_seed(monkeypatch):
    monkeypatch.setattr(graphs, "EXACT_KNN_MAX", 100)
    x = _feats(600)
    first = graphs.knn_cosine(x, 10, seed=1)
    assert np.array_equal(first, graphs.knn_cosine(x, 10, seed=1))
    assert np.array_equal(first, graphs.knn_cosine_approx(unit_rows(x, np.float32), 10, seed=1))  # the path taken


@pytest.mark.parametrize("where", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_torch_graph_algebra_matches_scipy(where, monkeypatch):
    """The CUDA path (Gram matrix in dense row blocks, smoothing with torch sparse products,
    exact kNN) equals the scipy path to float32 rounding; on hosts without a GPU it runs on
    torch's CPU device. The smoothed blocks come back in row chunks (here of 64 rows)."""
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(graphs, "_ROWS_TO_HOST", 64)
    if where == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    dev = torch.device(where)
    x = sp.random(300, 80, density=0.1, format="csr", dtype=np.float32, random_state=4)
    np.testing.assert_allclose(graphs.gram_matrix(x, device=dev), graphs.gram_matrix(x), rtol=1e-5, atol=1e-5)
    a_hat = graphs.gcn_norm(graphs.knn_to_adjacency(graphs.knn_cosine(x.toarray(), 6)))
    want = graphs.smooth_powers(x, a_hat, (2, 4), block=32)
    for xin in (x, x.toarray()):
        got = graphs.smooth_powers(xin, a_hat, (2, 4), block=32, device=dev)
        for t in (2, 4):
            np.testing.assert_allclose(got[t], want[t], rtol=1e-5, atol=1e-6)
    got_nb, want_nb = graphs.knn_cosine(x.toarray(), 6, device=dev), graphs.knn_cosine(x.toarray(), 6)
    # Sets, not order: a GPU matmul may swap two neighbours whose similarities tie to rounding.
    assert np.mean([len(set(a) & set(b)) for a, b in zip(got_nb, want_nb)]) / want_nb.shape[1] > 0.99


def test_block_width_fills_the_device_within_bounds():
    """Columns per GPU smoothing pass: the whole G where two (N, G) float32 arrays fit in 40 % of
    the free memory (one pass), else what fits, never below the CPU's block nor above G."""
    gib = 2**30
    assert graphs.block_width(1_000_000, 2000, 256, 130 * gib) == 2000  # an H200 at a million cells
    assert graphs.block_width(10_000_000, 2000, 256, 130 * gib) == 697  # ten million: 3 passes
    assert graphs.block_width(10_000_000, 2000, 256, 70 * gib) == 375
    assert graphs.block_width(10_000_000, 2000, 256, 1 * gib) == 256
    assert graphs.block_width(10, 3, 256, 0) == 3
