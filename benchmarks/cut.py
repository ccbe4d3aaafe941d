#!/usr/bin/env python
"""How a trained embedding is cut into K clusters: candidate cuts on a tuning and a confirmation group.

Trains scRCL in-process once per dataset and seed (``scrcl_cli.training``, labels never passed),
caches the clustering embedding, then cuts every embedding with each candidate and scores the
cuts against the labels (read here only). With K given (the true number of types) and label-free
(the count `train` chooses), beside the standard pipeline's PCA + k-means and Leiden bisected to K,
computed on the same cells in the same run. Writes the tables of docs/defaults.md, "How the
embedding is cut with K given".

Groups, fixed by a rule that does not look at any result: the five non-spatial shared datasets with
the most cells tune, the other four confirm. A cut is adopted only if it wins on tuning and does not
lose on confirmation.

Stress test (``--stress``): on the datasets with at least 10 types, the largest type is subsampled
to half its cells and the two smallest types holding at least 20 cells to 0.5 % of the cells that
remain (at least 3 cells), with a fixed seed; the files are made in memory, never written.

Usage (from the repository root)::

    python -m benchmarks cut --jobs 2                         # CPU, reduced width, 3 seeds (~25 min)
    python -m benchmarks cut --jobs 2 --stress                # adds the stress test
    python -m benchmarks cut --hidden-dim 1500 --device cuda  # full width on a GPU
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import baselines
from benchmarks.accuracy import DEFAULT_DATA, LABEL_KEY, detect_expression, manifest_datasets
from benchmarks.benchutil import add_report_args, emit_markdown, existing_data_dir
from benchmarks.protocol import RARE, dataset_sizes, split_groups, stressed

REPO = Path(__file__).resolve().parent.parent


def groups(data_dir: Path) -> tuple[list[str], list[str]]:
    """(tuning, confirmation) of the shared datasets in `data_dir` (`protocol.split_groups`)."""
    return split_groups(dataset_sizes(data_dir, manifest_datasets(data_dir)))


def _config(job: dict[str, Any], expression: str) -> Any:
    from scrcl_cli.training import TrainConfig

    return TrainConfig(hidden_dim=job["hidden_dim"], epochs=job["epochs"], seed=job["seed"], expression=expression,
                       **job["overrides"])


def _prepared(job: dict[str, Any]) -> tuple[Any, np.ndarray, str, Any]:
    """(AnnData, labels, expression, `preprocessing.prepare` result) of one job's cells; the seed
    plays no part, so the seeds of one dataset share one read (`_cells`)."""
    return _cells(job["data_dir"], job["dataset"], job["variant"], job["max_cells"],
                  tuple(sorted(job["overrides"].items())))


@functools.lru_cache(maxsize=2)
def _cells(data_dir: str, dataset: str, variant: str, max_cells: int,
           overrides: tuple[tuple[str, Any], ...]) -> tuple[Any, np.ndarray, str, Any]:
    import anndata as ad
    import scipy.sparse as sp

    from scrcl_cli.config import TRAIN_DEFAULTS
    from scrcl_cli.preprocessing import prepare

    a = ad.read_h5ad(Path(data_dir) / f"{dataset}.h5ad")
    labels = a.obs[LABEL_KEY].astype(str).to_numpy()
    if variant == "stress":
        keep = stressed(labels)
        assert keep is not None
        a, labels = a[keep].copy(), labels[keep]
    if a.n_obs > max_cells:
        sub = np.sort(np.random.default_rng(0).choice(a.n_obs, max_cells, replace=False))
        a, labels = a[sub].copy(), labels[sub]
    expression = detect_expression(a.X)[0]
    given = dict(overrides)
    x = sp.csr_matrix(a.X, dtype=np.float32)
    prep = prepare(x, [str(v) for v in a.var_names], expression=expression,
                   n_top_genes=given.get("n_top_genes", TRAIN_DEFAULTS.n_top_genes),
                   input_mode=given.get("input_mode", TRAIN_DEFAULTS.input_mode))
    return a, labels, expression, prep


def train_one(job: dict[str, Any]) -> dict[str, Any]:
    """Train on one dataset (variant, seed) and cache embedding, label-free K and the PCA baseline inputs."""
    import torch

    from scrcl_cli import clustering
    from scrcl_cli.training import build_inputs, fit

    torch.set_num_threads(job["threads"])
    cache = Path(job["cache"])
    if cache.exists():
        return {"cache": str(cache), "cached": True}
    a, labels, expression, prep = _prepared(job)
    config = _config(job, expression)
    tic = time.perf_counter()
    inputs = build_inputs(prep.model_input, prep.lognorm, config)
    result = fit(inputs, config, device=torch.device(job["device"]))
    k_free, _ = clustering.choose_n_clusters(prep.lognorm, seed=job["seed"], n_neighbors=config.n_neighbors, adj=inputs.adj)
    seconds = time.perf_counter() - tic
    kept = a[prep.cell_mask]
    pca, _ = baselines.standard_pca(kept, expression=expression, seed=job["seed"])
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(tmp, embedding=result.embedding.astype(np.float32), labels=np.asarray(labels[prep.cell_mask], dtype=str), k_free=k_free,
             pca=np.asarray(pca, dtype=np.float32), seconds=seconds)
    os.replace(tmp, cache)
    return {"cache": str(cache), "cached": False, "seconds": seconds}


# ----------------------------------------------------------------------------- candidate cuts


def _micro(e: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The microclusters `ward_kmeans` starts from: (labels (N,), centroids (M, d), sizes (M,))."""
    from scrcl_cli import clustering

    m = min(e.shape[0], max(k, min(10 * k, 2000)))
    micro = clustering.kmeans(np.asarray(e, np.float64), m, seed=seed, metric="euclidean", n_init=3)
    return micro.labels, micro.centroids, np.bincount(micro.labels, minlength=m).astype(np.float64)


