"""The greedy zip op: the fast path against the O(n³) reference, ties included."""

import numpy as np
import pytest
import torch

from merging_kernels.ops.zip_matching import greedy_zip, greedy_zip_torch


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
