"""AnyRes feature packing + scatter into inputs_embeds (forward, forward+backward) in GB/s.

Providers, all measured in this run on the same inputs:
  ``llava_fast``  pack_and_scatter, one Triton launch (plan cached: the steady state of a training loop that sees the
                  same image sizes; the host cost of a new plan is reported separately as provider ``plan_build``)
  ``llava_fast_general``  the same with the forward kernel's general variant (4 taps and their weights) where the
                  default takes the COPY one (plans without bilinear taps: next8_7b, ov05_single, ov05_multi4;
                  ``LLAVA_FAST_PACK_COPY=0``, session 16)
  ``ref``         the reference: pack_image_features_ref / pool_video_features_ref + scatter_features_ref (HF-style
                  Python loop over images, then masked_scatter)
  ``hf``          transformers' own LlavaNextModel / LlavaOnevisionModel.pack_image_features (or apply_pooling for
                  video) + get_placeholder_mask (its count check synchronises) + masked_scatter, called on a stand-in
                  ``self`` that carries the config
A large bf16 ``copy_`` gives the copy bandwidth of this GPU in the same run; our rows say "% of copy".

Bytes counted (b = element size, D = hidden, identical for every provider: the essential traffic):
  fwd: features read once (every tile row, total_tiles * t*t * D * b, videos likewise)
       + text rows of inputs_embeds read (n_text * D * b) + the output written once (B * L * D * b)
  bwd: d_out read once (B * L * D * b) + d_features written (feature rows * D * b) + d_inputs_embeds written
       (B * L * D * b); the newline gradient (D values) is ignored
  fwd+bwd: the sum.

Run: ``python benchmarks/bench_pack_features.py [--quick]`` (needs a CUDA GPU; exits cleanly without one).
There is no torch.compile provider. Results are saved after every case, so a time limit keeps what was measured.
``--smoke`` runs the script on the CPU under the Triton interpreter at toy sizes (a check of the script only).
"""
import argparse
import os
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_utils import Row, add_ratios, bench, copy_bandwidth, peak_memory, save, to_markdown  # noqa: E402

IMG, VID = 151646, 151647


