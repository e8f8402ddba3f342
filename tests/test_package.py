"""Package-level checks: import never touches the GPU, env and CLI work, the README's commands are the ones CI runs."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_import_is_light_and_gpu_free():
    code = ("import sys, llava_fast; import torch; "
            "assert not torch.cuda.is_initialized(); "
            "print('llava_fast.models' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"   # the model code loads lazily


def test_env_reports_everything():
    import llava_fast

    info = llava_fast.env()
    for key in ("llava_fast", "torch", "triton", "transformers", "gpu", "ext", "triton_usable", "backends"):
        assert key in info
    assert set(info["backends"]) >= {"attention", "projector", "rms_norm", "cross_entropy"}


def test_removed_switches_warn_at_import(monkeypatch):
    """The switches of the variants removed in session 21 warn when the package is imported instead of silently
    running the default; nothing is said when none is set."""
    import subprocess

    from llava_fast import _ext

    for k in _ext.REMOVED_SWITCHES:
        monkeypatch.delenv(k, raising=False)
    assert _ext.warn_removed_switches() == []
    monkeypatch.setenv("LLAVA_FAST_ATTN_BWD", "atomic")
    monkeypatch.setenv("LLAVA_FAST_FUSED_QKV", "1")
    with pytest.warns(UserWarning) as rec:
        assert _ext.warn_removed_switches() == ["LLAVA_FAST_ATTN_BWD", "LLAVA_FAST_FUSED_QKV"]
    assert [str(w.message).split(" is set but no longer has an effect")[0] for w in rec] == \
        ["LLAVA_FAST_ATTN_BWD", "LLAVA_FAST_FUSED_QKV"]
    r = subprocess.run([sys.executable, "-c", "import llava_fast"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "LLAVA_FAST_ATTN_BWD is set but no longer has an effect" in r.stderr, r.stderr[-500:]
    assert "LLAVA_FAST_FUSED_QKV is set" in r.stderr


def test_env_lists_the_kernel_variant_overrides(monkeypatch):
    import llava_fast

    monkeypatch.setenv("LLAVA_FAST_ATTN_GQA_SPLIT", "k2")
    monkeypatch.setenv("LLAVA_FAST_BACKEND_ATTENTION", "reference")  # shown under backends, not here
    assert "LLAVA_FAST_ATTN_GQA_SPLIT=k2" in llava_fast.env()["env_overrides"]
    assert "BACKEND" not in llava_fast.env()["env_overrides"]


def test_env_names_the_gpu_tile_encoder(monkeypatch):
    import llava_fast
    from llava_fast import _ext

    monkeypatch.delenv("LLAVA_FAST_GPU_ENCODER", raising=False)
    if not _ext.HAS_CUDA_EXT:
        assert "gpu_tile_encoder" not in llava_fast.env()
        return
    monkeypatch.delenv("LLAVA_FAST_GPU_ENCODER_SMEM_KB", raising=False)
    assert llava_fast.env()["gpu_tile_encoder"] == "v4 (LLAVA_FAST_GPU_ENCODER=v1..v4; shared memory 48 KB)"
    monkeypatch.setenv("LLAVA_FAST_GPU_ENCODER", "v2")
    assert llava_fast.env()["gpu_tile_encoder"] == "v2 (LLAVA_FAST_GPU_ENCODER=v1..v4)"
    monkeypatch.setenv("LLAVA_FAST_GPU_ENCODER", "v4")
    monkeypatch.setenv("LLAVA_FAST_GPU_ENCODER_SMEM_KB", "96")
    assert llava_fast.env()["gpu_tile_encoder"] == "v4 (LLAVA_FAST_GPU_ENCODER=v1..v4; shared memory 96 KB)"
    monkeypatch.setenv("LLAVA_FAST_GPU_ENCODER", "v9")
    assert llava_fast.env()["gpu_tile_encoder"].startswith("invalid: LLAVA_FAST_GPU_ENCODER")


def test_env_names_the_loss_schedule(monkeypatch):
    import llava_fast

    assert llava_fast.env()["loss_schedule"].startswith("token chunks")
    monkeypatch.setenv("LLAVA_FAST_CE_SCHEDULE", "vocab")
    monkeypatch.setenv("LLAVA_FAST_CE_VOCAB_BUDGET_MB", "20")
    assert llava_fast.env()["loss_schedule"] == "vocab blocks (LLAVA_FAST_CE_SCHEDULE=vocab; budget 20 MiB)"
    monkeypatch.setenv("LLAVA_FAST_CE_SCHEDULE", "chunks")
    assert llava_fast.env()["loss_schedule"].startswith("invalid: LLAVA_FAST_CE_SCHEDULE")


def test_env_names_the_last_layer_rows(monkeypatch):
    import llava_fast

    monkeypatch.delenv("LLAVA_FAST_LAST_LAYER_ROWS", raising=False)
    assert llava_fast.env()["last_layer_rows"].startswith("supervised: a loss-only call")
    monkeypatch.setenv("LLAVA_FAST_LAST_LAYER_ROWS", "all")
    assert llava_fast.env()["last_layer_rows"].startswith("all (LLAVA_FAST_LAST_LAYER_ROWS=all)")
    monkeypatch.setenv("LLAVA_FAST_LAST_LAYER_ROWS", "some")
    assert llava_fast.env()["last_layer_rows"].startswith("invalid: LLAVA_FAST_LAST_LAYER_ROWS")


def test_cli_env_runs():
    out = subprocess.run([sys.executable, "-m", "llava_fast.cli", "env"], capture_output=True, text=True, check=True)
    assert "backends (per op)" in out.stdout


def test_python_dash_m_llava_fast_is_the_command():
    """``python -m llava_fast`` (and ``torchrun -m llava_fast``) runs the llava-fast command, exit status included;
    its help and argument errors come without importing torch (5 s before llava_fast.train loaded its names lazily)."""
    ok = subprocess.run([sys.executable, "-m", "llava_fast", "--help"], capture_output=True, text=True)
    assert ok.returncode == 0 and "usage: llava-fast" in ok.stdout and "train-original" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "llava_fast", "no-such-command"], capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid choice: 'no-such-command'" in bad.stderr
    code = ("import sys, runpy; sys.argv = ['llava-fast', 'train', '--help']\n"
            "try:\n    runpy.run_module('llava_fast', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'LIGHT')")
    light = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "override keys" in light.stdout and light.stdout.strip().endswith("LIGHT"), light.stdout[-300:]


def test_set_backend_validates():
    import llava_fast
    from llava_fast import backend

    with pytest.raises(ValueError, match="unknown op"):
        llava_fast.set_backend("nope", "reference")
    with pytest.raises(ValueError, match="backend must be one of"):
        llava_fast.set_backend("attention", "fast")
    llava_fast.set_backend("attention", "reference")
    try:
        assert not backend.use_fast("attention", "cuda")
    finally:
        llava_fast.set_backend("attention", "auto")


def test_auto_keeps_the_reference_path_on_gpus_older_than_ampere(monkeypatch):
    """A V100 / T4 (compute capability < 8.0), or ROCm: "auto" runs every op's reference, `llava-fast env` says why,
    and a forced backend still gets the kernel. Asked of torch once, on the first CUDA call (not at import)."""
    from llava_fast import backend

    monkeypatch.setattr(backend, "_UNSUPPORTED_GPU", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: [(8, 0), (7, 5)][i])
    assert not backend.use_fast("rms_norm", "cuda")
    assert backend.unsupported_gpu().startswith("compute capability 7.5: the kernels need 8.0 (Ampere) or newer")
    assert backend.describe("cuda")["rms_norm"] == f"reference ({backend.unsupported_gpu()})"
    assert backend.describe("cuda")["projector"].startswith("reference (cuBLAS eager")  # its own reason first
    monkeypatch.setitem(backend._overrides, "rms_norm", "triton")
    assert backend.use_fast("rms_norm", "cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (9, 0))
    monkeypatch.setattr(backend, "_UNSUPPORTED_GPU", None)
    monkeypatch.delitem(backend._overrides, "rms_norm")
    assert backend.use_fast("rms_norm", "cuda") and backend.unsupported_gpu() == ""
    monkeypatch.setattr(torch.version, "hip", "6.4")  # an AMD GPU under ROCm: torch.cuda too, capability 9.4
    monkeypatch.setattr(backend, "_UNSUPPORTED_GPU", None)
    assert not backend.use_fast("rms_norm", "cuda")
    assert backend.unsupported_gpu().startswith("ROCm: the kernels are written and tested for NVIDIA GPUs")


def test_gpu_probe_is_never_made_inside_a_trace(monkeypatch):
    """The functionals call use_fast inside user code that torch.compile traces (fullgraph=True in the GPU tests):
    the first CUDA call's probe of the GPUs must not run there (torch.cuda's device queries break the graph). Inside a
    trace it answers "" without asking, and the next eager call asks."""
    from llava_fast import backend

    backend.load_all()  # as a model does when it is built (an op module's import does not trace either)
    asked = []

    def capabilities():
        if torch.compiler.is_compiling():
            raise AssertionError("the GPUs probed inside a trace")
        asked.append(1)
        return [(9, 0)]
    monkeypatch.setattr(backend, "_UNSUPPORTED_GPU", None)
    monkeypatch.setattr(backend, "_gpu_capabilities", capabilities)

    def f(x):
        return x + 1 if backend.use_fast("rms_norm", "cuda") else x - 1
    torch._dynamo.reset()
    out = torch.compile(f, backend="eager", fullgraph=True)(torch.zeros(2))
    assert torch.equal(out, torch.ones(2)) and not asked and backend._UNSUPPORTED_GPU is None
    assert backend.use_fast("rms_norm", "cuda") and asked == [1] and backend._UNSUPPORTED_GPU == ""
    torch._dynamo.reset()


def test_readme_commands_match_ci():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", readme, re.S)
    assert blocks, "README must start with a code block holding the two commands"
    first = [l for l in blocks[0].strip().splitlines() if l.strip() and not l.startswith("#")]
    assert len(first) == 2, f"README's first block must hold exactly two commands, got {first}"
    assert "llava-fast demo" in first[0]
    ci = (ROOT / ".ci" / "run").read_text()
    assert first[1].strip() in ci, f"CI must run the README's test command {first[1]!r}"


def test_bench_model_harness_smoke(tmp_path):
    """The end-to-end benchmark runs (at toy sizes, on the CPU) and writes its JSON and markdown."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_model
    import bench_utils

    rows = bench_model.run(["prefill", "ov_ft"], ["llava_fast", "hf_sdpa"], layers=None, tiny=True, rep=1, warmup=0)
    assert {r.provider for r in rows} == {"llava_fast", "hf_sdpa"} and {r.mode for r in rows} == {"prefill", "ov_ft"}
    assert all(r.metric and r.metric > 0 for r in rows)
    md = bench_utils.save(rows, "smoke", out_dir=tmp_path)
    assert md.exists() and md.with_suffix(".json").exists()


