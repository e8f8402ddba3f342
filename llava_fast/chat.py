"""``llava-fast chat --model DIR --image FILE`` (or ``--video FILE``): a terminal conversation about one image or
video.

The tokenizer and (when present) ``preprocessor_config.json`` are read from the model folder, local files only.
The prompt uses the model's chat template when it has one that places the image (the processor's
``chat_template.json``, else the tokenizer's), else a built-in template for the language model (Vicuna
``USER: <image>\\n... ASSISTANT:`` for Llama, Llama 3's headers for a Llama 3 tokenizer, ChatML for Qwen2; a Mistral
model needs its chat template). Each ``<image>`` placeholder becomes as many image tokens as the image produces, a
``<video>`` (LLaVA-OneVision) as many video tokens as the video's frames produce. An answer ends at an eos token of
the tokenizer or of ``generation_config.json``, or at an end-of-turn token (``</s>``, ``<|im_end|>``,
``<|eot_id|>``).
"""
from __future__ import annotations

import json
import os
import sys

import torch

TEMPLATES = {  # the built-in formats, by the training template (predict.default_template) of the language model
    "vicuna_v1": {"user": "USER: {text} ", "assistant": "ASSISTANT: {text}</s>", "generation": "ASSISTANT:"},
    "qwen": {"user": "<|im_start|>user\n{text}<|im_end|>\n", "assistant": "<|im_start|>assistant\n{text}<|im_end|>\n",
             "generation": "<|im_start|>assistant\n"},
    "llama3": {"user": "<|start_header_id|>user<|end_header_id|>\n\n{text}<|eot_id|>",
               "assistant": "<|start_header_id|>assistant<|end_header_id|>\n\n{text}<|eot_id|>",
               "generation": "<|start_header_id|>assistant<|end_header_id|>\n\n"},
}
END_OF_TURN = ("</s>", "<|im_end|>", "<|eot_id|>")


def load_image(path: str, max_pixels: int = 100_000_000) -> torch.Tensor:
    """Read an image file as uint8 (3, H, W) RGB, with errors that name the file. The EXIF orientation is applied
    (a phone photo shot upright is seen upright), as transformers' ``load_image`` does for its chat pipelines."""
    from PIL import Image, ImageOps

    from llava_fast.ops.anyres import to_uint8_chw

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--image {path!r}: no such file")
    try:
        with Image.open(path) as im:  # (PIL refuses images over 2 * Image.MAX_IMAGE_PIXELS here already)
            if im.width * im.height > max_pixels:
                raise ValueError(f"--image {path!r}: {im.width}x{im.height} is over the {max_pixels} pixel limit; "
                                 f"downscale the image first")
            im.load()
            return to_uint8_chw(ImageOps.exif_transpose(im))
    except Image.DecompressionBombError as e:
        raise ValueError(f"--image {path!r}: {e} (PIL's decompression-bomb guard); downscale the image first") from e
    except (OSError, SyntaxError) as e:
        raise ValueError(f"--image {path!r}: cannot decode the image ({e})") from e


def stop_token_ids(tokenizer, model_dir: str) -> set[int]:
    """Token ids that end an answer: the tokenizer's eos, ``generation_config.json``'s eos ids and the end-of-turn
    tokens of the templates that are single tokens of the tokenizer."""
    ids = {tokenizer.eos_token_id} - {None}
    gc = os.path.join(model_dir, "generation_config.json")
    if os.path.isfile(gc):
        with open(gc) as f:
            eos = json.load(f).get("eos_token_id")
        ids |= set([eos] if isinstance(eos, int) else (eos or []))
    vocab = tokenizer.get_vocab()
    ids |= {vocab[t] for t in END_OF_TURN if t in vocab}
    return ids


