"""CUDA helpers shared by the Triton launches."""

from __future__ import annotations

import contextlib

import torch


def launch_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Context for a Triton launch on ``t``'s data: Triton launches on the *current* CUDA device (and its
    current stream), so ``t``'s device is made current for the launch; nothing for CPU tensors (interpreter)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()
