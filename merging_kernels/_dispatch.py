"""Backend selection, shared by every op.

Each op family declares which backends it implements per device type, fastest
first (:class:`OpBackends`). A call's ``backend=`` wins; otherwise the
environment variable ``MERGING_KERNELS_BACKEND`` does, for ops that implement
the backend it names on that device; otherwise the fastest available backend
for the tensor's device is used. An explicitly requested backend that cannot
run raises :class:`BackendUnavailableError`; nothing falls back silently. When
the default has to drop to the ``torch`` reference because no fast backend is
available (e.g. ``_C`` was not built), a warning says so once per op.
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass

import torch

from ._native import native_available, native_error, native_module
from .errors import BackendUnavailableError

BACKENDS = ("torch", "triton", "native")
ENV_VAR = "MERGING_KERNELS_BACKEND"


@dataclass(frozen=True)
class OpBackends:
    """The backends an op family implements, per device type, fastest first.

    ``torch`` (the reference) is implied everywhere and need not be listed.
    """

    name: str
    cpu: tuple[str, ...] = ()
    cuda: tuple[str, ...] = ()

    def implemented(self, device_type: str) -> tuple[str, ...]:
        fast = self.cuda if device_type == "cuda" else self.cpu if device_type == "cpu" else ()
        if device_type == "cpu" and "triton" in self.cuda and triton_interpreting():
            fast = fast + ("triton",)  # kernels run on CPU only under the interpreter (tests)
        return fast + ("torch",)


def compiling() -> bool:
    """Whether torch.compile (dynamo) or torch.export is tracing the current call."""
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(is_compiling and is_compiling())


def triton_interpreting() -> bool:
    """Whether Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"{type(exc).__name__}: {exc}"
    return None


def triton_available() -> bool:
    return _triton_import_error() is None


def _unavailable_reason(backend: str, device_type: str) -> str | None:
    """Why ``backend`` cannot run on ``device_type`` right now (None when it can)."""
    if device_type == "cuda" and not torch.cuda.is_available():  # a CUDA _C is no use without a GPU
        return "no CUDA device is available"
    if backend == "torch":
        return None
    if backend == "native":
        if native_available(device_type):
            return None
        try:
            native_module(device_type)
        except BackendUnavailableError as exc:
            return str(exc)
        return f"the native backend has no kernels for {device_type} tensors"
    if backend == "triton":
        err = _triton_import_error()
        if err is not None:
            return f"triton is not importable ({err}); install it with `pip install triton`"
        if device_type == "cuda":
            return None
        if device_type == "cpu" and triton_interpreting():
            return None
        return (
            f"the triton backend needs CUDA tensors (got {device_type}); on CPU it runs only "
            "under TRITON_INTERPRET=1, which is for tests"
        )
    raise AssertionError(backend)


_warned: set[str] = set()


def resolve_backend(op: OpBackends, backend: str | None, device: torch.device | str) -> str:
    """The backend to run ``op`` with on ``device``: see the module docstring."""
    # torch.device("cpu") alone costs ~0.4 µs, a quarter of a small assignment call's overhead
    if isinstance(device, torch.device):
        device_type = device.type
    elif isinstance(device, str) and device in ("cpu", "cuda"):
        device_type = device
    else:
        device_type = torch.device(device).type
    if backend is not None:
        if not isinstance(backend, str) or backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
        return _require(op, backend, device_type, source="backend=")

    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        if env not in BACKENDS:
            raise ValueError(f"{ENV_VAR} must be one of {BACKENDS}, got {env!r}")
        if env in op.implemented(device_type):
            return _require(op, env, device_type, source=f"{ENV_VAR}=")

    implemented = op.implemented(device_type)
    fast = [b for b in implemented if b != "torch" and not (b == "triton" and device_type == "cpu")]
    for candidate in fast:
        if _unavailable_reason(candidate, device_type) is None:
            return candidate
    if fast and op.name not in _warned:
        _warned.add(op.name)
        reasons = "; ".join(f"{b}: {_unavailable_reason(b, device_type)}" for b in fast)
        warnings.warn(
            f"merging_kernels.{op.name}: no fast backend for {device_type} tensors ({reasons}); "
            "using the torch reference",
            RuntimeWarning,
            stacklevel=3,
        )
    return "torch"


def _require(op: OpBackends, backend: str, device_type: str, source: str) -> str:
    if backend not in op.implemented(device_type):
        raise BackendUnavailableError(
            f"{op.name} has no {backend!r} implementation for {device_type} tensors ({source}{backend}); "
            f"it implements {op.implemented(device_type)}"
        )
    reason = _unavailable_reason(backend, device_type)
    if reason is not None:
        raise BackendUnavailableError(f"{op.name}: backend {backend!r} ({source}{backend}) is unavailable: {reason}")
    return backend


def _declared_ops() -> dict[str, OpBackends]:
    """The package's op families by name (imported here: the op modules import this one)."""
    from .ops.linear_assignment import LINEAR_ASSIGNMENT
    from .ops.per_sample_linear import PER_SAMPLE_LINEAR
    from .ops.similarity import SIMILARITY
    from .ops.task_vectors import TASK_VECTORS
    from .ops.zip_matching import ZIP_MATCHING

    return {op.name: op for op in (LINEAR_ASSIGNMENT, PER_SAMPLE_LINEAR, SIMILARITY, TASK_VECTORS, ZIP_MATCHING)}


def available_backends(op: OpBackends | str, device: torch.device | str) -> list[str]:
    """The backends of ``op`` (an op family or its name, e.g. ``"linear_assignment"``) that can run on
    ``device`` here, fastest first: none for ``"cuda"`` on a machine without a CUDA device."""
    if isinstance(op, str):
        declared = _declared_ops()
        if op not in declared:
            raise ValueError(f"op must be one of {sorted(declared)} (or its OpBackends), got {op!r}")
        op = declared[op]
    elif not isinstance(op, OpBackends):
        raise TypeError(f"op must be an OpBackends or an op name, got {type(op).__name__}")
    try:
        device_type = torch.device(device).type
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be a torch.device or a device string such as 'cpu' or 'cuda', "
                         f"got {device!r}") from exc
    return [b for b in op.implemented(device_type) if _unavailable_reason(b, device_type) is None]


__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "OpBackends",
    "available_backends",
    "native_error",
    "resolve_backend",
    "triton_available",
    "triton_interpreting",
]
