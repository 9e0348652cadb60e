"""Exact linear assignment: scipy's ``linear_sum_assignment`` contract, batched, with an optimality certificate.

For a cost matrix C (n × m) the problem is to pick k = min(n, m) entries, no two in
one row or one column, of least total cost (greatest with ``maximize``). +inf marks
a forbidden pair (-inf when maximizing); NaN, and -inf (+inf when maximizing), are
invalid. A problem with no assignment of finite cost is infeasible.

Every solver here is exact and also returns dual potentials (u, v): with

    u_i + v_j ≤ c_ij for every pair, with equality on the assignment,

and, for rectangular problems, the duals of the larger side ≤ 0 and = 0 on its
unassigned entries (≥ / ≤ swapped when maximizing), the assignment is optimal:
any other assignment costs at least Σu + Σv, which this one attains.
:func:`check_assignment` verifies exactly that.

Layout of this module: the torch reference (the oracle), the native calls (C++ on
CPU: csrc/cpu/linear_assignment.cpp; CUDA: csrc/cuda/linear_assignment.cu), then
the public functions.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
import torch

from .._dispatch import OpBackends, resolve_backend
from .._native import native_module
from .._validation import check_has_data, check_real

LINEAR_ASSIGNMENT = OpBackends("linear_assignment", cpu=("native",), cuda=("native",))

INVALID_MESSAGE = "matrix contains invalid numeric entries"  # scipy's words
INFEASIBLE_MESSAGE = "cost matrix is infeasible"
STATUS_OUT_OF_RANGE = 3  # a native solve met a finite |cost| beyond the safe magnitude (see _range_exponents)
# rows and columns are int32 in the native solvers, whose loops step by up to 1024 lanes past the last one
MAX_DIMENSION = 2**31 - 1025
# log2 of the largest finite |cost| the native solvers take (team::safe_magnitude in csrc/common/lsa_team.h)
SAFE_MAGNITUDE_EXP = {torch.float64: 1000, torch.float32: 100}
# log2 of the smallest largest finite |cost| a float32 solve of float64 costs takes as it is (see _range_exponents).
# Solves in the costs' own dtype need no such bound: their entries are exact, and sums and differences of
# subnormals are exact too (checked against scipy down to 1e-322 in float64 and 1e-43 in float32)
SMALL_MAGNITUDE_EXP = -60

# native method switch (tests use it to exercise each CPU path): 0 auto, 1 dense LAPJV, 2 sparse-then-certify
METHOD_AUTO, METHOD_DENSE, METHOD_SPARSE = 0, 1, 2


# --------------------------------------------------------------------------- torch reference


def linear_sum_assignment_torch(cost: torch.Tensor, maximize: bool = False, *,
                                compute_dtype: torch.dtype = torch.float64):
    """One problem (n × m) solved by shortest augmenting paths with potentials; the oracle of the tests.

    The algorithm of Crouse (2016), which scipy implements: rows are added one
    at a time; for each, Dijkstra's algorithm over reduced costs
    c_ij − u_i − v_j ≥ 0 finds the cheapest path to a free column, the
    potentials are updated so that reduced costs stay ≥ 0 and the path's are
    0, and the path is flipped. Works on the orientation with n ≤ m (the
    transpose otherwise). Returns ``(rows, cols, u, v)``: int64 indices with
    rows ascending, and the duals in ``compute_dtype``. Raises ValueError on
    NaN / wrong-signed infinities and on infeasible problems.
    """
    c = cost.to(compute_dtype)
    if maximize:
        c = -c
    if bool(torch.isnan(c).any()) or bool((c == -torch.inf).any()):
        raise ValueError(INVALID_MESSAGE)
    transpose = c.shape[0] > c.shape[1]
    if transpose:
        c = c.T
    n, m = c.shape
    device = c.device
    inf = torch.tensor(torch.inf, dtype=compute_dtype, device=device)
    u = torch.zeros(n, dtype=compute_dtype, device=device)
    v = torch.zeros(m, dtype=compute_dtype, device=device)
    row4col = torch.full((m,), -1, dtype=torch.int64, device=device)
    col4row = torch.full((n,), -1, dtype=torch.int64, device=device)
    for cur in range(n):
        shortest = torch.full((m,), torch.inf, dtype=compute_dtype, device=device)
        path = torch.full((m,), -1, dtype=torch.int64, device=device)
        scanned_cols = torch.zeros(m, dtype=torch.bool, device=device)
        scanned_rows = torch.zeros(n, dtype=torch.bool, device=device)
        i, min_val, sink = cur, 0.0, -1
        while sink < 0:
            scanned_rows[i] = True
            reduced = min_val + c[i] - u[i] - v
            better = ~scanned_cols & (reduced < shortest)
            path = torch.where(better, i, path)
            shortest = torch.where(better, reduced, shortest)
            remaining = torch.where(scanned_cols, inf, shortest)
            lowest = remaining.min()
            if not bool(torch.isfinite(lowest)):
                raise ValueError(INFEASIBLE_MESSAGE)
            # among the closest columns prefer a free one (ends the search sooner)
            at_min = remaining == lowest
            free_at_min = at_min & (row4col < 0)
            j = int((free_at_min if bool(free_at_min.any()) else at_min).nonzero()[0])
            min_val = float(lowest)
            scanned_cols[j] = True
            if int(row4col[j]) < 0:
                sink = j
            else:
                i = int(row4col[j])
        # potentials: the new row's u grows by the path length; scanned rows and columns keep their
        # reduced costs >= 0 and the path's at 0
        u[cur] += min_val
        others = scanned_rows.clone()
        others[cur] = False
        rows_scanned = others.nonzero().flatten()
        u[rows_scanned] += min_val - shortest[col4row[rows_scanned]]
        v[scanned_cols] -= min_val - shortest[scanned_cols]
        # flip the path
        j = sink
        while True:
            i = int(path[j])
            row4col[j] = i
            j, col4row[i] = int(col4row[i]), j
            if i == cur:
                break
    if transpose:  # solved rows are the caller's columns
        order = torch.argsort(col4row)
        rows, cols = col4row[order], order
        u, v = v, u
    else:
        rows, cols = torch.arange(n, device=device), col4row
    if maximize:
        u, v = -u, -v
    return rows, cols, u, v


def _solve_torch(cost3: torch.Tensor, maximize: bool, compute_dtype: torch.dtype, batched: bool):
    results = []
    for b in range(cost3.shape[0]):
        try:
            results.append(linear_sum_assignment_torch(cost3[b], maximize, compute_dtype=compute_dtype))
        except ValueError as exc:
            raise ValueError(_where(str(exc), b, batched)) from None
    return tuple(torch.stack([r[t] for r in results]) for t in range(4))


# --------------------------------------------------------------------------- native (C++ / CUDA)
# _C receives addresses of contiguous tensors (float32 or float64 costs; int64 indices; duals in the
# compute dtype; int32 status per problem: 0 ok, 1 infeasible, 2 invalid entries, 3 out of range) and no torch
# objects.


def _outputs(cost3: torch.Tensor, compute_dtype: torch.dtype, want_duals: bool):
    b, n, m = cost3.shape
    k = min(n, m)
    device = cost3.device
    rows = torch.empty((b, k), dtype=torch.int64, device=device)
    cols = torch.empty((b, k), dtype=torch.int64, device=device)
    u = torch.empty((b, n), dtype=compute_dtype, device=device) if want_duals else None
    v = torch.empty((b, m), dtype=compute_dtype, device=device) if want_duals else None
    status = torch.empty((b,), dtype=torch.int32, device=device)
    return rows, cols, u, v, status


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _solve_native_cpu(cost3: torch.Tensor, maximize: bool, compute_dtype: torch.dtype, want_duals: bool,
                      method: int = METHOD_AUTO, num_threads: int = 0, warm_start: torch.Tensor | None = None):
    """Runs _C.lsa_solve_cpu; returns (rows, cols, u, v, status, stats of a single solve). ``warm_start``: (B, m)
    contiguous column potentials in ``compute_dtype`` on the CPU, or None."""
    rows, cols, u, v, status = _outputs(cost3, compute_dtype, want_duals)
    b, n, m = cost3.shape
    stats = native_module("cpu").lsa_solve_cpu(
        cost3.data_ptr(), 1 if cost3.dtype == torch.float64 else 0, b, n, m, bool(maximize),
        compute_dtype == torch.float32, int(num_threads), int(method), rows.data_ptr(), cols.data_ptr(), _ptr(u),
        _ptr(v), status.data_ptr(), _ptr(warm_start))
    return rows, cols, u, v, status, stats


def _solve_team_serial(cost3: torch.Tensor, maximize: bool, compute_dtype: torch.dtype, want_duals: bool):
    """The CUDA kernels' team algorithm run by one CPU thread (_C.lsa_solve_team_serial): lets tests check that
    code without a GPU. Same returns as :func:`_solve_native_cpu`."""
    rows, cols, u, v, status = _outputs(cost3, compute_dtype, want_duals)
    b, n, m = cost3.shape
    stats = native_module("cpu").lsa_solve_team_serial(
        cost3.data_ptr(), 1 if cost3.dtype == torch.float64 else 0, b, n, m, bool(maximize),
        compute_dtype == torch.float32, 1, METHOD_AUTO, rows.data_ptr(), cols.data_ptr(), _ptr(u), _ptr(v),
        status.data_ptr())
    return rows, cols, u, v, status, stats


def _solve_team_threads(cost3: torch.Tensor, maximize: bool, compute_dtype: torch.dtype, want_duals: bool,
                        lanes: int):
    """The CUDA kernels' team algorithm run by a team of ``lanes`` CPU threads per problem
    (_C.lsa_solve_team_threads). Test-only: the serial team never exercises the kernels' multi-lane logic
    (column striding, cross-lane reductions, lane-0 updates between barriers, lanes with no column), and no
    GPU is needed for this. Bit for bit :func:`_solve_team_serial`'s results; same returns."""
    rows, cols, u, v, status = _outputs(cost3, compute_dtype, want_duals)
    b, n, m = cost3.shape
    stats = native_module("cpu").lsa_solve_team_threads(
        cost3.data_ptr(), 1 if cost3.dtype == torch.float64 else 0, b, n, m, bool(maximize),
        compute_dtype == torch.float32, 1, METHOD_AUTO, rows.data_ptr(), cols.data_ptr(), _ptr(u), _ptr(v),
        status.data_ptr(), int(lanes))
    return rows, cols, u, v, status, stats


