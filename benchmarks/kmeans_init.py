"""How the trained embedding is cut into clusters: k-means++ restarts against Ward-initialised k-means.

One training per dataset and seed (TrainConfig defaults except the width, 256 as `--quick`), then,
on the same gcn-pca embedding:

- kmeans++: Euclidean `clustering.kmeans` (k-means++ seeding, 10 restarts kept by inertia), the
  clustering until session 7;
- ward:     `clustering.ward_kmeans` (10·K k-means microclusters, Ward's merge, Lloyd), the default
  since session 7;

each with the true K and with the label-free K of `train` (Louvain communities of the expression
graph, `clustering.choose_n_clusters`). A third K, Louvain at resolution 0.5 on the embedding's own
Euclidean 15-NN graph ("emb-K", as `benchmarks/k_choice.py`), is clustered with ward. Labels are read
only to score. Each cell of the table is mean ARI over seeds / mean pairwise ARI between seeds.
Usage: python benchmarks/kmeans_init.py [--datasets A B ...] [--seeds 0 1 2] [--jobs 2] [--json OUT]
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import DEFAULT_DATA, SPATIAL, manifest_datasets  # noqa: E402
from in_process import train_dataset  # noqa: E402

COLUMNS = ("K kmeans++", "K ward", "free kmeans++", "free ward", "emb-K ward")


def one_run(ds: str, seed: int, hidden_dim: int, epochs: int) -> dict:
    from sklearn.metrics import adjusted_rand_score
    from sklearn.neighbors import NearestNeighbors

    from scrcl_cli import clustering, graphs

    t = train_dataset(ds, seed, hidden_dim=hidden_dim, epochs=epochs)
    e, y = t.result.embedding, t.labels
    k_true = len(set(y))
    k_free, _ = clustering.choose_n_clusters(t.prep.lognorm, seed=seed, n_neighbors=t.config.n_neighbors,
                                           adj=t.inputs.adj)
    emb_graph = graphs.knn_to_adjacency(NearestNeighbors(n_neighbors=15).fit(e).kneighbors(e, return_distance=False))
    k_emb = clustering.community_count(clustering.louvain(emb_graph, resolution=0.5, seed=seed))
    plus = lambda k: clustering.kmeans(e, k, seed=seed, metric="euclidean").labels  # noqa: E731
    ward = lambda k: clustering.ward_kmeans(e, k, seed=seed).labels  # noqa: E731
    labels = {"K kmeans++": plus(k_true), "K ward": ward(k_true), "free kmeans++": plus(k_free),
              "free ward": ward(k_free), "emb-K ward": ward(k_emb)}
    return {"ds": ds, "seed": seed, "k": {"true": k_true, "free": k_free, "emb": k_emb},
            "ari": {c: float(adjusted_rand_score(y, labels[c])) for c in COLUMNS},
            "labels": {c: labels[c].tolist() for c in COLUMNS}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=None)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--hidden-dim", type=int, default=256)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if not DEFAULT_DATA.is_dir():
        sys.exit(f"skipped: {DEFAULT_DATA} is absent (the shared datasets)")
    sets = args.datasets or [d for d in manifest_datasets(DEFAULT_DATA) if d not in SPATIAL]
    with ProcessPoolExecutor(args.jobs) as ex:
        runs = list(ex.map(one_run, *zip(*[(d, s, args.hidden_dim, args.epochs) for d in sets for s in args.seeds])))
    if args.json:
        Path(args.json).write_text(json.dumps(runs))
    from sklearn.metrics import adjusted_rand_score

    print("| dataset | true K | label-free K | emb-K | " + " | ".join(COLUMNS) + " |\n|---|---|---|---|" + "---|" * len(COLUMNS))
    means: dict[str, list[float]] = {c: [] for c in COLUMNS}
    stabs: dict[str, list[float]] = {c: [] for c in COLUMNS}
    in_range = {"free": 0, "emb": 0}
    for ds in sets:
        rs = [r for r in runs if r["ds"] == ds]
        cells = []
        for c in COLUMNS:
            pairs = [adjusted_rand_score(a["labels"][c], b["labels"][c]) for a, b in itertools.combinations(rs, 2)]
            means[c].append(float(np.mean([r["ari"][c] for r in rs])))
            stabs[c].append(float(np.mean(pairs)) if pairs else float("nan"))
            cells.append(f"{means[c][-1]:.3f} / {stabs[c][-1]:.3f}")
        kt = rs[0]["k"]["true"]
        for kind in in_range:  # every seed's K within ±30 % of the true K
            in_range[kind] += all(abs(r["k"][kind] - kt) <= 0.3 * kt for r in rs)
        ks = {kind: ",".join(str(r["k"][kind]) for r in rs) for kind in in_range}
        print(f"| {ds} | {kt} | {ks['free']} | {ks['emb']} | " + " | ".join(cells) + " |")
    print(f"| **mean** | | {in_range['free']} of {len(sets)} within ±30 % | {in_range['emb']} of {len(sets)} | "
          + " | ".join(f"**{np.mean(means[c]):.3f} / {np.nanmean(stabs[c]):.3f}**" for c in COLUMNS) + " |")


if __name__ == "__main__":
    main()
