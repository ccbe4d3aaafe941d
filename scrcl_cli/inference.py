"""Embed and cluster new cells with an exported encoder, on ONNX Runtime only (no torch).

The query is preprocessed exactly as in training (log-normalise over all its genes, align to
the model's genes), gets its own cosine kNN graph, and is run through ONNX Runtime in batches:
per-cell batches for the ``cell`` view; for the ``fused`` view, each batch of target cells is
run with its one-hop neighbourhood and the exact normalised weights of the whole graph, so
batching changes nothing in the result while the encoder's memory stays bounded by the batch.

`embed`/`cluster` take an AnnData in memory and annotate it; `embed_file`/`cluster_file` (the
CLI's path) read the query in blocks of cells with `data.ChunkedH5ad`, keep only the
model-gene matrices (N, G), and return the new elements for `data.write_h5ad_patched`.
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

from . import clustering, graphs
from ._device import Device, check_session_provider, ort_providers
from ._version import __version__
from .data import (
    MIN_ENCODER_FORMAT,
    Annotations,
    ChunkedH5ad,
    ModelBundle,
    gene_selection,
)
from .errors import ScrclError
from .preprocessing import lognormalize, transform_query

if TYPE_CHECKING:
    from anndata import AnnData

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
ONNX_FILES = {"fused": "encoder_fused.onnx", "cell": "encoder_cell.onnx"}


def open_session(bundle: ModelBundle, view: str, *, device: Device = "auto", threads: int = 0) -> tuple[Any, str]:
    """An ONNX Runtime session for `view` and the provider it really uses."""
    import onnxruntime as ort

    providers = ort_providers(device)
    if "CUDAExecutionProvider" in providers and hasattr(ort, "preload_dlls"):
        # Load CUDA/cuDNN from the nvidia wheels before the session looks for them (ecosystem §4).
        ort.preload_dlls()
    if device != "cuda":
        # In auto mode a missing GPU is expected; ORT's provider errors would only alarm users.
        ort.set_default_logger_severity(3)
    opts = ort.SessionOptions()
    if threads > 0:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if device != "cuda":
        opts.log_severity_level = 3  # keep ORT's CUDA fallback chatter off the user's screen in auto mode
    version = int(bundle.manifest["format_version"])
    if version < MIN_ENCODER_FORMAT:
        raise ScrclError(f"{bundle.path} holds encoders of model format {version}, which this scrcl-cli no longer runs",
                         f"Re-export them with: scrcl-cli export {bundle.path}")
    blob = bundle.read_bytes(ONNX_FILES[view])  # hash-checked again right before loading
    try:
        session = ort.InferenceSession(blob, sess_options=opts, providers=providers)
    except Exception as exc:
        raise ScrclError(f"ONNX Runtime could not load {ONNX_FILES[view]} ({str(exc).splitlines()[0][:120]})",
                         "Re-export the model with scrcl-cli export, or upgrade onnxruntime") from exc
    return session, check_session_provider(session.get_providers(), device)


@dataclass
class QueryData:
    """Query cells aligned to the model: model_input and lognorm are CSR (N, G)."""

    model_input: sp.csr_matrix
    lognorm: sp.csr_matrix
    n_genes_found: int


def _prepare_rows(x: sp.csr_matrix, sel: sp.csr_matrix, pre: dict[str, Any]) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """(lognorm, model_input) of a block of cells, both CSR (B, G).

    x: float32 CSR (B, n_vars), all query genes; sel: `data.gene_selection`, (n_vars, G).
    Every step is row-wise (each cell is normalised by its own total over all its genes), so
    blocks of rows give exactly the rows of the whole matrix.
    """
    lognorm = sp.csr_matrix(lognormalize(x, pre["expression"]) @ sel)
    if pre.get("mode") == "spatial":
        from .spatial import scale_with

        # New sections get the training section's per-gene scaling, stored in the model.
        model_input = scale_with(lognorm, np.asarray(pre["gene_std"]), float(pre["max_value"]))
        return lognorm, sp.csr_matrix(model_input, dtype=np.float32)
    raw = lognorm if pre["input_mode"] == "lognorm" else sp.csr_matrix(x @ sel)
    return lognorm, transform_query(lognorm, raw, pre["input_mode"])


def _log_overlap(found: int, bundle: ModelBundle, name: str) -> None:
    log.info("genes: %d of %d model genes found in %s (%.1f%%)", found, len(bundle.genes), name, 100 * found / len(bundle.genes))


def prepare_query(adata: AnnData, bundle: ModelBundle, *, min_gene_overlap: float, name: str) -> QueryData:
    """Log-normalise over all query genes, then reorder/zero-fill to the model's genes.

    adata.X: validated counts (or the model's expression), (n_obs, n_vars). For a file that
    should not be loaded whole, use `prepare_query_file`, which gives the same matrices.
    """
    x = sp.csr_matrix(adata.X, dtype=np.float32)
    sel, found = gene_selection([str(v) for v in adata.var_names], bundle.genes, min_overlap=min_gene_overlap, name=name)
    _log_overlap(found, bundle, name)
    lognorm, model_input = _prepare_rows(x, sel, bundle.manifest["preprocessing"])
    return QueryData(model_input=model_input, lognorm=lognorm, n_genes_found=found)


def prepare_query_file(source: ChunkedH5ad, bundle: ModelBundle, *, min_gene_overlap: float) -> QueryData:
    """`prepare_query` on a file read in row blocks: the same matrices, bit for bit.

    Memory: one block of X over all its genes (`source.chunk_rows` x n_vars) plus the nonzeros
    of the two (N, G) results, never X whole. Errors come in the order of the whole read: the
    values of X (after the whole file was checked), then duplicate gene names, then the gene
    overlap.
    """
    pre = bundle.manifest["preprocessing"]
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
    lognorm: sp.csr_matrix, graph_params: dict[str, Any], progress: Progress | None = None,
    coords: np.ndarray | None = None,
) -> sp.csr_matrix:
    """Normalised adjacency Â of the query's own graph, CSR (N, N): cosine kNN on expression, or
    the spatial kNN graph of `coords` for spatial models."""
    n = lognorm.shape[0]
    k = int(graph_params["n_neighbors"])
    if n < 2:
        raise ScrclError(f"the query has {n} cell; the fused view needs at least 2", "Use --view cell for single cells")
    if graph_params.get("kind") == "spatial":
        from .spatial import spatial_graph

        if coords is None:
            raise ScrclError("this is a spatial model and the query has no obsm['spatial']", "Pass a section with coordinates")
        return graphs.gcn_norm(spatial_graph(coords, min(k, n - 1)))
    adj = graphs.cell_graph(lognorm, min(k, n), pca_threshold=int(graph_params["pca_threshold"]), progress=progress)
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
            targets = np.sort(order[start:start + size]).astype(np.int64)
            rows = a_hat[targets]
            k = int(np.diff(rows.indptr).max())
            if targets.size * k <= max_slots or size == 1:
                break
            size = max(1, size // 2)
        nodes = np.unique(rows.indices).astype(np.int64)
        local = sp.csr_matrix((rows.data, np.searchsorted(nodes, rows.indices), rows.indptr),
                              shape=(targets.size, nodes.size))
        nbr, w = graphs.padded_neighbours(local, np.searchsorted(nodes, targets))
        yield targets, nodes, nbr, w
        start += targets.size


def run_encoder(
    session: Any, view: str, model_input: sp.csr_matrix, a_hat: sp.csr_matrix | None, graph_params: dict[str, Any],
    *, batch_size: int = 4096, progress: Progress | None = None, hidden_dim: int = 1500,
    gather_bytes: int = 256 << 20,
) -> np.ndarray:
    """Run the ONNX encoder over all cells; returns float32 (N, D): the view's embedding (model-format.md).

    Smoothed inputs are float32 (N, G) arrays, the one large allocation besides the output
    (`graphs.smooth_powers`). gather_bytes bounds the fused view's (B, K, hidden_dim) float32
    gather.
    """
    n = model_input.shape[0]
    t0, t1 = int(graph_params["t0"]), int(graph_params["t1"])
    if (t0 > 0 or view == "fused") and a_hat is None:
        raise ValueError("this view needs the query graph")
    out: np.ndarray | None = None
    if view == "cell":
        x0 = graphs.smooth_powers(model_input, a_hat, (t0,))[t0] if t0 else model_input
        for start in range(0, n, batch_size):
            stop = min(n, start + batch_size)
            rows = x0[start:stop]
            z = session.run(None, {"x0": rows.toarray() if sp.issparse(rows) else rows})[0]
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
        z = session.run(None, {"x0": x0, "xs": xs[nodes], "nbr": nbr, "w": w})[0]
        out = np.empty((n, z.shape[1]), dtype=np.float32) if out is None else out
        out[targets] = z
        done += targets.size
        if progress:
            progress(done, n)
    assert out is not None
    return out


@dataclass
class EmbedReport:
    """What `embed` did: provider actually used, genes matched, sizes and seconds.

    annotations: the elements computed for the query (obsm[key_added], uns['scrcl'], and for
    `cluster` the obs columns); `embed`/`cluster` set them on the AnnData, `embed_file`/
    `cluster_file` leave them for `data.write_h5ad_patched`.
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
    batch_size: int = 4096,
    key_added: str = "X_scrcl",
    progress: Progress | None = None,
) -> EmbedReport:
    """Graph, session and encoder for prepared query cells; coords: obsm['spatial'] (N, 2) or None."""
    t = time.perf_counter()
    params = bundle.manifest["graph"]
    need_graph = view == "fused" or int(params["t0"]) > 0
    if params.get("kind") != "spatial" and coords is not None:
        log.info("this file has obsm['spatial']; models trained with --spatial use it")
    a_hat = query_graph(query.lognorm, params, coords=coords) if need_graph else None
    session, provider = open_session(bundle, view, device=device, threads=threads)
    emb = run_encoder(session, view, query.model_input, a_hat, params, batch_size=batch_size, progress=progress,
                      hidden_dim=int(bundle.manifest["model"]["hidden_dim"]))
    uns = {
        "scrcl_version": __version__,
        "model_sha256": bundle.manifest["files"][ONNX_FILES[view]],
        "genes_sha256": bundle.manifest["genes_sha256"],
        "provider": provider,
        "view": view,
        "key_added": key_added,
        "n_genes_found": query.n_genes_found,
        "n_genes_model": len(bundle.genes),
        "graph": {k: params[k] for k in ("n_neighbors", "t0", "t1")},
    }
    return EmbedReport(provider=provider, view=view, n_cells=emb.shape[0], n_genes_found=query.n_genes_found,
                       n_genes_model=len(bundle.genes), seconds=time.perf_counter() - t, query=query,
                       annotations=Annotations(obsm={key_added: emb}, uns={"scrcl": uns}))


