"""Every default of the package, in one torch-free place.

`TrainConfig` holds the training hyperparameters; the CLI's options, `demo`, the Python API
(`scrcl_cli.fit`) and the README's table read their defaults from here (a test checks the README).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters; defaults are the reference's `init_config_sc` except where noted in README."""

    epochs: int = 100
    hidden_dim: int = 1500
    out_dim: int = 16
    dropout: float = 0.3
    lr: float = 1e-4
    weight_decay: float = 0.1
    temperature: float = 0.1
    lambda1: float = 100.0
    lambda2: float = 1.0
    t0: int = 4
    t1: int = 2
    n_neighbors: int = 15
    gene_neighbors: int = 5
    n_top_genes: int = 2000
    input_mode: str = "lognorm"
    expression: str = "counts"
    embedding: str = "gcn-pca"
    # Weight of the unsmoothed PCA clustered beside the embedding (0: the embedding alone). Measured
    # and not adopted as a default: docs/defaults.md, "Unsmoothed component".
    unsmoothed_weight: float = 0.0
    seed: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# `--spatial` defaults (docs/spatial.md, "Recommended settings"): the fields of TrainConfig that
# differ in spatial mode. One setting for every section, chosen without labels deciding anything
# but the comparison between settings on the two shared sections (the caveat is in that page).
SPATIAL_DEFAULTS: dict[str, Any] = {
    "epochs": 100,
    "hidden_dim": 128,
    "out_dim": 32,
    "temperature": 1.0,
    "lambda1": 10.0,
    "t0": 5,
    "t1": 5,
    "gene_neighbors": 1,
    "n_top_genes": 3000,
    # The spatial defaults were chosen on the fused embedding; gcn-pca was measured on SC data only.
    "embedding": "fused",
}

# Clustering embeddings (docs/defaults.md). "gcn-pca": the first EMBED_DIM principal
# components of the GCN view's L2-normalised hidden output, clustered with Euclidean k-means.
# "fused": the reference's concat(z1, z2), clustered with cosine k-means.
# The k-means metric of each is `clustering.EMBEDDING_METRIC`.
EMBEDDINGS = ("gcn-pca", "fused")
EMBED_DIM = 50


TRAIN_DEFAULTS = TrainConfig()

# Inference defaults shared by the CLI and the API.
BATCH_SIZE = 4096
MIN_GENE_OVERLAP = 0.5
KEY_ADDED = "X_scrcl"
CLUSTER_KEY = "scrcl_cluster"
REFINE_NEIGHBOURS = 50

# `scrcl-cli demo`: a width and epoch count that train the bundled 700 cells in seconds on a CPU.
DEMO_HIDDEN_DIM = 256
DEMO_EPOCHS = 100
