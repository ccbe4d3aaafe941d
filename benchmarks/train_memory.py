"""Peak memory and time of one scRCL training step against N: linear losses vs the dense N x N form.

For each N, real cells are resampled from a shared dataset
(benchmarks/make_large.py), preprocessed with scrcl_cli.preprocessing.prepare, and the real
cosine kNN cell graph (scrcl_cli.graphs.cell_graph), its GCN normalisation and the gene graph
are built once and cached. Then each configuration runs in a fresh subprocess:

- ``step``: one full training step, forward + backward + Adam step, of the ScRCL model
  (scrcl_cli.model) with the full scRCL objective, either ``ours`` (scrcl_cli.losses.scrcl_loss,
  sparse adjacency) or ``dense`` (benchmarks/dense_losses.py: D and S as N x N matrices, a dense
  float32 adjacency and identity masks, as the reference code does). The model, inputs, graph
  and optimiser are identical; only the loss formulation differs. The inputs are smoothed as
  training.build_inputs does (x0 = Â^t0 X, x1 = Â^t1 X; --t0/--t1 default to TrainConfig's).
- ``loss``: the losses alone (forward + backward of the objective on random view outputs of
  the training shapes (N, H) and (N, O) with the same real graph), to isolate their memory.

Memory on CPU: ``peak_rss`` is the child's ru_maxrss (Linux, whole process); ``mem`` is
peak_rss minus the RSS right after imports (interpreter + torch), i.e. what the data, model,
graph and step add. For ``loss`` it is peak_rss minus the RSS just before the adjacency and the
loss are built. On CUDA: torch.cuda.max_memory_allocated (``mem``: minus the allocation before
the data was loaded), host ru_maxrss alongside. Time: median wall time of up to --steps timed
steps (fewer once they pass --step-budget-s, at least one) after one warm-up step (which also
creates Adam's state), with torch.cuda.synchronize on GPU. A child is killed when its RSS passes
--rss-limit-gib (default half the available memory), and on CPU a dense run whose memory,
predicted from the smaller N (or, for the step, from the losses-alone runs at the same N),
exceeds that limit is skipped; a configuration that fails is not run at larger N.
A log-log least-squares fit of mem and time against N is printed for every configuration, and
the slope between the two largest sizes (where the N^2 part dominates any constant or linear part).

CPU children run with MALLOC_MMAP_THRESHOLD_=1 MiB (``--malloc-mmap-threshold``): glibc otherwise
raises its mmap threshold up to 32 MiB after the first large free, so N x N blocks under 32 MiB
(N < ~2,900) are served from the heap and kept after they are freed, and ru_maxrss then
counts retained heap rather than live tensors (measured at N = 2,000: dense losses 274 MiB with
the glibc default vs 158 MiB with the fixed threshold; ours 72 vs 44 MiB). Both forms run with the
same setting. The data preparation of each N is cached in $SCRCL_BENCH_DIR (default
bench) and reused by later runs.

Usage (CPU; the runs and their exact commands are in docs/benchmarks.md; about 12 minutes on
the shared 2-core machine with the data preparation, 10.5 with it cached):
    python -m benchmarks scaling --threads 1 --md bench/train_memory.md
GPU host (also from benchmarks/gpu_suite.sh):
    python -m benchmarks scaling --device cuda --hidden-dim 1500 \\
        --sizes 5000,10000,20000,40000,80000,160000,320000,640000,1000000 --dense-max 60000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

from benchmarks import make_large
from benchmarks.benchutil import (
    cpu_name,
    default_rss_limit,
    emit_markdown,
    loadavg,
    mem_available,
    module_cmd,
    rss_now,
    rss_peak,
    run_guarded,
)
from scrcl_cli.config import TrainConfig  # its defaults are the benchmark's defaults

WORKDIR = Path(os.environ.get("SCRCL_BENCH_DIR", "bench"))


# ------------------------------------------------------------------ data preparation (child)

def prep_dir(args: argparse.Namespace, n: int) -> Path:
    return WORKDIR / f"train_{Path(args.source).stem}_n{n}_s{args.seed}_g{args.n_top_genes}_k{args.n_neighbors}"


def do_prep(args: argparse.Namespace, n: int) -> dict[str, Any]:
    """Resample N cells, preprocess, build the graphs, save them (CSR .npz) for the step children."""
    import numpy as np
    import scipy.sparse as sp

    from scrcl_cli import graphs
    from scrcl_cli.preprocessing import prepare

    out = prep_dir(args, n)
    if (out / "done.json").exists():
        return json.loads((out / "done.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    t = {}
    t0 = time.perf_counter()
    src = make_large.load_source(args.source)
    x, _labels = make_large.resample(src, n, args.seed)  # labels unused: training reads none
    t["resample_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    prep = prepare(x, src.var_names, n_top_genes=args.n_top_genes, input_mode="lognorm")
    t["prepare_s"] = time.perf_counter() - t0
    knn_dev = None
    if args.device == "cuda":
        import torch

        knn_dev = torch.device("cuda")
    t0 = time.perf_counter()
    adj = graphs.cell_graph(prep.lognorm, args.n_neighbors, device=knn_dev)
    t["cell_graph_s"] = time.perf_counter() - t0
    a_hat = graphs.gcn_norm(adj)
    t0 = time.perf_counter()
    gene_prop = graphs.gene_graph(prep.model_input, 5)
    t["gene_graph_s"] = time.perf_counter() - t0
    for name, m in (("model_input", prep.model_input), ("adj", adj), ("a_hat", a_hat), ("gene_prop", gene_prop)):
        sp.save_npz(out / f"{name}.npz", sp.csr_matrix(m), compressed=False)
    info = {"n": int(prep.model_input.shape[0]), "genes": int(prep.model_input.shape[1]), "edges": int(adj.nnz // 2),
            "mean_degree": float(adj.nnz / adj.shape[0]), "nnz_x": int(prep.model_input.nnz),
            **{k: round(v, 3) for k, v in t.items()}, "prep_peak_rss": rss_peak()}
    assert np.all(adj.diagonal() == 0)
    (out / "done.json").write_text(json.dumps(info))
    return info


# ------------------------------------------------------------------ measured child

def warm_up_libraries(dev: Any) -> None:
    """Run both loss forms and a sparse product on 16 cells, so thread pools and kernels exist."""
    import numpy as np
    import torch

    from benchmarks.dense_losses import dense_scrcl_loss
    from scrcl_cli.graphs import knn_to_adjacency
    from scrcl_cli.losses import scrcl_loss
    from scrcl_cli.model import to_torch_sparse

    adj = knn_to_adjacency(np.array([[(i + 1) % 16, (i + 2) % 16] for i in range(16)]))
    xs = [torch.randn(16, d, device=dev, requires_grad=True) for d in (8, 8, 4, 4)]
    hp = dict(temperature=0.1, lambda1=1.0, lambda2=1.0)
    scrcl_loss(*xs, to_torch_sparse(adj, dev), **hp).total.backward()
    dense_scrcl_loss(*xs, torch.from_numpy(adj.toarray()).to(dev), **hp).backward()


def do_child(args: argparse.Namespace, n: int, impl: str, part: str) -> dict[str, Any]:
    import numpy as np
    import scipy.sparse as sp
    import torch
    import torch.nn.functional as F

    from benchmarks.dense_losses import dense_scrcl_loss
    from scrcl_cli.losses import scrcl_loss
    from scrcl_cli.model import ScRCL, to_torch_sparse

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    hp = dict(temperature=0.1, lambda1=100.0, lambda2=1.0)  # init_config_sc
    warm_up_libraries(dev)  # one-time lazy initialisation is not memory that grows with N
    base_rss = rss_now()
    base_gpu = torch.cuda.memory_allocated(dev) if cuda else 0
    d = prep_dir(args, n)
    adj = sp.load_npz(d / "adj.npz").tocsr()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(dev)

    def dense_adj() -> torch.Tensor:
        a = torch.zeros(n, n, dtype=torch.float32, device=dev)
        coo = adj.tocoo()
        a[torch.from_numpy(coo.row.astype(np.int64)).to(dev), torch.from_numpy(coo.col.astype(np.int64)).to(dev)] = 1.0
        return a

    if part == "step":
        from scrcl_cli.graphs import smooth_powers

        x = sp.load_npz(d / "model_input.npz")
        g = x.shape[1]
        a_hat_sp = sp.load_npz(d / "a_hat.npz").tocsr()
        # Smoothing as training.build_inputs does; x1 is x0 when t0 == t1.
        smoothed = smooth_powers(sp.csr_matrix(x, dtype=np.float32), a_hat_sp, (args.t0, args.t1))
        x0 = torch.from_numpy(smoothed[args.t0]).to(dev)
        x1 = x0 if args.t0 == args.t1 else torch.from_numpy(smoothed[args.t1]).to(dev)
        del x, smoothed
        a_hat = to_torch_sparse(a_hat_sp, dev)
        gene_prop = to_torch_sparse(sp.load_npz(d / "gene_prop.npz"), dev)
        model = ScRCL(g, n, args.hidden_dim, args.out_dim, 0.3, args.seed).to(dev)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=0.1)
        gen = torch.Generator(device=dev).manual_seed(args.seed + 1)
        adj_t = dense_adj() if impl == "dense" else to_torch_sparse(adj, dev)
        model.train()

        def run() -> float:
            opt.zero_grad(set_to_none=True)
            out = model(x0, x1, a_hat, gene_prop, gen)
            if impl == "dense":
                loss = dense_scrcl_loss(out.h1, out.h2, out.z1, out.z2, adj_t, **hp)
            else:
                loss = scrcl_loss(out.h1, out.h2, out.z1, out.z2, adj_t, **hp).total
            loss.backward()
            opt.step()
            return float(loss.detach())
    else:
        g = 0
        gen = torch.Generator(device=dev).manual_seed(args.seed)
        h1, h2 = (torch.randn(n, args.hidden_dim, generator=gen, device=dev).requires_grad_() for _ in range(2))
        z1, z2 = (F.normalize(torch.randn(n, args.out_dim, generator=gen, device=dev), dim=1).requires_grad_()
                  for _ in range(2))
        sync()
        base_rss = rss_now()  # the loss part counts only what the adjacency and the loss add
        base_gpu = torch.cuda.memory_allocated(dev) if cuda else 0
        if cuda:
            torch.cuda.reset_peak_memory_stats(dev)
        adj_t = dense_adj() if impl == "dense" else to_torch_sparse(adj, dev)

        def run() -> float:
            for v in (h1, h2, z1, z2):
                v.grad = None
            if impl == "dense":
                loss = dense_scrcl_loss(h1, h2, z1, z2, adj_t, **hp)
            else:
                loss = scrcl_loss(h1, h2, z1, z2, adj_t, **hp).total
            loss.backward()
            return float(loss.detach())

    sync()
    loaded_rss = rss_now()
    loaded_gpu = torch.cuda.memory_allocated(dev) if cuda else 0
    times, losses = [], []
    # One warm-up step, then up to --steps timed ones while they fit in --step-budget-s (at least one).
    while len(times) < 1 + args.steps and (len(times) < 2 or sum(times[1:]) < args.step_budget_s):
        sync()
        t0 = time.perf_counter()
        losses.append(run())
        sync()
        times.append(time.perf_counter() - t0)
    res: dict[str, Any] = {
        "n": n, "impl": impl, "part": part, "status": "ok", "genes": g, "hidden_dim": args.hidden_dim,
        "out_dim": args.out_dim, "device": args.device, "step_s": float(np.median(times[1:])),
        "first_step_s": times[0], "step_times_s": times[1:], "n_timed": len(times) - 1, "loss_values": losses,
        "peak_rss": rss_peak(), "base_rss": base_rss, "loaded_rss": loaded_rss,
        "torch_threads": torch.get_num_threads(), "loadavg_end": loadavg(),
    }
    if cuda:
        res["peak_gpu"] = torch.cuda.max_memory_allocated(dev)
        res["base_gpu"], res["loaded_gpu"] = base_gpu, loaded_gpu
        res["mem"] = res["peak_gpu"] - base_gpu
        res["gpu_name"] = torch.cuda.get_device_name(dev)
    else:
        res["mem"] = res["peak_rss"] - base_rss
    if not all(np.isfinite(losses)):
        res["status"] = "nonfinite"
    return res


# ------------------------------------------------------------------ parent

def run_sub(argv: list[str], args: argparse.Namespace) -> dict[str, Any]:
    env = {"MALLOC_MMAP_THRESHOLD_": str(args.malloc_mmap_threshold)} if args.malloc_mmap_threshold else None
    g = run_guarded(module_cmd(__name__, *argv), timeout=args.child_timeout,
                    rss_limit=args.rss_limit, env=env)
    out = g.last_json() if g.returncode == 0 else None
    if out is not None:
        out["wall_s"] = round(g.wall_s, 2)
        return out
    return {"status": g.status(), "error": g.error_line(), "wall_s": round(g.wall_s, 2), "peak_rss": g.peak_rss}


def fit_slope(xs: list[float], ys: list[float]) -> float | None:
    import numpy as np

    pts = [(x, y) for x, y in zip(xs, ys) if y and y > 0]
    if len(pts) < 2:
        return None
    lx, ly = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    return float(np.polyfit(lx, ly, 1)[0])


def mib(b: float | None) -> str:
    return "–" if b is None else f"{b / 2**20:,.0f}"


def render(results: list[dict[str, Any]], preps: dict[int, dict[str, Any]], args: argparse.Namespace,
           meta: dict[str, Any]) -> str:
    cuda = args.device == "cuda"
    peak_key = "peak_gpu" if cuda else "peak_rss"
    peak_name = "peak GPU alloc" if cuda else "peak RSS"
    sizes = sorted(preps)
    by = {(r["n"], r["impl"], r["part"]): r for r in results}
    notes: list[str] = []
    lines = [
        f"Device: {meta['device']}; torch {meta['torch']} ({meta['threads']} threads); "
        f"G = {meta['genes']} genes, H = {args.hidden_dim}, O = {args.out_dim}, k = {args.n_neighbors}, "
        f"t0 = {args.t0}, t1 = {args.t1}; "
        f"source {Path(args.source).name}, seed {args.seed}; time = median of up to {args.steps} timed steps "
        f"(fewer once they pass {args.step_budget_s:g} s, at least 1) after 1 warm-up step.",
        "",
        f"**Training step** (forward + backward + Adam). mem = {peak_name} minus the "
        f"{'allocation' if cuda else 'RSS'} before loading the data; MiB.",
        "",
        f"| N | edges | ours {peak_name} | ours mem | ours s/step | dense {peak_name} | dense mem | dense s/step "
        "| dense/ours mem | dense/ours time |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(r: dict[str, Any] | None, key: str, fmt: str) -> str:
        if r is None:
            return "not run"
        if r.get("status") != "ok":
            if r["status"] not in notes:
                notes.append(r["status"])
            return r["status"].split(":")[0].split(" (")[0] + f" [{notes.index(r['status']) + 1}]"
        return fmt.format(r[key]) if key in ("step_s",) else mib(r[key])

    for n in sizes:
        o, dn = by.get((n, "ours", "step")), by.get((n, "dense", "step"))
        ok = o and dn and o.get("status") == "ok" and dn.get("status") == "ok"
        ratio_m = f"{dn['mem'] / o['mem']:.1f}×" if ok else "–"
        ratio_t = f"{dn['step_s'] / o['step_s']:.1f}×" if ok else "–"
        lines.append(f"| {n:,} | {preps[n].get('edges', 0):,} | {cell(o, peak_key, '')} | {cell(o, 'mem', '')} | "
                     f"{cell(o, 'step_s', '{:.3f}')} | {cell(dn, peak_key, '')} | {cell(dn, 'mem', '')} | "
                     f"{cell(dn, 'step_s', '{:.3f}')} | {ratio_m} | {ratio_t} |")
    if "loss" in args.parts:
        lines += ["", "**Losses alone** (forward + backward of the objective on (N, H) and (N, O) view outputs, "
                  "real graph). mem = what the adjacency and the loss add; MiB.", "",
                  "| N | ours mem | ours s | dense mem | dense s | dense/ours mem | dense/ours time |",
                  "|---|---|---|---|---|---|---|"]
        for n in sizes:
            o, dn = by.get((n, "ours", "loss")), by.get((n, "dense", "loss"))
            ok = o and dn and o.get("status") == "ok" and dn.get("status") == "ok"
            rm = f"{dn['mem'] / o['mem']:.0f}×" if ok else "–"
            rt = f"{dn['step_s'] / o['step_s']:.0f}×" if ok else "–"
            lines.append(f"| {n:,} | {cell(o, 'mem', '')} | {cell(o, 'step_s', '{:.4f}')} | {cell(dn, 'mem', '')} | "
                         f"{cell(dn, 'step_s', '{:.4f}')} | {rm} | {rt} |")
    if notes:
        lines += [""] + [f"[{i + 1}] {t}" for i, t in enumerate(notes)]
    lines += ["", "**Log-log slopes against N** (least squares over the sizes that ran):", "",
              "| configuration | sizes | slope of mem | slope of time | mem slope, two largest N | "
              "time slope, two largest N |", "|---|---|---|---|---|---|"]

    def fmt(v: float | None) -> str:
        return "–" if v is None else f"{v:.2f}"

    for part in args.parts:
        for impl in args.impls:
            rs = sorted((r for r in results if r["impl"] == impl and r["part"] == part and r.get("status") == "ok"),
                        key=lambda r: r["n"])
            ns = [r["n"] for r in rs]
            sm, st = fit_slope(ns, [r["mem"] for r in rs]), fit_slope(ns, [r["step_s"] for r in rs])
            sm2 = fit_slope(ns[-2:], [r["mem"] for r in rs[-2:]])
            st2 = fit_slope(ns[-2:], [r["step_s"] for r in rs[-2:]])
            rng = f"{min(ns):,}–{max(ns):,}" if ns else "–"
            lines.append(f"| {impl} {part} | {rng} | {fmt(sm)} | {fmt(st)} | {fmt(sm2)} | {fmt(st2)} |")
    loads = [r["loadavg_end"] for r in results if "loadavg_end" in r]
    if loads:
        lines += ["", f"1-min load average at the end of the measured children: {min(loads):.1f}–{max(loads):.1f} "
                      f"(machine with {os.cpu_count()} cores; above that, other work shared the CPU)."]
    lines += ["", "Data preparation per N (not part of the step; cached across runs): "
              + "; ".join(f"{n:,}: resample {p.get('resample_s', 0):.1f} s, prepare {p.get('prepare_s', 0):.1f} s, "
                          f"cell graph {p.get('cell_graph_s', 0):.1f} s, gene graph {p.get('gene_graph_s', 0):.1f} s"
                          for n, p in sorted(preps.items()) if p)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--sizes", default=None, help="comma-separated N (default 2000,4000,8000,16000 on CPU)")
    ap.add_argument("--hidden-dim", type=int, default=256, help="H (reference 1500; reduced on CPU)")
    ap.add_argument("--out-dim", type=int, default=16)
    ap.add_argument("--n-top-genes", type=int, default=2000)
    ap.add_argument("--t0", type=int, default=TrainConfig.t0, help="smoothing steps of the MLP input (package default)")
    ap.add_argument("--t1", type=int, default=TrainConfig.t1, help="smoothing steps of the GCN input (package default)")
    ap.add_argument("--n-neighbors", type=int, default=15)
    ap.add_argument("--steps", type=int, default=2, help="at most this many timed steps after one warm-up step")
    ap.add_argument("--step-budget-s", type=float, default=30.0,
                    help="stop timing further steps once the timed ones took this long (at least one is timed)")
    ap.add_argument("--malloc-mmap-threshold", type=int, default=1 << 20,
                    help="MALLOC_MMAP_THRESHOLD_ for the CPU children (0: glibc default); see the module doc")
    ap.add_argument("--impls", default="ours,dense")
    ap.add_argument("--parts", default="loss,step", help="loss first: its dense/ours gap predicts the step's memory")
    ap.add_argument("--dense-max", type=int, default=None, help="largest N tried for dense (default: all sizes)")
    ap.add_argument("--mem-guard", type=float, default=0.7,
                    help="CPU: skip a run whose predicted memory exceeds this fraction of MemAvailable")
    ap.add_argument("--child-timeout", type=float, default=900.0)
    ap.add_argument("--rss-limit-gib", type=float, default=None,
                    help="kill a child whose RSS passes this (default: half of the memory available at start)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in the children (0: torch default)")
    ap.add_argument("--source", default=str(make_large.DEFAULT_SOURCE))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="write every result as JSON lines here")
    ap.add_argument("--md", type=Path, default=None, help="write the markdown tables here")
    ap.add_argument("--_prep", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_child", nargs=3, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.impls = args.impls.split(",")
    args.parts = args.parts.split(",")
    args.rss_limit = int(args.rss_limit_gib * 2**30) if args.rss_limit_gib else default_rss_limit()
    if args._prep is not None:
        print(json.dumps(do_prep(args, args._prep)))
        return
    if args._child is not None:
        n, impl, part = int(args._child[0]), args._child[1], args._child[2]
        print(json.dumps(do_child(args, n, impl, part)))
        return

    import torch

    from benchmarks.dense_losses import check_parity

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no CUDA device")
    sizes = [int(s) for s in (args.sizes or "2000,4000,8000,16000").split(",")]
    parity = check_parity()
    meta = {"device": (f"cuda ({torch.cuda.get_device_name(0)})" if args.device == "cuda"
                       else f"cpu ({cpu_name()}, {os.cpu_count()} cores)"),
            "torch": torch.__version__, "threads": args.threads or torch.get_num_threads(),
            "python": platform.python_version(), "parity_dense_vs_ours_max_rel": parity}
    print(f"# {meta['device']}; dense vs ours parity (float64, N=300): max rel diff {parity:.1e}", flush=True)
    if parity > 1e-6:
        raise SystemExit("error: the dense and linear losses disagree; the comparison would be meaningless")
    child_common = ["--device", args.device, "--hidden-dim", str(args.hidden_dim), "--out-dim", str(args.out_dim),
                    "--t0", str(args.t0), "--t1", str(args.t1),
                    "--n-top-genes", str(args.n_top_genes), "--n-neighbors", str(args.n_neighbors),
                    "--steps", str(args.steps), "--threads", str(args.threads), "--source", args.source,
                    "--seed", str(args.seed)]
    WORKDIR.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    preps: dict[int, dict[str, Any]] = {}
    stopped: dict[tuple[str, str], str] = {}
    last_ok: dict[tuple[str, str], dict[str, Any]] = {}
    jf = args.json.open("w") if args.json else None
    t_all = time.perf_counter()
    for n in sizes:
        runnable = [(i, p) for p in args.parts for i in args.impls if (i, p) not in stopped
                    and not (i == "dense" and args.dense_max and n > args.dense_max)]
        if not runnable:
            print(f"N={n:,}: nothing left to run ({'; '.join(sorted(set(stopped.values())))})", flush=True)
            for part in args.parts:
                for impl in args.impls:
                    results.append({"n": n, "impl": impl, "part": part,
                                    "status": f"not run ({stopped.get((impl, part), 'N > --dense-max')})"})
            preps[n] = {}
            continue
        cached = prep_dir(args, n) / "done.json"
        if cached.exists():
            prep = {**json.loads(cached.read_text()), "wall_s": 0.0, "cached": True}
        else:
            prep = run_sub(["--_prep", str(n), *child_common], args)
        if "edges" not in prep:
            print(f"N={n}: data preparation {prep.get('status')}: {prep.get('error', '')}", flush=True)
            break
        preps[n] = prep
        meta["genes"] = prep["genes"]
        print(f"N={n:,}: {prep['genes']} genes, {prep['edges']:,} edges (mean degree {prep['mean_degree']:.1f}); "
              + ("prep cached" if prep.get("cached") else f"prep {prep.get('wall_s', 0):.1f} s"), flush=True)
        for part in args.parts:
            for impl in args.impls:
                key = (impl, part)
                if key in stopped:
                    r = {"n": n, "impl": impl, "part": part, "status": f"not run ({stopped[key]})"}
                elif impl == "dense" and args.dense_max and n > args.dense_max:
                    r = {"n": n, "impl": impl, "part": part, "status": f"not run (N > --dense-max {args.dense_max})"}
                else:
                    r = None
                    prev = last_ok.get(key)
                    same_n = [last_ok.get((i, "loss")) for i in ("dense", "ours")] + [last_ok.get(("ours", "step"))]
                    if (args.device == "cpu" and impl == "dense" and part == "step"
                            and all(r is not None and r["n"] == n for r in same_n)):
                        # ours' step plus what the dense losses add over ours at this very N
                        prev = {"n": n, "base_rss": same_n[2]["base_rss"],
                                "mem": same_n[2]["mem"] + same_n[0]["mem"] - same_n[1]["mem"]}
                    if args.device == "cpu" and prev is not None:
                        expo = 1.0 if prev["n"] == n else (2.0 if impl == "dense" else 1.2)
                        pred = prev["mem"] * (n / prev["n"]) ** expo + prev["base_rss"]
                        cap = min(args.rss_limit, args.mem_guard * mem_available())
                        if pred > cap:
                            r = {"n": n, "impl": impl, "part": part,
                                 "status": f"skipped: predicted {pred / 2**30:.1f} GiB > {cap / 2**30:.1f} GiB "
                                           "allowed on this machine"}
                    if r is None:
                        r = run_sub(["--_child", str(n), impl, part, *child_common], args)
                        r.update({"n": n, "impl": impl, "part": part})
                if r.get("status") == "ok":
                    last_ok[key] = r
                    peak = r.get("peak_gpu", r["peak_rss"])
                    print(f"  {impl:5s} {part:4s}: {r['step_s']:.4f} s/step, peak {mib(peak)} MiB, "
                          f"mem {mib(r['mem'])} MiB (child wall {r.get('wall_s', 0):.0f} s)", flush=True)
                else:
                    print(f"  {impl:5s} {part:4s}: {r['status']} {r.get('error', '')}", flush=True)
                    if not r["status"].startswith("not run"):
                        stopped[key] = f"{r['status'].split(':')[0]} at N={n:,}"
                results.append(r)
                if jf:
                    jf.write(json.dumps({**r, "meta": meta}) + "\n")
                    jf.flush()
    if jf:
        jf.close()
    md = render(results, preps, args, meta)
    md += f"\nTotal wall time of this run: {time.perf_counter() - t_all:.0f} s.\n"
    emit_markdown(md, args.md)


if __name__ == "__main__":
    main()
