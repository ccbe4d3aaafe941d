"""Embed and cluster new cells with an exported encoder, on ONNX Runtime only (no torch).

The query is preprocessed exactly as in training (log-normalise over all its genes, align to
the model's genes), gets its own cosine kNN graph, and is run through ONNX Runtime in batches:
per-cell batches for the ``cell`` view; for the ``fused`` view, each batch of target cells is
run with its one-hop neighbourhood and the exact normalised weights of the whole graph, so
batching changes nothing in the result while the encoder's memory stays bounded by the batch.

`embed`/`cluster` take an AnnData in memory and annotate it; `embed_file`/`cluster_file` (the
CLI's path) read the query in blocks of cells with `data.ChunkedH5ad`, keep only the
model-gene matrices (N, G), and return the new elements for `io.h5ad.write_h5ad_patched`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

from . import clustering, graphs, stages
from ._device import Device, check_session_provider, ort_providers
from ._utils import usable_cores
from ._version import __version__
from .bundle import ONNX_FILES, GraphParams, ModelBundle, Preprocessing
from .config import BATCH_SIZE, CLUSTER_KEY, KEY_ADDED, MIN_GENE_OVERLAP, InputMode, unsmoothed_weight
from .errors import ScrclError
from .io.h5ad import Annotations, ChunkedH5ad, check_coords, checked_matrix, gene_selection
from .preprocessing import lognormalize, transform_query

if TYPE_CHECKING:
    from anndata import AnnData

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


def open_session(
    bundle: ModelBundle, view: str, *, device: Device = "auto", threads: int = 0, file: str | None = None
) -> tuple[Any, str]:
    """An ONNX Runtime session for `view` (or the model's ONNX `file`) and the provider it really uses."""
    import onnxruntime as ort

    providers = ort_providers(device)
    if "CUDAExecutionProvider" in providers and hasattr(ort, "preload_dlls"):
        # Load CUDA/cuDNN from the nvidia wheels before the session looks for them.
        ort.preload_dlls()
    # ORT's own log lines (provider fallbacks, a failing node) would reach stderr beside our one-line
    # error; the provider actually used and any failure are reported by scrcl-cli itself.
    ort.set_default_logger_severity(4)  # fatal only
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    if threads > 0:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    file = file or ONNX_FILES[view]
    # hash-checked and validated right before loading
    blob = bundle.encoder(view) if file == ONNX_FILES[view] else bundle.stage_encoder(file)
    try:
        session = ort.InferenceSession(blob, sess_options=opts, providers=providers)
    except Exception as exc:
        raise ScrclError(
            f"ONNX Runtime could not load {file} ({_first_line(exc)})",
            "Re-export the model with scrcl-cli export, or upgrade onnxruntime",
        ) from exc
    return session, check_session_provider(session.get_providers(), device)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:160] if text else type(exc).__name__


def run_session(session: Any, feeds: dict[str, np.ndarray], rows: int, width: int) -> np.ndarray:
    """One encoder call, checked: float32 (rows, width), every value finite; a one-line error otherwise.

    The encoder comes from a model folder, which is untrusted: its runtime failures and wrong or
    non-finite outputs are reported, never passed on.
    """
    try:
        z = session.run(None, feeds)[0]
    except MemoryError:
        raise
    except Exception as exc:  # onnxruntime raises its own Fail/RuntimeException types
        if "alloc" in str(exc).lower() or "memory" in str(exc).lower():
            # a trained encoder's memory is linear in the block of cells; a hostile one may ask for anything
            raise ScrclError(
                f"the model's encoder asked ONNX Runtime for more memory than this machine has ({_first_line(exc)})",
                "Split the query into smaller files; if the model folder did not come from scrcl-cli train, retrain it",
            ) from None
        raise ScrclError(
            f"the model's encoder failed in ONNX Runtime ({_first_line(exc)})",
            "Re-export the model with scrcl-cli export, or retrain",
        ) from None
    return check_encoder_output(np.asarray(z), rows, width)