def _solve_native_cuda(cost3: torch.Tensor, maximize: bool, compute_dtype: torch.dtype, want_duals: bool):
    """Runs _C.lsa_solve_cuda on the current stream; returns (rows, cols, u, v, status)."""
    mod = native_module("cuda")
    rows, cols, u, v, status = _outputs(cost3, compute_dtype, want_duals)
    b, n, m = cost3.shape
    with torch.cuda.device(cost3.device):
        f32 = compute_dtype == torch.float32
        dtype_code = 1 if cost3.dtype == torch.float64 else 0
        nbytes = int(mod.lsa_cuda_workspace_bytes(dtype_code, b, n, m, bool(maximize), f32))
        workspace = torch.empty((max(nbytes, 1),), dtype=torch.uint8, device=cost3.device)
        stream = torch.cuda.current_stream(cost3.device).cuda_stream
        mod.lsa_solve_cuda(cost3.data_ptr(), dtype_code, b, n, m, bool(maximize), f32,
                           rows.data_ptr(), cols.data_ptr(), _ptr(u), _ptr(v), status.data_ptr(),
                           workspace.data_ptr(), nbytes, stream)
    return rows, cols, u, v, status


def _raise_on_status(status: torch.Tensor, batched: bool) -> None:
    codes = status.cpu().numpy()
    if not codes.any():
        return
    b = int(np.flatnonzero(codes)[0])
    code = int(codes[b])
    message = INFEASIBLE_MESSAGE if code == 1 else INVALID_MESSAGE
    if code == 2:
        message += " (NaN, or -inf; +inf when maximizing)"
    if code == STATUS_OUT_OF_RANGE:  # linear_sum_assignment rescales these; only direct callers see it
        message = "cost has finite entries too large for the solver; rescale by a power of two"
    raise ValueError(_where(message, b, batched))


