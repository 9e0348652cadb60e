"""Helpers shared by the tests: which backends to run, on which devices."""

import pytest
import torch

from merging_kernels._dispatch import OpBackends, available_backends


def fast_backend_params(op: OpBackends):
    """pytest params (backend, device) for every fast backend: CPU ones that can run here, CUDA ones marked gpu."""
    params = [pytest.param(b, "cpu", id=f"{b}-cpu") for b in available_backends(op, "cpu") if b != "torch"]
    params += [pytest.param(b, "cuda", id=f"{b}-cuda", marks=pytest.mark.gpu) for b in op.cuda]
    params += [pytest.param("torch", "cuda", id="torch-cuda", marks=pytest.mark.gpu)]
    return params


def output_ulp(dtype: torch.dtype) -> float:
    """Relative spacing of floats of ``dtype`` near 1."""
    return torch.finfo(dtype).eps