def check_encoder_output(z: np.ndarray, rows: int, width: int) -> np.ndarray:
    """`z` as float32 when it is (rows, width) and finite; a one-line error otherwise (the encoder is untrusted)."""
    if z.shape != (rows, width):
        raise ScrclError(
            f"the model's encoder returned shape {z.shape} where ({rows}, {width}) was expected",
            "The model folder is damaged: re-export it with scrcl-cli export, or retrain",
        )
    if not np.isfinite(z).all():
        raise ScrclError(
            "the model's encoder returned NaN or infinite values",
            "The model folder is damaged or the training diverged: retrain (e.g. with a lower --lr)",
        )
    return z.astype(np.float32, copy=False)


@dataclass
class QueryData:
    """Query cells aligned to the model: model_input and lognorm are CSR (N, G).

    lognorm_gram: `graphs.gram_matrix(lognorm)`, (G, G), once the query graph has summed it;
    `cluster --denovo` reuses it for the scaled PCA when the model input is lognorm itself.
    """

    model_input: sp.csr_matrix
    lognorm: sp.csr_matrix
    n_genes_found: int
    lognorm_gram: np.ndarray | None = None


def _prepare_rows(x: sp.csr_matrix, sel: sp.csr_matrix, pre: Preprocessing) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """(lognorm, model_input) of a block of cells, both CSR (B, G).

    x: float32 CSR (B, n_vars), all query genes; sel: `io.h5ad.gene_selection`, (n_vars, G).
    Every step is row-wise (each cell is normalised by its own total over all its genes), so
    blocks of rows give exactly the rows of the whole matrix.
    """
    lognorm = sp.csr_matrix(lognormalize(x, pre.expression) @ sel)
    if pre.is_spatial:
        from .spatial import scale_with

        # New sections get the training section's per-gene scaling, stored in the model.
        assert pre.gene_std is not None and pre.max_value is not None  # the schema requires both for spatial
        model_input = scale_with(lognorm, np.asarray(pre.gene_std), pre.max_value)
        return lognorm, sp.csr_matrix(model_input, dtype=np.float32)
    mode: InputMode = "counts" if pre.input_mode == "counts" else "lognorm"  # "scaled": spatial, above
    raw = lognorm if mode == "lognorm" else sp.csr_matrix(x @ sel)
    return lognorm, transform_query(lognorm, raw, mode)


def _log_overlap(found: int, bundle: ModelBundle, name: str) -> None:
    log.info("genes: %d of %d model genes found in %s (%.1f%%)", found, len(bundle.genes), name, 100 * found / len(bundle.genes))


def prepare_query(adata: AnnData, bundle: ModelBundle, *, min_gene_overlap: float, name: str) -> QueryData:
    """Log-normalise over all query genes, then reorder/zero-fill to the model's genes.

    adata.X: validated counts (or the model's expression), (n_obs, n_vars). For a file that
    should not be loaded whole, use `prepare_query_file`, which gives the same matrices.
    """
    x = checked_matrix(
        adata.X, adata.var_names, name=name, expression=bundle.manifest.preprocessing.expression, from_model=True
    )  # a new matrix: the caller's X is never modified
    sel, found = gene_selection([str(v) for v in adata.var_names], bundle.genes, min_overlap=min_gene_overlap, name=name)
    _log_overlap(found, bundle, name)
    lognorm, model_input = _prepare_rows(x, sel, bundle.manifest.preprocessing)
    return QueryData(model_input=model_input, lognorm=lognorm, n_genes_found=found)


