"""The model folder's typed manifest: JSON round trips, what writing adds, and the schema's refusals."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from robustness_helpers import minimal_manifest, minimal_manifest_json

from scrcl_cli import bundle
from scrcl_cli.errors import ScrclError


def test_trained_manifest_round_trips_through_json(trained_model):
    """A folder written by `train`: reading, serialising and reading again gives the same typed manifest,
    and serialising gives back the JSON on disk, key for key."""
    on_disk = json.loads((trained_model / bundle.MANIFEST_NAME).read_text())
    manifest = bundle.read_manifest(trained_model)
    again = bundle.Manifest.from_json(json.loads(json.dumps(manifest.to_json())), trained_model)
    assert again == manifest
    assert manifest.to_json() == on_disk
    assert manifest.genes_sha256 == on_disk["genes_sha256"] == bundle.genes_hash(list(manifest.genes))
    assert manifest.model.width("fused") == manifest.clusters.centroids("fused").shape[1]
    assert manifest.clusters.centroids("cell").shape == (manifest.clusters.n_clusters, manifest.model.cell_dim)


def test_write_model_dir_lists_hashes_and_stamps_the_format(tmp_path):
    files = {"weights.pt": b"w", "genes.txt": b"a\nb\n"}
    dest = bundle.write_model_dir(tmp_path / "m", files, minimal_manifest(["a", "b"]), overwrite=False)
    read = bundle.read_bundle(dest)
    assert read.manifest.files == {name: bundle.sha256_bytes(blob) for name, blob in files.items()}
    assert read.manifest.format_version == bundle.FORMAT_VERSION
    assert read.manifest.genes == ("a", "b")
    assert bundle.owned_entries(dest) is not None


def test_with_files_refuses_non_finite_centroids():
    manifest = minimal_manifest(["a"])
    broken = replace(manifest, clusters=replace(manifest.clusters, centroids_fused=[[float("nan"), 0.0]]))
    with pytest.raises(ScrclError, match="non-finite numbers"):
        broken.with_files({}, Path("m"))


@pytest.mark.parametrize(
    ("section", "key", "value", "needle"),
    [
        ("preprocessing", "n_top_genes", "2000", "preprocessing.n_top_genes must be an integer"),
        ("preprocessing", "hvg_flavor", "pearson", "preprocessing.hvg_flavor must be one of"),
        ("graph", "gene_neighbors", -1, "graph.gene_neighbors must be an integer"),
        ("graph", "metric", "manhattan", "graph.metric must be one of"),
        ("clusters", "method", "oracle", "clusters.method must be one of"),
        ("clusters", "algorithm", 3, "clusters.algorithm must be one of"),
        ("model", "cell_dim", 0, "model.cell_dim must be an integer"),
        ("config", "unsmoothed_weight", "abc", "config.unsmoothed_weight must be a number"),
        ("config", "unsmoothed_weight", 1e9, "config.unsmoothed_weight must be a number"),
    ],
)
def test_from_json_refuses_bad_fields_in_one_line(section, key, value, needle):
    doc = {**minimal_manifest_json(["a"]), "format_version": bundle.FORMAT_VERSION, "files": {}}
    doc[section] = {**doc[section], key: value}
    with pytest.raises(ScrclError, match=needle) as err:
        bundle.Manifest.from_json(doc, Path("m"))
    assert "\n" not in str(err.value)


def test_optional_fields_absent_stay_absent_in_json():
    """Fields a model does not use (spatial scaling for an expression model) are not written as null."""
    doc = minimal_manifest(["a"]).to_json()
    assert "gene_std" not in doc["preprocessing"] and "refine_neighbours" not in doc["graph"]
    assert doc["onnx"] == bundle.ONNX_FILES
    assert np.isfinite(doc["preprocessing"]["target_sum"])
