"""Task arithmetic, TIES and DARE: every backend against the torch reference and hand-worked rules."""

import itertools

import numpy as np
import pytest
import torch

import merging_kernels as mk
from merging_kernels.ops.philox import dare_keep_mask_torch, tensor_key
from merging_kernels.ops.task_vectors import TASK_VECTORS, keep_count

from helpers import fast_backend_params, guard_launches

FAST = fast_backend_params(TASK_VECTORS)
# every backend with its device: the torch reference and the CPU fast paths here, the CUDA ones (gpu marked)
# where there is a GPU, so the compiled Triton kernels meet the same edge cases as the interpreted ones
EVERY = [pytest.param("torch", "cpu", id="torch-cpu"), *FAST]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(0,), (1,), (7,), (33, 5), (3, 1, 4), (2049,)]


def make_case(shapes, num_tasks, dtype=torch.float32, device="cpu", spread=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    bases = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    experts = [[(b.float() + spread * torch.randn(s, generator=g)).to(dtype) for b, s in zip(bases, shapes)]
               for _ in range(num_tasks)]
    return on(device, bases), on(device, experts)


def assert_outputs_close(actual, expected, dtype):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a.dtype == e.dtype and a.shape == e.shape
        # fp32 accumulation in another order: a few fp32 ulps, then one rounding to the output dtype.
        tol = 4 * torch.finfo(torch.float32).eps if dtype == torch.float32 else torch.finfo(dtype).eps
        torch.testing.assert_close(a.cpu().float(), e.cpu().float(), rtol=tol, atol=tol)


def on(device, x):
    """``x`` (a tensor, or lists / dicts of them) on ``device``."""
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, dict):
        return {k: on(device, v) for k, v in x.items()}
    return [on(device, v) for v in x]


def clone_all(bases, experts):
    return [b.clone() for b in bases], [[e.clone() for e in task] for task in experts]


# --------------------------------------------------------------------------- the reference against hand-worked rules

TAU = torch.tensor([[4.0, -1.0, 2.0, 0.0], [-3.0, -2.0, 1.0, 5.0], [1.0, 3.0, -6.0, -1.0]])


@pytest.mark.parametrize("backend,device", EVERY)
def test_ties_hand_worked_example(backend, device):
    # density 0.5 on 4 entries keeps 2 per task: τ1 → [4,0,2,0], τ2 → [-3,0,0,5], τ3 → [0,3,-6,0];
    # signs of the sum [1,3,-4,5] → [+,+,-,+]; disjoint means → [4,3,-6,5]; × λ = 0.5.
    base = torch.zeros(4, device=device)
    merged = mk.ties_merging(base, list(TAU.to(device)), density=0.5, scale=0.5, backend=backend)
    assert torch.equal(merged.cpu(), torch.tensor([2.0, 1.5, -3.0, 2.5]))


@pytest.mark.parametrize("backend,device", EVERY)
def test_task_arithmetic_hand_worked_example(backend, device):
    base = torch.full((4,), 10.0)
    merged = mk.task_arithmetic(base.to(device), list((base + TAU).to(device)), [0.5, 0.25, 1.0], backend=backend)
    assert torch.equal(merged.cpu(), base + torch.tensor([2.25, 2.0, -4.75, 0.25]))


def test_ties_trim_scopes_differ_as_stated():
    # one task; model scope keeps the 2 largest of [6,-5,4,3] (both in a), tensor scope the largest of each tensor
    base = {"a": torch.zeros(2), "b": torch.zeros(2)}
    expert = {"a": torch.tensor([6.0, -5.0]), "b": torch.tensor([4.0, 3.0])}
    model = mk.ties_merging(base, [expert], density=0.5, trim_scope="model", backend="torch")
    tensor = mk.ties_merging(base, [expert], density=0.5, trim_scope="tensor", backend="torch")
    assert torch.equal(model["a"], torch.tensor([6.0, -5.0])) and torch.equal(model["b"], torch.zeros(2))
    assert torch.equal(tensor["a"], torch.tensor([6.0, 0.0])) and torch.equal(tensor["b"], torch.tensor([4.0, 0.0]))


def test_ties_weighted_sign_and_disjoint_mean_follow_mergekit_rule():
    # weights multiply deltas before the sign vote; the mean divides by the weights that agree
    base = torch.zeros(2)
    experts = [torch.tensor([1.0, -1.0]), torch.tensor([-1.0, 1.0])]
    merged = mk.ties_merging(base, experts, density=1.0, weights=[3.0, 1.0], backend="torch")
    assert torch.equal(merged, torch.tensor([1.0, -1.0]))
    summed = mk.ties_merging(base, experts, density=1.0, weights=[3.0, 1.0], normalize=False, backend="torch")
    assert torch.equal(summed, torch.tensor([3.0, -3.0]))
    # a zero vote counts as +: equal and opposite deltas keep the positive one
    tie = mk.ties_merging(base, [torch.tensor([2.0, 0.0]), torch.tensor([-2.0, 0.0])], density=1.0, backend="torch")
    assert torch.equal(tie, torch.tensor([2.0, 0.0]))


def test_reference_threshold_keeps_ties_and_at_least_one():
    # magnitudes [3,3,3,1]: density 0.25 keeps m = 1 → threshold 3 → all three ties kept
    base = torch.zeros(4)
    merged = mk.ties_merging(base, [torch.tensor([3.0, -3.0, 3.0, 1.0])], density=0.25, backend="torch")
    assert torch.equal(merged, torch.tensor([3.0, -3.0, 3.0, 0.0]))
    assert keep_count(0.01, 10) == 1 and keep_count(0.5, 0) == 0 and keep_count(0.3, 10) == 3


# --------------------------------------------------------------------------- fast backends against the reference


@pytest.mark.parametrize("backend,device", FAST)
@pytest.mark.parametrize("dtype", DTYPES)
def test_task_arithmetic_matches_reference(backend, device, dtype):
    bases, experts = make_case(SHAPES, 3, dtype, device)
    weights = [0.3, -0.7, 1.1]
    ref = mk.merge_task_vectors(bases, experts, weights, scale=0.9, backend="torch")
    out = mk.merge_task_vectors(bases, experts, weights, scale=0.9, backend=backend)
    assert_outputs_close(out, ref, dtype)


@pytest.mark.parametrize("backend,device", FAST)
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_out_dtype_differs_from_input(backend, device, out_dtype):
    bases, experts = make_case([(5, 9), (130,)], 2, torch.bfloat16, device)
    ref = mk.merge_task_vectors(bases, experts, [0.5, 0.5], out_dtype=out_dtype, backend="torch")
    out = mk.merge_task_vectors(bases, experts, [0.5, 0.5], out_dtype=out_dtype, backend=backend)
    assert all(o.dtype == out_dtype for o in out)
    assert_outputs_close(out, ref, out_dtype)


@pytest.mark.parametrize("backend,device", FAST)
@pytest.mark.parametrize("scope", ["tensor", "model"])
@pytest.mark.parametrize("density", [0.01, 0.3, 1.0])
@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_matches_reference(backend, device, scope, density, dtype):
    bases, experts = make_case(SHAPES, 3, dtype, device)
    kwargs = dict(scale=0.7, density=density, trim_scope=scope, elect_sign=True)
    ref = mk.merge_task_vectors(bases, experts, [1.0, 0.5, 2.0], backend="torch", **kwargs)
    out = mk.merge_task_vectors(bases, experts, [1.0, 0.5, 2.0], backend=backend, **kwargs)
    assert_outputs_close(out, ref, dtype)
    if density < 1:
        fast_thresholds = mk.magnitude_thresholds(bases, experts, density=density, trim_scope=scope, backend=backend)
        ref_thresholds = mk.magnitude_thresholds(bases, experts, density=density, trim_scope=scope, backend="torch")
        assert torch.equal(fast_thresholds.cpu(), ref_thresholds.cpu())


