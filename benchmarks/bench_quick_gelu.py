"""QuickGELU ``x * sigmoid(1.702 * x)`` (CLIP's MLP activation) forward / backward / fwd+bwd in GB/s.

Providers, all measured in this run: ``llava_fast`` (one Triton kernel each way; the backward recomputes the sigmoid),
``hf`` (transformers' ``QuickGELUActivation``: three elementwise kernels forward, autograd's five backward),
``compile`` (``torch.compile`` of it; left out of ``--quick`` unless ``--compile``). Liger-Kernel has no QuickGELU.
A large bf16 ``copy_`` gives this GPU's copy bandwidth in the same run.

Bytes (the same for every provider; b = element size, T tokens, I the MLP width): fwd 2 T I b (read x, write y); bwd
3 T I b (read dy, x; write dx). Eager's extra traffic (its temporaries) is not counted, so its GB/s is what an ideal
kernel would need to match. Shapes: the CLIP-L tower's fc1 output at stage 1 (16 x 577 tokens, 4096) and at the
NeXT prefill (40 tiles x 577).

Run: ``python benchmarks/bench_quick_gelu.py [--quick [--compile]]`` (needs a CUDA GPU; exits cleanly without one).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_rms_norm import activation_main  # noqa: E402


def main(argv=None):
    def load():
        from llava_fast.ops.quick_gelu import quick_gelu, quick_gelu_ref

        return quick_gelu, quick_gelu_ref

    return activation_main("quick_gelu", [(16 * 577, 4096, "", {}), (40 * 577, 4096, "", {})], load, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
