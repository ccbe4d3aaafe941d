"""Spatial variant: scanpy/skmisc parity of the preprocessing, the spatial graph, the refinement."""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from conftest import shared

from scrcl_cli.spatial import (
    highly_variable_seurat_v3,
    loess_1d,
    nearest_others,
    plot_domains,
    prepare_spatial,
    refine_labels,
    scale_with,
    spatial_graph,
)

anndata = pytest.importorskip("anndata")

SPATIAL = ["dlpfc_151510_top500.h5ad", "osmfish_sscortex.h5ad"]


def _read(name: str):
    adata = anndata.read_h5ad(shared(name))
    return adata, sp.csr_matrix(adata.X)


def _scanpy_hvg(adata, n_top: int) -> np.ndarray:
    sc = pytest.importorskip("scanpy")
    pytest.importorskip("skmisc", reason="scanpy's seurat_v3 needs scikit-misc")
    ref = adata.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pp.highly_variable_genes(ref, flavor="seurat_v3", n_top_genes=n_top)
    return ref.var["highly_variable"].to_numpy()


# ---------------------------------------------------------------- seurat_v3 genes and loess


@pytest.mark.needs_shared_data
@pytest.mark.parametrize(
    ("name", "n_top"),
    [("dlpfc_151510_top500.h5ad", 50), ("dlpfc_151510_top500.h5ad", 200), ("dlpfc_151510_top500.h5ad", 499),
     ("osmfish_sscortex.h5ad", 10), ("osmfish_sscortex.h5ad", 32), ("osmfish_sscortex.h5ad", 3000)],
)
def test_highly_variable_seurat_v3_matches_scanpy(name, n_top):
    adata, x = _read(name)
    expected = _scanpy_hvg(adata, n_top)
    ours = highly_variable_seurat_v3(x, n_top)
    assert ours.sum() == min(n_top, adata.n_vars)
    np.testing.assert_array_equal(ours, expected)


@pytest.mark.needs_shared_data
def test_highly_variable_seurat_v3_recorded_genes_without_skmisc():
    # Recorded from scanpy 1.11.5 + scikit-misc 0.5.3, so this runs where skmisc is absent.
    adata, x = _read("dlpfc_151510_top500.h5ad")
    expected = {
        "LMO4", "ATP1B1", "TMSB10", "IGKC", "MOBP", "CCK", "CLDND1", "TF", "CLDN11", "SPP1", "MAP1B", "ENC1",
        "TUBB2A", "CNR1", "YWHAG", "PLP1", "NEFM", "NEFL", "STMN2", "FABP4", "HBB", "SAA1", "SCGB1D2", "SCGB2A2",
        "RTN3", "CRYAB", "NRGN", "MGP", "IGHA1", "HBA2", "HBA1", "CNP", "GFAP", "MBP", "SNAP25", "MAG",
        "PPP1R14A", "IGLC2", "YWHAH", "NPY",
    }
    assert set(adata.var_names[highly_variable_seurat_v3(x, 40)]) == expected
    adata, x = _read("osmfish_sscortex.h5ad")
    expected = {"Gad2", "Slc32a1", "Crhbp", "Cnr1", "Rorb", "Gfap", "Mfge8", "Plp1", "Bmp4", "Itpr2", "Foxj1", "Vtn"}
    assert set(adata.var_names[highly_variable_seurat_v3(x, 12)]) == expected


def test_highly_variable_seurat_v3_keeps_all_genes_when_fewer_than_asked():
    rng = np.random.default_rng(0)
    x = sp.csr_matrix(rng.poisson(2.0, size=(60, 33)).astype(np.float32))
    assert highly_variable_seurat_v3(x, 3000).all()


@pytest.mark.parametrize("n", [33, 500, 3000])
@pytest.mark.parametrize("ties", [False, True])
def test_loess_1d_matches_skmisc(n, ties):
    loess = pytest.importorskip("skmisc.loess").loess
    rng = np.random.default_rng(n)
    x = rng.normal(size=n)
    if ties:
        x = np.round(x, 2)  # runs of equal x: the k-d tree moves its split off them
    y = np.sin(2 * x) + 0.3 * rng.normal(size=n)
    model = loess(x, y, span=0.3, degree=2)
    model.fit()
    np.testing.assert_allclose(loess_1d(x, y), model.outputs.fitted_values, rtol=0, atol=1e-10)


# ---------------------------------------------------------------- normalise, log, scale


