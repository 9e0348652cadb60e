"""Philox4x32-10: known answers, and the DARE keep rule."""

import pytest
import torch

import merging_kernels as mk
from merging_kernels._native import native_module

from merging_kernels.ops.philox import UNIFORM_BITS, dare_keep_mask_torch, drop_threshold, philox4x32_10, tensor_key

from helpers import TRITON_DEVICES, skip_unless_triton_runs_on


def _words(c, k):
    return [int(w) for w in philox4x32_10(*(torch.tensor([x]) for x in c), *k)]


KNOWN_ANSWERS = [  # Random123's known-answer vectors for philox4x32_10
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", KNOWN_ANSWERS)
def test_philox_known_answers(counter, key, expected):
    assert _words(counter, key) == list(expected)
    if mk.build_info()["available"]:  # the C++/CUDA header behind the native kernels
        assert list(native_module().philox4x32_10(*counter, *key)) == list(expected)


try:
    import triton
    import triton.language as tl

    from merging_kernels.ops.philox import philox4x32_10_triton
except ImportError:
    triton = None

if triton is not None:
    @triton.jit
    def _philox_words_kernel(counter_ptr, key_ptr, out_ptr):
        """out[0..3] = philox4x32_10_triton(counter[0..3], key[0..1]); uint32 values held in int64."""
        # written out: the compiler takes no list comprehensions (the interpreter would)
        c0 = tl.load(counter_ptr).to(tl.uint32)
        c1 = tl.load(counter_ptr + 1).to(tl.uint32)
        c2 = tl.load(counter_ptr + 2).to(tl.uint32)
        c3 = tl.load(counter_ptr + 3).to(tl.uint32)
        k0 = tl.load(key_ptr).to(tl.uint32)
        k1 = tl.load(key_ptr + 1).to(tl.uint32)
        w0, w1, w2, w3 = philox4x32_10_triton(c0, c1, c2, c3, k0, k1)
        tl.store(out_ptr, w0.to(tl.int64))
        tl.store(out_ptr + 1, w1.to(tl.int64))
        tl.store(out_ptr + 2, w2.to(tl.int64))
        tl.store(out_ptr + 3, w3.to(tl.int64))


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("counter,key,expected", KNOWN_ANSWERS)
def test_triton_philox_known_answers(device, counter, key, expected):
    # the generator inside the Triton DARE kernels, on its own: wrap-around and umulhi with operands >= 2**31
    skip_unless_triton_runs_on(device)
    out = torch.full((4,), -1, dtype=torch.int64, device=device)
    _philox_words_kernel[(1,)](torch.tensor(counter, dtype=torch.int64, device=device),
                               torch.tensor(key, dtype=torch.int64, device=device), out)
    assert out.cpu().tolist() == list(expected)


def test_drop_threshold_and_mask_edges():
    assert drop_threshold(0.0) == 0 and drop_threshold(0.5) == 1 << (UNIFORM_BITS - 1)
    assert dare_keep_mask_torch(1000, seed=1, tensor_key=2, task=0, p=0.0).all()
    assert dare_keep_mask_torch(0, seed=1, tensor_key=2, task=0, p=0.5).numel() == 0
    a = dare_keep_mask_torch(1000, seed=1, tensor_key=2, task=0, p=0.5)
    assert not torch.equal(a, dare_keep_mask_torch(1000, seed=1, tensor_key=2, task=1, p=0.5))
    assert not torch.equal(a, dare_keep_mask_torch(1000, seed=1 + 2**32, tensor_key=2, task=0, p=0.5))
    assert tensor_key("layer.0.weight") == tensor_key("layer.0.weight") != tensor_key("layer.1.weight")
