"""Full-batch scRCL training without any label, in linear memory.

`build_inputs` turns preprocessed arrays into the graphs and smoothed inputs; `fit` runs Adam
for a fixed number of epochs and returns the trained weights, the loss log and the embedding.
Nothing here reads labels, clusters during training or writes files.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from . import graphs
from ._utils import human_bytes
from .config import EMBED_DIM, EMBEDDINGS, TrainConfig
from .errors import ScrclError
from .losses import LossTerms, scrcl_loss
from .model import ScRCL, embed_hidden, hidden_pca_basis, to_torch_sparse

if TYPE_CHECKING:
    from .distributed import DistEnv

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainInputs:
    """Arrays for `fit`.

    x0, x1: Â^t0 X and Â^t1 X, float32 (N, G); adj: binary cell adjacency CSR (N, N), no self
    loops; a_hat: its GCN normalisation CSR (N, N); gene_prop: gene-graph propagation CSR (G, G);
    model_gram: X^T X of the unsmoothed model input X, float64 (G, G), which the gene graph needed
    and the K-given cut's scaled PCA reuses (`clustering.cluster_embedding`); None when not kept.
    x_hop: Â^(t1+1) X, float32 (N, G), out of core only: the GCN view's first aggregation folded
    into the inputs, so the whole-graph pass after training (`embed_streamed`) needs one (N, H)
    array on the device instead of several; None in memory.
    """

    x0: np.ndarray
    x1: np.ndarray
    adj: sp.csr_matrix
    a_hat: sp.csr_matrix
    gene_prop: sp.csr_matrix
    model_gram: np.ndarray | None = None
    x_hop: np.ndarray | None = None


def build_inputs(
    model_input: sp.csr_matrix,
    lognorm: sp.csr_matrix,
    config: TrainConfig,
    *,
    graph_device: Any = None,
    progress: Callable[[int, int], None] | None = None,
    adj: sp.csr_matrix | None = None,
    scratch_dir: Any = None,
) -> TrainInputs:
    """Cell graph on `lognorm` (unless `adj` is given, e.g. a spatial graph), gene graph on the
    unsmoothed `model_input`, then smoothing.

    graph_device: a CUDA `torch.device` for the graph algebra (Gram matrices, exact kNN search,
    smoothing), or None for numpy/scipy. The Gram matrix X^T X is computed once when the model
    input is the log-normalised matrix (the default), as the PCA and the gene graph both need it.
    scratch_dir: out of core, a directory for the smoothed inputs as memory-mapped files
    (`graphs.smooth_powers`); `scratch_inputs` makes and removes one.
    """
    shared = model_input is lognorm
    gram = graphs.gram_matrix(lognorm, device=graph_device) if shared else None
    if adj is None:
        adj = graphs.cell_graph(lognorm, config.n_neighbors, device=graph_device, progress=progress, gram=gram)
    a_hat = graphs.gcn_norm(adj)
    model_gram = gram if shared else graphs.gram_matrix(model_input, device=graph_device)
    gene_prop = graphs.gene_graph(model_input, config.gene_neighbors, gram=model_gram)
    powers = scratch_powers(config) if scratch_dir is not None else (config.t0, config.t1)
    if scratch_dir is not None:
        check_scratch_space(scratch_dir, model_input.shape, powers)
    smoothed = graphs.smooth_powers(
        sp.csr_matrix(model_input, dtype=np.float32), a_hat, powers, device=graph_device, out_dir=scratch_dir
    )
    return TrainInputs(
        x0=smoothed[config.t0],
        x1=smoothed[config.t1],
        adj=adj,
        a_hat=a_hat,
        gene_prop=gene_prop,
        model_gram=model_gram,
        x_hop=smoothed[config.t1 + 1] if scratch_dir is not None else None,
    )


def scratch_powers(config: TrainConfig) -> tuple[int, ...]:
    """Powers t of Â^t X that out-of-core training keeps on disk: t0, t1 and t1 + 1 (`TrainInputs.x_hop`)."""
    return tuple(sorted({config.t0, config.t1, config.t1 + 1}))


def scratch_bytes(n_cells: int, n_genes: int, powers: tuple[int, ...]) -> int:
    """Disk bytes of the out-of-core smoothed inputs: one float32 (N, G) file per distinct power."""
    return 4 * n_cells * n_genes * len(set(powers))


def check_scratch_space(directory: Any, shape: tuple[int, int], powers: tuple[int, ...], *, processes: int = 1) -> None:
    """Refuse, before any smoothing, out-of-core inputs that would not fit on the scratch disk.

    A full disk half way through writing would fail late, after the graphs. processes: how many
    training processes each keep their own copy there (torchrun: every process writes beside the
    same output path).
    """
    import shutil

    need = processes * scratch_bytes(shape[0], shape[1], powers)
    free = shutil.disk_usage(directory).free
    if need > free:
        copies = f", for each of {processes} processes" if processes > 1 else ""
        raise ScrclError(
            f"--out-of-core needs {human_bytes(need)} of disk beside the output for the smoothed inputs "
            f"({len(set(powers))} float32 arrays of {shape[0]} cells x {shape[1]} genes{copies}) and "
            f"{human_bytes(free)} are free there, {human_bytes(need - free)} short",
            "Write the output (-o) to a larger local disk, or lower --n-top-genes",
        )


@contextlib.contextmanager
def scratch_inputs(near: Any) -> Iterator[Path]:
    """A temporary directory beside `near` (the output path) for out-of-core smoothed inputs,
    removed on exit, also after an error. Local disk next to the output, not /tmp, which is often
    a small RAM disk. Named as the output's temporaries are (`io.output.temporary_name`), so the
    next run with that output removes what a killed run left (hundreds of GB at atlas scale)."""
    import shutil

    from .io.output import temporary_name

    near = Path(near).resolve()
    near.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(near)
    tmp.mkdir(mode=0o700)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def is_out_of_core(inputs: TrainInputs) -> bool:
    """True when the smoothed inputs are memory-mapped files (`build_inputs(scratch_dir=...)`)."""
    return isinstance(inputs.x0, np.memmap)


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


def check_fits(
    config: TrainConfig,
    n_cells: int,
    n_genes: int,
    *,
    batch_size: int | None = None,
    out_of_core: Any = None,
    processes: int = 1,
) -> None:
    """Refuse, before any work, a run whose host memory or scratch disk need exceeds what is free.

    Counted: what mini-batches cannot shrink (parameters of both views with their gradients and
    Adam state, 8 x (G, H) float32 each, and the two dense smoothed inputs, 2 x (N, G)), plus
    one step on the smallest batch the run could use. `out_of_core` (the output path): the
    smoothed inputs go to disk beside it instead (`check_scratch_space`, one copy per process of
    a torchrun launch), not into memory. The message states the estimate.
    """
    g = max(1, min(int(config.n_top_genes), n_genes))
    h = int(config.hidden_dim)
    fixed = 4 * (2 * 4 * g * h) + (0 if out_of_core is not None else 4 * 2 * n_cells * g)
    step = estimate_full_batch_bytes(min(n_cells, batch_size or 1024), g, h)
    need = fixed + step
    free = free_memory_bytes(torch.device("cpu"))
    if need > free:
        raise ScrclError(
            f"training {n_cells} cells x {g} genes with --hidden-dim {h} needs about {need / 2**30:.1f} GiB of memory "
            f"and {free / 2**30:.1f} GiB are available",
            "Lower --hidden-dim or --n-top-genes, or use a machine with more memory",
        )
    if out_of_core is not None:
        where = Path(out_of_core).resolve().parent
        while not where.exists() and where != where.parent:  # the output's folder may not exist yet
            where = where.parent
        check_scratch_space(where, (n_cells, g), scratch_powers(config), processes=processes)


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
    log.info(
        "full-batch training needs about %.1f GiB of %.1f GiB free on %s: mini-batches of %d cells",
        need / 2**30,
        free / 2**30,
        device,
        b,
    )
    return b


# What each `TrainConfig.matmul_precision` sets for float32 products on CUDA and in oneDNN (CPU),
# in torch's per-backend terms; the same as torch.set_float32_matmul_precision of that name.
_BACKEND_PRECISION = {"highest": ("ieee", "ieee"), "high": ("tf32", "tf32"), "medium": ("tf32", "bf16")}


@contextlib.contextmanager
def matmul_precision(precision: str) -> Iterator[None]:
    """Float32 matrix products at `precision` inside the block, the process's setting restored after.

    "highest" is exact float32; "high" lets NVIDIA tensor cores use TF32; "medium" is TF32 on
    CUDA as well, and bfloat16 in oneDNN on CPUs that have it (`_BACKEND_PRECISION`). Training
    sets its own precision whatever the caller's, so the model's config records what ran. Uses
    torch's per-backend switches where they exist (torch >= 2.9), which a caller may have set
    directly, and `torch.set_float32_matmul_precision` on older torch.
    """
    # mkldnn.matmul exists from torch 2.9 on and is not in torch's type stubs.
    backends: tuple[Any, ...] = (torch.backends.cuda.matmul, getattr(torch.backends.mkldnn, "matmul", None))
    get: Callable[[], Any]
    put: Callable[[Any], None]
    if all(hasattr(b, "fp32_precision") for b in backends):
        wanted: Any = _BACKEND_PRECISION[precision]

        def get() -> Any:
            return tuple(b.fp32_precision for b in backends)

        def put(values: Any) -> None:
            for b, value in zip(backends, values):
                b.fp32_precision = value
    else:
        wanted, get, put = precision, torch.get_float32_matmul_precision, torch.set_float32_matmul_precision
    if precision != "highest":
        log.info("float32 matrix products at precision %r while training (%s)", precision, wanted)
    before = get()
    put(wanted)
    try:
        yield
    finally:
        put(before)


def fit(
    inputs: TrainInputs,
    config: TrainConfig,
    *,
    device: torch.device,
    on_epoch: Callable[[int, LossTerms], None] | None = None,
    batch_size: int | None = None,
    minibatch_lr_power: float | None = None,
) -> TrainResult:
    """Train scRCL with Adam (coupled L2 weight decay) for `config.epochs` epochs.

    Full batch unless `batch_size` (or the memory estimate) asks for mini-batches, see
    `_fit_minibatch` (minibatch_lr_power: its learning-rate rule, for benchmarks). The last
    epoch is the result: there is no selection against anything. Matrix products run at
    `config.matmul_precision` (`matmul_precision`), the whole-graph pass after training included.
    """
    n, g = inputs.x0.shape
    if n < 2:
        raise ValueError("scRCL needs at least 2 cells")
    b = choose_batch_size(n, g, config.hidden_dim, device, batch_size)
    with matmul_precision(config.matmul_precision):
        if b is not None:
            return _fit_minibatch(inputs, config, device=device, batch_size=b, on_epoch=on_epoch, lr_power=minibatch_lr_power)
        return _fit_full_batch(inputs, config, device, on_epoch)


def _fit_full_batch(
    inputs: TrainInputs, config: TrainConfig, device: torch.device, on_epoch: Callable[[int, LossTerms], None] | None
) -> TrainResult:
    """Full-batch training: every epoch one step on all cells and the whole graph."""
    model, gen, x0, x1, gene_prop, opt, log_t = _setup(inputs, config, device)
    a_hat = to_torch_sparse(inputs.a_hat, device)
    adj = to_torch_sparse(inputs.adj, device)
    t_start = time.perf_counter()
    model.train()
    for epoch in range(config.epochs):
        opt.zero_grad(set_to_none=True)
        out = model(x0, x1, a_hat, gene_prop, gen)
        terms = _loss(out, adj, config)
        terms.total.backward()
        opt.step()
        log_t[epoch] = torch.stack([terms.total, terms.eda, terms.nca, terms.cvc]).detach().double()
        if on_epoch is not None:
            on_epoch(epoch, terms)
    return _finish(model, inputs, x0, x1, gene_prop, log_t, t_start, device, config, a_hat=a_hat)


def _loss(out: Any, adj: Tensor, config: TrainConfig) -> LossTerms:
    """The three alignment losses of one forward pass (`model.ScRCLOutput`) with the config's weights."""
    return scrcl_loss(
        out.h1, out.h2, out.z1, out.z2, adj, temperature=config.temperature, lambda1=config.lambda1, lambda2=config.lambda2
    )