def _largest_finite(t3: torch.Tensor) -> torch.Tensor:
    """(B,) the largest finite |cost| of each problem (0 where none is finite)."""
    if t3.numel() == 0:
        return t3.new_zeros(t3.shape[0])
    # usually every cost is finite: the max of the column extremes, two reads and no copy (14.8 ms at 4096^2
    # float64, 1 thread, against 98 ms for the copy below, whose 128 MB allocation costs most of it)
    big = torch.maximum(t3.amax(dim=(1, 2)), -t3.amin(dim=(1, 2)))
    if bool(torch.isfinite(big).all()):
        return big
    # forbidden pairs (inf) or NaN: on a fresh copy, 19x an isfinite mask and a where (8.4 vs 0.44 ms at 1024^2)
    return t3.abs().nan_to_num_(nan=0.0, posinf=0.0).amax(dim=(1, 2))


def _range_exponents(big: torch.Tensor, compute_dtype: torch.dtype, narrowed: bool) -> torch.Tensor | None:
    """(B,) per problem the power of two that brings its finite |costs| (largest: ``big``, (B,), from
    :func:`_largest_finite`) within the solvers' range; None when every problem is within it.

    Near the type's maximum, reduced costs c - u - v overflow into +inf, which reads as a forbidden
    pair: a wrong assignment or a false "infeasible"; those problems are scaled down (k <= 0).
    ``narrowed`` (float64 costs, float32 compute): the costs are rounded to float32, where a problem
    whose largest |cost| is below 2**SMALL_MAGNITUDE_EXP loses its entries to subnormals and zeros
    (1e-50 becomes 0: any assignment reads as optimal); those are scaled up (k > 0), their largest
    |cost| to [0.5, 1). Problems with no finite nonzero entry are left as they are. Scaling a problem
    by 2**k is exact (short of underflow in its entries 2**|k| below its largest, which change none of
    its totals), so the solve is the same problem; per problem, so that the other problems of a batch
    keep their small entries.
    """
    big = big.to(torch.float64)
    limit = SAFE_MAGNITUDE_EXP[compute_dtype]
    over = big > 2.0 ** limit
    under = (big > 0) & (big < 2.0 ** SMALL_MAGNITUDE_EXP) if narrowed else torch.zeros_like(over)
    if not bool((over | under).any()):
        return None
    exponent = torch.frexp(big)[1]
    return torch.where(over, limit - exponent, torch.where(under, -exponent, 0))


