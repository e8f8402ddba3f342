"""Compile the Triton kernels ahead of time for a GPU architecture, without a GPU, and report what ptxas says.

The kernels are compiled exactly as the launchers would launch them: each op's launcher runs on meta tensors with
``triton``'s kernel launch intercepted (so the constexprs, the configs, the head-dim split, the stride alignment and
the LLAVA_FAST_* environment overrides come from the code that runs on a GPU), then each captured launch goes
through ``triton.compile`` for the target and the PTX through ``ptxas -v``. Per kernel: shared memory, registers,
spill bytes, stack frame, whether it uses wgmma and cp.async (loads pipelined), the widest global load and store
(bytes per thread and instruction: 16 = fully vectorized), and hashes of the PTX instructions and of the opcode
sequence alone (to show that a refactor changed no generated code: ``--save`` then ``--compare``).

Usage (the CPU dev machine; ~1-4 s per kernel):
    python benchmarks/aot_check.py                                # attention: every kind, D 64/72/128, bf16, causal
    python benchmarks/aot_check.py --ops all                      # + every other Triton op
    python benchmarks/aot_check.py --dims 128 --kinds dkdv --sweep "dkdv=64,64,8,3|64,128,8,2|32,128,4,3"
    python benchmarks/aot_check.py --save /tmp/a.json; (edit); python benchmarks/aot_check.py --compare /tmp/a.json
    PYTHONPATH=/path/to/triton-3.6 python benchmarks/aot_check.py   # the GPU box's triton, installed aside

Exit status 1 when a kernel fails to compile or needs more shared memory than the target has. What this cannot see:
speed, and bugs of the generated code (a GPU run is the only check of those; docs/gpu-runbook.md).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
import triton

ROOT = Path(__file__).resolve().parents[1]
if (ROOT / "llava_fast").is_dir() and str(ROOT) not in sys.path:   # a checkout (installed: llava_fast imports)
    sys.path.insert(0, str(ROOT))

# bytes of shared memory per block (the opt-in maximum) by target
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
KINDS = ("fwd", "fwd_decode", "dkdv", "dq")
OPS = ("attention", "rms_norm", "rope", "swiglu", "quick_gelu", "gelu", "layer_norm", "bias_grad", "cross_entropy",
       "projector", "pack_features")
_DT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32", torch.int64: "i64"}
_ATTN_KIND = {"_flash_attn_fwd_kernel": "fwd", "_flash_attn_bwd_dkdv_kernel": "dkdv",
              "_flash_attn_bwd_dq_kernel": "dq",
              "_flash_attn_bwd_preprocess_kernel": "bwd_pre"}


def _import(module: str):
    """An op module imported with the interpreter off (under TRITON_INTERPRET=1 the kernels are interpreter objects
    that cannot be compiled for a GPU: run this script in a process without it)."""
    if os.environ.get("TRITON_INTERPRET") == "1" and module not in sys.modules:
        os.environ.pop("TRITON_INTERPRET")
    import importlib

    return importlib.import_module(module)


# launch options besides num_warps / num_stages that reach triton.compile (the rest of a launch's keywords are the
# kernel's arguments)
COMPILE_OPTIONS = ("enable_fp_fusion",)


class Launch:
    """One intercepted kernel launch: the JITFunction, its arguments by name, num_warps and num_stages, and the
    other compile options it passed (``enable_fp_fusion``: ``_ext.fp_fusion_kwargs``)."""

    def __init__(self, jf, values: dict, num_warps: int, num_stages: int, options: dict | None = None):
        self.jf, self.values, self.num_warps, self.num_stages = jf, values, num_warps, num_stages
        self.options = options or {}
        self.row = None  # compiled at interception (intercept_launches with an arch)
        self.refused = False  # over the target's shared memory: the launcher fell back to a smaller config

    @property
    def name(self) -> str:
        return self.jf.fn.__name__


@contextlib.contextmanager
def intercept_launches(records: list, arch: int | None = None, sass_dir: str = ""):
    """Within the block, ``kernel[grid](...)`` records the launch instead of running it. With ``arch`` it is also
    compiled for sm_<arch> there (``rec.row``), and a launch over that GPU's shared memory raises Triton's
    OutOfResources, as loading it on such a GPU would: a launcher that then falls back to a smaller config (the
    attention's ``_launch``) does so here too, and the refused launch stays in ``records`` (``rec.refused``)."""
    from triton.runtime import OutOfResources
    from triton.runtime.jit import JITFunction

    orig = JITFunction.run

    def run(self, *args, grid=None, warmup=False, **kwargs):
        num_warps = kwargs.pop("num_warps", 4)
        num_stages = kwargs.pop("num_stages", 3)
        values = dict(zip(self.arg_names, args))
        values.update({k: v for k, v in kwargs.items() if k in self.arg_names})
        rec = Launch(self, values, num_warps, num_stages,
                     {k: v for k, v in kwargs.items() if k in COMPILE_OPTIONS})
        records.append(rec)
        if arch is not None:
            rec.row = compile_launch(rec, arch, sass_dir)
            limit = SMEM_LIMIT.get(arch, 232448)
            if rec.row.get("smem", 0) > limit:
                rec.refused = True
                raise OutOfResources(rec.row["smem"], limit, "shared memory")

    JITFunction.run = run
    try:
        yield records
    finally:
        JITFunction.run = orig


def _ptxas(arch: int = 90) -> str:
    """The ptxas Triton itself runs for ``arch`` (its backend's ``get_ptxas``: Triton 3.9 runs its CUDA 13 copy,
    ``ptxas-blackwell``, from sm_90 up, and writes PTX that its CUDA 12.9 ``ptxas`` refuses), else Triton's bundled copy
    by name (``ptxas-blackwell`` for sm_100 and up), else CUDA's."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        path = get_ptxas(arch).path
        if path and Path(path).exists():
            return str(path)
    except Exception:  # noqa: BLE001 - an older Triton or a missing tool: look by name
        pass
    names = ("ptxas-blackwell", "ptxas") if arch >= 100 else ("ptxas",)
    for p in [Path(triton.__file__).parent / "backends/nvidia/bin" / n for n in names] + [
            Path("/usr/local/cuda/bin/ptxas")]:
        if p.exists():
            return str(p)
    raise FileNotFoundError("ptxas not found (neither triton's bundled copy nor /usr/local/cuda/bin/ptxas)")


def _nvdisasm() -> str | None:
    for p in (Path(triton.__file__).parent / "backends/nvidia/bin/nvdisasm", Path("/usr/local/cuda/bin/nvdisasm")):
        if p.exists():
            return str(p)
    return None


_SASS_CLASSES = (("mma", r"^(HGMMA|HMMA|WGMMA)"), ("mufu", r"^MUFU"), ("fp32", r"^(FFMA|FMUL|FADD|FMNMX|FSEL)"),
                 ("ld_global", r"^(LDG|LDGSTS|LD\.|UTMALDG)"), ("st_global", r"^(STG|ST\.|UTMASTG)"),
                 ("shared", r"^(LDS|STS|LDSM|STSM)"), ("int", r"^(IMAD|IADD|LEA|SHF|LOP|IABS|ISETP|SEL|PRMT|VIADD)"),
                 ("convert", r"^(F2F|F2FP|I2F|F2I)"), ("sync", r"^(BAR|WARPSYNC|DEPBAR|SYNCS)"))


def sass_loops(sass: str) -> list[dict]:
    """The loops of one kernel's SASS (a label with a backward branch to it), with instruction counts by class.
    Innermost loops (no other loop inside) first, those with the most MMA instructions first among them: the main
    loop of a kernel and what it spends its issue slots on."""
    lines = sass.splitlines()
    labels, spans = {}, []
    for i, line in enumerate(lines):
        m = re.match(r"^\s*(\.L_x_\d+):", line)
        if m:
            labels[m.group(1)] = i
        m = re.search(r"BRA(?:\.\w+)* `?\(?(\.L_x_\d+)", line)
        if m and m.group(1) in labels and labels[m.group(1)] < i:
            spans.append((labels[m.group(1)], i, m.group(1)))
    loops = []
    for a, b, name in spans:
        body = [re.sub(r"^\s*/\*[0-9a-f]+\*/\s*(@!?U?P\w+\s+)?", "", x).strip()
                for x in lines[a:b + 1] if re.search(r"/\*[0-9a-f]{4,}\*/", x)]
        counts = {cls: sum(bool(re.match(pat, op)) for op in body) for cls, pat in _SASS_CLASSES}
        inner = not any(a <= a2 and b2 <= b and (a2, b2) != (a, b) for a2, b2, _ in spans)
        loops.append(dict(label=name, instructions=len(body), innermost=inner, **counts))
    return sorted(loops, key=lambda r: (not r["innermost"], -r["mma"], -r["instructions"]))


def _code_hash(ptx: str) -> str:
    """Hash of the PTX instructions only: without .loc/.file lines, comments and the debug sections (line numbers
    of the Python source move with every edit above a kernel)."""
    code = ptx.split("\t.section\t.debug", 1)[0]
    keep = [ln.split("//")[0].rstrip() for ln in code.splitlines()
            if not ln.strip().startswith((".loc", ".file", "//"))]
    return hashlib.sha1("\n".join(k for k in keep if k).encode()).hexdigest()[:12]


def _opcode_hash(ptx: str) -> str:
    """Hash of the opcode sequence alone (operands dropped): equal when two builds differ only in register and label
    names, which a refactor that moves code into a helper function can cause."""
    code = ptx.split("\t.section\t.debug", 1)[0]
    ops = [ln.split()[0] for ln in code.splitlines()
           if ln.strip() and not ln.strip().startswith((".loc", ".file", "//", "$", ".reg", "{", "}"))]
    return hashlib.sha1("\n".join(ops).encode()).hexdigest()[:12]


_MEM = re.compile(r"^\s*(?:@%p\d+\s+)?(ld|st)\.global(?:\.[a-z0-9_:]+)*?(?:\.v(\d))?\.[bfsu](\d+)\s")


def _widths(ptx: str) -> dict:
    """Global loads/stores by bytes per thread per instruction: {"ld": {16: n, 4: m}, "st": {...}}."""
    out = {"ld": Counter(), "st": Counter()}
    for ln in ptx.splitlines():
        m = _MEM.match(ln)
        if m:
            out[m.group(1)][int(m.group(2) or 1) * int(m.group(3)) // 8] += 1
    return {k: dict(v) for k, v in out.items()}


def _old_ast_source(jf, rec: Launch, sig: dict, target):
    """The ASTSource of triton 3.2 / 3.3, built as their ``JITFunction.run`` builds it: the backend's attribute
    descriptor from the argument values (meta tensors have data_ptr 0: 16-byte aligned), constants by name."""
    from triton.compiler import ASTSource, make_backend

    vals = tuple(rec.values.get(p.name, p.default) for p in jf.params)
    desc = make_backend(target).get_attrs_descriptor(jf.params, vals)
    fixed = desc.get_constants()
    constants = {p.name: v for v, p in zip(vals, jf.params) if p.is_constexpr or p.num in fixed or v is None}
    signature = {p.name: sig[p.name] for p in jf.params if p.name not in constants}
    return ASTSource(jf, signature, constants, desc)


def compile_launch(rec: Launch, arch: int, sass_dir: str = "") -> dict:
    """triton.compile one captured launch for sm_<arch>, as triton's launcher would specialize it; ptxas -v.
    sass_dir: also write the SASS (nvdisasm) there and add the biggest loop's instruction mix to the row."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    jf = rec.jf
    sig, ce, attrs = {}, {}, {}
    for i, p in enumerate(jf.params):
        name = p.name
        if name in rec.values:
            a = rec.values[name]
        else:
            a = p._param.default if hasattr(p, "_param") else p.default
            if a is inspect.Parameter.empty:
                raise KeyError(f"{rec.name}: argument {name} has no value")
        if p.is_constexpr:
            sig[name] = "constexpr"
            ce[(i,)] = a
            continue
        # what the launcher specializes on: 16-byte aligned pointers, ints divisible by 16, ints equal to 1
        if isinstance(a, torch.Tensor):
            sig[name] = "*" + _DT[a.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif a is None:
            sig[name] = "constexpr"
            ce[(i,)] = None
        elif isinstance(a, (bool, int)):
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
            raise TypeError(f"{rec.name}: argument {name} of type {type(a).__name__}")
    row = dict(kernel=rec.name, num_warps=rec.num_warps, num_stages=rec.num_stages,
               blocks={k: v for k, v in rec.values.items() if k.startswith("BLOCK") and isinstance(v, int)},
               # the other compile-time arguments: two launches of one kernel with one label differ there (GELU's
               # backward with and without its output), and --compare must not pair one with the other
               consts={p.name: rec.values[p.name] for p in jf.params if p.is_constexpr and p.name in rec.values
                       and not p.name.startswith("BLOCK") and isinstance(rec.values[p.name], (bool, int, float, str))})
    t0 = time.time()
    target = GPUTarget("cuda", arch, 64 if arch >= 90 else 32)
    try:
        if "constexprs" in inspect.signature(ASTSource.__init__).parameters:
            src = ASTSource(jf, sig, constexprs=ce, attrs=attrs)
        else:  # triton <= 3.3 (torch 2.6 / 2.7): constants by name, attributes as the launcher derives them
            src = _old_ast_source(jf, rec, sig, target)
        k = triton.compile(src, target=target, options={"num_warps": rec.num_warps, "num_stages": rec.num_stages,
                                                         **rec.options})
    except Exception as e:  # noqa: BLE001 - report every failure, keep going
        row.update(ok=False, error=f"{type(e).__name__}: {str(e)[-300:]}", seconds=round(time.time() - t0, 1))
        return row
    ptx = k.asm["ptx"]
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    cubin = f.name[:-4] + ".cubin" if sass_dir else os.devnull
    res = subprocess.run([_ptxas(arch), "-v", f"--gpu-name={gpu}", f.name, "-o", cubin], capture_output=True,
                         text=True)
    os.unlink(f.name)
    if sass_dir and res.returncode == 0 and _nvdisasm():
        dis = subprocess.run([_nvdisasm(), "-c", cubin], capture_output=True, text=True)
        os.unlink(cubin)
        tag = "_".join(f"{k}{v}" for k, v in sorted(rec.values.items()) if k.startswith("BLOCK") and isinstance(v, int))
        out = Path(sass_dir) / f"{rec.name}-{tag}-w{rec.num_warps}s{rec.num_stages}-sm{arch}.sass"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(dis.stdout)
        loops = sass_loops(dis.stdout)
        row["sass"] = str(out)
        row["main_loop"] = loops[0] if loops else None

    def num(pattern):
        m = re.search(pattern, res.stderr)
        return int(m.group(1)) if m else None

    smem = int(k.metadata.shared)
    limit = SMEM_LIMIT.get(arch, 232448)
    row.update(ok=res.returncode == 0 and smem <= limit, smem=smem, regs=num(r"Used (\d+) registers"),
               spill_stores=num(r"(\d+) bytes spill stores"), spill_loads=num(r"(\d+) bytes spill loads"),
               stack=num(r"(\d+) bytes stack frame"), wgmma="wgmma" in ptx, cp_async="cp.async" in ptx,
               tma="cp.async.bulk.tensor" in ptx,
               mem=_widths(ptx), ptx_sha=_code_hash(ptx), ops_sha=_opcode_hash(ptx),
               seconds=round(time.time() - t0, 1))
    if res.returncode != 0:
        row["error"] = res.stderr[-300:]
    elif smem > limit:
        row["error"] = f"shared memory {smem} B > {limit} B on sm_{arch}"
    return row


# ------------------------------------------------------------------------------------------------------------ drivers
# Each driver yields (label, call): call() runs launchers on meta tensors (inside intercept_launches).
def _meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, device="meta", dtype=dtype)


def drive_attention(dims, dtypes, causals, kinds):
    A = _import("llava_fast.ops.attention")
    for dtype in dtypes:
        for d in dims:
            for causal in causals:
                hq, hkv, s = 4, 2, 512
                t = 2 * s
                q, k, v = _meta(t, hq, d, dtype=dtype), _meta(t, hkv, d, dtype=dtype), _meta(t, hkv, d, dtype=dtype)
                cu = _meta(3, dtype=torch.int32)
                lse = _meta(hq, t, dtype=torch.float32)
                scale = d ** -0.5
                label = f"D={d} {_DT[dtype]} {'causal' if causal else 'full'}"
                if "fwd" in kinds:
                    yield label, lambda: A.flash_attn_varlen_fwd(q, k, v, cu, cu, s, s, scale, causal)
                    if d == 128:  # documents over 1024 tokens take another D128 forward config (_default_cfg)
                        yield label + " long", lambda: A.flash_attn_varlen_fwd(q, k, v, cu, cu, 2048, 2048, scale,
                                                                              causal)
                if "fwd_decode" in kinds:
                    qd, used = _meta(4, hq, d, dtype=dtype), _meta(2, dtype=torch.int32)
                    yield label, lambda: A.flash_attn_varlen_fwd(qd, k, v, cu, cu, 2, s, scale, causal, seqused_k=used)
                if "dkdv" in kinds or "dq" in kinds:
                    yield label, lambda: A.flash_attn_varlen_bwd(q, q, k, v, q, lse, cu, cu, s, s, scale, causal)


def drive_rms_norm():
    R = _import("llava_fast.ops.rms_norm")
    for n in (896, 3584, 4096):
        x, w = _meta(8192, n), _meta(n)
        rstd = _meta(8192, dtype=torch.float32)
        for res in (False, True):
            r = x if res else None
            yield f"n={n} residual={res}", lambda: (R.rms_norm_fwd(x, w, 1e-6, r), R.rms_norm_bwd(x, x, w, rstd, r))


def drive_rope():
    RO = _import("llava_fast.ops.rope")
    for hq, hkv, d in ((32, 32, 128), (14, 2, 64), (28, 4, 128)):
        q, k = _meta(8192, hq, d), _meta(8192, hkv, d)
        pos = _meta(8192, dtype=torch.int64)
        inv = _meta(d // 2, dtype=torch.float32)
        yield f"{hq}/{hkv} x {d}", lambda: RO.rope_fwd(q, k, pos, inv)
    # patch_hf(rope=True): transformers' (B, S, D) tables read in place (bf16, or fp32 under autocast), int32 rows
    for table in (torch.bfloat16, torch.float32):
        q, k = _meta(8192, 14, 64), _meta(8192, 2, 64)
        cos, sin = _meta(8192, 64, dtype=table)[:, :32], _meta(8192, 64, dtype=table)[:, :32]
        rows = _meta(8192, dtype=torch.int32)
        yield f"hf tables {str(table)[6:]} 14/2 x 64", lambda: (
            RO.rope_fwd(q, k, rows, None, cos, sin, round_table=False, out_dtype=table),
            RO.rope_fwd(q, k, rows, None, cos, sin, backward=True, round_table=False))


def drive_swiglu():
    S = _import("llava_fast.ops.swiglu")
    for n in (4864, 18944):
        g = _meta(8192, n)
        yield f"8192 x {n}", lambda: (S.swiglu_fwd(g, g), S.swiglu_bwd(g, g, g))


def drive_quick_gelu():
    Q = _import("llava_fast.ops.quick_gelu")
    x = _meta(9232, 4096)
    yield "9232 x 4096", lambda: (Q.quick_gelu_fwd(x), Q.quick_gelu_bwd(x, x), Q.quick_gelu_bwd(x, x, want_out=True))


def drive_gelu():
    G = _import("llava_fast.ops.gelu")
    x = _meta(7290, 4304)
    for approx in ("tanh", "none"):
        yield f"7290 x 4304 {approx}", lambda: (G.gelu_fwd(x, approx), G.gelu_bwd(x, x, approx),
                                                 G.gelu_bwd(x, x, approx, want_out=True))


def drive_layer_norm():
    L = _import("llava_fast.ops.layer_norm")
    for m, n in ((9477, 1152), (9232, 1024)):
        x, w = _meta(m, n), _meta(n)
        yield f"{m} x {n}", lambda: (L.layer_norm_fwd(x, w, w, 1e-6), L.layer_norm_bwd(x, x, w, w, 1e-6),
                                     L.layer_norm_bwd(x, x, w, w, 1e-6, want_out=True))


def drive_bias_grad():
    BG = _import("llava_fast.ops.bias_grad")
    for m, n in ((10206, 1152), (10206, 4304)):
        dy = _meta(m, n)
        yield f"{m} x {n}", lambda: BG.bias_grad_fwd(dy)


def drive_cross_entropy():
    C = _import("llava_fast.ops.cross_entropy")
    for v in (32064, 152064):
        logits, labels, scale = _meta(1024, v), _meta(1024, dtype=torch.int64), _meta(1, dtype=torch.float32)
        yield f"V={v}", lambda: C.cross_entropy_rows(logits, labels, scale, grad_out=logits)
    # vocab schedule: 8192 rows x an 8192-column block (the 128 MiB default at 8k tokens), and a 1024-column one
    for vb in (8192, 1024):
        z, labels = _meta(8192, vb), _meta(8192, dtype=torch.int64)
        row, scale = _meta(8192, dtype=torch.float32), _meta(1, dtype=torch.float32)
        yield f"vocab block {vb}", lambda: (C.lse_vocab_block(z, labels, row, row, row, 0),
                                            C.softmax_grad_vocab_block(z, labels, row, scale, 0))


def drive_pack_features():
    PF = _import("llava_fast.ops.pack_features")
    from llava_fast.ops.anyres import NEXT_PINPOINTS

    pins = [x for p in NEXT_PINPOINTS for x in p]
    meta = torch.tensor([[750, 1000, 0], [1000, 500, 0]], dtype=torch.int64)  # (h, w, single_tile), CPU: the plan
    tiles = 8  # base + 3 grid tiles per image here
    for d in (896, 4096):
        emb, ids = _meta(1, 8192, d), _meta(1, 8192, dtype=torch.int64)
        feats, nl = _meta(tiles, 576, d), _meta(d)

        def call(emb=emb, ids=ids, feats=feats, nl=nl):
            out, kidx, pos = PF.pack_scatter_fwd(emb, ids, feats, meta, nl, None, pins, 336, 0, 32000, -1)
            PF.pack_scatter_bwd(emb, kidx, pos, meta, pins, 336, 24, 0, tiles, 0, 0, True, emb.dtype, emb.dtype,
                                emb.dtype, True, False, True, True)
        yield f"NeXT 2 images D={d}", call
    # OneVision anyres_max_9 (the bilinear taps: the general variant; NeXT's plans above take the COPY one)
    ov_pins = [x for i in range(1, 7) for j in range(1, 7) for x in (384 * i, 384 * j)]
    ov_meta = torch.tensor([[1500, 2000, 0]], dtype=torch.int64)
    ov_tiles = 1 + 4 * 6   # base + the 4 x 6 grid of a 1500 x 2000 image (1536 x 2304 best resolution)
    emb, ids = _meta(1, 8192, 896), _meta(1, 8192, dtype=torch.int64)
    feats, nl = _meta(ov_tiles, 729, 896), _meta(896)

    def call_ov(emb=emb, ids=ids, feats=feats, nl=nl):
        out, kidx, pos = PF.pack_scatter_fwd(emb, ids, feats, ov_meta, nl, None, ov_pins, 384, 9, 151646, -1)
        PF.pack_scatter_bwd(emb, kidx, pos, ov_meta, ov_pins, 384, 27, 9, ov_tiles, 0, 0, True, emb.dtype, emb.dtype,
                            emb.dtype, True, False, True, True)
    yield "OneVision anyres_max D=896", call_ov


def drive_projector(arch, max_configs=None):
    P = _import("llava_fast.ops.projector")
    cap = (arch // 10, arch % 10)
    m, k, n = 23040, 1024, 4096
    a, b, out = _meta(m, k), _meta(k, n), _meta(m, n)
    for cfg in P._configs(cap, False)[:max_configs]:
        for epi, label in ((1, "gelu"), (2, "dgelu")):
            def call(cfg=cfg, epi=epi):
                args = (a, b, out, out, out, out, m, n, k, P._m_key(m), a.stride(0), a.stride(1), b.stride(0),
                        b.stride(1), out.stride(0), out.stride(1))
                flags = {"EPILOGUE": epi, "HAS_BIAS": True, "STORE_H": epi == 1, "WRITE_ACT": epi == 2,
                         "APPROX_TANH": False, "IEEE": False}
                P._kernel_heur[(1,)](*args, **flags, **cfg.kwargs, num_warps=cfg.num_warps,
                                     num_stages=cfg.num_stages, **P._ext.fp_fusion_kwargs())
            bm, bn, bk = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]
            yield f"{m}x{k}x{n} {label} {bm}x{bn}x{bk}", call

            def call_tma(cfg=cfg, epi=epi):  # LLAVA_FAST_PROJECTOR_KERNEL=tma: GEMM1 has a K-major B, the dA GEMM not
                args = (a, b, out, out, out, out, m, n, k, P._m_key(m), a.stride(0), k if epi == 1 else n,
                        out.stride(0), out.stride(1))
                flags = {"EPILOGUE": epi, "HAS_BIAS": True, "STORE_H": epi == 1, "WRITE_ACT": epi == 2,
                         "APPROX_TANH": False, "IEEE": False, "B_KMAJOR": epi == 1, "NUM_SMS": 132}
                P._projector_gemm_tma_kernel[(1,)](*args, **flags, **cfg.kwargs, num_warps=cfg.num_warps,
                                                   num_stages=cfg.num_stages, **P._ext.fp_fusion_kwargs())
            yield f"tma {m}x{k}x{n} {label} {bm}x{bn}x{bk}", call_tma


# ---------------------------------------------------------------------------------------------------------------- run
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


def run(ops, arch, dims=(64, 72, 128), dtypes=(torch.bfloat16,), causals=(True,), kinds=KINDS,
        sweep: dict | None = None, max_configs: int | None = None, sass_dir: str = "") -> list[dict]:
    rows = []

    def emit(op, label, rec, extra=None):
        row = dict(rec.row, refused=rec.refused)
        row.update(op=op, label=label, arch=arch, triton=triton.__version__, **(extra or {}))
        rows.append(row)
        print(_fmt(row), flush=True)

    def intercepted(call) -> list:
        from triton.runtime import OutOfResources

        records = []
        with intercept_launches(records, arch, sass_dir):
            try:
                call()
            except OutOfResources:  # the launcher has no smaller config: the last launch fails on this GPU
                records[-1].refused = False
        return records

    if "attention" in ops:
        parts_done: list = []
        for kind_cfgs in ([None] if not sweep else [(kd, c) for kd, cs in sweep.items() for c in cs]):
            env = None if kind_cfgs is None else f"{kind_cfgs[0]}={','.join(map(str, kind_cfgs[1]))}"
            with _env("LLAVA_FAST_ATTN_CFG", env):
                for label, call in drive_attention(dims, dtypes, causals, kinds):
                    for rec in intercepted(call):
                        if rec.name == "_sum_parts_kernel":  # the GQA split's partial sums: compiled once
                            if "dkdv" in kinds and kind_cfgs is None and not parts_done:
                                parts_done.append(label)
                                emit("attention_parts", label, rec)
                            continue
                        kind = _ATTN_KIND.get(rec.name, rec.name)
                        if kind == "fwd" and rec.values.get("HAS_SEQUSED"):
                            kind = "fwd_decode"
                        if kind not in kinds or (kind_cfgs is not None and kind != kind_cfgs[0]):
                            continue
                        v = rec.values
                        emit("attention", label, rec, dict(
                            kind=kind, head_dim=v["HEAD_DIM"], dtype=label.split()[1], causal=bool(v["CAUSAL"]),
                            cfg=[v["BLOCK_M"], v["BLOCK_N"], rec.num_warps, rec.num_stages], align=v.get("ALIGN"),
                            split=[v["BLOCK_D0"], v["BLOCK_D1"] if v["HAS_D1"] else 0], d1_lo=v.get("D1_LO")))
    drivers = {"rms_norm": drive_rms_norm, "rope": drive_rope, "swiglu": drive_swiglu, "quick_gelu": drive_quick_gelu,
               "gelu": drive_gelu, "layer_norm": drive_layer_norm, "bias_grad": drive_bias_grad,
               "cross_entropy": drive_cross_entropy, "projector": lambda: drive_projector(arch, max_configs),
               "pack_features": drive_pack_features}
    for op in ops:
        if op == "attention":
            continue
        for label, call in drivers[op]():
            for rec in intercepted(call):
                emit(op, label, rec)
    return rows


def _fmt(row) -> str:
    if row["op"] == "attention":
        mask = "causal" if row["causal"] else "full  "
        what = (f"{row['kind']:10s} D={row['head_dim']:<3d} {row['dtype']:4s} {mask} "
                + "x".join(map(str, row["cfg"][:2])) + f" w{row['num_warps']} s{row['num_stages']}")
    else:
        blocks = " ".join(f"{k[6:] or 'B'}={v}" for k, v in row["blocks"].items())
        what = f"{row['op']:13s} {row['kernel'][:26]:26s} {row['label']:24s} {blocks} w{row['num_warps']}"
    head = f"{'ok  ' if row['ok'] else 'FBCK' if row.get('refused') else 'FAIL'} {what:44s}"
    if "smem" not in row:
        return f"{head} {row.get('error', '')}"
    ld = max(row["mem"]["ld"], default=0)
    st = max(row["mem"]["st"], default=0)
    tail = f" {row['error']}" if row.get("error") else ""
    loop = row.get("main_loop")
    if loop:
        tail += ("\n     main loop: " + f"{loop['instructions']} instructions: " +
                 ", ".join(f"{k} {loop[k]}" for k, _ in _SASS_CLASSES if loop[k]) +
                 f", other {loop['instructions'] - sum(loop[k] for k, _ in _SASS_CLASSES)}")
    return (f"{head} smem {row['smem'] / 1024:6.1f} KB  regs {row['regs']}  spills {row['spill_stores']}/"
            f"{row['spill_loads']} B  {'wgmma ' if row['wgmma'] else ''}"
            f"{'tma ' if row.get('tma') else 'cp.async ' if row['cp_async'] else ''}"
            f"ld {ld} B st {st} B  ptx {row['ptx_sha']}  {row['seconds']}s{tail}")


def _key(row) -> str:
    if row.get("op", "attention") == "attention":
        return f"attention {row['kind']} D={row['head_dim']} {row['dtype']} causal={row['causal']} cfg={row['cfg']}"
    key = f"{row['op']} {row['kernel']} {row['label']} {row['blocks']} w{row['num_warps']} s{row['num_stages']}"
    return key + (f" {row['consts']}" if row.get("consts") else "")   # rows saved before session 32 have none


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ops", default="attention", help=f"comma separated subset of {','.join(OPS)}, or all")
    ap.add_argument("--dims", default="64,72,128", help="attention head dims, comma separated (64,72,80,96,128)")
    ap.add_argument("--dtypes", default="bf16", help="attention dtypes: bf16,fp16,fp32")
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"attention kernels: subset of {','.join(KINDS)}")
    ap.add_argument("--causal", default="1", help="attention: 1, 0 or 1,0")
    ap.add_argument("--arch", type=int, default=90, help="90 (H100/H200, sm_90a), 80 (A100), 86 / 89 (A10, L4, L40S, "
                    "RTX 30xx / 40xx), 100 (B200, sm_100a) or 120 (RTX 50xx)")
    ap.add_argument("--sweep", default="", help='attention configs instead of the defaults (via LLAVA_FAST_ATTN_CFG): '
                    '"dkdv=64,64,8,3|64,128,8,2;dq=128,64,8,2" (BLOCK_M,BLOCK_N,num_warps,num_stages)')
    ap.add_argument("--max-configs", type=int, default=None, help="projector: only the first N autotune configs")
    ap.add_argument("--save", default="", help="write the rows as JSON")
    ap.add_argument("--compare", default="", help="JSON of an earlier run: report kernels whose PTX changed")
    ap.add_argument("--sass", default="", help="write each kernel's SASS (nvdisasm) into this folder and print the "
                    "instruction mix of its biggest loop (mma, mufu, fp32, loads, int, sync)")
    args = ap.parse_args(argv)
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    ops = OPS if args.ops == "all" else tuple(args.ops.split(","))
    sweep = {}
    for part in filter(None, (p.strip() for p in args.sweep.split(";"))):
        kind, _, cfgs = part.partition("=")
        sweep[kind.strip()] = [tuple(int(x) for x in c.split(",")) for c in cfgs.split("|")]
    print(f"triton {triton.__version__} ({Path(triton.__file__).parent}), target sm_{args.arch}, "
          f"ptxas {_ptxas(args.arch)}")
    rows = run(ops, args.arch, [int(x) for x in args.dims.split(",")], [dt[x] for x in args.dtypes.split(",")],
               [c == "1" for c in args.causal.split(",")], tuple(args.kinds.split(",")), sweep, args.max_configs,
               args.sass)
    if args.save:
        Path(args.save).write_text(json.dumps(rows, indent=1))
        print("saved", args.save)
    failed = [r for r in rows if not r["ok"] and not r.get("refused")]  # FBCK: the launcher's fallback follows
    if args.compare:
        before = {_key(r): r for r in json.loads(Path(args.compare).read_text())}
        changed = [r for r in rows if _key(r) in before and before[_key(r)].get("ptx_sha") != r.get("ptx_sha")]
        renamed = [r for r in changed if r.get("ops_sha") and before[_key(r)].get("ops_sha") == r["ops_sha"]]
        print(f"compared with {args.compare}: {len(changed)} of {len(rows)} kernels changed their PTX "
              f"({len(renamed)} of them only in register/label names: same opcode sequence)")
        for r in changed:
            print("  changed:" if r not in renamed else "  renamed:", _key(r))
    refused = sum(bool(r.get("refused")) for r in rows)
    print(f"{len(rows) - len(failed) - refused} of {len(rows) - refused} kernels compiled within sm_{args.arch}'s "
          f"limits" + (f" ({refused} more refused there, each followed by the launcher's smaller fallback: FBCK)"
                       if refused else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