def _rows(x: Tensor, nodes: Tensor, device: torch.device) -> Tensor:
    """Rows `nodes` of x on `device`; x and nodes may be on the host (streamed, out of core)."""
    rows = x[nodes.to(x.device)]
    return rows if rows.device == device else rows.to(device, non_blocking=True)


def _setup(inputs: TrainInputs, config: TrainConfig, device: torch.device, *, stream: bool = False) -> tuple[Any, ...]:
    """Model, dropout generator, inputs on the device, gene graph, optimiser and loss log.

    stream: leave the smoothed inputs where they are (host memory or memory-mapped files), for
    mini-batches to gather their rows from (`_rows`), instead of copying them to the device.
    """
    n, g = inputs.x0.shape
    model = ScRCL(g, n, config.hidden_dim, config.out_dim, config.dropout, config.seed).to(device)
    gen = torch.Generator(device=device).manual_seed(config.seed + 1)
    place = (lambda a: torch.from_numpy(a)) if stream else (lambda a: torch.from_numpy(a).to(device))
    x0 = place(inputs.x0)
    x1 = x0 if config.t0 == config.t1 else place(inputs.x1)
    gene_prop = to_torch_sparse(inputs.gene_prop, device)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    # The loss log stays on the device; one copy to the host after the loop.
    log_t = torch.zeros(config.epochs, 4, dtype=torch.float64, device=device)
    return model, gen, x0, x1, gene_prop, opt, log_t


