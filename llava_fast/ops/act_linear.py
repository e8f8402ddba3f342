"""``linear(act(*hs), weight, bias)`` that does not keep ``act(*hs)`` for the backward: the MLPs' second GEMM.

In an MLP ``fc2(act(fc1(x)))`` (CLIP / SigLIP towers) or ``down_proj(silu(gate) * up)`` (Llama / Qwen2), autograd
keeps, per token, the first GEMM's input, the activation's input(s) (for the activation's backward) and the
activation's output (for fc2's weight gradient). The output is a pure function of the inputs that are kept anyway,
so this op keeps only those and recomputes the activation (one elementwise pass) in the backward. Saved values per
token, counted with saved-tensor hooks (bf16, CPU): SigLIP-400M MLP 9760 -> 5456 (x, fc1 output; the GELU output
no longer), CLIP-L MLP 13312 -> 5120 (quick_gelu also kept its sigmoid), the Llama-7B MLP 37120 -> 26112 (x_ln,
gate, up; the product no longer). :func:`act_linears` does the same for several linears over one input: the vision
and language layers' q, k, v (and gate, up) over their norm's output, recomputed from x. Whole OneVision-0.5B model,
one layer of each tower (``benchmarks/saved_activations.py``, CPU, SDPA attention as on a GPU, loss apart): 628.9 MiB
against transformers' 1057.1 (0.59x). GPU peak memory and time: ``benchmarks/bench_model.py`` provider
``llava_fast_keep_act`` (``LLAVA_FAST_RECOMPUTE_ACT=0``, the previous path).

The recomputation runs the activation's own forward and backward (``torch.autograd.grad`` on the recomputed output),
so the gradients are those of the plain path up to the GEMMs' summation order (the weight gradient is computed as
``dy^T @ act`` on the flattened tokens, as autograd's linear backward does).

Since session 18 the vision towers keep theirs by default (``LLAVA_FAST_RECOMPUTE_ACT=llm``, :func:`recompute_enabled`);
``1`` recomputes there too, ``0`` (read at each call) keeps the activation everywhere; so do calls without gradients and
traces by torch.compile (its partitioner already recomputes cheap pointwise ops such as the activation instead of
saving them, and dynamo cannot trace the ``torch.autograd.grad`` of this backward). Under autocast the backward runs
in the forward's autocast state (as ``torch.amp.custom_bwd`` does).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from llava_fast import _ext
# imported here, not on first use: a first import inside a torch.compile trace would be traced (neither imports this
# module back)
from llava_fast.ops.bias_grad import bias_grad
from llava_fast.ops import layer_norm as _ln_mod

__all__ = ["act_linear", "act_linears", "act_linear_ref", "act_linears_ref", "ActLinearFunction", "ExplicitAct",
           "GeluAct", "LayerNormAct", "ResidualActLinearFunction", "fuse_residual_enabled", "fused_recompute_enabled",
           "plain_linears",
           "recompute_enabled", "residual_act_linears", "unhooked"]


# --------------------------------------------------------------------------------------------------------------------
# 1. reference (also the path without gradients)
# --------------------------------------------------------------------------------------------------------------------
def act_linears_ref(act: Callable, hs: Sequence[torch.Tensor], weights: Sequence[torch.Tensor],
                    biases: Sequence[Optional[torch.Tensor]]) -> tuple[torch.Tensor, ...]:
    return linears(act(*hs), weights, biases)


def act_linear_ref(act: Callable, hs: Sequence[torch.Tensor], weight: torch.Tensor,
                   bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    return act_linears_ref(act, hs, [weight], [bias])[0]


# --------------------------------------------------------------------------------------------------------------------
# 2. activations with their own backward
# --------------------------------------------------------------------------------------------------------------------
class ExplicitAct:
    """An activation for :func:`act_linears` that brings its own backward: ``ActLinearFunction.backward`` then
    recomputes and differentiates it by direct calls instead of a recomputation under ``enable_grad`` and a nested
    ``torch.autograd.grad`` (with the ``addmm`` below, the OneVision-0.5B step's host time on the dev CPU went from
    ~144 to ~131 ms and 10011 to 9137 aten ops, ``benchmarks/host_overhead.py``). A subclass defines

    - ``forward(*hs) -> a``;
    - ``recompute(*hs) -> (a, state)``: the backward's recomputation, with what ``grad`` needs;
    - ``grad(da, hs, state, need) -> tuple``: the gradient of each ``h`` (None where ``need`` is False);
    - ``usable(hs) -> bool`` (optional): False sends this call to the autograd path (for instance under autocast,
      whose casts the explicit backward does not replay).

    ``grad`` must call the kernels autograd would call for ``forward``, so that both paths give the same bits
    (tests/ops/test_act_linear.py compares them).

    ``pointwise = True`` (SwiGLU, GELU) says that the output has ``hs[0]``'s shape and dtype and that ``grad`` needs
    neither the output nor a state (``state`` is None): when no weight gradient is wanted (frozen linears, as in
    stage-1 pretraining's language model), the backward then skips the recomputation, which only the weight
    gradients read."""

    pointwise = False
    # ``grad_with_output(da, hs, need) -> (grads, a)`` (optional, pointwise activations without state): the
    # gradients and the recomputed output from one kernel, for the weight gradients; None: not offered
    grad_with_output = None

    def __call__(self, *hs):
        return self.forward(*hs)

    def usable(self, hs) -> bool:
        return True


class LayerNormAct(ExplicitAct):
    """``F.layer_norm(x, shape, weight, bias, eps)`` over ``hs = (x, weight, bias)``. Where the Triton kernels run
    (backend "layer_norm", opt-in: ops/layer_norm.py) the backward is one launch that recomputes the statistics and
    also writes the output for the linears' weight gradients (``grad_with_output``: no recomputation launch); elsewhere
    torch's ``native_layer_norm`` and ``native_layer_norm_backward`` with the recomputed mean and rstd, the calls
    autograd makes (the same bits). Under autocast (layer_norm runs in fp32 there) the autograd path is used."""

    def __init__(self, normalized_shape, eps: float):
        self.shape, self.eps = list(normalized_shape), eps

    def usable(self, hs) -> bool:
        return not torch.is_autocast_enabled(hs[0].device.type)

    def _kernel(self, hs) -> bool:
        return len(self.shape) == 1 and hs[0].shape[-1:] == tuple(self.shape) and _ln_mod.kernel_usable(*hs)

    def forward(self, x, weight, bias):
        if self._kernel((x, weight, bias)):
            return _ln_mod.layer_norm(x, weight, bias, self.eps)
        return F.layer_norm(x, self.shape, weight, bias, self.eps)

    def recompute(self, x, weight, bias):
        if self._kernel((x, weight, bias)):
            return _ln_mod._layer_norm_fwd_op(x, weight, bias, float(self.eps)), None
        y, mean, rstd = torch.native_layer_norm(x, self.shape, weight, bias, self.eps)
        return y, (mean, rstd)

    def _mask(self, hs, need):
        return [bool(need[0]), bool(need[1]) and hs[1] is not None, bool(need[2]) and hs[2] is not None]

    def grad(self, da, hs, state, need):
        x, weight, bias = hs
        mask = self._mask(hs, need)
        if state is None:   # the kernels' recomputation: the backward kernel recomputes the statistics itself
            dx, dw, db = _ln_mod._layer_norm_bwd_op(da, x, weight, bias, float(self.eps), mask[1], mask[2])
            return tuple(g if r else None for g, r in zip((dx, dw, db), mask))
        return torch.ops.aten.native_layer_norm_backward(da, x, self.shape, state[0], state[1], weight, bias, mask)

    def grad_with_output(self, da, hs, need):
        """``(grads, out)``: the gradients and the forward's output (the same bits as :meth:`recompute`'s), from one
        kernel launch where the kernels run, else torch's forward and backward (the calls of the other path)."""
        x, weight, bias = hs
        mask = self._mask(hs, need)
        if self._kernel(hs):
            dx, dw, db, y = _ln_mod._layer_norm_bwd_out_op(da, x, weight, bias, float(self.eps), mask[1], mask[2])
            return tuple(g if r else None for g, r in zip((dx, dw, db), mask)), y
        y, mean, rstd = torch.native_layer_norm(x, self.shape, weight, bias, self.eps)
        return torch.ops.aten.native_layer_norm_backward(da, x, self.shape, mean, rstd, weight, bias, mask), y


