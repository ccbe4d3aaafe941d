#!/usr/bin/env python
"""Spatial benchmark: scRCL in spatial mode against expression and spatial baselines .

Regenerates docs/spatial.md and one domain-map PNG per dataset. For each spatial dataset in
../shared/data and each seed, in one invocation:

- scRCL, spatial mode, through the Python API (scrcl_cli.spatial + training.fit):
  seurat_v3 HVGs -> normalize 1e4 -> log1p -> scale without centring (clip 10); spatial kNN
  graph on obsm['spatial']; x0 = Â^t0 X, x1 = Â^t1 X; training.fit; cosine k-means on
  concat(z1, z2) with K = the true number of domains, and with K chosen without labels
  (clustering.choose_n_clusters: Louvain count of the expression graph); then the 50-neighbour vote (spatial.refine_labels).
- PCA + k-means on expression (scanpy standard pipeline: normalize, log1p, scale, PCA 50),
  before and after the same neighbour vote;
- Leiden at resolution 1.0 on the 15-NN graph of that PCA (label-free), before and after the vote;
- smoothed PCA + k-means: the same PCA + k-means on Â^t0 X, the very input of scRCL's MLP view,
  before and after the vote. It shows how much of scRCL's score the graph filter alone gives.

Labels are read here only, for scoring and for the true K.

Usage (from the repository root)::

    python -m benchmarks spatial --quick                 # CPU: fewer epochs, narrower model
    python -m benchmarks spatial                         # the recommended defaults (GPU advised)
    python -m benchmarks spatial --quick --seeds 0 --datasets osmfish_sscortex

Needs the ``bench`` extra (scanpy, leidenalg, igraph), torch, and matplotlib for the pictures.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import platform
import shlex
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

from scrcl_cli import clustering, graphs, spatial, training
from scrcl_cli.config import SPATIAL_DEFAULTS, unsmoothed_weight
from scrcl_cli.metrics import ari, nmi
from scrcl_cli.training import TrainConfig

log = logging.getLogger("spatial-bench")

DEFAULT_DATA = REPO.parent / "shared" / "data"
DATASETS = ["dlpfc_151510_top500", "osmfish_sscortex"]

# The recommended spatial defaults (one setting for every dataset, nothing chosen per dataset
# or from labels); see docs/spatial.md for the evidence.
SPATIAL_DEFAULTS: dict[str, Any] = {
    k: v for k, v in {**asdict(TrainConfig()), **SPATIAL_DEFAULTS}.items()
    if k not in ("input_mode", "expression", "seed")
}
QUICK = {"epochs": 100, "hidden_dim": 128}
REFINE_NEIGHBOURS = 50


@dataclass
class Dataset:
    name: str
    counts: sp.csr_matrix
    var_names: list[str]
    coords: np.ndarray
    labels: np.ndarray

    @property
    def n_domains(self) -> int:
        return int(np.unique(self.labels).size)


@dataclass
class Run:
    """One method on one dataset with one seed: labels before and after the vote."""

    method: str
    seed: int
    k: int
    labels: np.ndarray
    refined: np.ndarray
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    def scores(self, truth: np.ndarray) -> dict[str, float]:
        return {"ari": ari(truth, self.labels), "ari_refined": ari(truth, self.refined),
                "nmi": nmi(truth, self.labels), "nmi_refined": nmi(truth, self.refined)}


def load(path: Path) -> Dataset:
    import anndata

    a = anndata.read_h5ad(path)
    return Dataset(name=path.stem, counts=sp.csr_matrix(a.X), var_names=[str(v) for v in a.var_names],
                   coords=np.asarray(a.obsm["spatial"], dtype=np.float64),
                   labels=a.obs["cell_type"].astype(str).to_numpy())


# ----------------------------------------------------------------------------- scRCL


def scrcl_runs(ds: Dataset, cfg: dict[str, Any], seeds: list[int], device: str,
               tag: str = "", stages: bool = False) -> tuple[list[Run], dict]:
    """Train once per seed and cluster with the true K and with a label-free K.

    stages: also cluster every stage of each trained network (`stage_runs`) from the same run.
    """
    import torch

    t_prep = time.perf_counter()
    prep = spatial.prepare_spatial(ds.counts, ds.var_names, cfg["n_top_genes"])
    coords = ds.coords[prep.cell_mask]
    adj = spatial.spatial_graph(coords, cfg["n_neighbors"])
    keys = set(training.TrainConfig.__dataclass_fields__)
    base = training.TrainConfig(**{k: v for k, v in cfg.items() if k in keys})
    # The same smoothing and gene graph as `train --spatial` (the inputs do not depend on the seed).
    inputs = training.build_inputs(prep.model_input, prep.lognorm, base, adj=adj)
    info = {"genes": len(prep.genes), "spots": int(prep.cell_mask.sum()), "edges": int(adj.nnz),
            "seconds_prep": time.perf_counter() - t_prep}
    runs: list[Run] = []
    for seed in seeds:
        config = replace(base, seed=seed)
        t0 = time.perf_counter()
        # The embedding setting only chooses what is read out after training; gcn-pca's readout
        # also holds both views' hidden outputs, which the stage rows need.
        res = training.fit(inputs, replace(config, embedding="gcn-pca") if stages else config,
                           device=torch.device(device))
        t_fit = time.perf_counter() - t0
        finite = bool(np.all(np.isfinite(res.losses)))
        # The clustering `train --spatial` applies: the config's embedding in its metric, beside
        # the unsmoothed input when K is given and the embedding is Euclidean (`cluster_embedding`).
        emb = res.fused if config.embedding == "fused" else res.embedding
        metric = clustering.EMBEDDING_METRIC[config.embedding]

        def cut(k: int, k_given: bool) -> clustering.KMeansResult:
            return clustering.cluster_embedding(
                emb, k, seed=seed, metric=metric, unsmoothed=prep.model_input,
                unsmoothed_weight=unsmoothed_weight(config.unsmoothed_weight, k_given=k_given))

        km = cut(ds.n_domains, True)
        runs.append(Run("scrcl_k" + tag, seed, ds.n_domains, km.labels,
                        spatial.refine_labels(km.labels, coords, REFINE_NEIGHBOURS), t_fit,
                        {"finite_loss": finite, "final_loss": float(res.losses[-1, 0]) if len(res.losses) else None}))
        t1 = time.perf_counter()
        k_free, _ = clustering.choose_n_clusters(prep.lognorm, seed=seed, n_neighbors=base.n_neighbors)
        km = cut(k_free, False)
        runs.append(Run("scrcl_free" + tag, seed, k_free, km.labels,
                        spatial.refine_labels(km.labels, coords, REFINE_NEIGHBOURS),
                        t_fit + time.perf_counter() - t1))
        if stages:
            runs += stage_runs(res, inputs.x0, coords, ds.n_domains, seed)
        log.info("%s seed %d%s: scRCL trained in %.0f s, label-free K = %d", ds.name, seed, tag, t_fit, k_free)
    return runs, info


STAGES = {
    "stage_input": "input of both views, Â^t0 X (PCA 30)",
    "stage_h1": "MLP view hidden h1 (PCA 50)",
    "stage_h2": "GCN view hidden h2 (PCA 50, `--embedding gcn-pca`)",
    "stage_z1": "refined MLP view z1 (cosine)",
    "stage_z2": "refined GCN view z2 (cosine)",
    "stage_fused": "fused concat(z1, z2) (cosine, the default)",
}


def stage_runs(res: Any, x0: np.ndarray, coords: np.ndarray, k: int, seed: int) -> list[Run]:
    """Where the network loses what the smoothed input holds: k-means with the true K on each
    stage of one trained network (`training.TrainResult` with the gcn-pca readout; x0 (N, G) its
    input Â^t0 X): the input, both views' hidden outputs, their refined embeddings, the fused one,
    each followed by the same neighbour vote."""
    from sklearn.cluster import KMeans

    o = res.z1.shape[1]
    reps = {"stage_input": _pca(np.asarray(x0, dtype=np.float64), seed)[:, :30], "stage_h1": res.cell_embedding,
            "stage_h2": res.embedding, "stage_z1": res.z1, "stage_z2": res.fused[:, o:], "stage_fused": res.fused}
    runs: list[Run] = []
    for name, x in reps.items():
        t0 = time.perf_counter()
        if name in ("stage_z1", "stage_z2", "stage_fused"):
            lab = clustering.kmeans(x, k, seed=seed, metric="cosine").labels
        else:
            lab = KMeans(k, n_init=10, random_state=seed).fit_predict(np.asarray(x, dtype=np.float64))
        runs.append(Run(name, seed, k, lab, spatial.refine_labels(lab, coords, REFINE_NEIGHBOURS),
                        time.perf_counter() - t0))
    return runs


# ----------------------------------------------------------------------------- baselines


def _scanpy_scaled(ds: Dataset):
    """Standard scanpy preprocessing up to scale (every gene here is an HVG: <= 2000 genes)."""
    import anndata
    import scanpy as sc

    a = anndata.AnnData(X=ds.counts.astype(np.float32))
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    if a.n_vars > 2000:
        sc.pp.highly_variable_genes(a, flavor="seurat", n_top_genes=2000, subset=True)
    a.X = a.X.toarray()  # scale centres the data: densify explicitly rather than with a warning
    sc.pp.scale(a, max_value=10)
    return a


def _pca(x: np.ndarray, seed: int) -> np.ndarray:
    import scanpy as sc

    comps = min(50, x.shape[0] - 1, x.shape[1] - 1)
    return np.asarray(sc.pp.pca(np.asarray(x, dtype=np.float32), n_comps=comps, random_state=seed))


def _leiden(pca: np.ndarray, seed: int) -> np.ndarray:
    import anndata
    import scanpy as sc

    a = anndata.AnnData(X=np.zeros((pca.shape[0], 1), dtype=np.float32))
    a.obsm["X_pca"] = pca
    # Exact 15-NN (sklearn): scanpy's approximate path keeps self loops for N >= 4096.
    sc.pp.neighbors(a, n_neighbors=15, use_rep="X_pca", transformer="sklearn", random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.tl.leiden(a, resolution=1.0, random_state=seed, flavor="leidenalg", n_iterations=-1)
    return a.obs["leiden"].astype(int).to_numpy()


def baseline_runs(ds: Dataset, cfg: dict[str, Any], seeds: list[int]) -> list[Run]:
    from sklearn.cluster import KMeans

    scaled = _scanpy_scaled(ds)
    x = np.asarray(scaled.X, dtype=np.float64)
    a_hat = graphs.gcn_norm(spatial.spatial_graph(ds.coords, cfg["n_neighbors"]))
    x_smooth = np.asarray(graphs.smooth(x, a_hat, cfg["t0"]))
    k = ds.n_domains
    runs: list[Run] = []
    for seed in seeds:
        t0 = time.perf_counter()
        pca = _pca(x, seed)
        lab = KMeans(k, n_init=10, random_state=seed).fit_predict(pca)
        runs.append(Run("pca_kmeans", seed, k, lab, spatial.refine_labels(lab, ds.coords, REFINE_NEIGHBOURS),
                        time.perf_counter() - t0))
        t0 = time.perf_counter()
        lab = _leiden(pca, seed)
        runs.append(Run("leiden", seed, int(np.unique(lab).size), lab,
                        spatial.refine_labels(lab, ds.coords, REFINE_NEIGHBOURS), time.perf_counter() - t0))
        t0 = time.perf_counter()
        lab = KMeans(k, n_init=10, random_state=seed).fit_predict(_pca(x_smooth, seed))
        runs.append(Run("smooth_pca_kmeans", seed, k, lab,
                        spatial.refine_labels(lab, ds.coords, REFINE_NEIGHBOURS), time.perf_counter() - t0))
    return runs


# ----------------------------------------------------------------------------- report

METHODS = {
    "scrcl_k": "scRCL spatial, K given",
    "scrcl_free": "scRCL spatial, label-free K",
    "pca_kmeans": "PCA + k-means (K), expression only",
    "leiden": "Leiden res. 1.0 (label-free), expression only",
    "smooth_pca_kmeans": "smoothed PCA + k-means (K) on Â^t0 X",
}


def _ms(values: list[float]) -> str:
    v = np.asarray(values, dtype=float)
    if v.size == 1:
        return f"{v[0]:.3f}"
    return f"{v.mean():.3f} ± {v.std(ddof=1):.3f}"


def _k_text(runs: list[Run]) -> str:
    ks = [r.k for r in runs]
    return str(ks[0]) if len(set(ks)) == 1 else ", ".join(map(str, ks))


def dataset_table(ds: Dataset, runs: list[Run], methods: dict[str, str]) -> tuple[str, dict[str, dict[str, list[float]]]]:
    by: dict[str, list[Run]] = {}
    for r in runs:
        by.setdefault(r.method, []).append(r)
    summary: dict[str, dict[str, list[float]]] = {}
    lines = ["| method | K | ARI | ARI after vote | NMI | NMI after vote | seconds |",
             "|---|---|---|---|---|---|---|"]
    for m, label in methods.items():
        if m not in by:
            continue
        sc = [r.scores(ds.labels) for r in by[m]]
        summary[m] = {key: [s[key] for s in sc] for key in sc[0]}
        bold = "**" if m in ("scrcl_k", "scrcl_free") else ""
        lines.append(f"| {bold}{label}{bold} | {_k_text(by[m])} | {_ms(summary[m]['ari'])} | "
                     f"{bold}{_ms(summary[m]['ari_refined'])}{bold} | {_ms(summary[m]['nmi'])} | "
                     f"{_ms(summary[m]['nmi_refined'])} | {np.mean([r.seconds for r in by[m]]):.0f} |")
    return "\n".join(lines), summary


def domain_png(ds: Dataset, run: Run, ari_value: float, path: Path) -> None:
    """Ground truth and scRCL's refined domains side by side, clusters coloured as their best-matching layer."""
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.optimize import linear_sum_assignment

    classes, t = np.unique(ds.labels, return_inverse=True)
    clusters, p = np.unique(run.refined, return_inverse=True)
    table = np.zeros((classes.size, clusters.size))
    np.add.at(table, (t, p), 1)
    rows, cols = linear_sum_assignment(table, maximize=True)
    colour_of = np.full(clusters.size, -1)
    colour_of[cols] = rows
    spare = iter(range(classes.size, classes.size + clusters.size))
    colour_of[colour_of < 0] = [next(spare) for _ in range(int((colour_of < 0).sum()))]
    cmap = plt.get_cmap("tab20")
    size = max(1.0, 14000.0 / len(ds.labels))
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 4.3))
    for ax, codes, title in [(axes[0], t, "annotation"),
                             (axes[1], colour_of[p], f"scRCL spatial + vote, seed {run.seed} (ARI {ari_value:.2f})")]:
        ax.scatter(ds.coords[:, 0], ds.coords[:, 1], c=[cmap(int(c) % 20) for c in codes], s=size, linewidths=0)
        ax.set_aspect("equal")
        ax.invert_yaxis()
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(title, fontsize=9)
    handles = [plt.Line2D([], [], marker="o", ls="", color=cmap(i), label=c) for i, c in enumerate(classes)]
    fig.legend(handles=handles, loc="lower center", ncol=min(6, classes.size), fontsize=7, frameon=False)
    fig.suptitle(ds.name, fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=80)
    plt.close(fig)


