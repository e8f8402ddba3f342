"""``llava-fast demo --quick`` runs end to end (generation, model, stage 1 + 2 with packing, eval, one answer); the
generated data and the initial model are a function of the seed; the pictures follow the demo's geometry."""
import json
import random

import numpy as np
import torch

from llava_fast import demo
from llava_fast.demo import run_demo


def test_demo_quick(tmp_path, capsys):
    assert run_demo(out_dir=str(tmp_path / "demo"), seed=0, device="cpu", quick=True) == 0
    out = capsys.readouterr().out
    for text in ("[1/5]", "stage 1 done", "stage 2 done", "held-out accuracy", "Q: ", "A: "):
        assert text in out
    assert (tmp_path / "demo" / "stage2" / "final" / "config.json").exists()


def test_data_and_model_deterministic(tmp_path):
    for k in ("a", "b"):
        demo.make_data(str(tmp_path / k), seed=3, n_caption=6, n_qa=6, n_eval=6)
    for name in ("stage1.json", "stage2.json", "eval.json"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text()
    for p in sorted((tmp_path / "a" / "images").iterdir()):
        assert p.read_bytes() == (tmp_path / "b" / "images" / p.name).read_bytes()
    m1, _ = demo.build_tiny_model(str(tmp_path / "m1"), seed=3, quick=True)
    m2, _ = demo.build_tiny_model(str(tmp_path / "m2"), seed=3, quick=True)
    for (n, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), n
    held = json.loads((tmp_path / "a" / "eval.json").read_text())
    assert {it["kind"] for it in held} <= {"colour", "shape", "count", "position"}


def test_pictures_geometry():
    rng = random.Random(0)
    for _ in range(200):
        im, f = demo.draw_picture(rng)
        h, w = im.size[1], im.size[0]
        assert [h, w] in demo.PINPOINTS  # tiles cut without resampling
        assert f["count"] in demo.COUNTS and f["colour"] in demo.COLOURS and f["shape"] in demo.SHAPES
        a = np.asarray(im).astype(int)
        fg = (np.abs(a - a[0, 0]).max(-1) > 60)  # shape pixels (background is near white, one colour)
        ys, xs = np.nonzero(fg)
        assert len(ys) > 0
        if f["position"]:  # a single shape: inside one corner cell, on the side the answer says
            assert (ys.max() < h / 2) == (f["position"]["height"] == "top")
            assert (xs.max() < w / 2) == (f["position"]["side"] == "left")
            assert ys.max() - ys.min() < demo.CELL and xs.max() - xs.min() < demo.CELL
        # every shape lies in a corner cell: nothing in the middle band of either axis
        mid_y = (ys >= demo.CELL) & (ys < h - demo.CELL)
        mid_x = (xs >= demo.CELL) & (xs < w - demo.CELL)
        assert not (mid_y & mid_x).any()


def test_sincos_position_embedding():
    from llava_fast.models import LlavaConfig, LlavaNextForConditionalGeneration

    cfg = LlavaConfig.from_hf_dict({"model_type": "llava_next", "image_grid_pinpoints": demo.PINPOINTS,
                                    "vision_config": {"model_type": "clip_vision_model", "hidden_size": 16,
                                                      "intermediate_size": 32, "num_hidden_layers": 1,
                                                      "num_attention_heads": 2, "image_size": 56, "patch_size": 14},
                                    "text_config": {"model_type": "llama", "vocab_size": 64, "hidden_size": 32,
                                                    "intermediate_size": 48, "num_hidden_layers": 1,
                                                    "num_attention_heads": 2, "num_key_value_heads": 2,
                                                    "max_position_embeddings": 256, "rms_norm_eps": 1e-5}})
    model = LlavaNextForConditionalGeneration(cfg)
    demo.sincos_position_embedding(model)
    pe = dict(model.named_parameters())
    w = [v for k, v in pe.items() if k.endswith("embeddings.position_embedding.weight")][0].detach()
    assert w.shape == (17, 16) and torch.all(w[0] == 0)
    grid = w[1:].view(4, 4, 16)
    # first half codes the row (same along a row), second half the column (same down a column)
    assert torch.allclose(grid[:, :1, :8].expand(4, 4, 8), grid[:, :, :8])
    assert torch.allclose(grid[:1, :, 8:].expand(4, 4, 8), grid[:, :, 8:])
    assert len({tuple(r.tolist()) for r in w[1:]}) == 16  # every patch position distinct


def test_demo_deterministic(tmp_path, monkeypatch, capsys):
    """Same seed, same run: the exported weights are bit-for-bit equal (CPU, one thread)."""
    from safetensors.torch import load_file

    monkeypatch.setattr(demo, "QUICK", dict(n_caption=24, n_qa=24, n_eval=8, epochs1=1, epochs2=1))
    for k in ("a", "b"):
        run_demo(out_dir=str(tmp_path / k), seed=5, device="cpu", quick=True)
    wa = load_file(str(tmp_path / "a" / "stage2" / "final" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "stage2" / "final" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[n], wb[n]) for n in wa)
    runs = capsys.readouterr().out.split("llava-fast demo:")[1:]
    answers = [[ln for ln in r.splitlines() if "held-out accuracy" in ln or "A: " in ln] for r in runs]
    assert len(answers[0]) == 2 and answers[0] == answers[1]
