"""Validation up front (drops counted with reasons, --strict raises) and robust image decoding."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from llava_fast.data import (DataError, ImageProcessorConfig, LlavaDataset, collate_packed,
                             collate_padded, load_image, load_image_u8)
from llava_fast.data.word_tokenizer import build_word_tokenizer

SPEC = ImageProcessorConfig.for_variant("llava_next", tile=56, patch_size=14,
                                        image_grid_pinpoints=[[56, 112], [112, 56], [112, 112]])
IMG_ID = 4


@pytest.fixture(scope="module")
def tok():
    return build_word_tokenizer("what colour is it red blue".split())


def conv(q="<image>\nwhat colour is it ?", a="red"):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    rgb = (np.random.default_rng(0).random((40, 70, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(d / "rgb.png")
    Image.fromarray(rgb[..., 0]).save(d / "gray.png")
    Image.fromarray(rgb).convert("CMYK").save(d / "cmyk.jpg")
    rgba = np.concatenate([rgb, np.zeros((40, 70, 1), np.uint8)], -1)  # fully transparent
    Image.fromarray(rgba, "RGBA").save(d / "rgba.png")
    Image.fromarray(rgb).convert("P").save(d / "pal.png")
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(d / "gray16.png")
    Image.new("RGB", (80, 60)).save(d / "big.png")
    data = (d / "rgb.png").read_bytes()
    (d / "truncated.png").write_bytes(data[: len(data) // 2])
    (d / "garbage.jpg").write_bytes(b"not an image at all" * 10)
    return d


def test_load_image_modes(image_dir):
    for name in ("rgb.png", "gray.png", "cmyk.jpg", "rgba.png", "pal.png", "gray16.png"):
        im = load_image(str(image_dir / name))
        assert im.mode == "RGB" and im.size == (70, 40), name
    # transparency composited over white (transformers' convert_to_rgb)
    assert np.asarray(load_image(str(image_dir / "rgba.png"))).min() == 255


def test_load_image_u8_equals_pil_decode(image_dir, tmp_path, monkeypatch):
    """The dataset's decoder: JPEG through torchvision when it passed its self-check against PIL, all else through
    load_image; either way PIL's pixels, and the same errors."""
    from llava_fast.data import images as I

    yy, xx = np.mgrid[0:333, 0:517]
    noise = np.random.default_rng(1).integers(-30, 30, (333, 517, 3))
    photo = np.clip(np.stack([xx / 2, yy / 1.4, 255 - xx / 3], -1) + noise, 0, 255).astype(np.uint8)
    Image.fromarray(photo).save(tmp_path / "p420.jpg", quality=90)                 # 4:2:0
    Image.fromarray(photo).save(tmp_path / "p444.jpg", quality=95, subsampling=0)
    Image.fromarray(photo).save(tmp_path / "prog.jpg", quality=80, progressive=True)
    Image.fromarray(photo[..., 1]).save(tmp_path / "grey.jpg", quality=90)
    data = (tmp_path / "p420.jpg").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) * 2 // 3])
    files = [tmp_path / n for n in ("p420.jpg", "p444.jpg", "prog.jpg", "grey.jpg")]
    files += [image_dir / n for n in ("rgb.png", "gray.png", "cmyk.jpg", "rgba.png", "pal.png", "gray16.png")]
    for use_tv in (True, False):
        if not use_tv:
            monkeypatch.setattr(I, "_tv_jpeg", False)
        for f in files:
            got = load_image_u8(str(f))
            ref = torch.from_numpy(np.array(load_image(str(f)))).permute(2, 0, 1)
            assert got.dtype == torch.uint8 and torch.equal(got, ref), (f.name, use_tv)
        with pytest.raises(Exception, match="trunc.jpg"):
            load_image_u8(str(tmp_path / "trunc.jpg"))
        with pytest.raises(Exception, match="garbage.jpg"):
            load_image_u8(str(image_dir / "garbage.jpg"))
    monkeypatch.setattr(I, "_tv_jpeg", None)
    print("torchvision JPEG decoder in use:", I._jpeg_decoder() is not None)