@dataclass
class WholeGraph:
    """Eval-mode outputs of every training cell on the whole graph (`_finish`).

    fused: concat(z1, z2) (N, 2*O); z1: (N, O); embedding, cell_embedding: the clustering
    embeddings of the GCN and MLP views (N, D) (`config.embedding`); gene_emb: E (G, O);
    bases: for the gcn-pca embedding, the PCA bases to store with the weights (name -> tensor).
    """

    fused: np.ndarray
    z1: np.ndarray
    embedding: np.ndarray
    cell_embedding: np.ndarray
    gene_emb: np.ndarray
    bases: dict[str, Tensor]


def _whole_graph_in_memory(out: Any, embedding: str, block: int = 65_536) -> WholeGraph:
    """`WholeGraph` from one forward pass over every cell (`model.ScRCLOutput`)."""
    fused, z1 = out.fused.cpu().numpy(), out.z1.cpu().numpy()
    bases: dict[str, Tensor] = {}
    if embedding == "gcn-pca":
        views = {}
        for view, h in (("fused", out.h2), ("cell", out.h1)):
            mean, comps = hidden_pca_basis(h, EMBED_DIM)
            bases[f"embed_{view}_mean"], bases[f"embed_{view}_components"] = mean.cpu(), comps.cpu()
            # In row blocks: a normalised copy of a whole (N, H) view would not fit beside the
            # model on a GPU at a million cells.
            views[view] = np.concatenate(
                [embed_hidden(h[i : i + block], mean, comps).cpu().numpy() for i in range(0, h.shape[0], block)]
            )
        emb, cell_emb = views["fused"], views["cell"]
    elif embedding == "fused":
        emb, cell_emb = fused, z1
    else:
        raise ValueError(f"unknown embedding {embedding!r}; one of {EMBEDDINGS}")
    return WholeGraph(fused, z1, emb, cell_emb, out.gene_emb.cpu().numpy(), bases)


