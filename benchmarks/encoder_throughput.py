"""Throughput of the per-cell ONNX encoder alone: one ONNX Runtime session, dense batches.

Separates the network's cost from the rest of `scrcl-cli embed` (reading, preprocessing, the
query graph and its smoothing), which benchmarks/inference.py times as a whole. Inputs are random
non-negative (B, G) float32 batches: the cost of a dense MLP does not depend on the values.

    python benchmarks/encoder_throughput.py bench/model_pbmc_10x_4k_top2000_e5_s0
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from scrcl_cli import inference
from scrcl_cli import bundle


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path, help="model directory written by scrcl-cli train")
    ap.add_argument("--batches", default="1024,4096,16384")
    ap.add_argument("--cells", type=int, default=40_000, help="cells timed per batch size")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    bundle = bundle.read_bundle(args.model)
    session, provider = inference.open_session(bundle, "cell", device="cpu", threads=args.threads)
    g = len(bundle.genes)
    rng = np.random.default_rng(0)
    for b in (int(v) for v in args.batches.split(",")):
        x = np.abs(rng.normal(size=(b, g))).astype(np.float32)
        session.run(None, {"x0": x})  # warm-up
        reps = max(1, args.cells // b)
        t = time.perf_counter()
        for _ in range(reps):
            session.run(None, {"x0": x})
        dt = time.perf_counter() - t
        print(f"batch {b}: {reps * b / dt:,.0f} cells/s ({provider}, G {g}, threads {args.threads or 'default'})")


if __name__ == "__main__":
    main()
