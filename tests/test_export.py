"""ONNX encoders equal the torch model: fused and per-cell views, dynamic N, deterministic."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from scrcl_cli import graphs  # noqa: E402
from scrcl_cli.export import export_onnx  # noqa: E402
from scrcl_cli.model import ScRCL, to_torch_sparse  # noqa: E402

G, H, O = 40, 24, 5


@pytest.fixture(scope="module")
def exported():
    model = ScRCL(G, 30, H, O, dropout=0.3, seed=1).eval()
    rng = np.random.default_rng(0)
    x_train = np.abs(rng.normal(size=(30, G))).astype(np.float32)
    with torch.no_grad():
        e = model.gene_embedding(torch.from_numpy(x_train), to_torch_sparse(graphs.gene_graph(sp.csr_matrix(x_train))))
    state = model.state_dict()
    return model, e, {v: export_onnx(state, e.numpy(), view=v, metadata={"k": "v"}) for v in ("fused", "cell")}


def _cells(n, seed):
    rng = np.random.default_rng(seed)
    x = np.abs(rng.normal(size=(n, G))).astype(np.float32)
    k = min(15, n)
    a_hat = graphs.gcn_norm(graphs.knn_to_adjacency(graphs.knn_cosine(x, k)))
    return x, a_hat


@pytest.mark.parametrize("n", [2, 7, 500, 3000])
def test_exported_encoders_match_torch(exported, n):
    model, e, blobs = exported
    x, a_hat = _cells(n, n)
    xt = torch.from_numpy(x)
    with torch.no_grad():
        h2 = model.gcn_view(xt, to_torch_sparse(a_hat))
        z1 = model.refine(model.mlp_view(xt), e)
        z2 = model.refine(h2, e)
    nbr, w = graphs.padded_neighbours(a_hat)
    fused = ort.InferenceSession(blobs["fused"], providers=["CPUExecutionProvider"])
    cell = ort.InferenceSession(blobs["cell"], providers=["CPUExecutionProvider"])
    # The first GCN aggregation is folded into the smoothing: xs = Â x (export.py).
    feeds = {"x0": x, "xs": np.asarray(a_hat @ x, dtype=np.float32), "nbr": nbr, "w": w}
    runs = [fused.run(None, feeds)[0] for _ in range(5)]
    want = torch.cat([z1, z2], 1).numpy()
    assert np.abs(runs[0] - want).max() <= 1e-5
    assert all(np.array_equal(runs[0], r) for r in runs[1:])  # no racy ops
    got_cell = [cell.run(None, {"x0": x})[0] for _ in range(5)]
    assert np.abs(got_cell[0] - z1.numpy()).max() <= 1e-5
    assert all(np.array_equal(got_cell[0], r) for r in got_cell[1:])


def test_exported_graph_passes_checker_has_no_scatter_and_carries_metadata(exported):
    for blob in exported[2].values():
        proto = onnx.load_from_string(blob)
        onnx.checker.check_model(proto)
        ops = {node.op_type for node in proto.graph.node}
        assert not any(op.startswith("Scatter") for op in ops)
        assert {p.key: p.value for p in proto.metadata_props}["k"] == "v"


def test_fused_encoder_on_one_hop_batches_matches_whole_graph_torch(exported):
    """Targets in small batches with only their one-hop neighbourhoods get the whole-graph embedding."""
    from scrcl_cli.inference import _one_hop_batches

    model, e, blobs = exported
    x, a_hat = _cells(700, 11)
    xt = torch.from_numpy(x)
    with torch.no_grad():
        want = torch.cat([model.refine(model.mlp_view(xt), e), model.refine(model.gcn_view(xt, to_torch_sparse(a_hat)), e)], 1)
    fused = ort.InferenceSession(blobs["fused"], providers=["CPUExecutionProvider"])
    xs = np.asarray(a_hat @ x, dtype=np.float32)
    got = np.full((700, 2 * O), np.nan, dtype=np.float32)
    sizes = []
    for targets, nodes, nbr, w in _one_hop_batches(a_hat, batch_size=50, max_slots=50 * 40):
        got[targets] = fused.run(None, {"x0": x[targets], "xs": xs[nodes], "nbr": nbr, "w": w})[0]
        sizes.append((targets.size, nodes.size))
    assert len(sizes) >= 14 and all(m < 700 for _, m in sizes)  # real batches, not the whole graph
    assert np.abs(got - want.numpy()).max() <= 1e-5


def test_gcn_pca_encoders_match_training_embedding():
    """With the PCA bases in the state (the default gcn-pca embedding), the fused graph gives the GCN
    view's PCA scores and the cell graph the MLP view's, as `model.embed_hidden` computes them."""
    from scrcl_cli.model import embed_hidden, hidden_pca_basis

    model = ScRCL(G, 30, H, O, dropout=0.3, seed=2).eval()
    x, a_hat = _cells(400, 5)
    xt, at = torch.from_numpy(x), to_torch_sparse(a_hat)
    with torch.no_grad():
        e = model.gene_embedding(xt[:30], to_torch_sparse(graphs.gene_graph(sp.csr_matrix(x[:30]))))
        h1, h2 = model.mlp_view(xt), model.gcn_view(xt, at)
        state = dict(model.state_dict())
        want = {}
        for view, h in (("fused", h2), ("cell", h1)):
            mean, comps = hidden_pca_basis(h, 8)
            state[f"embed_{view}_mean"], state[f"embed_{view}_components"] = mean, comps
            want[view] = embed_hidden(h, mean, comps).numpy()
    blobs = {v: export_onnx(state, e.numpy(), view=v, metadata={}) for v in ("fused", "cell")}
    nbr, w = graphs.padded_neighbours(a_hat)
    feeds = {"x0": x, "xs": np.asarray(a_hat @ x, dtype=np.float32), "nbr": nbr, "w": w}
    got = ort.InferenceSession(blobs["fused"], providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert got.shape == (400, 8) and np.abs(got - want["fused"]).max() <= 1e-5
    got = ort.InferenceSession(blobs["cell"], providers=["CPUExecutionProvider"]).run(None, {"x0": x})[0]
    assert got.shape == (400, 8) and np.abs(got - want["cell"]).max() <= 1e-5