def test_exif_orientation_not_applied_in_training_data(tmp_path, monkeypatch):
    """Training data is read as the original LLaVA code reads it (Image.open(...).convert("RGB")): the EXIF
    orientation tag is not applied, by either decoder (llava-fast chat applies it, as transformers' load_image)."""
    from llava_fast.data import images as I

    stored = np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to display
    Image.fromarray(stored).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    with Image.open(tmp_path / "phone.jpg") as im:
        want = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
    for use_tv in (True, False):
        if not use_tv:
            monkeypatch.setattr(I, "_tv_jpeg", False)
        got = load_image_u8(str(tmp_path / "phone.jpg"))
        assert got.shape == (3, 30, 50) and torch.equal(got, want), use_tv
    monkeypatch.setattr(I, "_tv_jpeg", None)


def test_drops_counted_and_strict(tmp_path, image_dir, tok):
    recs = [
        {"id": "ok", "image": "rgb.png", "conversations": conv()},
        {"id": "gray", "image": "gray.png", "conversations": conv()},
        {"id": "cmyk", "image": ["cmyk.jpg"], "conversations": conv()},
        {"id": "text", "conversations": conv("what colour is it ?")},
        {"id": "missing", "image": "nope.png", "conversations": conv()},
        {"id": "garbage", "image": "garbage.jpg", "conversations": conv()},
        {"id": "mismatch", "image": ["rgb.png", "gray.png"], "conversations": conv()},
        {"id": "no_tag", "image": "rgb.png", "conversations": conv("what colour ?")},
        {"id": "roles", "image": "rgb.png", "conversations": conv() + conv()[:1] + conv()[:1]},
        {"id": "long", "image": "rgb.png", "conversations": conv("what " * 200) + conv()},
        {"id": "cut_answers", "image": "rgb.png", "conversations": conv("<image>\n" + "what " * 200)},
        {"id": "empty_answer", "image": "rgb.png", "conversations": conv(a="")},  # kept: </s> is supervised
        {"id": "trunc", "image": "truncated.png", "conversations": conv()},
        {"id": "format"},
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs))
    logs = []
    ds = LlavaDataset(str(path), str(image_dir), tok, SPEC, "vicuna_v1", IMG_ID, max_len=160, log=logs.append)
    assert ds.drops.counts == {"missing_image": 1, "unreadable_image": 1, "placeholder_mismatch": 2,
                               "bad_roles": 1, "truncation_cuts_image": 1, "truncated_no_labels": 1,
                               "bad_format": 1}
    assert {it.sample_id for it in ds.items} == {"ok", "gray", "cmyk", "text", "empty_answer", "trunc"}
    assert any("nope.png" in m for m in logs)
    # the truncated image passes the header probe, fails in the worker: dropped and counted by the collator
    idx = [k for k, it in enumerate(ds.items) if it.sample_id == "trunc"][0]
    b = collate_packed([ds[i] for i in range(len(ds))])
    assert b["dropped"] == {"decode_error": 1} and b["num_samples"] == 5
    assert "trunc" not in b["sample_ids"]
    assert idx >= 0
    with pytest.raises(DataError, match="truncated.png"):
        _strict_get(path, image_dir, tok)
    with pytest.raises(DataError, match="missing_image"):
        LlavaDataset(str(path), str(image_dir), tok, SPEC, "vicuna_v1", IMG_ID, max_len=160, strict=True)


def _strict_get(path, image_dir, tok):
    recs = [json.loads(line) for line in open(path)]
    recs = [r for r in recs if r.get("id") in ("ok", "trunc")]
    ds = LlavaDataset(recs, str(image_dir), tok, SPEC, "vicuna_v1", IMG_ID, max_len=160, strict=True)
    return [ds[i] for i in range(len(ds))]


def test_oversized_dropped(tmp_path, image_dir, tok):
    recs = [{"id": "big", "image": "big.png", "conversations": conv()},
            {"id": "ok", "image": "gray.png", "conversations": conv()}]
    ds = LlavaDataset(recs, str(image_dir), tok, SPEC, "vicuna_v1", IMG_ID, max_len=512, max_pixels=2800)
    assert ds.drops.counts == {"image_too_large": 1} and len(ds) == 1


