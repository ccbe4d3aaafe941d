"""The model folder: its files, its manifest's schema, reading with every check, writing.

A model folder comes from someone else, so it is untrusted input. :func:`read_bundle` reads
only regular files directly inside the folder (never through a symlink), bounds their sizes,
checks each file's sha256 against the manifest, validates the manifest against its schema
(types, ranges with upper bounds, shapes consistent with the genes) and the ONNX encoders
against the manifest (no external data, only the operators the exporter writes, inputs and
outputs of the expected names and widths). Every failure is one :class:`ScrclError` line.

Layout of a folder (format :data:`FORMAT_VERSION`, docs/model-format.md):
``scrcl_model.json`` (the manifest), ``genes.txt``, ``weights.pt``, ``encoder_fused.onnx``,
``encoder_cell.onnx``, ``loss_log.csv``, ``train_embedding.npy``, ``train_clusters.csv``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ._version import __version__
from .config import Expression, InputMode
from .errors import ScrclError
from .io.output import MANIFEST_NAME, atomic_path

log = logging.getLogger(__name__)

FORMAT_VERSION = 3
ONNX_FILES = {"fused": "encoder_fused.onnx", "cell": "encoder_cell.onnx"}
MAX_MANIFEST_BYTES = 256 << 20
# names a manifest may list: plain file names, no path separators, control characters or leading dot
_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")
MAX_FILE_BYTES = 8 << 30
# Upper bounds of the manifest's numbers: far above any real model, low enough that a crafted
# value cannot make a run loop for ever or allocate without limit.
MAX_GENES = 1_000_000
MAX_DIM = 65_536
MAX_SMOOTHING = 64
MAX_NEIGHBORS = 1_000
MAX_CLUSTERS = 100_000
MAX_NAME = 1_000

# Operators the exporter writes (export.py), plus shape and arithmetic relatives a future export
# may use. Control flow (Loop, If, Scan) and custom domains are refused: an encoder is a fixed
# feed-forward graph, and a crafted loop could run for ever.
ONNX_OPS = frozenset(
    {
        "Abs",
        "Add",
        "Cast",
        "Clip",
        "Concat",
        "Constant",
        "ConstantOfShape",
        "Div",
        "Exp",
        "Expand",
        "Flatten",
        "Gather",
        "GatherElements",
        "GatherND",
        "Gemm",
        "Identity",
        "LeakyRelu",
        "Log",
        "MatMul",
        "Max",
        "Min",
        "Mul",
        "Neg",
        "Pow",
        "ReduceL2",
        "ReduceMean",
        "ReduceSum",
        "Relu",
        "Reshape",
        "Shape",
        "Sigmoid",
        "Slice",
        "Sqrt",
        "Squeeze",
        "Sub",
        "Sum",
        "Tanh",
        "Transpose",
        "Unsqueeze",
        "Where",
    }
)


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of `data`."""
    return hashlib.sha256(data).hexdigest()


def genes_hash(genes: list[str]) -> str:
    """sha256 of the gene list in order, one name per line (names hold no line breaks: see the schema)."""
    return sha256_bytes("\n".join(genes).encode())


def _corrupt(path: Path, what: str) -> ScrclError:
    return ScrclError(f"the manifest of {path} is invalid ({what})", "Use a model folder written by scrcl-cli train, or retrain")


def read_file(folder: Path, name: str, *, limit: int = MAX_FILE_BYTES) -> bytes:
    """Bytes of the regular file `name` directly inside `folder`, never through a symlink, at most `limit` bytes."""
    if not _FILE_NAME.fullmatch(name):
        raise ScrclError(
            f"the manifest of {folder} names {name[:40]!r}, which is not a file inside the model folder",
            "Use a model folder written by scrcl-cli train",
        )
    path = folder / name
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise ScrclError(f"model folder {folder} is missing {name}", "Restore the model folder or retrain") from None
    except OSError as exc:
        raise ScrclError(
            f"{name} in {folder} cannot be opened ({exc.strerror}); symbolic links are not followed",
            "Copy the real file into the model folder",
        ) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ScrclError(f"{name} in {folder} is not a regular file", "Restore the model folder or retrain")
        if st.st_size > limit:
            raise ScrclError(
                f"{name} in {folder} is {st.st_size / 2**20:.0f} MiB, above the {limit / 2**20:.0f} MiB a model file may have",
                "Use a model folder written by scrcl-cli train",
            )
        chunks = []
        while chunk := os.read(fd, 1 << 24):
            chunks.append(chunk)
            if sum(map(len, chunks)) > limit:
                raise ScrclError(f"{name} in {folder} grew while being read", "Retry when nothing writes the model")
        return b"".join(chunks)
    finally:
        os.close(fd)


