"""benchmarks/ is one package with one entry point, `python -m benchmarks SUITE`, and no path hacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
# The suites run from the repository root as `python -m benchmarks`; PYTHONSAFEPATH (set by CI so
# that tests import the installed wheel) would hide the checkout's `benchmarks` package.
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}


def test_no_sys_path_edits_in_benchmarks():
    offenders = [p.name for p in (ROOT / "benchmarks").glob("*.py") if "sys.path" in p.read_text()]
    assert not offenders, offenders


@pytest.mark.parametrize("suite", ["accuracy", "spatial", "scaling", "inference", "end-to-end", "minibatch",
                                   "clustering", "knn", "make-large", "run", "cut", "mapping", "libraries",
                                   "whole-graph", "step-cost"])
def test_every_suite_answers_help(suite: str):
    res = subprocess.run([sys.executable, "-m", "benchmarks", suite, "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=240, check=False, env=ENV)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith(f"usage: python -m benchmarks {suite}"), res.stdout[:200]


def test_clustering_suite_runs_and_prints_its_table():
    res = subprocess.run([sys.executable, "-m", "benchmarks", "clustering", "--sizes", "1500"], cwd=ROOT,
                         capture_output=True, text=True, timeout=240, check=False, env=ENV)
    assert res.returncode == 0, res.stderr[-2000:]
    row = [line for line in res.stdout.splitlines() if line.startswith("| 1,500 |")]
    assert row and row[0].rstrip().endswith("|"), res.stdout


def test_whole_graph_suite_measures_both_passes_on_the_same_cells(tmp_path: Path):
    """Both variants run on the same resampled real cells and the table reports each one's memory."""
    res = subprocess.run([sys.executable, "-m", "benchmarks", "whole-graph", "--sizes", "1500", "--hidden-dim", "32",
                          "--threads", "1", "--json", str(tmp_path / "wg.jsonl")], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, check=False, env={**ENV, "SCRCL_BENCH_DIR": str(tmp_path / "bench")})
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "wg.jsonl").read_text().splitlines()]
    assert [(r["variant"], r["status"], r["embedding_shape"][0], r["finite"]) for r in rows] == [
        ("one-call", "ok", 1500, True), ("streamed", "ok", 1500, True)]
    assert all(r["mem"] > 0 for r in rows)
    assert [line for line in res.stdout.splitlines() if line.startswith("| 1,500 |")], res.stdout


