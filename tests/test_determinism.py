"""Same seed, same result: train on CPU in separate processes, and embed/cluster run twice.

Runs are separate `python -m scrcl_cli` processes, so nothing (hash seeds, import order, cached
state) is shared between the two results compared.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import EXAMPLE
from robustness_helpers import FAST_TRAIN, run_cli

CPU_TOLERANCE = 1e-6  # max abs difference allowed between two CPU trainings with the same seed


def _train_concurrently(runs: dict[str, list[str]], tmp_path: Path, device: str = "cpu") -> dict[str, Path]:
    """Start one `train` process per entry at once (two CPU cores: half the wall time); return model dirs."""
    procs = {}
    for name, extra in runs.items():
        out = tmp_path / name
        cmd = [sys.executable, "-m", "scrcl_cli", "-q", "train", str(EXAMPLE), "-o", str(out), *FAST_TRAIN,
               "--no-export", "--device", device, "--out-h5ad", str(tmp_path / f"{name}.h5ad"), *extra]
        procs[name] = (out, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for _out, proc in procs.values():
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
    return {name: out for name, (out, _) in procs.items()}


def _embedding(model: Path) -> np.ndarray:
    return np.load(model / "train_embedding.npy")


def test_train_same_seed_same_cpu_embedding_across_processes(tmp_path: Path):
    import anndata as ad

    models = _train_concurrently({"a": ["--seed", "3"], "b": ["--seed", "3"], "other_seed": ["--seed", "4"]}, tmp_path)
    a, b = _embedding(models["a"]), _embedding(models["b"])
    assert a.shape == b.shape
    assert float(np.abs(a - b).max()) <= CPU_TOLERANCE
    assert (models["a"] / "train_clusters.csv").read_text() == (models["b"] / "train_clusters.csv").read_text()
    ha, hb = ad.read_h5ad(tmp_path / "a.h5ad"), ad.read_h5ad(tmp_path / "b.h5ad")
    assert float(np.nanmax(np.abs(ha.obsm["X_scrcl"] - hb.obsm["X_scrcl"]))) <= CPU_TOLERANCE
    assert (ha.obs["scrcl_cluster"] == hb.obs["scrcl_cluster"]).all()
    # The seed is really used: another seed gives another embedding.
    assert float(np.abs(a - _embedding(models["other_seed"])).max()) > 1e-3


@pytest.mark.parametrize(("command", "extra"), [
    ("embed", ["--view", "fused"]),
    ("embed", ["--view", "cell", "--batch-size", "64"]),
    ("cluster", ["--denovo", "--seed", "2"]),
], ids=["embed_fused", "embed_cell_batched", "cluster_denovo"])
def test_inference_twice_gives_identical_output(command: str, extra: list[str], trained_model: Path, tmp_path: Path):
    import anndata as ad

    outs = []
    for i in range(2):
        out = tmp_path / f"run{i}.h5ad"
        res = run_cli("-q", command, EXAMPLE, "-m", trained_model, "-o", out, "--device", "cpu", *extra)
        assert res.returncode == 0, res.stderr
        outs.append(ad.read_h5ad(out))
    assert np.array_equal(outs[0].obsm["X_scrcl"], outs[1].obsm["X_scrcl"])
    if command == "cluster":
        assert (outs[0].obs["scrcl_cluster"] == outs[1].obs["scrcl_cluster"]).all()
        assert (tmp_path / "run0_markers.csv").read_text() == (tmp_path / "run1_markers.csv").read_text()


@pytest.mark.gpu
def test_train_same_seed_gpu_embedding_difference_is_small(tmp_path: Path):
    """Measures GPU nondeterminism (scatter-add atomics, cuBLAS); prints the size for the docs."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    models = _train_concurrently({"a": ["--seed", "3"], "b": ["--seed", "3"]}, tmp_path, device="cuda")
    diff = float(np.abs(_embedding(models["a"]) - _embedding(models["b"])).max())
    print(f"GPU same-seed max abs embedding difference: {diff:.3g}")
    assert diff <= 1e-3
