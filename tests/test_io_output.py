"""Outputs are atomic and inputs are never modified.

A SIGKILL during a large write leaves the destination empty or holding the previous complete
file; SIGTERM removes the temporaries and exits 130; a later run removes temporaries that a
killed run left beside its destination; train, embed and cluster leave their inputs' sha256
unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from conftest import EXAMPLE
from robustness_helpers import (
    FAST_TRAIN,
    assert_one_line_error,
    minimal_manifest,
    minimal_manifest_json,
    run_cli,
    sha256_file,
    sha256_tree,
)

from scrcl_cli import bundle
from scrcl_cli.io import output


def _temporaries(dest: Path) -> list[Path]:
    return sorted(dest.parent.glob(f".{dest.name}{output.TMP_TAG}*"))


@pytest.fixture(scope="module")
def large_query(tmp_path_factory: pytest.TempPathFactory, trained_model: Path) -> Path:
    """Cells with the model's genes and a ~60 MB random layer: cheap to embed, slow to write (gzip)."""
    import anndata as ad

    genes = bundle.read_bundle(trained_model).genes
    rng = np.random.default_rng(0)
    n = 10_000
    x = sp.random(n, len(genes), density=0.05, format="csr", random_state=1, dtype=np.float32)
    x.data = np.ceil(x.data * 5)
    a = ad.AnnData(X=x)
    a.var_names = genes
    a.obs_names = [f"c{i}" for i in range(n)]
    a.layers["noise"] = rng.random((n, len(genes)))  # incompressible, copied into every output
    path = tmp_path_factory.mktemp("large") / "large.h5ad"
    a.write_h5ad(path)
    return path


