"""Similarity op family: every backend against the float64 torch references.

The CPU fast path is torch itself (BLAS), so "torch-cpu" is tested as a fast backend; the Triton
kernels run on CPU under TRITON_INTERPRET=1 (small shapes) and on CUDA (gpu-marked).
"""

import inspect
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment as scipy_lsa

import merging_kernels as mk
from merging_kernels._dispatch import triton_interpreting
from merging_kernels.ops import similarity as sim
from merging_kernels.ops.similarity import (
    SIMILARITY,
    ActivationStats,
    activation_correlation_torch,
    activation_moments_torch,
    activation_stats_hooks,
    correlation_from_moments,
    correlation_from_moments_torch,
    correlation_matrix,
    correlation_matrix_torch,
    dual_similarity,
    group_similarity,
    group_similarity_torch,
)

from helpers import TRITON_DEVICES, fast_backend_params, skip_unless_triton_runs_on

BACKENDS = [pytest.param("torch", "cpu", id="torch-cpu"), *fast_backend_params(SIMILARITY)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def corr_tol(dtype: torch.dtype, device: str, d: int, backend: str | None = None) -> float:
    """Allowed |Δ| of a correlation against the float64 reference computed on the same (rounded) input.

    The input's own rounding is not part of the error (the reference sees the same values); what
    remains is fp32 arithmetic: normalized values and products rounded at 2^-24, summed over d terms
    (a few ulps times sqrt(d) in practice: 16 ulps·sqrt(d) leaves a margin of ~5x over what we see).
    The Triton kernels (and anything on CUDA) multiply 16-bit inputs in tf32, operands rounded to
    nearest: each product of the unit-norm rows is off by ≤ 2·2^-11 relatively, so
    |Δ| ≤ 2·2^-11·Σ|x̂_k ŷ_k| ≤ 2^-10 (Cauchy–Schwarz); allow twice that.
    """
    if dtype in (torch.float16, torch.bfloat16) and (device == "cuda" or backend == "triton"):
        return 2.0 ** -9
    return 16 * 2.0 ** -24 * max(d, 1) ** 0.5


def _data(n, d, dtype, device, *, seed=0, mean=0.0, std=1.0):
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(n, 3, generator=g) @ torch.randn(3, d, generator=g)  # correlated rows
    return (mean + std * (latent + torch.randn(n, d, generator=g))).to(dtype).to(device)


# --------------------------------------------------------------------------- correlation_matrix


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n, m, d", [(1, 1, 5), (0, 3, 4), (3, 0, 4), (37, 29, 21), (16, 16, 16), (5, 7, 1),
                                     (4, 6, 0)])
def test_correlation_matrix_matches_reference(backend, device, dtype, n, m, d):
    x = _data(n, d, dtype, device, seed=1)
    y = _data(m, d, dtype, device, seed=2)
    for other in (None, y):
        got = correlation_matrix(x, other, backend=backend)
        want = correlation_matrix_torch(x, other)
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert not torch.isnan(got).any()
        torch.testing.assert_close(got.double(), want, rtol=0, atol=corr_tol(dtype, device, d, backend))


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_correlation_matrix_self_is_symmetric_with_unit_diagonal(backend, device):
    x = _data(45, 19, torch.float32, device, seed=3)
    c = correlation_matrix(x, backend=backend)
    assert torch.equal(c, c.T)
    assert torch.equal(c.diagonal(), torch.ones(45, device=device))
    assert float(c.abs().max()) <= 1.0


def test_correlation_matrix_torch_blocked_path_large():
    """n large enough for the blocked upper-triangle GEMM (several blocks) on the torch path."""
    x = _data(1100, 9, torch.float32, "cpu", seed=4)
    assert len(sim._block_edges(1100)) > 2
    got = correlation_matrix(x, backend="torch")
    torch.testing.assert_close(got.double(), correlation_matrix_torch(x), rtol=0, atol=corr_tol(torch.float32, "cpu", 9))
    assert torch.equal(got, got.T)


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_correlation_matrix_non_contiguous(backend, device):
    base = _data(24, 40, torch.float32, device, seed=5)
    x = base[::2, ::2]  # strides (80, 2)
    y = base[1::2, ::2].T.contiguous().T  # (12, 20) column-major: rows of y are columns in memory
    assert not x.is_contiguous() and not y.is_contiguous()
    torch.testing.assert_close(correlation_matrix(x, y, backend=backend).double(), correlation_matrix_torch(x, y),
                               rtol=0, atol=corr_tol(torch.float32, device, 20))
    torch.testing.assert_close(correlation_matrix(x, backend=backend).double(), correlation_matrix_torch(x),
                               rtol=0, atol=corr_tol(torch.float32, device, 20))


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_correlation_matrix_large_mean(backend, device):
    """Rows with mean 1e4 and std 1: centering before the products keeps full precision."""
    x = _data(20, 33, torch.float32, device, seed=6, mean=1e4)
    got = correlation_matrix(x, backend=backend)
    torch.testing.assert_close(got.double(), correlation_matrix_torch(x), rtol=0, atol=corr_tol(torch.float32, device, 33))


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_correlation_matrix_float64_mean_far_above_the_spread(backend, device):
    """float64 rows 1e6 ± 1e-4: beyond fp32's 24 bits, so the Triton path must center in float64 before it
    rounds to fp32 (it was 0.41 off when it rounded first)."""
    base = _data(12, 40, torch.float64, "cpu", seed=40)
    x = 1e6 + 1e-4 * base
    x[1] = -3e7 + 1e-3 * base[1]
    x[4] = 1e6  # constant: dead
    y = 5e5 + 1e-3 * _data(7, 40, torch.float64, "cpu", seed=41)
    x, y = x.to(device), y.to(device)
    for other in (None, y):
        got = correlation_matrix(x, other, backend=backend)
        torch.testing.assert_close(got.double(), correlation_matrix_torch(x, other), rtol=0,
                                   atol=corr_tol(torch.float32, device, 40))
    assert torch.equal(correlation_matrix(x, backend=backend)[4], torch.eye(12, device=device)[4])


def _exact_correlation(x, y=None):
    """Pearson correlation of the rows' float64 values in exact rational arithmetic (Fraction), rounded once at
    the end (and once by the square root): the oracle of the oracle. Constant rows: 0, 1 on the diagonal (y None)."""
    def centered(rows):
        out = []
        for row in rows.tolist():
            values = [Fraction(v) for v in row]
            mean = sum(values) / len(values)
            out.append([v - mean for v in values])
        return out

    cx = centered(x)
    cy = cx if y is None else centered(y)
    out = torch.zeros(len(cx), len(cy), dtype=torch.float64)
    for i, a in enumerate(cx):
        for j, b in enumerate(cy):
            va, vb = sum(v * v for v in a), sum(v * v for v in b)
            if va == 0 or vb == 0:
                out[i, j] = 1.0 if y is None and i == j else 0.0
                continue
            cov = sum(p * q for p, q in zip(a, b))
            out[i, j] = math.copysign(math.sqrt(cov * cov / (va * vb)), 1 if cov >= 0 else -1)
    return out


@pytest.mark.parametrize("offset, spread", [(1e15, 1.0), (-3e15, 1.0), (2.0 ** 60, 1e3), (1e300, 1e285),
                                            (0.0, 1e-300), (0.0, 2.0 ** -1060), (0.0, 1e300), (5.0, 1.0)])
def test_correlation_matrix_torch_is_exact(offset, spread):
    """The oracle against exact rational arithmetic, on float64 rows whose spread is far below their mean (1e15 ± 1:
    the division by a row's max |value| it used to do rounded the spread's few bits away, 0.01-0.1 off) and rows
    at the edges of the float64 range (tiny rows need eps=0: their σ is below any useful eps)."""
    g = torch.Generator().manual_seed(11)
    for trial in range(3):
        x = offset + spread * torch.randn(4, 6, generator=g, dtype=torch.float64)
        y = offset / 2 + spread * torch.randn(3, 6, generator=g, dtype=torch.float64)
        x[3] = x[0, 0]  # constant: dead
        for other in (None, y):
            want = _exact_correlation(x, other)
            torch.testing.assert_close(correlation_matrix_torch(x, other, eps=0.0), want, rtol=0, atol=1e-14)
            torch.testing.assert_close(correlation_matrix(x, other, eps=0.0, backend="torch").double(), want,
                                       rtol=0, atol=corr_tol(torch.float32, "cpu", 6))


