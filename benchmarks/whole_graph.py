"""Peak memory and time of the whole-graph pass after training: one forward call vs `embed_streamed`.

After training, every cell's embedding is computed on the whole graph. In memory that is one
forward call of the model (`training._whole_graph_in_memory`), which holds several (N, H) arrays
at once; out of core it is `training.embed_streamed`, which reads the smoothed inputs a row block
at a time and holds one (N, H) array. Both run here on the same real cells, resampled to N
(`make_large.py`), preprocessed and with their graphs built as `scaling` does (its cache in
$SCRCL_BENCH_DIR is shared), and on the same randomly initialised model (the weights' values do
not change the cost). The smoothed inputs Â^t0 X, Â^t1 X and Â^(t1+1) X are written once per N to
memory-mapped files, which both variants read in place.

Each (N, variant) runs in a fresh child. Memory on the CPU: ``mem`` is the child's peak anonymous
memory (RssAnon polled by the parent; file pages of the memory-mapped inputs are not counted)
minus its anonymous memory once the model and graphs are loaded. On CUDA: the peak allocation
minus the allocation before the pass (torch.cuda.max_memory_allocated). Log-log slopes of mem
against N per variant.

Usage (the run and its exact command are in docs/benchmarks.md):
    python -m benchmarks whole-graph --sizes 50000,100000,200000 --threads 2 --md bench/whole_graph.md
GPU host:
    python -m benchmarks whole-graph --device cuda --sizes 100000,400000,1000000
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from benchmarks import make_large, train_memory
from benchmarks.benchutil import cpu_name, default_rss_limit, emit_markdown, loadavg, module_cmd, rss_now, run_guarded
from scrcl_cli.config import TrainConfig

VARIANTS = ("one-call", "streamed")


def smoothed_dir(args: argparse.Namespace, n: int) -> Path:
    return train_memory.prep_dir(args, n) / f"smoothed_t{args.t0}_{args.t1}"


def do_smooth(args: argparse.Namespace, n: int) -> None:
    """Â^t X for t in t0, t1, t1 + 1 as memory-mapped .npy files beside the cached graphs."""
    import numpy as np
    import scipy.sparse as sp

    from scrcl_cli.graphs import smooth_powers

    out = smoothed_dir(args, n)
    if (out / "done").exists():
        return
    out.mkdir(parents=True, exist_ok=True)
    d = train_memory.prep_dir(args, n)
    x = sp.csr_matrix(sp.load_npz(d / "model_input.npz"), dtype=np.float32)
    a_hat = sp.load_npz(d / "a_hat.npz").tocsr()
    smooth_powers(x, a_hat, sorted({args.t0, args.t1, args.t1 + 1}), out_dir=out)
    (out / "done").write_text("")


def do_child(args: argparse.Namespace, n: int, variant: str) -> dict[str, Any]:
    import numpy as np
    import scipy.sparse as sp
    import torch

    from scrcl_cli.model import ScRCL, to_torch_sparse
    from scrcl_cli.training import _whole_graph_in_memory, embed_streamed

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    d, s = train_memory.prep_dir(args, n), smoothed_dir(args, n)

    def load(t: int) -> np.ndarray:
        return np.load(s / f"smoothed_t{t}.npy", mmap_mode="r")

    x0, x1, x_hop = load(args.t0), load(args.t1), load(args.t1 + 1)
    a_hat_sp = sp.load_npz(d / "a_hat.npz").tocsr()
    gene_prop = to_torch_sparse(sp.load_npz(d / "gene_prop.npz"), dev)
    model = ScRCL(x0.shape[1], n, args.hidden_dim, args.out_dim, 0.3, args.seed).to(dev).eval()
    if cuda:
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    base_gpu = torch.cuda.memory_allocated(dev) if cuda else 0
    base_anon = rss_now("self", "RssAnon")
    t0 = time.perf_counter()
    with torch.no_grad():
        if variant == "one-call":
            # As full-batch and in-memory mini-batch training hold them: the inputs on the device.
            x0_t = torch.from_numpy(np.ascontiguousarray(x0)).to(dev)
            x1_t = x0_t if args.t0 == args.t1 else torch.from_numpy(np.ascontiguousarray(x1)).to(dev)
            base_gpu = torch.cuda.memory_allocated(dev) if cuda else 0
            base_anon = rss_now("self", "RssAnon")
            t0 = time.perf_counter()
            whole = _whole_graph_in_memory(model(x0_t, x1_t, to_torch_sparse(a_hat_sp, dev), gene_prop), "gcn-pca")
        else:
            whole = embed_streamed(model, torch.from_numpy(x0), torch.from_numpy(x_hop), a_hat_sp, gene_prop, dev,
                                   "gcn-pca")
    if cuda:
        torch.cuda.synchronize(dev)
    res: dict[str, Any] = {"n": n, "variant": variant, "status": "ok", "seconds": round(time.perf_counter() - t0, 3),
                           "base_anon": base_anon, "embedding_shape": list(whole.embedding.shape),
                           "finite": bool(np.isfinite(whole.embedding).all()), "loadavg_end": loadavg()}
    if cuda:
        res["peak_gpu"] = torch.cuda.max_memory_allocated(dev)
        res["mem"] = res["peak_gpu"] - base_gpu
        res["gpu_name"] = torch.cuda.get_device_name(dev)
    return res


def run_child(args: argparse.Namespace, n: int, variant: str, common: list[str]) -> dict[str, Any]:
    g = run_guarded(module_cmd(__name__, "--_child", str(n), variant, *common), timeout=args.child_timeout,
                    rss_limit=args.rss_limit, poll_s=0.05)
    out = g.last_json() if g.returncode == 0 else None
    if out is None:
        return {"n": n, "variant": variant, "status": g.status(), "error": g.error_line()}
    out["peak_anon"] = g.peak_anon
    if args.device == "cpu":
        out["mem"] = g.peak_anon - out["base_anon"]
    return out


def render(results: list[dict[str, Any]], args: argparse.Namespace, device: str) -> str:
    mib = train_memory.mib
    what = "peak GPU allocation minus before the pass" if args.device == "cuda" else "peak anonymous memory minus before the pass"
    lines = [f"Device: {device}; H = {args.hidden_dim}, O = {args.out_dim}, t0 = {args.t0}, t1 = {args.t1}, "
             f"gcn-pca embedding; mem = {what}, MiB.", "",
             "| N | one-call mem | one-call s | streamed mem | streamed s | streamed / one-call mem | one (N, H) float32 |",
             "|---|---|---|---|---|---|---|"]
    by = {(r["n"], r["variant"]): r for r in results}
    for n in sorted({r["n"] for r in results}):
        one, st = by.get((n, "one-call"), {}), by.get((n, "streamed"), {})

        def cell(r: dict[str, Any], key: str) -> str:
            if r.get("status") != "ok":
                return r.get("status", "–")
            return mib(r[key]) if key == "mem" else f"{r[key]:.1f}"

        ratio = (f"{st['mem'] / one['mem']:.2f}" if one.get("status") == st.get("status") == "ok" and one["mem"] > 0
                 else "–")
        lines.append(f"| {n:,} | {cell(one, 'mem')} | {cell(one, 'seconds')} | {cell(st, 'mem')} | "
                     f"{cell(st, 'seconds')} | {ratio} | {mib(4 * n * args.hidden_dim)} |")
    lines.append("")
    for v in VARIANTS:
        pts = [(r["n"], r["mem"]) for r in results if r["variant"] == v and r.get("status") == "ok"]
        slope = train_memory.fit_slope([p[0] for p in pts], [p[1] for p in pts])
        lines.append(f"- {v}: log-log slope of mem against N {'–' if slope is None else f'{slope:.2f}'}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--sizes", default="50000,100000,200000")
    ap.add_argument("--hidden-dim", type=int, default=TrainConfig.hidden_dim)
    ap.add_argument("--out-dim", type=int, default=TrainConfig.out_dim)
    ap.add_argument("--n-top-genes", type=int, default=TrainConfig.n_top_genes)
    ap.add_argument("--n-neighbors", type=int, default=TrainConfig.n_neighbors)
    ap.add_argument("--t0", type=int, default=TrainConfig.t0)
    ap.add_argument("--t1", type=int, default=TrainConfig.t1)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--source", default=str(make_large.DEFAULT_SOURCE))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child-timeout", type=float, default=1800.0)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--md", type=Path, default=None)
    ap.add_argument("--_child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.rss_limit = default_rss_limit()
    if args._child is not None:
        print(json.dumps(do_child(args, int(args._child[0]), args._child[1])))
        return
    common = ["--device", args.device, "--hidden-dim", str(args.hidden_dim), "--out-dim", str(args.out_dim),
              "--n-top-genes", str(args.n_top_genes), "--n-neighbors", str(args.n_neighbors), "--t0", str(args.t0),
              "--t1", str(args.t1), "--threads", str(args.threads), "--source", args.source, "--seed", str(args.seed)]
    results: list[dict[str, Any]] = []
    jf = args.json.open("w") if args.json else None
    for n in (int(s) for s in args.sizes.split(",")):
        train_memory.WORKDIR.mkdir(parents=True, exist_ok=True)
        train_memory.do_prep(args, n)
        do_smooth(args, n)
        for variant in VARIANTS:
            r = run_child(args, n, variant, common)
            print(f"N={n:,} {variant}: {r.get('status')} mem {r.get('mem', 0) / 2**20:,.0f} MiB "
                  f"{r.get('seconds', 0):.1f} s {r.get('error', '')}", flush=True)
            results.append(r)
            if jf:
                jf.write(json.dumps(r) + "\n")
                jf.flush()
    if jf:
        jf.close()
    device = f"cpu ({cpu_name()}, {args.threads or 'default'} threads)" if args.device == "cpu" else "cuda"
    md = f"Command: `python -m benchmarks whole-graph {' '.join(argv) if argv else ''}`\n\n" + render(results, args, device)
    emit_markdown(md, args.md)


if __name__ == "__main__":
    main()
