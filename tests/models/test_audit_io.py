"""Audit of checkpoint IO (llava_fast/models/io.py): bad files named with the fix, dtype / max_shard_size arguments
checked, folders transformers leaves behind loaded as transformers loads them, and saves that never clobber a file, a
symlink, the working directory or a leftover of an earlier save."""
from __future__ import annotations

import json
import os
import shutil
import stat
import warnings

import pytest
import torch
from safetensors.torch import load_file
from tiny import VOCAB, hf_model, save_tiny

import llava_fast


@pytest.fixture(scope="module")
def next_ckpt(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("audit_next"), "llava_next")[1]


@pytest.fixture(scope="module")
def next_model(next_ckpt):
    return llava_fast.from_pretrained(next_ckpt)


def _folder(src, dst, files):
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    for name, data in files.items():
        (dst / name).write_bytes(data)
    return dst


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_corrupt_safetensors_is_named(next_ckpt, tmp_path):
    """A truncated or empty weight file (an interrupted download or copy) gets a ValueError naming the file and the
    fix, not safetensors' bare 'Error while deserializing header'."""
    raw = (next_ckpt / "model.safetensors").read_bytes()
    for name, data in {"truncated": raw[: len(raw) // 2], "empty": b""}.items():
        d = _folder(next_ckpt, tmp_path / name, {"model.safetensors": data})
        with pytest.raises(ValueError, match=rf"{d / 'model.safetensors'} is not a readable safetensors file.*"
                                             rf"corrupt or truncated.*again"):
            llava_fast.from_pretrained(d)


def test_bad_index_and_config_are_named(next_ckpt, tmp_path):
    for name, data in {"not_json": b"{oops", "no_weight_map": b"{}", "list_map": b'{"weight_map": []}'}.items():
        d = _folder(next_ckpt, tmp_path / name, {"model.safetensors.index.json": data})
        with pytest.raises(ValueError, match=rf"{d / 'model.safetensors.index.json'} is not a valid safetensors "
                                             rf"index.*'weight_map'"):
            llava_fast.from_pretrained(d)
    d = tmp_path / "bad_config"
    shutil.copytree(next_ckpt, d)
    (d / "config.json").write_text("{bad json")
    with pytest.raises(ValueError, match=rf"{d / 'config.json'} is not valid JSON"):
        llava_fast.from_pretrained(d)


def test_transformers_unsharded_save_over_sharded_folder_loads(tmp_path):
    """transformers 5.x saving unsharded into a folder that held a sharded checkpoint deletes the shards but leaves
    the old model.safetensors.index.json; transformers then loads model.safetensors. So must we (the stale index named
    missing shards and the checkpoint did not load at all)."""
    import transformers as tf

    a, b = hf_model("llava", seed=1), hf_model("llava", seed=2)
    d = tmp_path / "ckpt"
    b.save_pretrained(d, max_shard_size="20KB")
    a.save_pretrained(d)
    assert (d / "model.safetensors.index.json").is_file() and not list(d.glob("model-*"))
    with pytest.warns(UserWarning, match="holds both model.safetensors and model.safetensors.index.json"):
        ours = llava_fast.from_pretrained(d)
    ref = tf.LlavaForConditionalGeneration.from_pretrained(d)
    assert torch.equal(ref.lm_head.weight, a.lm_head.weight)
    assert torch.equal(ours.lm_head.weight, ref.lm_head.weight)
    assert torch.equal(ours.model.multi_modal_projector.linear_1.weight, a.model.multi_modal_projector.linear_1.weight)


def test_dtype_argument_is_checked(next_ckpt, tmp_path):
    """Only the dtypes a saved config.json can name load: float64 loaded fine but saved a checkpoint that no
    llava_fast load accepts, int8 failed deep inside load_state_dict, a non-dtype with a TypeError from Tensor.to."""
    for bad in (torch.float64, torch.int8, 3, "float64", "int"):
        with pytest.raises(ValueError, match=r"from_pretrained: dtype must be .*float32.*float16.*bfloat16"):
            llava_fast.from_pretrained(next_ckpt, dtype=bad)
    # the names config.json may hold are accepted here too; "auto" keeps the checkpoint's dtype (as transformers)
    for name in ("bf16", "torch.bfloat16", "bfloat16"):
        assert llava_fast.from_pretrained(next_ckpt, dtype=name).dtype == torch.bfloat16
    assert llava_fast.from_pretrained(next_ckpt, dtype="auto").dtype == torch.float32
    m = llava_fast.from_pretrained(next_ckpt, dtype="fp16")
    m.save_pretrained(tmp_path / "half")
    assert llava_fast.from_pretrained(tmp_path / "half").dtype == torch.float16


def test_max_shard_size_units(next_model, tmp_path):
    """transformers' binary units (KiB/MiB/GiB) are understood; a size that is no size names the argument."""
    next_model.save_pretrained(tmp_path / "kib", max_shard_size="20KiB")
    index = json.loads((tmp_path / "kib" / "model.safetensors.index.json").read_text())
    shards = [load_file(str(tmp_path / "kib" / f)) for f in sorted(set(index["weight_map"].values()))]
    assert len(shards) > 1
    for shard in shards:   # over the limit only when one tensor alone is
        assert len(shard) == 1 or sum(t.numel() * t.element_size() for t in shard.values()) <= 20 * 1024
    _same_weights(llava_fast.from_pretrained(tmp_path / "kib"), next_model)
    next_model.save_pretrained(tmp_path / "gib", max_shard_size="1GiB")
    assert (tmp_path / "gib" / "model.safetensors").is_file()
    for bad in ("big", "5XB", "", "infGB", True):
        with pytest.raises(ValueError, match=r"max_shard_size must be .*got"):
            next_model.save_pretrained(tmp_path / "bad", max_shard_size=bad)
    assert not (tmp_path / "bad").exists()


def test_leftover_of_an_earlier_save_does_not_block_saving(next_model, tmp_path):
    """A save whose deletion of the previous folder was cut short (killed during the rmtree) leaves .ckpt.old-<pid>;
    the next save from a process with the same pid (containers reuse pids) failed with 'Directory not empty'."""
    out = tmp_path / "ckpt"
    next_model.save_pretrained(out)
    stale = tmp_path / f".ckpt.old-{os.getpid()}"
    stale.mkdir()
    (stale / "model.safetensors").write_text("partly deleted")
    next_model.save_pretrained(out)
    _same_weights(llava_fast.from_pretrained(out), next_model)
    assert (stale / "model.safetensors").read_text() == "partly deleted"   # not ours to delete
    assert sorted(p.name for p in tmp_path.iterdir()) == [stale.name, "ckpt"]


def test_save_never_replaces_a_file(next_model, tmp_path):
    """transformers refuses a file as save directory; we moved the file aside to a hidden name and put a checkpoint
    folder in its place."""
    f = tmp_path / "weights"
    f.write_text("user data")
    with pytest.raises(ValueError, match=r"is a file, not a folder"):
        next_model.save_pretrained(f)
    assert f.is_file() and f.read_text() == "user data"
    assert [p.name for p in tmp_path.iterdir()] == ["weights"]


def test_save_through_a_symlinked_folder(next_model, next_ckpt, tmp_path):
    """latest -> step_100: the save goes into step_100 (as transformers writes through the link) and the link stays;
    the link was replaced by a new folder, step_100 kept the old weights and a dangling .latest.old-<pid> link was
    left behind."""
    real = tmp_path / "step_100"
    shutil.copytree(next_ckpt, real)
    (real / "tokenizer.json").write_text("{}")
    link = tmp_path / "latest"
    link.symlink_to(real.name)
    m = llava_fast.from_pretrained(next_ckpt)
    with torch.no_grad():
        m.model.image_newline.add_(1.0)
    m.save_pretrained(link)
    assert link.is_symlink() and os.readlink(link) == real.name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_100"]
    assert (real / "tokenizer.json").read_text() == "{}"
    _same_weights(llava_fast.from_pretrained(real), m)


def test_save_into_the_working_directory_is_refused(next_model, tmp_path, monkeypatch):
    """The save swaps the whole folder: into "." it failed with 'Device or resource busy', and into the working
    directory by name it left the process in a deleted directory. Both are refused with the way out, nothing moved."""
    out = tmp_path / "ckpt"
    next_model.save_pretrained(out)
    before = sorted(p.name for p in out.iterdir())
    (out / "sub").mkdir()
    for cwd, target in ((out, "."), (out, str(out)), (out / "sub", "..")):
        monkeypatch.chdir(cwd)
        with pytest.raises(ValueError, match=r"current working directory.*os.chdir"):
            next_model.save_pretrained(target)
        assert os.getcwd() == str(cwd) and os.path.isdir(os.getcwd())
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir()) == sorted(before + ["sub"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_save_untied_config_with_shared_weights(tmp_path):
    """config.tie_word_embeddings set to False on a tied model (to train lm_head on its own from here): the save
    writes both tensors (safetensors refused tensors that share memory with a RuntimeError)."""
    import transformers as tf

    _, path = save_tiny(tmp_path, "llava_onevision")
    m = llava_fast.from_pretrained(path)
    assert m.lm_head.weight is m.model.language_model.embed_tokens.weight
    m.config.tie_word_embeddings = False
    m.save_pretrained(tmp_path / "untied")
    sd = load_file(str(tmp_path / "untied" / "model.safetensors"))
    assert torch.equal(sd["language_model.lm_head.weight"], sd["language_model.model.embed_tokens.weight"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back = llava_fast.from_pretrained(tmp_path / "untied")
    assert not back.config.tie_word_embeddings
    assert back.lm_head.weight is not back.model.language_model.embed_tokens.weight
    _same_weights(back, m)
    ref = tf.LlavaOnevisionForConditionalGeneration.from_pretrained(tmp_path / "untied", attn_implementation="eager")
    ids = torch.tensor([[1, 2, 3, VOCAB - 1]])
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, ref.eval()(input_ids=ids).logits, atol=1e-4, rtol=0)


def test_saved_folder_permissions(next_model, tmp_path):
    """A new checkpoint folder gets the umask's mode as transformers' (tempfile.mkdtemp made it 0700: unreadable to
    the group), and saving over a folder keeps its mode."""
    mask = os.umask(0o022)
    try:
        next_model.save_pretrained(tmp_path / "new")
        assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o755
        os.chmod(tmp_path / "new", 0o750)
        next_model.save_pretrained(tmp_path / "new")
        assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o750
    finally:
        os.umask(mask)