def test_correlation_matrix_torch_integer_patterns_plus_offset():
    """Small-integer patterns plus 2^52 + 2^51 (below 2^53: every sum is an exact float64): the correlation is the
    patterns' own, known exactly (rows 0 and 1 are exact opposites, row 2 is row 0 doubled)."""
    patterns = torch.tensor([[0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0], [0, 2, 4, 6, 8, 10], [1, 0, 0, 1, 3, -1],
                             [2, 2, 2, 2, 2, 2]], dtype=torch.float64)
    x = patterns + (2.0 ** 52 + 2.0 ** 51)
    assert torch.equal(x - (2.0 ** 52 + 2.0 ** 51), patterns)  # the rows hold the patterns exactly
    want = _exact_correlation(patterns)
    assert want[0, 1] == -1.0 and want[0, 2] == 1.0 and want[4, 4] == 1.0 and want[4, 0] == 0.0
    torch.testing.assert_close(correlation_matrix_torch(x), want, rtol=0, atol=1e-15)
    torch.testing.assert_close(correlation_matrix_torch(x[:2], x), want[:2], rtol=0, atol=1e-15)


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_correlation_matrix_dead_rows(backend, device):
    x = _data(10, 17, torch.float32, device, seed=7)
    x[2] = 0.0
    x[5] = 1e4 + 0.1  # a constant row with a large value: its float mean must not leave noise
    x[8] = -3.25
    y = _data(6, 17, torch.float32, device, seed=8)
    y[1] = 7.0
    c = correlation_matrix(x, backend=backend)
    assert not torch.isnan(c).any()
    for i in (2, 5, 8):
        expect = torch.zeros(10, device=device)
        expect[i] = 1.0
        assert torch.equal(c[i], expect) and torch.equal(c[:, i], expect)
    cxy = correlation_matrix(x, y, backend=backend)
    assert not torch.isnan(cxy).any()
    assert torch.equal(cxy[[2, 5, 8]], torch.zeros(3, 6, device=device))
    assert torch.equal(cxy[:, 1], torch.zeros(10, device=device))


# Finite inputs at the edges of their dtype's range, (dtype, max |value|, eps): fp32 sums of squares overflow
# beyond ~1.8e19 (float64 ones beyond ~1e154), a row's mean or its centering overflow near 3.4e38, squares of tiny
# rows underflow (which matters only when eps is tiny too). bf16 shares fp32's range; fp16 is computed in fp32.
EXTREME = [(torch.float32, 1e20, 1e-8), (torch.float32, 3e38, 1e-8), (torch.bfloat16, 1e30, 1e-8),
           (torch.bfloat16, 3e38, 1e-8), (torch.float16, 6e4, 1e-8), (torch.float64, 1e200, 1e-8),
           (torch.float64, 1.7e308, 1e-8), (torch.float32, 1e-30, 0.0), (torch.float32, 1e-36, 0.0),
           (torch.bfloat16, 1e-30, 0.0), (torch.float64, 1e-200, 0.0)]


def _extreme_id(case):
    dtype, peak, eps = case
    return f"{str(dtype).replace('torch.', '')}-{peak:g}-eps{eps:g}"


def _scaled(n, d, dtype, device, peak, *, seed, offset=0.0):
    """Correlated rows (as _data) built in float64, scaled so that the largest |value| is ``peak``, then rounded."""
    x = _data(n, d, torch.float64, "cpu", seed=seed, mean=offset)
    return (x / x.abs().max() * peak).to(dtype).to(device)


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("dtype, peak, eps", EXTREME, ids=[_extreme_id(c) for c in EXTREME])
def test_correlation_matrix_extreme_magnitudes(backend, device, dtype, peak, eps):
    """Every backend matches the float64 reference on rows of any finite size (the torch path once treated every row
    beyond ~1.8e19 as dead: fp32 vector_norm overflowed), with no NaN; constant rows stay exactly dead."""
    d = 37
    x = _scaled(23, d, dtype, device, peak, seed=30)
    # spans ±peak: centered, its values reach 1.5·peak
    x[3] = (torch.where(torch.arange(d) % 4 == 0, 1.0, -1.0).double() * peak).to(dtype)
    x[5] = x[5] * 2.0 ** -10  # a smaller row among large ones
    x[7] = x[0, 0]  # constant: dead
    y = _scaled(11, d, dtype, device, peak, seed=31, offset=2.0)
    y[0] = _data(1, d, dtype, device, seed=32)  # an ordinary row (values ~1) against the extreme ones
    for other in (None, y):
        want = correlation_matrix_torch(x, other, eps=eps)
        # the oracle itself: the same correlation as for the rows divided by peak (scale invariance)
        torch.testing.assert_close(want, correlation_matrix_torch(x.double() / peak, None if other is None else
                                                                   other.double() / peak, eps=eps / peak),
                                   rtol=0, atol=1e-12)
        off_diagonal = want[[3, 4, 5]].abs().sum(1) - (1.0 if other is None else 0.0)
        assert bool((off_diagonal > 1e-3).all())  # the rows at the extremes are alive
        got = correlation_matrix(x, other, eps=eps, backend=backend)
        assert not torch.isnan(got).any()
        torch.testing.assert_close(got.double(), want, rtol=0, atol=corr_tol(dtype, device, d, backend))
    c = correlation_matrix(x, eps=eps, backend=backend)
    expect = torch.zeros(23, device=device)
    expect[7] = 1.0
    assert torch.equal(c[7], expect) and torch.equal(c[:, 7], expect)


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_correlation_of_permuted_copy_recovers_permutation(backend, device):
    n, d = 40, 64
    x = _data(n, d, torch.float32, device, seed=9)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    noise = 0.1 * torch.randn(n, d, generator=torch.Generator().manual_seed(2)).to(device)
    y = x[perm.to(device)] * 3.0 + 5.0 + noise  # correlation is invariant to scale and shift
    c = correlation_matrix(x, y, backend=backend)
    rows, cols = mk.linear_sum_assignment(c.cpu(), maximize=True)
    # x's row i is y's row j where perm[j] = i
    assert torch.equal(perm[cols], rows)


@pytest.mark.parametrize("backend, device", [p for p in BACKENDS if "triton" in p.id])
def test_correlation_matrix_triton_unit_column_stride(backend, device, monkeypatch):
    """Transposed and column-strided inputs reach the Triton kernel with unit column stride.

    The kernel's column offsets rk·stride are int32: a column stride > 1 overflows once d·stride ≥ 2^31
    (``correlation_matrix(W.T)`` for a 256k × 8192 W) and forces scalar loads. The launcher copies such
    inputs to row-major; the result equals the reference and, bit for bit, that of the row-major input.
    """
    seen = []
    kernel = sim._corr_gemm_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                names = inspect.signature(kernel.fn).parameters
                bound = {**dict(zip(names, args)), **kwargs}
                seen.append((bound["sxd"], bound["syd"]))  # the column strides
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(sim, "_corr_gemm_kernel", Spy())
    x = _data(40, 21, torch.float32, device, seed=20).T  # (21, 40), column-major: strides (1, 21)
    y = _data(80, 27, torch.float32, device, seed=21)[::2].T  # (27, 40): strides (1, 54)
    assert x.stride() == (1, 21) and y.stride() == (1, 54)
    for other in (None, y):
        seen.clear()
        got = correlation_matrix(x, other, backend=backend)
        assert seen == [(1, 1)]
        torch.testing.assert_close(got.double(), correlation_matrix_torch(x, other), rtol=0,
                                   atol=corr_tol(torch.float32, device, 40))
        assert torch.equal(got, correlation_matrix(x.contiguous(), None if other is None else y.contiguous(),
                                                   backend=backend))


