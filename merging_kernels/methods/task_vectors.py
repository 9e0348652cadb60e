"""Static merges of task vectors: task arithmetic, TIES and DARE.

Each takes a base and K experts, either as tensors or as state dicts
(mapping name -> tensor; floating-point entries are merged, others are
copied from the base), and returns the same form. All three run the fused
op :func:`merging_kernels.ops.task_vectors.merge_task_vectors`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..ops.task_vectors import merge_task_vectors
from ._inputs import flatten_inputs, weight_rows


def _merge(base, experts, weights, *, out, **options):
    flat = flatten_inputs(base, experts)
    out_list = None
    if out is not None:
        if flat.single_tensor:
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"out must be a tensor like base, got {type(out).__name__}")
            out_list = [out]
        else:
            if not isinstance(out, Mapping):
                raise TypeError(f"out must be a state dict like base, got {type(out).__name__}")
            missing = [n for n in flat.names if n not in out]
            if missing:
                raise ValueError(f"out has no entry for the merged tensor(s) {missing[:5]}"
                                 f"{' ...' if len(missing) > 5 else ''}")
            out_list = [out[n] for n in flat.names]
    merged = merge_task_vectors(
        flat.bases, flat.experts, weight_rows(weights, flat), tensor_keys=flat.tensor_keys,
        names=flat.names if not flat.single_tensor else ["tensor"], out=out_list, **options)
    return flat.rebuild(merged) if out is None else out


def task_arithmetic(base, experts, weights=1.0, *, drop_rate: float = 0.0, seed: int = 0, out=None,
                    out_dtype: torch.dtype | None = None, check_finite: bool = True, backend: str | None = None):
    """θ = θ0 + Σ_k λ_k (θk − θ0) (Ilharco et al., 2023), optionally with DARE.

    Args:
        base: θ0, a tensor or a state dict. Merged tensors may be float32, float16 or bfloat16
            (any backend) or float64 (torch backend only: chosen for it when ``backend`` is None,
            TypeError from the others).
        experts: K tensors or state dicts with the same names, shapes and dtypes.
        weights: λ: one number for all tasks, K numbers, or (state dicts) a mapping
            name -> number or K numbers for per-tensor coefficients (an entry for every
            floating-point tensor; names not in the state dict are refused).
        drop_rate: DARE drop probability p ∈ [0, 1) applied to each task vector first.
        seed: DARE seed; a tensor's mask depends only on (seed, its name, task, element).
        out: tensor / state dict to write into (a state dict needs every floating-point name;
            it is returned as given); out_dtype: dtype of new outputs (with ``out``, only its
            tensors' own dtype is accepted).
        check_finite: raise ValueError naming the tensor if any θk − θ0 is NaN/inf (an entry equal in θk
            and θ0 has θk − θ0 = 0, so a -inf mask every expert kept is merged, not refused), and
            :class:`~merging_kernels.MergeOverflowError` if a merged entry overflows its output dtype where
            the base is finite (e.g. beyond float16's ±65504; see :func:`merge_task_vectors`). The fast backends
            find them while writing, so an ``out`` given with it may be partly written when this raises
            (a checking pass first would read every expert twice).
        backend: "torch", "triton", "native" or None (fastest available).

    Returns:
        The merged tensor or state dict, each merged tensor in its base's dtype unless
        ``out_dtype`` or ``out`` says otherwise (float32/float16/bfloat16 accumulate in float32,
        float64 in float64), detached from autograd on every backend. Integer/bool buffers are
        copied from the base; complex tensors are refused (TypeError naming the key).
    """
    return _merge(base, experts, weights, out=out, drop_rate=drop_rate, seed=seed, out_dtype=out_dtype,
                  check_finite=check_finite, backend=backend)


def ties_merging(base, experts, *, density: float = 0.2, scale: float = 1.0, weights=1.0, trim_scope: str = "tensor",
                 normalize: bool = True, drop_rate: float = 0.0, seed: int = 0, out=None,
                 out_dtype: torch.dtype | None = None, check_finite: bool = True, backend: str | None = None):
    """TIES-Merging (Yadav et al., 2023): trim, elect sign, disjoint mean, scale.

    Per task, keeps the top ``density`` fraction of |θk − θ0| (found by radix
    select; ties at the threshold are kept), per tensor (``trim_scope="tensor"``,
    as mergekit) or over the whole model (``"model"``, as FusionBench). The sign
    of Σ_k w_k τ_k (0 counts as +) is elected per entry; entries agreeing with
    it are averaged, weighted by w (``normalize``) or summed; the result is
    multiplied by ``scale`` (λ) and added to θ0. ``drop_rate`` > 0 applies DARE
    before trimming (``density=1`` then gives mergekit's dare_ties).

    Args:
        base: θ0, a tensor or a state dict (floating-point entries are merged, integer/bool
            buffers copied); dtypes as :func:`task_arithmetic` (float32/float16/bfloat16; float64
            on the torch backend).
        experts: K tensors or state dicts with the same names, shapes and dtypes.
        density: ρ ∈ (0, 1], the fraction of entries kept per task; None (or 1) keeps all
            non-zero entries (no trim: sign election and disjoint mean only).
        scale: λ, the multiplier of the combined task vector.
        weights: w: a number, K numbers, or a mapping name -> number / K numbers (as
            :func:`task_arithmetic`); they weight the sign vote and the mean.
        trim_scope: ``"tensor"`` or ``"model"`` (the whole state dict per task).
        normalize: True for the disjoint mean, False for the sum of agreeing entries.
        drop_rate, seed: DARE applied before trimming (see :func:`task_arithmetic`).
        out, out_dtype, check_finite, backend: as :func:`task_arithmetic`.

    Returns:
        The merged tensor or state dict, each merged tensor in its base's dtype unless
        ``out_dtype`` or ``out`` says otherwise, detached.
    """
    return _merge(base, experts, weights, out=out, scale=scale, density=density, trim_scope=trim_scope,
                  elect_sign=True, normalize=normalize, drop_rate=drop_rate, seed=seed, out_dtype=out_dtype,
                  check_finite=check_finite, backend=backend)


def dare_merging(base, experts, *, drop_rate: float, weights=1.0, seed: int = 0, elect_sign: bool = False, out=None,
                 out_dtype: torch.dtype | None = None, check_finite: bool = True, backend: str | None = None):
    """DARE (Yu et al., 2024): drop each task-vector entry with probability p, rescale by 1/(1−p), then
    combine by task arithmetic (or with TIES' sign election when ``elect_sign``).

    Args:
        base: θ0, a tensor or a state dict; experts: K tensors or state dicts like it (dtypes as
            :func:`task_arithmetic`: float32/float16/bfloat16; float64 on the torch backend).
        drop_rate: p ∈ [0, 1), required.
        weights: λ: a number, K numbers, or a mapping name -> number / K numbers (as
            :func:`task_arithmetic`).
        seed: 0 ≤ seed < 2**64; a tensor's mask depends only on (seed, its name, task, element).
        elect_sign: True for TIES' sign election and disjoint mean (no trim) after dropping.
        out, out_dtype, check_finite, backend: as :func:`task_arithmetic`.

    Returns:
        The merged tensor or state dict, each merged tensor in its base's dtype unless
        ``out_dtype`` or ``out`` says otherwise, detached.
    """
    return _merge(base, experts, weights, out=out, drop_rate=drop_rate, seed=seed, elect_sign=elect_sign,
                  out_dtype=out_dtype, check_finite=check_finite, backend=backend)
