"""``llava-fast chat --model DIR --image FILE``: a terminal conversation about one image.

The tokenizer and (when present) ``preprocessor_config.json`` are read from the model folder, local files only.
The prompt uses the tokenizer's chat template when it has one that places the image, else a built-in template for the
model family (Vicuna ``USER: <image>\\n... ASSISTANT:`` for LLaVA-1.5/NeXT, ChatML for OneVision). Each ``<image>``
placeholder becomes as many image tokens as the image produces.
"""
from __future__ import annotations

import json
import os
import sys

import torch

TEMPLATES = {
    "vicuna": {"user": "USER: {text} ", "assistant": "ASSISTANT: {text}</s>", "generation": "ASSISTANT:"},
    "chatml": {"user": "<|im_start|>user\n{text}<|im_end|>\n", "assistant": "<|im_start|>assistant\n{text}<|im_end|>\n",
               "generation": "<|im_start|>assistant\n"},
}


def load_image(path: str, max_pixels: int = 100_000_000) -> torch.Tensor:
    """Read an image file as uint8 (3, H, W) RGB, with errors that name the file. The EXIF orientation is applied
    (a phone photo shot upright is seen upright), as transformers' ``load_image`` does for its chat pipelines."""
    from PIL import Image, ImageOps

    from llava_fast.ops.anyres import to_uint8_chw

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--image {path!r}: no such file")
    try:
        with Image.open(path) as im:
            if im.width * im.height > max_pixels:
                raise ValueError(f"--image {path!r}: {im.width}x{im.height} is over the {max_pixels} pixel limit")
            im.load()
            return to_uint8_chw(ImageOps.exif_transpose(im))
    except (OSError, SyntaxError) as e:
        raise ValueError(f"--image {path!r}: cannot decode the image ({e})") from e


class ChatSession:
    def __init__(self, model_dir: str, device: str | None = None, dtype=None):
        import llava_fast
        from transformers import AutoTokenizer

        from llava_fast.ops.anyres import ImageProcessorConfig

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = llava_fast.from_pretrained(model_dir, dtype=dtype, device=device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        cfg = self.model.config
        pp = os.path.join(model_dir, "preprocessor_config.json")
        overrides = dict(tile=cfg.vision_config.image_size, patch_size=cfg.vision_config.patch_size)
        if cfg.image_grid_pinpoints is not None:
            overrides["image_grid_pinpoints"] = cfg.image_grid_pinpoints
        if os.path.isfile(pp):
            with open(pp) as f:
                self.image_config = ImageProcessorConfig.from_dict(json.load(f), variant=cfg.model_type, **overrides)
        else:
            self.image_config = ImageProcessorConfig.for_variant(cfg.model_type, **overrides)
        self.template = TEMPLATES["chatml" if cfg.text_config.model_type == "qwen2" else "vicuna"]
        self.turns: list[tuple[str, str]] = []
        self.image = None

    def set_image(self, image_u8: torch.Tensor):
        from llava_fast.ops.anyres import preprocess_images

        out = preprocess_images([image_u8], self.image_config)
        self.image = out
        self.turns = []

    def _prompt_ids(self, question: str) -> torch.Tensor:
        parts = []
        for i, (q, a) in enumerate(self.turns + [(question, None)]):
            text = ("<image>\n" + q) if (i == 0 and self.image is not None) else q
            parts.append(self.template["user"].format(text=text))
            if a is not None:
                parts.append(self.template["assistant"].format(text=a))
        prompt = "".join(parts) + self.template["generation"]
        ids = self.tokenizer(prompt, add_special_tokens=True, return_tensors="pt").input_ids[0].tolist()
        tok = self.model.config.image_token_id
        if self.image is not None:
            n = int(self.image["num_image_tokens"][0]) if "num_image_tokens" in self.image else None
            if ids.count(tok) != 1:
                raise ValueError(f"the tokenizer did not turn '<image>' into the image token id {tok}; add '<image>' "
                                 f"as a special token of the tokenizer in the model folder")
            i = ids.index(tok)
            ids = ids[:i] + [tok] * n + ids[i + 1:]
        return torch.tensor([ids], device=self.model.device)

    def ask(self, question: str, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0) -> str:
        ids = self._prompt_ids(question)
        kw = {}
        if self.image is not None:
            kw = dict(pixel_values=self.image["pixel_values"].to(self.model.device, self.model.dtype),
                      image_sizes=self.image["image_sizes"])
            if self.model.config.model_type == "llava":
                kw.pop("image_sizes")
        eos = self.tokenizer.eos_token_id
        stops = ["</s>", "<|im_end|>"]
        out = self.model.generate(ids, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                                  temperature=max(temperature, 1e-5), top_p=top_p, eos_token_id=eos,
                                  pad_token_id=self.tokenizer.pad_token_id or 0, stop_strings=stops,
                                  tokenizer=self.tokenizer, **kw)
        answer = self.tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
        for s in stops:
            answer = answer.split(s)[0]
        answer = answer.strip()
        self.turns.append((question, answer))
        return answer


def run_chat(model_dir: str, image: str | None, device: str | None = None, max_new_tokens: int = 128,
             temperature: float = 0.0, top_p: float = 1.0, stream=sys.stdin) -> int:
    print(f"loading {model_dir} ...", flush=True)
    session = ChatSession(model_dir, device=device)
    if image:
        session.set_image(load_image(image))
        print(f"image {image}: {int(session.image['num_image_tokens'][0])} image tokens")
    print("type a question (empty line or Ctrl-D to quit)")
    for line in stream:
        q = line.strip()
        if not q:
            break
        print("assistant:", session.ask(q, max_new_tokens, temperature, top_p), flush=True)
    return 0
