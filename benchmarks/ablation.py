"""Ablation of training defaults at reduced width: ARI of the fused embedding and of each half, K given.

Labels are read only to score. Usage:
    python benchmarks/ablation.py DATASETS JSON_CONFIGS
e.g. python benchmarks/ablation.py pbmc_10x_4k_top2000,baron_human_subset2142 '[{}, {"t0": 4, "t1": 2}]'
Each config overrides TrainConfig(epochs=100, hidden_dim=128, out_dim=16, seed=0).
"""
import sys, json, time, itertools
import numpy as np, anndata as ad, scipy.sparse as sp, torch
torch.set_num_threads(1)
from scrcl_cli.training import TrainConfig
from scrcl_cli.workflow import train_model
from scrcl_cli.data import validate_adata
from sklearn.metrics import adjusted_rand_score as ARI
from scrcl_cli import clustering
D = str(__import__("pathlib").Path(__file__).resolve().parents[1].parent / "shared" / "data") + "/"
sets = sys.argv[1].split(",")
configs = json.loads(sys.argv[2])
for ds in sets:
    a = ad.read_h5ad(D+ds+".h5ad"); y = a.obs.cell_type.to_numpy(); K = len(set(y))
    for cfg in configs:
        base = dict(epochs=100, hidden_dim=128, out_dim=16, seed=0)
        base.update(cfg)
        b = a.copy(); b.obs = b.obs[[]]
        expr = "counts"
        validate_adata(b, name=ds, expression="continuous")
        t = time.time()
        r = train_model(b, TrainConfig(**base), device="cpu", n_clusters=K, export=False)
        m = r.labels >= 0
        z1 = r.embedding[:, :base["out_dim"]]; z2 = r.embedding[:, base["out_dim"]:]
        a1 = ARI(y[m], clustering.cosine_kmeans(z1[m], K, seed=0).labels)
        a2 = ARI(y[m], clustering.cosine_kmeans(z2[m], K, seed=0).labels)
        print(json.dumps(dict(ds=ds, cfg=cfg, ari=round(ARI(y[m], r.labels[m]),3), z1=round(a1,3), z2=round(a2,3), s=round(time.time()-t,1), loss=r.manifest["training"]["final_loss"][:1])), flush=True)