def _parse_json(blob: bytes, path: Path) -> Any:
    def no_constants(value: str) -> Any:
        raise ValueError(f"{value} is not a number")

    try:
        return json.loads(blob.decode("utf-8"), parse_constant=no_constants)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise _corrupt(path, f"not JSON: {str(exc)[:80]}") from None


# ----------------------------------------------------------------------------- schema


class _Schema:
    """Checks of one manifest; every failure names the key."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, key: str, what: str) -> ScrclError:
        return _corrupt(self.path, f"{key} {what}")

    def get(self, obj: Mapping[str, Any], key: str, where: str) -> Any:
        if not isinstance(obj, Mapping) or key not in obj:
            raise self.fail(f"{where}{key}", "is missing")
        return obj[key]

    def dict_(self, obj: Any, key: str, where: str = "") -> dict[str, Any]:
        value = self.get(obj, key, where)
        if not isinstance(value, dict):
            raise self.fail(f"{where}{key}", "is not an object")
        return value

    def int_(self, obj: Any, key: str, lo: int, hi: int, where: str = "") -> int:
        value = self.get(obj, key, where)
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise self.fail(f"{where}{key}", f"must be an integer in [{lo}, {hi}], not {str(value)[:40]}")
        return value

    def num(self, obj: Any, key: str, lo: float, hi: float, where: str = "") -> float:
        value = self.get(obj, key, where)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not lo <= value <= hi:
            raise self.fail(f"{where}{key}", f"must be a number in [{lo:g}, {hi:g}], not {str(value)[:40]}")
        return float(value)

    def choice(self, obj: Any, key: str, options: tuple[str, ...], where: str = "") -> str:
        value = self.get(obj, key, where)
        if value not in options:
            raise self.fail(f"{where}{key}", f"must be one of {', '.join(options)}, not {str(value)[:40]}")
        return str(value)

    def matrix(self, obj: Any, key: str, rows: int, cols: int, where: str = "") -> None:
        value = self.get(obj, key, where)
        if not isinstance(value, list) or len(value) != rows:
            raise self.fail(f"{where}{key}", f"must be a list of {rows} rows")
        for row in value:
            if (
                not isinstance(row, list)
                or len(row) != cols
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in row)
            ):
                raise self.fail(f"{where}{key}", f"must hold {rows} rows of {cols} finite numbers")

    def optional(self, obj: Any, key: str, check: Any, *args: Any) -> None:
        """Run `check` on `key` only where `obj` has it (and it is not null)."""
        if isinstance(obj, Mapping) and obj.get(key) is not None:
            check(obj, key, *args)

    def names(self, value: Any, key: str) -> list[str]:
        if not isinstance(value, list) or not 1 <= len(value) <= MAX_GENES:
            raise self.fail(key, f"must be a list of 1 to {MAX_GENES} names")
        for g in value:
            if not isinstance(g, str) or not 0 < len(g) <= MAX_NAME or any(ord(c) < 32 or ord(c) == 127 for c in g):
                raise self.fail(
                    key, f"holds an invalid name ({str(g)[:40]!r}): names are non-empty, printable, at most {MAX_NAME} characters"
                )
        if len(set(value)) != len(value):
            raise self.fail(key, "holds duplicate names")
        return value


def validate_manifest(manifest: Any, path: Path) -> None:
    """Raise a one-line ScrclError unless `manifest` is a complete, consistent manifest of this format."""
    s = _Schema(path)
    if not isinstance(manifest, dict):
        raise _corrupt(path, "not an object")
    version = s.get(manifest, "format_version", "")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise ScrclError(
            f"{path} has model format {version}, newer than this scrcl-cli supports ({FORMAT_VERSION})", "Upgrade scrcl-cli"
        )
    if version != FORMAT_VERSION:
        raise ScrclError(
            f"{path} has model format {str(version)[:20]}, which this scrcl-cli does not read (it reads format {FORMAT_VERSION})",
            "Retrain the model with this scrcl-cli",
        )
    files = s.dict_(manifest, "files")
    for name, digest in files.items():
        if not _FILE_NAME.fullmatch(name) or name == MANIFEST_NAME:
            raise s.fail("files", f"names {name[:40]!r}, not a model file name ({_FILE_NAME.pattern})")
        if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise s.fail(f"files.{name[:40]}", "is not a sha256")
    genes = s.names(s.get(manifest, "genes", ""), "genes")
    if manifest.get("genes_sha256") != genes_hash(genes):
        raise _corrupt(path, "the gene list does not match genes_sha256")
    n_genes = len(genes)
    pre = s.dict_(manifest, "preprocessing")
    mode = s.choice(pre, "mode", ("sc", "spatial"), "preprocessing.")
    s.choice(pre, "input_mode", ("lognorm", "counts", "scaled"), "preprocessing.")
    s.choice(pre, "expression", ("counts", "continuous", "log"), "preprocessing.")
    s.num(pre, "target_sum", 1e-6, 1e12, "preprocessing.")
    s.optional(pre, "n_top_genes", s.int_, 1, MAX_GENES, "preprocessing.")
    s.optional(pre, "hvg_flavor", s.choice, ("seurat", "seurat_v3", "cell_ranger"), "preprocessing.")
    if mode == "spatial":
        std = s.get(pre, "gene_std", "preprocessing.")
        if (
            not isinstance(std, list)
            or len(std) != n_genes
            or not all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in std)
        ):
            raise s.fail("preprocessing.gene_std", f"must hold {n_genes} finite non-negative numbers")
        s.num(pre, "max_value", 1e-6, 1e12, "preprocessing.")
    graph = s.dict_(manifest, "graph")
    kind = s.choice(graph, "kind", ("expression", "spatial"), "graph.")
    if (kind == "spatial") != (mode == "spatial"):
        raise s.fail("graph.kind", f"{kind} does not match preprocessing.mode {mode}")
    s.int_(graph, "n_neighbors", 1, MAX_NEIGHBORS, "graph.")
    s.int_(graph, "t0", 0, MAX_SMOOTHING, "graph.")
    s.int_(graph, "t1", 0, MAX_SMOOTHING, "graph.")
    s.int_(graph, "pca_threshold", 0, MAX_GENES, "graph.")
    s.optional(graph, "refine_neighbours", s.int_, 1, MAX_NEIGHBORS * 10, "graph.")
    s.optional(graph, "gene_neighbors", s.int_, 0, MAX_NEIGHBORS, "graph.")
    s.optional(graph, "metric", s.choice, ("cosine", "euclidean"), "graph.")
    model = s.dict_(manifest, "model")
    s.int_(model, "hidden_dim", 1, MAX_DIM, "model.")
    s.int_(model, "out_dim", 1, MAX_DIM, "model.")
    s.choice(model, "embedding", ("gcn-pca", "fused"), "model.")
    dims = {"fused": s.int_(model, "fused_dim", 1, MAX_DIM, "model."), "cell": s.int_(model, "cell_dim", 1, MAX_DIM, "model.")}
    clusters = s.dict_(manifest, "clusters")
    k = s.int_(clusters, "n_clusters", 1, MAX_CLUSTERS, "clusters.")
    s.choice(clusters, "metric", ("euclidean", "cosine"), "clusters.")
    s.optional(clusters, "method", s.choice, ("given", "leiden-count"), "clusters.")
    s.optional(clusters, "algorithm", s.choice, ("ward-kmeans", "spherical-kmeans"), "clusters.")
    for view, dim in dims.items():
        s.matrix(clusters, f"centroids_{view}", k, dim, "clusters.")
    for key in ("config", "training"):
        s.dict_(manifest, key)
    # the one config entry read back: `cluster --denovo` clusters beside the unsmoothed PCA with it
    s.optional(manifest["config"], "unsmoothed_weight", s.num, 0.0, 10.0, "config.")


# ----------------------------------------------------------------------------- typed manifest


@dataclass(frozen=True)
class Preprocessing:
    """How a query's values become the encoder's input (fixed at training)."""

    mode: str  # "sc" or "spatial"
    input_mode: InputMode | Literal["scaled"]  # "scaled": spatial models
    expression: Expression  # what X holds
    target_sum: float = 1e4
    n_top_genes: int | None = None
    hvg_flavor: str | None = None
    gene_std: tuple[float, ...] | None = None  # spatial: per-gene scale, (G,)
    max_value: float | None = None  # spatial: clip after scaling

    @property
    def is_spatial(self) -> bool:
        return self.mode == "spatial"


@dataclass(frozen=True)
class GraphParams:
    """The cell graph a query is smoothed over, built from the query itself."""

    kind: str  # "expression" (cosine kNN) or "spatial" (kNN of obsm['spatial'])
    n_neighbors: int  # k, counting the cell
    t0: int  # smoothing steps of the MLP view's input
    t1: int  # smoothing steps of the GCN view's input
    pca_threshold: int  # search on PCA 50 from this many cells (0: always)
    metric: str = "cosine"
    gene_neighbors: int | None = None
    refine_neighbours: int | None = None  # spatial label refinement

    @property
    def is_spatial(self) -> bool:
        return self.kind == "spatial"


@dataclass(frozen=True)
class ModelShape:
    """Widths of the network and of the two encoders' outputs."""

    hidden_dim: int
    out_dim: int
    embedding: str  # "gcn-pca" or "fused"
    fused_dim: int
    cell_dim: int

    def width(self, view: str) -> int:
        """Output width of `view`'s encoder ("fused" or "cell")."""
        return self.fused_dim if view == "fused" else self.cell_dim


