"""A catalogue of hostile inputs, outputs and model folders, made from a real shared dataset.

Every case checks the whole contract: the exit code, exactly one ``error:`` line on stderr (or a
usage error, exit 2), the input's sha256 unchanged, and nothing outside the asked-for outputs
touched (the sha256 of every file in the working folder). Runs are in-process (Click's runner),
which is what the CLI's entry point calls.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import shared
from robustness_helpers import FAST_TRAIN, error_lines, sha256_tree

from scrcl_cli import bundle
from scrcl_cli.cli import cli

DATASET = "pbmc68k_reduced_700.h5ad"


@dataclass
class Run:
    code: int
    stderr: str


def invoke(*args: str | Path, cwd: Path | None = None) -> Run:
    old = Path.cwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        res = CliRunner().invoke(cli, [str(a) for a in args])
    finally:
        os.chdir(old)
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return Run(res.exit_code, res.stderr)


def assert_refused(run: Run, *needles: str, code: int = 1) -> None:
    lines = error_lines(run.stderr)
    assert run.code == code, run.stderr
    assert "Traceback" not in run.stderr
    if code == 2:  # Click's usage errors: "Usage:" lines, then "Error: ..."
        assert lines[-1].startswith("Error: "), run.stderr
        text = lines[-1]
    else:
        assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
        text = lines[0]
    for needle in needles:
        assert needle.lower() in text.lower(), f"{needle!r} not in {text!r}"


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A working folder holding a copy of the real dataset as `in.h5ad` and a user's file."""
    src = shared(DATASET)
    shutil.copyfile(src, tmp_path / "in.h5ad")
    (tmp_path / "notes.txt").write_text("a user's file\n")
    return tmp_path


