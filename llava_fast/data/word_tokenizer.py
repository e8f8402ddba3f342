"""A word-level fast tokenizer built with the ``tokenizers`` library (for the demo and tests; no download).

Words are split on spaces/tabs, ``\\n`` and punctuation are tokens of their own, and the LLaVA/ChatML special tokens
are added so templates tokenize as they do with real tokenizers: ``<s>`` is added as BOS when ``bos=True``
(Llama-like), none when ``bos=False`` (Qwen-like).
"""
from __future__ import annotations

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "<video>", "<|im_start|>", "<|im_end|>"]


def build_word_tokenizer(words, bos: bool | str = True, lowercase: bool = False, specials=()):
    """A ``transformers`` fast tokenizer over ``SPECIALS + specials + ["\\n"] + sorted punctuation + words``.
    ``bos``: True adds ``<s>`` as BOS, a string adds that token (one of ``specials``), False none."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    specials = SPECIALS + [t for t in specials if t not in SPECIALS]
    bos_token = "<s>" if bos is True else (bos or None)
    if bos_token is not None and bos_token not in specials:
        raise ValueError(f"bos={bos_token!r} must be one of the special tokens")
    for w in specials + ["\n"] + list(".,:;?!'\"()-") + list(words):
        if w not in vocab:
            vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    if lowercase:
        tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"[ \t]+"), "removed"),
        pre_tokenizers.Split(Regex(r"\n"), "isolated"),
        pre_tokenizers.Punctuation("isolated"),
    ])
    tok.add_special_tokens(specials)
    if bos_token is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos_token} $A", pair=f"{bos_token} $A $B",
                                                           special_tokens=[(bos_token, vocab[bos_token])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos_token, eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>", padding_side="right")
