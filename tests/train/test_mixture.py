"""LLaVA-NeXT's YAML data mixtures (``--data_path onevision.yaml``): each listed file's records, sampled by its
``sampling_strategy``, in the order listed; a cached index follows every listed file."""
from __future__ import annotations

import json
import math
import random

import pytest

from llava_fast.data import read_records
from llava_fast.train import Trainer
from tests.train.test_trainer import make_cfg


def _write(folder, name, n, tag):
    recs = [{"id": f"{tag}{i}", "conversations": [{"from": "human", "value": f"q{i}"},
                                                    {"from": "gpt", "value": f"a{i}"}]} for i in range(n)]
    p = folder / name
    if name.endswith(".jsonl"):
        p.write_text("".join(json.dumps(r) + "\n" for r in recs))
    else:
        p.write_text(json.dumps(recs))
    return recs


def test_sampling_strategies_as_llava_next(tmp_path):
    a, b = _write(tmp_path, "a.json", 7, "a"), _write(tmp_path, "b.jsonl", 10, "b")
    c, d = _write(tmp_path, "c.json", 9, "c"), _write(tmp_path, "d.json", 5, "d")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "mix.yaml").write_text(f"""datasets:
  - json_path: {tmp_path / 'a.json'}
    sampling_strategy: first:50%
  - json_path: ../b.jsonl
    sampling_strategy: end:3
  - json_path: {tmp_path / 'c.json'}
    sampling_strategy: random:4
  - json_path: {tmp_path / 'd.json'}
""")
    got = read_records(str(tmp_path / "sub" / "mix.yaml"))
    shuffled = list(c)
    random.Random(0).shuffle(shuffled)
    assert math.ceil(50 * 7 / 100) == 4
    assert got == a[:4] + b[-3:] + shuffled[:4] + d
    assert read_records(str(tmp_path / "sub" / "mix.yaml")) == got  # the same draw every time
    assert len({r["id"] for r in got[7:11]} & {r["id"] for r in c}) == 4


@pytest.mark.parametrize("text, match", [
    ("datasets: []", "expected 'datasets:' with a list"),
    ("datasets:\n  - sampling_strategy: all", "dataset 0 has no json_path"),
    ("datasets:\n  - json_path: a.json\n    sampling_strategy: some:3", "sampling_strategy 'some:3'"),
    ("datasets:\n  - json_path: a.json\n  - json_path: missing.json", "dataset 1: missing.json not found"),
    ("datasets:\n  - json_path: other.yaml", "is a mixture itself"),
    ("datasets: [", "not valid YAML"),
])
def test_bad_mixtures_are_named(tmp_path, text, match):
    _write(tmp_path, "a.json", 3, "a")
    (tmp_path / "mix.yaml").write_text(text)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        read_records(str(tmp_path / "mix.yaml"))


def test_training_on_a_mixture_and_its_cached_index(assets, tmp_path):
    """A run on a mixture trains on the sampled records; its cached index is reused, and rebuilt when a listed file
    changes (the YAML itself unchanged)."""
    src = json.loads((assets / "data" / "stage2.json").read_text())
    (tmp_path / "part.json").write_text(json.dumps(src[:10]))
    (tmp_path / "mix.yaml").write_text("datasets:\n  - json_path: part.json\n    sampling_strategy: first:6\n"
                                       f"  - json_path: {assets / 'data' / 'stage2.json'}\n"
                                       "    sampling_strategy: end:4\n")

    def run(out):
        cfg = make_cfg(assets, out, **{"schedule.max_steps": 1, "data.index_cache": "true"})
        cfg.data.data = str(tmp_path / "mix.yaml")
        tr = Trainer(cfg, quiet=True)
        tr.setup()
        return tr.dataset

    ds = run(tmp_path / "run")
    assert ds.num_records == 10 and not ds.from_cache
    assert [it.sample_id for it in ds.items][:6] == [str(r["id"]) for r in src[:6]]
    assert run(tmp_path / "run").from_cache
    (tmp_path / "part.json").write_text(json.dumps(src[:10][::-1]))  # a listed file changes
    again = run(tmp_path / "run")
    assert not again.from_cache and [it.sample_id for it in again.items][:6] == [str(r["id"]) for r in src[4:10][::-1]]


def test_cli_names_a_missing_file_of_the_mixture(assets, tmp_path, capsys):
    from llava_fast.cli import main

    (tmp_path / "mix.yaml").write_text("datasets:\n  - json_path: gone.json\n")
    rc = main(["train", "--recipe", "stage2", "--model", str(assets / "model"), "--data", str(tmp_path / "mix.yaml"),
               "--images", str(assets / "data" / "images"), "--out", str(tmp_path / "o")])
    assert rc == 2 and "dataset 0: gone.json not found" in capsys.readouterr().err
