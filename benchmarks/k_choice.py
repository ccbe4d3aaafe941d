"""Label-free cluster count: Louvain on the expression graph (the default) or on the embedding's graph.

For one dataset and seed: train at H 256 (100 epochs, every other setting the default), then count the
Louvain communities (resolution 0.5 and 1, communities of >= 0.5 % of the cells, as
`clustering.choose_n_clusters`) of (a) the expression cell graph training used and (b) a Euclidean
15-NN graph of the gcn-pca embedding. Prints one JSON line: for each graph and resolution
[K found, ARI of Euclidean k-means on the embedding with that K, ARI of the Louvain labels
themselves]. Labels are read only to score.
Usage: python benchmarks/k_choice.py DATASET [SEED]
"""
import json
import sys
from pathlib import Path

from sklearn.metrics import adjusted_rand_score as ARI
from sklearn.neighbors import NearestNeighbors

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import DEFAULT_DATA  # noqa: E402
from in_process import train_dataset  # noqa: E402

from scrcl_cli import clustering, graphs  # noqa: E402

ds, seed = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0
if not DEFAULT_DATA.is_dir():
    sys.exit(f"skipped: {DEFAULT_DATA} is absent (the shared datasets)")
t = train_dataset(ds, seed)
inp, e, y = t.inputs, t.result.embedding, t.labels
emb_graph = graphs.knn_to_adjacency(NearestNeighbors(n_neighbors=15).fit(e).kneighbors(e, return_distance=False))
out = {"ds": ds, "seed": seed, "K": len(set(y))}
for name, g in (("expr", inp.adj), ("emb", emb_graph)):
    for res in (0.5, 1.0):
        lab = clustering.louvain(g, resolution=res, seed=seed)
        k = clustering.community_count(lab)
        km = clustering.kmeans(e, k, seed=seed, metric="euclidean").labels
        out[f"{name}_r{res}"] = [k, round(ARI(y, km), 3), round(ARI(y, lab), 3)]
print(json.dumps(out), flush=True)
