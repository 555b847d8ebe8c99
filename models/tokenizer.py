"""Text front end of Chatterbox (English): `punc_norm` and the character-level BPE tokenizer.

Both follow chatterbox-tts 0.1.7 exactly (`tts.punc_norm`, `models/tokenizers/EnTokenizer`).
The tokenizer itself is the Rust `tokenizers` library reading upstream's tokenizer.json; the
only thing this module adds is the `[SPACE]` substitution the reference does before encoding.
SOT/EOT wrapping is not the tokenizer's job upstream either (it happens in `generate`): see
`wrap_text_tokens`.

`write_stand_in_tokenizer_json` writes a tokenizer.json in the reference's conventions for
random-weight checkpoints, where the real file (on Hugging Face) is not available.
"""

from __future__ import annotations

import json
import logging
import os
import string
from collections import Counter
from pathlib import Path

from tokenizers import AddedToken, Tokenizer
from tokenizers.models import BPE
from tokenizers.pre_tokenizers import Whitespace

logger = logging.getLogger(__name__)

# Special ids come from upstream's T3Config, not from the tokenizer file.
SOT = 255  # start_text_token
EOT = 0  # stop_text_token
TEXT_VOCAB_SIZE = 704

SOT_TOKEN = "[START]"
EOT_TOKEN = "[STOP]"
UNK_TOKEN = "[UNK]"
SPACE_TOKEN = "[SPACE]"
SPECIAL_TOKENS = (SOT_TOKEN, EOT_TOKEN, UNK_TOKEN, SPACE_TOKEN, "[PAD]", "[SEP]", "[CLS]", "[MASK]")

EMPTY_TEXT_REPLACEMENT = "You need to add some text for me to talk."

# (old, new) in the reference's order: the order matters ("..." before ":" before " ,").
PUNCTUATION_REPLACEMENTS = (
    ("...", ", "),
    ("\u2026", ", "),  # horizontal ellipsis
    (":", ","),
    (" - ", ", "),
    (";", ", "),
    ("\u2014", "-"),  # em dash
    ("\u2013", "-"),  # en dash
    (" ,", ","),
    ("\u201c", '"'),  # left double quote
    ("\u201d", '"'),  # right double quote
    ("\u2018", "'"),  # left single quote
    ("\u2019", "'"),  # right single quote
)
SENTENCE_ENDERS = (".", "!", "?", "-", ",")


def normalize_punctuation(text: str, replacements: tuple[tuple[str, str], ...],
                          enders: tuple[str, ...] = SENTENCE_ENDERS) -> str:
    """The punctuation clean-up every Chatterbox `punc_norm` does, with its own table.

    Empty text becomes a fixed sentence; a lowercase first character is uppercased with
    `str.upper` (so "ß" becomes "SS"); whitespace runs collapse; each (old, new) of
    `replacements` is applied in order; a "." is appended unless the text ends with one of
    `enders`.
    """
    if len(text) == 0:
        return EMPTY_TEXT_REPLACEMENT
    # Only the very first character is checked (before whitespace is collapsed), as upstream.
    if text[0].islower():
        text = text[0].upper() + text[1:]
    text = " ".join(text.split())
    for old, new in replacements:
        text = text.replace(old, new)
    text = text.rstrip(" ")
    if not text.endswith(enders):
        text += "."
    return text


def punc_norm(text: str) -> str:
    """Clean up punctuation the model rarely saw in training (upstream `tts.punc_norm`)."""
    return normalize_punctuation(text, PUNCTUATION_REPLACEMENTS)


def wrap_text_tokens(ids: list[int], start: int = SOT, stop: int = EOT) -> list[int]:
    """[start] + ids + [stop], as upstream `generate` pads the token tensor. The ids are
    T3Config's start_text_token / stop_text_token (models/t3.py `T3.wrap_text` passes them);
    the defaults are upstream's."""
    return [start] + list(ids) + [stop]


class EnTokenizer:
    """Upstream's English tokenizer: `[SPACE]` substitution, then tokenizers' BPE encode."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.tokenizer = Tokenizer.from_file(str(path))
        vocab = self.tokenizer.get_vocab()
        # Upstream asserts exactly these two; everything else is trusted.
        if SOT_TOKEN not in vocab or EOT_TOKEN not in vocab:
            raise ValueError(f"{path}: tokenizer vocabulary lacks {SOT_TOKEN} or {EOT_TOKEN}")

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (already normalised with `punc_norm`), without SOT/EOT."""
        return self.tokenizer.encode(text.replace(" ", SPACE_TOKEN)).ids

    def decode(self, ids: list[int]) -> str:
        """Inverse of `encode` for in-vocabulary text (unknown characters are lost)."""
        text = self.tokenizer.decode(list(ids), skip_special_tokens=False)
        text = text.replace(" ", "").replace(SPACE_TOKEN, " ")
        return text.replace(EOT_TOKEN, "").replace(UNK_TOKEN, "")