@pytest.fixture
def bench_pkg(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the checkout's `benchmarks` package importable here (CI's PYTHONSAFEPATH hides it).

    scrcl_cli is imported first, so that the package under test stays the installed one.
    """
    import scrcl_cli  # noqa: F401

    monkeypatch.syspath_prepend(str(ROOT))


def test_stress_rule_and_groups_read_no_result(bench_pkg: None):
    from conftest import shared

    from benchmarks import cut, protocol

    labels = np.array(["big"] * 400 + [f"t{i}" for i in range(9) for _ in range(60)] + ["tiny"] * 10)
    keep = protocol.stressed(labels)
    assert keep is not None
    kept = labels[keep]
    assert (kept == "big").sum() == 200  # the largest type halved
    # two of the smallest types with >= 20 cells cut to 0.5 % of the 750 cells left after halving (4 cells)
    counts = sorted(int((kept == f"t{i}").sum()) for i in range(9))
    assert counts == [4, 4] + [60] * 7
    assert (kept == "tiny").sum() == 10  # below 20 cells: left alone
    assert protocol.stressed(np.array(["a", "b"] * 50)) is None  # fewer than 10 types
    tuning, confirmation = cut.groups(shared("MANIFEST.md").parent)
    assert len(tuning) == protocol.N_TUNING and not set(tuning) & set(confirmation)
    # the largest datasets tune, by cells alone (ties by name)
    assert protocol.split_groups({"a": 5, "b": 9, "c": 9, "d": 1, "e": 7, "f": 3}) == (["b", "c", "e", "a", "f"], ["d"])


def test_libraries_kmeans_part_compares_every_variant_on_cached_embeddings(tmp_path: Path):
    """Two cached embeddings as the cut suite writes them: a row per dataset and variant, and the
    large-N timing, where on blobs every variant finds the hand-written partition."""
    rng = np.random.default_rng(0)
    for seed in (0, 1):
        y = rng.integers(4, size=300)
        emb = (rng.normal(size=(4, 6)) * 4)[y] + rng.normal(size=(300, 6))
        np.savez(tmp_path / f"blobs.whole.{seed}.npz", embedding=emb.astype(np.float32),
                 labels=np.array([f"t{v}" for v in y]), k_free=4, pca=emb.astype(np.float32), seconds=0.0)
    res = subprocess.run([sys.executable, "-m", "benchmarks", "libraries", "--parts", "kmeans,large", "--embeddings",
                          str(tmp_path), "--seeds", "0,1", "--large-n", "2000", "--large-from", "blobs.whole.0"],
                         cwd=ROOT, capture_output=True, text=True, timeout=240, check=False, env=ENV)
    assert res.returncode == 0, res.stderr[-2000:]
    row = [line for line in res.stdout.splitlines() if line.startswith("| blobs (whole) | 300 | 4 |")]
    assert row and len(row[0].strip("|").split("|")) == 3 + 3 * 4, res.stdout
    large = sorted({line for line in res.stdout.splitlines() if line.startswith("| 2,000 |")})  # progress + report
    assert len(large) == 4 and all(float(line.split("|")[-2]) > 0.99 for line in large), large  # blobs: one partition


def test_mapping_splits_hold_out_each_donor_once(bench_pkg: None):
    import anndata as ad
    import pandas as pd

    from benchmarks import mapping

    adata = ad.AnnData(obs=pd.DataFrame({"donor": ["a", "b", "a", "c", "b", "c"]}, index=[f"c{i}" for i in range(6)]))
    got = mapping.splits(adata, "donor")
    assert [name for name, _ in got] == ["donor a", "donor b", "donor c"]
    assert np.array_equal(np.sum([m for _, m in got], axis=0), np.ones(6))  # every cell a query exactly once
    (name, half), = mapping.splits(adata, None)
    assert name == "random half" and half.sum() == 3


def test_cut_overrides_are_typed_and_name_their_cache(bench_pkg: None):
    from benchmarks import cut

    args = cut.parse_args(["--set", "t0=2", "--set", "lr=1e-3", "--set", "embedding=fused"])
    assert args.overrides == {"t0": 2, "lr": 0.001, "embedding": "fused"}
    assert cut._setting_name(args) == "H256_E100_C2000_embeddingfused_lr0.001_t02"
    assert cut._setting_name(cut.parse_args([])) == "H256_E100_C2000"  # the defaults keep their cache
    for bad in (["--set", "t0"], ["--set", "bogus=1"], ["--set", "seed=3"]):
        with pytest.raises(SystemExit):
            cut.parse_args(bad)


def test_cut_joint_candidate_keeps_a_type_the_embedding_merges(bench_pkg: None):
    """Two types the embedding cannot tell apart, and the PCA can: only the joint cut finds them."""
    from benchmarks import cut

    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 100)
    emb = np.vstack([rng.normal(0, 0.1, (200, 4)), rng.normal(5, 0.1, (100, 4))])  # types 0 and 1 share a blob
    pca = rng.normal(0, 0.1, (300, 4))
    pca[100:200] += 5
    pca[200:] -= 5
    from scrcl_cli.metrics import ari

    assert ari(y, cut.cut_ward_kmeans(emb, 3, 0)) < 0.8
    assert ari(y, cut.cut_joint(emb, 3, 0, pca, 1.0)) == pytest.approx(1.0)
    names = cut.cut_names()
    assert [n for n in names if n.startswith("joint")] == [f"joint with PCA, weight {w:g}" for w in cut.JOINT_WEIGHTS]
    assert set(cut.CUTS) | set(cut.PACKAGE_JOINT) <= set(names)


def test_cut_modularity_merge_joins_a_split_type_before_an_isolated_small_one(bench_pkg: None):
    """A large clique cut in two and a small separate clique: merging to two clusters joins the halves."""
    import scipy.sparse as sp

    from benchmarks import cut

    big, small = np.arange(40), np.arange(40, 46)
    adj = sp.lil_matrix((46, 46))
    for group in (big, small):
        adj[np.ix_(group, group)] = 1
    adj[0, 40] = adj[40, 0] = 1  # one edge joins the small group to the large one
    adj.setdiag(0)
    labels = np.r_[np.zeros(20), np.ones(20), np.full(6, 2)].astype(int)
    merged = cut.merge_by_modularity(labels, adj.tocsr(), 2)
    assert np.unique(merged[big]).size == 1 and np.unique(merged[small]).size == 1
    assert merged[0] != merged[40]
    assert (cut.merge_by_modularity(labels, adj.tocsr(), 3) == labels).all()  # already k: unchanged


def test_cut_clipped_components_match_scanpy_scale_with_max_value(bench_pkg: None):
    """Sparse scaling with the cap on stored values gives the components of scanpy's dense, clipped pp.scale."""
    import anndata as ad
    import scanpy as sc
    import scipy.sparse as sp
    from sklearn.decomposition import PCA

    from benchmarks import cut

    x = sp.random(400, 30, density=0.2, random_state=1, format="lil") * 5.0
    x[0, 3] = 500.0  # one cell far out in one gene: about 20 standard deviations before the clip
    x = x.tocsr()
    a = ad.AnnData(x.toarray())
    sc.pp.scale(a, max_value=3)
    assert a.X.max() == pytest.approx(3.0)
    want = PCA(n_components=5, svd_solver="covariance_eigh").fit_transform(np.asarray(a.X, dtype=np.float64))
    got = cut.clipped_components(x, 3.0, n_components=5)
    signs = np.sign((want * got).sum(0))
    np.testing.assert_allclose(got * signs, want, atol=1e-6)


