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
from torch import Tensor

from . import graphs
from .losses import LossTerms, scrcl_loss
from .model import ScRCL, embed_hidden, hidden_pca_basis, to_torch_sparse

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters; defaults are the reference's `init_config_sc` except where noted in README."""

    epochs: int = 100
    hidden_dim: int = 1500
    out_dim: int = 16
    dropout: float = 0.3
    lr: float = 1e-4
    weight_decay: float = 0.1
    temperature: float = 0.1
    lambda1: float = 100.0
    lambda2: float = 1.0
    t0: int = 4
    t1: int = 2
    n_neighbors: int = 15
    gene_neighbors: int = 5
    n_top_genes: int = 2000
    input_mode: str = "lognorm"
    expression: str = "counts"
    embedding: str = "gcn-pca"
    # Weight of the unsmoothed PCA beside the embedding when clustering (0: embedding alone);
    # docs/defaults.md, "Unsmoothed component".
    unsmoothed_weight: float = 1.0
    seed: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# `--spatial` defaults (docs/spatial.md, "Recommended settings"): the fields of TrainConfig that
# differ in spatial mode. One setting for every section, chosen without labels deciding anything
# but the comparison between settings on the two shared sections (the caveat is in that page).
SPATIAL_DEFAULTS: dict[str, Any] = {
    "epochs": 100,
    "hidden_dim": 128,
    "out_dim": 32,
    "temperature": 1.0,
    "lambda1": 10.0,
    "t0": 5,
    "t1": 5,
    "gene_neighbors": 1,
    "n_top_genes": 3000,
    # The spatial defaults were chosen on the fused embedding; gcn-pca was measured on SC data only.
    "embedding": "fused",
    "unsmoothed_weight": 0.0,
}

# Clustering embeddings (docs/defaults.md, session 6). "gcn-pca": the first EMBED_DIM principal
# components of the GCN view's L2-normalised hidden output, clustered with Euclidean k-means.
# "fused": the reference's concat(z1, z2), clustered with cosine k-means.
# The k-means metric of each is `clustering.EMBEDDING_METRIC`.
EMBEDDINGS = ("gcn-pca", "fused")
EMBED_DIM = 50


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
    graph_device: Any = None,
    progress: Callable[[int, int], None] | None = None,
    adj: sp.csr_matrix | None = None,
) -> TrainInputs:
    """Cell graph on `lognorm` (unless `adj` is given, e.g. a spatial graph), gene graph on the
    unsmoothed `model_input`, then smoothing.

    graph_device: a CUDA `torch.device` for the graph algebra (Gram matrices, exact kNN search,
    smoothing), or None for numpy/scipy. The Gram matrix X^T X is computed once when the model
    input is the log-normalised matrix (the default), as the PCA and the gene graph both need it.
    """
    shared = model_input is lognorm
    gram = graphs.gram_matrix(lognorm, device=graph_device) if shared else None
    if adj is None:
        adj = graphs.cell_graph(lognorm, config.n_neighbors, device=graph_device, progress=progress, gram=gram)
    a_hat = graphs.gcn_norm(adj)
    gene_prop = graphs.gene_graph(model_input, config.gene_neighbors,
                                  gram=gram if shared else graphs.gram_matrix(model_input, device=graph_device))
    smoothed = graphs.smooth_powers(sp.csr_matrix(model_input, dtype=np.float32), a_hat, (config.t0, config.t1),
                                    device=graph_device)
    return TrainInputs(x0=smoothed[config.t0], x1=smoothed[config.t1], adj=adj, a_hat=a_hat, gene_prop=gene_prop)


@dataclass
class TrainResult:
    """What `fit` returns.

    state: CPU state dict of `ScRCL`, plus for the gcn-pca embedding the two PCA bases
    (`embed_fused_mean` (H,), `embed_fused_components` (H, D) of the GCN view, `embed_cell_*` of
    the MLP view); losses: (epochs, 4) float64 columns total, eda, nca, cvc;
    fused: concat(z1, z2) of the training cells in eval mode, (N, 2*O); z1: (N, O);
    embedding: the clustering embedding (N, D) (`config.embedding`; `fused` itself for "fused");
    cell_embedding: the per-cell (MLP view) counterpart, (N, D) (`z1` for "fused");
    gene_emb: frozen gene embedding E, (G, O); seconds: wall time of the epochs.
    """

    state: dict[str, torch.Tensor]
    losses: np.ndarray
    fused: np.ndarray
    z1: np.ndarray
    embedding: np.ndarray
    cell_embedding: np.ndarray
    gene_emb: np.ndarray
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


def estimate_full_batch_bytes(n: int, g: int, h: int) -> int:
    """Rough peak bytes of one full-batch step: inputs, N x G projector outputs and N x H
    activations with their gradients and Adam state (counted from the tensors the step keeps)."""
    return int(4 * n * (6 * g + 16 * h) + 4 * 4 * (4 * g * h + 2 * h * h + 16 * n))