def _coords(obsm: Any) -> np.ndarray | None:
    return np.asarray(obsm["spatial"], dtype=np.float64) if "spatial" in obsm else None


def embed(
    adata: AnnData,
    bundle: ModelBundle,
    *,
    view: str = "fused",
    device: Device = "auto",
    threads: int = 0,
    batch_size: int = 4096,
    min_gene_overlap: float = 0.5,
    key_added: str = "X_scrcl",
    name: str = "the query",
    progress: Progress | None = None,
) -> EmbedReport:
    """Embed the cells of `adata` with the model's ONNX encoder.

    Sets ``adata.obsm[key_added]`` (float32, (n_obs, D): the view's embedding, see export.py) and
    ``adata.uns['scrcl']`` (versions, model hash, provider, parameters).
    """
    t = time.perf_counter()
    query = prepare_query(adata, bundle, min_gene_overlap=min_gene_overlap, name=name)
    rep = _embed_query(query, _coords(adata.obsm), bundle, view=view, device=device, threads=threads,
                       batch_size=batch_size, key_added=key_added, progress=progress)
    rep.annotations.apply(adata)
    rep.seconds = time.perf_counter() - t
    return rep


def embed_file(
    source: ChunkedH5ad | Path,
    bundle: ModelBundle,
    *,
    view: str = "fused",
    device: Device = "auto",
    threads: int = 0,
    batch_size: int = 4096,
    min_gene_overlap: float = 0.5,
    key_added: str = "X_scrcl",
    progress: Progress | None = None,
) -> EmbedReport:
    """`embed` for an `.h5ad` file read in row blocks (`data.ChunkedH5ad`); nothing is written.

    A path is opened with the model's expression. The embedding and uns['scrcl'] are in
    ``report.annotations``, equal to what `embed` sets; write them with
    ``data.write_h5ad_patched``.
    """
    t = time.perf_counter()
    source = _open(source, bundle)
    query = prepare_query_file(source, bundle, min_gene_overlap=min_gene_overlap)
    rep = _embed_query(query, source.spatial, bundle, view=view, device=device, threads=threads,
                       batch_size=batch_size, key_added=key_added, progress=progress)
    rep.seconds = time.perf_counter() - t
    return rep


