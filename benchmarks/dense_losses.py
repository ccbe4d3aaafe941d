"""The scRCL losses in their dense N x N formulation, for benchmarks only.

This is the formulation of the reference code: the cross-view divergence matrix D (N x N), the
cosine matrix S (N x N), a dense adjacency A and identity masks. scrcl_cli.losses computes the
same values and gradients without any N x N tensor; `check_parity` confirms that on small
inputs before a benchmark compares their cost. Written from the formulas, independently of
the package and of its tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def dense_eda(e1: Tensor, e2: Tensor, t: float) -> Tensor:
    """Global KL(P1||P2) + KL(P2||P1) over all N*H entries, plus half the mean per-cell KLs."""
    lg1 = F.log_softmax((e1 / t).flatten(), 0)
    lg2 = F.log_softmax((e2 / t).flatten(), 0)
    glob = (lg1.exp() * (lg1 - lg2)).sum() + (lg2.exp() * (lg2 - lg1)).sum()
    l1, l2 = F.log_softmax(e1 / t, 1), F.log_softmax(e2 / t, 1)
    cell = 0.5 * ((l1.exp() * (l1 - l2)).sum(1).mean() + (l2.exp() * (l2 - l1)).sum(1).mean())
    return glob + cell


def dense_nca(lp1: Tensor, lp2: Tensor, a: Tensor) -> Tensor:
    """D_ij = KL(p1_i||p2_j) + KL(p2_j||p1_i) as an N x N matrix; mean_i pos_i / neg_i.

    Written without gratuitous N x N locals (only D, the two masks and what autograd saves stay
    alive), so the comparison is against a lean dense implementation, not a wasteful one.
    """
    n = lp1.shape[0]
    p1, p2 = lp1.exp(), lp2.exp()
    # KL(p1_i||p2_j) = sum p1_i log p1_i - p1_i . log p2_j ; KL(p2_j||p1_i) = sum p2_j log p2_j - p2_j . log p1_i
    d = ((p1 * lp1).sum(1, keepdim=True) - p1 @ lp2.T) + ((p2 * lp2).sum(1)[None, :] - lp1 @ p2.T)  # (N, N)
    eye = torch.eye(n, dtype=d.dtype, device=d.device)
    pos = (d * (a + eye)).sum(1) / (a.sum(1) + 1)
    neg = (d * (1 - eye)).sum(1) / (n - 1)
    return (pos / neg).mean()


def dense_cvc(z1: Tensor, z2: Tensor, a: Tensor) -> Tensor:
    """mean over the N x N cosine matrix S of (S - (A + I))^2."""
    eye = torch.eye(z1.shape[0], dtype=z1.dtype, device=z1.device)
    return ((F.normalize(z1, dim=1) @ F.normalize(z2, dim=1).T - (a + eye)) ** 2).mean()


def dense_scrcl_loss(h1: Tensor, h2: Tensor, z1: Tensor, z2: Tensor, a: Tensor, *, temperature: float,
                     lambda1: float, lambda2: float) -> Tensor:
    """L_EDA + lambda1 L_NCA + lambda2 L_CVC with a dense (N, N) float adjacency `a`."""
    e1, e2 = F.normalize(h1, dim=1), F.normalize(h2, dim=1)
    t = temperature
    return (dense_eda(e1, e2, t) + lambda1 * dense_nca(F.log_softmax(e1 / t, 1), F.log_softmax(e2 / t, 1), a)
            + lambda2 * dense_cvc(z1, z2, a))


def check_parity(n: int = 300, h: int = 32, o: int = 8, seed: int = 0) -> float:
    """Max relative difference of value and gradients, dense vs scrcl_cli.losses, float64."""
    import numpy as np

    from scrcl_cli.graphs import knn_to_adjacency
    from scrcl_cli.losses import scrcl_loss
    from scrcl_cli.model import to_torch_sparse

    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, 6, generator=gen, dtype=torch.float64)
    nbrs = torch.topk(feats @ feats.T, 6, dim=1).indices.numpy()
    adj = knn_to_adjacency(nbrs)
    a_sp = to_torch_sparse(adj).double()
    a_dense = torch.from_numpy(adj.toarray()).double()
    xs = [torch.randn(n, d, generator=gen, dtype=torch.float64, requires_grad=True) for d in (h, h, o, o)]
    kw = dict(temperature=0.1, lambda1=100.0, lambda2=1.0)

    def views() -> list[Tensor]:
        return [xs[0], xs[1], F.normalize(xs[2], dim=1), F.normalize(xs[3], dim=1)]

    ours = scrcl_loss(*views(), a_sp, **kw).total
    dense = dense_scrcl_loss(*views(), a_dense, **kw)
    g1 = torch.autograd.grad(ours, xs)
    g2 = torch.autograd.grad(dense, xs)
    rel = [abs(ours.item() - dense.item()) / abs(dense.item())]
    rel += [float(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()) for a, b in zip(g1, g2)]
    return float(np.max(rel))
