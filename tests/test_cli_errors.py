"""The bad-input catalogue: every case runs the real CLI (`python -m scrcl_cli`) in a subprocess.

Each case asserts a non-zero exit, exactly one stderr line that starts with `error:` and names
the problem and the fix, and no traceback. Inputs are written once per module; the model is
the session's `trained_model` (conftest), copied before any case damages it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from conftest import EXAMPLE
from robustness_helpers import (
    FAST_TRAIN,
    assert_one_line_error,
    error_lines,
    poisson_counts,
    run_cli,
    sha256_file,
    write_adata,
)

from scrcl_cli import bundle


@pytest.fixture(scope="module")
def bad(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of damaged and unusual .h5ad files, one per catalogue case."""
    d = tmp_path_factory.mktemp("bad_inputs")
    x = poisson_counts(60, 50)
    write_adata(d / "good.h5ad", x)
    (d / "text.h5ad").write_text("cell,g1\nc1,3\n")
    blob = (d / "good.h5ad").read_bytes()
    (d / "truncated.h5ad").write_bytes(blob[: len(blob) // 2])
    import anndata as ad

    no_x = ad.read_h5ad(d / "good.h5ad")
    no_x.X = None
    no_x.write_h5ad(d / "no_x.h5ad")
    write_adata(d / "zero_cells.h5ad", np.zeros((0, 50), np.float32))
    write_adata(d / "zero_genes.h5ad", np.zeros((60, 0), np.float32))
    for name, value in (("nan", np.nan), ("inf", np.inf), ("negative", -1.0), ("huge", 1e12)):
        y = x.copy()
        y[3, 4] = value
        write_adata(d / f"{name}.h5ad", sp.csr_matrix(y))
    write_adata(d / "lognorm.h5ad", np.log1p(x))
    write_adata(d / "duplicate_genes.h5ad", x, var_names=[f"g{j % 49}" for j in range(50)])
    write_adata(d / "few_cells.h5ad", poisson_counts(10, 50))
    write_adata(d / "all_zero.h5ad", np.zeros((60, 50), np.float32))
    y = x.copy()
    y[:5] = 0
    y[:, :3] = 0
    write_adata(d / "some_zero.h5ad", y)
    (d / "a_directory.h5ad").mkdir()
    (d / "regular_file").write_text("not a directory\n")
    return d


@dataclass(frozen=True)
class Case:
    """One catalogue entry: the arguments (built from the fixtures) and words the error must contain."""

    id: str
    args: Callable[[Path, Path, Path], list[str]]  # (bad inputs, model, tmp_path) -> CLI args
    needles: tuple[str, ...]


def _train(name: str, *extra: str) -> Callable[[Path, Path, Path], list[str]]:
    return lambda bad, model, tmp: ["train", str(bad / name), "-o", str(tmp / "model"), *FAST_TRAIN, *extra]


def _embed(name: str, *extra: str) -> Callable[[Path, Path, Path], list[str]]:
    def args(bad: Path, model: Path, tmp: Path) -> list[str]:
        src = EXAMPLE if name == "EXAMPLE" else bad / name
        return ["embed", str(src), "-m", str(model), "-o", str(tmp / "out.h5ad"), *extra]

    return args


INPUT_CASES = [
    Case("missing_file", _train("nope.h5ad"), ("does not exist", "check the path")),
    Case("a_directory", _train("a_directory.h5ad"), ("is a directory", "path of the .h5ad file")),
    Case("not_hdf5", _train("text.h5ad"), ("not an HDF5", "convert it with anndata")),
    Case("truncated", _train("truncated.h5ad"), ("could not be read", "truncated")),
    Case("no_x", _train("no_x.h5ad"), ("no X matrix", "adata.X")),
    Case("zero_cells", _train("zero_cells.h5ad"), ("0 cells", "filter")),
    Case("zero_genes", _train("zero_genes.h5ad"), ("0 genes", "filter")),
    Case("nan", _train("nan.h5ad"), ("1 NaN or infinite", "remove or impute")),
    Case("inf", _train("inf.h5ad"), ("1 NaN or infinite", "remove or impute")),
    Case("negative", _train("negative.h5ad"), ("negative values", "raw counts")),
    Case("huge_values", _train("huge.h5ad"), ("too large", "raw counts")),
    Case("non_integer_train", _train("lognorm.h5ad"), ("non-integer", "raw counts", "--expression log")),
    Case("non_integer_embed", _embed("lognorm.h5ad"), ("non-integer", "trained on raw counts", "--expression log")),
    Case("duplicate_genes", _train("duplicate_genes.h5ad"), ("duplicate gene names", "var_names_make_unique")),
    Case("all_zero", _train("all_zero.h5ad"), ("zero counts", "expression values")),
    Case("fewer_cells_than_k_plus_1", _train("few_cells.h5ad", "--no-export"), ("fewer than --n-neighbors + 1", "smaller --n-neighbors")),
    Case("gene_overlap_too_low", _embed("good.h5ad"), ("none of the", "model genes were found", "gene identifiers")),
    Case("missing_file_embed", _embed("nope.h5ad"), ("does not exist", "check the path")),
]


@pytest.mark.parametrize("case", INPUT_CASES, ids=[c.id for c in INPUT_CASES])
def test_bad_input_exits_1_with_one_line_error(case: Case, bad: Path, trained_model: Path, tmp_path: Path):
    before = {p.name: sha256_file(p) for p in bad.iterdir() if p.is_file()}
    res = run_cli("-q", *case.args(bad, trained_model, tmp_path))
    assert_one_line_error(res.stderr, res.returncode, *case.needles)
    assert not (tmp_path / "model").exists() and not (tmp_path / "out.h5ad").exists()
    assert {p.name: sha256_file(p) for p in bad.iterdir() if p.is_file()} == before


def test_cluster_single_cell_fused_view_exits_1_with_one_line_error(tmp_path: Path, trained_model: Path):
    import anndata as ad

    ad.read_h5ad(EXAMPLE)[:1].copy().write_h5ad(tmp_path / "one.h5ad")
    res = run_cli("-q", "cluster", tmp_path / "one.h5ad", "-m", trained_model, "-o", tmp_path / "out.h5ad")
    assert_one_line_error(res.stderr, res.returncode, "1 cell", "at least 2 cells")


@pytest.mark.parametrize("command", ["train", "cluster"])
def test_more_clusters_than_cells_exits_1_with_one_line_error(command: str, tmp_path: Path, trained_model: Path):
    import anndata as ad

    n = ad.read_h5ad(EXAMPLE, backed="r").n_obs
    extra = ["--epochs", "1", "--hidden-dim", "8"] if command == "train" else ["-m", trained_model, "--denovo"]
    out = tmp_path / ("m" if command == "train" else "out.h5ad")
    res = run_cli("-q", command, EXAMPLE, "-o", out, "--n-clusters", str(n + 1), *extra)
    assert_one_line_error(res.stderr, res.returncode, f"--n-clusters {n + 1}", f"{n} cells")
    assert not out.exists()


def test_train_drops_all_zero_cells_and_genes_with_a_count_in_the_log(bad: Path, tmp_path: Path):
    # A success case, so in-process (CliRunner): a subprocess would pay the torch import again.
    from click.testing import CliRunner

    from scrcl_cli.cli import cli

    res = CliRunner().invoke(cli, ["train", str(bad / "some_zero.h5ad"), "-o", str(tmp_path / "model"), *FAST_TRAIN,
                                   "--n-neighbors", "5", "--no-export"])
    assert res.exit_code == 0, res.output
    assert "dropped 5 all-zero cells and 3 all-zero genes" in " ".join(res.stderr.split())
    assert bundle.read_bundle(tmp_path / "model").manifest.training["n_cells_dropped"] == 5


# ----------------------------------------------------------------------------- model directories


def _copy_model(model: Path, tmp: Path) -> Path:
    dest = tmp / "model_copy"
    shutil.copytree(model, dest)
    return dest


def _edit_manifest(model: Path, edit: Callable[[dict], None]) -> None:
    path = model / bundle.MANIFEST_NAME
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def _corrupt_manifest(m: Path) -> None:
    (m / bundle.MANIFEST_NAME).write_text('{"format_version": 1, "files": ')


def _tamper_onnx(m: Path) -> None:
    with (m / "encoder_fused.onnx").open("ab") as fh:
        fh.write(b"\0")


def _tamper_genes(m: Path) -> None:
    _edit_manifest(m, lambda d: d["genes"].reverse())


def _newer_format(m: Path) -> None:
    _edit_manifest(m, lambda d: d.update(format_version=bundle.FORMAT_VERSION + 1))


def _older_format(m: Path) -> None:
    _edit_manifest(m, lambda d: d.update(format_version=1))


def _path_outside(m: Path) -> None:
    (m.parent / "outside.bin").write_bytes(b"x")
    _edit_manifest(m, lambda d: d["files"].update({"../outside.bin": bundle.sha256_bytes(b"x")}))


def _missing_listed_file(m: Path) -> None:
    (m / "encoder_cell.onnx").unlink()


def _no_manifest(m: Path) -> None:
    (m / bundle.MANIFEST_NAME).unlink()


def _no_onnx(m: Path) -> None:  # what `train --no-export` writes
    for name in ("encoder_fused.onnx", "encoder_cell.onnx"):
        (m / name).unlink()
    _edit_manifest(m, lambda d: [d["files"].pop(n) for n in ("encoder_fused.onnx", "encoder_cell.onnx")])


MODEL_CASES = [
    ("corrupt_manifest", _corrupt_manifest, ("manifest of", "is invalid", "not json")),
    ("tampered_onnx_hash_mismatch", _tamper_onnx, ("encoder_fused.onnx", "does not match the sha256", "restore")),
    ("tampered_gene_list", _tamper_genes, ("gene list does not match genes_sha256", "retrain")),
    ("newer_format", _newer_format, ("newer than this scrcl-cli supports", "upgrade scrcl-cli")),
    ("older_format", _older_format, ("model format 1", "does not read", "retrain")),
    ("path_outside_model_dir", _path_outside, ("not a model file name",)),
    ("listed_file_missing", _missing_listed_file, ("is missing encoder_cell.onnx", "restore")),
    ("no_manifest", _no_manifest, ("has no scrcl_model.json", "scrcl-cli train")),
    ("no_onnx_export", _no_onnx, ("has no encoder_fused.onnx", "scrcl-cli export")),
]


# embed and cluster share bundle.read_bundle, so cluster is run on the hash mismatch only.
MODEL_RUNS = [("embed", *c) for c in MODEL_CASES] + [("cluster", *c) for c in MODEL_CASES if c[1] is _tamper_onnx]


@pytest.mark.parametrize(("command", "damage", "needles"), [r[:1] + r[2:] for r in MODEL_RUNS],
                         ids=[f"{r[0]}-{r[1]}" for r in MODEL_RUNS])
def test_bad_model_directory_exits_1_with_one_line_error(command: str, damage: Callable[[Path], None],
                                                         needles: tuple[str, ...], trained_model: Path, tmp_path: Path):
    model = _copy_model(trained_model, tmp_path)
    damage(model)
    res = run_cli("-q", command, EXAMPLE, "-m", model, "-o", tmp_path / "out.h5ad")
    assert_one_line_error(res.stderr, res.returncode, *needles)
    assert not (tmp_path / "out.h5ad").exists()


def _rehash(model: Path, name: str, blob: bytes) -> None:
    """Replace a model file and update its manifest hash, as a deliberate tamperer would."""
    (model / name).write_bytes(blob)
    _edit_manifest(model, lambda d: d["files"].update({name: bundle.sha256_bytes(blob)}))


def test_rehashed_garbage_onnx_exits_1(trained_model: Path, tmp_path: Path):
    model = _copy_model(trained_model, tmp_path)
    _rehash(model, "encoder_fused.onnx", b"not an onnx model")
    res = run_cli("-q", "embed", EXAMPLE, "-m", model, "-o", tmp_path / "out.h5ad")
    assert_one_line_error(res.stderr, res.returncode, "encoder_fused.onnx", "not a valid scrcl-cli encoder", "re-export")


_PICKLED_CODE = """
import io, os, sys, torch
class Payload:
    def __reduce__(self):
        return (os.system, ("touch " + sys.argv[2],))
buf = io.BytesIO()
torch.save({"gene_emb": Payload()}, buf)
sys.stdout.buffer.write(buf.getvalue())
"""


def test_export_refuses_weights_with_pickled_code(trained_model: Path, tmp_path: Path):
    import subprocess
    import sys

    pytest.importorskip("torch")
    marker = tmp_path / "code_ran"
    blob = subprocess.run([sys.executable, "-c", _PICKLED_CODE, "x", str(marker)], capture_output=True, check=True).stdout
    model = _copy_model(trained_model, tmp_path)
    _rehash(model, "weights.pt", blob)
    res = run_cli("-q", "export", model)
    assert_one_line_error(res.stderr, res.returncode, "objects other than tensors", "trusted source")
    assert not marker.exists(), "weights.pt was unpickled with code execution"


@pytest.mark.parametrize(("model_arg", "needles"), [
    ("nope", ("does not exist", "scrcl-cli train")),
    ("file", ("is a file, not a model folder", "scrcl-cli train")),
], ids=["missing_model_dir", "model_is_a_file"])
def test_model_path_that_is_no_model_directory_exits_1(model_arg: str, needles: tuple[str, ...], bad: Path,
                                                        tmp_path: Path):
    model = tmp_path / "nope" if model_arg == "nope" else bad / "good.h5ad"
    res = run_cli("-q", "embed", EXAMPLE, "-m", model, "-o", tmp_path / "out.h5ad")
    assert_one_line_error(res.stderr, res.returncode, *needles)


def test_spatial_flag_with_expression_model_exits_1(trained_model: Path, tmp_path: Path):
    res = run_cli("-q", "embed", EXAMPLE, "-m", trained_model, "-o", tmp_path / "out.h5ad", "--spatial")
    assert_one_line_error(res.stderr, res.returncode, "--spatial was given", "drop --spatial")


# ----------------------------------------------------------------------------- outputs


def test_embed_existing_output_without_force_exits_1_and_keeps_it(trained_model: Path, tmp_path: Path):
    out = tmp_path / "out.h5ad"
    out.write_bytes(b"previous")
    res = run_cli("-q", "embed", EXAMPLE, "-m", trained_model, "-o", out)
    assert_one_line_error(res.stderr, res.returncode, "already exists", "--overwrite")
    assert out.read_bytes() == b"previous"


def test_train_existing_model_directory_without_force_exits_1(tmp_path: Path):
    (tmp_path / "model").mkdir()
    res = run_cli("-q", "train", EXAMPLE, "-o", tmp_path / "model", *FAST_TRAIN)
    assert_one_line_error(res.stderr, res.returncode, "already exists", "--overwrite")


@pytest.mark.parametrize("command", ["train", "embed", "cluster"])
def test_output_that_is_the_input_exits_1_even_with_force(command: str, trained_model: Path, tmp_path: Path):
    src = tmp_path / "in.h5ad"
    shutil.copyfile(EXAMPLE, src)
    before = sha256_file(src)
    extra = FAST_TRAIN if command == "train" else ["-m", str(trained_model)]
    res = run_cli("-q", command, src, "-o", src, "--force", *extra)
    assert_one_line_error(res.stderr, res.returncode, "is the input", "another output path")
    assert sha256_file(src) == before


@pytest.mark.parametrize("where", ["parent_is_a_file", "proc"])
def test_unwritable_output_directory_exits_1(where: str, bad: Path, trained_model: Path, tmp_path: Path):
    # Tests run as root, so a chmod-ed folder would still be writable: use paths no one can write.
    out = bad / "regular_file" / "out.h5ad" if where == "parent_is_a_file" else Path("/proc/scrcl_test/out.h5ad")
    res = run_cli("-q", "embed", EXAMPLE, "-m", trained_model, "-o", out)
    problem = "is a file, not a folder" if where == "parent_is_a_file" else "cannot write -o/--output"
    assert_one_line_error(res.stderr, res.returncode, problem, "writable folder")


def test_unwritable_log_file_exits_1(bad: Path, trained_model: Path, tmp_path: Path):
    res = run_cli("-q", "--log-file", bad / "regular_file" / "log.txt", "embed", EXAMPLE, "-m", trained_model,
                  "-o", tmp_path / "out.h5ad")
    assert_one_line_error(res.stderr, res.returncode, "--log-file", "is a file, not a folder")


# ----------------------------------------------------------------------------- devices


def test_train_device_cuda_without_gpu_exits_1(tmp_path: Path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible; this case needs a machine without one")
    res = run_cli("-q", "train", EXAMPLE, "-o", tmp_path / "model", *FAST_TRAIN, "--device", "cuda")
    assert_one_line_error(res.stderr, res.returncode, "torch sees no CUDA device", "--device auto or cpu", "--gpus all")
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize("command", ["embed", "cluster"])
def test_inference_device_cuda_without_cuda_provider_exits_1(command: str, trained_model: Path, tmp_path: Path):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has a CUDAExecutionProvider")
    res = run_cli("-q", command, EXAMPLE, "-m", trained_model, "-o", tmp_path / "out.h5ad", "--device", "cuda")
    assert_one_line_error(res.stderr, res.returncode, "no CUDAExecutionProvider", "onnxruntime-gpu", "--device cpu")


# A CUDA provider that is listed but fails to load: ONNX Runtime then silently runs on CPU. Simulated
# by listing CUDA as available and handing the session only the CPU provider, as a failed load does.
_FAILING_CUDA = """
import sys
import onnxruntime as ort
real_available = ort.get_available_providers
ort.get_available_providers = lambda: ["CUDAExecutionProvider", *real_available()]
class Session(ort.InferenceSession):
    def __init__(self, model, sess_options=None, providers=None, **kw):
        providers = [p for p in providers or [] if p != "CUDAExecutionProvider"]
        super().__init__(model, sess_options=sess_options, providers=providers, **kw)
ort.InferenceSession = Session
from scrcl_cli.cli import main
sys.argv = ["scrcl-cli", *sys.argv[1:]]
main()
"""


def test_embed_device_cuda_with_provider_that_fails_to_load_exits_1(trained_model: Path, tmp_path: Path):
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", _FAILING_CUDA, "-q", "embed", str(EXAMPLE), "-m", str(trained_model),
                          "-o", str(tmp_path / "out.h5ad"), "--device", "cuda"],
                         capture_output=True, text=True, timeout=240, check=False)
    assert_one_line_error(res.stderr, res.returncode, "fell back to CPUExecutionProvider", "CUDA/cuDNN", "--device auto or cpu")
    assert not (tmp_path / "out.h5ad").exists()


# ----------------------------------------------------------------------------- usage and --debug


def test_debug_shows_the_traceback(tmp_path: Path):
    res = run_cli("--debug", "-q", "train", tmp_path / "nope.h5ad", "-o", tmp_path / "model")
    assert res.returncode != 0
    assert "Traceback" in res.stderr and "ScrclError" in res.stderr and "does not exist" in res.stderr


@pytest.mark.parametrize("args", [
    ["embed", "x.h5ad", "-o", "out.h5ad"],  # missing --model
    ["train", "x.h5ad", "-o", "m", "--epochs", "0"],
    ["train", "x.h5ad", "-o", "m", "--device", "tpu"],
    ["frobnicate"],
], ids=["missing_option", "out_of_range", "bad_choice", "unknown_command"])
def test_bad_usage_exits_2_with_click_message(args: list[str], tmp_path: Path):
    res = run_cli(*args, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    assert any(line.startswith("Error: ") for line in error_lines(res.stderr)), res.stderr


def test_cluster_plot_of_an_expression_model_writes_a_layout_png(tmp_path: Path, trained_model: Path):
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "out.h5ad", tmp_path / "layout.png"
    res = run_cli("-q", "cluster", EXAMPLE, "-m", trained_model, "-o", out, "--plot", png)
    assert res.returncode == 0, res.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
