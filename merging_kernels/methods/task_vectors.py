"""Static merges of task vectors: task arithmetic, TIES and DARE.

Each takes a base and K experts, either as tensors or as state dicts
(mapping name -> tensor; floating-point entries are merged, others are
copied from the base), and returns the same form. All three run the fused
op :func:`merging_kernels.ops.task_vectors.merge_task_vectors`.
"""

from __future__ import annotations

import torch

from ..ops.task_vectors import merge_task_vectors
from ._inputs import flatten_inputs, weight_rows


def _merge(base, experts, weights, *, out, **options):
    flat = flatten_inputs(base, experts)
    out_list = None
    if out is not None:
        out_list = [out] if flat.single_tensor else [out[n] for n in flat.names]
    merged = merge_task_vectors(
        flat.bases, flat.experts, weight_rows(weights, flat), tensor_keys=flat.tensor_keys,
        names=flat.names if not flat.single_tensor else ["tensor"], out=out_list, **options)
    return flat.rebuild(merged) if out is None else out


def task_arithmetic(base, experts, weights=1.0, *, drop_rate: float = 0.0, seed: int = 0, out=None,
                    out_dtype: torch.dtype | None = None, check_finite: bool = True, backend: str | None = None):
    """θ = θ0 + Σ_k λ_k (θk − θ0) (Ilharco et al., 2023), optionally with DARE.

    Args:
        base: θ0, a tensor or a state dict.
        experts: K tensors or state dicts with the same names, shapes and dtypes.
        weights: λ: one number for all tasks, K numbers, or (state dicts) a mapping
            name -> number or K numbers for per-tensor coefficients.
        drop_rate: DARE drop probability p ∈ [0, 1) applied to each task vector first.
        seed: DARE seed; a tensor's mask depends only on (seed, its name, task, element).
        out: tensor / state dict to write into; out_dtype: dtype of new outputs.
        backend: "torch", "triton", "native" or None (fastest available).

    Returns:
        The merged tensor or state dict (float32/float16/bfloat16 accumulate in float32).
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
    """
    return _merge(base, experts, weights, out=out, scale=scale, density=density, trim_scope=trim_scope,
                  elect_sign=True, normalize=normalize, drop_rate=drop_rate, seed=seed, out_dtype=out_dtype,
                  check_finite=check_finite, backend=backend)


def dare_merging(base, experts, *, drop_rate: float, weights=1.0, seed: int = 0, elect_sign: bool = False, out=None,
                 out_dtype: torch.dtype | None = None, check_finite: bool = True, backend: str | None = None):
    """DARE (Yu et al., 2024): drop each task-vector entry with probability p, rescale by 1/(1−p), then
    combine by task arithmetic (or with TIES' sign election when ``elect_sign``)."""
    return _merge(base, experts, weights, out=out, drop_rate=drop_rate, seed=seed, elect_sign=elect_sign,
                  out_dtype=out_dtype, check_finite=check_finite, backend=backend)
