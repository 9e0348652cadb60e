"""CUDA helpers shared by the Triton launches."""

from __future__ import annotations

import contextlib

import torch


def launch_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Context for a Triton launch on ``t``'s data: Triton launches on the *current* CUDA device (and its
    current stream), so ``t``'s device is made current for the launch; nothing for CPU tensors (interpreter)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def host_to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``values`` (a list, or a CPU tensor) as a ``dtype`` tensor on ``device``, without stalling the host on
    a CUDA device.

    A pageable host-to-device copy first waits for the stream to drain; from pinned memory the copy is
    queued (torch keeps the pinned block alive until the copy has run), so launches keep overlapping.
    """
    device = torch.device(device)
    host = values.to(dtype) if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
