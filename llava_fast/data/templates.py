"""Conversation templates and label masking (reference-spec.md sections 5.1-5.3).

A sample is tokenized the way the original LLaVA code does it (``tokenizer_image_token``): the prompt is split at
``<image>``/``<video>``, each chunk is tokenized on its own (a BOS the tokenizer adds is kept for the first chunk
only) and one placeholder id (:data:`IMAGE_PLACEHOLDER` = -200, :data:`VIDEO_PLACEHOLDER` = -201) stands for each
image between chunks. The placeholders are expanded into N copies of the model's image token later, once N is known
(:func:`expand_placeholders`).

Labels are decided from character spans, not from token-count arithmetic: a token is supervised when its characters
overlap a supervised span of the prompt. This gives the masks of section 5.3 exactly, for any fast tokenizer:

* ``plain`` (stage 1): ``"<image>" + caption + "\\n"``; the BOS and image are masked, the caption and the ``\\n`` are
  targets, no EOS.
* ``vicuna_v1`` (LLaVA-1.5 stage 2): ``SYSTEM USER: <image>\\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT: A2</s>``;
  supervised = each answer plus its ``</s>``.
* ``qwen`` (ChatML, OneVision): system turn, then ``<|im_start|>role\\ncontent<|im_end|>\\n`` per message; the whole
  assistant message (header ``<|im_start|>assistant\\n`` and trailing ``<|im_end|>\\n`` included) is supervised, and
  then the ids of ``\\n``, ``<|im_start|>`` and ``<|im_end|>`` are un-masked everywhere (a quirk of the original
  ``preprocess_qwen`` kept for loss equality).
* ``llama3`` (LLaVA-NeXT's ``--version llava_llama_3``, its Llama-3-8B models): LLaVA-NeXT's ``preprocess_llama3``,
  which renders the system message and then each turn alone with Llama 3 Instruct's chat template:
  ``<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nSYSTEM<|eot_id|>`` then
  ``<|start_header_id|>user|assistant<|end_header_id|>\n\ncontent<|eot_id|>`` per message (content trimmed, as the
  chat template does). The whole assistant message, header and ``<|eot_id|>`` included, is supervised; then the ids
  ``tokenizer.convert_tokens_to_ids`` gives for ``<|begin_of_text|>``, ``<|start_header_id|>``,
  ``<|end_header_id|>``, ``<|eot_id|>`` and ``"\n\n"`` are un-masked everywhere (Llama 3's byte-level vocabulary has
  no ``"\n\n"`` entry, so that one matches nothing there; an unknown-token id is never un-masked).
"""
from __future__ import annotations

from dataclasses import dataclass

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = -200
VIDEO_PLACEHOLDER = -201
IMAGE_TAG = "<image>"
VIDEO_TAG = "<video>"

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
QWEN_SYSTEM = "You are a helpful assistant."
LLAMA3_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual content that "
                 "the user provides, and assist the user with a variety of tasks using natural language.")