def test_bench_model_mixed_rows_are_the_same_work(tmp_path):
    """The mixed run's batchings feed the same samples: transformers' padded batches and its padding-free packed rows
    (hf_sdpa_packed, hf_sdpa_patched_packed) give one model the same summed loss, as do our packed rows to our model
    with the same weights (each sample's pictures are its own in every batching)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_model
    import torch

    import llava_fast

    cfg = bench_model.hf_configs("prefill", None, True)
    samples = bench_model.mixed_samples(cfg, n=12, tiny=True)
    hf = bench_model.build("hf_sdpa", "mixed", cfg, "cpu").eval()
    hf.save_pretrained(tmp_path)
    ours = llava_fast.from_pretrained(tmp_path, dtype=torch.float32).eval()

    def summed(model, provider):
        batches, _ = bench_model.mixed_batches(provider, cfg, samples, "cpu", torch.float32, batch=4, max_tokens=2048)
        total = 0.0
        with torch.no_grad():
            for kw in batches:
                n = int((kw["labels"][:, 1:] != -100).sum())
                total += model(**kw).loss.item() * n
        return total, len(batches)

    padded, n_padded = summed(hf, "hf_sdpa")
    packed, n_packed = summed(hf, "hf_sdpa_packed")
    mine, _ = summed(ours, "llava_fast")
    assert n_packed < n_padded
    assert packed == pytest.approx(padded, rel=1e-5) and mine == pytest.approx(padded, rel=1e-5)


def test_bench_model_compiled_provider():
    """llava_fast_compiled (every layer under torch.compile; aot_eager on the CPU) runs the OneVision step and its
    loss equals the eager model's."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_model
    import torch

    cfg = bench_model.hf_configs("ov_ft", None, True)
    inp = bench_model.make_inputs("ov_ft", cfg, "cpu", True)
    losses = {}
    for prov in ("llava_fast", "llava_fast_compiled"):
        m = bench_model.build(prov, "ov_ft", cfg, "cpu")
        losses[prov] = m(input_ids=inp["ids"], pixel_values=inp["pv"], image_sizes=inp["sizes"], labels=inp["labels"],
                         logits=False).loss
        losses[prov].backward()
    assert all(hasattr(layer, "_compiled_call_impl") and layer._compiled_call_impl is not None
               for layer in m.model.language_model.layers)
    torch.testing.assert_close(losses["llava_fast_compiled"], losses["llava_fast"], rtol=1e-5, atol=1e-6)


