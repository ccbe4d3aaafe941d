"""Fuzz: random small AnnData files through train, embed and cluster.

Each example either succeeds with finite outputs or fails with exactly one `error:` line on
stderr and exit code 1; no other exception may escape the CLI. The commands run in-process
through CliRunner (a subprocess per example would cost a torch import each); `result.exception`
must then be None or the SystemExit of a normal exit. Sizes stay tiny and examples few, so the
whole file runs in well under three minutes on two CPU cores.
"""

from __future__ import annotations

import signal
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from click.testing import CliRunner, Result
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from robustness_helpers import error_lines, write_adata

from scrcl_cli import bundle
from scrcl_cli.cli import cli

FUZZ = settings(max_examples=20, deadline=None, derandomize=True, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])
EXAMPLE_TIMEOUT_S = 120  # a hang fails the example instead of the whole run

SPECIALS = [None] * 8 + ["nan", "inf", "huge", "float32_max", "negative", "fraction", "zero_cells",
            "zero_genes", "one_value", "dup_genes", "dup_cells"]


@dataclass
class RandomH5ad:
    """A random matrix and the names to store with it."""

    x: object
    var_names: list[str]
    obs_names: list[str]
    desc: str


@st.composite
def random_h5ad(draw: st.DrawFn, gene_pool: list[str] | None = None, max_cells: int = 40,
                max_genes: int = 30, odd_shapes: bool = True) -> RandomH5ad:
    """Dense or sparse, float or int, odd shapes, empty obs/var, NaNs, huge values, duplicate names."""
    if odd_shapes and draw(st.integers(0, 3)) == 0:  # a quarter of the examples: 0-3 cells or genes
        n, g = draw(st.integers(0, 3)), draw(st.integers(0, max_genes))
        if draw(st.booleans()):
            n, g = draw(st.integers(0, max_cells)), draw(st.integers(0, 3))
    else:
        n, g = draw(st.integers(12, max_cells)), draw(st.integers(4, max_genes))
    dtype = draw(st.sampled_from(["float32", "float64", "int32", "int64", "uint16"]))
    layout = draw(st.sampled_from(["dense", "csr", "csc"]))
    density = draw(st.sampled_from([0.0, 0.05, 0.3, 1.0]))
    special = draw(st.sampled_from(SPECIALS))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))

    x = rng.poisson(draw(st.sampled_from([0.5, 3.0, 50.0])), (n, g)).astype(np.float64)
    x *= rng.random((n, g)) < density
    if x.size:
        i, j = rng.integers(n), rng.integers(g)
        if special == "nan":
            x[i, j] = np.nan
        elif special == "inf":
            x[i, j] = np.inf
        elif special == "huge":
            x[i, j] = 3e9
        elif special == "float32_max":
            x[i, j] = float(np.finfo(np.float32).max)
        elif special == "negative":
            x[i, j] = -2
        elif special == "fraction":
            x[i, j] = 0.5
        elif special == "zero_cells":
            x[: max(1, n // 2)] = 0
        elif special == "zero_genes":
            x[:, : max(1, g // 2)] = 0
        elif special == "one_value":
            x[:] = 1
    if np.issubdtype(np.dtype(dtype), np.integer):
        info = np.iinfo(np.dtype(dtype))
        x = np.nan_to_num(x, nan=0, posinf=info.max, neginf=info.min)
        x = np.clip(np.round(x), info.min, min(info.max, 2**62))  # 2**63 - 1 is not a float64
    x = x.astype(dtype)
    if layout != "dense":
        x = sp.csr_matrix(x) if layout == "csr" else sp.csc_matrix(x)

    if gene_pool is None:
        var_names = [f"g{j}" for j in range(g)]
    else:  # a random subset of the model's genes, plus some it does not know
        known = rng.choice(gene_pool, size=min(g, len(gene_pool)), replace=False).tolist()
        var_names = [name if rng.random() < 0.8 else f"unknown{j}" for j, name in enumerate(known)]
    obs_names = [f"c{i}" for i in range(n)]
    if special == "dup_genes" and g >= 2:
        var_names[1] = var_names[0]
    if special == "dup_cells" and n >= 2:
        obs_names[1] = obs_names[0]
    return RandomH5ad(x=x, var_names=var_names, obs_names=obs_names,
                      desc=f"{n}x{g} {dtype} {layout} density={density} special={special}")


@contextmanager
def _deadline(seconds: int) -> Iterator[None]:
    def on_alarm(signum: int, frame: object) -> None:
        raise TimeoutError(f"example ran longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(autouse=True)
def _restore_sigterm() -> Iterator[None]:
    # The CLI installs its SIGTERM/SIGINT handler in this process when run through CliRunner.
    old = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in old.items():
        signal.signal(sig, handler)


@dataclass
class Run:
    """A CliRunner result and the stderr a user would see (Python warnings included)."""

    exit_code: int
    stderr: str


def _invoke(args: list[str]) -> Run:
    # pytest swallows warnings that a user's terminal would show: record them with Python's
    # default filters and add them to stderr, as a subprocess would print them.
    with _deadline(EXAMPLE_TIMEOUT_S), warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        warnings.simplefilter("default")
        for quiet in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.simplefilter("ignore", quiet)
        res: Result = CliRunner().invoke(cli, ["-q", *args])
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        import traceback

        tb = "".join(traceback.format_exception(*res.exc_info)) if res.exc_info else repr(res.exception)
        pytest.fail(f"{args[0]} raised {type(res.exception).__name__}:\n{tb}\nstderr:\n{res.stderr}")
    shown = "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno) for w in caught)
    return Run(exit_code=res.exit_code, stderr=shown + res.stderr)


def _assert_success_or_one_line_error(res: Run, desc: str) -> bool:
    """True on success; on failure the one-line error contract must hold."""
    if res.exit_code == 0:
        event("success")
        return True
    lines = error_lines(res.stderr)
    assert res.exit_code == 1, f"{desc}: exit {res.exit_code}\n{res.stderr}"
    assert "Traceback" not in res.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), f"{desc}:\n{res.stderr}"
    event(f"error: {lines[0].split(' ', 2)[-1][:40]}")
    return False


def _read(path: Path):
    import anndata as ad

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # duplicate cell names are kept on purpose
        return ad.read_h5ad(path)


@FUZZ
@given(case=random_h5ad(), k=st.integers(2, 16), n_clusters=st.one_of(st.none(), st.integers(1, 6)))
def test_train_succeeds_with_finite_outputs_or_one_line_error(case: RandomH5ad, k: int, n_clusters: int | None):
    with tempfile.TemporaryDirectory() as tmp:
        src = write_adata(Path(tmp) / "in.h5ad", case.x, case.var_names, case.obs_names)
        model, out = Path(tmp) / "model", Path(tmp) / "out.h5ad"
        args = ["train", str(src), "-o", str(model), "--out-h5ad", str(out), "--epochs", "2", "--hidden-dim", "8",
                "--out-dim", "3", "--n-top-genes", "20", "--n-neighbors", str(k), "--no-export"]
        if n_clusters is not None:
            args += ["--n-clusters", str(n_clusters)]
        if not _assert_success_or_one_line_error(_invoke(args), case.desc):
            assert not model.exists() and not out.exists(), "a failed run left an output behind"
            return
        trained = bundle.read_bundle(model)
        assert np.isfinite(np.load(model / "train_embedding.npy")).all()
        adata = _read(out)
        used = adata.obs["scrcl_cluster"].notna().to_numpy()
        emb = adata.obsm["X_scrcl"]
        assert used.any() and np.isfinite(emb[used]).all(), case.desc
        assert np.isnan(emb[~used]).all()  # dropped (all-zero) cells are marked, not invented
        assert trained.manifest.training["n_cells"] == int(used.sum())


@pytest.fixture(scope="module")
def model_genes(trained_model: Path) -> list[str]:
    return bundle.read_bundle(trained_model).genes


@FUZZ
@given(data_=st.data(), command=st.sampled_from(["embed", "cluster"]), view=st.sampled_from(["fused", "cell"]),
       batch_size=st.sampled_from([1, 3, 4096]), denovo=st.booleans(), n_clusters=st.one_of(st.none(), st.integers(1, 8)))
def test_embed_and_cluster_succeed_with_finite_outputs_or_one_line_error(
    trained_model: Path, model_genes: list[str], data_: st.DataObject, command: str, view: str, batch_size: int,
    denovo: bool, n_clusters: int | None,
):
    case = data_.draw(random_h5ad(gene_pool=model_genes, max_genes=60))
    with tempfile.TemporaryDirectory() as tmp:
        src = write_adata(Path(tmp) / "query.h5ad", case.x, case.var_names, case.obs_names)
        out = Path(tmp) / "out.h5ad"
        args = [command, str(src), "-m", str(trained_model), "-o", str(out), "--view", view,
                "--batch-size", str(batch_size), "--min-gene-overlap", "0", "--device", "cpu"]
        if command == "cluster" and denovo:
            args += ["--denovo"] + (["--n-clusters", str(n_clusters)] if n_clusters else [])
        if not _assert_success_or_one_line_error(_invoke(args), f"{command} {view} {case.desc}"):
            assert not out.exists()
            return
        adata = _read(out)
        assert np.isfinite(adata.obsm["X_scrcl"]).all(), case.desc
        assert adata.obsm["X_scrcl"].shape[0] == adata.n_obs
        if command == "cluster":
            assert adata.obs["scrcl_cluster"].notna().all()
            assert np.isfinite(adata.obs["scrcl_confidence"].to_numpy()).all()


def test_train_export_then_cluster_round_trip_on_random_data():
    """Exported ONNX files of models trained on odd data load and run; at least one example must get that far.

    Examples whose training ends in a one-line error are allowed, but a run in which no example
    trained would test nothing, so the outcomes are collected and checked.
    """
    outcomes: list[str] = []

    @settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow],
              database=None)
    @given(case=random_h5ad(max_cells=40, max_genes=30, odd_shapes=False))
    def example(case: RandomH5ad) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            src = write_adata(Path(tmp) / "in.h5ad", case.x, case.var_names, case.obs_names)
            model, out = Path(tmp) / "model", Path(tmp) / "out.h5ad"
            res = _invoke(["train", str(src), "-o", str(model), "--epochs", "2", "--hidden-dim", "8", "--out-dim", "3",
                           "--n-top-genes", "20", "--n-neighbors", "5"])
            if not _assert_success_or_one_line_error(res, case.desc):
                outcomes.append("train error")
                return
            res = _invoke(["cluster", str(src), "-m", str(model), "-o", str(out), "--device", "cpu"])
            if not _assert_success_or_one_line_error(res, case.desc):
                outcomes.append("cluster error")
                return
            clustered = _read(out)
            assert np.isfinite(clustered.obsm["X_scrcl"]).all()
            assert clustered.obs["scrcl_cluster"].notna().all()
            k = bundle.read_bundle(model).manifest.clusters.n_clusters
            assert set(clustered.obs["scrcl_cluster"].astype(int)) <= set(range(k))
            outcomes.append("round trip")

    example()
    assert "round trip" in outcomes, f"no generated example trained and clustered: {outcomes}"
