"""Permutation specs: which parameters each group of units permutes, and where to hook its activations.

A *permutation group* is a set of n units (hidden features, channels) that
can be reordered without changing the function a network computes, provided
every parameter the units touch is reordered together:

* on the **output side** (``role="out"``): the rows of the weights that
  produce the units (dim 0 of a Linear/Conv weight), their biases, the
  parameters and running statistics of the norm layers that act on them, and
  anything added to them (a ViT's position embedding, its class token);
* on the **input side** (``role="in"``): the columns of the weights that
  consume them (dim 1 of a Linear/Conv weight).

An axis may hold the group's units in a block layout: the axis of length
``outer * n * inner`` is read as ``(outer, n, inner)`` and the middle index is
permuted. ``inner`` covers a Linear that follows the flattening of C conv
channels over H·W positions (``inner = H*W``); ``outer`` covers fused
projections such as a qkv weight of 3·d rows (``outer = 3``).

Residual connections tie the units of every layer that writes to (or reads
from) the same stream into **one** group: a ResNet stage (stem or shortcut,
every block's last conv and BN, the next consumers' inputs), a transformer's
residual stream. Mark such groups ``residual=True``: :func:`mudsc_merge` in
``mode="zip"`` zips them with one merge/unmerge pair for the whole stream
unless ``zip_residual=False`` (see the method).

Attention heads (and GroupNorm groups) add structure: with ``group_size=s``
the n = g·s units form g blocks (heads) of s units; units move only within a
block and blocks move as wholes. In multi-head attention the query and key
units of a head must share one permutation (their dot product is summed over
the head) and the value units and the out-projection's columns another; both
must move heads identically. Describe that as two groups (q/k and v/out)
with the same ``group_size`` and ``heads_with`` naming each other.

Every group names the **activation points** to hook for its activation
similarity: a module's output, or its input (``input=True``); with several
points the similarities are averaged over them.

Example: a user model ``Net`` with ``self.fc1 = nn.Linear(784, 256)``,
``self.act = nn.ReLU()``, ``self.fc2 = nn.Linear(256, 10)`` has one group::

    spec = PermutationSpec([
        PermutationGroup("hidden",
                         axes=[out_axis("fc1.weight"), out_axis("fc1.bias"), in_axis("fc2.weight")],
                         activations=[ActivationPoint("act")]),
    ])
    spec.check(net_a, net_b)        # ValueError naming any missing / mismatched parameter
    verify_spec(spec, net_a, x)     # permuting any one group must leave net_a's output unchanged

A conv net whose last conv (C channels, 4x4 map) is flattened into a Linear
would add ``in_axis("fc.weight", inner=16)`` to that conv's group.
Builders for the reference models of :mod:`merging_kernels.models` are
:func:`mlp_spec`, :func:`resnet_spec` and :func:`vit_spec`.
"""

from __future__ import annotations

import copy

from dataclasses import dataclass, field, replace
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ._modes import evaluating
from ._validation import check_bool, check_int, check_real

__all__ = [
    "ActivationPoint", "Axis", "PermutationGroup", "PermutationSpec", "apply_permutations", "in_axis", "mlp_spec",
    "out_axis", "random_permutations", "resnet_spec", "spec_for", "verify_spec", "vit_spec",
]


@dataclass(frozen=True)
class Axis:
    """One axis of one parameter (or buffer) that a group permutes.

    ``param``: the state-dict name; ``dim``: the axis; ``role``: ``"out"``
    (the units are produced / normalized / added here) or ``"in"`` (consumed
    here); ``outer``/``inner``: the block layout (the axis is read as
    ``(outer, n, inner)``).
    """

    param: str
    dim: int
    role: str
    outer: int = 1
    inner: int = 1

    def __post_init__(self):
        if not isinstance(self.param, str):
            raise TypeError(f"Axis.param must be a parameter name (str), got {type(self.param).__name__}")
        if self.role not in ("out", "in"):
            raise ValueError(f"Axis.role must be 'out' or 'in', got {self.role!r} (parameter {self.param!r})")
        # frozen dataclass: normalize through object.__setattr__ (numpy ints become ints)
        for attr, low in (("dim", None), ("outer", 1), ("inner", 1)):
            object.__setattr__(self, attr, check_int(getattr(self, attr), f"Axis.{attr} (parameter {self.param!r})",
                                                     low=low))


def out_axis(param: str, dim: int = 0, *, outer: int = 1, inner: int = 1) -> Axis:
    """An output-side axis (default dim 0: weight rows, bias, norm parameters, BN running stats)."""
    return Axis(param, dim, "out", outer, inner)


