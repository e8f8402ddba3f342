"""Templates and label masking, exact, against hand-computed expectations (reference-spec.md 5.2-5.3)."""
import pytest

from llava_fast.data.templates import (IGNORE_INDEX as I, IMAGE_PLACEHOLDER as IMG, SampleError,
                                       encode_conversation, expand_placeholders, normalize_conversations)
from llava_fast.data.word_tokenizer import build_word_tokenizer

WORDS = ("what colour is it red and the shape circle a chat between curious user an artificial intelligence "
         "assistant The gives helpful detailed polite answers to user's questions USER ASSISTANT system You are "
         "A s").split()


@pytest.fixture(scope="module")
def llama_tok():
    return build_word_tokenizer(WORDS, bos=True)


@pytest.fixture(scope="module")
def qwen_tok():
    return build_word_tokenizer(WORDS, bos=False)


CONV = [{"from": "human", "value": "<image>\nwhat colour is it ?"}, {"from": "gpt", "value": "red"},
        {"from": "human", "value": "what shape ?"}, {"from": "gpt", "value": "a circle ."}]


def toks(tok, ids):
    return [t if t < 0 else tok.convert_ids_to_tokens(t) for t in ids]


def test_plain(llama_tok):
    conv = [{"from": "human", "value": "<image>\nwhat is it ?"}, {"from": "gpt", "value": "a red circle ."}]
    e = encode_conversation(llama_tok, conv, "plain", n_images=1)
    assert toks(llama_tok, e.input_ids) == ["<s>", IMG, "a", "red", "circle", ".", "\n"]
    # first len(tokenizer_image_token("<image>")) = 2 positions masked; caption and "\n" supervised, no EOS
    assert toks(llama_tok, e.labels) == [I, I, "a", "red", "circle", ".", "\n"]


def test_plain_refuses_multi_turn(llama_tok):
    """preprocess_plain asserts two turns; the later turns of a longer conversation must not be silently left out."""
    with pytest.raises(SampleError, match="plain template.*one human and one gpt turn, got 4 turns") as e:
        encode_conversation(llama_tok, CONV, "plain", n_images=1)
    assert e.value.reason == "bad_format"


def test_plain_without_bos(qwen_tok):
    conv = [{"from": "human", "value": "<image>\nwhat"}, {"from": "gpt", "value": "red"}]
    e = encode_conversation(qwen_tok, conv, "plain", n_images=1)
    assert toks(qwen_tok, e.input_ids) == [IMG, "red", "\n"]
    assert toks(qwen_tok, e.labels) == [I, "red", "\n"]


def test_vicuna_v1(llama_tok):
    e = encode_conversation(llama_tok, CONV, "vicuna_v1", n_images=1)
    system = ("A chat between a curious user and an artificial intelligence assistant . The assistant gives "
              "helpful , detailed , and polite answers to the user ' s questions .").split()
    expect = (["<s>"] + system + ["USER", ":", IMG, "\n", "what", "colour", "is", "it", "?", "ASSISTANT", ":",
                                  "red", "</s>", "USER", ":", "what", "shape", "?", "ASSISTANT", ":", "a", "circle",
                                  ".", "</s>"])
    assert toks(llama_tok, e.input_ids) == expect
    # supervised = each answer plus its </s>; system, USER turns, ASSISTANT: prefixes and BOS masked
    sup = {expect.index("red"), expect.index("red") + 1} | set(range(len(expect) - 4, len(expect)))
    want = [tok if k in sup else I for k, tok in enumerate(expect)]
    assert toks(llama_tok, e.labels) == want


def test_qwen(qwen_tok):
    e = encode_conversation(qwen_tok, CONV, "qwen", n_images=1)
    S, E, N = "<|im_start|>", "<|im_end|>", "\n"
    expect = ([S, "system", N, "You", "are", "a", "helpful", "assistant", ".", E, N,
               S, "user", N, IMG, N, "what", "colour", "is", "it", "?", E, N,
               S, "assistant", N, "red", E, N,
               S, "user", N, "what", "shape", "?", E, N,
               S, "assistant", N, "a", "circle", ".", E, N])
    assert toks(qwen_tok, e.input_ids) == expect
    # assistant messages fully supervised (header and <|im_end|>\n included); then \n, <|im_start|>, <|im_end|>
    # un-masked everywhere, also in the system and user turns (preprocess_qwen quirk)
    a1 = expect.index("red") - 3
    a2 = len(expect) - 8
    sup = set(range(a1, a1 + 6)) | set(range(a2, len(expect)))
    want = [t if (k in sup or t in (S, E, N)) else I for k, t in enumerate(expect)]
    assert toks(qwen_tok, e.labels) == want


