"""Reading and validating `.h5ad` input, gene alignment, atomic writes, model directories.

Every check that can fail on user data runs here, before any expensive work, and raises
:class:`~scrcl_cli.errors.ScrclError` with the problem and the fix. Inputs are opened
read-only; every output is written to a temporary name beside its destination and then
renamed, so a killed job leaves either nothing or the previous complete file.
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
from dataclasses import dataclass
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
FORMAT_VERSION = 2
# Format 2 changed the fused encoder's inputs (x1 -> xs = Â^(t1+1) X, targets vs neighbourhood);
# older directories still load (for `scrcl-cli export`), but their encoders are not run.
MIN_ENCODER_FORMAT = 2
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


# --------------------------------------------------------------------------- input


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
    try:
        with warnings.catch_warnings():
            # anndata warns on stderr about duplicate names; duplicate genes are an error below.
            warnings.filterwarnings("ignore", message=r".* names are not unique", category=UserWarning)
            adata = anndata.read_h5ad(path)
    except Exception as exc:  # h5py/anndata raise many types for damaged files
        first = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise ScrclError(
            f"{path} could not be read as AnnData ({first})",
            "The file may be truncated or corrupt; re-export it and check its size",
        ) from exc
    validate_adata(adata, name=path.name, expression=expression, from_model=from_model)
    if adata.obs_names.has_duplicates:
        log.warning("%s has %d duplicate cell names; outputs keep them as they are",
                    path.name, int(adata.obs_names.duplicated().sum()))
    return adata


def validate_adata(adata: AnnData, *, name: str, expression: Expression = "counts", from_model: bool = False) -> None:
    """Check `adata.X` in place of use; converts X to float32 CSR. Raises ScrclError."""
    if adata.X is None:
        raise ScrclError(f"{name} has no X matrix", "Store the expression matrix in adata.X")
    if adata.n_obs == 0:
        raise ScrclError(f"{name} has 0 cells", "Check the filter that produced it")
    if adata.n_vars == 0:
        raise ScrclError(f"{name} has 0 genes", "Check the filter that produced it")
    x = adata.X
    if not (sp.issparse(x) or isinstance(x, np.ndarray)):
        try:
            x = np.asarray(x)
        except Exception as exc:
            raise ScrclError(f"{name} stores X as {type(x).__name__}", "Store X as a dense array or CSR matrix") from exc
    if sp.issparse(x):
        x = sp.csr_matrix(x)
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise ScrclError(f"{name} has a non-numeric X (dtype {x.dtype})", "Store numbers in adata.X")
    values = x.data if sp.issparse(x) else np.asarray(x).ravel()
    values = values.astype(np.float64, copy=False)
    n_bad = int(np.count_nonzero(~np.isfinite(values)))
    if n_bad:
        raise ScrclError(
            f"{name} has {n_bad} NaN or infinite values in X",
            "Remove or impute them before running scrcl-cli",
        )
    n_neg = int(np.count_nonzero(values < 0))
    if n_neg:
        raise ScrclError(
            f"{name} has {n_neg} negative values in X (min {values.min():.4g})",
            "Pass raw counts; scaled or centred data cannot be used",
        )
    if values.size and values.max() > 1e9:
        raise ScrclError(
            f"{name} has values up to {values.max():.3g} in X, too large for float32 work",
            "Pass raw counts or normalised values",
        )
    if expression == "counts":
        frac = values - np.round(values)
        nonint = np.flatnonzero(np.abs(frac) > 1e-6)
        if nonint.size:
            # embed/cluster have no --expression: the model fixes it, so the fix is to retrain.
            fix = ("The model was trained on raw counts: pass raw counts, or use a model trained with "
                   "--expression continuous (TPM/RPKM) or --expression log (log-normalised data)" if from_model else
                   "Pass raw counts, or --expression continuous for TPM/RPKM or --expression log for log-normalised data")
            raise ScrclError(
                f"{name} holds non-integer values in X where raw counts are expected (first: {values[nonint[0]]:.4g})",
                fix,
            )
    dup = adata.var_names[adata.var_names.duplicated()]
    if len(dup):
        raise ScrclError(
            f"{name} has {len(dup)} duplicate gene names (first: {dup[0]})",
            "Make them unique, e.g. with adata.var_names_make_unique()",
        )
    adata.X = sp.csr_matrix(x, dtype=np.float32) if sp.issparse(x) else sp.csr_matrix(np.asarray(x, dtype=np.float32))


def align_genes(
    x: sp.csr_matrix, var_names: list[str], genes: list[str], *, min_overlap: float, name: str
) -> tuple[sp.csr_matrix, int]:
    """Reorder the columns of `x` (cells x var_names) to `genes`, zero-filling missing ones.

    Returns the aligned CSR matrix, shape (n_cells, len(genes)), and the number of genes found.
    Raises ScrclError when fewer than `min_overlap` of `genes` are present.
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
        shape=(x.shape[1], len(genes)),
    )
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
