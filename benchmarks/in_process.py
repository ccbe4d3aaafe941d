"""Train scRCL on one shared dataset in this process, as `scrcl-cli train` does (no CLI, no ONNX).

For the benchmarks that compare what is done with one trained model (`embedding_choice.py`,
`kmeans_init.py`, `k_choice.py`): they need the inputs, the training result and the labels side
by side. Labels are returned for scoring only; nothing here passes them to training.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import DEFAULT_DATA, detect_expression  # noqa: E402


@dataclass
class Trained:
    config: Any  # TrainConfig
    prep: Any  # preprocessing.Prepared
    inputs: Any  # training.TrainInputs
    result: Any  # training.TrainResult
    labels: np.ndarray  # (N,) cell_type of the cells kept, for scoring only


def train_dataset(ds: str, seed: int, *, hidden_dim: int = 256, epochs: int = 100) -> Trained:
    """Every TrainConfig default except width and epochs (256 and 100, as `accuracy.py --quick`), on one CPU thread."""
    import anndata as ad
    import scipy.sparse as sp
    import torch

    from scrcl_cli.preprocessing import prepare
    from scrcl_cli.training import TrainConfig, build_inputs, fit

    torch.set_num_threads(1)
    a = ad.read_h5ad(DEFAULT_DATA / f"{ds}.h5ad")
    expr = detect_expression(a.X)[0]
    cfg = TrainConfig(hidden_dim=hidden_dim, epochs=epochs, seed=seed, expression=expr)
    prep = prepare(sp.csr_matrix(a.X, dtype=np.float32), [str(v) for v in a.var_names],
                   n_top_genes=cfg.n_top_genes, input_mode=cfg.input_mode, expression=expr)
    inputs = build_inputs(prep.model_input, prep.lognorm, cfg)
    result = fit(inputs, cfg, device=torch.device("cpu"))
    return Trained(cfg, prep, inputs, result, a.obs["cell_type"].to_numpy()[prep.cell_mask])