def _open(source: ChunkedH5ad | Path, bundle: ModelBundle) -> ChunkedH5ad:
    if isinstance(source, ChunkedH5ad):
        return source
    return ChunkedH5ad(Path(source), expression=bundle.manifest["preprocessing"]["expression"], from_model=True)


@dataclass
class ClusterReport:
    """`embed`'s report plus the clustering: number of clusters, method, marker rows."""

    embed: EmbedReport
    n_clusters: int
    method: str
    markers: list[tuple[str, int, str, float, float, float]]


def _cluster_query(
    rep: EmbedReport, coords: np.ndarray | None, bundle: ModelBundle, *, denovo: bool, n_clusters: int | None,
    seed: int, cluster_key: str, key_added: str,
) -> ClusterReport:
    """Label the embedded cells of `rep`; adds the obs columns and uns['scrcl']['cluster'] to rep.annotations."""
    import pandas as pd

    assert rep.query is not None
    ann = rep.annotations
    emb = ann.obsm[key_added]
    # Models written before the gcn-pca embedding have no metric recorded: they cluster by cosine.
    metric = str(bundle.manifest["clusters"].get("metric", "cosine"))
    if denovo:
        k = n_clusters
        method = "given"
        if k is None:
            k, _ = clustering.choose_n_clusters(rep.query.lognorm, seed=seed,
                                                n_neighbors=int(bundle.manifest["graph"]["n_neighbors"]))
            method = "louvain-count"
        res = clustering.cluster_embedding(emb, k, seed=seed, metric=metric, unsmoothed=rep.query.model_input,
                                           unsmoothed_weight=float(bundle.manifest["config"].get("unsmoothed_weight", 0.0)))
        labels = res.labels
        conf = clustering.assignment_confidence(emb, res.centroids, labels, metric)
    else:
        cents = np.asarray(bundle.manifest["clusters"][f"centroids_{rep.view}"], dtype=np.float64)
        labels, conf = clustering.nearest_centroid(emb, cents, metric)
        method = "nearest training centroid"
    cats = [str(i) for i in range(int(labels.max()) + 1)]
    ann.obs[cluster_key] = pd.Categorical([str(v) for v in labels], categories=cats)
    ann.obs["scrcl_confidence"] = conf
    refine = bundle.manifest["graph"].get("refine_neighbours")
    if refine is not None:
        from .spatial import refine_labels

        if coords is None:
            raise ScrclError("this is a spatial model and the query has no obsm['spatial']", "Pass a section with coordinates")
        refined = refine_labels(labels, coords, int(refine))
        ann.obs[f"{cluster_key}_refined"] = pd.Categorical([str(v) for v in refined], categories=cats)
    ann.uns["scrcl"]["cluster"] = {"method": method, "n_clusters": len(np.unique(labels)), "seed": seed, "key": cluster_key,
                                   "metric": metric}
    if denovo:
        ann.uns["scrcl"]["cluster"]["algorithm"] = clustering.CLUSTER_ALGORITHM[metric]
    markers = clustering.marker_table(rep.query.lognorm, bundle.genes, labels)
    return ClusterReport(embed=rep, n_clusters=len(np.unique(labels)), method=method, markers=markers)


