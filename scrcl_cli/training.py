"""Full-batch scRCL training (method doc §1.7) without any label, in linear memory.

`build_inputs` turns preprocessed arrays into the graphs and smoothed inputs; `fit` runs Adam
for a fixed number of epochs and returns the trained weights, the loss log and the embedding.
Nothing here reads labels, clusters during training or writes files.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from . import graphs
from .losses import LossTerms, scrcl_loss
from .model import ScRCL, to_torch_sparse

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters; defaults are the reference's `init_config_sc` except where noted in README."""

    epochs: int = 500
    hidden_dim: int = 1500
    out_dim: int = 16
    dropout: float = 0.3
    lr: float = 1e-4
    weight_decay: float = 0.1
    temperature: float = 0.1
    lambda1: float = 100.0
    lambda2: float = 1.0
    t0: int = 0
    t1: int = 0
    n_neighbors: int = 15
    gene_neighbors: int = 5
    n_top_genes: int = 2000
    input_mode: str = "lognorm"
    expression: str = "counts"
    seed: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TrainInputs:
    """Arrays for `fit`.

    x0, x1: Â^t0 X and Â^t1 X, float32 (N, G); adj: binary cell adjacency CSR (N, N), no self
    loops; a_hat: its GCN normalisation CSR (N, N); gene_prop: gene-graph propagation CSR (G, G).
    """

    x0: np.ndarray
    x1: np.ndarray
    adj: sp.csr_matrix
    a_hat: sp.csr_matrix
    gene_prop: sp.csr_matrix


def build_inputs(
    model_input: sp.csr_matrix,
    lognorm: sp.csr_matrix,
    config: TrainConfig,
    *,
    knn_device: Any = None,
    progress: Callable[[int, int], None] | None = None,
) -> TrainInputs:
    """Cell graph on `lognorm`, gene graph on the unsmoothed `model_input`, then smoothing."""
    adj = graphs.cell_graph(lognorm, config.n_neighbors, device=knn_device, progress=progress)
    a_hat = graphs.gcn_norm(adj)
    gene_prop = graphs.gene_graph(model_input, config.gene_neighbors)
    dense = model_input.toarray().astype(np.float32)
    x0 = np.asarray(graphs.smooth(dense, a_hat, config.t0), dtype=np.float32)
    x1 = np.asarray(graphs.smooth(dense, a_hat, config.t1), dtype=np.float32)
    return TrainInputs(x0=x0, x1=x1, adj=adj, a_hat=a_hat, gene_prop=gene_prop)


@dataclass
class TrainResult:
    """What `fit` returns.

    state: CPU state dict of `ScRCL`; losses: (epochs, 4) float64 columns total, eda, nca, cvc;
    fused: concat(z1, z2) of the training cells in eval mode, (N, 2*O); z1: (N, O);
    gene_emb: frozen gene embedding E, (G, O); seconds: wall time of the epochs.
    """

    state: dict[str, torch.Tensor]
    losses: np.ndarray
    fused: np.ndarray
    z1: np.ndarray
    gene_emb: np.ndarray
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


def fit(
    inputs: TrainInputs,
    config: TrainConfig,
    *,
    device: torch.device,
    on_epoch: Callable[[int, LossTerms], None] | None = None,
) -> TrainResult:
    """Train scRCL full batch with Adam (coupled L2 weight decay) for `config.epochs` epochs.

    The last epoch is the result: there is no selection against anything.
    """
    n, g = inputs.x0.shape
    if n < 2:
        raise ValueError("scRCL needs at least 2 cells")
    model = ScRCL(g, n, config.hidden_dim, config.out_dim, config.dropout, config.seed).to(device)
    gen = torch.Generator(device=device).manual_seed(config.seed + 1)
    x0 = torch.from_numpy(inputs.x0).to(device)
    x1 = x0 if config.t0 == config.t1 else torch.from_numpy(inputs.x1).to(device)
    a_hat = to_torch_sparse(inputs.a_hat, device)
    adj = to_torch_sparse(inputs.adj, device)
    gene_prop = to_torch_sparse(inputs.gene_prop, device)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    # The loss log stays on the device; one copy to the host after the loop.
    log_t = torch.zeros(config.epochs, 4, dtype=torch.float64, device=device)
    t_start = time.perf_counter()
    model.train()
    for epoch in range(config.epochs):
        opt.zero_grad(set_to_none=True)
        out = model(x0, x1, a_hat, gene_prop, gen)
        terms = scrcl_loss(
            out.h1, out.h2, out.z1, out.z2, adj,
            temperature=config.temperature, lambda1=config.lambda1, lambda2=config.lambda2,
        )
        terms.total.backward()
        opt.step()
        log_t[epoch] = torch.stack([terms.total, terms.eda, terms.nca, terms.cvc]).detach().double()
        if on_epoch is not None:
            on_epoch(epoch, terms)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t_start
    model.eval()
    with torch.no_grad():
        out = model(x0, x1, a_hat, gene_prop)
    losses = log_t.cpu().numpy()
    if not np.all(np.isfinite(losses)):
        log.warning("the loss became non-finite during training; try a lower --lr")
    return TrainResult(
        state={k: v.detach().cpu() for k, v in model.state_dict().items()},
        losses=losses,
        fused=out.fused.cpu().numpy(),
        z1=out.z1.cpu().numpy(),
        gene_emb=out.gene_emb.cpu().numpy(),
        seconds=seconds,
    )
