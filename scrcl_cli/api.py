"""The Python API: what notebooks call, and what the command line calls too.

>>> import scrcl_cli
>>> model = scrcl_cli.fit(adata, n_clusters=8)        # torch; writes obsm['X_scrcl'], obs['scrcl_cluster']
>>> model.save("pbmc_model/")
>>> model = scrcl_cli.load("pbmc_model/")              # no torch
>>> model.cluster(query)                                # obs['scrcl_cluster'], like `scrcl-cli cluster`

`fit` imports torch; `load`, `Model.embed` and `Model.cluster` run on ONNX Runtime only. Every
call writes the same `obsm`/`obs`/`uns` keys as the command line, and the inputs' `X` is never
modified.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import config as C
from ._device import as_device
from ._version import __version__
from .bundle import ONNX_FILES, ModelBundle, owned_entries, read_bundle, write_model_dir
from .errors import ScrclError

if TYPE_CHECKING:
    from anndata import AnnData

    from .inference import ClusterReport, EmbedReport

log = logging.getLogger(__name__)

_DEVICES = ("auto", "cpu", "cuda")
_VIEWS = ("fused", "cell")
KEY_PATTERN = r"[A-Za-z_][A-Za-z0-9_.-]{0,99}"


def _check_int(name: str, value: Any, lo: int, hi: int, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= int(value) <= hi:
        raise ScrclError(f"{name} must be an integer in [{lo}, {hi}], not {value!r}", f"Pass a valid {name}")


def _as_path(value: Any, name: str) -> Path:
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise ScrclError(f"{name} must be a file system path, not {value!r}", f"Pass {name} as a str or pathlib.Path")
    return Path(value)


def _check_choice(name: str, value: Any, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ScrclError(f"{name} must be one of {', '.join(options)}, not {value!r}", f"Pass a valid {name}")


def check_key(key: Any) -> None:
    """An obsm key that stays inside obsm: letters, digits, '_', '.', '-', starting with a letter or '_'."""
    if not isinstance(key, str) or not re.fullmatch(KEY_PATTERN, key):
        raise ScrclError(f"key_added {key!r} is not a valid obsm key", "Use letters, digits, '_', '.', '-', e.g. X_scrcl")


def _check_inference(view: str, device: str, batch_size: int, min_gene_overlap: float, threads: int, key_added: str) -> None:
    _check_choice("view", view, _VIEWS)
    _check_choice("device", device, _DEVICES)
    _check_int("batch_size", batch_size, 1, 1_000_000)
    _check_int("threads", threads, 0, 4096)
    if isinstance(min_gene_overlap, bool) or not isinstance(min_gene_overlap, (int, float)) or not 0 <= min_gene_overlap <= 1:
        raise ScrclError(f"min_gene_overlap must be a number in [0, 1], not {min_gene_overlap!r}", "Pass a fraction")
    check_key(key_added)


def _check_adata(adata: Any, what: str) -> None:
    from anndata import AnnData

    if not isinstance(adata, AnnData):
        raise ScrclError(f"{what} must be an AnnData, not {type(adata).__name__}", "Pass an anndata.AnnData")


@dataclass
class Model:
    """A trained scRCL model: its manifest and files, on disk (`load`) or in memory (`fit`)."""

    bundle: ModelBundle

    @property
    def genes(self) -> list[str]:
        """The model's genes, in the order of its input."""
        return self.bundle.genes

    @property
    def n_clusters(self) -> int:
        """Clusters of the training cells (the centroids `cluster` assigns to)."""
        return self.bundle.manifest.clusters.n_clusters

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the model folder `path` atomically (the same folder `scrcl-cli train -o` writes).

        An existing `path` is replaced only with ``overwrite`` and only if it is a model folder
        holding nothing but its own files.
        """
        from .io.output import Output, check_outputs

        path = _as_path(path, "path")
        if self.bundle.blobs is None:
            raise ScrclError(
                f"this model was loaded from {self.bundle.path} and is already saved", "Copy the folder to save it elsewhere"
            )
        check_outputs([Output(path, "path", "model", owned_entries)], inputs=(), overwrite=overwrite)
        write_model_dir(path, self.bundle.blobs, self.bundle.manifest, overwrite=overwrite)
        return path

    def embed(
        self,
        adata: AnnData,
        *,
        view: str = "fused",
        key_added: str = C.KEY_ADDED,
        device: str = "auto",
        batch_size: int = C.BATCH_SIZE,
        min_gene_overlap: float = C.MIN_GENE_OVERLAP,
        threads: int = 0,
    ) -> EmbedReport:
        """Embed the cells of `adata` (raw counts, or what the model was trained on) in place.

        Writes ``adata.obsm[key_added]`` (float32, n_obs × D: the clustering embedding of the
        `view`) and ``adata.uns['scrcl']`` (versions, model and gene hashes, provider, parameters),
        as ``scrcl-cli embed`` does. Returns a report (provider actually used, genes matched).
        """
        from . import inference

        _check_adata(adata, "adata")
        _check_inference(view, device, batch_size, min_gene_overlap, threads, key_added)
        self.bundle.require(ONNX_FILES[view])
        return inference.embed(
            adata,
            self.bundle,
            view=view,
            device=as_device(device),
            threads=threads,
            batch_size=batch_size,
            min_gene_overlap=min_gene_overlap,
            key_added=key_added,
        )

    def cluster(
        self,
        adata: AnnData,
        *,
        denovo: bool = False,
        n_clusters: int | None = None,
        seed: int = 0,
        view: str = "fused",
        key_added: str = C.KEY_ADDED,
        device: str = "auto",
        batch_size: int = C.BATCH_SIZE,
        min_gene_overlap: float = C.MIN_GENE_OVERLAP,
        threads: int = 0,
    ) -> ClusterReport:
        """Embed `adata` and label every cell, in place, as ``scrcl-cli cluster`` does.

        Default: each cell gets the nearest training centroid (cluster ids shared across samples).
        ``denovo=True`` clusters the query itself into `n_clusters` (or a label-free count).
        Writes everything `embed` writes plus ``obs['scrcl_cluster']`` (categorical),
        ``obs['scrcl_confidence']`` (float) and, for spatial models, ``obs['scrcl_cluster_refined']``.
        """
        from . import inference

        _check_adata(adata, "adata")
        _check_inference(view, device, batch_size, min_gene_overlap, threads, key_added)
        _check_int("seed", seed, 0, 2**32 - 1)
        _check_int("n_clusters", n_clusters, 1, 100_000, optional=True)
        self.bundle.require(ONNX_FILES[view])
        return inference.cluster(
            adata,
            self.bundle,
            denovo=denovo,
            n_clusters=n_clusters,
            seed=seed,
            view=view,
            device=as_device(device),
            threads=threads,
            batch_size=batch_size,
            min_gene_overlap=min_gene_overlap,
            key_added=key_added,
        )


def load(path: str | Path) -> Model:
    """Open a model folder written by `Model.save` or ``scrcl-cli train``; every file is checked (no torch)."""
    return Model(read_bundle(_as_path(path, "path")))


def train_config(*, spatial: bool = False, **options: Any) -> C.TrainConfig:
    """The TrainConfig for `options` (TrainConfig field names); with `spatial`, unset fields take the spatial defaults."""
    fields = set(C.TrainConfig.__dataclass_fields__)
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ScrclError(f"unknown training option {unknown[0]!r}", f"Use one of: {', '.join(sorted(fields))}")
    base = {**(C.SPATIAL_DEFAULTS if spatial else {}), **options}
    try:
        return C.TrainConfig(**base)
    except TypeError as exc:
        raise ScrclError(f"invalid training options ({exc})", "Check the option names and types") from None


def fit(
    adata: AnnData,
    *,
    n_clusters: int | None = None,
    spatial: bool = False,
    device: str = "auto",
    batch_size: int | None = None,
    export: bool = True,
    refine_neighbours: int = C.REFINE_NEIGHBOURS,
    key_added: str = C.KEY_ADDED,
    expression: str = "counts",
    name: str = "adata",
    **options: Any,
) -> Model:
    """Train scRCL on `adata` (raw counts in X by default) and return the model; writes into `adata`.

    `options` are TrainConfig fields (epochs, hidden_dim, out_dim, seed, …; `scrcl_cli.config`).
    Writes ``adata.obsm[key_added]`` (the clustering embedding, NaN for cells with no counts),
    ``adata.obs['scrcl_cluster']`` (categorical; with `spatial` also ``'scrcl_cluster_refined'``)
    and ``adata.uns['scrcl']``, as ``scrcl-cli train --out-h5ad`` does. `X` is not modified.
    Labels are never read. Imports torch.
    """
    import anndata as ad
    import pandas as pd

    from .io.h5ad import check_gene_names, checked_matrix
    from .training import check_fits
    from .workflow import train_model

    _check_adata(adata, "adata")
    _check_choice("device", device, _DEVICES)
    _check_choice("expression", expression, ("counts", "continuous", "log"))
    _check_int("n_clusters", n_clusters, 1, 100_000, optional=True)
    _check_int("batch_size", batch_size, 2, 100_000_000, optional=True)
    _check_int("refine_neighbours", refine_neighbours, 1, 10_000)
    check_key(key_added)
    options.setdefault("n_top_genes", (C.SPATIAL_DEFAULTS if spatial else {}).get("n_top_genes", C.TRAIN_DEFAULTS.n_top_genes))
    config = train_config(spatial=spatial, expression=expression, **options)
    _check_int("seed", config.seed, 0, 2**32 - 1)
    x = checked_matrix(adata.X, adata.var_names, name=name, expression=expression)  # type: ignore[arg-type]
    check_gene_names(adata.var_names, name)
    if n_clusters is not None and n_clusters > adata.n_obs:
        raise ScrclError(
            f"n_clusters {n_clusters} is more than the {adata.n_obs} cells of {name}",
            f"Pass n_clusters between 1 and {adata.n_obs}, or None to choose it from the data",
        )
    check_fits(config, adata.n_obs, adata.n_vars, batch_size=batch_size)
    work = ad.AnnData(X=x, obs=pd.DataFrame(index=adata.obs_names.copy()), var=pd.DataFrame(index=adata.var_names.copy()))
    if "spatial" in adata.obsm:
        work.obsm["spatial"] = np.asarray(adata.obsm["spatial"])
    trained = train_model(
        work,
        config,
        device=as_device(device),
        n_clusters=n_clusters,
        export=export,
        batch_size=batch_size,
        spatial={"refine_neighbours": refine_neighbours} if spatial else None,
    )
    annotate_training_cells(adata, trained, key_added=key_added)
    manifest = trained.manifest.with_files(trained.files, Path("unsaved model"))
    return Model(ModelBundle(path=Path("unsaved model"), manifest=manifest, blobs=dict(trained.files)))


def annotate_training_cells(adata: AnnData, trained: Any, *, key_added: str = C.KEY_ADDED) -> None:
    """Write a training run's embedding, clusters and provenance into `adata` (obsm, obs, uns)."""
    import pandas as pd

    adata.obsm[key_added] = trained.embedding
    k = trained.manifest.clusters.n_clusters
    pairs = [(C.CLUSTER_KEY, trained.labels)] + [(f"{C.CLUSTER_KEY}_{n}", v) for n, v in trained.extra_labels.items()]
    for key, values in pairs:
        labels = [str(v) if v >= 0 else np.nan for v in values]
        adata.obs[key] = pd.Categorical(labels, categories=[str(i) for i in range(k)])
    adata.uns["scrcl"] = {
        "scrcl_version": __version__,
        "genes_sha256": trained.manifest.genes_sha256,
        "device": trained.device,
        "config": dict(trained.manifest.config),
    }