def free_memory_bytes(device: torch.device) -> int:
    """Free memory of `device`: CUDA free memory, or available RAM on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        import os

        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def choose_batch_size(n: int, g: int, h: int, device: torch.device, requested: int | None) -> int | None:
    """Mini-batch size to use: `requested`, or one that fits when full batch would not (None = full batch)."""
    if requested is not None:
        return None if requested >= n else requested
    free = free_memory_bytes(device)
    need = estimate_full_batch_bytes(n, g, h)
    if need <= 0.7 * free:
        return None
    b = n
    while b > 1024 and estimate_full_batch_bytes(b, g, h) > 0.25 * free:
        b //= 2
    log.info("full-batch training needs about %.1f GiB of %.1f GiB free on %s: mini-batches of %d cells",
             need / 2**30, free / 2**30, device, b)
    return b


def fit(
    inputs: TrainInputs,
    config: TrainConfig,
    *,
    device: torch.device,
    on_epoch: Callable[[int, LossTerms], None] | None = None,
    batch_size: int | None = None,
) -> TrainResult:
    """Train scRCL with Adam (coupled L2 weight decay) for `config.epochs` epochs.

    Full batch unless `batch_size` (or the memory estimate) asks for mini-batches, see
    `_fit_minibatch`. The last epoch is the result: there is no selection against anything.
    """
    n, g = inputs.x0.shape
    if n < 2:
        raise ValueError("scRCL needs at least 2 cells")
    b = choose_batch_size(n, g, config.hidden_dim, device, batch_size)
    if b is not None:
        return _fit_minibatch(inputs, config, device=device, batch_size=b, on_epoch=on_epoch)
    model, gen, x0, x1, gene_prop, opt, log_t = _setup(inputs, config, device)
    a_hat = to_torch_sparse(inputs.a_hat, device)
    adj = to_torch_sparse(inputs.adj, device)
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
    return _finish(model, x0, x1, a_hat, gene_prop, log_t, t_start, device, config)


def _setup(inputs: TrainInputs, config: TrainConfig, device: torch.device) -> tuple[Any, ...]:
    """Model, dropout generator, inputs on the device, gene graph, optimiser and loss log."""
    n, g = inputs.x0.shape
    model = ScRCL(g, n, config.hidden_dim, config.out_dim, config.dropout, config.seed).to(device)
    gen = torch.Generator(device=device).manual_seed(config.seed + 1)
    x0 = torch.from_numpy(inputs.x0).to(device)
    x1 = x0 if config.t0 == config.t1 else torch.from_numpy(inputs.x1).to(device)
    gene_prop = to_torch_sparse(inputs.gene_prop, device)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    # The loss log stays on the device; one copy to the host after the loop.
    log_t = torch.zeros(config.epochs, 4, dtype=torch.float64, device=device)
    return model, gen, x0, x1, gene_prop, opt, log_t


def _finish(model: ScRCL, x0: Tensor, x1: Tensor, a_hat: Tensor, gene_prop: Tensor, log_t: Tensor, t_start: float,
            device: torch.device, config: TrainConfig, extra: dict[str, Any] | None = None) -> TrainResult:
    """Eval-mode embeddings of every cell on the whole graph, and the result record."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t_start
    model.eval()
    with torch.no_grad():
        out = model(x0, x1, a_hat, gene_prop)
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        fused, z1 = out.fused.cpu().numpy(), out.z1.cpu().numpy()
        if config.embedding == "gcn-pca":
            views = {}
            for view, h in (("fused", out.h2), ("cell", out.h1)):
                mean, comps = hidden_pca_basis(h, EMBED_DIM)
                state[f"embed_{view}_mean"], state[f"embed_{view}_components"] = mean.cpu(), comps.cpu()
                # In row blocks: a normalised copy of a whole (N, H) view would not fit beside the
                # model on a GPU at a million cells.
                views[view] = np.concatenate([embed_hidden(h[i:i + 65_536], mean, comps).cpu().numpy()
                                              for i in range(0, h.shape[0], 65_536)])
            embedding, cell_embedding = views["fused"], views["cell"]
        elif config.embedding == "fused":
            embedding, cell_embedding = fused, z1
        else:
            raise ValueError(f"unknown embedding {config.embedding!r}; one of {EMBEDDINGS}")
    losses = log_t.cpu().numpy()
    if not np.all(np.isfinite(losses)):
        log.warning("the loss became non-finite during training; try a lower --lr")
    return TrainResult(
        state=state,
        losses=losses,
        fused=fused,
        z1=z1,
        embedding=embedding,
        cell_embedding=cell_embedding,
        gene_emb=out.gene_emb.cpu().numpy(),
        seconds=seconds,
        extra=extra or {},
    )


def _edges(adj: sp.csr_matrix, device: torch.device) -> tuple[Tensor, Tensor]:
    coo = adj.tocoo()
    return (torch.from_numpy(coo.row.astype(np.int64)).to(device), torch.from_numpy(coo.col.astype(np.int64)).to(device))


