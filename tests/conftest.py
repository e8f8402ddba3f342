"""Shared test setup.

On a machine without a CUDA GPU the Triton kernels run under the CPU interpreter: TRITON_INTERPRET=1 is set here,
before any test module imports a kernel (Triton reads it when a kernel is decorated). Tests that need a GPU carry
the ``cuda`` marker and are skipped on CPU-only machines; nothing queries the GPU at collection time.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run benchmarks/device_check.sh on one)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def device():
    return "cuda" if HAS_CUDA else "cpu"