def cluster(
    adata: AnnData,
    bundle: ModelBundle,
    *,
    denovo: bool = False,
    n_clusters: int | None = None,
    seed: int = 0,
    cluster_key: str = "scrcl_cluster",
    **embed_kwargs: Any,
) -> ClusterReport:
    """Embed, then label every cell.

    Default: the nearest training centroid in the model's metric (``clusters.metric``: Euclidean
    for gcn-pca, cosine for fused models; ids consistent across samples), with
    `clustering.assignment_confidence` in ``obs['scrcl_confidence']``. ``denovo``: k-means in that
    metric on the query embedding with `n_clusters` or the label-free count. Sets ``obs[cluster_key]`` (categorical),
    for spatial models ``obs[cluster_key + '_refined']``, and everything `embed` sets.
    """
    if denovo:
        clustering.check_n_clusters(n_clusters, adata.n_obs)
    t = time.perf_counter()
    query = prepare_query(adata, bundle, min_gene_overlap=embed_kwargs.pop("min_gene_overlap", 0.5),
                          name=embed_kwargs.pop("name", "the query"))
    coords = _coords(adata.obsm)
    rep = _embed_query(query, coords, bundle, **embed_kwargs)
    out = _cluster_query(rep, coords, bundle, denovo=denovo, n_clusters=n_clusters, seed=seed, cluster_key=cluster_key,
                         key_added=embed_kwargs.get("key_added", "X_scrcl"))
    rep.annotations.apply(adata)
    rep.seconds = time.perf_counter() - t
    return out


def cluster_file(
    source: ChunkedH5ad | Path,
    bundle: ModelBundle,
    *,
    denovo: bool = False,
    n_clusters: int | None = None,
    seed: int = 0,
    cluster_key: str = "scrcl_cluster",
    min_gene_overlap: float = 0.5,
    **embed_kwargs: Any,
) -> ClusterReport:
    """`cluster` for an `.h5ad` file read in row blocks; nothing is written.

    The embedding, the obs columns and uns['scrcl'] are in ``report.embed.annotations``, equal
    to what `cluster` sets; write them with ``data.write_h5ad_patched``.
    """
    source = _open(source, bundle)
    if denovo:
        clustering.check_n_clusters(n_clusters, source.n_obs)
    t = time.perf_counter()
    query = prepare_query_file(source, bundle, min_gene_overlap=min_gene_overlap)
    rep = _embed_query(query, source.spatial, bundle, **embed_kwargs)
    out = _cluster_query(rep, source.spatial, bundle, denovo=denovo, n_clusters=n_clusters, seed=seed,
                         cluster_key=cluster_key, key_added=embed_kwargs.get("key_added", "X_scrcl"))
    rep.seconds = time.perf_counter() - t
    return out
