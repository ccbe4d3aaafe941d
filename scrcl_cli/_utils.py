"""Small array helpers shared by several modules (kept here so that no module imports another for them)."""

from __future__ import annotations

from typing import Any

import numpy as np

# Stored values per block where a whole-matrix pass would otherwise make float64 or int64 copies of
# every stored value of X (8 bytes each: 12 GB at ten million cells); 2**24 values are 128 MiB.
VALUE_BLOCK = 1 << 24


def unit_rows(x: np.ndarray, dtype: Any = np.float64) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero); x: (N, d) -> `dtype` (N, d)."""
    x = np.asarray(x, dtype=dtype)
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(dtype, copy=False)


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one), at least 1."""
    import os

    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS and Windows have no affinity call
        return max(1, os.cpu_count() or 1)


def human_bytes(n: float) -> str:
    """A byte count for a message: '3.21 GiB' from 1 GiB up, else '740.2 MiB'."""
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.1f} MiB"
