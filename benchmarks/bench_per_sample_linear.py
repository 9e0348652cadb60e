"""pytest-benchmark suite for the per-sample merged linear: strategies vs the per-sample loop and plain linear.

    python -m pytest benchmarks/bench_per_sample_linear.py --benchmark-enable
    python -m pytest benchmarks/bench_per_sample_linear.py --benchmark-enable -k "T1 and B16"

Without --benchmark-enable (pyproject's default) every case runs once: a smoke test that also checks
each provider's output against the float64 oracle. The side-by-side ratio table is
run_per_sample_linear.py (ViT-B shapes); this suite uses a quarter of them to stay quick.
"""

import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from run_per_sample_linear import loop_functional_call, naive_stacked  # noqa: E402

from merging_kernels.ops.per_sample_linear import pack_weights, per_sample_linear, per_sample_linear_torch  # noqa: E402

IN, OUT, K = 192, 768, 8
CASES = [(16, 1), (128, 1), (16, 49)]


def _problem(batch, tokens):
    g = torch.Generator().manual_seed(0)
    w0, tw = torch.randn(OUT, IN, generator=g) / IN**0.5, 0.01 * torch.randn(K, OUT, IN, generator=g)
    b0, tb = torch.randn(OUT, generator=g), 0.01 * torch.randn(K, OUT, generator=g)
    x = torch.randn((batch, tokens, IN) if tokens > 1 else (batch, IN), generator=g)
    alpha = torch.rand(batch, K, generator=g)
    return x, alpha, w0, tw, b0, tb


PROVIDERS = {
    "loop": lambda p, x, a: loop_functional_call(torch.nn.Linear(IN, OUT), {"weight": p[0], "bias": p[2]},
                                                 {"weight": p[1], "bias": p[3]}, x, a),
    "naive": lambda p, x, a: naive_stacked(*p[:4], x, a),
    "plain": lambda p, x, a: F.linear(x, p[0], p[2]),
    "auto": lambda p, x, a: per_sample_linear(x, a, *p[4]),
    "stacked": lambda p, x, a: per_sample_linear(x, a, *p[4], strategy="stacked"),
    "materialize": lambda p, x, a: per_sample_linear(x, a, *p[4], strategy="materialize"),
}


@pytest.mark.parametrize("batch,tokens", CASES, ids=[f"B{b}-T{t}" for b, t in CASES])
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_per_sample_linear(benchmark, provider, batch, tokens):
    x, alpha, w0, tw, b0, tb = _problem(batch, tokens)
    params = (w0, tw, b0, tb, pack_weights(w0, tw, b0, tb))
    benchmark.group = f"per-sample linear B={batch} T={tokens} K={K} {IN}->{OUT}"
    with torch.inference_mode():
        y = benchmark(PROVIDERS[provider], params, x, alpha)
    if provider != "plain":
        expected = per_sample_linear_torch(x.double(), alpha.double(), w0.double(), tw.double(), b0.double(),
                                           tb.double())
        assert (y.reshape(expected.shape).double() - expected).abs().max().item() < 1e-3