def test_cut_leave_one_out_picks_on_the_other_datasets_only(bench_pkg: None):
    from benchmarks import cut

    alone, joint = f"{next(iter(cut.CUTS))}|given", f"{cut.cut_names()[-1]}|given"

    def runs(a: float, b: float) -> list[dict]:
        return [{alone: {"ari": a}, joint: {"ari": b}}]

    # "big" favours the joint cut strongly; the other two favour the embedding alone a little.
    results = {"whole": {"big": runs(0.2, 0.9), "x": runs(0.6, 0.55), "y": runs(0.7, 0.65)}}
    rows = [line for line in cut.leave_one_out(results, [alone, joint]) if line.startswith("| ") and "held out" not in line]
    picks = {row.split(" | ")[0][2:]: row.split(" | ")[1] for row in rows}
    assert picks["big"] == alone.split("|")[0]  # without "big", the other two decide
    assert picks["x"] == picks["y"] == joint.split("|")[0]


def test_cut_agreement_is_the_mean_ari_between_pairs_of_seeds(bench_pkg: None):
    from benchmarks import cut

    m = "some cut|given"
    same = [{m: {"pred": [0, 0, 1, 1]}}, {m: {"pred": [1, 1, 0, 0]}}]  # the same partition, renamed
    assert cut._agreement(same, m) == pytest.approx(1.0)
    split = [*same, {m: {"pred": [0, 1, 0, 1]}}]  # ARI -1/2 against each of the other two
    assert cut._agreement(split, m) == pytest.approx((1.0 - 0.5 - 0.5) / 3)
    assert cut._agreement([{m: {"ari": 0.5}}, {m: {"ari": 0.6}}], m) is None  # reports without labels


