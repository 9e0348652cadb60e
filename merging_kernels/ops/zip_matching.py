"""ZipIt-style greedy zip: match 2n units of two models (and within each model) into n merged units.

The op behind MuDSC's and ZipIt's ``zip`` mode. Given the (2n, 2n) similarity
of the concatenated units [A's, B's], it repeatedly merges the most similar
remaining pair (within or across models); the merged unit's similarity to
every other unit becomes the minimum of its members' times ``factor``. The
result is a merge matrix M (n, 2n) and an unmerge matrix U (2n, n).

Layout: the reference :func:`greedy_zip_torch` (a full argmax per step,
O(n³), plain and readable: the tests' oracle), then the fast paths, which keep
each row's first maximum up to date (O(n²) in all): ``native``
(csrc/cpu/zip_matching.cpp, the default) and a numpy version of the same
algorithm, used where ``_C`` is not built (sequential steps of 2n-long vectors:
numpy's per-call overhead is lower than torch's). All three pick the first
maximum in row-major order and compute in the same dtype
(:func:`_compute_dtype`: float64 for float64 input, float32 otherwise), so they
agree exactly, ties included. The zip is sequential by nature: it runs on the
CPU whatever ``sim``'s device; the matrices come back on that device.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from .._dispatch import BACKENDS, ENV_VAR, OpBackends, resolve_backend
from .._native import native_available, native_module
from .._validation import check_float_tensor, check_has_data, check_real

ZIP_MATCHING = OpBackends("zip_matching", cpu=("native",))


def _compute_dtype(sim: torch.Tensor) -> torch.dtype:
    """The dtype both paths compute in: the input's precision, float32 at least.

    float64 stays float64 (rounding it to float32 can flip close pairs, and values beyond
    ±3.4e38 would become ±inf); float16 and bfloat16 go to float32 exactly (numpy has no
    bfloat16, and float32 arithmetic on their values is at least as accurate). float32
    stays float32 rather than float64: the fast path is ~15-20% slower in float64.
    """
    return torch.float64 if sim.dtype == torch.float64 else torch.float32


def _check(sim: torch.Tensor, alpha: float, factor: float) -> tuple[float, float]:
    """Validates the arguments; returns alpha and factor as floats."""
    # floats only: ints above 2**24 would round in float32; complex would lose its imaginary part
    check_has_data(check_float_tensor(sim, "sim"), "sim")
    if sim.dim() != 2 or sim.shape[0] != sim.shape[1] or sim.shape[0] % 2 or sim.shape[0] == 0:
        raise ValueError(f"sim must be (2n, 2n) with n >= 1, got {tuple(sim.shape)}")
    # counted, not masked: boolean indexing of the off-diagonal copied 4M entries in 75 ms at 2n = 2048
    if not bool(torch.isfinite(sim).all()) and int((~torch.isfinite(sim)).sum()) > int(
            (~torch.isfinite(sim.diagonal())).sum()):
        raise ValueError("sim must be finite off the diagonal (NaN or ±inf found)")
    alpha = check_real(alpha, "alpha")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1) for a zip (a merged unit may come from one model only), "
                         f"got {alpha}")
    return alpha, check_real(factor, "factor", low=0.0, high=1.0)  # > 1 would reward re-merging, < 0 flip the order


def _matrices(pairs, m: int, alpha: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge (n, 2n) and unmerge (2n, n) matrices from the merged pairs (i absorbs j, in order)."""
    n = m // 2
    # j was a cluster's root when i absorbed it: each unit's final cluster is the root its parents lead to
    owner = np.arange(m)
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    owner[pairs[:, 1]] = pairs[:, 0]
    while True:  # pointer jumping: O(m log m)
        jumped = owner[owner]
        if np.array_equal(jumped, owner):
            break
        owner = jumped
    cluster = torch.from_numpy(np.searchsorted(np.unique(owner), owner)).to(device)
    u = torch.zeros(m, n, device=device)
    u[torch.arange(m, device=device), cluster] = 1.0
    weight = torch.cat([torch.full((n,), float(alpha), device=device),
                        torch.full((n,), 1.0 - float(alpha), device=device)])
    merge = u.T * weight
    merge = merge / merge.sum(1, keepdim=True).clamp_min(1e-30)
    return merge, u


