"""Per-sample merged layers: drop-in nn.Modules whose parameters are θ0 + Σ_k α_k(x) τ_k per sample.

Each layer holds its base parameters and K task vectors packed once (see
:mod:`merging_kernels.ops.per_sample_linear`) and reads the current
coefficients from a :class:`Coefficients` object shared by all the layers of
a model, so the model's own forward code runs unchanged::

    coeffs = Coefficients(num_tasks=K)
    layer = PerSampleLinear.from_modules(base_linear, expert_linears, coeffs)
    coeffs.set(alpha)          # (B, K), on the input's device
    y = layer(x)               # x: (B, ..., in)

The leading dimension of every input the layers see must be the batch, or
a multiple of it laid out sample-major (e.g. (B, T) flattened to B·T rows):
with R coefficient rows and N leading rows, row r applies to the N/R
consecutive rows r·N/R … (r+1)·N/R − 1. The same rule lets R rows cover R
blocks of a replicated batch (one block per expert when routing): the layers
then see each block as one "sample" with many tokens, which the strategy
cost model turns into a few large GEMMs instead of many small ones.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch
from torch import nn

from ._dispatch import BACKENDS
from ._validation import check_choice, check_float_tensor, check_int
from .ops.per_sample_linear import (
    CONV_STRATEGIES,
    STRATEGIES,
    lowrank_factors,
    pack_weights,
    per_sample_conv2d,
    per_sample_layer_norm,
    per_sample_linear,
    per_sample_lowrank_linear,
    stack_task_tensors,
)


class Coefficients:
    """The per-sample coefficients that a model's per-sample layers read (shared, set per batch).

    Args:
        num_tasks: K ≥ 0, the number of task vectors of every layer that reads these coefficients.

    :meth:`set` stores an (R, K) floating tensor α per thread; the layers read it with
    :meth:`rows_for` (R must divide the leading dimension of their input, see the module docstring).
    """

    def __init__(self, num_tasks: int):
        self.num_tasks = check_int(num_tasks, "num_tasks", low=0)
        self._local = threading.local()  # per thread: two threads may run one model with their own α

    @property
    def alpha(self) -> torch.Tensor | None:
        return getattr(self._local, "alpha", None)

    def set(self, alpha: torch.Tensor) -> None:
        """R rows of coefficients (R, K): one per sample, or one per block of consecutive samples."""
        if not isinstance(alpha, torch.Tensor) or alpha.dim() != 2 or alpha.shape[1] != self.num_tasks:
            shape = tuple(alpha.shape) if isinstance(alpha, torch.Tensor) else type(alpha).__name__
            raise ValueError(f"alpha must be a (B, {self.num_tasks}) tensor, got {shape}")
        if not alpha.is_floating_point():
            raise TypeError(f"alpha must be a float tensor, got {alpha.dtype}")
        self._local.alpha = alpha

    def clear(self) -> None:
        self._local.alpha = None

    def rows_for(self, x: torch.Tensor, layer: str) -> torch.Tensor:
        """The coefficients, after checking that x's leading dimension is a multiple of their rows."""
        if self.alpha is None:
            raise RuntimeError(f"{layer}: no coefficients set; call the merged model (or Coefficients.set) first")
        alpha = self.alpha
        rows = alpha.shape[0]
        if x.dim() == 0 or (x.shape[0] % rows if rows else x.shape[0]):
            raise ValueError(f"{layer}: input's leading dimension {x.shape[0] if x.dim() else None} is not a "
                             f"multiple of alpha's {rows} rows")
        return alpha


def _match_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Under autocast the previous op may hand us a lower-precision x: compute in the weights' dtype.
    Outside autocast a mismatch is the caller's error and the op says so."""
    if x.dtype != dtype and x.is_floating_point() and torch.is_autocast_enabled(x.device.type):
        return x.to(dtype)
    return x


def _tokens(shape: torch.Size, rows: int) -> int:
    """Rows of x (all dims but the last) per coefficient row; explicit, since reshape(-1) fails when empty."""
    return shape[:-1].numel() // rows if rows else 0


def _label(name: str, layer) -> str:
    """What error messages call a layer (an instance or a class): its name in the model, else its class."""
    return name or (layer if isinstance(layer, type) else type(layer)).__name__


def _check_coefficients(coefficients, label: str) -> None:
    if not isinstance(coefficients, Coefficients):
        raise TypeError(f"{label}: coefficients must be a Coefficients object, got {type(coefficients).__name__}")


