"""``python -m benchmarks SUITE [OPTIONS]``: the one entry point of the benchmark suites."""

from __future__ import annotations

import importlib
import sys

SUITES = {
    "accuracy": ("accuracy", "accuracy on the shared datasets against standard pipelines (docs/accuracy.md)"),
    "cut": ("cut", "candidate ways to cut an embedding into K clusters, tuning vs confirmation group (docs/defaults.md)"),
    "mapping": ("mapping", "train on some donors, cluster the others with the model, against PCA projection and ingest"),
    "spatial": ("spatial", "spatial mode against expression and spatial baselines (docs/spatial.md)"),
    "scaling": ("train_memory", "training memory and time against N, linear vs dense losses (docs/benchmarks.md, 'Training memory and time against N')"),
    "step-cost": ("step_cost", "dense work per cell and training step, its lower bound on a GPU, and float32 matmul precision (docs/benchmarks.md, 'What bounds the training time')"),
    "whole-graph": ("whole_graph", "memory of the whole-graph pass after training: one forward call against the streamed pass"),
    "inference": ("inference", "embed throughput and peak RSS against N (docs/benchmarks.md, 'Inference throughput')"),
    "end-to-end": ("end_to_end", "train + cluster against N (docs/benchmarks.md, 'End to end')"),
    "minibatch": ("minibatch", "mini-batch against full-batch training on shared datasets (docs/benchmarks.md, 'Mini-batch and out-of-core training')"),
    "clustering": ("cluster_scaling", "Ward-initialised k-means cost against N (docs/benchmarks.md, 'Clustering at scale')"),
    "knn": ("knn_choice", "approximate kNN search: faiss IVF (the package's) against pynndescent"),
    "libraries": ("libraries", "the package's Louvain against Leiden (igraph/leidenalg) for the label-free K"),
    "make-large": ("make_large", "write a resampled dataset of N real cells"),
    "run": ("benchutil", "run a command, recording wall time and peak RSS"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUITES:
        width = max(map(len, SUITES))
        print("usage: python -m benchmarks SUITE [OPTIONS]   (SUITE --help for its options)\n\nsuites:")
        for name, (_, what) in SUITES.items():
            print(f"  {name:<{width}}  {what}")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(f"benchmarks.{SUITES[argv[0]][0]}")
    sys.argv = [f"python -m benchmarks {argv[0]}", *argv[1:]]
    result = module.main(argv[1:])
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
