"""scrcl-cli: unsupervised cell-type identification with scRCL.

Training (torch) lives in :mod:`scrcl_cli.training`; inference (ONNX Runtime, no torch)
in :mod:`scrcl_cli.inference`. Importing the package imports neither torch nor onnxruntime.
"""

from __future__ import annotations

from ._version import __version__

__all__ = ["Model", "__version__", "fit", "load"]


def __getattr__(name: str) -> object:
    # The API is imported on first use, so that `scrcl-cli --version` stays fast.
    if name in ("fit", "load", "Model"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'scrcl_cli' has no attribute {name!r}")
