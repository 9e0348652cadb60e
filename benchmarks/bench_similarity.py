"""pytest-benchmark suite for the similarity ops: ours vs the ZipIt/MuDSC-reference style, numpy and scipy.

    python -m pytest benchmarks/bench_similarity.py --benchmark-enable
    python -m pytest benchmarks/bench_similarity.py --benchmark-enable -k weight

Without --benchmark-enable (pyproject's default) every case runs once: a smoke test that also checks
each provider's output against the float64 reference. The side-by-side ratio table is run_similarity.py.
"""

import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import merging_kernels as mk  # noqa: E402
from peers import group_similarity_scipy_loop  # noqa: E402
from run_similarity import (  # noqa: E402
    activations,
    numpy_corr,
    numpy_corrcoef_all,
    ours_streaming,
    torch_naive_corr,
    weight_rows,
    zipit_style_correlation,
)

from merging_kernels.ops import similarity as sim  # noqa: E402

BATCH, BATCHES = 256, 8


@pytest.fixture(scope="module")
def stream_case():
    feats = activations(BATCH * BATCHES, 512, 2, mean=300.0, seed=0)
    batches = [[f[i * BATCH:(i + 1) * BATCH] for f in feats] for i in range(BATCHES)]
    return feats, batches, sim.activation_correlation_torch(*feats)


@pytest.mark.parametrize("provider", ["ours", "zipit-style", "numpy"])
def test_activation_correlation(benchmark, stream_case, provider):
    feats, batches, want = stream_case
    benchmark.group = "activation corr M=2 C=512 8x256 mean+300"
    fn = {"ours": lambda: ours_streaming(batches, [512, 512]),
          "zipit-style": lambda: zipit_style_correlation(batches),
          "numpy": lambda: numpy_corrcoef_all(feats)}[provider]
    got = torch.as_tensor(np.asarray(benchmark(fn))).double()
    # the fp32 textbook formula loses the covariance under a mean of 300; ours and numpy do not
    tol = 1e-5 if provider != "zipit-style" else 1.0
    assert float((got - want).abs().max()) <= tol


@pytest.mark.parametrize("kind", ["self", "cross"])
@pytest.mark.parametrize("provider", ["ours", "torch-naive", "numpy"])
def test_weight_correlation(benchmark, provider, kind):
    x = weight_rows(1024, 2048, seed=1)
    y = None if kind == "self" else weight_rows(1024, 2048, seed=2)
    benchmark.group = f"weight corr {kind} 1024x2048"
    fn = {"ours": lambda: mk.correlation_matrix(x, y, backend="torch"),
          "torch-naive": lambda: torch_naive_corr(x, y),
          "numpy": lambda: numpy_corr(x, y)}[provider]
    got = torch.as_tensor(np.asarray(benchmark(fn))).double()
    assert float((got - sim.correlation_matrix_torch(x, y)).abs().max()) <= 1e-5


@pytest.mark.parametrize("provider", ["ours", "scipy-loop"])
def test_group_similarity(benchmark, provider):
    g, s = 12, 64
    s_cross = (torch.rand(g * s, g * s, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2 - 1)

    def scipy_loop():
        return group_similarity_scipy_loop(s_cross, s)

    benchmark.group = "group similarity 12 heads x 64"
    fn = (lambda: mk.group_similarity(s_cross, s)[0].numpy()) if provider == "ours" else scipy_loop
    np.testing.assert_allclose(benchmark(fn), scipy_loop(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("provider", ["ours", "numpy-path", "zipit-style"])
def test_greedy_zip(benchmark, provider):
    from mudsc_reference import reference_greedy_zip
    from run_similarity import zip_numpy_path

    from merging_kernels.ops import zip_matching as zm

    if provider == "ours" and not mk.build_info()["available"]:
        pytest.skip("_C not built")
    s = torch.corrcoef(weight_rows(512, 256, seed=512))
    benchmark.group = "greedy zip 2n=512"
    fn = {"ours": lambda: zm.greedy_zip(s, backend="native"), "numpy-path": lambda: zip_numpy_path(s),
          "zipit-style": lambda: reference_greedy_zip(s)}[provider]
    assert torch.equal(benchmark(fn)[1], zm.greedy_zip_torch(s)[1])  # the same pairs as the reference