def test_bench_model_memory_ratios():
    """Our rows' notes get peak memory over each transformers baseline of the same workload (issue 8's memory
    targets), once, and nothing where a peak is missing."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_model
    from bench_utils import Row

    rows = [Row("model", "llava_fast", "ov", "bf16", "ov_ft", peak_gib=12.0, note="MFU 30.0%"),
            Row("model", "hf_sdpa", "ov", "bf16", "ov_ft", peak_gib=36.0),
            Row("model", "hf_sdpa_liger", "ov", "bf16", "ov_ft", peak_gib=30.0),
            Row("model", "hf_sdpa", "other", "bf16", "ov_ft", peak_gib=1.0),
            Row("model", "llava_fast", "s1", "bf16", "stage1", peak_gib=None)]
    bench_model.add_memory_ratios(rows)
    bench_model.add_memory_ratios(rows)
    assert rows[0].note == "MFU 30.0%; mem 0.33x hf_sdpa, 0.40x hf_sdpa_liger"
    assert rows[4].note == ""


def test_targets_table():
    """benchmarks/targets.py (perf-notes, "What each end-to-end target requires"): bench_model's FLOP counts per step
    are the ones the notes and the anchors quote (17.6 TFLOP per stage-1 sample, 14.7 GFLOP per prefill token, 67
    TFLOP per OneVision step), and the rates the targets imply are what the notes say (7B: 82-86% of the GEMM
    ceiling; OneVision ~61%)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import targets

    rows = {r["workload"]: r for r in targets.rows()}
    for name, tflop in (("stage1", 281.334), ("prefill", 293.385), ("ov_ft", 67.026)):
        assert abs(rows[name]["full"]["total"] / 1e12 - tflop) < 1e-3, name
    assert rows["stage1"]["full"]["layers"] == 32 and rows["ov_ft"]["full"]["layers"] == 24
    assert 0.80 < rows["stage1"]["need_frac"] < 0.84 and 0.84 < rows["prefill"]["need_frac"] < 0.88
    assert 0.58 < rows["ov_ft"]["need_frac"] < 0.64
    assert rows["prefill"]["full"]["head_skipped"] == 0.0 and rows["ov_ft"]["full"]["head_skipped"] > 0


