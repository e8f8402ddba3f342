"""tests/utils.long_first_order: device_check's cuda tests start with the longest ones, one per pytest-xdist worker;
and the test processes: the worker count of `pytest -n auto`, 2 torch threads on a CPU (tests/conftest.py)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from utils import LONG_CUDA_TESTS, long_first_order, xdist_first_chunk


def test_long_tests_head_their_own_workers_chunks():
    names = [f"t{i}" for i in range(100)]
    names[40], names[41], names[77] = "compile_next", "compile_ov", "sync"
    secs = {"compile_next": 193, "compile_ov": 42, "sync": 47}
    order = long_first_order(names, 4, secs)
    assert sorted(order) == list(range(100))                                  # a permutation
    c = xdist_first_chunk(100, 4)
    assert c == 6
    assert [names[order[j * c]] for j in range(3)] == ["compile_next", "sync", "compile_ov"]
    rest = [names[i] for i in order if names[i] not in secs]
    assert rest == [n for n in names if n not in secs]                         # the others keep their order
    assert long_first_order(names, 2, secs)[c * 0] == 40 and len(set(long_first_order(names, 2, secs))) == 100
    assert long_first_order(["a", "b", "c"], 4, {"c": 1}) == [2, 0, 1]       # fewer tests than 2 per worker
    assert long_first_order(names, 4, {}) == list(range(100))


def test_the_long_tests_exist():
    """Every name in LONG_CUDA_TESTS is a collected test (a renamed test would silently lose its place)."""
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "cuda", "tests/models",
                        "tests/ops/test_pack_features.py", "tests/train/test_trainer_cuda.py",
                        "tests/train/test_convergence.py"], cwd=root, capture_output=True, text=True,
                       env={**os.environ, "LLAVA_FAST_XDIST_WORKERS": "12"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    ids = [line.rsplit("::", 1)[-1] for line in r.stdout.splitlines() if "::" in line]
    for name in LONG_CUDA_TESTS:
        assert name in ids, name
    assert ids[0] == "test_torch_compile_packed_training_step[llava_next]", ids[:3]   # the longest first


def test_auto_workers_follow_cores_and_memory(monkeypatch, pytestconfig):
    """`pytest -n auto`: a worker per core, at most 8 and one per 3 GiB; PYTEST_XDIST_AUTO_NUM_WORKERS wins."""
    root = Path(__file__).resolve().parent / "conftest.py"
    conftest = next(p for p in pytestconfig.pluginmanager.get_plugins() if getattr(p, "__file__", None) == str(root))

    monkeypatch.delenv("PYTEST_XDIST_AUTO_NUM_WORKERS", raising=False)
    for cores, gib, want in ((2, 24.0, 2), (1, 24.0, 1), (64, 500.0, 8), (16, 7.0, 2), (4, 1.0, 1)):
        monkeypatch.setattr(conftest, "_usable_cores", lambda c=cores: c)
        monkeypatch.setattr(conftest, "_available_gib", lambda g=gib: g)
        assert conftest.pytest_xdist_auto_num_workers(None) == want, (cores, gib)
    monkeypatch.setenv("PYTEST_XDIST_AUTO_NUM_WORKERS", "3")
    assert conftest.pytest_xdist_auto_num_workers(None) == 3
    assert 1 <= conftest._usable_cores() and conftest._available_gib() > 0


def test_cpu_tests_compute_with_two_threads():
    """Without a GPU every test process computes with 2 torch threads (the CI machine's), whatever the machine: the
    same summation orders everywhere (tests/conftest.py; docs/testing.md names the test that needs it)."""
    if torch.cuda.is_available():
        pytest.skip("GPU machines keep torch's own thread count")
    assert torch.get_num_threads() == 2


def test_conftest_loads_without_xdist():
    """pytest-xdist is a test extra, not a requirement: without it, pytest must still accept tests/conftest.py (an
    xdist hook not marked optional is an error there: "unknown hook 'pytest_xdist_auto_num_workers'")."""
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:xdist", "-p", "no:cacheprovider", "--collect-only",
                        "-q", "tests/test_test_order.py"], cwd=root, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
