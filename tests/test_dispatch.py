"""Backend selection: explicit requests, the environment default, and clear errors."""

import warnings

import pytest
import torch
import merging_kernels as mk
from merging_kernels import _dispatch
from merging_kernels._dispatch import OpBackends, resolve_backend
from merging_kernels.errors import BackendUnavailableError

OP = OpBackends("demo_op", cpu=("native",), cuda=("triton", "native"))


def test_explicit_torch_and_unknown_names(monkeypatch):
    monkeypatch.delenv(_dispatch.ENV_VAR, raising=False)
    assert resolve_backend(OP, "torch", "cpu") == "torch"
    with pytest.raises(ValueError, match="backend"):
        resolve_backend(OP, "fast", "cpu")
    monkeypatch.setenv(_dispatch.ENV_VAR, "gpu")
    with pytest.raises(ValueError, match=_dispatch.ENV_VAR):
        resolve_backend(OP, None, "cpu")


def test_environment_sets_the_default(monkeypatch):
    monkeypatch.setenv(_dispatch.ENV_VAR, "torch")
    assert resolve_backend(OP, None, "cpu") == "torch"
    # an op that does not implement the named backend on this device ignores the variable
    monkeypatch.setenv(_dispatch.ENV_VAR, "native")
    torch_only = OpBackends("torch_only_op")
    assert resolve_backend(torch_only, None, "cpu") == "torch"


def test_native_request_fails_clearly_when_not_built(monkeypatch):
    monkeypatch.setattr(_dispatch, "native_available", lambda device_type="cpu": False)

    def missing(device_type="cpu"):
        raise BackendUnavailableError("the native backend is not available (ImportError: no _C); build it with pip")

    monkeypatch.setattr(_dispatch, "native_module", missing)
    with pytest.raises(BackendUnavailableError, match="build it"):
        resolve_backend(OP, "native", "cpu")
    # the default does not claim to be fast: it warns once and uses the reference
    monkeypatch.delenv(_dispatch.ENV_VAR, raising=False)
    _dispatch._warned.discard("demo_op")
    with pytest.warns(RuntimeWarning, match="torch reference"):
        assert resolve_backend(OP, None, "cpu") == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_backend(OP, None, "cpu") == "torch"


def test_triton_on_cpu_only_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="CUDA tensors|triton"):
        resolve_backend(OP, "triton", "cpu")
    cpu_only = OpBackends("cpu_only_op", cpu=("native",))
    with pytest.raises(BackendUnavailableError, match="no 'triton' implementation"):
        resolve_backend(cpu_only, "triton", "cpu")


def test_default_on_cpu_is_native_when_built(monkeypatch):
    monkeypatch.delenv(_dispatch.ENV_VAR, raising=False)
    if not mk.build_info()["available"]:
        pytest.skip(f"_C not built: {mk.native_error()}")
    assert resolve_backend(OP, None, "cpu") == "native"
    assert mk.build_info()["openmp"] in (True, False)


def test_build_info_reports_the_extension():
    info = mk.build_info()
    assert info["available"] is (mk.native_error() is None)
    if not info["available"]:
        assert "Error" in info["error"]


def test_ci_has_every_cpu_backend():
    # CI must exercise the native build and the Triton interpreter, not skip them
    import os

    if not os.environ.get("CI"):
        pytest.skip("only enforced in CI")
    from merging_kernels.ops.task_vectors import TASK_VECTORS

    assert set(_dispatch.available_backends(TASK_VECTORS, "cpu")) == {"torch", "native", "triton"}, mk.build_info()


def test_available_backends_by_name_and_bad_arguments(monkeypatch):
    from merging_kernels.ops.linear_assignment import LINEAR_ASSIGNMENT

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert mk.available_backends("linear_assignment", "cpu") == mk.available_backends(LINEAR_ASSIGNMENT, "cpu")
    assert mk.available_backends("similarity", "cpu") == ["torch"]
    assert mk.available_backends("task_vectors", "cpu")[-1] == "torch"
    with pytest.raises(ValueError, match="op must be one of .*task_vectors"):
        mk.available_backends("no_such_op", "cpu")
    with pytest.raises(TypeError, match="op must be an OpBackends"):
        mk.available_backends(3, "cpu")
    with pytest.raises(ValueError, match="device must be"):
        mk.available_backends("similarity", "gpu")


def test_available_backends_on_cuda_needs_a_device(monkeypatch):
    # a _C built with CUDA kernels (as in CI, where nvcc exists) runs nothing without a GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for op in ("linear_assignment", "task_vectors", "similarity", "per_sample_linear"):
        assert mk.available_backends(op, "cuda") == [], op
    with pytest.raises(BackendUnavailableError, match="no CUDA device"):
        resolve_backend(OP, "native", "cuda")
