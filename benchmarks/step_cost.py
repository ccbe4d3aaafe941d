"""What bounds the training time: floating-point work per cell and step, and float32 matmul precision.

1. Work. One real mini-batch step (forward, the three losses, backward; `training.MinibatchRun`)
   on cells of --source with the default architecture runs under `DenseFlops`, which counts the
   dense matrix products (the sparse graph products are left out: they are memory bound and
   small, and torch's own FlopCounterMode counts the backward of a sparse product as if the
   adjacency were dense, B x B x H, which grows with the batch). Work per batch cell is that count over the batch's cells, next to the
   closed form `dense_flops_per_cell` (G genes, H hidden, O out). Training N cells for E epochs
   shows every cell about E times (an epoch is a pass), so the loop does about N x E x that work;
   the report divides it by the datasheet peaks of a GPU (--peaks) to bound the loop's seconds
   from below, whatever the implementation.
2. Speed on this machine. --steps steps at each --precisions (`train --matmul-precision`),
   seconds per step and the dense GFLOP/s they reach, and the relative error of one of the step's
   products, (B, G) x (G, H), against float64 at each precision: what the precision really
   does on this machine's CPU.
3. Accuracy. With --fit-datasets, full-batch `training.fit` on those shared datasets at each
   precision and seed (reduced width by default: 2 CPU cores), clustered at the annotated K
   (labels read only to score): ARI against the annotation, ARI between the precisions' clusterings,
   seconds per fit.

Usage (the run and its output are in docs/benchmarks.md, "What bounds the training time"):
    python -m benchmarks step-cost --threads 2 --fit-datasets pbmc_10x_4k_top2000,mouse_bladder_top2000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import benchutil
from benchmarks.accuracy import DEFAULT_DATA as DATA
from benchmarks.accuracy import prepared_cells

# Dense peak TFLOP/s of one NVIDIA H100 SXM (the H200 has the same compute), from NVIDIA's
# datasheet; its tensor-core figure is quoted with 2:4 sparsity, halved here to dense. TF32 is what
# `train --matmul-precision high` (and medium) gives float32 products on CUDA.
DEFAULT_PEAKS = "H100 SXM FP32=67,H100 SXM TF32=494"


def dense_flops_per_cell(g: int, h: int, o: int) -> int:
    """Dense FLOPs of one training step per batch cell (2 per multiply-add), forward and backward.

    Forward, per cell: the MLP view's and the GCN view's first layers (G x H each), the GCN
    view's second layer and head (H x H each), and for both views the projector (H x G) and the
    product with the gene embedding (G x O); the gene encoder's X0^T W adds G x O. Backward costs
    twice the forward, except where the input is the smoothed expression, which needs no
    gradient: one G x H product per view and the gene encoder's G x O are saved.
    """
    forward = 2 * g * h + 2 * h * h + 2 * (h * g + g * o) + g * o
    return 2 * (3 * forward - 2 * g * h - g * o)


class DenseFlops:
    """Context manager counting the FLOPs of dense matrix products (2 per multiply-add) run inside it.

    Every aten mm, addmm and bmm whose operands are all strided (dense) tensors is counted from
    its shapes; one with a sparse operand is not. `total` holds the count.
    """

    def __init__(self) -> None:
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self
        self.total = 0
        ops = {torch.ops.aten.mm.default: (0, 1), torch.ops.aten.addmm.default: (1, 2), torch.ops.aten.bmm.default: (0, 1)}

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
                if func in ops:
                    a, b = (args[i] for i in ops[func])
                    if a.layout == torch.strided and b.layout == torch.strided:
                        batch = a.shape[0] if a.dim() == 3 else 1
                        counter.total += 2 * batch * a.shape[-2] * a.shape[-1] * b.shape[-1]
                return func(*args, **(kwargs or {}))

        self._mode = _Mode()

    def __enter__(self) -> DenseFlops:
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._mode.__exit__(*exc)


def relative_error(approx: Any, exact: Any) -> float:
    """Largest absolute difference over the largest magnitude of `exact` (tensors of one shape)."""
    return float((approx.double() - exact).abs().max() / exact.abs().max())


def rounded_product_errors(x: Any, w: Any, exact: Any = None) -> dict[str, float]:
    """`relative_error` of x @ w (float32 (B, G), (G, H)) against `exact` (float64; computed when None) when both
    factors are first rounded to nearest TF32 (10 mantissa bits) or bfloat16 (7), as tensor cores
    round them; the products are summed in float64, so only the factors' rounding counts."""
    import torch

    def tf32(t: Any) -> Any:
        bits = t.contiguous().view(torch.int32)
        return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)  # round to nearest, drop 13 of 23 bits

    exact = x.double() @ w.double() if exact is None else exact
    rounding = (("TF32 factors", tf32), ("bfloat16 factors", lambda t: t.bfloat16().float()))
    return {name: relative_error(r(x).double() @ r(w).double(), exact) for name, r in rounding}


