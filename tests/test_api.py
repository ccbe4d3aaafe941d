"""The Python API on real data: fit/save/load/embed/cluster equal the CLI's outputs bit for bit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import shared

import scrcl_cli
from scrcl_cli.cli import cli
from scrcl_cli.errors import ScrclError

SETTINGS = {"epochs": 3, "hidden_dim": 32, "out_dim": 8, "n_top_genes": 300}
CLI_SETTINGS = ["--epochs", "3", "--hidden-dim", "32", "--out-dim", "8", "--n-top-genes", "300"]


@pytest.fixture(scope="module")
def pbmc() -> Path:
    return shared("pbmc68k_reduced_700.h5ad")


def test_fit_save_load_embed_cluster_equal_the_cli_bit_for_bit(pbmc: Path, tmp_path: Path):
    pytest.importorskip("torch")
    import anndata as ad

    adata = ad.read_h5ad(pbmc)
    x_before = adata.X.copy()
    model = scrcl_cli.fit(adata, n_clusters=6, seed=3, **SETTINGS)
    assert (adata.X != x_before).nnz == 0, "fit must not modify X"
    model.save(tmp_path / "api_model")

    runner = CliRunner()
    res = runner.invoke(cli, ["-q", "train", str(pbmc), "-o", str(tmp_path / "cli_model"), "--n-clusters", "6",
                              "--seed", "3", "--out-h5ad", str(tmp_path / "train.h5ad"), *CLI_SETTINGS])
    assert res.exit_code == 0, res.output
    trained = ad.read_h5ad(tmp_path / "train.h5ad")
    np.testing.assert_array_equal(adata.obsm["X_scrcl"], trained.obsm["X_scrcl"])
    assert list(adata.obs["scrcl_cluster"]) == list(trained.obs["scrcl_cluster"])
    for name in ("genes.txt", "train_embedding.npy", "train_clusters.csv"):
        assert (tmp_path / "api_model" / name).read_bytes() == (tmp_path / "cli_model" / name).read_bytes(), name

    loaded = scrcl_cli.load(tmp_path / "api_model")
    query = ad.read_h5ad(pbmc)
    loaded.cluster(query, seed=1)
    res = runner.invoke(cli, ["-q", "cluster", str(pbmc), "-m", str(tmp_path / "api_model"), "-o",
                              str(tmp_path / "q.h5ad"), "--seed", "1"])
    assert res.exit_code == 0, res.output
    via_cli = ad.read_h5ad(tmp_path / "q.h5ad")
    np.testing.assert_array_equal(query.obsm["X_scrcl"], via_cli.obsm["X_scrcl"])
    assert list(query.obs["scrcl_cluster"]) == list(via_cli.obs["scrcl_cluster"])
    np.testing.assert_array_equal(query.obs["scrcl_confidence"].to_numpy(), via_cli.obs["scrcl_confidence"].to_numpy())
    assert query.uns["scrcl"]["model_sha256"] == via_cli.uns["scrcl"]["model_sha256"]

    # An unsaved model embeds the same as its saved copy.
    fresh = ad.read_h5ad(pbmc)
    model.embed(fresh, view="cell")
    again = ad.read_h5ad(pbmc)
    loaded.embed(again, view="cell")
    np.testing.assert_array_equal(fresh.obsm["X_scrcl"], again.obsm["X_scrcl"])


@pytest.mark.parametrize(("call", "needle"), [
    (lambda m, a: m.embed(a, batch_size=0), "batch_size must be an integer"),
    (lambda m, a: m.embed(a, view="both"), "view must be one of"),
    (lambda m, a: m.embed(a, device="tpu"), "device must be one of"),
    (lambda m, a: m.embed(a, key_added="../obs"), "not a valid obsm key"),
    (lambda m, a: m.embed(a, min_gene_overlap=2), "min_gene_overlap"),
    (lambda m, a: m.cluster(a, seed=-1), "seed must be an integer"),
    (lambda m, a: m.cluster(a, n_clusters=0, denovo=True), "n_clusters must be an integer"),
    (lambda m, a: m.cluster(a, n_clusters=4), "applies only with --denovo"),
    (lambda m, a: m.embed(a.X), "must be an AnnData"),
], ids=["batch_0", "view", "device", "key", "overlap", "seed", "k_0", "k_no_denovo", "not_anndata"])
def test_api_arguments_are_checked_with_one_message(call, needle: str, trained_model: Path, pbmc: Path):
    import anndata as ad

    with pytest.raises(ScrclError, match=needle):
        call(scrcl_cli.load(trained_model), ad.read_h5ad(pbmc))


def test_fit_rejects_unknown_options_and_bad_values(pbmc: Path):
    pytest.importorskip("torch")
    import anndata as ad

    adata = ad.read_h5ad(pbmc)
    with pytest.raises(ScrclError, match="unknown training option 'epoch'"):
        scrcl_cli.fit(adata, epoch=3)
    with pytest.raises(ScrclError, match="seed must be an integer"):
        scrcl_cli.fit(adata, seed=2**40, **SETTINGS)
    with pytest.raises(ScrclError, match="n_clusters 900 is more than the 700 cells"):
        scrcl_cli.fit(adata, n_clusters=900, **SETTINGS)