def prepare_query_file(source: ChunkedH5ad, bundle: ModelBundle, *, min_gene_overlap: float) -> QueryData:
    """`prepare_query` on a file read in row blocks: the same matrices, bit for bit.

    Memory: one block of X over all its genes (`source.chunk_rows` x n_vars) plus the nonzeros
    of the two (N, G) results, never X whole. Errors come in the order of the whole read: the
    values of X (after the whole file was checked), then duplicate gene names, then the gene
    overlap.
    """
    pre = bundle.manifest.preprocessing
    try:
        sel, found = gene_selection(list(source.var_names), bundle.genes, min_overlap=min_gene_overlap, name=source.name)
    except ScrclError:
        source.validate()  # a bad value or duplicate gene name in X is reported first, as before
        raise
    if source.has_duplicate_genes:
        source.validate()  # raises the value error, or else the duplicate-gene error
    lognorms: list[sp.csr_matrix] = []
    inputs: list[sp.csr_matrix] = []
    for x in source.chunks():  # raises a value error only after the last block
        lognorm, model_input = _prepare_rows(x, sel, pre)
        lognorms.append(lognorm)
        inputs.append(model_input)
    _log_overlap(found, bundle, source.name)
    same = all(a is b for a, b in zip(lognorms, inputs))  # "lognorm" input: one matrix, kept once
    lognorm = _stack_rows(lognorms)
    lognorms.clear()
    model_input = lognorm if same else _stack_rows(inputs)
    inputs.clear()
    return QueryData(model_input=model_input, lognorm=lognorm, n_genes_found=found)


def _stack_rows(blocks: list[sp.csr_matrix]) -> sp.csr_matrix:
    """Row blocks -> one CSR; entries keep their order within each row (no sorting, no summing)."""
    if len(blocks) == 1:
        return blocks[0]
    return sp.csr_matrix(sp.vstack(blocks, format="csr"))


def query_graph(
    lognorm: sp.csr_matrix,
    graph_params: GraphParams,
    progress: Progress | None = None,
    coords: np.ndarray | None = None,
    gram: np.ndarray | None = None,
) -> sp.csr_matrix:
    """Normalised adjacency Â of the query's own graph, CSR (N, N): cosine kNN on expression, or
    the spatial kNN graph of `coords` for spatial models. gram: `graphs.gram_matrix(lognorm)`
    when the caller has it."""
    n = lognorm.shape[0]
    k = graph_params.n_neighbors
    if n < 2:
        fix = (
            "Use --view cell for single cells"
            if graph_params.t0 == 0 and not graph_params.is_spatial
            else "Embed at least 2 cells together: this model smooths each cell over its neighbours in the query"
        )
        raise ScrclError(f"the query has {n} cell, and this model needs the query's own kNN graph", fix)
    if graph_params.is_spatial:
        from .spatial import spatial_graph

        if coords is None:
            raise ScrclError("this is a spatial model and the query has no obsm['spatial']", "Pass a section with coordinates")
        return graphs.gcn_norm(spatial_graph(coords, min(k, n - 1)))
    adj = graphs.cell_graph(lognorm, min(k, n), pca_threshold=graph_params.pca_threshold, progress=progress, gram=gram)
    return graphs.gcn_norm(adj)


