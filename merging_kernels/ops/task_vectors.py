"""Batched task-vector rescaling: task arithmetic, TIES and DARE in fused passes.

One op family merges T tensors (a whole state dict) from a base θ0 and K
experts θk in as few passes over memory as the method allows. For every
element, with d_k = θk − θ0 computed in float32 (float64 for float64 inputs):

1. DARE (``drop_rate`` p > 0): d_k ← 0 where the Philox draw keyed on
   (seed, tensor_key, element, k) says drop (see :mod:`.philox`), else
   d_k / (1 − p).
2. Trim (``density`` ρ < 1): per segment (one tensor, or the whole model)
   and per task, t_k is the m-th largest |d_k| with m = max(1, ⌊ρ·n⌋);
   entries with |d_k| ≥ t_k and d_k ≠ 0 are kept. Ties at the threshold are
   all kept (FusionBench's rule; mergekit's argsort breaks them arbitrarily).
3. Combine with weights w_k (per task, optionally per tensor):
   - plain (task arithmetic): m = Σ_k w_k d_k[kept];
   - ``elect_sign`` (TIES): s = sign(Σ_k w_k d_k[kept]) with 0 counted as +;
     agree_k = kept_k ∧ sign(d_k) = s; m = Σ w_k d_k[agree] / Σ w_k[agree]
     (``normalize``, the disjoint mean; 0 where nothing agrees) or the sum.
4. θ = θ0 + scale · m, written in the output dtype (the base's by default).

Layout of this module: the torch reference (the oracle), the threshold
selection (radix select over histograms, shared by the fast backends), the
Triton kernels, the native call, then the public functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .._dispatch import OpBackends, resolve_backend
from .._validation import check_choice, check_float_tensor, check_int, check_real
from .philox import dare_keep_mask_torch, drop_threshold

TASK_VECTORS = OpBackends("task_vectors", cpu=("native",), cuda=("triton",))
TRIM_SCOPES = ("tensor", "model")
FAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class MergeSpec:
    """The per-call settings every backend receives (validated)."""

    scale: float = 1.0
    density: float | None = None  # None or 1.0: no trim
    trim_scope: str = "tensor"
    drop_rate: float = 0.0
    seed: int = 0
    elect_sign: bool = False
    normalize: bool = True

    @property
    def trims(self) -> bool:
        return self.density is not None and self.density < 1.0

    @property
    def drop_threshold(self) -> int:
        return drop_threshold(self.drop_rate)

    @property
    def drop_scale(self) -> float:
        return 1.0 / (1.0 - self.drop_rate)


def keep_count(density: float, numel: int) -> int:
    """How many entries a trim keeps at least: max(1, ⌊density·numel⌋) (0 for empty)."""
    if numel == 0:
        return 0
    return max(1, int(density * numel))


def segments_of(numels: Sequence[int], trim_scope: str) -> tuple[list[int], list[int]]:
    """Segment id per tensor and element count per segment for a trim scope."""
    if trim_scope == "model":
        return [0] * len(numels), [int(sum(numels))]
    return list(range(len(numels))), [int(n) for n in numels]


# --------------------------------------------------------------------------- reference


def _deltas_torch(base: torch.Tensor, experts: Sequence[torch.Tensor], spec: MergeSpec, key: int) -> torch.Tensor:
    """(K, n) task vectors of one tensor after DARE, in the accumulation dtype."""
    acc = torch.float64 if base.dtype == torch.float64 else torch.float32
    b = base.reshape(-1).to(acc)
    deltas = torch.stack([e.reshape(-1).to(acc) - b for e in experts]) if experts else b.new_zeros((0, b.numel()))
    if spec.drop_rate > 0:
        for k in range(deltas.shape[0]):
            keep = dare_keep_mask_torch(b.numel(), seed=spec.seed, tensor_key=key, task=k, p=spec.drop_rate,
                                        device=b.device)
            deltas[k] = torch.where(keep, deltas[k] * spec.drop_scale, torch.zeros_like(deltas[k]))
    return deltas


def merge_task_vectors_torch(
    bases: Sequence[torch.Tensor],
    experts: Sequence[Sequence[torch.Tensor]],
    weights: torch.Tensor,
    spec: MergeSpec,
    tensor_keys: Sequence[int],
    out_dtypes: Sequence[torch.dtype],
    thresholds: torch.Tensor | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The reference: plain torch, one tensor at a time, selection by ``kthvalue``.

    ``experts[k][t]``; ``weights`` is (T, K); ``thresholds`` (S, K), if given,
    replaces the selection (streamed merges compute it beforehand). Returns the merged tensors and,
    per tensor, the number of (element, task) pairs whose θk − θ0 is not finite.
    """
    num_tasks = len(experts)
    nonfinite = torch.tensor(
        [sum(int((~torch.isfinite(experts[k][t].to(torch.float64) - b.to(torch.float64))).sum())
             for k in range(num_tasks)) for t, b in enumerate(bases)],
        dtype=torch.int64,
    )
    deltas = [_deltas_torch(b, [experts[k][t] for k in range(num_tasks)], spec, tensor_keys[t])
              for t, b in enumerate(bases)]
    kept = [d != 0 for d in deltas]
    if spec.trims:
        seg_of, seg_numel = segments_of([b.numel() for b in bases], spec.trim_scope)
        for s, n in enumerate(seg_numel):
            members = [t for t in range(len(bases)) if seg_of[t] == s]
            if n == 0:
                continue
            if thresholds is not None:
                threshold = thresholds[s].to(deltas[members[0]].dtype)[:, None]
            else:
                magnitudes = torch.cat([deltas[t].abs() for t in members], dim=1)  # (K, n)
                m = keep_count(spec.density, n)
                # the m-th largest = the (n − m + 1)-th smallest
                threshold = magnitudes.kthvalue(n - m + 1, dim=1, keepdim=True).values
            for t in members:
                kept[t] &= deltas[t].abs() >= threshold
    outs = []
    for t, base in enumerate(bases):
        d, keep = deltas[t], kept[t]
        w = weights[t].to(d.dtype).to(d.device)[:, None]  # (K, 1)
        contribution = torch.where(keep, w * d, torch.zeros_like(d))
        if spec.elect_sign:
            positive = contribution.sum(0) >= 0
            agree = keep & ((d > 0) == positive)
            numerator = torch.where(agree, w * d, torch.zeros_like(d)).sum(0)
            if spec.normalize:
                denominator = torch.where(agree, w.expand_as(d), torch.zeros_like(d)).sum(0)
                safe = torch.where(denominator != 0, denominator, torch.ones_like(denominator))
                merged = torch.where(denominator != 0, numerator / safe, torch.zeros_like(numerator))
            else:
                merged = numerator
        else:
            merged = contribution.sum(0)
        result = base.reshape(-1).to(d.dtype) + spec.scale * merged
        outs.append(result.reshape(base.shape).to(out_dtypes[t]))
    return outs, nonfinite


