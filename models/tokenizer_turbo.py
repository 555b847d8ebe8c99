"""Text front end of Chatterbox Turbo: its `punc_norm` and the GPT-2 byte-level BPE tokenizer.

The reference (`tts_turbo.py`) loads the tokenizer with transformers' `AutoTokenizer` from
the checkpoint folder: `vocab.json`, `merges.txt`, `added_tokens.json`,
`special_tokens_map.json`, `tokenizer_config.json` (there is no tokenizer.json). GPT-2 has
50,257 ids (`<|endoftext|>` = 50256); Turbo adds 19 tags (paralinguistic events such as
`[laugh]`, `[clear throat]`, and styles such as `[whispering]`) for 50,276. Encoding adds
no BOS/EOS. This module builds the same tokenizer with the Rust `tokenizers` library from
those files (no transformers at runtime): byte-level pre-tokenizer without a prefix space,
BPE with the file's merges, and the added tokens matched in the raw text first.

`write_stand_in_tokenizer` writes the five files for random-weight checkpoints: a small
byte-level BPE learned from a fixed English text, `<|endoftext|>`, and the 19 tags, with
the real repository's conventions.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE

from .tokenizer import MERGE_CORPUS as ENGLISH_MERGE_CORPUS
from .tokenizer import learn_merges, normalize_punctuation

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("vocab.json", "merges.txt", "added_tokens.json", "special_tokens_map.json", "tokenizer_config.json")
EOS_TOKEN = "<|endoftext|>"
# The tags Turbo's tokenizer adds after GPT-2's vocabulary (added_tokens.json), in id order.
TAGS = (
    "[laugh]", "[chuckle]", "[sigh]", "[gasp]", "[cough]", "[clear throat]", "[sniff]", "[groan]", "[shush]",
    "[whispering]", "[angry]", "[happy]", "[sarcastic]", "[surprised]", "[fear]", "[crying]", "[dramatic]",
    "[narration]", "[advertisement]",
)
TURBO_TEXT_VOCAB = 50276  # what the reference expects (it warns otherwise)

# tts_turbo.punc_norm: fewer replacements than the original model's, in this order
PUNCTUATION_REPLACEMENTS = (
    ("\u2026", ", "),  # horizontal ellipsis
    (":", ","),
    ("\u2014", "-"),  # em dash
    ("\u2013", "-"),  # en dash
    (" ,", ","),
    ("\u201c", '"'),
    ("\u201d", '"'),
    ("\u2018", "'"),
    ("\u2019", "'"),
)


def punc_norm(text: str) -> str:
    """Turbo's punctuation clean-up (`tts_turbo.punc_norm`): the original's steps
    (tokenizer.normalize_punctuation) with Turbo's shorter replacement table."""
    return normalize_punctuation(text, PUNCTUATION_REPLACEMENTS)


class TurboTokenizer:
    """GPT-2 BPE from a checkpoint folder's tokenizer files (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        missing = [name for name in ("vocab.json", "merges.txt", "tokenizer_config.json") if not (directory / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{directory}: missing tokenizer file(s) {', '.join(missing)}")
        tokenizer = Tokenizer(BPE.from_file(str(directory / "vocab.json"), str(directory / "merges.txt")))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
        added = {int(i): spec for i, spec in config.get("added_tokens_decoder", {}).items()}
        extra_path = directory / "added_tokens.json"
        if extra_path.is_file():
            for content, i in json.loads(extra_path.read_text(encoding="utf-8")).items():
                added.setdefault(int(i), {"content": content, "special": False, "normalized": True})
        for i in sorted(added):
            spec = added[i]
            token = AddedToken(spec["content"], single_word=spec.get("single_word", False), lstrip=spec.get("lstrip", False),
                               rstrip=spec.get("rstrip", False), normalized=spec.get("normalized", True),
                               special=spec.get("special", False))
            (tokenizer.add_special_tokens if token.special else tokenizer.add_tokens)([token])
            got = tokenizer.token_to_id(spec["content"])
            if got != i:
                raise ValueError(f"{directory}: added token {spec['content']!r} has id {got}, the config says {i}")
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str) -> list[int]:
        """Ids of `text` (already normalised with `punc_norm`); no BOS/EOS, as the reference."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)


# ---------------------------------------------------------------------------------------
# Stand-in tokenizer files for random-weight checkpoints.

# The English stand-in's text (models/tokenizer.py) with its one ";" written as ",", plus a line.
MERGE_CORPUS = ENGLISH_MERGE_CORPUS.replace(";", ",") + (
    "Hi there, this is a call about your billing issue. Oh, that's hilarious! Well, let me think.\n")
STAND_IN_MERGES = 480


def _byte_alphabet() -> list[str]:
    """GPT-2's 256 byte characters, in byte order (bytes_to_unicode)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + list(range(ord("\xae"), ord("\xff") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def stand_in_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab without the added tags, merges): 256 byte characters, learned merges, EOS last."""
    alphabet = _byte_alphabet()
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    words: Counter = Counter()
    for word, _ in pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str(MERGE_CORPUS.replace("\n", " ")):
        words[tuple(word)] += 1
    merges = learn_merges(words, STAND_IN_MERGES)
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab[EOS_TOKEN] = len(vocab)
    return vocab, merges


def stand_in_vocab_size() -> int:
    vocab, _ = stand_in_vocab()
    return len(vocab) + len(TAGS)


def write_stand_in_tokenizer(directory: str | os.PathLike) -> Path:
    """Write the five tokenizer files of a stand-in in the upstream layout into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = stand_in_vocab()
    eos_id = vocab[EOS_TOKEN]
    tag_ids = {tag: len(vocab) + i for i, tag in enumerate(TAGS)}
    token_spec = {"lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    added_decoder = {str(eos_id): {"content": EOS_TOKEN, **token_spec, "special": True}}
    added_decoder |= {str(i): {"content": tag, **token_spec, "special": False} for tag, i in tag_ids.items()}
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added_decoder,
        "bos_token": EOS_TOKEN,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "errors": "replace",
        "model_max_length": 1024,
        "pad_token": None,
        "tokenizer_class": "GPT2Tokenizer",
        "unk_token": EOS_TOKEN,
    }
    special = {"bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN}
    files = {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
        "added_tokens.json": json.dumps(tag_ids, indent=2, ensure_ascii=False) + "\n",
        "special_tokens_map.json": json.dumps(special, indent=2) + "\n",
        "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False) + "\n",
    }
    for name, text in files.items():
        tmp = directory / (name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, directory / name)
    return directory