LLAMA3_BOS = "<|begin_of_text|>"
LLAMA3_SPECIALS = (LLAMA3_BOS, "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
TEMPLATES = ("plain", "vicuna_v1", "qwen", "llama3")
# tokens un-masked everywhere after the spans are decided (the original's preprocess_qwen / preprocess_llama3)
_UNMASKED = {"qwen": ("<|im_start|>", "<|im_end|>"), "llama3": LLAMA3_SPECIALS + ("\n\n",)}


def _llama3_turn(role: str, text: str) -> str:
    return f"<|start_header_id|>{role}<|end_header_id|>\n\n{text.strip()}<|eot_id|>"


class SampleError(ValueError):
    """A sample that cannot be used; ``reason`` is a short counter key (e.g. ``placeholder_mismatch``)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # pickled with its reason (indexing in worker processes sends drops back)
        return type(self), (self.reason, str(self))


@dataclass
class Encoded:
    """Token ids with one placeholder per image/video, their labels, and how many images/videos were referenced."""
    input_ids: list[int]
    labels: list[int]
    n_images: int
    n_videos: int


def load_tokenizer(folder: str):
    """The tokenizer saved in a checkpoint folder, from local files only (a fast tokenizer is required)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if not getattr(tok, "is_fast", False):
        raise ValueError(f"tokenizer in {folder!r} is not a fast (tokenizers) tokenizer; llava_fast needs offsets: "
                         "save it with a tokenizer.json (PreTrainedTokenizerFast)")
    return tok


def split_media(text: str):
    """Yield (start, chunk, tag): the text chunks between <image>/<video> tags, where each starts, and the tag after
    it (None after the last chunk)."""
    i = 0
    while True:
        a, b = text.find(IMAGE_TAG, i), text.find(VIDEO_TAG, i)
        cands = [(p, t) for p, t in ((a, IMAGE_TAG), (b, VIDEO_TAG)) if p >= 0]
        if not cands:
            yield i, text[i:], None
            return
        p, t = min(cands)
        yield i, text[i:p], t
        i = p + len(t)


def tokenize_with_media(tokenizer, prompt: str) -> tuple[list[int], list[tuple[int, int]]]:
    """``tokenizer_image_token`` with character offsets: ids (placeholders for media) and (start, end) per id."""
    ids: list[int] = []
    offs: list[tuple[int, int]] = []
    bos = tokenizer.bos_token_id
    first = True
    for start, chunk, tag in split_media(prompt):
        enc = tokenizer(chunk, return_offsets_mapping=True)
        cids, coffs = list(enc["input_ids"]), list(enc["offset_mapping"])
        if not first and bos is not None and cids and cids[0] == bos:
            cids, coffs = cids[1:], coffs[1:]
        first = False
        ids += cids
        offs += [(start + s, start + e) if e > s else (start + s, start + s) for s, e in coffs]
        if tag is not None:
            ids.append(IMAGE_PLACEHOLDER if tag == IMAGE_TAG else VIDEO_PLACEHOLDER)
            p = start + len(chunk)
            offs.append((p, p + len(tag)))
    return ids, offs


def normalize_conversations(conversations) -> list[tuple[str, str]]:
    """(role, text) pairs with role in {human, gpt}; drops a leading non-human turn; checks alternation.

    A turn with exactly one ``<image>`` not at its start gets it moved to the front as ``"<image>\\n" + text``
    (NXT ``preprocess_multimodal``; interleaved multi-image turns are kept as they are).
    """
    if not isinstance(conversations, list) or not conversations:
        raise SampleError("empty_conversation", "conversations must be a non-empty list")
    turns = []
    for t in conversations:
        if not isinstance(t, dict) or "value" not in t or "from" not in t:
            raise SampleError("bad_format", f"each turn needs 'from' and 'value', got {t!r:.80}")
        role = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}.get(str(t["from"]).lower())
        if role is None:
            raise SampleError("bad_roles", f"unknown role {t['from']!r} (expected human or gpt)")
        turns.append((role, str(t["value"])))
    if turns[0][0] != "human":
        turns = turns[1:]
    if len(turns) < 2:
        raise SampleError("empty_conversation", "needs at least one human turn and one gpt turn")
    for i, (role, _) in enumerate(turns):
        if role != ("human" if i % 2 == 0 else "gpt"):
            raise SampleError("bad_roles", f"roles must alternate human/gpt; turn {i} is {role}")
    out = []
    for role, text in turns:
        for tag in (IMAGE_TAG, VIDEO_TAG):
            if text.count(tag) == 1 and not text.startswith(tag):
                # NXT strips once more: a turn holding only the tag (and whitespace) becomes the bare tag
                text = (tag + "\n" + text.replace(tag, "").strip()).strip()
        out.append((role, text))
    return out


