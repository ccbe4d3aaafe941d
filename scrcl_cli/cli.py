"""The `scrcl-cli` command line: parse, call, report.

User errors (`ScrclError`) become one ``error: …`` line on stderr and exit code 1; usage
errors exit 2 (Click); an interrupt exits 130. Everything else is a bug and keeps its
traceback. Logs and progress go to stderr; stdout carries only what scripts read.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from . import config as C
from ._device import as_device
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
  scrcl-cli train atlas.h5ad -o atlas_model/ --device cuda --matmul-precision high
  scrcl-cli train tpm.h5ad -o m/ --expression continuous --epochs 200
  torchrun --nproc_per_node 4 -m scrcl_cli train atlas.h5ad -o atlas_model/ --distributed --batch-size 20000

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


def _resource_error(exc: BaseException) -> ScrclError | None:
    """One line for running out of memory or disk, naming the size where the error gives it; None otherwise."""
    import re

    from .io.output import disk_full_error

    text = str(exc)
    if isinstance(exc, MemoryError) or (
        isinstance(exc, RuntimeError)
        and ("out of memory" in text.lower() or "can't allocate memory" in text or type(exc).__name__ == "OutOfMemoryError")
    ):
        size = re.search(r"(\d+(?:\.\d+)?\s*[KMGT]i?B)|allocate (\d+) bytes", text)
        what = f" (an allocation of {size.group(1) or size.group(2) + ' bytes'} failed)" if size else ""
        return ScrclError(
            f"ran out of memory{what}",
            "Use a smaller --batch-size or --hidden-dim, fewer cells per run, or a machine with more memory",
        )
    if isinstance(exc, OSError):
        full = disk_full_error(exc)
        if full is not None:
            return full
        if exc.errno is not None and exc.strerror:
            where = f" {exc.filename}" if exc.filename else ""
            return ScrclError(f"cannot write or read{where} ({exc.strerror})", "Check the path, its permissions and free space")
    return None


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        def debug() -> bool:  # ctx.obj is set by the group's callback, inside super().invoke
            return bool(ctx.obj and ctx.obj.get("debug"))

        try:
            result = super().invoke(ctx)
            _finish_logging(ctx, ok=True)
            return result
        except KeyboardInterrupt:
            _finish_logging(ctx, ok=False)
            # Click would print "Aborted!" and exit 1; temporaries were already removed on the way here.
            raise _Interrupted("interrupted; partial outputs were removed. Re-run the command to produce them.") from None
        except ScrclError as exc:
            _finish_logging(ctx, ok=False)
            if debug():
                raise
            raise _UserError(exc.message) from None
        except (MemoryError, RuntimeError, OSError) as exc:
            _finish_logging(ctx, ok=False)
            mapped = _resource_error(exc)
            if mapped is None or debug():
                raise
            raise _UserError(mapped.message) from None


class _HeldLog(logging.Handler):
    """Terminal log records held until the command ends: shown on success, dropped on failure.

    A failed run's stderr is then exactly its one ``error:`` line, which is what a pipeline's
    `.command.err` shows; ``--verbose`` streams the records instead, and ``--log-file`` keeps them all.
    """

    def __init__(self, target: logging.Handler) -> None:
        super().__init__(logging.DEBUG)
        self.target = target
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def show(self) -> None:
        for record in self.records:
            if record.levelno >= self.target.level:
                self.target.handle(record)
        self.records.clear()


class _LogFile(logging.StreamHandler):  # type: ignore[type-arg,unused-ignore]  # generic only in typeshed
    """The --log-file handler: a write failure (full disk) is remembered and ends the run with one line."""

    def __init__(self, fd: int, path: Path) -> None:
        super().__init__(os.fdopen(fd, "a", encoding="utf-8"))
        self.path = path
        self.error: BaseException | None = None

    def handleError(self, record: logging.LogRecord) -> None:
        self.error = self.error or sys.exc_info()[1]

    def close(self) -> None:
        try:
            self.flush()
            self.stream.close()
        except OSError as exc:
            self.error = self.error or exc
        super().close()


_ROOT = "scrcl_cli"
_WARNINGS = "py.warnings"


def _setup_logging(ctx: click.Context, verbose: int, quiet: bool) -> None:
    from rich.console import Console
    from rich.logging import RichHandler

    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    terminal = RichHandler(console=Console(stderr=True), show_path=False, show_time=False)
    terminal.setLevel(level)
    held = None if verbose else _HeldLog(terminal)
    memory = _HeldLog(logging.NullHandler())  # everything, for a --log-file opened after the output checks
    logging.captureWarnings(True)  # library warnings go to the log at debug level, never loose on stderr
    for name in (_ROOT, _WARNINGS):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.setLevel(logging.DEBUG)
        logger.addHandler(memory)
        if name == _ROOT or verbose:
            logger.addHandler(held if held is not None else terminal)
    ctx.obj.update(terminal=terminal, held=held, memory=memory)
    for noisy in ("torch.onnx", "onnxscript", "torch._dynamo", "torch.export"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _attach_log_file(ctx: click.Context) -> None:
    """Open the checked --log-file and replay what was logged so far into it."""
    from .io.output import open_log

    path = ctx.obj.get("log_file")
    memory: _HeldLog | None = ctx.obj.get("memory")
    if path is None or memory is None or ctx.obj.get("log_handler") is not None:
        return
    handler = _LogFile(open_log(path), path)
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for record in memory.records:
        handler.handle(record)
    for name in (_ROOT, _WARNINGS):
        logger = logging.getLogger(name)
        logger.removeHandler(memory)
        logger.addHandler(handler)
    memory.records.clear()
    ctx.obj["log_handler"] = handler


def _finish_logging(ctx: click.Context, *, ok: bool) -> None:
    obj = ctx.obj or {}
    held: _HeldLog | None = obj.get("held")
    if held is not None:
        if ok:
            held.show()
        held.records.clear()
    after = obj.pop("after", [])
    if ok and after:
        from rich.console import Console

        for table in after:
            Console(stderr=True).print(table)
    handler: _LogFile | None = obj.pop("log_handler", None)
    if handler is not None:
        for name in (_ROOT, _WARNINGS):
            logging.getLogger(name).removeHandler(handler)
        handler.close()
        if ok and handler.error is not None:
            exc = handler.error
            full = _resource_error(exc) if isinstance(exc, OSError) else None
            raise ScrclError(
                f"writing --log-file {handler.path} failed ({full.problem if full else exc})",
                "Free space or choose another log file",
            )


def _on_sigterm(signum: int, frame: Any) -> None:
    # Turn SIGTERM/SIGINT into an exception so that temporaries beside outputs are removed on the way
    # out. Python drops an exception raised inside a weakref callback or __del__ ("Exception ignored
    # in ..."), so the flag also stops every later commit of an output.
    from .io.output import request_stop

    request_stop()
    raise KeyboardInterrupt


def _install_signal_handlers() -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, _on_sigterm)


def _unraisable(args: Any) -> None:
    # A KeyboardInterrupt lost in a weakref callback or __del__ is not worth a traceback on stderr:
    # the stop flag set by _on_sigterm still ends the run with exit code 130.
    if not isinstance(args.exc_value, KeyboardInterrupt):
        sys.__unraisablehook__(args)


@click.group(cls=_Group, help=MAIN_HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", message="%(version)s", help="Print the bare version and exit.")
@click.option("-v", "--verbose", count=True, help="More log output (debug messages, library warnings), streamed as it comes.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors; no progress bars.")
@click.option(
    "--log-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also append a full debug log here (checked like every output; its folder is created).",
)
@click.option("--debug", is_flag=True, help="Show Python tracebacks for errors (for bug reports).")
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: bool, log_file: Path | None, debug: bool) -> None:
    ctx.obj = {"quiet": quiet, "debug": debug, "log_file": log_file}
    _setup_logging(ctx, verbose, quiet)
    _install_signal_handlers()
    if sys.unraisablehook is sys.__unraisablehook__:  # leave a host's hook (pytest's) alone
        sys.unraisablehook = _unraisable


def _guard(ctx: click.Context, outputs: list[tuple[Path | None, str, str]], inputs: tuple[Path, ...], *, overwrite: bool) -> None:
    """Check every output of the command (and --log-file) before any work, then open the log file."""
    from .bundle import owned_entries
    from .io.output import Output, check_outputs

    outs = [
        Output(Path(p), option, kind, owned_entries if kind == "model" else None)  # type: ignore[arg-type]
        for p, option, kind in outputs
        if p is not None
    ]
    log_file = (ctx.obj or {}).get("log_file")
    if log_file is not None:
        outs.append(Output(Path(log_file), "--log-file", "log"))
    check_outputs(outs, inputs=inputs, overwrite=overwrite)
    _attach_log_file(ctx)


# ---------------------------------------------------------------- shared options


class _FiniteFloatRange(click.FloatRange):
    """A FloatRange that also refuses nan and inf, which pass every comparison-based bound."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