def _scanpy_scaled(adata):
    sc = pytest.importorskip("scanpy")
    ref = adata.copy()
    sc.pp.normalize_total(ref, target_sum=1e4)
    sc.pp.log1p(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pp.scale(ref, zero_center=False, max_value=10)
    return ref


@pytest.mark.needs_shared_data
@pytest.mark.parametrize("name", SPATIAL)
def test_prepare_spatial_matches_scanpy_scale_without_centring(name):
    adata, x = _read(name)
    ours = prepare_spatial(x, list(adata.var_names), n_top_genes=3000)  # more than either panel: all genes
    ref = _scanpy_scaled(adata)
    assert ours.genes == list(adata.var_names)
    assert ours.cell_mask.all()
    diff = abs(ours.model_input - sp.csr_matrix(ref.X))
    assert diff.max() <= 1e-5
    assert ours.model_input.max() <= 10.0
    np.testing.assert_allclose(ours.gene_std, ref.var["std"].to_numpy(), rtol=1e-5)


@pytest.mark.needs_shared_data
def test_prepare_spatial_subset_matches_reference_order_of_steps():
    # Reference: HVGs on counts, normalise all genes, log1p, scale, subset.
    adata, x = _read("dlpfc_151510_top500.h5ad")
    hvg = _scanpy_hvg(adata, 200)
    ours = prepare_spatial(x, list(adata.var_names), n_top_genes=200)
    ref = _scanpy_scaled(adata)[:, hvg]
    assert ours.genes == list(ref.var_names)
    assert abs(ours.model_input - sp.csr_matrix(ref.X)).max() <= 1e-5


def test_scale_with_applies_stored_std_to_a_new_section():
    rng = np.random.default_rng(1)
    train = sp.csr_matrix(rng.poisson(3.0, size=(80, 6)).astype(np.float32))
    prepared = prepare_spatial(train, [f"g{i}" for i in range(6)], n_top_genes=10)
    new = sp.csr_matrix(np.array([[0.0, 1.0, 50.0, 2.0, 0.0, 3.0]], dtype=np.float32))
    out = scale_with(new, prepared.gene_std).toarray()
    np.testing.assert_allclose(out, np.minimum(new.toarray() / prepared.gene_std, 10.0), rtol=1e-6)
    assert out[0, 0] == 0.0 and out[0, 2] == 10.0


# ---------------------------------------------------------------- spatial graph


def _brute_nearest(coords: np.ndarray, k: int) -> np.ndarray:
    d = ((coords[:, None, :] - coords[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    return np.argsort(d, axis=1, kind="stable")[:, :k]


@pytest.mark.parametrize("grid", [False, True])
def test_nearest_others_equals_brute_force_with_ties_by_index(grid):
    rng = np.random.default_rng(2)
    if grid:  # integer lattice: many exactly equal distances
        coords = np.stack(np.meshgrid(np.arange(20), np.arange(15)), -1).reshape(-1, 2).astype(float)
        coords = coords[rng.permutation(len(coords))]
    else:
        coords = rng.uniform(0, 100, size=(300, 2))
    np.testing.assert_array_equal(nearest_others(coords, 15), _brute_nearest(coords, 15))


def test_spatial_graph_is_symmetric_binary_without_self_loops():
    rng = np.random.default_rng(3)
    coords = rng.uniform(0, 50, size=(250, 2))
    coords[10] = coords[11]  # two spots at one position are still each other's neighbours
    a = spatial_graph(coords, k=6)
    assert a.shape == (250, 250)
    assert (a != a.T).nnz == 0
    assert np.all(a.data == 1.0)
    assert a.diagonal().sum() == 0
    assert a[10, 11] == 1.0
    expected = np.zeros((250, 250))
    nb = _brute_nearest(coords, 6)
    expected[np.repeat(np.arange(250), 6), nb.ravel()] = 1
    expected = np.maximum(expected, expected.T)
    np.testing.assert_array_equal(a.toarray(), expected)
    assert np.all(np.asarray(a.sum(1)).ravel() >= 6)


def test_spatial_graph_with_k_above_n_links_every_pair():
    coords = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    np.testing.assert_array_equal(spatial_graph(coords, k=15).toarray(), 1 - np.eye(3))


# ---------------------------------------------------------------- refinement


def _loop_refine(labels: np.ndarray, coords: np.ndarray, n: int) -> np.ndarray:
    """The reference's refine_label, with a stable sort so that equal distances go by index."""
    out = []
    for i in range(len(labels)):
        d = ((coords - coords[i]) ** 2).sum(1)
        d[i] = np.inf
        neigh = [labels[j] for j in np.argsort(d, kind="stable")[:n]]
        out.append(max(neigh, key=neigh.count))
    return np.array(out)


@pytest.mark.parametrize("grid", [False, True])
@pytest.mark.parametrize("n_neighbours", [6, 50])
def test_refine_labels_equals_loop_implementation(grid, n_neighbours):
    rng = np.random.default_rng(4)
    if grid:
        coords = np.stack(np.meshgrid(np.arange(25), np.arange(20)), -1).reshape(-1, 2).astype(float)
    else:
        coords = rng.uniform(0, 100, size=(500, 2))
    labels = rng.integers(0, 5, size=len(coords))
    before = labels.copy()
    out = refine_labels(labels, coords, n_neighbours=n_neighbours)
    np.testing.assert_array_equal(out, _loop_refine(labels, coords, n_neighbours))
    np.testing.assert_array_equal(labels, before)


def test_refine_labels_keeps_label_type_and_smooths_an_island():
    coords = np.stack(np.meshgrid(np.arange(10), np.arange(10)), -1).reshape(-1, 2).astype(float)
    labels = np.where(coords[:, 0] < 5, "left", "right").astype(object)
    labels[22] = "island"
    out = refine_labels(labels, coords, n_neighbours=8)
    assert out.dtype == labels.dtype
    assert out[22] == "left"
    assert "island" not in set(out)


# ---------------------------------------------------------------- plot and imports


def test_plot_domains_writes_a_small_png(tmp_path):
    pytest.importorskip("matplotlib")
    rng = np.random.default_rng(5)
    coords = rng.uniform(0, 100, size=(400, 2))
    path = plot_domains(coords, rng.integers(0, 7, size=400), tmp_path / "domains.png", "test")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) < 300_000
    assert list(tmp_path.iterdir()) == [path]
    # Permissions follow the umask like any other output (a mkstemp temporary would leave 0600).
    (tmp_path / "plain").write_bytes(b"")
    assert path.stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777


def test_spatial_module_does_not_import_torch():
    code = "import sys, scrcl_cli.spatial; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
