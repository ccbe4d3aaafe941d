"""The `scrcl-cli` command line: parse, call, report.

User errors (`ScrclError`) become one ``error: …`` line on stderr and exit code 1; usage
errors exit 2 (Click); an interrupt exits 130. Everything else is a bug and keeps its
traceback. Logs and progress go to stderr; stdout carries only what scripts read.
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from ._version import __version__
from .errors import ScrclError

log = logging.getLogger("scrcl_cli")

EXIT_CODES = """\b
Exit codes: 0 success, 1 bad input or environment (one 'error:' line on stderr),
2 bad command-line usage, 130 interrupted."""

TRAIN_EXAMPLES = f"""\b
Examples:
  scrcl-cli train pbmc.h5ad -o pbmc_model/
  scrcl-cli train pbmc.h5ad -o pbmc_model/ --out-h5ad pbmc_scrcl.h5ad --n-clusters 8
  scrcl-cli train atlas.h5ad -o atlas_model/ --device cuda --seed 1
  scrcl-cli train tpm.h5ad -o m/ --expression continuous --epochs 200

{EXIT_CODES}"""
EMBED_EXAMPLES = f"""\b
Examples:
  scrcl-cli embed query.h5ad -m pbmc_model/ -o query_scrcl.h5ad
  scrcl-cli embed query.h5ad -m pbmc_model/ -o q.h5ad --view cell --csv q_embedding.csv

{EXIT_CODES}"""
CLUSTER_EXAMPLES = f"""\b
Examples:
  scrcl-cli cluster query.h5ad -m pbmc_model/ -o query_clusters.h5ad
  scrcl-cli cluster query.h5ad -m pbmc_model/ -o q.h5ad --denovo --n-clusters 10
  scrcl-cli cluster query.h5ad -m pbmc_model/ -o q.h5ad --markers q_markers.csv

{EXIT_CODES}"""
MAIN_HELP = """Unsupervised cell-type identification with scRCL.

\b
Typical use:
  scrcl-cli train reference.h5ad -o model/      # torch; GPU when present
  scrcl-cli cluster query.h5ad -m model/ -o query_clustered.h5ad   # ONNX Runtime, no torch
  scrcl-cli demo                                 # train + cluster the bundled PBMC example
