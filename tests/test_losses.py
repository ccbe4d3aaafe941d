"""Linear-memory losses equal the dense N x N formulas of the reference, values and gradients."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from scrcl_cli.graphs import knn_to_adjacency  # noqa: E402
from scrcl_cli.losses import cvc_loss, eda_loss, nca_loss, scrcl_loss  # noqa: E402

# ---- dense references, written as the paper states them (kept in the tests only)


def dense_eda(e1, e2, t):
    p1 = F.softmax((e1 / t).flatten(), 0)
    p2 = F.softmax((e2 / t).flatten(), 0)
    kl = lambda p, q: (p * (p.log() - q.log())).sum()  # noqa: E731
    glob = kl(p1, p2) + kl(p2, p1)
    q1, q2 = F.softmax(e1 / t, 1), F.softmax(e2 / t, 1)
    rowkl = lambda p, q: (p * (p.log() - q.log())).sum(1)  # noqa: E731
    return glob + 0.5 * (rowkl(q1, q2).mean() + rowkl(q2, q1).mean())


def dense_nca(lp1, lp2, a_dense):
    p1, p2 = lp1.exp(), lp2.exp()
    n = lp1.shape[0]
    # kl12[i, j] = KL(p1_i || p2_j); kl21[i, j] = KL(p2_j || p1_i)
    kl12 = (p1 * lp1).sum(1, keepdim=True) - p1 @ lp2.T
    kl21 = (p2 * lp2).sum(1)[None, :] - lp1 @ p2.T
    d = kl12 + kl21
    eye = torch.eye(n, dtype=d.dtype)
    pos = (d * (a_dense + eye)).sum(1) / (a_dense.sum(1) + 1)
    neg = (d * (1 - eye)).sum(1) / (n - 1)
    return (pos / neg).mean()


def dense_cvc(z1, z2, a_dense):
    s = F.normalize(z1, dim=1) @ F.normalize(z2, dim=1).T
    target = a_dense + torch.eye(z1.shape[0], dtype=z1.dtype)
    return ((s - target) ** 2).mean()


def _graph(n, rng, duplicate=False):
    feats = rng.normal(size=(n, 6))
    if duplicate and n > 3:
        feats[1] = feats[0]  # duplicate rows
    a = knn_to_adjacency(np.argsort(-(feats @ feats.T), axis=1)[:, : min(4, n)])
    a = sp.lil_matrix(a)
    if n > 4:  # make the last cell isolated
        a[n - 1, :] = 0
        a[:, n - 1] = 0
    a = sp.csr_matrix(a)
    a.eliminate_zeros()
    coo = a.tocoo()
    idx = torch.tensor(np.vstack([coo.row, coo.col]), dtype=torch.int64)
    ts = torch.sparse_coo_tensor(idx, torch.ones(coo.nnz, dtype=torch.float64), a.shape).coalesce()
    return ts, torch.tensor(a.toarray(), dtype=torch.float64)


def _inputs(n, d, rng, duplicate):
    x = torch.tensor(rng.normal(size=(n, d)), dtype=torch.float64)
    y = torch.tensor(rng.normal(size=(n, d)), dtype=torch.float64)
    if duplicate and n > 3:
        x.data[1] = x.data[0]
        y.data[1] = y.data[0]
    return x.requires_grad_(), y.requires_grad_()


def _check(fast, dense, inputs):
    vf = fast(*inputs)
    gf = torch.autograd.grad(vf, inputs)
    vd = dense(*inputs)
    gd = torch.autograd.grad(vd, inputs)
    np.testing.assert_allclose(vf.item(), vd.item(), rtol=1e-6)
    for a, b in zip(gf, gd):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("n", [5, 57, 300])
@pytest.mark.parametrize("duplicate", [False, True])
def test_nca_loss_matches_dense_formula(n, duplicate):
    rng = np.random.default_rng(n)
    adj, a_dense = _graph(n, rng, duplicate)
    x, y = _inputs(n, 17, rng, duplicate)
    t = 0.1
    fast = lambda u, v: nca_loss(F.log_softmax(F.normalize(u, dim=1) / t, 1), F.log_softmax(F.normalize(v, dim=1) / t, 1), adj)  # noqa: E731
    dense = lambda u, v: dense_nca(F.log_softmax(F.normalize(u, dim=1) / t, 1), F.log_softmax(F.normalize(v, dim=1) / t, 1), a_dense)  # noqa: E731
    _check(fast, dense, (x, y))


@pytest.mark.parametrize("n", [5, 57, 300])
@pytest.mark.parametrize("duplicate", [False, True])
def test_cvc_loss_matches_dense_formula(n, duplicate):
    rng = np.random.default_rng(100 + n)
    adj, a_dense = _graph(n, rng, duplicate)
    x, y = _inputs(n, 7, rng, duplicate)
    fast = lambda u, v: cvc_loss(F.normalize(u, dim=1), F.normalize(v, dim=1), adj)  # noqa: E731
    dense = lambda u, v: dense_cvc(u, v, a_dense)  # noqa: E731
    _check(fast, dense, (x, y))


@pytest.mark.parametrize("n", [5, 57, 300])
@pytest.mark.parametrize("t", [0.1, 1.0])
def test_eda_loss_matches_dense_formula(n, t):
    rng = np.random.default_rng(200 + n)
    x, y = _inputs(n, 23, rng, duplicate=True)
    fast = lambda u, v: eda_loss(F.normalize(u, dim=1), F.normalize(v, dim=1), t)  # noqa: E731
    dense = lambda u, v: dense_eda(F.normalize(u, dim=1), F.normalize(v, dim=1), t)  # noqa: E731
    _check(fast, dense, (x, y))


def test_scrcl_loss_total_is_weighted_sum_of_terms():
    rng = np.random.default_rng(3)
    adj, _ = _graph(40, rng)
    h1, h2 = _inputs(40, 11, rng, duplicate=False)
    z1, z2 = (F.normalize(torch.tensor(rng.normal(size=(40, 4))), dim=1) for _ in range(2))
    terms = scrcl_loss(h1, h2, z1, z2, adj, temperature=0.1, lambda1=100.0, lambda2=0.5)
    expected = terms.eda + 100.0 * terms.nca + 0.5 * terms.cvc
    assert torch.allclose(terms.total, expected)
    assert all(torch.isfinite(v) for v in (terms.eda, terms.nca, terms.cvc))