def test_correlation_matrix_errors():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="x must be 2-D"):
        correlation_matrix(torch.randn(4))
    with pytest.raises(ValueError, match="y must have as many columns"):
        correlation_matrix(x, torch.randn(4, 5))
    with pytest.raises(ValueError, match="y must be 2-D"):
        correlation_matrix(x, torch.randn(2, 4, 3))
    with pytest.raises(TypeError, match="x must be"):
        correlation_matrix(torch.ones(4, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        correlation_matrix(np.ones((4, 3)))
    bad = x.clone()
    bad[1, 1] = float("nan")
    with pytest.raises(ValueError, match="x contains NaN"):
        correlation_matrix(bad)
    bad[1, 1] = float("inf")
    with pytest.raises(ValueError, match="y contains NaN or Inf"):
        correlation_matrix(x, bad)
    with pytest.raises(ValueError, match="eps"):
        correlation_matrix(x, eps=-1.0)
    with pytest.raises(ValueError, match="backend"):
        correlation_matrix(x, backend="cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("backend, device", BACKENDS)
def test_non_finite_entries_are_refused_naming_the_argument(backend, device, dtype):
    # the torch path finds them through the row norms they make non-finite (no isfinite pass over the
    # input); every kind and place of non-finite entry must still be caught, in x and in y
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 9, generator=g).to(dtype)
    y = torch.randn(5, 9, generator=g).to(dtype)
    for value in (float("nan"), float("inf"), -float("inf")):
        for where in ((0, 0), (5, 8), (2, slice(None))):  # first entry, last entry, a whole row
            bad = x.clone()
            bad[where] = value
            with pytest.raises(ValueError, match="x contains NaN or Inf"):
                correlation_matrix(bad.to(device), backend=backend)
            with pytest.raises(ValueError, match="x contains NaN or Inf"):
                correlation_matrix(bad.to(device), y.to(device), backend=backend)
            with pytest.raises(ValueError, match="y contains NaN or Inf"):
                correlation_matrix(x.to(device), bad[:5].to(device) if where[0] < 5 else bad[1:].to(device),
                                   backend=backend)
    mixed = x.clone()
    mixed[1, 2], mixed[1, 3] = float("inf"), -float("inf")  # inf - inf in the row mean
    with pytest.raises(ValueError, match="x contains NaN or Inf"):
        correlation_matrix(mixed.to(device), backend=backend)


def test_meta_tensors_are_refused_naming_the_argument():
    """A meta tensor holds shapes only: the ops that read values refuse it up front (they failed deep inside, with
    "Tensor.item() cannot be called on meta tensors")."""
    meta = torch.zeros(3, 3, device="meta")
    real = torch.zeros(3, 3)
    for call, name in [(lambda: correlation_matrix(meta), "x"), (lambda: correlation_matrix(real, meta), "y"),
                       (lambda: correlation_matrix(meta, backend="torch"), "x"),
                       (lambda: correlation_from_moments(meta[0], real, 4), "mean"),
                       (lambda: correlation_from_moments(real[0], meta, 4), "second_moment"),
                       (lambda: group_similarity(meta, 3, backend="torch"), "s_cross"),
                       (lambda: group_similarity(meta, 3), "s_cross"),
                       (lambda: ActivationStats(3).update(torch.zeros(2, 3, device="meta")), r"features\[0\]"),
                       (lambda: ActivationStats([2, 3]).update(torch.zeros(2, 2), torch.zeros(2, 3, device="meta")),
                        r"features\[1\]"),
                       (lambda: ActivationStats(3, device="meta"), "device")]:
        with pytest.raises(ValueError, match=f"{name}.*meta.*holds no data"):
            call()
    # dual_similarity reads nothing it could fail on: shapes in, shapes out, as torch's own ops on meta tensors
    assert dual_similarity(meta, meta, 0.3).device.type == "meta"


# --------------------------------------------------------------------------- correlation_from_moments


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_correlation_from_moments_matches_reference(backend, device):
    z = _data(50, 23, torch.float64, device, seed=10)
    z[:, 4] = 2.5  # a dead unit
    mean = z.mean(0)
    second = z.T @ z
    got = correlation_from_moments(mean, second, 50, backend=backend)
    want = correlation_from_moments_torch(mean, second, 50)
    assert got.dtype == torch.float32 and not torch.isnan(got).any()
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)
    torch.testing.assert_close(want, correlation_matrix_torch(z.T), rtol=0, atol=1e-12)
    assert got[4, 4] == 1 and float(got[4].abs().sum()) == 1.0
    # shift invariance: moments of z − k give the same correlation
    k = z[0]
    shifted = correlation_from_moments(mean - k, (z - k).T @ (z - k), 50, backend=backend)
    torch.testing.assert_close(shifted, got, rtol=0, atol=1e-6)


@pytest.fixture
def compiled_scalar_types(monkeypatch):
    """Under the Triton interpreter, type Python float kernel arguments as compiled Triton does.

    Compiled Triton types a Python float argument as fp32 (``mangle_type(1 / 77) == "fp32"``); the
    interpreter passes it on as a Python float, computing with it in float64. A kernel that takes a
    float scale would look exact in the interpreter and round the scale to fp32 on the GPU: with this
    fixture the interpreter rounds it as the GPU does.
    """
    if not triton_interpreting():
        return
    try:
        import triton.language as tl
        from triton.runtime import interpreter
        from triton.runtime.jit import mangle_type
    except ImportError:
        return

    implicit_cvt = getattr(interpreter, "_implicit_cvt", None)
    if implicit_cvt is None or not hasattr(interpreter, "TensorHandle"):
        return  # an interpreter without these internals: the test still runs, with float64 scalars

    def cvt(arg):
        if isinstance(arg, float):
            assert mangle_type(arg) == "fp32"
            return tl.tensor(interpreter.TensorHandle(np.array([arg], dtype=np.float32), tl.float32), tl.float32)
        return implicit_cvt(arg)

    monkeypatch.setattr(interpreter, "_implicit_cvt", cvt)


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("offset", [0.0, 2e2, 2e3])  # the rows' σ is ~2: μ/σ ~ 0, 100, 1000
def test_correlation_from_moments_raw_moments_large_mean(backend, device, offset, compiled_scalar_types):
    """Raw (unshifted) moments with |μ|/σ up to ~1e3: cov = M/count − μμᵀ cancels all but ~(σ/μ)² of M/count.

    M/count must be formed in float64: a 1/count rounded to fp32 (relative error up to 2^-24) errs by
    ~6e-8·(μ/σ)² in the correlation, ~6e-2 at μ/σ = 1e3. The fast path's error against the two-pass
    float64 correlation must stay within twice that of the float64 torch reference rounded to fp32
    (the output precision), as in flash-attention's tests.
    """
    n, D = 63, 19  # 1/63 in fp32 is off by 5.8e-8 relatively (close to the worst case, 2^-24)
    z = _data(n, D, torch.float64, device, seed=19, mean=offset)
    mean, second = z.mean(0), z.T @ z
    exact = correlation_matrix_torch(z.T)  # two-pass (centered) float64: no cancellation
    plain = correlation_from_moments_torch(mean, second, n).to(torch.float32)
    got = correlation_from_moments(mean, second, n, backend=backend)
    err_plain = float((plain.double() - exact).abs().max())
    err = float((got.double() - exact).abs().max())
    assert err <= 2 * err_plain + 2.0 ** -24, (err, err_plain)


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("D", [0, 1, 2, 23])
def test_correlation_from_moments_sizes_and_dtypes(backend, device, dtype, D):
    """D = 0 and 1, and fp32/bf16 moments: the fast paths compute in float64 from the given (rounded) moments, as the
    reference does, so only the fp32 output rounding remains."""
    z = _data(50, D, torch.float64, device, seed=33, mean=0.5)
    mean, second = z.mean(0).to(dtype), (z.T @ z).to(dtype)
    got = correlation_from_moments(mean, second, 50, backend=backend)
    want = correlation_from_moments_torch(mean, second, 50)
    assert got.shape == (D, D) and got.dtype == torch.float32 and not torch.isnan(got).any()
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2.0 ** -24)
    assert torch.equal(got.diagonal(), torch.ones(D, device=device))
    if D > 1 and dtype != torch.bfloat16:  # bf16 moments are too coarse for μ/σ ~ 0.5 to stay near the truth
        torch.testing.assert_close(got.double(), correlation_matrix_torch(z.T), rtol=0,
                                   atol=2.0 ** -23 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_correlation_from_moments_strided_second_moment(backend, device, dtype):
    z = _data(60, 17, torch.float64, device, seed=34)
    mean, second = z.mean(0).to(dtype), (z.T @ z).to(dtype)
    want = correlation_from_moments_torch(mean, second, 60)
    big = torch.full((34, 52), float("nan"), dtype=dtype, device=device)
    spaced = big[::2, 1::3]  # strides (104, 3), NaN in between: only the right entries may be read
    spaced.copy_(second)
    column_major = second.T.contiguous().T
    for m in (spaced, column_major, spaced.T):
        assert not m.is_contiguous()
        got = correlation_from_moments(mean, m, 60, backend=backend)
        assert not torch.isnan(got).any()
        torch.testing.assert_close(got.double(), want, rtol=0, atol=2.0 ** -24)


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("dtype, peak, eps", [(torch.float64, 1e150, 1e-8), (torch.float64, 1e-150, 0.0),
                                              (torch.float32, 1e17, 1e-8)], ids=["f64-1e150", "f64-1e-150", "f32-1e17"])
def test_correlation_from_moments_extreme_magnitudes(backend, device, dtype, peak, eps):
    """Moments of features up to ~1e150 (second moments ~1e301) or down to ~1e-150 (float64; ~1e-300), and fp32
    moments of features ~1e17 (~1e36): no overflow or NaN, the reference's correlation."""
    z = _data(40, 9, torch.float64, device, seed=35, mean=1.0)
    z = z / z.abs().max() * peak
    z[:, 6] = z[0, 6]  # a dead unit
    c = z - z[0]  # shifted moments, as ActivationStats keeps them: the dead unit's are exactly 0
    mean, second = c.mean(0).to(dtype), (c.T @ c).to(dtype)
    assert bool(torch.isfinite(second).all())
    got = correlation_from_moments(mean, second, 40, eps, backend=backend)
    want = correlation_from_moments_torch(mean, second, 40, eps)
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2.0 ** -24)
    torch.testing.assert_close(want, correlation_matrix_torch(z.T, eps=eps), rtol=0,
                               atol=1e-9 if dtype == torch.float64 else 1e-5)
    assert float(got[6].abs().sum()) == 1.0 and got[6, 6] == 1


def test_correlation_from_moments_errors():
    with pytest.raises(ValueError, match="mean must be 1-D"):
        correlation_from_moments(torch.zeros(2, 2), torch.zeros(2, 2), 3)
    with pytest.raises(ValueError, match="second_moment must be"):
        correlation_from_moments(torch.zeros(3), torch.zeros(2, 2), 3)
    with pytest.raises(ValueError, match="count"):
        correlation_from_moments(torch.zeros(2), torch.zeros(2, 2), 0)
    with pytest.raises(ValueError, match="second_moment contains NaN"):
        correlation_from_moments(torch.zeros(2), torch.full((2, 2), float("nan")), 3)


# --------------------------------------------------------------------------- ActivationStats


def _stream(stats, batches):
    for batch in batches:
        stats.update(*batch)
    return stats


