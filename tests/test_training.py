"""Training reads no labels, is reproducible for a seed, and lowers the loss on real data."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

pytest.importorskip("torch")
import anndata
import torch
from conftest import EXAMPLE

from scrcl_cli.training import TrainConfig, build_inputs, fit
from scrcl_cli.workflow import train_model

CFG = TrainConfig(epochs=15, hidden_dim=48, out_dim=6, n_top_genes=300, seed=3)


def _example():
    a = anndata.read_h5ad(EXAMPLE)
    a.X = sp.csr_matrix(a.X, dtype=np.float32)
    return a


def test_training_ignores_label_columns():
    with_labels = _example()
    without = _example()
    without.obs = without.obs.drop(columns=list(without.obs.columns))
    rng = np.random.default_rng(0)
    with_labels.obs["cell_type"] = rng.permutation(with_labels.obs["cell_type"].to_numpy())  # scrambled on purpose
    a = train_model(with_labels, CFG, device="cpu", n_clusters=5, export=False)
    b = train_model(without, CFG, device="cpu", n_clusters=5, export=False)
    np.testing.assert_array_equal(a.embedding, b.embedding)
    np.testing.assert_array_equal(a.labels, b.labels)


def test_same_seed_same_cpu_embedding_and_other_seed_differs():
    a = train_model(_example(), CFG, device="cpu", n_clusters=5, export=False)
    b = train_model(_example(), CFG, device="cpu", n_clusters=5, export=False)
    assert np.abs(a.embedding - b.embedding).max() <= 1e-6
    c = train_model(_example(), TrainConfig(**{**CFG.as_dict(), "seed": 4}), device="cpu", n_clusters=5, export=False)
    assert np.abs(a.embedding - c.embedding).max() > 1e-3


def test_fit_loss_decreases_and_stays_finite_on_real_cells():
    from scrcl_cli.preprocessing import prepare

    ad = _example()
    prep = prepare(ad.X, list(ad.var_names), n_top_genes=300)
    cfg = TrainConfig(**{**CFG.as_dict(), "epochs": 60, "lr": 1e-3})
    res = fit(build_inputs(prep.model_input, prep.lognorm, cfg), cfg, device=torch.device("cpu"))
    assert np.all(np.isfinite(res.losses))
    assert res.losses[-5:, 0].mean() < res.losses[:5, 0].mean()
    assert res.fused.shape == (700, 12)


def test_device_cuda_without_gpu_is_a_user_error():
    from scrcl_cli.errors import ScrclError

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(ScrclError, match="--device cuda was requested"):
        train_model(_example(), CFG, device="cuda", n_clusters=3, export=False)


def test_induced_subgraph_matches_scipy_normalisation():
    from scrcl_cli import graphs
    from scrcl_cli.training import induced_subgraph

    rng = np.random.default_rng(0)
    adj = graphs.knn_to_adjacency(graphs.knn_cosine(rng.normal(size=(80, 5)), 6))
    nodes = np.sort(rng.choice(80, 30, replace=False))
    coo = adj.tocoo()
    a_b, a_hat_b = induced_subgraph(torch.tensor(coo.row, dtype=torch.int64), torch.tensor(coo.col, dtype=torch.int64),
                                    torch.tensor(nodes), 80)
    sub = adj[nodes][:, nodes]
    np.testing.assert_array_equal(a_b.to_dense().numpy(), sub.toarray())
    np.testing.assert_allclose(a_hat_b.to_dense().numpy(), graphs.gcn_norm(sub).toarray(), rtol=1e-6)


def test_minibatch_training_learns_on_real_cells():
    """Mini-batches of ~256 of the 700 real cells vs full batch, six seeds each (one thread),
    scored on the clustering embedding (gcn-pca, Euclidean k-means), as `train` clusters.

    Single seeds differ by up to ±0.1 ARI here, so the comparison is of means over seeds.
    Measured on the development machine with `benchmarks/minibatch.py` (docs/benchmarks.md, "Mini-batch and out-of-core training"):
    full 0.525, mini-batch 0.516 over these six seeds. The bound asserted is 0.1 because the
    trajectories depend on the CPU's float kernels and single seeds move by up to 0.1.
    """
    from scrcl_cli.clustering import EMBEDDING_METRIC, cluster_embedding
    from scrcl_cli.metrics import ari
    from scrcl_cli.preprocessing import prepare

    def score(res, cfg):
        return ari(truth, cluster_embedding(res.embedding, 10, seed=0, metric=EMBEDDING_METRIC[cfg.embedding]).labels)

    ad = _example()
    truth = ad.obs["cell_type"].to_numpy()  # evaluation only
    prep = prepare(ad.X, list(ad.var_names), n_top_genes=300)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        full, mini = [], []
        inputs = None
        for seed in range(6):
            cfg = TrainConfig(**{**CFG.as_dict(), "epochs": 25, "lr": 1e-3, "seed": seed})
            inputs = inputs or build_inputs(prep.model_input, prep.lognorm, cfg)
            mb = fit(inputs, cfg, device=torch.device("cpu"), batch_size=256)
            assert mb.extra["batch_size"] == 256
            assert np.all(np.isfinite(mb.losses)) and mb.losses[-5:, 0].mean() < mb.losses[:5, 0].mean()
            mini.append(score(mb, cfg))
            full.append(score(fit(inputs, cfg, device=torch.device("cpu")), cfg))
    finally:
        torch.set_num_threads(threads)
    print(f"\nmini-batch ARI {np.mean(mini):.3f} vs full batch {np.mean(full):.3f} over 6 seeds")
    assert np.mean(mini) > 0.3
    assert np.mean(mini) >= np.mean(full) - 0.1

def test_inclusion_probability_matches_sampled_batches():
    """The hypergeometric inclusion probability of `_batch_nodes` batches equals the sampled frequency."""
    from scrcl_cli.training import _batch_nodes, _seed_chunks, inclusion_probability

    rng = np.random.default_rng(0)
    n = 60
    adj = sp.random(n, n, density=0.08, random_state=1, format="csr")
    adj = ((adj + adj.T) > 0).astype(np.float32)
    adj.setdiag(0)
    adj.eliminate_zeros()
    adj = sp.csr_matrix(adj)
    n_seeds = 7
    pi = inclusion_probability(adj.getnnz(axis=0), n, n_seeds)
    indptr = torch.from_numpy(adj.indptr.astype(np.int64))
    indices = torch.from_numpy(adj.indices.astype(np.int64))
    gen = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
    chunks = _seed_chunks(n, n_seeds, gen, torch.device("cpu"))
    draws = 6000
    counts = np.zeros(n)
    for _ in range(draws):
        counts[_batch_nodes(indptr, indices, next(chunks)).numpy()] += 1
    # Binomial standard error of each frequency is at most 0.0065 here.
    np.testing.assert_allclose(counts / draws, pi, atol=0.03)
    assert pi.min() > n_seeds / n - 1e-12 and pi.max() <= 1.0


def test_minibatch_gene_estimate_is_unbiased():
    """Horvitz-Thompson weighting: the mean over many batches of the gene encoder's batch
    estimate of X0^T W equals the whole-data product (neighbour-expanded batches oversample
    well-connected cells, which the N / B scaling would not correct)."""
    from scrcl_cli.model import ScRCL
    from scrcl_cli.training import _batch_nodes, _seed_chunks, inclusion_probability

    n, g = 80, 5
    rng = np.random.default_rng(2)
    # A hub-heavy graph: cells 0-9 are linked to everyone, the rest to few.
    adj = sp.lil_matrix((n, n), dtype=np.float32)
    for i in range(10):
        for j in range(n):
            if i != j:
                adj[i, j] = adj[j, i] = 1
    adj = sp.csr_matrix(adj)
    x = torch.from_numpy(rng.random((n, g)).astype(np.float32))
    x[:10] += 5.0  # hubs differ, so a biased estimate shows
    model = ScRCL(g, n, 4, 3, 0.0, seed=0)
    target = (x.T @ model.gene_w.T).detach()
    n_seeds = 2
    pi = torch.from_numpy(inclusion_probability(adj.getnnz(axis=0), n, n_seeds).astype(np.float32))
    chunks = _seed_chunks(n, n_seeds, torch.Generator().manual_seed(0), torch.device("cpu"))
    indptr, indices = torch.from_numpy(adj.indptr.astype(np.int64)), torch.from_numpy(adj.indices.astype(np.int64))
    ht = torch.zeros_like(target)
    naive = torch.zeros_like(target)
    draws = 3000
    with torch.no_grad():
        for _ in range(draws):
            nodes = _batch_nodes(indptr, indices, next(chunks))
            w_b = model.gene_w[:, nodes].T
            ht += x[nodes].T @ (w_b / pi[nodes].unsqueeze(1)) / draws
            naive += (n / nodes.shape[0]) * (x[nodes].T @ w_b) / draws
    scale = target.abs().mean()
    assert (ht - target).abs().mean() < 0.05 * scale
    assert (naive - target).abs().mean() > 3 * (ht - target).abs().mean()


def test_minibatch_epochs_count_passes_over_the_cells():
    """An epoch is about N / E[B] steps: the cells seen per epoch add up to about N, and the
    loss log has one row per epoch."""
    from scrcl_cli.preprocessing import prepare

    ad = _example()
    prep = prepare(ad.X, list(ad.var_names), n_top_genes=300)
    cfg = TrainConfig(**{**CFG.as_dict(), "epochs": 3, "lr": 1e-3})
    inputs = build_inputs(prep.model_input, prep.lognorm, cfg)
    seen = []
    import scrcl_cli.training as training

    orig = training._batch_nodes

    def spy(*a):
        out = orig(*a)
        seen.append(out.shape[0])
        return out

    training._batch_nodes = spy
    try:
        res = fit(inputs, cfg, device=torch.device("cpu"), batch_size=128)
    finally:
        training._batch_nodes = orig
    steps = res.extra["steps_per_epoch"]
    assert len(seen) == 3 * steps and steps >= 4
    assert abs(sum(seen) / 3 - 700) < 0.25 * 700
    assert res.losses.shape == (3, 4) and np.all(np.isfinite(res.losses))


def test_out_of_core_inputs_train_like_in_memory(tmp_path):
    """Smoothed inputs in memory-mapped files beside the output train exactly as in memory (the
    same float32 values, the same CPU kernels, the same losses), in mini-batches and full batch;
    the whole-graph pass after training runs streamed (`embed_streamed`), equal to float32
    rounding; the scratch directory is removed afterwards."""
    from scrcl_cli.preprocessing import prepare
    from scrcl_cli.training import is_out_of_core, scratch_inputs

    ad = _example()
    prep = prepare(ad.X, list(ad.var_names), n_top_genes=300)
    cfg = TrainConfig(**{**CFG.as_dict(), "epochs": 4, "lr": 1e-3, "t0": 4, "t1": 2})
    mem = build_inputs(prep.model_input, prep.lognorm, cfg)
    with scratch_inputs(tmp_path / "model") as scratch:
        assert scratch.parent == tmp_path
        ooc = build_inputs(prep.model_input, prep.lognorm, cfg, scratch_dir=scratch)
        assert is_out_of_core(ooc) and not is_out_of_core(mem) and mem.x_hop is None
        # t0, t1 and t1 + 1, the GCN view's first aggregation folded in.
        assert sorted(p.name for p in scratch.iterdir()) == ["smoothed_t2.npy", "smoothed_t3.npy", "smoothed_t4.npy"]
        np.testing.assert_array_equal(np.asarray(ooc.x0), mem.x0)
        np.testing.assert_allclose(np.asarray(ooc.x_hop), mem.a_hat @ mem.x1, rtol=1e-4, atol=1e-6)
        for b in (256, None):
            a = fit(mem, cfg, device=torch.device("cpu"), batch_size=b)
            o = fit(ooc, cfg, device=torch.device("cpu"), batch_size=b)
            # On the CPU the batches gather their rows straight from the files.
            np.testing.assert_array_equal(a.losses, o.losses)
            for key in a.state:
                _assert_same_weights_or_basis(key, o.state[key], a.state[key])
            np.testing.assert_allclose(o.embedding, a.embedding, rtol=1e-3, atol=1e-3)
            np.testing.assert_allclose(o.fused, a.fused, rtol=1e-3, atol=1e-5)
        del ooc
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("embedding", ["gcn-pca", "fused"])
def test_streamed_whole_graph_pass_equals_one_forward_pass(embedding):
    """`embed_streamed` (blocks of 97 cells, the GCN view's first aggregation read from
    Â^(t1+1) X) gives the embeddings, bases and gene embedding of one forward pass over every
    cell."""
    from scrcl_cli.model import ScRCL, to_torch_sparse
    from scrcl_cli.preprocessing import prepare
    from scrcl_cli.training import _whole_graph_in_memory, embed_streamed

    ad = _example()
    prep = prepare(ad.X, list(ad.var_names), n_top_genes=300)
    inputs = build_inputs(prep.model_input, prep.lognorm, CFG)
    n, g = inputs.x0.shape
    model = ScRCL(g, n, 32, 6, 0.3, seed=0).eval()
    x0, x1 = torch.from_numpy(inputs.x0), torch.from_numpy(inputs.x1)
    x_hop = torch.from_numpy((inputs.a_hat @ inputs.x1).astype(np.float32))
    a_hat, gp = to_torch_sparse(inputs.a_hat), to_torch_sparse(inputs.gene_prop)
    with torch.no_grad():
        one = _whole_graph_in_memory(model(x0, x1, a_hat, gp), embedding)
        blk = embed_streamed(model, x0, x_hop, inputs.a_hat, gp, torch.device("cpu"), embedding, block=97)
    assert n % 97 and n > 3 * 97  # several blocks, the last one short
    for name in ("fused", "z1", "gene_emb"):
        np.testing.assert_allclose(getattr(blk, name), getattr(one, name), rtol=1e-4, atol=2e-5, err_msg=name)
    for name in ("embedding", "cell_embedding"):  # the trailing PCA components turn with rounding
        np.testing.assert_allclose(getattr(blk, name), getattr(one, name), rtol=1e-3, atol=1e-3, err_msg=name)
    assert sorted(blk.bases) == sorted(one.bases) == (
        ["embed_cell_components", "embed_cell_mean", "embed_fused_components", "embed_fused_mean"]
        if embedding == "gcn-pca" else []
    )
    for key in one.bases:
        _assert_same_weights_or_basis(key, blk.bases[key], one.bases[key])


def _assert_same_weights_or_basis(key, got, want):
    """Weights and PCA means to float32 rounding; of the PCA components the eight of largest
    variance, since the trailing ones have nearly equal eigenvalues and turn with rounding."""
    if key.endswith("_components"):
        got, want = got[:, :8], want[:, :8]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=key)


def test_out_of_core_refuses_a_disk_too_small_before_smoothing(tmp_path, monkeypatch):
    """The disk check names the need, what is free and the fix, and writes nothing."""
    import shutil
    from collections import namedtuple

    from scrcl_cli.errors import ScrclError
    from scrcl_cli.preprocessing import prepare
    from scrcl_cli.training import scratch_bytes, scratch_powers

    ad = _example()
    prep = prepare(ad.X, list(ad.var_names), n_top_genes=300)
    n, g = prep.model_input.shape
    assert scratch_powers(CFG) == (2, 3, 4) and scratch_bytes(n, g, (2, 3, 4)) == 3 * 4 * n * g
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 40, 1 << 40, 3 * 4 * n * g - 1))
    with pytest.raises(ScrclError, match=r"--out-of-core needs 2\.4 MiB of disk .*\(3 float32 arrays .* 2\.4 MiB are free "
                                         r"there, 0\.0 MiB short\. Write the output \(-o\) to a larger local disk"):
        build_inputs(prep.model_input, prep.lognorm, CFG, scratch_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []
    from scrcl_cli.training import check_scratch_space

    with pytest.raises(ScrclError, match=r"needs 4\.8 MiB .* genes, for each of 2 processes\) and 2\.4 MiB are free there, "
                                         r"2\.4 MiB short"):
        check_scratch_space(tmp_path, (n, g), (2, 3, 4), processes=2)


def test_rows_land_on_the_requested_device_wherever_the_inputs_and_indices_are():
    """Streamed inputs stay on the host and so may the indices (the whole-graph pass makes them
    there); the rows must still reach the device (the meta device stands in for a GPU here)."""
    from scrcl_cli.training import _rows

    x = torch.arange(15.0).reshape(5, 3)
    got = _rows(x, torch.tensor([4, 1]), torch.device("meta"))
    assert got.device.type == "meta" and got.shape == (2, 3)
    torch.testing.assert_close(_rows(x, torch.tensor([4, 1]), torch.device("cpu")), x[[4, 1]])


def test_out_of_core_disk_filling_up_is_one_error_line_and_leaves_no_scratch(tmp_path, monkeypatch):
    """The smoothed inputs' files are allocated when they are made, so a disk that fills up after
    the check is a clean error there, not a crash when a page of the map is first written."""
    import errno
    import os

    from click.testing import CliRunner

    from scrcl_cli.cli import cli

    calls = []

    def full(fd, offset, length):
        calls.append(length)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    out = tmp_path / "m"
    res = CliRunner().invoke(cli, ["-q", "train", str(EXAMPLE), "-o", str(out), "--epochs", "3", "--hidden-dim", "32",
                                   "--batch-size", "300", "--out-of-core", "--no-export", "--device", "cpu"])
    assert res.exit_code == 1 and calls and calls[0] > 700 * 4
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: the disk is full writing ") and "smoothed_t" in lines[0], lines
    assert list(tmp_path.iterdir()) == []


@pytest.mark.gpu
def test_out_of_core_on_cuda_trains_and_embeds_like_in_memory(tmp_path):
    """On a GPU the streamed inputs stay on the host: mini-batches and the whole-graph pass must
    move their rows to the device and give the in-memory run's embedding."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from scrcl_cli.preprocessing import prepare
    from scrcl_cli.training import scratch_inputs

    ad = _example()
    prep = prepare(ad.X, list(ad.var_names), n_top_genes=300)
    cfg = TrainConfig(**{**CFG.as_dict(), "epochs": 4, "lr": 1e-3})
    mem = build_inputs(prep.model_input, prep.lognorm, cfg)
    with scratch_inputs(tmp_path / "model") as scratch:
        ooc = build_inputs(prep.model_input, prep.lognorm, cfg, scratch_dir=scratch)
        for b in (256, None):
            a = fit(mem, cfg, device=torch.device("cuda"), batch_size=b)
            o = fit(ooc, cfg, device=torch.device("cuda"), batch_size=b)
            np.testing.assert_allclose(o.losses, a.losses, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(o.fused, a.fused, rtol=1e-3, atol=1e-4)
            print(f"batch {b}: out of core against in memory on CUDA, max |fused| difference "
                  f"{float(np.abs(o.fused - a.fused).max()):.2g}")
        del ooc


def test_train_out_of_core_cli_leaves_no_scratch(tmp_path):
    from click.testing import CliRunner

    from scrcl_cli.cli import cli

    out = tmp_path / "m"
    res = CliRunner().invoke(cli, ["-q", "train", str(EXAMPLE), "-o", str(out), "--epochs", "3", "--hidden-dim", "32",
                                   "--out-dim", "4", "--n-clusters", "4", "--batch-size", "300", "--out-of-core",
                                   "--no-export", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert (out / "weights.pt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_train_out_of_core_on_a_full_disk_is_one_error_line_and_writes_nothing(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from click.testing import CliRunner

    from scrcl_cli.cli import cli

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 40, 1 << 40, 1 << 20))
    out = tmp_path / "m"
    res = CliRunner().invoke(cli, ["-q", "train", str(EXAMPLE), "-o", str(out), "--epochs", "3", "--hidden-dim", "32",
                                   "--batch-size", "300", "--out-of-core", "--no-export", "--device", "cpu"])
    assert res.exit_code == 1
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --out-of-core needs ") and "1.0 MiB are free there" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_next_out_of_core_run_removes_the_scratch_a_killed_run_left(tmp_path):
    """A killed run (SIGKILL runs no cleanup) leaves its scratch folder of smoothed inputs beside
    the output; the next run with that output removes it, and never a look-alike holding anything
    else."""
    import subprocess
    import sys

    from click.testing import CliRunner

    from scrcl_cli.cli import cli
    from scrcl_cli.io.output import TMP_TAG

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    out = tmp_path / "m"
    stale = tmp_path / f".m{TMP_TAG}{proc.pid}-0badc0de"
    stale.mkdir()
    for t in (2, 3, 4):
        (stale / f"smoothed_t{t}.npy").write_bytes(b"\0" * 4096)
    foreign = tmp_path / f".m{TMP_TAG}{proc.pid}-0badc0df"
    foreign.mkdir()
    (foreign / "smoothed_t2.npy").write_bytes(b"\0")
    (foreign / "notes.txt").write_text("mine")
    res = CliRunner().invoke(cli, ["-q", "train", str(EXAMPLE), "-o", str(out), "--epochs", "2", "--hidden-dim", "32",
                                   "--batch-size", "300", "--out-of-core", "--no-export", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert not stale.exists() and (foreign / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m", foreign.name])


def test_train_model_reports_every_phase_in_run_order():
    """The phase table `train` prints: every step, in the order it ran, within the wall time."""
    import time

    from scrcl_cli.workflow import phase_line

    clock = time.perf_counter()
    trained = train_model(_example(), CFG, device="cpu", export=True)
    wall = time.perf_counter() - clock
    assert list(trained.phases) == ["preprocess", "graphs", "training", "cluster count", "k-means", "export"]
    assert all(s >= 0 for s in trained.phases.values())
    assert sum(trained.phases.values()) <= wall
    assert trained.phases["training"] >= trained.seconds  # fit's own clock runs inside the phase
    assert phase_line(trained.phases).startswith("preprocess ") and phase_line(trained.phases).endswith(" s")


@pytest.mark.parametrize("batch_size", [None, 256])
def test_matmul_precision_holds_while_training_and_is_restored_after(batch_size):
    from scrcl_cli.preprocessing import prepare

    ad = _example()
    prep = prepare(ad.X, list(ad.var_names), n_top_genes=300)
    cfg = TrainConfig(**{**CFG.as_dict(), "epochs": 3, "matmul_precision": "medium"})
    inputs = build_inputs(prep.model_input, prep.lognorm, cfg)
    backends = (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul)
    before = [b.fp32_precision for b in backends]
    seen = []
    fit(inputs, cfg, device=torch.device("cpu"), batch_size=batch_size,
        on_epoch=lambda epoch, terms: seen.append([b.fp32_precision for b in backends]))
    assert seen == [["tf32", "bf16"]] * 3  # CUDA products on the tensor cores in TF32, CPU ones in bfloat16
    assert [b.fp32_precision for b in backends] == before
    assert torch.get_float32_matmul_precision() == "highest"  # the process's setting, readable as before

    def interrupt(epoch, terms):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(inputs, cfg, device=torch.device("cpu"), batch_size=batch_size, on_epoch=interrupt)
    assert [b.fp32_precision for b in backends] == before


def test_training_sets_its_own_precision_and_gives_back_the_callers():
    from scrcl_cli.training import matmul_precision

    # A caller that set TF32 through torch's per-backend switches (the legacy getter then refuses to answer).
    backends = (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul)
    saved = [b.fp32_precision for b in backends]
    try:
        backends[0].fp32_precision, backends[1].fp32_precision = "tf32", "ieee"
        with matmul_precision("highest"):
            assert [b.fp32_precision for b in backends] == ["ieee", "ieee"]
        assert [b.fp32_precision for b in backends] == ["tf32", "ieee"]
    finally:
        for b, value in zip(backends, saved):
            b.fp32_precision = value


def test_reduced_matmul_precision_clusters_real_cells_like_float32():
    from scrcl_cli.clustering import cluster_embedding
    from scrcl_cli.metrics import ari
    from scrcl_cli.preprocessing import prepare

    ad = _example()
    prep = prepare(ad.X, list(ad.var_names), n_top_genes=300)
    inputs = build_inputs(prep.model_input, prep.lognorm, CFG)
    runs = {p: fit(inputs, TrainConfig(**{**CFG.as_dict(), "matmul_precision": p}), device=torch.device("cpu"))
            for p in ("highest", "medium")}
    diff = np.abs(runs["highest"].embedding - runs["medium"].embedding).max()
    if diff == 0:
        pytest.skip("this CPU computes float32 products exactly at 'medium' too (no bfloat16 path)")
    labels = {p: cluster_embedding(r.embedding, 8, seed=0, metric="euclidean").labels for p, r in runs.items()}
    assert ari(labels["highest"], labels["medium"]) >= 0.9
    np.testing.assert_allclose(runs["highest"].losses[-1], runs["medium"].losses[-1], rtol=1e-3)
