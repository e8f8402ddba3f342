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
CPU_TEST_THREADS = 2   # the CI machine's core count


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _available_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 64.0


@pytest.hookimpl(optionalhook=True)   # pytest without pytest-xdist would refuse an unknown hook
def pytest_xdist_auto_num_workers(config):
    """``pytest -n auto`` (the README's test command): one pytest-xdist worker per usable core, at most 8 and one per
    3 GiB of available memory (a worker of the CPU suite peaks near 1.5 GiB: session 37). More than 8 gain little:
    the longest test alone takes ~50 s. ``PYTEST_XDIST_AUTO_NUM_WORKERS=N`` sets the number, as with xdist's own
    rule (which this replaces: it would start one worker per core however many cores there are)."""
    env = os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, min(_usable_cores(), 8, int(_available_gib() // 3)))


if not HAS_CUDA:
    # CPU runs compute with the CI machine's 2 threads, whatever the machine: the same summation orders as CI, so a
    # failure reproduces anywhere (a bf16 flash-rule test of a 3-ULP gradient depends on them: docs/testing.md), and
    # `pytest -n auto` runs no 8 workers x 16 threads
    torch.set_num_threads(CPU_TEST_THREADS)


def _interpreter_patches_triton_language_once_per_launch() -> None:
    """Speed of the interpreter tests, nothing else (docs/testing.md; tests/test_interpreter.py); three costs of
    Triton 3.x's interpreter that change no result. First: it patches the ``triton.language`` modules a kernel's
    globals name when it launches, and again at every call of a ``@triton.jit`` function inside it
    (``InterpretedFunction.__call__``: ours and ``tl.max``, ``tl.sum``...), ~2.5 ms of ``inspect.getmembers`` per
    call. Our kernels call such functions per row and per block: a cross-entropy test spent a third of its time
    there. While a launch runs, a call whose modules (``tl``, ``tl.core``) are already patched skips the patch; any
    other call patches as before. Then ``_get_np_dtype`` and the overflow check, below. A Triton without these names
    keeps its own behaviour."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter as interp
    except Exception:   # no Triton: nothing to speed up
        return
    orig = getattr(interp, "_patch_lang", None)
    if orig is None or getattr(orig, "_llava_fast_once", False):
        return
    import inspect

    patched: list = []   # the modules patched since the running launch began (empty: no launch running; a launch
    #                      always patches at least one: Triton asserts that a kernel's globals name the language)

    class _Nothing:
        def restore(self):
            pass

    langs_of: dict = {}   # function -> the language modules its globals name

    def patch_lang(fn):
        langs = langs_of.get(fn)
        if langs is None:
            langs = langs_of[fn] = [v for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core)]
        inside = bool(patched)
        if inside and all(any(m is p for p in patched) for m in langs):
            return _Nothing()
        scope = orig(fn)
        if scope is None:   # Triton 3.3: nothing to restore; its own behaviour for every call
            return scope
        patched.extend(langs)
        if inside:          # a call inside a launch: Triton never restores it (its own behaviour)
            return scope
        restore = scope.restore

        def restore_launch():
            patched.clear()
            restore()
        scope.restore = restore_launch
        return scope

    patch_lang._llava_fast_once = True
    interp._patch_lang = patch_lang

    # _get_np_dtype builds a 19-entry dict of dtypes at every call (~13% of an interpreted kernel's time): the same
    # answers, each scalar type's looked up once
    get_np = getattr(interp, "_get_np_dtype", None)
    if get_np is not None and hasattr(tl, "pointer_type") and hasattr(tl, "block_type"):
        np_of: dict = {}
        ptr, block = tl.pointer_type, tl.block_type

        def get_np_dtype(tt_dtype):
            if isinstance(tt_dtype, block):
                tt_dtype = tt_dtype.element_ty
            if isinstance(tt_dtype, ptr):
                return get_np(tt_dtype)
            got = np_of.get(tt_dtype)
            if got is None:
                got = np_of[tt_dtype] = get_np(tt_dtype)
            return got
        interp._get_np_dtype = get_np_dtype

    # Every int32 +, - and * in a kernel runs Triton's overflow check (sanitize_overflow): eight more interpreted ops
    # that end in a device_assert, which does nothing unless the options say debug (a GPU build checks only with
    # debug=True too): ~40% of an attention test's time for nothing. Without debug the check is skipped; with it,
    # Triton's runs.
    sem = getattr(interp, "interpreter_semantic", None)
    orig_check = getattr(sem, "binary_op_sanitize_overflow_impl", None)
    if orig_check is not None and hasattr(sem.builder, "options"):
        def overflow_check(lhs, rhs, binary_op):
            if getattr(sem.builder.options, "debug", True):
                return orig_check(lhs, rhs, binary_op)
        sem.binary_op_sanitize_overflow_impl = overflow_check


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_patches_triton_language_once_per_launch()


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
