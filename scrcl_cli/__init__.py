"""scrcl-cli: unsupervised cell-type identification with scRCL.

Training (torch) lives in :mod:`scrcl_cli.training`; inference (ONNX Runtime, no torch)
in :mod:`scrcl_cli.inference`. Importing the package imports neither torch nor onnxruntime.
"""

from __future__ import annotations

from ._version import __version__

__all__ = ["__version__"]