def greedy_zip_torch(sim: torch.Tensor, alpha: float = 0.5, factor: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: a full argmax over the remaining (2n, 2n) similarities at every step (O(n³)).

    Same arguments, result and dtype rules as :func:`greedy_zip`.
    """
    alpha, factor = _check(sim, alpha, factor)
    m = sim.shape[0]
    dtype = _compute_dtype(sim)
    s = sim.detach().to(device="cpu", dtype=dtype).clone()
    s.fill_diagonal_(float("-inf"))
    scale = torch.tensor(factor, dtype=dtype)  # factor rounded to the compute dtype, as in the fast path
    pairs = []
    for _ in range(m // 2):
        i, j = divmod(int(torch.argmax(s)), m)  # the first maximum in row-major order
        merged = torch.minimum(s[i], s[j])
        merged = torch.where(torch.isneginf(merged), merged, merged * scale)  # used units stay -inf (-inf * 0 is NaN)
        merged[i] = merged[j] = float("-inf")
        s[i], s[:, i] = merged, merged
        s[j], s[:, j] = float("-inf"), float("-inf")
        pairs.append((i, j))
    return _matrices(pairs, m, alpha, sim.device)


def _greedy_zip_native(sim: torch.Tensor, factor: float) -> np.ndarray:
    """The pairs of csrc/cpu/zip_matching.cpp, on a float32/float64 CPU copy of ``sim``."""
    m = sim.shape[0]
    s = torch.empty((m, m), dtype=_compute_dtype(sim))
    s.copy_(sim.detach())  # the kernel works in place: always our own contiguous copy
    s.fill_diagonal_(float("-inf"))
    pairs = torch.empty((m // 2, 2), dtype=torch.int64)
    native_module("cpu").greedy_zip(s.data_ptr(), m, s.dtype == torch.float64, float(factor), pairs.data_ptr())
    return pairs.numpy()


def _greedy_zip_numpy(sim: torch.Tensor, factor: float) -> list[tuple[int, int]]:
    """The same algorithm as the native kernel in numpy, for installs without ``_C``."""
    m = sim.shape[0]
    n = m // 2
    s = sim.detach().to(device="cpu", dtype=_compute_dtype(sim)).numpy().copy()  # C-contiguous, own memory
    np.fill_diagonal(s, -np.inf)
    scale = s.dtype.type(factor)
    rows = np.arange(m)
    rowarg = s.argmax(1)
    rowmax = s[rows, rowarg]
    pairs = []
    for _ in range(n):
        i = int(rowmax.argmax())
        j = int(rowarg[i])
        merged = np.minimum(s[i], s[j])
        np.multiply(merged, scale, out=merged, where=merged != -np.inf)  # used units stay -inf (-inf * 0 is NaN)
        merged[i] = merged[j] = -np.inf
        s[i] = merged
        s[:, i] = merged
        s[j] = -np.inf
        s[:, j] = -np.inf
        pairs.append((i, j))
        rowmax[j] = -np.inf
        stale = np.flatnonzero((rowarg == i) | (rowarg == j))
        stale = stale[stale != j]
        if i not in stale:
            stale = np.append(stale, i)
        sub = s[stale]
        arg = sub.argmax(1)
        rowarg[stale] = arg
        rowmax[stale] = sub[np.arange(stale.size), arg]
        # rowarg stays each row's FIRST maximum: column i also takes over a tie left of the kept one
        # (reachable: with negative similarities, min * factor can rise to equal the row's maximum)
        up = (merged > rowmax) | ((merged == rowmax) & (rowarg > i) & (merged != -np.inf))
        rowmax[up] = merged[up]
        rowarg[up] = i
    return pairs


def _zip_backend(backend) -> str:
    """``backend`` resolved for the CPU, where the zip runs; without ``_C`` the default is the numpy path
    (the same O(n²) algorithm; the O(n³) reference would be ~40x slower at 2n = 2048). The default includes
    an environment variable naming a backend the zip does not implement (``triton``): ignored, as for every op."""
    env = os.environ.get(ENV_VAR, "").strip()
    if (backend is None and (not env or (env in BACKENDS and env not in ZIP_MATCHING.implemented("cpu")))
            and not native_available("cpu")):
        return "numpy"
    return resolve_backend(ZIP_MATCHING, backend, "cpu")


def greedy_zip(sim: torch.Tensor, alpha: float = 0.5, factor: float = 0.5, *,
               backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ZipIt-style greedy matching of 2n units (A's then B's) into n merged units.

    ``sim`` (2n, 2n): similarities, a float16, bfloat16, float32 or float64 tensor
    on any device (TypeError otherwise); it must be finite off the diagonal
    (ValueError for NaN or ±inf there); the diagonal is ignored (it may hold
    anything, NaN and inf included). ``alpha`` in (0, 1), ``factor`` in [0, 1]:
    real numbers (0-d tensors and numpy scalars too; TypeError or ValueError
    naming the argument otherwise). Repeatedly the most
    similar remaining pair is merged (the first maximum in row-major order); the
    merged unit's similarity to every other is the minimum of its members' times
    ``factor``. Returns the merge matrix M (n, 2n) (each row averages its
    members, A's weighted by α and B's by 1 − α, normalized) and the unmerge
    matrix U (2n, n) (U[u, c] = 1 when u belongs to merged unit c), both float32
    on ``sim``'s device.

    Precision: float64 input is matched in float64, every other dtype in float32
    (float16/bfloat16 values convert exactly); ``factor`` is rounded to that
    dtype. :func:`greedy_zip_torch` follows the same rule, so the two agree
    exactly.

    Keeps each row's first maximum, so a step costs O(n) plus the rows whose maximum
    it invalidated (O(n²) in all, against O(n³) for a full argmax per step).
    ``backend``: ``"native"`` (C++, the default), ``"torch"`` (the reference) or
    None; without ``_C`` the default is a numpy version of the native algorithm.
    The zip runs on the CPU whatever ``sim``'s device (it is sequential).
    """
    alpha, factor = _check(sim, alpha, factor)
    chosen = _zip_backend(backend)
    if chosen == "torch":
        return greedy_zip_torch(sim, alpha, factor)
    pairs = (_greedy_zip_native if chosen == "native" else _greedy_zip_numpy)(sim, factor)
    return _matrices(pairs, sim.shape[0], alpha, sim.device)


__all__ = ["ZIP_MATCHING", "greedy_zip", "greedy_zip_torch"]