def embed_streamed(
    model: ScRCL,
    x0: Tensor,
    x_hop: Tensor,
    a_hat: sp.csr_matrix,
    gene_prop: Tensor,
    device: torch.device,
    embedding: str,
    block: int = 65_536,
) -> WholeGraph:
    """`WholeGraph` of an eval-mode model with x0 and x_hop (N, G) read a row block at a time.

    x0: Â^t0 X; x_hop: Â^(t1+1) X (`TrainInputs.x_hop`), so that the GCN view's first layer,
    LeakyReLU(Â (Â^t1 X) W1ᵀ + b1), is per cell; both may stay on the host (memory-mapped).
    a_hat: the normalised adjacency CSR (N, N), sent to the device a row block at a time.
    The one (N, H) array held whole on `device` is S = h W2ᵀ of the GCN view's first layer; the
    PCA bases come from moments summed over blocks (`model.HiddenMoments`), and the blocks are
    recomputed for the second pass instead of kept. Equal to `_whole_graph_in_memory` of the
    one-call forward to float32 rounding (sums run in another order). x0 is read twice.
    """
    from .model import HiddenMoments, gcn_activation, gcn_head

    n, width = x0.shape[0], model.mlp_w.shape[0]
    pca = embedding == "gcn-pca"
    if not pca and embedding != "fused":
        raise ValueError(f"unknown embedding {embedding!r}; one of {EMBEDDINGS}")
    spans = [(s, min(n, s + block)) for s in range(0, n, block)]

    def mlp_block(s: int, e: int) -> Tensor:
        return model.mlp_view(_rows(x0, torch.arange(s, e), device))

    def gcn_block(s: int, e: int, hidden: Tensor) -> Tensor:
        a = graphs.torch_csr(a_hat[s:e], device)
        return gcn_head(gcn_activation(a @ hidden, model.gcn2_b), model.fc_w, model.fc_b)

    pre = torch.zeros(x0.shape[1], model.gene_w.shape[0], device=device)  # X0^T W_gene, (G, O)
    m_cell = HiddenMoments(width, device)
    for s, e in spans:
        b0 = _rows(x0, torch.arange(s, e), device)
        pre += b0.T @ model.gene_w[:, s:e].T
        if pca:
            m_cell.add(model.mlp_view(b0))
    gene_emb = torch.nn.functional.relu(torch.sparse.mm(gene_prop, pre) + model.gene_b)
    hidden = torch.empty(n, width, device=device)
    for s, e in spans:
        first = gcn_activation(_rows(x_hop, torch.arange(s, e), device) @ model.gcn1_w.T, model.gcn1_b)
        hidden[s:e] = first @ model.gcn2_w.T
    z1 = np.empty((n, gene_emb.shape[1]), dtype=np.float32)
    z2 = np.empty_like(z1)
    m_fused = HiddenMoments(width, device)
    for s, e in spans:
        h2 = gcn_block(s, e, hidden)
        z2[s:e] = model.refine(h2, gene_emb).cpu().numpy()
        if pca:
            m_fused.add(h2)
    bases: dict[str, Tensor] = {}
    if pca:
        basis_cell, basis_fused = m_cell.basis(EMBED_DIM), m_fused.basis(EMBED_DIM)
        for view, (mean, comps) in (("fused", basis_fused), ("cell", basis_cell)):
            bases[f"embed_{view}_mean"], bases[f"embed_{view}_components"] = mean.cpu(), comps.cpu()
        emb = np.empty((n, basis_fused[1].shape[1]), dtype=np.float32)
        cell_emb = np.empty((n, basis_cell[1].shape[1]), dtype=np.float32)
    for s, e in spans:
        h1 = mlp_block(s, e)
        z1[s:e] = model.refine(h1, gene_emb).cpu().numpy()
        if pca:
            cell_emb[s:e] = embed_hidden(h1, *basis_cell).cpu().numpy()
            emb[s:e] = embed_hidden(gcn_block(s, e, hidden), *basis_fused).cpu().numpy()
    del hidden
    fused = np.concatenate([z1, z2], axis=1)
    if not pca:
        emb, cell_emb = fused, z1
    return WholeGraph(fused, z1, emb, cell_emb, gene_emb.cpu().numpy(), bases)