def induced_subgraph(row: Tensor, col: Tensor, nodes: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Binary adjacency and its GCN normalisation restricted to `nodes` (B,), on the device.

    row, col: the (E,) edge lists of the full binary adjacency. Returns two sparse (B, B) tensors:
    A_b (no self loops) and D_b^-1/2 (A_b + I) D_b^-1/2 with the degrees of the subgraph.
    """
    b = nodes.shape[0]
    pos = torch.full((n,), -1, dtype=torch.int64, device=nodes.device)
    pos[nodes] = torch.arange(b, device=nodes.device)
    r, c = pos[row], pos[col]
    keep = (r >= 0) & (c >= 0)
    r, c = r[keep], c[keep]
    ones = torch.ones(r.shape[0], device=nodes.device)
    adj_b = torch.sparse_coo_tensor(torch.stack([r, c]), ones, (b, b), check_invariants=False).coalesce()
    deg = torch.bincount(r, minlength=b).float() + 1.0
    dinv = deg.rsqrt()
    loops = torch.arange(b, device=nodes.device)
    idx = torch.cat([torch.stack([r, c]), torch.stack([loops, loops])], 1)
    val = torch.cat([dinv[r] * dinv[c], dinv * dinv])
    a_hat_b = torch.sparse_coo_tensor(idx, val, (b, b), check_invariants=False).coalesce()
    return adj_b, a_hat_b


def _sample_batches(indptr: Tensor, indices: Tensor, n: int, batch_size: int, avg_deg: float,
                    gen: torch.Generator) -> list[Tensor]:
    """Batches of random seed cells plus their graph neighbours, about `batch_size` cells each:
    one pass over the cells in a random order, about N / batch_size batches."""
    n_batches = max(1, round(n / batch_size))
    n_seeds = max(1, int(batch_size / (1.0 + avg_deg)))
    perm = torch.randperm(n, generator=gen, device=indptr.device)
    out = []
    for i in range(n_batches):
        seeds = perm[(i * n_seeds) % n: (i * n_seeds) % n + n_seeds]
        starts, lens = indptr[seeds], indptr[seeds + 1] - indptr[seeds]
        offs = torch.repeat_interleave(starts - (torch.cumsum(lens, 0) - lens), lens)
        nbrs = indices[offs + torch.arange(int(lens.sum()), device=indptr.device)]
        nodes = torch.unique(torch.cat([seeds, nbrs]))
        out.append(nodes[:batch_size] if nodes.shape[0] > batch_size else nodes)
    return out


def _fit_minibatch(
    inputs: TrainInputs,
    config: TrainConfig,
    *,
    device: torch.device,
    batch_size: int,
    on_epoch: Callable[[int, LossTerms], None] | None,
) -> TrainResult:
    """Mini-batch scRCL: each step trains on a batch of seed cells and their neighbours.

    `config.epochs` counts optimiser steps, as in full batch, where an epoch is one step: a
    mini-batch step is one batch, so a cell is seen about epochs * B / N times. Taking N / B
    steps per epoch instead over-trained: pbmc_10x_4k, H 256, 100 epochs, batches of 1,024,
    seed 0: ARI 0.457 against 0.766 full batch, and 0.769 with this rule (docs/benchmarks.md §3).

    Batch approximations (README, "Mini-batch training"): the GCN view and both graph losses use
    the subgraph induced by the batch, normalised with its own degrees; the EDA global softmax and
    the NCA negatives run over the batch's cells; CVC averages over the batch's pairs; the gene
    encoder's X0^T W is estimated from the batch scaled by N / B. The final embedding is computed
    on the whole graph.
    """
    n = inputs.x0.shape[0]
    model, gen, x0, x1, gene_prop, opt, log_t = _setup(inputs, config, device)
    row, col = _edges(inputs.adj, device)
    csr = inputs.adj.tocsr()
    indptr = torch.from_numpy(csr.indptr.astype(np.int64)).to(device)
    indices = torch.from_numpy(csr.indices.astype(np.int64)).to(device)
    avg_deg = csr.nnz / max(n, 1)
    log.info("mini-batch training: %d steps on batches of about %d cells (each cell seen about %.1f times)",
             config.epochs, batch_size, config.epochs * batch_size / n)
    t_start = time.perf_counter()
    model.train()
    batches: list[Tensor] = []
    for step in range(config.epochs):
        if not batches:  # one pass over the cells in a fresh random order, consumed a batch per step
            batches = _sample_batches(indptr, indices, n, batch_size, avg_deg, gen)[::-1]
        nodes = batches.pop()
        adj_b, a_hat_b = induced_subgraph(row, col, nodes, n)
        opt.zero_grad(set_to_none=True)
        out = model(x0[nodes], x1[nodes], a_hat_b, gene_prop, gen, cells=nodes)
        terms = scrcl_loss(out.h1, out.h2, out.z1, out.z2, adj_b, temperature=config.temperature,
                           lambda1=config.lambda1, lambda2=config.lambda2)
        terms.total.backward()
        opt.step()
        log_t[step] = torch.stack([terms.total, terms.eda, terms.nca, terms.cvc]).detach().double()
        if on_epoch is not None:
            on_epoch(step, terms)
    return _finish(model, x0, x1, to_torch_sparse(inputs.a_hat, device), gene_prop, log_t, t_start, device, config,
                   extra={"batch_size": batch_size})