def _split(features, sizes):
    """Split every model's features along the batch dim into the same batches."""
    out, start = [], 0
    for s in sizes:
        out.append([f[start:start + s] for f in features])
        start += s
    return out


def _check_stats(stats, features, tol_corr, tol_cov_rel):
    count, mean, cov = activation_moments_torch(*features)
    assert stats.count == count
    torch.testing.assert_close(stats.mean(torch.float64), mean, rtol=0,
                               atol=1e-6 * float(cov.diagonal().max().sqrt()) + 1e-12)
    scale = float(cov.diagonal().max())
    got_cov = stats.covariance()
    assert got_cov.dtype == torch.float32
    torch.testing.assert_close(got_cov.double(), cov, rtol=0, atol=tol_cov_rel * scale)
    corr = stats.correlation()
    assert corr.dtype == torch.float32 and not torch.isnan(corr).any()
    torch.testing.assert_close(corr.double(), activation_correlation_torch(*features), rtol=0, atol=tol_corr)


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("kind", ["flat", "tokens", "conv", "mixed"])
def test_activation_stats_streaming_equals_one_shot(backend, device, kind):
    g = torch.Generator().manual_seed(11)
    n = 60
    if kind == "flat":
        features = [torch.randn(n, 7, generator=g), torch.randn(n, 12, generator=g)]
    elif kind == "tokens":
        features = [torch.randn(n, 3, 7, generator=g), torch.randn(n, 3, 5, generator=g)]
    elif kind == "conv":
        features = [torch.randn(n, 6, 2, 2, generator=g), torch.randn(n, 9, 2, 2, generator=g)]
    else:  # one model's tokens against another's conv map (4 rows per sample in both), and a third model
        features = [torch.randn(n, 4, 6, generator=g), torch.randn(n, 5, 2, 2, generator=g),
                    torch.randn(n, 4, 3, generator=g)]
    shared = torch.randn(*features[0].shape[:-1], 1, generator=g)  # correlate the models a little
    features[0] = features[0] + shared
    features = [f.to(device) for f in features]
    sizes = [7, 1, 13, 2, 9, 5, 11, 3, 4, 5]  # 10 uneven batches (> the torch path's flush interval)
    stats = _stream(ActivationStats([_rows_channels(f) for f in features], backend=backend),
                    _split(features, sizes))
    tol = corr_tol(torch.float32, device, 64)
    _check_stats(stats, features, tol, tol)


def _rows_channels(f):
    return f.shape[1] if f.dim() == 4 else f.shape[-1]


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_activation_stats_dtypes(backend, device, dtype):
    fa = _data(48, 9, dtype, device, seed=12, mean=2.0)
    fb = _data(48, 14, dtype, device, seed=13, std=3.0)
    stats = _stream(ActivationStats([9, 14], backend=backend), _split([fa, fb], [16, 16, 16]))
    # the reference sees the same rounded inputs; float64 features are rounded to fp32 on the fast paths
    tol = corr_tol(dtype, device, 48, backend) + (2.0 ** -22 if dtype == torch.float64 else 0.0)
    _check_stats(stats, [fa, fb], tol, tol)


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_activation_stats_large_mean_is_stable(backend, device):
    """Mean 1e4, std 1, fp32 features: E[zzᵀ] − μμᵀ in fp32 loses everything; the shifted moments lose nothing."""
    g = torch.Generator().manual_seed(14)
    latent = torch.randn(400, 1, generator=g)
    fa = (1e4 + latent + 0.5 * torch.randn(400, 6, generator=g)).float().to(device)
    fb = (-3e4 + 2 * latent + torch.randn(400, 5, generator=g)).float().to(device)
    stats = _stream(ActivationStats([6, 5], backend=backend), _split([fa, fb], [50] * 8))
    _check_stats(stats, [fa, fb], 1e-5, 1e-5)
    # the textbook fp32 accumulator on the same data is far off (what this test guards against)
    z = torch.cat([fa, fb], 1).cpu()
    naive = (z.T @ z) / 400 - torch.outer(z.mean(0), z.mean(0))
    assert float((naive.double() - activation_moments_torch(fa.cpu(), fb.cpu())[2]).abs().max()) > 1.0


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_activation_stats_dead_units(backend, device):
    fa = _data(30, 6, torch.float32, device, seed=15)
    fa[:, 1] = 0.0
    fa[:, 4] = 1e4 + 0.1
    fb = _data(30, 3, torch.bfloat16, device, seed=16)
    fb[:, 0] = -7.3
    stats = _stream(ActivationStats([6, 3], backend=backend), _split([fa, fb], [10, 10, 10]))
    corr = stats.correlation()
    assert not torch.isnan(corr).any()
    for i in (1, 4, 6):
        expect = torch.zeros(9, device=device)
        expect[i] = 1.0
        assert torch.equal(corr[i], expect) and torch.equal(corr[:, i], expect)
    assert torch.equal(corr.diagonal(), torch.ones(9, device=device))
    cov = stats.covariance(torch.float64)
    assert float(cov[[1, 4, 6]].abs().max()) == 0.0


def _unit_features(n, dtype, device, peak, *, seed):
    """Two models' features (n, 5) and (n, 4), correlated across models, unit offsets, max |value| = peak."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(n, 1, generator=g, dtype=torch.float64)
    fa = 2.0 + latent + 0.5 * torch.randn(n, 5, generator=g, dtype=torch.float64)
    fb = -1.0 + 2 * latent + torch.randn(n, 4, generator=g, dtype=torch.float64)
    top = max(float(fa.abs().max()), float(fb.abs().max()))
    fa, fb = fa / top * peak, fb / top * peak
    fa[:, 4] = fa[0, 4]  # a constant (dead) unit
    fb[:, 0] = torch.where(torch.arange(n) % 3 == 0, 1.0, -1.0).double() * peak  # spans ±peak
    return fa.to(dtype).to(device), fb.to(dtype).to(device)


STATS_EXTREME = [(torch.float32, 1e19, 1e-8), (torch.float32, 1e30, 1e-8), (torch.float32, 3e38, 1e-8),
                 (torch.bfloat16, 1e30, 1e-8), (torch.bfloat16, 3e38, 1e-8), (torch.float16, 6e4, 1e-8),
                 (torch.float32, 1e-30, 0.0), (torch.bfloat16, 1e-30, 0.0)]  # (no bf16 subnormals: the Triton
# interpreter converts them to fp32 wrongly, triton 3.x; the GPU does not)


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("dtype, peak, eps", STATS_EXTREME, ids=[_extreme_id(c) for c in STATS_EXTREME])
@pytest.mark.parametrize("layout", ["flat", "conv"])
def test_activation_stats_extreme_magnitudes(backend, device, dtype, peak, eps, layout):
    """Features of any finite size: the fp32 products of unscaled values overflow beyond ~1.8e19 (the correlation was
    all NaN on torch, 1.3 off on triton at 1e19) and underflow for tiny ones; the per-unit scale keeps them ~1.
    "conv": tokens and a conv map, 4 rows per sample (the torch path's (D, rows) buffer)."""
    fa, fb = _unit_features(96, dtype, device, peak, seed=36)
    sizes = [32, 20, 44]
    if layout == "conv":  # the same pooled rows: (24, 4, 5) tokens, (24, 4, 2, 2) maps
        fa, fb = fa.reshape(24, 4, 5), fb.T.reshape(4, 24, 2, 2).permute(1, 0, 2, 3)
        sizes = [8, 5, 11]
    stats = _stream(ActivationStats([5, 4], backend=backend), _split([fa, fb], sizes))
    corr = stats.correlation(eps=eps)
    assert not torch.isnan(corr).any()
    torch.testing.assert_close(corr.double(), activation_correlation_torch(fa, fb, eps=eps), rtol=0,
                               atol=corr_tol(dtype, device, 96, backend))
    expect = torch.zeros(9, device=device)
    expect[4] = 1.0
    assert torch.equal(corr[4], expect) and torch.equal(corr[:, 4], expect)
    count, mean, cov = activation_moments_torch(fa, fb)
    scale = float(cov.diagonal().max())
    got = stats.covariance(torch.float64)
    torch.testing.assert_close(got, cov, rtol=0, atol=corr_tol(dtype, device, 96, backend) * scale)
    assert float(got[4].abs().max()) == 0.0
    torch.testing.assert_close(stats.mean(torch.float64), mean, rtol=0, atol=1e-6 * scale ** 0.5)
    fp32 = torch.finfo(torch.float32)
    if scale > fp32.max:  # not representable in float32: an error, not inf
        with pytest.raises(ValueError, match="covariance .* exceeds the range of torch.float32"):
            stats.covariance()
    elif scale > fp32.tiny / fp32.eps:  # (smaller ones round to fp32 subnormals or 0, as any cast to fp32 does)
        torch.testing.assert_close(stats.covariance().double(), cov, rtol=0,
                                   atol=corr_tol(dtype, device, 96, backend) * scale)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's overflow warnings from the Triton interpreter: intended
@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("kind", ["flat", "conv", "tokens"])
@pytest.mark.parametrize("gram_dtype", [torch.float32, torch.float64], ids=str)
def test_activation_stats_cross_blocks_equal_those_of_all_blocks(backend, device, kind, gram_dtype):
    # what a one-to-one matching needs: the model-0 x model-1 block, each unit's variance from the squares
    if backend == "triton" and gram_dtype == torch.float64:
        pytest.skip("gram_dtype=float64 is a torch-path option")
    g = torch.Generator().manual_seed(41)
    n = 60
    shapes = {"flat": ((n, 7), (n, 12)), "conv": ((n, 6, 2, 2), (n, 9, 2, 2)), "tokens": ((n, 3, 7), (n, 3, 5))}[kind]
    fa, fb = (torch.randn(*sh, generator=g) for sh in shapes)
    unit = 1 if kind == "conv" else -1  # the channel dim
    fb = fb + 0.7 * fa.narrow(unit, 0, 1)  # correlated units
    fa = fa * 30 + 1e3  # a large mean and spread: the shift and the scale apply to the squares too
    fa.select(unit, 2).fill_(5.0)  # a dead unit: 0 with every unit of the other model
    fa, fb = fa.to(device), fb.to(device)
    batches = _split([fa, fb], [7, 1, 13, 2, 9, 5, 11, 3, 4, 5])  # > the torch path's flush interval
    full = _stream(ActivationStats([fa.shape[unit], fb.shape[unit]], backend=backend, gram_dtype=gram_dtype),
                   batches)
    cross = _stream(ActivationStats(full.num_features, backend=backend, gram_dtype=gram_dtype, blocks="cross"),
                    batches)
    a = full.num_features[0]
    expected = full.correlation()[:a, a:]
    got = cross.correlation()
    assert got.shape == expected.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-6)  # the squares are summed apart from BLAS'
    assert torch.equal(got[2], torch.zeros_like(got[2]))
    torch.testing.assert_close(cross.covariance(torch.float64), full.covariance(torch.float64)[:a, a:],
                               rtol=1e-6, atol=1e-6 * float(full.covariance(torch.float64).abs().max()))
    torch.testing.assert_close(cross.mean(torch.float64), full.mean(torch.float64), rtol=0, atol=0)