def test_decide_applies_the_written_rules(tmp_path):
    """benchmarks/decide.py on a made-up results folder: the CE rules read the newest table and say what to do;
    the repository's own results do not crash it."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import json

    import decide

    shape = "N=8192 V=152064 H=896"
    rows = [dict(provider=p, shape=shape, mode="fwd+bwd", ms=ms, peak_gib=g)
            for p, ms, g in (("llava_fast", 16.7, 0.6), ("llava_fast_vocab", 15.0, 0.13),
                             ("llava_fast_vocab_20mb", 18.0, 0.02), ("liger", 69.6, 0.02))]
    (tmp_path / "cross_entropy-GPU-1.json").write_text(json.dumps({"rows": rows}))
    got = {q: d for q, _, _, d in decide.decide(str(tmp_path))}
    assert got["CE vocab schedule, 8k x 152064 x 896"].startswith("make vocab the auto schedule")
    assert got["CE at Liger's memory (20 MiB budget)"].startswith("CE target met")
    assert got["projector fwd, M=23040"] == "" and got["GPU encoder v3, anyres_llava_next"] == ""
    assert decide.decide(str(ROOT / "benchmarks" / "results"))


def test_decide_host_bound_rule(tmp_path):
    """decide.py reads profile_model.py's wall time and kernel time (newest file per workload and provider)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import json
    import os

    import decide

    def write(name, wall, kernels, mtime):
        p = tmp_path / name
        p.write_text(json.dumps(dict(workload="ov_ft", provider="llava_fast", steps=2, wall_ms=wall,
                                     kernels=[dict(ms=k) for k in kernels],
                                     syncs=dict(count=3, where={"llava.py:229": 2}))))
        os.utime(p, (mtime, mtime))

    write("profile_model-ov_ft-llava_fast-GPU-old.json", 100.0, [190.0], 1)  # 95% busy, older
    write("profile_model-ov_ft-llava_fast-GPU-new.json", 100.0, [100.0, 20.0], 2)  # 60% busy, newest
    got = {q: (m, d) for q, m, _, d in decide.decide(str(tmp_path))}
    m, d = got["GPU busy, ov_ft / llava_fast"]
    assert d == "host-bound" and m.startswith("60% of 100.0 ms") and "llava.py:229" in m
    assert got["compiled layers, ov_ft"] == ("not measured", "")
    rows = [dict(provider=p, shape="s", mode="ov_ft", ms=1.0, metric=v, peak_gib=10.0)
            for p, v in (("llava_fast", 100.0), ("llava_fast_compiled", 112.0))]
    (tmp_path / "bench_model_compiled-GPU-1.json").write_text(json.dumps({"rows": rows}))
    got = {q: (m, d) for q, m, _, d in decide.decide(str(tmp_path))}
    assert got["compiled layers, ov_ft"][1] == "switch" and got["compiled layers, ov_ft"][0].startswith("1.12x")
    assert got["compiled layers + CUDA graphs (reduce-overhead), ov_ft"] == ("not measured", "")
    rows.append(dict(provider="llava_fast_compiled_cg", shape="s", mode="ov_ft", ms=1.0, metric=101.0,
                     peak_gib=10.0))
    (tmp_path / "bench_model_compiled-GPU-1.json").write_text(json.dumps({"rows": rows}))
    got = {q: (m, d) for q, m, _, d in decide.decide(str(tmp_path))}
    assert got["compiled layers + CUDA graphs (reduce-overhead), ov_ft"][1] == "keep eager"


def test_decide_projector_cutlass_rule(tmp_path):
    """The CUTLASS projector rule: a provider that beats the Triton kernel by >= 3% in fwd and fwd+bwd is a default
    candidate; one whose rows fell back to Triton is reported as such, never as a CUTLASS result."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import json

    import decide

    shape = "M=23040 1024->4096->4096"
    ms = {"eager": (1.449, 4.896), "llava_fast": (1.652, 5.067), "llava_fast_cutlass": (1.35, 4.40),
          "llava_fast_cutlass_coop": (1.60, 5.00), "llava_fast_cutlass_pp": (1.30, 4.30)}
    rows = [dict(provider=p, shape=shape, mode=mode, ms=t[i],
                 note="FELL BACK to Triton" if p == "llava_fast_cutlass_pp" else "")
            for p, t in ms.items() for i, mode in enumerate(("fwd", "fwd+bwd"))]
    (tmp_path / "projector-GPU-1.json").write_text(json.dumps({"rows": rows}))
    got = {q: (m, d) for q, m, _, d in decide.decide(str(tmp_path))}
    assert got["projector llava_fast_cutlass"][1].startswith("candidate default")
    assert got["projector llava_fast_cutlass_coop"][1] == "keep opt-in"
    assert got["projector llava_fast_cutlass_pp"][0].startswith("fell back")
    assert "llava_fast_cutlass_pp" not in got["projector fwd, M=23040"][0]  # a fallback row is not a candidate
    assert got["projector fwd, M=23040"][1].startswith("llava_fast_cutlass meets it")


def test_decide_projector_sweep_rule(tmp_path):
    """The CUTLASS schedule sweep rule: the fastest schedule per GEMM among rows that ran CUTLASS and passed the
    error check, against the default pair; a faster row with a bad error or a fallback is never picked."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import json

    import decide

    good, bad = "out error 1.00x bf16 eager's", "out error 3.00x bf16 eager's"
    table = (("cutlass pingpong/auto", 1.4, 4.6, good), ("cutlass cooperative/auto", 1.45, 4.7, good),
             ("cutlass pingpong_c12/auto", 1.3, 4.5, good), ("cutlass cooperative_256/auto", 1.2, 4.4, bad),
             ("cutlass auto/pingpong", 1.4, 4.7, good),
             ("cutlass auto/cooperative_256", 1.4, 4.3, good + "; FELL BACK"))
    rows = [dict(provider=p, shape="M=23040", mode=mode, ms=t, note=note)
            for p, fwd, fb, note in table for mode, t in (("fwd", fwd), ("fwd+bwd", fb))]
    (tmp_path / "projector_sweep-GPU-1.json").write_text(json.dumps({"rows": rows}))
    got = {q: (m, d) for q, m, _, d in decide.decide(str(tmp_path))}
    assert got["projector CUTLASS fwd schedule"][1] == "make pingpong_c12 the fwd 'auto' in projector.cutlass_sched"
    assert got["projector CUTLASS bwd schedule"] == ("best cooperative 4.600 ms, 1.00x the default (4.600 ms)",
                                                     "keep")


