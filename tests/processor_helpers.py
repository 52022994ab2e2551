"""The real transformers processors of a backbone, built offline for tiny models.

A processor is its image/video processors (real classes, small patch sizes) and a tiny
``PreTrainedTokenizerFast`` (WordLevel) whose special tokens sit at the ids the tiny model's
config names.  The video processors of transformers need torchvision: where it cannot be imported
the tests that run them are skipped (``needs_torchvision``) and the per-backbone builders lay the
inputs out by hand, the way the processor does (a test checks the two agree where both run).
"""

from __future__ import annotations

import pytest
from models_helpers import VOCAB


def _torchvision() -> bool:
    try:  # a torchvision built for another torch fails at import, not at find_spec
        import torchvision  # noqa: F401
    except Exception:
        return False
    return True


HAS_TORCHVISION = _torchvision()
needs_torchvision = pytest.mark.skipif(
    not HAS_TORCHVISION,
    reason="transformers' video processors need torchvision, which is not importable here",
)

#: words of the tiny tokenizers: digits (timestamps), the words of VideoLLaMA3's frame labels
WORDS = [str(i) for i in range(10)] + ["Time", "s:", ",", ".", "what", "is", "the", "colour", "?"]


def tiny_tokenizer(specials: dict[str, int]):
    """A WordLevel tokenizer: ``[UNK]`` = 0 (also the padding), ``WORDS``, filler words up to
    ``VOCAB``, and ``specials`` (token -> id) as special tokens at their ids.  Digits are split
    one by one, as timestamps are by the real tokenizers."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0}
    for word in WORDS:
        vocab[word] = len(vocab)
    taken = set(specials.values())
    free = (i for i in range(len(vocab), VOCAB) if i not in taken)
    for i in free:
        vocab[f"w{i}"] = i
    vocab.update(specials)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.Split(",", "isolated"),
            pre_tokenizers.Split(".", "isolated"),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[UNK]",
        additional_special_tokens=list(specials),
    )
