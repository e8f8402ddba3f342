"""Compile the attention kernels ahead of time for a GPU architecture, without a GPU, and report what ptxas says.

The kernels are compiled exactly as the launchers would launch them: the launchers of llava_fast/ops/attention.py
run on meta tensors with their launch captured (so the constexprs, the head-dim split, the stride-alignment hint and
the (BLOCK_M, BLOCK_N, num_warps, num_stages) config come from the same code that runs on a GPU, including the
LLAVA_FAST_ATTN_* environment overrides), then each captured kernel goes through ``triton.compile`` for the target
and the PTX through ``ptxas -v``. Per kernel: shared memory, registers, spill bytes, stack frame, whether it uses
wgmma and cp.async (loads pipelined), and a hash of the PTX instructions (to show that a refactor changed no
generated code: ``--save`` then ``--compare``).

Usage (the CPU dev machine; ~2-4 s per kernel):
    python benchmarks/aot_check.py                               # defaults: every kind, D 64/72/128, bf16, causal
    python benchmarks/aot_check.py --dims 128 --kinds dkdv --sweep "dkdv=64,64,8,3|64,128,8,2|32,128,4,3"
    python benchmarks/aot_check.py --save /tmp/a.json; (edit); python benchmarks/aot_check.py --compare /tmp/a.json
    PYTHONPATH=/path/to/triton-3.6 python benchmarks/aot_check.py  # the GPU box's triton, installed aside

Exit status 1 when a kernel fails to compile or needs more shared memory than the target has. What this cannot see:
speed, and bugs of the generated code (a GPU run is the only check of those; docs/gpu-runbook.md).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import triton

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _attention():
    """llava_fast.ops.attention, imported with the interpreter off (under TRITON_INTERPRET=1 the kernels are
    interpreter objects that cannot be compiled for a GPU: run this script in a process without it)."""
    if os.environ.get("TRITON_INTERPRET") == "1" and "llava_fast.ops.attention" not in sys.modules:
        os.environ.pop("TRITON_INTERPRET")
    from llava_fast.ops import attention

    return attention

SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}  # bytes of shared memory per block (opt-in maximum)
KINDS = ("fwd", "fwd_decode", "dkdv", "dq", "bwd_fused")
_DT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32", torch.int64: "i64"}


class _Record:
    def __init__(self, kind, fn, args, constexprs):
        self.kind, self.fn, self.args, self.constexprs = kind, fn, args, constexprs


def capture_launches(d: int, dtype: torch.dtype, causal: bool, hq: int = 4, hkv: int = 2, seqlen: int = 512,
                     kinds=KINDS) -> list[_Record]:
    """Run the launchers on meta tensors; return the kernels they would launch, with their arguments."""
    A = _attention()
    records: list[_Record] = []

    def fake_launch(kind, fn, grid_of, args, constexprs):
        records.append(_Record(kind, fn, args, dict(constexprs)))

    class _NoLaunch:  # the backward's preprocess kernel is launched directly: skip it (trivial, elementwise)
        def __getitem__(self, grid):
            return lambda *a, **k: None

    meta = dict(device="meta", dtype=dtype)
    t = 2 * seqlen
    q = torch.empty(t, hq, d, **meta)
    k = torch.empty(t, hkv, d, **meta)
    v = torch.empty(t, hkv, d, **meta)
    cu = torch.empty(3, device="meta", dtype=torch.int32)
    scale = d ** -0.5
    old_launch, old_pre = A._launch, A._flash_attn_bwd_preprocess_kernel
    A._launch, A._flash_attn_bwd_preprocess_kernel = fake_launch, _NoLaunch()
    try:
        if "fwd" in kinds:
            A.flash_attn_varlen_fwd(q, k, v, cu, cu, seqlen, seqlen, scale, causal)
        if "fwd_decode" in kinds:
            qd = torch.empty(4, hq, d, **meta)
            used = torch.empty(2, device="meta", dtype=torch.int32)
            A.flash_attn_varlen_fwd(qd, k, v, cu, cu, 2, seqlen, scale, causal, seqused_k=used)
        out = torch.empty_like(q)
        lse = torch.empty(hq, t, device="meta", dtype=torch.float32)
        if "dkdv" in kinds or "dq" in kinds:
            n = len(records)
            A.flash_attn_varlen_bwd(out, q, k, v, out, lse, cu, cu, seqlen, seqlen, scale, causal)
            records[n:] = [r for r in records[n:] if r.kind in kinds]
        if "bwd_fused" in kinds:
            A.flash_attn_varlen_bwd_atomic(out, q, k, v, out, lse, cu, cu, seqlen, seqlen, scale, causal)
    finally:
        A._launch, A._flash_attn_bwd_preprocess_kernel = old_launch, old_pre
    return records


def _jit(fn):
    from triton.runtime.jit import JITFunction

    while not isinstance(fn, JITFunction):
        if not hasattr(fn, "fn"):
            raise TypeError("not a triton.jit kernel (imported under TRITON_INTERPRET=1? run aot_check in a process "
                            "without it)")
        fn = fn.fn
    return fn


def _ptxas() -> str:
    for p in (Path(triton.__file__).parent / "backends/nvidia/bin/ptxas", Path("/usr/local/cuda/bin/ptxas")):
        if p.exists():
            return str(p)
    raise FileNotFoundError("ptxas not found (neither triton's bundled copy nor /usr/local/cuda/bin/ptxas)")


def compile_record(r: _Record, cfg, arch: int) -> dict:
    """triton.compile one captured launch with cfg = (BLOCK_M, BLOCK_N, num_warps, num_stages); ptxas -v report."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    jf = _jit(r.fn)
    bm, bn, warps, stages = cfg
    consts = dict(r.constexprs, BLOCK_M=bm, BLOCK_N=bn)
    sig, ce, attrs = {}, {}, {}
    args = iter(r.args)
    for i, p in enumerate(jf.params):
        name = p.name
        if p.is_constexpr:
            sig[name] = "constexpr"
            if name in consts:
                ce[(i,)] = consts[name]
            else:  # the kernel's default
                import inspect

                default = p._param.default if hasattr(p, "_param") else p.default
                if default is inspect.Parameter.empty:
                    raise KeyError(f"{r.kind}: constexpr {name} has no value")
                ce[(i,)] = default
            continue
        a = next(args)
        # what the runtime specializes on: 16-byte aligned pointers, ints divisible by 16, ints equal to 1
        if isinstance(a, torch.Tensor):
            sig[name] = "*" + _DT[a.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(a, bool) or isinstance(a, int):
            a = int(a)
            if a == 1 and i not in jf.do_not_specialize:
                sig[name] = "constexpr"
                ce[(i,)] = 1
            else:
                sig[name] = "i64" if abs(a) >= 2 ** 31 else "i32"
                if a % 16 == 0 and i not in jf.do_not_specialize:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(a, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{r.kind}: argument {name} of type {type(a).__name__}")
    src = ASTSource(jf, sig, constexprs=ce, attrs=attrs)
    t0 = time.time()
    row = dict(kind=r.kind, cfg=list(cfg), head_dim=consts.get("HEAD_DIM"),
               split=[consts.get("BLOCK_D0"), consts.get("BLOCK_D1") if consts.get("HAS_D1") else 0],
               align=consts.get("ALIGN"), d1_lo=consts.get("D1_LO"))
    try:
        k = triton.compile(src, target=GPUTarget("cuda", arch, 64 if arch >= 90 else 32),
                           options={"num_warps": warps, "num_stages": stages})
    except Exception as e:  # noqa: BLE001 - report every failure, keep going
        row.update(ok=False, error=f"{type(e).__name__}: {str(e)[-300:]}", seconds=round(time.time() - t0, 1))
        return row
    ptx = k.asm["ptx"]
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    res = subprocess.run([_ptxas(), "-v", f"--gpu-name={gpu}", f.name, "-o", os.devnull], capture_output=True,
                         text=True)
    os.unlink(f.name)
    info = res.stderr

    def num(pattern):
        m = re.search(pattern, info)
        return int(m.group(1)) if m else None

    smem = int(k.metadata.shared)
    row.update(ok=res.returncode == 0 and smem <= SMEM_LIMIT.get(arch, 232448), smem=smem,
               regs=num(r"Used (\d+) registers"), spill_stores=num(r"(\d+) bytes spill stores"),
               spill_loads=num(r"(\d+) bytes spill loads"), stack=num(r"(\d+) bytes stack frame"),
               wgmma="wgmma" in ptx, cp_async="cp.async" in ptx, ptx_sha=_code_hash(ptx),
               seconds=round(time.time() - t0, 1))
    if res.returncode != 0:
        row["error"] = res.stderr[-300:]
    elif smem > SMEM_LIMIT.get(arch, 232448):
        row["error"] = f"shared memory {smem} B > {SMEM_LIMIT.get(arch)} B on sm_{arch}"
    return row


def _code_hash(ptx: str) -> str:
    """Hash of the PTX instructions only: without .loc/.file lines, comments and the debug sections (line numbers
    of the Python source move with every edit above a kernel)."""
    code = ptx.split("\t.section\t.debug", 1)[0]
    keep = [ln.split("//")[0].rstrip() for ln in code.splitlines()
            if not ln.strip().startswith((".loc", ".file", "//"))]
    return hashlib.sha1("\n".join(k for k in keep if k).encode()).hexdigest()[:12]


@contextlib.contextmanager
def _env(name, value):
    old = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def run(dims, dtypes, kinds, causals, arch, sweep: dict | None = None) -> list[dict]:
    A = _attention()
    rows = []
    for dtype in dtypes:
        for d in dims:
            for causal in causals:
                for r in capture_launches(d, dtype, causal, kinds=kinds):
                    width = r.constexprs["BLOCK_D0"] + (r.constexprs["BLOCK_D1"] if r.constexprs["HAS_D1"] else 0)
                    fp32 = r.constexprs["DOT_PREC"] == "ieee"
                    cfgs = (sweep or {}).get(r.kind) or [A._default_cfg(r.kind, width, fp32)]
                    for cfg in cfgs:
                        row = compile_record(r, cfg, arch)
                        row.update(dtype=_DT[dtype], causal=causal, arch=arch, triton=triton.__version__)
                        rows.append(row)
                        print(_fmt(row), flush=True)
    return rows


def _fmt(row) -> str:
    cfg = "x".join(map(str, row["cfg"][:2])) + f" w{row['cfg'][2]} s{row['cfg'][3]}"
    head = (f"{'ok  ' if row['ok'] else 'FAIL'} {row['kind']:10s} D={row['head_dim']:<3d} {row['dtype']:4s} "
            f"{'causal' if row['causal'] else 'full  '} {cfg:16s}")
    if "smem" not in row:
        return f"{head} {row.get('error', '')}"
    spill = f"{row['spill_stores']}/{row['spill_loads']}"
    tail = f" {row['error']}" if row.get("error") else ""
    return (f"{head} smem {row['smem'] / 1024:6.1f} KB  regs {row['regs']}  spills {spill:9s} B  stack "
            f"{row['stack']}  {'wgmma' if row['wgmma'] else 'mma  '}  {'cp.async' if row['cp_async'] else 'sync    '}  "
            f"ptx {row['ptx_sha']}  {row['seconds']}s{tail}")


def _key(row) -> str:
    return f"{row['kind']} D={row['head_dim']} {row['dtype']} causal={row['causal']} cfg={row['cfg']}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dims", default="64,72,128", help="head dims, comma separated (64,72,80,96,128)")
    ap.add_argument("--dtypes", default="bf16", help="bf16,fp16,fp32")
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"subset of {','.join(KINDS)}")
    ap.add_argument("--causal", default="1", help="1, 0 or 1,0")
    ap.add_argument("--arch", type=int, default=90, help="90 (H100/H200, sm_90a) or 80 (A100)")
    ap.add_argument("--sweep", default="", help='configs per kind instead of the defaults: '
                    '"dkdv=64,64,8,3|64,128,8,2;dq=128,64,8,2" (BLOCK_M,BLOCK_N,num_warps,num_stages)')
    ap.add_argument("--save", default="", help="write the rows as JSON")
    ap.add_argument("--compare", default="", help="JSON of an earlier run: report kernels whose PTX changed")
    args = ap.parse_args(argv)
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    sweep = {}
    for part in filter(None, (p.strip() for p in args.sweep.split(";"))):
        kind, _, cfgs = part.partition("=")
        sweep[kind.strip()] = [tuple(int(x) for x in c.split(",")) for c in cfgs.split("|")]
    print(f"triton {triton.__version__} ({Path(triton.__file__).parent}), target sm_{args.arch}, ptxas {_ptxas()}")
    rows = run([int(x) for x in args.dims.split(",")], [dt[x] for x in args.dtypes.split(",")],
               tuple(args.kinds.split(",")), [c == "1" for c in args.causal.split(",")], args.arch, sweep)
    if args.save:
        Path(args.save).write_text(json.dumps(rows, indent=1))
        print("saved", args.save)
    failed = [r for r in rows if not r["ok"]]
    if args.compare:
        before = {_key(r): r for r in json.loads(Path(args.compare).read_text())}
        changed = [r for r in rows if _key(r) in before and before[_key(r)].get("ptx_sha") != r.get("ptx_sha")]
        print(f"compared with {args.compare}: {len(changed)} of {len(rows)} kernels changed their PTX")
        for r in changed:
            print("  changed:", _key(r))
    print(f"{len(rows) - len(failed)} of {len(rows)} kernels compiled within sm_{args.arch}'s limits")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
