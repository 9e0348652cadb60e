"""Checks at the public boundary: bad input raises ValueError/TypeError naming the argument."""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np
import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(value: Any, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_has_data(value: torch.Tensor, name: str) -> torch.Tensor:
    """For ops that read values (merges, statistics): a meta tensor holds shapes only, and would fail deep
    inside on the first read. (Ops with a fake implementation, e.g. per_sample_linear, take meta tensors.)"""
    if value.device.type == "meta":
        raise ValueError(f"{name} is on the meta device, which holds no data")
    return value


def check_float_tensor(value: Any, name: str) -> torch.Tensor:
    value = check_tensor(value, name)
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {value.dtype}")
    return value


def check_real(value: Any, name: str, *, low: float | None = None, high: float | None = None,
               low_open: bool = False, high_open: bool = False) -> float:
    """A finite real number inside the given interval, as a float (0-d numpy arrays and tensors too)."""
    if isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim == 0 and value.dtype not in (torch.bool, bool) \
            and not (value.dtype.is_complex if isinstance(value, torch.Tensor) else np.iscomplexobj(value)):
        value = value.item()  # e.g. a learned or configured scalar held as a tensor
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value}")
    return value


def check_int(value: Any, name: str, *, low: int | None = None, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    value = int(value)
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


def check_choice(value: Any, name: str, choices: tuple) -> Any:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def real_numbers(value: Any, expected: str) -> torch.Tensor:
    """A number, (nested) sequence, array or tensor of real numbers as a detached float64 CPU tensor.

    Python numbers go to float64 directly (``torch.as_tensor`` alone would make float32 first and
    round them). Bool and complex values are refused: TypeError ``"{expected}, got ..."``.
    """
    if isinstance(value, torch.Tensor) and value.device.type == "meta":
        raise ValueError(f"{expected}; got a tensor on the meta device, which holds no data")
    try:
        raw = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{expected}, got {type(value).__name__}: {exc}") from None
    if raw.dtype == torch.bool or raw.is_complex():
        raise TypeError(f"{expected}, got {raw.dtype} values")
    if not isinstance(value, torch.Tensor):
        raw = torch.as_tensor(value, dtype=torch.float64)
    return raw.detach().to(device="cpu", dtype=torch.float64)


def _type_name(value: Any) -> str:
    """The type of ``value`` for a message, qualified outside builtins (``numpy.bool``, not ``bool``)."""
    kind = type(value)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def check_bool(value: Any, name: str) -> bool:
    """A real bool (or numpy's): a truthy string such as "no" must not silently switch a flag on."""
    if isinstance(value, np.bool_):  # e.g. a flag read from an array (no subclass of bool)
        return bool(value)
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {_type_name(value)}")
    return value


def check_float_dtype(value: Any, name: str) -> torch.dtype:
    """One of the floating dtypes the kernels compute in (a torch.dtype, not its name)."""
    if not isinstance(value, torch.dtype):
        raise TypeError(f"{name} must be a torch.dtype (e.g. torch.float16), got {type(value).__name__} {value!r}")
    if value not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {value}")
    return value


def may_overlap(tensor: torch.Tensor) -> bool:
    """Whether two elements of ``tensor`` may share memory (an expanded or as_strided view).

    The standard sufficient test: with the dims of size > 1 sorted by stride, each stride must
    exceed the span of the smaller dims, 1 + Σ stride·(size − 1) (so ``zeros(4, 6)[:, ::4]``, strides
    (6, 4), is distinct). Conservative: the rare layouts that interleave without overlapping count as
    overlapping.
    """
    if tensor.numel() == 0:
        return False
    dims = sorted((stride, size) for size, stride in zip(tensor.shape, tensor.stride()) if size > 1)
    extent = 1  # elements spanned by the dims checked so far: 1 + Σ stride·(size − 1)
    for stride, size in dims:
        if stride < extent:
            return True
        extent += stride * (size - 1)
    return False


def check_float32_range(values: torch.Tensor, name: str, why: str) -> None:
    """ValueError naming ``name`` when a value (finite in float64) would be ±inf in float32, where ``why``."""
    largest = float(values.abs().max()) if values.numel() else 0.0
    if largest > torch.finfo(torch.float32).max:
        raise ValueError(f"{name} must lie within float32's range (|{name}| <= {torch.finfo(torch.float32).max:.4g}), "
                         f"{why}; got {largest:.4g}")
