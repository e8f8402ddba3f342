"""LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision in plain PyTorch, matching transformers' eager reference.

Parameter names follow transformers 5.x (``model.vision_tower``, ``model.multi_modal_projector``,
``model.language_model``, ``model.image_newline``, ``lm_head``); checkpoints load and save in the llava-hf layout
(see ``llava_fast.models.io``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llava_fast import _ext, backend
from llava_fast.models.config import LlavaConfig
from llava_fast.models.language import LanguageModel
from llava_fast.models.layers import get_activation
from llava_fast.models.vision import VisionTower
from llava_fast.ops import anyres
from llava_fast.ops.act_linear import GeluAct, plain_linears
from llava_fast.ops.pack_features import pack_image_features_ref, pool_video_features_ref, scatter_features_ref


class HostInputs:
    """CPU copies of a batch's integer inputs for ``forward(..., host_inputs=HostInputs({...}))`` (a plain dict works
    too). Not a dict on purpose: FSDP2 and DDP move every tensor they find in a forward's arguments, inside dicts,
    lists and tuples too, to the GPU before the call, which would turn the copies back into device tensors (the
    forward would then copy them back: one host synchronisation). An object of this class is passed through as it
    is."""

    __slots__ = ("tensors",)
    # the integer inputs the forward reads on the host (its value checks, the loss)
    KEYS = ("input_ids", "labels", "position_ids", "cu_seqlens", "attention_mask", "image_sizes", "batch_num_images")

    def __init__(self, tensors):
        self.tensors = dict(tensors)

    def __repr__(self):
        return f"HostInputs({sorted(self.tensors)})"


@dataclass
class LlavaOutput:
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None

    def __getitem__(self, i):  # tuple-style access like transformers' ModelOutput
        return [x for x in (self.loss, self.logits) if x is not None][i]


class MultiModalProjector(nn.Module):
    """``mlp2x_gelu``: Linear -> GELU (exact erf unless the config says otherwise) -> Linear."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, act: str = "gelu"):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, out_features, bias=bias)
        self.act = get_activation(act)
        self.linear_2 = nn.Linear(out_features, out_features, bias=bias)
        self.act_name = act

    def forward(self, x):
        # fused GEMM + GELU epilogue (one M x N buffer saved) when both linears are plain and the activation is still
        # the GELU of the config: an adapter or wrapper on either linear (LoRA), or another activation put in
        # `self.act`, is called as a module instead
        if type(self.act) is GeluAct and backend.use_fast("projector", x.device.type) \
                and plain_linears(self.linear_1, self.linear_2):
            from llava_fast.ops.projector import projector

            return projector(x, self.linear_1.weight, self.linear_1.bias, self.linear_2.weight, self.linear_2.bias,
                             approximate=self.act.approximate)
        return self.linear_2(self.act(self.linear_1(x)))


class LlavaModel(nn.Module):
    def __init__(self, config: LlavaConfig):
        super().__init__()
        vc, tc = config.vision_config, config.text_config
        self.vision_tower = VisionTower(vc)
        layers = config.vision_feature_layer
        n_layers = 1 if isinstance(layers, int) else len(layers)
        self.multi_modal_projector = MultiModalProjector(vc.hidden_size * n_layers, tc.hidden_size,
                                                         config.multimodal_projector_bias, config.projector_hidden_act)
        self.language_model = LanguageModel(tc)
        if config.model_type != "llava":
            self.image_newline = nn.Parameter(torch.randn(tc.hidden_size) / math.sqrt(tc.hidden_size))


def shift_labels(labels, cu_seqlens=None, ignore_index: int = -100):
    """Labels of the next token at each position; in packed form no sample predicts the next sample's first token."""
    shift = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    if cu_seqlens is not None:
        # index_fill_ takes the value as a kernel argument; ``shift[0, idx] = value`` would copy a host scalar
        # tensor to the GPU from pageable memory: a host synchronisation, and an error under CUDA graph capture
        shift = shift.clone()
        shift[0].index_fill_(0, (cu_seqlens[1:] - 1).long(), ignore_index)
    return shift


def last_layer_rows_choice() -> str:
    """``LLAVA_FAST_LAST_LAYER_ROWS``: "supervised" (default) or "all" (:meth:`_LlavaBase._host_rows`)."""
    return _ext.env_choice("LLAVA_FAST_LAST_LAYER_ROWS", ("supervised", "all"), "supervised")


def loss_from_logits(logits, labels, cu_seqlens=None, num_items_in_batch=None, ignore_index: int = -100):
    """transformers 5.x ForCausalLMLoss: fp32 logits, labels shifted left by one, mean over supervised tokens, or
    sum / num_items_in_batch when given. In packed form no position predicts the first token of the next sample."""
    return loss_from_shifted(logits, shift_labels(labels, cu_seqlens, ignore_index), num_items_in_batch, ignore_index)


def loss_from_shifted(logits, shift, num_items_in_batch=None, ignore_index: int = -100):
    """:func:`loss_from_logits` on labels already shifted (one per row of ``logits``)."""
    flat_logits = logits.float().reshape(-1, logits.shape[-1])
    flat_labels = shift.reshape(-1).to(flat_logits.device)
    if num_items_in_batch is not None:
        loss = F.cross_entropy(flat_logits, flat_labels, ignore_index=ignore_index, reduction="sum")
        return loss / num_items_in_batch
    return F.cross_entropy(flat_logits, flat_labels, ignore_index=ignore_index, reduction="mean")


def _per_sample(batch_num_images) -> list[int] | None:
    """batch_num_images (tensor or sequence) as a list of ints, None when not given."""
    if batch_num_images is None:
        return None
    if isinstance(batch_num_images, (list, tuple)) and all(type(x) is int for x in batch_num_images):
        return list(batch_num_images)   # (the forward's host copy: no tensor made, nothing for torch.compile to read)
    return [int(x) for x in torch.as_tensor(batch_num_images).reshape(-1)]


