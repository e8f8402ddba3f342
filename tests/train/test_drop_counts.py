"""Samples whose image fails to decode in the DataLoader workers are counted once as dropped ``decode_error`` (a
count of samples, as the build-time reasons), not once per load: they are loaded, and fail, again every epoch."""
import json

import pytest

from llava_fast import demo
from llava_fast.train import Trainer
from test_trainer import make_cfg


@pytest.fixture(scope="module")
def bad_assets(tmp_path_factory):
    """The demo data with the images of its first two stage-2 records cut in half: their headers still read (the
    samples are kept when the dataset is built), their pixels do not decode. Returns (root, number of such samples)."""
    root = tmp_path_factory.mktemp("bad_assets")
    demo.make_data(str(root / "data"), seed=1, n_caption=16, n_qa=24, n_eval=0)
    demo.build_tiny_model(str(root / "model"), seed=0, quick=True)
    recs = json.loads((root / "data" / "stage2.json").read_text())
    bad = {recs[0]["image"], recs[1]["image"]}
    for name in bad:
        p = root / "data" / "images" / name
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2])
    return root, sum(r.get("image") in bad for r in recs)


@pytest.mark.parametrize("workers", [0, 2])
def test_decode_error_counted_once_per_sample_over_epochs(bad_assets, tmp_path, workers):
    root, n_bad = bad_assets
    tr = Trainer(make_cfg(root, tmp_path / "o", **{"schedule.epochs": 3, "data.num_workers": workers}),
                 quiet=True)
    res = tr.train()
    assert tr.epoch == 3 and len(tr.dataset) == 24  # the bad samples pass the header probe: kept, then fail
    assert res["dropped"] == {"decode_error": n_bad} == dict(tr.drops), res["dropped"]


def test_decode_error_count_survives_resume(bad_assets, tmp_path):
    """A run resumed in its second epoch does not count again the samples it counted before the checkpoint."""
    root, n_bad = bad_assets
    over = {"schedule.epochs": 3, "checkpoint.every_steps": 100}
    first = Trainer(make_cfg(root, tmp_path / "o", **over), quiet=True)
    steps = first.setup().sampler.num_steps()
    assert first.train(stop_at_step=steps + 2)["dropped"] == {"decode_error": n_bad}
    resumed = Trainer(make_cfg(root, tmp_path / "o", **over), quiet=True)
    res = resumed.train()
    assert resumed.global_step == 3 * steps and res["dropped"] == {"decode_error": n_bad}, res["dropped"]
