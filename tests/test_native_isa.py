"""The native CPU kernels are compiled for several instruction sets; each one this CPU runs must agree."""

import os
import subprocess
import sys

import pytest

import merging_kernels as mk

SCRIPT = r"""
import torch, merging_kernels as mk
from merging_kernels._native import native_module
g = torch.Generator().manual_seed(0)
shapes = [(0,), (1,), (37,), (1000, 3), (4099,)]
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    bases = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    experts = [[(b.float() + 0.1 * torch.randn(b.shape, generator=g)).to(dtype) for b in bases] for _ in range(3)]
    mask = torch.full((45, 45), float("-inf")).triu(1).to(dtype)  # kept by every expert: merged to itself
    bases.append(mask)
    for task in experts:
        task.append(mask.clone())
    for kwargs in ({}, dict(density=0.3, elect_sign=True), dict(drop_rate=0.5, seed=2**40 + 1, elect_sign=True),
                   dict(density=0.2, trim_scope="model", elect_sign=True, normalize=False, out_dtype=torch.float16)):
        ref = mk.merge_task_vectors(bases, experts, [0.5, 1.0, -0.25], backend="torch", **kwargs)
        out = mk.merge_task_vectors(bases, experts, [0.5, 1.0, -0.25], backend="native", **kwargs)
        assert torch.equal(out[-1], mask)
        for o, r in zip(out, ref):
            tol = 1e-6 if o.dtype == torch.float32 else torch.finfo(o.dtype).eps
            torch.testing.assert_close(o.float(), r.float(), rtol=tol, atol=tol)
# outputs beyond a 16-bit dtype's range, counted in the apply pass: on the limit counts, just below does not
for out_dtype, bits in ((torch.float16, 0x477FF000), (torch.bfloat16, 0x7F7F8000)):  # 65520; bf16's halfway
    limit = torch.tensor(bits, dtype=torch.int32).view(torch.float32)
    below = torch.nextafter(limit, torch.zeros(()))
    base, expert = torch.zeros(37), torch.zeros(37)
    expert[[0, 17, 36]], expert[[5, 30]] = limit, below
    base[8] = expert[8] = -1e9  # a mask float16 turns into -inf: not the merge's
    try:
        mk.merge_task_vectors([base], [[expert]], [1.0], out_dtype=out_dtype, backend="native")
        raise AssertionError("no MergeOverflowError")
    except mk.MergeOverflowError as exc:
        assert "(3 entries" in str(exc), exc
# where the base rounds to -inf in float16 (a -1e9 mask), a merge to +inf (or NaN) is counted, the same -inf is
# not; in full tiles and in the last partial one
base = torch.full((37,), -1e9)
expert = base.clone()
expert[[0, 20, 36]] = 1e9  # -> +inf
expert[[3, 33]] = -2e9  # -> -inf, as the base
try:
    mk.merge_task_vectors([base], [[expert]], [1.0], out_dtype=torch.float16, backend="native")
    raise AssertionError("no MergeOverflowError")
except mk.MergeOverflowError as exc:
    assert "(3 entries" in str(exc), exc
print(native_module().task_vectors_isa())
"""


@pytest.mark.skipif(not mk.build_info()["available"], reason="_C not built")
@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
def test_each_instruction_set_variant_matches_the_reference(isa):
    env = dict(os.environ, MERGING_KERNELS_CPU_ISA=isa)
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    chosen = done.stdout.strip().splitlines()[-1]
    if chosen != isa:
        pytest.skip(f"this CPU runs at most {chosen}")