# ---------------------------------------------------------------------------------------
# Stand-in tokenizer.json for random-weight checkpoints.

# Text the stand-in's merges are learned from (written for this purpose). Only the shape of
# the result matters: frequent English letter groups become multi-character tokens, so that
# encoding exercises real BPE merges the way the upstream file does.
MERGE_CORPUS = """
The quick brown fox jumps over the lazy dog while the band plays on the corner.
Please call me back when you have a moment; there is something I want to tell you.
It was the best of evenings, and everyone in the station waited for the last train.
She said that the weather would change tomorrow, then went outside to water the garden.
Reading aloud is a good way to hear the rhythm and the music of a sentence.
They were thinking about moving to another city, where the winters are warmer.
Numbers like 1, 2, 3 and 2024 should be spoken clearly, without hesitation.
Would you like some tea or coffee? I have both, and there is fresh bread in the kitchen.
The children were laughing and running through the fields until the sun went down.
Every morning he walked along the river, listening to the birds and the water.
"""


def learn_merges(words: Counter, limit: int) -> list[tuple[str, str]]:
    """Greedy BPE merges over `words` (a Counter of character tuples), at most `limit`.

    Ties are broken by the pair's text, so the result is the same on every machine.
    """
    merges: list[tuple[str, str]] = []
    while len(merges) < limit:
        pairs: Counter[tuple[str, str]] = Counter()
        for parts, count in words.items():
            for pair in zip(parts, parts[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged: Counter[tuple[str, ...]] = Counter()
        for parts, count in words.items():
            out, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    out.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    return merges


def learn_word_merges(corpus: str, alphabet: set[str], limit: int) -> list[tuple[str, str]]:
    """`learn_merges` over the whitespace/punctuation words of `corpus` written in `alphabet`."""
    words: Counter[tuple[str, ...]] = Counter()
    for word, _ in Whitespace().pre_tokenize_str(corpus):
        if all(ch in alphabet for ch in word):
            words[tuple(word)] += 1
    return learn_merges(words, limit)


def stand_in_tokenizer() -> Tokenizer:
    """A tokenizer in the reference's conventions, 704 ids.

    [STOP]=0, [UNK]=1, [SPACE]=2, [PAD]=3, [SEP]=4, [CLS]=5, [MASK]=6, [START]=255; the
    printable ASCII characters (no space: spaces become [SPACE]); BPE merges learned from a
    small English text, then two-letter lowercase merges until 704 ids are used. No
    normalizer, a Whitespace pre-tokenizer, no byte fallback (unknown characters -> [UNK]).
    """
    fixed = {EOT_TOKEN: EOT, UNK_TOKEN: 1, SPACE_TOKEN: 2, "[PAD]": 3, "[SEP]": 4, "[CLS]": 5, "[MASK]": 6, SOT_TOKEN: SOT}
    free_ids = (i for i in range(TEXT_VOCAB_SIZE) if i not in fixed.values())
    vocab = dict(fixed)
    alphabet = [ch for ch in string.printable if ch.isprintable() and not ch.isspace()]
    for ch in alphabet:
        vocab[ch] = next(free_ids)
    n_merges = TEXT_VOCAB_SIZE - len(vocab)
    merges = learn_word_merges(MERGE_CORPUS, set(alphabet), n_merges)
    for a in string.ascii_lowercase:
        for b in string.ascii_lowercase:
            if len(merges) < n_merges and a + b not in {x + y for x, y in merges}:
                merges.append((a, b))
    for a, b in merges:
        vocab[a + b] = next(free_ids)
    assert len(vocab) == TEXT_VOCAB_SIZE and max(vocab.values()) == TEXT_VOCAB_SIZE - 1

    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=UNK_TOKEN))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in sorted(fixed, key=fixed.get)])
    return tokenizer


def write_stand_in_tokenizer_json(path: str | os.PathLike) -> Path:
    """Write `stand_in_tokenizer()` as tokenizer.json (the same bytes on every machine)."""
    path = Path(path)
    # Round-trip through json with sorted keys so the bytes do not depend on the tokenizers
    # version's field order.
    spec = json.loads(stand_in_tokenizer().to_str())
    path.write_text(json.dumps(spec, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    logger.debug("wrote stand-in tokenizer to %s", path)
    return path