def _unscale_duals(costs: torch.Tensor, exponents: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                   compute_dtype: torch.dtype, batched: bool):
    """The duals of problems solved scaled by 2**exponents (B,) (``costs``: the scaled costs), in the caller's
    units: ValueError where they leave the compute dtype's range, or lose precision to its subnormals (tiny
    costs scaled up for a float32 solve: 1e-50 is 0 in float32, and no float32 duals can certify it).

    Computed in float64 and rounded once (ldexp of a float32 tensor scales by a float32 power of two, which is
    0 or inf beyond 2**±149)."""
    unscale = (-exponents)[:, None]
    out = [torch.ldexp(x.to(torch.float64), unscale).to(compute_dtype) for x in (u, v)]
    if not bool(torch.isfinite(out[0]).all() & torch.isfinite(out[1]).all()):
        raise ValueError(f"cost: the dual potentials of this problem exceed {compute_dtype}'s range; "
                         "solve with return_duals=False or with smaller costs")
    if bool((exponents > 0).any()):  # scaled up: what rounds off in the subnormals must stay far below
        # check_assignment's tol (4096 ulps of the problem's magnitude)
        lost = torch.stack([(torch.ldexp(y.to(torch.float64), exponents[:, None]) - x.to(torch.float64)).abs().amax(1)
                            for x, y in zip((u, v), out)]).amax(0)
        magnitude = _largest_finite(costs).to(torch.float64) + u.abs().amax(1) + v.abs().amax(1)
        bad = (lost > 256 * torch.finfo(compute_dtype).eps * magnitude).cpu().numpy()
        if bad.any():
            raise ValueError(_where(f"cost: the dual potentials of this problem fall below {compute_dtype}'s normal "
                                    "range (its costs are too small); solve with compute_dtype=torch.float64 or "
                                    "with return_duals=False", int(np.flatnonzero(bad)[0]), batched))
    return out[0], out[1]


def _where(message: str, b: int, batched: bool) -> str:
    return f"{message} (problem {b} of the batch)" if batched else message


# --------------------------------------------------------------------------- public functions


def _as_array(cost: Any, name: str = "cost") -> np.ndarray:
    """A non-tensor input as a C-contiguous numpy array of real numbers in native byte order."""
    try:
        array = np.asarray(cost)
    except Exception as exc:  # ragged lists and the like
        raise TypeError(f"{name} must be a torch.Tensor or an array-like of numbers: {exc}") from None
    if array.dtype == object or array.dtype.kind not in "biuf":
        raise TypeError(f"{name} must hold real numbers (bool, int or float), got dtype {array.dtype}")
    if array.dtype.byteorder not in ("=", "|"):
        array = array.astype(array.dtype.newbyteorder("="))
    return np.asarray(array, order="C")  # keeps a 0-d shape (np.ascontiguousarray makes it (1,))


def _as_tensor(cost: Any, name: str = "cost") -> tuple[torch.Tensor, bool]:
    """The input as a tensor, and whether it was one (numpy in -> numpy out)."""
    if isinstance(cost, torch.Tensor):
        return cost, True
    array = _as_array(cost, name)
    if not array.flags.writeable:  # torch.from_numpy warns on read-only arrays; the solver never writes to it
        array = array.copy()
    return torch.from_numpy(array), False


def _check_dense(t: torch.Tensor, name: str, real: bool = True) -> torch.Tensor:
    """A tensor argument: strided (sparse layouts have no strides and few kernels: they failed deep inside with
    RuntimeError / NotImplementedError) and, with ``real``, not complex (the casts to float dropped the imaginary
    part with only a warning; complex numpy input is refused alike, and so is it by scipy)."""
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense tensor, got layout {t.layout}; convert it with .to_dense()")
    if real and t.is_complex():
        raise TypeError(f"{name} must be real, got {t.dtype}")
    return t


