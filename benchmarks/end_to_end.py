"""End to end against N : `scrcl-cli train` then `scrcl-cli cluster`.

For each N, cells of a real dataset are resampled to N (`make_large.py`: every cell a real cell
with fresh multinomial noise at its own library size), then the two CLI commands run as child
processes exactly as a user types them, each timed and with its peak RSS read by the runner.
The label-free clusters of `train` are scored against the resampled cells' source labels
(evaluation only; nothing reaches the CLI but X). The log-log slope of time and memory against N
is fitted over the sizes that finished.

Usage:
    python -m benchmarks end-to-end                                   # CLI defaults (100 epochs, H 1500)
    python -m benchmarks end-to-end --sizes 1000,2000,4000,8000 --epochs 100 --hidden-dim 256 \\
        --threads 1 --md bench/e2e.md                            # what this CPU can do
    python -m benchmarks end-to-end --sizes 200000 --epochs 2 --hidden-dim 256 --threads 2 \
        --train-extra "--batch-size 20000" --train-extra "--batch-size 20000 --out-of-core"
                                                                 # out of core against in memory, same run

Each ``--train-extra`` (more train options, given as one string) is a variant run at every N on
the same resampled file; the slopes are fitted per variant.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent

from benchmarks import benchutil, make_large


def run_size(n: int, src: make_large.Source, args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    """Resample to n cells, then train and cluster once per variant; one result row each."""
    data = work / f"cells_{n}.h5ad"
    make_large.write_resampled(src, n, data, seed=args.seed)
    rows = [run_variant(n, data, extra, args, work) for extra in args.train_extra or [""]]
    data.unlink(missing_ok=True)
    return rows


def run_variant(n: int, data: Path, extra: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Train (with the `extra` options) and cluster `data`; one result row."""
    import shlex

    model, train_out, clustered = work / f"model_{n}", work / f"train_{n}.h5ad", work / f"cluster_{n}.h5ad"
    common = ["--seed", str(args.seed), "--threads", str(args.threads), "-q"]
    train = ["scrcl-cli", "train", str(data), "-o", str(model), "--out-h5ad", str(train_out), "--device", args.device,
             *common]
    if args.epochs:
        train += ["--epochs", str(args.epochs)]
    if args.hidden_dim:
        train += ["--hidden-dim", str(args.hidden_dim)]
    train += shlex.split(extra)
    # auto, not cuda: ONNX Runtime's CUDA provider is a separate package (onnxruntime-gpu), and a
    # torch-only GPU host should still time the CPU provider; the output records which one ran.
    cluster = ["scrcl-cli", "cluster", str(data), "-m", str(model), "-o", str(clustered),
               "--device", "cpu" if args.device == "cpu" else "auto", *common]
    row: dict[str, Any] = {"n": n, "variant": extra, "train_cmd": " ".join(train[1:]), "cluster_cmd": " ".join(cluster[1:])}
    for name, cmd in (("train", train), ("cluster", cluster)):
        g = benchutil.run_guarded(cmd, timeout=args.timeout, rss_limit=args.rss_limit, poll_s=0.2)
        row[f"{name}_status"] = g.status()
        row[f"{name}_s"] = round(g.wall_s, 2)
        row[f"{name}_peak_rss"] = g.peak_rss
        row[f"{name}_peak_anon"] = g.peak_anon
        if g.status() != "ok":
            row[f"{name}_error"] = g.error_line()
            break
    if row.get("train_status") == "ok":
        row.update(score(data, train_out, model))
    shutil.rmtree(model, ignore_errors=True)
    for f in (train_out, clustered, *work.glob(f"{clustered.stem}*.csv")):  # cluster writes a marker table too
        f.unlink(missing_ok=True)
    return row


def score(data: Path, out: Path, model: Path) -> dict[str, Any]:
    """ARI/NMI of train's label-free clusters against the source labels, and the K it chose."""
    import anndata as ad

    from scrcl_cli.bundle import read_manifest
    from scrcl_cli.metrics import evaluate

    truth = ad.read_h5ad(data, backed="r").obs["cell_type"].astype(str).to_numpy()
    pred = ad.read_h5ad(out, backed="r").obs["scrcl_cluster"].astype(str).to_numpy()
    m = evaluate(truth, pred)
    manifest = read_manifest(model)
    return {"ari": round(m["ari"], 4), "nmi": round(m["nmi"], 4), "k": manifest.clusters.n_clusters,
            "true_k": len(set(truth)), "epochs": manifest.config["epochs"],
            "hidden_dim": manifest.model.hidden_dim, "device": manifest.training["device"]}


