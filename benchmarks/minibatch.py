"""Mini-batch vs full-batch training: ARI of the same seeds on shared datasets .

For each dataset and seed, `training.fit` runs twice on the same inputs, once full batch and once
with `--batch-size`-style mini-batches; both fused embeddings are clustered with cosine k-means
at the annotated K (labels read only to score). Single seeds differ by up to ±0.1 ARI on small
data, so the comparison is over many seeds: mean, sd and the mean paired difference.

Usage:
    python -m benchmarks minibatch --datasets pbmc68k_reduced_700 --seeds 8 --epochs 25 \\
        --hidden-dim 48 --out-dim 6 --lr 1e-3 --n-top-genes 300 --batch-size 256
    python -m benchmarks minibatch --datasets pbmc_10x_4k_top2000 --seeds 3 --epochs 100 \\
        --hidden-dim 256 --batch-size 1024
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

from benchmarks import benchutil
from benchmarks.accuracy import DEFAULT_DATA as DATA
from benchmarks.accuracy import prepared_cells


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="pbmc68k_reduced_700")
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--hidden-dim", type=int, default=256)
    ap.add_argument("--out-dim", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--n-top-genes", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lr-powers", default="1.0",
                    help="comma list of mini-batch learning-rate rules lr * (B/N)**p to compare with full batch")
    ap.add_argument("--md", type=Path, default=None)
    args = ap.parse_args(argv)
    import torch

    from scrcl_cli.clustering import EMBEDDING_METRIC, cluster_embedding
    from scrcl_cli.metrics import ari
    from scrcl_cli.training import TrainConfig, build_inputs, fit

    torch.set_num_threads(args.threads)
    command = "python -m benchmarks minibatch " + " ".join(sys.argv[1:] if argv is None else argv)
    rows = []
    for name in args.datasets.split(","):
        path = DATA / f"{name}.h5ad"
        if not path.exists():
            print(f"skip {name}: {path} missing (../shared/data beside the checkout)", file=sys.stderr)
            continue
        prep, truth, expression = prepared_cells(path, args.n_top_genes)  # truth: scoring only
        k = len(set(truth))
        inputs = None
        powers = [float(p) for p in args.lr_powers.split(",")]
        modes = [("full", None, None)] + [(f"mini p={p:g}", args.batch_size, p) for p in powers]
        scores: dict[str, list[float]] = {m[0]: [] for m in modes}
        secs: dict[str, list[float]] = {m[0]: [] for m in modes}
        for seed in range(args.seeds):
            cfg = TrainConfig(epochs=args.epochs, hidden_dim=args.hidden_dim, out_dim=args.out_dim, lr=args.lr,
                              n_top_genes=args.n_top_genes, expression=expression, seed=seed)
            inputs = inputs or build_inputs(prep.model_input, prep.lognorm, cfg)
            for mode, b, p in modes:
                t = time.perf_counter()
                res = fit(inputs, cfg, device=torch.device("cpu"), batch_size=b, minibatch_lr_power=p)
                secs[mode].append(time.perf_counter() - t)
                # The model's own clustering embedding and metric (gcn-pca: Euclidean k-means).
                labels = cluster_embedding(res.embedding, k, seed=0, metric=EMBEDDING_METRIC[cfg.embedding]).labels
                scores[mode].append(ari(truth, labels))
            print(json.dumps({"dataset": name, "seed": seed, **{m: v[-1] for m, v in scores.items()}}), flush=True)
        rows.append((name, prep.model_input.shape[0], scores, secs))
    L = [f"Command: `{command}`", "",
         f"{args.epochs} epochs, H {args.hidden_dim}, out {args.out_dim}, lr {args.lr}, {args.n_top_genes} HVGs, "
         f"mini-batches of about {args.batch_size} cells (epochs count passes; lr × (B/N)^p), torch threads "
         f"{args.threads}, CPU; load average {benchutil.loadavg():.1f} at the end.", "",
         "| dataset | cells | seeds | mode | ARI (mean ± sd) | − full (mean ± se) | s per fit |",
         "|---|---|---|---|---|---|---|"]
    for name, n, sc, se in rows:
        f = np.array(sc["full"])
        for mode, vals in sc.items():
            m = np.array(vals)
            d = m - f
            L.append(f"| {name} | {n:,} | {len(m)} | {mode} | {m.mean():.3f} ± {m.std(ddof=1) if len(m) > 1 else 0:.3f} | "
                     f"{d.mean():+.3f} ± {d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else 0:.3f} | "
                     f"{np.mean(se[mode]):.1f} |")
    benchutil.emit_markdown("\n".join(L) + "\n", args.md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
