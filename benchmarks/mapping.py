#!/usr/bin/env python
"""Cross-sample mapping: train on some donors, cluster the others with the model, no retraining.

For each split, scrcl-cli is trained on the reference cells (``scrcl_cli.fit`` with K given, the
same code as ``scrcl-cli train``) and the query cells get the nearest training centroid
(``Model.cluster``, as ``scrcl-cli cluster``). Labels are read here only, to score.

Splits: ``baron_human_subset2142`` leave-one-donor-out (its ``donor`` column), and a documented
random half split (seed 0) of ``pbmc_10x_4k_top2000``, which has no donor or batch column.

Baselines in the same run, on the same cells:

- PCA projection: log-normalised reference HVGs -> scaled -> PCA fitted on the reference ->
  k-means (K) on the reference -> the query projected with the reference's scaling and PCA and
  assigned to the nearest reference centroid;
- scanpy's ``ingest`` of the reference's k-means labels;
- PCA + k-means (K) on the query alone (de novo, no reference).

Reported per split: query ARI, the ARI of scrcl-cli's de novo clustering of the query with the
reference's model (``cluster --denovo``, beside PCA + k-means on the query alone), the reference's
own ARI, agreement (ARI) between scrcl-cli's mapping and its de novo clustering, and how much a query cell's
label depends on the rest of its batch (the query's own kNN graph enters the embedding): the query
is mapped whole and as two random halves, and the fraction of cells with the same label is given.

Usage (from the repository root)::

    python -m benchmarks mapping                      # CPU, reduced width (H 256), seeds 0-2
    python -m benchmarks mapping --hidden-dim 1500 --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.accuracy import DEFAULT_DATA, LABEL_KEY
from benchmarks.benchutil import add_report_args, emit_markdown, existing_data_dir

SPLITS = {"baron_human_subset2142": "donor", "pbmc_10x_4k_top2000": None}


def splits(adata: Any, column: str | None) -> list[tuple[str, np.ndarray]]:
    """(name, query mask) per split: one per value of `column`, else one random half (seed 0)."""
    if column is None:
        mask = np.zeros(adata.n_obs, dtype=bool)
        mask[np.random.default_rng(0).permutation(adata.n_obs)[: adata.n_obs // 2]] = True
        return [("random half", mask)]
    values = adata.obs[column].astype(str).to_numpy()
    return [(f"{column} {v}", values == v) for v in sorted(set(values))]


def _reference_hvgs(ref: Any, query: Any) -> tuple[Any, Any]:
    """Log-normalised copies of both, restricted to the reference's 2,000 highly variable genes."""
    import scanpy as sc

    r, q = ref.copy(), query.copy()
    for a in (r, q):
        sc.pp.normalize_total(a, target_sum=1e4)
        sc.pp.log1p(a)
    sc.pp.highly_variable_genes(r, n_top_genes=min(2000, r.n_vars))
    genes = r.var_names[r.var["highly_variable"]]
    return r[:, genes].copy(), q[:, genes].copy()


def _lognorm_hvg(ref: Any, query: Any) -> tuple[np.ndarray, np.ndarray]:
    """Scaled log-normalised expression of the reference's 2,000 HVGs: (reference, query), dense."""
    r, q = _reference_hvgs(ref, query)
    xr = np.asarray(r.X.toarray() if hasattr(r.X, "toarray") else r.X, dtype=np.float64)
    xq = np.asarray(q.X.toarray() if hasattr(q.X, "toarray") else q.X, dtype=np.float64)
    mean, sd = xr.mean(0), xr.std(0)
    sd[sd == 0] = 1.0
    return np.clip((xr - mean) / sd, -10, 10), np.clip((xq - mean) / sd, -10, 10)


