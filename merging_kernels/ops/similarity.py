"""Similarity matrices for matching units across models: streaming activation statistics, Pearson
correlation, the dual-space combination and group (head) scores.

MuDSC (see notes/MUDSC.md) matches the units of two or more models by a similarity that mixes an
activation-space correlation and a weight-space correlation:

- **activation space**: over a calibration set, for the concatenated features z = [f_1, ..., f_M]
  of the M models (D = Σ C_m units), the mean μ = E[z], the covariance Σ = E[(z−μ)(z−μ)ᵀ] and the
  Pearson correlation Σ_ij / (σ_i σ_j) (:class:`ActivationStats`, fed batch by batch, directly or
  through forward hooks, :func:`activation_stats_hooks`);
- **weight space**: the Pearson correlation between rows (one row per unit: its concatenated
  weights), :func:`correlation_matrix`;
- **dual space**: S = w·S_weight + (1 − w)·S_act (:func:`dual_similarity`);
- **groups** (attention heads, GroupNorm groups): the score of every pair of groups is the best
  within-group matching, one batched assignment solve (:func:`group_similarity`).

Conventions shared by every function:

- Pearson correlation of units i and j is cov_ij / (σ_i σ_j) with population (1/N) moments. A unit
  whose standard deviation σ_i ≤ ``eps`` is *dead*: its correlation with every other unit is 0 and
  with itself 1. Results are clamped to [−1, 1]; no NaN is ever produced for finite input.
- Results are float32 (statistics are kept in float64; see each function for where fp32 is used).

Numerics of the streaming statistics. The textbook accumulator (ZipIt, the MuDSC reference) sums
z zᵀ in fp32 and computes E[z zᵀ] − μμᵀ at the end: catastrophic cancellation when |μ| ≫ σ (with
μ = 1e4, σ = 1 in fp32 the covariance is lost entirely). Here every batch is *shifted* by a fixed
per-unit value k (the first batch's mean, rounded to fp32): the accumulators hold
S = Σ (z − k) and K = Σ (z − k)(z − k)ᵀ, so that cov = K/N − (S/N)(S/N)ᵀ with S/N ≈ 0 — no
cancellation for stationary data, constant units give exactly 0, and z − k is exact in fp32 for
values near k (Sterbenz). Each unit's z − k is also multiplied by a fixed power of two s that brings
the first batch's max |z − k| into [0.5, 1), so K = Σ ((z − k)·s)((z − k)·s)ᵀ and S = Σ (z − k)·s: fp32
products of unscaled values overflow beyond |z − k| ~ 1.8e19, scaled ones only if later batches stray
~1e19 times further from k than the first; float64 sums of unscaled float64 features overflow near the
float64 max (~1.8e308), scaled ones do not. Exact (a power of two), so nothing else changes; the
correlation is computed from the scaled moments, the mean and covariance unscale exactly. Moments
that overflow all the same raise ValueError at finalize time (checking K there, not with a sync per
update). The per-batch Gram is an fp32 product (BLAS on CPU, the Triton kernel on GPU) added into
a float64 K; only the upper triangle is computed (K is symmetric): on CPU BLAS ssyrk (one triangle,
scipy's BLAS) when torch and that BLAS run one thread each — 1.2-1.8x faster per update than the
GEMM — else GEMMs on the blocks on and above the diagonal (3 of 4 for D ≥ 1024); about half the
tiles on GPU. The lower triangle is filled in only when a full
matrix is asked for.

Backends (``SIMILARITY``): on CPU the fast path *is* torch — its work is GEMM, which BLAS does as well
as anything we could write, so there is no native kernel (one would have to beat BLAS, measured).
On CUDA, Triton kernels fuse the centering/normalization into the GEMM tiles:

1. ``_corr_gemm_kernel`` (:func:`correlation_matrix`): loads row tiles of x and y in their own
   dtype (with unit column stride: transposed or column-strided inputs are copied first), centers
   and scales them in registers ((x − μ_i)/‖x_i − μ_i‖, statistics from a float64 prologue),
   accumulates ``tl.dot`` in fp32 and writes the clamped correlation; for y = None only
   tiles on or above the diagonal are computed, each written twice (itself and its transpose).
   Compared with torch (normalize into a copy, then matmul) it saves one write and read of the
   normalized copy and, for y = None, half the FLOPs.
2. ``_shifted_gram_kernel`` (:class:`ActivationStats` updates): the upper tiles of ((z − k)·s)ᵀ((z − k)·s)
   for a batch, shift and scale fused into the loads, added in the epilogue into the float64 K. We do not
   write our own column sums: S comes from ``z.sum(0, dtype=float64)`` (memory-bound, one read; for
   float64 features, from the shifted and scaled float64 copy the kernel's fp32 input is rounded from).
   Fusing the shift avoids the shifted fp32 copy of the batch that torch would materialize, and
   computing only the upper tiles halves the FLOPs (cuBLAS GEMM has no symmetric-output mode
   in torch).
3. ``_moments_corr_kernel`` (:func:`correlation_from_moments`, :meth:`ActivationStats.correlation`):
   cov → corr elementwise, reading only the upper triangle of K, in float64.

``tl.dot`` precision: fp32 inputs use ``input_precision="ieee"`` (what torch's default fp32 matmul
computes; tf32 would cost ~1e-3 relative error); fp16/bf16 inputs are centered in fp32 and multiplied
with ``"tf32"`` (tensor cores, fp32 range — an fp16 dot could overflow on centered values — and
a rounding of the centered values comparable to the inputs' own 16-bit rounding). The operands are
rounded to tf32 in the kernel first (``_tf32_rounded``): the tensor cores read only their top 19 bits,
which truncates; the interpreter multiplies the same rounded values in fp32, so the CPU tests see the
rounding a GPU does. float64 inputs
are rounded to fp32 by the Triton kernels (``correlation_matrix``: after centering each row in float64 and
scaling it by a power of two, so that values beyond the fp32 range, or a spread far below the mean, keep
their correlation) and by :class:`ActivationStats` (after the shift and scale, done in float64; its products
are float64 with ``gram_dtype=torch.float64``); ``correlation_matrix``'s torch path keeps them in float64. The
``*_torch`` references compute in float64 throughout.
GPU timings: none yet (no GPU in the session that wrote this); the kernels are tested on CPU
under ``TRITON_INTERPRET=1``.

Layout of this module: the torch references (the oracles), the torch fast path helpers, the
Triton kernels and launchers, then the public functions.
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Iterator, Sequence

import torch

from .._cuda import launch_device
from .._dispatch import BACKENDS, OpBackends, resolve_backend, triton_interpreting
from .._validation import (check_bool, check_choice, check_float_dtype, check_float_tensor, check_has_data,
                           check_int, check_real)

SIMILARITY = OpBackends("similarity", cpu=(), cuda=("triton",))

# CPU: Gram products on this many column blocks (upper ones only: nb(nb+1)/2 of nb² products)
_SYM_MAX_BLOCKS = 2  # measured on 2 cores (MKL): 2 blocks beat 4, whose 256-wide products run slower
_SYM_MIN_BLOCK = 512
# torch path: batch Grams accumulate in an fp32 buffer, flushed into the float64 K every this many batches
_FLUSH_BATCHES = 8

try:  # scipy is a dependency, but its BLAS may lack ssyrk (or fail to load): then the GEMM path is used
    from scipy.linalg.blas import ssyrk as _ssyrk
except Exception:  # pragma: no cover
    _ssyrk = None
_blas_threads_fn: object = False  # scipy's OpenBLAS get_num_threads (ctypes), None if not found; False: not looked up


def _scipy_blas_threads() -> int | None:
    """The thread count of scipy's BLAS (the OpenBLAS its wheels bundle), None when it cannot be read."""
    global _blas_threads_fn
    if _blas_threads_fn is False:
        _blas_threads_fn = None
        try:
            import ctypes
            import glob
            import os

            import scipy
            libs = os.path.join(os.path.dirname(os.path.dirname(scipy.__file__)), "scipy.libs")
            for path in sorted(glob.glob(os.path.join(libs, "libscipy_openblas*.so*"))):
                lib = ctypes.CDLL(path)  # already loaded by scipy.linalg: the same library, not a second copy
                for name in ("scipy_openblas_get_num_threads", "openblas_get_num_threads"):
                    fn = getattr(lib, name, None)
                    if fn is not None:
                        fn.restype = ctypes.c_int
                        _blas_threads_fn = fn
                        break
                if _blas_threads_fn is not None:
                    break
        except Exception:  # pragma: no cover - another scipy build: thread count unknown
            _blas_threads_fn = None
    return None if _blas_threads_fn is None else int(_blas_threads_fn())


# --------------------------------------------------------------------------- torch references