def make_case(name, dev, dtype, smoke=False):
    """Inputs of one benchmark case. Returns (kwargs for pack_and_scatter, description, byte counts)."""
    from llava_fast.ops import anyres

    if name == "next8_7b":  # LLaVA-NeXT-7B: 8 samples, one 700x1000 image each
        pins, tile, t, mx, d = anyres.NEXT_PINPOINTS, 336, 24, None, 4096
        samples = [[(700, 1000)] for _ in range(8)]
        single, videos, variant = False, None, "next"
    else:  # OneVision-0.5B
        pins, tile, t, mx, d = anyres.OV_PINPOINTS, 384, 27, 9, 896
        variant = "ov"
        samples, single, videos = [], False, None
        if name == "ov05_single":
            samples = [[(700, 1000)]]
        elif name == "ov05_multi4":
            samples, single = [[(700, 1000), (500, 400), (1920, 1080), (384, 384)]], True
        elif name == "ov05_video32":
            videos = (1, 32)
    if smoke:  # toy sizes for the CPU interpreter
        tile, t, d = 28, 2, 16
        pins = [[p[0] // (336 if variant == "next" else 384) * 28, p[1] // (336 if variant == "next" else 384) * 28]
                for p in pins]
        samples = [[(h // 12, w // 12) for h, w in s] for s in samples][:2]
        videos = (1, 2) if videos else None
    sizes, flags, ids, tiles = [], [], [], 0
    for s in samples:
        seq = [1] * 32
        for hw in s:
            sizes.append(hw)
            flags.append(single)
            tiles += 1 if single else anyres.num_tiles(hw, pins, tile)
            seq += [IMG] * anyres.num_image_tokens(hw, pins, tile, t, mx, single_tile=single) + [2] * 8
        seq += [3] * 32
        ids.append(seq)
    if videos:
        ids.append([1] * 32 + [VID] * anyres.num_video_tokens(videos[1], t) + [3] * 32)
    L = max(map(len, ids))
    input_ids = torch.zeros(len(ids), L, dtype=torch.long)
    for i, s in enumerate(ids):
        input_ids[i, :len(s)] = torch.tensor(s)
    input_ids = input_ids.to(dev)
    b = len(ids)
    emb = torch.randn(b, L, d, device=dev, dtype=dtype)
    feats = torch.randn(tiles, t * t, d, device=dev, dtype=dtype) if sizes else None
    nl = torch.randn(d, device=dev, dtype=dtype)
    vid = torch.randn(*videos, t * t, d, device=dev, dtype=dtype) if videos else None
    kw = dict(inputs_embeds=emb, input_ids=input_ids, image_features=feats, image_sizes=sizes or None,
              image_newline=nl, image_token_id=IMG, pinpoints=pins, tile=tile, max_tiles=mx,
              single_tile=flags if sizes else None, video_features=vid, video_token_id=VID if videos else None)
    es = emb.element_size()
    n_feat_rows = (feats.shape[0] * t * t if feats is not None else 0) + (vid.shape[0] * vid.shape[1] * t * t
                                                                          if vid is not None else 0)
    n_text = int(((input_ids != IMG) & (input_ids != VID)).sum())
    fwd_bytes = n_feat_rows * d * es + n_text * d * es + b * L * d * es
    bwd_bytes = b * L * d * es + n_feat_rows * d * es + b * L * d * es
    n_img = len(sizes)
    desc = (f"{name}: B={b} L={L} D={d} t={t} images={n_img} tiles={tiles}"
            + (f" video={videos[0]}x{videos[1]}f" if videos else ""))
    meta = dict(variant=variant, t=t, d=d, counts=None)
    return kw, desc, fwd_bytes, bwd_bytes, meta


def hf_provider(kw, variant):
    """transformers' own packing + placeholder mask + masked_scatter, on a stand-in ``self`` with the config."""
    from transformers.models.llava_next.modeling_llava_next import LlavaNextModel
    from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

    from llava_fast.ops import anyres

    t = kw["image_features"].shape[1] if kw["image_features"] is not None else kw["video_features"].shape[2]
    side = int(round(t ** 0.5))
    vc = types.SimpleNamespace(image_size=kw["tile"], patch_size=kw["tile"] // side)
    cfg = types.SimpleNamespace(vision_config=vc, image_grid_pinpoints=kw["pinpoints"], image_token_id=IMG,
                                video_token_id=VID)
    me = types.SimpleNamespace(config=cfg)
    dev = kw["inputs_embeds"].device
    sizes_t = torch.tensor(kw["image_sizes"], device=dev) if kw["image_sizes"] else None
    counts = ([1 if s else anyres.num_tiles(hw, kw["pinpoints"], kw["tile"])
               for hw, s in zip(kw["image_sizes"], kw["single_tile"])] if kw["image_sizes"] else None)
    Model = LlavaNextModel if variant == "next" else LlavaOnevisionModel

    def fn(emb, feats, nl, vid):
        ids = kw["input_ids"]
        if feats is not None:
            parts = torch.split(feats, counts, dim=0)
            if variant == "next":
                packed, _ = Model.pack_image_features(me, parts, sizes_t, "default", image_newline=nl)
            else:
                packed, _ = Model.pack_image_features(me, parts, sizes_t, image_newline=nl,
                                                      vision_aspect_ratio="anyres_max_9")
            f = torch.cat(packed, dim=0)
            mask, _ = LlavaOnevisionModel.get_placeholder_mask(me, ids, emb, image_features=f)
            emb = emb.masked_scatter(mask, f.to(emb.dtype))
        if vid is not None:
            v = LlavaOnevisionModel.apply_pooling(me, vid.flatten(0, 1))
            v = v.reshape(vid.shape[0], -1, v.shape[-1])
            v = torch.cat((v, nl[None, None, :].expand(vid.shape[0], 1, -1).to(v.dtype)), dim=1).flatten(0, 1)
            _, vmask = LlavaOnevisionModel.get_placeholder_mask(me, ids, emb, video_features=v)
            emb = emb.masked_scatter(vmask, v.to(emb.dtype))
        return emb

    return fn


def measure(rows, name, provider, shape, dtype, mode, fn, nbytes, warmup, rep, copy_gbps=None):
    """One row timed with calls back to back (``timing="loop"``: the ratios against ref and hf compare those; in a
    training step the call is issued while the vision tower's kernels still run, so its host work overlaps unless it
    synchronises, as HF's count check does); for our rows the kernels alone too (CUDA-graph replay, cold L2), whose
    GB/s is what the bandwidth target is about: in the note. The H100 run of 2026-11-26 timed one call on an idle GPU:
    0.36 ms for ov05_single's 4.5 MB of traffic, i.e. host latency, not the kernels."""
    try:
        t = bench(fn, warmup, rep, timing=os.environ.get("LLAVA_FAST_BENCH_TIMING", "loop"))
        peak = peak_memory(fn)
        gbps = nbytes / t["ms"] / 1e6
        ours = provider.startswith("llava_fast")
        note = f"{100 * gbps / copy_gbps:.0f}% of copy" if copy_gbps and ours else ""
        if ours and torch.cuda.is_available():
            g = bench(fn, warmup, rep, timing="graph")
            if g["timing"].startswith("graph"):
                ggbps = nbytes / g["ms"] / 1e6
                note += f"; kernels alone {g['ms']:.3f} ms, {ggbps:.0f} GB/s" + (
                    f" = {100 * ggbps / copy_gbps:.0f}% of copy" if copy_gbps else "") + " (graph)"
            else:
                note += f"; {g['timing']}"
        rows.append(Row(bench=name, provider=provider, shape=shape, dtype=str(dtype).split(".")[-1], mode=mode,
                        ms=t["ms"], ms_p20=t["ms_p20"], ms_p80=t["ms_p80"], metric=gbps, unit="GB/s", peak_gib=peak,
                        note=note, timing=t["timing"]))
    except Exception as e:  # a baseline failing must not stop the run
        rows.append(Row(bench=name, provider=provider, shape=shape, dtype=str(dtype).split(".")[-1], mode=mode,
                        note=f"failed: {type(e).__name__}: {str(e)[:120]}"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (about 30-60 s on an H100)")
    ap.add_argument("--compile", action="store_true", help="no effect (no torch.compile provider here); accepted so "
                                                           "every bench_*.py takes the same flags")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--smoke", action="store_true", help="CPU check of this script (Triton interpreter, toy sizes)")
    args = ap.parse_args()
    dev = "cpu" if args.smoke else "cuda"
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    elif not torch.cuda.is_available():
        print("bench_pack_features: needs a CUDA GPU; nothing measured on this machine.")
        return 0
    import llava_fast
    from llava_fast.ops import pack_features as P

    if args.smoke:
        llava_fast.set_backend("pack_features", "triton")
    dtype = getattr(torch, args.dtype)
    warmup, rep = (3, 10) if args.quick else (10, 40)
    if args.smoke:
        warmup, rep = 1, 1
    rows: list[Row] = []
    copy_gbps = copy_bandwidth(rows, device=dev, numel=1 << (14 if args.smoke else 28))
    print(f"copy bandwidth: {copy_gbps:.0f} GB/s")

    for case in ("next8_7b", "ov05_single", "ov05_multi4", "ov05_video32"):
        kw, desc, fwd_b, bwd_b, meta = make_case(case, dev, dtype, smoke=args.smoke)
        print(desc)
        shape = desc.split(": ", 1)[1]
        emb, feats, nl, vid = kw["inputs_embeds"], kw["image_features"], kw["image_newline"], kw["video_features"]
        rest = {k: v for k, v in kw.items() if k not in ("inputs_embeds", "image_features", "image_newline",
                                                         "video_features")}
        ids = rest.pop("input_ids")
        hf = hf_provider(kw, meta["variant"])
        providers = {
            "llava_fast": lambda e, f, n, v: P.pack_and_scatter(e, ids, f, image_newline=n, video_features=v, **rest),
            "ref": lambda e, f, n, v: P.pack_and_scatter_ref(e, ids, f, image_newline=n, video_features=v, **rest),
            "hf": hf,
        }
        plan = P.build_plan([(h, w, bool(s)) for (h, w), s in zip(kw["image_sizes"] or [], kw["single_tile"] or [])],
                            kw["pinpoints"], kw["tile"], meta["t"], kw["max_tiles"], True,
                            vid.shape[0] if vid is not None else 0, vid.shape[1] if vid is not None else 0)
        if plan.copy_only:
            def general(e, f, n, v):
                before = os.environ.get("LLAVA_FAST_PACK_COPY")
                os.environ["LLAVA_FAST_PACK_COPY"] = "0"
                try:
                    return P.pack_and_scatter(e, ids, f, image_newline=n, video_features=v, **rest)
                finally:
                    if before is None:
                        os.environ.pop("LLAVA_FAST_PACK_COPY")
                    else:
                        os.environ["LLAVA_FAST_PACK_COPY"] = before
            providers = {"llava_fast": providers["llava_fast"], "llava_fast_general": general,
                         **{k: v for k, v in providers.items() if k != "llava_fast"}}
        with torch.no_grad():  # same answer as the baselines before timing anything
            outs = {}
            for prov, f in providers.items():
                try:
                    outs[prov] = f(emb, feats, nl, vid).float()
                except Exception as e:
                    print(f"  {prov} failed: {type(e).__name__}: {e}")
            for prov in ("ref", "hf"):
                if prov in outs and "llava_fast" in outs:
                    print(f"  max |llava_fast - {prov}| = {(outs['llava_fast'] - outs[prov]).abs().max().item():.3e}")
            del outs
        # host cost of a plan the cache has not seen (new image sizes): cleared caches, median of a few builds
        t_plan = []
        for _ in range(3 if not args.smoke else 1):
            P._PLAN_CACHE.clear()
            P._image_plan.cache_clear()
            P._video_plan.cache_clear()
            t0 = time.perf_counter()
            P.build_plan([(h, w, bool(s)) for (h, w), s in zip(kw["image_sizes"] or [], kw["single_tile"] or [])],
                         kw["pinpoints"], kw["tile"], meta["t"], kw["max_tiles"], True,
                         vid.shape[0] if vid is not None else 0, vid.shape[1] if vid is not None else 0)
            t_plan.append((time.perf_counter() - t0) * 1e3)
        rows.append(Row(bench=case, provider="plan_build", shape=shape, dtype="host", mode="host",
                        ms=sorted(t_plan)[len(t_plan) // 2], note="numpy plan of a new batch (cache miss), CPU ms"))
        # leaves for fwd+bwd
        le = emb.detach().clone().requires_grad_()
        lf = feats.detach().clone().requires_grad_() if feats is not None else None
        ln = nl.detach().clone().requires_grad_()
        lv = vid.detach().clone().requires_grad_() if vid is not None else None
        leaves = [x for x in (le, lf, ln, lv) if x is not None]
        gout = torch.randn_like(emb)
        for prov, f in providers.items():
            with torch.no_grad():
                measure(rows, case, prov, shape, dtype, "fwd", lambda: f(emb, feats, nl, vid), fwd_b, warmup, rep,
                        copy_gbps)

            def fb():
                out = f(le, lf, ln, lv)
                return torch.autograd.grad(out, leaves, gout)

            measure(rows, case, prov, shape, dtype, "fwd+bwd", fb, fwd_b + bwd_b, warmup, rep, copy_gbps)
        add_ratios(rows)
        save(rows, "pack_features")  # keep what is measured so far, in case a time limit stops the run
    add_ratios(rows)
    md = to_markdown(rows)
    print(md)
    path = save(rows, "pack_features")
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
