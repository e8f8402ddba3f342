"""The optional compiled extension llava_fast._C: it imports, env() reports it, and without it every op still works
through its Python/PyTorch path while CUDA-only entry points explain how to build it."""
import importlib
import sys

import pytest
import torch

import llava_fast
from llava_fast import _ext
from llava_fast.ops import anyres

built = pytest.mark.skipif(not _ext.HAS_EXT, reason=f"llava_fast._C not built ({_ext.EXT_ERROR}); "
                                                    f"pip install --no-build-isolation -e .")


@built
def test_extension_imports_and_has_functions():
    C = importlib.import_module("llava_fast._C")
    for name in ("select_best_resolution", "normalize_u8_cpu", "encode_tile_counts", "encode_tiles_cpu",
                 "resize_bicubic_aa_u8_cpu"):
        assert hasattr(C, name), name
    assert isinstance(C.with_cuda, bool)
    assert C.select_best_resolution(500, 1000, [(336, 672), (672, 336)]) == (336, 672)


@built
def test_env_reports_extension():
    info = llava_fast.env()
    assert info["ext"].startswith("yes"), info["ext"]
    assert ("CUDA" in info["ext"]) == _ext.HAS_CUDA_EXT


@pytest.fixture
def no_ext(monkeypatch):
    """Simulate a missing extension (as after LLAVA_FAST_SKIP_CUDA_BUILD=1)."""
    monkeypatch.setattr(_ext, "_C", None)
    monkeypatch.setattr(_ext, "HAS_EXT", False)
    monkeypatch.setattr(_ext, "HAS_CUDA_EXT", False)
    monkeypatch.setattr(_ext, "EXT_ERROR", "ModuleNotFoundError: No module named 'llava_fast._C' (simulated)")
    yield


def test_env_without_extension(no_ext):
    info = llava_fast.env()
    assert info["ext"].startswith("no (") and "reference path" in info["ext"]


def test_python_paths_without_extension(no_ext):
    cfg = anyres.ImageProcessorConfig.for_variant("llava_next")
    assert anyres.select_best_resolution((500, 1000), cfg.image_grid_pinpoints) == (336, 672)
    assert cfg.num_image_tokens((500, 1000)) == 1752
    x = torch.randint(0, 256, (120, 250, 3), dtype=torch.uint8)
    ref = anyres.preprocess_images([x], cfg)
    got = anyres.encode_tiles([x], cfg, dtype=torch.float32)  # falls back to the reference
    assert got["num_tiles"] == ref["num_tiles"] == [3]
    assert torch.equal(got["pixel_values"], ref["pixel_values"])


def test_cuda_only_calls_explain_how_to_build(no_ext):
    with pytest.raises(RuntimeError, match=r"pip install --no-build-isolation -e \."):
        _ext.require_ext("normalize_u8_cuda", cuda=True)
    with pytest.raises(RuntimeError, match="not available"):
        _ext.require_ext("encode_tiles")


@built
def test_cpu_only_build_message(monkeypatch):
    monkeypatch.setattr(_ext, "HAS_CUDA_EXT", False)
    with pytest.raises(RuntimeError, match="built without nvcc"):
        _ext.require_ext("normalize_u8_cuda", cuda=True)


def test_tma_allocator_is_set_in_every_thread(monkeypatch):
    """The autograd engine runs backward kernels in its own thread, and triton's allocator is a ContextVar: a
    process-wide "already set" flag left the TMA backward without one (all TMA cuda tests failed on an H100)."""
    import threading

    from triton.runtime import _allocation

    monkeypatch.setattr(_ext, "interpreting", lambda: False)
    if not hasattr(_allocation._allocator, "get"):
        # Triton 3.3 (torch 2.7): a module global, no per-thread context; an allocator the caller set is kept
        monkeypatch.setattr(_allocation, "_allocator", _allocation.NullAllocator())
        _ext.ensure_tma_allocator()
        assert _allocation._allocator is _ext._tma_scratch
        mine = lambda size, alignment, stream: None   # noqa: E731
        monkeypatch.setattr(_allocation, "_allocator", mine)
        _ext.ensure_tma_allocator()
        assert _allocation._allocator is mine
        return
    before = _allocation._allocator.get()
    try:
        _allocation._allocator.set(_allocation._NULL_ALLOCATOR)
        _ext.ensure_tma_allocator()
        assert _allocation._allocator.get() is _ext._tma_scratch
        seen = []

        def worker():  # a fresh thread starts with triton's null allocator
            seen.append(_allocation._allocator.get())
            _ext.ensure_tma_allocator()
            seen.append(_allocation._allocator.get())

        thread = threading.Thread(target=worker)
        thread.start()
        thread.join()
        assert isinstance(seen[0], _allocation.NullAllocator)
        assert seen[1] is _ext._tma_scratch

        def mine(size, alignment, stream):  # an allocator the caller set is kept
            raise AssertionError("not called")

        _allocation._allocator.set(mine)
        _ext.ensure_tma_allocator()
        assert _allocation._allocator.get() is mine
    finally:
        _allocation._allocator.set(before)


