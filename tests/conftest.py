"""Shared test set-up: backends to test, the gpu marker, the Triton interpreter on CPU."""

import os

import pytest
import torch

# Without a GPU the Triton kernels run in the CPU interpreter. The switch must be
# set before triton decorates any kernel, i.e. before merging_kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")



def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
