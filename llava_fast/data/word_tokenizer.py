"""A word-level fast tokenizer built with the ``tokenizers`` library (for the demo and tests; no download).

Words are split on spaces/tabs, ``\\n`` and punctuation are tokens of their own, and the LLaVA/ChatML special tokens
are added so templates tokenize as they do with real tokenizers: ``<s>`` is added as BOS when ``bos=True``
(Llama-like), none when ``bos=False`` (Qwen-like).
"""
from __future__ import annotations

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "<video>", "<|im_start|>", "<|im_end|>"]


def build_word_tokenizer(words, bos: bool = True, lowercase: bool = False):
    """A ``transformers`` fast tokenizer over ``SPECIALS + ["\\n"] + sorted punctuation + words``."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for w in SPECIALS + ["\n"] + list(".,:;?!'\"()-") + list(words):
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
    tok.add_special_tokens(SPECIALS)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                           special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>" if bos else None, eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>", padding_side="right")
