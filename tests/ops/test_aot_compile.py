"""The attention kernels compile for an H100/H200 (sm_90a) without a GPU: benchmarks/aot_check.py runs the real
launchers on meta tensors, compiles what they would launch with the installed Triton and reads ptxas's report.

What it guards (facts of the generated code, not speed): every default config fits in shared memory and compiles;
the head-dim 72 kernels (SigLIP) load K/V with cp.async, i.e. the loads are vectorized and pipelined. Before the
strides were passed divided by ALIGN, triton 3.6 and 3.8 saw no alignment for a 72-element head stride (a
tl.multiple_of hint on the scalar argument changed nothing): scalar 2-byte loads, no pipelining, 64 KB of shared
memory instead of 224 KB.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llava_fast import _ext

ROOT = Path(__file__).resolve().parents[2]
triton = pytest.importorskip("triton")


def _ptxas_available() -> bool:
    return (Path(triton.__file__).parent / "backends/nvidia/bin/ptxas").exists() or Path(
        "/usr/local/cuda/bin/ptxas").exists()


@pytest.mark.skipif(not _ptxas_available(), reason="no ptxas (neither triton's bundled copy nor CUDA's)")
def test_attention_kernels_compile_for_sm90_and_d72_is_pipelined(tmp_path):
    out = tmp_path / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET" and not k.startswith("LLAVA_FAST_ATTN")}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks/aot_check.py"), "--dims", "72,128", "--kinds",
                        "fwd,dkdv,dq", "--causal", "0", "--save", str(out)], env=env, capture_output=True, text=True,
                       timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = json.loads(out.read_text())
    parts = [row for row in rows if row["op"] == "attention_parts"]  # the GQA split's partial sums (session 21)
    assert len(parts) == 1 and parts[0]["ok"] and parts[0]["spill_stores"] == 0, parts
    rows = [row for row in rows if row["op"] == "attention"]
    assert len(rows) == 7 and all(row["ok"] for row in rows), rows  # D128: short and long documents' forwards
    for row in rows:
        assert row["wgmma"], row  # Hopper tensor-core MMA
        assert row["cp_async"], f"{row['kind']} D={row['head_dim']}: K/V (or Q/dO) loads are not pipelined"
    fwd72 = next(r for r in rows if r["kind"] == "fwd" and r["head_dim"] == 72)
    assert fwd72["align"] == 8 and fwd72["spill_stores"] == 0


@pytest.mark.skipif(not _ptxas_available(), reason="no ptxas (neither triton's bundled copy nor CUDA's)")
def test_attention_fits_gpus_with_99_kb_of_shared_memory(tmp_path):
    """sm_86 / sm_89 (A10, A10G, L4, L40S, RTX 30xx / 40xx) give a block 99 KB of shared memory, where the defaults were
    chosen on the H100's 227: the D128 forward for documents over 1024 tokens (128 x 128, 160 KB) and the fp32
    backward (64 x 32, ~104 KB) do not load there. aot_check raises Triton's OutOfResources for such a launch, as
    loading it on that GPU would, so the launcher's own fallback runs: every kernel it finally launches fits."""
    out = tmp_path / "aot86.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET" and not k.startswith("LLAVA_FAST_ATTN")}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks/aot_check.py"), "--arch", "86", "--dims", "128",
                        "--dtypes", "bf16,fp32", "--kinds", "fwd,dkdv,dq", "--save", str(out)], env=env,
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [row for row in json.loads(out.read_text()) if row["op"] == "attention"]
    refused = [(row["kind"], row["dtype"], row["cfg"]) for row in rows if row["refused"]]
    assert refused == [("fwd", "bf16", [128, 128, 8, 3]), ("dkdv", "fp32", [64, 32, 4, 2]),
                       ("dq", "fp32", [64, 32, 4, 2])], refused
    for i, row in enumerate(rows):
        if row["refused"]:
            assert row["smem"] > 101376 and not row["ok"]
            fallback = rows[i + 1]
            assert fallback["kind"] == row["kind"] and fallback["ok"] and fallback["smem"] <= 101376, fallback
        else:
            assert row["ok"], row
    fwd = next(row for i, row in enumerate(rows) if i and rows[i - 1]["refused"] and row["kind"] == "fwd")
    assert fwd["cfg"] == [128, 64, 8, 3] and fwd["spill_stores"] == 0


@pytest.mark.skipif(not _ptxas_available(), reason="no ptxas (neither triton's bundled copy nor CUDA's)")
def test_projector_kernels_compile_for_sm90_and_tma_variant_uses_tma(tmp_path):
    """The projector's first Hopper autotune config, GELU and dGELU epilogues: the pointer kernel with cp.async, the
    persistent one (LLAVA_FAST_PROJECTOR_KERNEL=tma) with TMA copies; wgmma and no spills for all four."""
    if _ext.triton_version() < (3, 4):
        # measured with Triton 3.3.1 (torch 2.7): no tl.make_tensor_descriptor (the TMA variant falls back to the
        # pointer kernel, test_projector.py), and the first config takes 256 KB of shared memory there (144 KB from
        # 3.4 on): the autotuner drops it on a GPU and tunes the others
        pytest.skip("the projector's first Hopper config and its TMA variant need Triton >= 3.4")
    out = tmp_path / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks/aot_check.py"), "--ops", "projector", "--max-configs",
                        "1", "--save", str(out)], env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert len(rows) == 4 and all(row["ok"] and row["wgmma"] and row["spill_stores"] == 0 for row in rows), rows
    assert [row["tma"] for row in rows] == [False, True, False, True]


def test_sass_loops_picks_the_innermost_loop_with_the_most_mma():
    """aot_check --sass: the loop report reads nvdisasm's text. An outer loop that contains two inner ones is not
    "the main loop", however big; among innermost loops the one with the most MMA instructions is."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import aot_check

    def ins(addr, text):
        return f"        /*{addr:04x}*/                   {text} ;"

    lines = [".L_x_0:", ins(0x10, "IMAD R1, R2, R3, RZ"),
             ".L_x_1:", ins(0x20, "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24"), ins(0x30, "MUFU.EX2 R5, R6"),
             ins(0x40, "@P0 BRA `(.L_x_1)"),
             ".L_x_2:", ins(0x50, "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24"),
             ins(0x60, "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24"), ins(0x70, "LDGSTS.E [R13], desc[UR14][R2.64]"),
             ins(0x80, "@!P1 FFMA R1, R2, R3, R4"), ins(0x90, "BRA `(.L_x_2)"),
             ins(0xa0, "ISETP.GE.AND P0, PT, R1, R2, PT"), ins(0xb0, "BRA `(.L_x_0)")]
    loops = aot_check.sass_loops("\n".join(lines))
    assert [lp["label"] for lp in loops] == [".L_x_2", ".L_x_1", ".L_x_0"]
    main = loops[0]
    assert main["innermost"] and main["mma"] == 2 and main["ld_global"] == 1 and main["fp32"] == 1
    assert main["instructions"] == 5
    assert not loops[2]["innermost"] and loops[2]["instructions"] == 11