def _packed(base_param: torch.Tensor | None, task_vectors, arg: str, label: str,
            num_tasks: int) -> torch.Tensor | None:
    """(K+1, *shape): the base parameter in slot 0, then its K task vectors (None without a parameter).

    ``task_vectors`` None with a base parameter means zero task vectors (as :func:`pack_weights` does).
    """
    if base_param is None:
        if task_vectors is not None:
            raise ValueError(f"{label}: {arg} given but the base layer has no such parameter")
        return None
    shape = tuple(base_param.shape)
    if task_vectors is None:
        task_vectors = base_param.new_zeros((num_tasks, *shape))
    task_vectors = stack_task_tensors(task_vectors, f"{label}: {arg}", shape, base_param)
    if tuple(task_vectors.shape) != (num_tasks, *shape):
        raise ValueError(f"{label}: {arg} must be (K, *{shape}) with K = coefficients.num_tasks = {num_tasks}, "
                         f"got shape {tuple(task_vectors.shape)}")
    with torch.no_grad():
        return torch.cat([base_param.detach()[None], task_vectors.to(base_param)]).contiguous()


def _module_sequence(experts) -> bool:
    """A sequence of modules: a list, a tuple or an nn.ModuleList (a Module, not a Sequence)."""
    return isinstance(experts, nn.ModuleList) or (isinstance(experts, Sequence) and not isinstance(experts, nn.Module))


def _deltas(base: nn.Module, experts: Sequence[nn.Module], name: str, label: str):
    """(K, *shape) task vectors of parameter ``name`` (None when the base has no such parameter)."""
    if not _module_sequence(experts):
        raise TypeError(f"{label}: experts must be a sequence of modules like the base, got {type(experts).__name__}")
    p0 = getattr(base, name, None)
    for k, expert in enumerate(experts):
        if not isinstance(expert, nn.Module):
            raise TypeError(f"{label}: experts[{k}] must be a module like the base, got {type(expert).__name__}")
        pk = getattr(expert, name, None)
        if (p0 is None) != (pk is None):
            has, lacks = ("the base", f"experts[{k}]") if pk is None else (f"experts[{k}]", "the base")
            raise ValueError(f"{label}: {has} has a {name} but {lacks} has none")
        if p0 is not None and pk.shape != p0.shape:
            raise ValueError(f"{label}: experts[{k}].{name} has shape {tuple(pk.shape)}, the base's "
                             f"{tuple(p0.shape)}")
    if p0 is None:
        return None, None
    p0 = p0.detach()
    with torch.no_grad():
        deltas = torch.stack([getattr(e, name).detach().to(p0) - p0 for e in experts]) if experts else \
            p0.new_zeros((0, *p0.shape))
    return p0, deltas


