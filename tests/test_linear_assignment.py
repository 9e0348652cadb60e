"""Linear assignment: every backend against scipy (and the torch reference), duals as certificates, errors."""

import warnings

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment as scipy_lsa

import merging_kernels as mk
from merging_kernels.ops import linear_assignment as la
from merging_kernels.ops.linear_assignment import LINEAR_ASSIGNMENT

from helpers import fast_backend_params

# (backend, device, native method): the public backends, plus each native CPU path forced on
FAST = [p for p in fast_backend_params(LINEAR_ASSIGNMENT)]
NATIVE_CPU = [p for p in FAST if p.values == ("native", "cpu")]
# "team": the CUDA kernels' algorithm (csrc/common/lsa_team.h) run by one CPU thread, so that code is
# checked on every machine; test_cuda_matches_team_serial ties the GPU results to it bit for bit.
METHODS = [pytest.param("native", "cpu", la.METHOD_DENSE, id="native-cpu-dense"),
           pytest.param("native", "cpu", la.METHOD_SPARSE, id="native-cpu-sparse"),
           pytest.param("native", "cpu", "team", id="team-serial-cpu")] if NATIVE_CPU else []
ALL = ([pytest.param("torch", "cpu", None, id="torch-cpu")]
       + [pytest.param(*p.values, None, id=p.id, marks=p.marks) for p in FAST] + METHODS)
FAST_ONLY = [p for p in ALL if p.id != "torch-cpu"]


def solve(cost, backend, device, method=None, maximize=False, compute_dtype=None):
    """rows, cols, u, v as numpy, from the public function (or a forced native CPU method)."""
    t = torch.as_tensor(cost)
    if method is None:
        out = mk.linear_sum_assignment(t.to(device), maximize, return_duals=True, backend=backend,
                                       compute_dtype=compute_dtype)
        return tuple(x.cpu().numpy() for x in out)
    t3 = t if t.dim() == 3 else t[None]
    if t3.dtype not in (torch.float32, torch.float64):
        t3 = t3.double()
    if method == "team":
        rows, cols, u, v, status, _ = la._solve_team_serial(t3.contiguous(), maximize,
                                                            compute_dtype or torch.float64, True)
    else:
        rows, cols, u, v, status, _ = la._solve_native_cpu(t3.contiguous(), maximize,
                                                           compute_dtype or torch.float64, True, method=method)
    la._raise_on_status(status, t.dim() == 3)
    out = (rows, cols, u, v) if t.dim() == 3 else (rows[0], cols[0], u[0], v[0])
    return tuple(x.numpy() for x in out)


def total(cost, rows, cols):
    return float(np.asarray(cost, dtype=np.float64)[rows, cols].sum())


def assert_optimal(cost, rows, cols, u, v, maximize=False, rtol=1e-9):
    """Same total as scipy (to rounding), a valid matching, and duals that certify it."""
    cost = np.asarray(cost, dtype=np.float64)
    r0, c0 = scipy_lsa(cost, maximize=maximize)
    assert rows.shape == cols.shape == (min(cost.shape),)
    assert np.all(np.diff(rows) > 0), "rows ascending and distinct"
    assert len(set(cols.tolist())) == len(cols)
    finite = np.isfinite(cost)
    scale = float(np.abs(cost[finite]).max(initial=0.0)) * max(len(rows), 1)  # no floor: tiny costs are checked too
    assert abs(total(cost, rows, cols) - total(cost, r0, c0)) <= rtol * scale
    assert mk.check_assignment(cost, rows, cols, u, v, maximize=maximize)


# --------------------------------------------------------------------------- cost generators


