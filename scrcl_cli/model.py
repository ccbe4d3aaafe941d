"""scRCL networks in plain torch: MLP view, GCN view, gene encoder.

No torch_geometric: a GCN layer is a linear map followed by a product with a precomputed
normalised sparse adjacency (``graphs.gcn_norm`` / ``graphs.gene_graph``), exactly PyG's
``GCNConv`` with self loops. Randomness (initialisation, dropout) comes from an explicit
``torch.Generator``; no global RNG state is touched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def to_torch_sparse(m: sp.spmatrix, device: torch.device | str = "cpu") -> Tensor:
    """scipy sparse -> coalesced torch COO float32 tensor on `device`."""
    coo = sp.coo_matrix(m)
    idx = torch.from_numpy(np.vstack([coo.row, coo.col]).astype(np.int64))
    val = torch.from_numpy(coo.data.astype(np.float32))
    return torch.sparse_coo_tensor(idx, val, coo.shape, device=device, check_invariants=False).coalesce()


def _glorot(shape: tuple[int, int], gen: torch.Generator) -> Tensor:
    bound = math.sqrt(6.0 / (shape[0] + shape[1]))
    return (torch.rand(shape, generator=gen) * 2 - 1) * bound


def _linear_uniform(shape: tuple[int, int], gen: torch.Generator) -> tuple[Tensor, Tensor]:
    # torch.nn.Linear's default init (kaiming-uniform with a=sqrt(5)), drawn from `gen`.
    bound = 1.0 / math.sqrt(shape[1])
    w = (torch.rand(shape, generator=gen) * 2 - 1) * bound
    b = (torch.rand(shape[0], generator=gen) * 2 - 1) * bound
    return w, b


def dropout(x: Tensor, p: float, gen: torch.Generator | None, *, training: bool) -> Tensor:
    """Inverted dropout whose mask is drawn from `gen` (F.dropout only uses the global RNG)."""
    if not training or p <= 0:
        return x
    keep = torch.empty_like(x).bernoulli_(1.0 - p, generator=gen)
    return x * keep / (1.0 - p)


GCN_SLOPE = 0.01  # negative slope of the GCN view's LeakyReLUs (the reference's)


def mlp_hidden(x0: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """MLP view, (N, G) -> (N, H): Linear + ReLU. w: (H, G), b: (H,)."""
    return F.relu(F.linear(x0, w, b))


def gcn_activation(aggregated: Tensor, b: Tensor) -> Tensor:
    """One GCN layer after its aggregation: LeakyReLU(Â (x Wᵀ) + b). aggregated: (N, H), b: (H,).

    Training aggregates with a sparse product, the exported encoder with a gather over padded
    neighbour lists; both end here, so the layer is one function."""
    return F.leaky_relu(aggregated + b, GCN_SLOPE)


def gcn_head(h: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """The GCN view's last layer, (N, H) -> (N, H): Linear + LeakyReLU. w: (H, H), b: (H,)."""
    return F.leaky_relu(F.linear(h, w, b), GCN_SLOPE)


class HiddenMoments:
    """Running first and second moments of the L2-normalised rows of one view's hidden output,
    accumulated in float64 over row blocks, so no normalised or centred copy of a whole (N, H)
    array is ever held (`hidden_pca_basis`; the streamed whole-graph pass of out-of-core training).
    """

    def __init__(self, width: int, device: torch.device) -> None:
        self.n = 0
        self.second = torch.zeros(width, width, dtype=torch.float64, device=device)
        self.total = torch.zeros(width, dtype=torch.float64, device=device)

    def add(self, h: Tensor) -> None:
        """Add the rows of h (B, H)."""
        u = F.normalize(h, dim=1)
        self.second += (u.T @ u).double()
        self.total += u.sum(0).double()
        self.n += h.shape[0]

    def basis(self, n_comps: int) -> tuple[Tensor, Tensor]:
        """Mean (H,) and components (H, D), float32, D = min(n_comps, N - 1, H), by decreasing
        variance, each component's largest-magnitude loading positive (so the basis does not
        depend on the eigensolver's signs)."""
        width = self.total.shape[0]
        d = max(1, min(n_comps, self.n - 1, width))
        mean = self.total / self.n
        cov = self.second / self.n - torch.outer(mean, mean)
        _, vecs = torch.linalg.eigh(cov)  # ascending eigenvalues
        comps = vecs[:, -d:].flip(1)
        sign = torch.sign(comps.gather(0, comps.abs().argmax(0, keepdim=True)))
        comps = comps * torch.where(sign == 0, torch.ones_like(sign), sign)
        return mean.float(), comps.float()


def hidden_pca_basis(h: Tensor, n_comps: int, block: int = 65_536) -> tuple[Tensor, Tensor]:
    """PCA basis of the L2-normalised rows of one view's hidden output.

    h: (N, H) float32 on any device. Returns mean (H,) and components (H, D), float32 on h's
    device (`HiddenMoments.basis`), the moments summed over row blocks of `block`.
    """
    moments = HiddenMoments(h.shape[1], h.device)
    for start in range(0, h.shape[0], block):
        moments.add(h[start : start + block])
    return moments.basis(n_comps)


def embed_hidden(h: Tensor, mean: Tensor, comps: Tensor) -> Tensor:
    """Clustering embedding of a view's hidden output: (unit rows of h - mean) @ comps.

    h: (B, H); mean: (H,); comps: (H, D), from `hidden_pca_basis`. Returns (B, D). Shared by
    training and the exported encoders, so both compute the same function.
    """
    return (F.normalize(h, dim=1) - mean) @ comps