def test_cut_seed_sources_separate_training_from_clustering_seeds(bench_pkg: None, tmp_path: Path):
    """Two training seeds with the same cached embedding: the training seed alone changes nothing,
    so all disagreement between runs is the clustering seed's."""
    from conftest import shared

    from benchmarks import cut

    data = shared("pollen_log_simlr.h5ad").parent
    jobs = [{"dataset": "pollen_log_simlr", "variant": "whole", "seed": s, "cache": str(tmp_path / f"p.{s}.npz"),
             "data_dir": str(data), "max_cells": 2000, "overrides": {}} for s in (0, 1)]
    n_cells = cut._prepared(jobs[0])[3].model_input.shape[0]
    y = np.arange(n_cells) % 5
    emb = np.random.default_rng(0).normal(size=(n_cells, 8)) + 3.0 * np.eye(8)[y]
    for job in jobs:
        np.savez(job["cache"], embedding=emb.astype(np.float32), labels=y.astype(str))
    got = cut.seed_sources(jobs)
    assert got["training seed only"] == pytest.approx(1.0)
    assert got["both"] == pytest.approx(got["clustering seed only"])
    assert 0.0 < got["both"] <= 1.0
    md = cut.seed_sources_report({"pollen_log_simlr": got}, [], "python -m benchmarks cut --seed-sources")
    assert "| pollen_log_simlr | confirmation | " in md and "**mean**" in md