def _start_embed(src: Path, model: Path, out: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "scrcl_cli", "-q", "embed", str(src), "-m", str(model), "-o", str(out),
                             "--view", "cell", "--device", "cpu", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_temporary(proc: subprocess.Popen[str], dest: Path, timeout: float = 180) -> Path:
    """Poll until the write has begun (a non-empty temporary beside dest); fail if the run ends first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for tmp in _temporaries(dest):
            try:
                if tmp.stat().st_size > 0:
                    return tmp
            except FileNotFoundError:
                pass
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"the run ended (exit {proc.returncode}) before its output write could be interrupted:\n{err}")
        time.sleep(0.005)
    proc.kill()
    pytest.fail("no temporary file appeared beside the destination")


@pytest.fixture
def _reap() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.communicate()


@pytest.mark.parametrize("previous", [False, True], ids=["no_previous_output", "previous_output"])
def test_embed_sigkill_during_write_leaves_nothing_or_the_previous_file(
    previous: bool, large_query: Path, trained_model: Path, tmp_path: Path, _reap: list[subprocess.Popen[str]]
):
    out = tmp_path / "out.h5ad"
    if previous:
        out.write_bytes(b"previous complete output")
    before = sha256_file(large_query)
    proc = _start_embed(large_query, trained_model, out, "--overwrite")
    _reap.append(proc)
    tmp = _wait_for_temporary(proc, out)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    if previous:
        assert out.read_bytes() == b"previous complete output"
    else:
        assert not out.exists()
    assert tmp.exists(), "SIGKILL cannot clean up, so the temporary must still be there"
    assert tmp.name.startswith(f".{out.name}{output.TMP_TAG}{proc.pid}-")
    assert sha256_file(large_query) == before

    # The next run to the same destination removes the killed run's temporary and writes a complete file.
    res = run_cli("-q", "embed", EXAMPLE, "-m", trained_model, "-o", out, "--view", "cell", "--overwrite")
    assert res.returncode == 0, res.stderr
    assert _temporaries(out) == []
    import anndata as ad

    assert ad.read_h5ad(out).obsm["X_scrcl"].shape[0] == 700


def test_embed_sigterm_during_write_removes_temporaries_and_exits_130(
    large_query: Path, trained_model: Path, tmp_path: Path, _reap: list[subprocess.Popen[str]]
):
    out = tmp_path / "out.h5ad"
    out.write_bytes(b"previous complete output")
    proc = _start_embed(large_query, trained_model, out, "--overwrite")
    _reap.append(proc)
    _wait_for_temporary(proc, out)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert_one_line_error(err, proc.returncode, "interrupted", "partial outputs were removed", expected_code=130)
    assert _temporaries(out) == []
    assert out.read_bytes() == b"previous complete output"


# write_model_dir with large files, in a process of its own, so that a SIGKILL lands mid-write.
_WRITE_MODEL = """
import json
import sys
from pathlib import Path
from scrcl_cli import bundle
blob = bytes(range(256)) * (128 * 1024)  # 32 MiB
files = {name: blob for name in ("weights.pt", "encoder_fused.onnx", "encoder_cell.onnx", "train_embedding.npy",
                                 "loss_log.csv", "train_clusters.csv")}
manifest = bundle.Manifest.from_json(json.loads(sys.argv[2]), Path("m"))
bundle.write_model_dir(Path(sys.argv[1]), files, manifest, overwrite=True)
"""


@pytest.mark.parametrize("previous", [False, True], ids=["no_previous_model", "previous_model"])
def test_model_directory_sigkill_during_write_leaves_nothing_or_the_previous_model(
    previous: bool, tmp_path: Path, _reap: list[subprocess.Popen[str]]
):
    dest = tmp_path / "model"
    if previous:
        bundle.write_model_dir(dest, {"weights.pt": b"old"}, minimal_manifest(["a"]), overwrite=False)
    old = sha256_tree(dest) if previous else None
    proc = subprocess.Popen([sys.executable, "-c", _WRITE_MODEL, str(dest),
                             json.dumps({**minimal_manifest_json(["a", "b"]), "format_version": bundle.FORMAT_VERSION, "files": {}})], stderr=subprocess.PIPE, text=True)
    _reap.append(proc)
    end = time.monotonic() + 120
    while not any(t.is_dir() and any(t.iterdir()) for t in _temporaries(dest)):
        assert proc.poll() is None, f"the write finished before it could be interrupted: {proc.stderr.read() if proc.stderr else ''}"
        assert time.monotonic() < end, "no temporary model directory appeared"
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    if previous:
        assert sha256_tree(dest) == old
        assert bundle.read_bundle(dest).manifest.files == {"weights.pt": bundle.sha256_bytes(b"old")}
    else:
        assert not dest.exists()
    # A complete write afterwards removes the stale temporary directory.
    output.check_outputs([output.Output(dest, "-o", "model", bundle.owned_entries)], inputs=(), overwrite=True)  # removes the killed run's temporary
    bundle.write_model_dir(dest, {"weights.pt": b"new"}, minimal_manifest(["a"]), overwrite=True)
    assert _temporaries(dest) == []
    assert (dest / "weights.pt").read_bytes() == b"new"


def test_atomic_path_commits_nothing_when_a_stop_was_requested_during_the_write(tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch):
    # Python may lose the KeyboardInterrupt of a SIGTERM (raised inside a weakref callback); the
    # handler's stop flag must still keep the half-interrupted output from being committed.
    monkeypatch.setattr(output, "_stop_requested", False)
    dest = tmp_path / "out.csv"
    dest.write_text("previous\n")
    with pytest.raises(KeyboardInterrupt), output.atomic_path(dest, overwrite=True) as tmp:
        tmp.write_text("new\n")
        output.request_stop()
    assert dest.read_text() == "previous\n"
    assert _temporaries(dest) == []


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_next_run_removes_stale_temporaries_but_not_those_of_a_live_run(trained_model: Path, tmp_path: Path):
    out = tmp_path / "out.h5ad"
    dead = _dead_pid()
    stale_file = tmp_path / f".{out.name}{output.TMP_TAG}{dead}-0badc0de"
    stale_file.write_bytes(b"partial")
    stale_dir = tmp_path / f".{out.name}{output.TMP_TAG}{dead}-0badc0df"
    stale_dir.mkdir()
    (stale_dir / "weights.pt").write_bytes(b"partial")
    # Named like temporaries, but not ours to delete: a folder holding a user's file, a file with another link.
    foreign_dir = tmp_path / f".{out.name}{output.TMP_TAG}{dead}-0badc0e0"
    foreign_dir.mkdir()
    (foreign_dir / "notes.txt").write_text("mine")
    linked = tmp_path / f".{out.name}{output.TMP_TAG}{dead}-0badc0e1"
    linked.write_text("mine")
    os.link(linked, tmp_path / "my_data.txt")
    live = tmp_path / f".{out.name}{output.TMP_TAG}{os.getpid()}-0000beef"  # this test process is alive
    live.write_bytes(b"being written")
    res = run_cli("-q", "embed", EXAMPLE, "-m", trained_model, "-o", out, "--view", "cell")
    assert res.returncode == 0, res.stderr
    assert not stale_file.exists() and not stale_dir.exists()
    assert (foreign_dir / "notes.txt").read_text() == "mine" and linked.read_text() == "mine"
    assert live.exists()
    assert out.exists()


def test_failed_run_leaves_no_output_and_no_temporary(trained_model: Path, tmp_path: Path):
    out = tmp_path / "out.h5ad"
    bad = tmp_path / "bad.h5ad"
    bad.write_text("not hdf5")
    res = run_cli("-q", "cluster", bad, "-m", trained_model, "-o", out)
    assert res.returncode == 1
    assert list(tmp_path.iterdir()) == [bad]


# ----------------------------------------------------------------------------- inputs are never modified


@pytest.fixture(autouse=True)
def _restore_sigterm() -> Iterator[None]:
    old = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}  # in-process runs install the CLI's
    yield
    for sig, handler in old.items():
        signal.signal(sig, handler)


def test_train_leaves_its_input_unchanged(tmp_path: Path):
    from click.testing import CliRunner

    from scrcl_cli.cli import cli

    src = tmp_path / "in.h5ad"
    shutil.copyfile(EXAMPLE, src)
    before = sha256_file(src)
    res = CliRunner().invoke(cli, ["-q", "train", str(src), "-o", str(tmp_path / "model"), *FAST_TRAIN, "--no-export",
                                   "--out-h5ad", str(tmp_path / "out.h5ad")])
    assert res.exit_code == 0, res.output
    assert sha256_file(src) == before


@pytest.mark.parametrize("command", ["embed", "cluster"])
def test_inference_leaves_input_and_model_unchanged(command: str, trained_model: Path, tmp_path: Path):
    src = tmp_path / "in.h5ad"
    shutil.copyfile(EXAMPLE, src)
    before = sha256_file(src), sha256_tree(trained_model)
    res = run_cli("-q", command, src, "-m", trained_model, "-o", tmp_path / "out.h5ad")
    assert res.returncode == 0, res.stderr
    assert (sha256_file(src), sha256_tree(trained_model)) == before


def test_force_replaces_an_existing_output_completely(trained_model: Path, tmp_path: Path):
    import anndata as ad

    out = tmp_path / "out.h5ad"
    out.write_bytes(b"old")
    res = run_cli("-q", "embed", EXAMPLE, "-m", trained_model, "-o", out, "--view", "cell", "--force")
    assert res.returncode == 0, res.stderr
    assert ad.read_h5ad(out).obsm["X_scrcl"].shape[0] == 700
    assert _temporaries(out) == []
