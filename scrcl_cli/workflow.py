"""`scrcl-cli train` end to end: AnnData in, model files and per-cell results out.

Reads arrays from the AnnData once at the top, calls preprocessing, graphs, training,
clustering and export, and returns everything `bundle.write_model_dir` needs. Writes nothing.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

from . import clustering, graphs
from ._device import Device, describe_torch_device, resolve_torch_device
from .bundle import ONNX_FILES, Clusters, GraphParams, Manifest, ModelShape, Preprocessing, onnx_metadata
from .config import unsmoothed_weight
from .errors import ScrclError
from .preprocessing import prepare

if TYPE_CHECKING:
    import torch
    from anndata import AnnData

    from .config import TrainConfig
    from .distributed import DistEnv
    from .losses import LossTerms
    from .training import TrainInputs, TrainResult

log = logging.getLogger(__name__)


@dataclass
class TrainedModel:
    """Everything a training run produced.

    files: name -> bytes of the model directory; manifest: its manifest (without the file hashes);
    embedding: clustering embedding for every input cell, float32 (n_obs, D), NaN for dropped cells;
    labels: cluster per input cell, int64 (n_obs,), -1 for dropped cells.
    """

    files: dict[str, bytes]
    manifest: Manifest
    embedding: np.ndarray
    labels: np.ndarray
    device: str
    seconds: float
    n_genes: int
    extra_labels: dict[str, np.ndarray] = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)  # wall seconds per step, in run order


def train_model(
    adata: AnnData,
    config: TrainConfig,
    *,
    device: Device = "auto",
    n_clusters: int | None = None,
    export: bool = True,
    batch_size: int | None = None,
    spatial: dict[str, Any] | None = None,
    on_epoch: Callable[[int, LossTerms], None] | None = None,
    on_graph: Callable[[int, int], None] | None = None,
    out_of_core: Path | None = None,
    dist: DistEnv | None = None,
) -> TrainedModel:
    """Preprocess, build graphs, train, cluster the training cells and export the encoders.

    out_of_core: the output path, beside which the smoothed inputs are kept in memory-mapped
    files while training (`training.scratch_inputs`, removed afterwards); None keeps them in memory.
    dist: rank 0 of a torchrun launch (`distributed.detect`): trains with DistributedDataParallel
    beside the other processes, which run `train_worker`; rank 0 alone clusters and exports.
    """
    import torch

    if dist is not None and not dist.is_main:
        raise ValueError("train_model runs on rank 0 only; the other processes call train_worker")
    phases: dict[str, float] = {}
    prep, coords, inputs, result, dev = _prepare_and_fit(
        adata, config, device, batch_size, spatial, on_epoch, on_graph, out_of_core, dist, n_clusters=n_clusters, phases=phases
    )
    n = prep.model_input.shape[0]
    assert result is not None  # rank 0 or a single process always has the result
    peak_gpu = int(torch.cuda.max_memory_allocated(dev)) if dev.type == "cuda" else None
    log.info(
        "trained %d epochs in %.1f s%s",
        config.epochs,
        result.seconds,
        f" (peak GPU memory {peak_gpu / 2**30:.1f} GiB)" if peak_gpu is not None else "",
    )

    with _phase(phases, "cluster count"):
        if n_clusters is None:
            k, scores = clustering.choose_n_clusters(
                prep.lognorm, seed=config.seed, n_neighbors=config.n_neighbors, adj=inputs.adj if spatial is None else None
            )
            k_method = "leiden-count"
        else:
            k, scores, k_method = n_clusters, {}, "given"
    metric = clustering.EMBEDDING_METRIC[config.embedding]
    with _phase(phases, "k-means"):
        km = clustering.cluster_embedding(
            result.embedding,
            k,
            seed=config.seed,
            metric=metric,
            unsmoothed=prep.model_input,
            unsmoothed_weight=unsmoothed_weight(config.unsmoothed_weight, k_given=n_clusters is not None),
            unsmoothed_gram=inputs.model_gram,
        )
    log.info(
        "clustered the training cells into %d clusters (%s; %s on the %s embedding)",
        k,
        k_method,
        clustering.CLUSTER_ALGORITHM[metric],
        config.embedding,
    )
    cent_cell = np.vstack([result.cell_embedding[km.labels == c].mean(0) for c in range(km.centroids.shape[0])])
    if metric == "cosine":
        cent_cell = clustering.unit_rows(cent_cell)

    embedding = np.full((adata.n_obs, result.embedding.shape[1]), np.nan, dtype=np.float32)
    embedding[prep.cell_mask] = result.embedding
    labels = np.full(adata.n_obs, -1, dtype=np.int64)
    labels[prep.cell_mask] = km.labels

    graph = GraphParams(
        kind="expression",
        n_neighbors=config.n_neighbors,
        metric="cosine",
        pca_threshold=graphs.PCA_THRESHOLD,
        t0=config.t0,
        t1=config.t1,
        gene_neighbors=config.gene_neighbors,
    )
    if spatial is not None:
        from .spatial import refine_labels

        preprocessing = Preprocessing(
            mode="spatial",
            input_mode="scaled",
            expression="counts",
            n_top_genes=config.n_top_genes,
            hvg_flavor="seurat_v3",
            gene_std=tuple(float(v) for v in prep.gene_std),
            max_value=float(prep.max_value),
        )
        graph = replace(graph, kind="spatial", metric="euclidean", refine_neighbours=int(spatial["refine_neighbours"]))
        refined = np.full(adata.n_obs, -1, dtype=np.int64)
        assert coords is not None  # read by _prepare_and_fit in spatial mode
        refined[prep.cell_mask] = refine_labels(km.labels, coords[prep.cell_mask], int(spatial["refine_neighbours"]))
        extra_labels = {"refined": refined}
    else:
        preprocessing = Preprocessing(
            mode="sc",
            input_mode=config.input_mode,
            expression=config.expression,
            n_top_genes=config.n_top_genes,
            hvg_flavor="seurat",
        )
        extra_labels = {}
    manifest = Manifest(
        genes=tuple(prep.genes),
        preprocessing=preprocessing,
        graph=graph,
        model=ModelShape(
            hidden_dim=config.hidden_dim,
            out_dim=config.out_dim,
            embedding=config.embedding,
            fused_dim=int(result.embedding.shape[1]),
            cell_dim=int(result.cell_embedding.shape[1]),
        ),
        clusters=Clusters(
            n_clusters=int(km.centroids.shape[0]),
            method=k_method,
            metric=metric,
            algorithm=clustering.CLUSTER_ALGORITHM[metric],
            k_selection=scores,
            centroids_fused=km.centroids.tolist(),
            centroids_cell=cent_cell.tolist(),
        ),
        config=config.as_dict(),
        training={
            "n_cells": n,
            "n_cells_dropped": int((~prep.cell_mask).sum()),
            "device": describe_torch_device(dev),
            "seconds": round(result.seconds, 3),
            "final_loss": [float(v) for v in result.losses[-1]],
            "torch_version": torch.__version__,
            "batch_size": result.extra.get("batch_size"),
            "peak_gpu_bytes": peak_gpu,
            # batch_size is per process when several trained together (torchrun, DDP).
            **({"processes": result.extra["processes"]} if "processes" in result.extra else {}),
        },
    )
    with _phase(phases, "export"):
        files = model_files(
            result, manifest, labels_kept=km.labels, obs_names=list(adata.obs_names[prep.cell_mask]), export=export
        )
    log.info("phases: %s", phase_line(phases))
    return TrainedModel(
        files=files,
        manifest=manifest,
        embedding=embedding,
        labels=labels,
        device=describe_torch_device(dev),
        seconds=result.seconds,
        n_genes=len(prep.genes),
        extra_labels=extra_labels,
        phases=phases,
    )


@contextlib.contextmanager
def _phase(phases: dict[str, float], name: str) -> Iterator[None]:
    """Record the wall seconds of the block as `phases[name]` (a step that raised records nothing)."""
    clock = time.perf_counter()
    yield
    phases[name] = time.perf_counter() - clock


def phase_line(phases: dict[str, float]) -> str:
    """'preprocess 1.2 s · graphs 3.4 s · …': a run's phases in one line."""
    return " · ".join(f"{name} {seconds:.1f} s" for name, seconds in phases.items())