@dataclass(frozen=True)
class Clusters:
    """The training clusters: query cells get the nearest of these centroids."""

    n_clusters: int
    metric: str  # "euclidean" (gcn-pca) or "cosine" (fused)
    centroids_fused: list[list[float]]  # (K, fused_dim)
    centroids_cell: list[list[float]]  # (K, cell_dim)
    method: str = "given"  # "given" or "leiden-count"
    algorithm: str | None = None
    k_selection: Any = None

    def centroids(self, view: str) -> np.ndarray:
        """Centroids of `view`, float64 (K, D)."""
        return np.asarray(self.centroids_fused if view == "fused" else self.centroids_cell, dtype=np.float64)


@dataclass(frozen=True)
class Manifest:
    """The model folder's ``scrcl_model.json``, typed; :meth:`from_json` is the only reader.

    ``config`` (every training hyperparameter) and ``training`` (cells, device, time, losses) are
    records of how the model was made; only ``config.unsmoothed_weight`` is read back
    (:attr:`unsmoothed_weight`).
    """

    genes: tuple[str, ...]
    preprocessing: Preprocessing
    graph: GraphParams
    model: ModelShape
    clusters: Clusters
    config: dict[str, Any]
    training: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256
    format_version: int = FORMAT_VERSION
    scrcl_version: str = __version__

    @cached_property
    def genes_sha256(self) -> str:
        return genes_hash(list(self.genes))

    @property
    def unsmoothed_weight(self) -> float | None:
        """The training's ``--unsmoothed-weight`` (None: the default rule, `config.unsmoothed_weight`)."""
        value = self.config.get("unsmoothed_weight")
        return None if value is None else float(value)

    def to_json(self) -> dict[str, Any]:
        """The JSON object written as ``scrcl_model.json`` (absent optional fields left out)."""

        def section(obj: Any) -> dict[str, Any]:
            return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(obj).items() if v is not None}

        return {
            "format_version": self.format_version,
            "scrcl_version": self.scrcl_version,
            "genes": list(self.genes),
            "genes_sha256": self.genes_sha256,
            "preprocessing": section(self.preprocessing),
            "graph": section(self.graph),
            "model": section(self.model),
            "clusters": section(self.clusters),
            "config": dict(self.config),
            "training": dict(self.training),
            "onnx": dict(ONNX_FILES),
            "files": dict(self.files),
        }

    @classmethod
    def from_json(cls, obj: Any, path: Path) -> Manifest:
        """Validate a parsed ``scrcl_model.json`` (:func:`validate_manifest`) and type it."""
        validate_manifest(obj, path)
        pre = dict(obj["preprocessing"])
        if pre.get("gene_std") is not None:
            pre["gene_std"] = tuple(float(v) for v in pre["gene_std"])
        pre["target_sum"] = float(pre["target_sum"])
        return cls(
            genes=tuple(obj["genes"]),
            preprocessing=_section(Preprocessing, pre),
            graph=_section(GraphParams, obj["graph"]),
            model=_section(ModelShape, obj["model"]),
            clusters=_section(Clusters, obj["clusters"]),
            config=dict(obj["config"]),
            training=dict(obj["training"]),
            files=dict(obj["files"]),
            format_version=obj["format_version"],
            scrcl_version=str(obj.get("scrcl_version", "")),
        )

    def with_files(self, files: Mapping[str, bytes], where: Path) -> Manifest:
        """This manifest listing `files` (name -> sha256), stamped with this format and version, validated.

        The JSON round trip proves it can be written: non-finite numbers (a diverged training) fail
        here, before anything is written.
        """
        stamped = replace(
            self,
            files={name: sha256_bytes(blob) for name, blob in files.items()},
            format_version=FORMAT_VERSION,
            scrcl_version=__version__,
        )
        try:
            text = json.dumps(stamped.to_json(), allow_nan=False)
        except ValueError as exc:
            raise ScrclError(
                "training produced non-finite numbers (NaN or infinity) in the model",
                "Lower --lr, or use a larger --hidden-dim / --out-dim",
            ) from exc
        return Manifest.from_json(json.loads(text), where)