def test_eager_op_calls_the_function_in_eager_mode_and_the_op_when_tracing():
    """_ext.custom_op: the registered op (schema, fake) while something traces, the plain function otherwise (the
    dispatcher round trip is host time every layer pays); same results either way."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    calls = []

    @_ext.custom_op("llava_fast_test::scale2", mutates_args=())
    def scale2(x: torch.Tensor) -> torch.Tensor:
        calls.append(type(x).__name__)
        if isinstance(x, FakeTensor):  # what a kernel launch would do with a tensor that has no data
            raise RuntimeError("real implementation called on a fake tensor")
        return x * 2

    @scale2.register_fake
    def _(x):
        return torch.empty_like(x)

    x = torch.arange(4.0)
    seen = []
    orig_op = scale2.op
    scale2.op = lambda *a: (seen.append("op"), orig_op(*a))[1]  # count dispatcher calls
    try:
        assert torch.equal(scale2(x), x * 2) and seen == []          # eager: the function, no dispatcher
        with FakeTensorMode() as mode:
            y = scale2(mode.from_tensor(x))                           # fake tensors: the op and its fake
        assert isinstance(y, FakeTensor) and seen == ["op"]
        assert torch.equal(torch.compile(lambda t: scale2(t) + 1, backend="aot_eager", fullgraph=True)(x), x * 2 + 1)
    finally:
        scale2.op = orig_op
    assert torch.equal(torch.ops.llava_fast_test.scale2(x), x * 2)


class _FakeDriver:
    """cuCtxGetCurrent / cuDeviceGet / cuDevicePrimaryCtxRetain / cuCtxSetCurrent of a driver whose calling thread
    has ``current`` as its context (0: none)."""

    def __init__(self, current: int, fail: str | None = None):
        self.current, self.fail, self.calls = current, fail, []

    def _rc(self, name):
        self.calls.append(name)
        return 1 if self.fail == name else 0

    def cuCtxGetCurrent(self, ptr):
        ptr._obj.value = self.current or None
        return self._rc("cuCtxGetCurrent")

    def cuDeviceGet(self, ptr, index):
        ptr._obj.value = 100 + index
        return self._rc("cuDeviceGet")

    def cuDevicePrimaryCtxRetain(self, ptr, dev):
        ptr._obj.value = 5000 + dev.value
        return self._rc("cuDevicePrimaryCtxRetain")

    def cuCtxSetCurrent(self, ctx):
        self.current = ctx.value
        return self._rc("cuCtxSetCurrent")


def test_ensure_cuda_context_binds_the_primary_context_only_when_none_is_current():
    """A thread without a current context (autograd's backward thread before any runtime call) gets the device's
    primary context before a CUTLASS call; a thread with one is left alone; a driver error is raised, not ignored."""
    from llava_fast import _ext

    d = _FakeDriver(current=0)
    _ext.ensure_cuda_context(1, libcuda=d)
    assert d.current == 5101 and d.calls == ["cuCtxGetCurrent", "cuDeviceGet", "cuDevicePrimaryCtxRetain",
                                             "cuCtxSetCurrent"]
    d = _FakeDriver(current=77)
    _ext.ensure_cuda_context(0, libcuda=d)
    assert d.current == 77 and d.calls == ["cuCtxGetCurrent"]
    d = _FakeDriver(current=0, fail="cuDevicePrimaryCtxRetain")
    with pytest.raises(RuntimeError, match="device 0's primary context"):
        _ext.ensure_cuda_context(0, libcuda=d)
    assert d.current == 0


def test_device_guard_switches_only_to_another_cuda_device(monkeypatch):
    """No guard (a shared no-op context) for CPU tensors and for the current CUDA device; torch.cuda.device for
    another one (faked: this machine has no GPU)."""
    from llava_fast import _ext

    entered = []

    class FakeGuard:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch._C, "_cuda_getDevice", lambda: 1, raising=False)
    monkeypatch.setattr(torch.cuda, "device", FakeGuard)
    for dev in (torch.device("cpu"), torch.device("cuda"), torch.device("cuda", 1)):
        g = _ext.device_guard(dev)
        assert g is _ext.device_guard(torch.device("cpu")) and not isinstance(g, FakeGuard), dev
        with g:
            pass
    with _ext.device_guard(torch.device("cuda", 0)):
        pass
    assert entered == [torch.device("cuda", 0)]


def test_direct_launch_is_off_under_the_interpreter(monkeypatch):
    """Under TRITON_INTERPRET=1 (CI) _ext.launch is kernel[grid](...) itself; LLAVA_FAST_DIRECT_LAUNCH=0 turns the
    direct path off everywhere (read once per process: reset_direct_launch re-reads it)."""
    _ext.reset_direct_launch()
    try:
        assert _ext._direct_state() is False           # conftest sets TRITON_INTERPRET=1
        calls = []

        class K:
            def __getitem__(self, grid):
                return lambda *a, **k: calls.append((grid, a, k))
        _ext.launch(K(), (3,), 1, 2, X=4)
        assert calls == [((3,), (1, 2), {"X": 4, "enable_fp_fusion": True})]
    finally:
        _ext.reset_direct_launch()


def test_launches_keep_fp_fusion_on_unless_the_user_chose(monkeypatch):
    """Triton 3.9 warns at the first compile of a kernel launched without ``enable_fp_fusion`` and says 3.10 turns
    FMA contraction off by default; our kernels were tested and measured with it on. ``_ext.launch`` passes
    ``enable_fp_fusion=True`` unless TRITON_DEFAULT_FP_FUSION is set (the user's choice then rules) or the caller
    passed the option; the interpreter drops launch options, so the kernels run as before (an RMSNorm launch here
    reaches the interpreter's ``run`` with it)."""
    from triton.runtime.interpreter import GridExecutor, InterpretedFunction

    from llava_fast.ops import rms_norm as rn

    calls = []

    class K:
        def __getitem__(self, grid):
            return lambda *a, **k: calls.append(k)
    try:
        monkeypatch.delenv("TRITON_DEFAULT_FP_FUSION", raising=False)
        _ext.reset_direct_launch()
        _ext.launch(K(), (1,), X=1)
        _ext.launch(K(), (1,), X=1, enable_fp_fusion=False)
        monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "0")
        _ext.launch(K(), (1,), X=1)                     # read once per process: still on
        _ext.reset_direct_launch()
        _ext.launch(K(), (1,), X=1)
        assert calls == [{"X": 1, "enable_fp_fusion": True}, {"X": 1, "enable_fp_fusion": False},
                         {"X": 1, "enable_fp_fusion": True}, {"X": 1}]
        monkeypatch.delenv("TRITON_DEFAULT_FP_FUSION")
        _ext.reset_direct_launch()
        assert isinstance(rn._rms_norm_fwd_kernel, InterpretedFunction)
        seen, call = [], GridExecutor.__call__   # what kernel[grid](...) runs under the interpreter (3.3 to 3.9)

        def record(self, *a, **k):
            seen.append(k.get("enable_fp_fusion"))
            return call(self, *a, **k)
        monkeypatch.setattr(GridExecutor, "__call__", record)
        x, w = torch.randn(3, 64), torch.randn(64)
        y = rn.rms_norm_fwd(x, w, 1e-6)[0]
        assert seen == [True]
        torch.testing.assert_close(y, rn.rms_norm_ref(x, w, 1e-6), rtol=1e-5, atol=1e-5)
    finally:
        _ext.reset_direct_launch()


def test_every_direct_kernel_launch_in_the_ops_passes_fp_fusion():
    """The launches that do not go through ``_ext.launch`` (autotuned kernels, interpreter-only paths, the loss)
    pass ``**_ext.fp_fusion_kwargs()`` themselves: every ``kernel[grid](...)`` call in ``llava_fast/ops``."""
    import ast
    from pathlib import Path

    missing, found = [], 0
    for path in sorted((Path(llava_fast.__file__).parent / "ops").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):
                found += 1
                if not any(k.arg is None and isinstance(k.value, ast.Call)
                           and getattr(k.value.func, "attr", "") == "fp_fusion_kwargs" for k in node.keywords):
                    missing.append(f"{path.name}:{node.lineno} {ast.unparse(node.func)[:60]}")
    assert found >= 8 and not missing, missing


@pytest.mark.cuda
def test_cuda_direct_launch_same_results_as_triton_path(monkeypatch):
    """On a GPU the direct path launches through the real launcher with no hook objects: the same outputs as
    Triton's own path, bit for bit, and it is taken (the kernel's direct cache fills)."""
    from llava_fast.ops import rms_norm as rn
    from llava_fast.ops.swiglu import swiglu_fwd

    x = torch.randn(37, 896, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(896, device="cuda", dtype=torch.bfloat16)
    outs = {}
    for mode in ("0", "1"):
        monkeypatch.setenv("LLAVA_FAST_DIRECT_LAUNCH", mode)
        _ext.reset_direct_launch()
        for _ in range(2):   # the first call of a specialisation compiles through Triton's path
            outs[mode] = (rn.rms_norm_fwd(x, w, 1e-6)[0], swiglu_fwd(x, x))
    _ext.reset_direct_launch()
    for a, b in zip(outs["0"], outs["1"]):
        assert torch.equal(a, b)
    assert rn._rms_norm_fwd_kernel.__dict__.get("_llava_fast_direct")


def test_triton_version_reads_release_dev_and_local_versions(monkeypatch):
    import triton

    from llava_fast import _ext

    for text, want in [("3.8.0", (3, 8)), ("3.9.0+git1a2b3c", (3, 9)), ("3.10.0.dev20261101", (3, 10)),
                       ("3.11rc1", (3, 11)), ("4", (4, 0))]:
        monkeypatch.setattr(triton, "__version__", text)
        assert _ext.triton_version() == want, text
    monkeypatch.setitem(sys.modules, "triton", None)   # import triton raises ImportError
    assert _ext.triton_version() == (0, 0)


def test_env_choice_values(monkeypatch):
    """_ext.env_choice: unset or empty means the default (a shell's ``NAME= cmd``), case and spaces are ignored, and
    anything else outside the choices is a ValueError that names the variable and the choices."""
    from llava_fast import _ext

    monkeypatch.delenv("LLAVA_FAST_TEST_CHOICE", raising=False)
    assert _ext.env_choice("LLAVA_FAST_TEST_CHOICE", ("a", "b"), "a") == "a"
    for raw, want in (("", "a"), ("  ", "a"), (" B ", "b"), ("b", "b")):
        monkeypatch.setenv("LLAVA_FAST_TEST_CHOICE", raw)
        assert _ext.env_choice("LLAVA_FAST_TEST_CHOICE", ("a", "b"), "a") == want, raw
    monkeypatch.setenv("LLAVA_FAST_TEST_CHOICE", "c")
    with pytest.raises(ValueError, match=r"LLAVA_FAST_TEST_CHOICE='c': must be one of \('a', 'b'\)"):
        _ext.env_choice("LLAVA_FAST_TEST_CHOICE", ("a", "b"), "a")


def test_getenv_follows_every_change_to_os_environ(monkeypatch):
    """_ext.getenv is os.environ.get, read at every call: set, changed, emptied, deleted, non-ASCII values, and a
    change made through os.environ directly as well as through monkeypatch."""
    import os

    from llava_fast import _ext

    name = "LLAVA_FAST_TEST_GETENV"
    monkeypatch.delenv(name, raising=False)
    assert _ext.getenv(name) is None and _ext.getenv(name, "d") == "d"
    for value in ("1", "", " x ", "grüße", "a=b;c"):
        monkeypatch.setenv(name, value)
        assert _ext.getenv(name) == os.environ.get(name) == value
        assert _ext.getenv(name, "d") == value
    os.environ[name] = "direct"
    assert _ext.getenv(name) == "direct"
    del os.environ[name]
    assert _ext.getenv(name, "gone") == "gone"
    assert _ext.interpreting() == (os.environ.get("TRITON_INTERPRET", "0") == "1")