# --------------------------------------------------------------------------- threshold selection
#
# The fast backends find t_k by radix select on the float32 bit pattern of |d|
# (monotone in the value for non-negative floats): three histogram passes over
# 11 + 10 + 10 bits, each counting only entries whose higher bits match the
# prefix found so far. (Non-finite task vectors are caught by the apply pass.)

RADIX_LEVELS = ((20, 11), (10, 10), (0, 10))  # (shift, bits), most significant first


def magnitude_histogram_torch(
    bases: Sequence[torch.Tensor],
    experts: Sequence[Sequence[torch.Tensor]],
    spec: MergeSpec,
    tensor_keys: Sequence[int],
    segment_ids: Sequence[int],
    num_segments: int,
    shift: int,
    bits: int,
    prefix: torch.Tensor,
) -> torch.Tensor:
    """Reference histogram pass: (S, K, 2**bits) int64 counts of digit (key >> shift) & (2**bits − 1)
    over entries whose key >> (shift + bits) equals prefix[s, k] >> (shift + bits)."""
    num_tasks = len(experts)
    counts = torch.zeros((num_segments, num_tasks, 1 << bits), dtype=torch.int64, device=prefix.device)
    for t, base in enumerate(bases):
        s = segment_ids[t]
        d = _deltas_torch(base, [experts[k][t] for k in range(num_tasks)], spec, tensor_keys[t])
        keys = d.abs().to(torch.float32).view(torch.int32).to(torch.int64)
        high = shift + bits
        for k in range(num_tasks):
            match = (keys[k] >> high) == (prefix[s, k] >> high)
            digits = (keys[k][match] >> shift) & ((1 << bits) - 1)
            counts[s, k] += torch.bincount(digits, minlength=1 << bits)
    return counts