def pca_projection(ref: Any, query: Any, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(reference labels, query labels) of the PCA-projection baseline."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    xr, xq = _lognorm_hvg(ref, query)
    pca = PCA(n_components=min(50, xr.shape[0] - 1), random_state=seed).fit(xr)
    km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(pca.transform(xr))
    return km.labels_.astype(np.int64), km.predict(pca.transform(xq)).astype(np.int64)


def ingest(ref: Any, query: Any, ref_labels: np.ndarray) -> np.ndarray:
    """scanpy's ingest of `ref_labels` onto the query (scanpy's own preprocessing of both)."""
    import scanpy as sc

    r, q = _reference_hvgs(ref, query)
    sc.pp.pca(r, n_comps=min(50, r.n_obs - 1))
    sc.pp.neighbors(r, n_neighbors=15)
    r.obs["km"] = [str(v) for v in ref_labels]
    with warnings.catch_warnings(), _pynndescent_search_trees():
        warnings.simplefilter("ignore")
        sc.tl.ingest(q, r, obs="km", embedding_method="pca")
    return q.obs["km"].astype(int).to_numpy()


@contextlib.contextmanager
def _pynndescent_search_trees() -> Iterator[None]:
    """Let scanpy's ingest run with pynndescent >= 0.6.

    scanpy's ingest rebuilds the search forest from `NNDescent.n_search_trees`, which pynndescent
    0.6 made default to None (it was 1); `make_forest(None, ...)` then fails inside numpy. The
    subclass restores the old default for the duration of the call only.
    """
    import pynndescent

    original = pynndescent.NNDescent

    class _NNDescent(original):  # type: ignore[misc,valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if self.n_search_trees is None:
                self.n_search_trees = 1

    pynndescent.NNDescent = _NNDescent
    try:
        yield
    finally:
        pynndescent.NNDescent = original


def query_alone(query: Any, k: int, seed: int) -> np.ndarray:
    from benchmarks import baselines

    pca, _ = baselines.standard_pca(query, expression="counts", seed=seed)
    return baselines.kmeans(pca, n_clusters=k, seed=seed)


def run_split(adata: Any, name: str, mask: np.ndarray, k: int, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    import scrcl_cli
    from scrcl_cli.metrics import ari

    labels = adata.obs[LABEL_KEY].astype(str).to_numpy()
    ref, query = adata[~mask].copy(), adata[mask].copy()
    for a in (ref, query):
        a.obs = a.obs[[]]  # nothing but the cell names reaches the methods
    y_ref, y_q = labels[~mask], labels[mask]
    tic = time.perf_counter()
    model = scrcl_cli.fit(ref, n_clusters=k, hidden_dim=args.hidden_dim, epochs=args.epochs, seed=seed, device=args.device)
    train_s = time.perf_counter() - tic
    mapped = query.copy()
    model.cluster(mapped)
    denovo = query.copy()
    model.cluster(denovo, denovo=True, n_clusters=k)
    halves = np.zeros(query.n_obs, dtype=np.int64)
    half = np.zeros(query.n_obs, dtype=bool)
    half[np.random.default_rng(seed).permutation(query.n_obs)[: query.n_obs // 2]] = True
    for part in (half, ~half):
        piece = query[part].copy()
        model.cluster(piece)
        halves[part] = piece.obs["scrcl_cluster"].astype(int).to_numpy()
    m = mapped.obs["scrcl_cluster"].astype(int).to_numpy()
    pr_ref, pr_q = pca_projection(ref, query, k, seed)
    out = {
        "split": name, "seed": seed, "n_ref": int(ref.n_obs), "n_query": int(query.n_obs), "train_s": round(train_s, 1),
        "scrcl_query": ari(y_q, m), "scrcl_ref": ari(y_ref, ref.obs["scrcl_cluster"].astype(str).to_numpy()),
        "scrcl_map_vs_denovo": ari(m, denovo.obs["scrcl_cluster"].astype(int).to_numpy()),
        "scrcl_denovo_query": ari(y_q, denovo.obs["scrcl_cluster"].astype(int).to_numpy()),
        "halves_agreement": float(np.mean(halves == m)),
        "pca_projection_query": ari(y_q, pr_q), "pca_projection_ref": ari(y_ref, pr_ref),
        "ingest_query": float(ari(y_q, ingest(ref, query, pr_ref))),
        "query_alone": ari(y_q, query_alone(query, k, seed)),
    }
    return out


# The scored columns of the report, in order (keys of `run_split`'s rows).
COLUMNS = ("scrcl_query", "pca_projection_query", "ingest_query", "scrcl_denovo_query", "query_alone", "scrcl_ref",
           "pca_projection_ref", "scrcl_map_vs_denovo", "halves_agreement")


def _m(rows: list[dict[str, Any]], key: str) -> str:
    return f"{np.mean([r[key] for r in rows]):.3f}"


def report(results: dict[str, list[dict[str, Any]]], args: argparse.Namespace, command: str, minutes: float) -> str:
    lines = [
        f"Generated by `benchmarks/mapping.py` on {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC in {minutes:.0f} min:",
        "", "```", command, "```", "",
        f"Setting: H {args.hidden_dim}, {args.epochs} epochs, K given (the reference's number of types), every other "
        f"option the default; device {args.device}; seeds {', '.join(map(str, args.seeds))}. Cells: mean ARI over seeds.",
        "",
        "| dataset | split | query cells | scrcl-cli query | PCA projection | ingest | scrcl-cli de novo, query alone | "
        "PCA + k-means, query alone | scrcl-cli reference | PCA reference | mapping vs de novo | whole vs halves |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    def cells(rows: list[dict[str, Any]], bold: tuple[str, ...] = ()) -> str:
        return " | ".join(f"**{_m(rows, key)}**" if key in bold else _m(rows, key) for key in COLUMNS)

    for ds, rows in results.items():
        for split in dict.fromkeys(r["split"] for r in rows):
            rs = [r for r in rows if r["split"] == split]
            lines.append(f"| {ds} | {split} | {rs[0]['n_query']} | {cells(rs)} |")
        lines.append(f"| {ds} | **mean** | | {cells(rows, bold=('scrcl_query', 'pca_projection_query'))} |")
    lines += ["", "*scrcl-cli de novo, query alone*: `cluster --denovo --n-clusters K` of the query with the reference's "
              "model (the query's own clusters, no centroids from the reference). *whole vs halves*: fraction of query "
              "cells with the same label when the query is mapped whole and as two random halves."]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks mapping", description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=str(DEFAULT_DATA))
    p.add_argument("--datasets", nargs="+", default=list(SPLITS), choices=list(SPLITS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--hidden-dim", type=int, default=256)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--device", default="cpu")
    add_report_args(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import anndata as ad

    args = parse_args(argv)
    data_dir = existing_data_dir(args.data_dir)
    tic = time.perf_counter()
    results: dict[str, list[dict[str, Any]]] = {}
    for ds in args.datasets:
        adata = ad.read_h5ad(data_dir / f"{ds}.h5ad")
        for name, mask in splits(adata, SPLITS[ds]):
            k = int(np.unique(adata.obs[LABEL_KEY].astype(str).to_numpy()[~mask]).size)
            for seed in args.seeds:
                row = run_split(adata, name, mask, k, seed, args)
                print(json.dumps({"dataset": ds, **row}), flush=True)
                results.setdefault(ds, []).append(row)
    command = ("python -m benchmarks mapping " + " ".join(argv if argv is not None else [])).strip()
    md = report(results, args, command, (time.perf_counter() - tic) / 60)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    emit_markdown(md + "\n", args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