@pytest.mark.parametrize("suite", ["minibatch", "scale", "ooc"])
def test_gpu_suite_rehearses_on_the_cpu(suite: str, tmp_path: Path):
    """`benchmarks/gpu_suite.sh` is what a GPU host runs unchanged; with DEVICE=cpu and tiny sizes
    the same script trains, scores and writes its summary here."""
    from conftest import shared

    data = shared("pbmc_10x_4k_top2000.h5ad").parent
    env = {**ENV, "SUITE": suite, "DEVICE": "cpu", "SCRCL_DATA": str(data), "SCRCL_BENCH_DIR": str(tmp_path / "bench"),
           "PYTHON": sys.executable, "BUDGET_S": "400", "SCALE_STEP": "0", "MB_N": "1200", "MB_BATCH": "300",
           "SCALE_N": "1200", "OOC_N": "1200", "SCALE_ARGS": "--epochs 2 --hidden-dim 32 --n-top-genes 300",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    res = subprocess.run(["bash", "benchmarks/gpu_suite.sh", str(tmp_path / "results")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600, check=False)
    summary = (tmp_path / "results" / "summary.md").read_text()
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    if suite == "minibatch":
        rows = [line for line in summary.splitlines() if line.startswith(("| full |", "| mini |"))]
        assert len(rows) == 2 and "| 300 |" in rows[1], summary
        assert "ARI between the two clusterings" in summary
    elif suite == "ooc":
        assert "- make_large: exit 0" in summary and "- train_ooc: exit 0" in summary, summary
        assert "train --out-of-core: exit 0" in summary and "peak anonymous memory" in summary, summary
        assert "1200 cells: 2 epochs" in summary and "phases: preprocess " in summary, summary
    else:
        assert "- gpu_checks: exit 0" in summary and "- train_scale: exit 0" in summary, summary
        assert "train on 1200 cells" in summary and "- cluster_scale: exit 0" in summary, summary
        assert "cluster of 1200 cells with that model" in summary, summary


def test_gpu_suite_ooc_stops_before_any_work_when_the_disk_is_short(tmp_path: Path):
    """SUITE=ooc checks the disk for the resampled file and the smoothed inputs first: at 10^10
    cells it stops with the sizes and makes nothing."""
    from conftest import shared

    data = shared("pbmc_10x_4k_top2000.h5ad").parent
    env = {**ENV, "SUITE": "ooc", "DEVICE": "cpu", "SCRCL_DATA": str(data), "SCRCL_BENCH_DIR": str(tmp_path / "bench"),
           "PYTHON": sys.executable, "OOC_N": str(10**10)}
    res = subprocess.run(["bash", "benchmarks/gpu_suite.sh", str(tmp_path / "results")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300, check=False)
    summary = (tmp_path / "results" / "summary.md").read_text()
    assert res.returncode == 1 and "not enough local disk for 10000000000 cells" in res.stdout, res.stdout + res.stderr
    assert "- disk: 253000.0 GB needed in " in summary and "(240000.0 GB of smoothed inputs, 13000.0 GB" in summary
    assert list((tmp_path / "bench").iterdir()) == []


def test_guard_kills_on_anonymous_memory_not_on_mapped_file_pages(tmp_path: Path):
    """The runner's memory guard: 300 MiB of a memory-mapped file, resident, are not a reason to
    kill (the kernel can drop them); 300 MiB of the process's own memory are."""
    from benchmarks.benchutil import run_guarded

    big = tmp_path / "big.bin"
    big.write_bytes(b"\1" * (300 << 20))
    mapped = (f"import mmap, time; f = open({str(big)!r}, 'rb'); m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ); "
              "s = sum(m[i] for i in range(0, len(m), 4096)); time.sleep(1.0); print(s)")
    own = "import time; b = bytearray(300 << 20); b[::4096] = b'\\1' * len(b[::4096]); time.sleep(1.0)"
    limit = 200 << 20
    kept = run_guarded([sys.executable, "-c", mapped], timeout=60, rss_limit=limit, poll_s=0.02)
    killed = run_guarded([sys.executable, "-c", own], timeout=60, rss_limit=limit, poll_s=0.02)
    assert kept.returncode == 0 and kept.peak_rss > limit and kept.peak_anon < limit, (kept.peak_rss, kept.peak_anon)
    assert killed.status().startswith("killed: anonymous memory passed the 0.2 GiB guard"), killed.status()


def test_step_cost_counts_a_real_step_as_its_closed_form_and_leaves_sparse_products_out(bench_pkg: None):
    torch = pytest.importorskip("torch")
    import anndata
    import scipy.sparse as sp
    from conftest import EXAMPLE

    from benchmarks.step_cost import DenseFlops, dense_flops_per_cell
    from scrcl_cli.preprocessing import prepare
    from scrcl_cli.training import MinibatchRun, TrainConfig, build_inputs

    a = anndata.read_h5ad(EXAMPLE)
    prep = prepare(sp.csr_matrix(a.X, dtype=np.float32), list(a.var_names), n_top_genes=300)
    cfg = TrainConfig(hidden_dim=64, out_dim=8, n_top_genes=300, seed=0)
    run = MinibatchRun(build_inputs(prep.model_input, prep.lognorm, cfg), cfg, torch.device("cpu"), 128, None, None)
    run.model.train()
    with DenseFlops() as counted:
        _, cells = run.step()
    assert counted.total / cells == pytest.approx(dense_flops_per_cell(300, 64, 8), rel=0.01)

    # A sparse product and its backward count nothing; the dense product before it counts 2 x B x G x H
    # forward and again for the weight's gradient.
    x, w = torch.randn(50, 30), torch.randn(20, 30, requires_grad=True)
    adj = torch.eye(50).to_sparse()
    with DenseFlops() as counted:
        torch.sparse.mm(adj, x @ w.T).sum().backward()
    assert counted.total == 2 * (2 * 50 * 30 * 20)


def test_step_cost_rounds_factors_as_tensor_cores_do(bench_pkg: None):
    torch = pytest.importorskip("torch")
    from benchmarks.step_cost import rounded_product_errors

    # Exactly representable in TF32 (10 mantissa bits): no error; one more bit: rounded to nearest.
    x = torch.tensor([[1.0 + 2.0**-10, -3.0]])
    w = torch.tensor([[1.0], [0.0]])
    assert rounded_product_errors(x, w)["TF32 factors"] == 0.0
    x = torch.tensor([[1.0 + 2.0**-10 + 2.0**-11 + 2.0**-13, 0.0]])  # nearest TF32: 1 + 2^-9
    exact = 1.0 + 2.0**-10 + 2.0**-11 + 2.0**-13
    assert rounded_product_errors(x, w)["TF32 factors"] == pytest.approx(abs(1.0 + 2.0**-9 - exact) / exact)
    g = torch.Generator().manual_seed(0)
    errors = rounded_product_errors(torch.rand(64, 200, generator=g), torch.randn(200, 30, generator=g))
    assert 0 < errors["TF32 factors"] < errors["bfloat16 factors"] < 2.0**-6
