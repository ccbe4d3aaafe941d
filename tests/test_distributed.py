"""`train --distributed`: torchrun's environment, DDP against gradient averaging, one writer.

Two CPU processes (gloo) started by torchrun (`python -m torch.distributed.run`) train on the
bundled 700-cell example; a single process that runs the same two batches per step and averages
their gradients must end at the same parameters.
"""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

pytest.importorskip("torch")
import anndata
import torch
import torch.distributed as tdist
from conftest import EXAMPLE

from scrcl_cli import distributed
from scrcl_cli.errors import ScrclError
from scrcl_cli.losses import scrcl_loss
from scrcl_cli.model import ScRCL, to_torch_sparse
from scrcl_cli.training import (
    TrainConfig,
    _batch_nodes,
    _edges,
    build_inputs,
    distributed_seeds,
    induced_subgraph,
    minibatch_plan,
    shard_seed_chunks,
)

TESTS = Path(__file__).resolve().parent
CFG = TrainConfig(epochs=3, hidden_dim=32, out_dim=8, n_top_genes=300, seed=5)
BATCH = 150  # cells per process per step
# Parameters after DDP against the gradient-averaging reference: max over tensors of
# ||ddp - ref|| / ||ref||. Both sum the same two float32 gradients (a + b == b + a) and halve them
# exactly, so they agree to float32 rounding or better.
RTOL = 1e-5

pytestmark = pytest.mark.skipif(not tdist.is_available() or not tdist.is_gloo_available(), reason="torch without gloo")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _torchrun(*args: str | Path, cwd: Path, timeout: float = 120, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """`python -m torch.distributed.run --nproc_per_node 2 ARGS` on this checkout, 1 thread per process."""
    path = [str(TESTS.parent)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), *extra, *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def _inputs():
    from scrcl_cli.preprocessing import prepare

    a = anndata.read_h5ad(EXAMPLE)
    prep = prepare(sp.csr_matrix(a.X, dtype=np.float32), list(a.var_names), n_top_genes=CFG.n_top_genes)
    return build_inputs(prep.model_input, prep.lognorm, CFG)


def _reference(inputs, world: int = 2, device: str = "cpu") -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """One process: each step runs every rank's batch (its seed shard, its dropout generator),
    accumulates the gradients, divides them by `world` and takes one Adam step."""
    n, g = inputs.x0.shape
    dev = torch.device(device)
    csr = inputs.adj.tocsr()
    plan = minibatch_plan(csr, BATCH, CFG.lr, world_size=world)
    model = ScRCL(g, n, CFG.hidden_dim, CFG.out_dim, CFG.dropout, CFG.seed).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=plan.lr, weight_decay=CFG.weight_decay)
    perm_seed = distributed_seeds(CFG.seed, 0)[0]
    shards = [shard_seed_chunks(n, plan.n_seeds, world, r, torch.Generator().manual_seed(perm_seed), dev) for r in range(world)]
    drops = [torch.Generator(device=dev).manual_seed(distributed_seeds(CFG.seed, r)[1]) for r in range(world)]
    indptr = torch.from_numpy(csr.indptr.astype(np.int64)).to(dev)
    indices = torch.from_numpy(csr.indices.astype(np.int64)).to(dev)
    row, col = _edges(inputs.adj, dev)
    inv_pi = torch.from_numpy((1.0 / plan.pi).astype(np.float32)).to(dev)
    x0, x1 = torch.from_numpy(inputs.x0).to(dev), torch.from_numpy(inputs.x1).to(dev)
    losses = np.zeros((CFG.epochs, 4))
    gene_prop = to_torch_sparse(inputs.gene_prop, dev)
    model.train()
    for epoch in range(CFG.epochs):
        for _ in range(plan.steps):
            opt.zero_grad(set_to_none=True)
            for r in range(world):
                nodes = _batch_nodes(indptr, indices, next(shards[r]))
                adj_b, a_hat_b = induced_subgraph(row, col, nodes, n)
                out = model(x0[nodes], x1[nodes], a_hat_b, gene_prop, drops[r], cells=nodes, cell_weights=inv_pi[nodes])
                t = scrcl_loss(out.h1, out.h2, out.z1, out.z2, adj_b, temperature=CFG.temperature,
                               lambda1=CFG.lambda1, lambda2=CFG.lambda2)
                t.total.backward()
                losses[epoch] += torch.stack([t.total, t.eda, t.nca, t.cvc]).detach().double().cpu().numpy() / (plan.steps * world)
            for p in model.parameters():
                p.grad /= world
            opt.step()
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, losses


# ---------------------------------------------------------------- torchrun's environment