def test_decide_attention_cutlass_rule(tmp_path):
    """The CUTLASS attention forward rule: faster by >= 3% is a candidate; a row that fell back is said so."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import json

    import decide

    rows = [dict(provider="llava_fast", shape="causal-d128-4k (B4 Hq32 Hkv32 D128 causal)", mode="fwd", ms=1.27),
            dict(provider="llava_fast_cutlass", shape="causal-d128-4k (B4 Hq32 Hkv32 D128 causal)", mode="fwd",
                 ms=0.95, note=""),
            dict(provider="llava_fast", shape="clip-64x577-d64 (B64 Hq16 Hkv16 D64)", mode="fwd", ms=0.5),
            dict(provider="llava_fast_cutlass", shape="clip-64x577-d64 (B64 Hq16 Hkv16 D64)", mode="fwd", ms=0.4,
                 note="FELL BACK to the Triton forward"),
            dict(provider="sdpa-cudnn", shape="clip-64x577-d64 (B64 Hq16 Hkv16 D64)", mode="fwd", ms=0.33)]
    (tmp_path / "attention-GPU-1.json").write_text(json.dumps({"rows": rows}))
    got = {q: (m, d) for q, m, _, d in decide.decide(str(tmp_path))}
    assert got["attention CUTLASS forward, causal-d128-4k"][1].startswith("candidate default")
    assert got["attention CUTLASS forward, clip-64x577-d64"] == ("fell back to Triton (see bench_attention.log)",
                                                                 "fix")
    assert "attention CUTLASS forward vs SDPA cuDNN, CLIP tiles" not in got  # never from a fallback row
    rows[3]["note"] = ""
    (tmp_path / "attention-GPU-1.json").write_text(json.dumps({"rows": rows}))
    got = {q: (m, d) for q, m, _, d in decide.decide(str(tmp_path))}
    assert got["attention CUTLASS forward vs SDPA cuDNN, CLIP tiles"] == ("0.82x cuDNN's forward", "keep")


def test_bench_model_restores_what_liger_patches():
    """Liger's patch functions replace transformers' module-level functions and classes; bench_model puts them back
    after each Liger provider so that later transformers rows are plain transformers."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_model
    from transformers.models.llama import modeling_llama

    orig_rope, orig_norm = modeling_llama.apply_rotary_pos_emb, modeling_llama.LlamaRMSNorm
    restore = bench_model.snapshot_transformers()
    modeling_llama.apply_rotary_pos_emb = lambda *a, **k: None   # what a Liger patch does
    modeling_llama.LlamaRMSNorm = object
    modeling_llama.liger_added_name = 1
    orig_fwd = modeling_llama.LlamaForCausalLM.forward
    modeling_llama.LlamaForCausalLM.forward = lambda self, *a, **k: None   # a class-level forward patch
    restore()
    assert modeling_llama.apply_rotary_pos_emb is orig_rope and modeling_llama.LlamaRMSNorm is orig_norm
    assert not hasattr(modeling_llama, "liger_added_name")
    assert modeling_llama.LlamaForCausalLM.forward is orig_fwd


