"""scRCL's three alignment losses in linear memory (exact O(N·H + E·H) forms of the dense N x N losses).

The reference builds N x N matrices for the neighbourhood contrastive alignment (NCA) and the
cross-view consistency (CVC). Both sums factor exactly: the all-pairs parts into per-cell and
per-feature sums, the neighbour parts into sparse products with the adjacency. Values and
gradients equal the dense formulas (tests/test_losses.py checks this in float64).
All functions are pure: tensors in, tensors out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class LossTerms:
    """The scRCL objective and its parts, each a scalar tensor of shape ()."""

    total: Tensor  # the value passed to backward()
    eda: Tensor  # embedding distribution alignment
    nca: Tensor  # neighbourhood contrastive alignment
    cvc: Tensor  # cross-view consistency


def _spmm(adj: Tensor, x: Tensor) -> Tensor:
    return torch.sparse.mm(adj, x)


def eda_loss(e1: Tensor, e2: Tensor, temperature: float) -> Tensor:
    """Embedding distribution alignment.

    e1, e2: L2-normalised view embeddings, shape (N, H).
    Global term: P_v = softmax of e_v / t over all N*H entries, KL(P1||P2) + KL(P2||P1).
    Per-cell term: half the sum of the two mean per-cell KLs between row softmaxes.
    Returns a scalar, shape ().
    """
    g1 = (e1 / temperature).flatten()
    g2 = (e2 / temperature).flatten()
    lg1, lg2 = g1 - torch.logsumexp(g1, 0), g2 - torch.logsumexp(g2, 0)
    diff = lg1 - lg2
    glob = (lg1.exp() * diff).sum() - (lg2.exp() * diff).sum()
    lp1 = F.log_softmax(e1 / temperature, dim=1)
    lp2 = F.log_softmax(e2 / temperature, dim=1)
    d = lp1 - lp2
    cell = 0.5 * ((lp1.exp() * d).sum(1).mean() - (lp2.exp() * d).sum(1).mean())
    return glob + cell


def nca_loss(lp1: Tensor, lp2: Tensor, adj: Tensor) -> Tensor:
    """Neighbourhood contrastive alignment in O(N*H + E*H) time and O(N*H) memory.

    lp1, lp2: per-cell log-softmax of the view embeddings, shape (N, H), N >= 2.
    adj: binary symmetric sparse adjacency without self loops, shape (N, N).
    With D_ij = KL(p1_i||p2_j) + KL(p2_j||p1_i):
    pos_i = mean of D_ij over j in N(i) and i; neg_i = mean of D_ij over j != i.
    Returns mean_i pos_i / neg_i, a scalar of shape (), equal to the dense N x N formula.
    """
    n = lp1.shape[0]
    p1, p2 = lp1.exp(), lp2.exp()
    a = (p1 * lp1).sum(1)  # KL(p1_i||p2_j) = a_i - p1_i . lp2_j
    b = (p2 * lp2).sum(1)  # KL(p2_j||p1_i) = b_j - p2_j . lp1_i
    row_all = n * a - p1 @ lp2.sum(0) + b.sum() - lp1 @ p2.sum(0)
    diag = a - (p1 * lp2).sum(1) + b - (p2 * lp1).sum(1)
    neg = (row_all - diag) / (n - 1)
    deg = _spmm(adj, torch.ones(n, 1, dtype=lp1.dtype, device=lp1.device)).squeeze(1)
    nbr = deg * a - (p1 * _spmm(adj, lp2)).sum(1) + _spmm(adj, b.unsqueeze(1)).squeeze(1) - (lp1 * _spmm(adj, p2)).sum(1)
    pos = (nbr + diag) / (deg + 1)
    return (pos / neg).mean()


def cvc_loss(z1: Tensor, z2: Tensor, adj: Tensor) -> Tensor:
    """Cross-view consistency in O(N*O^2 + E*O) time.

    z1, z2: L2-normalised refined embeddings, shape (N, O). adj as in `nca_loss`.
    Equals mean over all N^2 pairs of (cos(z1_i, z2_j) - T_ij)^2 with T = A + I, using
    sum S_ij^2 = <Z1^T Z1, Z2^T Z2>_F and sum over T of S_ij = sum_i z1_i . ((A + I) Z2)_i.
    Returns a scalar, shape ().
    """
    n = z1.shape[0]
    sq = ((z1.T @ z1) * (z2.T @ z2)).sum()
    on_target = (z1 * (_spmm(adj, z2) + z2)).sum()
    n_target = _spmm(adj, torch.ones(n, 1, dtype=z1.dtype, device=z1.device)).sum() + n
    return (sq - 2 * on_target + n_target) / (n * n)


def scrcl_loss(
    h1: Tensor,
    h2: Tensor,
    z1: Tensor,
    z2: Tensor,
    adj: Tensor,
    *,
    temperature: float,
    lambda1: float,
    lambda2: float,
) -> LossTerms:
    """L = L_EDA + lambda1 * L_NCA + lambda2 * L_CVC.

    h1, h2: unnormalised view outputs (N, H); z1, z2: refined embeddings (N, O);
    adj: binary sparse cell adjacency (N, N), no self loops.
    """
    e1, e2 = F.normalize(h1, dim=1), F.normalize(h2, dim=1)
    eda = eda_loss(e1, e2, temperature)
    nca = nca_loss(F.log_softmax(e1 / temperature, 1), F.log_softmax(e2 / temperature, 1), adj)
    cvc = cvc_loss(z1, z2, adj)
    return LossTerms(total=eda + lambda1 * nca + lambda2 * cvc, eda=eda, nca=nca, cvc=cvc)
