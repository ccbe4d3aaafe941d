"""Helpers for the robustness tests (error catalogue, fuzz, atomic outputs, determinism).

Every CLI run here goes through the real entry point, `python -m scrcl_cli`, in a subprocess, or
through Click's CliRunner where a subprocess per example would be too slow.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

# Fast training settings: seconds, not minutes, on a shared CPU.
FAST_TRAIN = ["--epochs", "2", "--hidden-dim", "16", "--out-dim", "4", "--n-top-genes", "200"]


def run_cli(*args: str | Path, cwd: Path | None = None, timeout: float = 240,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `python -m scrcl_cli ARGS` and capture its output (text)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "scrcl_cli", *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def error_lines(stderr: str) -> list[str]:
    """The non-blank lines of stderr."""
    return [line for line in stderr.splitlines() if line.strip()]


def assert_one_line_error(stderr: str, exit_code: int, *needles: str, expected_code: int = 1) -> str:
    """stderr is exactly one line, `error: ...`, naming every needle (case-insensitive); returns it."""
    lines = error_lines(stderr)
    assert exit_code == expected_code, f"exit code {exit_code}, stderr:\n{stderr}"
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{stderr}"
    line = lines[0]
    assert line.startswith("error: "), line
    for needle in needles:
        assert needle.lower() in line.lower(), f"{needle!r} not in {line!r}"
    print(line)  # shown with pytest -rP: the catalogue's messages as users see them
    return line


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def sha256_tree(path: Path) -> dict[str, str]:
    """sha256 of every file under `path` (or of `path` itself), keyed by relative name."""
    path = Path(path)
    if path.is_file():
        return {path.name: sha256_file(path)}
    return {str(p.relative_to(path)): sha256_file(p) for p in sorted(path.rglob("*")) if p.is_file()}


def write_adata(path: Path, x: object, var_names: list[str] | None = None, obs_names: list[str] | None = None) -> Path:
    """Write an AnnData with matrix `x` (dense or sparse) and the given names to `path`."""
    import warnings

    import anndata as ad
    import pandas as pd

    n, g = x.shape  # type: ignore[attr-defined]
    obs = pd.DataFrame(index=pd.Index(obs_names or [f"cell{i}" for i in range(n)], dtype=str))
    var = pd.DataFrame(index=pd.Index(var_names or [f"gene{j}" for j in range(g)], dtype=str))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names are deliberate in some cases
        ad.AnnData(X=x, obs=obs, var=var).write_h5ad(path)
    return Path(path)


def poisson_counts(n_cells: int, n_genes: int, seed: int = 0, lam: float = 1.0) -> np.ndarray:
    """Dense float32 Poisson counts with a little structure (two groups of cells)."""
    rng = np.random.default_rng(seed)
    rates = np.full((n_cells, n_genes), lam)
    rates[: n_cells // 2, : n_genes // 2] *= 4
    return rng.poisson(rates).astype(np.float32)


def minimal_manifest(genes: list[str], **extra: object) -> Any:
    """The smallest manifest `bundle.Manifest.from_json` accepts (1 cluster, widths 2), typed."""
    from pathlib import Path

    from scrcl_cli import bundle

    doc = {**minimal_manifest_json(genes, **extra), "format_version": bundle.FORMAT_VERSION, "files": {}}
    return bundle.Manifest.from_json(doc, Path("minimal"))


def minimal_manifest_json(genes: list[str], **extra: object) -> dict:
    """`minimal_manifest` as JSON, without the file table and format version that writing adds."""
    from scrcl_cli import bundle

    return {
        "genes": genes, "genes_sha256": bundle.genes_hash(genes),
        "preprocessing": {"mode": "sc", "input_mode": "lognorm", "expression": "counts", "target_sum": 1e4},
        "graph": {"kind": "expression", "n_neighbors": 15, "t0": 4, "t1": 2, "pca_threshold": 0},
        "model": {"hidden_dim": 4, "out_dim": 2, "embedding": "gcn-pca", "fused_dim": 2, "cell_dim": 2},
        "clusters": {"n_clusters": 1, "metric": "euclidean", "centroids_fused": [[0.0, 0.0]], "centroids_cell": [[0.0, 0.0]]},
        "config": {}, "training": {}, **extra,
    }
