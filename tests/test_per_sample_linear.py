"""Per-sample merged linear op and its layers, against the float64 oracle."""

import pytest
import torch
import torch.nn.functional as F

from merging_kernels.layers import Coefficients, PerSampleConv2d, PerSampleLayerNorm, PerSampleLinear
from merging_kernels.ops.per_sample_linear import (
    CONV_STRATEGIES,
    PER_SAMPLE_LINEAR,
    choose_conv_strategy,
    choose_strategy,
    lowrank_factors,
    pack_weights,
    per_sample_conv2d,
    per_sample_layer_norm,
    per_sample_linear,
    per_sample_linear_torch,
    per_sample_lowrank_linear,
)

from helpers import fast_backend_params, guard_launches

BACKENDS = [pytest.param("torch", "cpu", id="torch-cpu")] + fast_backend_params(PER_SAMPLE_LINEAR)


def _problem(b, t, i, o, k, dtype=torch.float32, device="cpu", bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((b, t, i) if t else (b, i), generator=g)
    alpha = torch.randn(b, k, generator=g)
    w = torch.randn(o, i, generator=g) / i**0.5
    tw = 0.3 * torch.randn(k, o, i, generator=g) / i**0.5
    bb = torch.randn(o, generator=g) if bias else None
    tb = torch.randn(k, o, generator=g) if bias else None
    cast = lambda v: None if v is None else v.to(device=device, dtype=dtype)  # noqa: E731
    return cast(x), alpha.to(device), cast(w), cast(tw), cast(bb), cast(tb)


def _oracle(x, alpha, w, tw, b, tb):
    d = lambda v: None if v is None else v.double()  # noqa: E731
    return per_sample_linear_torch(d(x), d(alpha), d(w), d(tw), d(b), d(tb))


def _same_precision_error(x, alpha, w, tw, b, tb, expected):
    """Error of plain torch at x's precision: per-sample weights built and applied in that dtype."""
    wb = w + torch.einsum("bk,koi->boi", alpha.to(x.dtype), tw)
    x3 = x if x.dim() == 3 else x.unsqueeze(1)
    y = torch.einsum("bti,boi->bto", x3, wb)
    if b is not None:
        y = y + (b + alpha.to(x.dtype) @ tb).unsqueeze(1)
    y = y if x.dim() == 3 else y.squeeze(1)
    return (y.double() - expected).abs().max().item()


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("strategy", ["stacked", "materialize"])
@pytest.mark.parametrize("shape", [(1, None, 1, 1, 1), (3, None, 17, 33, 2), (4, 5, 24, 40, 3), (2, 1, 64, 16, 8),
                                   (33, 2, 9, 130, 1)])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_oracle_fp32(backend, device, strategy, shape, bias):
    x, alpha, w, tw, b, tb = _problem(*shape, device=device, bias=bias)
    pw, pb = pack_weights(w, tw, b, tb)
    y = per_sample_linear(x, alpha, pw, pb, strategy=strategy, backend=backend)
    expected = _oracle(x, alpha, w, tw, b, tb)
    assert y.shape == expected.shape and y.dtype == torch.float32
    scale = expected.abs().max().item() + 1
    # tf32 would fail this on GPU: the kernel must accumulate in true fp32 for fp32 inputs
    assert (y.double() - expected).abs().max().item() <= 2e-5 * scale


@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"), reason="torch < 2.9: legacy flag only")
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_float32_precision_follows_torch_old_and_new_tf32_settings(backend, device):
    """torch >= 2.9 raises on reading the legacy allow_tf32 once fp32_precision was set: the op must not."""
    from merging_kernels.ops.per_sample_linear import _matmul_allows_tf32

    matmul = torch.backends.cuda.matmul
    saved = matmul.fp32_precision
    x, alpha, w, tw, b, tb = _problem(33, 2, 9, 130, 2, device=device)
    pw, pb = pack_weights(w, tw, b, tb)
    expected = _oracle(x, alpha, w, tw, b, tb)
    try:
        for setting, allows in (("tf32", True), ("ieee", False)):
            matmul.fp32_precision = setting
            assert _matmul_allows_tf32() is allows
            y = per_sample_linear(x, alpha, pw, pb, strategy="stacked", backend=backend)
            tol = 2e-3 if allows else 2e-5  # tf32 keeps 10 mantissa bits
            assert (y.double() - expected).abs().max().item() <= tol * (expected.abs().max().item() + 1)
        matmul.fp32_precision = "none"
        matmul.allow_tf32 = True  # the legacy API alone still counts
        assert _matmul_allows_tf32() is True
        matmul.allow_tf32 = False
        assert _matmul_allows_tf32() is False
    finally:
        matmul.fp32_precision = saved


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("strategy", ["stacked", "materialize"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_error_within_torch_error(backend, device, strategy, dtype):
    x, alpha, w, tw, b, tb = _problem(6, 3, 48, 40, 4, dtype=dtype, device=device)
    pw, pb = pack_weights(w, tw, b, tb)
    y = per_sample_linear(x, alpha, pw, pb, strategy=strategy, backend=backend)
    assert y.dtype == dtype
    expected = _oracle(x, alpha, w, tw, b, tb)
    ours = (y.double() - expected).abs().max().item()
    theirs = _same_precision_error(x, alpha, w, tw, b, tb, expected)
    assert ours <= 3 * theirs + 1e-3, (ours, theirs)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_zero_alpha_is_the_base_layer_and_one_hot_is_each_expert(backend, device):
    x, alpha, w, tw, b, tb = _problem(4, 3, 20, 12, 3, device=device)
    pw, pb = pack_weights(w, tw, b, tb)
    for strategy in ("stacked", "materialize"):
        y0 = per_sample_linear(x, torch.zeros_like(alpha), pw, pb, strategy=strategy, backend=backend)
        torch.testing.assert_close(y0, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
        for k in range(3):
            onehot = torch.zeros_like(alpha)
            onehot[:, k] = 1
            yk = per_sample_linear(x, onehot, pw, pb, strategy=strategy, backend=backend)
            torch.testing.assert_close(yk, F.linear(x, w + tw[k], b + tb[k]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("strategy", ["stacked", "materialize"])
def test_samples_are_independent(backend, device, strategy):
    """A sample's output depends only on its own alpha row (no leaking across the batch)."""
    x, alpha, w, tw, b, tb = _problem(5, 2, 16, 24, 3, device=device)
    pw, pb = pack_weights(w, tw, b, tb)
    y = per_sample_linear(x, alpha, pw, pb, strategy=strategy, backend=backend)
    alpha2 = alpha.clone()
    alpha2[2] += 5.0
    y2 = per_sample_linear(x, alpha2, pw, pb, strategy=strategy, backend=backend)
    keep = [0, 1, 3, 4]
    assert torch.equal(y[keep], y2[keep])
    assert not torch.allclose(y[2], y2[2])


def _every_other(v):
    """v's values in a tensor whose last dim has stride 2 (a view into one twice as wide)."""
    wide = torch.zeros(*v.shape[:-1], 2 * v.shape[-1], dtype=v.dtype, device=v.device)
    wide[..., ::2] = v
    return wide[..., ::2]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("layout", ["batch-minor", "inner-stride-2"])
def test_non_contiguous_inputs(backend, device, layout):
    x, alpha, w, tw, b, tb = _problem(6, 4, 18, 10, 2, device=device)
    if layout == "batch-minor":  # same values, batch-minor strides
        xt, at = x.transpose(0, 1).contiguous().transpose(0, 1), alpha.t().contiguous().t()
    else:  # x[..., ::2]: the feature stride is not 1
        xt, at = _every_other(x), _every_other(alpha)
        assert xt.stride(-1) == 2 and at.stride(-1) == 2
    assert not xt.is_contiguous() and not at.is_contiguous()
    assert torch.equal(xt, x) and torch.equal(at, alpha)
    pw, pb = pack_weights(w, tw, b, tb)
    expected = _oracle(x, alpha, w, tw, b, tb)
    scale = expected.abs().max().item() + 1
    for strategy in ("stacked", "materialize"):
        y = per_sample_linear(xt, at, pw, pb, strategy=strategy, backend=backend)
        # measured (CPU, both backends and layouts): <= 7.2e-8 * scale, as contiguous inputs give
        assert (y.double() - expected).abs().max().item() <= 1e-6 * scale, strategy


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_empty_batch_and_tokens(backend, device):
    x, alpha, w, tw, b, tb = _problem(3, 2, 8, 5, 2, device=device)
    pw, pb = pack_weights(w, tw, b, tb)
    for strategy in ("stacked", "materialize"):
        y = per_sample_linear(x[:0], alpha[:0], pw, pb, strategy=strategy, backend=backend)
        assert y.shape == (0, 2, 5)
        y = per_sample_linear(x[:, :0], alpha, pw, pb, strategy=strategy, backend=backend)
        assert y.shape == (3, 0, 5)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("tokens", [None, 3])
def test_huge_and_nonfinite_values_stay_in_their_rows(backend, device, tokens):
    """NaN / Inf in x poison only their own output row, NaN in alpha only its own sample's rows; a sample
    scaled by 1e30 keeps float32 accuracy; every other row is bit-identical to the run without them."""
    x, alpha, w, tw, b, tb = _problem(5, tokens, 8, 4, 2, device=device)
    x3 = x if tokens else x.unsqueeze(1)  # a view: writes through it reach x
    x3[3] *= 1e30
    clean_x, clean_alpha = x.clone(), alpha.clone()
    x3[0, 0, 0] = float("nan")
    x3[2, 0, 0] = float("inf")
    alpha[1, 0] = float("nan")
    pw, pb = pack_weights(w, tw, b, tb)
    expected = _oracle(x, alpha, w, tw, b, tb)
    expected3 = expected if tokens else expected.unsqueeze(1)
    good = torch.ones(x3.shape[:2], dtype=torch.bool, device=device)
    good[0, 0] = good[1] = good[2, 0] = False
    for strategy in ("stacked", "materialize"):
        y = per_sample_linear(x, alpha, pw, pb, strategy=strategy, backend=backend)
        y3 = y if tokens else y.unsqueeze(1)
        assert torch.isnan(y3[0, 0]).all() and torch.isnan(y3[1]).all(), strategy
        # inf · W_b in F.linear; the stacked strategy sums α_t (inf · W_t) over tasks, which may be inf − inf
        assert not torch.isfinite(y3[2, 0]).any(), strategy
        assert torch.isfinite(y3[good]).all(), strategy
        clean = per_sample_linear(clean_x, clean_alpha, pw, pb, strategy=strategy, backend=backend)
        assert torch.equal(y3[good], (clean if tokens else clean.unsqueeze(1))[good]), strategy
        for s in (0, 2, 3, 4):  # per sample: sample 3 is ~1e30 times larger than the others
            rows = good[s]
            if not rows.any():  # 2-D x: samples 0 and 2 are one row each
                continue
            err = (y3[s][rows].double() - expected3[s][rows]).abs().max().item()
            # measured (CPU, both backends): <= 1.3e-7 of the sample's largest output
            assert err <= 1e-6 * expected3[s][rows].abs().max().item(), (strategy, s)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("tokens", [None, 2])
@pytest.mark.parametrize("bias", [True, False])
def test_no_tasks_is_the_base_layer(backend, device, tokens, bias):
    """K = 0: alpha is (B, 0), the packed weights (out, 1, in); the op is F.linear with the base layer."""
    x, alpha, w, tw, b, tb = _problem(4, tokens, 8, 5, 0, device=device, bias=bias)
    assert alpha.shape == (4, 0) and tw.shape == (0, 5, 8)
    pw, pb = pack_weights(w, tw, b, tb)
    assert pw.shape == (5, 1, 8)
    expected = F.linear(x.double(), w.double(), None if b is None else b.double())
    scale = expected.abs().max().item() + 1
    for strategy in ("stacked", "materialize"):
        y = per_sample_linear(x, alpha, pw, pb, strategy=strategy, backend=backend)
        assert y.shape == expected.shape and y.dtype == x.dtype
        # measured (CPU, both backends): <= 6e-8 * scale
        assert (y.double() - expected).abs().max().item() <= 1e-6 * scale, strategy
        assert per_sample_linear(x[:0], alpha[:0], pw, pb, strategy=strategy, backend=backend).shape == \
            (0, *expected.shape[1:])


def test_lowrank_full_rank_is_exact_and_truncation_error_is_the_factors():
    x, alpha, w, tw, b, tb = _problem(4, 3, 24, 20, 3)
    pw, pb = pack_weights(w, tw, b, tb)
    up, down = lowrank_factors(tw, 20)
    y = per_sample_lowrank_linear(x, alpha, w, up, down, pb)
    torch.testing.assert_close(y.double(), _oracle(x, alpha, w, tw, b, tb), rtol=1e-4, atol=1e-4)
    up, down = lowrank_factors(tw, 4)
    approx = torch.stack([up[:, 4 * k:4 * (k + 1)] @ down[4 * k:4 * (k + 1)] for k in range(3)])
    y = per_sample_lowrank_linear(x, alpha, w, up, down, pb)
    torch.testing.assert_close(y.double(), _oracle(x, alpha, w, approx, b, tb), rtol=1e-4, atol=1e-4)
    assert (y.double() - _oracle(x, alpha, w, tw, b, tb)).abs().max() > 1e-3  # rank 4 of 20 is not exact


def test_cost_model_picks_by_shape():
    assert choose_strategy(16, 1, 768, 3072, 8) == "stacked"
    assert choose_strategy(128, 1, 768, 3072, 8) == "stacked"
    assert choose_strategy(16, 197, 768, 3072, 8) == "materialize"
    assert choose_strategy(16, 1, 768, 3072, 8, rank=16) == "lowrank"  # reads 1 + 8·16·(in+out)/(in·out) weights
    assert choose_strategy(16, 197, 768, 3072, 8, rank=16) == "materialize"  # the base GEMM dominates both
    assert choose_strategy(16, 1, 768, 3072, 8, rank=700) == "stacked"


def test_errors_name_the_argument():
    x, alpha, w, tw, b, tb = _problem(3, None, 8, 4, 2)
    pw, pb = pack_weights(w, tw, b, tb)
    with pytest.raises(ValueError, match="x has 7 input features"):
        per_sample_linear(x[:, :7], alpha, pw, pb)
    with pytest.raises(ValueError, match="alpha must be"):
        per_sample_linear(x, alpha[:2], pw, pb)
    with pytest.raises(ValueError, match="alpha must be"):
        per_sample_linear(x, alpha[:, :1], pw, pb)
    with pytest.raises(TypeError, match="packed weights are torch.float32"):
        per_sample_linear(x.half(), alpha, pw, pb)
    with pytest.raises(ValueError, match="strategy"):
        per_sample_linear(x, alpha, pw, pb, strategy="lowrank")
    with pytest.raises(ValueError, match="packed_weight must be"):
        per_sample_linear(x, alpha, w, pb)
    with pytest.raises(ValueError, match="packed_bias must be"):
        per_sample_linear(x, alpha, pw, pb[:, :3])
    with pytest.raises(TypeError, match="x must be"):
        per_sample_linear(x.int(), alpha, pw, pb)
    with pytest.raises(ValueError, match="task_weights must be"):
        pack_weights(w, tw[:, :3])
    with pytest.raises(ValueError, match="x must be"):
        per_sample_linear(x[0], alpha, pw, pb)


def test_backward_names_the_op_as_inference_only():
    g = torch.Generator().manual_seed(5)
    w0, tw = torch.randn(5, 4, generator=g), torch.randn(2, 5, 4, generator=g)
    pw, pb = pack_weights(w0, tw, torch.zeros(5), torch.zeros(2, 5))
    up, down = lowrank_factors(tw, 1)
    x = torch.randn(3, 4, generator=g, requires_grad=True)
    for y in (per_sample_linear(x, torch.rand(3, 2, generator=g), pw, pb),
              per_sample_lowrank_linear(x, torch.rand(3, 2, generator=g), w0, up, down, pb)):
        with pytest.raises(RuntimeError, match="^per_sample_linear is inference-only"):
            y.sum().backward()


def test_eager_inference_skips_the_declared_ops_dispatch(monkeypatch):
    import merging_kernels.ops.per_sample_linear as psl

    calls = []
    declared = psl._run_op
    monkeypatch.setattr(psl, "_run_op", lambda *args: calls.append(1) or declared(*args))
    g = torch.Generator().manual_seed(6)
    pw, pb = pack_weights(torch.randn(5, 4, generator=g), torch.randn(2, 5, 4, generator=g))
    x, alpha = torch.randn(3, 4, generator=g), torch.rand(3, 2, generator=g)
    with torch.inference_mode():
        direct = per_sample_linear(x, alpha, pw, pb)
    assert calls == []  # custom_op's dispatch costs ~15 µs a call; eager inference does not need it
    through_op = per_sample_linear(x.requires_grad_(), alpha, pw, pb)  # autograd records: the declared op
    assert calls == [1] and torch.equal(through_op.detach(), direct)


def test_tracers_record_the_declared_op():
    # torch.jit.trace and make_fx run eagerly on plain tensors: they must still see one op, not its insides
    from torch.fx.experimental.proxy_tensor import make_fx

    g = torch.Generator().manual_seed(7)
    pw, pb = pack_weights(torch.randn(5, 4, generator=g), torch.randn(2, 5, 4, generator=g))
    x, alpha = torch.randn(3, 4, generator=g), torch.rand(3, 2, generator=g)
    with torch.no_grad():
        traced = torch.jit.trace(lambda x, a: per_sample_linear(x, a, pw, pb), (x, alpha))
        assert "merging_kernels::per_sample_linear" in str(traced.graph)
        torch.testing.assert_close(traced(x, alpha), per_sample_linear(x, alpha, pw, pb))
        graph = make_fx(lambda x, a: per_sample_linear(x, a, pw, pb))(x, alpha)
        assert "merging_kernels.per_sample_linear" in graph.code


def test_declared_op_compiles_without_graph_breaks():
    x, alpha, w, tw, b, tb = _problem(4, 3, 16, 8, 2)
    pw, pb = pack_weights(w, tw, b, tb)
    compiled = torch.compile(lambda x, a: per_sample_linear(x, a, pw, pb, strategy="stacked") * 2, fullgraph=True)
    torch.testing.assert_close(compiled(x, alpha), 2 * per_sample_linear(x, alpha, pw, pb, strategy="stacked"))


def _compiled_variants(kernel) -> int:
    """Number of compiled specializations of a Triton kernel (device_caches[device][0] is the kernel cache)."""
    return sum(len(entry[0]) for entry in kernel.device_caches.values())


@pytest.mark.gpu
def test_triton_kernel_does_not_recompile_per_batch_size():
    from merging_kernels.ops.per_sample_linear import _psl_stacked_kernel

    x, alpha, w, tw, b, tb = _problem(300, None, 64, 64, 4, device="cuda")
    pw, pb = pack_weights(w, tw, b, tb)
    for batch in (65, 128):  # one call per tile configuration first
        per_sample_linear(x[:batch], alpha[:batch], pw, pb, strategy="stacked", backend="triton")
    before = _compiled_variants(_psl_stacked_kernel)
    for batch in (66, 97, 129, 160, 255, 300):
        per_sample_linear(x[:batch], alpha[:batch], pw, pb, strategy="stacked", backend="triton")
    assert _compiled_variants(_psl_stacked_kernel) == before


# ------------------------------------------------------------------ the other per-sample layers


def test_per_sample_layer_norm_matches_per_sample_loop():
    g = torch.Generator().manual_seed(1)
    x, alpha = torch.randn(4, 3, 10, generator=g), torch.randn(4, 2, generator=g)
    pw, pb = torch.randn(3, 10, generator=g), torch.randn(3, 10, generator=g)
    y = per_sample_layer_norm(x, alpha, pw, pb, 1e-5)
    for i in range(4):
        a1 = torch.cat([torch.ones(1), alpha[i]])
        torch.testing.assert_close(y[i], F.layer_norm(x[i], (10,), a1 @ pw, a1 @ pb, 1e-5), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strategy", [None, "banks", "stacked"])
@pytest.mark.parametrize("rows", [6, 3, 1])  # one row of α per sample, per block of 2 samples, for all 6
@pytest.mark.parametrize("groups,stride,padding,dilation", [(1, 1, 1, 1), (2, 2, 0, 1), (2, 1, "same", 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_per_sample_conv2d_matches_per_sample_loop(groups, stride, padding, dilation, rows, strategy, dtype):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 7, 4, 6, generator=g).transpose(1, 2).to(dtype)  # (6, 4, 7, 6), not contiguous
    alpha = torch.randn(rows, 2, generator=g)
    pw, pb = torch.randn(3, 6, 4 // groups, 3, 3, generator=g).to(dtype), torch.randn(3, 6, generator=g).to(dtype)
    y = per_sample_conv2d(x, alpha, pw, pb, stride=stride, padding=padding, dilation=dilation, groups=groups,
                          strategy=strategy)
    assert y.dtype == dtype
    # oracle: per sample, filters merged in float64 and one float64 conv; plain torch at the same precision
    # (merged filters rounded to the dtype, then F.conv2d in it) sets the bar for 16-bit dtypes
    errors, torch_errors = [], []
    for i in range(6):
        a1 = torch.cat([torch.ones(1), alpha[i // (6 // rows)]]).double()
        w, bias = torch.einsum("t,t...->...", a1, pw.double()), a1 @ pb.double()
        expected = F.conv2d(x[i:i + 1].double(), w, bias, stride, padding, dilation, groups)
        plain = F.conv2d(x[i:i + 1], w.to(dtype), bias.to(dtype), stride, padding, dilation, groups)
        errors.append((y[i:i + 1].double() - expected).abs().max())
        torch_errors.append((plain.double() - expected).abs().max())
    if dtype == torch.bfloat16:
        assert max(errors) <= 2 * max(torch_errors)
    else:
        assert max(errors) <= {torch.float32: 2e-5, torch.float64: 1e-12}[dtype]
    assert per_sample_conv2d(x[:0], alpha[:0], pw, None, stride=stride, padding=padding, dilation=dilation,
                             groups=groups, strategy=strategy).shape == (0, 6) + y.shape[2:]


def test_conv_strategies_agree_and_auto_follows_the_rule():
    g = torch.Generator().manual_seed(4)
    x, alpha = torch.randn(5, 8, 4, 4, generator=g), torch.randn(5, 3, generator=g)
    pw, pb = torch.randn(4, 8, 8, 3, 3, generator=g), torch.randn(4, 8, generator=g)
    banks, stacked = (per_sample_conv2d(x, alpha, pw, pb, padding=1, strategy=s) for s in ("banks", "stacked"))
    torch.testing.assert_close(stacked, banks, rtol=1e-5, atol=1e-5)
    # measured here (benchmarks/results/cpu-per-sample-conv2d-2026-12-04.txt, K = 3, B = 16/128): 64 channels at
    # 2x2 run 2.3x/8.9x faster stacked, 128 channels at 8x8 1.5x/1.7x; 16 at 8x8 and 64 at 16x16 faster as banks
    assert choose_conv_strategy(1, 3, 64, 64, 4) == choose_conv_strategy(1, 3, 128, 128, 64) == "stacked"
    assert choose_conv_strategy(1, 3, 16, 16, 64) == choose_conv_strategy(1, 3, 64, 64, 256) == "banks"
    assert choose_conv_strategy(1, 8, 128, 128, 64) == "banks"  # 9 plain convs cost more than the slowdown
    assert choose_conv_strategy(128, 3, 64, 64, 4) == "banks"  # a bank serves 128 samples: it batches well
    assert choose_conv_strategy(1, 3, 64, 64, 4, "cuda") == "banks"  # not measured on a GPU yet
    with pytest.raises(ValueError, match="strategy"):
        per_sample_conv2d(x, alpha, pw, pb, strategy="grouped")
    # both strategies take filters in another dtype than x (cast like banks does) and return autocast's dtype
    for strategy in CONV_STRATEGIES:
        assert per_sample_conv2d(x.half(), alpha, pw, pb, padding=1, strategy=strategy).dtype == torch.float16
        with torch.autocast("cpu", torch.bfloat16):
            assert per_sample_conv2d(x, alpha, pw, pb, padding=1, strategy=strategy).dtype == torch.bfloat16
    with pytest.raises(RuntimeError, match="padding"):  # F.conv2d's own words for an unknown padding string
        per_sample_conv2d(x, alpha, pw, pb, padding="bogus")


def test_per_sample_conv2d_refuses_rows_that_do_not_divide_the_batch():
    x, pw = torch.randn(6, 2, 5, 5), torch.randn(3, 4, 2, 3, 3)
    for alpha in (torch.randn(4, 2), torch.randn(0, 2), torch.randn(6, 3), torch.randn(6)):
        with pytest.raises(ValueError, match=r"^alpha must be \(R, K\) with R dividing B = 6 and K \+ 1 = 3"):
            per_sample_conv2d(x, alpha, pw, None)


def test_blocks_of_samples_sharing_a_row_equal_repeated_rows():
    torch.manual_seed(3)
    base, experts = torch.nn.Linear(6, 5), [torch.nn.Linear(6, 5) for _ in range(2)]
    ln_base, ln_experts = torch.nn.LayerNorm(5), [torch.nn.LayerNorm(5) for _ in range(2)]
    for m in ln_experts:
        torch.nn.init.normal_(m.weight)
        torch.nn.init.normal_(m.bias)
    conv_base, conv_experts = torch.nn.Conv2d(2, 3, 3, padding=1), [torch.nn.Conv2d(2, 3, 3, padding=1)
                                                                     for _ in range(2)]
    coeffs = Coefficients(2)
    lin = PerSampleLinear.from_modules(base, experts, coeffs)
    ln = PerSampleLayerNorm.from_modules(ln_base, ln_experts, coeffs)
    conv = PerSampleConv2d.from_modules(conv_base, conv_experts, coeffs)
    table = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.3, 0.7]])
    x, img = torch.randn(3 * 4, 2, 6), torch.randn(3 * 4, 2, 5, 5)
    coeffs.set(table)  # one row per block of 4 samples
    grouped = (ln(lin(x)), conv(img))
    coeffs.set(table.repeat_interleave(4, dim=0))
    rows = (ln(lin(x)), conv(img))
    for a, b in zip(grouped, rows):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    coeffs.set(torch.ones(5, 2))
    with pytest.raises(ValueError, match="not a multiple of alpha's 5 rows"):
        lin(x)
    coeffs.clear()
    with pytest.raises(RuntimeError, match="no coefficients set"):
        lin(x)


# ------------------------------------------------------------------ edge cases found in review


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_many_row_and_column_tiles(backend, device):
    """M = 1200 rows (several 128-row tiles and a partial GROUP_M group) and several column tiles."""
    x, alpha, w, tw, b, tb = _problem(300, 4, 8, 150, 2, device=device)
    pw, pb = pack_weights(w, tw, b, tb)
    expected = _oracle(x, alpha, w, tw, b, tb)
    scale = expected.abs().max().item() + 1
    for strategy in ("stacked", "materialize"):
        y = per_sample_linear(x, alpha, pw, pb, strategy=strategy, backend=backend)
        # measured (CPU, both backends): <= 1.0e-7 * scale
        assert (y.double() - expected).abs().max().item() <= 1e-6 * scale, strategy


def test_float64_keeps_float64_accuracy():
    x, alpha, w, tw, b, tb = _problem(5, 3, 16, 12, 3, dtype=torch.float64)
    b = b * 1e3
    alpha = alpha.double()
    pw, pb = pack_weights(w, tw, b, tb)
    expected = per_sample_linear_torch(x, alpha, w, tw, b, tb)
    for strategy in ("stacked", "materialize"):
        y = per_sample_linear(x, alpha, pw, pb, strategy=strategy)
        assert y.dtype == torch.float64
        assert (y - expected).abs().max().item() < 1e-9


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_float16_does_not_overflow_when_the_result_fits(backend, device):
    """α·x = 1e5 is not a float16, but every product and the output are."""
    x, alpha, w, tw, b, tb = _problem(4, None, 16, 8, 2, device=device)
    x = (x.sign() * 2000).half()
    alpha = torch.full_like(alpha, 50.0)
    w, tw = (w * 1e-3).half(), (tw * 1e-4).half()
    pw, pb = pack_weights(w, tw)
    expected = per_sample_linear_torch(x.double(), alpha.double(), w.double(), tw.double())
    assert expected.abs().max() < 6e4
    for strategy in ("stacked", "materialize"):
        y = per_sample_linear(x, alpha, pw, strategy=strategy, backend=backend)
        assert torch.isfinite(y).all(), strategy
        torch.testing.assert_close(y.double(), expected, rtol=2e-2, atol=1e-2 * expected.abs().max().item())


def test_workspace_survives_inference_mode():
    x, alpha, w, tw, b, tb = _problem(4, 6, 16, 8, 2)
    pw, pb = pack_weights(w, tw, b, tb)
    with torch.inference_mode():
        first = per_sample_linear(x, alpha, pw, pb, strategy="materialize")
    with torch.no_grad():
        second = per_sample_linear(x, alpha, pw, pb, strategy="materialize")
    torch.testing.assert_close(first, second)


def test_packed_weights_with_other_strides():
    x, alpha, w, tw, b, tb = _problem(3, 2, 16, 8, 2)
    pw, pb = pack_weights(w, tw, b, tb)
    odd = torch.cat([w[None], tw]).transpose(0, 1)  # (out, K+1, in), not contiguous
    assert not odd.is_contiguous()
    for strategy in ("stacked", "materialize"):
        torch.testing.assert_close(per_sample_linear(x, alpha, odd, pb, strategy=strategy),
                                   per_sample_linear(x, alpha, pw, pb, strategy=strategy))


def test_zero_input_features_give_the_bias_mix():
    alpha = torch.randn(3, 2)
    pw, pb = pack_weights(torch.empty(4, 0), torch.empty(2, 4, 0), torch.randn(4), torch.randn(2, 4))
    y = per_sample_linear(torch.empty(3, 0), alpha, pw, pb)
    torch.testing.assert_close(y, pb[0] + alpha @ pb[1:])


def test_lowrank_checks_devices_and_dtypes():
    x, alpha, w, tw, b, tb = _problem(3, None, 8, 6, 2)
    up, down = lowrank_factors(tw, 2)
    with pytest.raises(ValueError, match="up is on meta"):
        per_sample_lowrank_linear(x, alpha, w, up.to("meta"), down)
    with pytest.raises(TypeError, match="packed_bias"):
        per_sample_lowrank_linear(x, alpha, w, up, down, torch.zeros(3, 6, dtype=torch.int64))


def test_layers_accept_empty_batches():
    torch.manual_seed(0)
    coeffs = Coefficients(2)
    lin = PerSampleLinear.from_modules(torch.nn.Linear(6, 5), [torch.nn.Linear(6, 5) for _ in range(2)], coeffs)
    ln = PerSampleLayerNorm.from_modules(torch.nn.LayerNorm(5), [torch.nn.LayerNorm(5) for _ in range(2)], coeffs)
    conv = PerSampleConv2d.from_modules(torch.nn.Conv2d(2, 3, 3), [torch.nn.Conv2d(2, 3, 3) for _ in range(2)],
                                        coeffs)
    coeffs.set(torch.zeros(0, 2))
    assert lin(torch.zeros(0, 6)).shape == (0, 5)
    assert ln(lin(torch.zeros(0, 4, 6))).shape == (0, 4, 5)
    assert conv(torch.zeros(0, 2, 5, 5)).shape == (0, 3, 3, 3)
    coeffs.set(torch.zeros(2, 2))
    assert lin(torch.zeros(2, 0, 6)).shape == (2, 0, 5)


def test_layer_low_rank_keeps_only_the_factors():
    torch.manual_seed(0)
    coeffs = Coefficients(2)
    base, experts = torch.nn.Linear(12, 10), [torch.nn.Linear(12, 10) for _ in range(2)]
    exact = PerSampleLinear.from_modules(base, experts, coeffs)
    full_rank = PerSampleLinear.from_modules(base, experts, coeffs, rank=10)
    assert not hasattr(full_rank, "packed_weight") and full_rank.up.shape == (10, 20)
    coeffs.set(torch.randn(4, 2))
    x = torch.randn(4, 12)
    torch.testing.assert_close(full_rank(x), exact(x), rtol=1e-4, atol=1e-4)


def test_materialize_in_blocks_of_output_rows(monkeypatch):
    from merging_kernels.ops import per_sample_linear as module

    monkeypatch.setitem(module.MATERIALIZE_CHUNK_BYTES, "cpu", 16 * 5 * 24 * 4 * 2)  # 32 rows per block
    x, alpha, w, tw, b, tb = _problem(5, 3, 24, 70, 2)  # 70 rows: blocks of 32, 32, 6
    pw, pb = pack_weights(w, tw, b, tb)
    y = per_sample_linear(x, alpha, pw, pb, strategy="materialize")
    assert (y.double() - _oracle(x, alpha, w, tw, b, tb)).abs().max().item() < 1e-5


# ------------------------------------------------------------------ input validation (API audit)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(dtype=torch.int32), TypeError, "dtype"),  # used to pack, then per_sample_linear refused it
        (dict(dtype=torch.complex64), TypeError, "dtype"),
        (dict(dtype="float16"), TypeError, "dtype"),
        (dict(task_weights=None), TypeError, "task_weights"),
        (dict(task_weights="abc"), TypeError, "task_weights"),
        (dict(task_weights={0: torch.zeros(4, 8)}), TypeError, "ordered"),  # would pack the keys' order
        (dict(task_weights={torch.zeros(4, 8)}), TypeError, "ordered"),
        (dict(task_weights=[torch.zeros(4, 8).numpy()] * 2), TypeError, r"task_weights\[0\]"),
        (dict(task_weights=[torch.zeros(4, 8), torch.zeros(4, 7)]), ValueError, r"task_weights\[1\]"),
        (dict(task_biases=[torch.zeros(4), torch.zeros(3)]), ValueError, r"task_biases\[1\]"),
    ],
)
def test_pack_weights_refuses_bad_arguments_by_name(kwargs, error, match):
    _, _, w, tw, b, tb = _problem(3, None, 8, 4, 2)
    args = dict(task_weights=tw, task_biases=tb, dtype=None)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        pack_weights(w, args["task_weights"], b, args["task_biases"], dtype=args["dtype"])


def test_pack_weights_of_parameters_is_detached_and_accepts_lists():
    _, _, w, tw, b, tb = _problem(3, None, 8, 4, 2)
    params = [torch.nn.Parameter(v.clone()) for v in (w, tw, b, tb)]
    pw, pb = pack_weights(*params)
    assert not pw.requires_grad and pw.grad_fn is None and not pb.requires_grad and pb.grad_fn is None
    expected_w, expected_b = pack_weights(w, tw, b, tb)
    assert torch.equal(pw, expected_w) and torch.equal(pb, expected_b)
    listed_w, listed_b = pack_weights(w, list(tw), b, list(tb), dtype=torch.float16)
    assert listed_w.dtype == torch.float16 and torch.equal(listed_w, expected_w.half())
    assert torch.equal(listed_b, expected_b.half())
    gen_w, gen_b = pack_weights(w, (t for t in tw), b, iter(list(tb)))  # one-pass iterables are read once
    assert torch.equal(gen_w, expected_w) and torch.equal(gen_b, expected_b)


def test_layer_construction_errors_are_named():
    coeffs = Coefficients(2)
    lin = torch.nn.Linear
    for kwargs, match in [(dict(strategy="foo"), "strategy"), (dict(backend="foo"), "backend")]:
        with pytest.raises(ValueError, match=match):  # used to be accepted until the first forward call
            PerSampleLinear.from_modules(lin(5, 4), [lin(5, 4), lin(5, 4)], coeffs, **kwargs)
    PerSampleLinear.from_modules(lin(5, 4), [lin(5, 4), lin(5, 4)], coeffs, strategy="lowrank", rank=2)
    with pytest.raises(ValueError, match="strategy"):  # no factors without rank=: it failed at the first forward
        PerSampleLinear.from_modules(lin(5, 4), [lin(5, 4), lin(5, 4)], coeffs, strategy="lowrank")
    with torch.device("meta"):  # deferred initialization: built on meta, materialized later (to_empty)
        meta = PerSampleLinear.from_modules(lin(5, 4), [lin(5, 4), lin(5, 4)], coeffs)
    assert meta.packed_weight.is_meta
    assert per_sample_linear(torch.empty(3, 5, device="meta"), torch.empty(3, 2, device="meta"),
                             meta.packed_weight, meta.packed_bias).shape == (3, 4)  # shape inference
    with pytest.raises(ValueError, match=r"base has a bias but experts\[0\] has none"):
        PerSampleLinear.from_modules(lin(5, 4), [lin(5, 4, bias=False), lin(5, 4, bias=False)], coeffs)
    with pytest.raises(ValueError, match=r"experts\[1\] has a bias but the base has none"):  # was silently dropped
        PerSampleLinear.from_modules(lin(5, 4, bias=False), [lin(5, 4, bias=False), lin(5, 4)], coeffs)
    with pytest.raises(ValueError, match=r"experts\[1\]\.weight has shape \(3, 5\)"):
        PerSampleLinear.from_modules(lin(5, 4), [lin(5, 4), lin(5, 3)], coeffs)
    with pytest.raises(ValueError, match="num_tasks"):  # 3 experts for 2 coefficients
        PerSampleLinear.from_modules(lin(5, 4), [lin(5, 4)] * 3, coeffs)
    with pytest.raises(TypeError, match="coefficients"):
        PerSampleLinear.from_modules(lin(5, 4), [lin(5, 4)] * 2, 2)
    ln = torch.nn.LayerNorm
    with pytest.raises(ValueError, match=r"^ln1: experts\[0\]\.weight"):
        PerSampleLayerNorm.from_modules(ln(5), [ln(4), ln(4)], coeffs, name="ln1")
    with pytest.raises(ValueError, match="bias"):
        PerSampleLayerNorm.from_modules(ln(5), [ln(5, bias=False)] * 2, coeffs)
    conv = torch.nn.Conv2d
    with pytest.raises(ValueError, match=r"experts\[1\] has other convolution settings"):
        PerSampleConv2d.from_modules(conv(2, 3, 3), [conv(2, 3, 3), conv(2, 3, 3, stride=2)], coeffs)
    # without a name, messages start with the class name, not ": "
    with pytest.raises(TypeError, match="^PerSampleLayerNorm: per-sample LayerNorm supports a 1-D"):
        PerSampleLayerNorm(ln((2, 3)), None, None, coeffs)
    with pytest.raises(TypeError, match="^PerSampleConv2d: per-sample Conv2d supports numeric zero padding"):
        PerSampleConv2d(conv(2, 3, 3, padding="same"), None, None, coeffs)
    with pytest.raises(ValueError, match=r"^PerSampleConv2d: task_weights must be \(K"):
        PerSampleConv2d(conv(2, 3, 3), torch.zeros(2, 3, 2, 3, 2), None, coeffs)


@pytest.mark.parametrize("value,error", [(-1, ValueError), ("3", TypeError), (2.0, TypeError), (True, TypeError)])
def test_coefficients_need_a_non_negative_integer(value, error):
    with pytest.raises(error, match="num_tasks"):
        Coefficients(value)


def test_layers_hold_detached_buffers_and_missing_task_vectors_are_zero():
    torch.manual_seed(4)
    coeffs = Coefficients(2)
    base, experts = torch.nn.LayerNorm(6), [torch.nn.LayerNorm(6) for _ in range(2)]
    for m in experts:
        torch.nn.init.normal_(m.weight)
    layer = PerSampleLayerNorm.from_modules(base, experts, coeffs)
    assert all(not buf.requires_grad for buf in layer.buffers())
    low = PerSampleLinear.from_modules(torch.nn.Linear(6, 5), [torch.nn.Linear(6, 5) for _ in range(2)], coeffs,
                                       rank=2)
    assert all(not buf.requires_grad and buf.grad_fn is None for buf in low.buffers())
    # the base's bias with no task_biases given: zero task vectors, as pack_weights does for a linear
    only_weight = PerSampleLayerNorm(base, layer.packed_weight[1:], None, coeffs)
    coeffs.set(torch.randn(3, 2))
    x = torch.randn(3, 6)
    torch.testing.assert_close(only_weight(x), layer(x))  # the experts' LayerNorm biases are all zero too


def test_low_rank_layer_checks_the_task_vector_shape():
    coeffs = Coefficients(2)
    with pytest.raises(ValueError, match="task_weights must be"):  # the input width differs: was only caught per call
        PerSampleLinear(torch.zeros(5, 6), torch.zeros(2, 5, 7), None, None, coeffs, rank=2)


def test_module_and_parameter_lists_are_sequences_of_experts_and_task_vectors():
    # nn.ModuleList / nn.ParameterList are Modules, not Sequences: they used to be refused
    torch.manual_seed(5)
    coeffs = Coefficients(2)
    coeffs.set(torch.randn(3, 2))
    pairs = [
        (torch.nn.Linear(6, 5), [torch.nn.Linear(6, 5) for _ in range(2)], PerSampleLinear, torch.randn(3, 6)),
        (torch.nn.LayerNorm(6), [torch.nn.LayerNorm(6) for _ in range(2)], PerSampleLayerNorm, torch.randn(3, 6)),
        (torch.nn.Conv2d(2, 3, 3), [torch.nn.Conv2d(2, 3, 3) for _ in range(2)], PerSampleConv2d,
         torch.randn(3, 2, 5, 5)),
    ]
    for base, experts, cls, x in pairs:
        for m in experts:
            torch.nn.init.normal_(m.weight)
        from_list = cls.from_modules(base, experts, coeffs)
        from_module_list = cls.from_modules(base, torch.nn.ModuleList(experts), coeffs)
        assert torch.equal(from_module_list(x), from_list(x))
    w, tw, b, tb = torch.randn(5, 6), torch.randn(2, 5, 6), torch.randn(5), torch.randn(2, 5)
    as_params = (torch.nn.ParameterList([torch.nn.Parameter(t) for t in tw]),
                 torch.nn.ParameterList([torch.nn.Parameter(t) for t in tb]))
    for packed, expected in zip(pack_weights(w, *as_params[:1], b, as_params[1]), pack_weights(w, tw, b, tb)):
        assert torch.equal(packed, expected) and not packed.requires_grad
    layer = PerSampleLinear(w, as_params[0], b, as_params[1], coeffs)
    assert torch.equal(layer(torch.ones(3, 6)), PerSampleLinear(w, tw, b, tb, coeffs)(torch.ones(3, 6)))
    with pytest.raises(TypeError, match="experts"):  # one module is not a sequence of them
        PerSampleLinear.from_modules(pairs[0][0], pairs[0][0], coeffs)


@pytest.mark.skipif(not any(p.values == ("triton", "cpu") for p in BACKENDS), reason="triton not available")
def test_triton_launches_on_the_tensors_device(monkeypatch):
    # Triton launches on the current CUDA device, not the tensors': the launch must make theirs current
    from merging_kernels.ops import per_sample_linear as psl

    launched = guard_launches(monkeypatch, psl, ["_psl_stacked_kernel"])
    x, alpha, w, tw, b, tb = _problem(3, 2, 16, 8, 2)
    pw, pb = pack_weights(w, tw, b, tb)
    y = per_sample_linear(x, alpha, pw, pb, strategy="stacked", backend="triton")
    assert launched == [x.device]
    torch.testing.assert_close(y.double(), _oracle(x, alpha, w, tw, b, tb), rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_triton_runs_on_a_device_other_than_the_current_one():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    x, alpha, w, tw, b, tb = _problem(5, 3, 32, 24, 3, device="cuda:1")
    pw, pb = pack_weights(w, tw, b, tb)
    with torch.cuda.device(0):
        y = per_sample_linear(x, alpha, pw, pb, strategy="stacked", backend="triton")
    assert y.device == x.device
    torch.testing.assert_close(y.double(), _oracle(x, alpha, w, tw, b, tb), rtol=1e-4, atol=1e-4)