def find_chat_template(tokenizer, model_dir: str) -> str | None:
    """The processor's (``chat_template.jinja``, ``chat_template.json`` or ``processor_config.json``) or else the
    tokenizer's chat template, the first that renders one ``<image>`` for a user turn with an image; None when none
    does."""
    candidates = []
    jinja = os.path.join(model_dir, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            candidates.append(f.read())
    for name in ("chat_template.json", "processor_config.json"):
        pp = os.path.join(model_dir, name)
        if os.path.isfile(pp):
            with open(pp, encoding="utf-8") as f:
                candidates.append(json.load(f).get("chat_template"))
    tmpl = getattr(tokenizer, "chat_template", None)
    candidates.append(tmpl.get("default") if isinstance(tmpl, dict) else tmpl)
    return next((t for t in candidates if t and places_media(tokenizer, t, "image")), None)


def places_media(tokenizer, template: str, media: str) -> bool:
    """Whether ``template`` renders one ``<media>`` placeholder for a user turn holding an image / a video."""
    probe = [{"role": "user", "content": [{"type": media}, {"type": "text", "text": "Q"}]}]
    try:
        text = tokenizer.apply_chat_template(probe, chat_template=template, tokenize=False, add_generation_prompt=True)
    except Exception:  # a text-only template that cannot render content lists
        return False
    return isinstance(text, str) and text.count(f"<{media}>") == 1


def render_chat(tokenizer, template: str, turns: list[tuple[str, str | None]]) -> str:
    """The prompt ``template`` (a chat template that places media) writes for ``turns`` (human text, gpt answer or
    None for the question asked), up to the answer: each ``<image>`` / ``<video>`` of a human text becomes an
    image / video item of its message, in order, the text around the tags a text item (stripped)."""
    from llava_fast.data.templates import split_media

    messages = []
    for q, a in turns:
        content = []
        for _, chunk, tag in split_media(q):
            if chunk.strip():
                content.append({"type": "text", "text": chunk.strip()})
            if tag is not None:
                content.append({"type": tag.strip("<>")})
        messages.append({"role": "user", "content": content})
        if a is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": a}]})
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)


def decode_answer(tokenizer, tokens: list[int], stop_ids: set[int]) -> str:
    """The text of generated ``tokens`` up to the first stop token or end-of-turn string, stripped."""
    end = next((i for i, t in enumerate(tokens) if t in stop_ids), len(tokens))
    answer = tokenizer.decode(tokens[:end], skip_special_tokens=True)
    for s in END_OF_TURN:
        answer = answer.split(s)[0]
    return answer.strip()


def load_video(path: str, frames: int = 32, max_pixels: int = 100_000_000):
    """Read ``frames`` frames of a video file, uniformly (as LLaVA-NeXT samples them; every frame of a shorter video),
    as uint8 (F, H, W, 3) RGB, with errors that name the file. Needs PyAV (``pip install av``)."""
    from llava_fast.data.templates import SampleError

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--video {path!r}: no such file")
    try:
        from llava_fast.data.video import read_video

        return read_video(path, frames_upbound=frames, max_pixels=max_pixels)
    except (SampleError, ImportError) as e:
        raise ValueError(f"--video {path!r}: {e}") from None


