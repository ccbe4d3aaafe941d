"""Hand-written preprocessing matches scanpy: same HVG set, same values within 1e-5."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from conftest import shared

from scrcl_cli.preprocessing import highly_variable_seurat, nonzero_masks, normalize_log1p, prepare

sc = pytest.importorskip("scanpy")
anndata = pytest.importorskip("anndata")


@pytest.mark.needs_shared_data
@pytest.mark.parametrize(
    ("name", "n_top"),
    [("pbmc68k_reduced_700.h5ad", 2000), ("mouse_bladder_top2000.h5ad", 2000), ("worm_neuron.h5ad", 2000),
     ("cite_cbmc_top2000.h5ad", 500)],
)
def test_prepare_matches_scanpy_hvg_set_and_values(name, n_top):
    adata = anndata.read_h5ad(shared(name))
    ours = prepare(sp.csr_matrix(adata.X), list(adata.var_names), n_top_genes=n_top, input_mode="lognorm")

    ref = adata.copy()
    sc.pp.filter_cells(ref, min_genes=1)
    sc.pp.filter_genes(ref, min_cells=1)
    sc.pp.normalize_total(ref, target_sum=1e4)
    sc.pp.log1p(ref)
    sc.pp.highly_variable_genes(ref, flavor="seurat", n_top_genes=n_top)
    hvg = list(ref.var_names[ref.var["highly_variable"].to_numpy()])

    assert ours.genes == hvg
    assert ours.cell_mask.sum() == ref.n_obs
    expected = ref[:, hvg].X
    diff = abs(ours.lognorm - sp.csr_matrix(expected))
    assert diff.max() <= 1e-5


def test_normalize_log1p_scales_to_target_sum_and_keeps_zero_cells():
    x = sp.csr_matrix(np.array([[1.0, 3.0, 0.0], [0.0, 0.0, 0.0], [2.0, 2.0, 4.0]]))
    out = normalize_log1p(x).toarray()
    np.testing.assert_allclose(np.expm1(out).sum(1), [1e4, 0.0, 1e4], rtol=1e-5)
    assert np.all(out[1] == 0)


def test_nonzero_masks_ignore_explicit_zeros():
    x = sp.csr_matrix((np.array([0.0, 2.0]), np.array([0, 1]), np.array([0, 1, 2])), shape=(2, 3))
    cells, genes = nonzero_masks(x)
    assert cells.tolist() == [False, True]
    assert genes.tolist() == [False, True, False]


def test_highly_variable_seurat_returns_all_genes_when_fewer_than_asked():
    rng = np.random.default_rng(0)
    x = sp.csr_matrix(rng.poisson(2.0, size=(50, 12)).astype(np.float32))
    mask = highly_variable_seurat(normalize_log1p(x), 2000)
    assert mask.sum() == 12


@pytest.mark.parametrize("expression", ["counts", "log"])
def test_prepare_keeps_every_gene_without_copying_x_and_never_hands_back_x_itself(expression):
    """With every cell and gene kept and every gene asked for, prepare skips the filtering copies,
    but its matrices are never the caller's X (which the caller keeps and may change); the values
    equal the filtered route's."""
    rng = np.random.default_rng(0)
    dense = rng.poisson(0.6, size=(300, 40)).astype(np.float32)
    dense[:, 0] += 1.0  # every cell and gene has counts
    x = sp.csr_matrix(np.log1p(dense) if expression == "log" else dense)
    before = x.copy()
    prep = prepare(x, [f"g{i}" for i in range(40)], n_top_genes=40, expression=expression)
    assert prep.model_input.shape == (300, 40) and prep.cell_mask.all()
    assert prep.model_input is not x and not np.shares_memory(prep.model_input.data, x.data)
    want = normalize_log1p(x) if expression == "counts" else x
    np.testing.assert_array_equal(prep.model_input.toarray(), want.toarray())
    prep.model_input.data[:] = -1.0
    np.testing.assert_array_equal(x.toarray(), before.toarray())