def test_token_counts_known_before_loading(image_dir, tok):
    recs = [{"id": str(k), "image": "rgb.png", "conversations": conv()} for k in range(3)]
    recs.append({"id": "t", "conversations": conv("what colour is it ?", "blue")})
    ds = LlavaDataset(recs, str(image_dir), tok, SPEC, "vicuna_v1", IMG_ID, max_len=512)
    for i in range(len(ds)):
        s = ds[i]
        assert len(s["input_ids"]) == ds.lengths[i]
        n_img = int((s["input_ids"] == IMG_ID).sum())
        assert n_img == (SPEC.num_image_tokens((40, 70)) if i < 3 else 0)
        if i < 3:
            assert s["pixel_values"].shape == (SPEC.num_tiles((40, 70)), 3, 56, 56)
    # packed: one row, cu_seqlens, positions restarting per sample, image sizes in placeholder order
    b = collate_packed([ds[i] for i in range(len(ds))])
    cu = b["cu_seqlens"].tolist()
    assert cu == [0] + list(np.cumsum(ds.lengths))
    assert b["cu_seqlens"].dtype == torch.int32
    pos = b["position_ids"][0]
    for a, e in zip(cu[:-1], cu[1:]):
        assert pos[a:e].tolist() == list(range(e - a))
    assert b["image_sizes"].tolist() == [[40, 70]] * 3
    assert b["num_items"] == sum(ds.supervised)
    # padded: as transformers batches it
    p = collate_padded([ds[i] for i in range(len(ds))], pad_id=3)
    assert p["input_ids"].shape == (4, max(ds.lengths)) and p["attention_mask"].sum() == sum(ds.lengths)
    assert p["pixel_values"].dim() == 5 and p["num_items"] == b["num_items"]


def test_truncation_counted_and_logged(image_dir, tok):
    """A sample cut at max_len (its tail: never image tokens) is kept, but counted and logged, not cut silently."""
    recs = [{"id": "short", "image": "rgb.png", "conversations": conv()},
            {"id": "long_answer", "image": "rgb.png", "conversations": conv(a="red " * 60)}]
    logs = []
    full = LlavaDataset(recs, str(image_dir), tok, SPEC, "vicuna_v1", IMG_ID, max_len=512, log=logs.append)
    assert full.truncated == 0 and not logs
    ds = LlavaDataset(recs, str(image_dir), tok, SPEC, "vicuna_v1", IMG_ID, max_len=full.lengths[1] - 10,
                      log=logs.append)
    assert len(ds) == 2 and ds.drops.total == 0
    assert ds.truncated == 1 and ds.lengths == [full.lengths[0], full.lengths[1] - 10]
    assert ds.supervised[1] == full.supervised[1] - 10
    assert any("truncated sample 'long_answer'" in m and "the last 10 cut" in m for m in logs), logs
    assert len(ds[1]["input_ids"]) == ds.lengths[1]


def test_image_changed_after_indexing_is_dropped_not_cut(tmp_path, image_dir, tok):
    """The token counts are planned from the header when the dataset is built; an image that decodes to another
    size later (the file changed) is dropped as decode_error (strict: raises), never cut to the planned length."""
    Image.open(image_dir / "rgb.png").save(tmp_path / "a.png")
    recs = [{"id": "changed", "image": "a.png", "conversations": conv()}]
    ds = LlavaDataset(recs, str(tmp_path), tok, SPEC, "vicuna_v1", IMG_ID, max_len=512)
    strict = LlavaDataset(recs, str(tmp_path), tok, SPEC, "vicuna_v1", IMG_ID, max_len=512, strict=True)
    assert len(ds[0]["input_ids"]) == ds.lengths[0]
    Image.new("RGB", (112, 112)).save(tmp_path / "a.png")  # more tiles and tokens than planned
    s = ds[0]
    assert s.get("dropped") == "decode_error" and "a.png" in s["message"], s.keys()
    assert collate_packed([s])["dropped"] == {"decode_error": 1}
    with pytest.raises(DataError, match="a.png decodes to 112x112"):
        strict[0]


