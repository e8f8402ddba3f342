"""``llava-fast demo --quick`` runs end to end (generation, model, stage 1 + 2 with packing, eval, one answer)."""
from llava_fast.demo import run_demo


def test_demo_quick(tmp_path, capsys):
    assert run_demo(out_dir=str(tmp_path / "demo"), seed=0, device="cpu", quick=True) == 0
    out = capsys.readouterr().out
    for text in ("[1/5]", "stage 1 done", "stage 2 done", "held-out accuracy", "Q: ", "A: "):
        assert text in out
    assert (tmp_path / "demo" / "stage2" / "final" / "config.json").exists()
