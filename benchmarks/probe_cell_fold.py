"""Probe: how much faster the per-cell encoder gets when the projector is folded into E.

The exported cell encoder computes ``z1 = normalize((relu(x W_m^T + b_m) W_p^T + b_p) E)`` with
W_p (G x H) and E (G x O), i.e. two G x H products per cell. Because the projector has no
activation, ``(h W_p^T + b_p) E = h (W_p^T E) + b_p E`` exactly in real arithmetic: one H x O
product replaces the second G x H one (about half the FLOPs). This probe builds that folded
variant from a model directory's weights with the package's own exporter, and times both ONNX
files on the same batch with ONNX Runtime at 1 and 2 threads. Nothing here changes the package.

Usage:
    python benchmarks/probe_cell_fold.py bench/model_pbmc_10x_4k_top2000_e20_s0
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchutil import cpu_name, loadavg  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=4)
    args = ap.parse_args()

    import onnxruntime as ort
    import torch

    from scrcl_cli import bundle
    from scrcl_cli.export import export_onnx

    bundle = bundle.read_bundle(args.model)
    state = torch.load(io.BytesIO(bundle.read_bytes("weights.pt")), weights_only=True)
    e = state.pop("gene_emb").double()
    folded = dict(state)
    folded["proj_w"] = (state["proj_w"].double().T @ e).T.float().contiguous()  # (O, H)
    folded["proj_b"] = (state["proj_b"].double() @ e).float()  # (O,)
    blobs = {"shipped": bundle.read_bytes("encoder_cell.onnx"),
             "folded": export_onnx(folded, np.eye(e.shape[1], dtype=np.float32), view="cell", metadata={})}
    rng = np.random.default_rng(0)
    x = np.log1p(rng.poisson(0.3, size=(args.batch, e.shape[0])).astype(np.float32))
    out = {}
    print(f"# {cpu_name()}; batch {args.batch} x {e.shape[0]} genes; H = {state['mlp_w'].shape[0]}; "
          f"load average {loadavg():.1f}")
    for name, blob in blobs.items():
        for threads in (1, 2):
            opts = ort.SessionOptions()
            opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
            sess = ort.InferenceSession(blob, opts, providers=["CPUExecutionProvider"])
            sess.run(None, {"x0": x})
            t0 = time.perf_counter()
            for _ in range(args.reps):
                out[name] = sess.run(None, {"x0": x})[0]
            rate = args.reps * args.batch / (time.perf_counter() - t0)
            print(f"{name:8s} ORT threads={threads}: {rate:8,.0f} cells/s")
    print(f"max abs difference folded vs shipped: {np.abs(out['folded'] - out['shipped']).max():.1e}; "
          f"load average {loadavg():.1f}")


if __name__ == "__main__":
    main()
