"""Cells per second and peak memory of `scrcl-cli embed` against N: ONNX Runtime vs torch.

One small model is trained once (``scrcl-cli train`` on
pbmc_10x_4k_top2000 with the package's default options, H = 1500, O = 16, and reduced epochs,
5 by default: the weights' values do not change the cost of inference; ``--train-extra``
passes more train options, e.g. ``"--t0 0 --t1 0"`` for a model whose per-cell view needs no
graph) and reused (cached in the work folder; ``--model DIR`` uses an existing one). Query
files of N cells are resampled from the same real dataset (benchmarks/make_large.py, cached).
Every measurement runs in a fresh subprocess:

- ``cli``: the real command, ``scrcl-cli embed IN -m MODEL -o OUT --view V``, end to end
  (read, preprocess, graph, ONNX Runtime, write); wall time and peak RSS from os.wait4.
- ``ort`` / ``torch``: the same pipeline in-process with each phase timed: read and validate
  (scrcl_cli.data.read_h5ad_checked), prepare_query, query_graph (when the view needs it: the
  fused view always, the cell view when the model's t0 > 0), then
  scrcl_cli.inference.run_encoder (which also applies the graph smoothing Â^t0 / Â^t1 to the
  inputs) with either an ONNX Runtime session (inference.open_session, provider checked) or
  the torch modules the ONNX files are exported from (scrcl_cli.export.CellEncoder /
  FusedEncoder) behind the same ``run`` interface, so batching, graph and inputs are identical
  and only the runtime differs. No output is written. The embeddings of both are compared
  (max abs difference against ORT).

Peak RSS is ru_maxrss of the child (Linux), whole process, glibc defaults (what users get); on
CUDA the torch rows also give torch.cuda.max_memory_allocated. A child whose RSS passes
``--rss-limit-gib`` (default half the available memory) is killed and reported as such, and
larger N are then not run for that configuration. cells/s (encoder) = N / run_encoder seconds;
cells/s (embed) = N / (everything from reading the file to having the embedding, no write).

Usage (CPU; the runs and their commands are in docs/benchmarks.md):
    python -m benchmarks inference --md bench/inference.md
GPU host (from benchmarks/gpu_suite.sh): add ``--device cuda`` (CUDA provider verified).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

from benchmarks import make_large
from benchmarks.benchutil import cpu_name, default_rss_limit, emit_markdown, loadavg, module_cmd, rss_now, rss_peak, run_guarded

WORKDIR = Path(os.environ.get("SCRCL_BENCH_DIR", "bench"))


# ------------------------------------------------------------------ torch stand-in for an ORT session

class TorchSession:
    """The exported encoder's torch module behind ONNX Runtime's ``run(None, feeds)`` interface."""

    def __init__(self, bundle: Any, view: str, device: str) -> None:
        import io

        import torch

        from scrcl_cli.export import CellEncoder, FusedEncoder

        state = torch.load(io.BytesIO(bundle.read_bytes("weights.pt")), weights_only=True)
        gene_emb = state.pop("gene_emb").numpy()
        cls = CellEncoder if view == "cell" else FusedEncoder
        self.dev = torch.device(device)
        self.module = cls(state, gene_emb).eval().to(self.dev)
        self.names = ["x0"] if view == "cell" else ["x0", "xs", "nbr", "w"]
        self.torch = torch

    def run(self, _outputs: Any, feeds: dict[str, Any]) -> list[Any]:
        torch = self.torch
        with torch.inference_mode():
            args = [torch.from_numpy(feeds[k]).to(self.dev) for k in self.names]
            return [self.module(*args).cpu().numpy()]

    def get_providers(self) -> list[str]:
        return [f"torch-{self.dev.type}"]


# ------------------------------------------------------------------ children

def do_child(args: argparse.Namespace, n: int, view: str, backend: str) -> dict[str, Any]:
    import anndata  # noqa: F401  (imported before the clock starts, as the CLI has it loaded too)
    import numpy as np

    from scrcl_cli import bundle, inference
    from scrcl_cli.io import h5ad

    if backend == "torch":
        import torch  # imported up front: its import cost (memory, time) belongs to the torch path

        if args.threads:
            torch.set_num_threads(args.threads)
    base_rss = rss_now()
    t: dict[str, float] = {}
    bundle = bundle.read_bundle(Path(args.model))
    pre, params = bundle.manifest.preprocessing, bundle.manifest.graph
    t0 = time.perf_counter()
    adata = h5ad.read_h5ad_checked(query_path(args, n), expression=pre.expression)
    t["read_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    query = inference.prepare_query(adata, bundle, min_gene_overlap=0.5, name="query")
    t["prepare_s"] = time.perf_counter() - t1
    need_graph = view == "fused" or params.t0 > 0
    a_hat = None
    if need_graph:
        t1 = time.perf_counter()
        a_hat = inference.query_graph(query.lognorm, params)
        t["graph_s"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    if backend == "staged":  # the per-cell stages with the smoothing between them (scrcl_cli/stages.py)
        t["session_s"] = 0.0
        emb, provider = inference.run_staged_encoder(bundle, view, query.model_input, a_hat, params,
                                                     device=args.device, threads=args.threads,
                                                     batch_size=args.batch_size)
        t["encoder_s"] = time.perf_counter() - t1  # includes opening the stage sessions
    else:
        if backend == "ort":
            session, provider = inference.open_session(bundle, view, device=args.device, threads=args.threads)
        else:
            session = TorchSession(bundle, view, args.device)
            provider = session.get_providers()[0]
        t["session_s"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        emb = inference.run_encoder(session, view, query.model_input, a_hat, params, batch_size=args.batch_size)
        t["encoder_s"] = time.perf_counter() - t1
    t["embed_s"] = time.perf_counter() - t0
    out = WORKDIR / f"emb_{n}_{view}_{backend}_{args.device}.npy"
    np.save(out, emb)
    res: dict[str, Any] = {
        "n": n, "view": view, "backend": backend, "status": "ok", "provider": provider,
        **{k: round(v, 3) for k, v in t.items()},
        "cells_per_s_encoder": n / t["encoder_s"], "cells_per_s_embed": n / t["embed_s"],
        "peak_rss": rss_peak(), "base_rss": base_rss, "emb_file": str(out), "emb_shape": list(emb.shape),
        "finite": bool(np.isfinite(emb).all()), "loadavg_end": loadavg(),
    }
    if a_hat is not None:
        res["graph_nnz"] = int(a_hat.nnz)
    if backend == "torch" and args.device == "cuda":
        import torch

        res["peak_gpu"] = torch.cuda.max_memory_allocated()
    return res


def query_path(args: argparse.Namespace, n: int) -> Path:
    return WORKDIR / f"query_{Path(args.source).stem}_n{n}_s{args.seed}.h5ad"


# ------------------------------------------------------------------ parent

def ensure_model(args: argparse.Namespace) -> Path:
    if args.model:
        return Path(args.model)
    import shlex

    extra = shlex.split(args.train_extra)
    slug = "".join(c if c.isalnum() else "_" for c in "".join(extra))
    model = WORKDIR / f"model_{Path(args.source).stem}_e{args.train_epochs}_s{args.seed}{'_' + slug if slug else ''}"
    manifest_path = model / "scrcl_model.json"
    if manifest_path.exists() and not extra:
        # A cache from an older scrcl-cli may hold other defaults (e.g. t0 = 0): retrain then.
        from dataclasses import asdict

        from scrcl_cli.training import TrainConfig

        want = asdict(TrainConfig(epochs=args.train_epochs, seed=args.seed))
        if json.loads(manifest_path.read_text()).get("config") != want:
            print(f"cached {model.name} was trained with other defaults; retraining", flush=True)
            shutil.rmtree(model)
    if not manifest_path.exists():
        cmd = ["scrcl-cli", "train", str(args.source), "-o", str(model), "--epochs", str(args.train_epochs),
               "--seed", str(args.seed), "--device", "cpu" if args.device == "cpu" else "auto", "-q", *extra]
        print("training the benchmark model:", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    from scrcl_cli.bundle import FORMAT_VERSION

    if json.loads(manifest_path.read_text())["format_version"] < FORMAT_VERSION:
        # A cached model from an older scrcl-cli: same weights, encoders of the current format.
        subprocess.run(["scrcl-cli", "-q", "export", str(model)], check=True)
    return model


def run_cli(args: argparse.Namespace, n: int, view: str) -> dict[str, Any]:
    """The real command (`--command`: embed, or cluster onto the model's centroids with its marker
    table), end to end; peak RSS is the command's own ru_maxrss (os.wait4)."""
    out = WORKDIR / f"cli_out_{n}_{view}.h5ad"
    out.unlink(missing_ok=True)
    exe = shutil.which("scrcl-cli") or "scrcl-cli"
    cmd = [exe, args.command, str(query_path(args, n)), "-m", str(args.model), "-o", str(out), "--view", view,
           "--device", args.device, "--batch-size", str(args.batch_size), "-q"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    g = run_guarded(cmd, timeout=args.child_timeout, rss_limit=args.rss_limit)
    res: dict[str, Any] = {"status": g.status(), "wall_s": round(g.wall_s, 3), "cells_per_s_cli": n / g.wall_s,
                           "peak_rss": g.peak_rss, "cmd": " ".join(cmd[1:])}
    if res["status"] != "ok":
        res["error"] = g.error_line()
        return res
    import h5py

    with h5py.File(out, "r") as f:
        prov = f["uns/scrcl/provider"][()]
    res["provider"] = prov.decode() if isinstance(prov, bytes) else str(prov)
    out.unlink(missing_ok=True)
    for extra in WORKDIR.glob(f"{out.stem}*.csv"):  # cluster's marker table
        extra.unlink()
    return res


def run_sub(argv: list[str], args: argparse.Namespace) -> dict[str, Any]:
    g = run_guarded(module_cmd(__name__, *argv), timeout=args.child_timeout,
                    rss_limit=args.rss_limit)
    r = g.last_json() if g.returncode == 0 else None
    if r is not None:
        r["wall_s"] = round(g.wall_s, 2)
        return r
    return {"status": g.status(), "error": g.error_line(), "peak_rss": g.peak_rss, "wall_s": round(g.wall_s, 2)}


RUNTIME_NAMES = {"ort": "ONNX Runtime, one graph", "staged": "ONNX Runtime, staged (stages.py)", "torch": "torch"}


def mib(b: float | None) -> str:
    return "–" if b is None else f"{b / 2**20:,.0f}"


def render(rows: list[dict[str, Any]], meta: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        f"Device: {meta['device']}; onnxruntime {meta['onnxruntime']}, torch {meta['torch']}; model: "
        f"{meta['model_desc']}; batch size {args.batch_size}; queries resampled from {Path(args.source).name} "
        f"(seed {args.seed}); 1-min load average during the run {meta['load_min']:.1f}–{meta['load_max']:.1f}.",
        "",
        "| N | view | runtime | provider | read s | prepare s | graph s | encoder s | cells/s encoder | "
        "cells/s embed | peak RSS MiB | max abs diff vs ORT |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["kind"] == "cli":
            if r.get("status") != "ok":
                lines.append(f"| {r['n']:,} | {r['view']} | `scrcl-cli {args.command}` (ORT) | – | {r['status']} |"
                             f" | | | | | {mib(r.get('peak_rss'))} | |")
                continue
            lines.append(f"| {r['n']:,} | {r['view']} | `scrcl-cli {args.command}` end to end (ORT, incl. write) | "
                         f"{r['provider']} | | | | | | {r['cells_per_s_cli']:,.0f} (wall {r['wall_s']:.1f} s) | "
                         f"{mib(r.get('peak_rss'))} | |")
            continue
        if r.get("status") != "ok":
            lines.append(f"| {r['n']:,} | {r['view']} | {r['backend']} | – | {r['status']} | | | | | | "
                         f"{mib(r.get('peak_rss'))} | |")
            continue
        diff = r.get("max_abs_diff_vs_ort")
        lines.append(
            f"| {r['n']:,} | {r['view']} | {RUNTIME_NAMES.get(r['backend'], r['backend'])} | {r['provider']} | "
            f"{r['read_s']:.1f} | {r['prepare_s']:.1f} | {r.get('graph_s', 0):.1f} | {r['encoder_s']:.1f} | "
            f"{r['cells_per_s_encoder']:,.0f} | {r['cells_per_s_embed']:,.0f} | {mib(r['peak_rss'])} | "
            f"{'' if diff is None else f'{diff:.1e}'} |")
    # speed ratios and fits
    import numpy as np

    lines += ["", "torch / ORT encoder time (same run): " + "; ".join(
        f"{r['n']:,} {r['view']}: {r['encoder_s'] / o['encoder_s']:.2f}×"
        for r in rows if r["kind"] == "child" and r["backend"] == "torch" and r.get("status") == "ok"
        for o in rows if o["kind"] == "child" and o["backend"] == "ort" and o.get("status") == "ok"
        and o["n"] == r["n"] and o["view"] == r["view"])]
    fits = []
    for view in args.views:
        for backend in args.backends:
            rs = [r for r in rows if r["kind"] == "child" and r.get("status") == "ok" and r["view"] == view
                  and r["backend"] == backend]
            if len(rs) >= 2:
                ln = np.log([r["n"] for r in rs])
                sm = np.polyfit(ln, np.log([r["peak_rss"] for r in rs]), 1)[0]
                st = np.polyfit(ln, np.log([r["embed_s"] for r in rs]), 1)[0]
                se = np.polyfit(ln, np.log([r["encoder_s"] for r in rs]), 1)[0]
                fits.append(f"{view}/{backend}: peak RSS {sm:.2f}, embed time {st:.2f}, encoder time {se:.2f}")
        rs = [r for r in rows if r["kind"] == "cli" and r.get("status") == "ok" and r["view"] == view]
        if len(rs) >= 2:
            ln = np.log([r["n"] for r in rs])
            sm = np.polyfit(ln, np.log([r["peak_rss"] for r in rs]), 1)[0]
            st = np.polyfit(ln, np.log([r["wall_s"] for r in rs]), 1)[0]
            fits.append(f"{view}/scrcl-cli {args.command}: peak RSS {sm:.2f}, wall time {st:.2f}")
    if fits:
        lines += ["", "Log-log slopes against N: " + "; ".join(fits) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--sizes", default="10000,50000,200000")
    ap.add_argument("--views", default="cell,fused")
    ap.add_argument("--backends", default="ort,staged",
                    help="ort: the one-graph ONNX encoder (run_encoder); staged: the per-cell stages with the "
                         "smoothing between them (what embed runs for a gcn-pca model); torch: the exported modules; "
                         "none: only the cli rows")
    ap.add_argument("--cli", choices=["yes", "no"], default="yes", help="also time the real scrcl-cli command")
    ap.add_argument("--command", choices=["embed", "cluster"], default="embed",
                    help="the command the cli rows time (cluster: onto the model's centroids, with its marker table)")
    ap.add_argument("--model", default=None, help="model directory (default: train one, cached in the work folder)")
    ap.add_argument("--train-epochs", type=int, default=5)
    ap.add_argument("--train-extra", default="", help='more scrcl-cli train options, e.g. "--t0 0 --t1 0"')
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--child-timeout", type=float, default=1200.0)
    ap.add_argument("--rss-limit-gib", type=float, default=None,
                    help="kill a child whose RSS passes this (default: half of the memory available at start)")
    ap.add_argument("--source", default=str(make_large.DEFAULT_SOURCE))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--md", type=Path, default=None)
    ap.add_argument("--_child", nargs=3, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.views = args.views.split(",")
    args.backends = [b for b in args.backends.split(",") if b not in ("", "none")]  # none: the cli rows only
    args.rss_limit = int(args.rss_limit_gib * 2**30) if args.rss_limit_gib else default_rss_limit()
    if args._child:
        print(json.dumps(do_child(args, int(args._child[0]), args._child[1], args._child[2])))
        return

    import numpy as np
    import onnxruntime as ort

    WORKDIR.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    args.model = str(ensure_model(args))
    man = json.loads((Path(args.model) / "scrcl_model.json").read_text())
    tr = man["training"]
    try:
        import torch

        torch_v = torch.__version__
        gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else None
    except ImportError:
        torch_v, gpu = "not installed", None
    meta = {"device": f"cuda ({gpu})" if gpu else f"cpu ({cpu_name()}, {os.cpu_count()} cores)",
            "onnxruntime": ort.__version__, "torch": torch_v,
            "model_desc": f"{man['config']['epochs']} epochs on {tr['n_cells']} cells of {Path(args.source).name} "
                          f"(H = {man['model']['hidden_dim']}, O = {man['model']['out_dim']}, G = {len(man['genes'])}, "
                          f"{tr['seconds'] / man['config']['epochs']:.2f} s/epoch on {tr['device']})",
            "model": args.model}
    print("#", meta["device"], "|", meta["model_desc"], flush=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    src = None
    rows: list[dict[str, Any]] = []
    loads = [loadavg()]
    stopped: dict[tuple[str, str, str], str] = {}
    jf = args.json.open("w") if args.json else None
    for n in sizes:
        q = query_path(args, n)
        if not q.exists():
            src = src or make_large.load_source(args.source)
            info = make_large.write_resampled(src, n, q, args.seed)
            print(f"wrote {q} ({info['nnz']:,} nonzeros, {info['seconds']} s)", flush=True)
        for view in args.views:
            kinds = [("child", b) for b in args.backends] + ([("cli", "ort")] if args.cli == "yes" else [])
            for kind, backend in kinds:
                key = (kind, view, backend)
                ort_same_n = next((r for r in rows if r["kind"] == "child" and r["n"] == n and r["view"] == view
                                   and r["backend"] == "ort"), None)
                if key in stopped:
                    r = {"status": f"not run ({stopped[key]})"}
                elif kind == "cli" and ort_same_n is not None and ort_same_n.get("status") != "ok":
                    r = {"status": "not run (the in-process ONNX Runtime run of the same pipeline failed)"}
                elif kind == "cli":
                    r = run_cli(args, n, view)
                else:
                    r = run_sub(["--_child", str(n), view, backend, "--device", args.device, "--model", args.model,
                                 "--batch-size", str(args.batch_size), "--threads", str(args.threads), "--source",
                                 args.source, "--seed", str(args.seed)], args)
                r.update({"kind": kind, "n": n, "view": view, "backend": backend})
                rows.append(r)
                name = "cli" if kind == "cli" else backend
                if r.get("status") == "ok":
                    loads.append(r.get("loadavg_end", loadavg()))
                    if kind == "cli":
                        print(f"N={n:,} {view:5s} cli   : {r['wall_s']:.1f} s ({r['cells_per_s_cli']:,.0f} cells/s), "
                              f"peak {mib(r['peak_rss'])} MiB, {r['provider']}", flush=True)
                    else:
                        print(f"N={n:,} {view:5s} {name:6s}: encoder {r['encoder_s']:.1f} s "
                              f"({r['cells_per_s_encoder']:,.0f} cells/s), embed {r['embed_s']:.1f} s "
                              f"({r['cells_per_s_embed']:,.0f} cells/s), peak {mib(r['peak_rss'])} MiB, "
                              f"{r['provider']}", flush=True)
                else:
                    print(f"N={n:,} {view:5s} {name:6s}: {r['status']} {r.get('error', '')}", flush=True)
                    if not r["status"].startswith("not run"):
                        stopped[key] = f"{r['status'].split(':')[0].split(' after')[0]} at N={n:,}"
            ref = next((r for r in rows if r["kind"] == "child" and r["n"] == n and r["view"] == view
                        and r["backend"] == "ort" and r.get("status") == "ok"), None)
            if ref is not None:
                e_ref = np.load(ref["emb_file"])
                for r in rows:
                    if r["kind"] == "child" and r["n"] == n and r["view"] == view and r.get("status") == "ok":
                        r["max_abs_diff_vs_ort"] = float(np.abs(np.load(r["emb_file"]) - e_ref).max())
                        Path(r["emb_file"]).unlink(missing_ok=True)
    if jf:
        for r in rows:
            jf.write(json.dumps({**r, "meta": meta}) + "\n")
        jf.close()
    meta["load_min"], meta["load_max"] = min(loads), max(loads)
    md = render(rows, meta, args) + f"\nTotal wall time of this run: {time.perf_counter() - t_all:.0f} s.\n"
    emit_markdown(md, args.md)


if __name__ == "__main__":
    main()
