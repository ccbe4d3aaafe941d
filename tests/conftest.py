"""Shared fixtures: the shared real datasets, a small trained model, fast settings."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
EXAMPLE = Path(__file__).resolve().parents[1] / "scrcl_cli" / "data" / "pbmc68k_reduced_700.h5ad"
FAST = ["--epochs", "3", "--hidden-dim", "32", "--out-dim", "8"]


def shared(name: str) -> Path:
    """Path of a shared dataset, or skip the test with the reason."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"shared dataset missing: {path} (tests read ../shared/data beside the checkout)")
    return path


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model trained on the bundled 700-cell PBMC example with fast settings (CLI, in-process)."""
    pytest.importorskip("torch")
    from click.testing import CliRunner

    from scrcl_cli.cli import cli

    out = tmp_path_factory.mktemp("model") / "model"
    res = CliRunner().invoke(cli, ["-q", "train", str(EXAMPLE), "-o", str(out), "--epochs", "20", "--hidden-dim", "64",
                                   "--out-dim", "8", "--n-clusters", "6", "--out-h5ad", str(out.parent / "train.h5ad")])
    assert res.exit_code == 0, res.output
    return out