def _section(cls: Any, obj: Mapping[str, Any]) -> Any:
    """The dataclass `cls` from the keys of a validated manifest section that name its fields
    (a key the schema does not know is ignored; an absent optional field keeps its default)."""
    return cls(**{f.name: obj[f.name] for f in fields(cls) if obj.get(f.name) is not None})


def _read_manifest_or_none(folder: Path) -> Manifest | None:
    try:
        return read_manifest(folder)
    except ScrclError:
        return None


def read_manifest(folder: Path) -> Manifest:
    """The validated, typed manifest of `folder` (its files are not checked: see :func:`read_bundle`)."""
    return Manifest.from_json(_parse_json(read_file(folder, MANIFEST_NAME, limit=MAX_MANIFEST_BYTES), folder), folder)


def owned_entries(folder: Path) -> list[str] | None:
    """Names of the entries of `folder` that scrcl-cli wrote, or None when it holds anything else.

    A folder is ours when it holds a valid model manifest and, besides it, only the regular files
    that manifest lists; a stray JSON file with a ``files`` key does not make a folder deletable.
    """
    manifest = _read_manifest_or_none(Path(folder))
    if manifest is None:
        return None
    allowed = set(manifest.files) | {MANIFEST_NAME}
    present = []
    for entry in os.scandir(folder):
        if entry.name not in allowed or not entry.is_file(follow_symlinks=False):
            return None
        if entry.name != MANIFEST_NAME:
            # a copied or crafted manifest must not make a user's file "ours": its content must match
            try:
                blob = read_file(Path(folder), entry.name)
            except ScrclError:
                return None
            if sha256_bytes(blob) != manifest.files[entry.name]:
                return None
        present.append(entry.name)
    return present


