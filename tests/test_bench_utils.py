"""benchmarks/bench_utils.py on the CPU: the input helpers (drawn on the CPU, so that a failed CUDA graph capture cannot
break them) and bench's graph-capture retry / eager fallback, with the CUDA calls it makes replaced by fakes."""
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_utils  # noqa: E402

STATS = {"ms": 1.0, "ms_p20": 0.9, "ms_p80": 1.1}


def test_randn_deterministic_shape_dtype_grad():
    cpu_state = torch.random.get_rng_state()
    bench_utils.manual_seed(3)
    a = bench_utils.randn(5, 7, device="cpu", dtype=torch.bfloat16, requires_grad=True)
    a2 = bench_utils.randn(5, 7, device="cpu", dtype=torch.bfloat16)
    bench_utils.manual_seed(3)
    b = bench_utils.randn(5, 7, device="cpu", dtype=torch.bfloat16, requires_grad=True)
    assert a.shape == (5, 7) and a.dtype == torch.bfloat16 and a.device.type == "cpu"
    assert a.requires_grad and a.is_leaf and not a2.requires_grad
    assert torch.equal(a, b)                      # same seed, same draws
    assert not torch.equal(a, a2)                 # the sequence moves on between calls
    assert 0.5 < a.float().std().item() < 1.5     # standard normal
    assert torch.equal(torch.random.get_rng_state(), cpu_state)  # its own generator, not torch's global one
    assert bench_utils.randn(4, dtype=torch.float16, device="cpu").dtype == torch.float16
    assert bench_utils.randn(2, 3, 4, device="cpu").dtype == torch.float32


def test_randn_like_keeps_layout():
    t = torch.empty(6, 4, dtype=torch.float16).t()   # non-contiguous, like a transposed HF rope output
    bench_utils.manual_seed(0)
    g = bench_utils.randn_like(t)
    assert g.shape == t.shape and g.dtype == t.dtype and g.stride() == t.stride() and not g.requires_grad
    bench_utils.manual_seed(0)
    assert torch.equal(g, bench_utils.randn_like(t)) and bench_utils.randn_like(t, requires_grad=True).requires_grad
    assert g.isfinite().all() and g.abs().sum() > 0


class _FakeEvent:
    """torch.cuda.Event on the CPU: elapsed_time from perf_counter."""

    def __init__(self, enable_timing=False):
        self.t = None

    def record(self):
        self.t = time.perf_counter()

    def elapsed_time(self, end):
        return (end.t - self.t) * 1e3


@pytest.fixture
def fake_cuda(monkeypatch):
    """Make bench take its CUDA path without touching a GPU: is_available True, synchronize a no-op, fake events."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)


def _flaky_graph(monkeypatch, failures):
    """Replace bench_graph by one that raises the exceptions in ``failures`` first, then returns STATS."""
    calls = []

    def fake(fn, warmup=3, rep=10, flush=True):
        calls.append(1)
        if len(calls) <= len(failures):
            raise failures[len(calls) - 1]
        return dict(STATS)

    monkeypatch.setattr(bench_utils, "bench_graph", fake)
    return calls


def test_bench_graph_retry_succeeds(monkeypatch, fake_cuda, capsys):
    calls = _flaky_graph(monkeypatch, [RuntimeError("capture invalidated")])
    ran = []
    t = bench_utils.bench(lambda: ran.append(1), warmup=2, rep=3, timing="graph")
    assert t == dict(STATS, timing="graph (2nd capture)")
    assert len(calls) == 2 and not ran            # no eager fallback
    assert "capture invalidated" in capsys.readouterr().err   # the message is kept somewhere


def test_bench_graph_first_capture(monkeypatch, fake_cuda):
    calls = _flaky_graph(monkeypatch, [])
    assert bench_utils.bench(lambda: None, timing="graph") == dict(STATS, timing="graph") and len(calls) == 1


def test_bench_graph_falls_back_to_eager(monkeypatch, fake_cuda):
    calls = _flaky_graph(monkeypatch, [RuntimeError("a"), RuntimeError("b"), RuntimeError("c")])
    ran = []
    t = bench_utils.bench(lambda: ran.append(1), warmup=2, rep=3, timing="graph")
    assert len(calls) == 2                        # one retry only
    assert len(ran) == 2 + 3                      # warm-up + timed runs, eagerly
    assert t["timing"] == "eager (graph capture failed: RuntimeError)"
    assert t["ms"] >= 0 and t["ms_p20"] <= t["ms"] <= t["ms_p80"]


def test_graph_with_retry_names_both_errors(monkeypatch, fake_cuda):
    _flaky_graph(monkeypatch, [ValueError("x"), RuntimeError("y")])
    stats, timing = bench_utils._graph_with_retry(lambda: None, 1, 1)
    assert stats is None and timing == "eager (graph capture failed: ValueError, then RuntimeError)"


def test_ratios_compare_retried_graph_rows():
    rows = [bench_utils.Row(bench="b", provider="llava_fast", shape="s", dtype="bf16", metric=2.0,
                            timing="graph (2nd capture)"),
            bench_utils.Row(bench="b", provider="hf", shape="s", dtype="bf16", metric=1.0, timing="graph"),
            bench_utils.Row(bench="b", provider="eager_one", shape="s", dtype="bf16", metric=1.0,
                            timing="eager (graph capture failed: AcceleratorError)")]
    bench_utils.add_ratios(rows)
    assert rows[0].ratio == {"hf": 2.0}


def test_bench_loop_times_calls_back_to_back(fake_cuda):
    """timing="loop": each sample is `inner` consecutive calls between two events, divided by `inner` (sized from one
    timed call so that a sample lasts about min_ms)."""
    ran = []

    def fn():
        ran.append(1)
        time.sleep(0.002)

    t = bench_utils.bench(fn, warmup=1, rep=3, timing="loop")
    assert t["timing"] == "loop"
    inner = (len(ran) - 2) // 3                   # warm-up + the sizing call, then 3 samples of `inner` calls
    assert len(ran) == 2 + 3 * inner and 2 <= inner <= 50
    assert 1.5 <= t["ms"] <= 20                  # per call, not per sample
    with pytest.raises(ValueError, match="timing must be one of"):
        bench_utils.bench(fn, timing="loops")