def _call_host_prepare(model, *args, **kwargs):
    return model._host_prepare(*args, **kwargs)


_HOST_PREPARE = None   # _call_host_prepare under torch.compiler.disable: made with the first model (_LlavaBase)


def _host_prepare(model, *args, **kwargs):
    """``model._host_prepare(*args, **kwargs)``, run eagerly under torch.compile (see there). The disabled function
    is made when the first model is built, outside any trace (torch.compiler.disable imports dynamo: ~0.9 s, paid
    there rather than at import)."""
    return (_HOST_PREPARE or _call_host_prepare)(model, *args, **kwargs)


class _LlavaBase(nn.Module):
    """Shared forward; subclasses differ in how image features become tokens."""

    model_type = "llava"

    def __init__(self, config: LlavaConfig):
        super().__init__()
        if config.model_type != self.model_type:
            raise ValueError(f"{type(self).__name__} needs a config of model_type {self.model_type!r}, got "
                             f"{config.model_type!r}; use llava_fast.from_pretrained to pick the class")
        global _HOST_PREPARE
        if _HOST_PREPARE is None:
            _HOST_PREPARE = torch.compiler.disable(_call_host_prepare)
        backend.load_all()   # every op module imported now, not on first use (inside a torch.compile trace)
        self.config = config
        self.model = LlavaModel(config)
        tc = config.text_config
        self.lm_head = nn.Linear(tc.hidden_size, tc.vocab_size, bias=False)
        self.tie_weights()
        if self.lm_head.weight.device.type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, std: float = 0.02):
        """transformers-style initialisation for a model built from a config (from_pretrained overwrites it):
        N(0, std) for linear, conv and embedding weights (position embeddings too), zero biases, unit norms,
        CLIP's class embedding N(0, D^-0.5), image_newline N(0, 1/D). PyTorch's defaults would give embeddings
        N(0, 1), which drowns the patch content under the vision tower's position embeddings."""
        for mod in self.modules():
            if isinstance(mod, (nn.Linear, nn.Conv2d, nn.Embedding)):
                mod.weight.normal_(0.0, std)
                if getattr(mod, "bias", None) is not None:
                    mod.bias.zero_()
            elif isinstance(mod, nn.LayerNorm):
                mod.weight.fill_(1.0)
                mod.bias.zero_()
        for name, p in self.named_parameters():
            if name.endswith("class_embedding"):
                p.normal_(0.0, p.shape[-1] ** -0.5)
            elif name.endswith("norm.weight") and p.dim() == 1 and "vision_tower" not in name:
                p.fill_(1.0)
        if hasattr(self.model, "image_newline"):
            d = self.model.image_newline.shape[0]
            self.model.image_newline.normal_(0.0, d ** -0.5)

    # -- helpers -------------------------------------------------------------------------------------------------
    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.language_model.embed_tokens.weight

    @property
    def device(self):
        return self.lm_head.weight.device

    @property
    def dtype(self):
        return self.lm_head.weight.dtype

    def get_input_embeddings(self):
        return self.model.language_model.embed_tokens

    def compile_layers(self, **compile_kwargs) -> None:
        """``torch.compile`` each decoder layer and each vision encoder layer in place (``nn.Module.compile``, with
        ``compile_kwargs``): the layers of a tower share one compiled graph, so it compiles once per layer type, and
        the forward's host side stays eager (:meth:`_host_prepare`). Inductor fuses the small elementwise ops between
        our kernels and GEMMs (the vision towers' LayerNorms, GELUs, residual adds, bias gradients); our kernels stay
        custom ops. ``train.compile`` and bench_model's ``llava_fast_compiled`` rows call this."""
        vt = self.model.vision_tower
        for layer in (*self.model.language_model.layers, *getattr(getattr(vt, "encoder", None), "layers", ())):
            layer.compile(**compile_kwargs)

    def save_pretrained(self, path, max_shard_size: int | str = "5GB"):
        from llava_fast.models.io import save_pretrained

        save_pretrained(self, path, max_shard_size=max_shard_size)

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None):
        from llava_fast.models.io import from_pretrained

        model = from_pretrained(path, dtype=dtype, device=device)
        if not isinstance(model, cls):
            raise ValueError(f"{path} holds a {model.config.model_type} checkpoint, not {cls.model_type}")
        return model

    def generate(self, input_ids, **kwargs):
        """Greedy or sampled generation with a KV cache; see ``llava_fast.generation.generate``."""
        from llava_fast.generation import generate

        return generate(self, input_ids, **kwargs)

    def _feature_layers(self):
        layer = self.config.vision_feature_layer
        return [layer] if isinstance(layer, int) else list(layer)

    def encode_tiles(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(tiles, 3, T, T) -> projected features (tiles, tokens, D_text)."""
        f = self.model.vision_tower(pixel_values, self._feature_layers())
        if self.config.vision_feature_select_strategy == "default":
            f = f[:, 1:]
        return self.model.multi_modal_projector(f)

    def _check_pixels(self, pixel_values, name="pixel_values"):
        vc = self.config.vision_config
        if not torch.is_tensor(pixel_values):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(pixel_values).__name__}")
        if not pixel_values.is_floating_point():
            raise ValueError(f"{name} must be floating point (normalized pixels), got {pixel_values.dtype}; "
                             f"preprocess uint8 images with llava_fast.ops.anyres first")
        if pixel_values.shape[-3:] != (vc.num_channels, vc.image_size, vc.image_size):
            raise ValueError(f"{name} must end in (channels, height, width) = ({vc.num_channels}, {vc.image_size}, "
                             f"{vc.image_size}), got shape {tuple(pixel_values.shape)}")
        if pixel_values.device != self.device:
            raise ValueError(f"{name} is on {pixel_values.device} but the model is on {self.device}; move it with "
                             f".to({str(self.device)!r})")

    def _image_pixels(self, pixel_values, image_sizes, batch_num_images):
        """Every tile of every image as one (tiles, 3, T, T) tensor (checked), the image sizes and single-tile flags."""
        raise NotImplementedError

    def _image_tiles(self, pixel_values, image_sizes, batch_num_images):
        """Projected features of every tile (tiles, tokens, D_text), the image sizes and single-tile flags."""
        flat, sizes, single = self._image_pixels(pixel_values, image_sizes, batch_num_images)
        return self.encode_tiles(flat), sizes, single

    def _pack_tiles(self, tiles, sizes, single):
        """Reference packing of the projected tile features into the image features (tokens, D_text)."""
        raise NotImplementedError

    def _media_tiles(self, pixel_values, image_sizes, batch_num_images, pixel_values_videos):
        """Projected features of the image tiles and of the video frames from ONE vision-tower call. Under FSDP2 the
        tower's layers are sharded: a rank that ran the tower twice (images, then videos) while another ran it once
        would pair its all-gathers with the wrong ones (a hang). Returns (image tiles, sizes, single-tile flags,
        video frames (videos, frames, tokens, D_text)); the parts not given are None."""
        flat, sizes, single = (self._image_pixels(pixel_values, image_sizes, batch_num_images)
                               if pixel_values is not None else (None, None, None))
        frames = self._video_pixels(pixel_values_videos) if pixel_values_videos is not None else None
        if frames is None:
            return (self.encode_tiles(flat) if flat is not None else None), sizes, single, None
        b, fr = pixel_values_videos.shape[:2]
        f = self.encode_tiles(frames if flat is None else torch.cat((flat, frames.to(flat.dtype)), dim=0))
        n = 0 if flat is None else flat.shape[0]
        tiles = f[:n] if flat is not None else None
        return tiles, sizes, single, f[n:].view(b, fr, f.shape[1], f.shape[2])

    def _tokens_per_tile(self) -> int:
        vc = self.config.vision_config
        return vc.tokens_per_side ** 2 + int(vc.is_clip) - int(self.config.vision_feature_select_strategy == "default")

    def _image_token_counts(self, pixel_values, image_sizes, batch_num_images):
        """(LLM tokens of each image, images per sample or None), the inputs checked as ``_image_tiles`` does, without
        running the vision tower. Tokens None: a layout the feature packing refuses by itself."""
        self._check_pixels(pixel_values)
        if pixel_values.dim() != 4:
            raise ValueError(f"pixel_values must be (num_images, 3, H, W) for llava, got {tuple(pixel_values.shape)}")
        n = pixel_values.shape[0]
        bni = _per_sample(batch_num_images)
        if bni is not None and sum(bni) != n:
            raise ValueError(f"batch_num_images sums to {sum(bni)} but pixel_values holds {n} images")
        return [self._tokens_per_tile()] * n, bni

    def _video_token_counts(self, pixel_values_videos):
        raise ValueError(f"{self.model_type} models take no videos (pixel_values_videos); use a llava_onevision model")

    @staticmethod
    def _check_placeholders(input_ids, cu_seqlens, token_id, counts, per_sample, what="Image"):
        """Each image (video) must be one run of its placeholder tokens inside one sample, in the order of the pixels,
        and with ``per_sample`` (batch_num_images) each sample must hold exactly the tokens of its own images.
        (Comparing only the totals, as transformers does, lets placeholders of the wrong lengths that add up take
        another image's features, or another sample's image, in silence.)"""
        w = what.lower()
        flat = (input_ids == token_id).reshape(-1)
        length = input_ids.shape[-1]
        first = torch.zeros_like(flat)                                   # first position of each sample
        first[::length] = True
        if cu_seqlens is not None:
            cu = cu_seqlens[:-1].to(flat.device).long()
            first[cu[cu < flat.numel()]] = True
        last = torch.cat([first[1:], first.new_ones(1)])                  # last position of each sample
        cont = torch.cat([flat.new_zeros(1), flat[:-1]]) & ~first        # placeholder continuing a run
        ends = torch.cat([flat[1:], flat.new_zeros(1)]) & ~last
        starts, stops = (flat & ~cont).nonzero()[:, 0], (flat & ~ends).nonzero()[:, 0]
        sample = first.long().cumsum(0) - 1
        runs = torch.stack([starts, stops - starts + 1, sample[starts]], 1).tolist() if starts.numel() else []
        n_tok, n_feat = sum(r[1] for r in runs), sum(counts)
        if n_tok != n_feat:
            raise ValueError(
                f"{what} features and {w} tokens do not match: input_ids holds {n_tok} {w} tokens (id {token_id}) but "
                f"the {w}s give {n_feat} features (per {w}: {counts[:8]}{' ...' if len(counts) > 8 else ''}). Each "
                f"<{w}> placeholder must be expanded to exactly the number of tokens its {w} produces "
                f"(llava_fast.ops.anyres.num_image_tokens / num_video_tokens), and truncation must not cut them.")
        begins = [0]
        for c in counts:
            begins.append(begins[-1] + c)
        k = j = 0
        for pos, n, _ in runs:
            while begins[j + 1] <= k:   # image j holds placeholder k
                j += 1
            if begins[j] != k:
                where = f"input_ids[{pos // length}, {pos % length}]"
                raise ValueError(
                    f"{what} tokens do not line up with the {w}s: {w} {j} ({counts[j]} tokens) is split across "
                    f"placeholder runs (the run of {n} {w} tokens at {where} starts {k - begins[j]} tokens into it). "
                    f"Each <{w}> placeholder must be expanded to exactly its own {w}'s number of tokens, in the order "
                    f"of the {w}s (per {w}: {counts[:8]}{' ...' if len(counts) > 8 else ''}).")
            k += n
        if per_sample is not None:
            got = {}
            for _, n, smp in runs:
                got[smp] = got.get(smp, 0) + n
            want, i = [], 0
            for m in per_sample:
                if m > 0:
                    want.append(sum(counts[i:i + m]))
                i += m
            if list(got.values()) != want:
                raise ValueError(f"batch_num_images does not match input_ids: the samples with {w}s hold "
                                 f"{list(got.values())} {w} tokens but batch_num_images {per_sample} gives them "
                                 f"{want}; batch_num_images counts the {w}s of each sample, in order")

    def _video_pixels(self, pixel_values_videos):
        raise ValueError(f"{self.model_type} models take no videos (pixel_values_videos); use a llava_onevision model")

    def image_features(self, pixel_values, image_sizes=None, batch_num_images=None) -> torch.Tensor:
        """All image tokens of the batch, (n_tokens, D_text), in placeholder order (reference packing)."""
        return self._pack_tiles(*self._image_tiles(pixel_values, image_sizes, batch_num_images))

    @staticmethod
    def _host_inputs(given, decoding, **inputs):
        """The integer inputs on the host, by name: ``given`` (the caller's CPU copies, ``host_inputs``) where it has
        them, the rest copied with :func:`llava_fast._ext.host_copies` (one synchronisation; none when all are on the
        CPU already). A decoding step copies nothing (its checks are skipped) and gets the inputs as they are."""
        given = dict(given.tensors if isinstance(given, HostInputs) else (given or {}))
        unknown = set(given) - set(HostInputs.KEYS)
        if unknown:
            raise ValueError(f"host_inputs takes the keys {HostInputs.KEYS}, got {sorted(unknown)}")
        out = {}
        for k, v in inputs.items():
            g = given.get(k)
            if g is None or v is None or not torch.is_tensor(v):
                continue
            if not torch.is_tensor(g) or g.numel() != v.numel():
                raise ValueError(f"host_inputs[{k!r}] must be a CPU tensor with the values of {k} "
                                 f"({tuple(v.shape)}), got {type(g).__name__} "
                                 f"{tuple(g.shape) if torch.is_tensor(g) else ''}")
            if g.device.type != "cpu":
                continue   # moved to the GPU on the way (a dict under FSDP2 / DDP: use HostInputs): copied below
            out[k] = g.reshape(v.shape)
        rest = [k for k, v in inputs.items() if k not in out and torch.is_tensor(v)]
        if decoding:
            copies = [inputs[k] for k in rest]
        else:
            copies = _ext.host_copies(*(inputs[k] for k in rest))
        out.update(zip(rest, copies))
        for k, v in inputs.items():
            out.setdefault(k, v)   # None, or not a tensor (image_sizes as a list)
        return out

    @staticmethod
    def _host_rows(keep_rows, host_shift, supervised: bool, total: int, device):
        """The host side of the language model's ``rows`` (the forward moves or finds them on the device): the rows
        on the host, or None (every row computed):

        * ``keep_rows`` given: checked (1-D integers; on the host also within ``[0, total)`` and distinct); its host
          copy when it is a CPU tensor (the forward moves it);
        * ``supervised`` (a loss without logits or hidden states): the rows whose shifted label is supervised
          (``host_shift``, the shifted labels' host copy), unless every row or none is, or
          ``LLAVA_FAST_LAST_LAYER_ROWS=all``. Every other row's last-layer output only feeds its own logits, which
          such a call never computes: the loss and every gradient are those of the whole computation. The forward
          finds the same rows on the device with ``nonzero_static`` of this count: nothing is read back or uploaded
          (a CUDA graph captures it)."""
        if keep_rows is not None:
            if host_shift is not None:
                raise ValueError("keep_rows selects the rows of the logits / hidden states to compute and cannot be "
                                 "combined with labels: with labels and logits=False the model keeps the supervised "
                                 "rows itself")
            if not torch.is_tensor(keep_rows) or keep_rows.dim() != 1 or keep_rows.dtype not in (torch.int64,
                                                                                                  torch.int32):
                raise ValueError(f"keep_rows must be a 1-D int64 tensor of flattened (batch * seq) token rows, got "
                                 f"{type(keep_rows).__name__} {getattr(keep_rows, 'dtype', '')} "
                                 f"{tuple(getattr(keep_rows, 'shape', ()))}")
            if keep_rows.device.type == "cpu":
                if keep_rows.numel() and (int(keep_rows.min()) < 0 or int(keep_rows.max()) >= total):
                    raise ValueError(f"keep_rows must lie in [0, {total}) (batch * seq rows), got values in "
                                     f"[{int(keep_rows.min())}, {int(keep_rows.max())}]")
                if torch.unique(keep_rows).numel() != keep_rows.numel():
                    raise ValueError("keep_rows holds a row twice; give each row at most once")
                return keep_rows.long()
            if keep_rows.device != device:
                raise ValueError(f"keep_rows is on {keep_rows.device} but the model is on {device}")
            return None
        if not supervised or last_layer_rows_choice() == "all":
            return None
        host = (host_shift != -100).nonzero().reshape(-1)
        return None if host.numel() in (0, total) else host

    def _host_prepare(self, host_inputs, decoding, n, max_seqlen, pixel_values, pixel_values_videos, keep_rows,
                      supervised, total, **inputs):
        """Every read of the inputs' values that the forward makes, on their host copies (:meth:`_host_inputs`):
        the value checks, the image placeholders against the images' token counts, and the shifted labels' and
        kept rows' host side (:meth:`_host_rows`). Returns ``(image_sizes, batch_num_images, drop_pixels,
        host_labels, n_rows)``: the first two as the forward reads them from here on (Python lists where given),
        whether the batch holds no image at all (the vision tower is skipped), the loss's shifted labels on the host
        for the rows the loss sees (int64; None without labels, or where the labels are the host copy already or not
        int64: the loss reads those itself), and the number of supervised rows the last layer keeps (None: every
        row). After it the forward computes nothing on the host (it hands ``host_labels`` to the loss as they are):
        under torch.compile on a GPU the graph holds no CPU op.

        Under torch.compile this runs eagerly (:func:`_host_prepare`): dynamo cannot trace reads of values, and one
        graph break at this call replaces one at each read (the towers and layers after it trace as one graph)."""
        if self.lm_head.weight.is_cuda:
            backend.unsupported_gpu()  # answered here, eagerly (then cached), not first inside a compiled layer's trace
        h = self._host_inputs(host_inputs, decoding, **inputs)
        if not decoding:
            self._check_values(h, n, max_seqlen, pixel_values is not None, pixel_values_videos is not None)
        if torch.is_tensor(h["batch_num_images"]):
            h["batch_num_images"] = _per_sample(h["batch_num_images"])
        ids, drop_pixels = inputs["input_ids"], False
        if ids is not None and pixel_values is not None:
            h["image_sizes"] = self._host_sizes(h["image_sizes"])
            counts, per_sample = self._image_token_counts(pixel_values, h["image_sizes"], h["batch_num_images"])
            if counts is not None:
                self._check_placeholders(h["input_ids"], h["cu_seqlens"], self.config.image_token_id, counts,
                                         per_sample)
                drop_pixels = not counts
        if ids is not None and pixel_values_videos is not None:
            self._check_placeholders(h["input_ids"], h["cu_seqlens"], self.config.video_token_id,
                                     self._video_token_counts(pixel_values_videos), None, "Video")
        labels, host_shift = inputs["labels"], None
        if labels is not None:
            # the shifted labels on the host (from the copy the checks read): the rows kept and the loss's supervised
            # rows are counted there, without waiting for the GPU
            host_shift = shift_labels(h["labels"], h["cu_seqlens"]).reshape(-1)
        host_rows = self._host_rows(keep_rows, host_shift, supervised, total, self.device)
        host_labels = n_rows = None
        if labels is not None:
            if host_rows is not None:   # (the forward selects the same rows on the device)
                host_shift, n_rows = host_shift.index_select(0, host_rows), host_rows.numel()
            if h["labels"] is not labels and labels.dtype == torch.int64:
                host_labels = host_shift
        return h["image_sizes"], h["batch_num_images"], drop_pixels, host_labels, n_rows

    def _host_sizes(self, image_sizes):
        """``image_sizes`` as the forward reads it from here on (LLaVA-1.5 takes none: as given)."""
        return image_sizes

    def _check_values(self, h, n, max_seqlen, has_pixels, has_videos):
        """The checks that read the inputs' values, on their host copies ``h`` (:meth:`_host_inputs`)."""
        tc = self.config.text_config
        ids, labels, pos, cu, mask = (h[k] for k in ("input_ids", "labels", "position_ids", "cu_seqlens",
                                                     "attention_mask"))
        vocab = tc.vocab_size
        if ids is not None and ids.numel() and (int(ids.max()) >= vocab or int(ids.min()) < 0):
            raise ValueError(f"input_ids holds ids outside [0, {vocab}) (vocab_size of the language model)")
        if pos is not None:
            restarts = pos.reshape(-1, n)[:, 1:] == 0 if cu is None and mask is None and n > 1 else None
            if restarts is not None and bool(restarts.any()):
                # several samples in a row (transformers' padding-free format): without cu_seqlens they would attend
                # to each other; transformers splits them by position only without a cache (use_cache=False), its
                # flash path always: an error rather than a guess at which the caller meant
                row, at = restarts.nonzero()[0].tolist()
                raise ValueError(
                    f"position_ids restart at 0 inside a row (row {row}, token {at + 1}) but no cu_seqlens delimits "
                    f"the samples, so they would attend to each other. Pass the packed form: cu_seqlens, max_seqlen "
                    f"= llava_fast.data.cu_seqlens_from_position_ids(position_ids) (one row per call), or one sample "
                    f"per row with an attention_mask")
            if cu is not None:
                self._check_packed(cu, pos, max_seqlen, n)
            elif n and int(pos.max()) >= tc.max_position_embeddings:
                raise ValueError(f"position_ids reach {int(pos.max())}, past the context length "
                                 f"(max_position_embeddings={tc.max_position_embeddings})")
        if mask is not None and not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("attention_mask must hold 1 (token) and 0 (padding) only, as transformers' 2-D masks; "
                             "an additive mask (0 / -inf) is not accepted")
        if labels is not None and not bool(((labels == -100) | ((labels >= 0) & (labels < vocab))).all()):
            raise ValueError(f"labels must be integer token ids in [0, {vocab}) (vocab_size) or -100 (ignored), "
                             f"got {labels.dtype} values in [{int(labels.min())}, {int(labels.max())}]")
        if ids is not None:
            # (a decoding step may produce the image or video token id as an ordinary token: not checked then)
            if not has_pixels and bool((ids == self.config.image_token_id).any()):
                raise ValueError("input_ids holds image tokens but no pixel_values were given")
            vid = self.config.video_token_id
            if not has_videos and vid is not None and bool((ids == vid).any()):
                raise ValueError("input_ids holds video tokens but no pixel_values_videos were given")

    def _check_packed(self, cu_seqlens, position_ids, max_seqlen, n):
        """cu_seqlens delimits samples that cover the sequence; positions restart at 0 in each; none over the context
        length; max_seqlen (the kernels' bound) not below the longest sample."""
        cu = cu_seqlens.tolist()
        if not cu or cu[0] != 0 or cu[-1] != n or any(b < a for a, b in zip(cu, cu[1:])):
            raise ValueError(f"cu_seqlens must rise from 0 to the packed sequence length {n} (cumulative sample "
                             f"lengths), got {cu[:8]}{' ...' if len(cu) > 8 else ''}")
        lens = [b - a for a, b in zip(cu, cu[1:])]
        longest, ctx = max(lens, default=0), self.config.text_config.max_position_embeddings
        if longest > ctx:
            raise ValueError(f"a packed sample of {longest} tokens is longer than the context length "
                             f"(max_position_embeddings={ctx}); split or truncate it before the model (image tokens "
                             f"must not be cut)")
        if max_seqlen is not None and int(max_seqlen) < longest:
            raise ValueError(f"max_seqlen ({int(max_seqlen)}) is below the longest sample of cu_seqlens ({longest}); "
                             f"pass max(cu_seqlens[1:] - cu_seqlens[:-1]) or None")
        starts = torch.repeat_interleave(cu_seqlens[:-1].to(position_ids.device).long(),
                                         torch.tensor(lens, device=position_ids.device), output_size=n)
        if not bool((position_ids == torch.arange(n, device=position_ids.device) - starts).all()):
            raise ValueError("position_ids must restart at 0 for each sample of cu_seqlens (torch.arange(len) per "
                             "sample, as collate_packed builds them)")

    def video_features(self, pixel_values_videos) -> torch.Tensor:
        """All video tokens of the batch, (n_tokens, D_text), in placeholder order (reference pooling)."""
        return self._pool_video(self._media_tiles(None, None, None, pixel_values_videos)[3])

    def _pool_video(self, frames):
        raise ValueError(f"{self.model_type} models take no videos (pixel_values_videos); use a llava_onevision model")

    def _packable(self) -> bool:
        """Whether the fused packing kernel applies (square token grids per tile)."""
        return not (self.config.vision_config.is_clip and self.config.vision_feature_select_strategy == "full")

    # -- forward -------------------------------------------------------------------------------------------------
    def forward(self, input_ids=None, pixel_values=None, image_sizes=None, attention_mask=None, labels=None,
                pixel_values_videos=None, position_ids=None, cu_seqlens=None, max_seqlen=None,
                num_items_in_batch=None, batch_num_images=None, inputs_embeds=None, return_hidden=False,
                logits=True, cache=None, host_inputs=None, keep_rows=None):
        """Padded form: input_ids (B, L) with image placeholders already expanded, attention_mask (B, L).
        Packed form: input_ids (1, T) holding several samples, ``cu_seqlens`` int32 (n+1,) and ``position_ids``
        (1, T) restarting at 0 per sample. ``labels`` are unshifted (as transformers). Returns ``LlavaOutput``.

        ``host_inputs`` (optional): CPU tensors holding the same values as the integer inputs given on the GPU (keys
        ``input_ids``, ``labels``, ``position_ids``, ``cu_seqlens``, ``attention_mask``, ``image_sizes``,
        ``batch_num_images``; a missing key is copied), as a dict or a :class:`HostInputs` (which FSDP2 and DDP pass
        through unmoved). The input checks and the loss read them instead of copying the device tensors back, so the
        forward never waits for the GPU (the trainer passes its CPU batch). Their values are trusted to match.

        ``keep_rows`` (optional, no ``labels``): a 1-D integer tensor of flattened ``batch * seq`` token rows; the
        logits and hidden states hold only those rows, ``(1, len(rows), ...)``, and the last decoder layer computes
        everything after its attention on them alone (what transformers' ``logits_to_keep`` saves on the lm_head,
        saved on the last layer too; generation keeps each prompt's last row). A CPU ``keep_rows`` is checked (range,
        repeats); one on the GPU is trusted, as checking it would wait for the GPU. With ``labels`` and ``logits=False``
        the rows whose next token is supervised are kept that way by default (the loss is the same:
        ``LLAVA_FAST_LAST_LAYER_ROWS=all`` computes every row)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        decoding = cache is not None and cache.length > 0   # no host sync per decoded token
        if input_ids is None:
            if pixel_values is not None or pixel_values_videos is not None:
                raise ValueError("pixel_values / pixel_values_videos need input_ids (the image placeholders are found "
                                 "by their token id); pass input_ids instead of inputs_embeds")
            d = self.config.text_config.hidden_size
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != d or not inputs_embeds.is_floating_point():
                raise ValueError(f"inputs_embeds must be a float tensor of shape (batch, seq, {d}), got "
                                 f"{inputs_embeds.dtype} {tuple(inputs_embeds.shape)}")
            if inputs_embeds.device != self.device:
                raise ValueError(f"inputs_embeds is on {inputs_embeds.device} but the model is on {self.device}")
        if input_ids is not None:
            if input_ids.dim() == 1:
                input_ids = input_ids[None]
            if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"input_ids must be an integer tensor of shape (batch, seq), got "
                                 f"{input_ids.dtype} {tuple(input_ids.shape)}")
            if input_ids.device != self.device:
                raise ValueError(f"input_ids is on {input_ids.device} but the model is on {self.device}")
        first = input_ids if input_ids is not None else inputs_embeds   # embedded after the value checks
        b, n = first.shape[:2]
        if b == 0 or n == 0:
            raise ValueError(f"{'input_ids' if input_ids is not None else 'inputs_embeds'} holds no tokens (shape "
                             f"{tuple(first.shape)}); pass at least "
                             f"one sequence of at least one token")
        if n + (cache.length if cache is not None else 0) > self.config.text_config.max_position_embeddings \
                and cu_seqlens is None:
            raise ValueError(f"sequence of {n} tokens is longer than the context length "
                             f"(max_position_embeddings={self.config.text_config.max_position_embeddings}); "
                             f"split or truncate it before the model (image tokens must not be cut)")
        if cu_seqlens is not None:
            if attention_mask is not None:
                raise ValueError("packed form (cu_seqlens) takes no attention_mask: samples are delimited by cu_seqlens")
            if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1:
                raise ValueError(f"cu_seqlens must be a 1-D int32 tensor, got {cu_seqlens.dtype} "
                                 f"{tuple(cu_seqlens.shape)}")
            if position_ids is None:
                raise ValueError("position_ids is required with cu_seqlens (positions restart at each sample)")
            if b != 1:
                raise ValueError(f"packed form (cu_seqlens given) needs a batch of 1 sequence, got batch {b}")
            if cu_seqlens.device != first.device:
                raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but the model is on {first.device}")
        if position_ids is not None:
            if position_ids.dim() == 1:
                position_ids = position_ids[None]
            if position_ids.dim() != 2 or position_ids.shape[0] not in (1, b) or position_ids.shape[1] != n:
                raise ValueError(f"position_ids must have shape (batch, seq) = {(b, n)} (or (1, seq)), got "
                                 f"{tuple(position_ids.shape)}")
            if position_ids.device != first.device:
                raise ValueError(f"position_ids is on {position_ids.device} but the model is on {first.device}")
        past = cache.length if cache is not None else 0
        if attention_mask is not None:
            if attention_mask.shape != (b, past + n):
                raise ValueError(f"attention_mask must have shape (batch, past + seq) = {(b, past + n)}, got "
                                 f"{tuple(attention_mask.shape)}")
            if attention_mask.device != first.device:
                raise ValueError(f"attention_mask is on {attention_mask.device} but the model is on "
                                 f"{first.device}")
        if labels is not None:
            if labels.dim() == 1:
                labels = labels[None]
            if labels.shape != (b, n):
                raise ValueError(f"labels must have the shape of input_ids {(b, n)}, got {tuple(labels.shape)}")
            if labels.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"labels must be integer token ids in [0, {self.config.text_config.vocab_size}) "
                                 f"(vocab_size) or -100 (ignored), got {labels.dtype}")
        # every read of the inputs' values, on the host, in one call (:meth:`_host_prepare`): one copy of all of them,
        # one wait for the GPU (each read of a CUDA tensor waits for the GPU's whole queue; they were 11 per OneVision
        # training step); under torch.compile one graph break instead of one per read
        image_sizes, batch_num_images, drop_pixels, host_labels, n_rows = _host_prepare(
            self, host_inputs, decoding, n, max_seqlen, pixel_values, pixel_values_videos, keep_rows,
            labels is not None and not (logits or return_hidden or decoding), b * n, input_ids=input_ids,
            labels=labels, position_ids=position_ids, cu_seqlens=cu_seqlens, attention_mask=attention_mask,
            image_sizes=image_sizes, batch_num_images=batch_num_images)
        if drop_pixels:
            pixel_values = None   # no images at all: the vision tower is skipped (as transformers)
        if input_ids is not None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        has_media = input_ids is not None and (pixel_values is not None or pixel_values_videos is not None)
        if has_media and backend.use_fast("pack_features", inputs_embeds.device.type) and self._packable():
            # one fused launch: unpad, newlines, anyres_max / video interpolation and the scatter
            from llava_fast.ops.pack_features import pack_and_scatter

            tiles, sizes, single, vid = self._media_tiles(pixel_values, image_sizes, batch_num_images,
                                                          pixel_values_videos)
            inputs_embeds = pack_and_scatter(
                inputs_embeds, input_ids, tiles, sizes, getattr(self.model, "image_newline", None),
                image_token_id=self.config.image_token_id, pinpoints=self.config.image_grid_pinpoints,
                tile=self.config.vision_config.image_size, max_tiles=self.config.max_tiles, single_tile=single,
                video_features=vid, video_token_id=self.config.video_token_id)
        elif has_media:
            tiles, sizes, single, vid = self._media_tiles(pixel_values, image_sizes, batch_num_images,
                                                          pixel_values_videos)
            if tiles is not None:
                feats = self._pack_tiles(tiles, sizes, single)
                inputs_embeds = scatter_features_ref(inputs_embeds, input_ids, self.config.image_token_id, feats,
                                                     "Image")
            if vid is not None:
                feats = self._pool_video(vid)
                inputs_embeds = scatter_features_ref(inputs_embeds, input_ids, self.config.video_token_id, feats,
                                                     "Video")
        shift = shift_labels(labels, cu_seqlens).reshape(-1) if labels is not None else None
        rows = None
        if keep_rows is not None:
            rows = keep_rows.to(inputs_embeds.device, torch.int64, non_blocking=True)
        elif n_rows is not None:   # the supervised rows, counted on the host (_host_prepare)
            rows = torch.nonzero_static(shift != -100, size=n_rows).reshape(-1)
        hidden = self.model.language_model(inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                                           cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, cache=cache, rows=rows)
        # the fused loss takes lm_head's weight: only for a plain Linear (an adapter on lm_head is called instead)
        fused_loss = labels is not None and not logits and backend.use_fast("cross_entropy", hidden.device.type) \
            and plain_linears(self.lm_head)
        out_logits = self.lm_head(hidden) if (logits or (labels is not None and not fused_loss)) else None
        loss = None
        if labels is not None and rows is not None:   # the hidden states of the supervised rows only (_host_rows)
            shift = shift.index_select(0, rows)
        if fused_loss:  # lm_head GEMM + loss in chunks, the (tokens x vocab) logits never exist
            from llava_fast.ops.cross_entropy import fused_linear_cross_entropy

            loss = fused_linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), self.lm_head.weight,
                                              shift, num_items=num_items_in_batch,
                                              reduction="sum" if num_items_in_batch is not None else "mean",
                                              host_labels=host_labels)
        elif labels is not None:
            loss = loss_from_shifted(out_logits, shift, num_items_in_batch)
        return LlavaOutput(loss=loss, logits=out_logits if logits else None,
                           hidden_states=hidden if return_hidden else None)



class LlavaForConditionalGeneration(_LlavaBase):
    """LLaVA-1.5: one tile per image, CLIP feature layer -2 without CLS, 576 tokens per image."""

    model_type = "llava"

    def _image_pixels(self, pixel_values, image_sizes, batch_num_images):
        self._check_pixels(pixel_values)
        if pixel_values.dim() != 4:
            raise ValueError(f"pixel_values must be (num_images, 3, H, W) for llava, got {tuple(pixel_values.shape)}")
        return pixel_values, None, None

    def _pack_tiles(self, tiles, sizes, single):
        return tiles.flatten(0, 1)


class LlavaNextForConditionalGeneration(_LlavaBase):
    """LLaVA-NeXT (1.6): AnyRes tiles, unpad, one image_newline per row."""

    model_type = "llava_next"

    def _single_tile(self, n_images, batch_num_images):
        if batch_num_images is not None:
            raise ValueError("batch_num_images is a llava_onevision argument (multi-image samples); LLaVA-NeXT "
                             "encodes every image with AnyRes")
        return [False] * n_images

    def _tiles_per_image(self, image_sizes, single):
        tile = self.config.vision_config.image_size
        return [1 if s else anyres.num_tiles(tuple(sz), self.config.image_grid_pinpoints, tile)
                for sz, s in zip(image_sizes, single)]

    def _check_tiles(self, pixel_values, counts):
        if pixel_values.dim() == 5:  # transformers' (num_images, max_tiles, 3, T, T), zero-padded tiles
            if pixel_values.shape[0] != len(counts):
                raise ValueError(f"pixel_values holds {pixel_values.shape[0]} images but image_sizes {len(counts)}")
            if any(c > pixel_values.shape[1] for c in counts):
                raise ValueError(f"pixel_values has {pixel_values.shape[1]} tiles per image but image_sizes need up to "
                                 f"{max(counts)}; image_sizes must be the original (height, width) of each image")
        elif pixel_values.dim() != 4:
            raise ValueError(f"pixel_values must be (tiles, 3, T, T) or (images, tiles, 3, T, T), got "
                             f"{tuple(pixel_values.shape)}")
        elif pixel_values.shape[0] != sum(counts):
            raise ValueError(f"pixel_values holds {pixel_values.shape[0]} tiles but image_sizes need {sum(counts)} "
                             f"(per image: {counts})")

    def _flat_pixels(self, pixel_values, counts):
        self._check_tiles(pixel_values, counts)
        if pixel_values.dim() == 5:
            return torch.cat([pv[:c] for pv, c in zip(pixel_values, counts)], dim=0)
        return pixel_values

    def _host_sizes(self, image_sizes):
        return self._sizes(image_sizes)

    def _sizes(self, image_sizes) -> list[list[int]]:
        if image_sizes is None:
            raise ValueError(f"image_sizes (num_images, 2) as (height, width) is required for {self.model_type}")
        try:
            sizes = [[int(v) for v in s] for s in (image_sizes.tolist() if torch.is_tensor(image_sizes)
                                                    else image_sizes)]
        except TypeError:
            sizes = None
        if sizes is None or any(len(s) != 2 for s in sizes):
            shape = tuple(image_sizes.shape) if torch.is_tensor(image_sizes) else image_sizes
            raise ValueError(f"image_sizes must be (num_images, 2): the (height, width) of each image, got {shape}")
        return sizes

    def _image_token_counts(self, pixel_values, image_sizes, batch_num_images):
        self._check_pixels(pixel_values)
        sizes = self._sizes(image_sizes)
        single = self._single_tile(len(sizes), batch_num_images)
        self._check_tiles(pixel_values, self._tiles_per_image(sizes, single))
        vc = self.config.vision_config
        if self._tokens_per_tile() != vc.tokens_per_side ** 2:
            return None, None   # no square token grid: pack_image_features_ref refuses it
        counts = [anyres.num_image_tokens(tuple(sz), self.config.image_grid_pinpoints, vc.image_size,
                                          vc.tokens_per_side, self.config.max_tiles, single_tile=f)
                  for sz, f in zip(sizes, single)]
        bni = _per_sample(batch_num_images)
        return counts, bni

    def _image_pixels(self, pixel_values, image_sizes, batch_num_images):
        self._check_pixels(pixel_values)
        sizes = self._sizes(image_sizes)
        single = self._single_tile(len(sizes), batch_num_images)
        counts = self._tiles_per_image(sizes, single)
        return self._flat_pixels(pixel_values, counts), sizes, single

    def _pack_tiles(self, tiles, sizes, single):
        counts = self._tiles_per_image(sizes, single)
        feats = torch.split(tiles, counts, dim=0)
        packed = pack_image_features_ref(list(feats), sizes, self.model.image_newline,
                                         self.config.image_grid_pinpoints, self.config.vision_config.image_size,
                                         self.config.max_tiles)
        return torch.cat(packed, dim=0)


class LlavaOnevisionForConditionalGeneration(LlavaNextForConditionalGeneration):
    """LLaVA-OneVision: AnyRes with anyres_max_N downsampling, multi-image (one tile each) and video."""

    model_type = "llava_onevision"

    def _single_tile(self, n_images, batch_num_images):
        """Images of samples with more than one image get one tile each (batch_num_images per sample)."""
        if batch_num_images is None:
            return [False] * n_images
        bni = _per_sample(batch_num_images)
        if sum(bni) != n_images:
            raise ValueError(f"batch_num_images sums to {sum(bni)} but image_sizes holds {n_images} images")
        return [n > 1 for n in bni for _ in range(n)]

    def _check_videos(self, pixel_values_videos):
        self._check_pixels(pixel_values_videos, "pixel_values_videos")
        if pixel_values_videos.dim() != 5:
            raise ValueError(f"pixel_values_videos must be (videos, frames, 3, T, T), got "
                             f"{tuple(pixel_values_videos.shape)}")

    def _video_pixels(self, pixel_values_videos):
        """Every frame of every video as one (videos * frames, 3, T, T) tensor (checked)."""
        self._check_videos(pixel_values_videos)
        return pixel_values_videos.flatten(0, 1)

    def _video_token_counts(self, pixel_values_videos):
        self._check_videos(pixel_values_videos)
        v, frames = pixel_values_videos.shape[:2]
        return [anyres.num_video_tokens(frames, self.config.vision_config.tokens_per_side)] * v

    def _pool_video(self, v):
        """(videos, frames, t*t, D_text) projected frames -> pooled frames + one image_newline per video."""
        b = v.shape[0]
        f = pool_video_features_ref(v.flatten(0, 1), self.config.vision_config.tokens_per_side)
        f = f.reshape(b, -1, f.shape[-1])
        nl = self.model.image_newline[None, None, :].expand(b, 1, -1)  # no cast: cat promotes, as transformers
        return torch.cat((f, nl), dim=1).flatten(0, 1)


CLASSES = {c.model_type: c for c in (LlavaForConditionalGeneration, LlavaNextForConditionalGeneration,
                                      LlavaOnevisionForConditionalGeneration)}
