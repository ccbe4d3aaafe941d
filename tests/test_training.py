"""Training reads no labels, is reproducible for a seed, and lowers the loss on real data."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

pytest.importorskip("torch")
import anndata  # noqa: E402
import torch  # noqa: E402

from scrcl_cli.training import TrainConfig, build_inputs, fit  # noqa: E402
from scrcl_cli.workflow import train_model  # noqa: E402

from conftest import EXAMPLE  # noqa: E402

CFG = TrainConfig(epochs=15, hidden_dim=48, out_dim=6, n_top_genes=300, seed=3)


def _example():
    a = anndata.read_h5ad(EXAMPLE)
    a.X = sp.csr_matrix(a.X, dtype=np.float32)
    return a


def test_training_ignores_label_columns():
    with_labels = _example()
    without = _example()
    without.obs = without.obs.drop(columns=list(without.obs.columns))
    rng = np.random.default_rng(0)
    with_labels.obs["cell_type"] = rng.permutation(with_labels.obs["cell_type"].to_numpy())  # scrambled on purpose
    a = train_model(with_labels, CFG, device="cpu", n_clusters=5, export=False)
    b = train_model(without, CFG, device="cpu", n_clusters=5, export=False)
    np.testing.assert_array_equal(a.embedding, b.embedding)
    np.testing.assert_array_equal(a.labels, b.labels)


def test_same_seed_same_cpu_embedding_and_other_seed_differs():
    a = train_model(_example(), CFG, device="cpu", n_clusters=5, export=False)
    b = train_model(_example(), CFG, device="cpu", n_clusters=5, export=False)
    assert np.abs(a.embedding - b.embedding).max() <= 1e-6
    c = train_model(_example(), TrainConfig(**{**CFG.as_dict(), "seed": 4}), device="cpu", n_clusters=5, export=False)
    assert np.abs(a.embedding - c.embedding).max() > 1e-3


def test_fit_loss_decreases_and_stays_finite_on_real_cells():
    from scrcl_cli.preprocessing import prepare

    ad = _example()
    prep = prepare(ad.X, list(ad.var_names), n_top_genes=300)
    cfg = TrainConfig(**{**CFG.as_dict(), "epochs": 60, "lr": 1e-3})
    res = fit(build_inputs(prep.model_input, prep.lognorm, cfg), cfg, device=torch.device("cpu"))
    assert np.all(np.isfinite(res.losses))
    assert res.losses[-5:, 0].mean() < res.losses[:5, 0].mean()
    assert res.fused.shape == (700, 12)


def test_device_cuda_without_gpu_is_a_user_error():
    from scrcl_cli.errors import ScrclError

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(ScrclError, match="--device cuda was requested"):
        train_model(_example(), CFG, device="cuda", n_clusters=3, export=False)


def test_induced_subgraph_matches_scipy_normalisation():
    from scrcl_cli import graphs
    from scrcl_cli.training import induced_subgraph

    rng = np.random.default_rng(0)
    adj = graphs.knn_to_adjacency(graphs.knn_cosine(rng.normal(size=(80, 5)), 6))
    nodes = np.sort(rng.choice(80, 30, replace=False))
    coo = adj.tocoo()
    a_b, a_hat_b = induced_subgraph(torch.tensor(coo.row, dtype=torch.int64), torch.tensor(coo.col, dtype=torch.int64),
                                    torch.tensor(nodes), 80)
    sub = adj[nodes][:, nodes]
    np.testing.assert_array_equal(a_b.to_dense().numpy(), sub.toarray())
    np.testing.assert_allclose(a_hat_b.to_dense().numpy(), graphs.gcn_norm(sub).toarray(), rtol=1e-6)


def test_minibatch_training_learns_on_real_cells():
    """Mini-batches of ~256 of the 700 real cells vs full batch, six seeds each (one thread).

    Single seeds differ by up to ±0.1 ARI here, so the comparison is of means over seeds.
    Measured on the development machine: full 0.450, mini-batch 0.451 over these six seeds
    (over eight: 0.454 vs 0.453; `benchmarks/minibatch.py`, docs/benchmarks.md §3). The bound
    asserted is 0.1, twice the 0.05 of the mini-batch target, because the trajectories depend on the CPU's float
    kernels and the standard error of the difference over six seeds is about 0.05.
    """
    from scrcl_cli.clustering import cosine_kmeans
    from scrcl_cli.metrics import ari
    from scrcl_cli.preprocessing import prepare

    ad = _example()
    truth = ad.obs["cell_type"].to_numpy()  # evaluation only
    prep = prepare(ad.X, list(ad.var_names), n_top_genes=300)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        full, mini = [], []
        inputs = None
        for seed in range(6):
            cfg = TrainConfig(**{**CFG.as_dict(), "epochs": 25, "lr": 1e-3, "seed": seed})
            inputs = inputs or build_inputs(prep.model_input, prep.lognorm, cfg)
            mb = fit(inputs, cfg, device=torch.device("cpu"), batch_size=256)
            assert mb.extra["batch_size"] == 256
            assert np.all(np.isfinite(mb.losses)) and mb.losses[-5:, 0].mean() < mb.losses[:5, 0].mean()
            mini.append(ari(truth, cosine_kmeans(mb.fused, 10, seed=0).labels))
            full.append(ari(truth, cosine_kmeans(fit(inputs, cfg, device=torch.device("cpu")).fused, 10, seed=0).labels))
    finally:
        torch.set_num_threads(threads)
    print(f"\nmini-batch ARI {np.mean(mini):.3f} vs full batch {np.mean(full):.3f} over 6 seeds")
    assert np.mean(mini) > 0.3
    assert np.mean(mini) >= np.mean(full) - 0.1