# ----------------------------------------------------------------------------- ONNX


def check_onnx(blob: bytes, view: str | None, manifest: Manifest, where: str) -> None:
    """Refuse an ONNX encoder that could read outside the folder, loop, or does not fit the manifest.

    Checks: parseable; every tensor stored inline (no external data); default-domain operators of
    :data:`ONNX_OPS` only, in every subgraph; inputs and output named and shaped as the exporter
    writes them for `view` (x0 (N, G) [, xs (M, G), nbr (N, K) int64, w (N, K)] -> embedding (N, D)),
    with G the manifest's gene count and D its width for that view; the gene hash in its metadata.
    """
    try:
        import onnx
    except ImportError as exc:  # pragma: no cover - onnx ships with the cpu/gpu extras
        raise ScrclError("the onnx package is missing, so the model cannot be checked", "pip install onnx") from exc

    def bad(what: str) -> ScrclError:
        return ScrclError(
            f"{where} is not a valid scrcl-cli encoder ({what})", "Re-export the model with scrcl-cli export, or retrain"
        )

    try:
        proto = onnx.ModelProto.FromString(blob)  # a protobuf parse only: external data is never loaded
    except Exception as exc:  # protobuf raises DecodeError and others on damaged bytes
        raise bad(f"unreadable: {str(exc).splitlines()[0][:80] if str(exc) else type(exc).__name__}") from None
    for imp in proto.opset_import:
        if imp.domain not in ("", "ai.onnx"):
            raise bad(f"operator domain {imp.domain!r}")

    def tensors_inline(tensors: Any) -> None:
        for t in tensors:
            if t.data_location == onnx.TensorProto.EXTERNAL or len(t.external_data):
                raise bad(f"tensor {t.name[:40]!r} is stored as external data, outside the model file")

    def walk(graph: Any) -> None:
        tensors_inline(graph.initializer)
        tensors_inline(s.values for s in graph.sparse_initializer)
        for node in graph.node:
            if node.domain not in ("", "ai.onnx") or node.op_type not in ONNX_OPS:
                raise bad(
                    f"operator {node.domain + '.' if node.domain else ''}{node.op_type[:40]} is not one the exporter writes"
                )
            for attr in node.attribute:
                if attr.HasField("t"):
                    tensors_inline([attr.t])
                tensors_inline(attr.tensors)
                if attr.HasField("g") or len(attr.graphs):
                    raise bad(f"operator {node.op_type} holds a subgraph")

    walk(proto.graph)
    meta = {p.key: p.value for p in proto.metadata_props}
    if meta.get("genes_sha256") != manifest.genes_sha256:
        raise bad("its gene hash differs from the manifest's")
    if view is None:  # a stage of a staged encoder: its widths are checked on its outputs at run time
        return
    n_genes = len(manifest.genes)
    dim = manifest.model.width(view)
    want = (
        {"x0": (1, 2, n_genes)}
        if view == "cell"
        else {"x0": (1, 2, n_genes), "xs": (1, 2, n_genes), "nbr": (7, 2, None), "w": (1, 2, None)}
    )
    inputs = {i.name: i for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}}
    if set(inputs) != set(want):
        raise bad(f"inputs {sorted(inputs)[:6]} instead of {sorted(want)}")
    for name, (dtype, rank, width) in want.items():
        tt = inputs[name].type.tensor_type
        dims = list(tt.shape.dim)
        if tt.elem_type != dtype or len(dims) != rank or (width is not None and dims[1].dim_value not in (0, width)):
            raise bad(f"input {name} has the wrong type or shape for {n_genes} genes")
    if len(proto.graph.output) != 1:
        raise bad(f"{len(proto.graph.output)} outputs instead of 1")
    out = proto.graph.output[0].type.tensor_type
    odims = list(out.shape.dim)
    if out.elem_type != 1 or len(odims) != 2 or odims[1].dim_value not in (0, dim):
        raise bad(f"its output is not float32 (cells, {dim})")