def versions() -> str:
    import importlib.metadata as md

    out = []
    for pkg in ["numpy", "scipy", "scikit-learn", "anndata", "scanpy", "leidenalg", "igraph", "torch"]:
        try:
            out.append(f"{pkg} {md.version(pkg)}")
        except md.PackageNotFoundError:
            out.append(f"{pkg} absent")
    return ", ".join(out)


def markers(section: str) -> tuple[str, str]:
    """Comment lines around one generated section of the report (quick and full runs keep their own)."""
    return (f"<!-- spatial-benchmark:{section}:start (generated by benchmarks/spatial.py; do not edit by hand) -->",
            f"<!-- spatial-benchmark:{section}:end -->")


def report_section(args: argparse.Namespace, cfg: dict[str, Any], results: dict[str, Any], minutes: float) -> str:
    # `python -m benchmarks spatial` sets argv[0] to that command; a direct run names the file.
    script = sys.argv[0]
    if script.startswith("python "):
        command = " ".join([script, *(shlex.quote(a) for a in sys.argv[1:])])
    else:
        if Path(script).resolve().is_relative_to(REPO):
            script = str(Path(script).resolve().relative_to(REPO))
        command = "python " + " ".join(shlex.quote(a) for a in [script, *sys.argv[1:]])
    start, end = markers(args.section)
    lines = [
        start,
        "",
        f"Generated on {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC in {minutes:.1f} min by:",
        "",
        "```",
        command,
        "```",
        "",
        f"- Seeds: {', '.join(map(str, args.seeds))}. Numbers are mean ± sample sd over seeds. "
        "ARI and NMI (arithmetic) from `scrcl_cli.metrics`; \"after vote\" = `spatial.refine_labels`, "
        f"each spot takes the majority label of its {REFINE_NEIGHBOURS} nearest other spots.",
        f"- scRCL settings ({'`--quick`, reduced for CPU' if args.quick else 'as given'}): "
        + ", ".join(f"{k} {v}" for k, v in cfg.items()) + f"; device {args.device}, {args.threads} torch threads.",
        *([f"- Extra scRCL rows: the same settings with {', '.join(args.compare)}."] if args.compare else []),
        f"- Machine: {platform.platform()}, Python {platform.python_version()}.",
        f"- Packages: {versions()}.",
        "",
    ]
    for name, res in results.items():
        lines += [f"### {name}", "", res["intro"], "", res["table"], ""]
        if res.get("png"):
            lines += [f"![domains of {name}]({res['png']})", ""]
    return "\n".join([*lines, end])