def build_prompt(turns: list[tuple[str, str]], template: str, n_images: int = 1, n_videos: int = 0):
    """The prompt string and its supervised character spans [(start, end), ...]."""
    if template == "plain":
        # preprocess_plain: first turn replaced by the bare media tags, caption = second turn, sep "\n".
        head = IMAGE_TAG * n_images + VIDEO_TAG * n_videos
        cap = turns[1][1]
        prompt = head + cap + "\n"
        return prompt, [(len(head), len(prompt))]
    if template == "vicuna_v1":
        prompt = VICUNA_SYSTEM + " "
        spans = []
        for role, text in turns:
            if role == "human":
                prompt += "USER: " + text + " "
            else:
                prompt += "ASSISTANT: "
                s = len(prompt)
                prompt += text + "</s>"
                spans.append((s, len(prompt)))
        return prompt, spans
    if template == "qwen":
        prompt = "<|im_start|>system\n" + QWEN_SYSTEM + "<|im_end|>\n"
        spans = []
        for role, text in turns:
            s = len(prompt)
            prompt += "<|im_start|>" + ("user" if role == "human" else "assistant") + "\n" + text + "<|im_end|>\n"
            if role == "gpt":
                spans.append((s, len(prompt)))
        return prompt, spans
    if template == "llama3":
        prompt = _llama3_turn("system", LLAMA3_SYSTEM)  # the BOS is the tokenizer's (encode_conversation)
        spans = []
        for role, text in turns:
            s = len(prompt)
            prompt += _llama3_turn("user" if role == "human" else "assistant", text)
            if role == "gpt":
                spans.append((s, len(prompt)))
        return prompt, spans
    raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")


def is_llama3_tokenizer(tokenizer) -> bool:
    """Whether ``tokenizer`` is Llama 3's (it has Llama 3 Instruct's ``<|start_header_id|>``)."""
    return tokenizer is not None and "<|start_header_id|>" in tokenizer.get_vocab()


def check_template(tokenizer, template: str, what: str = "template") -> None:
    """Raises ValueError naming ``what`` when ``template`` is unknown or the tokenizer cannot write it (``llama3``
    needs Llama 3's special tokens)."""
    if template not in TEMPLATES:
        raise ValueError(f"{what} must be one of {', '.join(TEMPLATES)}, got {template!r}")
    if template == "llama3":
        missing = [t for t in LLAMA3_SPECIALS if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)]
        if missing:
            raise ValueError(f"{what} 'llama3' needs a Llama 3 tokenizer; this one has no {', '.join(missing)}: use "
                             f"the template the model was trained with (vicuna_v1, qwen or plain)")


def tokenize_prompt(tokenizer, prompt: str, template: str) -> tuple[list[int], list[tuple[int, int]]]:
    """:func:`tokenize_with_media` of a ``template`` prompt, with exactly one BOS where the format has one: a
    ``llama3`` prompt starts with ``<|begin_of_text|>`` (its chat template writes it; Llama 3's tokenizer adds it too,
    once: a tokenizer that does not gets it here); a ``chat`` prompt (a model's own chat template, ``llava-fast
    predict``) that writes the tokenizer's BOS as text keeps one."""
    bos_text = tokenizer.bos_token if template == "chat" else None
    lead = len(bos_text) if bos_text and prompt.startswith(bos_text) else 0
    ids, offs = tokenize_with_media(tokenizer, prompt[lead:])
    offs = [(s + lead, e + lead) for s, e in offs]
    if template == "llama3":
        check_template(tokenizer, template)
        bos = tokenizer.convert_tokens_to_ids(LLAMA3_BOS)
    else:
        bos = tokenizer.bos_token_id if lead else None
    if bos is not None and (not ids or ids[0] != bos):
        ids, offs = [bos] + ids, [(0, lead)] + offs
    return ids, offs


def _single_id(tokenizer, text: str) -> int | None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


