"""How the trained embedding is cut into clusters: k-means++ restarts against Ward-initialised k-means.

One training per dataset and seed (TrainConfig defaults except the width, 256 as `--quick`), then,
on the same gcn-pca embedding:

- kmeans++: Euclidean `clustering.kmeans` (k-means++ seeding, 10 restarts kept by inertia), the
  clustering;
- ward:     `clustering.ward_kmeans` (10·K k-means microclusters, Ward's merge, Lloyd), the default
 

each with the true K and with the label-free K of `train` (Louvain communities of the expression
graph, `clustering.choose_n_clusters`). A third K, Louvain at resolution 0.5 on the embedding's own
Euclidean 15-NN graph ("emb-K", as `benchmarks/k_choice.py`), is clustered with ward. Labels are read
only to score. Each cell of the table is mean ARI over seeds / mean pairwise ARI between seeds.
Usage: python benchmarks/kmeans_init.py [--datasets A B ...] [--seeds 0 1 2] [--jobs 2] [--json OUT]
"""
from __future__ import annotations

import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import k_within  # noqa: E402
from in_process import ari_cells, embedding_graph, run_grid, train_dataset  # noqa: E402

COLUMNS = ("K kmeans++", "K ward", "free kmeans++", "free ward", "emb-K ward")


def one_run(ds: str, seed: int, hidden_dim: int, epochs: int) -> dict:
    from sklearn.metrics import adjusted_rand_score

    from scrcl_cli import clustering

    t = train_dataset(ds, seed, hidden_dim=hidden_dim, epochs=epochs)
    e, y = t.result.embedding, t.labels
    k_true = len(set(y))
    k_free, _ = clustering.choose_n_clusters(t.prep.lognorm, seed=seed, n_neighbors=t.config.n_neighbors,
                                           adj=t.inputs.adj)
    k_emb = clustering.community_count(clustering.louvain(embedding_graph(e), resolution=0.5, seed=seed))
    plus = lambda k: clustering.kmeans(e, k, seed=seed, metric="euclidean").labels  # noqa: E731
    ward = lambda k: clustering.ward_kmeans(e, k, seed=seed).labels  # noqa: E731
    labels = {"K kmeans++": plus(k_true), "K ward": ward(k_true), "free kmeans++": plus(k_free),
              "free ward": ward(k_free), "emb-K ward": ward(k_emb)}
    return {"ds": ds, "seed": seed, "k": {"true": k_true, "free": k_free, "emb": k_emb},
            "ari": {c: float(adjusted_rand_score(y, labels[c])) for c in COLUMNS},
            "labels": {c: labels[c].tolist() for c in COLUMNS}}


def main() -> None:
    sets, runs = run_grid(one_run, __doc__.splitlines()[0], seeds=(0, 1, 2))
    print("| dataset | true K | label-free K | emb-K | " + " | ".join(COLUMNS) + " |\n|---|---|---|---|" + "---|" * len(COLUMNS))
    rows, mean_row = ari_cells(sets, runs, COLUMNS)
    in_range = {"free": 0, "emb": 0}
    for ds in sets:
        rs = [r for r in runs if r["ds"] == ds]
        kt = rs[0]["k"]["true"]
        for kind in in_range:
            in_range[kind] += k_within([r["k"][kind] for r in rs], kt)
        ks = {kind: ",".join(str(r["k"][kind]) for r in rs) for kind in in_range}
        print(f"| {ds} | {kt} | {ks['free']} | {ks['emb']} | " + " | ".join(rows[ds]) + " |")
    print(f"| **mean** | | {in_range['free']} of {len(sets)} within ±30 % | {in_range['emb']} of {len(sets)} | "
          + " | ".join(mean_row) + " |")

if __name__ == "__main__":
    main()
