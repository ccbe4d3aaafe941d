"""Every default of the package, in one torch-free place.

`TrainConfig` holds the training hyperparameters; the CLI's options, `demo`, the Python API
(`scrcl_cli.fit`) and the README's table read their defaults from here (a test checks the README).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from numbers import Integral, Real
from typing import Any, Literal

from .errors import ScrclError

# The allowed values of each TrainConfig field: numbers as (low, high, low open, high open), words
# as choices. The CLI's option types and TrainConfig's own check both read these.
RANGES: dict[str, tuple[float, float, bool, bool]] = {
    "epochs": (1, 100_000, False, False),
    "hidden_dim": (1, 16_384, False, False),
    "out_dim": (2, 4_096, False, False),
    "dropout": (0.0, 1.0, False, True),
    "lr": (0.0, 10.0, True, False),
    "weight_decay": (0.0, 10.0, False, False),
    "temperature": (0.0, 100.0, True, False),
    "lambda1": (0.0, 1e6, False, False),
    "lambda2": (0.0, 1e6, False, False),
    "t0": (0, 64, False, False),
    "t1": (0, 64, False, False),
    "n_neighbors": (2, 1_000, False, False),
    "gene_neighbors": (1, 1_000, False, False),
    "n_top_genes": (1, 1_000_000, False, False),
    "unsmoothed_weight": (0.0, 10.0, False, False),
    "seed": (0, 2**32 - 1, False, False),
}
# What X holds, and what the encoder is fed: used as types across the package.
Expression = Literal["counts", "continuous", "log"]
InputMode = Literal["counts", "lognorm"]

CHOICES: dict[str, tuple[str, ...]] = {
    "input_mode": ("counts", "lognorm"),
    "expression": ("counts", "continuous", "log"),
    "embedding": ("gcn-pca", "fused"),
    # Float32 matrix products while training (`training.matmul_precision`): "highest" keeps them exact
    # and CPU runs reproducible; "high" lets NVIDIA tensor cores use TF32; "medium" is TF32 on CUDA
    # too, and bfloat16 in oneDNN on CPUs that have it (docs/benchmarks.md, "What bounds the training time").
    "matmul_precision": ("highest", "high", "medium"),
}


def describe_range(name: str) -> str:
    """`name`'s allowed values in interval notation, e.g. ``(0, 10]``."""
    lo, hi, lo_open, hi_open = RANGES[name]
    fmt = "{:g}" if isinstance(lo, float) else "{:d}"
    return f"{'(' if lo_open else '['}{fmt.format(lo)}, {fmt.format(hi)}{')' if hi_open else ']'}"


def check_number(name: str, value: Any, *, integer: bool) -> int | float:
    """`value` as a Python int (integer) or finite float inside RANGES[name]; ScrclError otherwise."""
    lo, hi, lo_open, hi_open = RANGES[name]
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, Integral if integer else Real):
        raise ScrclError(f"{name} must be {kind} in {describe_range(name)}, not {value!r}", f"Pass {kind} for {name}")
    number: int | float = int(value) if integer else float(value)  # type: ignore[call-overload]
    inside = math.isfinite(number) and (lo < number if lo_open else lo <= number) and (number < hi if hi_open else number <= hi)
    if not inside:
        raise ScrclError(
            f"{name} must be {kind} in {describe_range(name)}, not {value!r}", f"Pass {kind} for {name} in that range"
        )
    return number


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
    input_mode: InputMode = "lognorm"
    expression: Expression = "counts"
    embedding: str = "gcn-pca"
    # Weight of the unsmoothed PCA clustered beside the embedding (0: the embedding alone); None:
    # UNSMOOTHED_WEIGHT_K_GIVEN with K given, 0 label-free (`unsmoothed_weight`).
    unsmoothed_weight: float | None = None
    matmul_precision: str = "highest"
    seed: int = 0

    def __post_init__(self) -> None:
        # The API takes these from users (numpy scalars included): check and normalise them once here.
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in CHOICES:
                if value not in CHOICES[f.name]:
                    raise ScrclError(
                        f"{f.name} must be one of {', '.join(CHOICES[f.name])}, not {value!r}", f"Pass a valid {f.name}"
                    )
            elif not (value is None and str(f.type).endswith("| None")):  # an optional field left unset
                object.__setattr__(self, f.name, check_number(f.name, value, integer=f.type == "int"))

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
EMBEDDINGS = CHOICES["embedding"]
EMBED_DIM = 50


TRAIN_DEFAULTS = TrainConfig()

# With K given, the embedding is clustered beside the scaled unsmoothed PCA at this weight: the graph
# smoothing averages rare types into large neighbours, and with K fixed k-means then splits a large
# type instead. Label-free it loses, so it stays off there. Measured: docs/defaults.md, "How the
# embedding is cut with K given".
UNSMOOTHED_WEIGHT_K_GIVEN = 0.5


def unsmoothed_weight(value: float | None, *, k_given: bool) -> float:
    """The weight clustering uses: `value` when set, else the default for K given or label-free."""
    if value is not None:
        return float(value)
    return UNSMOOTHED_WEIGHT_K_GIVEN if k_given else 0.0


# Inference defaults shared by the CLI and the API.
BATCH_SIZE = 4096
INFERENCE_BATCH_RANGE = (1, 1_000_000)  # cells per ONNX Runtime call
TRAIN_BATCH_RANGE = (2, 100_000_000)  # cells per training mini-batch
MIN_GENE_OVERLAP = 0.5
# `train --distributed`: how long a process waits for the others at a collective (and at start-up)
# before it fails instead of hanging; long enough for one process's graph build to lag the others'.
DIST_TIMEOUT_S = 1800
# torch's collective backends for train --distributed; "auto": nccl between GPUs, gloo between CPU processes.
DIST_BACKENDS = ("auto", "nccl", "gloo")
KEY_ADDED = "X_scrcl"
CLUSTER_KEY = "scrcl_cluster"
REFINE_NEIGHBOURS = 50

# `scrcl-cli demo`: a width and epoch count that train the bundled 700 cells in seconds on a CPU.
DEMO_HIDDEN_DIM = 256
DEMO_EPOCHS = 100