class PerSampleLinear(nn.Module):
    """nn.Linear with per-sample weights W0 + Σ_k α_k τ_k (bias likewise): :func:`per_sample_linear`.

    With ``rank`` r, only W0 and rank-r factors of each τ_k are kept (the ``lowrank`` strategy, always;
    ``strategy`` does not apply); otherwise the packed exact weights, with the strategy chosen per call.

    Args:
        weight: (out, in) base weight W0 (float32/float16/bfloat16/float64; the layer computes in its dtype).
        task_weights: (K, out, in) task vectors τ_k (or K (out, in) tensors), K = ``coefficients.num_tasks``.
        bias: (out,) base bias or None; task_biases: (K, out) or None (see :func:`pack_weights`).
        coefficients: the shared :class:`Coefficients` whose α (R, K) the layer reads per call.
        strategy, backend: passed to :func:`per_sample_linear` (None: chosen per call).
        rank: r ≥ 1 to keep rank-r factors of each τ_k instead of the exact task vectors.
        name: the layer's name in the model, for error messages (default: the class name).

    Input (N, ..., in) with N a multiple of α's R rows; output (N, ..., out) in the weights' dtype.
    Parameters are copied into buffers, detached: the layer is for inference.
    """

    def __init__(self, weight, task_weights, bias, task_biases, coefficients: Coefficients, *,
                 strategy: str | None = None, backend: str | None = None, rank: int | None = None, name: str = ""):
        super().__init__()
        label = _label(name, self)
        _check_coefficients(coefficients, label)
        # checked now, not at the first forward call; which backends run depends on the device at call time
        if strategy is not None:  # "lowrank" names the strategy that rank= always uses; without rank, no factors
            check_choice(strategy, f"{label}: strategy",
                         ("auto", *STRATEGIES) if rank is not None else ("auto", "stacked", "materialize"))
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"{label}: backend must be one of {BACKENDS} or None, got {backend!r}")
        self.coefficients = coefficients
        self.strategy, self.backend, self.rank, self.name = strategy, backend, rank, name
        if rank is None:
            packed, packed_bias = pack_weights(weight, task_weights, bias, task_biases)
            self.register_buffer("packed_weight", packed)
            num_tasks = packed.shape[1] - 1
        else:  # the memory saving is the point: W0 and the factors only
            weight = check_float_tensor(weight, "weight")
            if weight.dim() != 2:
                raise ValueError(f"{label}: weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
            task_weights = stack_task_tensors(task_weights, "task_weights", tuple(weight.shape), weight)
            if task_weights.dim() != 3 or task_weights.shape[1:] != weight.shape:
                raise ValueError(f"{label}: task_weights must be (K, {weight.shape[0]}, {weight.shape[1]}), "
                                 f"got shape {tuple(task_weights.shape)}")
            _, packed_bias = pack_weights(weight[:, :0], task_weights[..., :0], bias, task_biases)
            with torch.no_grad():
                up, down = lowrank_factors(task_weights.detach(), rank)
            self.register_buffer("base_weight", weight.detach().clone().contiguous())
            self.register_buffer("up", up)
            self.register_buffer("down", down)
            num_tasks = task_weights.shape[0]
        if num_tasks != coefficients.num_tasks:
            raise ValueError(f"{label}: {num_tasks} task vectors but coefficients.num_tasks is "
                             f"{coefficients.num_tasks}")
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("packed_bias", packed_bias)

    @classmethod
    def from_modules(cls, base: nn.Linear, experts: Sequence[nn.Linear], coefficients: Coefficients, **kwargs):
        """The layer of ``base`` (an nn.Linear) and K ``experts`` of the same shapes (τ_k = θk − θ0)."""
        label = _label(kwargs.get("name", ""), cls)
        if not isinstance(base, nn.Module):
            raise TypeError(f"{label}: base must be an nn.Linear, got {type(base).__name__}")
        w0, tw = _deltas(base, experts, "weight", label)
        b0, tb = _deltas(base, experts, "bias", label)
        return cls(w0, tw, b0, tb, coefficients, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.coefficients.rows_for(x, self.name or "PerSampleLinear")
        if x.dim() < 2 or x.shape[-1] != self.in_features:  # a batch of samples, each with in_features
            raise ValueError(f"{self.name or 'PerSampleLinear'}: x must be (N, ..., {self.in_features}) with N "
                             f"samples (or blocks of them) in dim 0, got shape {tuple(x.shape)}")
        weights = self.packed_weight if self.rank is None else self.base_weight
        x = _match_dtype(x, weights.dtype)
        shape = x.shape
        x3 = x.reshape(alpha.shape[0], _tokens(shape, alpha.shape[0]), shape[-1])  # (rows, tokens, in); tokens = T (× block size)
        if self.rank is not None:
            y = per_sample_lowrank_linear(x3, alpha, self.base_weight, self.up, self.down,
                                          self.packed_bias)
        else:
            y = per_sample_linear(x3, alpha, self.packed_weight, self.packed_bias, strategy=self.strategy,
                                  backend=self.backend)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        tasks = self.coefficients.num_tasks
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"tasks={tasks}, strategy={self.strategy}, rank={self.rank}")


class PerSampleLayerNorm(nn.Module):
    """nn.LayerNorm (1-D normalized shape) with per-sample affine parameters: :func:`per_sample_layer_norm`.

    Args:
        base: the nn.LayerNorm (normalized shape (D,)) giving γ0, β0 and eps.
        task_weights / task_biases: (K, D) task vectors of γ and β (K = ``coefficients.num_tasks``); None
            where the base has no such parameter (or for zero task vectors of one it has).
        coefficients: the shared :class:`Coefficients`; name: for error messages (default: the class name).

    Input (N, ..., D) with N a multiple of α's R rows; output the same shape and dtype.
    """

    def __init__(self, base: nn.LayerNorm, task_weights, task_biases, coefficients: Coefficients, name: str = ""):
        super().__init__()
        label = _label(name, self)
        if not isinstance(base, nn.LayerNorm):
            raise TypeError(f"{label}: base must be an nn.LayerNorm, got {type(base).__name__}")
        if len(base.normalized_shape) != 1:
            raise TypeError(f"{label}: per-sample LayerNorm supports a 1-D normalized_shape, "
                            f"got {base.normalized_shape}")
        _check_coefficients(coefficients, label)
        self.eps, self.coefficients, self.name = base.eps, coefficients, name
        self.normalized_size = base.normalized_shape[0]
        k = coefficients.num_tasks
        self.register_buffer("packed_weight", _packed(base.weight, task_weights, "task_weights", label, k))
        self.register_buffer("packed_bias", _packed(base.bias, task_biases, "task_biases", label, k))

    @classmethod
    def from_modules(cls, base: nn.LayerNorm, experts: Sequence[nn.LayerNorm], coefficients: Coefficients,
                     name: str = ""):
        """The layer of ``base`` and K ``experts`` of the same shape (τ_k = θk − θ0)."""
        label = _label(name, cls)
        return cls(base, _deltas(base, experts, "weight", label)[1], _deltas(base, experts, "bias", label)[1],
                   coefficients, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.coefficients.rows_for(x, self.name or "PerSampleLayerNorm")
        if x.dim() < 2 or x.shape[-1] != self.normalized_size:
            raise ValueError(f"{self.name or 'PerSampleLayerNorm'}: x must be (N, ..., {self.normalized_size}) with "
                             f"N samples (or blocks of them) in dim 0, got shape {tuple(x.shape)}")
        if self.packed_weight is not None:
            x = _match_dtype(x, self.packed_weight.dtype)
        xg = x.reshape(alpha.shape[0], _tokens(x.shape, alpha.shape[0]), x.shape[-1])
        return per_sample_layer_norm(xg, alpha, self.packed_weight, self.packed_bias, self.eps).view(x.shape)


class PerSampleConv2d(nn.Module):
    """nn.Conv2d (zero padding) with per-sample filters, one conv call per forward: :func:`per_sample_conv2d`.

    Args:
        base: the nn.Conv2d giving W0, b0, stride, padding, dilation and groups (numeric zero padding only).
        task_weights: (K, C_out, C_in / groups, kh, kw) filter task vectors, K = ``coefficients.num_tasks``.
        task_biases: (K, C_out), or None (no bias in the base, or zero task vectors of its bias).
        coefficients: the shared :class:`Coefficients`; name: for error messages (default: the class name).
        strategy: ``"banks"``, ``"stacked"`` or None (picked per call by shape): see :func:`per_sample_conv2d`.

    Input (N, C_in, H, W) with N a multiple of α's R rows; output (N, C_out, H', W') in the filters' dtype.
    """

    def __init__(self, base: nn.Conv2d, task_weights, task_biases, coefficients: Coefficients, name: str = "",
                 strategy: str | None = None):
        super().__init__()
        label = _label(name, self)
        if not isinstance(base, nn.Conv2d):
            raise TypeError(f"{label}: base must be an nn.Conv2d, got {type(base).__name__}")
        if base.padding_mode != "zeros" or isinstance(base.padding, str):
            raise TypeError(f"{label}: per-sample Conv2d supports numeric zero padding only "
                            f"(got padding={base.padding!r}, padding_mode={base.padding_mode!r})")
        _check_coefficients(coefficients, label)
        self.coefficients, self.name = coefficients, name
        self.strategy = None if strategy is None else check_choice(strategy, "strategy", CONV_STRATEGIES)
        self.stride, self.padding, self.dilation, self.groups = base.stride, base.padding, base.dilation, base.groups
        # nn.Conv2d's shape attributes, for code that reads them from the layer it replaces
        self.in_channels, self.out_channels, self.kernel_size = base.in_channels, base.out_channels, base.kernel_size
        k = coefficients.num_tasks
        self.register_buffer("packed_weight", _packed(base.weight, task_weights, "task_weights", label, k))
        self.register_buffer("packed_bias", _packed(base.bias, task_biases, "task_biases", label, k))

    @classmethod
    def from_modules(cls, base: nn.Conv2d, experts: Sequence[nn.Conv2d], coefficients: Coefficients, name: str = "",
                     strategy: str | None = None):
        """The layer of ``base`` and K ``experts`` with the same shapes and convolution settings."""
        label = _label(name, cls)
        if isinstance(base, nn.Conv2d) and _module_sequence(experts):
            for k, e in enumerate(experts):
                settings = ("stride", "padding", "dilation", "groups", "padding_mode")
                if isinstance(e, nn.Conv2d) and any(getattr(e, a) != getattr(base, a) for a in settings):
                    raise ValueError(f"{label}: experts[{k}] has other convolution settings than the base "
                                     f"({', '.join(f'{a}={getattr(e, a)!r}' for a in settings)} vs "
                                     f"{', '.join(f'{a}={getattr(base, a)!r}' for a in settings)})")
        return cls(base, _deltas(base, experts, "weight", label)[1], _deltas(base, experts, "bias", label)[1],
                   coefficients, name, strategy)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.coefficients.rows_for(x, self.name or "PerSampleConv2d")
        x = _match_dtype(x, self.packed_weight.dtype)
        return per_sample_conv2d(x, alpha, self.packed_weight, self.packed_bias, stride=self.stride,
                                 padding=self.padding, dilation=self.dilation, groups=self.groups,
                                 strategy=getattr(self, "strategy", None))  # a layer pickled before it had one


__all__ = ["Coefficients", "PerSampleConv2d", "PerSampleLayerNorm", "PerSampleLinear"]