class ChatSession:
    def __init__(self, model_dir: str, device: str | None = None, dtype=None):
        import llava_fast
        from transformers import AutoTokenizer

        from llava_fast.data.images import checkpoint_image_config

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = llava_fast.from_pretrained(model_dir, dtype=dtype, device=device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        cfg = self.model.config
        self.image_config = checkpoint_image_config(model_dir, cfg)
        self.chat_template = find_chat_template(self.tokenizer, model_dir)
        self.template = None  # the built-in one, when the model has no chat template that places the image
        if self.chat_template is None:
            from llava_fast.predict import default_template

            try:
                self.template = TEMPLATES[default_template(cfg, self.tokenizer)]
            except ValueError:
                raise ValueError(f"{model_dir}: no chat template that places the image (chat_template.json, "
                                 f"processor_config.json or the tokenizer's chat_template) and no built-in template "
                                 f"for a {cfg.text_config.model_type} language model; add the model's chat template "
                                 f"(chat_template.json) to the folder") from None
        self.stop_ids = stop_token_ids(self.tokenizer, model_dir)
        self.turns: list[tuple[str, str]] = []
        self.dropped_turns = 0   # turns the last ask dropped to fit the context
        self.image = None        # preprocess_images' output for the image, or None
        self.video = None        # (frames, 3, T, T) preprocessed frames of the video, or None

    def set_image(self, image_u8: torch.Tensor):
        """Sets the image the conversation is about: starts a new conversation (the turns about the previous image
        are cleared)."""
        from llava_fast.ops.anyres import preprocess_images

        out = preprocess_images([image_u8], self.image_config)
        self.image, self.video = out, None
        self.turns = []

    def set_video(self, frames_u8):
        """Sets the video the conversation is about (uint8 frames, (F, H, W, C) or a list; LLaVA-OneVision models
        only): starts a new conversation."""
        from llava_fast.ops.anyres import preprocess_video

        cfg = self.model.config
        if cfg.model_type != "llava_onevision" or getattr(cfg, "video_token_id", None) is None:
            raise ValueError(f"--video: a {cfg.model_type} model takes images only (videos need a LLaVA-OneVision "
                             f"model); use --image")
        if self.chat_template is not None and not places_media(self.tokenizer, self.chat_template, "video"):
            raise ValueError("--video: the model's chat template does not place videos (it renders no '<video>' "
                             "for a video in a user turn); add a chat template that does (chat_template.json)")
        self.video, self.image = preprocess_video(frames_u8, self.image_config), None
        self.turns = []

    @property
    def media(self) -> str | None:
        """``"image"``, ``"video"`` or None: what the conversation is about."""
        return "image" if self.image is not None else "video" if self.video is not None else None

    def media_tokens(self) -> tuple[int, int]:
        """(placeholder token id, number of tokens it becomes) of the conversation's image or video."""
        from llava_fast.ops.anyres import num_video_tokens

        cfg = self.model.config
        if self.media == "image":
            return cfg.image_token_id, int(self.image["num_image_tokens"][0])
        return cfg.video_token_id, num_video_tokens(self.video.shape[0], self.image_config.tokens_per_side)

    def _prompt(self, question: str) -> str:
        turns = self.turns + [(question, None)]
        if self.chat_template is not None:
            return render_chat(self.tokenizer, self.chat_template,
                               [(f"<{self.media}>{q}" if (i == 0 and self.media) else q, a)
                                for i, (q, a) in enumerate(turns)])
        parts = []
        for i, (q, a) in enumerate(turns):
            text = f"<{self.media}>\n{q}" if (i == 0 and self.media) else q
            parts.append(self.template["user"].format(text=text))
            if a is not None:
                parts.append(self.template["assistant"].format(text=a))
        return "".join(parts) + self.template["generation"]

    def _prompt_ids(self, question: str) -> torch.Tensor:
        prompt = self._prompt(question)
        bos = self.tokenizer.bos_token
        # no second BOS when the template writes one (as transformers' processors)
        ids = self.tokenizer(prompt, add_special_tokens=not (bos and prompt.startswith(bos)),
                             return_tensors="pt").input_ids[0].tolist()
        if self.media:
            tok, n = self.media_tokens()
            if ids.count(tok) != 1:
                raise ValueError(f"the tokenizer did not turn '<{self.media}>' into the {self.media} token id {tok}; "
                                 f"add '<{self.media}>' as a special token of the tokenizer in the model folder")
            i = ids.index(tok)
            ids = ids[:i] + [tok] * n + ids[i + 1:]
        return torch.tensor([ids], device=self.model.device)

    def _fitting_prompt_ids(self, question: str, max_new_tokens: int) -> torch.Tensor:
        """The prompt of ``question`` after the conversation so far, with room for ``max_new_tokens`` in the
        context: the oldest turns are dropped when the conversation has outgrown it (``self.dropped_turns`` counts
        them; the image stays, placed in the first turn kept). Without them generate refused the prompt and the chat
        ended with a ValueError once a conversation reached the context length."""
        ctx = self.model.config.text_config.max_position_embeddings
        turns, self.dropped_turns = list(self.turns), 0
        ids = self._prompt_ids(question)
        while ids.shape[1] + max_new_tokens > ctx and self.turns:
            self.turns.pop(0)
            self.dropped_turns += 1
            ids = self._prompt_ids(question)
        if ids.shape[1] + max_new_tokens > ctx:
            self.turns, self.dropped_turns = turns, 0
            what = f"question and {self.media}" if self.media else "question"
            raise ValueError(f"the {what} alone take {ids.shape[1]} tokens: with max_new_tokens ({max_new_tokens}) "
                             f"that is over the model's context length (max_position_embeddings={ctx}); lower "
                             f"--max-new-tokens or ask a shorter question")
        return ids

    def ask(self, question: str, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
            top_k: int = 0) -> str:
        """The answer to ``question`` (greedy for ``temperature`` 0, else sampled with ``temperature``, ``top_k``
        and ``top_p``); the turn is added to the conversation."""
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if temperature == 0 and (top_p != 1.0 or top_k != 0):
            raise ValueError(f"sampling with top_p={top_p}, top_k={top_k} needs temperature > 0 (temperature 0 is "
                             f"greedy decoding, which has neither)")
        ids = self._fitting_prompt_ids(question, max_new_tokens)
        kw = {}
        if self.image is not None:
            kw = dict(pixel_values=self.image["pixel_values"].to(self.model.device, self.model.dtype),
                      image_sizes=self.image["image_sizes"])
            if self.model.config.model_type == "llava":
                kw.pop("image_sizes")
        elif self.video is not None:
            kw = dict(pixel_values_videos=self.video[None].to(self.model.device, self.model.dtype))
        stops = list(END_OF_TURN)
        sample = temperature > 0
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                  do_sample=sample, temperature=temperature if sample else 1.0, top_p=top_p,
                                  top_k=top_k,
                                  eos_token_id=sorted(self.stop_ids), pad_token_id=self.tokenizer.pad_token_id or 0,
                                  stop_strings=stops, tokenizer=self.tokenizer, **kw)
        answer = decode_answer(self.tokenizer, out[0, ids.shape[1]:].tolist(), self.stop_ids)
        self.turns.append((question, answer))
        return answer


