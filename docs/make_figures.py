"""Regenerate the tutorial's pictures from the bundled PBMC example (CPU, about a minute).

    python docs/make_figures.py            # writes docs/img/pbmc_layout.png

Trains with the `demo` settings through the Python API, clusters the same cells through the
exported encoder, and draws a 2-D layout of the embedding coloured by cluster and by the
published annotation (read only for the picture, after clustering).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import anndata as ad
import numpy as np

import scrcl_cli
from scrcl_cli import config
from scrcl_cli.metrics import ari
from scrcl_cli.plotting import plot_embedding

OUT = Path(__file__).resolve().parent / "img" / "pbmc_layout.png"


def main() -> None:
    example = Path(str(resources.files("scrcl_cli") / "data" / "pbmc68k_reduced_700.h5ad"))
    adata = ad.read_h5ad(example)
    model = scrcl_cli.fit(adata, epochs=config.DEMO_EPOCHS, hidden_dim=config.DEMO_HIDDEN_DIM, seed=0)
    query = ad.read_h5ad(example)
    model.cluster(query, seed=0)
    labels = query.obs["scrcl_cluster"].to_numpy()
    truth = query.obs["cell_type"].to_numpy()
    score = ari(truth, labels)
    plot_embedding(np.asarray(query.obsm["X_scrcl"]), labels, OUT, seed=0, overwrite=True,
                   title=f"bundled PBMC example, 700 cells (ARI {score:.2f})", extra={"published annotation": truth})
    print(f"wrote {OUT.relative_to(Path.cwd()) if OUT.is_relative_to(Path.cwd()) else OUT.name} (ARI {score:.3f})")


if __name__ == "__main__":
    main()
