"""The greedy zip op: the fast paths (native, and numpy where _C is missing) against the O(n³) reference,
ties included."""

import numpy as np
import pytest
import torch

import merging_kernels as mk
from merging_kernels.ops import zip_matching
from merging_kernels.ops.zip_matching import greedy_zip, greedy_zip_torch

NATIVE = mk.build_info()["available"]
_ZIP_BACKEND = zip_matching._zip_backend  # the real one (the fixture below replaces it)


@pytest.fixture(autouse=True, params=["native", "numpy"])
def fast_path(request, monkeypatch):
    """Every test runs with each fast path as greedy_zip's default (numpy is the default without _C)."""
    if request.param == "native" and not NATIVE:
        pytest.skip("_C not built")
    choose = zip_matching._zip_backend
    monkeypatch.setattr(zip_matching, "_zip_backend", lambda backend: request.param if backend is None
                        else choose(backend))
    return request.param


@pytest.mark.parametrize("kind", ["uniform", "integer ties", "all equal", "correlation"])
@pytest.mark.parametrize("n", [1, 2, 7, 33])
def test_fast_path_equals_reference(kind, n):
    g = torch.Generator().manual_seed(n)
    if kind == "uniform":
        s = torch.rand(2 * n, 2 * n, generator=g)
    elif kind == "integer ties":
        s = torch.randint(0, 3, (2 * n, 2 * n), generator=g).float()
    elif kind == "all equal":
        s = torch.ones(2 * n, 2 * n)
    else:
        f = torch.randn(2 * n, 50, generator=g)
        s = torch.corrcoef(f)
    s = (s + s.T) / 2
    for alpha, factor in ((0.5, 0.5), (0.3, 1.0), (0.5, 0.0)):  # 0: never re-merge (-inf * 0 must stay -inf)
        merge, unmerge = greedy_zip(s, alpha, factor)
        merge_ref, unmerge_ref = greedy_zip_torch(s, alpha, factor)
        assert torch.equal(unmerge, unmerge_ref)
        torch.testing.assert_close(merge, merge_ref)
        assert merge.shape == (n, 2 * n) and unmerge.shape == (2 * n, n)
        assert torch.equal(unmerge.sum(1), torch.ones(2 * n))  # every unit in exactly one merged unit
        torch.testing.assert_close(merge.sum(1), torch.ones(n))  # merge rows are weighted averages


def test_reference_validates_like_the_fast_path():
    with pytest.raises(ValueError, match="n >= 1"):
        greedy_zip_torch(torch.empty(0, 0))
    with pytest.raises(TypeError, match="sim must be a torch.Tensor"):
        greedy_zip([[0.0, 1.0], [1.0, 0.0]])


@pytest.mark.parametrize("zip_fn", [greedy_zip, greedy_zip_torch])
def test_factor_is_validated(zip_fn):
    s = torch.rand(6, 6)
    for bad in (-0.5, 1.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="factor must be"):
            zip_fn(s, 0.5, bad)
    for bad in (True, "0.5", None):
        with pytest.raises(TypeError, match="factor must be a real number"):
            zip_fn(s, 0.5, bad)
    torch.testing.assert_close(zip_fn(s, 0.5, np.float32(0.25))[0], zip_fn(s, 0.5, 0.25)[0])  # numpy scalars


def _pairs_agree(s, alpha=0.5, factor=0.5):
    """The fast path equals the reference on s; returns the fast path's (merge, unmerge)."""
    merge, unmerge = greedy_zip(s, alpha, factor)
    merge_ref, unmerge_ref = greedy_zip_torch(s, alpha, factor)
    assert torch.equal(unmerge, unmerge_ref)
    assert torch.equal(merge, merge_ref)
    n = s.shape[0] // 2
    assert merge.shape == (n, 2 * n) and unmerge.shape == (2 * n, n)
    assert merge.dtype == unmerge.dtype == torch.float32
    assert torch.equal(unmerge.sum(1), torch.ones(2 * n))
    return merge, unmerge


