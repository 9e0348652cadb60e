"""Helpers shared by the tests: which backends to run, on which devices."""

import pytest
import torch

from merging_kernels._dispatch import OpBackends, available_backends, triton_interpreting

# where a Triton kernel of a test runs: the CPU interpreter here, compiled on a CUDA device (gpu marked)
TRITON_DEVICES = [pytest.param("cpu", id="interpreter"), pytest.param("cuda", marks=pytest.mark.gpu)]


def skip_unless_triton_runs_on(device: str) -> None:
    """Skip a TRITON_DEVICES test where its kernel cannot run: no triton, or a CPU outside the interpreter."""
    try:
        import triton  # noqa: F401
    except ImportError:
        pytest.skip("triton not installed")
    if device == "cpu" and not triton_interpreting():
        pytest.skip("Triton kernels run on CPU only in the interpreter")


def fast_backend_params(op: OpBackends):
    """pytest params (backend, device) for every fast backend: CPU ones that can run here, CUDA ones marked gpu."""
    params = [pytest.param(b, "cpu", id=f"{b}-cpu") for b in available_backends(op, "cpu") if b != "torch"]
    params += [pytest.param(b, "cuda", id=f"{b}-cuda", marks=pytest.mark.gpu) for b in op.cuda]
    params += [pytest.param("torch", "cuda", id="torch-cuda", marks=pytest.mark.gpu)]
    return params


def output_ulp(dtype: torch.dtype) -> float:
    """Relative spacing of floats of ``dtype`` near 1."""
    return torch.finfo(dtype).eps


def guard_launches(monkeypatch, module, kernel_names):
    """Make ``module``'s kernels assert that they launch inside its launch_device(t) (Triton launches on the
    current CUDA device, not the tensors'); returns the devices of the launches, in order."""
    inside, launched = [], []

    class Recording:
        def __init__(self, t):
            self.device = t.device

        def __enter__(self):
            inside.append(self.device)

        def __exit__(self, *exc):
            inside.pop()

    monkeypatch.setattr(module, "launch_device", Recording)
    for name in kernel_names:
        class Guarded:
            def __getitem__(self, grid, kernel=getattr(module, name), name=name):
                def launch(*args, **kwargs):
                    assert inside, f"{name} launched outside launch_device"
                    launched.append(inside[-1])
                    return kernel[grid](*args, **kwargs)
                return launch

        monkeypatch.setattr(module, name, Guarded())
    return launched