def run_chat(model_dir: str, image: str | None, device: str | None = None, max_new_tokens: int = 128,
             temperature: float = 0.0, top_p: float = 1.0, stream=sys.stdin, top_k: int = 0,
             video: str | None = None, frames: int = 32) -> int:
    if image and video:
        raise ValueError("give --image or --video, not both (a conversation is about one image or one video)")
    if not isinstance(frames, int) or frames < 1:
        raise ValueError(f"--frames must be an integer >= 1, got {frames!r}")
    print(f"loading {model_dir} ...", flush=True)
    session = ChatSession(model_dir, device=device)
    if image:
        session.set_image(load_image(image))
        print(f"image {image}: {session.media_tokens()[1]} image tokens")
    if video:
        session.set_video(load_video(video, frames))
        print(f"video {video}: {session.video.shape[0]} frames, {session.media_tokens()[1]} video tokens")
    print("type a question (empty line or Ctrl-D to quit)")
    for line in stream:
        q = line.strip()
        if not q:
            break
        answer = session.ask(q, max_new_tokens, temperature, top_p, top_k)
        if session.dropped_turns:
            print(f"(the conversation outgrew the model's context: its {session.dropped_turns} oldest turn(s) were "
                  f"dropped)", flush=True)
        print("assistant:", answer, flush=True)
    return 0
