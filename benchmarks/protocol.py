"""The evaluation protocol shared by the accuracy and cut suites: groups, rare types, stress test.

Groups, fixed by a rule that does not look at any result: the ``N_TUNING`` non-spatial shared
datasets with the most cells tune, the others confirm. A default is changed only on the tuning
group's evidence and reported on the confirmation group.

A type is *rare* below ``RARE`` of the cells; its recall is measured under Hungarian matching
(`scrcl_cli.metrics.rare_type_recall`).

Stress test: on the datasets with at least 10 types, the largest type is subsampled to half its
cells and the two smallest types holding at least 20 cells to 0.5 % of the cells that remain (at
least 3 cells), with a fixed seed. The files are made on the fly, never committed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

RARE = 0.03
N_TUNING = 5
STRESS_MIN_TYPES = 10


def split_groups(sizes: dict[str, int]) -> tuple[list[str], list[str]]:
    """(tuning, confirmation) from {dataset: cells}: the N_TUNING largest (ties by name), and the rest."""
    order = sorted(sizes, key=lambda n: (-sizes[n], n))
    return order[:N_TUNING], order[N_TUNING:]


def dataset_sizes(data_dir: Path, names: list[str]) -> dict[str, int]:
    """Cells of each dataset, read from the h5ad's obs index without loading X."""
    import h5py

    sizes = {}
    for name in names:
        with h5py.File(data_dir / f"{name}.h5ad", "r") as f:
            index = f["obs"].attrs.get("_index", "_index")
            sizes[name] = int(f["obs"][index].shape[0])
    return sizes


def stressed(labels: np.ndarray, seed: int = 0) -> np.ndarray | None:
    """Boolean mask (N,) of the cells the stress rule keeps, or None below STRESS_MIN_TYPES types."""
    types, counts = np.unique(labels, return_counts=True)
    if types.size < STRESS_MIN_TYPES:
        return None
    rng = np.random.default_rng(seed)
    keep = np.ones(labels.size, dtype=bool)
    order = np.argsort(-counts, kind="stable")
    big = np.flatnonzero(labels == types[order[0]])
    keep[rng.choice(big, size=big.size - big.size // 2, replace=False)] = False
    remaining = int(keep.sum())
    smalls = [t for t in types[order[::-1]] if (labels == t).sum() >= 20][:2]
    for t in smalls:
        idx = np.flatnonzero(labels == t)
        m = max(3, int(round(0.005 * remaining)))
        keep[rng.choice(idx, size=max(0, idx.size - m), replace=False)] = False
    return keep