def test_placeholder_mismatch_and_roles(llama_tok):
    with pytest.raises(SampleError) as ei:
        encode_conversation(llama_tok, CONV, "vicuna_v1", n_images=2)
    assert ei.value.reason == "placeholder_mismatch"
    with pytest.raises(SampleError) as ei:
        encode_conversation(llama_tok, CONV[:1] + CONV[:1], "vicuna_v1", n_images=1)
    assert ei.value.reason == "bad_roles"
    # a leading gpt turn is dropped (original behaviour)
    e = encode_conversation(llama_tok, [{"from": "gpt", "value": "red"}] + CONV, "vicuna_v1", n_images=1)
    assert e.input_ids == encode_conversation(llama_tok, CONV, "vicuna_v1", n_images=1).input_ids


def test_image_moved_to_front():
    turns = normalize_conversations([{"from": "human", "value": "what is it ?\n<image>"},
                                     {"from": "gpt", "value": "red"}])
    assert turns[0][1] == "<image>\nwhat is it ?"


def test_expand_placeholders():
    ids, lab = expand_placeholders([1, IMG, 7, IMG, 8], [I, I, 7, I, 8], [3, 2], image_token_id=99)
    assert ids == [1, 99, 99, 99, 7, 99, 99, 8]
    assert lab == [I, I, I, I, 7, I, I, 8]


# Llama 3 Instruct's chat template (Meta-Llama-3-8B-Instruct's tokenizer_config.json), which LLaVA-NeXT's
# preprocess_llama3 renders each message with
LLAMA3_CHAT = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
               "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
               "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
               "{{ content }}{% endfor %}{% if add_generation_prompt %}"
               "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
L3 = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
L3_WORDS = WORDS + "language vision able understand visual content that provides assist with variety of tasks using " \
                   "natural".split()


@pytest.fixture(scope="module")
def llama3_tok():
    tok = build_word_tokenizer(L3_WORDS, bos="<|begin_of_text|>", specials=L3)
    tok.chat_template = LLAMA3_CHAT
    return tok


def preprocess_llama3_reference(tok, turns):
    """LLaVA-NeXT's preprocess_llama3, as written there: the system message through the chat template, then each
    message alone through it, its BOS cut; user messages masked; the ids convert_tokens_to_ids gives for the
    un-mask list un-masked; <image> ids replaced by the placeholder."""
    from llava_fast.data.templates import LLAMA3_SYSTEM

    roles = {"human": "user", "gpt": "assistant"}
    ids = tok.apply_chat_template([{"role": "system", "content": LLAMA3_SYSTEM}], tokenize=True, return_dict=False)
    labels = [I] * len(ids)
    for role, text in turns:
        enc = tok.apply_chat_template([{"role": roles[role], "content": text}], tokenize=True,
                                      return_dict=False)[1:]
        ids = ids + enc
        labels = labels + ([I] * len(enc) if role == "human" else list(enc))
    unmask = [tok.convert_tokens_to_ids(t) for t in L3 + ("\n\n",)]
    image = tok.convert_tokens_to_ids("<image>")
    labels = [t if t in unmask else lab for t, lab in zip(ids, labels)]
    return [IMG if t == image else t for t in ids], labels


def test_llama3(llama3_tok):
    """Hand-written expectation: the whole assistant message supervised (header and <|eot_id|> included), the four
    Llama 3 special tokens un-masked everywhere (the user turns' headers and <|eot_id|> too)."""
    e = encode_conversation(llama3_tok, CONV[:2], "llama3", n_images=1)
    B, S, E, T, N = L3 + ("\n",)
    system = ("You are a helpful language and vision assistant . You are able to understand the visual content "
              "that the user provides , and assist the user with a variety of tasks using natural language .").split()
    expect = ([B, S, "system", E, N, N] + system + [T, S, "user", E, N, N, IMG, N, "what", "colour", "is", "it", "?",
                                                     T, S, "assistant", E, N, N, "red", T])
    assert toks(llama3_tok, e.input_ids) == expect
    a = len(expect) - 7
    want = [t if (k >= a or t in (B, S, E, T)) else I for k, t in enumerate(expect)]
    assert toks(llama3_tok, e.labels) == want


@pytest.mark.parametrize("conv, n", [
    (CONV, 1),
    ([{"from": "human", "value": "<image>\n<image>\nwhat shape ?  "}, {"from": "gpt", "value": "  a red circle . \n"},
      {"from": "human", "value": "what colour ?"}, {"from": "gpt", "value": "red"}], 2),
    ([{"from": "gpt", "value": "red"}, {"from": "human", "value": "what is it ?"}, {"from": "gpt", "value": "a"}], 0),
])
def test_llama3_matches_llava_next_preprocess(llama3_tok, conv, n):
    """Against an independent reference: LLaVA-NeXT's preprocess_llama3 through transformers' apply_chat_template
    (content trimmed by the template, per-message tokenization), on the turns after preprocess_multimodal."""
    e = encode_conversation(llama3_tok, conv, "llama3", n_images=n)
    ids, labels = preprocess_llama3_reference(llama3_tok, normalize_conversations(conv))
    assert toks(llama3_tok, e.input_ids) == toks(llama3_tok, ids)
    assert e.labels == labels