@pytest.mark.parametrize("backend,device", FAST)
@pytest.mark.parametrize("scope", ["tensor", "model"])
def test_ties_with_many_magnitude_ties_is_exact(backend, device, scope):
    # integer-valued task vectors: many equal magnitudes at every threshold, all arithmetic exact
    g = torch.Generator().manual_seed(1)
    shapes = [(300,), (17, 3), (1,)]
    bases = [torch.randint(-4, 5, s, generator=g).float().to(device) for s in shapes]
    experts = [[b + torch.randint(-3, 4, b.shape, generator=g).float().to(device) for b in bases] for _ in range(4)]
    for density in (0.1, 0.25, 0.5):
        kwargs = dict(density=density, trim_scope=scope, elect_sign=True, normalize=False)
        ref = mk.merge_task_vectors(bases, experts, [1.0] * 4, backend="torch", **kwargs)
        out = mk.merge_task_vectors(bases, experts, [1.0] * 4, backend=backend, **kwargs)
        for o, r in zip(out, ref):
            assert torch.equal(o.cpu(), r.cpu())


@pytest.mark.parametrize("backend,device", FAST)
@pytest.mark.parametrize("elect_sign", [False, True])
def test_dare_matches_reference_bit_for_bit_masks(backend, device, elect_sign):
    bases, experts = make_case([(257,), (3, 11), (1,)], 2, torch.float32, device)
    for seed in (0, 7, 2**40 + 3):
        kwargs = dict(drop_rate=0.6, seed=seed, elect_sign=elect_sign, tensor_keys=[11, 2**32 - 1, 0])
        ref = mk.merge_task_vectors(bases, experts, [1.0, 1.0], backend="torch", **kwargs)
        out = mk.merge_task_vectors(bases, experts, [1.0, 1.0], backend=backend, **kwargs)
        assert_outputs_close(out, ref, torch.float32)
    # masks: with one expert and weight 1, out − base is the rescaled task vector where kept, 0 where dropped
    base = torch.zeros(4096, device=device)
    expert = torch.ones(4096, device=device)
    out = mk.merge_task_vectors([base], [[expert]], [1.0], drop_rate=0.25, seed=5, tensor_keys=[123], backend=backend)
    keep = dare_keep_mask_torch(4096, seed=5, tensor_key=123, task=0, p=0.25)
    assert torch.equal(out[0].cpu() != 0, keep)
    torch.testing.assert_close(out[0].cpu()[keep], torch.full((int(keep.sum()),), 1 / 0.75))


@pytest.mark.parametrize("backend,device", FAST)
def test_dare_then_ties_matches_reference(backend, device):
    bases, experts = make_case([(400,), (9, 9)], 3, torch.float32, device)
    kwargs = dict(drop_rate=0.3, seed=9, density=0.4, elect_sign=True, scale=0.5)
    ref = mk.merge_task_vectors(bases, experts, [1.0, 1.0, 1.0], backend="torch", **kwargs)
    out = mk.merge_task_vectors(bases, experts, [1.0, 1.0, 1.0], backend=backend, **kwargs)
    assert_outputs_close(out, ref, torch.float32)


@pytest.mark.parametrize("backend,device", FAST)
def test_per_tensor_weights_and_non_contiguous_inputs(backend, device):
    bases, experts = make_case([(6, 10), (10, 6)], 2, torch.float32, device)
    bases = [bases[0].t(), bases[1]]  # a transposed view: not contiguous
    experts = [[task[0].t(), task[1][:, ::1]] for task in experts]
    weights = torch.tensor([[0.1, 0.2], [3.0, -1.0]])
    ref = mk.merge_task_vectors(bases, experts, weights, backend="torch")
    out = mk.merge_task_vectors(bases, experts, weights, backend=backend)
    assert_outputs_close(out, ref, torch.float32)
    assert out[0].shape == (10, 6)


@pytest.mark.parametrize("backend,device", FAST)
def test_many_tensors_in_one_call_equal_one_at_a_time(backend, device):
    shapes = [(i % 7 + 1, 3) for i in range(40)] + [(0, 4)]
    bases, experts = make_case(shapes, 2, torch.float32, device)
    keys = list(range(100, 100 + len(shapes)))
    kwargs = dict(drop_rate=0.5, seed=3, density=0.5, elect_sign=True)
    together = mk.merge_task_vectors(bases, experts, [1.0, 1.0], tensor_keys=keys, backend=backend, **kwargs)
    for t in range(len(shapes)):
        alone = mk.merge_task_vectors([bases[t]], [[experts[0][t]], [experts[1][t]]], [1.0, 1.0],
                                      tensor_keys=[keys[t]], backend=backend, **kwargs)
        assert torch.equal(together[t], alone[0])


@pytest.mark.parametrize("backend,device", FAST)
def test_inputs_untouched_and_out_written(backend, device):
    bases, experts = make_case([(50,), (4, 4)], 2, torch.float32, device)
    saved = clone_all(bases, experts)
    out = [torch.full_like(b, 99.0) for b in bases]
    result = mk.merge_task_vectors(bases, experts, [0.5, 0.5], density=0.5, elect_sign=True, out=out, backend=backend)
    assert result[0] is out[0] and not torch.equal(out[0], torch.full_like(out[0], 99.0))
    for b, s in zip(bases, saved[0]):
        assert torch.equal(b, s)
    for task, saved_task in zip(experts, saved[1]):
        for e, s in zip(task, saved_task):
            assert torch.equal(e, s)


@pytest.mark.parametrize("backend,device", FAST)
def test_huge_and_tiny_magnitudes(backend, device):
    base = torch.tensor([0.0, 1e30, -1e30, 1e-30, 0.0, 3e38], device=device)
    expert = torch.tensor([1e-38, 2e30, -3e30, -1e-30, 1e-45, 3e38], device=device)
    for kwargs in ({}, dict(density=0.5, elect_sign=True)):
        ref = mk.merge_task_vectors([base], [[expert]], [1.0], backend="torch", **kwargs)
        out = mk.merge_task_vectors([base], [[expert]], [1.0], backend=backend, **kwargs)
        assert torch.equal(out[0].cpu(), ref[0].cpu())


@pytest.mark.parametrize("backend,device", EVERY)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_task_vectors_are_refused_with_the_name(backend, device, bad):
    base = on(device, {"ok": torch.zeros(3), "layer.bad": torch.zeros(5)})
    expert = on(device, {"ok": torch.ones(3), "layer.bad": torch.tensor([0.0, 1.0, bad, 0.0, 0.0])})
    with pytest.raises(ValueError, match="layer.bad"):
        mk.task_arithmetic(base, [expert], backend=backend)
    with pytest.raises(ValueError, match="layer.bad"):
        mk.ties_merging(base, [expert], density=0.5, backend=backend)
    merged = mk.task_arithmetic(base, [expert], check_finite=False, backend=backend)
    assert not torch.isfinite(merged["layer.bad"]).all()