# CPU tensors that numpy can view (bfloat16 and the rest take the general path)
_NUMPY_VIEWABLE = (torch.float64, torch.float32, torch.float16, torch.int64, torch.int32, torch.int16, torch.int8,
                   torch.uint8, torch.bool)


def _numpy_view(t: torch.Tensor) -> np.ndarray:
    """A C-contiguous numpy array of a CPU tensor (zero-copy when it is contiguous)."""
    t = t.detach()
    if t.is_neg():  # .numpy() refuses the negative bit (e.g. complex.conj().imag): resolve it first
        t = t.resolve_neg()
    return np.asarray(t.numpy(), order="C")


def _solve_numpy_fast(array: np.ndarray, maximize: bool, compute_dtype: torch.dtype, return_duals: bool):
    """A call on a numpy cost (or a CPU tensor's numpy view), solved by _C straight from the array: the
    public outputs as numpy arrays, or None when this path does not apply (empty problems, float32
    compute of float64 costs) or a problem needs the general path (out of range, invalid, infeasible:
    it rescales, re-solves and names the error).

    For small problems the general path's torch allocations and conversions cost ~20 µs a call, many
    times the solve (scipy takes ~1 µs at n = 8); this one costs a few µs.
    """
    code = array.dtype.char  # (comparing dtype objects costs more than the rest of this function)
    if code == "e":
        array = array.astype(np.float32)  # exact
    elif array.dtype.kind in "biu":
        array = array.astype(np.float64)  # exact up to 2**53, as in scipy
    elif code not in "fd":
        return None  # e.g. float128: the general path says what it takes
    if compute_dtype == torch.float32 and array.dtype.char == "d":
        return None  # needs the float32-range check
    if not array.size:
        return None
    rows, cols, u, v, all_ok = native_module("cpu").lsa_solve_cpu_array(  # 2-D in, 1-D out
        array, maximize, compute_dtype == torch.float32, return_duals)
    if not all_ok:
        return None
    return (rows, cols, u, v) if return_duals else (rows, cols)


def _check_flag(value, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_, numbers.Integral)):  # scipy takes 0/1 too; not strings
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def _index_tensor(value: torch.Tensor, name: str) -> torch.Tensor:
    """Integer indices; floats only where every value is integral (a 1.9 must not read as row 1)."""
    if value.dtype == torch.bool or value.is_complex():
        raise TypeError(f"{name} must hold integer indices, got {value.dtype}")
    if value.is_floating_point():
        if not bool(torch.isfinite(value).all()) or not bool((value == value.round()).all()):
            raise ValueError(f"{name} must hold integer indices, got non-integral values")
    return value.to(torch.int64)


def _check_fits_float32(big: torch.Tensor) -> None:
    """Finite costs beyond float32's range would turn into ±inf (forbidden pairs) in a float32 solve.
    ``big``: (B,) the largest finite |cost| of each problem."""
    big = float(big.amax())
    if big > torch.finfo(torch.float32).max:
        raise ValueError(f"cost has finite entries beyond float32's range (largest |cost| {big:.3g}); "
                         "solve with compute_dtype=torch.float64")


def _cost_dtype(t: torch.Tensor) -> torch.dtype:
    if t.dtype in (torch.float32, torch.float64):
        return t.dtype
    if t.dtype in (torch.float16, torch.bfloat16):
        return torch.float32  # exact
    return torch.float64  # bool and integers (exact up to 2**53, as in scipy)


