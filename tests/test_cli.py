"""The command line: bare --version, help with examples, a complete model directory from train."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner
from conftest import FAST, shared

from scrcl_cli import __version__, bundle
from scrcl_cli.cli import cli
from scrcl_cli.metrics import ari


def test_version_prints_only_the_version():
    res = CliRunner().invoke(cli, ["--version"])
    assert res.exit_code == 0
    assert res.output.strip() == __version__
    assert re.fullmatch(r"\d+\.\d+\.\d+", res.output.strip())


@pytest.mark.parametrize("command", ["train", "embed", "cluster"])
def test_help_shows_examples_and_exit_codes(command):
    res = CliRunner().invoke(cli, [command, "--help"])
    assert res.exit_code == 0
    assert "Examples:" in res.output and f"scrcl-cli {command}" in res.output
    assert "Exit codes" in res.output
    for opt in ("--device", "--overwrite"):
        assert opt in res.output


@pytest.mark.needs_shared_data
def test_train_on_pbmc4k_writes_complete_model_directory(tmp_path):
    pytest.importorskip("torch")
    src = shared("pbmc_10x_4k_top2000.h5ad")
    out = tmp_path / "model"
    res = CliRunner().invoke(cli, ["-q", "train", str(src), "-o", str(out), *FAST, "--seed", "1"])
    assert res.exit_code == 0, res.output
    model = bundle.read_bundle(out)  # checks every hash
    names = set(model.manifest.files)
    assert {"weights.pt", "encoder_fused.onnx", "encoder_cell.onnx", "genes.txt", "loss_log.csv",
            "train_embedding.npy", "train_clusters.csv"} <= names
    m = model.manifest
    assert len(m.genes) == 2000 and m.config["seed"] == 1 and m.training["device"] == "cpu"
    assert m.clusters.centroids("fused").shape[0] == m.clusters.n_clusters
    assert (out / "loss_log.csv").read_text().count("\n") == 3 + 1
    import torch

    state = torch.load(out / "weights.pt", weights_only=True)
    assert state["mlp_w"].shape == (32, 2000)
    assert json.loads((out / bundle.MANIFEST_NAME).read_text())["format_version"] == bundle.FORMAT_VERSION


def test_export_rewrites_onnx_with_new_hashes(trained_model, tmp_path):
    import shutil

    copy = tmp_path / "m"
    shutil.copytree(trained_model, copy)
    res = CliRunner().invoke(cli, ["-q", "export", str(copy)])
    assert res.exit_code == 0, res.output
    assert bundle.read_bundle(copy).manifest.genes == bundle.read_bundle(trained_model).manifest.genes


def test_info_reports_torch_and_onnxruntime():
    res = CliRunner().invoke(cli, ["info"])
    assert res.exit_code == 0
    assert "onnxruntime providers:" in res.output and "torch" in res.output


def test_demo_trains_clusters_and_scores_the_bundled_example(tmp_path):
    pytest.importorskip("torch")
    res = CliRunner().invoke(cli, ["-q", "demo", "-o", str(tmp_path / "d"), "--epochs", "2", "--hidden-dim", "16"])
    assert res.exit_code == 0, res.output
    assert re.search(r"demo: ARI against the published PBMC annotation = -?\d\.\d{3}", res.output)
    assert (tmp_path / "d" / "pbmc68k_clustered.h5ad").exists()
    assert bundle.read_bundle(tmp_path / "d" / "model").manifest.training["n_cells"] == 700


def test_train_option_defaults_are_the_training_defaults():
    """The CLI keeps its own copy of the defaults (it imports no torch to start); they must not drift."""
    pytest.importorskip("torch")
    from dataclasses import fields

    from scrcl_cli.training import TrainConfig

    cfg = TrainConfig()
    opts = {p.name: p.default for p in cli.commands["train"].params if p.name}
    shared_names = [f.name for f in fields(TrainConfig) if f.name in opts and f.name != "seed"]
    assert {"epochs", "hidden_dim", "out_dim", "lr", "temperature", "lambda1", "lambda2"} <= set(shared_names)
    for name in shared_names:
        if opts[name] is None:  # resolved at run time from the mode (--n-top-genes: 2000, spatial 3000)
            continue
        assert opts[name] == getattr(cfg, name), name


@pytest.mark.parametrize("command", ["embed", "cluster"])
def test_embed_and_cluster_on_a_dense_x_file_keep_x_dense_and_match_the_csr_file(command, trained_model, tmp_path):
    """A dense X is read in blocks and never rewritten: the output's X is the input's dense array,
    and the embedding and clusters equal those of the same cells stored as CSR."""
    import anndata as ad
    import numpy as np
    import scipy.sparse as sp
    from conftest import EXAMPLE

    a = ad.read_h5ad(EXAMPLE)
    a.X = sp.csr_matrix(a.X).toarray()
    a.write_h5ad(tmp_path / "dense.h5ad")
    runner = CliRunner()
    outs = {}
    for name, src in (("dense", tmp_path / "dense.h5ad"), ("csr", EXAMPLE)):
        out = tmp_path / f"{name}_out.h5ad"
        res = runner.invoke(cli, ["-q", command, str(src), "-m", str(trained_model), "-o", str(out), "--device", "cpu"])
        assert res.exit_code == 0, res.output
        outs[name] = ad.read_h5ad(out)
    dense, csr = outs["dense"], outs["csr"]
    assert isinstance(dense.X, np.ndarray)
    np.testing.assert_array_equal(dense.X, a.X)
    np.testing.assert_array_equal(dense.obsm["X_scrcl"], csr.obsm["X_scrcl"])
    if command == "cluster":
        assert (dense.obs["scrcl_cluster"] == csr.obs["scrcl_cluster"]).all()
        assert (tmp_path / "dense_out_markers.csv").read_text() == (tmp_path / "csr_out_markers.csv").read_text()


@pytest.mark.parametrize("embedding", ["gcn-pca", "fused"])
def test_cluster_reproduces_training_clusters_for_both_embeddings(tmp_path, embedding):
    """Each clustering embedding round-trips: `cluster` on the training cells (ONNX, nearest training
    centroid in the model's metric) gives the labels `train` wrote; a format-2 manifest (no metric
    recorded, the fused embedding) still clusters by cosine and gives the same labels."""
    pytest.importorskip("torch")
    import anndata as ad
    import numpy as np
    from conftest import EXAMPLE

    model, train_out = tmp_path / "m", tmp_path / "train.h5ad"
    res = CliRunner().invoke(cli, ["-q", "train", str(EXAMPLE), "-o", str(model), *FAST, "--n-clusters", "5",
                                   "--embedding", embedding, "--out-h5ad", str(train_out)])
    assert res.exit_code == 0, res.output
    m = bundle.read_bundle(model).manifest
    # gcn-pca: min(50 components, hidden width 32); fused: 2 * out_dim 8
    width, metric = (32, "euclidean") if embedding == "gcn-pca" else (16, "cosine")
    assert m.model.embedding == embedding and m.clusters.metric == metric
    assert m.clusters.algorithm == ("ward-kmeans" if embedding == "gcn-pca" else "spherical-kmeans")
    assert m.model.fused_dim == width and m.clusters.centroids("fused").shape == (5, width)
    trained = ad.read_h5ad(train_out)
    assert trained.obsm["X_scrcl"].shape[1] == width
    res = CliRunner().invoke(cli, ["-q", "cluster", str(EXAMPLE), "-m", str(model), "-o", str(tmp_path / "c.h5ad")])
    assert res.exit_code == 0, res.output
    got = ad.read_h5ad(tmp_path / "c.h5ad")
    np.testing.assert_allclose(got.obsm["X_scrcl"], trained.obsm["X_scrcl"], atol=1e-4)
    assert (got.obs["scrcl_cluster"].astype(str) == trained.obs["scrcl_cluster"].astype(str)).mean() > 0.99
    assert got.uns["scrcl"]["cluster"]["metric"] == metric
    conf = got.obs["scrcl_confidence"].to_numpy()
    assert np.all((conf >= 0) & (conf <= 1.0 + 1e-6))
    # --denovo on the training cells with train's K and seed repeats train's own clustering.
    res = CliRunner().invoke(cli, ["-q", "cluster", str(EXAMPLE), "-m", str(model), "-o", str(tmp_path / "d.h5ad"),
                                   "--denovo", "--n-clusters", "5", "--seed", "0"])
    assert res.exit_code == 0, res.output
    denovo = ad.read_h5ad(tmp_path / "d.h5ad")
    assert denovo.uns["scrcl"]["cluster"]["algorithm"] == m.clusters.algorithm
    assert ari(trained.obs["scrcl_cluster"].astype(str), denovo.obs["scrcl_cluster"].astype(str)) > 0.95


def test_threads_option_caps_blas_pools_as_well_as_torch() -> None:
    """--threads N reaches numpy/scipy's BLAS pools, not only torch: a benchmark's --jobs or a
    pipeline running several processes per node would otherwise oversubscribe the host."""
    import torch
    from threadpoolctl import threadpool_info, threadpool_limits

    from scrcl_cli.cli import _set_threads

    before = torch.get_num_threads()
    with threadpool_limits():  # restores every pool's size on exit
        _set_threads(1)
        pools = threadpool_info()
        assert pools, "no BLAS/OpenMP pool found to limit"
        assert all(p["num_threads"] == 1 for p in pools)
        assert torch.get_num_threads() == 1
    torch.set_num_threads(before)


def test_train_matmul_precision_is_reported_and_recorded_in_the_model(tmp_path):
    torch = pytest.importorskip("torch")
    from conftest import EXAMPLE

    out = tmp_path / "model"
    res = CliRunner().invoke(cli, ["train", str(EXAMPLE), "-o", str(out), *FAST, "--n-clusters", "5",
                                   "--no-export", "--matmul-precision", "medium"])
    assert res.exit_code == 0, res.output
    assert "float32 matmul precision medium" in res.output
    assert bundle.read_bundle(out).manifest.config["matmul_precision"] == "medium"
    assert torch.get_float32_matmul_precision() == "highest"
    bad = CliRunner().invoke(cli, ["train", str(EXAMPLE), "-o", str(tmp_path / "m2"), "--matmul-precision", "low"])
    assert bad.exit_code == 2 and "'low' is not one of 'highest', 'high', 'medium'" in bad.output
