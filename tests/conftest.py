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


@pytest.hookimpl(trylast=True)   # after -m / -k deselection: the order below is that of the tests that run
def pytest_collection_modifyitems(config, items):
    workers = os.environ.get("LLAVA_FAST_XDIST_WORKERS", "")
    if workers.isdigit() and int(workers) > 1:
        # benchmarks/device_check.sh: the longest cuda tests first, each on its own pytest-xdist worker
        # (tests/utils.long_first_order); every worker computes the same order, as xdist requires
        from utils import long_first_order

        items[:] = [items[i] for i in long_first_order([it.name for it in items], int(workers))]
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run benchmarks/device_check.sh on one)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed(request):
    torch.manual_seed(0)
    yield
    if HAS_CUDA and "cuda" in request.keywords:
        _end_process_on_cuda_fault(request.node.nodeid)


def _end_process_on_cuda_fault(nodeid: str) -> None:
    """A kernel fault (illegal address, device assert) poisons the CUDA context of the whole process: every later
    test in it would error at setup, hiding which test faulted (the first GPU run lost ~40 tests that way). After
    each cuda test, synchronize; on a fault, say which test it was and end the process. Under pytest-xdist the
    worker is replaced and the test is reported as crashed; without xdist the run stops here."""
    try:
        torch.cuda.synchronize()
    except Exception as e:  # torch.AcceleratorError / RuntimeError: CUDA error ...
        import sys

        print(f"\nCUDA fault after {nodeid}: {str(e).splitlines()[0]}; ending this test process", file=sys.stderr,
              flush=True)
        os._exit(3)


@pytest.fixture
def device():
    return "cuda" if HAS_CUDA else "cpu"


@pytest.fixture
def forced():
    """``forced("rms_norm", ...)`` forces those ops' Triton kernels (the interpreter on the CPU) for the test; every op
    goes back to "auto" afterwards."""
    import llava_fast

    def force(*ops):
        for op in ops:
            llava_fast.set_backend(op, "triton")
    yield force
    llava_fast.set_backend("all", "auto")