"""


class _UserError(click.ClickException):
    exit_code = 1

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.message}", err=True)


class _Interrupted(click.ClickException):
    exit_code = 130

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.message}", err=True)


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            # Click would print "Aborted!" and exit 1; temporaries were already removed on the way here.
            raise _Interrupted("interrupted; partial outputs were removed. Re-run the command to produce them.") from None
        except ScrclError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            raise _UserError(exc.message) from None
        except MemoryError:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            raise _UserError("ran out of memory. Use a smaller --batch-size or --hidden-dim, or a machine with more memory") from None


def _setup_logging(verbose: int, quiet: bool, log_file: Path | None) -> None:
    from rich.console import Console
    from rich.logging import RichHandler

    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    root = logging.getLogger("scrcl_cli")
    root.handlers.clear()
    root.setLevel(logging.DEBUG)
    handler = RichHandler(console=Console(stderr=True), show_path=False, show_time=False)
    handler.setLevel(level)
    root.addHandler(handler)
    if log_file is not None:
        try:
            fh = logging.FileHandler(log_file)
        except OSError as exc:
            raise ScrclError(f"cannot open --log-file {log_file} ({exc.strerror or exc})",
                             "Choose a log file in a writable directory") from exc
        fh.setLevel(logging.DEBUG)
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(fh)
    for noisy in ("torch.onnx", "onnxscript", "torch._dynamo", "torch.export"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _on_sigterm(signum: int, frame: Any) -> None:
    # Turn SIGTERM/SIGINT into an exception so that temporaries beside outputs are removed on the way
    # out. Python drops an exception raised inside a weakref callback or __del__ ("Exception ignored
    # in ..."), so the flag also stops every later commit of an output.
    from . import data

    data.request_stop()
    raise KeyboardInterrupt


def _unraisable(args: Any) -> None:
    # A KeyboardInterrupt lost in a weakref callback or __del__ is not worth a traceback on stderr:
    # the stop flag set by _on_sigterm still ends the run with exit code 130.
    if not isinstance(args.exc_value, KeyboardInterrupt):
        sys.__unraisablehook__(args)


@click.group(cls=_Group, help=MAIN_HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", message="%(version)s", help="Print the bare version and exit.")
@click.option("-v", "--verbose", count=True, help="More log output (debug messages).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors; no progress bars.")
@click.option("--log-file", type=click.Path(dir_okay=False, path_type=Path), help="Also write a full debug log here.")
@click.option("--debug", is_flag=True, help="Show Python tracebacks for errors (for bug reports).")
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: bool, log_file: Path | None, debug: bool) -> None:
    ctx.obj = {"quiet": quiet, "debug": debug}
    _setup_logging(verbose, quiet, log_file)
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, _on_sigterm)
    if sys.unraisablehook is sys.__unraisablehook__:  # leave a host's hook (pytest's) alone
        sys.unraisablehook = _unraisable


# ---------------------------------------------------------------- shared options

def _opt(*decls: str, **kw: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    kw.setdefault("show_default", True)
    return click.option(*decls, **kw)


device_option = _opt("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
                     help="Where to compute; the device actually used is reported.")
threads_option = _opt("--threads", type=click.IntRange(min=0), default=0, help="CPU threads (0: library default).")
seed_option = _opt("--seed", type=int, default=0, help="Random seed; same seed, same CPU result.")
def _quiet_callback(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    if value:
        ctx.ensure_object(dict)["quiet"] = True
        for h in logging.getLogger("scrcl_cli").handlers:
            if not isinstance(h, logging.FileHandler):
                h.setLevel(logging.WARNING)
    return value


quiet_option = click.option("-q", "--quiet", "quiet_", is_flag=True, expose_value=False, callback=_quiet_callback,
                            help="Only warnings and errors; no progress bars (same as the group's --quiet).")
overwrite_option = _opt("--overwrite", "--force", "overwrite", is_flag=True, help="Replace existing outputs.")
input_arg = click.argument("input_h5ad", type=click.Path(path_type=Path))
model_option = _opt("-m", "--model", "model_dir", required=True, type=click.Path(path_type=Path),
                    help="Model directory written by 'scrcl-cli train'.")
view_option = _opt("--view", type=click.Choice(["fused", "cell"]), default="fused",
                   help="fused: the embedding training clustered (GCN view), needs the query kNN graph; cell: the MLP view only, per cell.")
key_option = _opt("--key-added", default="X_scrcl", help="obsm key for the embedding.")
batch_option = _opt("--batch-size", type=click.IntRange(min=1), default=4096, help="Cells per ONNX Runtime call.")
overlap_option = _opt("--min-gene-overlap", type=click.FloatRange(0, 1), default=0.5,
                      help="Minimum fraction of model genes the query must contain.")


@contextmanager
def _progress(enabled: bool) -> Iterator[Callable[[str, int], Callable[..., None]]]:
    """Yields make(description, total) -> update(done, total=None, **fields)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if not enabled:
        yield lambda desc, total: (lambda *a, **k: None)
        return
    prog = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=Console(stderr=True), transient=False)

    def make(desc: str, total: int) -> Callable[..., None]:
        task = prog.add_task(desc, total=total, info="")

        def update(done: int, total_: int | None = None, **fields: Any) -> None:
            prog.update(task, completed=done, total=total_ or total, **fields)

        return update

    with prog:
        yield make


def _set_threads(threads: int) -> None:
    if threads > 0:
        # BLAS and OpenMP pools (numpy, scipy, scikit-learn) too, not just torch's: several runs
        # sharing one host (a benchmark's --jobs, a pipeline's forks) would oversubscribe it.
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=threads)
        try:
            import torch

            torch.set_num_threads(threads)
        except ImportError:
            pass


