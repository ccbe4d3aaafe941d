"""Which representation of a trained scRCL model clusters best: ARI with the true K and seed stability.

One training per dataset and seed (TrainConfig defaults except the width, 256 as `--quick`), then
k-means with the true number of types on each candidate representation of the same model:

- fused:   concat(z1, z2), cosine k-means (the reference's clustering embedding);
- gcn-pca: 50 principal components of the GCN view's L2-normalised hidden output h2, Euclidean
           k-means (sklearn KMeans, n_init 10) -- the default (docs/defaults.md);
- h2, h1:  the GCN / MLP view's hidden output itself, cosine k-means;
- e12:     concat(unit h1, unit h2), cosine k-means; e12-pca: its 50 PCs, Euclidean k-means.

Labels are read only to score. Stability: mean pairwise ARI between the seeds' labels.
Usage: python benchmarks/embedding_choice.py [--datasets A B ...] [--seeds 0 1] [--jobs 2]
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from in_process import ari_cells, run_grid, train_dataset  # noqa: E402

COLUMNS = ("fused", "gcn-pca", "h2", "h1", "e12", "e12-pca")


def one_run(ds: str, seed: int, hidden_dim: int, epochs: int) -> dict:
    import torch
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    from scrcl_cli import clustering, graphs
    from scrcl_cli.model import ScRCL, to_torch_sparse

    t = train_dataset(ds, seed, hidden_dim=hidden_dim, epochs=epochs)
    cfg, inp, res, y = t.config, t.inputs, t.result, t.labels
    k = len(set(y))
    model = ScRCL(inp.x0.shape[1], inp.x0.shape[0], cfg.hidden_dim, cfg.out_dim, cfg.dropout, seed)
    model.load_state_dict({n: v for n, v in res.state.items() if not n.startswith("embed_")})
    model.eval()
    with torch.no_grad():
        out = model(torch.from_numpy(inp.x0), torch.from_numpy(inp.x1), to_torch_sparse(inp.a_hat),
                    to_torch_sparse(inp.gene_prop))
    h1, h2 = clustering.unit_rows(out.h1.numpy()), clustering.unit_rows(out.h2.numpy())
    e12 = np.hstack([h1, h2])
    cos = lambda x: clustering.cosine_kmeans(x, k, seed=seed).labels  # noqa: E731
    euc = lambda x: KMeans(k, n_init=10, random_state=seed).fit_predict(graphs.pca_scores(x, 50))  # noqa: E731
    labels = {"fused": cos(res.fused), "gcn-pca": euc(h2), "h2": cos(h2), "h1": cos(h1), "e12": cos(e12),
              "e12-pca": euc(e12)}
    return {"ds": ds, "seed": seed, "ari": {c: float(adjusted_rand_score(y, labels[c])) for c in COLUMNS},
            "labels": {c: labels[c].tolist() for c in COLUMNS}}


def main() -> None:
    sets, runs = run_grid(one_run, __doc__.splitlines()[0], seeds=(0, 1))
    print("| dataset | " + " | ".join(COLUMNS) + " |\n|---|" + "---|" * len(COLUMNS))
    rows, mean_row = ari_cells(sets, runs, COLUMNS, digits=2)
    for ds in sets:
        print(f"| {ds} | " + " | ".join(rows[ds]) + " |")
    print("| **mean** | " + " | ".join(mean_row) + " |")

if __name__ == "__main__":
    main()