def test_a_tie_reached_by_scaling_a_negative_similarity_takes_the_first_column():
    # step 1 merges (1, 2); unit 0's similarity to the merged unit becomes min(-2, -2) * 0.5 = -1, equal to
    # its similarity to unit 3 (-1), and column 1 comes first: the reference merges 0 into {1, 2}. The fast
    # path kept row 0's old maximum (column 3) on the tie and merged (0, 3) instead.
    s = torch.full((6, 6), -9.0)
    for (a, b), v in {(1, 2): 5.0, (0, 1): -2.0, (0, 2): -2.0, (0, 3): -1.0, (4, 5): -1.5}.items():
        s[a, b] = s[b, a] = v
    _, unmerge = _pairs_agree(s)
    assert torch.equal(unmerge.argmax(1), torch.tensor([0, 0, 0, 1, 2, 2]))


@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_negative_integer_ties_fast_path_equals_reference(n):
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        s = -torch.randint(0, 3, (2 * n, 2 * n), generator=g).float()
        s = torch.maximum(s, s.T)
        for factor in (0.5, 0.25, 0.0, 1.0):
            _pairs_agree(s, 0.5, factor)


def test_float64_input_is_matched_in_float64():
    # the reviewer's repro: 0.5 + 1e-12 rounds to 0.5 in float32, and (0, 1) came first
    s = torch.full((4, 4), 0.1, dtype=torch.float64)
    s[0, 1] = s[1, 0] = 0.5
    s[0, 2] = s[2, 0] = 0.5 + 1e-12
    _, unmerge = _pairs_agree(s)
    assert torch.equal(unmerge.argmax(1), torch.tensor([0, 1, 0, 1]))
    # beyond float32's range: 1e39 and 2e39 both became inf in float32
    s = torch.full((4, 4), 1e38, dtype=torch.float64)
    s[0, 1] = s[1, 0] = 1e39
    s[0, 2] = s[2, 0] = 2e39
    _, unmerge = _pairs_agree(s)
    assert torch.equal(unmerge.argmax(1), torch.tensor([0, 1, 0, 1]))
    # and negative ones: -1e39 (a low similarity) is not -inf (a used unit)
    _pairs_agree(-s)
    _pairs_agree(-s, 0.5, 0.0)


