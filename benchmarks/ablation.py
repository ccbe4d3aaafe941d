"""Ablation of training defaults at reduced width: ARI of the model's clusters (and of z1, z2 for the fused embedding), K given.

Labels are read only to score. Usage:
    python benchmarks/ablation.py DATASETS JSON_CONFIGS [--device cpu|cuda] [--threads N]
e.g. python benchmarks/ablation.py pbmc_10x_4k_top2000,baron_human_subset2142 '[{}, {"t0": 4, "t1": 2}]'
Each config overrides TrainConfig(epochs=100, hidden_dim=128, out_dim=16, seed=0).
"""
import argparse, sys, json, time, itertools
import numpy as np, anndata as ad, scipy.sparse as sp, torch
ap = argparse.ArgumentParser()
ap.add_argument("datasets"); ap.add_argument("configs")
ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"]); ap.add_argument("--threads", type=int, default=1)
args = ap.parse_args()
torch.set_num_threads(args.threads)
from scrcl_cli.training import TrainConfig
from scrcl_cli.workflow import train_model
from scrcl_cli.io.h5ad import validate_adata
from sklearn.metrics import adjusted_rand_score as ARI
from scrcl_cli import clustering
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from accuracy import DEFAULT_DATA, detect_expression  # noqa: E402
sets = args.datasets.split(",")
configs = json.loads(args.configs)
for ds in sets:
    a = ad.read_h5ad(DEFAULT_DATA / f"{ds}.h5ad"); y = a.obs.cell_type.to_numpy(); K = len(set(y))
    expr = detect_expression(a.X)[0]  # the rule accuracy.py applies: counts, log or continuous
    for cfg in configs:
        base = dict(epochs=100, hidden_dim=128, out_dim=16, seed=0, expression=expr)
        base.update(cfg)
        b = a.copy(); b.obs = b.obs[[]]
        validate_adata(b, name=ds, expression=expr)
        t = time.time()
        r = train_model(b, TrainConfig(**base), device=args.device, n_clusters=K, export=False)
        m = r.labels >= 0
        halves = {}
        if r.manifest["model"]["embedding"] == "fused":  # the halves z1, z2 exist only in the fused embedding
            z1 = r.embedding[:, :base["out_dim"]]; z2 = r.embedding[:, base["out_dim"]:]
            halves = dict(z1=round(ARI(y[m], clustering.cosine_kmeans(z1[m], K, seed=0).labels), 3),
                          z2=round(ARI(y[m], clustering.cosine_kmeans(z2[m], K, seed=0).labels), 3))
        print(json.dumps(dict(ds=ds, cfg=cfg, ari=round(ARI(y[m], r.labels[m]),3), **halves, s=round(time.time()-t,1), train_s=round(r.seconds,1), device=r.device, loss=r.manifest["training"]["final_loss"][:1])), flush=True)