def in_axis(param: str, dim: int = 1, *, outer: int = 1, inner: int = 1) -> Axis:
    """An input-side axis (default dim 1: the columns of a consuming Linear/Conv weight)."""
    return Axis(param, dim, "in", outer, inner)


@dataclass(frozen=True)
class ActivationPoint:
    """A module whose output (or input, with ``input=True``) carries the group's units in its last
    dimension ((N, C), (N, T, C)) or in dim 1 ((N, C, H, W)); for any other layout, e.g. a Conv1d's
    (N, C, L), say where with ``channel_dim`` (1 there)."""

    module: str
    input: bool = False
    channel_dim: int | None = None

    def __post_init__(self):
        if not isinstance(self.module, str):
            raise TypeError(f"ActivationPoint.module must be a module name (str), got {type(self.module).__name__}")
        object.__setattr__(self, "input", check_bool(self.input, f"ActivationPoint.input ({self.module!r})"))
        if self.channel_dim is not None:
            object.__setattr__(self, "channel_dim",
                               check_int(self.channel_dim, f"ActivationPoint.channel_dim ({self.module!r})"))


@dataclass
class PermutationGroup:
    """A set of units permuted together; see the module docstring."""

    name: str
    axes: Sequence[Axis]
    activations: Sequence[ActivationPoint] = ()
    residual: bool = False
    group_size: int | None = None
    heads_with: str | None = None
    size: int | None = field(default=None)  # filled in by PermutationSpec.check

    def __post_init__(self):
        if not isinstance(self.name, str):
            raise TypeError(f"PermutationGroup.name must be a str, got {type(self.name).__name__}")
        where = f"permutation group {self.name!r}"
        if isinstance(self.axes, (str, Axis)) or not isinstance(self.axes, Iterable):
            raise TypeError(f"{where}: axes must be a list of Axis (out_axis(...), in_axis(...)), got "
                            f"{type(self.axes).__name__}")
        self.axes = tuple(self.axes)
        for a in self.axes:
            if not isinstance(a, Axis):
                raise TypeError(f"{where}: axes must hold Axis objects (out_axis(...), in_axis(...)), got "
                                f"{type(a).__name__} {a!r}")
        if not self.axes:
            raise ValueError(f"{where} has no axes")
        if isinstance(self.activations, (str, ActivationPoint)) or not isinstance(self.activations, Iterable):
            raise TypeError(f"{where}: activations must be a list of ActivationPoint or module names, got "
                            f"{type(self.activations).__name__}")
        self.activations = tuple(ActivationPoint(a) if isinstance(a, str) else a for a in self.activations)
        for p in self.activations:
            if not isinstance(p, ActivationPoint):
                raise TypeError(f"{where}: activations must hold ActivationPoint objects or module names (str), "
                                f"got {p!r}")
        self.residual = check_bool(self.residual, f"{where}: residual")
        if self.group_size is not None:
            self.group_size = check_int(self.group_size, f"{where}: group_size", low=1)
        if self.heads_with is not None:
            if not isinstance(self.heads_with, str):
                raise TypeError(f"{where}: heads_with must be a group name (str), got {type(self.heads_with).__name__}")
            if self.heads_with == self.name:
                raise ValueError(f"{where}: heads_with must name another group (the one sharing its heads), not "
                                 f"itself")