def radix_step(counts: torch.Tensor, prefix: torch.Tensor, remaining: torch.Tensor, shift: int) -> None:
    """Fix one digit of every (segment, task) threshold, in place, without a host sync.

    ``remaining`` is the rank (1 = largest) of the wanted entry among those
    matching ``prefix``; the digit is the largest bin whose count of entries
    at or above it reaches that rank.
    """
    at_or_above = counts.flip(-1).cumsum(-1).flip(-1)  # [..., b] = entries with digit >= b
    digit = (at_or_above >= remaining[..., None]).sum(-1) - 1
    digit = digit.clamp(min=0)  # empty segments (remaining > total) end at digit 0
    above = torch.gather(torch.nn.functional.pad(at_or_above, (0, 1)), -1, (digit + 1)[..., None])[..., 0]
    remaining -= above
    prefix |= digit << shift


def select_thresholds(histogram, keep: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """Run the three radix passes with ``histogram(shift, bits, prefix) -> counts``.

    ``keep`` is (S,) int64: the rank m per segment. Returns the (S, K) float32
    thresholds and the (S, K) count of non-finite entries seen in the first pass.
    """
    num_segments = keep.shape[0]
    prefix = torch.zeros((num_segments, num_tasks), dtype=torch.int64, device=keep.device)
    remaining = keep[:, None].expand(num_segments, num_tasks).clone()
    for shift, bits in RADIX_LEVELS:
        radix_step(histogram(shift, bits, prefix), prefix, remaining, shift)
    thresholds = prefix.to(torch.int32).view(torch.float32)
    return torch.where(keep[:, None] > 0, thresholds, torch.full_like(thresholds, float("inf")))


# --------------------------------------------------------------------------- triton kernels
# Contract (same as the native functions below):
#   _magnitude_histogram_triton(bases, experts, spec, tensor_keys, segment_ids, num_segments, shift, bits, prefix)
#       -> (S, K, 2**bits) int64 counts on the device (same meaning as magnitude_histogram_torch)
#   _merge_apply_triton(bases, experts, outs, weights, spec, tensor_keys, segment_ids, thresholds)
#       writes outs; returns (T,) int64 counts of (element, task) pairs with non-finite θk − θ0
# Inputs are contiguous, of FAST_DTYPES, on one device; weights (T, K) float32 on the device;
# thresholds (S, K) float32 on the device or None (no trim).


def _magnitude_histogram_triton(bases, experts, spec, tensor_keys, segment_ids, num_segments, shift, bits, prefix):
    raise NotImplementedError("triton histogram kernel not written yet")


def _merge_apply_triton(bases, experts, outs, weights, spec, tensor_keys, segment_ids, thresholds):
    raise NotImplementedError("triton apply kernel not written yet")


# --------------------------------------------------------------------------- native (C++/OpenMP)
# csrc/cpu/task_vectors.cpp; the binding takes raw addresses of contiguous CPU
# tensors (validated above), so _C needs no torch headers and builds against
# any torch version.

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _native_tensor_lists(bases, experts):
    num_tasks = len(experts)
    return (
        [b.data_ptr() for b in bases],
        [experts[k][t].data_ptr() for t in range(len(bases)) for k in range(num_tasks)],
        [b.numel() for b in bases],
        [_DTYPE_CODES[b.dtype] for b in bases],
    )


def _magnitude_histogram_native(bases, experts, spec, tensor_keys, segment_ids, num_segments, shift, bits, prefix):
    from .._native import native_module

    base_ptrs, expert_ptrs, numels, dtypes = _native_tensor_lists(bases, experts)
    prefix = prefix.contiguous()
    counts = torch.zeros((num_segments, len(experts), 1 << bits), dtype=torch.int64)
    native_module("cpu").task_vectors_histogram(
        base_ptrs, expert_ptrs, numels, dtypes, list(tensor_keys), list(segment_ids), num_segments, len(experts),
        shift, bits, prefix.data_ptr(), counts.data_ptr(), spec.drop_threshold, spec.drop_scale, spec.seed)
    return counts


def _merge_apply_native(bases, experts, outs, weights, spec, tensor_keys, segment_ids, thresholds):
    from .._native import native_module

    base_ptrs, expert_ptrs, numels, dtypes = _native_tensor_lists(bases, experts)
    nonfinite = torch.zeros(len(bases), dtype=torch.int64)
    weights = weights.contiguous()
    thresholds = thresholds.contiguous() if thresholds is not None else None
    native_module("cpu").task_vectors_apply(
        base_ptrs, expert_ptrs, [o.data_ptr() for o in outs], numels, dtypes, [_DTYPE_CODES[o.dtype] for o in outs],
        list(tensor_keys), list(segment_ids), len(experts), weights.data_ptr(), spec.scale,
        thresholds.data_ptr() if thresholds is not None else 0, spec.elect_sign, spec.normalize,
        spec.drop_threshold, spec.drop_scale, spec.seed, nonfinite.data_ptr())
    return nonfinite


# --------------------------------------------------------------------------- public functions

_HISTOGRAM = {"torch": magnitude_histogram_torch, "triton": _magnitude_histogram_triton,
              "native": _magnitude_histogram_native}
_APPLY = {"triton": _merge_apply_triton, "native": _merge_apply_native}


def make_spec(*, scale=1.0, density=None, trim_scope="tensor", drop_rate=0.0, seed=0, elect_sign=False,
              normalize=True) -> MergeSpec:
    """Validate the scalar settings of a merge."""
    if density is not None:
        density = check_real(density, "density", low=0.0, high=1.0, low_open=True)
    return MergeSpec(
        scale=check_real(scale, "scale"),
        density=density,
        trim_scope=check_choice(trim_scope, "trim_scope", TRIM_SCOPES),
        drop_rate=check_real(drop_rate, "drop_rate", low=0.0, high=1.0, high_open=True),
        seed=check_int(seed, "seed", low=0, high=2**64 - 1),
        elect_sign=bool(elect_sign),
        normalize=bool(normalize),
    )


def _check_inputs(bases, experts, names):
    if isinstance(bases, torch.Tensor) or not isinstance(bases, Sequence):
        raise TypeError("bases must be a sequence of tensors")
    if isinstance(experts, torch.Tensor) or not isinstance(experts, Sequence) or len(experts) == 0:
        raise TypeError("experts must be a non-empty sequence (one entry per task) of sequences of tensors")
    num_tensors = len(bases)
    names = list(names) if names is not None else [f"bases[{t}]" for t in range(num_tensors)]
    if len(names) != num_tensors:
        raise ValueError(f"names has {len(names)} entries for {num_tensors} tensors")
    for t, base in enumerate(bases):
        check_float_tensor(base, f"base tensor {names[t]!r}")
    device = bases[0].device if num_tensors else torch.device("cpu")
    for k, task in enumerate(experts):
        if isinstance(task, torch.Tensor) or not isinstance(task, Sequence) or len(task) != num_tensors:
            raise ValueError(f"experts[{k}] must be a sequence of {num_tensors} tensors (one per base tensor)")
        for t, (base, tensor) in enumerate(zip(bases, task)):
            label = f"expert {k} tensor {names[t]!r}"
            check_float_tensor(tensor, label)
            if tensor.shape != base.shape:
                raise ValueError(f"{label} has shape {tuple(tensor.shape)}, base has {tuple(base.shape)}")
            if tensor.dtype != base.dtype:
                raise TypeError(f"{label} has dtype {tensor.dtype}, base has {base.dtype}")
    for t, base in enumerate(bases):
        if base.device != device:
            raise ValueError(f"base tensor {names[t]!r} is on {base.device}, others on {device}")
        for k in range(len(experts)):
            if experts[k][t].device != device:
                raise ValueError(f"expert {k} tensor {names[t]!r} is on {experts[k][t].device}, base on {device}")
    return names, device


def _weights_matrix(weights, num_tensors: int, num_tasks: int) -> torch.Tensor:
    """Weights as a (T, K) float64 CPU tensor from (K,) or (T, K)."""
    try:
        w = torch.as_tensor(weights, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"weights must be numbers of shape (K,) or (T, K): {exc}") from None
    if w.ndim == 1 and w.shape[0] == num_tasks:
        w = w.expand(num_tensors, num_tasks)
    if w.shape != (num_tensors, num_tasks):
        raise ValueError(f"weights must have shape ({num_tasks},) or ({num_tensors}, {num_tasks}), got {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError("weights must be finite")
    return w.contiguous()


def merge_task_vectors(
    bases: Sequence[torch.Tensor],
    experts: Sequence[Sequence[torch.Tensor]],
    weights,
    *,
    scale: float = 1.0,
    density: float | None = None,
    trim_scope: str = "tensor",
    drop_rate: float = 0.0,
    seed: int = 0,
    elect_sign: bool = False,
    normalize: bool = True,
    tensor_keys: Sequence[int] | None = None,
    names: Sequence[str] | None = None,
    thresholds: torch.Tensor | None = None,
    out: Sequence[torch.Tensor] | None = None,
    out_dtype: torch.dtype | None = None,
    check_finite: bool = True,
    backend: str | None = None,
) -> list[torch.Tensor]:
    """Merge T tensors from a base and K experts in fused passes (see the module docstring).

    Args:
        bases: T tensors θ0 (float32/float16/bfloat16; float64 runs on the torch backend).
        experts: K sequences of T tensors, ``experts[k][t]`` matching ``bases[t]`` in
            shape, dtype and device.
        weights: coefficients w, shape (K,) or (T, K).
        scale: multiplier of the combined task vector (TIES' λ).
        density: fraction ρ ∈ (0, 1] of entries kept by magnitude per task; None: no trim.
        trim_scope: ``"tensor"`` (per tensor, mergekit) or ``"model"`` (over all T
            tensors per task, FusionBench).
        drop_rate: DARE's p ∈ [0, 1); kept entries are rescaled by 1/(1 − p).
        seed: DARE seed, 0 ≤ seed < 2**64.
        elect_sign: TIES sign election and disjoint combination.
        normalize: with ``elect_sign``, divide by the sum of agreeing weights (disjoint mean).
        tensor_keys: 32-bit RNG id per tensor (default: the index); see :func:`.philox.tensor_key`.
        names: tensor names for error messages.
        thresholds: precomputed (S, K) trim thresholds (from :func:`magnitude_thresholds`),
            e.g. when the model is streamed; S = T (tensor scope) or 1 (model scope).
        out: T tensors to write into (shapes of the bases); returned.
        out_dtype: dtype of new outputs (default: each base's dtype).
        check_finite: raise ValueError naming the tensor when any θk − θ0 is NaN/±inf.
        backend: ``"torch"``, ``"triton"``, ``"native"`` or None (fastest available).

    Returns:
        T merged tensors (``out`` if given). Inputs are never modified.
    """
    names, device = _check_inputs(bases, experts, names)
    spec = make_spec(scale=scale, density=density, trim_scope=trim_scope, drop_rate=drop_rate, seed=seed,
                     elect_sign=elect_sign, normalize=normalize)
    num_tensors, num_tasks = len(bases), len(experts)
    w = _weights_matrix(weights, num_tensors, num_tasks)
    keys = _tensor_keys(tensor_keys, num_tensors)
    out_dtypes = _out_dtypes(bases, out, out_dtype, names)
    chosen = _choose_backend(backend, device, bases, out_dtypes)
    seg_of, seg_numel = segments_of([b.numel() for b in bases], spec.trim_scope)
    if thresholds is not None and spec.trims:
        thresholds = _check_thresholds(thresholds, len(seg_numel), num_tasks, device)

    if chosen == "torch":
        results, nonfinite = merge_task_vectors_torch(bases, experts, w, spec, keys, out_dtypes,
                                                      thresholds if spec.trims else None)
    else:
        bases_c = [b.contiguous() for b in bases]
        experts_c = [[e.contiguous() for e in task] for task in experts]
        if spec.trims and thresholds is None:
            keep = torch.tensor([keep_count(spec.density, n) for n in seg_numel], dtype=torch.int64, device=device)
            thresholds = select_thresholds(
                lambda shift, bits, prefix: _HISTOGRAM[chosen](bases_c, experts_c, spec, keys, seg_of, len(seg_numel),
                                                               shift, bits, prefix),
                keep, num_tasks)
        results = [torch.empty(b.shape, dtype=dt, device=device) for b, dt in zip(bases, out_dtypes)]
        nonfinite = _APPLY[chosen](bases_c, experts_c, results, w.to(device=device, dtype=torch.float32), spec, keys,
                                   seg_of, thresholds if spec.trims else None)
    if check_finite:
        _raise_on_nonfinite(nonfinite, names)
    if out is None:
        return results
    for dst, src in zip(out, results):
        dst.copy_(src)
    return list(out)


def magnitude_thresholds(
    bases: Sequence[torch.Tensor],
    experts: Sequence[Sequence[torch.Tensor]],
    *,
    density: float,
    trim_scope: str = "tensor",
    drop_rate: float = 0.0,
    seed: int = 0,
    tensor_keys: Sequence[int] | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """The (S, K) float32 trim thresholds t_k of :func:`merge_task_vectors` (S = T or 1).

    Found by radix select (three histogram passes), never by sorting.
    """
    names, device = _check_inputs(bases, experts, None)
    spec = make_spec(density=density, trim_scope=trim_scope, drop_rate=drop_rate, seed=seed)
    keys = _tensor_keys(tensor_keys, len(bases))
    chosen = _choose_backend(backend, device, bases, [b.dtype for b in bases])
    if chosen == "torch" and any(b.dtype == torch.float64 for b in bases):
        raise TypeError("magnitude_thresholds selects on float32 magnitudes; float64 inputs are not supported")
    seg_of, seg_numel = segments_of([b.numel() for b in bases], spec.trim_scope)
    keep = torch.tensor([keep_count(spec.density, n) for n in seg_numel], dtype=torch.int64, device=device)
    bases_c = [b.contiguous() for b in bases]
    experts_c = [[e.contiguous() for e in task] for task in experts]
    return select_thresholds(
        lambda shift, bits, prefix: _HISTOGRAM[chosen](bases_c, experts_c, spec, keys, seg_of, len(seg_numel), shift,
                                                       bits, prefix),
        keep, len(experts))


def _tensor_keys(tensor_keys, num_tensors: int) -> list[int]:
    if tensor_keys is None:
        return list(range(num_tensors))
    keys = [check_int(k, "tensor_keys[i]", low=0, high=2**32 - 1) for k in tensor_keys]
    if len(keys) != num_tensors:
        raise ValueError(f"tensor_keys has {len(keys)} entries for {num_tensors} tensors")
    return keys


def _out_dtypes(bases, out, out_dtype, names) -> list[torch.dtype]:
    if out is not None:
        if isinstance(out, torch.Tensor) or len(out) != len(bases):
            raise ValueError(f"out must be a sequence of {len(bases)} tensors")
        for t, (dst, base) in enumerate(zip(out, bases)):
            check_float_tensor(dst, f"out tensor {names[t]!r}")
            if dst.shape != base.shape or dst.device != base.device:
                raise ValueError(f"out tensor {names[t]!r} must have shape {tuple(base.shape)} on {base.device}, "
                                 f"got {tuple(dst.shape)} on {dst.device}")
        return [dst.dtype for dst in out]
    if out_dtype is not None:
        if out_dtype not in FAST_DTYPES + (torch.float64,):
            raise TypeError(f"out_dtype must be a floating dtype, got {out_dtype}")
        return [out_dtype] * len(bases)
    return [b.dtype for b in bases]


def _choose_backend(backend, device, bases, out_dtypes) -> str:
    wide = any(b.dtype == torch.float64 for b in bases) or torch.float64 in out_dtypes
    if wide and backend is None:
        return "torch"  # the fast kernels compute in float32; float64 stays on the reference
    if wide and backend != "torch":
        raise TypeError(f"backend {backend!r} supports float32/float16/bfloat16; float64 needs backend='torch'")
    return resolve_backend(TASK_VECTORS, backend, device)


def _check_thresholds(thresholds, num_segments, num_tasks, device) -> torch.Tensor:
    if not isinstance(thresholds, torch.Tensor) or thresholds.shape != (num_segments, num_tasks):
        raise ValueError(f"thresholds must be a tensor of shape ({num_segments}, {num_tasks})")
    return thresholds.to(device=device, dtype=torch.float32).contiguous()


def _raise_on_nonfinite(nonfinite: torch.Tensor, names: Sequence[str]) -> None:
    bad = torch.nonzero(nonfinite.cpu()).flatten().tolist()
    if bad:
        listed = ", ".join(repr(names[t]) for t in bad[:5]) + (" ..." if len(bad) > 5 else "")
        raise ValueError(f"non-finite task vectors (NaN or inf in θk − θ0) in tensor(s) {listed}; "
                         "pass check_finite=False to merge them anyway")


def streamed_magnitude_thresholds(
    chunks,
    *,
    num_tasks: int,
    total_numel: int,
    density: float,
    drop_rate: float = 0.0,
    seed: int = 0,
    device: torch.device | str = "cpu",
    backend: str | None = None,
) -> torch.Tensor:
    """Model-scope trim thresholds (1, K) for a model too large to hold at once.

    ``chunks()`` must return a fresh iterable of ``(bases, experts, tensor_keys)``
    covering the model's tensors (``experts[k][t]``); it is called once per radix
    pass (three times). Equals :func:`magnitude_thresholds` with
    ``trim_scope="model"`` on the whole model.
    """
    spec = make_spec(density=density, trim_scope="model", drop_rate=drop_rate, seed=seed)
    device = torch.device(device)
    chosen = resolve_backend(TASK_VECTORS, backend, device)
    keep = torch.tensor([keep_count(spec.density, total_numel)], dtype=torch.int64, device=device)

    def histogram(shift, bits, prefix):
        counts = torch.zeros((1, num_tasks, 1 << bits), dtype=torch.int64, device=device)
        for bases, experts, keys in chunks():
            _check_inputs(bases, experts, None)
            bases_c = [b.contiguous() for b in bases]
            experts_c = [[e.contiguous() for e in task] for task in experts]
            counts += _HISTOGRAM[chosen](bases_c, experts_c, spec, list(keys), [0] * len(bases), 1, shift, bits,
                                         prefix)
        return counts

    return select_thresholds(histogram, keep, num_tasks)
