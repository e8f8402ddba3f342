"""``llava-fast demo``: placeholder until the training demo lands (issue 7)."""
from __future__ import annotations


def run_demo(out_dir: str = "demo_out", seed: int = 0, device: str | None = None, quick: bool = False) -> int:
    from llava_fast.envinfo import env, format_env

    print(format_env(env()))
    return 0
