"""The staged encoders (smoothing outside ONNX, after the first linear layer) give the one-graph
encoders' embedding, and are what `embed` runs for a default (gcn-pca) model."""

from __future__ import annotations

import anndata
import numpy as np
import pytest
import scipy.sparse as sp
from conftest import EXAMPLE

from scrcl_cli import bundle as model_bundle
from scrcl_cli import inference, stages
from scrcl_cli.io import h5ad

# float32 rounding of a different summation order (X Wᵀ then Â^t, against Â^t X then Wᵀ), on
# embeddings of magnitude about 1.
TOL = 1e-4


def _query(rows=None):
    a = anndata.read_h5ad(EXAMPLE)
    h5ad.validate_adata(a, name="example")
    return a if rows is None else a[rows].copy()


@pytest.mark.parametrize("view", ["fused", "cell"])
@pytest.mark.parametrize("rows", [None, slice(100, 450)])
def test_staged_encoder_equals_one_graph_encoder(trained_model, view, rows):
    bundle = model_bundle.read_bundle(trained_model)
    assert stages.has_stages(bundle.manifest.files, view)
    query = inference.prepare_query(_query(rows), bundle, min_gene_overlap=0.5, name="q")
    params = bundle.manifest.graph
    a_hat = inference.query_graph(query.lognorm, params)
    session, _ = inference.open_session(bundle, view)
    one = inference.run_encoder(session, view, query.model_input, a_hat, params, hidden_dim=64)
    staged, provider = inference.run_staged_encoder(bundle, view, query.model_input, a_hat, params, batch_size=97)
    assert provider == "CPUExecutionProvider"
    assert staged.shape == one.shape and np.isfinite(staged).all()
    assert np.abs(staged - one).max() <= TOL * max(1.0, np.abs(one).max())
    assert np.abs(one).max() > 1e-2  # not a trivially zero embedding


def test_embed_uses_stages_and_matches_training_embedding(trained_model, caplog):
    trained = anndata.read_h5ad(trained_model.parent / "train.h5ad")
    q = _query()
    with caplog.at_level("INFO", logger="scrcl_cli.inference"):
        inference.embed(q, model_bundle.read_bundle(trained_model))
    assert "staged encoder" in caplog.text
    assert np.abs(q.obsm["X_scrcl"] - trained.obsm["X_scrcl"]).max() <= 1e-4


def test_smooth_inplace_equals_repeated_products():
    rng = np.random.default_rng(0)
    a = sp.random(300, 300, density=0.03, random_state=1, format="csr", dtype=np.float32)
    y = rng.random((300, 600)).astype(np.float32)
    want = a @ (a @ (a @ y))
    got = stages.smooth_inplace(y.copy(), a, 3, block=256)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # Threads take column blocks; every column's products are the same, so the result is too.
    threaded = stages.smooth_inplace(y.copy(), a, 3, block=64, workers=3)
    assert np.array_equal(threaded, stages.smooth_inplace(y.copy(), a, 3, block=64))
