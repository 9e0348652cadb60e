"""pytest-benchmark suite for linear assignment: native vs scipy, lap and lapjv (and the native CUDA batch).

    python -m pytest benchmarks/bench_linear_assignment.py --benchmark-enable
    python -m pytest benchmarks/bench_linear_assignment.py --benchmark-enable -k "single and 1024"

Without --benchmark-enable (pyproject's default) every case runs once: a smoke test that also checks
each solver's total cost against scipy's. The side-by-side ratio table is run_linear_assignment.py.
"""

import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import merging_kernels as mk  # noqa: E402
from run_linear_assignment import KINDS, single_solvers  # noqa: E402
from scipy.optimize import linear_sum_assignment as scipy_lsa  # noqa: E402

NATIVE = mk.build_info().get("available", False)
SOLVERS = dict(single_solvers())
SIZES = [256, 1024, 2048]


@pytest.fixture(scope="module")
def costs():
    cache = {}

    def get(kind, n):
        if (kind, n) not in cache:
            cache[(kind, n)] = KINDS[kind](n, np.random.default_rng(n))
        return cache[(kind, n)]

    return get


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("kind", ["uniform", "corr-latent", "corr-perm"])
@pytest.mark.parametrize("solver", list(SOLVERS))
def test_single(benchmark, costs, solver, kind, n):
    if solver == "native" and not NATIVE:
        pytest.skip("merging_kernels._C is not built")
    c = costs(kind, n)
    benchmark.group = f"single {kind} n={n}"
    cols = benchmark(SOLVERS[solver], c)
    r0, c0 = scipy_lsa(c)
    assert c[np.arange(n), np.asarray(cols)].sum() == pytest.approx(c[r0, c0].sum(), rel=1e-12, abs=1e-12)


BATCHES = [(1000, 64), (64, 256)]


def _loop(solve, c):
    return [solve(x) for x in c]


@pytest.mark.parametrize("batch, n", BATCHES, ids=[f"{b}x{n}x{n}" for b, n in BATCHES])
@pytest.mark.parametrize("solver", ["native", *[s for s in SOLVERS if s != "native"]])
def test_batch(benchmark, solver, batch, n):
    if solver == "native" and not NATIVE:
        pytest.skip("merging_kernels._C is not built")
    c = np.random.default_rng(batch).random((batch, n, n))
    benchmark.group = f"batch {batch} x {n}x{n}"
    if solver == "native":
        cols = benchmark(lambda: mk.linear_sum_assignment(c)[1])
    else:
        cols = np.stack(benchmark(_loop, SOLVERS[solver], c))
    want = np.stack([scipy_lsa(x)[1] for x in c])
    got_total = np.take_along_axis(c, cols[:, :, None], 2).sum()
    want_total = np.take_along_axis(c, want[:, :, None], 2).sum()
    assert got_total == pytest.approx(want_total, rel=1e-12)


@pytest.mark.gpu
@pytest.mark.parametrize("batch, n", [(4096, 64), (256, 256), (1, 4096)], ids=["4096x64x64", "256x256x256", "1x4096"])
def test_cuda(benchmark, batch, n):
    if not (torch.cuda.is_available() and mk.build_info().get("cuda")):
        pytest.skip("needs a CUDA device and _C built with CUDA")
    c = torch.from_numpy(np.random.default_rng(n).random((batch, n, n))).cuda()
    benchmark.group = f"cuda {batch} x {n}x{n}"

    def run():
        out = mk.linear_sum_assignment(c)
        torch.cuda.synchronize()
        return out

    rows, cols = benchmark(run)
    host = c.cpu().numpy()
    for b in range(min(batch, 8)):
        r0, c0 = scipy_lsa(host[b])
        assert host[b][np.arange(n), cols[b].cpu().numpy()].sum() == pytest.approx(host[b][r0, c0].sum(), rel=1e-12)
