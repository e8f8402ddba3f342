"""Shared by the trainer tests: one tiny LLaVA-NeXT checkpoint and its generated data (stage-1 captions and
stage-2 questions), built once per session."""
import pytest

from llava_fast import demo


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    demo.make_data(str(root / "data"), seed=1, n_caption=16, n_qa=24, n_eval=0)
    demo.build_tiny_model(str(root / "model"), seed=0, quick=True)
    return root
