"""API audit of ``pack_and_scatter``: the Triton path (forced, interpreter on CPU) against the reference path of the
same public function, on layouts, dtypes and autograd situations tests/ops/test_pack_features.py does not cover. No
defect was found; these pin the cases checked. Inputs come from that file's ``make_case``."""
import pytest
import torch

import llava_fast
from llava_fast.ops.pack_features import pack_and_scatter
from tests.ops.test_pack_features import EPS32, IMG, NEXT_PINS, TILE, make_case
from tests.ops.audit_common import assert_same, both, kdev  # noqa: F401 (kdev: a fixture)


def _both(fn):
    return both("pack_features", fn, 9)


def _assert_same(ref, got, atol):
    assert_same(ref, got, atol=atol, rtol=0)


def _ov_case(**kw):
    """OneVision: anyres_max bilinear (170x170), single tile, NeXT-like copy, a 2-frame video; padded batch."""
    return make_case("ov", [[("img", (170, 170), False), ("vid", 0)], [("img", (20, 20), True),
                                                                       ("img", (60, 84), False)]],
                     t=3, d=8, videos=(1, 2), **kw)


CASES = ["transposed_embeds", "sliced_embeds", "transposed_features", "expanded_grad", "strided_grad",
         "broadcast_grad", "embeds_frozen", "features_frozen", "newline_frozen", "video_frozen", "only_features",
         "retain_graph", "int32_ids", "video_3d", "fp16_newline", "fp16_features_fp32_embeds",
         "fp32_features_fp16_embeds"]


@pytest.mark.parametrize("case", CASES)
def test_cases(case):
    if case == "video_3d":
        base = make_case("ov", [[("vid", 0)]], t=3, d=8, videos=(1, 2))
    else:
        base = _ov_case(dtype=torch.float16 if case == "fp32_features_fp16_embeds" else torch.float32)
    emb0, ids, feats0, sizes, nl0, kw = base
    frozen = {"embeds_frozen": ("emb",), "features_frozen": ("feat",), "newline_frozen": ("nl",),
              "video_frozen": ("vid",), "only_features": ("emb", "nl", "vid")}.get(case, ())
    feat_dt = {"fp16_features_fp32_embeds": torch.float16, "fp32_features_fp16_embeds": torch.float32}.get(case)

    def f():
        emb = emb0.clone().requires_grad_("emb" not in frozen)
        feats = feats0.to(feat_dt or feats0.dtype).requires_grad_("feat" not in frozen) if feats0 is not None else None
        nl = nl0.to(torch.float16 if case == "fp16_newline" else feat_dt or nl0.dtype).requires_grad_("nl" not in frozen)
        vid = kw["video_features"].to(feat_dt or kw["video_features"].dtype).requires_grad_("vid" not in frozen)
        e_in, f_in, v_in = emb, feats, vid
        if case == "transposed_embeds":
            emb = emb0.transpose(0, 1).contiguous().requires_grad_()
            e_in = emb.transpose(0, 1)
        elif case == "sliced_embeds":
            emb = torch.cat([emb0, emb0], -1).requires_grad_()
            e_in = emb[..., 1::2]
        elif case == "transposed_features":
            feats = feats0.transpose(0, 1).contiguous().requires_grad_()
            f_in = feats.transpose(0, 1)
        elif case == "video_3d":
            v_in = vid[0]
        out = pack_and_scatter(e_in, ids.int() if case == "int32_ids" else ids, f_in, sizes, nl,
                               **dict(kw, video_features=v_in))
        if case == "expanded_grad":
            loss = out.sum()
        elif case == "strided_grad":
            loss = (out[..., ::2].float() ** 2).sum()
        elif case == "broadcast_grad":
            loss = (out * torch.randn(out.shape[-1], dtype=out.dtype)).sum()
        else:
            loss = (out.float() * torch.randn(out.shape)).sum()
        leaves = [t for t in (emb, feats, nl, vid) if t is not None and t.requires_grad]
        g = torch.autograd.grad(loss, leaves, retain_graph=case == "retain_graph")
        if case == "retain_graph":
            for a, b in zip(g, torch.autograd.grad(loss, leaves)):
                assert torch.equal(a, b)
        return [out.detach(), *g]

    ref, got = _both(f)
    assert got[0].dtype == emb0.dtype
    half = case.startswith("fp16") or case.startswith("fp32_features")
    # fp32: bilinear taps and gradient sums in another order (see test_pack_features.py); fp16: 1-2 ulp of |x| <~ 8
    _assert_same(ref, got, atol=1e-2 if half else 64 * EPS32 * 8)


def test_no_image_tokens_and_empty_sequence():
    """No image in the batch (0 tiles) and an empty sequence: the text is copied and nothing else is touched."""
    for b, l in ((2, 5), (2, 0)):
        emb = torch.randn(b, l, 8, requires_grad=True)
        ids = torch.randint(1, 50, (b, l))
        feats = torch.randn(0, 4, 8, requires_grad=True)
        nl = torch.randn(8, requires_grad=True)
        outs = []
        for backend in ("reference", "triton"):
            llava_fast.set_backend("pack_features", backend)
            try:
                out = pack_and_scatter(emb, ids, feats, [], nl, image_token_id=IMG, pinpoints=NEXT_PINS, tile=TILE)
                (g,) = torch.autograd.grad((out * 2).sum(), [emb])
            finally:
                llava_fast.set_backend("all", "auto")
            outs.append((out, g))
        for out, g in outs:
            assert torch.equal(out, emb) and torch.equal(g, torch.full_like(emb, 2.0))
