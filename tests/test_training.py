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