def linear_sum_assignment(cost, maximize: bool = False, *, return_duals: bool = False, backend: str | None = None,
                          compute_dtype: torch.dtype | None = None, warm_start=None):
    """Solve the linear sum assignment problem exactly, like :func:`scipy.optimize.linear_sum_assignment`.

    Args:
        cost: (n, m) costs, or (B, n, m) for B independent problems solved in
            one call; a torch tensor (CPU or CUDA) or anything numpy accepts.
            float32 / float64 / float16 / bfloat16, integers or bool. +inf
            marks a forbidden pair (-inf when maximizing).
        maximize: maximize the total instead of minimizing it.
        return_duals: also return the dual potentials (u, v) (see the module
            docstring): a certificate that :func:`check_assignment` verifies.
        backend: ``"native"`` (C++ on CPU, CUDA on GPU), ``"torch"`` (the
            reference) or None (fastest available).
        compute_dtype: float64 (default) or float32 arithmetic inside the
            solver; the duals come back in this dtype. float64 costs are
            rounded to float32 for a float32 solve: problems of tiny costs
            are scaled by a power of two first (exact), so that they keep
            their precision. On CPU every row scan is vectorised in both
            dtypes: float32 costs solved in float32 took 0.40-0.92x the
            float64 time (n = 256-4096, uniform and correlation costs, on our
            2-core machine). A dtype change costs a converted copy inside the
            solver (its allocation's page faults are most of it), so pass the
            costs' own dtype: on uniform 4096^2 costs, float64 47 ms, float32
            in float32 37 ms, float64 in float32 105 ms, float32 in float64
            (the default for float32 costs) 155 ms.
        warm_start: column potentials to start from, shape (m,) or (B, m) like
            the ``v`` that ``return_duals`` gives (same ``maximize``
            convention): those of an earlier solve of a similar problem, e.g.
            the previous sweep of an alignment. A hint: the result is an
            optimal assignment whatever the values (among several optima it
            may pick another one than a cold solve). Near this problem's
            duals, it saves most of the work where the cold solve has much to
            do (MuDSC-like similarity matrices: 2.2-10.7x); on problems the cold
            solve finds easy (uniform random costs) it can be a little slower
            (see ``benchmarks/run_linear_assignment.py``). The cold solve runs
            instead where the values are unusable (further below the column
            minima than 4 times the spread of the row and column minima:
            optimal duals lie within 0.6 times it, and far larger values
            would round off the costs), poor (a quarter of the rows left free
            by the first pass), or lead to long searches (32 row scans per
            row). The native CPU solver uses it for square problems; other
            backends and shapes ignore it.

    Returns:
        ``(row_ind, col_ind)`` as scipy: k = min(n, m) pairs, rows ascending,
        int64; shape (k,) for a 2-D cost, (B, k) for a 3-D cost. numpy arrays
        for a non-tensor input, tensors on the input's device otherwise. With
        ``return_duals``: ``(row_ind, col_ind, u, v)`` with u of shape (n,) or
        (B, n) and v of shape (m,) or (B, m).

    Raises:
        ValueError: a cost that is not 2-D/3-D; NaN, or -inf (+inf when
            maximizing), with the problem's index in a batch; an infeasible
            problem (no assignment of finite cost), with its index in a batch;
            with compute_dtype=torch.float32, float64 costs beyond float32's
            range, and (with return_duals) duals that would fall below its
            normal range (largest |cost| below about 2**-135); a warm_start
            of the wrong shape, or with NaN/inf entries where it is used.
        TypeError: a non-real cost (complex included), a sparse tensor, or bad argument types.
    """
    tensor_in = isinstance(cost, torch.Tensor)
    if tensor_in:
        _check_dense(check_has_data(cost, "cost"), "cost")
    array = None if tensor_in else _as_array(cost)
    shape = tuple(cost.shape if tensor_in else array.shape)
    if len(shape) not in (2, 3):
        raise ValueError(f"cost must be 2-D (n, m) or 3-D (B, n, m), got shape {shape}")
    if max(shape[-2:]) > MAX_DIMENSION:
        raise ValueError(f"cost has shape {shape}: at most {MAX_DIMENSION} rows and columns per problem")
    maximize = _check_flag(maximize, "maximize")
    return_duals = _check_flag(return_duals, "return_duals")
    if compute_dtype is None:
        compute_dtype = torch.float64
    if compute_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"compute_dtype must be torch.float32 or torch.float64, got {compute_dtype}")
    if warm_start is not None:
        warm_start = _check_warm_start(warm_start, shape)
    # small problems: the fixed cost of the general path (torch allocations) would outweigh the solve
    viewable = not tensor_in or (cost.device.type == "cpu" and cost.layout == torch.strided
                                 and cost.dtype in _NUMPY_VIEWABLE)
    if viewable and warm_start is None and resolve_backend(LINEAR_ASSIGNMENT, backend, "cpu") == "native":
        out = _solve_numpy_fast(_numpy_view(cost) if tensor_in else array, maximize, compute_dtype, return_duals)
        if out is not None:
            return tuple(torch.from_numpy(x) for x in out) if tensor_in else out
    t = cost if tensor_in else _as_tensor(array)[0]
    batched = t.dim() == 3
    t3 = t if batched else t.unsqueeze(0)
    dtype = _cost_dtype(t3)
    if t3.dtype != dtype:
        t3 = t3.to(dtype)
    name = resolve_backend(LINEAR_ASSIGNMENT, backend, t3.device)
    b, n, m = t3.shape
    narrowed = compute_dtype == torch.float32 and dtype == torch.float64  # rounded to float32 in the solve
    big = _largest_finite(t3).cpu() if narrowed and t3.numel() else None  # (B,): one device-to-host copy
    if big is not None:
        _check_fits_float32(big)

    def solve(costs: torch.Tensor, exponents: torch.Tensor | None):
        """(rows, cols, u, v, status or None) of the problems scaled by 2**exponents (B,), duals unscaled."""
        if exponents is not None:
            exponents = exponents.to(costs.device)
            costs = torch.ldexp(costs, exponents[:, None, None])
        status = None
        if name == "torch":
            rows, cols, u, v = _solve_torch(costs, maximize, compute_dtype, batched)
        elif costs.device.type == "cuda":
            rows, cols, u, v, status = _solve_native_cuda(costs.contiguous(), maximize, compute_dtype, return_duals)
        else:
            warm = None
            if warm_start is not None and n == m:  # square problems only (see the docstring)
                warm = _warm_potentials(warm_start, b, exponents, compute_dtype)
            rows, cols, u, v, status, _ = _solve_native_cpu(costs.contiguous(), maximize, compute_dtype, return_duals,
                                                            warm_start=warm)
        if exponents is not None and return_duals:
            u, v = _unscale_duals(costs, exponents, u, v, compute_dtype, batched)
        return rows, cols, u, v, status

    if b == 0 or n == 0 or m == 0:
        rows = torch.empty((b, min(n, m)), dtype=torch.int64, device=t3.device)  # (B, k) even for B = 0
        cols = torch.empty((b, min(n, m)), dtype=torch.int64, device=t3.device)
        u = torch.zeros((b, n), dtype=compute_dtype, device=t3.device)
        v = torch.zeros((b, m), dtype=compute_dtype, device=t3.device)
    else:
        # the native solvers check the range on their first scan and report it; the reference cannot, and
        # float32 solves of float64 costs are scaled up first where tiny costs would underflow
        first = None
        if name == "torch" or narrowed:
            big = _largest_finite(t3) if big is None else big
            first = _range_exponents(big, compute_dtype, narrowed)
        rows, cols, u, v, status = solve(t3, first)
        if status is not None:
            status = status.cpu()  # one device-to-host copy per call
            if bool((status == STATUS_OUT_OF_RANGE).any()):  # rare: rescale, solve again
                big = _largest_finite(t3) if big is None else big
                rows, cols, u, v, status = solve(t3, _range_exponents(big, compute_dtype, narrowed))
            _raise_on_status(status, batched)

    out = (rows, cols, u, v) if return_duals else (rows, cols)
    if not batched:
        out = tuple(x[0] for x in out)
    if not tensor_in:
        out = tuple(x.numpy() for x in out)
    return out