def test_detect_reads_torchrun_variables():
    assert distributed.detect({}) is None
    env = distributed.detect({"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0"}, timeout_s=30)
    assert env == distributed.DistEnv(rank=2, world_size=4, local_rank=0, timeout_s=30)
    assert not env.is_main
    with pytest.raises(ScrclError, match="LOCAL_RANK not"):
        distributed.detect({"WORLD_SIZE": "2", "RANK": "0"})
    with pytest.raises(ScrclError, match="inconsistent"):
        distributed.detect({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0"})
    with pytest.raises(ScrclError, match="not integers"):
        distributed.detect({"WORLD_SIZE": "two", "RANK": "0", "LOCAL_RANK": "0"})
    with pytest.raises(ScrclError, match="unknown process-group backend 'mpi'"):
        distributed.detect({"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}, backend_choice="mpi")


def test_backend_follows_the_device_unless_chosen():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert distributed.backend(cpu) == "gloo" and distributed.backend(gpu) == "nccl"
    assert distributed.backend(gpu, "gloo") == "gloo" and distributed.backend(gpu, "nccl") == "nccl"
    with pytest.raises(ScrclError, match="nccl backend needs GPUs") as err:
        distributed.backend(cpu, "nccl")
    assert "--dist-backend gloo" in err.value.fix


@pytest.mark.parametrize("choice", ["auto", "nccl", "gloo"])
def test_processes_share_a_gpu_only_with_gloo(monkeypatch, choice):
    """Two processes on a node with one GPU: process 1 has no GPU of its own. gloo puts it on
    GPU 0 beside process 0; nccl (also what auto picks on GPUs) refuses, naming the way out."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    gpu = torch.device("cuda")
    first = distributed.DistEnv(rank=0, world_size=2, local_rank=0, backend_choice=choice)
    second = distributed.DistEnv(rank=1, world_size=2, local_rank=1, backend_choice=choice)
    assert distributed.local_device(gpu, first) == torch.device("cuda", 0)
    if choice == "gloo":
        assert distributed.local_device(gpu, second) == torch.device("cuda", 0)
    else:
        with pytest.raises(ScrclError, match="LOCAL_RANK=1 has no GPU of its own: 1 CUDA") as err:
            distributed.local_device(gpu, second)
        assert "--dist-backend gloo" in err.value.fix
    if choice != "nccl":  # CPU processes never need a GPU of their own
        assert distributed.local_device(torch.device("cpu"), second) == torch.device("cpu")


def test_shards_are_disjoint_slices_of_one_step_of_seeds():
    n, s, world = 50, 7, 3
    gens = [torch.Generator().manual_seed(11) for _ in range(world + 1)]
    shards = [shard_seed_chunks(n, s, world, r, gens[r], torch.device("cpu")) for r in range(world)]
    # the permutation a single process draws with the same seed, cut into steps of world * s seeds
    whole = torch.randperm(n, generator=gens[world])
    for step in range(n // (s * world)):
        parts = [next(sh) for sh in shards]
        assert all(p.shape == (s,) for p in parts)
        np.testing.assert_array_equal(torch.cat(parts).numpy(), whole[step * s * world : (step + 1) * s * world].numpy())


def test_plan_counts_every_process_in_an_epoch():
    inputs = _inputs()
    one = minibatch_plan(inputs.adj.tocsr(), 2 * BATCH, CFG.lr)
    two = minibatch_plan(inputs.adj.tocsr(), BATCH, CFG.lr, world_size=2)
    # two processes of half the batch: about the steps and learning rate of one process of the whole
    assert abs(two.steps - one.steps) <= 1 and two.n_seeds * 2 in (one.n_seeds - 1, one.n_seeds, one.n_seeds + 1)
    assert two.lr == pytest.approx(CFG.lr * 2 * two.expected / inputs.x0.shape[0])


def test_distributed_without_torchrun_is_one_error_line(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from scrcl_cli.cli import cli

    for var in distributed.TORCHRUN_VARS:
        monkeypatch.delenv(var, raising=False)
    res = CliRunner().invoke(cli, ["-q", "train", str(EXAMPLE), "-o", str(tmp_path / "m"), "--distributed"])
    assert res.exit_code == 1, res.output
    assert "--distributed needs torchrun" in res.output and "torchrun --nproc_per_node" in res.output
    assert not (tmp_path / "m").exists()


def test_nccl_on_the_cpu_is_one_error_line_before_any_work(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from scrcl_cli.cli import cli

    for var, value in zip(distributed.TORCHRUN_VARS, ("1", "0", "0")):
        monkeypatch.setenv(var, value)
    args = ["-q", "train", str(EXAMPLE), "-o", str(tmp_path / "m"), "--distributed", "--dist-backend", "nccl", "--device", "cpu"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 1, res.output
    assert "error: the nccl backend needs GPUs" in res.output and "--dist-backend gloo" in res.output
    assert not (tmp_path / "m").exists()


def test_process_group_frees_ddp_wrappers_before_leaving(monkeypatch):
    """A DDP wrapper that is garbage in a reference cycle when training returns is collected
    while the group is still alive, not later on a destroyed group (or at exit)."""
    import gc
    import weakref

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    env = distributed.DistEnv(rank=0, world_size=1, local_rank=0, timeout_s=30)
    group_alive_when_freed: list[bool] = []
    enabled = gc.isenabled()
    gc.disable()  # no automatic collection may free it first
    try:
        with distributed.process_group(env, torch.device("cpu")):
            ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 2))
            ddp(torch.randn(3, 4)).sum().backward()
            # DDP's own hooks form such a cycle in some torch builds and states; make one for certain
            ddp.__dict__["_cycle"] = [ddp]
            weakref.finalize(ddp, lambda: group_alive_when_freed.append(tdist.is_initialized()))
            del ddp
            assert group_alive_when_freed == []  # the cycle keeps it alive past `del`
        assert group_alive_when_freed == [True]
        assert not tdist.is_initialized()
    finally:
        if enabled:
            gc.enable()


# ---------------------------------------------------------------- two processes


def _ddp_against_reference(tmp_path: Path, device: str, rtol: float = RTOL) -> None:
    inputs = _inputs()
    with open(tmp_path / "inputs.pkl", "wb") as fh:
        pickle.dump((inputs, CFG, BATCH), fh)
    res = _torchrun(TESTS / "distributed_helpers.py", "train", tmp_path, device, cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    ddp = torch.load(tmp_path / "state.pt")
    ref, ref_losses = _reference(inputs, device=device)
    init = ScRCL(inputs.x0.shape[1], inputs.x0.shape[0], CFG.hidden_dim, CFG.out_dim, CFG.dropout, CFG.seed).state_dict()
    worst = max(float((ddp[k] - want).norm() / want.norm().clamp_min(1e-12)) for k, want in ref.items())
    # how far training took the whole parameter vector from the (shared) initialisation
    flat = torch.cat([ref[k].flatten() for k in init]), torch.cat([init[k].flatten() for k in init])
    moved = float((flat[0] - flat[1]).norm() / flat[1].norm())
    print(f"DDP on {device} vs gradient averaging: max relative parameter difference {worst:.3g} (training moved them {moved:.3g})")
    assert worst <= rtol
    assert moved > 100 * rtol  # the comparison is about trained weights, not the shared initialisation
    np.testing.assert_allclose(np.load(tmp_path / "losses.npy"), ref_losses, rtol=rtol)


def test_ddp_equals_single_process_gradient_averaging(tmp_path):
    _ddp_against_reference(tmp_path, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_ddp_on_one_shared_gpu_equals_gradient_averaging(tmp_path):
    """Two processes on GPU 0 (gloo lets them share it; nccl would refuse): the machine with one
    GPU checks that DDP on CUDA takes the gradient-averaged steps of one process (on an H200 the
    largest relative parameter difference was 2.1e-7, as on the CPU)."""
    _ddp_against_reference(tmp_path, "cuda")


def test_cli_under_torchrun_writes_one_model_from_rank_0(tmp_path):
    from scrcl_cli.bundle import read_bundle

    logs = tmp_path / "torchrun_logs"
    res = _torchrun("-m", "scrcl_cli", "--log-file", "train.log", "train", EXAMPLE, "-o", "model", "--out-h5ad", "out.h5ad",
                    "--distributed", "--device", "cpu", "--epochs", "2", "--hidden-dim", "16", "--out-dim", "4",
                    "--n-top-genes", "200", "--n-clusters", "4", "--batch-size", "200", "--no-export",
                    cwd=tmp_path, extra=("--log-dir", str(logs), "--redirects", "3", "--tee", "3"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "out.h5ad", "torchrun_logs", "train.log"]
    bundle = read_bundle(tmp_path / "model")
    assert bundle.manifest.training["processes"] == 2
    assert bundle.manifest.training["batch_size"] == 200
    assert bundle.manifest.clusters.n_clusters == 4
    assert anndata.read_h5ad(tmp_path / "out.h5ad").obs["scrcl_cluster"].notna().all()
    log_text = (tmp_path / "train.log").read_text()
    assert "process 0 of 2 joined the gloo process group" in log_text
    assert "process 1 of 2" not in log_text  # rank 1 did not write to the log file
    # torchrun's per-rank capture: rank 1 printed nothing (no progress, no summary); rank 0 reported
    err = {int(p.parent.name): p.read_text() for p in logs.rglob("stderr.log")}
    out = {int(p.parent.name): p.read_text() for p in logs.rglob("stdout.log")}
    assert set(err) == {0, 1}
    assert err[1].strip() == "" and out[1].strip() == "", err[1]
    assert "scrcl-cli train" in err[0]


def test_a_stalled_process_fails_the_others_after_the_timeout(tmp_path):
    (tmp_path / "timeout_s").write_text("5")
    t = time.perf_counter()
    res = _torchrun(TESTS / "distributed_helpers.py", "stall", tmp_path, cwd=tmp_path)
    elapsed = time.perf_counter() - t
    assert res.returncode != 0
    waited, error = (tmp_path / "rank0_error.txt").read_text().split("\n", 1)
    assert 4.0 <= float(waited) <= 30.0, error
    assert elapsed < 90  # rank 1 sleeps 120 s: torchrun stopped it once rank 0 failed
    print(f"rank 0 gave up after {waited} s: {error[:120]}")
