"""Resolve ``--device auto|cpu|cuda`` for torch and for ONNX Runtime, and report what is used.

torch is imported only inside `resolve_torch_device`, so inference never loads it.
"""

from __future__ import annotations

import logging
from importlib import metadata
from typing import TYPE_CHECKING, Literal

from .errors import ScrclError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

Device = Literal["auto", "cpu", "cuda"]
DEVICES: tuple[Device, ...] = ("auto", "cpu", "cuda")


def as_device(value: str) -> Device:
    """`value` as a Device; a one-line error for anything else (the CLI's Choice and the API both check)."""
    for device in DEVICES:
        if value == device:
            return device
    raise ScrclError(f"device must be one of {', '.join(DEVICES)}, not {value!r}", "Pass --device auto, cpu or cuda")


_NO_CUDA_FIX = "Use --device auto or cpu, or start the container with --gpus all (Docker) / --nv (Apptainer)"


def resolve_torch_device(device: Device) -> torch.device:
    """The torch device for `device`; an explicit "cuda" without a visible GPU is an error."""
    import torch

    if device == "cpu":
        return torch.device("cpu")
    has_cuda = torch.cuda.is_available()
    if device == "cuda" and not has_cuda:
        raise ScrclError("--device cuda was requested but torch sees no CUDA device", _NO_CUDA_FIX)
    return torch.device("cuda" if has_cuda else "cpu")


def describe_torch_device(dev: torch.device) -> str:
    """Human-readable name of a torch device, e.g. 'cuda:0 (NVIDIA H100)' or 'cpu'."""
    import torch

    if dev.type == "cuda":
        idx = dev.index or 0
        return f"cuda:{idx} ({torch.cuda.get_device_name(idx)})"
    return "cpu"


def ort_distributions() -> list[str]:
    """Installed ONNX Runtime distributions (both installed breaks the GPU build)."""
    found = []
    for name in ("onnxruntime", "onnxruntime-gpu"):
        try:
            metadata.version(name)
            found.append(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def ort_providers(device: Device) -> list[str]:
    """Execution providers to request for `device`, most preferred first."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ScrclError(
            "onnxruntime is not installed",
            "Install scrcl-cli[cpu] (or scrcl-cli[gpu] on a GPU machine)",
        ) from exc
    if len(ort_distributions()) > 1:
        log.warning(
            "both onnxruntime and onnxruntime-gpu are installed; the CPU one may shadow the GPU build "
            "(fix: pip uninstall onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu)"
        )
    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda" and "CUDAExecutionProvider" not in available:
        raise ScrclError(
            "--device cuda was requested but this onnxruntime build has no CUDAExecutionProvider",
            "Install scrcl-cli[gpu] (onnxruntime-gpu) or use --device cpu",
        )
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def check_session_provider(session_providers: list[str], device: Device) -> str:
    """The provider a session really uses; a requested CUDA that fell back to CPU is an error."""
    used = session_providers[0] if session_providers else "none"
    if device == "cuda" and used != "CUDAExecutionProvider":
        raise ScrclError(
            f"--device cuda was requested but ONNX Runtime fell back to {used} (CUDA/cuDNN libraries failed to load)",
            _NO_CUDA_FIX + "; check that the driver supports the CUDA runtime of onnxruntime-gpu",
        )
    return used
