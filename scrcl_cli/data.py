"""Reading and validating `.h5ad` input, gene alignment, atomic writes, model directories.

Every check that can fail on user data runs here, before any expensive work, and raises
:class:`~scrcl_cli.errors.ScrclError` with the problem and the fix. Inputs are opened
read-only; every output is written to a temporary name beside its destination and then
renamed, so a killed job leaves either nothing or the previous complete file.

Queries for embed/cluster are read with `ChunkedH5ad` (X in blocks of cells, the same checks
and messages as `read_h5ad_checked`), and their outputs written with `write_h5ad_patched` (a
copy of the input plus the new elements), so neither step holds X whole.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import scipy.sparse as sp

from ._version import __version__
from .errors import ScrclError

if TYPE_CHECKING:
    from anndata import AnnData

log = logging.getLogger(__name__)

Expression = Literal["counts", "continuous", "log"]
TMP_TAG = ".scrcl-tmp-"
MANIFEST_NAME = "scrcl_model.json"
FORMAT_VERSION = 3
# Format 3 added the gcn-pca clustering embedding (manifest model.embedding, clusters.metric; PCA
# bases in weights.pt): an older reader would cluster its embedding by cosine, so it must refuse.
# Format-2 directories have neither key and are the fused embedding with cosine clusters.
# Format 2 changed the fused encoder's inputs (x1 -> xs = Â^(t1+1) X, targets vs neighbourhood);
# older directories still load (for `scrcl-cli export`), but their encoders are not run.
MIN_ENCODER_FORMAT = 2
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


# --------------------------------------------------------------------------- input


def _check_h5ad_file(path: Path) -> None:
    """The file checks that come before any HDF5 read: it exists, is a file and has the HDF5 signature."""
    if not path.exists():
        raise ScrclError(f"{path} does not exist", "Check the path and the current directory")
    if path.is_dir():
        raise ScrclError(f"{path} is a directory, not an .h5ad file", "Pass the path of the .h5ad file itself")
    with path.open("rb") as fh:
        head = fh.read(8)
    if head != _HDF5_SIGNATURE:
        raise ScrclError(
            f"{path} is not an HDF5/.h5ad file",
            "Convert it with anndata (e.g. anndata.read_csv(...).write_h5ad(...)) first",
        )


def _unreadable(path: Path, exc: BaseException) -> ScrclError:
    first = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
    return ScrclError(
        f"{path} could not be read as AnnData ({first})",
        "The file may be truncated or corrupt; re-export it and check its size",
    )


def read_h5ad_checked(path: Path, *, expression: Expression = "counts", from_model: bool = False) -> AnnData:
    """Read an `.h5ad` file and validate its `X` for scRCL.

    Parameters
    ----------
    path
        The file. It is opened read-only and never modified.
    expression
        What `X` holds: ``counts`` (non-negative integers), ``continuous`` (non-negative,
        non-integer allowed: TPM, RPKM) or ``log`` (already log-normalised, non-negative).
    from_model
        `expression` comes from a model's manifest (embed, cluster), not from ``--expression``;
        only the suggested fix differs.

    Returns
    -------
    The AnnData with `X` as float32 CSR, checked for shape, finiteness, sign, integrality
    and unique gene names.
    """
    import anndata

    path = Path(path)
    _check_h5ad_file(path)
    try:
        with warnings.catch_warnings():
            # anndata warns on stderr about duplicate names; duplicate genes are an error below.
            warnings.filterwarnings("ignore", message=r".* names are not unique", category=UserWarning)
            adata = anndata.read_h5ad(path)
    except Exception as exc:  # h5py/anndata raise many types for damaged files
        raise _unreadable(path, exc) from exc
    validate_adata(adata, name=path.name, expression=expression, from_model=from_model)
    _warn_duplicate_cells(adata.obs_names, path.name)
    return adata


def _warn_duplicate_cells(obs_names: Any, name: str) -> None:
    if obs_names.has_duplicates:
        log.warning("%s has %d duplicate cell names; outputs keep them as they are",
                    name, int(obs_names.duplicated().sum()))


def _check_shape(has_x: bool, n_obs: int, n_vars: int, name: str) -> None:
    if not has_x:
        raise ScrclError(f"{name} has no X matrix", "Store the expression matrix in adata.X")
    if n_obs == 0:
        raise ScrclError(f"{name} has 0 cells", "Check the filter that produced it")
    if n_vars == 0:
        raise ScrclError(f"{name} has 0 genes", "Check the filter that produced it")


def _check_dtype(dtype: np.dtype, name: str) -> None:
    if not np.issubdtype(dtype, np.number) or np.issubdtype(dtype, np.complexfloating):
        raise ScrclError(f"{name} has a non-numeric X (dtype {dtype})", "Store numbers in adata.X")


def _check_unique_genes(var_names: Any, name: str) -> None:
    dup = var_names[var_names.duplicated()]
    if len(dup):
        raise ScrclError(
            f"{name} has {len(dup)} duplicate gene names (first: {dup[0]})",
            "Make them unique, e.g. with adata.var_names_make_unique()",
        )


class ValueCheck:
    """The value checks on X (finite, non-negative, below 1e9, integers for counts), fed in pieces.

    `update` takes the stored values of consecutive row blocks of X in row-major order (CSR
    `data`, or a dense block raveled); `raise_first` then raises exactly the error that one
    `update` with all of X would give: totals, minimum, maximum and the first non-integer value
    are accumulated, and the checks keep their order (NaN/inf, negative, too large,
    non-integer). `validate_adata` and `ChunkedH5ad` both use it, so whole and chunked reads
    fail with the same one-line message.
    """

    def __init__(self, name: str, *, expression: Expression = "counts", from_model: bool = False) -> None:
        self.name, self.expression, self.from_model = name, expression, from_model
        self.n_values = 0
        self.n_bad = 0  # NaN or infinite
        self.n_neg = 0
        self.min = np.inf
        self.max = -np.inf
        self.first_nonint: float | None = None

    def update(self, values: np.ndarray) -> None:
        """Account for `values`, 1-D, any numeric dtype (checked in float64, as stored)."""
        values = np.asarray(values).ravel().astype(np.float64, copy=False)
        if not values.size:
            return
        self.n_values += values.size
        self.n_bad += int(np.count_nonzero(~np.isfinite(values)))
        self.n_neg += int(np.count_nonzero(values < 0))
        # min/max are NaN when values hold a NaN; that case raises the NaN error first.
        self.min = min(self.min, float(values.min()))
        self.max = max(self.max, float(values.max()))
        if self.expression == "counts" and self.first_nonint is None:
            with np.errstate(invalid="ignore"):  # inf - inf; an infinite value raises its own error first
                nonint = np.flatnonzero(np.abs(values - np.round(values)) > 1e-6)
            if nonint.size:
                self.first_nonint = float(values[nonint[0]])

    def raise_first(self) -> None:
        """Raise the first failed check as a one-line ScrclError; return when every value passed."""
        name = self.name
        if self.n_bad:
            raise ScrclError(
                f"{name} has {self.n_bad} NaN or infinite values in X",
                "Remove or impute them before running scrcl-cli",
            )
        if self.n_neg:
            raise ScrclError(
                f"{name} has {self.n_neg} negative values in X (min {self.min:.4g})",
                "Pass raw counts; scaled or centred data cannot be used",
            )
        if self.n_values and self.max > 1e9:
            raise ScrclError(
                f"{name} has values up to {self.max:.3g} in X, too large for float32 work",
                "Pass raw counts or normalised values",
            )
        if self.first_nonint is not None:
            # embed/cluster have no --expression: the model fixes it, so the fix is to retrain.
            fix = ("The model was trained on raw counts: pass raw counts, or use a model trained with "
                   "--expression continuous (TPM/RPKM) or --expression log (log-normalised data)" if self.from_model else
                   "Pass raw counts, or --expression continuous for TPM/RPKM or --expression log for log-normalised data")
            raise ScrclError(
                f"{name} holds non-integer values in X where raw counts are expected (first: {self.first_nonint:.4g})",
                fix,
            )


def validate_adata(adata: AnnData, *, name: str, expression: Expression = "counts", from_model: bool = False) -> None:
    """Check `adata.X` in place of use; converts X to float32 CSR. Raises ScrclError."""
    _check_shape(adata.X is not None, adata.n_obs, adata.n_vars, name)
    x = adata.X
    if not (sp.issparse(x) or isinstance(x, np.ndarray)):
        try:
            x = np.asarray(x)
        except Exception as exc:
            raise ScrclError(f"{name} stores X as {type(x).__name__}", "Store X as a dense array or CSR matrix") from exc
    if sp.issparse(x):
        x = sp.csr_matrix(x)
    _check_dtype(x.dtype, name)
    check = ValueCheck(name, expression=expression, from_model=from_model)
    check.update(x.data if sp.issparse(x) else np.asarray(x))
    check.raise_first()
    _check_unique_genes(adata.var_names, name)
    adata.X = _as_float32_csr(x)


def _as_float32_csr(x: Any) -> sp.csr_matrix:
    """float32 CSR of a checked sparse or dense block; the one conversion used for whole and chunked reads."""
    return sp.csr_matrix(x, dtype=np.float32) if sp.issparse(x) else sp.csr_matrix(np.asarray(x, dtype=np.float32))


def _anndata_io() -> tuple[Any, Any, Any]:
    """anndata's element-level API: (read_elem, write_elem, sparse_dataset)."""
    try:
        from anndata.io import read_elem, sparse_dataset, write_elem
    except ImportError:  # anndata < 0.11 keeps them in anndata.experimental
        from anndata.experimental import read_elem, sparse_dataset, write_elem
    return read_elem, write_elem, sparse_dataset


