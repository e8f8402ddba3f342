"""API audit of ``fused_linear_cross_entropy``: the Triton path (forced, interpreter on CPU) against the reference
path of the same public function, for both schedules, on cases tests/ops/test_cross_entropy.py does not cover. No
defect was found; these pin the cases checked. (A second backward through the same graph raises by design: see
``test_kernel_backward_twice_raises``.)"""
import pytest
import torch

import llava_fast
from llava_fast.ops.cross_entropy import fused_linear_cross_entropy
from tests.ops.audit_common import assert_same, both, kdev  # noqa: F401 (kdev: a fixture)

TOL = dict(atol=1e-5, rtol=1e-5)  # fp32 kernel vs fp32 reference (see test_cross_entropy.py)

CASES = ["vocab_not_multiple_of_block", "sum_num_items", "ignore_index_3_no_skip", "all_ignored_no_skip",
         "zero_tokens", "one_token", "vocab_1", "hidden_frozen", "weight_frozen", "bias_only", "transposed_hidden",
         "sliced_hidden", "expanded_hidden", "transposed_weight", "strided_labels", "expanded_bias",
         "two_losses_share_weight", "loss_used_twice", "grad_output_scaled"]


def _both(fn):
    return both("cross_entropy", fn, 5)


@pytest.mark.parametrize("schedule", ["token", "vocab"])
@pytest.mark.parametrize("case", CASES)
def test_cases(case, schedule, kdev):
    n = {"zero_tokens": 0, "one_token": 1}.get(case, 10)
    h = 8
    v = {"vocab_1": 1}.get(case, 37)

    def f():
        hid = torch.randn(n, h)
        w = torch.randn(v, h) * 0.7
        lab = torch.randint(0, v, (n,))
        lab[torch.rand(n) < (1.1 if case == "all_ignored_no_skip" else 0.3)] = -100
        b = torch.randn(v) * 0.5
        kw = dict(schedule=schedule)
        hid.requires_grad_(case not in ("hidden_frozen", "bias_only"))
        w.requires_grad_(case not in ("weight_frozen", "bias_only"))
        b.requires_grad_()
        h_in, w_in, leaves = hid, w, [hid, w, b]
        if case == "transposed_hidden":
            hid = hid.detach().t().contiguous().requires_grad_()
            h_in = hid.t()
        elif case == "sliced_hidden":
            hid = torch.cat([hid.detach(), hid.detach()], 1).requires_grad_()
            h_in = hid[:, ::2]
        elif case == "expanded_hidden":
            hid = hid.detach()[:1].clone().requires_grad_()
            h_in = hid.expand(n, h)
        elif case == "transposed_weight":
            w = w.detach().t().contiguous().requires_grad_()
            w_in = w.t()
        elif case == "strided_labels":
            lab = torch.stack([lab, torch.zeros_like(lab)], 1).flatten()[::2]
        b_in = b
        if case == "expanded_bias":
            b = torch.tensor([0.3], requires_grad=True)
            b_in = b.expand(v)
        leaves = [t for t in (hid, w, b) if t.requires_grad]
        if case == "vocab_not_multiple_of_block":
            kw.update(vocab_block=10, chunk_size=4)
        elif case == "sum_num_items":
            kw.update(reduction="sum", num_items=torch.tensor([7]))
        elif case in ("ignore_index_3_no_skip", "all_ignored_no_skip"):
            kw.update(skip_ignored=False)
            if case == "ignore_index_3_no_skip":
                lab[lab == -100] = 3
                kw.update(ignore_index=3)
        if case == "two_losses_share_weight":
            loss = (fused_linear_cross_entropy(h_in[:4], w_in, lab[:4], b_in, **kw)
                    + 0.5 * fused_linear_cross_entropy(h_in[4:], w_in, lab[4:], b_in, reduction="sum", **kw))
        else:
            loss = fused_linear_cross_entropy(h_in, w_in, lab, b_in, **kw)
        if case == "loss_used_twice":
            loss = loss + 2 * loss
        elif case == "grad_output_scaled":
            loss = -2.5 * loss
        return [loss.detach(), *torch.autograd.grad(loss, leaves)]

    ref, got = _both(f)
    assert len(ref) == len(got)
    assert got[0].dtype == torch.float32 and got[0].dim() == 0
    for i, (a, b) in enumerate(zip(ref, got)):
        assert a.dtype == b.dtype and a.shape == b.shape, f"item {i}"
        torch.testing.assert_close(b, a, **TOL, msg=lambda m: f"item {i}: {m}")
