"""Turns the methods' inputs (one tensor, or state dicts) into the op's tensor lists and back."""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .._validation import real_numbers
from ..ops.philox import tensor_key


@dataclass
class FlatInputs:
    """The floating-point tensors to merge, in the base's key order, plus what is copied as is."""

    names: list[str]
    bases: list[torch.Tensor]
    experts: list[list[torch.Tensor]]  # experts[k][t]
    passthrough: dict[str, torch.Tensor] = field(default_factory=dict)  # non-float entries, from the base
    order: list[str] = field(default_factory=list)
    single_tensor: bool = False

    @property
    def tensor_keys(self) -> list[int]:
        return [tensor_key(n) for n in self.names]

    def rebuild(self, merged: Sequence[torch.Tensor]):
        """Merged tensors back in the caller's form: a tensor, or a dict in the base's key order."""
        if self.single_tensor:
            return merged[0]
        by_name = dict(zip(self.names, merged))
        return {name: by_name[name] if name in by_name else self.passthrough[name].clone() for name in self.order}


def flatten_inputs(base, experts) -> FlatInputs:
    """Accept ``base`` as a tensor or a state dict and ``experts`` as a sequence of the same."""
    if isinstance(experts, (torch.Tensor, Mapping)) or not isinstance(experts, Sequence):
        raise TypeError("experts must be a sequence (one entry per task) of tensors or state dicts")
    if len(experts) == 0:
        raise ValueError("experts must not be empty")
    if isinstance(base, torch.Tensor):
        for k, expert in enumerate(experts):
            if not isinstance(expert, torch.Tensor):
                raise TypeError(f"experts[{k}] must be a tensor like base, got {type(expert).__name__}")
        return FlatInputs([""], [base], [[e] for e in experts], order=[""], single_tensor=True)
    if not isinstance(base, Mapping):
        raise TypeError(f"base must be a tensor or a state dict (mapping name -> tensor), got {type(base).__name__}")
    names, bases, passthrough = [], [], {}
    for name, value in base.items():
        if not isinstance(name, str):  # names key the DARE masks and the messages, as in torch's state dicts
            raise TypeError(f"base's keys must be str (a state dict's parameter names), got {type(name).__name__} "
                            f"{name!r}")
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"base[{name!r}] must be a tensor, got {type(value).__name__}")
        if value.is_floating_point():
            names.append(name)
            bases.append(value)
        elif _copied_as_is(value):
            passthrough[name] = value  # integer buffers (e.g. num_batches_tracked) are not merged
        else:  # complex or quantized: neither merged nor safe to copy silently from the base
            raise TypeError(f"base[{name!r}] is {value.dtype}: only floating-point tensors are merged and "
                            "integer/bool buffers copied from the base")
    expert_lists = []
    for k, expert in enumerate(experts):
        if not isinstance(expert, Mapping):
            raise TypeError(f"experts[{k}] must be a state dict like base, got {type(expert).__name__}")
        missing = [n for n in base if n not in expert]
        extra = [n for n in expert if n not in base]
        if missing or extra:
            raise ValueError(f"experts[{k}] does not match base: missing {missing[:5]}, unexpected {extra[:5]}")
        for n in passthrough:
            if not isinstance(expert[n], torch.Tensor):
                raise TypeError(f"experts[{k}][{n!r}] must be a tensor, got {type(expert[n]).__name__}")
            if expert[n].dtype != base[n].dtype or expert[n].shape != base[n].shape:
                raise TypeError(f"experts[{k}][{n!r}] has dtype {expert[n].dtype} and shape {tuple(expert[n].shape)}, "
                                f"base has {base[n].dtype} and {tuple(base[n].shape)}")
        expert_lists.append([expert[n] for n in names])
    return FlatInputs(names, bases, expert_lists, passthrough, list(base.keys()))


def _copied_as_is(value: torch.Tensor) -> bool:
    """Integer and bool buffers: copied from the base, not merged."""
    return value.dtype == torch.bool or not (value.dtype.is_floating_point or value.dtype.is_complex
                                             or value.is_quantized)


def weight_rows(weights, flat: FlatInputs, name: str = "weights") -> torch.Tensor:
    """Coefficients as (T, K): a number, K numbers, or (state dicts) a mapping name -> number / K numbers.

    A mapping needs an entry for every floating-point tensor; it may also name the integer/bool
    buffers (copied from the base, their entries unused), but no key that is not in the state dict.
    """
    num_tasks = len(flat.experts)
    if isinstance(weights, Mapping):
        if flat.single_tensor:
            raise TypeError(f"per-tensor {name} (a mapping) need state dicts")
        known = set(flat.order)  # a set: a list made this check quadratic (seconds for 20k keys)
        unknown = [n for n in weights if n not in known]
        if unknown:
            raise ValueError(f"{name} has entries for {len(unknown)} name(s) not in the state dict: "
                             f"{unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
        missing = [n for n in flat.names if n not in weights]
        if missing:
            raise ValueError(f"{name} has no entry for tensor(s) {missing[:5]}")
        rows = [_task_row(weights[n], num_tasks, f"{name}[{n!r}]") for n in flat.names]
        return torch.stack(rows) if rows else torch.zeros((0, num_tasks), dtype=torch.float64)
    return _task_row(weights, num_tasks, name).expand(len(flat.names), num_tasks)


def _task_row(value, num_tasks: int, name: str) -> torch.Tensor:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number or {num_tasks} numbers, got bool")
    if isinstance(value, numbers.Real):
        return torch.full((num_tasks,), float(value), dtype=torch.float64)
    row = real_numbers(value, f"{name} must be a number or {num_tasks} numbers").flatten()
    if row.numel() != num_tasks:
        raise ValueError(f"{name} must have {num_tasks} entries (one per expert), got {row.numel()}")
    return row
