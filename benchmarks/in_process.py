"""Train scRCL on one shared dataset in this process, as `scrcl-cli train` does (no CLI, no ONNX).

For the benchmarks that compare what is done with one trained model (`embedding_choice.py`,
`kmeans_init.py`, `k_choice.py`): they need the inputs, the training result and the labels side
by side. Labels are returned for scoring only; nothing here passes them to training.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

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


def embedding_graph(e: np.ndarray) -> Any:
    """The Euclidean 15-NN graph of an embedding (N, D), binary and symmetric, CSR (N, N): the graph
    whose Louvain communities the benchmarks compare with the default cluster count."""
    from sklearn.neighbors import NearestNeighbors

    from scrcl_cli.graphs import knn_to_adjacency

    return knn_to_adjacency(NearestNeighbors(n_neighbors=15).fit(e).kneighbors(e, return_distance=False))


def run_grid(one_run: Callable[[str, int, int, int], dict], description: str, *,
             seeds: tuple[int, ...] = (0, 1)) -> tuple[list[str], list[dict]]:
    """The command line these benchmarks share (--datasets, --seeds, --hidden-dim, --epochs,
    --jobs, --json) and the pool running `one_run(dataset, seed, hidden_dim, epochs)` for every
    pair. Returns the dataset names (default: every non-spatial shared set) and the runs."""
    import argparse
    import json
    from concurrent.futures import ProcessPoolExecutor

    from accuracy import SPATIAL, manifest_datasets

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--datasets", nargs="+", default=None)
    p.add_argument("--seeds", nargs="+", type=int, default=list(seeds))
    p.add_argument("--hidden-dim", type=int, default=256)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if not DEFAULT_DATA.is_dir():
        sys.exit(f"skipped: {DEFAULT_DATA} is absent (the shared datasets)")
    sets = args.datasets or [d for d in manifest_datasets(DEFAULT_DATA) if d not in SPATIAL]
    grid = [(d, s, args.hidden_dim, args.epochs) for d in sets for s in args.seeds]
    with ProcessPoolExecutor(args.jobs) as ex:
        runs = list(ex.map(one_run, *zip(*grid)))
    if args.json:
        Path(args.json).write_text(json.dumps(runs))
    return sets, runs


def ari_cells(sets: list[str], runs: list[dict], columns: tuple[str, ...], *,
              digits: int = 3) -> tuple[dict[str, list[str]], list[str]]:
    """Table cells "mean ARI over seeds / mean pairwise ARI between the seeds' labels" (run["ari"][c],
    run["labels"][c]; nan with one seed) for each dataset and column, and the bold mean row's cells."""
    import itertools

    from sklearn.metrics import adjusted_rand_score

    rows: dict[str, list[str]] = {}
    means: dict[str, list[float]] = {c: [] for c in columns}
    stabs: dict[str, list[float]] = {c: [] for c in columns}
    for ds in sets:
        rs = [r for r in runs if r["ds"] == ds]
        for c in columns:
            pairs = [adjusted_rand_score(a["labels"][c], b["labels"][c]) for a, b in itertools.combinations(rs, 2)]
            means[c].append(float(np.mean([r["ari"][c] for r in rs])))
            stabs[c].append(float(np.mean(pairs)) if pairs else float("nan"))
        rows[ds] = [f"{means[c][-1]:.3f} / {stabs[c][-1]:.{digits}f}" for c in columns]
    mean_row = [f"**{np.mean(means[c]):.3f} / {np.nanmean(stabs[c]):.{digits}f}**" for c in columns]
    return rows, mean_row