def test_activation_stats_cross_blocks_need_two_models():
    for num_features in (12, [3], [3, 4, 5]):
        with pytest.raises(ValueError, match="^blocks='cross' needs num_features of two models"):
            ActivationStats(num_features, blocks="cross")
    with pytest.raises(ValueError, match="^blocks must be one of"):
        ActivationStats([3, 4], blocks="upper")


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_activation_stats_moments_that_overflow_raise(backend, device):
    """The first batch sets the scale; a later batch ~1e25 times as spread overflows the fp32 products all the same:
    correlation() and covariance() raise ValueError (never NaN, never a wrong matrix)."""
    fa = _data(40, 6, torch.float32, device, seed=37)
    stats = _stream(ActivationStats([6], backend=backend), [[fa[:20]], [fa[20:] * 1e25]])
    with pytest.raises(ValueError, match="second moments overflowed"):
        stats.correlation()
    with pytest.raises(ValueError, match="second moments overflowed"):
        stats.covariance(torch.float64)
    # a first batch of spread ~1e-30 scales by ~2^100: values ~1e10 then overflow fp32 after the scale
    stats = ActivationStats([6], backend=backend)
    stats.update(fa[:20] * 1e-30)
    with pytest.raises(ValueError, match="overflow"):  # at the update (torch: its column sums) or at finalize
        stats.update(fa[20:] * 1e10)
        stats.correlation()


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_activation_stats_float64_features_beyond_fp32(backend, device):
    """float64 features beyond the fp32 range: shifted and scaled in float64 before the fp32 products, so every
    backend gives their correlation; the float32 mean refuses what it cannot hold, the float64 one is exact;
    gram_dtype=torch.float64 (torch backend) refuses a covariance float64 cannot hold."""
    fa, fb = _unit_features(48, torch.float64, device, 1e300, seed=38)
    want = correlation_matrix_torch(torch.cat([fa, fb], 1).T)  # two-pass, float64 (scales each unit first)
    stats = _stream(ActivationStats([5, 4], backend=backend), _split([fa, fb], [16, 32]))
    torch.testing.assert_close(stats.correlation().double(), want, rtol=0, atol=corr_tol(torch.float32, device, 48))
    with pytest.raises(ValueError, match="mean .* exceeds the range of torch.float32"):
        stats.mean()
    torch.testing.assert_close(stats.mean(torch.float64), torch.cat([fa, fb], 1).mean(0), rtol=1e-12, atol=0)
    # float32 features next: the float64 features' scale (~2^-997) does not fit float32, nothing is added
    with pytest.raises(ValueError, match="float32 after float64 features beyond the float32 range"):
        stats.update(*(torch.ones(4, f.shape[1], device=device) for f in (fa, fb)))
    assert stats.count == 48
    if backend != "torch":
        return
    stats = _stream(ActivationStats([5, 4], backend=backend, gram_dtype=torch.float64), _split([fa, fb], [16, 32]))
    torch.testing.assert_close(stats.correlation().double(), want, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="covariance .* exceeds the range of torch.float64"):
        stats.covariance(torch.float64)