def encode_conversation(tokenizer, conversations, template: str, n_images: int = 0, n_videos: int = 0) -> Encoded:
    """Token ids (one placeholder per image/video) and labels for one LLaVA-format sample.

    Raises :class:`SampleError` when the number of ``<image>``/``<video>`` tags differs from ``n_images``/``n_videos``
    or nothing is supervised.
    """
    turns = normalize_conversations(conversations)
    if template == "plain":
        if len(turns) != 2:  # preprocess_plain asserts len(source) == 2; later turns would be silently left out
            raise SampleError("bad_format", f"the plain template (stage-1 captions) takes one human and one gpt turn, "
                              f"got {len(turns)} turns; use vicuna_v1 or qwen for multi-turn conversations")
        n_tags_img, n_tags_vid = n_images, n_videos
        cap = turns[1][1]
        if IMAGE_TAG in cap or VIDEO_TAG in cap:  # preprocess_plain asserts the <image> is in the human turn
            raise SampleError("placeholder_mismatch", "the plain template takes the <image>/<video> tags in the human "
                              "turn (it becomes the bare tags); the caption (gpt turn) holds one: remove it there")
        if sum(t.count(IMAGE_TAG) for _, t in turns) != n_images:
            raise SampleError("placeholder_mismatch", f"{sum(t.count(IMAGE_TAG) for _, t in turns)} <image> tags "
                              f"for {n_images} images")
    else:
        n_tags_img = sum(t.count(IMAGE_TAG) for _, t in turns)
        n_tags_vid = sum(t.count(VIDEO_TAG) for _, t in turns)
        if n_tags_img != n_images or n_tags_vid != n_videos:
            raise SampleError("placeholder_mismatch", f"{n_tags_img} <image> tags for {n_images} images, "
                              f"{n_tags_vid} <video> tags for {n_videos} videos")
    prompt, spans = build_prompt(turns, template, n_tags_img, n_tags_vid)
    ids, offs = tokenize_prompt(tokenizer, prompt, template)
    labels = [IGNORE_INDEX] * len(ids)
    for k, ((s, e), tid) in enumerate(zip(offs, ids)):
        if tid < 0 or e <= s:  # media placeholders and zero-width (added) tokens are never targets
            continue
        if any(s < b and e > a for a, b in spans):
            labels[k] = tid
    if template in _UNMASKED:
        keep = [tokenizer.convert_tokens_to_ids(t) for t in _UNMASKED[template]]
        keep = {i for i in keep + ([_single_id(tokenizer, "\n")] if template == "qwen" else [])
                if i is not None and i >= 0 and i != tokenizer.unk_token_id}
        labels = [t if (t in keep) else lab for t, lab in zip(ids, labels)]
    if all(lab == IGNORE_INDEX for lab in labels[1:]):
        raise SampleError("no_supervised_tokens", "no token of the sample is supervised")
    return Encoded(ids, labels, n_tags_img, n_tags_vid)


def prompt_turns(conversations, n_images: int = 0, n_videos: int = 0, check: bool = True):
    """``conversations`` (LLaVA format) as the turns of a prompt that asks for the next answer, and the reference
    answer: a conversation ending with a gpt turn has that answer as the reference (left out of the turns). ``check``:
    the ``<image>`` / ``<video>`` tags must number ``n_images`` / ``n_videos``."""
    conv = list(conversations) if isinstance(conversations, list) else conversations
    reference = None
    if isinstance(conv, list) and conv and isinstance(conv[-1], dict) and \
            str(conv[-1].get("from", "")).lower() in ("gpt", "assistant"):
        reference, conv = str(conv[-1].get("value", "")), conv[:-1]
    if not isinstance(conv, list):
        raise SampleError("bad_format", "conversations must be a list of turns")
    turns = normalize_conversations(conv + [{"from": "gpt", "value": ""}])[:-1]
    n_img = sum(t.count(IMAGE_TAG) for _, t in turns)
    n_vid = sum(t.count(VIDEO_TAG) for _, t in turns)
    if check and (n_img != n_images or n_vid != n_videos):
        raise SampleError("placeholder_mismatch", f"{n_img} <image> tags for {n_images} images, {n_vid} <video> tags "
                          f"for {n_videos} videos")
    return turns, reference


def generation_prompt(conversations, template: str, n_images: int = 0, n_videos: int = 0) -> tuple[str, str | None]:
    """The prompt that asks the model for the next answer of ``conversations`` (LLaVA format, ending with a human turn,
    or with a gpt turn: then that answer is the reference, returned second and left out of the prompt), written as
    ``template`` writes training samples, up to where the answer starts: ``... ASSISTANT:`` (vicuna_v1, as the
    original's ``conv.get_prompt()`` with an empty last message), ``...<|im_start|>assistant\n`` (qwen), the bare
    media tags (plain: a stage-1 caption)."""
    turns, reference = prompt_turns(conversations, n_images, n_videos, check=template != "plain")
    prompt, spans = build_prompt(turns + [("gpt", "")], template, n_images, n_videos)
    start = spans[-1][0]
    if template == "vicuna_v1":
        return prompt[:start].rstrip(" "), reference
    if template == "qwen":
        return prompt[:start] + "<|im_start|>assistant\n", reference
    if template == "llama3":
        return prompt[:start] + "<|start_header_id|>assistant<|end_header_id|>\n\n", reference
    return prompt[:start], reference


