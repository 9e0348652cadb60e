"""Loads the compiled extension ``merging_kernels._C`` if it was built.

Importing the package never fails because of the extension: when ``_C`` is
missing or broken, ``native_error()`` says why, and asking for the ``native``
backend raises :class:`BackendUnavailableError` with that reason and the
command that builds it.
"""

from __future__ import annotations

from types import ModuleType

from .errors import BackendUnavailableError

_BUILD_HINT = (
    "build it with `pip install -e .` from a source checkout (needs a C++17 compiler; "
    "CMake, ninja and pybind11 come from PyPI); set MERGING_KERNELS_NO_CUDA=1 to skip the CUDA kernels"
)

try:
    from . import _C as _module  # type: ignore[attr-defined]

    _error: str | None = None
except ImportError as exc:  # missing or not loadable (ABI, missing libgomp, ...)
    _module = None
    _error = f"{type(exc).__name__}: {exc}"


def native_error() -> str | None:
    """Why ``_C`` could not be loaded, or ``None`` when it is available."""
    return _error


def native_available(device_type: str = "cpu") -> bool:
    """Whether the native backend can run on ``device_type`` (``"cpu"`` or ``"cuda"``)."""
    if _module is None:
        return False
    if device_type == "cuda":
        return bool(_module.build_info()["cuda"])
    return device_type == "cpu"


def native_module(device_type: str = "cpu") -> ModuleType:
    """The loaded ``_C`` module; raises a helpful error when it cannot serve ``device_type``."""
    if _module is None:
        raise BackendUnavailableError(f"the native backend is not available ({_error}); {_BUILD_HINT}")
    if device_type == "cuda" and not _module.build_info()["cuda"]:
        raise BackendUnavailableError(
            "the native backend was built without CUDA kernels (no nvcc at build time, or "
            "MERGING_KERNELS_NO_CUDA=1); rebuild with the CUDA toolkit on the PATH"
        )
    return _module


def build_info() -> dict:
    """Facts about the compiled extension (CUDA, OpenMP, threads), or the load error."""
    if _module is None:
        return {"available": False, "error": _error}
    return {"available": True, **_module.build_info()}
