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