def _summary(title: str, rows: list[tuple[str, str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    ctx = click.get_current_context(silent=True)
    if ctx is not None and (ctx.obj or {}).get("quiet"):
        return
    table = Table(title=title, show_header=False, title_justify="left")
    for k, v in rows:
        table.add_row(k, v)
    Console(stderr=True).print(table)


# ---------------------------------------------------------------- train

@cli.command(epilog=TRAIN_EXAMPLES)
@input_arg
@_opt("-o", "--output", required=True, type=click.Path(path_type=Path), help="Model directory to write.")
@_opt("--out-h5ad", type=click.Path(dir_okay=False, path_type=Path),
      help="Also write a copy of the input with obsm['X_scrcl'] and obs['scrcl_cluster'].")
@_opt("--epochs", type=click.IntRange(min=1), default=100)
@_opt("--hidden-dim", type=click.IntRange(min=1), default=1500)
@_opt("--out-dim", type=click.IntRange(min=1), default=16, help="Refined embedding width O (the fused embedding is 2*O).")
@_opt("--dropout", type=click.FloatRange(0, 1, max_open=True), default=0.3)
@_opt("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-4)
@_opt("--weight-decay", type=click.FloatRange(min=0), default=0.1)
@_opt("--temperature", type=click.FloatRange(min=0, min_open=True), default=0.1)
@_opt("--lambda1", type=click.FloatRange(min=0), default=100.0, help="Weight of the NCA loss.")
@_opt("--lambda2", type=click.FloatRange(min=0), default=1.0, help="Weight of the CVC loss.")
@_opt("--t0", type=click.IntRange(min=0), default=4, help="Graph smoothing steps for the MLP view input (Â^t0 X).")
@_opt("--t1", type=click.IntRange(min=0), default=2, help="Graph smoothing steps for the GCN view input (Â^t1 X).")
@_opt("--n-neighbors", type=click.IntRange(min=2), default=15, help="k of the cell kNN graph, the cell included.")
@_opt("--gene-neighbors", type=click.IntRange(min=1), default=5,
      help="k of the gene kNN graph that mixes gene embeddings, the gene included (1: no mixing).")
@_opt("--n-top-genes", type=click.IntRange(min=1), default=None,
      help="Highly variable genes: 2000 (seurat flavour) by default, 3000 (seurat_v3) with --spatial.")
@_opt("--input", "input_mode", type=click.Choice(["counts", "lognorm"]), default="lognorm",
      help="Model input: log-normalised HVGs, or raw HVG counts as the reference does.")
@_opt("--expression", type=click.Choice(["counts", "continuous", "log"]), default="counts",
      help="What X holds: raw counts, non-integer values (TPM/RPKM), or log-normalised data.")
@_opt("--embedding", type=click.Choice(["gcn-pca", "fused"]), default="gcn-pca",
      help="What is clustered and exported: 50 principal components of the GCN view's normalised hidden output "
      "(Euclidean k-means), or the reference's concat(z1, z2) (cosine k-means) (docs/defaults.md).")
@_opt("--n-clusters", type=click.IntRange(min=1), default=None, help="Clusters for the training cells (default: chosen without labels).")
@_opt("--spatial", is_flag=True, help="Spatial mode: graph from obsm['spatial'], seurat_v3 genes, scaled input, neighbour vote. "
      "Options not given take the spatial defaults: --epochs 100 --hidden-dim 128 --out-dim 32 --temperature 1 "
      "--lambda1 10 --t0 5 --t1 5 --n-top-genes 3000 --embedding fused, no gene-graph mixing (docs/spatial.md).")
@_opt("--refine-neighbours", type=click.IntRange(min=1), default=50, help="With --spatial: spots in the neighbour vote.")
@_opt("--batch-size", "batch_size", type=click.IntRange(min=2), default=None,
      help="Train on mini-batches of about this many cells; an epoch is still one pass over the cells (default: full batch when it fits in memory).")
@_opt("--out-of-core", is_flag=True,
      help="Keep the smoothed inputs in memory-mapped files beside OUTPUT while training (removed afterwards), for atlases larger than memory.")
@_opt("--no-export", is_flag=True, help="Skip the ONNX export (weights only).")
@seed_option
@device_option
@threads_option
@overwrite_option
@quiet_option
@click.pass_context
def train(ctx: click.Context, input_h5ad: Path, output: Path, out_h5ad: Path | None, n_clusters: int | None,
          spatial: bool, refine_neighbours: int, batch_size: int | None, out_of_core: bool, no_export: bool, seed: int, device: str, threads: int, overwrite: bool, **hyper: Any) -> None:
    """Train scRCL on the raw counts in INPUT_H5AD and write a model directory."""
    from . import data

    t = time.perf_counter()
    data.check_output(output, overwrite=overwrite, inputs=(input_h5ad,))
    if out_h5ad is not None:
        data.check_output(out_h5ad, overwrite=overwrite, inputs=(input_h5ad,))
    adata = data.read_h5ad_checked(input_h5ad, expression=hyper["expression"])
    # torch is imported only now, so that bad input fails in about a second instead of after its import.
    from .training import SPATIAL_DEFAULTS, TrainConfig

    _set_threads(threads)
    if not spatial and "spatial" in adata.obsm:
        log.info("%s has obsm['spatial']: for spatial domains, train with --spatial", input_h5ad.name)
    if spatial:
        # Spatial defaults replace only the options the user did not set (docs/spatial.md).
        from click.core import ParameterSource

        for key, value in SPATIAL_DEFAULTS.items():
            if key not in hyper or ctx.get_parameter_source(key) is ParameterSource.DEFAULT:
                hyper[key] = value
    elif hyper["n_top_genes"] is None:
        hyper["n_top_genes"] = 2000
    config = TrainConfig(seed=seed, **hyper)
    from .workflow import train_model

    with _progress(not ctx.obj["quiet"]) as make:
        graph_bar = make("cell graph", 1)
        bar = make("training", config.epochs)
        every = max(1, config.epochs // 100)

        def on_epoch(epoch: int, terms: Any) -> None:
            data.check_stop()
            if (epoch + 1) % every == 0 or epoch + 1 == config.epochs:
                bar(epoch + 1, info=f"loss {terms.total.item():.4f}")

        trained = train_model(adata, config, device=device, n_clusters=n_clusters, export=not no_export, batch_size=batch_size,  # type: ignore[arg-type]
                              out_of_core=output if out_of_core else None,
                              spatial={"refine_neighbours": refine_neighbours} if spatial else None,
                              on_epoch=on_epoch, on_graph=lambda d, n: graph_bar(d, n))
    data.write_model_dir(output, trained.files, trained.manifest, overwrite=overwrite)
    outputs = [str(output)]
    if out_h5ad is not None:
        _annotate(adata, trained)
        data.write_h5ad_atomic(adata, out_h5ad, overwrite=overwrite)
        outputs.append(str(out_h5ad))
    _summary("scrcl-cli train", [
        ("cells", f"{int((trained.labels >= 0).sum())} used of {adata.n_obs}"),
        ("genes used", str(trained.n_genes)),
        ("clusters", f"{trained.manifest['clusters']['n_clusters']} ({trained.manifest['clusters']['method']})"),
        ("device", trained.device),
        ("final loss", f"{trained.manifest['training']['final_loss'][0]:.5g}"),
        ("time", f"{time.perf_counter() - t:.1f} s (training {trained.seconds:.1f} s)"),
        ("written", ", ".join(outputs)),
    ])


def _annotate(adata: Any, trained: Any) -> None:
    import numpy as np
    import pandas as pd

    adata.obsm["X_scrcl"] = trained.embedding
    k = int(trained.manifest["clusters"]["n_clusters"])
    for key, values in [("scrcl_cluster", trained.labels)] + [(f"scrcl_cluster_{n}", v) for n, v in trained.extra_labels.items()]:
        labels = [str(v) if v >= 0 else np.nan for v in values]
        adata.obs[key] = pd.Categorical(labels, categories=[str(i) for i in range(k)])
    adata.uns["scrcl"] = {"scrcl_version": __version__, "genes_sha256": trained.manifest["genes_sha256"],
                          "device": trained.device, "config": trained.manifest["config"]}


# ---------------------------------------------------------------- embed / cluster

def _write_csv(path: Path, header: list[str], rows: Any, *, overwrite: bool) -> None:
    import csv
    import io

    from . import data

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    data.write_text_atomic(buf.getvalue(), path, overwrite=overwrite)


@cli.command(epilog=EMBED_EXAMPLES)
@input_arg
@model_option
@_opt("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Output .h5ad (a copy of the input plus the embedding).")
@view_option
@key_option
@_opt("--spatial", is_flag=True, help="Spatial model: use the query's obsm['spatial'] graph (must match how the model was trained).")
@_opt("--csv", "csv_path", type=click.Path(dir_okay=False, path_type=Path), help="Also write the embedding as a CSV table.")
@batch_option
@overlap_option
@device_option
@threads_option
@overwrite_option
@quiet_option
@click.pass_context
def embed(ctx: click.Context, input_h5ad: Path, model_dir: Path, output: Path, view: str, key_added: str, spatial: bool,
          csv_path: Path | None, batch_size: int, min_gene_overlap: float, device: str, threads: int, overwrite: bool) -> None:
    """Embed the cells of INPUT_H5AD with a trained model (ONNX Runtime, no torch)."""
    from . import data, inference

    t = time.perf_counter()
    for p in filter(None, (output, csv_path)):
        data.check_output(p, overwrite=overwrite, inputs=(input_h5ad, model_dir))
    bundle = data.read_bundle(model_dir)
    data.check_mode(bundle, spatial=spatial)
    bundle.file(inference.ONNX_FILES[view])  # a model trained with --no-export fails here, before the query's graph
    # X is read in blocks of cells and the output is a copy of the input plus the new elements (data.py).
    query = data.ChunkedH5ad(input_h5ad, expression=bundle.manifest["preprocessing"]["expression"], from_model=True)
    with _progress(not ctx.obj["quiet"]) as make:
        rep = inference.embed_file(query, bundle, view=view, device=device, threads=threads, batch_size=batch_size,  # type: ignore[arg-type]
                                   min_gene_overlap=min_gene_overlap, key_added=key_added,
                                   progress=make("embedding", query.n_obs))
    data.write_h5ad_patched(input_h5ad, output, rep.annotations, overwrite=overwrite)
    if csv_path is not None:
        emb = rep.annotations.obsm[key_added]
        _write_csv(csv_path, ["cell"] + [f"{key_added}_{i}" for i in range(emb.shape[1])],
                   ([c, *(f"{v:.7g}" for v in row)] for c, row in zip(query.obs_names, emb)), overwrite=overwrite)
    _summary("scrcl-cli embed", [
        ("cells", str(rep.n_cells)),
        ("genes matched", f"{rep.n_genes_found} of {rep.n_genes_model}"),
        ("view", rep.view), ("provider", rep.provider),
        ("time", f"{time.perf_counter() - t:.1f} s"),
        ("written", ", ".join(str(p) for p in (output, csv_path) if p)),
    ])


@cli.command(epilog=CLUSTER_EXAMPLES)
@input_arg
@model_option
@_opt("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Output .h5ad with obs['scrcl_cluster'].")
@_opt("--markers", type=click.Path(dir_okay=False, path_type=Path), default=None,
      help="Marker-gene table (CSV). Default: <output stem>_markers.csv.")
@_opt("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None,
      help="With --spatial: write a PNG domain map (needs matplotlib, the 'plot' extra).")
@_opt("--denovo", is_flag=True, help="Cluster the query itself (k-means, the model's metric) instead of using training centroids.")
@_opt("--n-clusters", type=click.IntRange(min=1), default=None, help="With --denovo: number of clusters (default: chosen without labels).")
@view_option
@key_option
@_opt("--spatial", is_flag=True, help="Spatial model: use the query's obsm['spatial'] graph (must match how the model was trained).")
@batch_option
@overlap_option
@seed_option
@device_option
@threads_option
@overwrite_option
@quiet_option
@click.pass_context
def cluster(ctx: click.Context, input_h5ad: Path, model_dir: Path, output: Path, markers: Path | None, plot: Path | None, denovo: bool,
            n_clusters: int | None, view: str, key_added: str, spatial: bool, batch_size: int, min_gene_overlap: float, seed: int,
            device: str, threads: int, overwrite: bool) -> None:
    """Embed INPUT_H5AD and assign every cell to a cluster (ONNX Runtime, no torch)."""
    import numpy as np

    from . import data, inference

    t = time.perf_counter()
    markers = markers or output.with_name(output.stem + "_markers.csv")
    for p in filter(None, (output, markers, plot)):
        data.check_output(p, overwrite=overwrite, inputs=(input_h5ad, model_dir))
    bundle = data.read_bundle(model_dir)
    data.check_mode(bundle, spatial=spatial)
    bundle.file(inference.ONNX_FILES[view])  # a model trained with --no-export fails here, before the query's graph
    query = data.ChunkedH5ad(input_h5ad, expression=bundle.manifest["preprocessing"]["expression"], from_model=True)
    if plot is not None and query.spatial is None:  # checked before any work or output
        raise ScrclError(f"--plot needs obsm['spatial'] and {input_h5ad.name} has none", "Drop --plot or pass a section with coordinates")
    with _progress(not ctx.obj["quiet"]) as make:
        rep = inference.cluster_file(query, bundle, denovo=denovo, n_clusters=n_clusters, seed=seed, view=view, device=device,
                                     threads=threads, batch_size=batch_size, min_gene_overlap=min_gene_overlap,
                                     key_added=key_added, progress=make("embedding", query.n_obs))
    new = rep.embed.annotations
    data.write_h5ad_patched(input_h5ad, output, new, overwrite=overwrite)
    if plot is not None:
        from .spatial import plot_domains

        key = "scrcl_cluster_refined" if "scrcl_cluster_refined" in new.obs else "scrcl_cluster"
        assert query.spatial is not None
        plot_domains(query.spatial, np.asarray(new.obs[key]), plot, title=f"{input_h5ad.name}: {key}", overwrite=overwrite)
    _write_csv(markers, ["cluster", "rank", "gene", "log2_fold_change", "mean_lognorm_in_cluster", "fraction_expressing"],
               ([c, r, g, f"{a:.4f}", f"{b:.4f}", f"{f:.4f}"] for c, r, g, a, b, f in rep.markers), overwrite=overwrite)
    _summary("scrcl-cli cluster", [
        ("cells", str(rep.embed.n_cells)),
        ("genes matched", f"{rep.embed.n_genes_found} of {rep.embed.n_genes_model}"),
        ("clusters", f"{rep.n_clusters} ({rep.method})"),
        ("view", rep.embed.view), ("provider", rep.embed.provider),
        ("time", f"{time.perf_counter() - t:.1f} s"),
        ("written", ", ".join(str(p) for p in (output, markers, plot) if p is not None)),
    ])


# ---------------------------------------------------------------- export / info / demo

@cli.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
def export(model_dir: Path) -> None:
    """Re-export the ONNX encoders of MODEL_DIR from its torch weights."""
    import io
    import pickle

    import torch

    from . import data
    from .workflow import export_files

    bundle = data.read_bundle(model_dir)
    try:
        state = torch.load(io.BytesIO(bundle.read_bytes("weights.pt")), weights_only=True)
    except pickle.UnpicklingError as exc:  # weights_only refuses anything but tensors: never unpickle code
        raise ScrclError(f"weights.pt in {model_dir} holds objects other than tensors, which are never unpickled",
                         "Use a model directory written by scrcl-cli train, from a trusted source") from exc
    gene_emb = state.pop("gene_emb").numpy()
    files = {name: bundle.read_bytes(name) for name in bundle.manifest["files"]}
    files.update(export_files(state, gene_emb, bundle.manifest))
    manifest = {k: v for k, v in bundle.manifest.items() if k not in ("files", "format_version", "scrcl_version")}
    data.write_model_dir(model_dir, files, manifest, overwrite=True)
    log.info("re-exported %s", ", ".join(sorted(n for n in files if n.endswith(".onnx"))))


@cli.command()
def info() -> None:
    """Print versions, the torch CUDA runtime, ONNX Runtime providers and visible GPUs."""
    from ._device import ort_distributions

    lines = [f"scrcl-cli {__version__}", f"python {sys.version.split()[0]}"]
    try:
        import torch

        cuda = torch.version.cuda or "none (CPU build)"
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
        lines += [f"torch {torch.__version__}", f"torch CUDA runtime {cuda}", f"torch GPUs: {', '.join(gpus) or 'none'}"]
    except ImportError:
        lines.append("torch: not installed (inference-only install)")
    try:
        import onnxruntime as ort

        lines += [f"onnxruntime {ort.__version__} ({', '.join(ort_distributions())})",
                  f"onnxruntime providers: {', '.join(ort.get_available_providers())}"]
    except ImportError:
        lines.append("onnxruntime: not installed")
    click.echo("\n".join(lines))


@cli.command()
@_opt("-o", "--output", "outdir", type=click.Path(file_okay=False, path_type=Path), default=Path("scrcl_demo"),
      help="Folder for the model and the clustered copy.")
@_opt("--epochs", type=click.IntRange(min=1), default=100)
@_opt("--hidden-dim", type=click.IntRange(min=1), default=256)
@seed_option
@device_option
@overwrite_option
@quiet_option
@click.pass_context
def demo(ctx: click.Context, outdir: Path, epochs: int, hidden_dim: int, seed: int, device: str, overwrite: bool) -> None:
    """Train and cluster the bundled 700-cell PBMC example (scanpy's pbmc68k_reduced, raw counts)."""
    from importlib import resources

    import anndata
    import numpy as np

    from .metrics import ari_against_annotation

    example = Path(str(resources.files("scrcl_cli") / "data" / "pbmc68k_reduced_700.h5ad"))
    outdir.mkdir(parents=True, exist_ok=True)
    model, clustered = outdir / "model", outdir / "pbmc68k_clustered.h5ad"
    ctx.invoke(train, input_h5ad=example, output=model, out_h5ad=None, n_clusters=None, spatial=False, refine_neighbours=50, batch_size=None, out_of_core=False, no_export=False, seed=seed,
               device=device, threads=0, overwrite=overwrite, epochs=epochs, hidden_dim=hidden_dim, out_dim=16,
               dropout=0.3, lr=1e-4, weight_decay=0.1, temperature=0.1, lambda1=100.0, lambda2=1.0, t0=4, t1=2,
               n_neighbors=15, n_top_genes=None, input_mode="lognorm", expression="counts")
    ctx.invoke(cluster, input_h5ad=example, model_dir=model, output=clustered, markers=None, denovo=False,
               n_clusters=None, view="fused", key_added="X_scrcl", spatial=False, plot=None, batch_size=4096, min_gene_overlap=0.5, seed=seed,
               device="cpu" if device == "cpu" else "auto", threads=0, overwrite=overwrite)
    pred = anndata.read_h5ad(clustered).obs["scrcl_cluster"].to_numpy()
    score = ari_against_annotation(example, np.asarray(pred))  # evaluation only, after clustering
    click.echo(f"demo: ARI against the published PBMC annotation = {score:.3f} "
               f"({len(set(pred))} clusters, 10 annotated types); outputs in {outdir}")


def main() -> None:
    """Console entry point."""
    try:
        cli(prog_name="scrcl-cli")
    except KeyboardInterrupt:
        click.echo("error: interrupted; partial outputs were removed.", err=True)
        sys.exit(130)