def slope(rows: list[dict[str, Any]], key: str, variant: str = "") -> float | None:
    pts = [(r["n"], r[key]) for r in rows if r.get(key) and r.get("cluster_status") == "ok" and r.get("variant", "") == variant]
    if len(pts) < 2:
        return None
    return float(np.polyfit(np.log([p[0] for p in pts]), np.log([p[1] for p in pts]), 1)[0])


def markdown(rows: list[dict[str, Any]], command: str, args: argparse.Namespace) -> str:
    first = next((r for r in rows if "epochs" in r), {})
    L = [f"Command: `{command}`", "",
         f"Source {args.source.name} resampled to N, seed {args.seed}; scrcl-cli {first.get('epochs', '?')} epochs, "
         f"H {first.get('hidden_dim', '?')}, device {first.get('device', args.device)}, threads {args.threads}; "
         f"load average {benchutil.loadavg():.1f} at the end; {benchutil.cpu_name()}.", "",
         "| N | more train options | train s | train peak RSS MiB | train peak anonymous MiB | cluster s "
         "| cluster peak RSS MiB | train + cluster s | K (true) | ARI | NMI |",
         "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        opts = f"`{r['variant']}`" if r.get("variant") else "–"
        if r.get("cluster_status") != "ok":
            L.append(f"| {r['n']:,} | {opts} | {r.get('train_status')} {r.get('train_error', '')} | | | "
                     f"{r.get('cluster_status', '')} {r.get('cluster_error', '')} | | | | | |")
            continue
        L.append(f"| {r['n']:,} | {opts} | {r['train_s']:.1f} | {r['train_peak_rss'] / 2**20:,.0f} | "
                 f"{r.get('train_peak_anon', 0) / 2**20:,.0f} | {r['cluster_s']:.1f} | "
                 f"{r['cluster_peak_rss'] / 2**20:,.0f} | {r['train_s'] + r['cluster_s']:.1f} | {r['k']} ({r['true_k']}) | "
                 f"{r['ari']:.3f} | {r['nmi']:.3f} |")
    for variant in dict.fromkeys(r.get("variant", "") for r in rows):
        fits = {k: slope(rows, k, variant) for k in ("train_s", "train_peak_rss", "cluster_s", "cluster_peak_rss")}
        L += ["", f"Log-log slope against N{f' ({variant})' if variant else ''} (time or memory ∝ N^slope): "
              + ", ".join(f"{k} {v:.2f}" if v is not None else f"{k} –" for k, v in fits.items()) + "."]
    return "\n".join(L) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="2000,4000,8000,16000", help="comma-separated N")
    ap.add_argument("--source", type=Path, default=make_large.DEFAULT_SOURCE)
    ap.add_argument("--epochs", type=int, default=None, help="scrcl-cli --epochs (default: its own, 100)")
    ap.add_argument("--hidden-dim", type=int, default=None, help="scrcl-cli --hidden-dim (default: its own, 1500)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=6 * 3600.0, help="seconds per command")
    ap.add_argument("--train-extra", action="append", default=None,
                    help='more train options as one string, e.g. "--batch-size 20000 --out-of-core"; repeat for variants')
    ap.add_argument("--rss-limit", type=int, default=None, help="bytes (default: half the available memory)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--md", type=Path, default=None)
    args = ap.parse_args(argv)
    args.rss_limit = args.rss_limit or benchutil.default_rss_limit()
    import shlex

    command = "python -m benchmarks end-to-end " + shlex.join(sys.argv[1:] if argv is None else argv)
    src = make_large.load_source(args.source)
    rows = []
    with tempfile.TemporaryDirectory(prefix="scrcl-e2e-") as tmp:
        for n in (int(s) for s in args.sizes.split(",")):
            t = time.perf_counter()
            for row in run_size(n, src, args, Path(tmp)):
                rows.append(row)
                print(json.dumps(row), flush=True)
            print(f"N={n}: {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
            if args.json:
                args.json.write_text(json.dumps({"command": command, "rows": rows}, indent=1))
    benchutil.emit_markdown(markdown(rows, command, args), args.md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