def test_float32_input_is_matched_in_float32_by_both_paths():
    # factor 0.3 is rounded to float32 (0.30000001...) in both paths: 1 * 0.3 then ties s[2, 3] = float32(0.3)
    # and (0, 2) comes first; in float64 1 * 0.3 < float32(0.3) and (2, 3) wins. The reference used to work in
    # float64 on float32 input and disagreed with the fast path here.
    s = torch.zeros(4, 4)
    for (a, b), v in {(0, 1): 2.0, (0, 2): 1.0, (1, 2): 1.0, (2, 3): float(torch.tensor(0.3))}.items():
        s[a, b] = s[b, a] = v
    _, unmerge = _pairs_agree(s, 0.5, 0.3)
    assert torch.equal(unmerge.argmax(1), torch.tensor([0, 0, 0, 1]))
    _, unmerge = _pairs_agree(s.double(), 0.5, 0.3)
    assert torch.equal(unmerge.argmax(1), torch.tensor([0, 0, 1, 1]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["uniform", "ties", "huge"])
def test_every_float_dtype_fast_path_equals_reference(dtype, kind):
    g = torch.Generator().manual_seed(3)
    n = 13
    if kind == "uniform":
        s = torch.randn(2 * n, 2 * n, generator=g)
    elif kind == "ties":
        s = torch.randint(-2, 3, (2 * n, 2 * n), generator=g).float()
    else:  # near the top of each dtype's range, both signs
        s = torch.randn(2 * n, 2 * n, generator=g, dtype=torch.float64).clamp(-1, 1) * torch.finfo(dtype).max
    s = (s / 2 + s.T / 2).to(dtype)
    assert bool(torch.isfinite(s).all())
    for factor in (0.5, 0.3, 0.0, 1.0):
        merge, unmerge = _pairs_agree(s, 0.3, factor)
        if dtype in (torch.float16, torch.bfloat16):  # documented: matched in float32 (an exact upcast)
            assert torch.equal(unmerge, greedy_zip(s.float(), 0.3, factor)[1])


def test_two_by_two_and_the_alpha_weights():
    s = torch.tensor([[0.0, -3.0], [-3.0, 0.0]])
    for alpha in (0.5, 0.3):
        merge, unmerge = _pairs_agree(s, alpha)
        assert torch.equal(unmerge, torch.ones(2, 1))
        torch.testing.assert_close(merge, torch.tensor([[alpha, 1 - alpha]]), rtol=0, atol=1e-7)


@pytest.mark.parametrize("zip_fn", [greedy_zip, greedy_zip_torch])
def test_bad_shapes_are_refused(zip_fn):
    for shape in [(0, 0), (1, 1), (3, 3), (5, 5), (4, 6), (4,), (2, 4, 4), ()]:
        with pytest.raises(ValueError, match=r"sim must be \(2n, 2n\)"):
            zip_fn(torch.zeros(shape))


@pytest.mark.parametrize("zip_fn", [greedy_zip, greedy_zip_torch])
def test_non_float_sim_is_refused(zip_fn):
    for s in (torch.ones(4, 4, dtype=torch.int64), torch.ones(4, 4, dtype=torch.bool),
              torch.ones(4, 4, dtype=torch.complex64)):  # complex used to lose its imaginary part silently
        with pytest.raises(TypeError, match="sim must be float32"):
            zip_fn(s)
    with pytest.raises(TypeError, match="sim must be a torch.Tensor"):
        zip_fn(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="sim is on the meta device"):
        zip_fn(torch.zeros(4, 4, device="meta"))


@pytest.mark.parametrize("zip_fn", [greedy_zip, greedy_zip_torch])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_or_inf_off_the_diagonal_is_refused(zip_fn, bad):
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        s = torch.rand(6, 6).to(dtype)
        s[4, 1] = bad  # one entry only (an asymmetric input)
        with pytest.raises(ValueError, match="sim must be finite off the diagonal"):
            zip_fn(s)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_the_diagonal_is_ignored(bad):
    g = torch.Generator().manual_seed(5)
    s = torch.rand(10, 10, generator=g)
    s = s + s.T
    expected = _pairs_agree(s.clone().fill_diagonal_(0.0))
    for zip_fn in (greedy_zip, greedy_zip_torch):
        got = zip_fn(s.clone().fill_diagonal_(bad))
        assert torch.equal(got[1], expected[1]) and torch.equal(got[0], expected[0])


def test_non_contiguous_input():
    g = torch.Generator().manual_seed(7)
    big = torch.randn(20, 20, generator=g)  # asymmetric: a transpose is a different matrix
    for view in (big.t(), big[::2, ::2], big[2:12, 3:13], big.double().t()[1::2, 1::2]):
        assert not view.is_contiguous()
        for factor in (0.5, 1.0):
            merge, unmerge = _pairs_agree(view, 0.5, factor)
            assert torch.equal(unmerge, greedy_zip(view.contiguous(), 0.5, factor)[1])
    assert not torch.equal(greedy_zip(big)[1], greedy_zip(big.t())[1])  # the test would notice a lost transpose


def test_input_is_not_modified_and_may_require_grad():
    s = torch.randn(8, 8, requires_grad=True)
    before = s.detach().clone()
    _pairs_agree(s)
    assert torch.equal(s.detach(), before)


@pytest.mark.parametrize("zip_fn", [greedy_zip, greedy_zip_torch])
def test_alpha_is_validated(zip_fn):
    s = torch.rand(6, 6)
    for bad in ("0.5", None, True, 0.5j, [0.5], torch.tensor([0.5])):
        with pytest.raises(TypeError, match="alpha must be a real number"):
            zip_fn(s, bad)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="alpha must be finite"):
            zip_fn(s, bad)
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\)"):
            zip_fn(s, bad)
    plain = zip_fn(s, 0.25)
    for held in (np.float32(0.25), np.float64(0.25), torch.tensor(0.25), torch.tensor(0.25, dtype=torch.float64)):
        got = zip_fn(s, held)
        assert torch.equal(got[0], plain[0]) and torch.equal(got[1], plain[1])