def _check_warm_start(warm_start, shape: tuple) -> torch.Tensor:
    """``warm_start`` as a tensor of shape (m,) for a 2-D ``shape``, (B, m) for a 3-D one; ValueError / TypeError
    naming it otherwise. Its values are checked where they are used (:func:`_warm_potentials`)."""
    if isinstance(warm_start, torch.Tensor):
        _check_dense(check_has_data(warm_start, "warm_start"), "warm_start")
        t = warm_start
    else:
        t = _as_tensor(warm_start, "warm_start")[0]
    if t.dtype == torch.bool:
        raise TypeError("warm_start must hold numbers (potentials), got bool")
    want = shape[:-2] + shape[-1:]
    if tuple(t.shape) != want:
        raise ValueError(f"warm_start must have shape {want} (one potential per column of cost {shape}), "
                         f"got {tuple(t.shape)}")
    return t.detach()


def _warm_potentials(warm_start: torch.Tensor, b: int, exponents: torch.Tensor | None,
                     compute_dtype: torch.dtype) -> torch.Tensor:
    """(B, m) contiguous CPU potentials for the native solver, scaled like the costs; ValueError on NaN/±inf."""
    warm = warm_start.to("cpu", torch.float64).reshape(b, -1)
    if not bool(torch.isfinite(warm).all()):
        raise ValueError("warm_start must be finite (NaN or ±inf found)")
    if exponents is not None:
        warm = torch.ldexp(warm, exponents[:, None].cpu())
    return warm.to(compute_dtype).contiguous()