_gelu_ops = None


def _gelu():
    """ops/gelu.py, imported on first use (it is not imported by this module: no import cycle)."""
    global _gelu_ops
    if _gelu_ops is None:
        from llava_fast.ops import gelu as g
        _gelu_ops = g
    return _gelu_ops


class GeluAct(ExplicitAct):
    """``F.gelu(h, approximate=...)``; backward ``gelu_backward`` as autograd's. On CUDA (backend "gelu") the Triton
    kernels of ops/gelu.py instead, whose backward also writes the forward's output (``grad_with_output``: one launch
    instead of torch's recomputation + ``gelu_backward``); elsewhere torch's two kernels, the same bits as autograd."""

    pointwise = True

    def __init__(self, approximate: str = "none"):
        self.approximate = approximate

    def forward(self, h):
        g = _gelu()
        return g.gelu(h, self.approximate) if g.kernel_usable(h) else F.gelu(h, approximate=self.approximate)

    def recompute(self, h):
        g = _gelu()
        if g.kernel_usable(h):
            return g._gelu_fwd_op(h, self.approximate), None
        return F.gelu(h, approximate=self.approximate), None

    def grad(self, da, hs, state, need):
        if not need[0]:
            return (None,)
        g = _gelu()
        if g.kernel_usable(hs[0]):
            return (g._gelu_bwd_op(da, hs[0], self.approximate),)
        return (torch.ops.aten.gelu_backward(da, hs[0], approximate=self.approximate),)

    def grad_with_output(self, da, hs, need):
        """``(grads, out)``: the gradient and the forward's output (the same bits as :meth:`forward`)."""
        g = _gelu()
        if g.kernel_usable(hs[0]):
            dx, out = g._gelu_bwd_out_op(da, hs[0], self.approximate)
        else:
            out = F.gelu(hs[0], approximate=self.approximate)
            dx = torch.ops.aten.gelu_backward(da, hs[0], approximate=self.approximate)
        return (dx if need[0] else None,), out


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` without the call when it would change nothing (a no-op ``.to`` is still a dispatcher round
    trip: ~0.7 us on the dev CPU, ~600 of them per OneVision step)."""
    return t if t.dtype == dtype else t.to(dtype)


# --------------------------------------------------------------------------------------------------------------------
# 3. autograd Function (no kernel of its own: the activation's and torch's)
# --------------------------------------------------------------------------------------------------------------------
def _autocast(dev: str, dtype: torch.dtype, enabled: bool):
    """The forward's autocast state for the backward (as ``torch.amp.custom_bwd``): ``torch.autocast(dev, dtype,
    enabled)``, or nothing to enter where autocast is off in both (the usual case: entering the context costs ~10
    dispatcher calls, three backwards per decoder layer)."""
    if enabled or torch.is_autocast_enabled(dev):
        return torch.autocast(dev, dtype=dtype, enabled=enabled)
    return contextlib.nullcontext()


def _linears_backward(weights, dys, a, a_shape, a_dtype, need_w, need_b, has_bias, need_input: bool,
                      autocast_on: bool):
    """The gradients of ``linear(a, weights[i], biases[i])`` given their output gradients ``dys`` (None: unused):
    ``(dws, dbs, da)`` with ``da`` (``a_shape``) summed over the linears, None when not ``need_input`` or no output
    was used. ``a`` (the recomputed activation) is only read for the weight gradients."""
    n = len(weights)
    dws, dbs, da = [None] * n, [None] * n, None
    a2 = a.detach().reshape(-1, a.shape[-1]) if a is not None else None
    for i, (w, dy) in enumerate(zip(weights, dys)):
        if dy is None:  # this output was not used
            continue
        dy2 = dy.reshape(-1, w.shape[0])
        # autograd casts each gradient to its input's dtype (fp32 master weights under autocast)
        if need_w[i]:
            dws[i] = dy2.t().mm(a2)
        if need_b[i] and has_bias[i]:
            dbs[i] = bias_grad(dy2)   # ops/bias_grad.py: torch's sum unless backend "bias_grad" picks the kernel
        if not need_input:
            continue
        if not autocast_on:
            # the linears' input gradients summed in the GEMM's epilogue: addmm is one launch and one pass over da
            # fewer per extra linear than matmul + add (and rounds once instead of twice). In place: da is this
            # function's own buffer, and the out-of-place torch.addmm(da, ...) first copied da into a new output
            # (the stage-1 profile's "Memcpy DtoD", 3 per decoder layer: 84 MB each at LLaVA-1.5-7B's 16 x 640)
            da = dy2.mm(w) if da is None else da.addmm_(dy2, w)
        else:
            # under autocast each GEMM runs in the low dtype and, as autograd does, its result is cast to the
            # activation's dtype (fp32 with fp32 norm weights) before the sum: addmm would sum in bf16
            g = dy2.mm(w).to(a_dtype)
            da = g if da is None else da + g
    return dws, dbs, (da.view(a_shape) if da is not None else None)


def _weight_grads(weights, dys, a, need_w):
    """``dy^T @ a`` for each linear whose weight gradient is wanted (None elsewhere), as _linears_backward does."""
    a2 = a.detach().reshape(-1, a.shape[-1])
    return [dy.reshape(-1, w.shape[0]).t().mm(a2) if r and dy is not None else None
            for w, dy, r in zip(weights, dys, need_w)]


class ActLinearFunction(torch.autograd.Function):
    """forward(act, n, *weights, *biases, *hs) -> the tuple of linear(act(*hs), weights[i], biases[i]) for i < n;
    saves hs and the weights (no copies: the parameters themselves), not act(*hs)."""

    @staticmethod
    def forward(ctx, act, n, *args):
        weights, biases, hs = args[:n], args[n:2 * n], args[2 * n:]
        dev = hs[0].device.type
        # under autocast (the trainer's fp32 master weights on CUDA), the backward below runs in the same autocast
        # state, as torch.amp.custom_bwd does: the recomputed activation and the GEMMs match the forward's dtypes
        ctx.autocast = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        with torch.no_grad():
            a = act(*hs)
        ctx.act, ctx.n = act, n
        ctx.has_bias = [b is not None for b in biases]
        ctx.save_for_backward(*weights, *hs)
        return linears(a, weights, biases)

    @staticmethod
    def backward(ctx, *dys):
        # the recomputation detaches: a double backward must fail loudly, not be silently wrong. once_differentiable
        # did not suffice: its error node hangs off detached leaves, which autograd.grad w.r.t. an input never
        # visits (a wrong second derivative in silence; tests/ops/test_api_audit_projector.py found it)
        with torch.no_grad():
            grads = ActLinearFunction._backward(ctx, dys)
        if torch.is_grad_enabled() and not _ext._tracing():  # create_graph=True
            grads = _ext.not_differentiable_again(grads, (*ctx.saved_tensors, *dys), "act_linear")
        return grads

    @staticmethod
    def _backward(ctx, dys):
        n = ctx.n
        saved = ctx.saved_tensors
        weights, hs = saved[:n], saved[n:]
        dev, enabled, dtype = ctx.autocast
        need = ctx.needs_input_grad[2:]
        need_w, need_b, need_h = need[:n], need[n:2 * n], need[2 * n:]
        act = ctx.act
        with _autocast(dev, dtype, enabled):
            explicit = isinstance(act, ExplicitAct) and act.usable(hs)
            if (explicit and act.grad_with_output is not None and any(need_w) and any(need_h)
                    and fused_recompute_enabled()):
                # the activation's backward kernel also writes its output for the weight gradients: the input
                # gradients first, then one launch for the activation's gradients and output, then dW
                a_shape, a_dtype = hs[0].shape, hs[0].dtype  # pointwise, or a norm: the input's shape and dtype
                _, dbs, da = _linears_backward(weights, dys, None, a_shape, a_dtype, [False] * n, need_b,
                                               ctx.has_bias, True, enabled)
                dws, dhs = [None] * n, [None] * len(hs)
                if da is not None:
                    gs, a = act.grad_with_output(_as(da, a_dtype), hs, need_h)
                    dhs = [_as(g, h.dtype) if r and g is not None else None for g, h, r in zip(gs, hs, need_h)]
                    dws = _weight_grads(weights, dys, a, need_w)
                return (None, None, *dws, *dbs, *dhs)
            if explicit and act.pointwise and not any(need_w):
                # only the weight gradients read the activation: frozen linears skip its recomputation
                a, state, a_shape, a_dtype = None, None, hs[0].shape, hs[0].dtype
            elif explicit:  # recomputed and differentiated by direct calls (ExplicitAct)
                a, state = act.recompute(*hs)
            else:
                with torch.enable_grad():
                    leaves = [h.detach().requires_grad_(r) for h, r in zip(hs, need_h)]
                    a = act(*leaves)
            if a is not None:
                a_shape, a_dtype = a.shape, a.dtype
            dws, dbs, da = _linears_backward(weights, dys, a, a_shape, a_dtype, need_w, need_b, ctx.has_bias,
                                             any(need_h), enabled)
            dhs = [None] * len(hs)
            if da is not None and explicit:
                # as autograd does: the incoming gradient in the output's dtype, each result in its input's
                gs = act.grad(_as(da, a_dtype), hs, state, need_h)
                dhs = [_as(g, h.dtype) if r and g is not None else None for g, h, r in zip(gs, hs, need_h)]
            elif da is not None:
                want = [leaf for leaf, r in zip(leaves, need_h) if r]
                grads = iter(torch.autograd.grad(a, want, da))
                dhs = [next(grads) if r else None for r in need_h]
        return (None, None, *dws, *dbs, *dhs)


class ResidualActLinearFunction(torch.autograd.Function):
    """forward(act, n, *weights, *biases, x, residual, norm_weight) -> (*linear(norm(s), weights[i], biases[i]), s)
    with ``s = x + residual`` computed by the norm's kernel (``act``: an ExplicitAct with ``add_forward`` /
    ``add_grad``, the fused RMSNorm). Saves s, the norm weight and the norm's rstd (4 bytes per row), not norm(s):
    the linears' inputs are recomputed only for their weight gradients. The backward adds the gradient that ``s``
    received downstream inside the norm's backward kernel (no separate accumulation) and returns the sum's gradient
    for both addends."""

    @staticmethod
    def forward(ctx, act, n, *args):
        weights, biases = args[:n], args[n:2 * n]
        x, residual, nw = args[2 * n:]
        dev = x.device.type
        ctx.autocast = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        with torch.no_grad():
            a, s, rstd = act.add_forward(x, residual, nw)
        ctx.act, ctx.n = act, n
        ctx.has_bias = [b is not None for b in biases]
        ctx.dtypes = (x.dtype, residual.dtype, a.dtype)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*weights, s, nw, rstd)
        return (*linears(a, weights, biases), s)

    @staticmethod
    def backward(ctx, *grads):
        with torch.no_grad():
            out = ResidualActLinearFunction._backward(ctx, grads)
        if torch.is_grad_enabled() and not _ext._tracing():  # create_graph=True
            out = _ext.not_differentiable_again(out, (*ctx.saved_tensors, *(g for g in grads if g is not None)),
                                                "residual_act_linears")
        return out

    @staticmethod
    def _backward(ctx, grads):
        n, act = ctx.n, ctx.act
        saved = ctx.saved_tensors
        weights, (s, nw, rstd) = saved[:n], saved[n:]
        dys, ds = grads[:n], grads[n]
        need = ctx.needs_input_grad[2:]
        need_w, need_b, (need_x, need_r, need_nw) = need[:n], need[n:2 * n], need[2 * n:]
        need_in = need_x or need_r or need_nw
        dev, enabled, dtype = ctx.autocast
        a_dtype = ctx.dtypes[2]
        a_shape = (*s.shape[:-1], nw.shape[0])
        with _autocast(dev, dtype, enabled):
            a = None
            fused = any(need_w) and need_in and hasattr(act, "add_grad_with_output") and fused_recompute_enabled()
            if any(need_w) and not fused:  # the norm's output, recomputed from s for the weight gradients only
                a = act.recompute(s, nw)[0]
            dws, dbs, da = _linears_backward(weights, dys, a, a_shape, a_dtype, [r and not fused for r in need_w],
                                             need_b, ctx.has_bias, need_in, enabled)
            dsum = dnw = None
            if da is not None and fused:
                # the norm's backward kernel also writes norm(s) (the forward's bits) for the weight gradients:
                # one launch instead of a recomputation and the backward
                dsum, dnw, a = act.add_grad_with_output(_as(da, a_dtype), s, nw, rstd, ds, bool(need_nw))
                dws = _weight_grads(weights, dys, a, need_w)
            elif da is not None:
                dsum, dnw = act.add_grad(_as(da, a_dtype), s, nw, rstd, ds, bool(need_nw))
            elif ds is not None:  # the linears' outputs unused: only the downstream gradient of s
                dsum = ds
            # an unused output's parameters get zeros, as ActLinearFunction (materialized gradients) gives them
            dws = [torch.zeros_like(w) if r and g is None else g for w, r, g in zip(weights, need_w, dws)]
            dbs = [torch.zeros(w.shape[0], dtype=w.dtype, device=w.device) if r and h and g is None else g
                   for w, r, h, g in zip(weights, need_b, ctx.has_bias, dbs)]
        dx = _as(dsum, ctx.dtypes[0]) if need_x and dsum is not None else None
        dr = _as(dsum, ctx.dtypes[1]) if need_r and dsum is not None else None
        dnw = _as(dnw, nw.dtype) if need_nw and dnw is not None else None
        return (None, None, *dws, *dbs, dx, dr, dnw)


# --------------------------------------------------------------------------------------------------------------------
# 4. functional
# --------------------------------------------------------------------------------------------------------------------
def plain_linears(*modules) -> bool:
    """True when calling each module computes ``F.linear(x, m.weight, m.bias)`` and nothing else: an ``nn.Linear``,
    or a subclass that keeps its forward (FSDP2's), with no forward hooks. The models pass such modules' weights to
    :func:`act_linears`; anything else (peft's LoRA layers, whose ``.weight`` is the frozen base weight alone,
    bitsandbytes' quantized linears, hooked modules) must be called as a module, or its adapter, dequantization or
    hook would be silently skipped."""
    return all(isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward for m in modules) \
        and unhooked(*modules)


def unhooked(*modules) -> bool:
    """No forward or backward hooks on these modules: the fused paths may compute them without calling them (the
    norms whose output :func:`act_linears` recomputes, the linears of :func:`plain_linears`), and a module that is not
    called runs neither kind. Hooks registered for every module (``register_module_forward_hook`` and the like) count
    too."""
    return not (_global_hooks() or any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                                      or m._backward_pre_hooks for m in modules))


def _global_hooks() -> bool:
    """Whether hooks registered for every module are set (``register_module_forward_hook``, ``..._pre_hook``,
    ``register_module_full_backward_hook``, ...): they must see each module called with its usual input and output."""
    m = nn.modules.module
    return bool(m._global_forward_hooks or m._global_forward_pre_hooks or m._global_backward_hooks
                or m._global_backward_pre_hooks)


_RECOMPUTE_CHOICES = ("0", "1", "llm")


def recompute_enabled(part: str = "llm") -> bool:
    """Whether :func:`act_linears` recomputes its activation in the backward for a call from ``part`` ("llm": the
    language model, the default; "vision": the vision towers). ``LLAVA_FAST_RECOMPUTE_ACT`` (read at each call):
    ``llm`` (default since session 18) in the language model only: the vision towers keep their LayerNorm and GELU
    outputs for the backward; ``1`` everywhere (the default of sessions 4-17); ``0`` nowhere (the path before
    session 4). Measured on an H200 (session 18, bench_model's OneVision step with 4 LLM layers, paired, 5 rounds):
    keeping the vision tower's outputs was 1.10x [1.06, 1.17] faster than recomputing them, at 14.0 vs 10.8 GiB
    (transformers: 36.4); keeping every part's (``0``) 1.10x and 1.06x in two sessions, at 14.4 GiB. Why ``llm``: in
    the OneVision full fine-tune the trained SigLIP tower's recomputation costs ~2.8 ms of GPU time per step at any
    LLM depth (H200, session 17 profile: 52 LayerNorm recomputations at ~29 us and 26 GELU ones at ~50 us), while
    keeping those outputs costs 6612 values more per vision token (the two LayerNorm outputs, 2 x 1152, and the GELU
    output, 4304; ``benchmarks/saved_activations.py``), ~3.3 GiB for the benchmark's batch (its predicted full-depth
    step 18.96 -> 22.22 GiB, 0.43x -> 0.50x transformers'; the target is 0.6x, the H200 measured 0.37x). The language
    model's recomputation is cheaper per byte saved (its SwiGLU / RMSNorm outputs are written by their backward
    kernels) and grows with depth, so it stays. The control row is bench_model's ``llava_fast_recompute_vision``
    (``1``). The measured gain (~10 ms per step) is more than the ~2.8 ms of GPU time the profile counts: the step at
    4 LLM layers is partly host-bound (the whole step as one CUDA graph ran 1.53x the eager one in that run), and the
    78 recomputations are launches too."""
    value = _ext.env_choice("LLAVA_FAST_RECOMPUTE_ACT", _RECOMPUTE_CHOICES, "llm")
    return value == "1" or (value == "llm" and part == "llm")


def _check_pairs(what: str, weights, biases) -> None:
    if len(weights) != len(biases) or not weights:
        raise ValueError(f"{what}: {len(weights)} weights and {len(biases)} biases; give one bias (or None) per weight")


def linears(a: torch.Tensor, weights: Sequence[torch.Tensor],
            biases: Sequence[Optional[torch.Tensor]]) -> tuple[torch.Tensor, ...]:
    """``tuple(F.linear(a, w, b) for w, b in zip(weights, biases))``. (Session 14's opt-in ``LLAVA_FAST_FUSED_QKV``,
    q, k and v as one GEMM over concatenated weights, measured 0.97-1.01x end to end on the H200 in sessions 17-19, was
    removed in session 21.)"""
    return tuple(F.linear(a, w, b) for w, b in zip(weights, biases))


def fused_recompute_enabled() -> bool:
    """``LLAVA_FAST_FUSED_RECOMPUTE=0`` (read at each backward) recomputes the SwiGLU and RMSNorm outputs that the
    linears' weight gradients read with their forward kernels, as before session 12, instead of having their
    backward kernels write them (one launch fewer per MLP and per fused-residual norm): the A/B switch of the
    benchmarks (provider ``llava_fast_sep_recompute``) and tests."""
    return _ext.env_choice("LLAVA_FAST_FUSED_RECOMPUTE", ("0", "1"), "1") == "1"


def fuse_residual_enabled() -> bool:
    """``LLAVA_FAST_FUSE_RESIDUAL=0`` (read at each forward) turns off the residual adds fused into the decoder
    layers' RMSNorm kernels (:func:`residual_act_linears`): the A/B switch of the benchmarks and tests."""
    return _ext.env_choice("LLAVA_FAST_FUSE_RESIDUAL", ("0", "1"), "1") == "1"


def act_linears(act: Callable, hs: Sequence[torch.Tensor], weights: Sequence[torch.Tensor],
                biases: Sequence[Optional[torch.Tensor]], part: str = "llm") -> tuple[torch.Tensor, ...]:
    """``tuple(F.linear(a, w, b) for w, b in zip(weights, biases))`` with ``a = act(*hs)`` computed once (q, k and v
    from one normalized input); when a gradient is needed, ``a`` is recomputed in the backward instead of kept (see
    the module docstring; ``part``, "llm" or "vision", is the model part calling: :func:`recompute_enabled`). ``act``
    must be a pure function of ``hs`` (elementwise activations, gated products, norms: pass a norm's weight and bias
    in ``hs`` so that they get their gradients)."""
    _check_pairs("act_linears", weights, biases)
    grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (*hs, *weights, *biases))
    if torch.compiler.is_compiling():
        return act_linears_ref(act, hs, weights, biases)
    if not grads or not recompute_enabled(part):
        return linears(act(*hs), weights, biases)
    return ActLinearFunction.apply(act, len(weights), *weights, *biases, *hs)


def residual_act_linears(act: ExplicitAct, x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor,
                         weights: Sequence[torch.Tensor], biases: Sequence[Optional[torch.Tensor]]):
    """``(*linears over norm(s), s)`` with ``s = x + residual``: a decoder layer's residual add, its norm and the
    linears that read the norm (q/k/v, gate/up), the add done inside the norm's kernel in the forward and the
    gradient accumulation of ``s`` inside its backward kernel (two elementwise passes and launches fewer per add).
    ``act`` is a norm with ``fusable(x, residual)`` true (``RMSNormAct``); ``s`` is bitwise ``x + residual``.
    With gradients, the norm's output is not kept: the norm's backward kernel writes it again for the linears'
    weight gradients (``LLAVA_FAST_FUSED_RECOMPUTE=0``: recomputed by the forward kernel); without recomputation (no
    gradients, ``LLAVA_FAST_RECOMPUTE_ACT=0``, torch.compile traces) the norm's fused op is differentiated by
    autograd."""
    _check_pairs("residual_act_linears", weights, biases)
    grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                            for t in (x, residual, norm_weight, *weights, *biases))
    if grads and not torch.compiler.is_compiling() and recompute_enabled():
        return ResidualActLinearFunction.apply(act, len(weights), *weights, *biases, x, residual, norm_weight)
    if grads:
        a, s = act.add_forward_autograd(x, residual, norm_weight)
    else:
        a, s, _ = act.add_forward(x, residual, norm_weight)
    return (*linears(a, weights, biases), s)


def act_linear(act: Callable, hs: Sequence[torch.Tensor], weight: torch.Tensor,
               bias: Optional[torch.Tensor] = None, part: str = "llm") -> torch.Tensor:
    """``F.linear(act(*hs), weight, bias)``: :func:`act_linears` with one linear."""
    return act_linears(act, hs, [weight], [bias], part)[0]