def _with_constant_masks(dtype, seed=0):
    """A state dict with a weight that the experts change and float buffers they all keep: a causal -inf mask,
    a +inf constant and a tensor that is -inf in the base and in every expert."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(33, 5, generator=g)
    base = {"w": w.to(dtype), "attn.mask": torch.full((9, 9), float("-inf")).triu(1).to(dtype),
            "clip": torch.full((3,), float("inf"), dtype=dtype), "b": torch.randn(7, generator=g).to(dtype)}
    experts = []
    for _ in range(3):
        e = {name: t.clone() for name, t in base.items()}
        e["w"] = (w + 0.1 * torch.randn(33, 5, generator=g)).to(dtype)
        e["b"] = (base["b"].float() + 0.1 * torch.randn(7, generator=g)).to(dtype)
        experts.append(e)
    return base, experts


MERGES = {
    "ta": lambda b, e, **kw: mk.task_arithmetic(b, e, [0.3, 0.5, 0.2], **kw),
    "ties": lambda b, e, **kw: mk.ties_merging(b, e, density=0.4, **kw),
    "ties_model": lambda b, e, **kw: mk.ties_merging(b, e, density=0.4, trim_scope="model", **kw),
    "dare": lambda b, e, **kw: mk.dare_merging(b, e, drop_rate=0.5, weights=0.4, seed=3, **kw),
    "dare_ties": lambda b, e, **kw: mk.ties_merging(b, e, density=0.5, drop_rate=0.3, seed=1, **kw),
}


@pytest.mark.parametrize("backend,device", EVERY)
@pytest.mark.parametrize("method", sorted(MERGES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_entries_every_expert_kept_merge_to_themselves_infinities_included(backend, device, method, dtype):
    # θk = θ0 = ±inf is an unchanged entry (task vector 0), not inf − inf = NaN: the buffer comes back as it is
    base, experts = _with_constant_masks(dtype)
    merged = on("cpu", MERGES[method](on(device, base), on(device, experts), backend=backend))
    for name in ("attn.mask", "clip"):
        assert torch.equal(merged[name], base[name]), name
    reference = MERGES[method](base, experts, backend="torch")
    assert_outputs_close([merged["w"], merged["b"]], [reference["w"], reference["b"]], dtype)
    if method != "ties_model" and device == "cpu":  # a per-tensor merge of the weights alone is the same merge
        alone = MERGES[method]({n: base[n] for n in ("w", "b")}, [{n: e[n] for n in ("w", "b")} for e in experts],
                               backend="torch")
        assert torch.equal(merged["w"], alone["w"]) and torch.equal(merged["b"], alone["b"])


@pytest.mark.parametrize("backend,device", EVERY)
@pytest.mark.parametrize("change", ["finite", "other_sign", "nan_kept"])
def test_an_infinity_an_expert_changes_is_still_refused(backend, device, change):
    base, experts = _with_constant_masks(torch.float32)
    if change == "finite":  # one expert replaced a masked entry: inf in its task vector
        experts[1]["attn.mask"][0, 5] = 0.0
    elif change == "other_sign":  # +inf -> -inf
        experts[2]["clip"][1] = float("-inf")
    else:  # NaN is never equal to itself: a NaN buffer is refused even when every model holds it
        for sd in (base, *experts):
            sd["b"][2] = float("nan")
    name = {"finite": "attn.mask", "other_sign": "clip", "nan_kept": "'b'"}[change]
    for method in ("ta", "ties", "dare"):
        with pytest.raises(ValueError, match=name):
            MERGES[method](on(device, base), on(device, experts), backend=backend)


# --------------------------------------------------------------------------- DARE statistics and reproducibility


@pytest.mark.parametrize("backend,device", EVERY)
def test_dare_keep_rate_and_unbiased_mean(backend, device):
    n, p = 40_000, 0.7
    base = torch.zeros(n, device=device)
    g = torch.Generator().manual_seed(4)
    expert = (1.0 + torch.rand(n, generator=g)).to(device)
    out = mk.dare_merging(base, [expert], drop_rate=p, seed=11, backend=backend)
    kept = (out != 0).float().mean().item()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(kept - (1 - p)) < 5 * sigma
    # E[out] = E[τ]: the rescaling keeps the expected task vector
    rel = abs(out.mean().item() - expert.mean().item()) / expert.mean().item()
    assert rel < 5 * (((1 - p) / p) / n) ** 0.5 * 1.2
    again = mk.dare_merging(base, [expert], drop_rate=p, seed=11, backend=backend)
    other = mk.dare_merging(base, [expert], drop_rate=p, seed=12, backend=backend)
    assert torch.equal(out, again) and not torch.equal(out, other)


def test_dare_mask_depends_on_name_not_on_batching():
    base = {"a": torch.zeros(100), "b": torch.zeros(100)}
    expert = {"a": torch.ones(100), "b": torch.ones(100)}
    both = mk.dare_merging(base, [expert], drop_rate=0.5, seed=1, backend="torch")
    alone = mk.dare_merging({"b": base["b"]}, [{"b": expert["b"]}], drop_rate=0.5, seed=1, backend="torch")
    assert torch.equal(both["b"], alone["b"]) and not torch.equal(both["a"], both["b"])
    keep_b = dare_keep_mask_torch(100, seed=1, tensor_key=tensor_key("b"), task=0, p=0.5)
    assert torch.equal(both["b"] != 0, keep_b)


# --------------------------------------------------------------------------- state dicts and errors


def test_state_dict_round_trip_keeps_order_and_integer_buffers():
    base = {"w": torch.randn(3, 3), "steps": torch.tensor(7), "b": torch.randn(3).half()}
    experts = [{k: (v + 1 if v.is_floating_point() else v + 5) for k, v in base.items()} for _ in range(2)]
    merged = mk.task_arithmetic(base, experts, 0.5, backend="torch")
    assert list(merged) == ["w", "steps", "b"]
    assert torch.equal(merged["steps"], base["steps"]) and merged["steps"] is not base["steps"]
    torch.testing.assert_close(merged["w"], base["w"] + 1)
    assert merged["b"].dtype == torch.float16
    per_tensor = mk.task_arithmetic(base, experts, {"w": [1.0, 1.0], "b": 0.0}, backend="torch")
    torch.testing.assert_close(per_tensor["w"], base["w"] + 2)
    assert torch.equal(per_tensor["b"], base["b"])


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda b, e: mk.task_arithmetic(b, [{"w": torch.zeros(2, 2)}]), ValueError, "shape"),
        (lambda b, e: mk.task_arithmetic(b, [{"w": torch.zeros(3, 2).half()}]), TypeError, "dtype"),
        (lambda b, e: mk.task_arithmetic(b, [{"v": torch.zeros(3, 2)}]), ValueError, "missing"),
        (lambda b, e: mk.task_arithmetic(b, e, [1.0, 2.0]), ValueError, "weights"),
        (lambda b, e: mk.task_arithmetic(b, e, {"x": 1.0}), ValueError, "weights"),
        (lambda b, e: mk.ties_merging(b, e, density=0.0), ValueError, "density"),
        (lambda b, e: mk.ties_merging(b, e, density=1.5), ValueError, "density"),
        (lambda b, e: mk.dare_merging(b, e, drop_rate=1.0), ValueError, "drop_rate"),
        (lambda b, e: mk.dare_merging(b, e, drop_rate=-0.1), ValueError, "drop_rate"),
        (lambda b, e: mk.dare_merging(b, e, drop_rate=0.5, seed=-1), ValueError, "seed"),
        (lambda b, e: mk.ties_merging(b, e, trim_scope="layer"), ValueError, "trim_scope"),
        (lambda b, e: mk.task_arithmetic(b, e, backend="cuda"), ValueError, "backend"),
        (lambda b, e: mk.task_arithmetic(b, []), ValueError, "experts"),
        (lambda b, e: mk.task_arithmetic(b, e[0]), TypeError, "experts"),
        (lambda b, e: mk.task_arithmetic([1, 2], e), TypeError, "base"),
        (lambda b, e: mk.task_arithmetic(b, e, float("nan")), ValueError, "weights|finite"),
        (lambda b, e: mk.task_arithmetic({"w": torch.zeros(3, 2, dtype=torch.int32)}, [{"w": torch.zeros(3, 2)}]),
         TypeError, "dtype|float"),
    ],
)
def test_bad_input_is_refused_with_a_named_error(call, error, match):
    base = {"w": torch.zeros(3, 2)}
    experts = [{"w": torch.ones(3, 2)}]
    with pytest.raises(error, match=match):
        call(base, experts)


@pytest.mark.parametrize("backend,device", EVERY)
def test_coefficients_beyond_float32_are_refused_below_float64(backend, device):
    # finite in float64 but ±inf once the merge casts them: inf · 0 would write NaN where nothing changed
    base, experts = on(device, {"w": torch.zeros(3, 2)}), [on(device, {"w": torch.ones(3, 2)})]
    for call, name in ((lambda: mk.task_arithmetic(base, experts, weights=1e39, backend=backend), "weights"),
                       (lambda: mk.dare_merging(base, experts, drop_rate=0.5, weights=[-1e39], backend=backend),
                        "weights"),
                       (lambda: mk.ties_merging(base, experts, scale=1e300, backend=backend), "scale")):
        with pytest.raises(ValueError, match=rf"^{name} must lie within float32's range"):
            call()
    at_max = mk.task_arithmetic(base, experts, weights=3.4e38, backend=backend)["w"]
    assert torch.equal(at_max, torch.full((3, 2), 3.4e38, device=device))
    if backend == "torch":  # float64 merges combine in float64
        wide = mk.task_arithmetic({"w": torch.zeros(2, dtype=torch.float64)}, [{"w": torch.ones(2, dtype=torch.float64)}],
                                  weights=1e39)["w"]
        assert torch.equal(wide, torch.full((2,), 1e39, dtype=torch.float64))
        # a float32 tensor beside float64 ones still combines in float32: its coefficient is checked
        mixed = ([torch.zeros(2, dtype=torch.float64), torch.zeros(2)], [[torch.ones(2, dtype=torch.float64),
                                                                         torch.ones(2)]])
        with pytest.raises(ValueError, match="^weights must lie within float32's range"):
            mk.merge_task_vectors(*mixed, [[1.0], [1e39]], backend=backend)
        assert torch.equal(mk.merge_task_vectors(*mixed, [[1e39], [1.0]], backend=backend)[0],
                           torch.full((2,), 1e39, dtype=torch.float64))


def test_float64_runs_on_the_reference_and_fast_backends_refuse_it():
    base, expert = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    assert mk.task_arithmetic(base, [expert], 0.5).dtype == torch.float64
    with pytest.raises(TypeError, match="float64"):
        mk.task_arithmetic(base, [expert], 0.5, backend="native")


@pytest.mark.parametrize("scope", ["tensor", "model"])
def test_both_radix_digit_layouts_select_the_kthvalue(scope):
    from merging_kernels.ops import task_vectors as tv

    bases, experts = make_case([(300,), (7, 5), (1,)], 2)
    spec = tv.make_spec(density=0.3, trim_scope=scope)
    seg_of, seg_numel = tv.segments_of([b.numel() for b in bases], scope)
    keep = torch.tensor([keep_count(0.3, n) for n in seg_numel])
    expected = torch.stack([
        torch.cat([(experts[k][t] - bases[t]).abs().flatten() for t in range(3) if seg_of[t] == s])
        .sort(descending=True).values[keep[s] - 1]
        for s in range(len(seg_numel)) for k in range(2)]).view(len(seg_numel), 2)
    for levels in (tv.RADIX_LEVELS, tv.RADIX_LEVELS_NARROW):
        got = tv.select_thresholds(
            lambda shift, bits, prefix: tv.magnitude_histogram_torch(bases, experts, spec, [0, 1, 2], seg_of,
                                                                     len(seg_numel), shift, bits, prefix),
            keep, 2, levels)
        assert torch.equal(got, expected)


@pytest.mark.parametrize("backend,device", EVERY)
def test_out_may_be_the_base_itself(backend, device):
    bases, experts = make_case([(300,), (7, 5)], 3, device=device)
    kwargs = dict(density=0.4, elect_sign=True, drop_rate=0.2, seed=1)
    expected = mk.merge_task_vectors(bases, experts, [1.0, 1.0, 1.0], backend="torch", **kwargs)
    in_place = [b.clone() for b in bases]
    inputs = [b.clone() for b in bases]
    # experts hold their own copies; the base list given as input is also the output list
    result = mk.merge_task_vectors(in_place, experts, [1.0, 1.0, 1.0], out=in_place, backend=backend, **kwargs)
    assert result[0] is in_place[0]
    assert_outputs_close(in_place, expected, torch.float32)
    assert not torch.equal(in_place[0], inputs[0])


@pytest.mark.parametrize("backend,device", EVERY)
def test_overflowing_task_vector_is_refused_on_every_backend(backend, device):
    # both values finite, their float32 difference is not: every backend counts it the same way
    base = torch.tensor([3e38, 0.0], dtype=torch.bfloat16, device=device)
    expert = torch.tensor([-3e38, 1.0], dtype=torch.bfloat16, device=device)
    with pytest.raises(ValueError, match="non-finite"):
        mk.merge_task_vectors([base], [[expert]], [0.1], backend=backend)


def overflow_case(out_dtype, n, positions):
    """(base, expert, expected count) on n float32 entries, with the entries at ``positions`` (indices in
    [0, n)) set so that base + (expert - base) lands exactly on, just below or beyond the magnitude that
    rounds to inf in ``out_dtype``; the rest are ordinary values. Also a -1e9 mask and an inf the expert
    keeps (unchanged: never counted)."""
    g = torch.Generator().manual_seed(n)
    base = torch.randn(n, generator=g)
    expert = base + 0.1 * torch.randn(n, generator=g)
    limit = {torch.float16: 65520.0, torch.bfloat16: float(np.frombuffer(np.uint32(0x7F7F8000).tobytes(),
                                                                          np.float32)[0])}.get(out_dtype)
    cases = []
    if limit is not None:
        below = float(np.nextafter(np.float32(limit), np.float32(0)))
        cases = [(1.0, limit, 1), (-1.0, -limit, 1), (1.0, below, 0), (below, limit, 1), (-1e9, -1e9, 0)]
    cases += [(float("inf"), float("inf"), 0), (3e38, 3e38, 0)]
    expected = 0
    for i, pos in enumerate(positions):
        b, e, counted = cases[i % len(cases)]
        base[pos], expert[pos] = b, e
        expected += counted
    return base, expert, expected


@pytest.mark.parametrize("backend,device", EVERY)
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 37, 5000])
def test_merge_beyond_a_16_bit_output_is_refused_with_the_count(backend, device, out_dtype, n):
    # used to be written as inf without a word (the CLI checked, the library did not); the count is exact on
    # every backend: entries at the start, in a full tile and in the last partial tile
    positions = sorted({0, n // 2, n - 1, min(n - 1, 19), max(0, n - 3)})[:n]
    base, expert, expected = overflow_case(out_dtype, n, positions)
    merge = dict(backend=backend, out_dtype=out_dtype)
    if expected:
        with pytest.raises(mk.MergeOverflowError, match=rf"overflows {str(out_dtype)[6:]} in tensor\(s\) "
                                                           rf"'bases\[0\]' \({expected} entries"):
            mk.merge_task_vectors([base.to(device)], [[expert.to(device)]], [1.0], **merge)
    else:
        mk.merge_task_vectors([base.to(device)], [[expert.to(device)]], [1.0], **merge)
    # check_finite=False writes the infinities, as the reference does
    (kept,) = mk.merge_task_vectors([base.to(device)], [[expert.to(device)]], [1.0], check_finite=False, **merge)
    (reference,) = mk.merge_task_vectors([base], [[expert]], [1.0], check_finite=False, backend="torch",
                                         out_dtype=out_dtype)
    assert torch.isinf(reference).sum() >= expected
    torch.testing.assert_close(kept.cpu(), reference, rtol=0, atol=0)


@pytest.mark.parametrize("backend,device", EVERY)
@pytest.mark.parametrize("mode", ["sum", "ties", "ties-unnormalized", "trim", "dare"])
def test_combination_that_overflows_float32_is_refused(backend, device, mode):
    # two task vectors of 2e38 sum to inf in float32 (the disjoint mean would be 2e38): refused in every mode
    # of the fused pass (DARE's scaled task vectors go through its own branch of the kernels)
    n = 300
    base = torch.zeros(n)
    experts = [base.clone(), base.clone()]
    experts[0][[0, 150, 299]] = 2e38
    experts[1][[0, 150, 299]] = 2e38
    experts[0][1:150] = torch.linspace(-1, 1, 149)
    kwargs = {"sum": {}, "ties": dict(elect_sign=True), "ties-unnormalized": dict(elect_sign=True, normalize=False),
              "trim": dict(density=0.5), "dare": dict(drop_rate=0.1, seed=3)}[mode]
    (reference,) = mk.merge_task_vectors([base], [[e] for e in experts], [1.0, 1.0], check_finite=False,
                                         backend="torch", **kwargs)
    expected = int(torch.isinf(reference).sum())
    assert expected >= 1  # DARE may drop some of the three, never all with this seed
    with pytest.raises(mk.MergeOverflowError, match=rf"float32 in tensor\(s\) 'bases\[0\]' \({expected} entries"):
        mk.merge_task_vectors([base.to(device)], [[e.to(device)] for e in experts], [1.0, 1.0], backend=backend,
                              **kwargs)
    assert issubclass(mk.MergeOverflowError, ValueError)


@pytest.mark.parametrize("backend,device", EVERY)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_model_merged_beyond_its_range_is_refused(backend, device, dtype):
    # a 16-bit checkpoint merged in its own dtype: weights 3 on task vectors of a third of the range
    top = torch.finfo(dtype).max
    base = torch.tensor([0.0, top / 2, -top / 2, 1.0] * 9, dtype=dtype)
    expert = torch.tensor([1.0, top / 2 + top / 3, -top / 2 - top / 3, 1.0] * 9, dtype=dtype)
    with pytest.raises(mk.MergeOverflowError, match=r"\(18 entries"):
        mk.task_arithmetic(base.to(device), [expert.to(device)], 3.0, backend=backend)
    merged = mk.task_arithmetic(base.to(device), [expert.to(device)], 3.0, check_finite=False, backend=backend)
    assert torch.isinf(merged).sum() == 18 and merged.dtype == dtype


@pytest.mark.parametrize("backend,device", EVERY)
def test_base_infinities_and_masks_a_float16_output_turns_into_inf_are_kept(backend, device):
    # a -1e9 attention mask and an inf the experts kept: the conversion the user asked for, not an overflow
    base = torch.tensor([-1e9, float("inf"), float("-inf"), 1.0, 2.0])
    expert = torch.tensor([-1e9, float("inf"), float("-inf"), 1.5, 2.0])
    (merged,) = mk.merge_task_vectors([base.to(device)], [[expert.to(device)]], [1.0], out_dtype=torch.float16,
                                      backend=backend)
    assert merged.cpu().tolist() == [float("-inf"), float("inf"), float("-inf"), 1.5, 2.0]


@pytest.mark.parametrize("backend,device", EVERY)
@pytest.mark.parametrize("mode", ["sum", "ties"])
def test_merge_that_flips_or_nans_an_entry_a_float16_output_makes_inf_is_refused(backend, device, mode):
    # the exemption is for the base's conversion (the same infinity the base becomes in float16), not for any
    # entry whose base is out of range: a -1e9 mask the merge moves to +1e9 (+inf, the opposite infinity), or
    # an overflowed combination that is NaN there, used to be written without a word
    base = torch.tensor([-1e9, -1e9, 1e5, -1e9, 1.0, -1e9, float("-inf")])
    experts = [torch.tensor([1e9, -1e9, 1.2e5, 3e38, 1.5, -2e9, float("-inf")]),
               torch.tensor([-1e9, -1e9, 1e5, -3e38, 1.5, -1e9, float("-inf")])]
    # entry 0: -inf -> +inf; 3: 2 * 3e38 - 2 * 3e38 = NaN; the rest stay the base's conversion or are finite
    kwargs = dict(elect_sign=True, normalize=False) if mode == "ties" else {}
    merge = lambda **kw: mk.merge_task_vectors([base.to(device)], [[e.to(device)] for e in experts],  # noqa: E731
                                               [2.0, 2.0], out_dtype=torch.float16, backend=backend, **kwargs, **kw)
    (kept,) = merge(check_finite=False)
    (reference,) = mk.merge_task_vectors([base], [[e] for e in experts], [2.0, 2.0], out_dtype=torch.float16,
                                         check_finite=False, backend="torch", **kwargs)
    torch.testing.assert_close(kept.cpu(), reference, rtol=0, atol=0, equal_nan=True)
    expected = 1 + int(torch.isnan(reference[3]))  # TIES elects one sign at entry 3: -inf, kept
    assert reference[0] == float("inf") and reference[[1, 2, 5, 6]].isinf().all()
    with pytest.raises(mk.MergeOverflowError, match=rf"\({expected} entries"):
        merge()


@pytest.mark.parametrize("backend,device", EVERY)
def test_non_finite_task_vectors_are_reported_before_the_overflow_they_cause(backend, device):
    base = torch.tensor([3e38, 1.0])
    expert = torch.tensor([-3e38, 70000.0])  # entry 0: a non-finite difference; entry 1: beyond float16
    with pytest.raises(ValueError, match="non-finite task vectors"):
        mk.merge_task_vectors([base.to(device)], [[expert.to(device)]], [1.0], out_dtype=torch.float16,
                              backend=backend)


@pytest.mark.parametrize("backend,device", EVERY)
def test_in_place_merge_of_tied_weights(backend, device):
    # a state dict whose embedding and head are one tensor, merged in place: every backend equals the
    # torch reference computed on separate copies (the fast kernels used to apply the task vector twice)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1000, generator=g).to(device)
    e = w + torch.randn(1000, generator=g).to(device)
    experts = [{"embed.weight": e, "lm_head.weight": e}]
    expected = mk.task_arithmetic({"embed.weight": w.clone(), "lm_head.weight": w.clone()}, experts, 0.5,
                                  backend="torch")["embed.weight"]
    sd = {"embed.weight": w.clone()}
    sd["lm_head.weight"] = sd["embed.weight"]
    mk.task_arithmetic(sd, experts, 0.5, out=sd, backend=backend)
    assert torch.equal(sd["embed.weight"], expected)


@pytest.mark.parametrize("backend,device", EVERY)
@pytest.mark.parametrize("layout", ["shifted_own_base", "other_base", "other_expert", "own_expert", "own_base"])
def test_out_sharing_memory_with_inputs(backend, device, layout):
    n = 5000
    g = torch.Generator().manual_seed(1)
    buf = torch.randn(2 * n + 1, generator=g).to(device)  # the views are taken on the device
    kwargs = dict(density=0.5, elect_sign=True)
    bases = [buf[:n], buf[n + 1:]]
    experts = [[b + torch.randn(n, generator=g).to(device) for b in bases] for _ in range(2)]
    expected = mk.merge_task_vectors([b.clone() for b in bases], [[x.clone() for x in e] for e in experts], [1.0, 0.7],
                                     backend="torch", **kwargs)
    out = {"shifted_own_base": [buf[1:n + 1], torch.empty(n, device=device)], "other_base": [bases[1], bases[0]],
           "other_expert": [experts[0][1], torch.empty(n, device=device)], "own_expert": [experts[1][0], experts[0][1]],
           "own_base": list(bases)}[layout]
    mk.merge_task_vectors(bases, experts, [1.0, 0.7], out=out, backend=backend, **kwargs)
    for t in range(2):
        assert torch.equal(out[t], expected[t]), (layout, t)


def test_out_memory_sharing_check_is_exact_about_aliases():
    from merging_kernels.ops.task_vectors import _outs_sharing_memory

    a, b = torch.zeros(10), torch.zeros(10)
    experts = [[torch.zeros(10), torch.zeros(10)]]
    assert _outs_sharing_memory([a, b], experts, [a, b]) == set()  # element for element: written directly
    assert _outs_sharing_memory([a, b], experts, [experts[0][0], b]) == set()
    assert _outs_sharing_memory([a, b], experts, [b, a]) == {0, 1}
    assert _outs_sharing_memory([a, a], experts, [a, a]) == {0, 1}  # tied: each out is the other's base
    assert _outs_sharing_memory([a, b], experts, [a.view(torch.int32).view(torch.float32), b]) == set()
    assert _outs_sharing_memory([a[:5], b], [[a[5:], b]], [a[:5], b]) == set()  # adjacent, not overlapping
    assert _outs_sharing_memory([a[:6], b], [[a[5:], b]], [a[:6], b]) == {0}


@pytest.mark.parametrize("backend,device", EVERY)
def test_refused_merge_leaves_inputs_and_torch_out_untouched(backend, device):
    base = torch.tensor([1.0, 2.0, 3.0], device=device)
    experts = on(device, [[torch.tensor([1.5, float("nan"), 3.0])], [torch.tensor([0.0, 2.0, 4.0])]])
    copies = [base.clone(), *(e[0].clone() for e in experts)]
    out = [torch.full((3,), 7.0, device=device)]
    with pytest.raises(ValueError, match="non-finite"):
        mk.merge_task_vectors([base], experts, [1.0, 1.0], out=out, backend=backend)
    for t, c in zip([base, experts[0][0], experts[1][0]], copies):
        torch.testing.assert_close(t, c, rtol=0, atol=0, equal_nan=True)
    if backend == "torch":  # documented: the reference writes out only after the check
        assert torch.equal(out[0].cpu(), torch.full((3,), 7.0))


# --------------------------------------------------------------------------- input validation (API audit)

def _stream_case(device="cpu"):
    g = torch.Generator().manual_seed(5)
    bases = [torch.randn(8, 16, generator=g), torch.randn(33, generator=g)]
    experts = [[b + 0.1 * torch.randn(b.shape, generator=g) for b in bases] for _ in range(3)]
    return on(device, bases), on(device, experts)


@pytest.mark.parametrize("backend,device", EVERY)
def test_streamed_thresholds_equal_in_memory_ones(backend, device):
    bases, experts = _stream_case(device)
    chunks = lambda: iter([([bases[t]], [[task[t]] for task in experts], [t]) for t in range(2)])  # noqa: E731
    streamed = mk.streamed_magnitude_thresholds(chunks, num_tasks=3, total_numel=128 + 33, density=0.2,
                                                device=device, backend=backend)
    in_memory = mk.magnitude_thresholds(bases, experts, density=0.2, trim_scope="model", backend=backend)
    assert streamed.shape == (1, 3) and torch.equal(streamed, in_memory)


@pytest.mark.parametrize("backend,device", EVERY)
def test_streamed_thresholds_refuse_a_wrong_total_or_a_one_shot_iterator(backend, device):
    bases, experts = _stream_case(device)
    chunks = lambda: iter([(bases, experts, [0, 1])])  # noqa: E731
    for total in (1000, 128, 0):  # more, fewer than the 161 elements yielded; 0 used to give zeros
        with pytest.raises(ValueError, match="total_numel"):
            mk.streamed_magnitude_thresholds(chunks, num_tasks=3, total_numel=total, density=0.2, device=device,
                                             backend=backend)
    one_shot = iter([(bases, experts, [0, 1])])
    with pytest.raises(ValueError, match="fresh iterable"):  # the second pass found it exhausted
        mk.streamed_magnitude_thresholds(lambda: one_shot, num_tasks=3, total_numel=161, density=0.2,
                                         device=device, backend=backend)


@pytest.mark.gpu
def test_streamed_thresholds_refuse_chunks_on_another_device():
    bases, experts = _stream_case("cuda")
    args = dict(num_tasks=3, total_numel=161, density=0.2)
    with pytest.raises(ValueError, match="chunk 0 is on cuda:0 but device is cpu"):
        mk.streamed_magnitude_thresholds(lambda: iter([(bases, experts, [0, 1])]), device="cpu", **args)
    cpu_bases, cpu_experts = _stream_case()
    with pytest.raises(ValueError, match=r"chunk 0 is on cpu but device is cuda:\d"):  # "cuda": the current one
        mk.streamed_magnitude_thresholds(lambda: iter([(cpu_bases, cpu_experts, [0, 1])]), device="cuda", **args)
    at_current = mk.streamed_magnitude_thresholds(lambda: iter([(bases, experts, [0, 1])]), device="cuda", **args)
    assert torch.equal(at_current.cpu(), mk.magnitude_thresholds(cpu_bases, cpu_experts, density=0.2,
                                                                 trim_scope="model", backend="torch"))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(num_tasks=2), ValueError, "num_tasks"),  # the chunks hold 3 experts
        (dict(num_tasks=4), ValueError, "num_tasks"),
        (dict(num_tasks=0), ValueError, "num_tasks"),
        (dict(num_tasks=True), TypeError, "num_tasks"),
        (dict(total_numel=-1), ValueError, "total_numel"),
        (dict(total_numel="161"), TypeError, "total_numel"),
        (dict(density=None), TypeError, "density"),
        (dict(chunks=[]), TypeError, "chunks"),
        (dict(chunks=lambda: iter([(1, 2)])), TypeError, "chunks"),
        (dict(chunks=lambda: None), TypeError, r"^chunks\(\) must return an iterable of \(bases, experts"),
        (dict(device="bogus"), ValueError, "^device must name a torch device"),
        (dict(device=3.5), ValueError, "^device must name a torch device"),
    ],
)
def test_streamed_thresholds_bad_arguments_are_named(kwargs, error, match):
    bases, experts = _stream_case()
    args = dict(chunks=lambda: iter([(bases, experts, [0, 1])]), num_tasks=3, total_numel=161, density=0.2)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        mk.streamed_magnitude_thresholds(args.pop("chunks"), **args)


@pytest.mark.parametrize("scope", ["tensor", "model"])
@pytest.mark.parametrize("drop_rate", [0.0, 0.5])
def test_float64_thresholds_select_in_float64(scope, drop_rate):
    # the radix select works on float32 bits; float64 inputs take kthvalue on float64 magnitudes instead
    g = torch.Generator().manual_seed(7)
    bases = [torch.randn(40, 9, generator=g, dtype=torch.float64), torch.randn(13, generator=g, dtype=torch.float64),
             torch.zeros(0, dtype=torch.float64)]
    # deltas with full float64 mantissas: a threshold rounded to float32 keeps or drops entries next to it wrongly
    experts = [[b + 0.1 * torch.randn(b.shape, generator=g, dtype=torch.float64) for b in bases] for _ in range(3)]
    kwargs = dict(density=0.3, trim_scope=scope, drop_rate=drop_rate, seed=5)
    thresholds = mk.magnitude_thresholds(bases, experts, **kwargs)
    assert thresholds.dtype == torch.float64 and thresholds.shape == ((3 if scope == "tensor" else 1), 3)
    if scope == "tensor":
        assert torch.isinf(thresholds[2]).all()  # the empty tensor's segment
        for k in range(3):  # the exact float64 order statistic
            d = (experts[k][0] - bases[0]).abs().flatten()
            if drop_rate == 0:
                assert thresholds[0, k] == d.sort(descending=True).values[keep_count(0.3, d.numel()) - 1]
    merged = mk.merge_task_vectors(bases, experts, [1.0] * 3, elect_sign=True, **kwargs)
    given = mk.merge_task_vectors(bases, experts, [1.0] * 3, elect_sign=True, thresholds=thresholds, **kwargs)
    for a, b in zip(given, merged):
        assert a.dtype == torch.float64 and torch.equal(a, b)
    with pytest.raises(TypeError, match="float64"):
        mk.magnitude_thresholds(bases, experts, backend="native", **kwargs)


def test_magnitude_thresholds_needs_a_density():
    bases, experts = _stream_case()
    with pytest.raises(TypeError, match="density"):
        mk.magnitude_thresholds(bases, experts, density=None)


@pytest.mark.parametrize("backend,device", EVERY)
def test_user_thresholds_are_used_and_checked(backend, device):
    bases, experts = _stream_case(device)
    kwargs = dict(density=0.3, trim_scope="model", elect_sign=True, backend=backend)
    thresholds = mk.magnitude_thresholds(bases, experts, density=0.3, trim_scope="model", backend=backend)
    given = mk.merge_task_vectors(bases, experts, [1.0] * 3, thresholds=thresholds, **kwargs)
    selected = mk.merge_task_vectors(bases, experts, [1.0] * 3, **kwargs)
    for a, b in zip(given, selected):
        assert torch.equal(a, b)
    # +inf is a valid threshold (keep nothing): the base comes back
    nothing = mk.merge_task_vectors(bases, experts, [1.0] * 3,
                                    thresholds=torch.full((1, 3), float("inf"), device=device), **kwargs)
    for a, b in zip(nothing, bases):
        assert torch.equal(a, b)
    bad = [
        (torch.full((1, 3), float("nan")), ValueError),  # used to return the base silently
        (torch.tensor([[0.1, -0.5, 0.1]]), ValueError),
        (torch.full((2, 3), 0.1), ValueError),  # tensor-scope shape for a model-scope merge
        (torch.ones(1, 3, dtype=torch.int64), TypeError),
        ([[0.1, 0.1, 0.1]], TypeError),
    ]
    for value, error in bad:
        with pytest.raises(error, match="thresholds"):
            mk.merge_task_vectors(bases, experts, [1.0] * 3, thresholds=value, **kwargs)
    with pytest.raises(ValueError, match="thresholds"):  # no trim: they would be ignored
        mk.merge_task_vectors(bases, experts, [1.0] * 3, thresholds=thresholds, backend=backend)


def test_complex_entries_are_refused_and_bool_buffers_copied():
    b = torch.randn(8, 16)
    experts = [b + 0.1 * torch.randn_like(b) for _ in range(3)]
    with pytest.raises(TypeError, match="'w'"):
        mk.task_arithmetic({"w": b.cfloat()}, [{"w": e.cfloat()} for e in experts])
    with pytest.raises(TypeError, match="'z'"):
        mk.ties_merging({"w": b, "z": b.cfloat()}, [{"w": e, "z": e.cfloat()} for e in experts])
    mask = torch.rand(8, 16) > 0.5
    merged = mk.task_arithmetic({"w": b, "mask": mask}, [{"w": e, "mask": mask} for e in experts], 0.5)
    assert torch.equal(merged["mask"], mask)


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda b, e: mk.task_arithmetic(b, e, True), TypeError, "weights"),  # used to count as 1.0
        (lambda b, e: mk.task_arithmetic(b, e, [True]), TypeError, "weights"),
        (lambda b, e: mk.task_arithmetic(b, e, {"w": 1.0, "w.typo": 2.0}), ValueError, "w.typo"),
        (lambda b, e: mk.merge_task_vectors([b["w"]], [[e[0]["w"]]], True), TypeError, "weights"),
        (lambda b, e: mk.task_arithmetic(b, e, check_finite="no"), TypeError, "check_finite"),
        (lambda b, e: mk.ties_merging(b, e, normalize="yes"), TypeError, "normalize"),
        (lambda b, e: mk.dare_merging(b, e, drop_rate=0.5, elect_sign=1), TypeError, "elect_sign"),
        (lambda b, e: mk.task_arithmetic(b, e, out={}), ValueError, "'w'"),
        (lambda b, e: mk.task_arithmetic(b, e, out=[torch.zeros(3, 2)]), TypeError, "out"),
        (lambda b, e: mk.task_arithmetic(b["w"], [e[0]["w"]], out=torch.zeros(2).expand(3, 2)), ValueError, "out"),
        (lambda b, e: mk.task_arithmetic(b["w"], [e[0]["w"]], out=torch.zeros(4).as_strided((3, 2), (1, 1))),
         ValueError, "out"),
        (lambda b, e: mk.task_arithmetic(b, e, out={"w": torch.zeros(3, 2)}, out_dtype=torch.float16), ValueError,
         "out_dtype"),
        (lambda b, e: mk.task_arithmetic(b, e, out_dtype="float16"), TypeError, "out_dtype"),
        # found by an input audit: each used to fail deep inside with an unrelated message
        (lambda b, e: mk.task_arithmetic({0: b["w"]}, [{0: e[0]["w"]}]), TypeError, "keys must be str"),
        (lambda b, e: mk.merge_task_vectors([b["w"]], [[e[0]["w"]]], [1.0], names=5), TypeError, "names"),
        (lambda b, e: mk.merge_task_vectors([b["w"], b["w"]], [[e[0]["w"]] * 2], [1.0], names="ab"), TypeError,
         "names"),  # used to name the tensors 'a' and 'b'
        (lambda b, e: mk.merge_task_vectors([b["w"]], [[e[0]["w"]]], [1.0], tensor_keys=5), TypeError, "tensor_keys"),
        (lambda b, e: mk.merge_task_vectors([b["w"]], [[e[0]["w"]]], [1.0], tensor_keys=torch.ones(1, 1)), TypeError,
         "tensor_keys"),
        (lambda b, e: mk.merge_task_vectors([b["w"]] * 2, [[e[0]["w"]] * 2], [1.0], tensor_keys={7, 9}), TypeError,
         "ordered"),  # a set's order is arbitrary: it would pick the DARE masks at random
        (lambda b, e: mk.merge_task_vectors([b["w"]], [[e[0]["w"]]], [1.0], tensor_keys=itertools.count()),
         ValueError, "more than 1 entries"),  # not drained forever
        (lambda b, e: mk.merge_task_vectors([b["w"]] * 2, [[e[0]["w"]] * 2], [1.0], names=["w"]), ValueError,
         "names has 1 entries for 2"),
        (lambda b, e: mk.merge_task_vectors([b["w"]], [[e[0]["w"]]], [1.0], tensor_keys=[-1]), ValueError,
         r"tensor_keys\[0\]"),
        (lambda b, e: mk.merge_task_vectors([b["w"].to("meta")], [[e[0]["w"].to("meta")]], [1.0]), ValueError,
         "meta device"),
        (lambda b, e: mk.merge_task_vectors([b["w"]], [[e[0]["w"]]], torch.ones(1, device="meta")), ValueError,
         "weights.*meta device"),
        (lambda b, e: mk.merge_task_vectors([b["w"]], [[e[0]["w"]]], [1.0], density=0.5,
                                            thresholds=torch.ones(1, 1, device="meta")), ValueError, "meta device"),
    ],
)
def test_more_bad_input_is_refused_with_a_named_error(call, error, match):
    base = {"w": torch.zeros(3, 2), "steps": torch.tensor(3)}
    experts = [{"w": torch.ones(3, 2), "steps": torch.tensor(3)}]
    with pytest.raises(error, match=match):
        call(base, experts)


def test_names_and_tensor_keys_take_any_iterable():
    base = {"w": torch.zeros(3, 2), "b": torch.zeros(2)}
    experts = [{"w": torch.ones(3, 2), "b": torch.ones(2)}]
    kwargs = dict(drop_rate=0.5, seed=3)
    want = mk.merge_task_vectors(list(base.values()), [list(experts[0].values())], [1.0], names=["w", "b"],
                                 tensor_keys=[7, 9], **kwargs)
    for names, keys in [(base.keys(), np.array([7, 9])), ((n for n in base), torch.tensor([7, 9])),
                        (np.array(["w", "b"]), iter([7, 9]))]:
        got = mk.merge_task_vectors(list(base.values()), [list(experts[0].values())], [1.0], names=names,
                                    tensor_keys=keys, **kwargs)
        assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_weights_may_name_the_copied_buffers_and_out_may_match_out_dtype():
    base = {"w": torch.zeros(3, 2), "steps": torch.tensor(3)}
    experts = [{"w": torch.ones(3, 2), "steps": torch.tensor(3)}]
    merged = mk.task_arithmetic(base, experts, {"w": 0.5, "steps": 1.0})  # e.g. built from every key
    assert torch.equal(merged["w"], torch.full((3, 2), 0.5)) and torch.equal(merged["steps"], base["steps"])
    out = {"w": torch.empty(3, 2, dtype=torch.float16)}
    assert mk.task_arithmetic(base, experts, 0.5, out=out, out_dtype=torch.float16) is out
    assert torch.equal(out["w"], torch.full((3, 2), 0.5, dtype=torch.float16))
    strided = torch.zeros(3, 4)[:, ::2]  # not contiguous, no overlap: fine
    mk.task_arithmetic(base["w"], [experts[0]["w"]], 0.5, out=strided)
    assert torch.equal(strided, torch.full((3, 2), 0.5))


@pytest.mark.parametrize("backend,device", EVERY)
def test_results_are_detached_on_every_backend(backend, device):
    g = torch.Generator().manual_seed(2)
    base = torch.nn.Parameter(torch.randn(5, 7, generator=g).to(device))
    experts = [torch.nn.Parameter(base.detach() + torch.randn(5, 7, generator=g).to(device)) for _ in range(2)]
    results = [
        mk.task_arithmetic(base, experts, 0.5, backend=backend),
        mk.ties_merging(base, experts, density=0.5, backend=backend),
        mk.dare_merging(base, experts, drop_rate=0.3, backend=backend),
        mk.task_arithmetic({"w": base}, [{"w": e} for e in experts], backend=backend)["w"],
    ]
    for r in results:
        assert not r.requires_grad and r.grad_fn is None
    # an in-place merge into a parameter works too (autograd would refuse to write into a leaf)
    target = torch.nn.Parameter(torch.zeros(5, 7, device=device))
    mk.task_arithmetic(base, experts, 0.5, out=target, backend=backend)
    torch.testing.assert_close(target.detach(), results[0])


def test_float64_weights_from_python_numbers_are_not_rounded_to_float32():
    base, experts = torch.zeros(3, dtype=torch.float64), [torch.ones(3, dtype=torch.float64)] * 2
    expected = torch.full((3,), 0.1 + 0.2, dtype=torch.float64)
    assert torch.equal(mk.task_arithmetic(base, experts, [0.1, 0.2]), expected)
    assert torch.equal(mk.task_arithmetic({"w": base}, [{"w": e} for e in experts], {"w": [0.1, 0.2]})["w"], expected)
    assert torch.equal(mk.merge_task_vectors([base], [[e] for e in experts], [0.1, 0.2])[0], expected)


def test_numpy_bools_are_flags_and_a_refusal_names_the_qualified_type():
    import numpy as np

    base, experts = torch.zeros(4, 3), [torch.ones(4, 3), -2 * torch.ones(4, 3), 3 * torch.ones(4, 3)]
    for flag in (True, False):  # np.bool_ is no subclass of bool: it used to be refused as "got bool"
        assert torch.equal(mk.ties_merging(base, experts, normalize=np.bool_(flag), weights=[1.0, 2.0, 0.5]),
                           mk.ties_merging(base, experts, normalize=flag, weights=[1.0, 2.0, 0.5]))
    assert torch.equal(mk.task_arithmetic(base, experts, check_finite=np.False_), base + 2)
    with pytest.raises(TypeError, match=r"normalize must be True or False, got numpy\.int64"):
        mk.ties_merging(base, experts, normalize=np.int64(1))
    with pytest.raises(TypeError, match=r"elect_sign must be True or False, got torch\.Tensor"):
        mk.dare_merging(base, experts, drop_rate=0.5, elect_sign=torch.tensor(True))


def test_out_may_be_a_strided_view_whose_steps_exceed_the_inner_span_but_not_an_overlapping_one():
    base, expert = torch.zeros(4, 2), torch.ones(4, 2)
    storage = torch.zeros(4, 6)
    view = storage[:, ::4]  # strides (6, 4): 4·(2 − 1) + 1 = 5 ≤ 6, distinct (stride·size = 8 > 6 refused it)
    assert mk.task_arithmetic(base, [expert], 0.5, out=view) is view
    expected = torch.zeros(4, 6)
    expected[:, ::4] = 0.5
    assert torch.equal(storage, expected)
    for bad in (torch.zeros(2).expand(4, 2), torch.zeros(4, 1).expand(4, 2), torch.zeros(6).as_strided((4, 2), (1, 2))):
        with pytest.raises(ValueError, match="overlapping"):
            mk.task_arithmetic(base, [expert], 0.5, out=bad)


@pytest.mark.parametrize("backend,device", EVERY)
def test_streamed_thresholds_with_dare_need_model_wide_tensor_keys(backend, device):
    bases, experts = _stream_case(device)

    def chunks(keys):
        return lambda: iter([([bases[t]], [[task[t]] for task in experts], keys(t)) for t in range(2)])

    options = dict(num_tasks=3, total_numel=161, density=0.2, drop_rate=0.5, seed=3, device=device, backend=backend)
    whole = mk.magnitude_thresholds(bases, experts, density=0.2, trim_scope="model", drop_rate=0.5, seed=3,
                                    backend=backend)
    assert torch.equal(mk.streamed_magnitude_thresholds(chunks(lambda t: [t]), **options), whole)
    # None: key 0 in every chunk, so the second tensor got the first one's mask (other thresholds, silently)
    with pytest.raises(TypeError, match=r"chunks\(\) item 0 has tensor_keys None"):
        mk.streamed_magnitude_thresholds(chunks(lambda t: None), **options)
    # without DARE the keys are unused: None stays accepted
    options.update(drop_rate=0.0)
    assert torch.equal(mk.streamed_magnitude_thresholds(chunks(lambda t: None), **options),
                       mk.magnitude_thresholds(bases, experts, density=0.2, trim_scope="model", backend=backend))


@pytest.mark.parametrize("backend,device", EVERY)
@pytest.mark.parametrize("scope", ["tensor", "model"])
def test_thresholds_at_density_one_are_used_as_given(backend, device, scope):
    # a pipeline with a configurable density passes magnitude_thresholds(density=ρ) on at ρ = 1.0 too
    bases, experts = _stream_case(device)
    weights = [0.3, 0.7, 1.1]
    for drop_rate in (0.0, 0.4):  # TIES and DARE-TIES
        kwargs = dict(trim_scope=scope, elect_sign=True, drop_rate=drop_rate, seed=1, backend=backend)
        at_one = mk.magnitude_thresholds(bases, experts, density=1.0, trim_scope=scope, drop_rate=drop_rate, seed=1,
                                         backend=backend)
        given = mk.merge_task_vectors(bases, experts, weights, density=1.0, thresholds=at_one, **kwargs)
        untrimmed = mk.merge_task_vectors(bases, experts, weights, density=1.0, **kwargs)
        for a, b in zip(given, untrimmed):  # they keep every non-zero entry: the merge without them
            assert torch.equal(a, b)
        # others trim as they say: never dropped silently (density=1.0 used to ignore them)
        sparse = mk.magnitude_thresholds(bases, experts, density=0.3, trim_scope=scope, drop_rate=drop_rate, seed=1,
                                         backend=backend)
        given = mk.merge_task_vectors(bases, experts, weights, density=1.0, thresholds=sparse, **kwargs)
        trimmed = mk.merge_task_vectors(bases, experts, weights, density=0.3, **kwargs)
        for a, b in zip(given, trimmed):
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match="thresholds"):  # density None asks for no trim
        mk.merge_task_vectors(bases, experts, weights, thresholds=sparse, elect_sign=True, trim_scope=scope,
                              backend=backend)


@pytest.mark.skipif(not any(p.values[0] == "triton" for p in FAST if p.values[1] == "cpu"),
                    reason="triton not available")
def test_triton_launches_on_the_tensors_device(monkeypatch):
    from merging_kernels.ops import task_vectors

    launched = guard_launches(monkeypatch, task_vectors, ["_tv_histogram_kernel", "_tv_apply_kernel"])
    bases, experts = make_case([(33, 5), (7,)], 3)
    mk.merge_task_vectors(bases, experts, [1.0] * 3, density=0.5, elect_sign=True, backend="triton")
    assert len(launched) == 4 + 1 and all(d == bases[0].device for d in launched)  # 4 radix passes, 1 apply


@pytest.mark.gpu
def test_triton_threshold_selection_queues_without_a_host_sync():
    # the 4 radix passes each copy a pointer table to the device: pinned and queued, the host never waits on
    # the stream between passes (a pageable copy would drain it first)
    bases, experts = make_case([(33, 5), (2049,)], 3, device="cuda")
    expected = mk.magnitude_thresholds(bases, experts, density=0.5, backend="triton")  # compiles outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        thresholds = mk.magnitude_thresholds(bases, experts, density=0.5, backend="triton")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(thresholds, expected)
    assert torch.equal(thresholds, mk.magnitude_thresholds(bases, experts, density=0.5, backend="torch"))


@pytest.mark.gpu
def test_triton_merge_on_a_device_other_than_the_current_one():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    bases, experts = make_case([(33, 5), (2049,)], 3, device="cuda:1")
    with torch.cuda.device(0):
        merged = mk.merge_task_vectors(bases, experts, [0.3, 0.7, 1.1], density=0.5, elect_sign=True,
                                       backend="triton")
    expected = mk.merge_task_vectors(bases, experts, [0.3, 0.7, 1.1], density=0.5, elect_sign=True, backend="torch")
    assert all(m.device == bases[0].device for m in merged)
    assert_outputs_close(merged, expected, torch.float32)


@pytest.mark.gpu
def test_ties_disjoint_mean_divides_correctly_rounded_like_torch():
    # Σ w d / Σ w with inexact quotients: a plain fp32 "/" compiles to div.full (up to 2 ulp off); the kernel
    # uses div_rn. The interpreter maps both alike, so only a GPU run can tell them apart. Per entry one
    # random task is slightly negative and the other two positive: the elected sign is + and at most two
    # non-zero terms enter each sum, so any summation order rounds alike and only the division can differ.
    g = torch.Generator().manual_seed(11)
    n = 1 << 16
    deltas = torch.rand(3, n, generator=g) + 0.1
    negative = torch.randint(0, 3, (n,), generator=g)
    deltas[negative, torch.arange(n)] = -0.05 * torch.rand(n, generator=g) - 0.001
    bases, experts = [torch.zeros(n, device="cuda")], [[d.cuda()] for d in deltas]  # θ = m: no rounding after
    for density in (None, 0.5):
        kwargs = dict(density=density, elect_sign=True, normalize=True)
        merged = mk.merge_task_vectors(bases, experts, [0.3, 0.7, 1.1], backend="triton", **kwargs)[0]
        expected = mk.merge_task_vectors(bases, experts, [0.3, 0.7, 1.1], backend="torch", **kwargs)[0]
        assert merged.dtype == torch.float32 and torch.equal(merged, expected)
