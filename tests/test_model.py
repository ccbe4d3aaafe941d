"""The plain-torch GCN view equals PyG's GCNConv formula computed densely."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from scrcl_cli import graphs  # noqa: E402
from scrcl_cli.model import ScRCL, to_torch_sparse  # noqa: E402


def _setup(n=50, g=30, seed=0):
    rng = np.random.default_rng(seed)
    x = np.abs(rng.normal(size=(n, g))).astype(np.float32)
    adj = graphs.knn_to_adjacency(graphs.knn_cosine(x, 6))
    return x, adj


def test_gcn_view_matches_dense_gcn_formula():
    x, adj = _setup()
    m = ScRCL(30, 50, 16, 4, dropout=0.3, seed=0).eval()
    a = adj.toarray() + np.eye(50)
    d = np.diag(1 / np.sqrt(a.sum(1)))
    a_hat = torch.tensor(d @ a @ d, dtype=torch.float32)
    xt = torch.from_numpy(x)
    h = F.leaky_relu(a_hat @ (xt @ m.gcn1_w.T) + m.gcn1_b, 0.01)
    h = F.leaky_relu(a_hat @ (h @ m.gcn2_w.T) + m.gcn2_b, 0.01)
    want = F.leaky_relu(F.linear(h, m.fc_w, m.fc_b), 0.01)
    got = m.gcn_view(xt, to_torch_sparse(graphs.gcn_norm(adj)))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_forward_shapes_norms_and_nonnegative_gene_embedding():
    x, adj = _setup()
    m = ScRCL(30, 50, 16, 4, dropout=0.3, seed=0)
    xt = torch.from_numpy(x)
    out = m(xt, xt, to_torch_sparse(graphs.gcn_norm(adj)), to_torch_sparse(graphs.gene_graph(sp.csr_matrix(x))),
            torch.Generator().manual_seed(1))
    assert out.fused.shape == (50, 8)
    assert out.gene_emb.shape == (30, 4) and bool((out.gene_emb >= 0).all())
    torch.testing.assert_close(out.fused.norm(dim=1), torch.full((50,), 2**0.5), rtol=1e-4, atol=1e-4)


def test_same_seed_same_initial_weights():
    a, b = ScRCL(10, 20, 8, 3, 0.3, seed=7), ScRCL(10, 20, 8, 3, 0.3, seed=7)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


def test_hidden_pca_basis_is_the_pca_of_unit_rows_in_blocks():
    """Basis = sklearn's PCA of the L2-normalised rows (up to sign, fixed here), however the rows are blocked."""
    from sklearn.decomposition import PCA

    from scrcl_cli.model import embed_hidden, hidden_pca_basis

    h = torch.from_numpy(np.random.default_rng(3).gamma(0.5, size=(300, 20)).astype(np.float32))
    mean, comps = hidden_pca_basis(h, 6)
    mean_b, comps_b = hidden_pca_basis(h, 6, block=37)
    torch.testing.assert_close(comps, comps_b, rtol=1e-5, atol=1e-5)
    u = (h / h.norm(dim=1, keepdim=True)).double().numpy()
    ref = PCA(6, svd_solver="full").fit(u)
    np.testing.assert_allclose(mean.numpy(), ref.mean_, atol=1e-6)
    c = comps.double().numpy()
    signs = np.sign((c * ref.components_.T).sum(0))
    np.testing.assert_allclose(c, ref.components_.T * signs, atol=1e-4)
    # The sign rule: each component's largest-magnitude loading is positive.
    assert (c[np.abs(c).argmax(0), np.arange(6)] > 0).all()
    scores = embed_hidden(h, mean, comps).double().numpy()
    np.testing.assert_allclose(np.abs(scores), np.abs(ref.transform(u)), atol=1e-4)
    assert hidden_pca_basis(h[:4], 50)[1].shape == (20, 3)  # D = min(n_comps, N - 1, H)