class PermutationSpec:
    """The permutation groups of a model (an ordered collection of :class:`PermutationGroup`)."""

    def __init__(self, groups: Sequence[PermutationGroup]):
        if isinstance(groups, PermutationGroup) or not isinstance(groups, Iterable):
            raise TypeError(f"PermutationSpec takes a list of PermutationGroup, got {type(groups).__name__}")
        self.groups: dict[str, PermutationGroup] = {}
        for g in groups:
            if not isinstance(g, PermutationGroup):
                raise TypeError(f"PermutationSpec takes PermutationGroup objects, got {type(g).__name__} {g!r}")
            if g.name in self.groups:
                raise ValueError(f"duplicate permutation group name {g.name!r}")
            self.groups[g.name] = g
        # each (param, dim) may belong to one group only
        seen: dict[tuple[str, int], str] = {}
        for g in self.groups.values():
            for a in g.axes:
                key = (a.param, a.dim)
                if key in seen:
                    raise ValueError(f"parameter {a.param!r} dim {a.dim} is permuted by both groups "
                                     f"{seen[key]!r} and {g.name!r}")
                seen[key] = g.name
        for g in self.groups.values():
            if g.heads_with is not None:
                other = self.groups.get(g.heads_with)
                if other is None:
                    raise ValueError(f"group {g.name!r}: heads_with names no group ({g.heads_with!r})")
                if other.heads_with != g.name or other.group_size != g.group_size:
                    raise ValueError(f"groups {g.name!r} and {other.name!r} must name each other in heads_with "
                                     f"and have the same group_size")
                if g.group_size is None:
                    raise ValueError(f"group {g.name!r}: heads_with needs a group_size")

    def __iter__(self):
        return iter(self.groups.values())

    def __len__(self):
        return len(self.groups)

    def __getitem__(self, name: str) -> PermutationGroup:
        return self.groups[name]

    def __repr__(self):
        parts = [f"{g.name}(n={g.size}, {len(g.axes)} axes{', residual' if g.residual else ''}"
                 f"{f', heads of {g.group_size}' if g.group_size else ''})" for g in self]
        return "PermutationSpec(" + ", ".join(parts) + ")"

    # ------------------------------------------------------------------ structure
    def param_axes(self) -> dict[str, list[tuple[str, Axis]]]:
        """parameter name -> [(group name, axis), ...] over every group that touches it."""
        out: dict[str, list[tuple[str, Axis]]] = {}
        for g in self:
            for a in g.axes:
                out.setdefault(a.param, []).append((g.name, a))
        return out

    def neighbours(self, name: str) -> set[str]:
        """Groups that share a parameter with ``name`` (their weight similarity depends on its permutation)."""
        params = {a.param for a in self.groups[name].axes}
        return {h.name for h in self if h.name != name and any(a.param in params for a in h.axes)}

    def matching_units(self) -> list[tuple[str, ...]]:
        """Groups solved jointly: a group alone, or a pair tied by ``heads_with``."""
        units, done = [], set()
        for g in self:
            if g.name in done:
                continue
            unit = (g.name,) if g.heads_with is None else (g.name, g.heads_with)
            done.update(unit)
            units.append(unit)
        return units

    def without_params(self, params) -> "PermutationSpec":
        """A copy of the spec with every axis of ``params`` dropped (group names, sizes and flags kept).

        Raises ValueError when a dropped parameter is on the output side of a group (its units would no
        longer be produced consistently) or a group would be left with no axes; TypeError when ``params`` is
        not a collection of parameter names.
        """
        # a bare string would become a set of its characters and silently drop nothing
        if isinstance(params, (str, bytes)) or not isinstance(params, Iterable):
            raise TypeError(f"params must be a list of parameter names, got {type(params).__name__} {params!r}")
        params = set(params)
        for p in params:
            if not isinstance(p, str):
                raise TypeError(f"params must hold parameter names (str), got {type(p).__name__} {p!r}")
        groups = []
        for g in self:
            for a in g.axes:
                if a.param in params and a.role == "out":
                    raise ValueError(f"parameter {a.param!r} produces the units of group {g.name!r} (an output-side "
                                     f"axis): only parameters that consume merged units (heads) can be left out")
            axes = [a for a in g.axes if a.param not in params]
            if not axes:
                raise ValueError(f"group {g.name!r} would have no axes left")
            groups.append(replace(g, axes=axes))
        return PermutationSpec(groups)

    # ------------------------------------------------------------------ validation
    def check(self, model_a, model_b=None) -> "PermutationSpec":
        """Validate against one or two models (``nn.Module`` or state dicts); fill in group sizes.

        Raises ValueError naming the parameter (or module) when a named
        parameter is missing, the two models' shapes differ, an axis is out of
        range or does not hold ``outer * n * inner`` entries consistent with
        the rest of its group, ``group_size`` does not divide n, an
        activation point names no module, or a group permutes the rows of
        ``<module>.weight`` but leaves that module's ``<module>.bias`` out or
        puts it in an unrelated group (a heuristic: it assumes the bias is added
        to the module's output, or to its input by the group feeding it; other
        omissions need a forward pass: :func:`verify_spec`). Returns ``self``.
        """
        models = [("model_a", model_a)] + ([("model_b", model_b)] if model_b is not None else [])
        states = {label: _state(m, label) for label, m in models}
        for label, m in models:
            if isinstance(m, nn.Module):
                names = dict(m.named_modules())
                for g in self:
                    for p in g.activations:
                        if p.module not in names:
                            raise ValueError(f"group {g.name!r}: activation point {p.module!r} is not a module "
                                             f"of {label}")
        first = states["model_a"]
        for label, sd in states.items():
            for g in self:
                for a in g.axes:
                    if a.param not in sd:
                        raise ValueError(f"group {g.name!r}: parameter {a.param!r} is missing from {label}")
                    if not isinstance(sd[a.param], torch.Tensor):  # e.g. a list or numpy array in a state dict
                        raise TypeError(f"group {g.name!r}: parameter {a.param!r} of {label} must be a "
                                        f"torch.Tensor, got {type(sd[a.param]).__name__}")
        if "model_b" in states:
            sd_b = states["model_b"]
            for g in self:
                for a in g.axes:
                    if tuple(first[a.param].shape) != tuple(sd_b[a.param].shape):
                        hint = ("; a per-task head (other class count) can be left out of the merge with "
                                "mudsc_merge(..., exclude=[...])" if a.role == "in" else "")
                        raise ValueError(f"parameter {a.param!r} has shape {tuple(first[a.param].shape)} in model_a "
                                         f"but {tuple(sd_b[a.param].shape)} in model_b{hint}")
        for g in self:
            size = None
            for a in g.axes:
                shape = first[a.param].shape
                if not -len(shape) <= a.dim < len(shape):
                    raise ValueError(f"group {g.name!r}: parameter {a.param!r} of shape {tuple(shape)} has no dim "
                                     f"{a.dim}")
                length = shape[a.dim]
                if length % (a.outer * a.inner):
                    raise ValueError(f"group {g.name!r}: parameter {a.param!r} dim {a.dim} has {length} entries, "
                                     f"not a multiple of outer*inner = {a.outer * a.inner}")
                n = length // (a.outer * a.inner)
                if size is None:
                    size = n
                elif n != size:
                    raise ValueError(f"group {g.name!r}: parameter {a.param!r} dim {a.dim} holds {n} units, but "
                                     f"{g.axes[0].param!r} holds {size}")
            if g.group_size is not None and (g.group_size < 1 or size % g.group_size):
                raise ValueError(f"group {g.name!r}: group_size {g.group_size} does not divide its {size} units")
            g.size = size
        claimed: dict[tuple[str, int], str] = {}  # the constructor's check, again with dims normalized
        for g in self:
            for a in g.axes:
                key = (a.param, a.dim % first[a.param].dim())
                if key in claimed:
                    raise ValueError(f"parameter {a.param!r} dim {key[1]} is permuted by both groups "
                                     f"{claimed[key]!r} and {g.name!r}")
                claimed[key] = g.name
        feeding: dict[str, set[str]] = {}  # parameter -> the groups permuting its input side
        for g in self:
            for a in g.axes:
                if a.role == "in":
                    feeding.setdefault(a.param, set()).add(g.name)
        for g in self:  # the commonest slip in a hand-written spec: a producer's rows permuted, its bias not
            for a in g.axes:
                # "<m>.weight" -> "<m>.bias", and "in_proj_weight" -> "in_proj_bias" (nn.MultiheadAttention)
                if a.role != "out" or not a.param.endswith("weight"):
                    continue
                bias = a.param[: -len("weight")] + "bias"
                t = first.get(bias)
                if not (isinstance(t, torch.Tensor) and t.dim() == 1 and t.shape[0] == first[a.param].shape[a.dim]):
                    continue
                owner = claimed.get((bias, 0))
                # a bias acting on the module's input, as in W(x - b), moves with the group that feeds it
                if owner == g.name or owner in feeding.get(a.param, ()):
                    continue
                layout = (f"{'' if a.outer == 1 else f', outer={a.outer}'}"
                          f"{'' if a.inner == 1 else f', inner={a.inner}'}")
                if owner is None:
                    raise ValueError(f"group {g.name!r} permutes the output side of {a.param!r} but not {bias!r}: "
                                     f"add out_axis({bias!r}{layout}) to it (its entries belong to the same units; "
                                     f"this check assumes the bias is added to the output, as in nn.Linear)")
                raise ValueError(f"{bias!r} is permuted by group {owner!r}, but the rows of {a.param!r} by group "
                                 f"{g.name!r}: a bias belongs to the group of its weight's rows")
        for g in self:
            if g.heads_with is not None and self.groups[g.heads_with].size != g.size:
                raise ValueError(f"groups {g.name!r} and {g.heads_with!r} share heads but have {g.size} and "
                                 f"{self.groups[g.heads_with].size} units")
        return self


