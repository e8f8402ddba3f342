"""Data for training: LLaVA JSON/JSONL samples, conversation templates with exact label masking, robust image
decoding, and packing into fixed token budgets (cu_seqlens) or padded batches.

Typical use::

    from llava_fast.data import ImageSpec, LlavaDataset, PackedBatchSampler, collate_packed, load_tokenizer
    tok = load_tokenizer(model_dir)
    ds = LlavaDataset("data.json", "images/", tok, ImageSpec.from_model_config(cfg), "vicuna_v1",
                      image_token_id=cfg.image_token_id, max_len=4096)
    sampler = PackedBatchSampler(ds.lengths, max_tokens=8192, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate_packed, num_workers=4)
"""
from llava_fast.data.collate import collate_packed, collate_padded
from llava_fast.data.dataset import DataError, DropStats, LlavaDataset, read_records
from llava_fast.data.images import ImageSpec, load_image, preprocess_images, probe_size, to_rgb
from llava_fast.data.packing import (PackedBatchSampler, PaddedBatchSampler, modality_length_grouped_indices,
                                     pack_fill, pack_lengths)
from llava_fast.data.templates import (IGNORE_INDEX, IMAGE_PLACEHOLDER, TEMPLATES, Encoded, SampleError,
                                       build_prompt, encode_conversation, expand_placeholders, load_tokenizer,
                                       tokenize_with_media)

__all__ = ["collate_packed", "collate_padded", "DataError", "DropStats", "LlavaDataset", "read_records",
           "ImageSpec", "load_image", "preprocess_images", "probe_size", "to_rgb", "PackedBatchSampler",
           "PaddedBatchSampler", "modality_length_grouped_indices", "pack_fill", "pack_lengths", "IGNORE_INDEX",
           "IMAGE_PLACEHOLDER", "TEMPLATES", "Encoded", "SampleError", "build_prompt", "encode_conversation",
           "expand_placeholders", "load_tokenizer", "tokenize_with_media"]