@dataclass(frozen=True)
class ScRCLOutput:
    """Forward pass of `ScRCL`.

    h1, h2: unnormalised MLP / GCN view outputs, shape (N, H).
    z1, z2: refined, L2-normalised embeddings, shape (N, O).
    gene_emb: gene embedding E >= 0, shape (G, O).
    """

    h1: Tensor
    h2: Tensor
    z1: Tensor
    z2: Tensor
    gene_emb: Tensor

    @property
    def fused(self) -> Tensor:
        """The reference's clustering embedding concat(z1, z2), shape (N, 2*O), rows of norm sqrt(2)."""
        return torch.cat([self.z1, self.z2], dim=1)


class ScRCL(nn.Module):
    """The two cell views, the shared projector and the gene encoder.

    n_genes G, n_cells N (the gene encoder's input width), hidden H, out O.
    """

    def __init__(self, n_genes: int, n_cells: int, hidden_dim: int, out_dim: int, dropout: float, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        g, n, h, o = n_genes, n_cells, hidden_dim, out_dim
        self.p = dropout
        mw, mb = _linear_uniform((h, g), gen)
        self.mlp_w, self.mlp_b = nn.Parameter(mw), nn.Parameter(mb)
        self.gcn1_w, self.gcn1_b = nn.Parameter(_glorot((h, g), gen)), nn.Parameter(torch.zeros(h))
        self.gcn2_w, self.gcn2_b = nn.Parameter(_glorot((h, h), gen)), nn.Parameter(torch.zeros(h))
        fw, fb = _linear_uniform((h, h), gen)
        self.fc_w, self.fc_b = nn.Parameter(fw), nn.Parameter(fb)
        pw, pb = _linear_uniform((g, h), gen)
        self.proj_w, self.proj_b = nn.Parameter(pw), nn.Parameter(pb)
        self.gene_w, self.gene_b = nn.Parameter(_glorot((o, n), gen)), nn.Parameter(torch.zeros(o))

    # ---- pieces shared with the exported encoders (export.py)
    def mlp_view(self, x0: Tensor) -> Tensor:
        """MLP view, (N, G) -> (N, H): Linear + ReLU (the reference passes no dropout here)."""
        return mlp_hidden(x0, self.mlp_w, self.mlp_b)

    def gcn_view(self, x1: Tensor, adj: Tensor, gen: torch.Generator | None = None) -> Tensor:
        """GCN view, (N, G) -> (N, H). adj: normalised sparse (N, N) with self loops."""
        h = gcn_activation(torch.sparse.mm(adj, x1 @ self.gcn1_w.T), self.gcn1_b)
        h = gcn_activation(torch.sparse.mm(adj, h @ self.gcn2_w.T), self.gcn2_b)
        h = dropout(h, self.p, gen, training=self.training)
        return gcn_head(h, self.fc_w, self.fc_b)

    def gene_embedding(
        self, x0: Tensor, gene_adj: Tensor, cells: Tensor | None = None, cell_weights: Tensor | None = None
    ) -> Tensor:
        """Gene encoder, X0^T (G, N) -> E (G, O), E >= 0. gene_adj: `graphs.gene_graph` (G, G).

        With `cells` (B,) int64, x0 holds only those cells' rows (B, G) and X0^T W is estimated
        from the batch (mini-batch training): weighted by `cell_weights` (B,), the inverse
        inclusion probabilities (Horvitz-Thompson, unbiased), or else scaled by N / B (unbiased
        for a uniform sample of cells).
        """
        if cells is None:
            return F.relu(torch.sparse.mm(gene_adj, x0.T @ self.gene_w.T) + self.gene_b)
        w_b = self.gene_w[:, cells].T
        if cell_weights is None:
            est = (self.gene_w.shape[1] / cells.shape[0]) * (x0.T @ w_b)
        else:
            est = x0.T @ (cell_weights.unsqueeze(1) * w_b)
        return F.relu(torch.sparse.mm(gene_adj, est) + self.gene_b)

    def refine(self, h: Tensor, gene_emb: Tensor, gen: torch.Generator | None = None) -> Tensor:
        """Shared projector then the gene embedding: (N, H) -> (N, G) -> (N, O), L2-normalised."""
        h = dropout(h, self.p, gen, training=self.training)
        return F.normalize(F.linear(h, self.proj_w, self.proj_b) @ gene_emb, dim=1)

    def forward(
        self,
        x0: Tensor,
        x1: Tensor,
        adj: Tensor,
        gene_adj: Tensor,
        gen: torch.Generator | None = None,
        cells: Tensor | None = None,
        cell_weights: Tensor | None = None,
    ) -> ScRCLOutput:
        """x0, x1: Â^t0 X and Â^t1 X, shape (N, G). adj (N, N), gene_adj (G, G): sparse, normalised.

        cells, cell_weights: for a mini-batch, the batch's indices among the N training cells and
        their inverse inclusion probabilities (see gene_embedding).
        """
        h1 = self.mlp_view(x0)
        h2 = self.gcn_view(x1, adj, gen)
        e = self.gene_embedding(x0, gene_adj, cells, cell_weights)
        return ScRCLOutput(h1=h1, h2=h2, z1=self.refine(h1, e, gen), z2=self.refine(h2, e, gen), gene_emb=e)
