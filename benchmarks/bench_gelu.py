"""GELU (tanh: the SigLIP tower's MLP activation in LLaVA-OneVision; erf: the projector's) in GB/s, and what the
act_linear backward pays for it.

Providers, all measured in this run: ``llava_fast`` (Triton, ops/gelu.py), ``hf`` (torch's ``F.gelu``, one kernel
each way, as transformers), ``compile`` (``torch.compile`` of it; left out of ``--quick`` unless ``--compile``). The
row that matters for training is ``recompute+bwd``: act_linear recomputes the activation for fc2's weight gradient
and differentiates it, torch with two kernels (``gelu`` again, then ``gelu_backward``: 5 T I b moved), ours with
one that also writes the output (``gelu_bwd_out``: 4 T I b), both graph-timed. A large bf16 ``copy_`` gives this
GPU's copy bandwidth in the same run.

Bytes (b = element size, T tokens, I width): fwd 2 T I b, bwd 3 T I b (read dy, x; write dx), recompute+bwd 4 T I b
(what the fused kernel moves; torch's pair moves 5). Shapes: the OneVision-0.5B step's SigLIP fc1 output (10 tiles x
729 tokens, 4304) and 4x that.

Run: ``python benchmarks/bench_gelu.py [--quick [--compile]]`` (needs a CUDA GPU; exits cleanly without one).
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_rms_norm import activation_main, measure  # noqa: E402


def main(argv=None):
    def load():
        from llava_fast.ops.gelu import gelu, gelu_ref

        return gelu, gelu_ref

    def recompute_and_bwd(rows, x, gy, shape, dtype, kw, warmup, rep):
        """act_linear's backward of the activation: ours in one launch, torch's gelu + gelu_backward in two."""
        from llava_fast.ops.gelu import gelu_ref

        approx = kw["approximate"]
        nbytes = 4 * x.numel() * x.element_size()
        measure(rows, "gelu", "llava_fast", shape, dtype, "recompute+bwd",
                lambda: torch.ops.llava_fast.gelu_bwd_out(gy, x, approx), nbytes, warmup, rep)
        measure(rows, "gelu", "hf", shape, dtype, "recompute+bwd",
                lambda: (gelu_ref(x, approx), torch.ops.aten.gelu_backward(gy, x, approximate=approx)),
                nbytes, warmup, rep)

    shapes = [(t, 4304, "tanh", {"approximate": "tanh"}) for t in (7290, 29160)]
    return activation_main("gelu", shapes, load, extra=recompute_and_bwd, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
