"""Stop strings that begin in the prompt: transformers' StopStringCriteria matches the end of the whole sequence, so a
stop string begun by the prompt's last characters and completed by the generated tokens stops there; one wholly
inside the prompt does not. Checked against the expected tokens and transformers' generate, on both paths."""
from __future__ import annotations

import pytest
import torch

import llava_fast

from tiny import IMAGE_TOKEN, VOCAB, save_tiny


def char_tokenizer():
    """One token per character (printable ASCII, then Greek for the model's other ids), decoded by concatenation:
    the decoded text is the tokens' strings back to back, as transformers' StopStringCriteria sees them (the
    word-level tokenizer of test_chat decodes with spaces, and transformers cannot build its criterion from it)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<image>": IMAGE_TOKEN}
    vocab.update({chr(c): 3 + i for i, c in enumerate(range(32, 127))})
    free = [i for i in range(VOCAB) if i not in vocab.values()]
    vocab.update({chr(0x3B1 + k): i for k, i in enumerate(free)})  # Greek letters: every id of the model decodes
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<unk>", additional_special_tokens=["<image>"])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    hf, path = save_tiny(tmp_path_factory.mktemp("stop"), "llava_next")
    tok = char_tokenizer()
    p0, p1 = tok("<s>Q: hi A:")["input_ids"], tok("<s>Q: hey A:")["input_ids"]
    ids = torch.tensor([[0] + p0, p1])                  # row 0 left-padded
    mask = (torch.arange(ids.shape[1]) >= torch.tensor([[1], [0]])).long()
    return hf, llava_fast.from_pretrained(path), tok, ids, mask


def _padded(seq, n):
    """Generation ends when every row has stopped: pad to the full length (pad 0), as a row stopped earlier is."""
    return torch.nn.functional.pad(seq, (0, n + 8 - seq.shape[1]))


def _generate(m, tok, ids, mask, stop, packed):
    kw = dict(stop_strings=[stop], tokenizer=tok) if stop is not None else {}
    return _padded(m.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=2, pad_token_id=0,
                              packed=packed, **kw), ids.shape[1])


@pytest.mark.parametrize("packed", [False, True])
def test_stop_string_spanning_prompt_end(setup, packed):
    hf, m, tok, ids, mask = setup
    n = ids.shape[1]
    free = _generate(m, tok, ids, mask, None, False)
    g = tok.decode(free[0, n:])
    assert len(g) == 8 and "A:" not in g and "hi" not in g, g  # the tiny model's greedy text, row 0 (no eos)
    cases = {"A:" + g[0]: 1,       # the prompt's "A:" + the first generated character: stops after 1 token
             ":" + g[:2]: 2,       # completed by the second token
             "A:": None, "hi": None}  # wholly inside the prompt: no stop (nor in transformers)
    for stop, k in cases.items():
        out = _generate(m, tok, ids, mask, stop, packed)
        want = free[0] if k is None else torch.cat([free[0, :n + k], torch.zeros(8 - k, dtype=free.dtype)])
        text = [tok.decode(t[n:], skip_special_tokens=True) for t in (out[0], want)]
        assert torch.equal(out[0], want), f"{stop!r}: generated {text[0]!r}, expected {text[1]!r}"
        ref = _padded(hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                  eos_token_id=2, pad_token_id=0, stop_strings=[stop], tokenizer=tok), n)
        assert torch.equal(out, ref), f"{stop!r}: {out[:, n:].tolist()} vs transformers {ref[:, n:].tolist()}"
