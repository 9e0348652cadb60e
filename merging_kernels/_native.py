"""Loads the compiled extension ``merging_kernels._C`` if it was built.

Importing the package never fails because of the extension: when ``_C`` is
missing or broken, ``native_error()`` says why, and asking for the ``native``
backend raises :class:`BackendUnavailableError` with that reason and the
command that builds it.

``pip install`` does not fail when the compiler does (see setup.py): it then leaves
``_build_failure.txt`` beside this file, and importing the package warns with its first
line once, so a degraded install is never silent.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from types import ModuleType

from .errors import BackendUnavailableError, NativeBuildWarning

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


def _read_build_failure(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


_build_failure = _read_build_failure(Path(__file__).with_name("_build_failure.txt"))
if _build_failure is not None:
    warnings.warn(
        f"merging_kernels was installed from a partial build: {_build_failure.splitlines()[0]}; "
        "merging_kernels.build_info()['build_failure'] has the compiler's log",
        NativeBuildWarning,
    )


def _install_failure() -> str:
    """What the install-time build recorded as failed, for error messages ('' when nothing)."""
    if _build_failure is None:
        return ""
    return f" (at install time {_build_failure.splitlines()[0]}; build_info()['build_failure'] has the log)"


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
        raise BackendUnavailableError(
            f"the native backend is not available ({_error}){_install_failure()}; {_BUILD_HINT}"
        )
    if device_type == "cuda" and not _module.build_info()["cuda"]:
        why = _install_failure() or " (no nvcc at build time, or MERGING_KERNELS_NO_CUDA=1)"
        raise BackendUnavailableError(
            f"the native backend was built without CUDA kernels{why}; "
            "rebuild with a working CUDA toolkit on the PATH"
        )
    return _module


def build_info() -> dict:
    """Facts about the compiled extension (CUDA, OpenMP, threads), or the load error.

    ``build_failure`` is the compiler log of a part that failed at install time, else None.
    """
    if _module is None:
        return {"available": False, "error": _error, "build_failure": _build_failure}
    return {"available": True, **_module.build_info(), "build_failure": _build_failure}