def _near_max_features(n, peak, *, seed):
    """_unit_features in float64 at max |value| = peak, plus a unit that flips sign between the first 16 rows
    (0.8..0.9·peak) and the rest (−0.9..−0.8·peak): its deviation from the first batch's mean exceeds the float64
    max, its mean does not."""
    fa, fb = _unit_features(n, torch.float64, "cpu", peak, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    sign = torch.where(torch.arange(n) < 16, 1.0, -1.0).double()
    fa[:, 3] = sign * peak * (0.8 + 0.1 * torch.rand(n, generator=g, dtype=torch.float64))
    return fa, fb


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("peak", [4e307, 1.7e308], ids=["4e307", "1.7e308"])
@pytest.mark.parametrize("gram_dtype", [torch.float32, torch.float64], ids=["fp32-gram", "fp64-gram"])
@pytest.mark.parametrize("layout", ["flat", "conv"])
def test_activation_stats_float64_features_near_the_float64_max(backend, device, peak, gram_dtype, layout):
    """float64 features up to the float64 max (their column sums, deviations from the first batch's mean and span
    overflow; Σ (z − k) was kept unscaled and the update or finalize raised): the correlation is that of the data
    divided by 2^600 (scale-invariant), the float64 mean that of the divided data times 2^600 (exact); covariance and
    float32 mean, beyond their dtype's range, raise."""
    if gram_dtype == torch.float64 and backend != "torch":
        pytest.skip("gram_dtype=torch.float64 is a torch-backend option")
    fa, fb = _near_max_features(48, peak, seed=40)
    down = 2.0 ** -600  # values ~1e127: squares and sums fit float64
    want_corr = activation_correlation_torch(fa * down, fb * down)
    want_mean = activation_moments_torch(fa * down, fb * down)[1] / down
    assert bool(torch.isfinite(want_mean).all())
    fa, fb = fa.to(device), fb.to(device)
    sizes = [16, 20, 12]
    if layout == "conv":  # the same pooled rows: (12, 4, 5) tokens, (12, 4, 2, 2) maps; 4 rows per sample
        fa, fb = fa.reshape(12, 4, 5), fb.T.reshape(4, 12, 2, 2).permute(1, 0, 2, 3)
        sizes = [4, 5, 3]
    stats = _stream(ActivationStats([5, 4], backend=backend, gram_dtype=gram_dtype), _split([fa, fb], sizes))
    corr = stats.correlation()
    assert not torch.isnan(corr).any()
    tol = 1e-6 if gram_dtype == torch.float64 else corr_tol(torch.float32, device, 48)
    torch.testing.assert_close(corr.double(), want_corr.to(device), rtol=0, atol=tol)
    assert float(corr[4].abs().sum()) == 1.0  # the constant unit stays dead
    torch.testing.assert_close(stats.mean(torch.float64), want_mean.to(device), rtol=0, atol=1e-12 * peak)
    with pytest.raises(ValueError, match="mean .* exceeds the range of torch.float32"):
        stats.mean()
    for dtype in (torch.float32, torch.float64):
        with pytest.raises(ValueError, match=f"covariance .* exceeds the range of {dtype}"):
            stats.covariance(dtype)


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_activation_stats_float64_centered_features_near_the_max_in_many_batches(backend, device):
    """Centered float64 features at 4e307 in 6 batches: no column sum overflows, but the unscaled Σ (z − k) (the
    scaled batch sums divided by scales ~2^-1000) did, and finalize reported "moments overflowed"."""
    g = torch.Generator().manual_seed(43)
    f = torch.randn(48, 4, generator=g, dtype=torch.float64)
    f[:, 1] += f[:, 0]
    f = f / f.abs().max() * 4e307
    stats = _stream(ActivationStats([4], backend=backend), _split([f.to(device)], [8] * 6))
    down = 2.0 ** -600
    torch.testing.assert_close(stats.correlation().double(), activation_correlation_torch(f * down).to(device),
                               rtol=0, atol=corr_tol(torch.float32, device, 48))
    torch.testing.assert_close(stats.mean(torch.float64), (f * down).mean(0).to(device) / down, rtol=0,
                               atol=1e-12 * 4e307)


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_activation_stats_scaled_sum_keeps_ordinary_results(backend, device):
    """The running column sum is kept scaled like the Gram (powers of two): for ordinary features the float64 mean
    and covariance unscale exactly, so streaming in one batch or several gives the one-shot values."""
    fa = _data(40, 6, torch.float64, device, seed=41, mean=3.0, std=1e-3)
    fb = _data(40, 3, torch.float64, device, seed=42, mean=-1e5, std=2e4)
    stats = _stream(ActivationStats([6, 3], backend=backend), _split([fa, fb], [10, 25, 5]))
    count, mean, cov = activation_moments_torch(fa, fb)
    torch.testing.assert_close(stats.mean(torch.float64), mean, rtol=1e-13, atol=0)
    sd = cov.diagonal().sqrt()
    rel = (stats.covariance(torch.float64) - cov) / torch.outer(sd, sd)
    assert float(rel.abs().max()) < corr_tol(torch.float32, device, 40)


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("conv", [False, True], ids=["rows", "conv"])
def test_activation_stats_float64_mean_far_above_the_spread(backend, device, conv):
    """float64 features 1e6 ± 1e-4 (beyond fp32's 24 bits): they must be shifted in float64 before the rounding
    to fp32 (0.996 off when they were rounded first), in both buffer layouts of the torch path."""
    fa, fb = _unit_features(60, torch.float64, device, 1.0, seed=39)
    fa, fb = 1e6 + 1e-4 * fa, -2e7 + 1e-3 * fb
    want = correlation_matrix_torch(torch.cat([fa, fb], 1).T)
    if conv:  # (N, C, H, W) maps pooled over N·H·W rows: the same rows, in a conv layout
        fa, fb = (f.reshape(15, 2, 2, f.shape[1]).permute(0, 3, 1, 2) for f in (fa, fb))
    stats = _stream(ActivationStats([5, 4], backend=backend), _split([fa, fb], [5, 10] if conv else [20, 40]))
    torch.testing.assert_close(stats.correlation().double(), want, rtol=0, atol=corr_tol(torch.float32, device, 60))


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_activation_stats_total_count_and_empty_batches(backend, device):
    fa = _data(20, 4, torch.float32, device, seed=17)
    fb = _data(20, 3, torch.float32, device, seed=18)
    stats = ActivationStats(7, backend=backend)  # the total: any split across models
    stats.update(fa[:0], fb[:0])  # nothing yet
    assert stats.count == 0
    with pytest.raises(ValueError, match="no rows seen"):
        stats.correlation()
    stats.update(fa[:10], fb[:10])
    stats.update(torch.cat([fa[10:], fb[10:]], 1))  # one tensor of 7 features
    _check_stats(stats, [fa, fb], corr_tol(torch.float32, device, 20), 1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_triton_launches_on_the_tensors_device():
    """Tensors on cuda:1 while cuda:0 is current: every Triton launch goes to the tensors' device."""
    dev = "cuda:1"
    assert torch.cuda.current_device() == 0
    x = _data(37, 29, torch.float32, dev, seed=22)
    torch.testing.assert_close(correlation_matrix(x, backend="triton").double(), correlation_matrix_torch(x),
                               rtol=0, atol=corr_tol(torch.float32, "cuda", 29))
    z = _data(50, 23, torch.float64, dev, seed=23)
    mean, second = z.mean(0), z.T @ z
    torch.testing.assert_close(correlation_from_moments(mean, second, 50, backend="triton").double(),
                               correlation_from_moments_torch(mean, second, 50), rtol=0, atol=1e-6)
    fa, fb = _data(40, 6, torch.float32, dev, seed=24), _data(40, 5, torch.float32, dev, seed=25)
    stats = _stream(ActivationStats([6, 5], backend="triton"), _split([fa, fb], [20, 20]))
    assert stats.device == torch.device(dev)
    _check_stats(stats, [fa, fb], corr_tol(torch.float32, "cuda", 40), 1e-6)

needs_ssyrk = pytest.mark.skipif(sim._ssyrk is None, reason="scipy's BLAS has no ssyrk")


@needs_ssyrk
@pytest.mark.parametrize("rows, d", [(1, 1), (3, 5), (17, 33), (129, 70), (1000, 257)])
@pytest.mark.parametrize("layout", ["C", "F"])
def test_syrk_upper_add_equals_gemm(rows, d, layout):
    """acc += cᵀc by ssyrk (Fortran views, beta = 1, in place): the upper triangle equals a GEMM's, the lower is untouched."""
    g = torch.Generator().manual_seed(rows * 1000 + d)
    c = torch.randn(rows, d, generator=g) + 2.0
    if layout == "F":  # what the conv path passes: the transpose of a (D, rows) buffer
        c = c.T.contiguous().T
    acc = torch.randn(d, d, generator=g)
    upper = torch.ones(d, d, dtype=torch.bool).triu()
    acc[~upper] = float("nan")  # the strictly lower triangle must stay as it is
    before = acc.clone()
    ptr = acc.data_ptr()
    assert sim._syrk_upper_add_(acc, c)
    assert acc.data_ptr() == ptr
    ref = before.double() + c.double().T @ c.double()
    gemm = before + c.T @ c  # plain torch fp32 GEMM: the error it makes bounds ours
    gemm_err = float((gemm.double() - ref)[upper].abs().max())
    err = float((acc.double() - ref)[upper].abs().max())
    assert err <= 4 * gemm_err + 1e-6 * float(ref[upper].abs().max())
    assert torch.isnan(acc[~upper]).all()


@needs_ssyrk
def test_syrk_upper_add_refuses_strided_input():
    c = torch.randn(10, 12)[:, ::2]  # neither C- nor F-contiguous: the caller uses the GEMM path
    acc = torch.zeros(6, 6)
    assert not sim._syrk_upper_add_(acc, c)
    assert torch.equal(acc, torch.zeros(6, 6))


@needs_ssyrk
@pytest.mark.parametrize("kind", ["flat", "conv", "mixed"])
def test_activation_stats_syrk_path_equals_gemm_path(monkeypatch, kind):
    """The ssyrk path (1 torch and BLAS thread) and the GEMM path give the same statistics: odd shapes, non-contiguous
    features, streaming over uneven batches (more than the flush interval), both buffer layouts."""
    g = torch.Generator().manual_seed(21)
    n = 97
    if kind == "flat":  # non-contiguous: a column slice and a transposed buffer
        features = [(3.0 + torch.randn(n, 31, generator=g))[:, ::2], torch.randn(37, n, generator=g).T]
    elif kind == "conv":  # a channels-last map (non-contiguous in NCHW terms)
        features = [torch.randn(n, 3, 3, 13, generator=g).permute(0, 3, 1, 2), torch.randn(n, 6, 3, 3, generator=g)]
    else:
        features = [torch.randn(n, 9, 5, generator=g)[:, ::3], torch.randn(n, 7, 1, 3, generator=g)]
    features[0].add_(0.5 * features[1].reshape(n, -1)[:, :1].reshape((n,) + (1,) * (features[0].dim() - 1)))
    assert not all(f.is_contiguous() for f in features)
    sizes = [13, 1, 20, 2, 9, 5, 17, 3, 4, 11, 12]  # 11 uneven batches, 97 rows
    calls = []
    real = sim._syrk_upper_add_

    def counted(acc, c):
        assert real(acc, c)
        calls.append(c.shape)
        return True

    results = {}
    for use in (True, False):
        monkeypatch.setattr(sim, "_use_syrk", lambda c, use=use: use)
        monkeypatch.setattr(sim, "_syrk_upper_add_", counted)
        stats = _stream(ActivationStats([_rows_channels(f) for f in features], backend="torch"),
                        _split(features, sizes))
        results[use] = stats
        tol = corr_tol(torch.float32, "cpu", 64)
        _check_stats(stats, features, tol, tol)
    assert len(calls) == len(sizes)  # every batch went through ssyrk on the first pass, none on the second
    syrk, gemm = results[True], results[False]
    scale = float(gemm.covariance(torch.float64).diagonal().max())
    torch.testing.assert_close(syrk.covariance(torch.float64), gemm.covariance(torch.float64), rtol=0,
                               atol=1e-6 * scale)
    torch.testing.assert_close(syrk.correlation(), gemm.correlation(), rtol=0, atol=1e-5)
    assert torch.equal(syrk.covariance(), syrk.covariance().T)


@needs_ssyrk
def test_activation_stats_syrk_path_features_requiring_grad(monkeypatch):
    monkeypatch.setattr(sim, "_use_syrk", lambda c: True)
    w = torch.randn(5, 5, requires_grad=True)
    fa = torch.randn(40, 5) @ w
    fb = torch.randn(10, 3, 2, 2, requires_grad=True)  # conv: the (D, rows) buffer layout
    stats = _stream(ActivationStats([5]), _split([fa], [15, 25]))
    _check_stats(stats, [fa.detach()], 1e-5, 1e-5)
    stats = _stream(ActivationStats([3]), _split([fb], [3, 7]))
    _check_stats(stats, [fb.detach()], 1e-5, 1e-5)


def test_scaled_centered_rows():
    """The scale-then-center step shared by the exact torch rows and the Triton float64 rows: power-of-two scales
    to max |row| in [0.5, 1), rows centered as the divided rows are, NaN/Inf rows non-finite (the callers'
    finiteness check); _normalized_rows_exact then makes constant rows exactly 0 at any magnitude."""
    g = torch.Generator().manual_seed(44)
    x = torch.randn(6, 13, generator=g, dtype=torch.float64)
    peaks = torch.tensor([1.0, 1e300, 1e-300, 1.7e308, 3.0, 1.0], dtype=torch.float64)
    x = x / x.abs().amax(1, keepdim=True) * peaks[:, None]
    x[4] = 0.7  # constant rows (at 0.7, 13 wide, a one-pass mean leaves a residual of 1e-16)
    x[5] = -1.7e308
    c, scale = sim._scaled_centered_rows(x)
    assert torch.equal(torch.frexp(scale).mantissa, torch.full_like(scale, 0.5))  # powers of two
    top = x.abs().amax(1) * scale
    assert bool(((top >= 0.5) & (top < 1)).all())
    down = x * scale[:, None]  # exact
    torch.testing.assert_close(c, down - down.mean(1, keepdim=True), rtol=0, atol=1e-15)
    rows = sim._normalized_rows_exact(x, 0.0)
    assert torch.equal(rows[4:], torch.zeros_like(rows[4:]))
    torch.testing.assert_close(rows[:4].norm(dim=1), torch.ones(4, dtype=torch.float64), rtol=0, atol=1e-15)
    x[1, 2], x[2, 0] = float("nan"), float("inf")
    c, _ = sim._scaled_centered_rows(x)
    assert torch.isfinite(c).all(1).tolist() == [True, False, False, True, True, True]


@pytest.mark.parametrize("n", [0, 1, 5, 128, 129, 300])
def test_mirror_upper_triangle(n):
    a = torch.randn(n, n, dtype=torch.float64)
    got = sim._mirror_upper_triangle(a, tile=128)
    assert torch.equal(got, torch.triu(a) + torch.triu(a, 1).T)


def test_activation_stats_syrk_only_with_one_thread():
    c = torch.zeros(4, 300)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert not sim._use_syrk(c)  # 2 torch threads: GEMM (OpenBLAS's and torch's threads would fight)
        torch.set_num_threads(1)
        assert sim._use_syrk(c) == (sim._ssyrk is not None and sim._scipy_blas_threads() == 1)
        assert not sim._use_syrk(c.double())
    finally:
        torch.set_num_threads(threads)


def test_activation_stats_float64_gram():
    fa = _data(40, 5, torch.float64, "cpu", seed=19, mean=1e6)
    fb = _data(40, 4, torch.float64, "cpu", seed=20)
    stats = _stream(ActivationStats([5, 4], backend="torch", gram_dtype=torch.float64), _split([fa, fb], [15, 25]))
    count, mean, cov = activation_moments_torch(fa, fb)
    torch.testing.assert_close(stats.covariance(torch.float64), cov, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats.mean(torch.float64), mean, rtol=1e-14, atol=1e-12)


def test_activation_stats_errors():
    stats = ActivationStats([3, 4])
    a, b = torch.randn(5, 3), torch.randn(5, 4)
    with pytest.raises(ValueError, match="expects 2 feature tensors"):
        stats.update(a)
    with pytest.raises(ValueError, match=r"features\[1\] \(model 1\) pools to 6 rows"):
        stats.update(a, torch.randn(6, 4))
    with pytest.raises(ValueError, match=r"features\[1\] \(model 1\) has 5 channels"):
        stats.update(a, torch.randn(5, 5))
    with pytest.raises(ValueError, match=r"features\[0\] \(model 0\) must be"):
        stats.update(torch.randn(5, 3, 1, 1, 1), b)
    with pytest.raises(TypeError, match=r"features\[1\]"):
        stats.update(a, torch.ones(5, 4, dtype=torch.int32))
    bad = b.clone()
    bad[2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"features\[1\] \(model 1\) contains NaN or Inf"):
        stats.update(a, bad)
    bad = a.clone()
    bad[0, 0] = float("-inf")
    with pytest.raises(ValueError, match=r"features\[0\] \(model 0\) contains NaN or Inf"):
        stats.update(bad, b)
    assert stats.count == 0  # rejected batches leave no trace
    with pytest.raises(ValueError, match="num_features"):
        ActivationStats([3, -1])
    with pytest.raises(TypeError, match="num_features"):
        ActivationStats("12")
    with pytest.raises(ValueError, match="num_features = 7"):
        ActivationStats(7).update(torch.randn(4, 3))
    stats.update(a, b)
    with pytest.raises(ValueError, match="eps"):
        stats.correlation(eps=-1)


@pytest.mark.parametrize("backend", ["torch"] + (["triton"] if triton_interpreting() else []))
def test_activation_stats_names_the_model_with_inf_next_to_near_max_features(backend):
    a = torch.full((3, 2), torch.finfo(torch.float64).max, dtype=torch.float64)  # finite; its column sums overflow
    b = a.clone()
    b[0, 1] = float("inf")
    with pytest.raises(ValueError, match=r"features\[1\] \(model 1\) contains NaN or Inf"):  # blamed model 0
        ActivationStats([2, 2], backend=backend).update(a, b)


def test_activation_stats_argument_checks():
    with pytest.raises(ValueError, match="backend must be one of"):  # used to wait for the first update
        ActivationStats(3, backend="cuda")
    with pytest.raises(ValueError, match="device must name a torch device.*'gpu'"):
        ActivationStats(3, device="gpu")
    with pytest.raises(TypeError, match="device must be"):
        ActivationStats(3, device=1.5)
    with pytest.raises(ValueError, match="device"):
        ActivationStats(3, device=-1)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device cuda.* not available"):
            ActivationStats(3, device="cuda")
    with pytest.raises(TypeError, match="gram_dtype must be a torch.dtype"):
        ActivationStats(3, gram_dtype="float64")
    with pytest.raises(TypeError, match="gram_dtype"):
        ActivationStats(3, gram_dtype=torch.int32)
    with pytest.raises(ValueError, match="gram_dtype"):
        ActivationStats(3, gram_dtype=torch.float16)
    # 'cpu:0' is the device its tensors report as cpu: features on cpu must be accepted
    stats = ActivationStats(3, device="cpu:0")
    assert stats.device == torch.device("cpu")
    stats.update(torch.randn(6, 3))
    for bad in ("float64", torch.int32, torch.bool, torch.complex64, None, float):
        with pytest.raises(TypeError, match="dtype"):
            stats.mean(bad)
        with pytest.raises(TypeError, match="dtype"):
            stats.covariance(bad)
    with pytest.raises(TypeError, match="eps"):
        stats.correlation("1e-8")
    assert stats.mean(torch.float64).dtype == torch.float64
    assert stats.covariance(torch.float16).dtype == torch.float16
    model = torch.nn.Linear(2, 3)
    with pytest.raises(TypeError, match="input"):
        with activation_stats_hooks([model], ActivationStats(3), input="no"):
            pass
    with pytest.raises(TypeError, match="channel_dim"):
        with activation_stats_hooks([model], ActivationStats(3), channel_dim=1.0):
            pass


# --------------------------------------------------------------------------- hooks


def _two_models(seed):
    torch.manual_seed(seed)
    return [torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)) for _ in range(2)]


