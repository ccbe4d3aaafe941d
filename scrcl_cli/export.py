"""Export the trained cell encoder to ONNX (method doc §3.4: freeze the gene embedding).

Two graphs, both with a dynamic number of cells N:
- ``fused``: inputs x0 (N, G) = Â^t0 X, x1 (N, G) = Â^t1 X, nbr (N, K) int64 and w (N, K) float32,
  the padded neighbour list of Â (``graphs.padded_neighbours``); output concat(z1, z2) (N, 2*O).
  Aggregation is Gather -> Mul -> ReduceSum, with no scatter op, so it is deterministic.
- ``cell``: input x0 (N, G); output z1 (N, O). Purely per cell, for streaming.
The gene embedding E (G, O) is a constant of both graphs, so they no longer depend on the
number of training cells.
"""

from __future__ import annotations

import io
import logging
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

OPSET = 18


class _Frozen(nn.Module):
    def __init__(self, state: dict[str, Tensor], gene_emb: np.ndarray) -> None:
        super().__init__()
        for name, value in state.items():
            if name.startswith("gene_"):
                continue  # the gene encoder is replaced by its output E
            self.register_buffer(name, value.detach().clone().float())
        self.register_buffer("gene_emb", torch.from_numpy(np.asarray(gene_emb, dtype=np.float32)))

    def z1(self, x0: Tensor) -> Tensor:
        h = F.relu(F.linear(x0, self.mlp_w, self.mlp_b))
        return self._refine(h)

    def _refine(self, h: Tensor) -> Tensor:
        z = F.linear(h, self.proj_w, self.proj_b) @ self.gene_emb
        return z / torch.clamp(torch.sqrt((z * z).sum(1, keepdim=True)), min=1e-12)


class CellEncoder(_Frozen):
    """x0 (N, G) -> z1 (N, O): the MLP view, projector and frozen gene embedding."""

    def forward(self, x0: Tensor) -> Tensor:
        return self.z1(x0)


class FusedEncoder(_Frozen):
    """(x0, x1, nbr, w) -> concat(z1, z2) (N, 2*O), the embedding scRCL clusters on."""

    @staticmethod
    def _aggregate(h: Tensor, nbr: Tensor, w: Tensor) -> Tensor:
        # Gather + weighted sum over the padded neighbours equals Â @ h without any scatter.
        return (h[nbr] * w.unsqueeze(-1)).sum(1)

    def forward(self, x0: Tensor, x1: Tensor, nbr: Tensor, w: Tensor) -> Tensor:
        h = F.leaky_relu(self._aggregate(x1 @ self.gcn1_w.T, nbr, w) + self.gcn1_b, 0.01)
        h = F.leaky_relu(self._aggregate(h @ self.gcn2_w.T, nbr, w) + self.gcn2_b, 0.01)
        h = F.leaky_relu(F.linear(h, self.fc_w, self.fc_b), 0.01)
        return torch.cat([self.z1(x0), self._refine(h)], dim=1)


def _example(g: int, n: int = 5, k: int = 3) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(0)
    nbr = torch.randint(0, n, (n, k), generator=gen)
    nbr[:, 0] = torch.arange(n)
    return {
        "x0": torch.rand(n, g, generator=gen),
        "x1": torch.rand(n, g, generator=gen),
        "nbr": nbr,
        "w": torch.rand(n, k, generator=gen),
    }


def export_onnx(
    state: dict[str, Tensor], gene_emb: np.ndarray, *, view: str, metadata: dict[str, str]
) -> bytes:
    """Serialised ONNX model of the `view` ("fused" or "cell") encoder with `metadata` props."""
    import onnx

    g = state["mlp_w"].shape[1]
    ex = _example(g)
    if view == "cell":
        module: nn.Module = CellEncoder(state, gene_emb).eval()
        args: tuple[Tensor, ...] = (ex["x0"],)
        names, out_name = ["x0"], "z1"
        cells = torch.export.Dim("num_cells", min=1)
        shapes: Any = {"x0": {0: cells}}
    elif view == "fused":
        module = FusedEncoder(state, gene_emb).eval()
        args = (ex["x0"], ex["x1"], ex["nbr"], ex["w"])
        names, out_name = ["x0", "x1", "nbr", "w"], "embedding"
        cells = torch.export.Dim("num_cells", min=1)
        kdim = torch.export.Dim("max_degree", min=1)
        shapes = {"x0": {0: cells}, "x1": {0: cells}, "nbr": {0: cells, 1: kdim}, "w": {0: cells, 1: kdim}}
    else:
        raise ValueError(f"unknown view {view!r}")
    # The exporter logs registry warnings (torchvision absent) that mean nothing to users.
    quiet = [logging.getLogger(n) for n in list(logging.root.manager.loggerDict) if n.startswith("torch.onnx")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, args, input_names=names, output_names=[out_name], dynamic_shapes=shapes,
            opset_version=OPSET, dynamo=True, verbose=False,
        )
    for lg, level in zip(quiet, levels):
        lg.setLevel(level)
    proto = program.model_proto
    # onnxruntime releases lag onnx's IR; 10 is read by every onnxruntime >= 1.18.
    proto.ir_version = min(proto.ir_version, 10)
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, str(value)
    onnx.checker.check_model(proto)
    buf = io.BytesIO()
    onnx.save_model(proto, buf)
    return buf.getvalue()