def test_malformed_data_file_names_file_and_line(tmp_path):
    from llava_fast.data.dataset import read_records

    good = '{"id": "a", "conversations": []}'
    (tmp_path / "d.jsonl").write_text(good + "\n\n" + good + "\n{oops\n")
    with pytest.raises(ValueError, match=r"d\.jsonl, line 4: not valid JSON"):
        read_records(str(tmp_path / "d.jsonl"))
    (tmp_path / "d.json").write_text("[" + good + ",\n" + good + ",]")
    with pytest.raises(ValueError, match=r"d\.json: not valid JSON .* line 2"):
        read_records(str(tmp_path / "d.json"))
    (tmp_path / "ok.jsonl").write_text(good + "\n" + good + "\n")
    assert len(read_records(str(tmp_path / "ok.jsonl"))) == 2


def _same_items(a, b):
    assert len(a.items) == len(b.items)
    for x, y in zip(a.items, b.items):
        for f in x.__dataclass_fields__:
            u, v = getattr(x, f), getattr(y, f)
            assert (np.array_equal(u, v) and u.dtype == v.dtype) if isinstance(u, np.ndarray) else u == v, (x, f)


def _recs():
    return [{"id": "ok", "image": "rgb.png", "conversations": conv()},
            {"id": "two", "image": "gray.png", "conversations": conv() + conv("what is it ?", "blue")},
            {"id": "text", "conversations": conv("what colour is it ?")},
            {"id": "missing", "image": "nope.png", "conversations": conv()},
            {"id": "long", "image": "rgb.png",
             "conversations": conv("<image>\n" + "what " * 20) + conv("is it " * 60, "red")},
            {"id": "vid", "video": ["rgb.png", "gray.png"], "conversations": conv("<video>\nwhat is it ?")},
            {"id": "missing2", "image": "nope2.png", "conversations": conv()}]  # a drop after the truncation


def test_index_cache_loads_the_same_index_and_reports_the_same_drops(tmp_path, image_dir, tok):
    """The index of a data file is kept in cache_dir and loaded from there (no record read, no header probed): the
    same items, lengths, drops and truncations, and the same drop lines in the log."""
    import llava_fast.data.dataset as D

    path = tmp_path / "d.json"
    path.write_text(json.dumps(_recs()))
    kw = dict(max_len=120, video_token_id=5, cache_dir=str(tmp_path / "cache"))
    logs_a, logs_b = [], []
    a = LlavaDataset(str(path), str(image_dir), tok, SPEC, "vicuna_v1", IMG_ID, log=logs_a.append, **kw)
    assert not a.from_cache and a.drops.counts == {"missing_image": 2} and a.truncated == 1
    real = D.LlavaDataset._build_index
    D.LlavaDataset._build_index = lambda *_: pytest.fail("indexed again")
    try:
        b = LlavaDataset(str(path), str(image_dir), tok, SPEC, "vicuna_v1", IMG_ID, log=logs_b.append, **kw)
    finally:
        D.LlavaDataset._build_index = real
    assert b.from_cache and b.num_records == 7
    _same_items(a, b)
    assert b.lengths == a.lengths and b.supervised == a.supervised and b.truncated == a.truncated
    assert b.drops.counts == a.drops.counts and b.drops.examples == a.drops.examples
    assert [m for m in logs_b if "loaded from" not in m] == logs_a, (logs_a, logs_b)  # in the same order
    assert [m.split(" ")[0] for m in logs_a[:3]] == ["dropped", "truncated", "dropped"]
    for i in range(len(a)):  # what the workers load is the same too
        sa, sb = a[i], b[i]
        assert torch.equal(sa["input_ids"], sb["input_ids"]) and torch.equal(sa["labels"], sb["labels"])


