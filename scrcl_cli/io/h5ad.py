"""Reading, validating and patching `.h5ad` files.

Every check that can fail on user data runs here, before any expensive work, and raises
:class:`~scrcl_cli.errors.ScrclError` with the problem and the fix. Inputs are untrusted: the
file must be a regular HDF5 file with no external links, external storage or virtual datasets
(which would make the tool read other files), and the sparse structure of X (`indptr`,
`indices`) is checked block by block before any value is used.

Queries for embed/cluster are read with `ChunkedH5ad` (X in blocks of cells, the same checks
and messages as `read_h5ad_checked`), and their outputs written with `write_h5ad_patched` (a
copy of the input plus the new elements), so neither step holds X whole.
"""

from __future__ import annotations

import logging
import os
import stat
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

from .._utils import VALUE_BLOCK
from ..config import Expression
from ..errors import ScrclError
from .output import atomic_path, check_stop, copy_file

if TYPE_CHECKING:
    from anndata import AnnData

log = logging.getLogger(__name__)

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _check_h5ad_file(path: Path) -> None:
    """The checks before anndata reads anything: a regular HDF5 file that names no other file.

    A FIFO or device would block or never end, so only regular files are opened. HDF5 external
    links, datasets with external storage and virtual datasets would make the tool read files it
    was not given: they are refused. Loom and 10x `.h5` files get their own message.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ScrclError(f"{path} does not exist", "Check the path and the current directory") from None
    except OSError as exc:
        raise ScrclError(f"{path} cannot be read ({exc.strerror})", "Check the path and its permissions") from None
    if stat.S_ISDIR(st.st_mode):
        raise ScrclError(f"{path} is a directory, not an .h5ad file", "Pass the path of the .h5ad file itself")
    if not stat.S_ISREG(st.st_mode):
        raise ScrclError(f"{path} is not a regular file (a pipe, socket or device)", "Pass the path of an .h5ad file")
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        raise ScrclError(f"{path} cannot be read ({exc.strerror})", "Check the file's permissions") from None
    if head != _HDF5_SIGNATURE:
        raise ScrclError(
            f"{path} is not an HDF5/.h5ad file",
            "Convert it with anndata (e.g. anndata.read_csv(...).write_h5ad(...)) first",
        )
    _check_hdf5_tree(path)


_MAX_HDF5_OBJECTS = 1_000_000


def _open_hdf5(path: Path) -> Any:
    import h5py

    try:
        return h5py.File(path, "r")
    except OSError as exc:
        text = str(exc).lower()
        if "unable to lock file" in text:
            raise ScrclError(
                f"{path} is locked by another program that is writing it",
                "Wait for that program to finish, or set HDF5_USE_FILE_LOCKING=FALSE if the file is complete",
            ) from None
        raise _unreadable(path, exc) from None


def _check_hdf5_tree(path: Path) -> None:
    """Refuse links and storage that point outside the file; recognise loom and 10x files."""
    import h5py

    def refuse(where: str, what: str) -> ScrclError:
        return ScrclError(
            f"{path} holds {what} at /{where}, which would make scrcl-cli read another file",
            "Write a self-contained copy with anndata (adata.write_h5ad) and pass that",
        )

    with _open_hdf5(path) as f:
        if "matrix" in f and isinstance(f["matrix"], h5py.Dataset) and "row_attrs" in f:
            raise ScrclError(
                f"{path} is a loom file, not an .h5ad file", "Convert it: anndata.read_loom(path).write_h5ad('out.h5ad')"
            )
        if (
            "X" not in f
            and "obs" not in f
            and any(isinstance(f.get(k), h5py.Group) and "barcodes" in f[k] for k in list(f.keys())[:8])
        ):
            raise ScrclError(
                f"{path} is a 10x Genomics .h5 matrix, not an .h5ad file",
                "Convert it: scanpy.read_10x_h5(path).write_h5ad('out.h5ad')",
            )
        for element, what in (("var", "gene names"), ("obs", "cell names")):
            if element not in f:
                raise ScrclError(
                    f"{path} has no /{element} ({what}); every .h5ad file that anndata writes has one",
                    "Write the file with anndata (adata.write_h5ad), with the gene names in adata.var_names",
                )
        stack: list[tuple[str, Any]] = [("", f)]
        # A group hard-linked from two places can form a cycle (/uns/a -> /uns); anndata never writes
        # one, and walking it would never end, so each group is visited once and a revisit refused.
        seen_groups: set[int] = {h5py.h5o.get_info(f.id).addr}
        n_objects = 0
        while stack:
            prefix, group = stack.pop()
            for key in group.keys():
                where = f"{prefix}{key}"
                n_objects += 1
                if n_objects > _MAX_HDF5_OBJECTS:
                    raise ScrclError(
                        f"{path} holds more than {_MAX_HDF5_OBJECTS:,} HDF5 objects, far more than an .h5ad file has",
                        "Write a clean copy with anndata (adata.write_h5ad), dropping large .uns entries, and pass that",
                    )
                link = group.get(key, getlink=True)
                if isinstance(link, h5py.ExternalLink):
                    raise refuse(where, "an external link")
                if isinstance(link, h5py.SoftLink):
                    raise ScrclError(
                        f"{path} holds a soft link at /{where}, which .h5ad files do not use",
                        "Write a clean copy with anndata (adata.write_h5ad) and pass that",
                    )
                obj = group.get(key)
                if isinstance(obj, h5py.Group):
                    addr = h5py.h5o.get_info(obj.id).addr
                    if addr in seen_groups:
                        raise ScrclError(
                            f"{path} links the group /{where} from two places (an HDF5 hard link), "
                            "which .h5ad files do not use and which can form a loop",
                            "Write a clean copy with anndata (adata.write_h5ad) and pass that",
                        )
                    seen_groups.add(addr)
                    stack.append((where + "/", obj))
                elif isinstance(obj, h5py.Dataset):
                    if obj.is_virtual:
                        raise refuse(where, "a virtual dataset")
                    if obj.external:
                        raise refuse(where, "a dataset with external storage")


def _unreadable(path: Path, exc: BaseException) -> ScrclError:
    first = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
    return ScrclError(
        f"{path} could not be read as AnnData ({first})",
        "The file may be truncated or corrupt; re-export it and check its size",
    )


def read_h5ad_checked(
    path: Path, *, expression: Expression = "counts", from_model: bool = False, check_names: bool = False
) -> AnnData:
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
    check_names
        Also require gene names that a model can store (training): non-empty, printable, at most
        1,000 characters.

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
        if "unable to lock file" in str(exc).lower():
            _open_hdf5(path).close()  # raises the locked-file error
        raise _unreadable(path, exc) from exc
    validate_adata(adata, name=path.name, expression=expression, from_model=from_model)
    _warn_duplicate_cells(adata.obs_names, path.name)
    if check_names:
        check_gene_names(adata.var_names, path.name)
    return adata


def check_gene_names(var_names: Any, name: str) -> None:
    """Gene names a model folder can store: non-empty, no control characters, at most 1,000 characters."""
    for g in var_names:
        g = str(g)
        if not g or len(g) > 1000 or any(ord(c) < 32 or ord(c) == 127 for c in g):
            raise ScrclError(
                f"{name} has a gene name that cannot be stored in a model ({g[:40]!r}): names must be "
                "non-empty, printable and at most 1,000 characters",
                "Rename the genes in var_names",
            )


def _warn_duplicate_cells(obs_names: Any, name: str) -> None:
    if obs_names.has_duplicates:
        log.warning("%s has %d duplicate cell names; outputs keep them as they are", name, int(obs_names.duplicated().sum()))


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


# Log-normalised values (log1p of normalised counts) are almost never whole numbers; whole numbers
# this large are counts given with --expression log by mistake.
LOG_INTEGER_MAX = 20.0


def check_sparse_structure(
    indptr: np.ndarray, indices: np.ndarray | None, n_major: int, n_minor: int, nnz: int, name: str
) -> None:
    """Refuse a compressed sparse matrix whose structure would crash or silently mislead scipy.

    indptr: (n_major + 1,) integers, starting at 0, non-decreasing, ending at `nnz`; indices
    (optional, any slice of the stored indices): integers in [0, n_minor). CSR: major = rows.
    """
    fix = "The file's X is damaged: re-write it with anndata (adata.write_h5ad) from a good copy"
    indptr = np.asarray(indptr)
    if indptr.ndim != 1 or indptr.shape[0] != n_major + 1 or not np.issubdtype(indptr.dtype, np.integer):
        raise ScrclError(f"{name} has a malformed X: indptr has {indptr.shape} entries for {n_major} rows", fix)
    if int(indptr[0]) != 0 or int(indptr[-1]) != nnz or (indptr.size > 1 and bool(np.any(np.diff(indptr) < 0))):
        raise ScrclError(f"{name} has a malformed X: indptr is not a non-decreasing run from 0 to {nnz}", fix)
    if indices is not None:
        check_indices(indices, n_minor, name)
        if indices.shape[0] == nnz:
            check_no_duplicate_entries(indptr, indices, name)


def check_no_duplicate_entries(indptr: np.ndarray, indices: np.ndarray, name: str) -> None:
    """Refuse a compressed sparse matrix that stores one (row, column) twice.

    indptr: (n_major + 1,) from 0 to len(indices); indices: (nnz,). scipy would silently add the
    two values, which no writer of .h5ad files intends.
    """
    indptr, indices = np.asarray(indptr, dtype=np.int64), np.asarray(indices)
    nnz = indices.shape[0]
    if nnz < 2:
        return
    # the step from one major index's last entry to the next one's first may go down or repeat
    first = indptr[1:-1]
    first = first[(first > 0) & (first < nnz)]
    # In blocks of stored entries: whole, the int64 steps would be 8 bytes per entry (80 GB at ten
    # million cells). Entry p's step is indices[p] - indices[p - 1], skipped where p starts a row.
    sorted_rows = True
    for a in range(1, nnz, VALUE_BLOCK):
        b = min(nnz, a + VALUE_BLOCK)
        step = np.diff(indices[a - 1 : b].astype(np.int64))
        within = np.ones(step.shape[0], dtype=bool)
        starts = first[(first >= a) & (first < b)]
        within[starts - a] = False
        if not bool(np.all(step[within] > 0)):
            sorted_rows = False
            break
    if sorted_rows:
        return  # sorted within each row, hence no repeats
    major = np.repeat(np.arange(indptr.shape[0] - 1), np.diff(indptr))
    order = np.lexsort((indices, major))
    si, sm = indices[order], major[order]
    if bool(np.any((si[1:] == si[:-1]) & (sm[1:] == sm[:-1]))):
        raise ScrclError(
            f"{name} has a malformed X: one entry is stored twice in a row",
            "Merge the duplicates (adata.X.sum_duplicates()) and write the file again",
        )


def _scipy_values(data: np.ndarray) -> np.ndarray:
    """Stored values in a dtype scipy.sparse accepts (float16 is widened to float32)."""
    return data.astype(np.float32) if data.dtype == np.float16 else data


def check_indices(indices: np.ndarray, n_minor: int, name: str) -> None:
    """Stored column (CSR) or row (CSC) indices must be integers in [0, n_minor)."""
    indices = np.asarray(indices)
    if indices.size and (not np.issubdtype(indices.dtype, np.integer) or int(indices.min()) < 0 or int(indices.max()) >= n_minor):
        raise ScrclError(
            f"{name} has a malformed X: a stored index lies outside [0, {n_minor})",
            "The file's X is damaged: re-write it with anndata (adata.write_h5ad) from a good copy",
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
        if self.first_nonint is None:
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
        if self.expression == "log" and self.first_nonint is None and self.max >= LOG_INTEGER_MAX:
            raise ScrclError(
                f"{name} holds only whole numbers up to {self.max:.4g} in X, which look like raw counts, not log-normalised data",
                "Drop --expression log (raw counts are the default)"
                if not self.from_model
                else "This model expects log-normalised data: log-normalise the query (scanpy.pp.normalize_total, log1p)",
            )
        if self.first_nonint is not None:
            # embed/cluster have no --expression: the model fixes it, so the fix is to retrain.
            if self.expression != "counts":
                return
            fix = (
                "The model was trained on raw counts: pass raw counts, or use a model trained with "
                "--expression continuous (TPM/RPKM) or --expression log (log-normalised data)"
                if self.from_model
                else "Pass raw counts, or --expression continuous for TPM/RPKM or --expression log for log-normalised data"
            )
            raise ScrclError(
                f"{name} holds non-integer values in X where raw counts are expected (first: {self.first_nonint:.4g})",
                fix,
            )


def checked_matrix(
    x: Any, var_names: Any, *, name: str, expression: Expression = "counts", from_model: bool = False, copy: bool = True
) -> sp.csr_matrix:
    """X (n_obs, n_vars) checked for scRCL and returned as a new float32 CSR; `x` itself is not modified.

    copy=False may return x itself when it already is a float32 CSR (for a caller that replaces x).

    Checks: shape, sparse structure (as stored: converting a damaged matrix can crash), dtype, the
    values (`ValueCheck`) and unique gene names. Raises ScrclError.
    """
    n_obs, n_vars = x.shape if x is not None else (0, 0)
    _check_shape(x is not None, n_obs, n_vars, name)
    if not (sp.issparse(x) or isinstance(x, np.ndarray)):
        try:
            x = np.asarray(x)
        except Exception as exc:
            raise ScrclError(f"{name} stores X as {type(x).__name__}", "Store X as a dense array or CSR matrix") from exc
    if sp.issparse(x):
        if x.format in ("csr", "csc"):
            major, minor = x.shape if x.format == "csr" else x.shape[::-1]
            if x.indices.shape[0] != x.data.shape[0]:
                raise ScrclError(
                    f"{name} has a malformed X: {x.indices.shape[0]} indices for {x.data.shape[0]} values",
                    "The file's X is damaged: re-write it with anndata (adata.write_h5ad) from a good copy",
                )
            check_sparse_structure(x.indptr, x.indices, major, minor, x.data.shape[0], name)
    _check_dtype(x.dtype, name)
    check = ValueCheck(name, expression=expression, from_model=from_model)
    values = x.data if sp.issparse(x) else np.asarray(x).reshape(-1)
    for a in range(0, values.shape[0], VALUE_BLOCK):  # the checks make float64 copies: by blocks
        check.update(values[a : a + VALUE_BLOCK])
    check.raise_first()
    _check_unique_genes(var_names, name)
    return _as_float32_csr(x, copy=copy)


def validate_adata(adata: AnnData, *, name: str, expression: Expression = "counts", from_model: bool = False) -> None:
    """`checked_matrix` on `adata.X`, which is then replaced by the checked float32 CSR. Raises ScrclError."""
    adata.X = checked_matrix(adata.X, adata.var_names, name=name, expression=expression, from_model=from_model, copy=False)


def _as_float32_csr(x: Any, *, copy: bool = True) -> sp.csr_matrix:
    """A new float32 CSR of a checked sparse or dense block; the one conversion used for whole and
    chunked reads. copy=False returns x itself when it already is one."""
    if sp.issparse(x):
        return sp.csr_matrix(x, dtype=np.float32, copy=copy)
    return sp.csr_matrix(np.asarray(x, dtype=np.float32))


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

    def __init__(
        self,
        path: Path,
        *,
        expression: Expression = "counts",
        from_model: bool = False,
        chunk_rows: int | None = None,
        chunk_bytes: int = CHUNK_BYTES,
    ) -> None:
        import h5py
        import pandas as pd

        self.path = Path(path)
        self.name = self.path.name
        self._indptr = np.zeros(1, dtype=np.int64)
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
                    self.spatial, self.spatial_problem = _coords_table(
                        None if spatial is None else read_elem(spatial), self.obs_names, self.name
                    )
                    x = f.get("X")
                    layout, dtype, nnz, hdf5_rows, shape = _x_storage(x, sparse_dataset)
                    if shape is not None and shape != (len(self.obs_names), len(self.var_names)):
                        raise ValueError(f"X has shape {shape} for {len(self.obs_names)} cells and {len(self.var_names)} genes")
                    if layout == "csr":  # O(cells) integers, checked once; indices are checked per block
                        self._indptr = np.asarray(x["indptr"][()])
                        if x["indices"].shape[0] != nnz:
                            raise ScrclError(
                                f"{self.name} has a malformed X: {x['indices'].shape[0]} indices for {nnz} values",
                                "The file's X is damaged: re-write it with anndata",
                            )
                        check_sparse_structure(self._indptr, None, len(self.obs_names), len(self.var_names), nnz, self.name)
        except ScrclError:
            raise
        except Exception as exc:  # h5py/anndata raise many types for damaged files
            raise _unreadable(self.path, exc) from exc
        if legacy:
            log.info("%s was written by anndata < 0.7: reading it whole", self.name)
            adata = read_h5ad_checked(self.path, expression=expression, from_model=from_model)
            self.var_names, self.obs_names = pd.Index(adata.var_names), pd.Index(adata.obs_names)
            self.spatial, self.spatial_problem = _coords_table(adata.obsm.get("spatial"), self.obs_names, self.name)
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
                yield self._memory[start : start + step]
            return
        try:
            with h5py.File(self.path, "r") as f:
                if self.layout == "dense":
                    x = f["X"]
                    for start in range(0, n, step):
                        yield np.asarray(x[start : min(n, start + step)])
                    return
                g = f["X"]
                if self.layout == "csc":
                    log.info(
                        "%s stores X column-wise (CSC): reading it whole; store X as CSR to read it in blocks of cells", self.name
                    )
                    indptr, indices, data = g["indptr"][()], g["indices"][()], g["data"][()]
                    if indices.shape[0] != data.shape[0]:
                        raise ScrclError(
                            f"{self.name} has a malformed X: {indices.shape[0]} indices for {data.shape[0]} values",
                            "The file's X is damaged: re-write it with anndata",
                        )
                    check_sparse_structure(indptr, indices, self.n_vars, self.n_obs, data.shape[0], self.name)
                    whole = sp.csc_matrix((_scipy_values(data), indices, indptr), shape=(self.n_obs, self.n_vars)).tocsr()
                    for start in range(0, n, step):
                        yield whole[start : start + step]
                    return
                indptr = self._indptr
                for start in range(0, n, step):
                    stop = min(n, start + step)
                    lo, hi = int(indptr[start]), int(indptr[stop])
                    indices = g["indices"][lo:hi]
                    check_indices(indices, self.n_vars, self.name)
                    local = (indptr[start : stop + 1] - lo).astype(np.int64)
                    check_no_duplicate_entries(local, indices, self.name)
                    data = _scipy_values(g["data"][lo:hi])
                    yield sp.csr_matrix((data, indices, local), shape=(stop - start, self.n_vars))
        except (ScrclError, GeneratorExit):
            raise
        except Exception as exc:  # a damaged block deep in the file
            raise _unreadable(self.path, exc) from exc


def _coords_table(value: Any, obs_names: Any, name: str) -> tuple[np.ndarray | None, str | None]:
    """obsm['spatial'] as a float64 array, or (None, why) when it is stored in a form that cannot be one.

    Only spatial models use the coordinates, so an unusable entry is an error for them alone
    (`check_coords` checks the values then); other models ignore it.
    """
    import pandas as pd

    if value is None:
        return None, None
    if isinstance(value, pd.DataFrame):
        if not value.index.equals(pd.Index(obs_names)):
            return None, f"{name} has obsm['spatial'] as a table whose rows are not the cells of obs, in order"
        value = value.to_numpy()
    elif sp.issparse(value):
        if value.ndim != 2 or value.shape[1] > 16:
            return None, f"{name} has obsm['spatial'] as a sparse matrix of shape {value.shape}"
        value = value.toarray()
    try:
        return np.asarray(value, dtype=np.float64), None
    except (TypeError, ValueError):
        return None, f"{name} has non-numeric obsm['spatial']"


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
        shape = x.attrs.get("shape", x.attrs.get("h5sparse_shape"))
        if shape is None or len(shape) != 2 or not all(k in x for k in ("data", "indices", "indptr")):
            raise ValueError("X is a sparse matrix without its shape, data, indices or indptr")
        fmt = "csr" if encoding.startswith("csr") else "csc"
        return fmt, x["data"].dtype, int(x["data"].shape[0]), None, (int(shape[0]), int(shape[1]))
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
    if n_found == 0:
        raise ScrclError(
            f"none of the {len(genes)} model genes were found in {name} (first model genes: {', '.join(genes[:2])})",
            "Check that var_names hold the same gene identifiers (symbols vs Ensembl IDs) as the training data",
        )
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
        copy_file(src, tmp)
        try:
            with h5py.File(tmp, "r+") as f:
                if annotations.obsm:
                    replace_keys(f, "obsm", annotations.obsm)
                if annotations.obs:
                    obs = read_elem(f["obs"])
                    for key, value in annotations.obs.items():
                        if key == obs.index.name:  # anndata cannot write a column named like the index
                            obs.index.name = None
                        obs[key] = value
                    del f["obs"]
                    write_elem(f, "obs", obs)
                if annotations.uns:
                    replace_keys(f, "uns", annotations.uns)
                check_stop()
        except (ScrclError, KeyboardInterrupt, OSError, MemoryError):
            raise
        except Exception as exc:  # obs or uns in an encoding anndata cannot read back or write
            first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            raise ScrclError(
                f"the results could not be added to a copy of {Path(src).name} ({first})",
                "Its obs or uns holds elements anndata cannot rewrite: write a clean copy with "
                "anndata (adata.write_h5ad) and pass that",
            ) from None


def write_h5ad_atomic(adata: AnnData, dest: Path, *, overwrite: bool) -> None:
    """Write `adata` to `dest` through a temporary file and a rename."""
    with atomic_path(dest, overwrite=overwrite) as tmp:
        adata.write_h5ad(tmp, compression="gzip")


MAX_COORD = 1e9


def check_coords(coords: Any, n_obs: int, name: str) -> np.ndarray:
    """obsm['spatial'] as float64 (n_obs, 2), or a one-line error.

    Two finite columns (x, y) are required, within ±1e9 (pixel or micron coordinates are far
    below; larger values lose the spacing between spots in float arithmetic), not all on one
    point or one line parallel to an axis.
    """
    fix = "Store the spot or cell coordinates as an (n_cells, 2) array of x, y in obsm['spatial']"
    try:
        c = np.asarray(coords, dtype=np.float64)
    except (TypeError, ValueError):
        raise ScrclError(f"{name} has non-numeric obsm['spatial']", fix) from None
    if c.ndim != 2 or c.shape[0] != n_obs or c.shape[1] != 2:
        raise ScrclError(f"{name} has obsm['spatial'] of shape {c.shape}; (n_cells, 2) is expected", fix)
    if not np.isfinite(c).all():
        raise ScrclError(f"{name} has NaN or infinite values in obsm['spatial']", fix)
    if np.abs(c).max(initial=0.0) > MAX_COORD:
        raise ScrclError(
            f"{name} has coordinates up to {np.abs(c).max():.3g} in obsm['spatial'], above {MAX_COORD:.0e}",
            "Rescale them (pixels or microns), e.g. subtract the minimum",
        )
    if n_obs > 1 and (np.ptp(c[:, 0]) == 0 or np.ptp(c[:, 1]) == 0):
        raise ScrclError(f"{name} has obsm['spatial'] with a constant column: all cells on one point or one line", fix)
    return c
