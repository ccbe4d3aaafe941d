"""Export the trained cell encoder to ONNX (freeze the gene embedding).

Two graphs, both with a dynamic number of cells:
- ``fused``: the embedding concat(z1, z2) (B, 2*O) of B target cells. Inputs: x0 (B, G) =
  Â^t0 X of the targets; xs (M, G) = Â^(t1+1) X of the M cells of their one-hop neighbourhood;
  nbr (B, K) int64 and w (B, K) float32, the targets' rows of Â as a padded neighbour list into
  those M cells (``graphs.padded_neighbours``). The GCN view's first aggregation is folded into
  the smoothing outside the graph, exactly: Â (Â^t1 X W1ᵀ) = (Â^(t1+1) X) W1ᵀ. The second one
  is Gather -> Mul -> ReduceSum, with no scatter op, so it is deterministic, and the gathered
  tensor is (B, K, H): memory is set by the batch, not by the neighbourhood.
- ``cell``: input x0 (N, G); output the MLP view's embedding. Purely per cell, for streaming.

What each graph outputs follows the model's clustering embedding (`TrainConfig.embedding`):
for "gcn-pca" (the default) the fused graph gives the PCA scores of the GCN view's normalised
hidden output (B, D) and the cell graph those of the MLP view; for "fused" (the reference's)
they give concat(z1, z2) (B, 2*O) and z1 (N, O). The PCA bases travel in the state dict.
The gene embedding E (G, O) is frozen into both graphs, folded into the shared projector
(proj_w^T E, (H, O), computed in float64), so they no longer depend on the number of
training cells and skip the (N, G) projection the training graph computes.
"""

from __future__ import annotations

import io
import logging
import warnings
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn

from .model import embed_hidden, gcn_activation, gcn_head, mlp_hidden

log = logging.getLogger(__name__)

OPSET = 18


class _Frozen(nn.Module):
    def __getattr__(self, name: str) -> Tensor:
        # Every attribute read here is a registered buffer; nn.Module types them as Tensor | Module.
        return cast(Tensor, super().__getattr__(name))

    def __init__(self, state: dict[str, Tensor], gene_emb: np.ndarray) -> None:
        super().__init__()
        for name, value in state.items():
            if name.startswith(("gene_", "proj_")):
                continue  # the gene encoder is replaced by its output E, folded into the projector
            self.register_buffer(name, value.detach().clone().float())
        e = torch.from_numpy(np.asarray(gene_emb, dtype=np.float64))
        # (h W_pᵀ + b_p) E = h (W_pᵀ E) + b_p E: an (H, O) map instead of (H, G) then (G, O).
        self.register_buffer("refine_w", (state["proj_w"].detach().double().T @ e).float())
        self.register_buffer("refine_b", (state["proj_b"].detach().double() @ e).float())

    @property
    def pca(self) -> bool:
        """True for the gcn-pca embedding (the state carries the PCA bases), False for fused."""
        return hasattr(self, "embed_fused_mean")

    def _mlp_hidden(self, x0: Tensor) -> Tensor:
        return mlp_hidden(x0, self.mlp_w, self.mlp_b)

    def z1(self, x0: Tensor) -> Tensor:
        return self._refine(self._mlp_hidden(x0))

    def cell_embedding(self, x0: Tensor) -> Tensor:
        """MLP view: the PCA of its normalised hidden output (gcn-pca), or z1 (fused)."""
        if not self.pca:
            return self.z1(x0)
        return embed_hidden(self._mlp_hidden(x0), self.embed_cell_mean, self.embed_cell_components)

    def _refine(self, h: Tensor) -> Tensor:
        z = h @ self.refine_w + self.refine_b
        return z / torch.clamp(torch.sqrt((z * z).sum(1, keepdim=True)), min=1e-12)


class CellEncoder(_Frozen):
    """x0 (N, G) -> the MLP view's embedding: (N, D) PCA scores (gcn-pca) or z1 (N, O) (fused)."""

    def forward(self, x0: Tensor) -> Tensor:
        return self.cell_embedding(x0)


class FusedEncoder(_Frozen):
    """(x0, xs, nbr, w) -> the embedding training clustered on: (B, D) PCA scores of the GCN view
    (gcn-pca, where x0 is accepted and unused) or concat(z1, z2) (B, 2*O) (fused)."""

    def forward(self, x0: Tensor, xs: Tensor, nbr: Tensor, w: Tensor) -> Tensor:
        # First GCN layer on the M neighbourhood cells (its aggregation is inside xs) ...
        u = gcn_activation(xs @ self.gcn1_w.T, self.gcn1_b) @ self.gcn2_w.T
        # ... second layer for the B targets: gather + weighted sum = their rows of Â @ u.
        h = gcn_head(gcn_activation((u[nbr] * w.unsqueeze(-1)).sum(1), self.gcn2_b), self.fc_w, self.fc_b)
        if self.pca:
            return embed_hidden(h, self.embed_fused_mean, self.embed_fused_components)
        return torch.cat([self.z1(x0), self._refine(h)], dim=1)


def _example(g: int, b: int = 5, m: int = 9, k: int = 3) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "x0": torch.rand(b, g, generator=gen),
        "xs": torch.rand(m, g, generator=gen),
        "nbr": torch.randint(0, m, (b, k), generator=gen),
        "w": torch.rand(b, k, generator=gen),
    }


