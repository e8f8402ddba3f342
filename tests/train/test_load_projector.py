"""model.projector: stage 2 from a stage-1 projector of the original LLaVA code (mm_projector.bin, the file its
--pretrain_mm_mlp_adapter takes), a safetensors file or a llava-hf folder."""
from __future__ import annotations

import pickle

import pytest
import torch

from llava_fast.train.build import build_model, load_projector

DV, DT = 32, 64  # the tiny tower's and language model's widths (tests/models/tiny.py)


def original_projector(seed=0):
    """The original build_vision_projector('mlp2x_gelu'): nn.Sequential(Linear(Dv, Dt), GELU(), Linear(Dt, Dt)),
    saved by the original stage 1 under model.mm_projector.* (get_mm_adapter_state_maybe_zero_3)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(DV, DT), torch.nn.GELU(), torch.nn.Linear(DT, DT))


def _model(path):
    import llava_fast

    return llava_fast.from_pretrained(path, dtype=torch.float32)


@pytest.mark.parametrize("fmt", ["bin", "safetensors", "hf_keys"])
def test_original_stage1_projector_loads_and_computes_as_the_original(tmp_path, fmt):
    """The projector loaded from the original's file computes what the original's nn.Sequential computes."""
    from models.tiny import save_tiny

    _, path = save_tiny(tmp_path, "llava_next")
    model = _model(path)
    seq = original_projector()
    state = {f"model.mm_projector.{k}": v for k, v in seq.state_dict().items()}
    if fmt == "hf_keys":
        state = {k.replace("model.mm_projector.0.", "multi_modal_projector.linear_1.")
                  .replace("model.mm_projector.2.", "multi_modal_projector.linear_2."): v for k, v in state.items()}
    state["model.image_newline"] = torch.randn(DT)
    if fmt == "bin":
        f = tmp_path / "mm_projector.bin"
        torch.save(state, f)
    else:
        from safetensors.torch import save_file

        f = tmp_path / "projector.safetensors"
        save_file(state, str(f))
    logs = []
    before = {k: v.clone() for k, v in model.state_dict().items() if "multi_modal_projector" not in k
              and "image_newline" not in k}
    load_projector(model, str(f), log=logs.append)
    assert "5 tensors" in logs[0], logs
    x = torch.randn(7, DV)
    with torch.no_grad():
        torch.testing.assert_close(model.model.multi_modal_projector(x), seq(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model.model.image_newline.detach(), state["model.image_newline"], rtol=0, atol=0)
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())  # nothing else touched


def test_projector_from_a_llava_hf_folder_through_build_model(tmp_path, monkeypatch):
    """model.projector=DIR (a llava-hf checkpoint, e.g. our stage-1 export) with model.path: the projector of the
    other folder; the rest of the model is --model's."""
    from models.tiny import save_tiny

    from llava_fast.train.config import ModelSection

    a, pa = save_tiny(tmp_path / "a", "llava_next", seed=0)
    b, pb = save_tiny(tmp_path / "b", "llava_next", seed=1)
    monkeypatch.setattr("llava_fast.data.load_tokenizer", lambda p: "tokenizer")  # the tiny folders have none
    model, tok = build_model(ModelSection(path=str(pa), projector=str(pb)), log=lambda *_: None)
    assert tok == "tokenizer"
    sa, sb = a.state_dict(), b.state_dict()
    ours = model.model.multi_modal_projector.state_dict()
    for name in ("linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"):
        want = next(v for k, v in sb.items() if k.endswith("multi_modal_projector." + name))
        torch.testing.assert_close(ours[name], want, rtol=0, atol=0)
    newline_b = next(v for k, v in sb.items() if k.endswith("image_newline"))
    torch.testing.assert_close(model.model.image_newline.detach(), newline_b, rtol=0, atol=0)
    emb_a = next(v for k, v in sa.items() if k.endswith("embed_tokens.weight"))
    torch.testing.assert_close(model.model.language_model.embed_tokens.weight.detach(), emb_a, rtol=0, atol=0)


def test_projector_files_that_do_not_fit_name_the_tensor(tmp_path):
    from models.tiny import save_tiny

    _, path = save_tiny(tmp_path, "llava_next")
    model = _model(path)
    seq = original_projector()
    f = tmp_path / "p.bin"
    # trained for a wider language model: 4096-wide output (as a 7B's projector on the tiny model)
    wide = torch.nn.Sequential(torch.nn.Linear(DV, 96), torch.nn.GELU(), torch.nn.Linear(96, 96))
    torch.save({f"model.mm_projector.{k}": v for k, v in wide.state_dict().items()}, f)
    with pytest.raises(ValueError, match=r"model.mm_projector.0.weight \(96, 32\) vs the model's "
                                         r"model.multi_modal_projector.linear_1.weight \(64, 32\)"):
        load_projector(model, str(f))
    torch.save({f"model.mm_projector.{k}": v for k, v in seq.state_dict().items() if k.startswith("0.")}, f)
    with pytest.raises(ValueError, match=r"missing \['model.multi_modal_projector.linear_2.bias'"):
        load_projector(model, str(f))
    torch.save({"model.mm_projector.weight": torch.zeros(DT, DV), "model.mm_projector.bias": torch.zeros(DT)}, f)
    with pytest.raises(ValueError, match="not an mlp2x_gelu projector"):  # the original's 'linear' projector type
        load_projector(model, str(f))
    with pytest.raises(FileNotFoundError, match="model.projector .*nope.bin: no such file"):
        load_projector(model, str(tmp_path / "nope.bin"))


class _Evil:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_a_pickle_with_code_is_refused_not_run(tmp_path, capsys):
    """torch.load(weights_only=True): a .bin holding anything but tensors is an error, and its code does not run."""
    from models.tiny import save_tiny

    _, path = save_tiny(tmp_path, "llava_next")
    f = tmp_path / "evil.bin"
    with open(f, "wb") as fh:
        pickle.dump({"model.mm_projector.0.weight": _Evil()}, fh, protocol=2)
    with pytest.raises(ValueError, match=r"evil.bin: cannot read it as a tensor dict .*weights_only=True"):
        load_projector(_model(path), str(f))
    assert "pickled code ran" not in capsys.readouterr().out