def test_profile_model_smoke(capsys):
    """The end-to-end profiler runs a toy step on the CPU and classifies what it ran (GEMMs found and named)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import profile_model

    assert profile_model.main(["--tiny", "--workload", "stage1", "--steps", "1", "--no-save"]) == 0
    out = capsys.readouterr().out
    assert "| gemm |" in out and "Top 25 kernels" in out and "Wall time per step (CPU)" in out
    line = profile_model.busy_lines(10.0, 6.0, True, (3, {"llava.py:229": 2, "cross_entropy.py:492": 1}))
    assert "busy 60% of the step" in line and "synchronisations per step: 3 (llava.py:229 x2" in line
    assert profile_model.classify("sm90_xmma_gemm_bf16bf16_bf16f32") == "gemm"
    assert profile_model.classify("_flash_attn_fwd_kernel") == "attention"
    assert profile_model.classify("_rms_norm_bwd_kernel") == "norm"
    assert profile_model.classify("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add") \
        == "elementwise"


def test_profile_model_launch_sites(capsys):
    """--sites: the kernels matching a pattern, grouped by the outermost aten op above their launch, its shapes and
    our innermost frames (fake profiler events: the CPU has no kernels), and the CLI path on the CPU."""
    from types import SimpleNamespace as NS

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import profile_model

    K = lambda name, us: NS(name=name, duration=us)  # noqa: E731
    outer = NS(name="aten::clone", cpu_parent=NS(name="ResidualActLinearFunctionBackward", cpu_parent=None),
               input_shapes=[[10240, 4096]], stack=["torch/_tensor.py(1): x", "llava_fast/ops/rope.py(187): rope_bwd",
                                                   "llava_fast/models/language.py(60): forward"])
    inner = NS(name="aten::copy_", cpu_parent=outer, kernels=[K("Memcpy DtoD (Device -> Device)", 50.0)], stack=[])
    other = NS(name="aten::add", cpu_parent=None, kernels=[K("vectorized_elementwise_kernel", 9.0)], stack=[])
    events = [inner, inner, other, NS(name="aten::empty", cpu_parent=None, kernels=[], stack=[])]
    sites = profile_model.launch_sites(events, "Memcpy DtoD", steps=2)
    assert len(sites) == 1 and sites[0]["calls"] == 1 and sites[0]["ms"] == pytest.approx(0.05)
    assert sites[0]["site"].startswith("aten::clone [[10240, 4096]] <- llava_fast/ops/rope.py(187)")
    assert profile_model.main(["--tiny", "--workload", "stage1", "--steps", "1", "--no-save", "--sites",
                               "Memcpy DtoD"]) == 0
    assert "Where the `Memcpy DtoD` kernels come from" in capsys.readouterr().out


def test_cli_bad_input_is_one_line_not_a_traceback(tmp_path, capsys, monkeypatch):
    """`llava-fast chat --model MISSING` (and any ValueError / OSError of a command) prints the message, names the
    command, exits 2; LLAVA_FAST_TRACEBACK=1 re-raises for debugging."""
    from llava_fast import cli

    monkeypatch.delenv("LLAVA_FAST_TRACEBACK", raising=False)
    missing = str(tmp_path / "no_model")
    assert cli.main(["chat", "--model", missing]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llava-fast chat: error: ") and "no_model" in err and "is not a folder" in err, err
    monkeypatch.setenv("LLAVA_FAST_TRACEBACK", "1")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        cli.main(["chat", "--model", missing])


def test_host_overhead_smoke():
    """host_overhead.py stubs every Triton launch (in its own process: the stub is global) and counts what a step
    issues (the fused ops' launches by kernel, the aten ops)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "host_overhead.py"), "--llm-layers", "2",
                        "--vision-layers", "2", "--steps", "1"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    head = [ln for ln in r.stdout.splitlines() if ln.startswith("host_overhead:")]
    assert len(head) == 1 and "2 LLM + 2 vision layers" in head[0], r.stdout
    # per LLM layer: 2 RMSNorm forwards + 2 recomputed, RoPE, SwiGLU (+ recompute), attention; + the final norm
    launches = int(re.search(r"(\d+) Triton launches/step", head[0]).group(1))
    assert launches >= 2 * 8, r.stdout
    assert "_rms_norm_fwd_kernel" in r.stdout and "_flash_attn_fwd_kernel" in r.stdout, r.stdout


def test_host_overhead_per_layer_smoke():
    """host_overhead.py --per-layer: one line per tower, a positive host time per layer."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "host_overhead.py"), "--per-layer", "--llm-layers",
                        "2", "--vision-layers", "2"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("host_overhead --per-layer:")]
    assert len(lines) == 2 and "language model" in lines[0] and "vision encoder" in lines[1], r.stdout
    assert all(float(re.search(r"([0-9.]+) ms per layer", ln).group(1)) > 0 for ln in lines), r.stdout

@pytest.mark.parametrize("workload,at_most", [("ov_ft", 0.70), ("stage1", 0.80)])
def test_saved_activations_vs_transformers(workload, at_most):
    """Activation memory: with the attention paths a GPU runs (SDPA here), what our model keeps for the backward
    (summed over modules, the loss on the logits and the attention modules apart) against transformers' sdpa model.
    OneVision FT at toy widths: 0.56x with the language model's activations and norm outputs recomputed
    (ops/act_linear.py; the default since session 18 keeps the vision tower's), 0.52x recomputed everywhere
    (LLAVA_FAST_RECOMPUTE_ACT=1), 0.86x without (LLAVA_FAST_RECOMPUTE_ACT=0); stage 1 0.67x, 0.88x without; so the
    bounds fail if the recompute is lost. The attention modules are left out of both sums: both models run the same
    SDPA call, and what CPU SDPA keeps depends on torch (torch 2.7's GQA path keeps the probabilities: 4720 values
    per token in both models' text attention, against 207 on torch 2.14, which took the OneVision ratio with them
    from 0.66x to 0.91x, session 32). At real widths see `python benchmarks/saved_activations.py` (2 min) and
    docs/perf-notes.md."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import saved_activations

    res, n_vis, n_txt, classes = saved_activations.measure(workload, 1, 1, tiny=True)
    tot = {k: sum(b for c, b in v.items() if c != "(loss: logits)" and not c.endswith("Attention"))
           for k, v in res.items()}
    assert all(any(c.endswith("Attention") for c in v) for v in res.values()), res   # the rows left out exist
    assert tot["llava_fast"] <= at_most * tot["hf_sdpa"], (tot, res)
    # the full-depth prediction: the classes of one layer repeat (found in each model), the weights are the same
    assert {"text", "vision"} <= set(classes["llava_fast"]) and "MLP" in classes["llava_fast"]["text"]
    assert "SiglipMLP" in classes["hf_sdpa"]["vision"] or "CLIPMLP" in classes["hf_sdpa"]["vision"], classes
    pred = saved_activations.predict_full_depth(res, classes, n_vis, n_txt, workload, {"text": 1, "vision": 1},
                                                tiny=True)
    assert pred["llava_fast"]["weights"] == pred["hf_sdpa"]["weights"] > 0
    assert 0 < pred["llava_fast"]["saved activations"] < pred["hf_sdpa"]["saved activations"]
    assert "loss: fp32 logits + their gradients" in pred["hf_sdpa"]


def test_auto_reference_ops():
    """An op in AUTO_REFERENCE (measured slower than its reference on a GPU) keeps the reference under "auto" even on
    CUDA, "triton" still forces the kernel, and `llava-fast env` (describe) says why."""
    import llava_fast
    from llava_fast import backend

    assert "vision_attention" in backend.AUTO_REFERENCE
    assert backend.use_fast("attention", "cuda") and not backend.use_fast("vision_attention", "cuda")
    assert "SDPA" in backend.describe("cuda")["vision_attention"]
    llava_fast.set_backend("vision_attention", "triton")
    try:
        assert backend.use_fast("vision_attention", "cuda") and backend.use_fast("vision_attention", "cpu")
        assert backend.describe("cuda")["vision_attention"].startswith("triton (forced")
    finally:
        llava_fast.set_backend("vision_attention", "auto")


def test_decide_rms_norm_bwd_tile(tmp_path):
    """The RMSNorm backward tile rule reads the 'bwd kernels' rows at N = 896 of both variants."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import json

    import decide

    got = {q: d for q, _, _, d in decide.decide(str(tmp_path))}
    assert got["RMSNorm backward tile"] == ""
    rows = [dict(bench=b, provider=p, shape="8192x896", mode="bwd kernels", ms=1.0, metric=v)
            for b in ("rms_norm", "rms_norm+residual")
            for p, v in (("llava_fast", 2000.0), ("llava_fast_bwd4096", 2200.0), ("llava_fast_bwd8192", 2020.0))]
    (tmp_path / "rms_norm-GPU-1.json").write_text(json.dumps({"rows": rows}))
    got = {q: d for q, _, _, d in decide.decide(str(tmp_path))}
    assert got["rms_norm backward tile 4096 (N = 896)"] == "candidate"
    assert got["rms_norm+residual backward tile 8192 (N = 896)"] == "keep 2048"


def test_peak_flops_by_gpu_name():
    """The MFU denominators: the most specific name wins (H100 PCIe before H100, L40S before L4, A100 before A10), and
    a GPU whose peak is not published gets None (no MFU) rather than a neighbour's."""
    from llava_fast.envinfo import peak_bf16_flops

    assert peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989.4e12 and peak_bf16_flops("NVIDIA H100 PCIe") == 756.5e12
    assert peak_bf16_flops("NVIDIA L40S") == 362e12 and peak_bf16_flops("NVIDIA L4") == 121e12
    assert peak_bf16_flops("NVIDIA A100-SXM4-80GB") == 312e12 and peak_bf16_flops("NVIDIA A10") == 125e12
    assert peak_bf16_flops("NVIDIA A10G") is None and peak_bf16_flops("Tesla T4") is None


def _setup_namespace() -> dict:
    """setup.py's imports, constants, functions and classes, without running setup() (the module calls it at
    import)."""
    import ast

    src = (Path(__file__).resolve().parents[1] / "setup.py").read_text()
    tree = ast.parse(src)
    keep = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef,
                                                   ast.Assign))]
    ns: dict = {"__file__": str(Path(__file__).resolve().parents[1] / "setup.py")}
    exec(compile(ast.Module(body=keep, type_ignores=[]), "setup.py", "exec"), ns)
    return ns