@pytest.mark.gpu  # (a skipif alone left it out of `pytest -m gpu`)
def test_cuda_input_gives_cuda_results_equal_to_cpu():
    g = torch.Generator().manual_seed(11)
    s = torch.randn(16, 16, generator=g)
    for zip_fn in (greedy_zip, greedy_zip_torch):
        merge, unmerge = zip_fn(s.cuda())
        assert merge.device.type == unmerge.device.type == "cuda"
        cpu = zip_fn(s)
        assert torch.equal(merge.cpu(), cpu[0]) and torch.equal(unmerge.cpu(), cpu[1])


@pytest.mark.parametrize("n", [100, 300])
@pytest.mark.parametrize("kind", ["correlation", "ties"])
def test_larger_problems_fast_path_equals_reference(n, kind):
    # many steps: rows go stale, merged units merge again, columns are rewritten many times
    g = torch.Generator().manual_seed(n)
    if kind == "correlation":
        s = torch.corrcoef(torch.randn(2 * n, 3 * n, generator=g))
    else:
        s = torch.randint(-3, 4, (2 * n, 2 * n), generator=g).float()
        s = torch.maximum(s, s.T)
    for factor in (0.5, 1.0):
        _pairs_agree(s, 0.5, factor)
        _pairs_agree(s.double(), 0.5, factor)


def test_backend_argument():
    s = torch.corrcoef(torch.randn(12, 30, generator=torch.Generator().manual_seed(1)))
    expected = greedy_zip_torch(s)
    for backend in ("torch",) + (("native",) if NATIVE else ()):
        got = greedy_zip(s, backend=backend)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    with pytest.raises(mk.BackendUnavailableError, match="zip_matching has no 'triton'"):
        greedy_zip(s, backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        greedy_zip(s, backend="numpy")  # the fallback is not a backend one can ask for
    assert mk.available_backends("zip_matching", "cpu") == (["native", "torch"] if NATIVE else ["torch"])


@pytest.mark.skipif(not NATIVE, reason="_C not built")
def test_native_kernel_checks_its_sizes():
    from merging_kernels._native import native_module

    s = torch.zeros(3, 3)
    pairs = torch.empty(2, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match="m must be even and positive"):
        native_module().greedy_zip(s.data_ptr(), 3, False, 0.5, pairs.data_ptr())
    with pytest.raises(ValueError, match="null pointer"):
        native_module().greedy_zip(0, 2, False, 0.5, pairs.data_ptr())


@pytest.mark.parametrize("env", ["", "triton"])
def test_default_without_native_is_the_numpy_path_when_the_environment_names_no_zip_backend(env, monkeypatch):
    # MERGING_KERNELS_BACKEND=triton (set for the GPU ops) is ignored by ops without triton: the default stays
    # the numpy path (it used to drop to the O(n^3) reference, with a warning); torch is still honoured, and a
    # name that is no backend still refused
    from merging_kernels import _dispatch

    monkeypatch.setattr(zip_matching, "native_available", lambda device_type="cpu": False)
    monkeypatch.setattr(_dispatch, "native_available", lambda device_type="cpu": False)
    monkeypatch.setenv(_dispatch.ENV_VAR, env)
    assert _ZIP_BACKEND(None) == "numpy"
    monkeypatch.setenv(_dispatch.ENV_VAR, "torch")
    assert _ZIP_BACKEND(None) == "torch"
    monkeypatch.setenv(_dispatch.ENV_VAR, "gpu")
    with pytest.raises(ValueError, match=_dispatch.ENV_VAR):
        _ZIP_BACKEND(None)
