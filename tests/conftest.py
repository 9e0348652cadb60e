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
    markexpr = config.getoption("markexpr") or ""
    if "gpu" in markexpr and "not gpu" not in markexpr:  # a GPU run on a machine without one tests nothing
        raise pytest.UsageError(f"-m {markexpr!r} selects the GPU tests, but torch.cuda.is_available() is False "
                                f"(torch {torch.__version__}, CUDA build {torch.version.cuda})")
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