def measure_steps(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from scrcl_cli.training import MinibatchRun, TrainConfig, build_inputs, matmul_precision

    prep, _, expression = prepared_cells(args.data_dir / f"{args.source}.h5ad", args.n_top_genes)
    cfg = TrainConfig(hidden_dim=args.hidden_dim, out_dim=args.out_dim, n_top_genes=args.n_top_genes,
                      expression=expression, seed=0)
    inputs = build_inputs(prep.model_input, prep.lognorm, cfg)
    g = inputs.x0.shape[1]
    run = MinibatchRun(inputs, cfg, torch.device("cpu"), args.batch_size, None, None)
    run.model.train()
    with DenseFlops() as counter:
        _, cells = run.step()
    flops = counter.total
    out: dict[str, Any] = {"source": args.source, "genes": g, "hidden": args.hidden_dim, "out": args.out_dim,
                           "batch_cells": cells, "flops": flops, "per_cell": flops / cells,
                           "closed_form": dense_flops_per_cell(g, args.hidden_dim, args.out_dim), "speed": []}
    x = torch.from_numpy(np.ascontiguousarray(inputs.x0[: args.batch_size]))
    w = run.model.mlp_w.detach().T.contiguous()
    exact = x.double() @ w.double()
    out["rounded"] = rounded_product_errors(x, w, exact)
    for precision in args.precisions.split(","):
        with matmul_precision(precision):
            error = relative_error(x @ w, exact)
            run.step()  # warm-up
            cells_seen, clock = 0, time.perf_counter()
            for _ in range(args.steps):
                cells_seen += run.step()[1]
            seconds = (time.perf_counter() - clock) / args.steps
        rate = out["per_cell"] * cells_seen / args.steps / seconds / 1e9
        out["speed"].append({"precision": precision, "s_per_step": seconds, "cells": cells_seen / args.steps,
                             "gflops": rate, "product_error": error})
        print(json.dumps(out["speed"][-1]), flush=True)
    return out


def measure_fits(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    from scrcl_cli.clustering import EMBEDDING_METRIC, cluster_embedding
    from scrcl_cli.metrics import ari
    from scrcl_cli.training import TrainConfig, build_inputs, fit

    rows = []
    for name in args.fit_datasets.split(","):
        if not (args.data_dir / f"{name}.h5ad").exists():
            print(f"skip {name}: {name}.h5ad is not in --data-dir", file=sys.stderr)
            continue
        prep, truth, expression = prepared_cells(args.data_dir / f"{name}.h5ad", args.fit_n_top_genes)
        k = len(set(truth))
        inputs = None
        for seed in range(args.fit_seeds):
            labels: dict[str, np.ndarray] = {}
            for precision in args.precisions.split(","):
                cfg = TrainConfig(epochs=args.fit_epochs, hidden_dim=args.fit_hidden_dim, n_top_genes=args.fit_n_top_genes,
                                  expression=expression, seed=seed, matmul_precision=precision)
                inputs = inputs or build_inputs(prep.model_input, prep.lognorm, cfg)
                clock = time.perf_counter()
                res = fit(inputs, cfg, device=torch.device("cpu"))
                seconds = time.perf_counter() - clock
                labels[precision] = cluster_embedding(res.embedding, k, seed=0, metric=EMBEDDING_METRIC[cfg.embedding]).labels
                first = next(iter(labels.values()))
                row = {"dataset": name, "cells": int(inputs.x0.shape[0]), "seed": seed, "precision": precision,
                       "seconds": seconds, "ari": ari(truth, labels[precision]), "agreement": ari(first, labels[precision]),
                       "final_loss": float(res.losses[-1, 0])}
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def render(steps: dict[str, Any], fits: list[dict[str, Any]], args: argparse.Namespace, command: str) -> str:
    L = [f"Command: `{command}`", "",
         f"CPU: {benchutil.cpu_name()}, torch threads {args.threads or 'default'}; load average "
         f"{benchutil.loadavg():.1f} at the end.", "",
         f"One mini-batch step on {steps['batch_cells']:,} cells of {steps['source']} (G {steps['genes']:,}, "
         f"H {steps['hidden']:,}, O {steps['out']}): {steps['flops'] / 1e9:,.1f} GFLOP of dense products, "
         f"**{steps['per_cell'] / 1e6:.2f} MFLOP per batch cell** (closed form {steps['closed_form'] / 1e6:.2f}).", "",
         "| precision | s per step | cells per step | dense GFLOP/s | (B, G) x (G, H) error vs float64 |",
         "|---|---|---|---|---|"]
    for r in steps["speed"]:
        L.append(f"| {r['precision']} | {r['s_per_step']:.3f} | {r['cells']:,.0f} | {r['gflops']:,.0f} | "
                 f"{r['product_error']:.1e} |")
    L += ["", "For scale, the same product with its factors rounded first (summed in float64): "
          + ", ".join(f"{k} {v:.1e}" for k, v in steps["rounded"].items()) + "."]
    L += ["", "Lower bound of the training loop (every cell seen once per epoch) at the peaks:", "",
          "| cells × epochs | PFLOP | " + " | ".join(p.split("=")[0] for p in args.peaks.split(",")) + " |",
          "|---|---|" + "---|" * len(args.peaks.split(","))]
    for target in args.targets.split(","):
        n, epochs = (int(float(v)) for v in target.split("x"))
        total = steps["per_cell"] * n * epochs
        bounds = [total / (float(p.split("=")[1]) * 1e12) for p in args.peaks.split(",")]
        L.append(f"| {n:,} × {epochs} | {total / 1e15:,.2f} | " + " | ".join(f"{b:,.1f} s" for b in bounds) + " |")
    if fits:
        L += ["", f"Full-batch fits at K given: {args.fit_epochs} epochs, H {args.fit_hidden_dim}, "
              f"{args.fit_n_top_genes} HVGs; agreement = ARI between this precision's clusters and "
              f"{args.precisions.split(',')[0]}'s, same seed.", "",
              "| dataset | cells | precision | seeds | ARI (mean ± sd) | agreement (min) | s per fit |",
              "|---|---|---|---|---|---|---|"]
        for name in dict.fromkeys(r["dataset"] for r in fits):
            for precision in args.precisions.split(","):
                rs = [r for r in fits if r["dataset"] == name and r["precision"] == precision]
                a = np.array([r["ari"] for r in rs])
                L.append(f"| {name} | {rs[0]['cells']:,} | {precision} | {len(rs)} | {a.mean():.3f} ± "
                         f"{a.std(ddof=1) if len(a) > 1 else 0:.3f} | {min(r['agreement'] for r in rs):.3f} | "
                         f"{np.mean([r['seconds'] for r in rs]):.1f} |")
    return "\n".join(L) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default="pbmc_10x_4k_top2000", help="shared dataset of the counted step")
    ap.add_argument("--batch-size", type=int, default=2048)
    ap.add_argument("--hidden-dim", type=int, default=1500)
    ap.add_argument("--out-dim", type=int, default=16)
    ap.add_argument("--n-top-genes", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--precisions", default="highest,medium")
    ap.add_argument("--targets", default="1000000x100,10000000x100", help="cells x epochs, comma-separated")
    ap.add_argument("--peaks", default=DEFAULT_PEAKS, help="name=TFLOP/s, comma-separated")
    ap.add_argument("--fit-datasets", default="")
    ap.add_argument("--fit-seeds", type=int, default=2)
    ap.add_argument("--fit-epochs", type=int, default=100)
    ap.add_argument("--fit-hidden-dim", type=int, default=256)
    ap.add_argument("--fit-n-top-genes", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--data-dir", type=Path, default=DATA, help="folder with the shared .h5ad files")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--md", type=Path, default=None)
    args = ap.parse_args(argv)
    if not (args.data_dir / f"{args.source}.h5ad").exists():
        raise SystemExit(f"error: {args.source}.h5ad is not in {args.data_dir}. Pass --data-dir with the shared datasets")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python -m benchmarks step-cost " + " ".join(sys.argv[1:] if argv is None else argv)
    steps = measure_steps(args)
    fits = measure_fits(args) if args.fit_datasets else []
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"steps": steps, "fits": fits}, indent=1))
    benchutil.emit_markdown(render(steps, fits, args, command), args.md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
