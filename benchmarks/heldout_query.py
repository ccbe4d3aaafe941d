"""Train on one half of a real dataset, cluster the held-out half with the ONNX encoder, score it.

Labels are dropped before training and read only to score the query. Usage: python benchmarks/heldout_query.py
"""
import numpy as np, anndata, subprocess, sys, tempfile, os
from pathlib import Path
from scrcl_cli.metrics import ari, nmi
d = tempfile.mkdtemp()
full = anndata.read_h5ad(str(Path(__file__).resolve().parents[2] / "shared" / "data" / "pbmc_10x_4k_top2000.h5ad"))
idx = np.random.default_rng(0).permutation(full.n_obs)
ref, query = full[np.sort(idx[::2])].copy(), full[np.sort(idx[1::2])].copy()
truth = query.obs["cell_type"].to_numpy(); ref.obs = ref.obs[[]]; query.obs = query.obs[[]]
ref.write_h5ad(f"{d}/ref.h5ad"); query.write_h5ad(f"{d}/query.h5ad")
cmd1 = ["scrcl-cli", "-q", "train", f"{d}/ref.h5ad", "-o", f"{d}/m", "--epochs", "100", "--hidden-dim", "128", "--n-clusters", "8", "--seed", "0"]
cmd2 = ["scrcl-cli", "-q", "cluster", f"{d}/query.h5ad", "-m", f"{d}/m", "-o", f"{d}/q.h5ad"]
subprocess.run(cmd1, check=True); subprocess.run(cmd2, check=True)
pred = anndata.read_h5ad(f"{d}/q.h5ad").obs["scrcl_cluster"].to_numpy()
print(" ".join(cmd1)); print(" ".join(cmd2))
print(f"held-out half ARI {ari(truth, pred):.3f} NMI {nmi(truth, pred):.3f} ({len(set(pred))} clusters)")
