"""Embedding and clustering new data with ONNX Runtime, without torch."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import anndata
import numpy as np
import pytest
from conftest import EXAMPLE, shared
from robustness_helpers import minimal_manifest

from scrcl_cli import bundle, inference
from scrcl_cli.io import h5ad
from scrcl_cli.metrics import ari


def _query():
    a = anndata.read_h5ad(EXAMPLE)
    h5ad.validate_adata(a, name="example")
    return a


def test_cluster_on_training_cells_reproduces_training_clusters(trained_model):
    trained = anndata.read_h5ad(trained_model.parent / "train.h5ad")
    q = _query()
    rep = inference.cluster(q, bundle.read_bundle(trained_model))
    assert rep.embed.provider == "CPUExecutionProvider"
    assert np.abs(q.obsm["X_scrcl"] - trained.obsm["X_scrcl"]).max() <= 1e-4
    assert ari(trained.obs["scrcl_cluster"].to_numpy(), q.obs["scrcl_cluster"].to_numpy()) >= 0.99


def test_denovo_with_k_given_sums_the_query_gram_once(trained_model, monkeypatch):
    """The query graph's PCA and the K-given cut's scaled PCA both need X^T X of the lognorm
    input: `cluster --denovo` sums it once, and its labels equal the cut computed apart."""
    from scrcl_cli import clustering, graphs
    from scrcl_cli.config import unsmoothed_weight

    model = bundle.read_bundle(trained_model)
    assert model.manifest.preprocessing.input_mode == "lognorm"  # the model input is lognorm itself
    summed = []
    real = graphs.gram_matrix
    monkeypatch.setattr(graphs, "gram_matrix", lambda x, *a, **k: summed.append(x.shape) or real(x, *a, **k))
    q = _query()
    rep = inference.cluster(q, model, denovo=True, n_clusters=5, seed=3)
    assert len(summed) == 1, summed
    monkeypatch.undo()
    apart = clustering.cluster_embedding(
        q.obsm["X_scrcl"], 5, seed=3, metric=model.manifest.clusters.metric, unsmoothed=rep.embed.query.model_input,
        unsmoothed_weight=unsmoothed_weight(model.manifest.unsmoothed_weight, k_given=True),
    )
    assert unsmoothed_weight(model.manifest.unsmoothed_weight, k_given=True) > 0  # the scaled PCA ran
    np.testing.assert_array_equal(q.obs["scrcl_cluster"].astype(int).to_numpy(), apart.labels)


def test_shuffled_gene_order_gives_identical_embedding(trained_model):
    model = bundle.read_bundle(trained_model)
    a, b = _query(), _query()
    perm = np.random.default_rng(0).permutation(b.n_vars)
    b = b[:, perm].copy()
    inference.embed(a, model)
    inference.embed(b, model)
    np.testing.assert_array_equal(a.obsm["X_scrcl"], b.obsm["X_scrcl"])


def test_thirty_percent_missing_genes_runs_and_reports_overlap(trained_model):
    model = bundle.read_bundle(trained_model)
    q = _query()
    keep = np.random.default_rng(1).permutation(q.n_vars)[: int(0.7 * q.n_vars)]
    q = q[:, np.sort(keep)].copy()
    rep = inference.embed(q, model)
    assert rep.n_genes_found == len(keep) and rep.n_genes_model == q.uns["scrcl"]["n_genes_model"]
    assert np.isfinite(q.obsm["X_scrcl"]).all()


def test_eighty_percent_missing_genes_is_overlap_error(trained_model):
    q = _query()
    q = q[:, : int(0.2 * q.n_vars)].copy()
    with pytest.raises(h5ad.ScrclError, match=r"only \d+ of \d+ model genes were found"):
        inference.embed(q, bundle.read_bundle(trained_model))


def test_fused_batches_equal_one_batch(trained_model):
    model = bundle.read_bundle(trained_model)
    a, b = _query(), _query()
    inference.embed(a, model, batch_size=100000)
    inference.embed(b, model, batch_size=37)
    assert np.abs(a.obsm["X_scrcl"] - b.obsm["X_scrcl"]).max() <= 1e-5


def test_embed_and_cluster_run_with_torch_unimportable(trained_model, tmp_path):
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from scrcl_cli.cli import main\n"
        "sys.argv = ['scrcl-cli', '-q', *sys.argv[1:]]\n"
        "main()\n"
    )
    for cmd in (["embed", str(EXAMPLE), "-m", str(trained_model), "-o", str(tmp_path / "e.h5ad"), "--view", "cell"],
                ["cluster", str(EXAMPLE), "-m", str(trained_model), "-o", str(tmp_path / "c.h5ad")]):
        res = subprocess.run([sys.executable, "-c", code, *cmd], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
    out = anndata.read_h5ad(tmp_path / "c.h5ad")
    assert out.obs["scrcl_cluster"].dtype == "category"
    assert (tmp_path / "c_markers.csv").read_text().startswith("cluster,rank,gene")


@pytest.mark.needs_shared_data
def test_real_query_half_clustered_with_model_trained_on_other_half(tmp_path):
    """Train on one half of pbmc_10x_4k, cluster the held-out half; ARI vs its labels is reported."""
    pytest.importorskip("torch")
    from click.testing import CliRunner

    from scrcl_cli.cli import cli

    full = anndata.read_h5ad(shared("pbmc_10x_4k_top2000.h5ad"))
    idx = np.random.default_rng(0).permutation(full.n_obs)
    ref, query = full[np.sort(idx[::2])].copy(), full[np.sort(idx[1::2])].copy()
    truth = query.obs["cell_type"].to_numpy()
    ref.obs = ref.obs[[]]
    query.obs = query.obs[[]]  # the model sees no labels
    ref.write_h5ad(tmp_path / "ref.h5ad")
    query.write_h5ad(tmp_path / "query.h5ad")
    runner = CliRunner()
    res = runner.invoke(cli, ["-q", "train", str(tmp_path / "ref.h5ad"), "-o", str(tmp_path / "m"), "--epochs", "40",
                              "--hidden-dim", "128", "--n-clusters", "8"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, ["-q", "cluster", str(tmp_path / "query.h5ad"), "-m", str(tmp_path / "m"),
                              "-o", str(tmp_path / "q.h5ad")])
    assert res.exit_code == 0, res.output
    pred = anndata.read_h5ad(tmp_path / "q.h5ad").obs["scrcl_cluster"].to_numpy()
    score = ari(truth, pred)
    print(f"\nheld-out half of pbmc_10x_4k (K=8 from the reference half): ARI = {score:.3f}")
    assert score > 0.3  # far above chance (0); the accuracy benchmark measures the full setting


def test_fused_batches_bounded_by_gather_budget_give_same_embedding(trained_model):
    """A tiny gather budget forces many small two-hop batches; the result must not change."""
    model = bundle.read_bundle(trained_model)
    q = _query()
    query = inference.prepare_query(q, model, min_gene_overlap=0.5, name="q")
    a_hat = inference.query_graph(query.lognorm, model.manifest.graph)
    session, _ = inference.open_session(model, "fused")
    params = model.manifest.graph
    whole = inference.run_encoder(session, "fused", query.model_input, a_hat, params, batch_size=100000, hidden_dim=64)
    calls = []
    small = inference.run_encoder(session, "fused", query.model_input, a_hat, params, batch_size=100000, hidden_dim=64,
                                  gather_bytes=64 * 4 * 2000, progress=lambda d, n: calls.append(d))
    assert len(calls) > 5  # the budget split the work
    assert np.abs(whole - small).max() <= 1e-5


# ----------------------------------------------------------------------------- files read in blocks


def _align_genes(x, var_names, genes, *, min_overlap, name):
    """Columns of x reordered to `genes` by the selection matrix (the whole-matrix reference)."""
    import scipy.sparse as sp

    sel, found = h5ad.gene_selection(var_names, genes, min_overlap=min_overlap, name=name)
    return sp.csr_matrix(x @ sel), found


def _reference_prepare(x, var_names, bundle):
    """prepare_query as it was before the block reader: every step on the whole (N, n_vars) matrix."""
    import scipy.sparse as sp

    from scrcl_cli.preprocessing import lognormalize, transform_query
    from scrcl_cli.spatial import scale_with

    pre = bundle.manifest.preprocessing
    x = sp.csr_matrix(x, dtype=np.float32)
    lognorm, found = _align_genes(lognormalize(x, pre.expression), var_names, bundle.genes, min_overlap=0.5, name="q")
    if pre.is_spatial:
        model_input = sp.csr_matrix(scale_with(lognorm, np.asarray(pre.gene_std), float(pre.max_value)),
                                    dtype=np.float32)
        return lognorm, model_input, found
    raw = lognorm if pre.input_mode == "lognorm" else _align_genes(x, var_names, bundle.genes, min_overlap=0.0,
                                                                          name="q")[0]
    return lognorm, transform_query(lognorm, raw, pre.input_mode), found


def _assert_bitwise(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype
    for attr in ("indptr", "indices", "data"):
        np.testing.assert_array_equal(getattr(a, attr), getattr(b, attr))


PREPROCESSING = {
    "lognorm": {"mode": "sc", "expression": "counts", "input_mode": "lognorm"},
    "counts": {"mode": "sc", "expression": "counts", "input_mode": "counts"},
    "spatial": {"mode": "spatial", "expression": "counts", "input_mode": "scaled", "max_value": 10.0},
}


@pytest.mark.needs_shared_data
@pytest.mark.parametrize("mode", list(PREPROCESSING))
def test_prepare_query_file_is_bitwise_the_whole_prepare_on_real_data(mode):
    """pbmc_10x_4k (4271 cells, CSR) in blocks of 333 rows against a model of 1200 of its genes
    (shuffled) and 100 it lacks: the same matrices, bit for bit, as the whole-matrix steps."""
    from scrcl_cli.inference import prepare_query_file

    path = shared("pbmc_10x_4k_top2000.h5ad")
    whole = h5ad.read_h5ad_checked(path)
    rng = np.random.default_rng(0)
    genes = list(rng.permutation(np.asarray(whole.var_names))[:1200]) + [f"absent{i}" for i in range(100)]
    genes = [str(g) for g in rng.permutation(genes)]
    std = tuple(float(v) for v in rng.uniform(0.2, 2.0, len(genes)))
    manifest = replace(minimal_manifest(genes), preprocessing=bundle.Preprocessing(**PREPROCESSING[mode], gene_std=std))
    model = bundle.ModelBundle(path=path.parent, manifest=manifest)
    ref_lognorm, ref_input, ref_found = _reference_prepare(whole.X, [str(v) for v in whole.var_names], model)

    reader = h5ad.ChunkedH5ad(path, chunk_rows=333)
    assert reader.n_obs > 4 * reader.chunk_rows
    got = prepare_query_file(reader, model, min_gene_overlap=0.5)
    assert got.n_genes_found == ref_found == 1200
    _assert_bitwise(got.lognorm, ref_lognorm)
    _assert_bitwise(got.model_input, ref_input)
    assert (got.model_input is got.lognorm) == (mode == "lognorm")  # one matrix, not two copies
    mem = inference.prepare_query(whole, model, min_gene_overlap=0.5, name="q")  # the in-memory API agrees too
    _assert_bitwise(mem.lognorm, ref_lognorm)
    _assert_bitwise(mem.model_input, ref_input)


def test_prepare_query_file_reports_bad_values_before_missing_genes(trained_model, tmp_path):
    """As with the whole read: a file that has both a NaN and too few model genes reports the NaN."""
    from robustness_helpers import poisson_counts, write_adata

    x = poisson_counts(300, 20)
    x[290, 3] = np.nan
    write_adata(tmp_path / "q.h5ad", x)  # gene names g0..g19: none is a model gene
    model = bundle.read_bundle(trained_model)
    with pytest.raises(h5ad.ScrclError, match="1 NaN or infinite values"):
        inference.embed_file(h5ad.ChunkedH5ad(tmp_path / "q.h5ad", chunk_rows=50), model)
    write_adata(tmp_path / "q.h5ad", np.nan_to_num(x))
    with pytest.raises(h5ad.ScrclError, match=r"none of the \d+ model genes were found in q.h5ad"):
        inference.embed_file(tmp_path / "q.h5ad", model)


@pytest.mark.parametrize("command", ["embed", "cluster"])
def test_file_path_output_equals_the_in_memory_path_and_input_is_unchanged(command, trained_model, tmp_path):
    """The real example, read in blocks of 97 cells and written as a patched copy, reads back equal
    to the AnnData that the in-memory API annotates and write_h5ad_atomic writes."""
    import hashlib
    import shutil

    import pandas as pd

    src = tmp_path / "in.h5ad"
    shutil.copyfile(EXAMPLE, src)
    before = hashlib.sha256(src.read_bytes()).hexdigest()
    model = bundle.read_bundle(trained_model)
    reader = h5ad.ChunkedH5ad(src, chunk_rows=97)
    mem = h5ad.read_h5ad_checked(src)
    if command == "embed":
        rep = inference.embed_file(reader, model, batch_size=64)
        ann = rep.annotations
        inference.embed(mem, model, batch_size=64)
    else:
        crep = inference.cluster_file(reader, model, denovo=True, n_clusters=5, seed=3, batch_size=64)
        ann = crep.embed.annotations
        mem_rep = inference.cluster(mem, model, denovo=True, n_clusters=5, seed=3, batch_size=64)
        assert crep.markers == mem_rep.markers
    h5ad.write_h5ad_patched(src, tmp_path / "out.h5ad", ann, overwrite=False)
    h5ad.write_h5ad_atomic(mem, tmp_path / "mem.h5ad", overwrite=False)
    assert hashlib.sha256(src.read_bytes()).hexdigest() == before
    got, ref = anndata.read_h5ad(tmp_path / "out.h5ad"), anndata.read_h5ad(tmp_path / "mem.h5ad")
    assert (got.X != ref.X).nnz == 0 and got.X.dtype == ref.X.dtype
    np.testing.assert_array_equal(got.obsm["X_scrcl"], ref.obsm["X_scrcl"])
    pd.testing.assert_frame_equal(got.obs, ref.obs)
    assert got.uns["scrcl"] == ref.uns["scrcl"]
    if command == "cluster":
        assert {"scrcl_cluster", "scrcl_confidence"} <= set(got.obs.columns)
        assert got.uns["scrcl"]["cluster"]["n_clusters"] == 5