def _one_hop_batches(
    a_hat: sp.csr_matrix, batch_size: int, max_slots: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Yield (targets, nodes, nbr, w): batches of target cells with their one-hop neighbourhoods.

    targets (B,) and nodes (M,) are sorted cell indices (nodes includes the targets); nbr, w
    (B, K) are the targets' full rows of Â as a padded list into `nodes`, so every target gets
    exactly the embedding of the whole graph. Targets are consecutive in a reverse
    Cuthill-McKee order of the graph, which keeps neighbours in the same batch, so the
    neighbourhoods (whose first GCN layer is recomputed per batch) stay small. A batch is halved
    until B * K <= `max_slots`, bounding the encoder's (B, K, H) gather whatever the degrees.
    """
    from scipy.sparse.csgraph import reverse_cuthill_mckee

    n = a_hat.shape[0]
    order = reverse_cuthill_mckee(sp.csr_matrix(a_hat), symmetric_mode=True)
    start = 0
    while start < n:
        size = batch_size
        while True:
            targets = np.sort(order[start : start + size]).astype(np.int64)
            rows = a_hat[targets]
            k = int(np.diff(rows.indptr).max())
            if targets.size * k <= max_slots or size == 1:
                break
            size = max(1, size // 2)
        nodes = np.unique(rows.indices).astype(np.int64)
        local = sp.csr_matrix((rows.data, np.searchsorted(nodes, rows.indices), rows.indptr), shape=(targets.size, nodes.size))
        nbr, w = graphs.padded_neighbours(local, np.searchsorted(nodes, targets))
        yield targets, nodes, nbr, w
        start += targets.size


def _output_width(session: Any) -> int:
    dim = session.get_outputs()[0].shape[-1]
    if not isinstance(dim, int):
        raise ScrclError("the model's encoder has no fixed output width", "Re-export the model with scrcl-cli export")
    return dim


def run_encoder(
    session: Any,
    view: str,
    model_input: sp.csr_matrix,
    a_hat: sp.csr_matrix | None,
    graph_params: GraphParams,
    *,
    batch_size: int = BATCH_SIZE,
    progress: Progress | None = None,
    hidden_dim: int = 1500,
    gather_bytes: int = 256 << 20,
    width: int | None = None,
) -> np.ndarray:
    """Run the ONNX encoder over all cells; returns float32 (N, D): the view's embedding (model-format.md).

    Smoothed inputs are float32 (N, G) arrays, the one large allocation besides the output
    (`graphs.smooth_powers`). gather_bytes bounds the fused view's (B, K, hidden_dim) float32
    gather.
    """
    n = model_input.shape[0]
    t0, t1 = graph_params.t0, graph_params.t1
    if (t0 > 0 or view == "fused") and a_hat is None:
        raise ValueError("this view needs the query graph")
    out: np.ndarray | None = None
    if view == "cell":
        x0 = graphs.smooth_powers(model_input, a_hat, (t0,))[t0] if t0 else model_input
        for start in range(0, n, batch_size):
            stop = min(n, start + batch_size)
            rows = x0[start:stop]
            z = run_session(
                session,
                {"x0": rows.toarray() if sp.issparse(rows) else np.asarray(rows)},  # type: ignore[union-attr]
                stop - start,
                width if width is not None else _output_width(session),
            )
            out = np.empty((n, z.shape[1]), dtype=np.float32) if out is None else out
            out[start:stop] = z
            if progress:
                progress(stop, n)
        assert out is not None
        return out
    assert a_hat is not None
    ts = t1 + 1  # the GCN view's first aggregation, folded into the smoothing (export.py)
    # x0 rows come from Â^ts X itself when t0 is ts or ts + 1 (the defaults: 4 = 3 + 1), so only
    # one (N, G) array is kept; otherwise both are.
    smoothed = graphs.smooth_powers(model_input, a_hat, (ts,) if t0 - ts in (0, 1) else (ts, t0))
    xs = smoothed[ts]
    done = 0
    for targets, nodes, nbr, w in _one_hop_batches(a_hat, batch_size, max(1, gather_bytes // (4 * hidden_dim))):
        if t0 == ts:
            x0 = xs[targets]
        elif t0 == ts + 1:
            x0 = np.asarray(a_hat[targets] @ xs, dtype=np.float32)
        else:
            x0 = smoothed[t0][targets]
        z = run_session(
            session,
            {"x0": x0, "xs": xs[nodes], "nbr": nbr, "w": w},
            targets.size,
            width if width is not None else _output_width(session),
        )
        out = np.empty((n, z.shape[1]), dtype=np.float32) if out is None else out
        out[targets] = z
        done += targets.size
        if progress:
            progress(done, n)
    assert out is not None
    return out


def run_staged_encoder(
    bundle: ModelBundle,
    view: str,
    model_input: sp.csr_matrix,
    a_hat: sp.csr_matrix | None,
    graph_params: GraphParams,
    *,
    device: Device = "auto",
    threads: int = 0,
    batch_size: int = BATCH_SIZE,
    progress: Progress | None = None,
) -> tuple[np.ndarray, str]:
    """`run_encoder` through the model's staged encoder (stages.py): (N, D) float32 and the provider."""
    sessions = [open_session(bundle, view, device=device, threads=threads, file=f) for f in stages.stage_files(view)]
    powers = stages.stage_powers(view, graph_params.t0, graph_params.t1)
    log.info("%s view: staged encoder, Â powers %s between stages", view, powers)
    emb = stages.run_stages(
        [stages.ort_runner(s) for s, _ in sessions],
        powers,
        model_input,
        a_hat,
        batch_size=batch_size,
        progress=progress,
        workers=threads if threads > 0 else usable_cores(),
    )
    return emb, sessions[0][1]


@dataclass
class EmbedReport:
    """What `embed` did: provider actually used, genes matched, sizes and seconds.

    annotations: the elements computed for the query (obsm[key_added], uns['scrcl'], and for
    `cluster` the obs columns); `embed`/`cluster` set them on the AnnData, `embed_file`/
    `cluster_file` leave them for `io.h5ad.write_h5ad_patched`.
    """

    provider: str
    view: str
    n_cells: int
    n_genes_found: int
    n_genes_model: int
    seconds: float
    query: QueryData | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    annotations: Annotations = field(default_factory=Annotations)


def _embed_query(
    query: QueryData,
    coords: np.ndarray | None,
    bundle: ModelBundle,
    *,
    view: str = "fused",
    device: Device = "auto",
    threads: int = 0,
    batch_size: int = BATCH_SIZE,
    key_added: str = KEY_ADDED,
    progress: Progress | None = None,
    session: tuple[Any, str] | None = None,
    name: str = "the query",
) -> EmbedReport:
    """Graph, session and encoder for prepared query cells; coords: checked obsm['spatial'] (N, 2)
    of a spatial model's query (`_read_query`), else None.

    `session`: (ONNX Runtime session, provider) from `open_session`, opened by the caller before
    the query was read so that a bad device or encoder fails first; opened here when None.
    """
    t = time.perf_counter()
    params = bundle.manifest.graph
    n = query.model_input.shape[0]
    n_empty = int(np.count_nonzero(np.diff(query.model_input.indptr) == 0))
    if n_empty == n:
        raise ScrclError(
            f"all {n} cells of {name} have zero counts in the model's genes",
            "Check that the query holds expression values and the same gene identifiers as the training data",
        )
    if n_empty:
        log.warning(
            "%d of %d cells of %s have zero counts in the model's genes: they are embedded, but their "
            "embedding and cluster carry no information (uns['scrcl']['n_cells_empty'])",
            n_empty,
            n,
            name,
        )
    need_graph = view == "fused" or params.t0 > 0
    session, provider = session if session is not None else open_session(bundle, view, device=device, threads=threads)
    if need_graph and not params.is_spatial and query.lognorm_gram is None and n >= max(params.pca_threshold, 2):
        # Exactly when `query_graph` runs the cell graph's PCA, which needs it; kept so that
        # `cluster --denovo` does not sum it again.
        query.lognorm_gram = graphs.gram_matrix(query.lognorm)
    a_hat = query_graph(query.lognorm, params, coords=coords, gram=query.lognorm_gram) if need_graph else None
    width = bundle.manifest.model.width(view)
    if stages.has_stages(bundle.manifest.files, view):
        emb, provider = run_staged_encoder(
            bundle,
            view,
            query.model_input,
            a_hat,
            params,
            device=device,
            threads=threads,
            batch_size=batch_size,
            progress=progress,
        )
        check_encoder_output(emb, n, width)
    else:
        emb = run_encoder(
            session,
            view,
            query.model_input,
            a_hat,
            params,
            batch_size=batch_size,
            progress=progress,
            hidden_dim=bundle.manifest.model.hidden_dim,
            width=width,
        )
    uns = {
        "scrcl_version": __version__,
        "model_sha256": bundle.manifest.files[ONNX_FILES[view]],
        "genes_sha256": bundle.manifest.genes_sha256,
        "provider": provider,
        "view": view,
        "key_added": key_added,
        "n_genes_found": query.n_genes_found,
        "n_genes_model": len(bundle.genes),
        "n_cells_empty": n_empty,
        "graph": {"n_neighbors": params.n_neighbors, "t0": params.t0, "t1": params.t1},
    }
    return EmbedReport(
        provider=provider,
        view=view,
        n_cells=emb.shape[0],
        n_genes_found=query.n_genes_found,
        n_genes_model=len(bundle.genes),
        seconds=time.perf_counter() - t,
        query=query,
        annotations=Annotations(obsm={key_added: emb}, uns={"scrcl": uns}),
    )


def _read_query(
    source: AnnData | ChunkedH5ad | Path, bundle: ModelBundle, *, min_gene_overlap: float, name: str
) -> tuple[QueryData, np.ndarray | None, str]:
    """Prepared cells, checked coordinates (spatial models only, else None) and display name of
    a query held in memory (AnnData) or in a file (`ChunkedH5ad` or a path, read in row blocks)."""
    source = _opened(source, bundle)
    if isinstance(source, ChunkedH5ad):
        query = prepare_query_file(source, bundle, min_gene_overlap=min_gene_overlap)
        return query, query_coords(source, bundle), source.name
    query = prepare_query(source, bundle, min_gene_overlap=min_gene_overlap, name=name)
    coords = np.asarray(source.obsm["spatial"], dtype=np.float64) if "spatial" in source.obsm else None
    if coords is not None and not bundle.is_spatial:
        log.info("%s has obsm['spatial']; models trained with --spatial use it", name)
    return query, _spatial_coords(coords, source.n_obs, name, bundle), name


def _opened(source: AnnData | ChunkedH5ad | Path, bundle: ModelBundle) -> AnnData | ChunkedH5ad:
    """A path opened as a `ChunkedH5ad` (read in row blocks later); an AnnData or reader as it is."""
    return _open(source, bundle) if isinstance(source, (ChunkedH5ad, Path, str)) else source


def _embed(
    source: AnnData | ChunkedH5ad | Path,
    bundle: ModelBundle,
    *,
    view: str = "fused",
    device: Device = "auto",
    threads: int = 0,
    batch_size: int = BATCH_SIZE,
    min_gene_overlap: float = MIN_GENE_OVERLAP,
    key_added: str = KEY_ADDED,
    progress: Progress | None = None,
    name: str = "the query",
) -> tuple[EmbedReport, np.ndarray | None]:
    """What `embed` and `embed_file` share: the session first (a bad device or encoder fails
    before the query is read), then the query, then the encoder. Returns the report and the
    query's coordinates (spatial models)."""
    t = time.perf_counter()
    session = open_session(bundle, view, device=device, threads=threads)
    query, coords, name = _read_query(source, bundle, min_gene_overlap=min_gene_overlap, name=name)
    rep = _embed_query(
        query,
        coords,
        bundle,
        view=view,
        session=session,
        device=device,
        threads=threads,
        batch_size=batch_size,
        key_added=key_added,
        progress=progress,
        name=name,
    )
    rep.seconds = time.perf_counter() - t
    return rep, coords


def embed(
    adata: AnnData,
    bundle: ModelBundle,
    *,
    view: str = "fused",
    device: Device = "auto",
    threads: int = 0,
    batch_size: int = BATCH_SIZE,
    min_gene_overlap: float = MIN_GENE_OVERLAP,
    key_added: str = KEY_ADDED,
    name: str = "the query",
    progress: Progress | None = None,
) -> EmbedReport:
    """Embed the cells of `adata` with the model's ONNX encoder.

    Sets ``adata.obsm[key_added]`` (float32, (n_obs, D): the view's embedding, see export.py) and
    ``adata.uns['scrcl']`` (versions, model hash, provider, parameters).
    """
    rep, _ = _embed(
        adata,
        bundle,
        view=view,
        device=device,
        threads=threads,
        batch_size=batch_size,
        min_gene_overlap=min_gene_overlap,
        key_added=key_added,
        progress=progress,
        name=name,
    )
    rep.annotations.apply(adata)
    return rep


def embed_file(
    source: ChunkedH5ad | Path,
    bundle: ModelBundle,
    *,
    view: str = "fused",
    device: Device = "auto",
    threads: int = 0,
    batch_size: int = BATCH_SIZE,
    min_gene_overlap: float = MIN_GENE_OVERLAP,
    key_added: str = KEY_ADDED,
    progress: Progress | None = None,
) -> EmbedReport:
    """`embed` for an `.h5ad` file read in row blocks (`io.h5ad.ChunkedH5ad`); nothing is written.

    A path is opened with the model's expression. The embedding and uns['scrcl'] are in
    ``report.annotations``, equal to what `embed` sets; write them with
    ``io.h5ad.write_h5ad_patched``.
    """
    rep, _ = _embed(
        source,
        bundle,
        view=view,
        device=device,
        threads=threads,
        batch_size=batch_size,
        min_gene_overlap=min_gene_overlap,
        key_added=key_added,
        progress=progress,
    )
    return rep


def query_coords(source: ChunkedH5ad, bundle: ModelBundle) -> np.ndarray | None:
    """The query's checked coordinates (N, 2) for a spatial model; None for any other model."""
    return _spatial_coords(source.spatial, source.n_obs, source.name, bundle, problem=source.spatial_problem)


def _spatial_coords(
    coords: np.ndarray | None, n_obs: int, name: str, bundle: ModelBundle, *, problem: str | None = None
) -> np.ndarray | None:
    """coords (n_obs, 2) checked for a spatial model, which needs them; None for any other model.
    problem: why a file's coordinates could not be read, when it has unusable ones."""
    if not bundle.is_spatial:
        return None
    if coords is None:
        why = problem or f"{name} has no obsm['spatial']"
        raise ScrclError(
            f"this is a spatial model and {why}", "Pass a section with an (n_cells, 2) array of x, y in obsm['spatial']"
        )
    return check_coords(coords, n_obs, name)


def _open(source: ChunkedH5ad | Path | str, bundle: ModelBundle) -> ChunkedH5ad:
    if isinstance(source, ChunkedH5ad):
        return source
    return ChunkedH5ad(Path(source), expression=bundle.manifest.preprocessing.expression, from_model=True)


@dataclass
class ClusterReport:
    """`embed`'s report plus the clustering: number of clusters, method, marker rows."""

    embed: EmbedReport
    n_clusters: int
    method: str
    markers: list[tuple[str, int, str, float, float, float]]


def _cluster_query(
    rep: EmbedReport,
    coords: np.ndarray | None,
    bundle: ModelBundle,
    *,
    denovo: bool,
    n_clusters: int | None,
    seed: int,
    cluster_key: str,
    key_added: str,
) -> ClusterReport:
    """Label the embedded cells of `rep`; adds the obs columns and uns['scrcl']['cluster'] to rep.annotations."""
    import pandas as pd

    assert rep.query is not None
    ann = rep.annotations
    emb = ann.obsm[key_added]
    # Models written before the gcn-pca embedding have no metric recorded: they cluster by cosine.
    metric = bundle.manifest.clusters.metric
    if denovo:
        clock = time.perf_counter()
        k = n_clusters
        method = "given"
        if k is None:
            k, _ = clustering.choose_n_clusters(rep.query.lognorm, seed=seed, n_neighbors=bundle.manifest.graph.n_neighbors)
            method = "leiden-count"
        res = clustering.cluster_embedding(
            emb,
            k,
            seed=seed,
            metric=metric,
            unsmoothed=rep.query.model_input,
            unsmoothed_weight=unsmoothed_weight(bundle.manifest.unsmoothed_weight, k_given=n_clusters is not None),
            unsmoothed_gram=rep.query.lognorm_gram if rep.query.model_input is rep.query.lognorm else None,
        )
        labels = res.labels
        conf = clustering.assignment_confidence(emb, res.centroids, labels, metric)
        log.info("de novo clustering (%s, %d clusters) of %d cells: %.1f s", method, k, labels.size, time.perf_counter() - clock)
    else:
        cents = bundle.manifest.clusters.centroids(rep.view)
        labels, conf = clustering.nearest_centroid(emb, cents, metric)
        method = "nearest training centroid"
    cats = [str(i) for i in range(int(labels.max()) + 1)]
    ann.obs[cluster_key] = pd.Categorical([str(v) for v in labels], categories=cats)
    ann.obs["scrcl_confidence"] = conf
    refine = bundle.manifest.graph.refine_neighbours
    if refine is not None:
        from .spatial import refine_labels

        if coords is None:
            raise ScrclError("this is a spatial model and the query has no obsm['spatial']", "Pass a section with coordinates")
        refined = refine_labels(labels, coords, int(refine))
        ann.obs[f"{cluster_key}_refined"] = pd.Categorical([str(v) for v in refined], categories=cats)
    ann.uns["scrcl"]["cluster"] = {
        "method": method,
        "n_clusters": len(np.unique(labels)),
        "seed": seed,
        "key": cluster_key,
        "metric": metric,
    }
    if denovo:
        ann.uns["scrcl"]["cluster"]["algorithm"] = clustering.CLUSTER_ALGORITHM[metric]
    markers = clustering.marker_table(rep.query.lognorm, bundle.genes, labels)
    return ClusterReport(embed=rep, n_clusters=len(np.unique(labels)), method=method, markers=markers)


def _cluster(
    source: AnnData | ChunkedH5ad | Path,
    bundle: ModelBundle,
    *,
    denovo: bool,
    n_clusters: int | None,
    seed: int,
    cluster_key: str,
    embed_kwargs: dict[str, Any],
) -> ClusterReport:
    """What `cluster` and `cluster_file` share: checks, embedding, then the labels."""
    if n_clusters is not None and not denovo:
        raise ScrclError(
            "--n-clusters applies only with --denovo (the default labels cells by the training centroids)",
            "Add --denovo to cluster the query itself into that many clusters, or drop --n-clusters",
        )
    source = _opened(source, bundle)
    if denovo:
        clustering.check_n_clusters(n_clusters, source.n_obs)
    rep, coords = _embed(source, bundle, **embed_kwargs)
    t = time.perf_counter()
    out = _cluster_query(
        rep,
        coords,
        bundle,
        denovo=denovo,
        n_clusters=n_clusters,
        seed=seed,
        cluster_key=cluster_key,
        key_added=rep.annotations.uns["scrcl"]["key_added"],
    )
    rep.seconds += time.perf_counter() - t
    return out


def cluster(
    adata: AnnData,
    bundle: ModelBundle,
    *,
    denovo: bool = False,
    n_clusters: int | None = None,
    seed: int = 0,
    cluster_key: str = CLUSTER_KEY,
    **embed_kwargs: Any,
) -> ClusterReport:
    """Embed, then label every cell.

    Default: the nearest training centroid in the model's metric (``clusters.metric``: Euclidean
    for gcn-pca, cosine for fused models; ids consistent across samples), with
    `clustering.assignment_confidence` in ``obs['scrcl_confidence']``. ``denovo``: k-means in that
    metric on the query embedding with `n_clusters` or the label-free count. Sets ``obs[cluster_key]`` (categorical),
    for spatial models ``obs[cluster_key + '_refined']``, and everything `embed` sets.
    `embed_kwargs`: `embed`'s keyword arguments.
    """
    out = _cluster(
        adata,
        bundle,
        denovo=denovo,
        n_clusters=n_clusters,
        seed=seed,
        cluster_key=cluster_key,
        embed_kwargs=embed_kwargs,
    )
    out.embed.annotations.apply(adata)
    return out


def cluster_file(
    source: ChunkedH5ad | Path,
    bundle: ModelBundle,
    *,
    denovo: bool = False,
    n_clusters: int | None = None,
    seed: int = 0,
    cluster_key: str = CLUSTER_KEY,
    **embed_kwargs: Any,
) -> ClusterReport:
    """`cluster` for an `.h5ad` file read in row blocks; nothing is written.

    The embedding, the obs columns and uns['scrcl'] are in ``report.embed.annotations``, equal
    to what `cluster` sets; write them with ``io.h5ad.write_h5ad_patched``.
    """
    embed_kwargs.pop("name", None)  # a file is named by its path
    return _cluster(
        source,
        bundle,
        denovo=denovo,
        n_clusters=n_clusters,
        seed=seed,
        cluster_key=cluster_key,
        embed_kwargs=embed_kwargs,
    )