def write_report(path: Path, section: str, name: str) -> None:
    """Replace the generated section `name` of `path` (between its markers), or append it."""
    start, end = markers(name)
    text = path.read_text() if path.exists() else ""
    if start in text and end in text:
        head, rest = text.split(start, 1)
        tail = rest.split(end, 1)[1]
        text = head + section + tail
    else:
        text = (text.rstrip("\n") + "\n\n" if text else "# Spatial mode\n\n## Benchmark\n\n") + section + "\n"
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    p.add_argument("--datasets", nargs="+", default=DATASETS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--quick", action="store_true",
                   help=f"CPU run: epochs {QUICK['epochs']}, hidden_dim {QUICK['hidden_dim']} (stated in the report)")
    for key in ["epochs", "hidden_dim", "out_dim", "t0", "t1", "n_neighbors"]:
        p.add_argument("--" + key.replace("_", "-"), type=int, default=None)
    for key in ["lr", "lambda1", "lambda2", "temperature", "dropout", "weight_decay"]:
        p.add_argument("--" + key.replace("_", "-"), type=float, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-scrcl", action="store_true", help="baselines only")
    p.add_argument("--gene-neighbors", type=int, default=None)
    p.add_argument("--compare", nargs="+", default=None, metavar="KEY=VALUE",
                   help="also run scRCL with these settings changed (e.g. gene_neighbors=1), as extra rows")
    p.add_argument("--report", type=Path, default=REPO / "docs" / "spatial.md")
    p.add_argument("--png-dir", type=Path, default=REPO / "docs")
    p.add_argument("--json", type=Path, default=None, help="also write every score here")
    p.add_argument("--section", default=None,
                   help="name of the generated section of the report to replace (default: quick or full)")
    p.add_argument("--no-png", action="store_true", help="do not draw the domain maps")
    p.add_argument("--stages", action="store_true",
                   help="also cluster every stage of the trained network with the true K (extra rows)")
    args = p.parse_args(argv)
    args.section = args.section or ("quick" if args.quick else "full")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)

    cfg = dict(SPATIAL_DEFAULTS)
    if args.quick:
        cfg.update(QUICK)
    for key in list(cfg):
        val = getattr(args, key, None)
        if val is not None:
            cfg[key] = val
    alt: dict[str, Any] | None = None
    methods = dict(METHODS)
    if args.compare:
        alt = dict(cfg)
        for item in args.compare:
            key, _, value = item.partition("=")
            fields = training.TrainConfig.__dataclass_fields__
            if key not in cfg and key not in fields:
                p.error(f"--compare: unknown setting {key!r}; choose from {', '.join(sorted(fields))}")
            current = cfg.get(key, getattr(training.TrainConfig(), key))
            alt[key] = value if isinstance(current, str) else (float(value) if current is None else type(current)(value))
        change = ", ".join(f"{k} {alt[k]}" for k in alt if alt[k] != cfg.get(k))
        methods = {"scrcl_k": METHODS["scrcl_k"], "scrcl_k_alt": f"scRCL spatial, K given, {change}",
                   "scrcl_free": METHODS["scrcl_free"], "scrcl_free_alt": f"scRCL spatial, label-free K, {change}",
                   **{k: v for k, v in METHODS.items() if not k.startswith("scrcl")}}
    if not args.skip_scrcl:
        import torch

        torch.set_num_threads(args.threads)

    start = time.perf_counter()
    results: dict[str, Any] = {}
    dump: dict[str, Any] = {"config": cfg, "compare": alt, "seeds": args.seeds, "datasets": {}}
    for name in args.datasets:
        ds = load(args.data_dir / f"{name}.h5ad")
        log.info("%s: %d spots, %d genes, %d domains", name, len(ds.labels), len(ds.var_names), ds.n_domains)
        runs = baseline_runs(ds, cfg, args.seeds)
        info: dict[str, Any] = {}
        if not args.skip_scrcl:
            scrcl, info = scrcl_runs(ds, cfg, args.seeds, args.device, stages=args.stages)
            if alt is not None:
                scrcl += scrcl_runs(ds, alt, args.seeds, args.device, tag="_alt")[0]
            runs = scrcl + runs
            if args.stages:
                methods = {**methods, **STAGES}
        table, summary = dataset_table(ds, runs, methods)
        intro = (f"{len(ds.labels)} spots, {len(ds.var_names)} genes, {ds.n_domains} annotated domains."
                 + (f" scRCL: {info['genes']} genes after seurat_v3 selection, spatial graph with "
                    f"{info['edges'] // 2} undirected edges (k = {cfg['n_neighbors']})." if info else ""))
        png = None
        first = next((r for r in runs if r.method == "scrcl_k"), None)
        if first is not None and not args.no_png:
            args.png_dir.mkdir(parents=True, exist_ok=True)
            png_path = args.png_dir / f"spatial_{name}.png"
            domain_png(ds, first, ari(ds.labels, first.refined), png_path)
            png = png_path.name if args.png_dir.resolve() == args.report.parent.resolve() else str(png_path)
        results[name] = {"intro": intro, "table": table, "png": png}
        dump["datasets"][name] = {"summary": summary, "info": info,
                                  "runs": [{**asdict(replace(r, labels=None, refined=None)),
                                            **r.scores(ds.labels)} for r in runs]}
        print(f"\n## {name}\n{table}", flush=True)
    minutes = (time.perf_counter() - start) / 60
    args.report.parent.mkdir(parents=True, exist_ok=True)
    write_report(args.report, report_section(args, cfg, results, minutes), args.section)
    if args.json:
        args.json.write_text(json.dumps(dump, indent=1, default=float))
    log.info("wrote %s in %.1f min", args.report, minutes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