# ----------------------------------------------------------------------------- folder


@dataclass(frozen=True)
class ModelBundle:
    """A model folder whose manifest, file hashes and encoders were checked."""

    path: Path
    manifest: Manifest
    blobs: dict[str, bytes] | None = None  # the files of a model that was trained and not yet saved

    @property
    def genes(self) -> list[str]:
        return list(self.manifest.genes)

    @property
    def is_spatial(self) -> bool:
        return self.manifest.preprocessing.is_spatial

    def has(self, name: str) -> bool:
        return name in self.manifest.files

    def require(self, name: str) -> None:
        """Fail unless the manifest lists `name` (a model trained with --no-export has no encoders)."""
        if name not in self.manifest.files:
            raise ScrclError(f"model folder {self.path} has no {name}", f"Write it with: scrcl-cli export {self.path}")

    def read_bytes(self, name: str) -> bytes:
        """Read a listed file and check its sha256 against the manifest."""
        self.require(name)
        blob = self.blobs[name] if self.blobs is not None else read_file(self.path, name)
        if sha256_bytes(blob) != self.manifest.files[name]:
            raise ScrclError(
                f"{name} in {self.path} does not match the sha256 in its manifest (the file was changed)",
                "Restore the model folder from its source or retrain",
            )
        return blob

    def stage_encoder(self, name: str) -> bytes:
        """The ONNX bytes of one stage of a staged encoder (`stages.py`), hash-checked and validated."""
        blob = self.read_bytes(name)
        check_onnx(blob, None, self.manifest, f"{name} in {self.path}")
        return blob

    def encoder(self, view: str) -> bytes:
        """The ONNX bytes of `view`'s encoder, hash-checked and validated (:func:`check_onnx`)."""
        blob = self.read_bytes(ONNX_FILES[view])
        check_onnx(blob, view, self.manifest, f"{ONNX_FILES[view]} in {self.path}")
        return blob