def _finish(
    model: ScRCL,
    inputs: TrainInputs,
    x0: Tensor,
    x1: Tensor,
    gene_prop: Tensor,
    log_t: Tensor,
    t_start: float,
    device: torch.device,
    config: TrainConfig,
    extra: dict[str, Any] | None = None,
    a_hat: Tensor | None = None,
) -> TrainResult:
    """Eval-mode embeddings of every cell on the whole graph, and the result record.

    Out of core (`inputs.x_hop` set), `embed_streamed`; otherwise one forward pass over every
    cell with `a_hat` (the normalised adjacency on the device, made here when None).
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t_start
    model.eval()
    with torch.no_grad():
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        if inputs.x_hop is not None:
            whole = embed_streamed(model, x0, torch.from_numpy(inputs.x_hop), inputs.a_hat, gene_prop, device, config.embedding)
        else:
            a_t = a_hat if a_hat is not None else to_torch_sparse(inputs.a_hat, device)
            whole = _whole_graph_in_memory(model(x0, x1, a_t, gene_prop), config.embedding)
        state.update(whole.bases)
    losses = log_t.cpu().numpy()
    if not np.all(np.isfinite(losses)):
        log.warning("the loss became non-finite during training; try a lower --lr")
    return TrainResult(
        state=state,
        losses=losses,
        fused=whole.fused,
        z1=whole.z1,
        embedding=whole.embedding,
        cell_embedding=whole.cell_embedding,
        gene_emb=whole.gene_emb,
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


def inclusion_probability(in_degree: np.ndarray, n: int, n_seeds: int) -> np.ndarray:
    """Probability that each cell is in one batch of `_batch_nodes` (float64 (N,)).

    in_degree: (N,) number of cells listing each cell as a neighbour. A batch is a uniform random
    set of `n_seeds` seed cells plus their neighbours, so cell i is in it unless none of the
    1 + in_degree[i] cells that would bring it is a seed (hypergeometric):
    1 - C(N - m, s) / C(N, s) with m = 1 + in_degree[i], s = n_seeds.
    """
    from scipy.special import gammaln

    m = 1.0 + np.asarray(in_degree, dtype=np.float64)
    s = float(min(n_seeds, n))
    absent = np.zeros_like(m)
    ok = n - m >= s
    mm = m[ok]
    absent[ok] = np.exp(gammaln(n - mm + 1) - gammaln(n - mm - s + 1) - gammaln(n + 1) + gammaln(n - s + 1))
    return 1.0 - absent


def _batch_nodes(indptr: Tensor, indices: Tensor, seeds: Tensor) -> Tensor:
    """Sorted union of `seeds` (S,) and their graph neighbours (CSR rows of the adjacency)."""
    starts, lens = indptr[seeds], indptr[seeds + 1] - indptr[seeds]
    offs = torch.repeat_interleave(starts - (torch.cumsum(lens, 0) - lens), lens)
    nbrs = indices[offs + torch.arange(int(lens.sum()), device=indptr.device)]
    return torch.unique(torch.cat([seeds, nbrs]))


def _seed_chunks(n: int, n_seeds: int, gen: torch.Generator, device: torch.device) -> Iterator[Tensor]:
    """Endless consecutive chunks of `n_seeds` cells from successive random permutations: each
    chunk is a uniform random subset (what `inclusion_probability` assumes), and within one
    permutation no cell is a seed twice."""
    while True:
        perm = torch.randperm(n, generator=gen, device=device)
        for i in range(0, n - n_seeds + 1, n_seeds):
            yield perm[i : i + n_seeds]


def shard_seed_chunks(
    n: int, n_seeds: int, world_size: int, rank: int, gen: torch.Generator, device: torch.device
) -> Iterator[Tensor]:
    """This process's seeds (n_seeds,) for each step of a distributed run.

    Every process draws the same permutations from `gen` (a CPU generator seeded alike on every
    process) and cuts the same chunks of world_size * n_seeds cells, one per step; process `rank`
    takes the rank-th slice. The step's seeds are the union of the slices, which are disjoint, and
    each slice is a uniform random set of n_seeds cells, as `inclusion_probability` assumes.
    """
    for chunk in _seed_chunks(n, n_seeds * world_size, gen, torch.device("cpu")):
        yield chunk[rank * n_seeds : (rank + 1) * n_seeds].to(device)


def distributed_seeds(seed: int, rank: int) -> tuple[int, int]:
    """(seed-permutation seed, dropout seed) of process `rank` in a distributed run.

    The permutation seed is the same on every process (they must agree on the step's seed cells);
    the dropout seed differs per process, so the processes' dropout masks are independent.
    """
    perm = np.random.SeedSequence([seed, 1]).generate_state(1, np.uint64)[0]
    drop = np.random.SeedSequence([seed, 2, rank]).generate_state(1, np.uint64)[0]
    return int(perm >> np.uint64(1)), int(drop >> np.uint64(1))


# Mini-batch learning rate: lr * (B / N) ** MINIBATCH_LR_POWER, B the mean batch size. With an epoch
# of N / B steps, Adam moves the weights about lr per step whatever the gradient's scale, so 1.0
# keeps the full-batch distance per epoch (`python -m benchmarks minibatch --lr-powers 0,0.5,1` compares
# the three; docs/benchmarks.md, "Mini-batch and out-of-core training").
MINIBATCH_LR_POWER = 1.0


@dataclass(frozen=True)
class MinibatchPlan:
    """How a mini-batch run steps through the cells (`minibatch_plan`).

    n_seeds: seed cells per process per step; pi: (N,) float64 probability that a cell is in one
    process's batch; expected: E[B] of one process's batch; steps: steps per epoch; lr: the
    scaled learning rate.
    """

    n_seeds: int
    pi: np.ndarray
    expected: float
    steps: int
    lr: float


def minibatch_plan(
    adj: sp.csr_matrix, batch_size: int, lr: float, *, lr_power: float | None = None, world_size: int = 1
) -> MinibatchPlan:
    """Seeds, steps per epoch and learning rate for batches of about `batch_size` cells per process.

    adj: the binary cell adjacency (N, N). A process's batch is its seeds plus their neighbours,
    so n_seeds = batch_size / (1 + mean degree), at most N / world_size so that one step's seeds
    are distinct. A step sees world_size * E[B] cells, so an epoch (one pass over the cells) is
    round(N / (world_size * E[B])) steps, and the learning rate is
    lr * min(1, world_size * E[B] / N) ** lr_power; one process (world_size 1) is the usual rule.
    """
    n = adj.shape[0]
    avg_deg = adj.nnz / max(n, 1)
    n_seeds = int(min(n // world_size, max(1, round(batch_size / (1.0 + avg_deg)))))
    pi = inclusion_probability(adj.getnnz(axis=0), n, n_seeds)
    expected = float(pi.sum())
    seen = world_size * expected
    power = MINIBATCH_LR_POWER if lr_power is None else float(lr_power)
    return MinibatchPlan(
        n_seeds=n_seeds,
        pi=pi,
        expected=expected,
        steps=max(1, round(n / seen)),
        lr=lr * min(1.0, seen / n) ** power,
    )


def _fit_minibatch(
    inputs: TrainInputs,
    config: TrainConfig,
    *,
    device: torch.device,
    batch_size: int,
    on_epoch: Callable[[int, LossTerms], None] | None,
    lr_power: float | None = None,
) -> TrainResult:
    """Mini-batch scRCL: each step trains on a batch of seed cells and their neighbours.

    `config.epochs` counts passes over the data, as in full batch: an epoch is
    round(N / E[B]) steps, E[B] the expected batch size, so each cell is seen on average
    `config.epochs` times, as in a full-batch run. The learning rate is scaled by
    (E[B] / N) ** lr_power (`MINIBATCH_LR_POWER` unless given); `minibatch_plan` has the rule.

    Batch approximations (README, "Mini-batch training"): the GCN view and both graph losses use
    the subgraph induced by the batch, normalised with its own degrees; the EDA global softmax and
    the NCA negatives run over the batch's cells; CVC averages over the batch's pairs. The gene
    encoder's pre-activation X0^T W (G, O) is estimated from the batch by Horvitz-Thompson
    weighting, sum over batch cells of x_i w_i / pi_i with pi_i = `inclusion_probability`, which
    is unbiased for any batch composition (the ReLU after it is applied to the estimate). The
    final embedding is computed on the whole graph. The loss log holds each epoch's mean step.
    """
    run = MinibatchRun(inputs, config, device, batch_size, lr_power, None)
    run.train(on_epoch)
    return run.finish()


def fit_distributed(
    inputs: TrainInputs,
    config: TrainConfig,
    *,
    device: torch.device,
    dist: DistEnv,
    batch_size: int | None = None,
    on_epoch: Callable[[int, LossTerms], None] | None = None,
) -> TrainResult | None:
    """Mini-batch training with torch's DistributedDataParallel, one process per device.

    Call inside `distributed.process_group`, on every process with the same inputs. Each step,
    every process draws the same seed-cell permutation (`shard_seed_chunks`), takes its own slice
    of the step's seeds, reads only its batch's rows, builds its batch's induced subgraph and
    computes its loss; DDP averages the gradients over the processes, so every process takes the
    same Adam step. `batch_size` is per process (`distributed_batch_size` when None). The result
    (whole-graph embedding, losses averaged over the processes) is returned on rank 0 only;
    other processes get None.
    """
    import torch.distributed as tdist

    from . import distributed

    n, g = inputs.x0.shape
    if n < 2 * dist.world_size:
        raise ScrclError(
            f"{n} cells are too few for {dist.world_size} processes", "Use fewer processes (torchrun --nproc_per_node)"
        )
    csr = inputs.adj.tocsr()
    gp = inputs.gene_prop.tocsr()
    distributed.check_same(
        {
            "cell graph": distributed.digest(csr.indptr, csr.indices),
            "gene graph": distributed.digest(gp.indptr, gp.indices),
            "input shape": distributed.digest(np.asarray(inputs.x0.shape)),
        },
        device,
    )
    b = distributed_batch_size(n, g, config.hidden_dim, device, dist.world_size, batch_size)
    with matmul_precision(config.matmul_precision):
        run = MinibatchRun(inputs, config, device, b, None, dist)
        run.train(on_epoch)
        # Each process logged the mean loss of its own batches: the record is their mean.
        tdist.all_reduce(run.log_t)
        run.log_t /= dist.world_size
        return run.finish() if dist.is_main else None


def distributed_batch_size(n: int, g: int, h: int, device: torch.device, world_size: int, requested: int | None) -> int:
    """Cells per process per step in a distributed run: `requested`, else N / world_size (the
    full batch split over the processes), halved while one step would not fit on the device."""
    if requested is not None:
        return requested
    share = -(-n // world_size)
    return choose_batch_size(share, g, h, device, None) or share


class MinibatchRun:
    """One mini-batch training run, alone (`dist` None) or as one process of a DDP run."""

    def __init__(
        self,
        inputs: TrainInputs,
        config: TrainConfig,
        device: torch.device,
        batch_size: int,
        lr_power: float | None,
        dist: DistEnv | None,
    ) -> None:
        self.inputs, self.config, self.device, self.batch_size, self.dist = inputs, config, device, batch_size, dist
        n = inputs.x0.shape[0]
        self.n = n
        self.model, gen, self.x0, self.x1, self.gene_prop, self.opt, _ = _setup(
            inputs, config, device, stream=is_out_of_core(inputs)
        )
        self.row, self.col = _edges(inputs.adj, device)
        csr = inputs.adj.tocsr()
        self.indptr = torch.from_numpy(csr.indptr.astype(np.int64)).to(device)
        self.indices = torch.from_numpy(csr.indices.astype(np.int64)).to(device)
        world = 1 if dist is None else dist.world_size
        self.plan = minibatch_plan(csr, batch_size, config.lr, lr_power=lr_power, world_size=world)
        for group in self.opt.param_groups:
            group["lr"] = self.plan.lr
        self.inv_pi = torch.from_numpy((1.0 / self.plan.pi).astype(np.float32)).to(device)
        self.step_model: torch.nn.Module
        if dist is None:
            # One generator for the seeds and dropout, as always (keeps single-process runs unchanged).
            self.gen = gen
            self.seeds = _seed_chunks(n, self.plan.n_seeds, gen, device)
            self.step_model = self.model
        else:
            from torch.nn.parallel import DistributedDataParallel

            perm_seed, drop_seed = distributed_seeds(config.seed, dist.rank)
            self.gen = torch.Generator(device=device).manual_seed(drop_seed)
            perm_gen = torch.Generator().manual_seed(perm_seed)
            self.seeds = shard_seed_chunks(n, self.plan.n_seeds, dist.world_size, dist.rank, perm_gen, device)
            self.step_model = DistributedDataParallel(self.model, device_ids=[device] if device.type == "cuda" else None)
        self.log_t = torch.zeros(config.epochs, 4, dtype=torch.float64, device=device)
        self.t_start = 0.0

    def train(self, on_epoch: Callable[[int, LossTerms], None] | None) -> None:
        config, plan = self.config, self.plan
        who = "" if self.dist is None else f" per process ({self.dist.world_size} processes)"
        log.info(
            "mini-batch training: %d epochs of %d steps on batches of about %.0f cells%s, lr %.3g",
            config.epochs,
            plan.steps,
            plan.expected,
            who,
            plan.lr,
        )
        self.t_start = time.perf_counter()
        self.model.train()
        for epoch in range(config.epochs):
            for _ in range(plan.steps):
                terms, _ = self.step()
                self.log_t[epoch] += torch.stack([terms.total, terms.eda, terms.nca, terms.cvc]).detach().double() / plan.steps
            if on_epoch is not None:
                on_epoch(epoch, terms)

    def step(self) -> tuple[LossTerms, int]:
        """One Adam step on the next batch: its loss terms and its number of cells."""
        device = self.device
        nodes = _batch_nodes(self.indptr, self.indices, next(self.seeds))
        adj_b, a_hat_b = induced_subgraph(self.row, self.col, nodes, self.n)
        self.opt.zero_grad(set_to_none=True)
        x0_b, x1_b = _rows(self.x0, nodes, device), _rows(self.x1, nodes, device)
        out = self.step_model(x0_b, x1_b, a_hat_b, self.gene_prop, self.gen, cells=nodes, cell_weights=self.inv_pi[nodes])
        terms = _loss(out, adj_b, self.config)
        terms.total.backward()  # under DDP, returns with the gradients averaged over the processes
        self.opt.step()
        return terms, int(nodes.shape[0])

    def finish(self) -> TrainResult:
        extra: dict[str, Any] = {"batch_size": self.batch_size, "steps_per_epoch": self.plan.steps, "lr": self.plan.lr}
        if self.dist is not None:
            extra["processes"] = self.dist.world_size
        return _finish(
            self.model,
            self.inputs,
            self.x0,
            self.x1,
            self.gene_prop,
            self.log_t,
            self.t_start,
            self.device,
            self.config,
            extra=extra,
        )
