"""Philox4x32-10: known answers, and the DARE keep rule."""

import pytest
import torch

import merging_kernels as mk
from merging_kernels._native import native_module

from merging_kernels.ops.philox import UNIFORM_BITS, dare_keep_mask_torch, drop_threshold, philox4x32_10, tensor_key


def _words(c, k):
    return [int(w) for w in philox4x32_10(*(torch.tensor([x]) for x in c), *k)]


@pytest.mark.parametrize(
    "counter,key,expected",
    [  # Random123's known-answer vectors for philox4x32_10
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ],
)
def test_philox_known_answers(counter, key, expected):
    assert _words(counter, key) == list(expected)
    if mk.build_info()["available"]:  # the C++/CUDA header behind the native kernels
        assert list(native_module().philox4x32_10(*counter, *key)) == list(expected)


def test_drop_threshold_and_mask_edges():
    assert drop_threshold(0.0) == 0 and drop_threshold(0.5) == 1 << (UNIFORM_BITS - 1)
    assert dare_keep_mask_torch(1000, seed=1, tensor_key=2, task=0, p=0.0).all()
    assert dare_keep_mask_torch(0, seed=1, tensor_key=2, task=0, p=0.5).numel() == 0
    a = dare_keep_mask_torch(1000, seed=1, tensor_key=2, task=0, p=0.5)
    assert not torch.equal(a, dare_keep_mask_torch(1000, seed=1, tensor_key=2, task=1, p=0.5))
    assert not torch.equal(a, dare_keep_mask_torch(1000, seed=1 + 2**32, tensor_key=2, task=0, p=0.5))
    assert tensor_key("layer.0.weight") == tensor_key("layer.0.weight") != tensor_key("layer.1.weight")