def train_worker(
    adata: AnnData,
    config: TrainConfig,
    *,
    dist: DistEnv,
    device: Device = "auto",
    batch_size: int | None = None,
    spatial: dict[str, Any] | None = None,
    on_epoch: Callable[[int, LossTerms], None] | None = None,
    out_of_core: Path | None = None,
) -> None:
    """A process of rank > 0 in a torchrun launch: the same preprocessing, graphs and training
    steps as rank 0 (`train_model` with the same `dist`), and nothing written: rank 0 clusters,
    exports and writes every output."""
    if dist.is_main:
        raise ValueError("rank 0 runs train_model")
    _prepare_and_fit(adata, config, device, batch_size, spatial, on_epoch, None, out_of_core, dist, n_clusters=None)


def _prepare_and_fit(
    adata: AnnData,
    config: TrainConfig,
    device: Device,
    batch_size: int | None,
    spatial: dict[str, Any] | None,
    on_epoch: Callable[[int, LossTerms], None] | None,
    on_graph: Callable[[int, int], None] | None,
    out_of_core: Path | None,
    dist: DistEnv | None,
    *,
    n_clusters: int | None,
    phases: dict[str, float] | None = None,
) -> tuple[Any, np.ndarray | None, TrainInputs, TrainResult | None, torch.device]:
    """Preprocessing, graphs and training: (prep, spatial coordinates or None, inputs, result, device).

    phases: filled with the wall seconds of "preprocess", "graphs" and "training" when given.

    With `dist`, every process preprocesses and builds the graphs itself (deterministic; the
    processes compare fingerprints of the graphs before training) and trains with DDP; the
    result is None on ranks > 0.
    """
    from . import distributed
    from .training import build_inputs, fit, fit_distributed, scratch_inputs

    dev = resolve_torch_device(device)
    if dist is not None:
        dev = distributed.local_device(dev, dist)
    phases = {} if phases is None else phases
    with _phase(phases, "preprocess"):
        prep, coords, spatial_adj = _prepare(adata, config, spatial)
    n = prep.model_input.shape[0]
    clustering.check_n_clusters(n_clusters, n)
    if n < config.n_neighbors + 1:
        raise ScrclError(
            f"only {n} cells have counts, fewer than --n-neighbors + 1 = {config.n_neighbors + 1}",
            "Use more cells or a smaller --n-neighbors",
        )
    with contextlib.ExitStack() as stack:
        scratch = stack.enter_context(scratch_inputs(out_of_core)) if out_of_core is not None else None
        with _phase(phases, "graphs"):
            inputs = build_inputs(
                prep.model_input,
                prep.lognorm,
                config,
                graph_device=dev if dev.type == "cuda" else None,
                progress=on_graph,
                adj=spatial_adj,
                scratch_dir=scratch,
            )
        log.info("cell graph: %d cells, %d edges; training on %s", n, inputs.adj.nnz // 2, describe_torch_device(dev))
        result: TrainResult | None
        with _phase(phases, "training"):
            if dist is None:
                result = fit(inputs, config, device=dev, on_epoch=on_epoch, batch_size=batch_size)
            else:
                with distributed.process_group(dist, dev):
                    result = fit_distributed(inputs, config, device=dev, dist=dist, batch_size=batch_size, on_epoch=on_epoch)
    return prep, coords, inputs, result, dev


def _prepare(
    adata: AnnData, config: TrainConfig, spatial: dict[str, Any] | None
) -> tuple[Any, np.ndarray | None, sp.csr_matrix | None]:
    """Preprocessed cells, the spatial coordinates and the spatial graph of their kept cells
    (both None without `spatial`)."""
    x = sp.csr_matrix(adata.X, dtype=np.float32)
    names = [str(v) for v in adata.var_names]
    spatial_adj = None
    coords = None
    if spatial is not None:
        from . import spatial as st

        coords = spatial_coords(adata)
        prep: Any = st.prepare_spatial(x, names, config.n_top_genes)
        spatial_adj = st.spatial_graph(coords[prep.cell_mask], config.n_neighbors)
    else:
        prep = prepare(
            x,
            names,
            n_top_genes=config.n_top_genes,
            input_mode=config.input_mode,
            expression=config.expression,
        )
    return prep, coords, spatial_adj


def spatial_coords(adata: AnnData) -> np.ndarray:
    """obsm['spatial'] as float64 (n_obs, 2); a one-line error when it is missing."""
    from .io.h5ad import check_coords

    if "spatial" not in adata.obsm:
        raise ScrclError(
            "--spatial needs spot coordinates in obsm['spatial'], which this file lacks",
            "Add them (e.g. from the Visium tissue_positions file) or drop --spatial",
        )
    return check_coords(adata.obsm["spatial"], adata.n_obs, "the input")


def export_files(state: dict[str, Any], gene_emb: np.ndarray, manifest: Manifest) -> dict[str, bytes]:
    """ONNX bytes of both views, keyed by their file names."""
    from .export import export_onnx

    meta = onnx_metadata(manifest)
    files = {ONNX_FILES[v]: export_onnx(state, gene_emb, view=v, metadata={**meta, "view": v}) for v in ("fused", "cell")}
    files.update(export_stage_files(state, gene_emb, meta))
    return files


def export_stage_files(state: dict[str, Any], gene_emb: np.ndarray, meta: dict[str, str]) -> dict[str, bytes]:
    """The staged encoders of both views (stages.py) for gcn-pca models; none for fused models."""
    from .export import export_stages

    if "embed_fused_mean" not in state:
        return {}
    files: dict[str, bytes] = {}
    for v in ("fused", "cell"):
        files.update(export_stages(state, gene_emb, view=v, metadata={**meta, "view": v}))
    return files


def model_files(
    result: Any, manifest: Manifest, *, labels_kept: np.ndarray, obs_names: list[str], export: bool
) -> dict[str, bytes]:
    """Bytes of every file of the model directory except the manifest."""
    import torch

    files: dict[str, bytes] = {}
    buf = io.BytesIO()
    torch.save({**result.state, "gene_emb": torch.from_numpy(result.gene_emb)}, buf)
    files["weights.pt"] = buf.getvalue()
    files["genes.txt"] = ("\n".join(manifest.genes) + "\n").encode()
    header = "epoch,total,eda,nca,cvc\n"
    files["loss_log.csv"] = (
        header + "".join(f"{i + 1},{r[0]:.8g},{r[1]:.8g},{r[2]:.8g},{r[3]:.8g}\n" for i, r in enumerate(result.losses))
    ).encode()
    emb = io.BytesIO()
    np.save(emb, result.embedding.astype(np.float32))
    files["train_embedding.npy"] = emb.getvalue()
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")  # cell names may hold commas or quotes
    writer.writerow(["cell", "cluster"])
    writer.writerows(zip(obs_names, (int(v) for v in labels_kept)))
    files["train_clusters.csv"] = table.getvalue().encode()
    if export:
        files.update(export_files(result.state, result.gene_emb, manifest))
    return files


def re_export(path: Path) -> list[str]:
    """Rewrite the ONNX encoders of the model folder `path` from its weights; returns their file names.

    The folder is replaced atomically and only if it holds nothing but its own files.
    `weights.pt` is loaded with torch's ``weights_only``, so it can hold tensors only, never code.
    """
    import io
    import pickle

    import torch

    from .bundle import read_bundle, write_model_dir

    bundle = read_bundle(path)
    try:
        state = torch.load(io.BytesIO(bundle.read_bytes("weights.pt")), weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError):
        raise ScrclError(
            f"weights.pt in {path} holds objects other than tensors, or is damaged; it is never unpickled",
            "Use a model folder written by scrcl-cli train, from a trusted source",
        ) from None
    if not isinstance(state, dict) or not all(isinstance(key, str) for key in state):
        raise ScrclError(f"weights.pt in {path} is not a scrcl-cli state dict", "Retrain the model")
    check_weights(state, bundle.manifest, path)
    gene_emb = state.pop("gene_emb").numpy()
    files = {name: bundle.read_bytes(name) for name in bundle.manifest.files}
    new = export_files(state, gene_emb, bundle.manifest)
    files.update(new)
    write_model_dir(path, files, bundle.manifest, overwrite=True)
    return sorted(new)


def check_weights(state: dict[str, Any], manifest: Manifest, path: Path) -> None:
    """Every tensor the exporter reads must be present, finite and shaped as the manifest says.

    state: the state dict of weights.pt (gene_emb included). Shapes, with G genes, H hidden, O out:
    the `ScRCL` parameters, gene_emb (G, O) and, for gcn-pca, the PCA bases (H,) and (H, D).
    """
    import torch

    model = manifest.model
    g, h, o = len(manifest.genes), model.hidden_dim, model.out_dim
    want: dict[str, tuple[int | None, ...]] = {
        "mlp_w": (h, g), "mlp_b": (h,), "gcn1_w": (h, g), "gcn1_b": (h,), "gcn2_w": (h, h), "gcn2_b": (h,),
        "fc_w": (h, h), "fc_b": (h,), "proj_w": (g, h), "proj_b": (g,), "gene_w": (o, None), "gene_b": (o,),
        "gene_emb": (g, o),
    }  # fmt: skip
    if model.embedding == "gcn-pca":
        for view in ("cell", "fused"):
            want[f"embed_{view}_mean"] = (h,)
            want[f"embed_{view}_components"] = (h, model.width(view))
    unexpected = sorted(set(state) - set(want))
    if unexpected:
        raise ScrclError(
            f"weights.pt in {path} holds an unexpected entry ({unexpected[0][:40]})", "Restore the model folder or retrain"
        )
    for key, shape in want.items():
        value = state.get(key)
        if (
            not isinstance(value, torch.Tensor)
            or value.ndim != len(shape)
            or any(w is not None and w != d for w, d in zip(shape, value.shape))
        ):
            text = "×".join("N" if w is None else str(w) for w in shape)
            raise ScrclError(
                f"weights.pt in {path} does not match its manifest ({key} should be a {text} tensor)",
                "Restore the model folder or retrain",
            )
        if not value.is_floating_point() or not torch.isfinite(value).all():
            raise ScrclError(f"weights.pt in {path} holds a non-finite or non-float entry ({key})", "Retrain the model")
