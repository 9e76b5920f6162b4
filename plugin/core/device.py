"""Choosing where torch runs: CUDA, then Apple MPS, then CPU, unless the user says."""

from __future__ import annotations

from .choices import DEVICES
from .errors import InputError


def select_device(name: str | None = "auto"):
    """Resolve a device name; an explicit GPU that is not there is an error, not a silent CPU run."""
    import torch

    name = (name or "auto").strip().lower()
    cuda_ok = torch.cuda.is_available()
    mps_ok = bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if cuda_ok else "mps" if mps_ok else "cpu")
    if name.startswith("cuda"):
        if not cuda_ok:
            raise InputError(f"device '{name}'", "was asked for but PyTorch sees no CUDA GPU",
                             "Use --device auto or cpu, or install a CUDA build of PyTorch")
        return torch.device(name)
    if name == "mps":
        if not mps_ok:
            raise InputError("device 'mps'", "was asked for but Apple MPS is not available",
                             "Use --device auto or cpu")
        return torch.device("mps")
    if name == "cpu":
        return torch.device("cpu")
    raise InputError(f"device '{name}'", "is not a device name", f"Use one of: {', '.join(DEVICES)}")


def describe_device(device) -> str:
    """Human-readable device, e.g. 'cuda:0 (NVIDIA H100)' or 'cpu (2 threads)'."""
    import torch

    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return str(device)


def precision_policy(device, amp: bool) -> tuple[object, bool]:
    """How torch runs on ``device``, for training and inference alike: (autocast dtype, or None
    for full precision; whether tensors go channels-last).

    Both only on CUDA: mixed precision there is bfloat16 where the GPU has it (no loss scaling
    needed), else float16; channels-last is the layout its tensor cores want for convolutions.
    On CPU and MPS the float32 default layout is kept (ONNX Runtime runs CPU inference anyway).
    """
    import torch

    if device.type != "cuda":
        return None, False
    dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if amp else None
    return dtype, True