def mlp_digit_correlations(width_a=96, width_b=128, steps=25):
    """-correlation between the hidden units of two small MLPs trained on sklearn digits (MuDSC's workload)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    acts = []
    for seed, width in ((0, width_a), (1, width_b)):
        torch.manual_seed(seed)
        net = torch.nn.Sequential(torch.nn.Linear(64, width), torch.nn.ReLU(), torch.nn.Linear(width, 10))
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
        with torch.no_grad():
            acts.append(net[1](net[0](x)).double())
    a, b = ((h - h.mean(0)) / (h.std(0) + 1e-8) for h in acts)
    return (-(a.T @ b) / x.shape[0]).numpy()


def correlated_features(n, m, rng):
    """-correlation of two sets of correlated random features (a shared low-rank signal plus noise)."""
    samples, k = 3 * max(n, m), max(4, max(n, m) // 8)
    z = rng.standard_normal((samples, k))
    a = z @ rng.standard_normal((k, n)) + rng.standard_normal((samples, n))
    b = z @ rng.standard_normal((k, m)) + rng.standard_normal((samples, m))
    a = (a - a.mean(0)) / a.std(0)
    b = (b - b.mean(0)) / b.std(0)
    return -(a.T @ b) / samples


def make_cost(kind, n, m, seed=0):
    rng = np.random.default_rng(seed)
    if kind == "uniform":
        return rng.random((n, m))
    if kind == "int_ties":
        return rng.integers(0, 4, (n, m)).astype(np.float64)
    if kind == "all_equal":
        return np.full((n, m), 3.0)
    if kind == "rank1":
        return np.outer(rng.random(n) + 0.5, rng.random(m) + 0.5)
    if kind == "correlated":
        return correlated_features(n, m, rng)
    if kind == "forbidden":  # feasible: a random permutation stays allowed
        c = rng.random((n, m))
        c[rng.random((n, m)) < 0.6] = np.inf
        k = min(n, m)
        c[np.arange(k), rng.permutation(m)[:k]] = rng.random(k)
        return c
    if kind == "huge":
        return rng.random((n, m)) * 1e150
    if kind == "tiny":
        return rng.random((n, m)) * 1e-150
    if kind == "mixed_sign":
        return rng.standard_normal((n, m)) * 10.0 ** rng.integers(-3, 4, (n, m))
    raise AssertionError(kind)


KINDS = ["uniform", "int_ties", "all_equal", "rank1", "correlated", "forbidden", "huge", "tiny", "mixed_sign"]
SHAPES = [(1, 1), (2, 2), (3, 3), (17, 17), (2, 3), (3, 2), (17, 40), (40, 17), (256, 256)]


@pytest.fixture(scope="module")
def mlp_costs():
    c = mlp_digit_correlations()
    return {"rect": c, "square": np.ascontiguousarray(c[:, :96])}


# --------------------------------------------------------------------------- against scipy


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend, device, method", ALL)
def test_matches_scipy(backend, device, method, kind, shape):
    if backend == "torch" and shape == (256, 256) and kind not in ("uniform", "int_ties"):
        pytest.skip("the reference is slow; two kinds at this size are enough")
    cost = make_cost(kind, *shape)
    rows, cols, u, v = solve(cost, backend, device, method)
    assert_optimal(cost, rows, cols, u, v)


@pytest.mark.parametrize("kind", ["uniform", "int_ties", "correlated", "rank1", "forbidden"])
@pytest.mark.parametrize("backend, device, method", FAST_ONLY)
def test_n1000(backend, device, method, kind):
    if backend == "torch" and device == "cuda":  # host-synced steps: rank1 takes ~500k of them, minutes on a GPU
        pytest.skip("the torch reference at n = 1000 is checked on CPU (test_reference_n1000)")
    cost = make_cost(kind, 1000, 1000, seed=1)
    assert_optimal(cost, *solve(cost, backend, device, method))


def test_reference_n1000():
    cost = make_cost("uniform", 1000, 1000, seed=2)
    rows, cols, u, v = solve(cost, "torch", "cpu")
    assert_optimal(cost, rows, cols, u, v)


@pytest.mark.parametrize("backend, device, method", ALL)
@pytest.mark.parametrize("layout", ["square", "rect", "rect_t"])
def test_mlp_activation_correlations(backend, device, method, layout, mlp_costs):
    cost = {"square": mlp_costs["square"], "rect": mlp_costs["rect"], "rect_t": mlp_costs["rect"].T.copy()}[layout]
    for maximize in (False, True):
        assert_optimal(cost, *solve(cost, backend, device, method, maximize=maximize), maximize=maximize)


@pytest.mark.parametrize("shape", [(17, 17), (5, 9), (9, 5), (256, 256)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("backend, device, method", ALL)
def test_maximize(backend, device, method, shape):
    cost = make_cost("uniform", *shape, seed=3)
    cost[0, 0] = -np.inf  # forbidden when maximizing
    assert_optimal(cost, *solve(cost, backend, device, method, maximize=True), maximize=True)
    ints = make_cost("int_ties", *shape, seed=4)
    assert_optimal(ints, *solve(ints, backend, device, method, maximize=True), maximize=True)


@pytest.mark.parametrize("backend, device, method", ALL)
def test_empty(backend, device, method):
    for shape in [(0, 0), (0, 3), (3, 0)]:
        rows, cols, u, v = solve(np.zeros(shape), backend, device, method)
        assert rows.shape == cols.shape == (0,) and u.shape == (shape[0],) and v.shape == (shape[1],)
        assert scipy_lsa(np.zeros(shape))[0].shape == (0,)
    for shape in [(0, 3, 3), (0, 2, 5), (2, 0, 3), (2, 3, 0)]:  # batches: (B, min(n, m)) even for B = 0
        rows, cols, u, v = solve(np.zeros(shape), backend, device, method)
        b, n, m = shape
        assert rows.shape == cols.shape == (b, min(n, m)) and u.shape == (b, n) and v.shape == (b, m)


@pytest.mark.parametrize("backend, device, method", FAST_ONLY)
def test_float32_compute(backend, device, method):
    cost = make_cost("uniform", 200, 200, seed=5).astype(np.float32)
    rows, cols, u, v = solve(cost, backend, device, method, compute_dtype=torch.float32)
    assert u.dtype == np.float32
    r0, c0 = scipy_lsa(cost)
    assert abs(total(cost, rows, cols) - total(cost, r0, c0)) <= 1e-4 * total(cost, r0, c0)
    assert mk.check_assignment(cost, rows, cols, u, v)
    if method is None:  # the public function checks the range (the forced methods are its internals)
        huge = make_cost("uniform", 20, 20, seed=6) * 1e200  # finite in float64, inf in float32
        for maximize in (False, True):
            with pytest.raises(ValueError, match="beyond float32's range"):
                solve(huge, backend, device, method, compute_dtype=torch.float32, maximize=maximize)
    forbidden = np.where(np.eye(200, dtype=bool), np.inf, cost.astype(np.float64))  # +inf is no overflow
    rows, cols, u, v = solve(forbidden, backend, device, method, compute_dtype=torch.float32)
    assert np.isfinite(total(forbidden, rows, cols))


@pytest.mark.skipif(not NATIVE_CPU, reason="needs the native CPU backend")
@pytest.mark.parametrize("shape", [(1, 1), (3, 3), (15, 15), (16, 16), (17, 17), (31, 33), (33, 31), (100, 100),
                                   (257, 257)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("kind", ["uniform", "int_ties", "correlated", "forbidden", "mixed_sign", "rank1"])
@pytest.mark.parametrize("method", [la.METHOD_DENSE, la.METHOD_SPARSE], ids=["dense", "sparse"])
def test_float32_solves_match_scipy(method, kind, shape):
    """The float32 scans (vectorised where the CPU has AVX: sixteen columns a step, the rest in scalar code) on
    widths around the vector width, ties, forbidden pairs and signs; maximize too."""
    cost = make_cost(kind, *shape, seed=shape[1]).astype(np.float32).astype(np.float64)  # exact in float32
    for maximize in (False, True):
        c = np.where(np.isinf(cost), -np.inf, cost) if maximize else cost
        rows, cols, u, v = solve(c.astype(np.float32), "native", "cpu", method, maximize=maximize,
                                 compute_dtype=torch.float32)
        r0, c0 = scipy_lsa(c, maximize=maximize)
        finite = np.isfinite(c)
        scale = float(np.abs(c[finite]).max(initial=1.0)) * max(len(rows), 1)
        assert abs(total(c, rows, cols) - total(c, r0, c0)) <= 1e-5 * scale
        assert len(set(cols.tolist())) == len(cols)
        assert mk.check_assignment(c, rows, cols, u, v, maximize=maximize)


# The float32 AVX scans (eight lanes, two accumulators: sixteen columns a step in umins and relax, eight in the
# others) where a defect would show: every width up to 40 (lane tails), the sizes around the solver's own
# thresholds, ties, forbidden pairs, refusals and the magnitude limit at every lane. Which scan runs where:
# colmin_update in the square solvers' first pass and the warm start's check; all_usable for wide float32 costs
# solved in place; reduced_min in the reduction transfer and the sparse path's selections, collect there too;
# umins in augmenting row reduction (cold: only above kDenseArrMinM = 1024 columns; every warm start); relax in
# every Dijkstra step.
SPARSE_MIN_N, WARM_SPARSE_MIN_N = 768, 1536  # kSparseMinN, kWarmSparseMinN in csrc/cpu/linear_assignment.cpp


def f32_exact(cost):
    return cost.astype(np.float32).astype(np.float64)


def assert_f32_optimal(c, rows, cols, u, v, maximize=False):
    """scipy's total to float32 rounding (1e-5 of max|c| * n: far below the gap of these costs' second-best
    assignments), a matching of the smaller side, and duals that certify it."""
    r0, c0 = scipy_lsa(c, maximize=maximize)
    finite = np.isfinite(c)
    scale = float(np.abs(c[finite]).max(initial=1.0)) * max(len(rows), 1)
    assert abs(total(c, rows, cols) - total(c, r0, c0)) <= 1e-5 * scale
    assert len(set(cols.tolist())) == len(cols) == min(c.shape)
    assert mk.check_assignment(c, rows, cols, u, v, maximize=maximize)


def f32_cost(kind, n, m, seed, maximize):
    c = f32_exact(make_cost(kind, n, m, seed=seed))
    return np.where(np.isinf(c), -np.inf, c) if maximize else c


@pytest.mark.skipif(not NATIVE_CPU, reason="needs the native CPU backend")
@pytest.mark.parametrize("kind", ["uniform", "int_ties", "forbidden", "mixed_sign"])
@pytest.mark.parametrize("method", [None, la.METHOD_DENSE, la.METHOD_SPARSE], ids=["auto", "dense", "sparse"])
def test_float32_scans_at_every_width_up_to_40(method, kind):
    """Square and rectangular both ways, float32 costs and float64 ones (exact in float32) solved in float32,
    minimize and maximize, cold and (square) warm-started from a nearby problem's float64 duals."""
    for m in range(1, 41):
        for n, mm in ((m, m), (m // 2 + 1, m), (m, m // 2 + 1)):
            for maximize in (False, True):
                c = f32_cost(kind, n, mm, seed=100 * m + n, maximize=maximize)
                for cin in (c.astype(np.float32), c):
                    out = solve(cin, "native", "cpu", method, maximize=maximize, compute_dtype=torch.float32)
                    assert out[2].dtype == np.float32
                    assert_f32_optimal(c, *out, maximize=maximize)
                if n == mm:
                    v0 = warm_potentials("nearby", c, maximize, seed=m)
                    rows, cols, u, v, stats = _warm_stats(c.astype(np.float32), v0, maximize, torch.float32,
                                                          la.METHOD_AUTO if method is None else method)
                    assert_f32_optimal(c, rows, cols, u, v, maximize=maximize)


@pytest.mark.skipif(not NATIVE_CPU, reason="needs the native CPU backend")
@pytest.mark.parametrize("kind", ["uniform", "int_ties", "forbidden"])
@pytest.mark.parametrize("shape", [(1023, 1023), (1025, 1025), (1000, 1031), (1031, 1000),
                                   (767, 767), (768, 768), (769, 769), (1535, 1535), (1536, 1536), (1537, 1537)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
def test_float32_solves_around_the_solver_thresholds(shape, kind):
    """Augmenting row reduction's width (cold dense solves above 1024 columns), the sparse path's size
    (cold from 768) and its warm start's (from 1536): float32 as float64, cold and warm, the path checked."""
    n, m = shape
    maximize = n % 2 == 1
    c = f32_cost(kind, n, m, seed=n + m, maximize=maximize)
    t3 = torch.from_numpy(c.astype(np.float32))[None].contiguous()
    rows, cols, u, v, status, stats = la._solve_native_cpu(t3, maximize, torch.float32, True)
    assert int(status[0]) == 0
    assert stats["used_sparse"] == int(n == m and n >= SPARSE_MIN_N)
    assert_f32_optimal(c, rows[0].numpy(), cols[0].numpy(), u[0].numpy(), v[0].numpy(), maximize)
    for warm in ("own", "nearby") if n == m else ():  # (nearby: poor for float32 here, a cold start)
        v0 = warm_potentials(warm, c, maximize, seed=n)
        rows, cols, u, v, stats = _warm_stats(c.astype(np.float32), v0, maximize, torch.float32)
        if warm == "own" and kind != "int_ties":  # (ties: rows collide, a cold start)
            assert stats["warm_started"] == 1
        if stats["warm_started"]:
            assert stats["used_sparse"] == int(n >= WARM_SPARSE_MIN_N)
        assert_f32_optimal(c, rows, cols, u, v, maximize)


F32_LANE_WIDTHS = [7, 8, 9, 15, 16, 17, 23, 24, 31, 32, 33, 40]


def _f32_status(cost, method):
    t3 = torch.from_numpy(np.ascontiguousarray(cost, dtype=np.float32))[None]
    return int(la._solve_native_cpu(t3, False, torch.float32, False, method=method)[4][0])


@pytest.mark.skipif(not NATIVE_CPU, reason="needs the native CPU backend")
@pytest.mark.parametrize("bad", [np.nan, -np.inf], ids=["nan", "-inf"])
def test_float32_refusals_at_every_lane(bad):
    """NaN and -inf at every column of a row (so at every lane and in the tails) in each first scan: square
    costs in place (dense and sparse column minima: colmin_update), wide ones in place (all_usable)."""
    for m in F32_LANE_WIDTHS:
        for n, method in ((m, la.METHOD_DENSE), (m, la.METHOD_SPARSE), (max(1, m - 3), la.METHOD_DENSE)):
            for j in range(m):
                c = make_cost("uniform", n, m, seed=m).astype(np.float32)
                c[n // 2, j] = bad
                assert _f32_status(c, method) == 2, (m, n, j)
            with pytest.raises(ValueError, match="invalid numeric entries"):
                mk.linear_sum_assignment(c, compute_dtype=torch.float32)


@pytest.mark.skipif(not NATIVE_CPU, reason="needs the native CPU backend")
def test_float32_magnitude_limit_at_every_lane():
    """team::unusable's float32 limit: |cost| up to 2**100 is solved as it is, the next float32 above it is out
    of range (status 3: linear_sum_assignment rescales by a power of two and solves again), at every lane of
    every first scan. A scan that let it through would solve with reduced costs near float32's overflow."""
    limit = np.float32(2.0 ** 100)
    beyond = np.nextafter(limit, np.float32(np.inf))
    for m in F32_LANE_WIDTHS:
        for n, method in ((m, la.METHOD_DENSE), (m, la.METHOD_SPARSE), (max(1, m - 3), la.METHOD_DENSE)):
            for j in range(m):
                for sign in (1, -1):
                    c = make_cost("uniform", n, m, seed=j).astype(np.float32)
                    c[n - 1, j] = sign * limit
                    assert _f32_status(c, method) == 0, (m, n, j, sign)
                    c[n - 1, j] = sign * beyond
                    assert _f32_status(c, method) == la.STATUS_OUT_OF_RANGE, (m, n, j, sign)
            rows, cols, u, v = mk.linear_sum_assignment(c, compute_dtype=torch.float32, return_duals=True)
            r0, c0 = scipy_lsa(c.astype(np.float64))
            assert total(c, rows, cols) == total(c, r0, c0)  # -beyond is taken (or avoided) by both
            assert mk.check_assignment(c, rows, cols, u, v)


@pytest.mark.skipif(not NATIVE_CPU, reason="needs the native CPU backend")
def test_float32_lane_indices_stop_at_2_to_the_24_columns():
    """umins and relax carry column indices in float32 lanes, exact below 2**24: wider problems take the
    generic scans. One row, its unique minimum at an odd column beyond 2**24 (which float32 cannot hold) and
    before the last sixteen (which the generic tail would scan anyway)."""
    m, best = 2 ** 24 + 64, 2 ** 24 + 17
    c = torch.ones((1, m), dtype=torch.float32)
    c[0, best] = 0.5
    c[0, 2 ** 24 - 1] = 0.75
    rows, cols, u, v = mk.linear_sum_assignment(c, compute_dtype=torch.float32, return_duals=True)
    assert cols.tolist() == [best] and float(u[0] + v[best]) == 0.5


AVX_VS_GENERIC = r"""
import hashlib, sys
import numpy as np, torch
sys.path.insert(0, sys.argv[1])
import test_linear_assignment as t
from merging_kernels.ops import linear_assignment as la
for kind in ("uniform", "int_ties", "forbidden", "mixed_sign", "correlated"):
    shapes = [(m, m) for m in range(1, 41)] + [(9, 40), (40, 9)]
    if kind != "correlated":  # (slow to make)
        shapes += [(1025, 1025), (1000, 1031), (769, 769), (1537, 1537)]
    for n, m in shapes:
        for maximize in (False, True):
            c = t.f32_cost(kind, n, m, seed=n * m, maximize=maximize)
            v0 = t.warm_potentials("nearby", c, maximize, seed=n) if n == m else None
            for dtype in (torch.float32, torch.float64):
                cin = torch.from_numpy(c).to(dtype)[None].contiguous()  # (exact in float32)
                for method in (la.METHOD_DENSE, la.METHOD_SPARSE) if n == m and n < 200 else (la.METHOD_AUTO,):
                    for w in (None, v0) if n == m else (None,):
                        w = None if w is None else torch.as_tensor(w, dtype=dtype)[None].contiguous()
                        out = la._solve_native_cpu(cin, maximize, dtype, True, method=method, warm_start=w)
                        h = hashlib.sha1(b"".join(x.numpy().tobytes() for x in out[:5])).hexdigest()
                        print(kind, n, m, maximize, dtype, method, w is not None, h)
"""


@pytest.mark.skipif(not NATIVE_CPU, reason="needs the native CPU backend")
@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() == "DEFAULT", reason="no AVX: only the generic scans")
def test_avx_scans_give_the_generic_scans_results_bit_for_bit():
    """float32 and float64 solves (every width up to 40, the thresholds' sizes, each path, warm starts) with the
    AVX scans and with MERGING_KERNELS_CPU_ISA=generic: the same assignments, duals and status bit for bit."""
    import os
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    runs = {}
    for isa in ("", "generic"):
        env = dict(os.environ, MERGING_KERNELS_CPU_ISA=isa, OMP_NUM_THREADS="1")
        done = subprocess.run([sys.executable, "-c", AVX_VS_GENERIC, here], env=env, capture_output=True, text=True,
                              timeout=600, cwd=here)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[isa] = done.stdout.splitlines()
    assert len(runs[""]) == len(runs["generic"]) > 1000
    differ = [a for a, b in zip(runs[""], runs["generic"]) if a != b]
    assert not differ, differ[:5]


# --------------------------------------------------------------------------- near the float maximum

# Costs near float64's maximum: reduced costs c - u - v overflow into +inf (read as forbidden pairs), which
# gave false "infeasible" errors and worse-than-optimal assignments. The native solvers now report such
# entries on their first scan, and linear_sum_assignment rescales by a power of two (exact) and solves
# again. Each case meets the huge entries in a different first scan.
NEAR_MAX_CASES = {
    "square-in-place": ((6, 6), False),  # dense column reduction reads the costs in place
    "square-maximize": ((6, 6), True),   # converted copy (sign change)
    "wide-in-place": ((5, 8), False),    # rectangular check in place
    "tall-transposed": ((8, 5), False),  # transposed copy
    "sparse-first-pass": ((800, 800), False),  # n >= 768: the sparse path's column minima
}


def near_max_cost(shape, seed, top=1.7e308):
    return (np.random.default_rng(seed).random(shape) * 2 - 1) * top


def total_scaled(cost, rows, cols, scale=2.0 ** -60):  # exact: a power of two, no overflow in the sum
    return float(np.sum(cost[rows, cols] * scale))


@pytest.mark.parametrize("case", list(NEAR_MAX_CASES))
@pytest.mark.parametrize("backend, device", [pytest.param("torch", "cpu", id="torch-cpu")]
                         + [pytest.param(*p.values, id=p.id, marks=p.marks) for p in FAST])
def test_costs_near_the_float64_maximum(backend, device, case):
    shape, maximize = NEAR_MAX_CASES[case]
    if backend == "torch" and shape[0] > 100:
        pytest.skip("the reference is slow")
    seeds = range(12) if shape[0] < 100 else range(1)
    for seed in seeds:
        cost = near_max_cost(shape, seed)
        r0, c0 = scipy_lsa(cost * 2.0 ** -30, maximize=maximize)  # scipy itself overflows at full scale
        rows, cols = (x.cpu().numpy() for x in mk.linear_sum_assignment(
            torch.from_numpy(cost).to(device), maximize, backend=backend))
        assert len(set(cols.tolist())) == len(cols) == min(shape)
        assert total_scaled(cost, rows, cols) == pytest.approx(total_scaled(cost, r0, c0), rel=1e-12, abs=1e-12 * 2.0 ** 964)
        try:  # the duals, where they fit float64, certify the optimum (checked at a scale where c - u - v fits)
            rows, cols, u, v = (x.cpu().numpy() for x in mk.linear_sum_assignment(
                torch.from_numpy(cost).to(device), maximize, return_duals=True, backend=backend))
        except ValueError as exc:
            assert "dual potentials" in str(exc) and "range" in str(exc)
            continue
        k = 2.0 ** -4
        assert mk.check_assignment(cost * k, rows, cols, u * k, v * k, maximize=maximize)


@pytest.mark.parametrize("backend, device", [pytest.param("torch", "cpu", id="torch-cpu")]
                         + [pytest.param(*p.values, id=p.id, marks=p.marks) for p in FAST])
def test_float32_costs_near_the_float32_maximum(backend, device):
    for seed in range(6):
        cost = near_max_cost((7, 7), seed, top=3.3e38).astype(np.float32)
        want = total_scaled(cost.astype(np.float64), *scipy_lsa(cost.astype(np.float64)))  # far from overflow
        for compute_dtype in (torch.float32, torch.float64):
            rows, cols = (x.cpu().numpy() for x in mk.linear_sum_assignment(
                torch.from_numpy(cost).to(device), backend=backend, compute_dtype=compute_dtype))
            got = total_scaled(cost.astype(np.float64), rows, cols)
            assert got == pytest.approx(want, rel=1e-5, abs=1e-5 * 2.0 ** 68), compute_dtype


@pytest.mark.parametrize("compute_dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("backend, device", [pytest.param("torch", "cpu", id="torch-cpu")]
                         + [pytest.param(*p.values, id=p.id, marks=p.marks) for p in FAST])
def test_rescaling_is_per_problem_in_a_batch(backend, device, compute_dtype):
    # a near-maximum problem is rescaled alone: the tiny costs of the others must not underflow with it
    # top: beyond the safe magnitude (rescaled by 2^-20..-24) yet with duals that fit; tiny: near the smallest
    # normal number, so that the same rescaling would turn them subnormal or zero
    top, tiny = (1e37, 1e-38) if compute_dtype == torch.float32 else (1e307, 1e-305)
    rng = np.random.default_rng(8)
    batch = np.stack([near_max_cost((3, 3), 0, top), (1 + rng.random((3, 3))) * tiny,
                      (1 + 2 * rng.random((3, 3))) * tiny, near_max_cost((3, 3), 1, top)])
    rows, cols, u, v = (x.cpu().numpy() for x in mk.linear_sum_assignment(
        torch.from_numpy(batch).to(device), return_duals=True, backend=backend, compute_dtype=compute_dtype))
    for b, cost in enumerate(batch):
        alone = mk.linear_sum_assignment(torch.from_numpy(cost).to(device), backend=backend,
                                         compute_dtype=compute_dtype)[1].cpu().numpy()
        want = scipy_lsa(cost * 2.0 ** -30)[1]
        assert np.array_equal(cols[b], want) and np.array_equal(alone, want), b
    for b in (1, 2):
        assert mk.check_assignment(batch[b], rows[b], cols[b], u[b], v[b])


# --------------------------------------------------------------------------- near the smallest magnitudes

# A float32 solve of float64 costs rounds them to float32: 1e-50 became 0 (any assignment read as optimal, duals 0)
# and entries below 2**-126 lost their precision to subnormals. linear_sum_assignment now scales such problems up by
# a power of two (exact) first. Solves in the costs' own dtype take tiny costs as they are: entries are exact and
# sums of subnormals too (test_subnormal_costs_in_their_own_dtype).
TINY_EXPONENTS = [-40, -61, -100, -126, -130, -134, -140, -160, -300, -1000]


@pytest.mark.parametrize("backend, device", [pytest.param("torch", "cpu", id="torch-cpu")]
                         + [pytest.param(*p.values, id=p.id, marks=p.marks) for p in FAST])
def test_tiny_float64_costs_in_a_float32_solve(backend, device):
    def lsa(cost, maximize=False, return_duals=False):
        out = mk.linear_sum_assignment(torch.from_numpy(cost).to(device), maximize, return_duals=return_duals,
                                       backend=backend, compute_dtype=torch.float32)
        return tuple(x.cpu().numpy() for x in out)

    c = np.array([[1e-50, 3e-50], [3e-50, 2e-50]])  # the audit's case: cols [1, 0] (cost 6e-50), duals 0
    for maximize, want in ((False, [0, 1]), (True, [1, 0])):
        assert lsa(c, maximize)[1].tolist() == want == scipy_lsa(c, maximize=maximize)[1].tolist()
    rng = np.random.default_rng(12)
    for e in TINY_EXPONENTS:
        for shape in ((9, 9), (5, 12), (12, 5)):
            for maximize in (False, True):
                cost = rng.random(shape) * 2.0 ** e
                rows, cols = lsa(cost, maximize)
                k = 2.0 ** -e  # totals compared where float64 is exact and far from the subnormals
                want = total(cost * k, *scipy_lsa(cost, maximize=maximize))
                assert total(cost * k, rows, cols) == pytest.approx(want, rel=1e-5), (e, shape, maximize)
                if e >= -134:  # float32 duals that certify it, in the caller's units
                    rows, cols, u, v = lsa(cost, maximize, return_duals=True)
                    assert u.dtype == np.float32 and mk.check_assignment(cost, rows, cols, u, v, maximize=maximize)
                elif e <= -140:  # no float32 duals can certify these: refused, not zeros
                    with pytest.raises(ValueError, match="dual potentials.*below torch.float32's normal range"):
                        lsa(cost, maximize, return_duals=True)
    ints = rng.integers(0, 4, (9, 9))  # in units of the smallest float64 magnitude, 2**-1074
    assert total(ints, *lsa(ints * 2.0 ** -1074)) == total(ints, *scipy_lsa(ints))


@pytest.mark.parametrize("backend, device", [pytest.param("torch", "cpu", id="torch-cpu")]
                         + [pytest.param(*p.values, id=p.id, marks=p.marks) for p in FAST])
def test_tiny_costs_are_scaled_up_per_problem_in_a_batch(backend, device):
    rng = np.random.default_rng(13)
    forbidden = np.where(np.eye(4, dtype=bool), 2.0 ** -149, np.inf)  # no finite nonzero entry: left as it is
    batch = np.stack([near_max_cost((4, 4), 2, 1e37), rng.random((4, 4)) * 1e-50, np.zeros((4, 4)),
                      rng.random((4, 4)), forbidden, rng.random((4, 4)) * 1e-40, np.full((4, 4), np.inf)])
    batch[-1, np.arange(4), [1, 2, 3, 0]] = 0.0  # only zeros allowed
    out = mk.linear_sum_assignment(torch.from_numpy(batch).to(device), backend=backend, compute_dtype=torch.float32)
    rows, cols = (x.cpu().numpy() for x in out)
    for b, cost in enumerate(batch):
        k = 2.0 ** -30 if b == 0 else 2.0 ** 140
        assert total(cost * k, rows[b], cols[b]) == pytest.approx(total(cost * k, *scipy_lsa(cost * k)), rel=1e-5), b
    assert cols[-1].tolist() == [1, 2, 3, 0] and cols[-3].tolist() == [0, 1, 2, 3]
    keep = [0, 2, 3, 4, 5, 6]  # without the 1e-50 problem, whose float32 duals would be 0: refused by its index
    with pytest.raises(ValueError, match=r"below torch.float32's normal range.*\(problem 1 of the batch\)"):
        mk.linear_sum_assignment(torch.from_numpy(batch).to(device), return_duals=True, backend=backend,
                                 compute_dtype=torch.float32)
    rows, cols, u, v = (x.cpu().numpy() for x in mk.linear_sum_assignment(
        torch.from_numpy(batch[keep]).to(device), return_duals=True, backend=backend, compute_dtype=torch.float32))
    for i, b in enumerate(keep[1:], 1):
        assert mk.check_assignment(batch[b], rows[i], cols[i], u[i], v[i]), b
    assert mk.check_assignment(batch[0] * 2.0 ** -4, rows[0], cols[0], u[0] * 2.0 ** -4, v[0] * 2.0 ** -4)


def test_range_exponents():
    big = torch.tensor([0.0, 1e-50, 1.0, 2.0 ** -60, 2.0 ** -61, 1e37, 2.0 ** -1074], dtype=torch.float64)
    got = la._range_exponents(big, torch.float32, True)
    assert got.tolist() == [0, 166, 0, 0, 60, 100 - 123, 1073]  # largest |cost| to [0.5, 1); 1e37 < 2**123
    assert la._range_exponents(big[:5], torch.float32, False) is None  # costs solved in their own dtype
    assert la._range_exponents(big[:5], torch.float64, False) is None
    assert la._range_exponents(torch.zeros(3, dtype=torch.float64), torch.float32, True) is None


@pytest.mark.parametrize("scale", [1e-300, 1e-308, 1e-310, 1e-315, 1e-320, 1e-322])
@pytest.mark.parametrize("backend, device, method", ALL)
def test_subnormal_costs_in_their_own_dtype(backend, device, method, scale):
    """float64 costs near and in float64's subnormals, float32 costs in float32's: solved as they are, exactly
    (no rescaling: the entries are exact, and so are sums and differences of subnormals)."""
    rng = np.random.default_rng(14)
    for kind, shape in (("uniform", (9, 9)), ("int_ties", (17, 40)), ("mixed", (40, 17))):
        cost = {"uniform": rng.random(shape), "int_ties": rng.integers(0, 4, shape).astype(np.float64),
                "mixed": rng.standard_normal(shape) * 10.0 ** rng.integers(-3, 4, shape) / 1e3}[kind] * scale
        rows, cols, u, v = solve(cost, backend, device, method)
        k = 2.0 ** 1000
        assert total(cost * k, rows, cols) == pytest.approx(total(cost * k, *scipy_lsa(cost)), rel=1e-12), kind
        assert mk.check_assignment(cost, rows, cols, u, v)  # its tol has no floor any more
    scale32 = {1e-300: 1e-30, 1e-308: 1e-36, 1e-310: 1e-38, 1e-315: 1e-40, 1e-320: 1e-43, 1e-322: 1e-44}[scale]
    cost32 = (rng.random((9, 9)) * scale32).astype(np.float32)  # float32's subnormals from 1e-38 on
    assert cost32.any()
    rows, cols, u, v = solve(cost32, backend, device, method, compute_dtype=torch.float32)
    c64 = cost32.astype(np.float64)
    assert total(c64 * 2.0 ** 150, rows, cols) == pytest.approx(total(c64 * 2.0 ** 150, *scipy_lsa(c64)), rel=1e-5)
    assert mk.check_assignment(cost32, rows, cols, u, v)


def test_check_assignment_tolerance_is_per_problem_without_a_floor():
    # the default tol was 4096 ulps of max(largest |cost|, |u|, |v| over the whole batch, 1e-300): tiny costs, or a
    # problem of tiny costs batched with larger ones, certified wrong assignments
    c = np.array([[1.0, 3.0], [3.0, 2.0]])
    rows, wrong = np.array([0, 1]), np.array([1, 0])  # total 6, the optimum is 3
    for scale in (1e-300, 1e-310, 1e-320):
        for dtype in (np.float64, np.float32):
            assert not mk.check_assignment(c * scale, rows, wrong, np.zeros(2, dtype), np.zeros(2, dtype)), scale
        assert mk.check_assignment(c * scale, *mk.linear_sum_assignment(c * scale, return_duals=True))
    batch = np.stack([c, c * 1e-20])
    u = np.array([[1.0, 2.0], [0.0, 0.0]])
    assert not mk.check_assignment(batch, np.stack([rows, rows]), np.stack([rows, wrong]), u, np.zeros((2, 2)))
    assert mk.check_assignment(batch, *mk.linear_sum_assignment(batch, return_duals=True))
    assert mk.check_assignment(np.zeros((3, 3)), *mk.linear_sum_assignment(np.zeros((3, 3)), return_duals=True))


@pytest.mark.skipif(not NATIVE_CPU, reason="native backend not built")
def test_native_paths_report_out_of_range_and_invalid_first():
    # each first scan reports status 3 (out of range: the caller rescales); a NaN anywhere still wins (2)
    team = lambda t3, maximize: la._solve_team_serial(t3, maximize, torch.float64, True)[4]  # noqa: E731
    dense = lambda t3, maximize: la._solve_native_cpu(t3, maximize, torch.float64, True,  # noqa: E731
                                                      method=la.METHOD_DENSE)[4]
    sparse = lambda t3, maximize: la._solve_native_cpu(t3, maximize, torch.float64, True,  # noqa: E731
                                                       method=la.METHOD_SPARSE)[4]
    for name, (shape, maximize) in NEAR_MAX_CASES.items():
        for path in (dense, sparse, team):
            if path is team and shape[0] > 100:
                continue
            t3 = torch.from_numpy(near_max_cost(shape, 0))[None].contiguous()
            assert path(t3, maximize).tolist() == [la.STATUS_OUT_OF_RANGE], name
            t3[0, 1, 2] = np.nan
            assert path(t3, maximize).tolist() == [2], name
            ok = (t3 * 0.0).nan_to_num(0.0) + 1.0
            ok[0, 0, 0] = 2.0 ** 1000  # the largest magnitude taken as it is
            assert path(ok, maximize).tolist() == [0], name


# --------------------------------------------------------------------------- infeasible and invalid


INFEASIBLE = {
    "column": np.array([[np.inf, 1.0], [np.inf, 2.0]]),
    "row": np.array([[1.0, 2.0, 3.0], [np.inf, np.inf, np.inf]]),
    "hall": np.where(np.add.outer(np.arange(20), np.zeros(20)) < 5,
                     np.where(np.arange(20) < 4, 1.0, np.inf), 1.0),  # 5 rows share 4 columns
    "rect": np.where(np.arange(6)[None, :] < 2, 1.0, np.inf) * np.ones((3, 6)),  # 3 rows, 2 allowed columns
}


@pytest.mark.parametrize("case", list(INFEASIBLE))
@pytest.mark.parametrize("backend, device, method", ALL)
def test_infeasible(backend, device, method, case):
    cost = INFEASIBLE[case]
    with pytest.raises(ValueError, match="infeasible"):
        scipy_lsa(cost)
    with pytest.raises(ValueError, match="infeasible"):
        solve(cost, backend, device, method)
    with pytest.raises(ValueError, match="infeasible"):
        solve(cost.T.copy(), backend, device, method)
    with pytest.raises(ValueError, match="infeasible"):  # -inf forbids when maximizing
        solve(-cost, backend, device, method, maximize=True)


@pytest.mark.parametrize("backend, device, method", ALL)
def test_invalid_entries(backend, device, method):
    for cost, maximize in [(np.array([[np.nan, 1.0], [1.0, 2.0]]), False),
                           (np.array([[-np.inf, 1.0], [1.0, 2.0]]), False),
                           (np.array([[np.inf, 1.0], [1.0, 2.0]]), True)]:
        with pytest.raises(ValueError, match="invalid numeric entries"):
            scipy_lsa(cost, maximize=maximize)
        with pytest.raises(ValueError, match="invalid numeric entries"):
            solve(cost, backend, device, method, maximize=maximize)


@pytest.mark.parametrize("backend, device, method", ALL)
def test_batch_errors_name_the_problem(backend, device, method):
    batch = np.stack([make_cost("uniform", 6, 6, seed=s) for s in range(4)])
    bad = batch.copy()
    bad[2, 3, 1] = np.nan
    with pytest.raises(ValueError, match=r"invalid numeric entries.*problem 2 of the batch"):
        solve(bad, backend, device, method)
    infeasible = batch.copy()
    infeasible[3, :, 0] = np.inf
    with pytest.raises(ValueError, match=r"infeasible \(problem 3 of the batch\)"):
        solve(infeasible, backend, device, method)


# --------------------------------------------------------------------------- batches, types, determinism


@pytest.mark.parametrize("shape", [(6, 17, 17), (5, 7, 12), (5, 12, 7), (3, 256, 256), (40, 3, 3)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend, device, method", ALL)
def test_batched_equals_per_problem(backend, device, method, shape):
    if backend == "torch" and shape[1] == 256:
        pytest.skip("slow in the reference")
    kinds = ["uniform", "int_ties", "correlated", "forbidden"]
    batch = np.stack([make_cost(kinds[b % len(kinds)], *shape[1:], seed=b) for b in range(shape[0])])
    rows, cols, u, v = solve(batch, backend, device, method)
    assert rows.shape == cols.shape == (shape[0], min(shape[1:]))
    assert u.shape == shape[:2] and v.shape == (shape[0], shape[2])
    for b in range(shape[0]):
        one = solve(batch[b], backend, device, method)
        for got, want in zip((rows[b], cols[b], u[b], v[b]), one):
            np.testing.assert_array_equal(got, want)
        assert_optimal(batch[b], rows[b], cols[b], u[b], v[b])
    assert mk.check_assignment(batch, rows, cols, u, v)


@pytest.mark.parametrize("backend, device, method", ALL)
def test_deterministic(backend, device, method):
    cost = make_cost("int_ties", 64, 64, seed=7)  # many optima
    first = solve(cost, backend, device, method)
    for _ in range(2):
        for a, b in zip(first, solve(cost, backend, device, method)):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("backend", ["torch", "native"] if NATIVE_CPU else ["torch"])
def test_types_like_scipy(backend):
    cost = make_cost("uniform", 5, 7)
    rows, cols = mk.linear_sum_assignment(cost, backend=backend)
    r0, c0 = scipy_lsa(cost)
    assert isinstance(rows, np.ndarray) and rows.dtype == np.int64 and cols.dtype == np.int64
    np.testing.assert_array_equal(rows, r0)
    assert total(cost, rows, cols) == pytest.approx(total(cost, r0, c0), rel=1e-12)
    # torch in, torch out; float32, integers, bool, lists, non-contiguous views
    t_rows, t_cols = mk.linear_sum_assignment(torch.tensor(cost, dtype=torch.float32), backend=backend)
    assert isinstance(t_rows, torch.Tensor) and t_rows.dtype == torch.int64
    ints = (cost * 100).astype(np.int32)
    r, c = mk.linear_sum_assignment(ints, backend=backend)
    assert total(ints, r, c) == total(ints, *scipy_lsa(ints))
    r, c = mk.linear_sum_assignment(ints.tolist(), maximize=True, backend=backend)
    assert total(ints, r, c) == total(ints, *scipy_lsa(ints, maximize=True))
    r, c = mk.linear_sum_assignment(ints > 50, backend=backend)
    assert total(ints > 50, r, c) == total(ints > 50, *scipy_lsa(ints > 50))
    view = torch.tensor(cost).T  # non-contiguous
    r, c = mk.linear_sum_assignment(view, backend=backend)
    assert total(cost.T, r.numpy(), c.numpy()) == pytest.approx(total(cost.T, *scipy_lsa(cost.T)), rel=1e-12)


@pytest.mark.skipif(not NATIVE_CPU, reason="needs the native CPU backend")
@pytest.mark.parametrize("case", ["f64", "f32", "f16", "int", "bool", "batch", "wide", "tall", "maximize",
                                  "duals_f32", "readonly"])
def test_numpy_fast_path_equals_the_tensor_path(case, monkeypatch):
    """numpy costs and CPU tensors go straight from the array to _C (a few µs a call instead of ~20 for
    small problems): same answer as the general path, bit for bit, duals included."""
    rng = np.random.default_rng(0)
    cost = {"f32": rng.random((9, 9), dtype=np.float32), "duals_f32": rng.random((9, 9), dtype=np.float32),
            "f16": rng.random((9, 9)).astype(np.float16),
            "int": rng.integers(0, 4, (9, 9)), "bool": rng.random((9, 9)) > 0.5, "batch": rng.random((5, 6, 6)),
            "wide": rng.random((4, 9)), "tall": rng.random((9, 4))}.get(case, rng.standard_normal((9, 9)))
    if case == "readonly":
        cost.flags.writeable = False
    kwargs = dict(maximize=case == "maximize", return_duals=True,
                  compute_dtype=torch.float32 if case == "duals_f32" else None)
    with monkeypatch.context() as m:
        m.setattr(la, "_solve_numpy_fast", lambda *a: None)
        want = mk.linear_sum_assignment(cost, **kwargs)  # the general path
    calls = []
    real = la._solve_native_cpu
    monkeypatch.setattr(la, "_solve_native_cpu", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = mk.linear_sum_assignment(cost, **kwargs)
    tensor = torch.from_numpy(np.array(cost)).requires_grad_(cost.dtype.kind == "f")
    got_tensor = mk.linear_sum_assignment(tensor.mT.contiguous().mT, **kwargs)  # non-contiguous too
    assert not calls  # the fast path served both
    for g, t, w in zip(got, got_tensor, want):
        assert isinstance(g, np.ndarray) and g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(g, w)
        assert isinstance(t, torch.Tensor) and not t.requires_grad
        np.testing.assert_array_equal(t.numpy(), w)
    assert mk.check_assignment(cost, *got, maximize=kwargs["maximize"])
    rows, cols = mk.linear_sum_assignment(cost, maximize=kwargs["maximize"])  # without duals too
    np.testing.assert_array_equal(cols, want[1])


def test_equal_but_not_identical_dtypes_and_neg_views_are_solved():
    import pickle

    cost = np.random.default_rng(3).random((4, 5))
    want = scipy_lsa(cost)[1]
    for same in (pickle.loads(pickle.dumps(cost)), cost.astype(">f8"), cost.astype(np.dtype("f8", metadata={"x": 1})),
                 cost.astype(">f4").astype(np.float64)):
        np.testing.assert_array_equal(mk.linear_sum_assignment(same)[1], want)  # these raised in the fast path
    neg = torch.complex(torch.zeros_like(torch.from_numpy(cost)), -torch.from_numpy(cost)).conj().imag  # neg bit
    assert neg.is_neg()
    np.testing.assert_array_equal(mk.linear_sum_assignment(neg)[1].numpy(), want)
    rows, cols, u, v = mk.linear_sum_assignment(cost, return_duals=1)  # 0/1 like maximize (and scipy's maximize)
    assert mk.check_assignment(cost, rows, cols, u, v)


@pytest.mark.skipif(not NATIVE_CPU, reason="needs the native CPU backend")
def test_numpy_fast_path_hands_every_non_ok_status_to_the_general_path():
    nan = np.ones((2, 3, 3))
    nan[1, 0, 2] = np.nan
    with pytest.raises(ValueError, match=r"invalid numeric entries.*\(problem 1 of the batch\)"):
        mk.linear_sum_assignment(nan)
    infeasible = np.full((3, 3), np.inf)
    infeasible[0, 0] = 1.0
    with pytest.raises(ValueError, match="infeasible"):
        mk.linear_sum_assignment(infeasible)
    huge = np.random.default_rng(1).uniform(-1.0, 1.0, (6, 6)) * 1.7e308  # out of range: rescaled, solved
    rows, cols = mk.linear_sum_assignment(huge)
    np.testing.assert_array_equal(cols, mk.linear_sum_assignment(torch.from_numpy(huge))[1].numpy())
    assert mk.check_assignment(huge * 2.0 ** -64, rows, cols,
                               *mk.linear_sum_assignment(huge * 2.0 ** -64, return_duals=True)[2:])
    with pytest.raises(ValueError, match="float32's range"):  # float64 costs, float32 compute: checked
        mk.linear_sum_assignment(np.full((2, 2), 1e39), compute_dtype=torch.float32)
    empty = mk.linear_sum_assignment(np.zeros((0, 3)), return_duals=True)
    assert [x.shape for x in empty] == [(0,), (0,), (0,), (3,)]


@pytest.mark.skipif(not NATIVE_CPU, reason="needs the native CPU backend")
def test_numpy_binding_refuses_arrays_it_cannot_read():
    from merging_kernels._native import native_module

    solve = native_module("cpu").lsa_solve_cpu_array
    for bad, match in [(np.zeros(3), "2-D or 3-D"), (np.zeros((1, 4, 4))[:, ::2], "C-contiguous"),
                       (np.zeros((1, 3, 3), dtype=np.int64), "float32 or float64"),
                       (np.zeros((1, 3, 3), dtype=">f8"), "byte order")]:
        with pytest.raises(ValueError, match=match):
            solve(bad, False, False, False)
    cost = make_cost("uniform", 5, 7, seed=1)  # a 2-D cost is one problem with 1-D outputs
    rows, cols, u, v, ok = solve(cost, False, False, True)
    rows3, cols3, u3, v3, ok3 = solve(cost[None], False, False, True)
    assert ok and ok3 and rows.shape == (5,) and u.shape == (5,) and v.shape == (7,)
    for one, batched in ((rows, rows3), (cols, cols3), (u, u3), (v, v3)):
        assert np.array_equal(one, batched[0])


def test_bad_arguments():
    with pytest.raises(ValueError, match="2-D"):
        mk.linear_sum_assignment(np.zeros(3))
    with pytest.raises(ValueError, match="2-D"):
        mk.linear_sum_assignment(np.zeros((2, 2, 2, 2)))
    with pytest.raises(TypeError, match="real"):
        mk.linear_sum_assignment(np.zeros((2, 2), dtype=np.complex128))
    with pytest.raises(TypeError, match="maximize"):
        mk.linear_sum_assignment(np.zeros((2, 2)), "yes")
    cost = make_cost("uniform", 6, 6, seed=3)
    r, c = mk.linear_sum_assignment(cost, 1)  # scipy takes 0/1 for maximize
    assert total(cost, r, c) == pytest.approx(total(cost, *scipy_lsa(cost, maximize=True)), rel=1e-12)
    with pytest.raises(ValueError, match=r"got shape \(\)"):
        mk.linear_sum_assignment(np.float64(3.0))
    read_only = cost.copy()
    read_only.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch.from_numpy warns on read-only arrays
        r, c = mk.linear_sum_assignment(read_only)
    np.testing.assert_array_equal(c, scipy_lsa(cost)[1])
    with pytest.raises(ValueError, match="compute_dtype"):
        mk.linear_sum_assignment(np.zeros((2, 2)), compute_dtype=torch.float16)
    with pytest.raises(ValueError, match="backend"):
        mk.linear_sum_assignment(np.zeros((2, 2)), backend="scipy")


@pytest.mark.parametrize("backend", [None, "torch"] + (["native"] if NATIVE_CPU else []))
def test_complex_tensors_are_refused(backend):
    c = make_cost("uniform", 4, 4, seed=15)
    with pytest.raises(TypeError):  # scipy refuses complex costs with TypeError (numpy input: already ours too)
        scipy_lsa(c.astype(np.complex128))
    for dtype in (torch.complex128, torch.complex64):
        with pytest.raises(TypeError, match="cost must be real"):
            mk.linear_sum_assignment(torch.from_numpy(c).to(dtype), backend=backend)
    rows, cols, u, v = mk.linear_sum_assignment(torch.from_numpy(c), return_duals=True, backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the casts used to warn, drop the imaginary part and certify
        for i, name in ((0, "cost"), (3, "u"), (4, "v")):
            args = [torch.from_numpy(c), rows, cols, u, v]
            args[i] = args[i].to(torch.complex128) + 100j
            with pytest.raises(TypeError, match=f"{name} must be real"):
                mk.check_assignment(*args)
        with pytest.raises(TypeError, match="u must hold real numbers"):  # numpy: as before
            mk.check_assignment(c, rows, cols, u.numpy() + 1j, v)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("backend", [None, "torch"] + (["native"] if NATIVE_CPU else []))
def test_sparse_tensors_are_refused(backend):
    # these failed deep inside: "unsupported memory format option Contiguous" (native), NotImplementedError
    # ... SparseCPU (torch), "Sparse CSR tensors do not have strides"; scipy's sparse matrices are refused too
    c = torch.from_numpy(make_cost("uniform", 4, 5, seed=16))
    rows, cols, u, v = mk.linear_sum_assignment(c, return_duals=True, backend=backend)
    for sparse in (lambda t: t.to_sparse(), lambda t: t.to_sparse_csr(), lambda t: t.to_sparse_csc()):
        with pytest.raises(TypeError, match="cost must be a dense tensor, got layout torch.sparse"):
            mk.linear_sum_assignment(sparse(c), backend=backend)
        with pytest.raises(TypeError, match="cost must be a dense tensor"):
            mk.linear_sum_assignment(sparse(c)[None] if sparse(c).layout == torch.sparse_coo else sparse(c),
                                     return_duals=True, backend=backend)
        args = [c, rows, cols, u, v]
        for i, name in enumerate(("cost", "rows", "cols", "u", "v")):
            bad = list(args)
            bad[i] = sparse(bad[i]) if bad[i].dim() == 2 else bad[i].to_sparse()
            with pytest.raises(TypeError, match=f"{name} must be a dense tensor"):
                mk.check_assignment(*bad)
    assert mk.check_assignment(*args)
    import scipy.sparse

    with pytest.raises(TypeError, match="cost must hold real numbers"):
        mk.linear_sum_assignment(scipy.sparse.csr_array(c.numpy()), backend=backend)


@pytest.mark.parametrize("shape", [(1, la.MAX_DIMENSION + 1), (la.MAX_DIMENSION + 1, 1), (2, 1, 2**31)])
@pytest.mark.parametrize("backend", [None, "torch"])
def test_more_rows_or_columns_than_the_solvers_index_are_refused(shape, backend):
    # the native solvers count rows and columns in int32: refused by name before anything is read or copied
    cost = torch.zeros(()).expand(shape)  # no memory behind it
    with pytest.raises(ValueError, match=rf"cost has shape \({shape[0]}, .*at most {la.MAX_DIMENSION}"):
        mk.linear_sum_assignment(cost, backend=backend)
    edge = torch.zeros(()).expand(3, 1)  # ordinary sizes still pass the same check
    assert mk.linear_sum_assignment(edge, backend=backend)[1].tolist() == [0]


def test_argument_checks_found_by_the_input_audit():
    c = np.array([[1.0, 2.0], [3.0, 0.0]])
    rows, cols, u, v = mk.linear_sum_assignment(c, return_duals=True)
    bad = np.array([1, 0])  # total 5, the optimum is 1
    for tol, error in [(float("nan"), ValueError), (float("inf"), ValueError), (-1e-9, ValueError),
                       ("x", TypeError)]:
        with pytest.raises(error, match="tol"):  # NaN and inf used to certify the wrong assignment
            mk.check_assignment(c, rows, bad, u, v, tol=tol)
    assert mk.check_assignment(c, rows, cols, u, v, tol=0.0)
    with pytest.raises(ValueError, match="rows must hold integer"):  # 1.9 used to read as row 1
        mk.check_assignment(c, np.array([0.0, 1.9]), np.array([0.0, 1.0]), u, v)
    assert mk.check_assignment(c, np.array([0.0, 1.0]), np.array([0.0, 1.0]), u, v)  # integral floats are fine
    with pytest.raises(TypeError, match="cols must hold integer"):
        mk.check_assignment(c, rows, np.array([True, False]), u, v)
    with pytest.raises(TypeError, match="maximize"):  # "no" used to mean True
        mk.check_assignment(c, rows, cols, u, v, maximize="no")
    for backend in ["torch"] + (["native"] if NATIVE_CPU else []):
        for cost in (c, torch.from_numpy(c)):
            with pytest.raises(TypeError, match="return_duals"):  # the torch backend took "no" as True
                mk.linear_sum_assignment(cost, return_duals="no", backend=backend)
    meta = torch.zeros(2, 2, device="meta")
    with pytest.raises(ValueError, match="cost is on the meta device"):
        mk.linear_sum_assignment(meta)
    with pytest.raises(ValueError, match="meta device"):
        mk.check_assignment(meta, *[torch.zeros(2, device="meta")] * 4)


def test_check_assignment_rejects_what_is_not_proven():
    cost = make_cost("uniform", 30, 30, seed=8)
    rows, cols, u, v = mk.linear_sum_assignment(cost, return_duals=True)
    assert mk.check_assignment(cost, rows, cols, u, v)
    swapped = cols.copy()
    swapped[[0, 1]] = swapped[[1, 0]]
    assert not mk.check_assignment(cost, rows, swapped, u, v)  # not tight any more
    assert not mk.check_assignment(cost, rows, cols, u + 1e-3, v)  # infeasible duals
    assert not mk.check_assignment(cost, rows[:-1], cols[:-1], u, v)  # too few pairs
    repeated = cols.copy()
    repeated[0] = repeated[1]
    assert not mk.check_assignment(cost, rows, repeated, u, v)
    # rectangular: the larger side's duals must be <= 0 and 0 where unassigned
    wide = make_cost("uniform", 4, 9, seed=9)
    r, c, u, v = mk.linear_sum_assignment(wide, return_duals=True)
    assert mk.check_assignment(wide, r, c, u, v)
    assert not mk.check_assignment(wide, r, c, u - 1.0, v + 1.0)  # feasible and tight, but not a proof
    # a forbidden pair on the assignment is never optimal
    forbidden = cost.copy()
    forbidden[rows[0], cols[0]] = np.inf
    assert not mk.check_assignment(forbidden, rows, cols, u, v)


@pytest.mark.skipif(not NATIVE_CPU, reason="native backend not built")
def test_sparse_path_is_used_and_exact_on_large_problems():
    cost = make_cost("uniform", 1500, 1500, seed=10)
    rows, cols, u, v, status, stats = la._solve_native_cpu(torch.from_numpy(cost)[None], False, torch.float64,
                                                           True)
    assert int(status[0]) == 0 and stats["used_sparse"] == 1
    assert_optimal(cost, rows[0].numpy(), cols[0].numpy(), u[0].numpy(), v[0].numpy())


# --------------------------------------------------------------------------- warm start (column potentials)


def _cold_duals(cost, maximize=False):
    return mk.linear_sum_assignment(torch.as_tensor(cost), maximize, return_duals=True)[3]


def warm_potentials(kind, cost, maximize=False, seed=0):
    """Column potentials of several qualities for a square cost: the optimal ones, those of a nearby problem,
    unrelated noise, zeros, and a spread no dual of these costs can have (the solver starts cold then)."""
    rng = np.random.default_rng(seed)
    m = cost.shape[-1]
    finite = np.abs(cost[np.isfinite(cost)])
    scale = float(finite.max(initial=0.0)) or 1.0
    if kind == "own":
        return _cold_duals(cost, maximize).numpy()
    if kind == "nearby":
        noisy = np.where(np.isfinite(cost), cost + 0.05 * scale * rng.standard_normal(cost.shape), cost)
        return _cold_duals(noisy, maximize).numpy()
    if kind == "noise":
        return scale * rng.standard_normal(m)
    if kind == "zeros":
        return np.zeros(m)
    if kind == "wide":
        return np.where(np.arange(m) % 2 == 0, 1.0, -1.0) * (4 * m + 4) * scale
    raise AssertionError(kind)


WARM_KINDS = ["own", "nearby", "noise", "zeros", "wide"]


@pytest.mark.skipif(not NATIVE_CPU, reason="needs the native CPU backend")
@pytest.mark.parametrize("maximize", [False, True], ids=["min", "max"])
@pytest.mark.parametrize("warm", WARM_KINDS)
@pytest.mark.parametrize("n", [1, 2, 3, 17, 256])
@pytest.mark.parametrize("kind", KINDS)
def test_warm_start_is_optimal_whatever_the_potentials(kind, n, warm, maximize):
    cost = make_cost(kind, n, n, seed=n)
    if maximize:
        cost = np.where(np.isinf(cost), -np.inf, cost)
    v0 = warm_potentials(warm, cost, maximize, seed=n)
    rows, cols, u, v = mk.linear_sum_assignment(cost, maximize, return_duals=True, warm_start=v0)
    assert isinstance(cols, np.ndarray)
    assert_optimal(cost, rows, cols, u, v, maximize=maximize)


@pytest.mark.skipif(not NATIVE_CPU, reason="needs the native CPU backend")
@pytest.mark.parametrize("maximize", [False, True], ids=["min", "max"])
@pytest.mark.parametrize("warm", WARM_KINDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", [la.METHOD_DENSE, la.METHOD_SPARSE], ids=["dense", "sparse"])
def test_warm_start_of_each_native_path_is_optimal(method, kind, warm, maximize):
    """Both starts: the dense one (one augmenting-row-reduction pass from the potentials) and the sparse one
    (each row's best column where free, candidate lists for the rest, certified against the dense rows)."""
    cost = make_cost(kind, 120, 120, seed=11)
    if maximize:
        cost = np.where(np.isinf(cost), -np.inf, cost)
    rows, cols, u, v, stats = _warm_stats(cost, warm_potentials(warm, cost, maximize, seed=11), maximize,
                                          method=method)
    assert_optimal(cost, rows, cols, u, v, maximize=maximize)
    if warm == "own" and kind not in ("all_equal", "rank1", "int_ties"):  # (ties: rows collide, a cold start)
        assert stats["warm_started"] == 1
    if warm == "wide":
        assert stats["warm_started"] == 0


def _warm_stats(cost, v0, maximize=False, compute_dtype=torch.float64, method=la.METHOD_AUTO):
    t3 = torch.as_tensor(cost)[None].contiguous()
    warm = torch.as_tensor(v0, dtype=compute_dtype)[None].contiguous()
    rows, cols, u, v, status, stats = la._solve_native_cpu(t3, maximize, compute_dtype, True, warm_start=warm,
                                                           method=method)
    assert int(status[0]) == 0
    return rows[0].numpy(), cols[0].numpy(), u[0].numpy(), v[0].numpy(), stats


@pytest.mark.skipif(not NATIVE_CPU, reason="needs the native CPU backend")
@pytest.mark.parametrize("kind", ["uniform", "correlated"])
def test_warm_start_from_the_optimal_duals_needs_no_search(kind):
    cost = make_cost(kind, 300, 300, seed=4)
    *sol, stats = _warm_stats(cost, _cold_duals(cost), method=la.METHOD_DENSE)
    cold = la._solve_native_cpu(torch.from_numpy(cost)[None], False, torch.float64, False, method=la.METHOD_DENSE)
    cold = cold[-1]
    assert stats["warm_started"] == 1 and cold["warm_started"] == 0
    # most rows take their tight column at once (the duals have more tight entries, where rows may collide,
    # and displaced rows are retried for 2n steps only); the cold start leaves a third of them to search
    assert stats["free_after_init"] * 2 < cold["free_after_init"]
    assert stats["row_scans"] * 4 < cold["row_scans"]
    assert_optimal(cost, *sol)


@pytest.mark.skipif(not NATIVE_CPU, reason="needs the native CPU backend")
def test_warm_start_from_a_nearby_problem_is_shorter():
    """The MuDSC case: the next sweep's costs are the last ones, slightly changed."""
    rng = np.random.default_rng(5)
    cost = make_cost("correlated", 400, 400, seed=5)
    nearby = cost + 1e-3 * rng.standard_normal(cost.shape)
    *sol, warm = _warm_stats(nearby, _cold_duals(cost), method=la.METHOD_DENSE)
    cold = la._solve_native_cpu(torch.from_numpy(nearby)[None], False, torch.float64, False,
                                method=la.METHOD_DENSE)[-1]
    assert warm["warm_started"] == 1
    assert warm["free_after_init"] * 4 < cold["free_after_init"]
    assert_optimal(nearby, *sol)
    *sol, warm = _warm_stats(nearby, _cold_duals(cost), method=la.METHOD_SPARSE)
    assert warm["warm_started"] == 1 and warm["used_sparse"] == 1
    assert_optimal(nearby, *sol)


@pytest.mark.skipif(not NATIVE_CPU, reason="needs the native CPU backend")
@pytest.mark.parametrize("method", [la.METHOD_DENSE, la.METHOD_SPARSE], ids=["dense", "sparse"])
@pytest.mark.parametrize("case", ["spread", "nan", "poor"])
def test_unusable_or_poor_potentials_fall_back_to_the_cold_start(case, method):
    cost = make_cost("uniform", 200, 200, seed=6)
    if case == "spread":  # beyond n times the largest cost: rounding would swamp the costs
        v0 = np.where(np.arange(200) % 2 == 0, 1e6, -1e6)
    elif case == "nan":  # the Python API refuses it; the solver itself must not take it either
        v0 = np.full(200, np.nan)
    else:  # unrelated potentials of a larger spread than the costs': a third of the rows stay free
        v0 = np.random.default_rng(0).standard_normal(200)
    *sol, stats = _warm_stats(cost, v0, method=method)
    assert stats["warm_started"] == 0
    assert_optimal(cost, *sol)


@pytest.mark.skipif(not NATIVE_CPU, reason="needs the native CPU backend")
@pytest.mark.parametrize("compute_dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("method", [la.METHOD_DENSE, la.METHOD_SPARSE], ids=["dense", "sparse"])
def test_potentials_far_below_the_costs_scale_are_refused(method, compute_dtype):
    """Found by review: potentials within 2n times the largest cost (one outlier of 1e9 among costs of 1e-3)
    were taken, and their rounding gave a total 38% above the optimum that check_assignment's tolerance (scaled
    by the duals) still certified. Now the spread allowed is tied to the costs' row and column minima."""
    n = 300
    rng = np.random.default_rng(12)
    cost = rng.random((n, n)) * 1e-3
    cost[0, 0] = 1e9
    if compute_dtype == torch.float32:
        cost = cost.astype(np.float32).astype(np.float64)
    v0 = _cold_duals(cost).numpy().copy()
    lowered = rng.choice(n, n // 100, replace=False)
    v0[lowered] -= rng.random(len(lowered)) * 2 * n * 1e9 * 0.999
    rows, cols, u, v, stats = _warm_stats(cost, v0, compute_dtype=compute_dtype, method=method)
    assert stats["warm_started"] == 0
    want = total(cost, *scipy_lsa(cost))
    assert abs(total(cost, rows, cols) - want) <= (1e-9 if compute_dtype == torch.float64 else 1e-5) * want


@pytest.mark.skipif(not NATIVE_CPU, reason="needs the native CPU backend")
def test_a_sparse_warm_start_that_gives_up_leaves_the_cold_solve_as_it_was():
    """Found by review: the abandoned start's candidate selections counted against the cold solve's budget."""
    cost = make_cost("uniform", 800, 800, seed=13)
    t3 = torch.from_numpy(cost)[None]
    cold = la._solve_native_cpu(t3, False, torch.float64, True, method=la.METHOD_SPARSE)
    poor = torch.from_numpy(np.random.default_rng(0).standard_normal(800))[None].contiguous()
    warm = la._solve_native_cpu(t3, False, torch.float64, True, method=la.METHOD_SPARSE, warm_start=poor)
    assert warm[-1]["warm_started"] == 0
    assert warm[-1] == cold[-1]
    for a, b in zip(cold[:4], warm[:4]):
        assert torch.equal(a, b)


@pytest.mark.skipif(not NATIVE_CPU, reason="needs the native CPU backend")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_warm_searches_stay_within_their_budget(seed):
    """Potentials within the allowed spread but unrelated to the optimum: the dense start's searches stop at
    32 row scans per row (then the cold solve runs), so such a start costs a bounded multiple of a cold one."""
    n = 400
    cost = make_cost("uniform", n, n, seed=seed)
    spread = np.ptp(cost.min(0)) + np.ptp(cost.min(1))
    v0 = cost.min(0) - np.random.default_rng(seed).random(n) * 3.9 * spread
    rows, cols, u, v, stats = _warm_stats(cost, v0, method=la.METHOD_DENSE)
    assert stats["row_scans"] <= 32 * n + n
    assert_optimal(cost, rows, cols, u, v)


@pytest.mark.skipif(not NATIVE_CPU, reason="needs the native CPU backend")
@pytest.mark.parametrize("maximize", [False, True], ids=["min", "max"])
def test_warm_start_in_a_batch_is_per_problem(maximize):
    costs = np.stack([make_cost(k, 60, 60, seed=i) for i, k in enumerate(["uniform", "int_ties", "correlated",
                                                                          "forbidden"])])
    if maximize:
        costs = np.where(np.isinf(costs), -np.inf, costs)
    v0 = np.stack([_cold_duals(c, maximize).numpy() for c in costs])
    v0[1] = 0.0  # one problem with a poor start among good ones
    rows, cols, u, v = mk.linear_sum_assignment(torch.from_numpy(costs), maximize, return_duals=True,
                                                warm_start=torch.from_numpy(v0))
    for b in range(len(costs)):
        assert_optimal(costs[b], rows[b].numpy(), cols[b].numpy(), u[b].numpy(), v[b].numpy(), maximize=maximize)
        one = mk.linear_sum_assignment(costs[b], maximize, warm_start=v0[b])
        np.testing.assert_array_equal(one[1], cols[b].numpy())


@pytest.mark.skipif(not NATIVE_CPU, reason="needs the native CPU backend")
@pytest.mark.parametrize("case", ["huge", "tiny-f32", "f32", "int"])
def test_warm_start_with_rescaled_or_float32_solves(case):
    if case == "huge":  # beyond the safe magnitude: solved scaled down by a power of two, potentials too
        cost, dtype = make_cost("uniform", 50, 50, seed=8) * 1e305, torch.float64
    elif case == "tiny-f32":  # float64 costs scaled up for a float32 solve (no float32 duals can certify them)
        cost = make_cost("uniform", 50, 50, seed=8) * 1e-100
        v0 = _cold_duals(cost).numpy()
        rows, cols = mk.linear_sum_assignment(cost, warm_start=v0, compute_dtype=torch.float32)
        assert total(cost, rows, cols) == pytest.approx(total(cost, *scipy_lsa(cost)), rel=1e-5)
        return
    elif case == "f32":
        cost, dtype = make_cost("correlated", 50, 50, seed=8), torch.float32
    else:
        cost, dtype = make_cost("int_ties", 50, 50, seed=8).astype(np.int64), torch.float64
    v0 = _cold_duals(cost).numpy() * (1 + 1e-3)
    rows, cols, u, v = mk.linear_sum_assignment(cost, return_duals=True, warm_start=v0, compute_dtype=dtype)
    assert_optimal(cost, rows, cols, u, v, rtol=1e-9 if dtype == torch.float64 else 1e-5)


@pytest.mark.skipif(not NATIVE_CPU, reason="needs the native CPU backend")
@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("shape", [(5, 9), (9, 5), (17, 17)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_warm_start_is_ignored_where_it_is_not_used(backend, shape):
    """Rectangular problems (their duals' zero on unassigned columns would not survive arbitrary starting
    potentials) and the torch reference solve as if no warm start were given."""
    if backend == "native" and shape[0] == shape[1]:
        pytest.skip("square native solves use it")
    cost = make_cost("uniform", *shape, seed=9)
    v0 = np.random.default_rng(9).standard_normal(shape[1])
    cold = mk.linear_sum_assignment(cost, return_duals=True, backend=backend)
    warm = mk.linear_sum_assignment(cost, return_duals=True, backend=backend, warm_start=v0)
    for a, b in zip(cold, warm):
        np.testing.assert_array_equal(a, b)


@pytest.mark.skipif(not NATIVE_CPU, reason="needs the native CPU backend")
def test_warm_start_errors_and_infeasible_problems():
    cost = make_cost("uniform", 4, 4)
    with pytest.raises(ValueError, match=r"warm_start must have shape \(4,\)"):
        mk.linear_sum_assignment(cost, warm_start=np.zeros(5))
    with pytest.raises(ValueError, match=r"warm_start must have shape \(2, 4\)"):
        mk.linear_sum_assignment(np.stack([cost, cost]), warm_start=np.zeros(4))
    with pytest.raises(ValueError, match="warm_start must be finite"):
        mk.linear_sum_assignment(cost, warm_start=np.array([0.0, np.nan, 0.0, 0.0]))
    with pytest.raises(ValueError, match="warm_start must be finite"):
        mk.linear_sum_assignment(torch.from_numpy(cost), warm_start=torch.tensor([0.0, np.inf, 0.0, 0.0]))
    with pytest.raises(TypeError, match="warm_start"):
        mk.linear_sum_assignment(cost, warm_start=np.ones(4, dtype=bool))
    with pytest.raises(TypeError, match="warm_start"):
        mk.linear_sum_assignment(cost, warm_start=torch.zeros(4, dtype=torch.complex64))
    with pytest.raises(TypeError, match="warm_start"):
        mk.linear_sum_assignment(cost, warm_start="zeros")
    infeasible = np.array([[1.0, np.inf], [2.0, np.inf]])
    with pytest.raises(ValueError, match="infeasible"):
        mk.linear_sum_assignment(infeasible, warm_start=np.zeros(2))
    with pytest.raises(ValueError, match="NaN"):
        mk.linear_sum_assignment(np.array([[1.0, np.nan], [2.0, 3.0]]), warm_start=np.zeros(2))


# --------------------------------------------------------------------------- the team algorithm on CPU threads


def team_cases():
    """name -> (costs b x n x m, maximize): what the kernels' team algorithm must solve identically whatever the
    team size. Team sizes above m leave lanes without a column; 1100 columns turn augmenting row reduction on."""
    def one(kind, n, m, seed=0):
        return make_cost(kind, n, m, seed=seed)[None]

    forbidden = make_cost("forbidden", 17, 17, seed=2)
    to_max = np.where(np.isinf(forbidden), -np.inf, forbidden)
    return {
        "empty-0x3": (np.zeros((1, 0, 3)), False),
        "empty-3x0": (np.zeros((1, 3, 0)), False),
        "uniform-1x1": (one("uniform", 1, 1), False),
        "int_ties-2x2": (one("int_ties", 2, 2), False),
        "uniform-3x3": (one("uniform", 3, 3), False),
        "uniform-17x17": (one("uniform", 17, 17), False),
        "uniform-17x17-float32-input": (one("uniform", 17, 17).astype(np.float32), False),
        "int_ties-32x32": (one("int_ties", 32, 32, seed=7), False),  # reduction transfer, then searches
        "correlated-64x64": (one("correlated", 64, 64), False),
        "all_equal-17x17": (one("all_equal", 17, 17), False),
        "rank1-17x17": (one("rank1", 17, 17), False),
        "forbidden-17x17": (one("forbidden", 17, 17, seed=1), False),
        "uniform-5x40": (one("uniform", 5, 40), False),
        "uniform-40x5": (one("uniform", 40, 5), False),
        "int_ties-17x3": (one("int_ties", 17, 3), False),
        "maximize-forbidden-17x17": (to_max[None], True),
        "maximize-int_ties-9x17": (one("int_ties", 9, 17, seed=3), True),
        "infeasible-column": (INFEASIBLE["column"][None], False),
        "infeasible-hall": (INFEASIBLE["hall"][None], False),
        "infeasible-rect": (INFEASIBLE["rect"][None], False),
        "batch-of-3": (np.stack([make_cost(k, 17, 17, seed=s) for s, k in enumerate(["uniform", "int_ties",
                                                                                     "forbidden"])]), False),
        "wide-uniform-4x1100": (one("uniform", 4, 1100), False),
        "wide-uniform-40x1100": (one("uniform", 40, 1100), False),
        "wide-rank1-12x1100": (one("rank1", 12, 1100), False),  # rows evict each other in row reduction
    }


TEAM_CASES = team_cases()
TEAM_LANES = [2, 3, 5, 8, 32, 64]
needs_native = pytest.mark.skipif(not NATIVE_CPU, reason="native backend not built")


@needs_native
def test_team_cases_reach_every_phase():
    """The cases above run reduction transfer (square, rows left free after column reduction), augmenting row
    reduction with evictions (more steps than rows) and searches after it."""
    def stats(case):
        return la._solve_team_serial(torch.from_numpy(TEAM_CASES[case][0]), False, torch.float64, True)[5]

    assert stats("int_ties-32x32")["row_scans"] > 0
    wide = stats("wide-rank1-12x1100")
    assert wide["arr_steps"] > 12 and wide["row_scans"] > 0
    assert stats("wide-uniform-40x1100")["arr_steps"] >= 40


@needs_native
@pytest.mark.parametrize("compute_dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", list(TEAM_CASES))
def test_thread_team_matches_serial_team(case, compute_dtype):
    """Every team decision is a (value, index)-lexicographic reduction, so a team of several threads (the
    kernels' column striding, cross-lane reductions and lane-0 updates between barriers) must reproduce the
    one-thread run bit for bit, steps included. Outputs of problems that are not ok are unspecified, and so are
    the duals of empty problems (the public function writes zeros itself)."""
    cost, maximize = TEAM_CASES[case]
    t = torch.from_numpy(cost).contiguous()
    want = la._solve_team_serial(t, maximize, compute_dtype, True)
    ok = want[4] == 0
    compared = ("rows", "cols", "u", "v") if min(cost.shape[1:]) > 0 else ("rows", "cols")
    for lanes in TEAM_LANES:
        got = la._solve_team_threads(t, maximize, compute_dtype, True, lanes)
        assert torch.equal(got[4], want[4]), f"status, {lanes} lanes"
        for name, g, w in zip(compared, got[:4], want[:4]):
            assert torch.equal(g[ok], w[ok]), f"{name}, {lanes} lanes"
        assert got[5] == want[5], f"steps, {lanes} lanes"


@needs_native
@pytest.mark.parametrize("case", ["int_ties-32x32", "correlated-64x64", "forbidden-17x17", "uniform-40x5",
                                  "maximize-forbidden-17x17", "wide-rank1-12x1100"])
def test_thread_team_is_optimal(case):
    cost, maximize = TEAM_CASES[case]
    rows, cols, u, v, status, _ = la._solve_team_threads(torch.from_numpy(cost), maximize, torch.float64, True, 5)
    assert int(status[0]) == 0
    assert_optimal(cost[0], rows[0].numpy(), cols[0].numpy(), u[0].numpy(), v[0].numpy(), maximize=maximize)


@needs_native
def test_thread_team_lanes():
    t = torch.from_numpy(make_cost("uniform", 2, 3))[None]
    want = la._solve_team_serial(t, False, torch.float64, True)
    for lanes in (1, 1024):  # the bounds: a team of one thread, a full CUDA block
        for g, w in zip(la._solve_team_threads(t, False, torch.float64, True, lanes)[:5], want[:5]):
            assert torch.equal(g, w)
    for lanes in (0, 1025):
        with pytest.raises(ValueError, match=r"lanes must be in 1\.\.1024"):
            la._solve_team_threads(t, False, torch.float64, True, lanes)


# --------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(64, 64, 64), (8, 256, 256), (5, 40, 70), (5, 70, 40), (1, 1500, 1500), (3, 1, 1),
                                   (2, 200, 600), (2, 600, 200)],  # beyond shared memory: prepare_kernel's copy
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("compute_dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("maximize", [False, True], ids=["min", "max"])
def test_cuda_matches_team_serial(shape, compute_dtype, maximize):
    """The kernels run the team algorithm; with (value, index) tie-breaking and no multiplications its
    results do not depend on the team size: the GPU must reproduce the one-thread run bit for bit."""
    kinds = ["uniform", "int_ties", "forbidden", "correlated"]
    batch = np.stack([make_cost(kinds[b % 4], *shape[1:], seed=b) for b in range(shape[0])])
    if maximize:
        batch = np.where(np.isinf(batch), -np.inf, batch)
    for dtype in (torch.float64, torch.float32):
        t = torch.from_numpy(batch).to(dtype)
        want = la._solve_team_serial(t.contiguous(), maximize, compute_dtype, True)[:5]
        got = mk.linear_sum_assignment(t.cuda(), maximize, return_duals=True, backend="native",
                                       compute_dtype=compute_dtype)
        for g, w in zip(got, want[:4]):
            assert torch.equal(g.cpu(), w)


@pytest.mark.gpu
def test_cuda_large_single_problem_is_exact():
    cost = make_cost("uniform", 4096, 4096, seed=11)
    rows, cols, u, v = mk.linear_sum_assignment(torch.from_numpy(cost).cuda(), return_duals=True)
    assert_optimal(cost, rows.cpu().numpy(), cols.cpu().numpy(), u.cpu().numpy(), v.cpu().numpy())


def _offset_batch_on(device):
    """Three problems in a tensor that starts one problem into its storage (contiguous, storage offset > 0)."""
    kinds = ["uniform", "int_ties", "correlated"]
    batch = np.stack([make_cost(kind, 50, 30, seed=s) for s, kind in enumerate(kinds)])
    big = torch.from_numpy(np.concatenate([np.full((1, 50, 30), np.nan), batch])).to(device)
    return batch, big[1:]


def test_offset_batch_helper_is_what_the_cuda_stream_test_needs():
    batch, view = _offset_batch_on("cpu")  # the GPU test's input, checked where it runs everywhere
    assert view.storage_offset() == 50 * 30 and view.is_contiguous()
    rows, cols = mk.linear_sum_assignment(view)
    for b, cost in enumerate(batch):
        assert total(cost, rows[b].numpy(), cols[b].numpy()) == pytest.approx(total(cost, *scipy_lsa(cost)), rel=1e-12)


@pytest.mark.gpu
def test_cuda_solves_on_the_current_stream_from_a_view_with_a_storage_offset():
    batch, view = _offset_batch_on("cuda")  # the NaN problem before the view must never be read
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())  # the input was copied on the default stream
    with torch.cuda.stream(side):
        rows, cols, u, v = mk.linear_sum_assignment(view, return_duals=True, backend="native")
    torch.cuda.current_stream().wait_stream(side)
    for b, cost in enumerate(batch):
        r, c = rows[b].cpu().numpy(), cols[b].cpu().numpy()
        assert total(cost, r, c) == pytest.approx(total(cost, *scipy_lsa(cost)), rel=1e-12)
        assert mk.check_assignment(cost, r, c, u[b].cpu().numpy(), v[b].cpu().numpy())
