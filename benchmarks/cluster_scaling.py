"""Time and memory of clustering an embedding: Ward-initialised k-means against k-means++ restarts.

Synthetic 50-d Gaussian blobs (K centres, unit noise: the width of the gcn-pca embedding), N rows
for each N asked. Both methods run in the same invocation on the same rows; the table gives
seconds and the peak memory numpy allocated (tracemalloc) for each, and their ratios
(ward / k-means++). Usage: python -m benchmarks clustering [--sizes 100000 1000000] [--k 11]
"""
from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np

from scrcl_cli import clustering


def measure(fn) -> tuple[float, float, np.ndarray]:
    tracemalloc.start()
    t = time.perf_counter()
    labels = fn().labels
    sec = time.perf_counter() - t
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return sec, peak, labels


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", type=int, default=[100_000, 1_000_000])
    p.add_argument("--k", type=int, default=11)
    p.add_argument("--dim", type=int, default=50)
    args = p.parse_args(argv)
    print("| rows | k-means++ s | Ward-init s | time ratio | k-means++ peak MiB | Ward-init peak MiB | memory ratio | ARI between them |")
    print("|---|---|---|---|---|---|---|---|")
    from sklearn.metrics import adjusted_rand_score

    for n in args.sizes:
        rng = np.random.default_rng(0)
        centres = rng.normal(scale=3.0, size=(args.k, args.dim))
        x = centres[rng.integers(args.k, size=n)] + rng.normal(size=(n, args.dim))
        s_km, m_km, l_km = measure(lambda: clustering.kmeans(x, args.k, seed=0, metric="euclidean"))
        s_w, m_w, l_w = measure(lambda: clustering.ward_kmeans(x, args.k, seed=0))
        print(f"| {n:,} | {s_km:.1f} | {s_w:.1f} | {s_w / s_km:.2f} | {m_km:.0f} | {m_w:.0f} | {m_w / m_km:.2f} | "
              f"{adjusted_rand_score(l_km, l_w):.3f} |", flush=True)


if __name__ == "__main__":
    main()
