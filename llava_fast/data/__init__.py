"""Data for training: LLaVA JSON/JSONL samples, conversation templates with exact label masking, robust image
decoding, and packing into fixed token budgets (cu_seqlens) or padded batches.

Image preprocessing and token counts are ``llava_fast.ops.anyres`` (the library's reference); this package adds
robust file decoding (``load_image``, ``probe_size``; video files: ``probe_video``, ``read_video``, with PyAV) and
:func:`image_config` (a model config -> its ``ImageProcessorConfig``).

Typical use::

    from llava_fast.data import LlavaDataset, PackedBatchSampler, collate_packed, load_tokenizer
    tok = load_tokenizer(model_dir)
    ds = LlavaDataset.for_model(model.config, "data.json", "images/", tok, "vicuna_v1", max_len=4096)
    sampler = PackedBatchSampler(ds.lengths, max_tokens=8192, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate_packed, num_workers=4)
"""
from llava_fast.data.collate import collate_packed, collate_padded
from llava_fast.data.dataset import DataError, DropStats, LlavaDataset, read_records
from llava_fast.data.images import (ImageProcessorConfig, cls_token_kept, image_config, image_tiles, image_tokens,
                                    load_image, load_image_u8, probe_size, to_rgb)
from llava_fast.data.packing import (PackedBatchSampler, PaddedBatchSampler, cu_seqlens_from_position_ids,
                                     modality_length_grouped_indices, pack_fill, pack_lengths)
from llava_fast.data.templates import (IGNORE_INDEX, IMAGE_PLACEHOLDER, TEMPLATES, Encoded, SampleError,
                                       build_prompt, encode_conversation, expand_placeholders, load_tokenizer,
                                       tokenize_with_media)
from llava_fast.data.video import VideoInfo, probe_video, read_video, sample_frames

__all__ = ["collate_packed", "collate_padded", "DataError", "DropStats", "LlavaDataset", "read_records",
           "ImageProcessorConfig", "image_config", "cls_token_kept", "image_tokens", "image_tiles", "load_image",
           "load_image_u8",
           "probe_size", "to_rgb", "PackedBatchSampler", "cu_seqlens_from_position_ids",
           "PaddedBatchSampler", "modality_length_grouped_indices", "pack_fill", "pack_lengths", "IGNORE_INDEX",
           "IMAGE_PLACEHOLDER", "TEMPLATES", "Encoded", "SampleError", "build_prompt", "encode_conversation",
           "expand_placeholders", "load_tokenizer", "tokenize_with_media", "VideoInfo", "probe_video", "read_video",
           "sample_frames"]