def test_index_cache_is_rebuilt_when_anything_it_depends_on_changes(tmp_path, image_dir, tok):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(_recs()))
    cache = tmp_path / "cache"
    base = dict(max_len=120, video_token_id=5, cache_dir=str(cache), log=lambda m: None)

    def build(t=tok, template="vicuna_v1", **over):
        return LlavaDataset(str(path), str(image_dir), t, SPEC, template, IMG_ID, **{**base, **over})

    assert not build().from_cache and build().from_cache
    assert not build(max_len=400).from_cache  # a setting
    assert not build(template="plain").from_cache  # the template
    assert not build(t=build_word_tokenizer("what colour is it red blue green".split())).from_cache  # tokenizer
    path.write_text(json.dumps(_recs()[:4]))  # the data file
    d = build()
    assert not d.from_cache and d.num_records == 4
    assert build().from_cache
    # a cache file that cannot be read: indexed again (said in the log), and written anew
    for f in cache.iterdir():
        f.write_bytes(b"PK\x03\x04 broken")
    logs = []
    e = build(log=logs.append)
    assert not e.from_cache and any("could not be read" in m for m in logs)
    assert build().from_cache


def test_index_cache_keeps_labels_that_are_not_the_ids(tmp_path, image_dir, tok):
    """Labels are stored as one bit per token (the ids where supervised); an index whose labels are something else
    is stored in full."""
    from llava_fast.data.dataset import _IndexCache

    path = tmp_path / "d.json"
    path.write_text(json.dumps(_recs()))
    kw = dict(max_len=120, video_token_id=5, log=lambda m: None)
    a = LlavaDataset(str(path), str(image_dir), tok, SPEC, "vicuna_v1", IMG_ID, **kw)
    a.items[0].labels[-1] = a.items[0].ids[-1] + 1
    _IndexCache(str(tmp_path / "c"), a, str(path)).save(a)
    b = LlavaDataset(str(path), str(image_dir), tok, SPEC, "vicuna_v1", IMG_ID, cache_dir=str(tmp_path / "c"), **kw)
    assert b.from_cache
    _same_items(a, b)


def test_indexing_in_worker_processes_gives_the_same_index(tmp_path, image_dir, tok, monkeypatch):
    """Large files are indexed in forked worker processes, in chunks: the same items, drops (in the same order, with
    the same log lines) and truncations as indexing in this process; a strict run still stops at the first bad
    sample, naming it."""
    recs = [dict(r, id=f"{r['id']}{k}") for k, r in enumerate(_recs() * 3)]
    monkeypatch.setattr(LlavaDataset, "CHUNK", 4)
    kw = dict(max_len=120, video_token_id=5)
    runs = {}
    for w in (1, 2):
        logs = []
        runs[w] = (LlavaDataset(recs, str(image_dir), tok, SPEC, "vicuna_v1", IMG_ID, index_workers=w,
                                log=logs.append, **kw), logs)
    (a, la), (b, lb) = runs[1], runs[2]
    _same_items(a, b)
    assert la == lb and a.drops.counts == b.drops.counts == {"missing_image": 6} and a.truncated == b.truncated == 3
    with pytest.raises(DataError, match="'missing3': missing_image"):
        LlavaDataset(recs, str(image_dir), tok, SPEC, "vicuna_v1", IMG_ID, index_workers=2, strict=True, **kw)


def test_progress_bars_for_large_files(tmp_path, image_dir, tok, monkeypatch, capsys):
    """progress=True (the trainer's log.progress on the main rank) shows bars for the header probes and the index of
    a file of PROGRESS_MIN records or more, on stderr, and nothing for a smaller file or with progress off; the
    index is the same either way."""
    monkeypatch.setattr(LlavaDataset, "PROGRESS_MIN", len(_recs()))
    kw = dict(max_len=120, video_token_id=5, log=lambda _: None)
    quiet = LlavaDataset(_recs(), str(image_dir), tok, SPEC, "vicuna_v1", IMG_ID, **kw)
    assert capsys.readouterr().err == ""
    shown = LlavaDataset(_recs(), str(image_dir), tok, SPEC, "vicuna_v1", IMG_ID, progress=True, **kw)
    err = capsys.readouterr().err
    assert "data: image headers" in err and "data: index" in err and "7/7" in err
    _same_items(quiet, shown)
    LlavaDataset(_recs()[:-1], str(image_dir), tok, SPEC, "vicuna_v1", IMG_ID, progress=True, **kw)
    assert capsys.readouterr().err == ""  # below PROGRESS_MIN