def export_onnx(state: dict[str, Tensor], gene_emb: np.ndarray, *, view: str, metadata: dict[str, str]) -> bytes:
    """Serialised ONNX model of the `view` ("fused" or "cell") encoder with `metadata` props."""
    g = state["mlp_w"].shape[1]
    ex = _example(g)
    if view == "cell":
        module: nn.Module = CellEncoder(state, gene_emb).eval()
        args: tuple[Tensor, ...] = (ex["x0"],)
        names, out_name = ["x0"], "embedding"
        cells = torch.export.Dim("num_cells", min=1)
        shapes: Any = {"x0": {0: cells}}
    elif view == "fused":
        module = FusedEncoder(state, gene_emb).eval()
        args = (ex["x0"], ex["xs"], ex["nbr"], ex["w"])
        names, out_name = ["x0", "xs", "nbr", "w"], "embedding"
        cells = torch.export.Dim("num_cells", min=1)
        nodes = torch.export.Dim("num_nodes", min=1)
        kdim = torch.export.Dim("max_degree", min=1)
        shapes = {"x0": {0: cells}, "xs": {0: nodes}, "nbr": {0: cells, 1: kdim}, "w": {0: cells, 1: kdim}}
    else:
        raise ValueError(f"unknown view {view!r}")
    return _to_onnx(module, args, names, out_name, shapes, metadata)


def _to_onnx(
    module: nn.Module, args: tuple[Tensor, ...], names: list[str], out_name: str, shapes: Any, metadata: dict[str, str]
) -> bytes:
    """torch.onnx (dynamo) export of `module` at OPSET, checked, with `metadata` props."""
    import onnx

    # The exporter logs registry warnings (torchvision absent) that mean nothing to users.
    quiet = [logging.getLogger(n) for n in list(logging.root.manager.loggerDict) if n.startswith("torch.onnx")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            args,
            input_names=names,
            output_names=[out_name],
            dynamic_shapes=shapes,
            opset_version=OPSET,
            dynamo=True,
            verbose=False,
        )
    for lg, level in zip(quiet, levels):
        lg.setLevel(level)
    assert program is not None  # dynamo=True always returns a program
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


# ---------------------------------------------------------------- staged encoders (smoothing outside)
#
# A model with the gcn-pca embedding (the default) is also exported as a chain of per-cell ONNX
# stages with the graph products between them done outside ONNX, in float32 sparse algebra:
#   fused: x -> x W1ᵀ | Â^(t1+1) | p -> leaky(p + b1) W2ᵀ | Â | s -> leaky(s + b2) -> fc -> PCA
#   cell:  x -> x Wmᵀ | Â^t0     | p -> relu(p + bm) -> PCA
# Linear maps commute with Â (Â^t X Wᵀ = Â^t (X Wᵀ)), so this is the same function as the
# one-graph encoders, up to float32 rounding. It needs no (N, G) smoothed input, no padded
# gather and no recomputation of a neighbourhood per batch: every stage runs once per cell.
# The layout and the torch-free runner are in stages.py.


class _Linear(nn.Module):
    """x (B, G) -> x Wᵀ (B, H), no bias: the part of a first layer that commutes with Â."""

    def __init__(self, w: Tensor) -> None:
        super().__init__()
        self.register_buffer("w", w.detach().clone().float())

    def __getattr__(self, name: str) -> Tensor:
        return cast(Tensor, super().__getattr__(name))

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.w.T


class _GcnMiddle(_Frozen):
    """x (B, H) = rows of Â^(t1+1) X W1ᵀ -> u = leaky(p + b1) W2ᵀ (B, H)."""

    def forward(self, x: Tensor) -> Tensor:
        return gcn_activation(x, self.gcn1_b) @ self.gcn2_w.T


class _GcnHead(_Frozen):
    """x (B, H) = rows of Â u -> the GCN view's PCA scores (B, D)."""

    def forward(self, x: Tensor) -> Tensor:
        h = gcn_head(gcn_activation(x, self.gcn2_b), self.fc_w, self.fc_b)
        return embed_hidden(h, self.embed_fused_mean, self.embed_fused_components)


class _MlpHead(_Frozen):
    """x (B, H) = rows of Â^t0 X Wmᵀ -> the MLP view's PCA scores (B, D)."""

    def forward(self, x: Tensor) -> Tensor:
        # mlp_hidden with its product Â^t0 X Wmᵀ computed outside: only the bias and ReLU remain.
        return embed_hidden(torch.relu(x + self.mlp_b), self.embed_cell_mean, self.embed_cell_components)


def stage_modules(state: dict[str, Tensor], gene_emb: np.ndarray, view: str) -> list[nn.Module]:
    """The torch modules of `view`'s stages (gcn-pca models only), in eval mode."""
    if "embed_fused_mean" not in state:
        raise ValueError("staged encoders exist for the gcn-pca embedding only")
    if view == "fused":
        mods: list[nn.Module] = [_Linear(state["gcn1_w"]), _GcnMiddle(state, gene_emb), _GcnHead(state, gene_emb)]
    elif view == "cell":
        mods = [_Linear(state["mlp_w"]), _MlpHead(state, gene_emb)]
    else:
        raise ValueError(f"unknown view {view!r}")
    return [m.eval() for m in mods]


def export_stages(state: dict[str, Tensor], gene_emb: np.ndarray, *, view: str, metadata: dict[str, str]) -> dict[str, bytes]:
    """ONNX bytes of `view`'s stages keyed by file name (`stage_files`); each takes one (B, width)
    float32 input ``x`` and returns ``y``, with a dynamic number of cells."""
    from .stages import stage_files

    out = {}
    for i, (name, module) in enumerate(zip(stage_files(view), stage_modules(state, gene_emb, view))):
        width = state["mlp_w"].shape[1] if i == 0 else state["mlp_w"].shape[0]
        x = torch.rand(5, width, generator=torch.Generator().manual_seed(0))
        out[name] = _to_onnx(
            module, (x,), ["x"], "y", {"x": {0: torch.export.Dim("num_cells", min=1)}}, {**metadata, "stage": str(i)}
        )
    return out
