"""pack_features input validation: mismatched or malformed arguments fail with a clear ValueError (nothing silently
dropped or reinterpreted), and the reference and the Triton path (forced; TRITON_INTERPRET=1 on CPU) agree."""
from __future__ import annotations

import pytest
import torch

import llava_fast
from llava_fast.ops import pack_features as P
from llava_fast.ops.pack_features import pack_and_scatter, pack_and_scatter_ref, pack_image_features_ref
from tests.ops.test_pack_features import IMG, make_case


@pytest.fixture(params=["reference", "triton"])
def packer(request):
    """pack_and_scatter_ref, and pack_and_scatter with the Triton path forced."""
    if request.param == "reference":
        yield pack_and_scatter_ref
        return
    if not P.HAS_TRITON:
        pytest.skip("no triton")
    llava_fast.set_backend("pack_features", "triton")
    try:
        yield pack_and_scatter
    finally:
        llava_fast.set_backend("pack_features", "auto")


def _two_images():
    return make_case("next", [[("img", (20, 20), False), ("img", (20, 20), False)]], t=2, d=8)


def test_pack_image_features_ref_needs_one_size_per_image():
    emb, ids, feats, sizes, nl, kw = _two_images()
    per_image = list(feats.split(feats.shape[0] // 2))
    # zip() used to pack only the first image and drop the second without a word
    with pytest.raises(ValueError, match="2 images in features but 1 in image_sizes"):
        pack_image_features_ref(per_image, sizes[:1], nl, kw["pinpoints"], kw["tile"])
    with pytest.raises(ValueError, match="1 images in features but 2 in image_sizes"):
        pack_image_features_ref(per_image[:1], sizes, nl, kw["pinpoints"], kw["tile"])


def test_image_sizes_tensor_must_be_n_by_2(packer):
    emb, ids, feats, sizes, nl, kw = _two_images()
    # (1, 4) was reshaped to (2, 2) and accepted; (2, 3) (sizes + flags) was read as three garbled sizes
    for bad in (torch.tensor([[20, 20, 20, 20]]), torch.tensor([[20, 20, 0], [20, 20, 0]])):
        with pytest.raises(ValueError, match=r"image_sizes must be an \(N, 2\)"):
            packer(emb, ids, feats, bad, nl, **kw)
    good = packer(emb, ids, feats, torch.tensor(sizes), nl, **kw)
    assert torch.equal(good, pack_and_scatter_ref(emb, ids, feats, sizes, nl, **kw))


def test_empty_image_batch(packer):
    """No images (0 tiles, no sizes): the text passes through unchanged (the reference used to fail in torch.cat),
    and image tokens without features are still reported."""
    emb, ids, feats, sizes, nl, kw = _two_images()
    text_ids = torch.where(ids == IMG, torch.ones_like(ids), ids)
    kw = dict(kw, single_tile=[])
    out = packer(emb, text_ids, feats[:0], [], nl, **kw)
    assert torch.equal(out, emb)
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        packer(emb, ids, feats[:0], [], nl, **kw)


@pytest.mark.parametrize("max_tiles", [0, -1, 9.0])
def test_max_tiles_must_be_positive_int(packer, max_tiles):
    emb, ids, feats, sizes, nl, kw = _two_images()
    with pytest.raises(ValueError, match="max_tiles"):  # was ZeroDivisionError (0) or silently ignored
        packer(emb, ids, feats, sizes, nl, **dict(kw, max_tiles=max_tiles))