def test_setup_drops_a_cmake_cache_it_cannot_reuse(tmp_path, capsys):
    """pip builds each time in a new isolated environment; the CMake cache kept in build/ named the previous one's
    ninja, and a second `pip wheel .` from the same checkout failed at configure. A cache whose ninja or cmake is gone,
    or made by another generator, is deleted; one whose tools exist is kept (incremental --no-build-isolation)."""
    drop = _setup_namespace()["_drop_stale_cmake_cache"]
    exe = sys.executable  # a path that exists

    def cache(make, command, generator="Ninja"):
        d = tmp_path / f"b{len(list(tmp_path.iterdir()))}"
        (d / "CMakeFiles").mkdir(parents=True)
        (d / "CMakeCache.txt").write_text(
            f"# This is the CMakeCache file.\n//Program used to build\nCMAKE_MAKE_PROGRAM:FILEPATH={make}\n"
            f"CMAKE_COMMAND:INTERNAL={command}\nCMAKE_GENERATOR:INTERNAL={generator}\n")
        return d

    kept = cache(exe, exe)
    drop(kept, "Ninja")
    assert (kept / "CMakeCache.txt").exists() and (kept / "CMakeFiles").exists()
    for d, gen, why in ((cache(tmp_path / "gone" / "ninja", exe), "Ninja", "ninja no longer exists"),
                        (cache(exe, tmp_path / "gone" / "cmake"), "Ninja", "cmake no longer exists"),
                        (cache(exe, exe, "Ninja"), "Unix Makefiles", "it was made by Ninja")):
        drop(d, gen)
        assert d.is_dir() and not any(d.iterdir()), d
        assert why in capsys.readouterr().out
    empty = tmp_path / "fresh"
    empty.mkdir()
    drop(empty, "Ninja")  # no cache: nothing to do
    assert empty.is_dir()


def test_setup_falls_back_when_the_native_build_fails(tmp_path, monkeypatch, capsys):
    """A compiler that cannot build llava_fast._C does not stop the install (every op has its PyTorch/Triton path):
    a failed CUDA build retries the C++ sources alone, a failed C++ build installs without _C, both with a warning;
    LLAVA_FAST_REQUIRE_EXT=1 (device_check's build step) makes a failure an error."""
    import subprocess as sp
    from types import SimpleNamespace

    ns = _setup_namespace()
    ns["_find_nvcc"] = lambda: "/opt/cuda/bin/nvcc"
    monkeypatch.delenv("LLAVA_FAST_FORCE_CPU_ONLY", raising=False)
    monkeypatch.delenv("LLAVA_FAST_REQUIRE_EXT", raising=False)

    def builder(outcomes):
        b = object.__new__(ns["CMakeBuild"])
        b.build_temp = str(tmp_path / "bt")
        calls = []

        def cmake(ext, build_temp, nvcc):
            calls.append(nvcc)
            if outcomes[len(calls) - 1]:
                raise sp.CalledProcessError(1, ["cmake", "--build", "."])
        b._cmake = cmake
        return b, calls

    ext = SimpleNamespace(name="llava_fast._C")
    b, calls = builder([False])
    b.build_extension(ext)
    assert calls == ["/opt/cuda/bin/nvcc"] and "WARNING" not in capsys.readouterr().out
    b, calls = builder([True, False])
    b.build_extension(ext)
    assert calls == ["/opt/cuda/bin/nvcc", None]
    assert "the CUDA build failed" in capsys.readouterr().out
    b, calls = builder([True, True])
    b.build_extension(ext)  # no exception: installed without _C
    out = capsys.readouterr().out
    assert calls == ["/opt/cuda/bin/nvcc", None] and "installing without llava_fast._C" in out
    monkeypatch.setenv("LLAVA_FAST_REQUIRE_EXT", "1")
    b, calls = builder([True, False])
    with pytest.raises(sp.CalledProcessError):
        b.build_extension(ext)
    assert calls == ["/opt/cuda/bin/nvcc"]


