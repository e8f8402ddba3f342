"""CLIP and SigLIP vision towers (the parts LLaVA uses), with transformers 5.x parameter names."""
from __future__ import annotations

import torch
from torch import nn

from llava_fast.models.config import VisionConfig
from llava_fast.models.layers import get_activation
from llava_fast.ops.patch_embed import patch_embed


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        n = cfg.tokens_per_side ** 2
        if cfg.is_clip:
            self.class_embedding = nn.Parameter(torch.randn(d))
            n += 1
        self.patch_embedding = nn.Conv2d(cfg.num_channels, d, kernel_size=cfg.patch_size, stride=cfg.patch_size,
                                         bias=not cfg.is_clip)
        self.position_embedding = nn.Embedding(n, d)

    def forward(self, pixel_values):
        # pixels are cast to the conv weight dtype first, as transformers does (trap 3); the convolution, or the same
        # products as one GEMM where the backend says so (ops/patch_embed.py)
        x = patch_embed(self.patch_embedding, pixel_values.to(self.patch_embedding.weight.dtype))
        if self.cfg.is_clip:
            x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1)  # promotes as transformers
        else:
            # the conv's (B, D, N) memory seen as (B, N, D) is not contiguous, and elementwise ops keep their input's
            # layout: SigLIP's residual stream (transformers' too) stayed transposed through every layer, each layer
            # paying six strided copies (the norms' inputs, forward and recompute) and two strided adds. On an H200
            # that was 17 ms of the OneVision-0.5B step's 104 ms of kernels at 4 LLM layers (docs/perf-notes.md,
            # "Third GPU run"). One copy here instead. The tower's layers give the same bits (tests/models/
            # test_vision_layout.py: elementwise ops and the norms do not depend on the layout); what reads the tower's
            # output may round differently, e.g. F.linear, which fuses the bias into the GEMM for a contiguous 3-D
            # input only (one rounding instead of two).
            x = x.contiguous()
        return x + self.position_embedding.weight[None]


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.head_dim = d // self.num_heads
        self.scale = self.head_dim ** -0.5
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x, norm: nn.LayerNorm | None = None):
        """``x`` (B, N, D). With ``norm`` (the layer's pre-attention LayerNorm), the attention runs on ``norm(x)``,
        which q, k and v share and which is recomputed in the backward from x instead of kept (ops/act_linear.py);
        without, on x as given."""
        b, n, d = x.shape
        from llava_fast.models import dispatch

        from llava_fast.ops.act_linear import act_linears, plain_linears, unhooked

        projs = (self.q_proj, self.k_proj, self.v_proj)
        if norm is not None and plain_linears(*projs) and unhooked(norm):
            q, k, v = act_linears(_layer_norm(norm), (x, norm.weight, norm.bias), [p.weight for p in projs],
                                  [p.bias for p in projs], part="vision")
        else:  # no norm given, or adapters / wrappers on the projections (LoRA): call the modules
            h = x if norm is None else norm(x)
            q, k, v = (p(h) for p in projs)
        q, k, v = (t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        o = dispatch.vision_attention(q, k, v, self.scale)
        return self.out_proj(o.transpose(1, 2).reshape(b, n, d))


def _layer_norm(norm: nn.LayerNorm):
    """layer_norm(x, weight, bias) with ``norm``'s shape and eps: the activation that act_linear recomputes (and
    differentiates without a nested autograd pass: ops/act_linear.LayerNormAct)."""
    from llava_fast.ops.act_linear import LayerNormAct

    return LayerNormAct(norm.normalized_shape, norm.eps)


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = get_activation(cfg.hidden_act)

    def forward(self, x, norm: nn.LayerNorm | None = None):
        # the activation's output is recomputed in the backward instead of kept (ops/act_linear.py), and with
        # ``norm`` (the layer's pre-MLP LayerNorm) so is fc1's input, norm(x); the plain expressions without gradients
        # (adapters or wrappers on fc1 / fc2, such as LoRA: that module is called instead; act_linear.plain_linears)
        from llava_fast.ops.act_linear import act_linear, plain_linears, unhooked

        if norm is not None and plain_linears(self.fc1) and unhooked(norm):
            h = act_linear(_layer_norm(norm), (x, norm.weight, norm.bias), self.fc1.weight, self.fc1.bias,
                           part="vision")
        else:
            h = self.fc1(x if norm is None else norm(x))
        if plain_linears(self.fc2):
            return act_linear(self.act, (h,), self.fc2.weight, self.fc2.bias, part="vision")
        return self.fc2(self.act(h))


class VisionLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.self_attn = VisionAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x):
        x = x + self.self_attn(x, norm=self.layer_norm1)
        return x + self.mlp(x, norm=self.layer_norm2)


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(cfg.num_hidden_layers))


class SiglipHead(nn.Module):
    """SigLIP's attention-pooling head. LLaVA never runs it; it exists so checkpoints load and save unchanged."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.probe = nn.Parameter(torch.randn(1, 1, d))
        self.attention = nn.MultiheadAttention(d, cfg.num_attention_heads, batch_first=True)
        self.layernorm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)


class VisionTower(nn.Module):
    """CLIP (pre_layrnorm, CLS token) or SigLIP (no CLS) vision transformer."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = VisionEmbeddings(cfg)
        if cfg.is_clip:
            self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.encoder = VisionEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        if not cfg.is_clip and cfg.vision_use_head:
            self.head = SiglipHead(cfg)

    def hidden_state_index(self, layer: int) -> int:
        """Index into transformers' hidden_states tuple (0 = embeddings, i = output of layer i)."""
        n = self.cfg.num_hidden_layers
        idx = layer if layer >= 0 else n + 1 + layer
        if not 0 <= idx <= n:
            raise ValueError(f"vision_feature_layer {layer} is out of range for a tower of {n} layers")
        return idx

    def forward(self, pixel_values, feature_layers: list[int]):
        """Returns the hidden states at ``feature_layers`` (transformers' indices), concatenated on the last dim.
        Layers past the deepest one requested are not run (their output would be discarded)."""
        idx = [self.hidden_state_index(i) for i in feature_layers]
        x = self.embeddings(pixel_values)
        if self.cfg.is_clip:
            x = self.pre_layrnorm(x)
        states = {0: x}
        for i, layer in enumerate(self.encoder.layers[: max(idx)]):
            x = layer(x)
            states[i + 1] = x
        out = [states[i] for i in idx]
        return out[0] if len(out) == 1 else torch.cat(out, dim=-1)
