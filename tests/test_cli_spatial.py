"""`--spatial` end to end on a real section: refined labels, stored scaling, modes never switch silently."""

from __future__ import annotations

import anndata
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import shared

import scrcl_cli
from scrcl_cli import bundle
from scrcl_cli.cli import cli
from scrcl_cli.errors import ScrclError


@pytest.fixture(scope="module")
def section(tmp_path_factory):
    """A contiguous 800-spot window of the osmFISH section (labels dropped)."""
    a = anndata.read_h5ad(shared("osmfish_sscortex.h5ad"))
    xy = np.asarray(a.obsm["spatial"])
    keep = np.argsort(xy[:, 1])[:800]
    sub = a[np.sort(keep)].copy()
    sub.obs = sub.obs[[]]
    path = tmp_path_factory.mktemp("spatial") / "osmfish_window.h5ad"
    sub.write_h5ad(path)
    return path


@pytest.mark.needs_shared_data
def test_spatial_train_then_cluster_writes_refined_domains(section, tmp_path):
    pytest.importorskip("torch")
    runner = CliRunner()
    model = tmp_path / "m"
    res = runner.invoke(cli, ["-q", "train", "--spatial", str(section), "-o", str(model), "--epochs", "3",
                              "--hidden-dim", "32", "--out-dim", "6", "--n-clusters", "5", "--refine-neighbours", "10",
                              "--out-h5ad", str(tmp_path / "train.h5ad")])
    assert res.exit_code == 0, res.output
    m = bundle.read_bundle(model).manifest
    assert m.preprocessing.mode == "spatial" and len(m.preprocessing.gene_std or ()) == len(m.genes) == 33
    assert m.graph.kind == "spatial" and m.graph.refine_neighbours == 10
    # Options given on the command line win; the others take the spatial defaults, not SC's.
    cfg = m.config
    assert (cfg["epochs"], cfg["hidden_dim"], cfg["out_dim"]) == (3, 32, 6)
    assert (cfg["temperature"], cfg["lambda1"], cfg["gene_neighbors"], cfg["t0"], cfg["t1"], cfg["n_top_genes"]) == (
        1.0, 10.0, 1, 5, 5, 3000)
    trained = anndata.read_h5ad(tmp_path / "train.h5ad")
    assert {"scrcl_cluster", "scrcl_cluster_refined"} <= set(trained.obs.columns)

    out = tmp_path / "c.h5ad"
    res = runner.invoke(cli, ["-q", "cluster", "--spatial", str(section), "-m", str(model), "-o", str(out)])
    assert res.exit_code == 0, res.output
    c = anndata.read_h5ad(out)
    assert c.obs["scrcl_cluster_refined"].dtype == "category"
    # Same section: the exported encoder reproduces the training labels.
    assert (c.obs["scrcl_cluster"].to_numpy() == trained.obs["scrcl_cluster"].to_numpy()).mean() > 0.99

    res = runner.invoke(cli, ["cluster", str(section), "-m", str(model), "-o", str(tmp_path / "x.h5ad")])
    assert res.exit_code == 1 and "was trained with --spatial" in res.output

    # The Python API refuses a section without coordinates as the CLI does, embedding or clustering.
    loaded = scrcl_cli.load(model)
    bare = anndata.read_h5ad(section)
    del bare.obsm["spatial"]
    for call in (loaded.embed, loaded.cluster):
        with pytest.raises(ScrclError, match=r"spatial model .* no obsm\['spatial'\]"):
            call(bare)
    with_xy = anndata.read_h5ad(section)
    loaded.cluster(with_xy)
    assert (with_xy.obs["scrcl_cluster"].to_numpy() == c.obs["scrcl_cluster"].to_numpy()).all()