def correlation_matrix_torch(x: torch.Tensor, y: torch.Tensor | None = None, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation between the rows of x (n, d) and y (m, d), in float64: (n, m); y None: (n, n).

    Rows with population standard deviation ≤ eps are dead (0 against others; 1 on the diagonal
    when y is None). Clamped to [−1, 1].
    """
    # Its own code for scaling and centering (the same steps as the fast paths' _scaled_centered_rows, written
    # separately so that an edit to one cannot silently change both); the Fraction tests are what guard it.
    def normalized(a):
        a = a.to(torch.float64)
        d = a.shape[1]
        if d == 0:
            return a
        # each row times the power of two that brings its max |value| into [0.5, 1) (correlation is
        # scale-invariant): exact, unlike a division by the max itself, whose rounding would erase a spread far
        # below the mean (1e15 ± 1); and the sum of squares of a row beyond ~1e154 (below ~1e-154) would
        # overflow (underflow). The exponent is clamped so that the scale itself is a finite float64.
        _, e = torch.frexp(a.abs().amax(dim=1))
        scale = torch.ldexp(torch.ones_like(a[:, 0]), -e.clamp(-1000, 1000))
        a = a * scale[:, None]
        # centered twice: the first subtraction is exact near the mean (Sterbenz), the second removes the
        # rounding of the first mean (which, for a spread far below the mean, is of the spread's size)
        c = a - a.mean(dim=1, keepdim=True)
        c = c - c.mean(dim=1, keepdim=True)
        norm = c.norm(dim=1)
        alive = norm > eps * d ** 0.5 * scale  # σ = norm / (scale·√d) > eps, without dividing
        return torch.where(alive[:, None], c / torch.where(alive, norm, 1.0)[:, None], 0.0)

    xn = normalized(x)
    yn = xn if y is None else normalized(y)
    out = (xn @ yn.T).clamp_(-1.0, 1.0)
    if y is None:
        out.fill_diagonal_(1.0)
    return out


def correlation_from_moments_torch(mean: torch.Tensor, second_moment: torch.Tensor, count: int,
                                   eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation (D, D) in float64 from mean = Σz/count (D,) and second_moment = Σ z zᵀ (D, D).

    cov = second_moment/count − mean meanᵀ; units with σ = sqrt(cov_ii) ≤ eps are dead (0 with others,
    1 on the diagonal; eps may be a (D,) tensor: per unit, as :class:`ActivationStats` passes it for its
    scaled moments). Clamped to [−1, 1].
    """
    mu = mean.to(torch.float64)
    cov = second_moment.to(torch.float64) / count - torch.outer(mu, mu)
    inv = _inverse_sigma(cov.diagonal(), eps)
    corr = (cov * inv[:, None] * inv[None, :]).clamp_(-1.0, 1.0)
    corr.fill_diagonal_(1.0)
    return corr


def _cross_correlation_from_moments(mean: torch.Tensor, cross: torch.Tensor, diag: torch.Tensor, count: int,
                                    eps: torch.Tensor, split: int) -> torch.Tensor:
    """The (C_0, C_1) block of :func:`correlation_from_moments_torch` from that block of the second moments
    and their diagonal (D,): the same formula, dead units alike (0 with others)."""
    mu = mean.to(torch.float64)
    cov = cross / count - torch.outer(mu[:split], mu[split:])
    inv = _inverse_sigma(diag / count - mu * mu, eps)
    return (cov * inv[:split, None] * inv[None, split:]).clamp_(-1.0, 1.0)


def _inverse_sigma(var: torch.Tensor, eps) -> torch.Tensor:
    """1/σ per unit from its variance, 0 for a dead unit (σ ≤ eps, eps a float or per unit)."""
    sigma = var.clamp(min=0).sqrt()
    alive = sigma > eps
    return torch.where(alive, 1.0 / torch.where(alive, sigma, 1.0), 0.0)


def activation_moments_torch(*features: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """One-shot float64 statistics of the concatenated features of M models: (count, mean (D,), covariance (D, D)).

    Each feature is (N, C), (N, T, C) or (N, C, H, W), pooled to rows as :meth:`ActivationStats.update`
    does. The covariance is the population one (divided by count), computed two-pass (centered).
    """
    z = torch.cat([_feature_rows(f).to(torch.float64) for f in features], dim=1)
    mean = z.mean(dim=0)
    c = z - mean
    return z.shape[0], mean, (c.T @ c) / z.shape[0]


def activation_correlation_torch(*features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """One-shot float64 Pearson correlation of the concatenated features (the oracle of :class:`ActivationStats`)."""
    count, mean, cov = activation_moments_torch(*features)
    return correlation_from_moments_torch(torch.zeros_like(mean), cov * count, count, eps)


def dual_similarity_torch(s_weight: torch.Tensor, s_act: torch.Tensor, w: float = 0.5) -> torch.Tensor:
    """S = w·s_weight + (1 − w)·s_act, in float64; at w = 0 or 1 exactly the other term (its ±inf stay out)."""
    if w == 1.0:
        return s_weight.to(torch.float64, copy=True)
    if w == 0.0:
        return s_act.to(torch.float64, copy=True)
    return w * s_weight.to(torch.float64) + (1.0 - w) * s_act.to(torch.float64)


def group_similarity_torch(s_cross: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair of groups, one assignment at a time with the torch solver: (scores (g, g) float64, perms (g, g, s))."""
    from .linear_assignment import linear_sum_assignment_torch

    s = group_size
    g = s_cross.shape[0] // s
    scores = torch.zeros((g, g), dtype=torch.float64, device=s_cross.device)
    perms = torch.zeros((g, g, s), dtype=torch.int64, device=s_cross.device)
    for a in range(g):
        for b in range(g):
            block = s_cross[a * s:(a + 1) * s, b * s:(b + 1) * s].to(torch.float64)
            _, cols, _, _ = linear_sum_assignment_torch(block, maximize=True)
            perms[a, b] = cols
            scores[a, b] = block[torch.arange(s, device=block.device), cols].sum()
    return scores, perms


# --------------------------------------------------------------------------- torch fast path (CPU, and CUDA fallback)


def _feature_rows(f: torch.Tensor) -> torch.Tensor:
    """(N, C) → itself; (N, T, C) → (N·T, C); (N, C, H, W) → (N·H·W, C) (channels last)."""
    if f.dim() == 2:
        return f
    if f.dim() == 3:
        return f.reshape(-1, f.shape[-1])
    if f.dim() == 4:
        return f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])
    raise ValueError(f"features must be (N, C), (N, T, C) or (N, C, H, W), got shape {tuple(f.shape)}")


def _block_edges(size: int) -> list[int]:
    nb = max(1, min(_SYM_MAX_BLOCKS, size // _SYM_MIN_BLOCK))
    return [round(i * size / nb) for i in range(nb + 1)]


def _sym_gram_add_(acc: torch.Tensor, c: torch.Tensor) -> list[int]:
    """acc += cᵀc on the blocks on and above the diagonal only (BLAS on views, no copies). Returns the block edges."""
    edges = _block_edges(c.shape[1])
    for i in range(len(edges) - 1):
        si = slice(edges[i], edges[i + 1])
        for j in range(i, len(edges) - 1):
            sj = slice(edges[j], edges[j + 1])
            acc[si, sj].addmm_(c[:, si].T, c[:, sj])
    return edges


def _use_syrk(c: torch.Tensor) -> bool:
    """Whether :func:`_syrk_upper_add_` is the faster way to add cᵀc for this (rows, D) fp32 CPU batch (measured).

    Only when torch runs one thread and so does scipy's BLAS (its own thread pool: OPENBLAS_NUM_THREADS /
    OMP_NUM_THREADS). With 2 threads each (2 cores), OpenBLAS's and torch's OpenMP threads, taking turns batch
    after batch, fight over the cores (an update with D = 256 measured 7-25x slower), and below D ≈ 256 OpenBLAS's
    ssyrk is not threaded and loses to the 2-thread GEMM anyway; with torch at 1 thread and OpenBLAS at more, ssyrk
    would use more cores than torch was given. A BLAS whose thread count cannot be read keeps the GEMM.
    """
    return (_ssyrk is not None and c.device.type == "cpu" and c.dtype == torch.float32
            and torch.get_num_threads() == 1 and _scipy_blas_threads() == 1)


def _syrk_upper_add_(acc: torch.Tensor, c: torch.Tensor) -> bool:
    """acc += cᵀc on the upper triangle only, by BLAS ssyrk in place (the strictly lower triangle is not touched).

    acc: (D, D) C-contiguous float32 CPU; c: (rows, D) float32 CPU, C- or F-contiguous. BLAS wants Fortran
    order: acc's memory read as Fortran is accᵀ, whose lower triangle is acc's upper one (lower=1); a C-contiguous
    c is passed as cᵀ (a Fortran (D, rows) A, trans=0: A·Aᵀ), an F-contiguous c as itself (trans=1: AᵀA). No copy
    is made. Returns False (nothing done) when the layouts do not allow that.
    """
    if acc.shape[0] == 0:
        return True
    out = acc.detach().numpy().T
    a = c.detach().numpy()  # features that require grad: the statistics are not differentiable
    if not out.flags.f_contiguous:
        return False
    if a.flags.c_contiguous:
        a, trans = a.T, 0
    elif a.flags.f_contiguous:
        trans = 1
    else:
        return False
    res = _ssyrk(1.0, a, beta=1.0, c=out, trans=trans, lower=1, overwrite_c=1)
    if res.ctypes.data != out.ctypes.data:  # f2py copied c after all (not seen): write the result back
        out[...] = res
    return True


def _mirror_upper_triangle(a: torch.Tensor, tile: int = 128) -> torch.Tensor:
    """A new symmetric matrix from a's upper triangle (the strictly lower one is ignored).

    By tiles of ``tile``: transposed copies of the tiles above the diagonal, triu + triuᵀ within diagonal
    tiles (D = 2048, float64, 1 thread: 21 ms, as the block mirror; whole-matrix triu(a) + triu(a, 1)ᵀ: 57 ms).
    """
    full = a.clone()
    n = a.shape[0]
    for i in range(0, n, tile):
        si = slice(i, i + tile)
        d = full[si, si]
        d.copy_(torch.triu(d) + torch.triu(d, 1).T)
        for j in range(i + tile, n, tile):
            sj = slice(j, j + tile)
            full[sj, si] = full[si, sj].T
    return full


def _mirror_upper_blocks_(a: torch.Tensor, edges: Sequence[int]) -> torch.Tensor:
    """Copy each block above the diagonal onto its transpose (after :func:`_sym_gram_add_`)."""
    for i in range(len(edges) - 1):
        si = slice(edges[i], edges[i + 1])
        for j in range(i + 1, len(edges) - 1):
            sj = slice(edges[j], edges[j + 1])
            a[sj, si] = a[si, sj].T
    return a


def _pow2_scale(span: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """Per entry of span (float64, ≥ 0) the power of two 2^-e, e clamped to [low, high], that brings it into
    [0.5, 1) (1 for 0). Scaling by a power of two is exact: scaled values round as the unscaled ones would,
    without their overflow or underflow."""
    _, e = torch.frexp(span)
    return torch.ldexp(torch.ones_like(span), -e.clamp(low, high))


def _row_stats(a: torch.Tensor, eps) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row, in float64: the mean, 1/‖row − mean‖ (0 for dead rows: σ ≤ eps, a float or per row) and
    max |row − mean|.

    For fp32 and 16-bit rows only: float64 squares of their values can neither overflow nor underflow."""
    a64 = a.to(torch.float64)
    d = a.shape[1]
    if d == 0:
        zeros = torch.zeros(a.shape[0], dtype=torch.float64, device=a.device)
        return zeros, zeros, zeros
    mean = a64.mean(dim=1)
    c = a64 - mean[:, None]
    norm = c.norm(dim=1)
    alive = norm > eps * d ** 0.5
    span = torch.maximum(c.amax(dim=1), -c.amin(dim=1))  # vector_norm(ord=inf) measured 20x slower on CPU
    return mean, torch.where(alive, 1.0 / torch.where(alive, norm, 1.0), 0.0), span


def _scaled_centered_rows(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(c, scale): each row of a, in float64, times the power of two ``scale`` (n,) that brings its max |a| into
    [0.5, 1) (exact), then centered: c = a·scale − mean(a·scale), a new tensor. Rows of any finite magnitude:
    neither the mean nor later squares of c overflow or underflow. A NaN or ±inf entry leaves its row of c
    non-finite. (The shared step of :func:`_normalized_rows_exact` and :func:`_kernel_rows`.)"""
    a = a.to(torch.float64)
    scale = _pow2_scale(a.abs().amax(dim=1), -1000, 1024)
    c = a * scale[:, None]
    return c.sub_(c.mean(dim=1, keepdim=True)), scale


def _normalized_rows_exact(a: torch.Tensor, eps: float) -> torch.Tensor:
    """Float64 (a − row mean) / ‖a − row mean‖ (dead rows: 0) for rows of any finite magnitude, scaled and
    centered by :func:`_scaled_centered_rows`; the dead test compares the unscaled σ with eps."""
    c, scale = _scaled_centered_rows(a)
    c -= c.mean(dim=1, keepdim=True)  # as in _normalized_rows: a constant row becomes exactly 0
    norm = torch.linalg.vector_norm(c, dim=1, keepdim=True)
    alive = norm > (eps * a.shape[1] ** 0.5) * scale[:, None]
    return c.mul_(torch.where(alive, 1.0 / torch.where(alive, norm, 1.0), 0.0))


# _normalized_rows: below this norm, squares summed in the work dtype may have underflowed (subnormal)
_TINY_NORM = {torch.float32: 2.0 ** -40, torch.float64: 2.0 ** -400}


def _normalized_rows(a: torch.Tensor, eps: float, work: torch.dtype, name: str) -> torch.Tensor:
    """(a − row mean) / ‖a − row mean‖ in ``work`` (dead rows: 0).

    Corrected two-pass mean in ``work``: c = a − mean(a), then c −= mean(c). The first subtraction is
    exact for entries near the mean (large offsets cost nothing), the correction removes the first
    mean's rounding, and on a constant row both steps are exact, so it becomes exactly 0 (dead). About
    half the time of a float64 mean (measured: a float64 reduction of fp32 data is slow in torch).

    Extreme magnitudes: the norm sums squares in ``work``, which overflow beyond ~1.8e19 (fp32; ~1e154
    float64), as do the mean or the centering of rows near the dtype's max — each leaves a non-finite norm —
    and squares of tiny rows underflow (a norm below _TINY_NORM, which matters only when eps·√d is below it
    too). Those rows are redone by :func:`_normalized_rows_exact`; in the common case there are none, and
    the check costs one pass over the n norms. A NaN or ±inf entry leaves its row's norm non-finite as
    well, so the input's finiteness is checked here, on those rows only: a full isfinite pass over the
    input cost 15% of a 1024×1024×2048 cross-correlation (measured, CPU). Raises ValueError naming
    ``name`` for such entries.
    """
    d = a.shape[1]
    if d == 0:
        return torch.zeros(a.shape, dtype=work, device=a.device)
    c = a.to(work) - a.mean(dim=1, keepdim=True, dtype=work)
    c -= c.mean(dim=1, keepdim=True)
    norm = torch.linalg.vector_norm(c, dim=1)
    threshold = eps * d ** 0.5
    alive = norm > threshold
    c.mul_(torch.where(alive, 1.0 / torch.where(alive, norm, 1.0), 0.0)[:, None])
    redo = ~torch.isfinite(norm)
    if threshold < _TINY_NORM[work]:
        redo |= norm < _TINY_NORM[work]
    if bool(redo.any()):
        rows = redo.nonzero()[:, 0]
        if not bool(torch.isfinite(a[rows]).all()):
            raise ValueError(f"{name} contains NaN or Inf")
        c[rows] = _normalized_rows_exact(a[rows], eps).to(work)
    return c


def _correlation_matrix_fast_torch(x, y, eps):
    """Normalize rows (:func:`_normalized_rows`), multiply in fp32 (float64 for float64 inputs): BLAS does the GEMM."""
    work = torch.float64 if x.dtype == torch.float64 and (y is None or y.dtype == torch.float64) else torch.float32

    xn = _normalized_rows(x, eps, work, "x")
    if y is None:
        out = torch.zeros((x.shape[0], x.shape[0]), dtype=work, device=x.device)
        _mirror_upper_blocks_(out, _sym_gram_add_(out, xn.T))
        out.fill_diagonal_(1.0)
    else:
        out = xn @ _normalized_rows(y, eps, work, "y").T
    return out.clamp_(-1.0, 1.0).to(torch.float32)


def _correlation_from_moments_fast_torch(mean, second_moment, count, eps, upper):
    m = second_moment.to(torch.float64)
    if upper:
        m = torch.triu(m) + torch.triu(m, 1).T
    return correlation_from_moments_torch(mean, m, count, eps).to(torch.float32)


# --------------------------------------------------------------------------- Triton kernels

try:  # triton is optional: `import merging_kernels` must work without it
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:

    @triton.jit
    def _tf32_rounded(x):
        """Finite fp32 x rounded to the nearest tf32 value (10 mantissa bits, ties away from zero, as
        cvt.rna.tf32.f32 does). tf32 tensor-core products read only the top 19 bits of each fp32 operand,
        so unrounded operands are truncated: up to 2^-10 relative and one-sided, instead of 2^-11."""
        bits = x.to(tl.uint32, bitcast=True)
        return ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)

    @triton.jit
    def _corr_gemm_kernel(x_ptr, y_ptr, mx_ptr, rx_ptr, my_ptr, ry_ptr, out_ptr, n, m, d,
                          sxn, sxd, syn, syd, son, som,
                          SELF: tl.constexpr, PRECISION: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """One (BLOCK_M, BLOCK_N) tile of corr = x̂ ŷᵀ, x̂ = (x − μ)·r centered and scaled while loading.

        μ, r: float32 row means and 1/‖row − μ‖ (0 for dead rows, which then contribute nothing).
        SELF (y is x): tiles below the diagonal return at once; the others store their entries on and
        above the diagonal, each also at its transpose.
        """
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        if SELF and pid_n < pid_m:
            return
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        in_m = rm < n
        in_n = rn < m
        mu_x = tl.load(mx_ptr + rm, mask=in_m, other=0.0)
        r_x = tl.load(rx_ptr + rm, mask=in_m, other=0.0)
        mu_y = tl.load(my_ptr + rn, mask=in_n, other=0.0)
        r_y = tl.load(ry_ptr + rn, mask=in_n, other=0.0)
        x_rows = x_ptr + rm.to(tl.int64)[:, None] * sxn
        y_rows = y_ptr + rn.to(tl.int64)[:, None] * syn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, d, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            in_k = rk < d
            a = tl.load(x_rows + rk[None, :] * sxd, mask=in_m[:, None] & in_k[None, :], other=0.0).to(tl.float32)
            b = tl.load(y_rows + rk[None, :] * syd, mask=in_n[:, None] & in_k[None, :], other=0.0).to(tl.float32)
            a = tl.where(in_k[None, :], (a - mu_x[:, None]) * r_x[:, None], 0.0)
            b = tl.where(in_k[None, :], (b - mu_y[:, None]) * r_y[:, None], 0.0)
            if PRECISION == "tf32":  # the tensor cores would truncate the fp32 operands
                a = _tf32_rounded(a)
                b = _tf32_rounded(b)
            acc += tl.dot(a, tl.trans(b), input_precision=PRECISION)
        acc = tl.minimum(tl.maximum(acc, -1.0), 1.0)
        if SELF:
            acc = tl.where(rm[:, None] == rn[None, :], 1.0, acc)
        mask = in_m[:, None] & in_n[None, :]
        if SELF:  # entries on/above the diagonal, each also stored at its transpose: exactly symmetric
            upper = rm[:, None] <= rn[None, :]
            tl.store(out_ptr + rm.to(tl.int64)[:, None] * son + rn[None, :] * som, acc, mask=mask & upper)
            tl.store(out_ptr + rn.to(tl.int64)[None, :] * son + rm[:, None] * som, acc,
                     mask=mask & (rm[:, None] < rn[None, :]))
        else:
            tl.store(out_ptr + rm.to(tl.int64)[:, None] * son + rn[None, :] * som, acc, mask=mask)

    @triton.jit
    def _shifted_gram_kernel(z_ptr, scale_ptr, nks_ptr, k_ptr, rows, D, szr, szd, skr, skc,
                             PRECISION: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
        """K[tile i, tile j] += ((z[:, i] − k_i)·s_i)ᵀ ((z[:, j] − k_j)·s_j) for tiles j ≥ i; K float64,
        products fp32.

        Computed as z·s + (−k·s) (nks_ptr holds −k·s): s is a power of two, so z·s is exact and the one
        rounding is that of z − k, scaled; without the overflow of z − k near the fp32 max."""
        pid_i = tl.program_id(0)
        pid_j = tl.program_id(1)
        if pid_j < pid_i:
            return
        ri = pid_i * BLOCK_D + tl.arange(0, BLOCK_D)
        rj = pid_j * BLOCK_D + tl.arange(0, BLOCK_D)
        in_i = ri < D
        in_j = rj < D
        s_i = tl.load(scale_ptr + ri, mask=in_i, other=0.0)
        s_j = tl.load(scale_ptr + rj, mask=in_j, other=0.0)
        nks_i = tl.load(nks_ptr + ri, mask=in_i, other=0.0)
        nks_j = tl.load(nks_ptr + rj, mask=in_j, other=0.0)
        acc = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
        for r0 in range(0, rows, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            in_r = rr < rows
            base = z_ptr + rr.to(tl.int64)[:, None] * szr
            a = tl.load(base + ri[None, :] * szd, mask=in_r[:, None] & in_i[None, :], other=0.0).to(tl.float32)
            b = tl.load(base + rj[None, :] * szd, mask=in_r[:, None] & in_j[None, :], other=0.0).to(tl.float32)
            a = tl.where(in_r[:, None], a * s_i[None, :] + nks_i[None, :], 0.0)
            b = tl.where(in_r[:, None], b * s_j[None, :] + nks_j[None, :], 0.0)
            if PRECISION == "tf32":  # the tensor cores would truncate the fp32 operands
                a = _tf32_rounded(a)
                b = _tf32_rounded(b)
            acc += tl.dot(tl.trans(a), b, input_precision=PRECISION)
        ptrs = k_ptr + ri.to(tl.int64)[:, None] * skr + rj[None, :] * skc
        mask = in_i[:, None] & in_j[None, :]
        old = tl.load(ptrs, mask=mask, other=0.0)
        tl.store(ptrs, old + acc.to(tl.float64), mask=mask)

    @triton.jit
    def _moments_corr_kernel(m_ptr, mean_ptr, inv_ptr, out_ptr, D, smr, smc, count,
                             UPPER: tl.constexpr, BLOCK: tl.constexpr):
        """corr_ij = (M_ij/count − μ_i μ_j)·r_i·r_j in float64, clamped, diagonal 1; M read at (min, max) if UPPER.

        count is an integer argument (i32, i64, or the constexpr 1 compiled Triton makes of the value 1):
        float64 / int divides in float64. A Python float scale 1/count would be typed fp32 by the compiler
        (not by the interpreter), and its rounding (up to 2^-24 of M_ij/count) is amplified (μ/σ)² times
        by the cancellation in M/count − μμᵀ on raw moments.
        """
        ri = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        rj = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        in_i = ri < D
        in_j = rj < D
        mask = in_i[:, None] & in_j[None, :]
        r2 = ri.to(tl.int64)[:, None] + 0 * rj[None, :]
        c2 = rj.to(tl.int64)[None, :] + 0 * ri[:, None]
        if UPPER:
            lo = tl.minimum(r2, c2)
            hi = tl.maximum(r2, c2)
        else:
            lo = r2
            hi = c2
        mij = tl.load(m_ptr + lo * smr + hi * smc, mask=mask, other=0.0).to(tl.float64)
        mu_i = tl.load(mean_ptr + ri, mask=in_i, other=0.0)
        mu_j = tl.load(mean_ptr + rj, mask=in_j, other=0.0)
        inv_i = tl.load(inv_ptr + ri, mask=in_i, other=0.0)
        inv_j = tl.load(inv_ptr + rj, mask=in_j, other=0.0)
        corr = (mij / count - mu_i[:, None] * mu_j[None, :]) * inv_i[:, None] * inv_j[None, :]
        corr = tl.minimum(tl.maximum(corr, -1.0), 1.0)
        corr = tl.where(r2 == c2, 1.0, corr)
        tl.store(out_ptr + r2 * D + c2, corr.to(tl.float32), mask=mask)


_MAX_GRID_Y = 65535  # CUDA's limit on a grid's second axis


def _dot_precision(*dtypes: torch.dtype) -> str:
    """fp32 operands: exact fp32 products ("ieee"); 16-bit operands: tf32 (see the module docstring)."""
    return "ieee" if any(dt in (torch.float32, torch.float64) for dt in dtypes) else "tf32"


def _gemm_blocks(sixteen_bit: bool) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). Small tiles under the interpreter (tests:
    many tiles on small shapes exercise the masks and the mirrored stores)."""
    if triton_interpreting():
        return 16, 16, 16, 1, 1
    if sixteen_bit:
        return 128, 128, 32, 8, 3
    return 64, 64, 32, 4, 3


_FP32_MAX = torch.finfo(torch.float32).max


def _kernel_rows(a: torch.Tensor, eps: float, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows for :func:`_corr_gemm_kernel`, fp32 row means μ, fp32 1/‖row − μ‖ (0 for dead rows)).

    The kernel computes (a − μ)·r in fp32, which must stay finite and precise. float64 rows are centered in
    float64 and scaled by a power of two (exact) to max |a − μ| in [0.5, 1) before they are rounded to an fp32
    copy; fp32/16-bit rows at the edges of the fp32 range (centered values beyond 1.7e38, or an alive row whose
    norm is below 2^-100: r would overflow, or its values lose bits as subnormals) are scaled to max |a − μ| in
    [0.5, 1) into an fp32 copy, made only when some row needs it. eps is compared with each row's unscaled σ.
    """
    # Unit column stride for the kernel: its column offsets rk·stride are int32 (a column stride > 1
    # overflows once d·stride ≥ 2^31, e.g. correlation_matrix(W.T) with W 256k × 8192), and strided
    # columns mean scalar loads. The copy is O(n·d) beside the O(n·m·d) GEMM (the torch path makes a
    # normalized copy too). In the interpreter as well: the tests run the kernel as the GPU does.
    if a.stride(-1) != 1:
        a = a.contiguous()
    if a.dtype == torch.float64:
        if a.shape[1] == 0:
            zeros = torch.zeros(a.shape[0], dtype=torch.float32, device=a.device)
            return a.to(torch.float32), zeros, zeros
        # Centered in float64 before the rounding to fp32: a row whose mean dwarfs its spread (1e6 ± 1e-4)
        # would otherwise lose the spread's bits in the rounding (0.41 off, measured). Two exact power-of-two
        # scalings: first so that centering cannot overflow, then so that the centered max is in [0.5, 1).
        # One centering pass: _row_stats centers the rounded fp32 rows again (a constant row's residual is
        # constant, so it still comes out dead).
        c, first = _scaled_centered_rows(a)
        span = c.abs().amax(dim=1)
        # a NaN or ±inf entry leaves its row of c non-finite (amax propagates NaN): the input's finiteness check
        if not bool(torch.isfinite(span).all()):
            raise ValueError(f"{name} contains NaN or Inf")
        second = _pow2_scale(span, -1000, 1024)
        a = (c * second[:, None]).to(torch.float32)
        mean, inv, _ = _row_stats(a, eps * first * second)
        return a, mean.to(torch.float32), inv.to(torch.float32)
    else:
        mean, inv, span = _row_stats(a, eps)
        edge = (span > _FP32_MAX / 2) | (inv > 2.0 ** 100)
        # a NaN or ±inf entry leaves its row's float64 mean non-finite (a float64 sum of finite fp32 or 16-bit
        # values cannot overflow): the input's finiteness check, read in the same device sync as the edge test
        nonfinite, any_edge = torch.stack([(~torch.isfinite(mean)).any(), edge.any()]).tolist()
        if nonfinite:
            raise ValueError(f"{name} contains NaN or Inf")
        if not any_edge:
            return a, mean.to(torch.float32), inv.to(torch.float32)
        scale = torch.where(edge, _pow2_scale(span, -1000, 1024), 1.0)
    a = (a.to(torch.float64) * scale[:, None]).to(torch.float32)
    mean, inv, _ = _row_stats(a, eps * scale)
    return a, mean.to(torch.float32), inv.to(torch.float32)


def _correlation_matrix_triton(x, y, eps):
    same = y is None
    x, mx, rx = _kernel_rows(x, eps, "x")
    if same:
        y, my, ry = x, mx, rx
    else:
        y, my, ry = _kernel_rows(y, eps, "y")
    n, d = x.shape
    m = y.shape[0]
    out = torch.empty((n, m), dtype=torch.float32, device=x.device)
    if n == 0 or m == 0:
        return out
    bm, bn, bk, warps, stages = _gemm_blocks(x.dtype in (torch.float16, torch.bfloat16)
                                             and y.dtype in (torch.float16, torch.bfloat16))
    if same:
        bn = bm
    if not triton_interpreting() and (d % 16 or x.stride(0) % 16 or y.stride(0) % 16):
        bk = 16  # rows not 16-aligned (scalar loads): BLOCK_K=32 spills in the K loop (sm_90, triton 3.6)
    # d = 1: any column stride is valid and .contiguous() keeps it; only column 0 is read, so pass 1
    sxd, syd = (x.stride(1), y.stride(1)) if d > 1 else (1, 1)
    # grid axis 1 stops at 65535 tiles: more rows of y (over 4M; never with y = x, whose n x n output could not
    # be held) are done in slices of y and of out's columns
    step = m if same else _MAX_GRID_Y * bn
    with launch_device(x):
        for j in range(0, m, step):
            part = min(step, m - j)
            _corr_gemm_kernel[(triton.cdiv(n, bm), triton.cdiv(part, bn))](
                x, y[j:], mx, rx, my[j:], ry[j:], out[:, j:], n, part, d, x.stride(0), sxd, y.stride(0), syd,
                out.stride(0), out.stride(1), SELF=same, PRECISION=_dot_precision(x.dtype, y.dtype),
                BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
    return out


def _shifted_gram_add_triton(k64: torch.Tensor, z: torch.Tensor, scale32: torch.Tensor,
                             neg_kscale32: torch.Tensor) -> None:
    rows, D = z.shape
    if rows == 0 or D == 0:
        return
    if triton_interpreting():
        block_d, block_r, warps, stages = 16, 16, 1, 1
    else:
        if z.stride(1) != 1:  # strided columns (scalar loads) spill on sm_90; a copy is O(rows·D) beside O(rows·D²)
            z = z.contiguous()
        # 128-wide 16-bit tiles only with 16-aligned rows: otherwise the float64 K update spills (triton 3.6)
        aligned = D % 16 == 0 and z.stride(0) % 16 == 0
        block_d, block_r, warps, stages = (128, 32, 8, 3) if z.dtype in (torch.float16, torch.bfloat16) and aligned \
            else (64, 32, 4, 3)
    tiles = triton.cdiv(D, block_d)
    with launch_device(z):
        _shifted_gram_kernel[(tiles, tiles)](z, scale32, neg_kscale32, k64, rows, D, z.stride(0), z.stride(1),
                                             k64.stride(0), k64.stride(1), PRECISION=_dot_precision(z.dtype),
                                             BLOCK_D=block_d, BLOCK_R=block_r, num_warps=warps, num_stages=stages)


def _correlation_from_moments_triton(mean, second_moment, count, eps, upper):
    D = mean.shape[0]
    mu = mean.to(torch.float64).contiguous()
    var = (second_moment.diagonal().to(torch.float64) / count - mu * mu).clamp(min=0)
    sigma = var.sqrt()
    alive = sigma > eps
    inv = torch.where(alive, 1.0 / torch.where(alive, sigma, 1.0), 0.0).contiguous()
    out = torch.empty((D, D), dtype=torch.float32, device=mean.device)
    if D == 0:
        return out
    block = 16 if triton_interpreting() else 64
    grid = (triton.cdiv(D, block), triton.cdiv(D, block))
    with launch_device(out):
        _moments_corr_kernel[grid](second_moment, mu, inv, out, D, second_moment.stride(0),
                                   second_moment.stride(1), count, UPPER=upper, BLOCK=block, num_warps=4)
    return out


# --------------------------------------------------------------------------- public functions


def _check_finite(t: torch.Tensor, name: str) -> None:
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def _check_eps(eps) -> float:
    return check_real(eps, "eps", low=0.0)


def _check_device(device, name: str) -> torch.device:
    """A torch.device, or a string or CUDA index naming one, as its tensors report it; not the meta device
    (accumulators need data), nor one this process cannot use."""
    if isinstance(device, bool) or not isinstance(device, (torch.device, str, numbers.Integral)):
        raise TypeError(f"{name} must be a torch.device, a device string (e.g. 'cpu', 'cuda:0') or a CUDA index, "
                        f"got {type(device).__name__}")
    try:
        device = torch.device(device)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ValueError(f"{name} must name a torch device (e.g. 'cpu', 'cuda:0'), got {device!r}: {exc}") from None
    if device.type == "meta":
        raise ValueError(f"{name} is the meta device, which holds no data: the statistics need a real device")
    try:  # the device its tensors report ('cpu:0' → cpu, 'cuda' → cuda:0): what update() compares features with
        return torch.empty(0, device=device).device
    except (RuntimeError, AssertionError) as exc:  # e.g. torch without CUDA asserts
        raise ValueError(f"{name} {device} is not available: {exc}") from None


def correlation_matrix(x: torch.Tensor, y: torch.Tensor | None = None, *, eps: float = 1e-8,
                       backend: str | None = None) -> torch.Tensor:
    """Pearson correlation between the rows of x and the rows of y (weight-space similarity).

    Args:
        x: (n, d) float tensor (fp32/fp16/bf16/fp64; any strides): one row per unit, e.g. its
            concatenated weight vector.
        y: (m, d) on the same device, or None for the correlation of x with itself.
        eps: rows with population standard deviation ≤ eps are dead: correlation 0 with every
            other row, 1 with themselves (y None).
        backend: ``"torch"`` (CPU fast path: float64 row statistics, fp32 BLAS GEMM — float64 for
            float64 inputs — and for y None only the upper blocks), ``"triton"`` (CUDA: fused
            normalization + GEMM kernel) or None (fastest available).

    Returns:
        (n, m) float32 ((n, n) for y None), clamped to [−1, 1]; diagonal exactly 1 for y None.

    Raises:
        ValueError: x/y not 2-D, different d, NaN/Inf entries (naming x or y), eps < 0, meta tensors (no data).
        TypeError: non-float tensors.
    """
    x = check_has_data(check_float_tensor(x, "x"), "x")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (n, d), got shape {tuple(x.shape)}")
    if y is not None:
        y = check_has_data(check_float_tensor(y, "y"), "y")
        if y.dim() != 2:
            raise ValueError(f"y must be 2-D (m, d), got shape {tuple(y.shape)}")
        if y.shape[1] != x.shape[1]:
            raise ValueError(f"y must have as many columns as x ({x.shape[1]}), got shape {tuple(y.shape)}")
        if y.device != x.device:
            raise ValueError(f"y must be on x's device ({x.device}), got {y.device}")
    eps = _check_eps(eps)
    name = resolve_backend(SIMILARITY, backend, x.device)
    if name == "triton":  # both paths check finiteness on the way, from row statistics they compute anyway
        return _correlation_matrix_triton(x, y, eps)
    return _correlation_matrix_fast_torch(x, y, eps)


def correlation_from_moments(mean: torch.Tensor, second_moment: torch.Tensor, count: int, eps: float = 1e-8, *,
                             backend: str | None = None) -> torch.Tensor:
    """Pearson correlation from raw moments: what a streaming accumulator holds.

    Args:
        mean: (D,) the mean Σ_r z_r / count.
        second_moment: (D, D) the *sum* Σ_r z_r z_rᵀ over the ``count`` rows (not divided).
            Correlation is shift-invariant, so moments of shifted data z − k (k ≈ mean, as
            :class:`ActivationStats` keeps them) give the same result without cancellation.
        count: the number of rows, ≥ 1.
        eps: units with σ_i = sqrt(cov_ii) ≤ eps are dead (0 with others, 1 on the diagonal).
        backend: ``"torch"`` (float64 in torch), ``"triton"`` (CUDA: one fused elementwise kernel in
            float64) or None.

    Returns:
        (D, D) float32, clamped to [−1, 1], diagonal 1.
    """
    mean = check_has_data(check_float_tensor(mean, "mean"), "mean")
    second_moment = check_has_data(check_float_tensor(second_moment, "second_moment"), "second_moment")
    if mean.dim() != 1:
        raise ValueError(f"mean must be 1-D (D,), got shape {tuple(mean.shape)}")
    D = mean.shape[0]
    if second_moment.shape != (D, D):
        raise ValueError(f"second_moment must be (D, D) = ({D}, {D}), got shape {tuple(second_moment.shape)}")
    if second_moment.device != mean.device:
        raise ValueError(f"second_moment must be on mean's device ({mean.device}), got {second_moment.device}")
    count = check_int(count, "count", low=1)
    eps = _check_eps(eps)
    _check_finite(mean, "mean")
    _check_finite(second_moment, "second_moment")
    return _correlation_from_moments(mean, second_moment, count, eps, False,
                                     resolve_backend(SIMILARITY, backend, mean.device))


def _correlation_from_moments(mean, second_moment, count, eps, upper, backend):
    if backend == "triton":
        return _correlation_from_moments_triton(mean, second_moment, count, eps, upper)
    return _correlation_from_moments_fast_torch(mean, second_moment, count, eps, upper)


class ActivationStats:
    """Streaming mean / second moment of the concatenated features z = [f_1, ..., f_M] of M models.

    Feed it batch by batch (:meth:`update`, or the forward hooks of :func:`activation_stats_hooks`);
    no activation is kept. Memory: the (D, D) float64 accumulator K, plus on the torch path an fp32
    (D, D) buffer (batch Grams are summed in fp32 BLAS into it and flushed into K every
    ``_FLUSH_BATCHES`` batches: fp32 GEMM speed, float64 accumulation across batches).

    Numerics: see the module docstring — moments of (z − k)·s with k the first batch's mean (fp32) and s
    a per-unit power of two from the first batch's spread, so large means (1e4 with σ = 1) cost nothing,
    features of any finite size (1e19, 1e30; float64 ones up to the float64 max) give the right
    correlation, and constant (dead) units have exactly zero variance. Per-batch products are fp32 (tf32
    for 16-bit features on the Triton path); float64 features are shifted and scaled in float64 (k then
    a float64 value) and only then rounded to fp32, so a mean far above the spread (1e6 ± 1e-4) or values
    beyond the fp32 range keep their correlation; ``gram_dtype=torch.float64`` (torch backend only) makes
    the products float64 too. Moments that overflow (later batches ~1e19 times further from k than the
    first) raise ValueError at finalize.

    Args:
        num_features: the feature count C_m of each model (a sequence: M models, checked on every
            update), or the total D (an int: any number of features whose counts sum to D).
        device: where the accumulators live (a torch.device, a string such as ``"cuda:0"``, or a CUDA index;
            not ``"meta"``); None: the device of the first batch.
        backend: ``"torch"`` (CPU fast path: BLAS), ``"triton"`` (CUDA kernels) or None (fastest for
            the device, resolved at the first update when device is None).
        gram_dtype: torch.float32 (default) or torch.float64: the dtype of the per-batch products on
            the torch path.
        blocks: ``"all"`` (default): the moments of every pair of the D features; ``"cross"`` (two models):
            only those between model 0's and model 1's features (and each feature's own variance), which is
            all a one-to-one matching needs: :meth:`covariance` and :meth:`correlation` are then (C_0, C_1),
            and the torch path does a third to a half of the products (measured 2-2.7x faster per batch at
            256-2048 features). The Triton path accumulates every block and returns the cross one.

    Raises (constructor): ValueError for a device that is not one (``"gpu"``), not available or meta, and for
    gram_dtype torch.float16/bfloat16; TypeError for arguments of the wrong type (a dtype given by name).
    """

    def __init__(self, num_features: int | Sequence[int], *, device: torch.device | str | None = None,
                 backend: str | None = None, gram_dtype: torch.dtype = torch.float32, blocks: str = "all"):
        if isinstance(num_features, numbers.Integral) and not isinstance(num_features, bool):
            self.num_features: tuple[int, ...] | None = None
            self.dim = check_int(num_features, "num_features", low=0)
        else:
            if isinstance(num_features, (str, bytes)) or not isinstance(num_features, Sequence):
                raise TypeError(f"num_features must be an int or a sequence of ints, got {type(num_features).__name__}")
            counts = tuple(check_int(c, f"num_features[{i}]", low=0) for i, c in enumerate(num_features))
            if not counts:
                raise ValueError("num_features must name at least one model")
            self.num_features = counts
            self.dim = sum(counts)
        self.blocks = check_choice(blocks, "blocks", ("all", "cross"))
        if blocks == "cross" and (self.num_features is None or len(self.num_features) != 2):
            raise ValueError(f"blocks='cross' needs num_features of two models (C_0, C_1), got {num_features!r}")
        check_float_dtype(gram_dtype, "gram_dtype")
        if gram_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"gram_dtype must be torch.float32 or torch.float64, got {gram_dtype}")
        if device is not None:
            device = _check_device(device, "device")
        if backend is not None and backend not in BACKENDS:  # availability is known once the device is
            raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
        self.gram_dtype = gram_dtype
        self._requested_backend = backend
        self.device: torch.device | None = None
        self.backend: str | None = None
        self.count = 0
        self._shift: torch.Tensor | None = None  # (D,) float64 k: values of the first batch's work dtype
        # (D,) float64 powers of two: the products, K and the work buffers hold (z − k)·scale, of size ~1
        self._scale: torch.Tensor | None = None
        # (scale, −k·scale) in the work dtype (None: set by float64 features whose scale it cannot hold)
        self._step: tuple[torch.Tensor, torch.Tensor] | None = None
        self._sum: torch.Tensor | None = None  # Σ (z − k)·scale, float64 (scaled as K: no overflow near the max)
        # Σ (z − k)(z − k)ᵀ·scale scaleᵀ, float64 (upper tiles/blocks valid)
        self._gram: torch.Tensor | None = None
        self._pending: torch.Tensor | None = None  # torch path: fp32 batch Grams not yet in _gram
        # blocks="cross" on the torch path: _gram is the (C_0, C_1) block, _diag the (D,) Σ (z − k)²·scale²
        self._cross = False
        self._diag: torch.Tensor | None = None
        self._pending_diag: torch.Tensor | None = None
        self._pending_batches = 0
        if device is not None:
            self._setup(device)

    def _setup(self, device: torch.device) -> None:
        self.backend = resolve_backend(SIMILARITY, self._requested_backend, device)
        if self.backend == "triton" and self.gram_dtype != torch.float32:
            raise ValueError("gram_dtype=torch.float64 is available on the torch backend only")
        self.device = device
        D = self.dim
        self._sum = torch.zeros(D, dtype=torch.float64, device=device)
        self._cross = self.blocks == "cross" and self.backend != "triton"
        if self._cross:
            self._gram = torch.zeros(self.num_features, dtype=torch.float64, device=device)
            self._diag = torch.zeros(D, dtype=torch.float64, device=device)
        else:
            self._gram = torch.zeros((D, D), dtype=torch.float64, device=device)

    # ----------------------------------------------------------------- updates

    @torch.no_grad()  # the statistics are not differentiable: no graph through the batch buffers
    def update(self, *features: torch.Tensor) -> None:
        """Add one batch: one feature tensor per model, the same rows in every model.

        Each feature is (N, C) rows, (N, T, C) tokens (pooled over N·T rows) or (N, C, H, W) conv
        maps (channel dim 1, pooled over N·H·W rows); any float dtype. Raises ValueError naming the
        model for wrong dims or channel counts, row counts that differ across models, NaN/Inf, meta tensors.
        """
        if not features:
            raise ValueError("update needs one feature tensor per model, got none")
        if self.num_features is not None and len(features) != len(self.num_features):
            raise ValueError(f"update expects {len(self.num_features)} feature tensors (one per model), "
                             f"got {len(features)}")
        shapes: list[tuple[int, int]] = []  # (rows, channels) of each feature, pooled (no copy made here)
        checked = []
        for i, f in enumerate(features):
            f = check_has_data(check_float_tensor(f, f"features[{i}] (model {i})"), f"features[{i}] (model {i})")
            if f.dim() not in (2, 3, 4):
                raise ValueError(f"features[{i}] (model {i}) must be (N, C), (N, T, C) or (N, C, H, W), "
                                 f"got shape {tuple(f.shape)}")
            ch = f.shape[1] if f.dim() == 4 else f.shape[-1]
            nr = f.shape[0] * (f.shape[2] * f.shape[3] if f.dim() == 4 else f.shape[1] if f.dim() == 3 else 1)
            if self.num_features is not None and ch != self.num_features[i]:
                raise ValueError(f"features[{i}] (model {i}) has {ch} channels, expected "
                                 f"{self.num_features[i]}")
            if shapes and nr != shapes[0][0]:
                raise ValueError(f"features[{i}] (model {i}) pools to {nr} rows but features[0] to "
                                 f"{shapes[0][0]}: every model must see the same batch")
            if checked and f.device != checked[0].device:
                raise ValueError(f"features[{i}] (model {i}) is on {f.device}, features[0] on {checked[0].device}")
            shapes.append((nr, ch))
            checked.append(f)
        chans = [ch for _, ch in shapes]
        D = sum(chans)
        if D != self.dim:
            raise ValueError(f"the features have {D} channels in all, expected num_features = {self.dim}")
        device = checked[0].device
        if self.device is None:
            self._setup(device)
        elif device != self.device:
            raise ValueError(f"features are on {device}, the statistics on {self.device}")
        n = shapes[0][0]
        if n == 0:
            return
        if self.backend != "triton":
            self._update_torch(checked, chans, n)
            return
        rows = [_feature_rows(f) for f in checked]
        z = torch.cat(rows, dim=1) if len(rows) > 1 else rows[0]
        first = self._shift is None
        # nothing is changed before the checks pass (column sums: NaN/Inf, overflow; the step for z's dtype)
        if z.dtype == torch.float64:  # shifted and scaled in float64, then rounded: the kernel's step is (1, 0)
            if first:  # the first batch's mean (float64: its sum may overflow near the float64 max, its mean not)
                shift = self._first_mean(z, 0, chans, checked)
                scale, step = self._scaling(shift, z.amin(dim=0), z.amax(dim=0), torch.float32, z.dtype)
            else:
                shift, scale, step = self._shift, self._scale, self._step
            # z·s − k·s in one pass (addcmul): z·s is exact, so its one rounding is that of (z − k)·s
            z = torch.addcmul(-shift * scale, z, scale)
            total = self._checked_sum(z, chans, checked)  # S adds the column sums of what the Gram sees
            z = z.to(torch.float32)
            ones = torch.ones(self.dim, dtype=torch.float32, device=self.device)
            kernel_step = (ones, torch.zeros_like(ones))
        else:  # no shifted copy: the kernel shifts and scales while loading
            # column sums in float64 double as the NaN/Inf check (a float64 sum of finite fp32 values is finite)
            total = self._checked_sum(z, chans, checked)
            if first:  # the first batch's mean, as an fp32 value: z − k is exact for z near k
                shift = (total / n).to(torch.float32).to(torch.float64)
                scale, step = self._scaling(shift, z.amin(dim=0), z.amax(dim=0), torch.float32, z.dtype)
                kernel_step = step
            else:
                shift, scale, step = self._shift, self._scale, self._step
                kernel_step = self._step_for(checked)
            # Σ z − n·k (n·k and the sum fit float64: values of fp32's range), scaled as the Gram
            total = (total - n * shift) * scale
        if first:
            self._shift, self._scale, self._step = shift, scale, step
        self._sum += total
        _shifted_gram_add_triton(self._gram, z, *kernel_step)
        self.count += n

    def _update_torch(self, features, chans: list[int], n: int) -> None:
        """The torch path: the features are copied once into one buffer (no pooled copies, no concatenation),
        shifted in place, summed, and its Gram added by BLAS.

        The buffer is (D, rows) when a feature is a conv map (its channel planes are copied as contiguous
        runs; a channels-last (rows, D) copy would be a slow transpose), else (rows, D). Column sums are
        fp32 reductions of the shifted values (a float64 reduction first converts the whole batch to
        float64 in torch: measured slower than the GEMM for small D), accumulated in float64 across
        batches; a finite fp32 sum also proves every value finite (a float64 sum is taken only when it is
        not, to tell NaN/Inf from fp32 overflow).
        """
        work = self.gram_dtype
        # float64 features are shifted and scaled in float64 and only then rounded to the fp32 products
        wide = work == torch.float32 and any(f.dtype == torch.float64 for f in features)
        cols = any(f.dim() == 4 for f in features)  # layout: (D, rows) if True, else (rows, D)
        c = torch.empty((self.dim, n) if cols else (n, self.dim), dtype=torch.float64 if wide else work,
                        device=self.device)
        off = 0
        for f, C in zip(features, chans):
            if cols:
                dst = c[off:off + C]
                if f.dim() == 4:
                    dst.view(C, f.shape[0], f.shape[2], f.shape[3]).copy_(f.permute(1, 0, 2, 3))
                else:
                    dst.view(C, *f.shape[:-1]).copy_(f.movedim(-1, 0))
            else:
                c[:, off:off + C].view(*f.shape).copy_(f)
            off += C
        axis = 1 if cols else 0
        first = self._shift is None
        if first:  # the first batch's mean, as a value of the buffer's dtype: z − k is exact for z near k
            shift = self._first_mean(c, axis, chans, features).to(c.dtype).to(torch.float64)
            # amin + amax: torch.aminmax measured 15x slower on CPU
            scale, step = self._scaling(shift, c.amin(dim=axis), c.amax(dim=axis), work, c.dtype)
        else:
            shift, scale, step = self._shift, self._scale, self._step
        # (c − k)·scale as c·scale − k·scale (see _shifted_gram_kernel); one pass by addcmul, but for (D, rows)
        # (per-row operands) two passes measured 5x faster than addcmul's
        s, neg_ks = (scale, -shift * scale) if wide else step if first else self._step_for(features)
        if cols:
            c.mul_(s[:, None]).add_(neg_ks[:, None])
        else:
            torch.addcmul(neg_ks, c, s, out=c)
        total = self._column_sum(c, axis, chans, features)
        # nothing is changed before the checks pass
        if first:
            self._shift, self._scale, self._step = shift, scale, step
        self._sum += total
        self._gram_add_torch((c.T if cols else c).to(work), work)
        self.count += n

    @staticmethod
    def _scaling(shift, lo, hi, work, applied_in) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """The per-unit scale, from the first batch (lo, hi: its column min and max): the power of two that
        brings max |z − k| into [0.5, 1) (1 for a constant unit), and the step (scale, −k·scale) in ``work``
        for batches shifted in ``work`` (None when the scale does not fit it: float64 features, shifted in
        float64, far beyond the fp32 range).

        fp32 products of unscaled values overflow for features beyond ~1.8e19 (and the fp32 Gram sums sooner);
        scaled ones only if later batches stray ~1e19 times further from k than the first batch did. The
        scaling is exact (powers of two), so for ordinary features every result is bit for bit unchanged."""
        span = torch.maximum(hi.to(torch.float64) - shift, shift - lo.to(torch.float64))
        # float64 features spanning more than the float64 max (values near ±max) overflow the span: any span
        # beyond 2^1000 gets the smallest scale, 2^-1000 (scaled values stay below 2^25)
        span = span.clamp(max=torch.finfo(torch.float64).max)
        # the scale is applied in fp32 arithmetic (fp32 buffer; 16-bit features in the Triton kernel) or in float64
        limit = 126 if applied_in != torch.float64 else 1000
        scale = _pow2_scale(span, -limit, limit)
        step = (scale.to(work), (-shift * scale).to(work))
        if limit > 126 and work == torch.float32 and not bool((step[0].to(torch.float64) == scale).all()):
            return scale, None
        return scale, step

    def _step_for(self, features) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored step for a batch shifted in the work dtype; ValueError when the first batch set a scale
        that dtype cannot hold."""
        if self._step is None:
            raise ValueError(f"{len(features)} feature tensor(s) of dtype {features[0].dtype} after float64 features "
                             "beyond the float32 range: their scale does not fit float32; pass float64 features")
        return self._step

    def _first_mean(self, c: torch.Tensor, axis: int, chans, features) -> torch.Tensor:
        """The column means of the first batch (the shift k), float64 (D,); ValueError naming the model for NaN/Inf.

        float64 values near the float64 max can overflow their column sum, not their mean: then the sum is taken
        of the values scaled by a power of two per column (exact) that brings their max |value| to at most 2^24."""
        total = c.sum(dim=axis)
        if not bool(torch.isfinite(total).all()):
            if c.dtype == torch.float64 and bool(torch.isfinite(c).all()):
                down = _pow2_scale(c.abs().amax(dim=axis), -1000, 1000)
                per = down[:, None] if axis == 1 else down
                return (c * per).sum(dim=axis) / c.shape[axis] / down
            total = self._checked_sum(c.T if axis == 1 else c, chans, features)
        return total.to(torch.float64) / c.shape[axis]

    def _column_sum(self, c: torch.Tensor, axis: int, chans, features) -> torch.Tensor:
        """Σ over rows of the buffer, float64 (D,); ValueError naming the model for NaN/Inf."""
        total = c.sum(dim=axis)
        if not bool(torch.isfinite(total).all()):  # NaN/Inf in the batch, or an fp32 sum that overflowed
            total = self._checked_sum(c.T if axis == 1 else c, chans, features)
        return total.to(torch.float64)

    def _checked_sum(self, z: torch.Tensor, chans, features) -> torch.Tensor:
        """Σ over rows of z (the batch as the statistics see it), float64; ValueError naming the model for NaN/Inf."""
        total = z.sum(dim=0, dtype=torch.float64)
        if not bool(torch.isfinite(total).all()):
            # a NaN/Inf anywhere first: another model's finite values may overflow a column sum first (near the max)
            for model, f in enumerate(features):
                if not bool(torch.isfinite(f).all()):
                    raise ValueError(f"features[{model}] (model {model}) contains NaN or Inf")
            bad = int((~torch.isfinite(total)).nonzero()[0])
            model = next(i for i, end in enumerate(self._model_ends(chans)) if bad < end)
            # finite features that did not survive the rounding to the work dtype, or the shift and scale
            work = self.gram_dtype if self.backend != "triton" else torch.float32
            hint = " or pass gram_dtype=torch.float64 (torch backend)" if work == torch.float32 else ""
            raise ValueError(f"features[{model}] (model {model}) is finite but overflows {work} in the statistics: "
                             f"values beyond its range, or deviations from the first batch's mean ~1e38 times "
                             f"the first batch's; rescale the features (correlation is scale-invariant){hint}")
        return total

    @staticmethod
    def _model_ends(chans):
        ends, acc = [], 0
        for ch in chans:
            acc += ch
            ends.append(acc)
        return ends

    def _gram_add_torch(self, c: torch.Tensor, work: torch.dtype) -> None:
        """K += cᵀc for the shifted batch c (upper blocks; the cross block and the squares with blocks="cross"),
        through the fp32 buffers unless work is float64."""
        if work == torch.float64:
            self._add_products(self._gram, self._diag, c)
            return
        if self._pending is None:
            self._pending = torch.zeros_like(self._gram, dtype=torch.float32)
            self._pending_diag = torch.zeros_like(self._diag, dtype=torch.float32) if self._cross else None
        self._add_products(self._pending, self._pending_diag, c)
        self._pending_batches += 1
        if self._pending_batches >= _FLUSH_BATCHES:
            self._flush()

    def _add_products(self, gram: torch.Tensor, diag: torch.Tensor | None, c: torch.Tensor) -> None:
        if self._cross:
            split = self.num_features[0]
            gram.addmm_(c[:, :split].T, c[:, split:])
            diag += c.square().sum(dim=0)
        elif not (gram.dtype == torch.float32 and _use_syrk(c) and _syrk_upper_add_(gram, c)):
            _sym_gram_add_(gram, c)

    def _flush(self) -> None:
        if self._pending is not None and self._pending_batches:
            self._gram += self._pending
            self._pending.zero_()
            if self._cross:
                self._diag += self._pending_diag
                self._pending_diag.zero_()
            self._pending_batches = 0

    # ----------------------------------------------------------------- results

    def _require_rows(self) -> None:
        if self.count == 0:
            raise ValueError("no rows seen yet: call update() with at least one non-empty batch")

    def _full_gram(self) -> torch.Tensor:
        """Σ (z − k)(z − k)ᵀ·scale scaleᵀ, float64, both triangles (from the upper one, which every path keeps)."""
        self._flush()
        return _mirror_upper_triangle(self._gram)

    def _cross_moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """blocks="cross": (the (C_0, C_1) block of the scaled second moments, their (D,) diagonal), float64."""
        self._flush()
        if self._cross:
            return self._gram, self._diag
        split = self.num_features[0]  # the Triton path keeps every (upper) block
        return self._gram[:split, split:], self._gram.diagonal()

    def _scaled_mean(self) -> torch.Tensor:
        """S/count = (mean − k)·scale, float64, after checking that the accumulators are finite.

        An update never syncs to look at K: products that overflowed (later batches ~1e19 times further
        from the shift than the first batch, for fp32 products) are found here, and raise."""
        self._require_rows()
        self._flush()
        # one sum (NaN and ±inf propagate; no D² mask): finite entries whose sum overflows float64 would be
        # products near the float64 max, overflowing all the same
        if not bool(torch.isfinite(self._gram.sum() + self._sum.sum()
                                   + (self._diag.sum() if self._cross else 0.0))):
            work = self.gram_dtype if self.backend != "triton" else torch.float32
            hint = ", or pass gram_dtype=torch.float64 (torch backend)" if work == torch.float32 else ""
            raise ValueError(f"the accumulated second moments overflowed ({work} products): later batches strayed "
                             "~1e19 times further from the first batch's mean than the first batch did (its spread "
                             "sets the scale); start with a representative batch, rescale the features "
                             f"(correlation is scale-invariant){hint}")
        return self._sum / self.count

    @staticmethod
    def _representable(t: torch.Tensor, what: str, dtype: torch.dtype) -> torch.Tensor:
        if not bool(torch.isfinite(t).all()):
            hint = "ask for dtype=torch.float64" if dtype != torch.float64 else "correlation() is still defined"
            raise ValueError(f"the {what} of these features exceeds the range of {dtype}: {hint}")
        return t

    def mean(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(D,) mean of the features (float32 by default; pass float64 for large means).

        Raises ValueError when it does not fit ``dtype`` (float64 features); TypeError for a ``dtype`` that is not
        a floating torch.dtype."""
        dtype = check_float_dtype(dtype, "dtype")
        self._require_rows()
        m = self._sum / self.count
        mean = self._shift + m / self._scale  # unscaling by a power of two: exact
        bad = ~torch.isfinite(mean)
        if bool(bad.any()):  # the deviation from k alone may exceed the float64 max (k near +max, later rows near
            # −max) while the mean does not: add the halves (exact but for subnormals), then double
            half = (self._shift * 0.5 + m / (2.0 * self._scale)) * 2.0
            mean = torch.where(bad, half, mean)
        return self._representable(mean.to(dtype), "mean", dtype)

    def covariance(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(D, D) population covariance E[(z − μ)(z − μ)ᵀ] (float32 by default); (C_0, C_1) with blocks="cross".

        Raises ValueError when it does not fit ``dtype`` (features beyond ~1.8e19 for float32), or when
        the accumulated moments overflowed (see :meth:`correlation`); TypeError for a ``dtype`` that is not a
        floating torch.dtype."""
        dtype = check_float_dtype(dtype, "dtype")
        m = self._scaled_mean()
        s = self._scale  # powers of two: unscaling is exact
        if self.blocks == "cross":
            split = self.num_features[0]
            gram = self._cross_moments()[0] / self.count
            cov = (gram - torch.outer(m[:split], m[split:])) / s[:split, None] / s[None, split:]
        else:
            cov = self._full_gram().div_(self.count).sub_(torch.outer(m, m)).div_(s[:, None]).div_(s[None, :])
        return self._representable(cov.to(dtype), "covariance", dtype)

    def correlation(self, eps: float = 1e-8) -> torch.Tensor:
        """(D, D) float32 Pearson correlation; dead units (σ ≤ eps): 0 with others, 1 on the diagonal. With
        blocks="cross": the (C_0, C_1) block between the two models' units.

        Raises ValueError when the accumulated moments overflowed (later batches far from the first
        batch's mean compared with the first batch's spread, see the class docstring), rather than
        return a matrix of NaN."""
        eps = _check_eps(eps)
        m = self._scaled_mean()
        # moments of (z − k)·scale: the correlation is the same; the scaled σ is compared with eps·scale
        if self.blocks == "cross":
            gram, diag = self._cross_moments()
            return _cross_correlation_from_moments(m, gram, diag, self.count, eps * self._scale,
                                                   self.num_features[0]).to(torch.float32)
        if self.backend == "triton":
            return _correlation_from_moments_triton(m, self._gram, self.count, eps * self._scale, upper=True)
        return correlation_from_moments_torch(m, self._full_gram(), self.count, eps * self._scale).to(torch.float32)

    def __repr__(self) -> str:
        return (f"ActivationStats(num_features={self.num_features or self.dim}, count={self.count}, "
                f"device={self.device}, backend={self.backend})")


@contextlib.contextmanager
def activation_stats_hooks(modules_per_model: Sequence[torch.nn.Module], stats: ActivationStats, *,
                           input: bool = False, channel_dim: int | None = None,
                           label: str | None = None) -> Iterator[ActivationStats]:
    """Feed ``stats`` from forward hooks: one module per model, its output (or ``input[0]`` if input=True).

    ``channel_dim``: where the units are, when it is not the layout :meth:`ActivationStats.update`
    assumes ((N, C), (N, T, C) or (N, C, H, W)); e.g. 1 for a Conv1d's (N, C, L) output. That dim is
    moved last and the rest pooled. ``label``: what the hooks' own errors start with (e.g. which layer
    of which group they watch), so that an error raised inside a forward pass says where it comes from.

    Each hook keeps its model's feature of the current batch (detached); when all M have fired,
    ``stats.update(*features)`` runs and the buffers are cleared. Run the models on the same batch
    in turn (model 0, model 1, ... or any order) inside the ``with`` block. The hooks are removed
    on exit, also on error.

    Raises:
        TypeError: a module that is not an ``nn.Module``; a hooked value that is not a tensor; input not a bool,
            channel_dim not an int.
        RuntimeError: a model's module fires twice before all the others fired once (batches out
            of step); or, on a clean exit, a batch some models ran and others did not.
    """
    input = check_bool(input, "input")
    if channel_dim is not None:
        channel_dim = check_int(channel_dim, "channel_dim")
    if label is not None and not isinstance(label, str):
        raise TypeError(f"label must be a str or None, got {type(label).__name__}")
    where = "" if label is None else f"{label}: "
    modules = list(modules_per_model)
    if not modules:
        raise ValueError("modules_per_model must hold one module per model, got none")
    for i, mod in enumerate(modules):
        if not isinstance(mod, torch.nn.Module):
            raise TypeError(f"modules_per_model[{i}] must be a torch.nn.Module, got {type(mod).__name__}")
    if not isinstance(stats, ActivationStats):
        raise TypeError(f"stats must be an ActivationStats, got {type(stats).__name__}")
    buffered: list[torch.Tensor | None] = [None] * len(modules)
    what = "input[0]" if input else "output"

    def make_hook(i: int):
        def hook(module, args, output):
            value = (args[0] if args else None) if input else output
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{where}modules_per_model[{i}]'s {what} must be a tensor, got "
                                f"{type(value).__name__}")
            if buffered[i] is not None:
                raise RuntimeError(f"{where}modules_per_model[{i}] (model {i}) fired twice before every model ran the "
                                   "batch once: run the models on the same batch in turn")
            value = value.detach()
            if channel_dim is not None:
                if not -value.dim() <= channel_dim < value.dim():
                    raise ValueError(f"{where}channel_dim {channel_dim} is out of range for modules_per_model[{i}]'s "
                                     f"{what} of shape {tuple(value.shape)}")
                value = value.movedim(channel_dim, -1).reshape(-1, value.shape[channel_dim])
            buffered[i] = value
            if all(b is not None for b in buffered):
                batch = list(buffered)
                buffered[:] = [None] * len(buffered)
                stats.update(*batch)
        return hook

    handles = [mod.register_forward_hook(make_hook(i)) for i, mod in enumerate(modules)]
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()
    missing = [i for i, b in enumerate(buffered) if b is None]
    if len(missing) != len(buffered):
        raise RuntimeError(f"{where}the last batch ran through some models but not models {missing}: it was not "
                           f"counted")


def dual_similarity(s_weight: torch.Tensor, s_act: torch.Tensor, w: float = 0.5) -> torch.Tensor:
    """The dual-space similarity S = w·s_weight + (1 − w)·s_act.

    Args:
        s_weight, s_act: float tensors of the same shape, on the same device.
        w: the weight of the weight-space similarity, in [0, 1].

    Returns:
        A new tensor of that shape, in the promoted dtype of the two. At w = 1 (w = 0) it is exactly
        ``s_weight`` (``s_act``): the term weighted 0 takes no part, so its ±inf entries do not turn into NaN.

    Raises:
        ValueError: w outside [0, 1], shapes or devices that differ. TypeError: non-float inputs.
    """
    s_weight = check_float_tensor(s_weight, "s_weight")
    s_act = check_float_tensor(s_act, "s_act")
    w = check_real(w, "w", low=0.0, high=1.0)
    if s_weight.shape != s_act.shape:
        raise ValueError(f"s_weight and s_act must have the same shape, got {tuple(s_weight.shape)} and "
                         f"{tuple(s_act.shape)}")
    if s_weight.device != s_act.device:
        raise ValueError(f"s_weight and s_act must be on the same device, got {s_weight.device} and {s_act.device}")
    dtype = torch.promote_types(s_weight.dtype, s_act.dtype)
    if w == 1.0:  # a term weighted 0 takes no part: its -inf (forbidden pairs) would give NaN as -inf * 0
        return s_weight.to(dtype, copy=True)
    if w == 0.0:
        return s_act.to(dtype, copy=True)
    return torch.add(s_act.to(dtype) * (1.0 - w), s_weight.to(dtype), alpha=w)


def group_similarity(s_cross: torch.Tensor, group_size: int, *,
                     backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Score every pair of groups (heads) by its best within-group matching: one batched assignment solve.

    Args:
        s_cross: (n, n) similarity of model A's units (rows) with model B's (columns); n = g·group_size,
            groups are contiguous blocks of ``group_size`` units. Float, no NaN / +inf (−inf forbids a pair).
        group_size: s ≥ 1, dividing n.
        backend: the assignment solver's backend (``"native"``, ``"torch"``, None: fastest), passed to
            :func:`merging_kernels.linear_sum_assignment`.

    Returns:
        ``(scores, perms)``: scores (g, g), scores[a, b] = max over permutations π of
        Σ_i S[a·s + i, b·s + π(i)] (float64 for float64 input, else float32); perms (g, g, s) int64,
        perms[a, b] = that π (B's unit b·s + perms[a, b, i] matches A's unit a·s + i).
        All g² problems of size s × s go to ``linear_sum_assignment(blocks, maximize=True)`` at once.

    Raises:
        ValueError: s_cross not square 2-D, group_size not dividing n, NaN/+inf entries, an infeasible block,
            a meta tensor (no data).
    """
    from .linear_assignment import INVALID_MESSAGE, linear_sum_assignment

    s_cross = check_has_data(check_float_tensor(s_cross, "s_cross"), "s_cross")
    if s_cross.dim() != 2 or s_cross.shape[0] != s_cross.shape[1]:
        raise ValueError(f"s_cross must be a square (n, n) matrix, got shape {tuple(s_cross.shape)}")
    s = check_int(group_size, "group_size", low=1)
    n = s_cross.shape[0]
    if n % s:
        raise ValueError(f"group_size ({s}) must divide the number of units ({n})")
    g = n // s
    out_dtype = torch.float64 if s_cross.dtype == torch.float64 else torch.float32
    if g == 0:
        return (torch.zeros((0, 0), dtype=out_dtype, device=s_cross.device),
                torch.zeros((0, 0, s), dtype=torch.int64, device=s_cross.device))
    # blocks[a·g + b] = S[a-th group of A, b-th group of B]
    blocks = s_cross.reshape(g, s, g, s).permute(0, 2, 1, 3).reshape(g * g, s, s)
    if blocks.dtype not in (torch.float32, torch.float64):
        blocks = blocks.to(torch.float32)
    try:
        _, cols = linear_sum_assignment(blocks, maximize=True, backend=backend)
    except ValueError as exc:  # the solver checks the entries (no separate pass over s_cross here)
        what = "s_cross contains NaN or +inf" if INVALID_MESSAGE in str(exc) else "s_cross"
        raise ValueError(f"group_similarity: {what}: {exc} (problem index = a·g + b for groups a of A, b of B)") \
            from None
    scores = blocks.to(torch.float64).gather(2, cols[:, :, None]).sum(dim=(1, 2))
    return scores.reshape(g, g).to(out_dtype), cols.reshape(g, g, s)


__all__ = [
    "SIMILARITY",
    "ActivationStats",
    "activation_correlation_torch",
    "activation_moments_torch",
    "activation_stats_hooks",
    "correlation_from_moments",
    "correlation_from_moments_torch",
    "correlation_matrix",
    "correlation_matrix_torch",
    "dual_similarity",
    "dual_similarity_torch",
    "group_similarity",
    "group_similarity_torch",
]