@pytest.mark.parametrize("use_input", [False, True])
def test_activation_stats_hooks_feed_and_remove(use_input):
    models = _two_models(0)
    hooked = [m[1] for m in models]  # the ReLU: its output, or its input (the pre-activation)
    stats = ActivationStats([8, 8])
    batches = [torch.randn(10, 6) for _ in range(3)]
    with torch.no_grad(), activation_stats_hooks(hooked, stats, input=use_input) as s:
        assert s is stats
        for x in batches:
            for m in models:
                m(x)
    assert all(len(m._forward_hooks) == 0 for m in hooked)
    want = ActivationStats([8, 8])
    with torch.no_grad():
        for x in batches:
            feats = [(m[0](x) if use_input else m[1](m[0](x))) for m in models]
            want.update(*feats)
    assert stats.count == 30
    torch.testing.assert_close(stats.correlation(), want.correlation(), rtol=0, atol=1e-6)


def test_activation_stats_hooks_errors_and_cleanup():
    models = _two_models(1)
    hooked = [m[0] for m in models]
    stats = ActivationStats([8, 8])
    x = torch.randn(4, 6)
    with pytest.raises(RuntimeError, match="fired twice"):
        with torch.no_grad(), activation_stats_hooks(hooked, stats):
            models[0](x)
            models[0](x)
    assert all(len(m._forward_hooks) == 0 for m in hooked)
    with pytest.raises(RuntimeError, match=r"not models \[1\]"):
        with torch.no_grad(), activation_stats_hooks(hooked, stats):
            models[0](x)
    assert all(len(m._forward_hooks) == 0 for m in hooked)
    with pytest.raises(KeyError):
        with activation_stats_hooks(hooked, stats):
            raise KeyError("user error")
    assert all(len(m._forward_hooks) == 0 for m in hooked)
    with pytest.raises(TypeError, match=r"modules_per_model\[1\]"):
        with activation_stats_hooks([hooked[0], "nope"], stats):
            pass
    with pytest.raises(TypeError, match="stats must be"):
        with activation_stats_hooks(hooked, object()):
            pass