def read_bundle(path: Path) -> ModelBundle:
    """Open a model folder: parse and validate the manifest, check every listed file's hash."""
    path = Path(path)
    if not path.exists():
        raise ScrclError(f"model folder {path} does not exist", "Pass the folder written by scrcl-cli train")
    if not path.is_dir():
        raise ScrclError(f"{path} is a file, not a model folder", "Pass the folder written by scrcl-cli train (-m model/)")
    if not (path / MANIFEST_NAME).exists() and not (path / MANIFEST_NAME).is_symlink():
        raise ScrclError(f"{path} has no {MANIFEST_NAME}", "Pass the folder written by scrcl-cli train")
    bundle = ModelBundle(path=path, manifest=read_manifest(path))
    for name in bundle.manifest.files:
        bundle.read_bytes(name)  # every hash before anything is loaded
    return bundle


def write_model_dir(dest: Path, files: dict[str, bytes], manifest: Manifest, *, overwrite: bool) -> Path:
    """Write a model folder atomically: every file in `files`, then the manifest listing them.

    The manifest is stamped and validated (:meth:`Manifest.with_files`) before anything is
    written, so the tool never writes a folder it would refuse.
    """
    text = json.dumps(manifest.with_files(files, Path(dest)).to_json(), indent=1)
    with atomic_path(dest, overwrite=overwrite, directory=True, owned=owned_entries) as tmp:
        for name, blob in files.items():
            (tmp / name).write_bytes(blob)
        (tmp / MANIFEST_NAME).write_text(text)
    return Path(dest)


def check_mode(bundle: ModelBundle, *, spatial: bool) -> None:
    """A spatial model needs --spatial and an expression model must not get it: never switch silently."""
    if bundle.is_spatial and not spatial:
        raise ScrclError(f"{bundle.path} was trained with --spatial", "Pass --spatial (the query needs obsm['spatial'])")
    if spatial and not bundle.is_spatial:
        raise ScrclError(
            f"--spatial was given but {bundle.path} is an expression (non-spatial) model",
            "Drop --spatial or use a model trained with scrcl-cli train --spatial",
        )


def onnx_metadata(manifest: Manifest) -> dict[str, str]:
    """Key manifest fields repeated in each ONNX file's metadata_props."""
    doc = manifest.to_json()
    return {
        "scrcl_version": __version__,
        "genes_sha256": manifest.genes_sha256,
        "n_genes": str(len(manifest.genes)),
        "preprocessing": json.dumps(doc["preprocessing"]),
        "graph": json.dumps(doc["graph"]),
        "out_dim": str(manifest.model.out_dim),
    }