def check_assignment(cost, rows, cols, u, v, maximize: bool = False, *, tol: float | None = None) -> bool:
    """Whether (rows, cols) is an optimal assignment of ``cost`` as certified by the duals (u, v).

    Checks, per problem (2-D inputs, or 3-D with a leading batch dimension):
    k = min(n, m) pairs, indices in range, no row or column used twice, no
    forbidden pair used; u_i + v_j ≤ c_ij + tol for every allowed pair
    (≥ c_ij − tol when maximizing) and |u_i + v_j − c_ij| ≤ tol on the
    assignment; for n < m every v_j ≤ tol (≥ −tol when maximizing) and
    |v_j| ≤ tol on unassigned columns (u likewise for n > m). Together these
    prove that no assignment has a better total (weak duality). ``tol``
    defaults to a few thousand ulps of the problem's magnitude (costs and
    duals), per problem, in the duals' dtype.

    Args:
        cost: (n, m) or (B, n, m) costs, as passed to :func:`linear_sum_assignment`.
        rows, cols: (k,) or (B, k) integer indices, k = min(n, m).
        u, v: (n,) / (m,) or (B, n) / (B, m) float duals (``return_duals=True``).
        maximize: whether the assignment maximizes.
        tol: the slack allowed, a finite number ≥ 0 in the duals' units (default: see above).

    Returns:
        True when every problem's certificate holds; False otherwise (wrong shapes included).
        Tensors and array-likes are accepted alike; nothing is modified.

    Raises:
        ValueError: a cost that is not 2-D/3-D, a negative or non-finite ``tol``, float indices
            that are not integral, meta tensors.
        TypeError: a ``maximize`` or ``tol`` of the wrong type, bool or complex indices, complex costs or
            duals, sparse tensors.
    """
    c, _ = _as_tensor(cost)
    tensors = [c] + [_as_tensor(x, name)[0] for x, name in ((rows, "rows"), (cols, "cols"), (u, "u"), (v, "v"))]
    for x, name in zip(tensors, ("cost", "rows", "cols", "u", "v")):
        _check_dense(check_has_data(x, name), name, real=name not in ("rows", "cols"))  # indices: _index_tensor
    maximize = _check_flag(maximize, "maximize")
    if tol is not None:
        tol = check_real(tol, "tol", low=0.0)
    device = c.device
    c, rows, cols, u, v = (x.to(device) for x in tensors)
    if c.dim() == 2:
        c, rows, cols, u, v = c[None], rows[None], cols[None], u[None], v[None]
    if c.dim() != 3:
        raise ValueError(f"cost must be 2-D or 3-D, got shape {tuple(c.shape)}")
    b, n, m = c.shape
    k = min(n, m)
    if rows.shape != (b, k) or cols.shape != (b, k) or u.shape != (b, n) or v.shape != (b, m):
        return False
    dual_dtype = u.dtype if u.dtype.is_floating_point else torch.float64
    eps = torch.finfo(dual_dtype).eps
    c = c.to(torch.float64)
    u = u.to(torch.float64)
    v = v.to(torch.float64)
    if maximize:
        c, u, v = -c, -u, -v
    if bool(torch.isnan(c).any()) or bool((c == -torch.inf).any()) or not bool(torch.isfinite(u).all()) \
            or not bool(torch.isfinite(v).all()):
        return False
    rows = _index_tensor(rows, "rows")
    cols = _index_tensor(cols, "cols")
    if k == 0:
        return True
    if bool((rows < 0).any() | (rows >= n).any() | (cols < 0).any() | (cols >= m).any()):
        return False
    for idx, size in ((rows, n), (cols, m)):
        used = torch.zeros((b, size), dtype=torch.int64, device=device).scatter_add_(1, idx, torch.ones_like(idx))
        if bool((used > 1).any()):
            return False
    finite = torch.isfinite(c)
    if tol is None:  # per problem, (B, 1): no floor, and no batch-wide scale (both certified wrong assignments of
        # tiny costs: 1e-320 entries, or 1e-20 entries next to a problem of 1s); sums of subnormals are exact
        tol = (4096 * eps * (_largest_finite(c) + u.abs().amax(1) + v.abs().amax(1)))[:, None]
    else:
        tol = torch.full((b, 1), tol, dtype=torch.float64, device=device)
    slack = c - u[:, :, None] - v[:, None, :]
    if bool((finite & (slack < -tol[:, :, None])).any()):
        return False
    picked = slack[torch.arange(b, device=device)[:, None], rows, cols]
    if not bool(torch.isfinite(picked).all()) or bool((picked.abs() > tol).any()):
        return False
    if n != m:  # the larger side's duals: <= 0, and 0 where unassigned
        side, idx = (v, cols) if n < m else (u, rows)
        assigned = torch.zeros_like(side, dtype=torch.bool).scatter_(1, idx, True)
        if bool((side > tol).any()) or bool((~assigned & (side.abs() > tol)).any()):
            return False
    return True


__all__ = ["LINEAR_ASSIGNMENT", "check_assignment", "linear_sum_assignment", "linear_sum_assignment_torch"]