# Jinja chat templates (transformers' apply_chat_template, the processor's chat_template) that write a conversation
# as the template of that name writes training samples, up to the answer: what generation_prompt gives. A message's
# content is a string or a list of items, its images and videos first (one "<image>\n" / "<video>\n" each), then
# its text, as llava-hf's chat templates place them; a first "system" message replaces the default system text.
_CHAT_HEAD = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] if messages[0]['content'] is string else "
    "(messages[0]['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('')) -%}"
    "{%- set messages = messages[1:] -%}"
    "{%- else -%}{%- set system = DEFAULT -%}{%- endif -%}")
_CHAT_BODY = (
    "{%- macro body(message) -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}{%- else -%}"
    "{%- for c in message['content'] | selectattr('type', 'equalto', 'image') -%}{{ '<image>\n' }}{%- endfor -%}"
    "{%- for c in message['content'] | selectattr('type', 'equalto', 'video') -%}{{ '<video>\n' }}{%- endfor -%}"
    "{%- for c in message['content'] | selectattr('type', 'equalto', 'text') -%}{{ c['text'] }}{%- endfor -%}"
    "{%- endif -%}{%- endmacro -%}")
_CHAT = {
    "vicuna_v1": (VICUNA_SYSTEM,
                  "{{ system + ' ' }}{%- for message in messages -%}"
                  "{%- if message['role'] == 'user' -%}{{ 'USER: ' + body(message) + ' ' }}"
                  "{%- else -%}{{ 'ASSISTANT: ' + body(message) + '</s>' }}{%- endif -%}{%- endfor -%}"
                  "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"),
    "qwen": (QWEN_SYSTEM,
             "{{ '<|im_start|>system\n' + system + '<|im_end|>\n' }}{%- for message in messages -%}"
             "{{ '<|im_start|>' + message['role'] + '\n' + body(message) + '<|im_end|>\n' }}{%- endfor -%}"
             "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"),
    "llama3": (LLAMA3_SYSTEM,
               "{{ '<|start_header_id|>system<|end_header_id|>\n\n' + system | trim + '<|eot_id|>' }}"
               "{%- for message in messages -%}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' "
               "+ body(message) | trim + '<|eot_id|>' }}{%- endfor -%}{%- if add_generation_prompt -%}"
               "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif -%}"),
}


def chat_template_for(template: str) -> str | None:
    """A chat template (Jinja, for transformers' ``apply_chat_template``) that writes ``template``'s training format up
    to the answer, as :func:`generation_prompt` does; None for ``plain`` (stage 1 learns no conversation format)."""
    if template not in _CHAT:
        return None
    system, rest = _CHAT[template]
    return _CHAT_BODY + _CHAT_HEAD.replace("DEFAULT", repr(system)) + rest


def expand_placeholders(ids, labels, image_counts: list[int], image_token_id: int,
                        video_counts: list[int] = (), video_token_id: int | None = None):
    """Replace the k-th image placeholder by ``image_counts[k]`` copies of ``image_token_id`` (label -100)."""
    out_ids, out_lab = [], []
    ii = vi = 0
    for t, lab in zip(ids, labels):
        if t == IMAGE_PLACEHOLDER:
            n = image_counts[ii]
            ii += 1
            out_ids += [image_token_id] * n
            out_lab += [IGNORE_INDEX] * n
        elif t == VIDEO_PLACEHOLDER:
            if video_token_id is None:
                raise ValueError("expand_placeholders: the sample has a <video> but the model has no video_token_id")
            n = video_counts[vi]
            vi += 1
            out_ids += [video_token_id] * n
            out_lab += [IGNORE_INDEX] * n
        else:
            out_ids.append(t)
            out_lab.append(lab)
    if ii != len(image_counts) or vi != len(video_counts):
        raise SampleError("placeholder_mismatch", f"{ii} image placeholders for {len(image_counts)} images")
    return out_ids, out_lab