def _range(field: str) -> click.ParamType:
    """The Click type of the TrainConfig field `field`, from its range in `config.RANGES`."""
    lo, hi, lo_open, hi_open = C.RANGES[field]
    if isinstance(lo, int) and isinstance(hi, int):
        return click.IntRange(lo, hi, min_open=lo_open, max_open=hi_open)
    return _FiniteFloatRange(lo, hi, min_open=lo_open, max_open=hi_open)


def _opt(*decls: str, **kw: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    kw.setdefault("show_default", True)
    return click.option(*decls, **kw)


device_option = _opt(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    help="Where to compute; the device actually used is reported.",
)
# More threads than cores only adds contention: --threads 3000 on 2 cores ran 30x slower than 2.
THREAD_CAP = 4 * (os.cpu_count() or 1)
threads_option = _opt(
    "--threads",
    type=click.IntRange(0, THREAD_CAP),
    default=0,
    help=f"CPU threads (0: library default; at most 4 x the CPUs, here {THREAD_CAP}).",
)
seed_option = _opt(
    "--seed", type=_range("seed"), default=C.TRAIN_DEFAULTS.seed, help="Random seed in [0, 2^32); same seed, same CPU result."
)


def _quiet_callback(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    if value:
        obj = ctx.find_root().ensure_object(dict)
        obj["quiet"] = True
        if obj.get("terminal") is not None:
            obj["terminal"].setLevel(logging.WARNING)
    return value


KEY_PATTERN = r"[A-Za-z_][A-Za-z0-9_.-]{0,99}"


def _check_key(ctx: click.Context, param: click.Parameter, value: str) -> str:
    import re

    if not re.fullmatch(KEY_PATTERN, value):
        raise click.BadParameter(
            f"{value!r} is not a valid obsm key: use letters, digits, '_', '.', '-' (starting with a letter or '_'), e.g. X_scrcl"
        )
    return value


quiet_option = click.option(
    "-q",
    "--quiet",
    "quiet_",
    is_flag=True,
    expose_value=False,
    callback=_quiet_callback,
    help="Only warnings and errors; no progress bars (same as the group's --quiet).",
)
overwrite_option = _opt("--overwrite", "--force", "overwrite", is_flag=True, help="Replace existing outputs.")
input_arg = click.argument("input_h5ad", type=click.Path(path_type=Path))
model_option = _opt(
    "-m",
    "--model",
    "model_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="Model directory written by 'scrcl-cli train'.",
)
view_option = _opt(
    "--view",
    type=click.Choice(["fused", "cell"]),
    default="fused",
    help="fused: the embedding training clustered (GCN view), needs the query kNN graph; cell: the MLP view only, per cell.",
)
key_option = _opt("--key-added", default=C.KEY_ADDED, callback=_check_key, help="obsm key for the embedding.")
batch_option = _opt(
    "--batch-size", type=click.IntRange(*C.INFERENCE_BATCH_RANGE), default=C.BATCH_SIZE, help="Cells per ONNX Runtime call."
)
overlap_option = _opt(
    "--min-gene-overlap",
    type=_FiniteFloatRange(0, 1),
    default=C.MIN_GENE_OVERLAP,
    help="Minimum fraction of model genes the query must contain.",
)


@contextmanager
def _progress(enabled: bool) -> Iterator[Callable[[str, int], Callable[..., None]]]:
    """Yields make(description, total) -> update(done, total=None, **fields)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    if not enabled or not console.is_terminal:  # bars on a terminal only; cleared when the command ends
        yield lambda desc, total: lambda *a, **k: None
        return
    prog = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )

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
    if ctx is not None and (ctx.find_root().obj or {}).get("quiet"):
        return
    table = Table(title=title, show_header=False, title_justify="left")
    for k, v in rows:
        table.add_row(k, v)
    if ctx is not None and ctx.find_root().obj is not None:
        ctx.find_root().obj.setdefault("after", []).append(table)  # printed after the held log, on success
    else:
        Console(stderr=True).print(table)


# ---------------------------------------------------------------- train


@cli.command(epilog=TRAIN_EXAMPLES)
@input_arg
@_opt("-o", "--output", required=True, type=click.Path(path_type=Path), help="Model directory to write.")
@_opt(
    "--out-h5ad",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write a copy of the input with obsm['X_scrcl'] and obs['scrcl_cluster'].",
)
@_opt("--epochs", type=_range("epochs"), default=C.TRAIN_DEFAULTS.epochs)
@_opt("--hidden-dim", type=_range("hidden_dim"), default=C.TRAIN_DEFAULTS.hidden_dim)
@_opt(
    "--out-dim",
    type=_range("out_dim"),
    default=C.TRAIN_DEFAULTS.out_dim,
    help="Refined embedding width O (the fused embedding is 2*O).",
)
@_opt("--dropout", type=_range("dropout"), default=C.TRAIN_DEFAULTS.dropout)
@_opt("--lr", type=_range("lr"), default=C.TRAIN_DEFAULTS.lr)
@_opt("--weight-decay", type=_range("weight_decay"), default=C.TRAIN_DEFAULTS.weight_decay)
@_opt("--temperature", type=_range("temperature"), default=C.TRAIN_DEFAULTS.temperature)
@_opt("--lambda1", type=_range("lambda1"), default=C.TRAIN_DEFAULTS.lambda1, help="Weight of the NCA loss.")
@_opt("--lambda2", type=_range("lambda2"), default=C.TRAIN_DEFAULTS.lambda2, help="Weight of the CVC loss.")
@_opt("--t0", type=_range("t0"), default=C.TRAIN_DEFAULTS.t0, help="Graph smoothing steps for the MLP view input (Â^t0 X).")
@_opt("--t1", type=_range("t1"), default=C.TRAIN_DEFAULTS.t1, help="Graph smoothing steps for the GCN view input (Â^t1 X).")
@_opt(
    "--n-neighbors",
    type=_range("n_neighbors"),
    default=C.TRAIN_DEFAULTS.n_neighbors,
    help="k of the cell kNN graph, the cell included.",
)
@_opt(
    "--gene-neighbors",
    type=_range("gene_neighbors"),
    default=C.TRAIN_DEFAULTS.gene_neighbors,
    help="k of the gene kNN graph that mixes gene embeddings, the gene included (1: no mixing).",
)
@_opt(
    "--n-top-genes",
    type=_range("n_top_genes"),
    default=None,
    help=f"Highly variable genes: {C.TRAIN_DEFAULTS.n_top_genes} (seurat flavour) by default, "
    f"{C.SPATIAL_DEFAULTS['n_top_genes']} (seurat_v3) with --spatial.",
)
@_opt(
    "--input",
    "input_mode",
    type=click.Choice(["counts", "lognorm"]),
    default=C.TRAIN_DEFAULTS.input_mode,
    help="Model input: log-normalised HVGs, or raw HVG counts as the reference does.",
)
@_opt(
    "--expression",
    type=click.Choice(["counts", "continuous", "log"]),
    default=C.TRAIN_DEFAULTS.expression,
    help="What X holds: raw counts, non-integer values (TPM/RPKM), or log-normalised data.",
)
@_opt(
    "--embedding",
    type=click.Choice(list(C.EMBEDDINGS)),
    default=C.TRAIN_DEFAULTS.embedding,
    help="What is clustered and exported: 50 principal components of the GCN view's normalised hidden output "
    "(Euclidean k-means), or the reference's concat(z1, z2) (cosine k-means) (docs/defaults.md).",
)
@_opt(
    "--matmul-precision",
    type=click.Choice(C.CHOICES["matmul_precision"]),
    default=C.TRAIN_DEFAULTS.matmul_precision,
    help="float32 matrix products while training: highest is exact and reproducible; high lets NVIDIA "
    "tensor cores use TF32, faster but not bitwise reproducible; medium is TF32 on GPUs too and lets "
    "CPUs with bfloat16 support use it (torch.set_float32_matmul_precision).",
)
@_opt(
    "--unsmoothed-weight",
    type=_range("unsmoothed_weight"),
    default=C.TRAIN_DEFAULTS.unsmoothed_weight,
    show_default=f"{C.UNSMOOTHED_WEIGHT_K_GIVEN:g} with --n-clusters, 0 without",
    help="Cluster the gcn-pca embedding beside the scaled, unsmoothed PCA of the input with this weight "
    "(0: the embedding alone); `cluster --denovo` applies the same rule (docs/defaults.md).",
)
@_opt(
    "--n-clusters",
    type=click.IntRange(1, 100_000),
    default=None,
    help="Clusters for the training cells (default: chosen without labels).",
)
@_opt(
    "--spatial",
    is_flag=True,
    help="Spatial mode: graph from obsm['spatial'], seurat_v3 genes, scaled input, neighbour vote. "
    "Options not given take the spatial defaults: --epochs 100 --hidden-dim 128 --out-dim 32 --temperature 1 "
    "--lambda1 10 --t0 5 --t1 5 --n-top-genes 3000 --embedding fused, no gene-graph mixing (docs/spatial.md).",
)
@_opt(
    "--refine-neighbours",
    type=click.IntRange(1, 10_000),
    default=C.REFINE_NEIGHBOURS,
    help="With --spatial: spots in the neighbour vote.",
)
@_opt(
    "--batch-size",
    "batch_size",
    type=click.IntRange(*C.TRAIN_BATCH_RANGE),
    default=None,
    help="Train on mini-batches of about this many cells; an epoch is still one pass over the cells (default: full batch when it fits in memory).",
)
@_opt(
    "--out-of-core",
    is_flag=True,
    help="Keep the smoothed inputs in memory-mapped files beside OUTPUT while training (removed afterwards), for atlases larger than memory; "
    "needs 4 bytes x cells x kept genes per file (3 files with the default --t0/--t1) of free disk there, checked before any work.",
)
@_opt("--no-export", is_flag=True, help="Skip the ONNX export (weights only).")
@_opt(
    "--distributed",
    is_flag=True,
    help="Train with DistributedDataParallel, one process per GPU (or CPU process), under torchrun; "
    "implied when torchrun starts more than one process. Mini-batches: --batch-size is per process "
    "(default: the cells divided by the processes, smaller if that does not fit). Only rank 0 writes.",
)
@_opt(
    "--dist-timeout",
    type=click.IntRange(10, 86_400),
    default=C.DIST_TIMEOUT_S,
    help="With --distributed: seconds a process waits for the others before failing instead of hanging.",
)
@_opt(
    "--dist-backend",
    type=click.Choice(C.DIST_BACKENDS),
    default="auto",
    help="With --distributed: torch's collective backend. auto: nccl between GPUs, gloo between CPU "
    "processes; gloo also lets more processes than GPUs share them (a check on a one-GPU machine).",
)
@seed_option
@device_option
@threads_option
@overwrite_option
@quiet_option
@click.pass_context
def train(
    ctx: click.Context,
    input_h5ad: Path,
    output: Path,
    out_h5ad: Path | None,
    n_clusters: int | None,
    spatial: bool,
    refine_neighbours: int,
    batch_size: int | None,
    out_of_core: bool,
    no_export: bool,
    distributed: bool,
    dist_timeout: int,
    dist_backend: str,
    seed: int,
    device: str,
    threads: int,
    overwrite: bool,
    **hyper: Any,
) -> None:
    """Train scRCL on the raw counts in INPUT_H5AD and write a model directory."""
    from .bundle import write_model_dir
    from .io.h5ad import read_h5ad_checked
    from .io.output import check_stop

    t = time.perf_counter()
    dist = _distributed_env(ctx, distributed, dist_timeout, dist_backend)
    _guard(ctx, [(output, "-o/--output", "model"), (out_h5ad, "--out-h5ad", "file")], (input_h5ad,), overwrite=overwrite)
    adata = read_h5ad_checked(input_h5ad, expression=hyper["expression"], check_names=True)
    # torch is imported only now, so that bad input fails in about a second instead of after its import.
    from ._device import resolve_torch_device
    from .config import SPATIAL_DEFAULTS, TrainConfig
    from .training import check_fits

    resolve_torch_device(as_device(device))  # an unusable --device fails before any work
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
        hyper["n_top_genes"] = C.TRAIN_DEFAULTS.n_top_genes
    config = TrainConfig(seed=seed, **hyper)
    if n_clusters is not None and n_clusters > adata.n_obs:
        raise ScrclError(
            f"--n-clusters {n_clusters} is more than the {adata.n_obs} cells of {input_h5ad.name}",
            f"Pass --n-clusters between 1 and {adata.n_obs}, or leave it out to choose it from the data",
        )
    check_fits(
        config,
        adata.n_obs,
        adata.n_vars,
        batch_size=batch_size,
        out_of_core=output if out_of_core else None,
        processes=dist.world_size if dist is not None else 1,
    )
    from .workflow import phase_line, train_model, train_worker

    if dist is not None and not dist.is_main:

        def on_epoch_worker(epoch: int, terms: Any) -> None:
            check_stop()

        train_worker(
            adata,
            config,
            dist=dist,
            device=as_device(device),
            batch_size=batch_size,
            out_of_core=output if out_of_core else None,
            spatial={"refine_neighbours": refine_neighbours} if spatial else None,
            on_epoch=on_epoch_worker,
        )
        return
    with _progress(not ctx.obj["quiet"]) as make:
        graph_bar = make("cell graph", 1)
        bar = make("training", config.epochs)
        every = max(1, config.epochs // 100)

        def on_epoch(epoch: int, terms: Any) -> None:
            check_stop()
            if (epoch + 1) % every == 0 or epoch + 1 == config.epochs:
                bar(epoch + 1, info=f"loss {terms.total.item():.4f}")

        trained = train_model(
            adata,
            config,
            device=as_device(device),
            n_clusters=n_clusters,
            export=not no_export,
            batch_size=batch_size,
            out_of_core=output if out_of_core else None,
            spatial={"refine_neighbours": refine_neighbours} if spatial else None,
            on_epoch=on_epoch,
            on_graph=lambda d, n: graph_bar(d, n),
            dist=dist,
        )
    outputs = []
    if out_h5ad is not None:  # the copy first: it is the output most likely to fail on odd input metadata
        _annotate(adata, trained)
        _write_h5ad(adata, out_h5ad, overwrite=overwrite)
        outputs.append(str(out_h5ad))
    write_model_dir(output, trained.files, trained.manifest, overwrite=overwrite)
    outputs.insert(0, str(output))
    _summary(
        "scrcl-cli train",
        [
            ("cells", f"{int((trained.labels >= 0).sum())} used of {adata.n_obs}"),
            ("genes used", str(trained.n_genes)),
            ("clusters", f"{trained.manifest.clusters.n_clusters} ({trained.manifest.clusters.method})"),
            ("device", trained.device + _precision_note(config.matmul_precision)),
            ("final loss", f"{trained.manifest.training['final_loss'][0]:.5g}"),
            ("time", f"{time.perf_counter() - t:.1f} s (training {trained.seconds:.1f} s)"),
            ("phases", phase_line(trained.phases)),
            ("written", ", ".join(outputs)),
        ],
    )


def _precision_note(precision: str) -> str:
    return "" if precision == C.TRAIN_DEFAULTS.matmul_precision else f", float32 matmul precision {precision}"


def _distributed_env(ctx: click.Context, requested: bool, timeout_s: int, backend_choice: str) -> Any:
    """This process's `distributed.DistEnv`, or None for an ordinary single-process run.

    torchrun's variables decide: --distributed without them is an error, and more than one
    process without --distributed trains distributed anyway (each would otherwise write the same
    output). Ranks > 0 log only warnings, show no progress and open no --log-file: rank 0 reports.
    """
    from . import distributed

    env = distributed.detect(timeout_s=timeout_s, backend_choice=backend_choice)
    if requested and env is None:
        raise ScrclError("--distributed needs torchrun's WORLD_SIZE, RANK and LOCAL_RANK", distributed.LAUNCH_HINT)
    if env is None or (not requested and env.world_size == 1):
        return None
    if not requested and env.is_main:
        log.info("torchrun started %d processes: training with DistributedDataParallel", env.world_size)
    if not env.is_main:
        ctx.obj.update(quiet=True, log_file=None)
        ctx.obj["terminal"].setLevel(logging.WARNING)
    return env


def _write_h5ad(adata: Any, dest: Path, *, overwrite: bool) -> None:
    from .io.h5ad import write_h5ad_atomic

    try:
        write_h5ad_atomic(adata, dest, overwrite=overwrite)
    except (ScrclError, KeyboardInterrupt, OSError, MemoryError):
        raise
    except Exception as exc:  # anndata cannot write some metadata it read (object references, odd encodings)
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise ScrclError(
            f"anndata could not write --out-h5ad {dest} ({first})",
            "Drop --out-h5ad, or remove the offending uns/obs entries from the input",
        ) from None


def _annotate(adata: Any, trained: Any) -> None:
    from .api import annotate_training_cells

    annotate_training_cells(adata, trained)


# ---------------------------------------------------------------- embed / cluster


def _write_csv(path: Path, header: list[str], rows: Any, *, overwrite: bool) -> None:
    import csv
    import io

    from .io.output import write_text_atomic

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    write_text_atomic(buf.getvalue(), path, overwrite=overwrite)


@cli.command(epilog=EMBED_EXAMPLES)
@input_arg
@model_option
@_opt(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Output .h5ad (a copy of the input plus the embedding).",
)
@view_option
@key_option
@_opt(
    "--spatial", is_flag=True, help="Spatial model: use the query's obsm['spatial'] graph (must match how the model was trained)."
)
@_opt("--csv", "csv_path", type=click.Path(dir_okay=False, path_type=Path), help="Also write the embedding as a CSV table.")
@batch_option
@overlap_option
@device_option
@threads_option
@overwrite_option
@quiet_option
@click.pass_context
def embed(
    ctx: click.Context,
    input_h5ad: Path,
    model_dir: Path,
    output: Path,
    view: str,
    key_added: str,
    spatial: bool,
    csv_path: Path | None,
    batch_size: int,
    min_gene_overlap: float,
    device: str,
    threads: int,
    overwrite: bool,
) -> None:
    """Embed the cells of INPUT_H5AD with a trained model (ONNX Runtime, no torch)."""
    from . import inference
    from .bundle import ONNX_FILES, check_mode, read_bundle
    from .io.h5ad import ChunkedH5ad, write_h5ad_patched

    t = time.perf_counter()
    _guard(ctx, [(output, "-o/--output", "file"), (csv_path, "--csv", "file")], (input_h5ad, model_dir), overwrite=overwrite)
    bundle = read_bundle(model_dir)
    check_mode(bundle, spatial=spatial)
    bundle.require(ONNX_FILES[view])  # a model trained with --no-export fails here, before the query's graph
    # X is read in blocks of cells and the output is a copy of the input plus the new elements (io/h5ad.py).
    query = ChunkedH5ad(input_h5ad, expression=bundle.manifest.preprocessing.expression, from_model=True)
    with _progress(not ctx.obj["quiet"]) as make:
        rep = inference.embed_file(
            query,
            bundle,
            view=view,
            device=as_device(device),
            threads=threads,
            batch_size=batch_size,
            min_gene_overlap=min_gene_overlap,
            key_added=key_added,
            progress=make("embedding", query.n_obs),
        )
    write_h5ad_patched(input_h5ad, output, rep.annotations, overwrite=overwrite)
    if csv_path is not None:
        emb = rep.annotations.obsm[key_added]
        _write_csv(
            csv_path,
            ["cell"] + [f"{key_added}_{i}" for i in range(emb.shape[1])],
            ([c, *(f"{v:.7g}" for v in row)] for c, row in zip(query.obs_names, emb)),
            overwrite=overwrite,
        )
    _summary(
        "scrcl-cli embed",
        [
            ("cells", str(rep.n_cells)),
            ("genes matched", f"{rep.n_genes_found} of {rep.n_genes_model}"),
            ("view", rep.view),
            ("provider", rep.provider),
            ("time", f"{time.perf_counter() - t:.1f} s"),
            ("written", ", ".join(str(p) for p in (output, csv_path) if p)),
        ],
    )


@cli.command(epilog=CLUSTER_EXAMPLES)
@input_arg
@model_option
@_opt(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Output .h5ad with obs['scrcl_cluster'].",
)
@_opt(
    "--markers",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Marker-gene table (CSV). Default: <output stem>_markers.csv.",
)
@_opt(
    "--plot",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write a PNG: the spatial domain map with --spatial, else a 2-D layout of the embedding coloured by cluster "
    "(needs matplotlib, the 'plot' extra).",
)
@_opt(
    "--denovo", is_flag=True, help="Cluster the query itself (k-means, the model's metric) instead of using training centroids."
)
@_opt(
    "--n-clusters",
    type=click.IntRange(1, 100_000),
    default=None,
    help="With --denovo: number of clusters (default: chosen without labels).",
)
@view_option
@key_option
@_opt(
    "--spatial", is_flag=True, help="Spatial model: use the query's obsm['spatial'] graph (must match how the model was trained)."
)
@batch_option
@overlap_option
@seed_option
@device_option
@threads_option
@overwrite_option
@quiet_option
@click.pass_context
def cluster(
    ctx: click.Context,
    input_h5ad: Path,
    model_dir: Path,
    output: Path,
    markers: Path | None,
    plot: Path | None,
    denovo: bool,
    n_clusters: int | None,
    view: str,
    key_added: str,
    spatial: bool,
    batch_size: int,
    min_gene_overlap: float,
    seed: int,
    device: str,
    threads: int,
    overwrite: bool,
) -> None:
    """Embed INPUT_H5AD and assign every cell to a cluster (ONNX Runtime, no torch)."""
    import numpy as np

    from . import inference
    from .bundle import ONNX_FILES, check_mode, read_bundle
    from .io.h5ad import ChunkedH5ad, write_h5ad_patched

    t = time.perf_counter()
    if n_clusters is not None and not denovo:
        raise ScrclError(
            "--n-clusters applies only with --denovo (the default labels cells by the training centroids)",
            "Add --denovo to cluster the query itself into that many clusters, or drop --n-clusters",
        )
    if output.name in ("", ".", ".."):
        raise ScrclError(f"-o/--output {str(output)!r} is not a file path", "Pass the path of the output .h5ad")
    markers = markers or output.with_name(output.stem + "_markers.csv")
    _guard(
        ctx,
        [(output, "-o/--output", "file"), (markers, "--markers", "file"), (plot, "--plot", "file")],
        (input_h5ad, model_dir),
        overwrite=overwrite,
    )
    bundle = read_bundle(model_dir)
    check_mode(bundle, spatial=spatial)
    bundle.require(ONNX_FILES[view])  # a model trained with --no-export fails here, before the query's graph
    query = ChunkedH5ad(input_h5ad, expression=bundle.manifest.preprocessing.expression, from_model=True)
    inference.query_coords(query, bundle)  # a spatial model's coordinates, checked before any work or output
    if plot is not None:
        _require_matplotlib()
    with _progress(not ctx.obj["quiet"]) as make:
        rep = inference.cluster_file(
            query,
            bundle,
            denovo=denovo,
            n_clusters=n_clusters,
            seed=seed,
            view=view,
            device=as_device(device),
            threads=threads,
            batch_size=batch_size,
            min_gene_overlap=min_gene_overlap,
            key_added=key_added,
            progress=make("embedding", query.n_obs),
        )
    new = rep.embed.annotations
    write_h5ad_patched(input_h5ad, output, new, overwrite=overwrite)
    if plot is not None:
        key = "scrcl_cluster_refined" if "scrcl_cluster_refined" in new.obs else "scrcl_cluster"
        if query.spatial is not None and bundle.is_spatial:
            from .spatial import plot_domains

            plot_domains(query.spatial, np.asarray(new.obs[key]), plot, title=f"{input_h5ad.name}: {key}", overwrite=overwrite)
        else:
            from .plotting import plot_embedding

            plot_embedding(
                new.obsm[key_added],
                np.asarray(new.obs[key]),
                plot,
                seed=seed,
                title=f"{input_h5ad.name}: {key}",
                overwrite=overwrite,
            )
    _write_csv(
        markers,
        ["cluster", "rank", "gene", "log2_fold_change", "mean_lognorm_in_cluster", "fraction_expressing"],
        ([c, r, g, f"{a:.4f}", f"{b:.4f}", f"{f:.4f}"] for c, r, g, a, b, f in rep.markers),
        overwrite=overwrite,
    )
    _summary(
        "scrcl-cli cluster",
        [
            ("cells", str(rep.embed.n_cells)),
            ("genes matched", f"{rep.embed.n_genes_found} of {rep.embed.n_genes_model}"),
            ("clusters", f"{rep.n_clusters} ({rep.method})"),
            ("view", rep.embed.view),
            ("provider", rep.embed.provider),
            ("time", f"{time.perf_counter() - t:.1f} s"),
            ("written", ", ".join(str(p) for p in (output, markers, plot) if p is not None)),
        ],
    )


# ---------------------------------------------------------------- export / info / demo


@cli.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@quiet_option
@click.pass_context
def export(ctx: click.Context, model_dir: Path) -> None:
    """Re-export the ONNX encoders of MODEL_DIR from its torch weights (the folder is rewritten atomically)."""
    from .workflow import re_export

    # MODEL_DIR is both read and rewritten: checked as an output that replaces only our own folder
    _guard(ctx, [(model_dir, "MODEL_DIR", "model")], (), overwrite=True)
    written = re_export(model_dir)
    log.info("re-exported %s", ", ".join(written))


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

        lines += [
            f"onnxruntime {ort.__version__} ({', '.join(ort_distributions())})",
            f"onnxruntime providers: {', '.join(ort.get_available_providers())}",
        ]
    except ImportError:
        lines.append("onnxruntime: not installed")
    click.echo("\n".join(lines))


@cli.command()
@_opt(
    "-o",
    "--output",
    "outdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("scrcl_demo"),
    help="Folder for the model and the clustered copy.",
)
@_opt("--epochs", type=_range("epochs"), default=C.DEMO_EPOCHS)
@_opt("--hidden-dim", type=_range("hidden_dim"), default=C.DEMO_HIDDEN_DIM)
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
    model, clustered = outdir / "model", outdir / "pbmc68k_clustered.h5ad"
    hyper = {k: v for k, v in C.TRAIN_DEFAULTS.as_dict().items() if k not in ("seed", "n_top_genes")}
    hyper.update(epochs=epochs, hidden_dim=hidden_dim)
    ctx.invoke(
        train,
        input_h5ad=example,
        output=model,
        out_h5ad=None,
        n_clusters=None,
        spatial=False,
        refine_neighbours=C.REFINE_NEIGHBOURS,
        batch_size=None,
        out_of_core=False,
        no_export=False,
        seed=seed,
        device=device,
        threads=0,
        overwrite=overwrite,
        n_top_genes=None,
        **hyper,
    )
    ctx.invoke(
        cluster,
        input_h5ad=example,
        model_dir=model,
        output=clustered,
        markers=None,
        denovo=False,
        n_clusters=None,
        view="fused",
        key_added=C.KEY_ADDED,
        spatial=False,
        plot=None,
        batch_size=C.BATCH_SIZE,
        min_gene_overlap=C.MIN_GENE_OVERLAP,
        seed=seed,
        device="cpu" if device == "cpu" else "auto",
        threads=0,
        overwrite=overwrite,
    )
    pred = anndata.read_h5ad(clustered).obs["scrcl_cluster"].to_numpy()
    score = ari_against_annotation(example, np.asarray(pred))  # evaluation only, after clustering
    click.echo(
        f"demo: ARI against the published PBMC annotation = {score:.3f} "
        f"({len(set(pred))} clusters, 10 annotated types); outputs in {outdir}"
    )


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ScrclError(
            "--plot needs matplotlib, which is not installed", "pip install 'scrcl-cli[plot]' or drop --plot"
        ) from None


def main() -> None:
    """Console entry point."""
    _install_signal_handlers()  # before parsing, so that an early SIGTERM still removes temporaries
    try:
        cli(prog_name="scrcl-cli")
    except KeyboardInterrupt:
        click.echo("error: interrupted; partial outputs were removed.", err=True)
        sys.exit(130)