@pytest.fixture
def model(trained_model: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "model"
    shutil.copytree(trained_model, dest)
    return dest


def unchanged(folder: Path) -> Callable[[], None]:
    before = sha256_tree(folder)

    def check() -> None:
        assert sha256_tree(folder) == before, "files the run did not own changed"
    return check


# ----------------------------------------------------------------------------- outputs


def test_train_into_the_folder_holding_its_input_is_refused(work: Path):
    same = unchanged(work)
    assert_refused(invoke("-q", "train", work / "in.h5ad", "-o", work, "--overwrite", *FAST_TRAIN), "contains the input")
    same()


def test_overwrite_never_deletes_an_unrelated_folder(work: Path):
    results = work / "results"
    results.mkdir()
    (results / "figure.png").write_bytes(b"precious")
    same = unchanged(work)
    assert_refused(invoke("-q", "train", work / "in.h5ad", "-o", results, "--overwrite", *FAST_TRAIN),
                   "holds files scrcl-cli did not write")
    same()


def test_output_that_is_the_working_directory_is_refused(work: Path):
    same = unchanged(work)
    sub = work / "sub"
    sub.mkdir()
    assert_refused(invoke("-q", "train", work / "in.h5ad", "-o", ".", "--overwrite", *FAST_TRAIN, cwd=sub),
                   "working directory")
    assert_refused(invoke("-q", "train", work / "in.h5ad", "-o", work, "--overwrite", *FAST_TRAIN, cwd=sub),
                   "contains the input")
    same()


@pytest.mark.parametrize("target", ["input", "manifest", "hard_link"])
def test_log_file_never_writes_into_an_input_or_the_model(target: str, work: Path, model: Path):
    if target == "hard_link":
        os.link(work / "in.h5ad", work / "linked.log")
    log = {"input": work / "in.h5ad", "manifest": model / bundle.MANIFEST_NAME, "hard_link": work / "linked.log"}[target]
    same_work, same_model = unchanged(work), unchanged(model)
    run = invoke("-q", "--log-file", log, "embed", work / "in.h5ad", "-m", model, "-o", work / "out.h5ad")
    assert_refused(run, "--log-file")
    same_work()
    same_model()
    assert not (work / "out.h5ad").exists()


def test_export_refuses_a_model_folder_holding_other_files(model: Path):
    pytest.importorskip("torch")
    (model / "my_notes.txt").write_text("mine")
    same = unchanged(model)
    assert_refused(invoke("-q", "export", model), "holds files scrcl-cli did not write")
    same()


@pytest.mark.parametrize("flag", ["--markers", "--plot"])
def test_two_outputs_with_the_same_path_are_refused(flag: str, work: Path, model: Path):
    same = unchanged(work)
    out = work / "out.h5ad"
    assert_refused(invoke("-q", "cluster", work / "in.h5ad", "-m", model, "-o", out, flag, out), "name the same file")
    same()


def test_a_pipe_is_never_replaced_by_an_output(work: Path, model: Path):
    fifo = work / "markers.csv"
    os.mkfifo(fifo)
    run = invoke("-q", "cluster", work / "in.h5ad", "-m", model, "-o", work / "out.h5ad", "--markers", fifo, "--overwrite")
    assert_refused(run, "not a regular file")
    assert fifo.is_fifo() and not (work / "out.h5ad").exists()


def test_out_h5ad_inside_the_model_folder_is_refused_before_training(work: Path):
    same = unchanged(work)
    run = invoke("-q", "train", work / "in.h5ad", "-o", work / "m", "--out-h5ad", work / "m" / "x.h5ad", *FAST_TRAIN)
    assert_refused(run, "one inside the other")
    same()
    assert not (work / "m").exists()


def test_an_output_that_is_a_symbolic_link_is_refused(work: Path, model: Path):
    (work / "out.h5ad").symlink_to(work / "notes.txt")
    same = unchanged(work)
    run = invoke("-q", "embed", work / "in.h5ad", "-m", model, "-o", work / "out.h5ad", "--overwrite")
    assert_refused(run, "symbolic link")
    same()


def test_a_failed_run_creates_no_folders(work: Path, model: Path):
    run = invoke("-q", "embed", work / "nope.h5ad", "-m", model, "-o", work / "new" / "deep" / "out.h5ad")
    assert_refused(run, "does not exist")
    assert not (work / "new").exists()


@pytest.mark.parametrize("key", ["/X", "a/b", "../obs", ".hidden", ""])
def test_key_added_outside_obsm_is_a_usage_error(key: str, work: Path, model: Path):
    same = unchanged(work)
    run = invoke("-q", "embed", work / "in.h5ad", "-m", model, "-o", work / "out.h5ad", "--key-added", key)
    assert_refused(run, "not a valid obsm key", code=2)
    same()


@pytest.mark.parametrize("args", [["--seed", "-1"], ["--seed", str(2**64)], ["--threads", "100000"],
                                  ["--batch-size", "0"]], ids=["seed_negative", "seed_2_64", "threads", "batch_0"])
def test_out_of_range_numbers_are_usage_errors(args: list[str], work: Path, model: Path):
    run = invoke("-q", "cluster", work / "in.h5ad", "-m", model, "-o", work / "out.h5ad", *args)
    assert_refused(run, code=2)


def test_cluster_n_clusters_without_denovo_is_an_error(work: Path, model: Path):
    run = invoke("-q", "cluster", work / "in.h5ad", "-m", model, "-o", work / "out.h5ad", "--n-clusters", "4")
    assert_refused(run, "--n-clusters applies only with --denovo")


# ----------------------------------------------------------------------------- inputs


def _edit_x(path: Path, edit: Callable[[dict], None]) -> None:
    import h5py

    with h5py.File(path, "r+") as f:
        edit(f["X"])


def _set(name: str, index: int, value: Callable[[object], int]) -> Callable[[dict], None]:
    def edit(x: dict) -> None:
        arr = x[name][()]
        arr[index] = value(x)
        del x[name]
        x.create_dataset(name, data=arr)
    return edit


SPARSE_DAMAGE = {
    "negative_index": _set("indices", 0, lambda x: -1),
    "index_past_the_genes": _set("indices", 5, lambda x: int(x.attrs["shape"][1]) + 10),
    "indptr_not_monotone": _set("indptr", 3, lambda x: int(x["indptr"][2]) - 1),
    "indptr_past_the_end": _set("indptr", -1, lambda x: int(x["indptr"][-1]) + 5),
}


@pytest.mark.parametrize("command", ["train", "embed"])
@pytest.mark.parametrize("damage", list(SPARSE_DAMAGE))
def test_damaged_sparse_structure_is_one_line_not_a_crash(damage: str, command: str, work: Path, model: Path):
    _edit_x(work / "in.h5ad", SPARSE_DAMAGE[damage])
    same = unchanged(work)
    args = [*FAST_TRAIN, "-o", work / "m"] if command == "train" else ["-m", model, "-o", work / "out.h5ad"]
    run = invoke("-q", command, work / "in.h5ad", *args)
    assert run.code == 1 and len(error_lines(run.stderr)) == 1, run.stderr
    assert "malformed X" in run.stderr or "could not be read" in run.stderr, run.stderr
    same()


def test_hdf5_external_link_is_refused(work: Path, model: Path):
    import h5py

    (work / "secret.h5").write_bytes((work / "in.h5ad").read_bytes())
    with h5py.File(work / "in.h5ad", "r+") as f:
        f["uns"]["evil"] = h5py.ExternalLink(str(work / "secret.h5"), "/X")
    run = invoke("-q", "embed", work / "in.h5ad", "-m", model, "-o", work / "out.h5ad")
    assert_refused(run, "external link", "another file")


def test_a_pipe_as_input_is_refused_without_blocking(work: Path, model: Path):
    os.mkfifo(work / "pipe.h5ad")
    assert_refused(invoke("-q", "embed", work / "pipe.h5ad", "-m", model, "-o", work / "out.h5ad"), "not a regular file")


@pytest.mark.parametrize(("kind", "needle"), [("loom", "is a loom file"), ("tenx", "10x genomics")])
def test_loom_and_10x_files_are_named(kind: str, needle: str, work: Path, model: Path):
    import h5py

    path = work / f"{kind}.h5"
    with h5py.File(path, "w") as f:
        if kind == "loom":
            f["matrix"] = np.zeros((3, 3))
            f.create_group("row_attrs")
        else:
            f.create_group("matrix")["barcodes"] = np.array([b"AAA"])
    assert_refused(invoke("-q", "embed", path, "-m", model, "-o", work / "out.h5ad"), needle)


def test_expression_log_on_integer_counts_is_an_error(work: Path):
    run = invoke("-q", "train", work / "in.h5ad", "-o", work / "m", "--expression", "log", *FAST_TRAIN)
    assert_refused(run, "look like raw counts", "drop --expression log")


def test_zero_count_query_cells_are_counted_and_an_all_zero_query_is_an_error(work: Path, model: Path):
    import anndata as ad
    import scipy.sparse as sp

    adata = ad.read_h5ad(work / "in.h5ad")
    x = sp.lil_matrix(adata.X)
    x[:5] = 0
    adata.X = sp.csr_matrix(x)
    adata.write_h5ad(work / "some_zero.h5ad")
    run = invoke("embed", work / "some_zero.h5ad", "-m", model, "-o", work / "out.h5ad")
    assert run.code == 0, run.stderr
    assert "5 of 700 cells" in run.stderr
    assert int(ad.read_h5ad(work / "out.h5ad").uns["scrcl"]["n_cells_empty"]) == 5
    adata.X = sp.csr_matrix(adata.X.shape, dtype=np.float32)
    adata.write_h5ad(work / "all_zero.h5ad")
    assert_refused(invoke("-q", "embed", work / "all_zero.h5ad", "-m", model, "-o", work / "out2.h5ad"),
                   "all 700 cells", "zero counts")


@pytest.mark.parametrize(("coords", "needle"), [
    (lambda n: np.ones((n, 2)), "constant column"),
    (lambda n: np.arange(n, dtype=float)[:, None], "(n_cells, 2) is expected"),
    (lambda n: np.random.default_rng(0).uniform(0, 1e300, (n, 2)), "above"),
], ids=["constant", "one_column", "huge"])
def test_degenerate_spatial_coordinates_are_refused(coords: Callable[[int], np.ndarray], needle: str, tmp_path: Path):
    import anndata as ad

    adata = ad.read_h5ad(shared("dlpfc_151510_top500.h5ad"))
    adata.obsm["spatial"] = coords(adata.n_obs)
    adata.write_h5ad(tmp_path / "section.h5ad")
    run = invoke("-q", "train", "--spatial", tmp_path / "section.h5ad", "-o", tmp_path / "m", *FAST_TRAIN)
    assert_refused(run, needle)


# ----------------------------------------------------------------------------- model folders


def _rehash(model: Path, name: str, blob: bytes) -> None:
    (model / name).write_bytes(blob)
    _edit(model, lambda d: d["files"].update({name: bundle.sha256_bytes(blob)}))


def _edit(model: Path, edit: Callable[[dict], None]) -> None:
    path = model / bundle.MANIFEST_NAME
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def _cell_encoder(model: Path, *, width: int | None = None, fill: float = 0.0, external: str | None = None,
                  op: str = "MatMul") -> bytes:
    """A crafted `cell` encoder: x0 (N, G) @ W -> embedding (N, D), with the model's gene hash."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    m = json.loads((model / bundle.MANIFEST_NAME).read_text())
    g, d = len(m["genes"]), width or int(m["model"]["cell_dim"])
    w = numpy_helper.from_array(np.full((g, d), fill, dtype=np.float32), "W")
    if external is not None:
        w.ClearField("raw_data")
        w.data_location = TensorProto.EXTERNAL
        for key, value in (("location", external), ("offset", "0"), ("length", str(4 * g * d))):
            entry = w.external_data.add()
            entry.key, entry.value = key, value
    node = helper.make_node(op, ["x0", "W"], ["embedding"])
    graph = helper.make_graph([node], "crafted", [helper.make_tensor_value_info("x0", TensorProto.FLOAT, ["N", g])],
                              [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", d])], [w])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    proto.ir_version = 10
    entry = proto.metadata_props.add()
    entry.key, entry.value = "genes_sha256", m["genes_sha256"]
    return proto.SerializeToString() if isinstance(proto, onnx.ModelProto) else b""


def _stage_encoder(model: Path, name: str) -> bytes:
    """The stage `name` of `model` with its output multiplied by NaN (same inputs, allowed operators)."""
    import onnx
    from onnx import helper, numpy_helper

    proto = onnx.load(model / name)
    out = proto.graph.output[0].name
    proto.graph.output[0].name = "nan_out"
    proto.graph.initializer.append(numpy_helper.from_array(np.array(np.nan, dtype=np.float32), "nan_scale"))
    proto.graph.node.append(helper.make_node("Mul", [out, "nan_scale"], ["nan_out"]))
    return proto.SerializeToString()


def test_onnx_external_data_is_never_read(work: Path, model: Path):
    (work / "secret.bin").write_bytes(np.arange(10**6, dtype=np.float32).tobytes())
    _rehash(model, "encoder_cell.onnx", _cell_encoder(model, external="../secret.bin"))
    run = invoke("-q", "embed", work / "in.h5ad", "-m", model, "-o", work / "out.h5ad", "--view", "cell")
    assert_refused(run, "external data")
    assert not (work / "out.h5ad").exists()


def test_onnx_with_an_operator_the_exporter_never_writes_is_refused(work: Path, model: Path):
    _rehash(model, "encoder_cell.onnx", _cell_encoder(model, op="Loop"))
    run = invoke("-q", "embed", work / "in.h5ad", "-m", model, "-o", work / "out.h5ad", "--view", "cell")
    assert_refused(run, "operator Loop")


def test_onnx_output_width_that_disagrees_with_the_manifest_is_refused(work: Path, model: Path):
    m = json.loads((model / bundle.MANIFEST_NAME).read_text())
    _rehash(model, "encoder_cell.onnx", _cell_encoder(model, width=int(m["model"]["cell_dim"]) + 3))
    run = invoke("-q", "embed", work / "in.h5ad", "-m", model, "-o", work / "out.h5ad", "--view", "cell")
    assert_refused(run, "its output is not float32")


def _drop_stages(model: Path) -> None:
    """Leave only the one-graph encoders, so that the crafted one is the one that runs."""
    for path in model.glob("encoder_*_stage*.onnx"):
        path.unlink()
        _edit(model, lambda d, name=path.name: d["files"].pop(name))


@pytest.mark.parametrize("staged", [False, True], ids=["one_graph", "staged"])
def test_onnx_that_outputs_nan_is_an_error_not_a_result(staged: bool, work: Path, model: Path):
    if staged:
        if not (model / "encoder_cell_stage1.onnx").exists():
            pytest.skip("this model has no staged encoder")
        _rehash(model, "encoder_cell_stage1.onnx", _stage_encoder(model, "encoder_cell_stage1.onnx"))
    else:
        _drop_stages(model)
        _rehash(model, "encoder_cell.onnx", _cell_encoder(model, fill=float("nan")))
    run = invoke("-q", "embed", work / "in.h5ad", "-m", model, "-o", work / "out.h5ad", "--view", "cell")
    assert_refused(run, "NaN or infinite values")
    assert not (work / "out.h5ad").exists()


MANIFEST_DAMAGE: dict[str, tuple[Callable[[dict], None], str]] = {
    "smoothing_steps_huge": (lambda d: d["graph"].update(t1=10**6), "graph.t1 must be an integer in [0, 64]"),
    "neighbours_zero": (lambda d: d["graph"].update(n_neighbors=0), "graph.n_neighbors"),
    "centroid_rows_short": (lambda d: d["clusters"]["centroids_fused"].pop(), "clusters.centroids_fused"),
    "gene_with_a_newline": (lambda d: d.update(genes=["a\nb", *d["genes"][1:]]), "invalid name"),
    "expression_unknown": (lambda d: d["preprocessing"].update(expression="magic"), "preprocessing.expression"),
    "files_not_a_dict": (lambda d: d.update(files=[]), "files is not an object"),
}


@pytest.mark.parametrize("damage", list(MANIFEST_DAMAGE))
def test_manifest_schema_violations_are_one_line(damage: str, work: Path, model: Path):
    edit, needle = MANIFEST_DAMAGE[damage]
    _edit(model, edit)
    assert_refused(invoke("-q", "embed", work / "in.h5ad", "-m", model, "-o", work / "out.h5ad"), needle)


def test_nan_in_the_manifest_is_refused(work: Path, model: Path):
    path = model / bundle.MANIFEST_NAME
    path.write_text(path.read_text().replace('"n_clusters": ', '"n_clusters": NaN, "x": ', 1))
    assert_refused(invoke("-q", "embed", work / "in.h5ad", "-m", model, "-o", work / "out.h5ad"), "NaN is not a number")


def test_a_model_file_that_is_a_symlink_out_of_the_folder_is_refused(work: Path, model: Path):
    outside = work / "genes_elsewhere.txt"
    shutil.move(model / "genes.txt", outside)
    (model / "genes.txt").symlink_to(outside)
    assert_refused(invoke("-q", "embed", work / "in.h5ad", "-m", model, "-o", work / "out.h5ad"),
                   "symbolic links are not followed")


# ----------------------------------------------------------------------------- resources


def test_memory_estimate_is_checked_before_training_and_states_the_size(monkeypatch: pytest.MonkeyPatch):
    pytest.importorskip("torch")
    from scrcl_cli import training
    from scrcl_cli.errors import ScrclError

    monkeypatch.setattr(training, "free_memory_bytes", lambda device: 1 << 30)
    config = training.TrainConfig(hidden_dim=16_384, n_top_genes=2000)
    with pytest.raises(ScrclError, match=r"needs about \d+\.\d GiB of memory and 1\.0 GiB are available"):
        training.check_fits(config, 100_000, 20_000)
    training.check_fits(training.TrainConfig(hidden_dim=64, n_top_genes=200), 700, 765)  # the example fits


def test_out_of_core_memory_estimate_leaves_the_smoothed_inputs_to_the_disk(monkeypatch: pytest.MonkeyPatch,
                                                                           tmp_path: Path):
    """Out of core, the two (N, G) smoothed inputs are not counted in memory; the three files are
    counted on the disk beside the output, whose folder need not exist yet."""
    pytest.importorskip("torch")
    import shutil
    from collections import namedtuple

    from scrcl_cli import training
    from scrcl_cli.errors import ScrclError

    seen = []
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(training, "free_memory_bytes", lambda device: 8 << 30)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: seen.append(Path(path)) or usage(1 << 50, 0, 30 << 30))
    config = training.TrainConfig(hidden_dim=64, n_top_genes=2000)
    with pytest.raises(ScrclError, match=r"needs about 15\.0 GiB of memory"):  # 2 x 1e6 x 2000 x 4 bytes, and a little more
        training.check_fits(config, 1_000_000, 5000)
    out = tmp_path / "new" / "deeper" / "model"
    training.check_fits(config, 1_000_000, 5000, out_of_core=out)  # 22.4 GiB of files: fits the memory and the disk
    assert seen == [tmp_path]
    with pytest.raises(ScrclError, match=r"--out-of-core needs 44\.70 GiB of disk .* 30\.00 GiB are free there, 14\.70 GiB short"):
        training.check_fits(config, 2_000_000, 5000, out_of_core=out, batch_size=4096)


@pytest.mark.parametrize(("exc", "needle"), [
    (MemoryError(), "ran out of memory"),
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), "allocation of 2.00 GiB failed"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to "
                  "allocate 123456789 bytes"), "allocation of 123456789 bytes failed"),
    (OSError(28, "No space left on device", "out.h5ad"), "the disk is full writing out.h5ad"),
], ids=["memory_error", "cuda_oom", "cpu_oom", "enospc"])
def test_resource_failures_become_one_line_naming_the_size(exc: BaseException, needle: str):
    from scrcl_cli.cli import _resource_error

    mapped = _resource_error(exc)
    assert mapped is not None and needle in mapped.message and "\n" not in mapped.message


def test_a_full_disk_under_log_file_is_reported_not_swallowed(tmp_path: Path):
    import logging

    from scrcl_cli.cli import _LogFile

    handler = _LogFile(os.open("/dev/full", os.O_WRONLY), tmp_path / "log.txt")
    handler.handle(logging.LogRecord("scrcl_cli", logging.INFO, __file__, 1, "x" * 100_000, None, None))
    handler.close()
    assert isinstance(handler.error, OSError) and handler.error.errno == 28


def test_odd_obs_metadata_never_gives_a_traceback(work: Path, model: Path):
    import anndata as ad
    import h5py

    adata = ad.read_h5ad(work / "in.h5ad")
    adata.obs.index.name = "scrcl_cluster"  # the column cluster adds has the index's name
    adata.write_h5ad(work / "index_named.h5ad")
    run = invoke("-q", "cluster", work / "index_named.h5ad", "-m", model, "-o", work / "a.h5ad")
    assert run.code == 0, run.stderr
    assert "scrcl_cluster" in ad.read_h5ad(work / "a.h5ad").obs
    with h5py.File(work / "in.h5ad", "r+") as f:  # an obs column in an encoding anndata does not know
        col = next(k for k in f["obs"] if k != f["obs"].attrs.get("_index", "_index"))
        f["obs"][col].attrs["encoding-type"] = "no-such-encoding"
    same = unchanged(work)
    run = invoke("-q", "cluster", work / "in.h5ad", "-m", model, "-o", work / "b.h5ad")
    assert run.code == 1 and len(error_lines(run.stderr)) == 1 and "Traceback" not in run.stderr, run.stderr
    same()


# ----------------------------------------------------------------------------- second round of hostile files


def test_an_hdf5_hard_link_cycle_is_refused_not_walked_forever(work: Path, model: Path):
    import h5py

    with h5py.File(work / "in.h5ad", "r+") as f:
        f["uns/cycle"] = f["uns"]  # /uns/cycle is /uns: a walk that follows it never ends
    run = invoke("-q", "embed", work / "in.h5ad", "-m", model, "-o", work / "out.h5ad")
    assert_refused(run, "/uns/cycle", "hard link")


def test_float16_counts_are_read_in_blocks_like_float32(work: Path, model: Path):
    import h5py

    run = invoke("-q", "embed", work / "in.h5ad", "-m", model, "-o", work / "a.h5ad")
    assert run.code == 0, run.stderr
    with h5py.File(work / "in.h5ad", "r+") as f:  # the 700-cell counts are small integers: exact in float16
        data = f["X/data"][()]
        del f["X/data"]
        f["X/data"] = data.astype(np.float16)
    run = invoke("-q", "embed", work / "in.h5ad", "-m", model, "-o", work / "b.h5ad")
    assert run.code == 0, run.stderr
    with h5py.File(work / "a.h5ad", "r") as a, h5py.File(work / "b.h5ad", "r") as b:  # anndata cannot read float16 CSR
        np.testing.assert_array_equal(a["obsm/X_scrcl"][()], b["obsm/X_scrcl"][()])


@pytest.mark.parametrize("command", ["train", "embed"])
def test_a_sparse_entry_stored_twice_is_refused(command: str, work: Path, model: Path):
    def twice(x: dict) -> None:
        idx = x["indices"][()]
        idx[1] = idx[0]  # row 0 now stores one gene twice; scipy would add the two values silently
        del x["indices"]
        x["indices"] = idx

    _edit_x(work / "in.h5ad", twice)
    args = [*FAST_TRAIN, "-o", work / "m"] if command == "train" else ["-m", model, "-o", work / "out.h5ad"]
    assert_refused(invoke("-q", command, work / "in.h5ad", *args), "stored twice")


def test_a_file_without_var_is_refused_rather_than_given_numbered_genes(work: Path):
    import h5py

    with h5py.File(work / "in.h5ad", "r+") as f:
        del f["var"]
    assert_refused(invoke("-q", "train", work / "in.h5ad", *FAST_TRAIN, "-o", work / "m"), "has no /var")
    assert not (work / "m").exists()


def test_a_manifest_file_name_with_a_nul_byte_is_refused(work: Path, model: Path):
    import scrcl_cli
    from scrcl_cli.errors import ScrclError

    _edit(model, lambda d: d["files"].update({"a\x00b": "0" * 64}))
    assert_refused(invoke("-q", "embed", work / "in.h5ad", "-m", model, "-o", work / "out.h5ad"), "not a model file name")
    with pytest.raises(ScrclError, match="not a model file name"):
        scrcl_cli.load(model)


def test_overwrite_never_deletes_a_listed_file_whose_content_differs(work: Path, model: Path):
    victim = work / "victim"
    victim.mkdir()
    shutil.copyfile(model / bundle.MANIFEST_NAME, victim / bundle.MANIFEST_NAME)
    _edit(victim, lambda d: d["files"].update({"thesis.txt": "0" * 64}))  # a copied manifest claiming the user's file
    (victim / "thesis.txt").write_text("the only copy\n")
    assert bundle.owned_entries(victim) is None
    run = invoke("-q", "train", work / "in.h5ad", *FAST_TRAIN, "-o", victim, "--overwrite")
    assert_refused(run, "did not write")
    assert (victim / "thesis.txt").read_text() == "the only copy\n"
    assert sorted(bundle.owned_entries(model) or []) == sorted([*json.loads((model / bundle.MANIFEST_NAME).read_text())["files"],
                                                               bundle.MANIFEST_NAME])


def test_output_through_a_link_and_dotdot_is_resolved_as_the_kernel_does(work: Path, model: Path):
    (model / "d").mkdir()
    (work / "lk").symlink_to(model / "d")
    run = invoke("-q", "embed", work / "in.h5ad", "-m", model, "-o", "lk/../evil.h5ad", cwd=work)
    assert_refused(run, "lies inside the input")
    assert not (model / "evil.h5ad").exists()


def _graph_encoder(model: Path, nodes: list, initializers: list) -> bytes:
    """A cell encoder x0 (N, G) -> embedding (N, D) made of `nodes`, with the model's gene hash."""
    from onnx import TensorProto, helper

    m = json.loads((model / bundle.MANIFEST_NAME).read_text())
    g, d = len(m["genes"]), int(m["model"]["cell_dim"])
    graph = helper.make_graph(nodes, "crafted", [helper.make_tensor_value_info("x0", TensorProto.FLOAT, ["N", g])],
                              [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", d])], initializers)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    proto.ir_version = 10
    entry = proto.metadata_props.add()
    entry.key, entry.value = "genes_sha256", m["genes_sha256"]
    return proto.SerializeToString()


@pytest.mark.parametrize("failure", ["index_out_of_range", "huge_allocation"])
def test_an_encoder_failing_at_run_time_gives_one_line_and_no_onnx_runtime_log(failure: str, work: Path, model: Path):
    from onnx import helper, numpy_helper
    from robustness_helpers import run_cli

    m = json.loads((model / bundle.MANIFEST_NAME).read_text())
    g, d = len(m["genes"]), int(m["model"]["cell_dim"])
    w = numpy_helper.from_array(np.zeros((g, d), np.float32), "W")
    if failure == "index_out_of_range":
        extra = [numpy_helper.from_array(np.array([10**9], np.int64), "gi")]
        nodes = [helper.make_node("Gather", ["x0", "gi"], ["xg"], axis=1), helper.make_node("ReduceSum", ["xg"], ["r"], keepdims=0),
                 helper.make_node("MatMul", ["x0", "W"], ["e"]), helper.make_node("Add", ["e", "r"], ["embedding"])]
    else:  # 2^50 floats: far more than any machine has
        extra = [numpy_helper.from_array(np.array([2**25, 2**25], np.int64), "shape")]
        nodes = [helper.make_node("ConstantOfShape", ["shape"], ["big"]), helper.make_node("ReduceSum", ["big"], ["r"], keepdims=0),
                 helper.make_node("MatMul", ["x0", "W"], ["e"]), helper.make_node("Add", ["e", "r"], ["embedding"])]
    _drop_stages(model)
    _rehash(model, "encoder_cell.onnx", _graph_encoder(model, nodes, [w, *extra]))
    proc = run_cli("-q", "embed", work / "in.h5ad", "-m", model, "-o", work / "out.h5ad", "--view", "cell")
    assert proc.returncode == 1 and len(error_lines(proc.stderr)) == 1, proc.stderr
    assert proc.stderr.startswith("error: the model's encoder"), proc.stderr
    assert not (work / "out.h5ad").exists()


@pytest.mark.parametrize("args", [["--lr", "1e300"], ["--lr", "nan"], ["--temperature", "inf"], ["--weight-decay", "nan"],
                                  ["--lambda1", "-inf"]], ids=["lr_huge", "lr_nan", "temperature_inf", "wd_nan", "lambda_minf"])
def test_non_finite_or_absurd_training_numbers_are_usage_errors(args: list[str], work: Path):
    assert_refused(invoke("-q", "train", work / "in.h5ad", *FAST_TRAIN, "-o", work / "m", *args), code=2)
    assert not (work / "m").exists()


def test_min_gene_overlap_nan_is_a_usage_error(work: Path, model: Path):
    run = invoke("-q", "embed", work / "in.h5ad", "-m", model, "-o", work / "out.h5ad", "--min-gene-overlap", "nan")
    assert_refused(run, "not a finite number", code=2)


WEIGHT_DAMAGE: dict[str, tuple[Callable[[dict], None], str]] = {
    "fc_w_wrong_shape": (lambda s: s.__setitem__("fc_w", __import__("torch").zeros(5, 7)), "fc_w should be"),
    "proj_w_missing": (lambda s: s.pop("proj_w"), "proj_w should be"),
    "gene_emb_wrong_shape": (lambda s: s.__setitem__("gene_emb", __import__("torch").zeros(3, 3)), "gene_emb should be"),
    "extra_entry": (lambda s: s.__setitem__("payload", __import__("torch").zeros(1)), "unexpected entry"),
}


@pytest.mark.parametrize("damage", list(WEIGHT_DAMAGE))
def test_export_of_weights_that_disagree_with_the_manifest_is_one_line(damage: str, model: Path):
    import io

    import torch

    edit, needle = WEIGHT_DAMAGE[damage]
    state = torch.load(model / "weights.pt", weights_only=True)
    edit(state)
    buf = io.BytesIO()
    torch.save(state, buf)
    _rehash(model, "weights.pt", buf.getvalue())
    same = unchanged(model)
    assert_refused(invoke("-q", "export", model), needle)
    same()


def test_export_of_a_symlinked_model_folder_is_refused_once(model: Path, tmp_path: Path):
    (tmp_path / "link").symlink_to(model)
    assert_refused(invoke("-q", "export", tmp_path / "link"), "MODEL_DIR", "symbolic link")


def test_spatial_coordinates_in_an_unusual_form(work: Path, model: Path):
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    from scrcl_cli.io.h5ad import ChunkedH5ad

    adata = ad.read_h5ad(work / "in.h5ad")
    xy = np.random.default_rng(0).uniform(0, 100, (adata.n_obs, 2))
    adata.obsm["spatial"] = sp.csr_matrix(xy)  # sparse: still usable coordinates
    adata.write_h5ad(work / "sparse.h5ad")
    np.testing.assert_allclose(ChunkedH5ad(work / "sparse.h5ad").spatial, xy)
    run = invoke("-q", "embed", work / "sparse.h5ad", "-m", model, "-o", work / "a.h5ad")  # an expression model ignores them
    assert run.code == 0, run.stderr
    adata.obsm["spatial"] = pd.DataFrame(xy, index=adata.obs_names, columns=["x", "y"])
    adata.write_h5ad(work / "frame.h5ad")
    import h5py

    with h5py.File(work / "frame.h5ad", "r+") as f:  # rows no longer the cells of obs
        frame = f["obsm/spatial"]
        index = frame.attrs["_index"]
        names = frame[index][()]
        del frame[index]
        frame[index] = names[::-1]
    reader = ChunkedH5ad(work / "frame.h5ad")
    assert reader.spatial is None and "rows are not the cells" in (reader.spatial_problem or "")