def test_llama3_bos_and_tokenizer_check(llama3_tok):
    """Exactly one <|begin_of_text|> with a tokenizer that adds none; a tokenizer without Llama 3's tokens is refused
    naming the setting (not a drop per sample)."""
    from llava_fast.data.templates import check_template, generation_prompt, tokenize_prompt

    plain = build_word_tokenizer(L3_WORDS, bos=False, specials=L3)
    a = encode_conversation(plain, CONV, "llama3", n_images=1)
    b = encode_conversation(llama3_tok, CONV, "llama3", n_images=1)
    assert toks(plain, a.input_ids) == toks(llama3_tok, b.input_ids)
    assert toks(plain, a.input_ids).count("<|begin_of_text|>") == 1
    prompt, ref = generation_prompt(CONV, "llama3", n_images=1)
    assert ref == "a circle ." and prompt.endswith("shape ?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    ids, _ = tokenize_prompt(plain, prompt, "llama3")
    assert ids == a.input_ids[:len(ids)] and toks(plain, ids)[-3:] == ["<|end_header_id|>", "\n", "\n"]
    with pytest.raises(ValueError, match="data.template 'llama3' needs a Llama 3 tokenizer; this one has no "
                                         "<|begin_of_text|>, <|start_header_id|>"):
        check_template(build_word_tokenizer(WORDS), "llama3", "data.template")
    with pytest.raises(ValueError, match="template must be one of plain, vicuna_v1, qwen, llama3, got 'x'"):
        check_template(llama3_tok, "x")


def test_chat_prompt_keeps_one_bos(llama_tok, qwen_tok):
    """A model's chat template that writes the BOS as text (``{{ bos_token }}``) gets one BOS, whether or not the
    tokenizer adds its own; one that writes none gets the tokenizer's."""
    from llava_fast.data.templates import tokenize_prompt

    for tok, prompt in ((llama_tok, "<s>USER : <image>\nwhat"), (llama_tok, "USER : <image>\nwhat")):
        ids, offs = tokenize_prompt(tok, prompt, "chat")
        assert toks(tok, ids) == ["<s>", "USER", ":", IMG, "\n", "what"]
        assert prompt[offs[1][0]:offs[1][1]] == "USER" and prompt[offs[3][0]:offs[3][1]] == "<image>"
    no_auto = build_word_tokenizer(WORDS, bos=False, specials=("<s>",))
    no_auto.bos_token = "<s>"
    ids, _ = tokenize_prompt(no_auto, "<s>USER : what", "chat")
    assert toks(no_auto, ids) == ["<s>", "USER", ":", "what"]
    assert toks(qwen_tok, tokenize_prompt(qwen_tok, "USER : what", "chat")[0]) == ["USER", ":", "what"]


@pytest.mark.parametrize("template", ["vicuna_v1", "qwen", "llama3"])
def test_chat_template_writes_the_training_format(llama_tok, template):
    """chat_template_for(t), through transformers' apply_chat_template, writes what generation_prompt(t) writes (the
    training format up to the answer): several turns, two images, a video, a system message of the caller's."""
    from llava_fast.data.templates import chat_template_for, generation_prompt

    def messages(conv, system=None):
        out = [{"role": "system", "content": system}] if system else []
        for t in conv:
            text = t["value"]
            items = [{"type": tag} for tag in ("image", "video") for _ in range(text.count(f"<{tag}>"))]
            text = text.replace("<image>\n", "").replace("<video>\n", "")
            out.append({"role": "user" if t["from"] == "human" else "assistant",
                        "content": items + [{"type": "text", "text": text}]})
        return out

    chat = chat_template_for(template)
    convs = [(CONV[:3], 1, 0), (CONV[:1], 1, 0),
             ([{"from": "human", "value": "<image>\n<image>\nwhat shape ?"}], 2, 0),
             ([{"from": "human", "value": "<video>\nwhat colour ?"}, {"from": "gpt", "value": "red"},
               {"from": "human", "value": "what shape ?"}], 0, 1)]
    for conv, n_img, n_vid in convs:
        want, _ = generation_prompt(conv, template, n_img, n_vid)
        got = llama_tok.apply_chat_template(messages(conv), chat_template=chat, tokenize=False,
                                            add_generation_prompt=True)
        assert got == want, (got, want)
    mine = llama_tok.apply_chat_template(messages(CONV[:1], system="Be brief ."), chat_template=chat, tokenize=False,
                                         add_generation_prompt=True)
    assert "Be brief ." in mine and "helpful" not in mine
    assert chat_template_for("plain") is None
