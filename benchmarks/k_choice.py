"""Label-free cluster count: Louvain on the expression graph (the default) or on the embedding's graph.

Two ways to run it (labels are read only to score; nothing here passes them to a count):

    python benchmarks/k_choice.py DATASET [SEED]
        train in-process at H 256 (100 epochs, every other setting the default), then count the
        Louvain communities (resolution 0.5 and 1, communities of >= 0.5 % of the cells, as
        `clustering.choose_n_clusters`) of (a) the expression cell graph training used and (b) a
        Euclidean 15-NN graph of the gcn-pca embedding. Prints one JSON line: for each graph and
        resolution [K found, ARI of k-means on the embedding with that K, ARI of the Louvain labels].

    python benchmarks/k_choice.py --embeddings EMB.npz [--md OUT.md]
        the label-free runs of `accuracy.py` whose embeddings `gpu_suite.sh` keeps
        (embeddings_full.npz: `obsm['X_scrcl']` and `obs['scrcl_cluster']` of every `train`): the
        default count is the K that `train` chose (its clusters are scored as they are); the
        embedding's graph is counted at resolution 0.5, 0.75 and 1 and clustered as `train` clusters
        (`clustering.cluster_embedding`). Prints a table: per rule, each seed's K and the mean ARI,
        with the datasets whose every seed lands within +-30 % of the true K.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from sklearn.metrics import adjusted_rand_score as ARI

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import DEFAULT_DATA, k_within  # noqa: E402
from in_process import embedding_graph  # noqa: E402

from scrcl_cli import clustering  # noqa: E402

EMB_RESOLUTIONS = (0.5, 0.75, 1.0)


def one_trained(ds: str, seed: int) -> dict:
    from in_process import train_dataset

    t = train_dataset(ds, seed)
    inp, e, y = t.inputs, t.result.embedding, t.labels
    out: dict = {"ds": ds, "seed": seed, "K": len(set(y))}
    for name, g in (("expr", inp.adj), ("emb", embedding_graph(e))):
        for res in (0.5, 1.0):
            lab = clustering.louvain(g, resolution=res, seed=seed)
            k = clustering.community_count(lab)
            km = clustering.cluster_embedding(e, k, seed=seed, metric="euclidean").labels
            out[f"{name}_r{res}"] = [k, round(ARI(y, km), 3), round(ARI(y, lab), 3)]
    return out


def from_embeddings(path: Path) -> list[dict]:
    """One row per (dataset, seed) of the saved label-free runs: K and ARI per counting rule."""
    import anndata as ad

    z = np.load(path)
    runs = sorted({k.split(":")[0] for k in z.files})
    labels: dict[str, object] = {}
    rows = []
    for run in runs:  # "<dataset>_s<seed>_free"
        ds, seed = run.rsplit("_s", 1)[0], int(run.rsplit("_s", 1)[1].split("_")[0])
        if ds not in labels:
            labels[ds] = ad.read_h5ad(DEFAULT_DATA / f"{ds}.h5ad", backed="r").obs["cell_type"].astype(str)
        y = labels[ds].reindex(z[f"{run}:obs_names"]).to_numpy()  # type: ignore[attr-defined]
        e = z[f"{run}:X_scrcl"].astype(np.float32)
        train_labels = z[f"{run}:scrcl_cluster"]
        row = {"ds": ds, "seed": seed, "K": len(set(y)),
               "expression, res. 1 (default)": (len(set(train_labels)), ARI(y, train_labels))}
        g = embedding_graph(e)
        for res in EMB_RESOLUTIONS:
            k = clustering.community_count(clustering.louvain(g, resolution=res, seed=seed))
            row[f"embedding, res. {res:g}"] = (k, ARI(y, clustering.cluster_embedding(e, k, seed=seed,
                                                                                   metric="euclidean").labels))
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict]) -> str:
    rules = [k for k in rows[0] if k not in ("ds", "seed", "K")]
    by: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by[r["ds"]].append(r)
    lines = [f"| dataset (true K) | {' | '.join(rules)} |", "|---|" + "---|" * len(rules)]
    within = dict.fromkeys(rules, 0)
    means: dict[str, list[float]] = {r: [] for r in rules}
    for ds, rs in by.items():
        rs.sort(key=lambda r: r["seed"])
        true_k = rs[0]["K"]
        cells = []
        for rule in rules:
            ks = [r[rule][0] for r in rs]
            ari = float(np.mean([r[rule][1] for r in rs]))
            ok = k_within(ks, true_k)
            within[rule] += ok
            means[rule].append(ari)
            cells.append(f"{','.join(map(str, ks))} ({ari:.3f}){' ✓' if ok else ''}")
        lines.append(f"| {ds} ({true_k}) | {' | '.join(cells)} |")
    lines.append("| **within ±30 % / mean ARI** | "
                 + " | ".join(f"**{within[r]} of {len(by)} / {np.mean(means[r]):.3f}**" for r in rules) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("dataset", nargs="?")
    p.add_argument("seed", nargs="?", type=int, default=0)
    p.add_argument("--embeddings", type=Path, default=None, help="embeddings_full.npz from gpu_suite.sh")
    p.add_argument("--md", type=Path, default=None, help="also write the table here")
    args = p.parse_args()
    if not DEFAULT_DATA.is_dir():
        sys.exit(f"skipped: {DEFAULT_DATA} is absent (the shared datasets)")
    if args.embeddings is None:
        if not args.dataset:
            p.error("give a DATASET or --embeddings")
        print(json.dumps(one_trained(args.dataset, args.seed)), flush=True)
        return
    text = table(from_embeddings(args.embeddings))
    print(text)
    if args.md:
        args.md.write_text(text + "\n")


if __name__ == "__main__":
    main()