CHUNK_BYTES = 64 << 20  # stored values per block, counted as the float64 copy the value checks make
MAX_CHUNK_ROWS = 50_000


class ChunkedH5ad:
    """An `.h5ad` query whose `X` is read in row blocks, never whole (except CSC, see below).

    Opening reads only the metadata: the shape and storage of `X`, the gene names
    (`var_names`, length n_vars), the cell names (`obs_names`, length n_obs) and
    `obsm['spatial']` when present (`spatial`, float64 (n_obs, 2) or None), and runs the
    checks of `read_h5ad_checked` that need no values: the file checks, no X, 0 cells, 0 genes,
    a non-numeric X. `chunks()` then yields X as float32 CSR blocks of consecutive rows while
    feeding `ValueCheck`, and raises its error (or the duplicate-gene error) after the last
    block, so a bad value anywhere gives the same one-line message as the whole read.

    X stored as CSR or dense is read `chunk_rows` rows at a time, so memory is one block plus
    what the caller keeps. X stored as CSC cannot be cut into rows without reading every
    column, so it is read whole (logged). Files from anndata < 0.7 (data frames as HDF5
    compound datasets) are read whole with `read_h5ad_checked` (logged).
    """

    def __init__(self, path: Path, *, expression: Expression = "counts", from_model: bool = False,
                 chunk_rows: int | None = None, chunk_bytes: int = CHUNK_BYTES) -> None:
        import h5py
        import pandas as pd

        self.path = Path(path)
        self.name = self.path.name
        self.expression: Expression = expression
        self.from_model = from_model
        self._memory: sp.csr_matrix | None = None  # X of a legacy file, read whole and checked
        _check_h5ad_file(self.path)
        read_elem, _, sparse_dataset = _anndata_io()
        try:
            with h5py.File(self.path, "r") as f:
                legacy = any(isinstance(f.get(k), h5py.Dataset) for k in ("obs", "var"))
                if not legacy:
                    self.var_names = _frame_index(f, "var", read_elem)
                    self.obs_names = _frame_index(f, "obs", read_elem)
                    spatial = f["obsm"].get("spatial") if "obsm" in f else None
                    self.spatial = None if spatial is None else np.asarray(read_elem(spatial), dtype=np.float64)
                    x = f.get("X")
                    layout, dtype, nnz, hdf5_rows, shape = _x_storage(x, sparse_dataset)
                    if shape is not None and shape != (len(self.obs_names), len(self.var_names)):
                        raise ValueError(f"X has shape {shape} for {len(self.obs_names)} cells and "
                                         f"{len(self.var_names)} genes")
        except ScrclError:
            raise
        except Exception as exc:  # h5py/anndata raise many types for damaged files
            raise _unreadable(self.path, exc) from exc
        if legacy:
            log.info("%s was written by anndata < 0.7: reading it whole", self.name)
            adata = read_h5ad_checked(self.path, expression=expression, from_model=from_model)
            self.var_names, self.obs_names = pd.Index(adata.var_names), pd.Index(adata.obs_names)
            self.spatial = np.asarray(adata.obsm["spatial"], dtype=np.float64) if "spatial" in adata.obsm else None
            self._memory = adata.X
            layout, dtype, nnz, hdf5_rows = "memory", np.dtype(np.float32), adata.X.nnz, None
        self.n_obs, self.n_vars = len(self.obs_names), len(self.var_names)
        _check_shape(layout is not None, self.n_obs, self.n_vars, self.name)
        if layout == "other":
            raise ScrclError(f"{self.name} stores X as {dtype}", "Store X as a dense array or CSR matrix")
        _check_dtype(dtype, self.name)
        self.layout, self.dtype = layout, dtype
        self.has_duplicate_genes = bool(self.var_names.has_duplicates)
        _warn_duplicate_cells(self.obs_names, self.name)
        if chunk_rows is None:
            # The float64 copy the value checks make is the largest per-block array; the others are of its order.
            # Smaller blocks (16 MiB) lowered the preparation's own peak but raised the whole embed's by
            # ~95 MiB on a 50,000-cell CSR query: glibc keeps freed mid-size blocks in its heap (its
            # mmap threshold grows to 32 MiB), and the kNN graph that follows then peaks above them.
            per_row = 8 * (self.n_vars if layout == "dense" else max(1, -(-int(nnz) // self.n_obs)))
            chunk_rows = min(MAX_CHUNK_ROWS, max(1, chunk_bytes // per_row))
            if hdf5_rows:  # whole HDF5 chunks per block: a chunk cut in two is decompressed twice
                chunk_rows = max(hdf5_rows, chunk_rows // hdf5_rows * hdf5_rows)
        self.chunk_rows = max(1, min(int(chunk_rows), self.n_obs))

    def chunks(self) -> Iterator[sp.csr_matrix]:
        """Yield X as float32 CSR blocks of consecutive rows, (<= chunk_rows, n_vars), in order.

        After the last block, raises the ScrclError that `validate_adata` raises on the whole X
        (values first, then duplicate gene names), if any.
        """
        check = ValueCheck(self.name, expression=self.expression, from_model=self.from_model)
        for block in self._raw_blocks():
            check.update(block.data if sp.issparse(block) else block)
            yield _as_float32_csr(block)
        check.raise_first()
        _check_unique_genes(self.var_names, self.name)

    def validate(self) -> None:
        """Read all of X for its checks only; raises what `chunks()` would raise."""
        for _ in self.chunks():
            pass

    def _raw_blocks(self) -> Iterator[Any]:
        """Row blocks of X as stored (dtype and all): CSR matrices or dense arrays."""
        import h5py

        n, step = self.n_obs, self.chunk_rows
        if self._memory is not None:
            for start in range(0, n, step):
                yield self._memory[start:start + step]
            return
        _, _, sparse_dataset = _anndata_io()
        try:
            with h5py.File(self.path, "r") as f:
                if self.layout == "csc":
                    log.info("%s stores X column-wise (CSC): reading it whole; store X as CSR to read it in "
                             "blocks of cells", self.name)
                    whole = sp.csr_matrix(sparse_dataset(f["X"]).to_memory())
                    for start in range(0, n, step):
                        yield whole[start:start + step]
                    return
                x = f["X"] if self.layout == "dense" else sparse_dataset(f["X"])
                for start in range(0, n, step):
                    block = x[start:min(n, start + step)]
                    yield sp.csr_matrix(block) if sp.issparse(block) else np.asarray(block)
        except (ScrclError, GeneratorExit):
            raise
        except Exception as exc:  # a damaged block deep in the file
            raise _unreadable(self.path, exc) from exc


def _frame_index(f: Any, key: str, read_elem: Any) -> Any:
    """The index (names) of the data frame `f[key]`, as strings, without reading its columns."""
    import pandas as pd

    group = f[key]
    index_key = group.attrs.get("_index", "_index")
    return pd.Index(np.asarray(read_elem(group[index_key])).astype(str))


def _x_storage(x: Any, sparse_dataset: Any) -> tuple[str | None, Any, int, int | None, tuple[int, int] | None]:
    """(layout, dtype, stored values, rows per HDF5 chunk, shape) of the `X` element; layout None when absent.

    layout is "dense", "csr", "csc", or "other" (dtype then names the encoding).
    """
    import h5py

    if x is None:
        return None, None, 0, None, None
    if isinstance(x, h5py.Dataset):
        if x.ndim != 2:
            return "other", f"a {x.ndim}-dimensional array", 0, None, None
        return "dense", x.dtype, int(np.prod(x.shape)), (x.chunks[0] if x.chunks else None), tuple(x.shape)
    encoding = x.attrs.get("encoding-type", x.attrs.get("h5sparse_format", ""))
    if encoding in ("csr_matrix", "csr", "csc_matrix", "csc"):
        ds = sparse_dataset(x)
        return ds.format, x["data"].dtype, int(x["data"].shape[0]), None, tuple(int(v) for v in ds.shape)
    return "other", str(encoding or "an unknown element"), 0, None, None


def gene_selection(var_names: list[str], genes: list[str], *, min_overlap: float, name: str) -> tuple[sp.csr_matrix, int]:
    """The matrix that reorders columns named `var_names` to `genes`, zero-filling missing ones.

    Returns a CSR (len(var_names), len(genes)) with a single 1 for each gene found, and the
    number found; ``x @ sel`` is the aligned matrix. Raises ScrclError when fewer than
    `min_overlap` of `genes` are present.
    """
    index = {g: i for i, g in enumerate(var_names)}
    src = np.array([index.get(g, -1) for g in genes], dtype=np.int64)
    found = src >= 0
    n_found = int(found.sum())
    if n_found < min_overlap * len(genes):
        missing = [g for g, ok in zip(genes, found) if not ok][:2]
        raise ScrclError(
            f"only {n_found} of {len(genes)} model genes were found in {name} "
            f"(below --min-gene-overlap {min_overlap:g}; first missing: {', '.join(missing)})",
            "Check that var_names hold the same gene identifiers (symbols vs Ensembl IDs) as the training data, or retrain",
        )
    # A sparse selection matrix keeps X sparse and handles the zero-fill in one product.
    sel = sp.csr_matrix(
        (np.ones(n_found, dtype=np.float32), (src[found], np.flatnonzero(found))),
        shape=(len(var_names), len(genes)),
    )
    return sel, n_found


def align_genes(
    x: sp.csr_matrix, var_names: list[str], genes: list[str], *, min_overlap: float, name: str
) -> tuple[sp.csr_matrix, int]:
    """Reorder the columns of `x` (cells x var_names) to `genes`, zero-filling missing ones.

    Returns the aligned CSR matrix, shape (n_cells, len(genes)), and the number of genes found.
    Raises ScrclError when fewer than `min_overlap` of `genes` are present.
    """
    sel, n_found = gene_selection(var_names, genes, min_overlap=min_overlap, name=name)
    return sp.csr_matrix(x @ sel), n_found


# --------------------------------------------------------------------------- outputs


def check_output(dest: Path, *, overwrite: bool, inputs: tuple[Path, ...] = ()) -> None:
    """Fail early when `dest` cannot or must not be written.

    That is: `dest` is or lies inside one of `inputs`, exists (without `overwrite`), or its
    folder cannot take files.
    """
    dest = Path(dest)
    target = dest.resolve()
    for src in inputs:
        # --overwrite must never replace an input (or a file inside an input model directory).
        if target == Path(src).resolve() or Path(src).resolve() in target.parents:
            raise ScrclError(f"{dest} is an input of this command", "Choose another output path; inputs are never overwritten")
    if dest.exists() and not overwrite:
        raise ScrclError(f"{dest} already exists", "Pass --overwrite or choose another output path")
    parent = dest.parent if str(dest.parent) else Path(".")
    if parent.exists() and not parent.is_dir():  # mkdir would only say "File exists"
        raise ScrclError(f"cannot write into {parent}: it is a file, not a directory",
                         "Choose an output path in a writable directory")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = parent / f".{dest.name}{TMP_TAG}probe-{uuid.uuid4().hex[:8]}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise ScrclError(
            f"cannot write into {parent} ({exc.strerror or exc})",
            "Choose an output path in a writable directory",
        ) from exc
    remove_stale_temporaries(dest)


_stop_requested = False


def request_stop() -> None:
    """Make every later output commit fail with KeyboardInterrupt (called by the CLI's signal handler)."""
    global _stop_requested
    _stop_requested = True


def check_stop() -> None:
    """Raise KeyboardInterrupt when a stop was requested (the signal's own exception can be lost)."""
    if _stop_requested:
        raise KeyboardInterrupt


def _tmp_name(dest: Path) -> Path:
    return dest.parent / f".{dest.name}{TMP_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}"


def remove_stale_temporaries(dest: Path) -> int:
    """Delete temporaries that an earlier, killed run left beside `dest`. Returns how many."""
    dest = Path(dest)
    n = 0
    if not dest.parent.is_dir():
        return 0
    for p in dest.parent.glob(f".{dest.name}{TMP_TAG}*"):
        pid = p.name.split(TMP_TAG, 1)[1].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and _pid_alive(int(pid)):
            continue
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        n += 1
    if n:
        log.info("removed %d stale temporary file(s) beside %s", n, dest)
    return n


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def atomic_path(dest: Path, *, overwrite: bool, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `dest`; on success rename it onto `dest`.

    On any exception (including KeyboardInterrupt from SIGINT/SIGTERM) the temporary is removed
    and `dest` keeps its previous content.
    """
    dest = Path(dest)
    check_output(dest, overwrite=overwrite)
    tmp = _tmp_name(dest)
    if directory:
        tmp.mkdir()
    try:
        yield tmp
        check_stop()  # a signal arrived while writing, even if its KeyboardInterrupt was lost
        if directory and dest.exists():
            # Directories cannot be swapped with one os.replace: move the old one aside first.
            old = _tmp_name(dest)
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            if dest.is_dir():
                raise ScrclError(f"{dest} is a directory", "Choose a file path for this output")
            os.replace(tmp, dest)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def write_h5ad_atomic(adata: AnnData, dest: Path, *, overwrite: bool) -> None:
    """Write `adata` to `dest` through a temporary file and a rename."""
    with atomic_path(dest, overwrite=overwrite) as tmp:
        adata.write_h5ad(tmp, compression="gzip")


@dataclass
class Annotations:
    """Elements that `embed`/`cluster` add to a query; `X` and everything else stay as they are.

    obsm: key -> float32 array (n_obs, d). obs: column -> values of length n_obs (a
    `pandas.Categorical` or a numpy array). uns: top-level key -> value (a dict of plain types).
    An existing element with the same key is replaced.
    """

    obsm: dict[str, np.ndarray] = field(default_factory=dict)
    obs: dict[str, Any] = field(default_factory=dict)
    uns: dict[str, Any] = field(default_factory=dict)

    def apply(self, adata: AnnData) -> None:
        """Set the elements on an in-memory AnnData."""
        for key, value in self.obsm.items():
            adata.obsm[key] = value
        for key, value in self.obs.items():
            adata.obs[key] = value
        for key, value in self.uns.items():
            adata.uns[key] = value


COPY_BLOCK = 16 << 20


def _copy_file(src: Path, dest: Path) -> None:
    """Copy bytes in blocks, so that SIGTERM/SIGINT (a KeyboardInterrupt between blocks) stops a large copy."""
    with Path(src).open("rb") as fin, Path(dest).open("wb") as fout:
        while block := fin.read(COPY_BLOCK):
            fout.write(block)
            check_stop()


def write_h5ad_patched(src: Path, dest: Path, annotations: Annotations, *, overwrite: bool) -> None:
    """Write `dest` as a copy of the `.h5ad` file `src` plus `annotations`, atomically.

    `src` is copied byte for byte to a temporary beside `dest`, then only the new elements
    are written into the copy with anndata's element writer: obsm and uns keys are replaced,
    obs is read, given the new columns and written back (it is O(n_obs)). `X`, layers and
    everything else keep the input's own encoding and are never decoded, so memory does not
    grow with X. `src` is only read.
    """
    import h5py

    read_elem, write_elem, _ = _anndata_io()

    def replace_keys(f: Any, group: str, items: dict[str, Any]) -> None:
        if group not in f:
            write_elem(f, group, {})
        for key, value in items.items():
            if key in f[group]:
                del f[group][key]
            write_elem(f[group], key, value)

    with atomic_path(dest, overwrite=overwrite) as tmp:
        _copy_file(src, tmp)
        with h5py.File(tmp, "r+") as f:
            if annotations.obsm:
                replace_keys(f, "obsm", annotations.obsm)
            if annotations.obs:
                obs = read_elem(f["obs"])
                for key, value in annotations.obs.items():
                    obs[key] = value
                del f["obs"]
                write_elem(f, "obs", obs)
            if annotations.uns:
                replace_keys(f, "uns", annotations.uns)
            check_stop()


def write_text_atomic(text: str, dest: Path, *, overwrite: bool) -> None:
    """Write a text file (CSV tables) through a temporary file and a rename."""
    with atomic_path(dest, overwrite=overwrite) as tmp:
        tmp.write_text(text)


# --------------------------------------------------------------------------- model directory


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of `data`."""
    return hashlib.sha256(data).hexdigest()


def genes_hash(genes: list[str]) -> str:
    """sha256 of the gene list in order, one name per line."""
    return sha256_bytes("\n".join(genes).encode())


def write_model_dir(dest: Path, files: dict[str, bytes], manifest: dict[str, Any], *, overwrite: bool) -> Path:
    """Write a model directory atomically: every file in `files`, then the manifest.

    The manifest gains ``files`` (name -> sha256), ``format_version`` and ``scrcl_version``.
    """
    manifest = dict(manifest)
    manifest["format_version"] = FORMAT_VERSION
    manifest["scrcl_version"] = __version__
    manifest["files"] = {name: sha256_bytes(blob) for name, blob in files.items()}
    with atomic_path(dest, overwrite=overwrite, directory=True) as tmp:
        for name, blob in files.items():
            (tmp / name).write_bytes(blob)
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
    return Path(dest)


@dataclass(frozen=True)
class ModelBundle:
    """A model directory whose manifest and file hashes were checked."""

    path: Path
    manifest: dict[str, Any]

    @property
    def genes(self) -> list[str]:
        return list(self.manifest["genes"])

    def file(self, name: str) -> Path:
        """Path of a file the manifest lists (already hash-checked)."""
        if name not in self.manifest["files"]:
            raise ScrclError(f"model directory {self.path} has no {name}", "Re-run scrcl-cli export on it")
        return self.path / name

    def read_bytes(self, name: str) -> bytes:
        """Read a listed file and check its sha256 against the manifest."""
        blob = self.file(name).read_bytes()
        if sha256_bytes(blob) != self.manifest["files"][name]:
            raise ScrclError(
                f"{name} in {self.path} does not match the sha256 in its manifest (the file was changed)",
                "Restore the model directory from its source or retrain",
            )
        return blob


def read_bundle(path: Path) -> ModelBundle:
    """Open a model directory: parse the manifest, check its version and every file's hash."""
    path = Path(path)
    if not path.exists():
        raise ScrclError(f"model directory {path} does not exist", "Pass the directory written by scrcl-cli train")
    if not path.is_dir():
        raise ScrclError(f"{path} is not a model directory", "Pass the directory written by scrcl-cli train")
    mpath = path / MANIFEST_NAME
    if not mpath.is_file():
        raise ScrclError(f"{path} has no {MANIFEST_NAME}", "Pass the directory written by scrcl-cli train")
    try:
        manifest = json.loads(mpath.read_text())
        version = int(manifest["format_version"])
        files = manifest["files"]
        genes = manifest["genes"]
        if not isinstance(files, dict) or not isinstance(genes, list):
            raise TypeError("files/genes have the wrong type")  # noqa: TRY301
    except (ValueError, KeyError, TypeError) as exc:
        raise ScrclError(f"{mpath} is corrupt ({exc})", "Restore the model directory or retrain") from exc
    if version > FORMAT_VERSION:
        raise ScrclError(
            f"{path} has model format {version}, newer than this scrcl-cli supports ({FORMAT_VERSION})",
            "Upgrade scrcl-cli",
        )
    if manifest.get("genes_sha256") != genes_hash(genes):
        raise ScrclError(f"the gene list in {mpath} does not match its hash", "Restore the model directory or retrain")
    root = path.resolve()
    for name in files:
        target = (path / name).resolve()
        if target.parent != root:
            raise ScrclError(f"{mpath} names a file outside the model directory ({name})", "Use a trusted model directory")
        if not target.is_file():
            raise ScrclError(f"model directory {path} is missing {name}", "Restore the model directory or retrain")
    bundle = ModelBundle(path=path, manifest=manifest)
    for name in files:
        bundle.read_bytes(name)  # hash check before anything is loaded
    return bundle


def check_mode(bundle: ModelBundle, *, spatial: bool) -> None:
    """A spatial model needs --spatial and an expression model must not get it: never switch silently."""
    is_spatial = bundle.manifest.get("preprocessing", {}).get("mode") == "spatial"
    if is_spatial and not spatial:
        raise ScrclError(f"{bundle.path} was trained with --spatial", "Pass --spatial (the query needs obsm['spatial'])")
    if spatial and not is_spatial:
        raise ScrclError(f"--spatial was given but {bundle.path} is an expression (non-spatial) model",
                         "Drop --spatial or use a model trained with scrcl-cli train --spatial")
