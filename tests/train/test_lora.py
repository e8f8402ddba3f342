"""LoRA through peft: only adapters train on the language model, and merging folds them into plain weights."""
from __future__ import annotations

import pytest
import torch

import llava_fast

peft = pytest.importorskip("peft", reason="peft not installed (pip install llava_fast[peft])")


@pytest.mark.parametrize("checkpointing", [False, True])
def test_lora_trains_adapters_and_merges(tmp_path, checkpointing, monkeypatch):
    """Every adapter gets a gradient, with activation checkpointing too (the embeddings are frozen, so a layer's
    input needs no gradient: a reentrant checkpoint gives the adapters none or fails, users.md 1.12)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
    from tiny import save_tiny

    from llava_fast.train.config import TrainSection
    from llava_fast.train.lora import apply_lora, merge_lora

    _, path = save_tiny(tmp_path, "llava_next")
    m = llava_fast.from_pretrained(path)
    m.train()
    apply_lora(m, TrainSection(lora=True, lora_r=4, lora_alpha=8))
    m.model.language_model.gradient_checkpointing = checkpointing
    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    trainable = [n for n, p in m.model.language_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert not m.config.tie_word_embeddings and not any(p.requires_grad for p in m.lm_head.parameters())
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        untrained = m(input_ids=ids).logits
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
    for step in range(2):
        m(input_ids=ids, labels=ids).loss.backward()
        if step == 0:  # every adapter is in the graph (lora_B starts at zero, so its gradient is the non-zero one)
            lora_b = {n: p.grad for n, p in m.model.language_model.named_parameters() if "lora_B" in n}
            assert len(lora_b) == 7 * len(m.model.language_model.layers)
            missing = sorted({n.split(".lora_B")[0].split(".")[-1] for n, g in lora_b.items()
                              if g is None or not g.abs().sum() > 0})
            assert not missing, f"LoRA adapters without gradient (bypassed by the model): {missing}"
        opt.step()
        opt.zero_grad()
    assert bool(calls) == checkpointing
    m.eval()
    with torch.no_grad():
        before = m(input_ids=ids).logits
    assert not torch.allclose(before, untrained)  # the adapters changed the model
    merge_lora(m)
    assert not any("lora_" in n for n, _ in m.named_parameters())
    with torch.no_grad():
        after = m(input_ids=ids).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    m.save_pretrained(tmp_path / "merged")
    again = llava_fast.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, after, atol=0, rtol=0)
