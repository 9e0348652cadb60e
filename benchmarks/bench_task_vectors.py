"""pytest-benchmark suite of the task-vector merges: provider × size × method.

    .venv/bin/python -m pytest benchmarks/bench_task_vectors.py --benchmark-enable
    .venv/bin/python -m pytest benchmarks/bench_task_vectors.py --benchmark-enable -k "medium and ties"

(pyproject's pytest options pass --benchmark-disable and collect tests/ only:
the benchmarks are not part of the test run; without --benchmark-enable each
case runs once, as a smoke test.) Providers: the fast backend of the device
(native on CPU, triton on CUDA; skipped when not available), the torch
reference, and the peer a user would run instead (see peers.py). Each case
stores the bytes it must move and its GB/s at the median in extra_info; the
side-by-side table with speed-ups is benchmarks/run.py.
"""

from __future__ import annotations

import time

import pytest
import torch

import merging_kernels as mk
from merging_kernels import BackendUnavailableError

import peers
from common import bytes_task_arithmetic, bytes_ties_lower_bound, make_models, numel_of, synchronize, \
    transformer_like_shapes

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FAST = "triton" if DEVICE == "cuda" else "native"
NUM_TASKS = 4
DENSITY = 0.2
DROP_RATE = 0.9
SIZES = {"small": 64, "medium": 256}  # transformer width: 66K and 1.05M parameters per model
TARGET_S, MIN_ROUNDS, MAX_ROUNDS = 2.0, 3, 100

_models: dict[str, tuple] = {}


def models(size: str):
    if size not in _models:
        _models.clear()  # one size in memory at a time
        _models[size] = make_models(transformer_like_shapes(SIZES[size]), NUM_TASKS, device=DEVICE)
    return _models[size]


def _fast_unavailable() -> str | None:
    if DEVICE == "cpu" and not mk.build_info()["available"]:
        return f"native backend not built: {mk.build_info()['error']}"
    return None


def _run(benchmark, fn, provider, bytes_moved):
    if provider == FAST and _fast_unavailable():
        pytest.skip(_fast_unavailable())
    try:
        start = time.perf_counter()
        fn()  # fail/skip before timing; also the first warm-up
        synchronize(DEVICE)
        first = time.perf_counter() - start
    except (BackendUnavailableError, NotImplementedError) as exc:
        pytest.skip(f"{provider}: {exc}")
    # about TARGET_S seconds of timed rounds per case, at least MIN_ROUNDS (slow references get few)
    rounds = max(MIN_ROUNDS, min(MAX_ROUNDS, int(TARGET_S / max(first, 1e-6))))

    def call():
        out = fn()
        synchronize(DEVICE)
        return out

    benchmark.extra_info["bytes_moved"] = bytes_moved
    benchmark.extra_info["device"] = DEVICE
    benchmark.pedantic(call, rounds=rounds, warmup_rounds=1, iterations=1)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # None when benchmarks are disabled
        benchmark.extra_info["gbps_at_median"] = bytes_moved / stats.stats.median / 1e9


PROVIDERS = [FAST, "torch", "peer"]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("size", list(SIZES))
def test_task_arithmetic(benchmark, size, provider):
    base, experts = models(size)
    lambdas = [0.3] * NUM_TASKS
    fn = (lambda: peers.task_arithmetic_naive(base, experts, lambdas)) if provider == "peer" else \
        (lambda: mk.task_arithmetic(base, experts, lambdas, backend=provider))
    benchmark.group = f"task_arithmetic-{size}"
    _run(benchmark, fn, provider, bytes_task_arithmetic(numel_of(base), NUM_TASKS, 4))


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("size", list(SIZES))
def test_ties_tensor_scope(benchmark, size, provider):
    """Per-tensor trim; the peer is the mergekit-style argsort implementation."""
    base, experts = models(size)
    w = [1.0 - 0.1 * k for k in range(NUM_TASKS)]
    fn = (lambda: peers.ties_mergekit_style(base, experts, density=DENSITY, weights=w)) if provider == "peer" else \
        (lambda: mk.ties_merging(base, experts, density=DENSITY, weights=w, backend=provider))
    benchmark.group = f"ties_tensor-{size}"
    _run(benchmark, fn, provider, bytes_ties_lower_bound(numel_of(base), NUM_TASKS, 4))


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("size", list(SIZES))
def test_ties_model_scope(benchmark, size, provider):
    """Model-wide trim; the peer is the FusionBench-style kthvalue implementation."""
    base, experts = models(size)
    fn = (lambda: peers.ties_fusionbench_style(base, experts, density=DENSITY, scaling_factor=0.3)) \
        if provider == "peer" else \
        (lambda: mk.ties_merging(base, experts, density=DENSITY, scale=0.3, trim_scope="model", backend=provider))
    benchmark.group = f"ties_model-{size}"
    _run(benchmark, fn, provider, bytes_ties_lower_bound(numel_of(base), NUM_TASKS, 4))


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("size", list(SIZES))
def test_dare_task_arithmetic(benchmark, size, provider):
    """DARE (p = 0.9) + task arithmetic; the peer draws torch.bernoulli masks (other random numbers)."""
    base, experts = models(size)
    lambdas = [0.3] * NUM_TASKS
    fn = (lambda: peers.dare_linear_naive(base, experts, lambdas, drop_rate=DROP_RATE)) if provider == "peer" else \
        (lambda: mk.dare_merging(base, experts, drop_rate=DROP_RATE, weights=lambdas, backend=provider))
    benchmark.group = f"dare-{size}"
    _run(benchmark, fn, provider, bytes_task_arithmetic(numel_of(base), NUM_TASKS, 4))
