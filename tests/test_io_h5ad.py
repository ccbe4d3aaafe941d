"""Reading `.h5ad` X in row blocks (h5ad.ChunkedH5ad) and writing outputs as patched copies.

The block reader must give exactly the float32 CSR matrix of the whole read, for X stored as
CSR, dense or CSC, and fail with exactly the whole read's one-line error wherever the bad value
lies. `write_h5ad_patched` must add only the new elements: X keeps its encoding and the input
file is never modified.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from conftest import EXAMPLE
from robustness_helpers import poisson_counts, write_adata

from scrcl_cli.io import h5ad

CHUNK = 97  # rows per block in these tests: smaller than N and not a divisor of it


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _stacked(reader: h5ad.ChunkedH5ad) -> sp.csr_matrix:
    blocks = list(reader.chunks())
    assert all(b.shape[0] <= reader.chunk_rows and b.dtype == np.float32 for b in blocks)
    return sp.csr_matrix(sp.vstack(blocks, format="csr"))


def _assert_same_csr(a: sp.csr_matrix, b: sp.csr_matrix) -> None:
    """Bitwise: same shape, dtype, stored values and their order."""
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_array_equal(a.indptr, b.indptr)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.data, b.data)


def _example_as(layout: str, dtype: str, path: Path) -> Path:
    """The packaged real example (700 PBMCs, raw counts) with X stored as `layout` and `dtype`."""
    a = ad.read_h5ad(EXAMPLE)
    x = sp.csr_matrix(a.X).astype(dtype)
    a.X = {"csr": x, "csc": sp.csc_matrix(x), "dense": x.toarray()}[layout]
    a.write_h5ad(path)
    return path


@pytest.mark.parametrize("dtype", ["float32", "int64"])
@pytest.mark.parametrize("layout", ["csr", "dense", "csc"])
def test_chunked_h5ad_blocks_equal_the_whole_read(layout: str, dtype: str, tmp_path: Path):
    path = _example_as(layout, dtype, tmp_path / f"{layout}.h5ad")
    reader = h5ad.ChunkedH5ad(path, chunk_rows=CHUNK)
    whole = h5ad.read_h5ad_checked(path)
    assert reader.layout == layout and reader.chunk_rows == CHUNK
    assert (reader.n_obs, reader.n_vars) == whole.shape
    assert list(reader.var_names) == list(whole.var_names) and list(reader.obs_names) == list(whole.obs_names)
    assert reader.spatial is None
    _assert_same_csr(_stacked(reader), whole.X)


def test_chunked_h5ad_reads_obsm_spatial(tmp_path: Path):
    a = ad.AnnData(X=sp.csr_matrix(poisson_counts(30, 8)))
    xy = np.random.default_rng(0).random((30, 2))
    a.obsm["spatial"] = xy
    a.write_h5ad(tmp_path / "s.h5ad")
    np.testing.assert_array_equal(h5ad.ChunkedH5ad(tmp_path / "s.h5ad").spatial, xy)


def test_chunked_h5ad_default_block_follows_the_byte_budget(tmp_path: Path):
    path = _example_as("dense", "float32", tmp_path / "dense.h5ad")
    n_vars = ad.read_h5ad(EXAMPLE, backed="r").n_vars
    reader = h5ad.ChunkedH5ad(path, chunk_bytes=8 * n_vars * 50)  # the float64 copy of 50 rows
    assert reader.chunk_rows == 50
    _assert_same_csr(_stacked(reader), h5ad.read_h5ad_checked(path).X)


def test_chunked_h5ad_reads_files_from_anndata_before_0_7_whole(tmp_path: Path):
    """Data frames stored as HDF5 compound datasets: the reader falls back to the whole read."""
    x = poisson_counts(20, 6)
    path = tmp_path / "legacy.h5ad"
    with h5py.File(path, "w") as f:
        f.create_dataset("X", data=x)
        f.create_dataset("obs", data=np.array([(f"c{i}".encode(),) for i in range(20)], dtype=[("index", "S8")]))
        f.create_dataset("var", data=np.array([(f"g{i}".encode(),) for i in range(6)], dtype=[("index", "S8")]))
    reader = h5ad.ChunkedH5ad(path, chunk_rows=7)
    assert list(reader.var_names) == [f"g{i}" for i in range(6)] and reader.n_obs == 20
    _assert_same_csr(_stacked(reader), sp.csr_matrix(x))


def _whole_error(path: Path, **kw: object) -> str:
    with pytest.raises(h5ad.ScrclError) as exc:
        h5ad.read_h5ad_checked(path, **kw)  # type: ignore[arg-type]
    return str(exc.value)


def _chunked_error(path: Path, **kw: object) -> str:
    with pytest.raises(h5ad.ScrclError) as exc:
        h5ad.ChunkedH5ad(path, chunk_rows=CHUNK, **kw).validate()  # type: ignore[arg-type]
    return str(exc.value)


# Each case puts values into the counts at (row, col); rows past 600 lie in the last block of 97.
BAD_VALUES = {
    "nan_late": [(650, 3, np.nan)],
    "inf_late": [(699, 0, np.inf)],
    "nans_in_two_blocks": [(5, 1, np.nan), (650, 3, np.nan)],
    "negative_early_nan_late": [(5, 1, -3.0), (650, 3, np.nan)],  # NaN wins, as in the whole read
    "negatives_in_two_blocks": [(5, 1, -3.0), (650, 3, -7.5)],  # count and minimum over all blocks
    "huge_late": [(650, 3, 2e9)],
    "fraction_late": [(650, 3, 0.25)],
    "fractions_in_two_blocks": [(650, 3, 0.25), (5, 1, 1.5)],  # first non-integer in row order
    "huge_early_fraction_late": [(5, 1, 3e9), (650, 3, 0.25)],
}


@pytest.mark.parametrize("layout", ["csr", "dense"])
@pytest.mark.parametrize("case", list(BAD_VALUES), ids=list(BAD_VALUES))
def test_chunked_h5ad_bad_value_in_a_late_block_gives_the_whole_read_error(case: str, layout: str, tmp_path: Path):
    x = sp.csr_matrix(ad.read_h5ad(EXAMPLE).X).toarray().astype(np.float64)
    for i, j, v in BAD_VALUES[case]:
        x[i, j] = v
    path = write_adata(tmp_path / "bad.h5ad", sp.csr_matrix(x) if layout == "csr" else x)
    for kw in ({}, {"from_model": True}, {"expression": "continuous"}):
        if kw.get("expression") == "continuous" and "fraction" in case and "huge" not in case:
            h5ad.ChunkedH5ad(path, chunk_rows=CHUNK, **kw).validate()  # fractions are fine for TPM
            continue
        expected = _whole_error(path, **kw)
        assert _chunked_error(path, **kw) == expected
    assert "\n" not in expected


def test_chunked_h5ad_duplicate_genes_error_comes_after_the_value_errors(tmp_path: Path):
    x = poisson_counts(300, 12)
    names = [f"g{j % 11}" for j in range(12)]
    write_adata(tmp_path / "dup.h5ad", x, var_names=names)
    expected = _whole_error(tmp_path / "dup.h5ad")
    assert "duplicate gene names" in expected
    assert _chunked_error(tmp_path / "dup.h5ad") == expected
    x[250, 2] = np.nan
    write_adata(tmp_path / "dup_nan.h5ad", x, var_names=names)
    expected = _whole_error(tmp_path / "dup_nan.h5ad")
    assert "NaN" in expected
    assert _chunked_error(tmp_path / "dup_nan.h5ad") == expected


def _no_x(path: Path) -> Path:
    a = ad.AnnData(X=poisson_counts(10, 5))
    a.X = None
    a.write_h5ad(path)
    return path


@pytest.mark.parametrize("kind", ["missing", "directory", "not_hdf5", "truncated", "no_x", "zero_cells", "zero_genes",
                                  "non_numeric"])
def test_chunked_h5ad_metadata_errors_equal_the_whole_read(kind: str, tmp_path: Path):
    path = tmp_path / f"{kind}.h5ad"
    if kind == "directory":
        path.mkdir()
    elif kind == "not_hdf5":
        path.write_text("cell,g1\nc1,3\n")
    elif kind == "truncated":
        blob = EXAMPLE.read_bytes()
        path.write_bytes(blob[: len(blob) // 2])
    elif kind == "no_x":
        _no_x(path)
    elif kind == "zero_cells":
        write_adata(path, np.zeros((0, 5), np.float32))
    elif kind == "zero_genes":
        write_adata(path, np.zeros((5, 0), np.float32))
    elif kind == "non_numeric":
        write_adata(path, np.ones((5, 4), dtype=bool))
    expected = _whole_error(path)
    with pytest.raises(h5ad.ScrclError) as exc:
        h5ad.ChunkedH5ad(path)  # raised on opening, before any block of X is read
    assert str(exc.value) == expected


def test_value_check_in_pieces_equals_one_check():
    rng = np.random.default_rng(0)
    values = rng.poisson(3, 1000).astype(np.float64)
    values[[10, 500, 900]] = [-1.0, -4.0, 0.5]
    whole = h5ad.ValueCheck("x")
    whole.update(values)
    parts = h5ad.ValueCheck("x")
    for piece in np.array_split(values, 7):
        parts.update(piece)
    assert (parts.n_neg, parts.min, parts.max, parts.first_nonint) == (whole.n_neg, whole.min, whole.max,
                                                                       whole.first_nonint) == (2, -4.0, values.max(), 0.5)
    with pytest.raises(h5ad.ScrclError, match=r"x has 2 negative values in X \(min -4\)"):
        parts.raise_first()


# ----------------------------------------------------------------------------- patched outputs


def _annotations(n: int) -> h5ad.Annotations:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, n)
    return h5ad.Annotations(
        obsm={"X_scrcl": rng.random((n, 4)).astype(np.float32)},
        obs={"scrcl_cluster": pd.Categorical([str(v) for v in labels], categories=["0", "1", "2"]),
             "scrcl_confidence": rng.random(n).astype(np.float32)},
        uns={"scrcl": {"scrcl_version": "x", "view": "fused", "graph": {"t0": 4, "t1": 2}, "n_genes_found": 7}},
    )


@pytest.mark.parametrize("layout", ["csr", "dense"])
def test_write_h5ad_patched_equals_writing_the_annotated_anndata(layout: str, tmp_path: Path):
    src = _example_as(layout, "float32", tmp_path / "in.h5ad")
    before = _sha(src)
    ann = _annotations(700)
    h5ad.write_h5ad_patched(src, tmp_path / "out.h5ad", ann, overwrite=False)
    assert _sha(src) == before
    expected = ad.read_h5ad(src)
    ann.apply(expected)
    h5ad.write_h5ad_atomic(expected, tmp_path / "whole.h5ad", overwrite=False)
    got, ref = ad.read_h5ad(tmp_path / "out.h5ad"), ad.read_h5ad(tmp_path / "whole.h5ad")
    # X keeps the input's own storage: dense stays dense, CSR stays CSR, values unchanged.
    assert isinstance(got.X, np.ndarray) == (layout == "dense")
    np.testing.assert_array_equal(np.asarray(sp.csr_matrix(got.X).todense()), np.asarray(sp.csr_matrix(ref.X).todense()))
    pd.testing.assert_frame_equal(got.obs, ref.obs)
    pd.testing.assert_frame_equal(got.var, ref.var)
    np.testing.assert_array_equal(got.obsm["X_scrcl"], ref.obsm["X_scrcl"])
    assert got.uns["scrcl"] == ref.uns["scrcl"] and got.uns["source"].keys() == ref.uns["source"].keys()
    assert list(got.obs.columns) == ["cell_type", "louvain", "scrcl_cluster", "scrcl_confidence"]


def test_write_h5ad_patched_replaces_existing_elements(tmp_path: Path):
    a = ad.AnnData(X=sp.csr_matrix(poisson_counts(40, 6)))
    a.obsm["X_scrcl"] = np.zeros((40, 9), np.float32)
    a.obs["scrcl_cluster"] = pd.Categorical(["9"] * 40)
    a.obs["keep"] = np.arange(40)
    a.uns["scrcl"] = {"old": 1}
    a.layers["counts"] = a.X.copy()
    a.write_h5ad(tmp_path / "in.h5ad")
    ann = _annotations(40)
    h5ad.write_h5ad_patched(tmp_path / "in.h5ad", tmp_path / "out.h5ad", ann, overwrite=False)
    out = ad.read_h5ad(tmp_path / "out.h5ad")
    np.testing.assert_array_equal(out.obsm["X_scrcl"], ann.obsm["X_scrcl"])
    assert list(out.obs.columns) == ["scrcl_cluster", "keep", "scrcl_confidence"]  # replaced in place, others kept
    assert out.obs["scrcl_cluster"].tolist() == list(ann.obs["scrcl_cluster"])
    np.testing.assert_array_equal(out.obs["keep"], np.arange(40))
    assert "old" not in out.uns["scrcl"] and out.uns["scrcl"]["view"] == "fused"
    _assert_same_csr(sp.csr_matrix(out.layers["counts"]), sp.csr_matrix(a.layers["counts"]))


def test_write_h5ad_patched_refuses_an_existing_output_without_overwrite(tmp_path: Path):
    (tmp_path / "out.h5ad").write_bytes(b"previous")
    with pytest.raises(h5ad.ScrclError, match="already exists"):
        h5ad.write_h5ad_patched(EXAMPLE, tmp_path / "out.h5ad", _annotations(700), overwrite=False)
    assert (tmp_path / "out.h5ad").read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.h5ad"]