def cut_ward_kmeans(e: np.ndarray, k: int, seed: int) -> np.ndarray:
    from scrcl_cli import clustering

    return clustering.ward_kmeans(e, k, seed=seed).labels


def cut_ward(e: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Ward's merge of the microclusters, without the Lloyd iterations that follow in ward_kmeans."""
    from scrcl_cli import clustering

    labels, cents, sizes = _micro(e, k, seed)
    return clustering.ward_merge(cents, sizes, k)[labels]


def cut_average(e: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Average-linkage merge of the microclusters (scipy), no Lloyd."""
    from scipy.cluster.hierarchy import fcluster, linkage

    labels, cents, _ = _micro(e, k, seed)
    if cents.shape[0] <= k:
        return labels
    tree = linkage(cents, method="average")
    return (fcluster(tree, t=k, criterion="maxclust") - 1)[labels]


def _leiden_k(e: np.ndarray, k: int, seed: int, *, merge: bool) -> np.ndarray:
    from scrcl_cli import clustering

    conn = baselines.knn_connectivities(np.asarray(e, np.float64))
    found = baselines.leiden_bisect(conn, n_clusters=k, seed=seed)
    labels = found.labels
    n = int(labels.max()) + 1
    if merge and n > k:
        cents = np.vstack([e[labels == c].mean(0) for c in range(n)])
        labels = clustering.ward_merge(cents, np.bincount(labels).astype(np.float64), k)[labels]
    return labels


def cut_leiden(e: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Leiden on the embedding's 15-NN graph, resolution bisected to k (closest count when none gives k)."""
    return _leiden_k(e, k, seed, merge=False)


def cut_leiden_merge(e: np.ndarray, k: int, seed: int) -> np.ndarray:
    """As cut_leiden, then Ward's merge of the communities' means when more than k were found."""
    return _leiden_k(e, k, seed, merge=True)


CUTS: dict[str, Callable[[np.ndarray, int, int], np.ndarray]] = {
    "ward-kmeans (default, label-free)": cut_ward_kmeans,
    "ward merge, no Lloyd": cut_ward,
    "average merge, no Lloyd": cut_average,
    "leiden to K": cut_leiden,
    "leiden to K + ward merge": cut_leiden_merge,
}
# Weights of the PCA block in `cut_joint` (the embedding's block has weight 1).
JOINT_WEIGHTS = (0.5, 1.0)
JOINT_CUTS = {f"joint with PCA, weight {w:g}": w for w in JOINT_WEIGHTS}


def cut_joint(e: np.ndarray, k: int, seed: int, pca: np.ndarray, weight: float) -> np.ndarray:
    """ward-kmeans on the embedding beside the run's PCA baseline components (`clustering.joint_embedding`)."""
    from scrcl_cli import clustering

    return clustering.ward_kmeans(clustering.joint_embedding(e, pca, weight), k, seed=seed).labels


@dataclass(frozen=True)
class Unsmoothed:
    """One cached run's unsmoothed model input, raw (N, G), and its scaled principal components
    (N, 50, `clustering.unsmoothed_components`), computed once for all the cuts that use them."""

    raw: Any
    scaled: np.ndarray


def cut_package_joint(e: np.ndarray, k: int, seed: int, unsmoothed: Unsmoothed, weight: float) -> np.ndarray:
    """What `train` runs with an unsmoothed weight: `clustering.cluster_embedding` beside the
    principal components of the scaled, unsmoothed model input (the package's own path)."""
    from scrcl_cli import clustering

    return clustering.cluster_embedding(e, k, seed=seed, metric="euclidean", unsmoothed=unsmoothed.raw,
                                        unsmoothed_weight=weight).labels


def cut_scaled_joint(e: np.ndarray, k: int, seed: int, unsmoothed: Unsmoothed, weight: float) -> np.ndarray:
    """The labels of `cut_package_joint` at another weight, from the components computed once."""
    from scrcl_cli import clustering

    return clustering.ward_kmeans(clustering.joint_embedding(e, unsmoothed.scaled, weight), k, seed=seed).labels


def cut_joint_unscaled(e: np.ndarray, k: int, seed: int, unsmoothed: Unsmoothed, weight: float) -> np.ndarray:
    """As `cut_package_joint` without scaling the genes first."""
    from scrcl_cli import clustering

    z = clustering.joint_embedding(e, clustering.unsmoothed_components(unsmoothed.raw, scale=False), weight)
    return clustering.ward_kmeans(z, k, seed=seed).labels


def cut_joint_kmeanspp(e: np.ndarray, k: int, seed: int, unsmoothed: Unsmoothed, weight: float) -> np.ndarray:
    """k-means with ten k-means++ restarts (what PCA + k-means runs) on the default K-given joint
    space, instead of the Ward-initialised k-means: k-means++ seeds far-off points first."""
    from sklearn.cluster import KMeans

    from scrcl_cli import clustering

    z = clustering.joint_embedding(e, unsmoothed.scaled, weight)
    return np.asarray(KMeans(k, n_init=10, random_state=seed).fit(z).labels_, dtype=np.int64)


def clipped_components(x: Any, max_value: float, n_components: int = 50) -> np.ndarray:
    """`clustering.unsmoothed_components` with scanpy's clip: x (N, G) sparse, each gene scaled to
    unit variance and every centred value above `max_value` cut to it (``pp.scale(max_value=...)``),
    which on sparse x caps the stored values at max_value + mean / sd so that x stays sparse;
    -> (N, min(n_components, N - 1, G)). Why a candidate: a gene expressed in one cell of N reaches
    about sqrt(N) standard deviations and can take a principal component to itself."""
    import scipy.sparse as sp
    from sklearn.decomposition import PCA

    xs = sp.csr_matrix(x, dtype=np.float64)
    n = xs.shape[0]
    mean = np.asarray(xs.mean(0)).ravel()
    var = (np.asarray(xs.multiply(xs).mean(0)).ravel() - mean**2) * n / max(n - 1, 1)
    sd = np.sqrt(np.maximum(var, 0.0))
    sd[sd == 0] = 1.0
    xs = (xs @ sp.diags(1.0 / sd)).tocsr()
    xs.data = np.minimum(xs.data, (max_value + mean / sd)[xs.indices])
    d = max(1, min(n_components, n - 1, xs.shape[1]))
    return np.asarray(PCA(n_components=d, svd_solver="covariance_eigh").fit_transform(xs), dtype=np.float64)


def cut_joint_clipped(e: np.ndarray, k: int, seed: int, unsmoothed: Unsmoothed, weight: float,
                      max_value: float) -> np.ndarray:
    """The default K-given cut with the scaled genes clipped at `max_value` (`clipped_components`)."""
    from scrcl_cli import clustering

    z = clustering.joint_embedding(e, clipped_components(unsmoothed.raw, max_value), weight)
    return clustering.ward_kmeans(z, k, seed=seed).labels


def merge_by_modularity(labels: np.ndarray, adj: Any, k: int) -> np.ndarray:
    """Merge clusters pairwise until k are left, each time the pair whose union raises the modularity
    of the graph `adj` (N, N, symmetric) most: e_ab / m - d_a d_b / m^2, with e_ab the edge weight
    between the two clusters, d their total degrees and m the total (Clauset-Newman-Moore's greedy
    step). Clusters that share few edges, such as an isolated small group, are merged last.
    labels (N,) -> (N,) in 0..k-1."""
    import scipy.sparse as sp

    lab = np.unique(labels, return_inverse=True)[1]
    while int(lab.max()) + 1 > k:
        n = int(lab.max()) + 1
        member = sp.csr_matrix((np.ones(lab.size), (np.arange(lab.size), lab)), shape=(lab.size, n))
        between = (member.T @ adj @ member).toarray()
        degree = between.sum(1)
        total = degree.sum()
        gain = between / total - np.outer(degree, degree) / total**2
        np.fill_diagonal(gain, -np.inf)
        a, b = np.unravel_index(int(np.argmax(gain)), gain.shape)
        lab = np.unique(np.where(lab == b, a, lab), return_inverse=True)[1]
    return lab


def cut_joint_modularity_merge(e: np.ndarray, k: int, seed: int, unsmoothed: Unsmoothed, weight: float) -> np.ndarray:
    """Over-cluster the default K-given joint space into 2k (Ward-initialised k-means), then merge
    down to k by modularity on the joint space's Euclidean 15-NN graph (`merge_by_modularity`):
    a criterion that splits a large type first and keeps a separated rare group apart."""
    from sklearn.neighbors import NearestNeighbors

    from scrcl_cli import clustering
    from scrcl_cli.graphs import knn_to_adjacency

    z = clustering.joint_embedding(e, unsmoothed.scaled, weight)
    micro = clustering.ward_kmeans(z, min(2 * k, max(k, z.shape[0] // 5)), seed=seed).labels
    nbrs = NearestNeighbors(n_neighbors=min(16, z.shape[0])).fit(z).kneighbors(z, return_distance=False)[:, 1:]
    return merge_by_modularity(micro, knn_to_adjacency(nbrs), k)


PACKAGE_JOINT: dict[str, tuple[Callable[..., np.ndarray], float]] = {"unscaled unsmoothed input, weight 0.5": (cut_joint_unscaled, 0.5),
                 "scaled unsmoothed input, weight 0.5 (default, K given)": (cut_package_joint, 0.5),
                 "scaled unsmoothed input, weight 0.75": (cut_scaled_joint, 0.75),
                 "scaled unsmoothed input, weight 1": (cut_scaled_joint, 1.0),
                 "scaled unsmoothed input, weight 0.5, k-means++ (10 restarts)": (cut_joint_kmeanspp, 0.5),
                 "scaled unsmoothed input, weight 0.5, 2K merged by modularity": (cut_joint_modularity_merge, 0.5),
                 "scaled unsmoothed input clipped at 10, weight 0.5":
                     (functools.partial(cut_joint_clipped, max_value=10.0), 0.5),
                 "scaled unsmoothed input clipped at 30, weight 0.5":
                     (functools.partial(cut_joint_clipped, max_value=30.0), 0.5)}


def cut_names() -> list[str]:
    """Every candidate cut, in report order."""
    return [*CUTS, *JOINT_CUTS, *PACKAGE_JOINT]


def score(y: np.ndarray, pred: np.ndarray) -> dict[str, Any]:
    from scrcl_cli.metrics import ari, rare_type_recall

    rare = rare_type_recall(y, pred, max_fraction=RARE)
    # The labels themselves are kept for the agreement between seeds (`_agreement`).
    return {"ari": float(ari(y, pred)), "rare": (float(np.mean(list(rare.values()))) if rare else None),
            "n_clusters": int(np.unique(pred).size), "pred": np.asarray(pred).astype(int).tolist()}


def evaluate_cache(job: dict[str, Any]) -> dict[str, Any]:
    """Every cut, K given and label-free, plus the two baselines with K given, on one cached run."""
    seed = job["seed"]
    d = np.load(job["cache"])
    e, y, k_free, pca = d["embedding"], d["labels"].astype(str), int(d["k_free"]), d["pca"]
    k = int(np.unique(y).size)
    out: dict[str, Any] = {"k": k, "k_free": k_free, "seconds": float(d["seconds"])}
    for name, cut in CUTS.items():
        out[f"{name}|given"] = score(y, cut(e, k, seed))
        out[f"{name}|free"] = score(y, cut(e, k_free, seed))
    for name, w in JOINT_CUTS.items():
        out[f"{name}|given"] = score(y, cut_joint(e, k, seed, pca, w))
        out[f"{name}|free"] = score(y, cut_joint(e, k_free, seed, pca, w))
    raw = _prepared(job)[3].model_input  # deterministic: the input the cached run trained on
    assert raw.shape[0] == e.shape[0]
    from scrcl_cli import clustering

    unsmoothed = Unsmoothed(raw=raw, scaled=clustering.unsmoothed_components(raw))
    for name, (joint_cut, w) in PACKAGE_JOINT.items():
        out[f"{name}|given"] = score(y, joint_cut(e, k, seed, unsmoothed, w))
        out[f"{name}|free"] = score(y, joint_cut(e, k_free, seed, unsmoothed, w))
    out["PCA + k-means|given"] = score(y, baselines.kmeans(pca, n_clusters=k, seed=seed))
    conn = baselines.knn_connectivities(np.asarray(pca, np.float64))
    out["PCA + Leiden to K|given"] = score(y, baselines.leiden_bisect(conn, n_clusters=k, seed=seed).labels)
    out["PCA + Leiden res. 1|free"] = score(y, baselines.leiden(conn, resolution=1.0, seed=seed))
    return out


def seed_sources(jobs: list[dict[str, Any]]) -> dict[str, float]:
    """Where the default K-given cut's seed-to-seed disagreement comes from, on one dataset.

    jobs: that dataset's cached runs, one per training seed. Each embedding is cut with every
    clustering seed of the list (`cut_scaled_joint` at weight 0.5: the labels `train` gives with K,
    from components computed once). Returns mean pairwise ARI between seeds when both the training
    and the clustering seed differ ("both", what `_agreement` reports), when only the clustering seed
    differs (same embedding), and when only the training seed does (clustering seed fixed at the first).
    """
    from itertools import combinations

    from scrcl_cli import clustering
    from scrcl_cli.metrics import ari

    seeds = [j["seed"] for j in jobs]
    # The cells and their input do not depend on the seed: one set of components serves every run.
    raw = _prepared(jobs[0])[3].model_input
    unsmoothed = Unsmoothed(raw=raw, scaled=clustering.unsmoothed_components(raw))
    labels: dict[tuple[int, int], np.ndarray] = {}
    for job in jobs:
        d = np.load(job["cache"])
        e, y = d["embedding"], d["labels"].astype(str)
        for c in seeds:
            labels[job["seed"], c] = cut_scaled_joint(e, int(np.unique(y).size), c, unsmoothed, 0.5)
    pairs = list(combinations(seeds, 2))
    return {
        "both": float(np.mean([ari(labels[a, a], labels[b, b]) for a, b in pairs])),
        "clustering seed only": float(np.mean([ari(labels[t, a], labels[t, b]) for t in seeds for a, b in pairs])),
        "training seed only": float(np.mean([ari(labels[a, seeds[0]], labels[b, seeds[0]]) for a, b in pairs])),
    }


def seed_sources_report(rows: dict[str, dict[str, float]], tuning: list[str], command: str) -> str:
    """Markdown table of `seed_sources` per dataset, with the mean over datasets."""
    cols = ["both", "clustering seed only", "training seed only"]
    lines = ["```", command, "```", "",
             "| dataset | group | " + " | ".join(f"seeds differ: {c}" for c in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for ds, r in rows.items():
        lines.append(f"| {ds} | {'tuning' if ds in tuning else 'confirmation'} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + " |")
    lines.append("| **mean** | | " + " | ".join(f"**{np.mean([r[c] for r in rows.values()]):.3f}**" for c in cols) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- report


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def _f(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}"


def _agreement(runs: list[dict[str, Any]], method: str) -> float | None:
    """Mean ARI between the labels of every pair of seeds of one dataset (None without labels:
    reports made before they were stored)."""
    from itertools import combinations

    from scrcl_cli.metrics import ari

    preds = [r[method]["pred"] for r in runs if "pred" in r[method]]
    if len(preds) < 2:
        return None
    return float(np.mean([ari(np.asarray(a), np.asarray(b)) for a, b in combinations(preds, 2)]))


def report(results: dict[str, dict[str, list[dict[str, Any]]]], tuning: list[str], confirmation: list[str],
           args: argparse.Namespace, command: str, minutes: float) -> str:
    """Markdown: mean ARI and rare-type recall per group and protocol, then per dataset."""
    methods_given = [f"{c}|given" for c in cut_names()] + ["PCA + k-means|given", "PCA + Leiden to K|given"]
    methods_free = [f"{c}|free" for c in cut_names()] + ["PCA + Leiden res. 1|free"]
    lines = [
        f"Generated by `benchmarks/cut.py` on {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC in {minutes:.0f} min:",
        "",
        "```",
        command,
        "```",
        "",
        f"Setting: H {args.hidden_dim}, {args.epochs} epochs, "
        + "".join(f"{k} {v}, " for k, v in sorted(args.overrides.items()))
        + f"every other option the default; at most "
        f"{args.max_cells:,} cells per dataset (a fixed random subsample); seeds {', '.join(map(str, args.seeds))}. "
        "Cell: mean over seeds of the dataset means; rare = mean recall (Hungarian matching) of the types "
        f"holding < {RARE:.0%} of the cells, over the datasets that have one; agreement = mean ARI between "
        "the clusters of every pair of seeds (training and clustering seed both differ), over the datasets.",
        "",
        f"Tuning group: {', '.join(tuning)}. Confirmation group: {', '.join(confirmation)}.",
        "",
    ]
    for variant in results:
        for proto, methods in (("K given", methods_given), ("label-free", methods_free)):
            lines += [f"**{variant}, {proto}**", "",
                      "| cut | tuning ARI | tuning rare | tuning agreement | confirmation ARI | confirmation rare "
                      "| confirmation agreement |",
                      "|---|---|---|---|---|---|---|"]
            for m in methods:
                row = [m.split("|")[0]]
                for group in (tuning, confirmation):
                    per_ds = [results[variant][ds] for ds in group if ds in results[variant]]
                    ari = _mean([_mean([r[m]["ari"] for r in runs]) for runs in per_ds])
                    rare = _mean([_mean([r[m]["rare"] for r in runs]) for runs in per_ds])
                    agree = _mean([_agreement(runs, m) for runs in per_ds])
                    row += [_f(ari), _f(rare), _f(agree)]
                lines.append("| " + " | ".join(row) + " |")
            lines.append("")
        lines += [f"**{variant}, K given, ARI per dataset**", "",
                  "| dataset | K | " + " | ".join(m.split("|")[0] for m in methods_given) + " |",
                  "|---|---|" + "---|" * len(methods_given)]
        for ds in [*tuning, *confirmation]:
            if ds not in results[variant]:
                continue
            runs = results[variant][ds]
            lines.append(f"| {ds} | {runs[0]['k']} | " + " | ".join(_f(_mean([r[m]["ari"] for r in runs])) for m in methods_given) + " |")
        lines.append("")
    lines += leave_one_out(results, methods_given)
    return "\n".join(lines)


def leave_one_out(results: dict[str, dict[str, list[dict[str, Any]]]], methods: list[str]) -> list[str]:
    """Markdown: for each dataset held out, the scrcl-cli cut with the best mean K-given ARI over the
    other datasets (both groups), and how that cut and the embedding alone score on the one held out."""
    lines: list[str] = []
    cuts = [m for m in methods if m.split("|")[0] in cut_names()]
    alone = f"{next(iter(CUTS))}"
    for variant, per_ds in results.items():
        mean = {m: {ds: _mean([r[m]["ari"] for r in runs]) or 0.0 for ds, runs in per_ds.items()} for m in cuts}
        lines += [f"**{variant}, K given, leave one dataset out**", "",
                  "| held out | best cut on the others | its mean there | held-out ARI | embedding alone, held out |",
                  "|---|---|---|---|---|"]
        for ds in per_ds:
            others = {m: _mean([v for d, v in mean[m].items() if d != ds]) or 0.0 for m in cuts}
            best = max(others, key=lambda m: others[m])
            lines.append(f"| {ds} | {best.split('|')[0]} | {_f(others[best])} | {_f(mean[best][ds])} | "
                         f"{_f(mean[f'{alone}|given'][ds])} |")
        lines.append("")
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks cut", description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=str(DEFAULT_DATA))
    p.add_argument("--datasets", nargs="+", default=None, help="default: every non-spatial dataset")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--hidden-dim", type=int, default=256)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--max-cells", type=int, default=2000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--stress", action="store_true", help="also the stress test on datasets with >= 10 types")
    p.add_argument("--workdir", default="bench/cut", help="cache of the trained embeddings (reused when present)")
    p.add_argument("--from-json", default=None, metavar="JSON",
                   help="write the report from the scores a previous run saved with --json (nothing is trained or cut)")
    p.add_argument("--seed-sources", action="store_true",
                   help="only split the default K-given cut's disagreement between seeds into its training and "
                        "clustering parts (whole datasets)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="a TrainConfig field to change from its default for every training (repeatable), e.g. t0=2")
    add_report_args(p)
    args = p.parse_args(argv)
    try:
        args.overrides = parse_overrides(args.overrides)
    except ValueError as exc:
        p.error(str(exc))
    return args


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["t0=2", "lr=1e-3"]`` -> ``{"t0": 2, "lr": 0.001}``, typed like the TrainConfig field."""
    from dataclasses import fields

    from scrcl_cli.config import TrainConfig

    kinds = {f.name: type(getattr(TrainConfig(), f.name)) for f in fields(TrainConfig)}
    fixed = {"hidden_dim", "epochs", "seed", "expression"}  # set by their own options or per dataset
    out: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in kinds or name in fixed:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE with FIELD one of "
                             f"{', '.join(sorted(set(kinds) - fixed))}")
        out[name] = kinds[name](value)
    return out


def _setting_name(args: argparse.Namespace) -> str:
    """The cache folder of one setting: width, epochs, cells, then any overrides in name order."""
    extra = "".join(f"_{k}{v}" for k, v in sorted(args.overrides.items()))
    return f"H{args.hidden_dim}_E{args.epochs}_C{args.max_cells}{extra}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data_dir = existing_data_dir(args.data_dir)
    tic = time.perf_counter()
    tuning, confirmation = groups(data_dir)
    names = args.datasets or [*tuning, *confirmation]
    variants = ["whole"] + (["stress"] if args.stress else [])
    jobs = []
    for variant in variants:
        for ds in names:
            if variant == "stress":
                import anndata as ad

                if stressed(ad.read_h5ad(data_dir / f"{ds}.h5ad", backed="r").obs[LABEL_KEY].astype(str).to_numpy()) is None:
                    continue
            for seed in args.seeds:
                cache = Path(args.workdir) / _setting_name(args) / f"{ds}.{variant}.{seed}.npz"
                jobs.append({"dataset": ds, "variant": variant, "seed": seed, "cache": str(cache), "data_dir": str(data_dir),
                             "hidden_dim": args.hidden_dim, "epochs": args.epochs, "max_cells": args.max_cells,
                             "device": args.device, "overrides": args.overrides, "threads": max(1, (os.cpu_count() or 1) // args.jobs)})
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    command = "python -m benchmarks cut " + " ".join(argv if argv is not None else [])
    if args.seed_sources:
        whole = [j for j in jobs if j["variant"] == "whole"]
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(train_one, whole))
            per_ds = [[j for j in whole if j["dataset"] == ds] for ds in names]
            rows = dict(zip(names, pool.map(seed_sources, per_ds)))
        emit_markdown(seed_sources_report(rows, tuning, command.strip()), args.output)
        return 0
    if args.from_json:
        results = json.loads(Path(args.from_json).read_text())
    else:
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(train_one, jobs))
            scored = list(pool.map(evaluate_cache, jobs))
        for job, res in zip(jobs, scored):
            results.setdefault(job["variant"], {}).setdefault(job["dataset"], []).append(res)
    md = report(results, [d for d in tuning if d in names], [d for d in confirmation if d in names], args, command.strip(),
                (time.perf_counter() - tic) / 60)
    if args.json and not args.from_json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    emit_markdown(md + "\n", args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