def _state(model, name: str) -> Mapping[str, torch.Tensor]:
    if isinstance(model, nn.Module):
        return model.state_dict()
    if isinstance(model, Mapping):
        return model
    raise TypeError(f"{name} must be an nn.Module or a state dict, got {type(model).__name__}")


def _check_spec(spec) -> "PermutationSpec":
    if not isinstance(spec, PermutationSpec):
        raise TypeError(f"spec must be a PermutationSpec, got {type(spec).__name__}")
    return spec


# ---------------------------------------------------------------------- permuting a state dict


def permute_axis(t: torch.Tensor, axis: Axis, index: torch.Tensor) -> torch.Tensor:
    """``t`` with the units along ``axis`` reordered: new unit k = old unit ``index[k]``.

    Raises TypeError for a ``t`` that is not a tensor, an ``axis`` that is not an :class:`Axis` or a non-integer
    ``index``; ValueError when ``t`` has no dim ``axis.dim``, that dim does not hold ``outer * n * inner``
    entries, or ``index`` is not a permutation of the n units.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t must be a torch.Tensor, got {type(t).__name__}")
    if not isinstance(axis, Axis):
        raise TypeError(f"axis must be an Axis (out_axis(...), in_axis(...)), got {type(axis).__name__}")
    shape = t.shape
    if not -len(shape) <= axis.dim < len(shape):  # a wrapped dim would silently permute another axis
        raise ValueError(f"axis: t (parameter {axis.param!r}) of shape {tuple(shape)} has no dim {axis.dim}")
    dim = axis.dim % len(shape)
    if shape[dim] % (axis.outer * axis.inner):
        raise ValueError(f"axis: t (parameter {axis.param!r}) dim {axis.dim} has {shape[dim]} entries, not a "
                         f"multiple of outer*inner = {axis.outer * axis.inner}")
    n = shape[dim] // (axis.outer * axis.inner)
    # a repeated index would copy one unit over another; the check is cheap next to the copy (one sort of n)
    return permute_units(t, axis, _check_permutation(index, n, "index"))


def permute_units(t: torch.Tensor, axis: Axis, index: torch.Tensor) -> torch.Tensor:
    """:func:`permute_axis` without its checks, for callers whose index is a permutation by construction (an
    assignment's solution inside a merge): on CUDA the check would read the index back, a sync per axis."""
    shape = t.shape
    dim = axis.dim % len(shape)
    n = shape[dim] // (axis.outer * axis.inner)
    view = t.reshape(*shape[:dim], axis.outer, n, axis.inner, *shape[dim + 1:])
    return _select_units(view, dim + 1, index).reshape(shape)


def _select_units(view: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    return view.index_select(dim, index.to(view.device))


def apply_permutations(state: Mapping[str, torch.Tensor], spec: PermutationSpec,
                       perms: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A new state dict: for each group in ``perms``, unit k of the result is unit ``perms[g][k]`` of ``state``.

    Applying ``random_permutations`` of a model this way gives a model that
    computes the same function (in eval mode).

    Raises:
        ValueError: ``state`` does not fit ``spec`` (see :meth:`PermutationSpec.check`), ``perms`` names a
            group ``spec`` does not have, or an entry is not a permutation of its group's n units.
        TypeError: ``state`` is not a state dict, ``spec`` not a :class:`PermutationSpec`, or an entry is not a
            1-D integer tensor (or a sequence of ints).
    """
    _check_spec(spec)
    if not isinstance(state, Mapping):  # an nn.Module would pass spec.check but is no dict to copy
        raise TypeError(f"state must be a state dict (a mapping of names to tensors; model.state_dict()), got "
                        f"{type(state).__name__}")
    spec.check(state)
    if not isinstance(perms, Mapping):
        raise TypeError(f"perms must map group names to permutations, got {type(perms).__name__}")
    unknown = [name for name in perms if name not in spec.groups]
    if unknown:
        raise ValueError(f"perms names no group of the spec: {unknown[:5]} (groups: {list(spec.groups)[:8]})")
    out = dict(state)
    for g in spec:
        if g.name not in perms:
            continue
        index = _check_permutation(perms[g.name], g.size, f"perms[{g.name!r}]")
        for a in g.axes:  # the index is checked once per group above, and the axes by spec.check
            t = out[a.param]
            dim = a.dim % t.dim()
            view = t.reshape(*t.shape[:dim], a.outer, g.size, a.inner, *t.shape[dim + 1:])
            out[a.param] = _select_units(view, dim + 1, index).reshape(t.shape)
    return out


def _check_permutation(value, n: int, name: str) -> torch.Tensor:
    """``value`` as an int64 tensor if it reorders n units (each of 0..n-1 once); else a named error. A repeated
    index would copy one unit over another and silently change the model's function."""
    if isinstance(value, np.ndarray):
        value = np.ascontiguousarray(value)  # torch cannot take negative strides (a reversed view)
    if value is None or isinstance(value, (str, bytes)):  # torch's own errors for these name no argument
        raise TypeError(f"{name} must be a 1-D integer tensor or a sequence of ints, got {type(value).__name__}")
    try:
        index = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{name} must be a 1-D integer tensor or a sequence of ints, got "
                        f"{type(value).__name__}: {exc}") from None
    if index.dtype == torch.bool or index.dtype.is_floating_point or index.dtype.is_complex:
        raise TypeError(f"{name} must hold integer unit indices, got {index.dtype}")
    if index.dim() != 1 or index.numel() != n:
        raise ValueError(f"{name} must be a permutation of the group's {n} units (shape ({n},)), got shape "
                         f"{tuple(index.shape)}")
    index = index.long()
    if not torch.equal(index.sort().values, torch.arange(n, device=index.device)):
        raise ValueError(f"{name} is not a permutation of 0..{n - 1} (an index is repeated or out of range)")
    return index


def random_permutations(spec: PermutationSpec, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """A random permutation per group that respects head structure (heads as wholes, units within a head,
    one head permutation shared by groups tied with ``heads_with``). ``spec`` must have been checked."""
    _check_spec(spec)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    perms: dict[str, torch.Tensor] = {}
    head_perm: dict[str, torch.Tensor] = {}
    for g in spec:
        if g.size is None:
            raise ValueError("call spec.check(model) before random_permutations (group sizes are unknown)")
        if g.group_size is None:
            perms[g.name] = torch.randperm(g.size, generator=generator)
            continue
        s = g.group_size
        heads = g.size // s
        hp = head_perm.get(g.heads_with) if g.heads_with else None
        if hp is None:
            hp = torch.randperm(heads, generator=generator)
        head_perm[g.name] = hp
        within = torch.stack([torch.randperm(s, generator=generator) for _ in range(heads)])
        perms[g.name] = (hp[:, None] * s + within).reshape(-1)
    return perms


def verify_spec(spec: PermutationSpec, model: nn.Module, example_input, *, seed: int = 0,
                rtol: float = 1e-4, atol: float = 1e-5) -> PermutationSpec:
    """Check that permuting each group of ``spec`` leaves ``model``'s function unchanged; returns ``spec``.

    Each group (with the groups that share its heads) is permuted alone by a random permutation and
    the output on ``example_input`` compared with the original, in eval mode. A group that forgets a
    parameter (a bias, a norm, a consumer's columns) changes the function: the error names it. Run it
    once on a new spec before merging with it. The output may be a tensor or a tuple, list or dict of
    tensors (each compared; other entries must be equal).

    Raises:
        ValueError: naming the first group whose permutation changes the model's output; ``example_input``
            that does not run through ``model``; a negative ``rtol``/``atol``.
        TypeError: ``model`` is not an ``nn.Module`` (a state dict cannot be run), or an output holds no tensor.
    """
    _check_spec(spec)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module (verify_spec runs it), got {type(model).__name__}")
    seed = check_int(seed, "seed", low=-(2 ** 63), high=2 ** 64 - 1)  # the range torch's generators take
    rtol = check_real(rtol, "rtol", low=0)
    atol = check_real(atol, "atol", low=0)
    spec.check(model)
    with evaluating(model), torch.no_grad():
        try:
            reference = model(example_input)
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError as exc:
            raise ValueError(f"example_input does not run through model: {exc}") from exc
        if not _output_tensors(reference):
            raise TypeError(f"model's output holds no tensor to compare, got {type(reference).__name__}")
        perms = random_permutations(spec, torch.Generator().manual_seed(seed))
        state = model.state_dict()
        probe = copy.deepcopy(model)
        for g in spec:
            tied = {g.name} | ({g.heads_with} if g.heads_with else set()) | \
                {h.name for h in spec if h.heads_with == g.name}
            probe.load_state_dict(apply_permutations(state, spec, {n: perms[n] for n in tied}))
            err = _output_difference(probe(example_input), reference, rtol, atol)
            if err is not None:
                raise ValueError(f"permuting group {g.name!r} changes the model's output (max |diff| {err:.3g}): "
                                 f"a parameter its units touch is missing from its axes, or an axis is wrong")
    return spec


def _output_tensors(out) -> list[torch.Tensor]:
    """The tensors of a model output: a tensor, or tuples / lists / dicts of them (other leaves skipped)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for k in out for t in _output_tensors(out[k])]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _output_tensors(v)]
    return []


def _output_difference(out, reference, rtol: float, atol: float) -> float | None:
    """None when ``out`` matches ``reference`` (tensors within tolerance, other entries equal); else the
    largest |difference| of a tensor (inf where the structure or a non-tensor entry differs)."""
    if isinstance(reference, torch.Tensor):
        if not isinstance(out, torch.Tensor) or out.shape != reference.shape:
            return float("inf")
        if torch.allclose(out, reference, rtol=rtol, atol=atol):
            return None
        if out.is_floating_point() or out.is_complex():
            return (out - reference).abs().max().item()
        return (out.double() - reference.double()).abs().max().item()
    if isinstance(reference, Mapping):
        if not isinstance(out, Mapping) or list(out) != list(reference):
            return float("inf")
        diffs = [_output_difference(out[k], reference[k], rtol, atol) for k in reference]
    elif isinstance(reference, (tuple, list)):
        if type(out) is not type(reference) or len(out) != len(reference):
            return float("inf")
        diffs = [_output_difference(o, r, rtol, atol) for o, r in zip(out, reference)]
    else:
        try:
            same = bool(out == reference)
        except (TypeError, ValueError, RuntimeError):  # e.g. arrays, whose == has no single truth value
            same = out is reference
        return None if same else float("inf")
    diffs = [d for d in diffs if d is not None]
    return max(diffs) if diffs else None


# ---------------------------------------------------------------------- reference models


def _check_model(model, kind: str, builder: str):
    from . import models

    if not isinstance(model, getattr(models, kind)):
        raise TypeError(f"{builder} takes a merging_kernels.models.{kind}, got {type(model).__name__}; describe "
                        f"other models with PermutationSpec")


def mlp_spec(model) -> PermutationSpec:
    """Groups of :class:`merging_kernels.models.MLP`: one per hidden layer (hook: the ReLU's output)."""
    _check_model(model, "MLP", "mlp_spec")
    groups = []
    for i in range(len(model.layers) - 1):
        groups.append(PermutationGroup(
            f"hidden{i}",
            axes=[out_axis(f"layers.{i}.weight"), out_axis(f"layers.{i}.bias"), in_axis(f"layers.{i + 1}.weight")],
            activations=[ActivationPoint(f"acts.{i}")]))
    return PermutationSpec(groups)


def _bn_axes(prefix: str) -> list[Axis]:
    return [out_axis(f"{prefix}.{k}") for k in ("weight", "bias", "running_mean", "running_var")]


def resnet_spec(model) -> PermutationSpec:
    """Groups of :class:`merging_kernels.models.ResNet20`.

    One residual-tied group per stage: the stem (stage 0) or the first
    block's shortcut conv + BN, every block's conv2 + bn2 (output side), the
    inputs of the stage's blocks (conv1, and the next stage's shortcut) and of
    the classifier; hooks: the input of every block of the stage (the stream)
    and of the next consumer. One block-internal group per block: conv1 + bn1
    rows, conv2 columns; hook: conv2's input.
    """
    _check_model(model, "ResNet20", "resnet_spec")
    groups = []
    stages = model.stages
    for s, stage in enumerate(stages):
        axes: list[Axis] = []
        acts: list[ActivationPoint] = []
        if s == 0:
            axes += [out_axis("stem.weight")] + _bn_axes("stem_bn")
        for b, block in enumerate(stage):
            p = f"stages.{s}.{b}"
            if b == 0 and block.shortcut is not None:
                axes += [out_axis(f"{p}.shortcut.0.weight")] + _bn_axes(f"{p}.shortcut.1")
            axes += [out_axis(f"{p}.conv2.weight")] + _bn_axes(f"{p}.bn2")
            if b > 0:
                axes.append(in_axis(f"{p}.conv1.weight"))
                acts.append(ActivationPoint(f"{p}.conv1", input=True))
        if s + 1 < len(stages):
            nxt = f"stages.{s + 1}.0"
            axes.append(in_axis(f"{nxt}.conv1.weight"))
            if stages[s + 1][0].shortcut is not None:
                axes.append(in_axis(f"{nxt}.shortcut.0.weight"))
            acts.append(ActivationPoint(f"{nxt}.conv1", input=True))
        else:
            axes.append(in_axis("fc.weight"))
            acts.append(ActivationPoint("pool", input=True))
        if s == 0:
            axes.append(in_axis("stages.0.0.conv1.weight"))
            acts.append(ActivationPoint("stages.0.0.conv1", input=True))
        groups.append(PermutationGroup(f"stage{s}", axes=axes, activations=acts, residual=True))
        for b in range(len(stage)):
            p = f"stages.{s}.{b}"
            groups.append(PermutationGroup(
                f"stage{s}.block{b}",
                axes=[out_axis(f"{p}.conv1.weight")] + _bn_axes(f"{p}.bn1") + [in_axis(f"{p}.conv2.weight")],
                activations=[ActivationPoint(f"{p}.conv2", input=True)]))
    return PermutationSpec(groups)


def vit_spec(model) -> PermutationSpec:
    """Groups of :class:`merging_kernels.models.ViT`.

    ``residual``: the token stream (patch embedding rows, class token, position
    embedding, every LayerNorm, the out-projection and fc2 rows, the inputs of
    q/k/v, fc1 and the head; hooks: the input of every LayerNorm).
    Per block: ``blockI.qk`` (q and k rows, heads of head_dim; hooks: q's and
    k's outputs) tied by heads to ``blockI.vo`` (v rows, out-projection
    columns; hook: out-projection input), and ``blockI.mlp`` (fc1 rows, fc2
    columns; hook: fc2's input).
    """
    _check_model(model, "ViT", "vit_spec")
    stream: list[Axis] = [out_axis("patch_embed.weight"), out_axis("patch_embed.bias"), out_axis("cls_token", 2),
                          out_axis("pos_embed", 2)]
    stream_acts: list[ActivationPoint] = []
    groups = []
    hd = model.dim // model.heads
    for i in range(len(model.blocks)):
        p = f"blocks.{i}"
        stream += [out_axis(f"{p}.ln1.weight"), out_axis(f"{p}.ln1.bias"),
                   in_axis(f"{p}.attn.q.weight"), in_axis(f"{p}.attn.k.weight"), in_axis(f"{p}.attn.v.weight"),
                   out_axis(f"{p}.attn.out.weight"), out_axis(f"{p}.attn.out.bias"),
                   out_axis(f"{p}.ln2.weight"), out_axis(f"{p}.ln2.bias"),
                   in_axis(f"{p}.fc1.weight"), out_axis(f"{p}.fc2.weight"), out_axis(f"{p}.fc2.bias")]
        stream_acts += [ActivationPoint(f"{p}.ln1", input=True), ActivationPoint(f"{p}.ln2", input=True)]
        groups.append(PermutationGroup(
            f"{p}.qk", axes=[out_axis(f"{p}.attn.q.weight"), out_axis(f"{p}.attn.q.bias"),
                             out_axis(f"{p}.attn.k.weight"), out_axis(f"{p}.attn.k.bias")],
            activations=[ActivationPoint(f"{p}.attn.q"), ActivationPoint(f"{p}.attn.k")],
            group_size=hd, heads_with=f"{p}.vo"))
        groups.append(PermutationGroup(
            f"{p}.vo", axes=[out_axis(f"{p}.attn.v.weight"), out_axis(f"{p}.attn.v.bias"),
                             in_axis(f"{p}.attn.out.weight")],
            activations=[ActivationPoint(f"{p}.attn.out", input=True)],
            group_size=hd, heads_with=f"{p}.qk"))
        groups.append(PermutationGroup(
            f"{p}.mlp", axes=[out_axis(f"{p}.fc1.weight"), out_axis(f"{p}.fc1.bias"), in_axis(f"{p}.fc2.weight")],
            activations=[ActivationPoint(f"{p}.fc2", input=True)]))
    stream += [out_axis("norm.weight"), out_axis("norm.bias"), in_axis("head.weight")]
    stream_acts.append(ActivationPoint("norm", input=True))
    return PermutationSpec([PermutationGroup("residual", axes=stream, activations=stream_acts, residual=True)]
                           + groups)


def spec_for(model) -> PermutationSpec:
    """The spec of a reference model from :mod:`merging_kernels.models` (checked against it)."""
    from . import models

    if isinstance(model, models.MLP):
        spec = mlp_spec(model)
    elif isinstance(model, models.ResNet20):
        spec = resnet_spec(model)
    elif isinstance(model, models.ViT):
        spec = vit_spec(model)
    else:
        raise TypeError(f"no ready spec for {type(model).__name__}; describe it with PermutationSpec "
                        f"(see merging_kernels.permutation_spec)")
    return spec.check(model)