# --------------------------------------------------------------------------- dual_similarity


def test_dual_similarity():
    a = torch.rand(5, 6) * 2 - 1
    b = torch.rand(5, 6) * 2 - 1
    for w in (0.0, 0.1, 0.5, 0.9, 1.0):
        got = dual_similarity(a, b, w)
        torch.testing.assert_close(got.double(), sim.dual_similarity_torch(a, b, w), rtol=0, atol=1e-7)
        assert float(got.abs().max()) <= 1.0 + 1e-6  # a convex combination stays in [-1, 1]
    assert torch.equal(dual_similarity(a, b, 1.0), a) and torch.equal(dual_similarity(a, b, 0.0), b)
    assert dual_similarity(a.double(), b).dtype == torch.float64
    # the term weighted 0 takes no part: its -inf (forbidden pairs) or +inf must not become NaN (-inf * 0)
    forbidden = b.clone()
    forbidden[0, 1], forbidden[2, 3] = float("-inf"), float("inf")
    for fn in (dual_similarity, sim.dual_similarity_torch):
        assert torch.equal(fn(a, forbidden, 1.0).to(a.dtype), a)
        assert torch.equal(fn(forbidden, a, 0.0).to(a.dtype), a)
        assert fn(a, forbidden, 0.5)[0, 1] == float("-inf")
    out = dual_similarity(a, b, 1.0)
    out.zero_()
    assert bool(a.abs().sum() > 0)  # the result is a new tensor, not an alias of s_weight
    for w in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="w"):
            dual_similarity(a, b, w)
    with pytest.raises(TypeError, match="w"):
        dual_similarity(a, b, True)
    with pytest.raises(ValueError, match="same shape"):
        dual_similarity(a, b.T)
    with pytest.raises(TypeError, match="s_act"):
        dual_similarity(a, torch.ones(5, 6, dtype=torch.int64))


# --------------------------------------------------------------------------- group_similarity


def _scipy_groups(s_cross, s):
    c = s_cross.double().cpu().numpy()
    g = c.shape[0] // s
    scores = np.zeros((g, g))
    for a in range(g):
        for b in range(g):
            block = c[a * s:(a + 1) * s, b * s:(b + 1) * s]
            r, cols = scipy_lsa(block, maximize=True)
            scores[a, b] = block[r, cols].sum()
    return scores


@pytest.mark.parametrize("g, s", [(1, 1), (3, 4), (4, 5), (12, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_group_similarity_matches_scipy_loop(g, s, dtype):
    s_cross = (torch.rand(g * s, g * s, dtype=torch.float64) * 2 - 1).to(dtype)
    scores, perms = group_similarity(s_cross, s)
    assert scores.shape == (g, g) and scores.dtype == dtype
    assert perms.shape == (g, g, s) and perms.dtype == torch.int64
    want = _scipy_groups(s_cross, s)
    np.testing.assert_allclose(scores.double().numpy(), want, rtol=1e-6 if dtype == torch.float32 else 1e-12,
                               atol=1e-6 if dtype == torch.float32 else 1e-12)
    # every perm is a permutation achieving its score
    c = s_cross.double()
    for a in range(g):
        for b in range(g):
            p = perms[a, b]
            assert torch.equal(torch.sort(p).values, torch.arange(s))
            total = c[a * s + torch.arange(s), b * s + p].sum()
            assert abs(float(total) - want[a, b]) <= 1e-5
    if g * s <= 20:  # the torch reference solver is slow; small cases only
        ref_scores, _ = group_similarity_torch(s_cross, s)
        np.testing.assert_allclose(ref_scores.numpy(), want, rtol=1e-12, atol=1e-12)


def test_group_similarity_recovers_heads():
    """Heads of B are A's heads permuted (and units permuted within each head): the best pairs are the true ones."""
    g, s, d = 4, 6, 50
    x = _data(g * s, d, torch.float32, "cpu", seed=21)
    head_perm = torch.tensor([2, 0, 3, 1])
    unit_perms = [torch.randperm(s, generator=torch.Generator().manual_seed(k)) for k in range(g)]
    # B's head h holds A's head head_perm[h], units shuffled by unit_perms[h]
    y = torch.cat([x[head_perm[h] * s + unit_perms[h]] for h in range(g)]) + 0.05 * torch.randn(g * s, d)
    scores, perms = group_similarity(correlation_matrix(x, y), s)
    rows, cols = mk.linear_sum_assignment(scores, maximize=True)
    assert torch.equal(head_perm[cols], rows)
    for h in range(g):
        a = int(head_perm[h])
        # A's unit a·s + i matches B's unit h·s + perms[a, h, i], which holds A's unit a·s + unit_perms[h][...]
        assert torch.equal(unit_perms[h][perms[a, h]], torch.arange(s))


def test_group_similarity_errors_and_empty():
    scores, perms = group_similarity(torch.zeros(0, 0), 3)
    assert scores.shape == (0, 0) and perms.shape == (0, 0, 3)
    with pytest.raises(ValueError, match="divide"):
        group_similarity(torch.zeros(6, 6), 4)
    with pytest.raises(ValueError, match="square"):
        group_similarity(torch.zeros(6, 4), 2)
    with pytest.raises(ValueError, match="group_size"):
        group_similarity(torch.zeros(6, 6), 0)
    bad = torch.zeros(4, 4)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        group_similarity(bad, 2)
    assert group_similarity(torch.rand(4, 4, dtype=torch.float16), 2)[0].dtype == torch.float32


def test_exports():
    for name in ("ActivationStats", "correlation_matrix", "dual_similarity", "group_similarity"):
        assert getattr(mk, name) is getattr(sim, name)


# --------------------------------------------------------------------------- tf32 operand rounding

if sim.triton is not None:
    tl = sim.tl

    @sim.triton.jit
    def _tf32_round_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr + i, sim._tf32_rounded(tl.load(x_ptr + i, mask=i < n)), mask=i < n)


def _nearest_tf32(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest on 10 mantissa bits, ties away from zero, by comparing the two neighbours in float64."""
    bits = x.astype(np.float32).view(np.uint32)
    low = (bits & np.uint32(0xFFFFE000)).view(np.float32).astype(np.float64)  # toward zero
    high = ((bits & np.uint32(0xFFFFE000)) + np.uint32(0x2000)).view(np.float32).astype(np.float64)  # away
    exact = x.astype(np.float64)
    away = np.abs(high - exact) <= np.abs(exact - low)
    return np.where(away, high, low).astype(np.float32)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_tf32_operand_rounding_is_to_nearest(device):
    # the 16-bit correlation kernels round their fp32 operands before the tensor cores read the top 19 bits
    skip_unless_triton_runs_on(device)
    rng = np.random.default_rng(0)
    one_ulp = np.float32(2.0 ** -23)
    x = np.concatenate([
        rng.standard_normal(3000).astype(np.float32) * np.float32(10.0) ** rng.integers(-30, 30, 3000),
        np.float32(1.0) + np.arange(0, 0x2000, 0x100, dtype=np.float32) * one_ulp,  # every low-bit pattern
        np.array([1.0 + 0x1000 * 2.0 ** -23, -(1.0 + 0x1000 * 2.0 ** -23)], dtype=np.float32),  # ties: away from 0
        np.array([2.0 - 2.0 ** -23], dtype=np.float32),  # rounds up into the next binade
        np.array([0.0, -0.0, 1e-40, -3e38, 3.3e38], dtype=np.float32),  # zeros, a subnormal, near the max
    ]).astype(np.float32)
    out = torch.empty(len(x), dtype=torch.float32, device=device)
    _tf32_round_kernel[(sim.triton.cdiv(len(x), 1024),)](torch.from_numpy(x).to(device), out, len(x), BLOCK=1024)
    got = out.cpu().numpy()
    want = _nearest_tf32(x)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    normal = np.abs(x) >= np.finfo(np.float32).tiny  # subnormals have fewer bits to keep
    err = np.abs(got.astype(np.float64) - x)[normal]
    assert np.all(err <= 2.0 ** -11 * np.abs(x[normal].astype(np.float64)))  # half a tf32 ulp at most


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_cross_correlation_beyond_the_grid_limit_is_done_in_slices(device, monkeypatch):
    # CUDA grids stop at 65535 tiles on their second axis (4M rows of y): the launcher slices y and out's columns
    skip_unless_triton_runs_on(device)
    x, y = _data(21, 33, torch.float32, device, seed=5), _data(70, 33, torch.float32, device, seed=6)
    whole = correlation_matrix(x, y, backend="triton")
    monkeypatch.setattr(sim, "_MAX_GRID_Y", 1)  # one tile of y rows per slice
    sliced = correlation_matrix(x, y, backend="triton")
    assert torch.equal(sliced, whole)  # the same tiles, computed in other launches
    torch.testing.assert_close(sliced.double(), correlation_matrix_torch(x, y), rtol=0,
                               atol=corr_tol(torch.float32, device, 33, "triton"))
    assert torch.equal(correlation_matrix(x, backend="triton"), correlation_matrix(x, backend="triton").T)