def test_source_distribution_carries_the_native_sources():
    """MANIFEST.in puts CMakeLists.txt and every tracked csrc/ file into the sdist (without them a `pip install` of
    the sdist stopped at CMake's configure), checked with setuptools' own manifest rules."""
    from setuptools.command.egg_info import FileList

    root = Path(__file__).resolve().parents[1]
    tracked = subprocess.run(["git", "ls-files", "csrc", "CMakeLists.txt"], cwd=root, capture_output=True,
                             text=True)
    if tracked.returncode != 0 or not tracked.stdout.strip():
        pytest.skip("not a git checkout")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        fl = FileList()
        fl.findall(".")
        fl.files = [f for f in fl.allfiles if not f.startswith((".venv", "build", ".git"))]
        fl.allfiles = list(fl.files)
        fl.files = []
        for line in (root / "MANIFEST.in").read_text().splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                fl.process_template_line(line)
    finally:
        os.chdir(cwd)
    shipped = {os.path.normpath(f) for f in fl.files}
    missing = [f for f in tracked.stdout.split() if os.path.normpath(f) not in shipped]
    assert not missing, f"MANIFEST.in leaves out {missing}"
    assert "LICENSE" in shipped


def test_extension_is_built_where_a_compiler_exists():
    """The install falls back to no extension when the native build fails: CI must not go green testing less. With
    a C++ compiler here, llava_fast._C must have been built (with nvcc: its CUDA build too)."""
    import shutil

    from llava_fast import _ext

    setup = _setup_namespace()   # setup.py's own flag reading and nvcc search
    if setup["_truthy"]("LLAVA_FAST_SKIP_CUDA_BUILD"):
        pytest.skip("LLAVA_FAST_SKIP_CUDA_BUILD is set")
    if not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("no C++ compiler")
    fix = "reinstall with LLAVA_FAST_REQUIRE_EXT=1 pip install -v -e . to see why the build failed"
    assert _ext.HAS_EXT, f"llava_fast._C was not built ({_ext.EXT_ERROR}); {fix}"
    if setup["_find_nvcc"]() and not setup["_truthy"]("LLAVA_FAST_FORCE_CPU_ONLY"):
        assert _ext.HAS_CUDA_EXT, f"llava_fast._C was built without its CUDA sources though nvcc is here; {fix}"


def test_benchmarks_ship_in_the_package(monkeypatch):
    """The wheel carries benchmarks/ as llava_fast.benchmarks (``llava-fast bench`` runs them after a ``pip install``:
    before, only a clone could run them) and, as before, every llava_fast package."""
    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)                    # setuptools builds from the project root; find_packages looks there
    setup = _setup_namespace()
    assert setup["PACKAGE_DIR"] == {"llava_fast.benchmarks": "benchmarks"}
    assert "llava_fast.benchmarks" in setup["PACKAGES"]
    on_disk = {".".join(p.parent.relative_to(root).parts) for p in (root / "llava_fast").rglob("__init__.py")}
    assert on_disk and on_disk <= set(setup["PACKAGES"]), on_disk - set(setup["PACKAGES"])


def test_bench_command_lists_and_runs_the_benchmarks(capsys):
    from llava_fast import bench, cli

    assert bench.bench_dir() == Path(__file__).resolve().parents[1] / "benchmarks"
    assert cli.main(["bench"]) == 0
    listed = capsys.readouterr().out
    for name in ("model", "attention", "projector", "anyres", "cross_entropy", "targets", "decide"):
        assert re.search(rf"^  {name} +\S", listed, re.M), (name, listed)
    assert "bench_utils" not in listed and "utils" not in listed.split()
    assert cli.main(["bench", "targets"]) == 0      # arithmetic only: the table of what each target requires
    out = capsys.readouterr().out
    assert "stage1" in out and "ov_ft" in out
    assert cli.main(["bench", "no_such_bench"]) == 2
    err = capsys.readouterr().err
    assert "no benchmark named 'no_such_bench'" in err and "model" in err


def test_bench_results_go_to_the_working_directory_outside_a_checkout(tmp_path, monkeypatch, capsys):
    """From an installed package the results go to ./llava_fast_results (or LLAVA_FAST_RESULTS_DIR), not into
    site-packages; arguments and the exit status pass through; the caller's environment is left as it was."""
    from llava_fast import bench

    installed = tmp_path / "site-packages" / "llava_fast" / "benchmarks"
    installed.mkdir(parents=True)
    (installed / "bench_utils.py").write_text("")
    (installed / "bench_probe.py").write_text(
        '"""Probe."""\nimport os, sys\nprint("OUT", os.environ.get("LLAVA_FAST_RESULTS_DIR"), sys.argv[1:])\n'
        'sys.exit(3)\n')
    monkeypatch.setattr(bench, "bench_dir", lambda: installed)
    monkeypatch.delenv("LLAVA_FAST_RESULTS_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    assert not bench.in_checkout(installed)
    assert bench.run("probe", ["--quick"]) == 3
    out = capsys.readouterr()
    assert f"OUT {tmp_path / 'llava_fast_results'} ['--quick']" in out.out and "results go to" in out.err
    assert "LLAVA_FAST_RESULTS_DIR" not in os.environ
    monkeypatch.setenv("LLAVA_FAST_RESULTS_DIR", str(tmp_path / "mine"))
    assert bench.run("bench_probe", []) == 3 and bench.run("bench_probe.py", []) == 3
    assert capsys.readouterr().out.count(f"OUT {tmp_path / 'mine'} []") == 2
