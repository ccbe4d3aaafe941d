"""Staged encoders: per-cell ONNX stages with the graph smoothing between them (no torch).

A gcn-pca model (the default) is also exported as a chain of per-cell stages (export.py,
`export_stages`), and Â's powers are applied between them here, to (N, H) arrays:

    fused: x -> x W1ᵀ | Â^(t1+1) | leaky(p + b1) W2ᵀ | Â | leaky(s + b2) -> fc -> PCA scores
    cell:  x -> x Wmᵀ | Â^t0     | relu(p + bm) -> PCA scores

Linear maps commute with Â (Â^t X Wᵀ = Â^t (X Wᵀ)), so the result is the one-graph encoders'
up to float32 rounding. Against the one-graph path this needs no dense (N, G) smoothed input
(the model input stays sparse and is densified a row block at a time), no padded (B, K, H)
gather and no per-batch recomputation of a neighbourhood's first layer: every stage runs once
per cell. Memory: one float32 (N, H) array, the output and a row block.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

log = logging.getLogger(__name__)

# Powers of Â after each stage but the last, by view: names resolved by `stage_powers`.
STAGE_SMOOTHING = {"fused": ("t1+1", "1"), "cell": ("t0",)}


def stage_files(view: str) -> list[str]:
    """File names of `view`'s stages in the model directory, in order."""
    return [f"encoder_{view}_stage{i}.onnx" for i in range(len(STAGE_SMOOTHING[view]) + 1)]


def stage_powers(view: str, t0: int, t1: int) -> list[int]:
    """The power of Â applied after each stage but the last (`STAGE_SMOOTHING`)."""
    return [{"t0": t0, "t1+1": t1 + 1, "1": 1}[k] for k in STAGE_SMOOTHING[view]]


def has_stages(files: Mapping[str, Any], view: str) -> bool:
    """True when a model's file table (manifest ``files``) holds every stage of `view`."""
    return all(name in files for name in stage_files(view))


def smooth_inplace(y: np.ndarray, a_hat: sp.csr_matrix, t: int, *, block: int = 64, workers: int = 1) -> np.ndarray:
    """y <- Â^t y in place, a block of columns at a time.

    y: float32 C-contiguous (N, H); a_hat: float32 CSR (N, N). Besides y two (N, block) arrays
    per worker are alive. Narrow blocks keep the rows each product gathers in cache (64 columns
    beat 256 when this was written, commit 2ba7619). `workers` threads take column blocks in
    turn: scipy's sparse product releases the GIL, so 2 threads halve the time on 2 cores
    (docs/benchmarks.md, "Staged encoders"); the result does not depend on `workers`. Returns y.
    """
    if t <= 0:
        return y

    def one(c0: int) -> None:
        c1 = min(y.shape[1], c0 + block)
        z = np.ascontiguousarray(y[:, c0:c1])
        for _ in range(t):
            z = a_hat @ z
        y[:, c0:c1] = z

    starts = range(0, y.shape[1], block)
    if workers <= 1:
        for c0 in starts:
            one(c0)
        return y
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(one, starts))  # list() re-raises a worker's exception here
    return y


def locality_order(a_hat: sp.csr_matrix) -> np.ndarray:
    """A reverse Cuthill-McKee order of the graph's cells (N,) int: neighbours get nearby rows,
    so the sparse products read rows that are already in cache (3-4x faster smoothing at
    50,000 cells than in file order, commit 2ba7619)."""
    from scipy.sparse.csgraph import reverse_cuthill_mckee

    return np.asarray(reverse_cuthill_mckee(sp.csr_matrix(a_hat), symmetric_mode=True), dtype=np.int64)


def run_stages(
    runners: Sequence[Callable[[np.ndarray], np.ndarray]],
    powers: Sequence[int],
    model_input: sp.csr_matrix | np.ndarray,
    a_hat: sp.csr_matrix | None,
    *,
    batch_size: int = 4096,
    progress: Callable[[int, int], None] | None = None,
    workers: int = 1,
) -> np.ndarray:
    """Embedding (N, D) float32 of every cell through the staged encoder.

    runners: one function per stage mapping a float32 (B, width) row block to (B, width');
    the first takes model-input rows (B, G), the others (B, H). powers: len(runners) - 1 powers
    of Â, applied to all cells between consecutive stages. model_input: (N, G) CSR or dense.
    With a graph, cells are processed in `locality_order` (every stage is per cell, so the
    order changes nothing but speed) and the output is in the input's order. workers: threads
    of the smoothing (`smooth_inplace`).
    """
    if len(powers) != len(runners) - 1:
        raise ValueError("one smoothing power between each pair of stages")
    if a_hat is None and any(powers):
        raise ValueError("this view needs the query graph")
    n = model_input.shape[0]
    clock = time.perf_counter()
    order = None
    if a_hat is not None and any(powers):
        order = locality_order(a_hat)
        a_hat = sp.csr_matrix(a_hat[order][:, order])
        a_hat.sort_indices()
    hidden: np.ndarray | None = None
    for start in range(0, n, batch_size):  # stage 0: model input rows -> (N, H)
        stop = min(n, start + batch_size)
        rows = model_input[start:stop] if order is None else model_input[order[start:stop]]
        x = rows.toarray() if sp.issparse(rows) else np.ascontiguousarray(rows)  # type: ignore[union-attr]
        y = runners[0](np.asarray(x, dtype=np.float32))
        if hidden is None:
            hidden = np.empty((n, y.shape[1]), dtype=np.float32)
        hidden[start:stop] = y
    assert hidden is not None
    log.info("stage 0 (first linear layer): %.1f s", time.perf_counter() - clock)
    out: np.ndarray | None = None
    for i, t in enumerate(powers):
        clock = time.perf_counter()
        smooth_inplace(hidden, a_hat, t, workers=workers)
        log.info("smoothing Â^%d on (%d, %d): %.1f s", t, n, hidden.shape[1], time.perf_counter() - clock)
        clock = time.perf_counter()
        last = i == len(powers) - 1
        for start in range(0, n, batch_size):
            stop = min(n, start + batch_size)
            y = runners[i + 1](hidden[start:stop])
            if not last:
                hidden[start:stop] = y  # the middle stages keep the width H
                continue
            if out is None:
                out = np.empty((n, y.shape[1]), dtype=np.float32)
            if order is None:
                out[start:stop] = y
            else:
                out[order[start:stop]] = y
            if progress:
                progress(stop, n)
        log.info("stage %d: %.1f s", i + 1, time.perf_counter() - clock)
    assert out is not None
    return out


def ort_runner(session: Any) -> Callable[[np.ndarray], np.ndarray]:
    """An ONNX Runtime stage session as a (B, width) -> (B, width') function."""
    name = session.get_inputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        return session.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})[0]

    return run
