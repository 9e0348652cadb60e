"""ZipIt-style greedy zip: match 2n units of two models (and within each model) into n merged units.

The op behind MuDSC's and ZipIt's ``zip`` mode. Given the (2n, 2n) similarity
of the concatenated units [A's, B's], it repeatedly merges the most similar
remaining pair (within or across models); the merged unit's similarity to
every other unit becomes the minimum of its members' times ``factor``. The
result is a merge matrix M (n, 2n) and an unmerge matrix U (2n, n).

Layout: the reference :func:`greedy_zip_torch` (a full argmax per step,
O(n³), plain and readable: the tests' oracle) and :func:`greedy_zip`, the
fast path (row maxima kept up to date, O(n²) in all), which is sequential by
nature and runs on the CPU in numpy (lower per-step overhead than torch for
2n-long vector steps). Both pick the first maximum in row-major order and both
compute in the same dtype (:func:`_compute_dtype`: float64 for float64 input,
float32 otherwise), so they agree exactly, ties included.
"""

from __future__ import annotations

import numpy as np
import torch

from .._validation import check_float_tensor, check_has_data, check_real


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
    m = sim.shape[0]
    off_diagonal = sim[~torch.eye(m, dtype=torch.bool, device=sim.device)]
    if not bool(torch.isfinite(off_diagonal).all()):
        raise ValueError("sim must be finite off the diagonal (NaN or ±inf found)")
    alpha = check_real(alpha, "alpha")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1) for a zip (a merged unit may come from one model only), "
                         f"got {alpha}")
    return alpha, check_real(factor, "factor", low=0.0, high=1.0)  # > 1 would reward re-merging, < 0 flip the order


def _matrices(pairs, m: int, alpha: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge (n, 2n) and unmerge (2n, n) matrices from the merged pairs (i absorbs j)."""
    n = m // 2
    owner = np.arange(m)
    for i, j in pairs:
        owner[owner == j] = i
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


def greedy_zip(sim: torch.Tensor, alpha: float = 0.5, factor: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
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

    Keeps each row's maximum, so a step costs O(n) plus the rows whose maximum
    it invalidated (O(n²) in all, against O(n³) for a full argmax per step).
    The loop is sequential by nature and runs on the CPU in numpy (lower
    per-call overhead than torch for these 2n-long vector steps).
    """
    alpha, factor = _check(sim, alpha, factor)
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
    return _matrices(pairs, m, alpha, sim.device)


__all__ = ["greedy_zip", "greedy_zip_torch"]
