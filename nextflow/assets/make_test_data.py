#!/usr/bin/env python3
"""Make the test data of the example pipeline (``-profile test``) from the packaged PBMC example.

Splits ``pbmc68k_reduced_700.h5ad`` (700 PBMCs, raw counts in X) into a reference half and
two query quarters, stratified by ``obs['cell_type']``, and writes them next to
``samplesheet_test.csv``::

    python nextflow/assets/make_test_data.py                 # -> nextflow/assets/test_data/
    python nextflow/assets/make_test_data.py --outdir DIR    # -> DIR/

Each run also writes ``samplesheet.csv`` (paths relative to it) into the output folder.

The source defaults to the example packaged with scrcl-cli (``scrcl_cli/data/`` of this
checkout, else of the installed package), so a clean clone needs nothing else; ``--source``
reads another copy. Needs numpy and anndata (both come with scrcl-cli).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import anndata as ad
import numpy as np

ASSETS = Path(__file__).resolve().parent
REPO = ASSETS.parents[1]
SOURCE_NAME = "pbmc68k_reduced_700.h5ad"
# file stem (= sample id in samplesheet_test.csv) -> role
SPLITS = {
    "pbmc_reference": "reference",
    "pbmc_query_a": "query",
    "pbmc_query_b": "query",
}


def default_source() -> Path:
    """The packaged example: this checkout's scrcl_cli/data, else the installed scrcl_cli's."""
    checkout = REPO / "scrcl_cli" / "data" / SOURCE_NAME
    if checkout.is_file():
        return checkout
    from importlib import resources

    return Path(str(resources.files("scrcl_cli") / "data" / SOURCE_NAME))


def split_indices(labels: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Half of each label's cells to the reference, a quarter to each query; sorted indices."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[int]] = {name: [] for name in SPLITS}
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        n_ref = (len(idx) + 1) // 2
        n_a = (len(idx) - n_ref + 1) // 2
        parts["pbmc_reference"].extend(idx[:n_ref])
        parts["pbmc_query_a"].extend(idx[n_ref : n_ref + n_a])
        parts["pbmc_query_b"].extend(idx[n_ref + n_a :])
    return {name: np.sort(np.asarray(ix, dtype=np.int64)) for name, ix in parts.items()}


def make_test_data(source: Path, outdir: Path, *, seed: int = 0) -> dict[str, Path]:
    """Write one .h5ad per split and ``samplesheet.csv`` into ``outdir``; return {sample id: path}."""
    if not source.is_file():
        msg = f"{source} does not exist. Pass --source with a copy of {SOURCE_NAME}."
        raise FileNotFoundError(msg)
    adata = ad.read_h5ad(source)
    labels = (
        adata.obs["cell_type"].astype(str).to_numpy()
        if "cell_type" in adata.obs
        else np.zeros(adata.n_obs, dtype=str)
    )
    outdir.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, idx in split_indices(labels, seed).items():
        part = adata[idx].copy()
        part.uns["scrcl_test_split"] = {"source": source.name, "seed": seed, "part": name}
        path = outdir / f"{name}.h5ad"
        part.write_h5ad(path, compression="gzip")
        written[name] = path
    with open(outdir / "samplesheet.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["sample", "h5ad", "role"])
        for name, path in written.items():
            writer.writerow([name, path.name, SPLITS[name]])
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=default_source(), help="pbmc68k_reduced_700.h5ad")
    parser.add_argument("--outdir", type=Path, default=ASSETS / "test_data")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        written = make_test_data(args.source, args.outdir, seed=args.seed)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for name, path in written.items():
        print(f"{name}\t{SPLITS[name]}\t{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
