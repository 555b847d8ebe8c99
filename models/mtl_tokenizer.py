"""Text front end of Chatterbox Multilingual: punctuation, `[lang]` prefix, front ends, BPE.

Port of chatterbox-tts 0.1.7 `mtl_tts.punc_norm` and `models/tokenizers/tokenizer.py`
(`MTLTokenizer`). Encoding is: lowercase, NFKD, the language's front end, `[xx]` prefix,
spaces -> `[SPACE]`, then the Rust `tokenizers` BPE on upstream's
grapheme_mtl_merged_expanded_v1.json. Front ends:

- ja: kanji -> hiragana with pykakasi (the `ja` extra), then NFKD again.
- ko: Hangul syllables -> conjoining jamo (pure Python; NFKD already decomposes them).
- zh: pkuseg word segmentation (the `zh` extra; it downloads its model on first use) and
  Cangjie codes from the checkpoint's Cangjie5_TC.json.
- he: upstream adds diacritics with dicta-onnx; dicta-onnx 1.0.9 cannot build its model
  without a path, upstream catches that and goes on undiacritised, and so does this port.
- ru: upstream adds stress marks with russian-text-stresser, which is not on PyPI; upstream
  then goes on unstressed, and so does this port.

Unlike upstream, a missing optional package is an error naming the extra to install
(upstream logs a warning and feeds the raw text, which the model reads as garbage).

Every transformation also keeps, for each output character, the index of the input
character it came from (`Tracked`), so that a token of the encoded text can be mapped back
to the characters of the text the caller gave (live text positions).
"""

from __future__ import annotations

import json
import logging
import os
import string
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tokenizers import AddedToken, Tokenizer
from tokenizers.models import BPE
from tokenizers.pre_tokenizers import Whitespace

from .tokenizer import (
    EMPTY_TEXT_REPLACEMENT,
    EOT,
    EOT_TOKEN,
    MERGE_CORPUS,
    PUNCTUATION_REPLACEMENTS,
    SOT,
    SOT_TOKEN,
    SPACE_TOKEN,
    UNK_TOKEN,
    learn_word_merges,
)

logger = logging.getLogger(__name__)

TOKENIZER_FILE = "grapheme_mtl_merged_expanded_v1.json"
CANGJIE_FILE = "Cangjie5_TC.json"
TEXT_VOCAB_SIZE = 2454  # T3Config.multilingual()

# mtl_tts.SUPPORTED_LANGUAGES, in upstream's order.
SUPPORTED_LANGUAGES = {
    "ar": "Arabic", "da": "Danish", "de": "German", "el": "Greek", "en": "English",
    "es": "Spanish", "fi": "Finnish", "fr": "French", "he": "Hebrew", "hi": "Hindi",
    "it": "Italian", "ja": "Japanese", "ko": "Korean", "ms": "Malay", "nl": "Dutch",
    "no": "Norwegian", "pl": "Polish", "pt": "Portuguese", "ru": "Russian", "sv": "Swedish",
    "sw": "Swahili", "tr": "Turkish", "zh": "Chinese",
}
# Languages whose front end needs an optional package: code -> (import name, extra).
EXTRAS = {"ja": ("pykakasi", "ja"), "zh": ("spacy_pkuseg", "zh")}
# mtl_tts.punc_norm's sentence enders (the English ones plus CJK punctuation).
MTL_SENTENCE_ENDERS = (".", "!", "?", "-", ",", "、", "，", "。", "？", "！")
CANGJIE_LETTERS = "abcdefghijklmnopqrstuvwxyz"
NO_ORIGIN = -1  # characters added by the tokenizer (the [xx] prefix)


class UnsupportedLanguageError(ValueError):
    """A language code the model does not speak; the message lists the supported codes."""


class MissingFrontEndError(RuntimeError):
    """A language front end needs an optional package (or data) that is not installed."""


def check_language(code: str | None, supported=SUPPORTED_LANGUAGES) -> str:
    """Lowercased code, or UnsupportedLanguageError naming the supported ones."""
    if code is None or code.lower() not in supported:
        raise UnsupportedLanguageError(
            f"unsupported language {code!r}; supported: {', '.join(supported)}"
        )
    return code.lower()


# ---------------------------------------------------------------------------------------
# Text with per-character origins


@dataclass
class Tracked:
    """A string and, per character, the index of the source character it came from."""

    text: str
    origin: list[int]

    @classmethod
    def of(cls, text: str) -> "Tracked":
        return cls(text, list(range(len(text))))

    def __post_init__(self) -> None:
        assert len(self.text) == len(self.origin)

    def __add__(self, other: "Tracked") -> "Tracked":
        return Tracked(self.text + other.text, self.origin + other.origin)

    def piecewise(self, pieces: list[tuple[int, int, str]]) -> "Tracked":
        """Replace spans: pieces are (start, end, new text), in order, covering the text.
        New characters are spread over the span's origins in order (an empty span: the
        origin of the character at its place)."""
        text, origin, last = [], [], 0
        for start, end, new in pieces:
            if end > start:  # spread the new characters over the span ("東京" -> "とうきょう")
                span = self.origin[start:end]
                origin.extend(span[k * len(span) // len(new)] for k in range(len(new)))
            else:
                src = self.origin[start] if start < len(self.origin) else (self.origin[-1] if self.origin else 0)
                origin.extend([src] * len(new))
            text.append(new)
            last = end
        assert last == len(self.text)
        return Tracked("".join(text), origin)

    def map_chars(self, fn: Callable[[str], str]) -> "Tracked":
        """Apply `fn` to each character separately."""
        return self.piecewise([(i, i + 1, fn(c)) for i, c in enumerate(self.text)])

    def replace(self, old: str, new: str) -> "Tracked":
        """str.replace, tracked (left to right, non-overlapping, as str.replace)."""
        if old not in self.text:
            return self
        pieces, i = [], 0
        while True:
            j = self.text.find(old, i)
            if j < 0:
                break
            pieces.extend((k, k + 1, self.text[k]) for k in range(i, j))
            pieces.append((j, j + len(old), new))
            i = j + len(old)
        pieces.extend((k, k + 1, self.text[k]) for k in range(i, len(self.text)))
        return self.piecewise(pieces)

    def conform(self, expected: str) -> "Tracked":
        """The tracked result of a whole-string operation whose per-piece version gave
        `self`: when they differ (context-dependent rules, e.g. Greek final sigma),
        origins are spread proportionally over `expected`."""
        if self.text == expected:
            return self
        n, m = len(self.origin), len(expected)
        if n == 0:
            return Tracked(expected, [0] * m)
        return Tracked(expected, [self.origin[min(n - 1, k * n // max(m, 1))] for k in range(m)])


def punc_norm(text: str) -> str:
    """mtl_tts.punc_norm: tts.punc_norm with CJK sentence enders."""
    return punc_norm_tracked(Tracked.of(text)).text


def punc_norm_tracked(t: Tracked) -> Tracked:
    if len(t.text) == 0:
        return Tracked(EMPTY_TEXT_REPLACEMENT, [0] * len(EMPTY_TEXT_REPLACEMENT))
    if t.text[0].islower():
        t = t.piecewise([(0, 1, t.text[0].upper())] + [(k, k + 1, c) for k, c in enumerate(t.text) if k > 0])
    # " ".join(text.split()): drop leading/trailing whitespace, collapse runs to one space
    words, pieces, k, n = t.text.split(), [], 0, len(t.text)
    while k < n:
        if t.text[k].isspace():
            j = k
            while j < n and t.text[j].isspace():
                j += 1
            inner = k > 0 and j < n
            pieces.append((k, j, " " if inner else ""))
            k = j
        else:
            pieces.append((k, k + 1, t.text[k]))
            k += 1
    t = t.piecewise(pieces)
    assert t.text == " ".join(words)
    for old, new in PUNCTUATION_REPLACEMENTS:
        t = t.replace(old, new)
    stripped = t.text.rstrip(" ")
    t = Tracked(stripped, t.origin[: len(stripped)])
    if not t.text.endswith(MTL_SENTENCE_ENDERS):
        t = t + Tracked(".", [t.origin[-1] if t.origin else 0])
    return t


# ---------------------------------------------------------------------------------------
# Language front ends


def _lower_nfkd(t: Tracked) -> Tracked:
    t = t.map_chars(str.lower).conform(t.text.lower())
    return t.map_chars(lambda c: unicodedata.normalize("NFKD", c)).conform(unicodedata.normalize("NFKD", t.text))


def is_kanji(c: str) -> bool:
    return 19968 <= ord(c) <= 40959


def is_katakana(c: str) -> bool:
    return 12449 <= ord(c) <= 12538


_kakasi = None


def _kakasi_converter():
    global _kakasi
    if _kakasi is None:
        try:
            import pykakasi
        except ImportError:
            raise MissingFrontEndError(
                "Japanese text needs pykakasi: pip install 'nightingale-tts[ja]'"
            ) from None
        _kakasi = pykakasi.kakasi()
    return _kakasi


def hiragana_normalize(t: Tracked) -> Tracked:
    """Kanji phrases -> hiragana (a leading は/へ gets a space), katakana and the rest as
    they are; then NFKD (upstream `hiragana_normalize`)."""
    pieces, pos = [], 0
    for r in _kakasi_converter().convert(t.text):
        orig, hira = r["orig"], r["hira"]
        start = t.text.find(orig, pos) if orig else pos
        if start < 0:  # pykakasi changed the input; fall back to proportional origins
            start = pos
        if any(is_kanji(c) for c in orig):
            if hira and hira[0] in ("は", "へ"):
                hira = " " + hira
            out = hira
        else:
            out = orig  # all-katakana and everything else stay as they were
        if start > pos:
            pieces.extend((k, k + 1, t.text[k]) for k in range(pos, start))
        pieces.append((start, start + len(orig), out))
        pos = start + len(orig)
    pieces.extend((k, k + 1, t.text[k]) for k in range(pos, len(t.text)))
    pieces = [p for p in pieces if p[0] < p[1] or p[2]]
    out = t.piecewise(pieces) if pieces else t
    return out.map_chars(lambda c: unicodedata.normalize("NFKD", c)).conform(unicodedata.normalize("NFKD", out.text))


def decompose_hangul(char: str) -> str:
    if not ("\uac00" <= char <= "\ud7af"):
        return char
    base = ord(char) - 0xAC00
    initial = chr(0x1100 + base // (21 * 28))
    medial = chr(0x1161 + (base % (21 * 28)) // 28)
    final = chr(0x11A7 + base % 28) if base % 28 > 0 else ""
    return initial + medial + final


def korean_normalize(t: Tracked) -> Tracked:
    """Syllables -> jamo, then strip (upstream `korean_normalize`)."""
    t = t.map_chars(decompose_hangul)
    stripped = t.text.strip()
    start = len(t.text) - len(t.text.lstrip())
    return Tracked(stripped, t.origin[start : start + len(stripped)])


class CangjieConverter:
    """Chinese characters -> `[cj_x]...[cj_.]` Cangjie code tokens, after pkuseg word
    segmentation (upstream `ChineseCangjieConverter`).

    table: the entries of Cangjie5_TC.json ("glyph\\tcode..."). segment: a function that
    cuts text into words (None: pkuseg, loaded on first use; False: no segmentation, as
    upstream does when pkuseg is not installed)."""

    def __init__(self, table: list[str], segment: Callable[[str], list[str]] | None | bool = None) -> None:
        self.word2cj: dict[str, str] = {}
        self.cj2word: dict[str, list[str]] = {}
        for entry in table:
            word, code = entry.split("\t")[:2]
            self.word2cj[word] = code
            self.cj2word.setdefault(code, []).append(word)
        self._segment = segment

    def segmenter(self) -> Callable[[str], list[str]] | None:
        if self._segment is None:
            try:
                from spacy_pkuseg import pkuseg
            except ImportError:
                raise MissingFrontEndError(
                    "Chinese text needs spacy-pkuseg: pip install 'nightingale-tts[zh]'"
                ) from None
            try:
                self._segment = pkuseg().cut
            except Exception as err:  # offline: pkuseg fetches its model when constructed
                raise MissingFrontEndError(
                    f"Chinese text needs pkuseg's segmentation model, which spacy-pkuseg downloads on first use "
                    f"and could not ({type(err).__name__}); connect once or place it in ~/.pkuseg"
                ) from None
        return self._segment or None

    def encode_glyph(self, glyph: str) -> str | None:
        code = self.word2cj.get(glyph)
        if code is None:
            return None
        index = self.cj2word[code].index(glyph)
        return code + (str(index) if index > 0 else "")

    def __call__(self, t: Tracked) -> Tracked:
        segment = self.segmenter()
        if segment is not None:
            # " ".join(words): the words are consecutive pieces of the text
            words = list(segment(t.text))
            pieces, pos = [], 0
            for n, word in enumerate(words):
                if n:
                    pieces.append((pos, pos, " "))
                pieces.extend((k, k + 1, t.text[k]) for k in range(pos, pos + len(word)))
                pos += len(word)
            joined = " ".join(words)
            if pos == len(t.text) and "".join(words) == t.text:
                t = t.piecewise(pieces)
            else:  # the segmenter dropped or changed characters
                t = Tracked(t.text, t.origin).conform(joined)
        out = []
        for c in t.text:
            if unicodedata.category(c) == "Lo":
                code = self.encode_glyph(c)
                out.append(c if code is None else "".join(f"[cj_{x}]" for x in code) + "[cj_.]")
            else:
                out.append(c)
        return t.piecewise([(k, k + 1, o) for k, o in enumerate(out)])


# ---------------------------------------------------------------------------------------
# The tokenizer


class MTLTokenizer:
    """Upstream's multilingual tokenizer. `encode(text, language)` takes punc_norm'ed text."""

    def __init__(self, path: str | os.PathLike, cangjie_table: str | os.PathLike | None = None,
                 chinese_segmenter: Callable[[str], list[str]] | None | bool = None) -> None:
        """chinese_segmenter: None loads pkuseg when Chinese is first spoken; False skips
        segmentation (upstream's behaviour without pkuseg installed)."""
        path = Path(path)
        self.tokenizer = Tokenizer.from_file(str(path))
        vocab = self.tokenizer.get_vocab()
        if SOT_TOKEN not in vocab or EOT_TOKEN not in vocab:
            raise ValueError(f"{path}: tokenizer vocabulary lacks {SOT_TOKEN} or {EOT_TOKEN}")
        table = Path(cangjie_table) if cangjie_table else path.parent / CANGJIE_FILE
        self._cangjie_path = table
        self._cangjie: CangjieConverter | None = None
        self._segmenter = chinese_segmenter

    def cangjie(self) -> CangjieConverter:
        if self._cangjie is None:
            if not self._cangjie_path.is_file():
                raise MissingFrontEndError(
                    f"Chinese text needs the Cangjie table {CANGJIE_FILE} beside the tokenizer ({self._cangjie_path.parent})"
                )
            table = json.loads(self._cangjie_path.read_text(encoding="utf-8"))
            self._cangjie = CangjieConverter(table, self._segmenter)
        return self._cangjie

    def prepare(self, text: str, language: str) -> Tracked:
        """The string handed to the BPE (prefix and [SPACE] included), with per-character
        origins in `text`; the prefix's characters have NO_ORIGIN."""
        language = check_language(language)
        t = _lower_nfkd(Tracked.of(text))
        if language == "zh":
            t = self.cangjie()(t)
        elif language == "ja":
            t = hiragana_normalize(t)
        elif language == "ko":
            t = korean_normalize(t)
        # he (dicta) and ru (stress marks): upstream's fallbacks leave the text as it is.
        t = Tracked(f"[{language}]", [NO_ORIGIN] * (len(language) + 2)) + t
        return t.replace(" ", SPACE_TOKEN)

    def encode(self, text: str, language: str) -> list[int]:
        return self.tokenizer.encode(self.prepare(text, language).text).ids

    def encode_with_spans(self, text: str, language: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and, per token, the [start, end) range of `text` it came from."""
        prepared = self.prepare(text, language)
        enc = self.tokenizer.encode(prepared.text)
        spans = []
        for start, end in enc.offsets:
            origins = [o for o in prepared.origin[start:end] if o != NO_ORIGIN]
            spans.append((min(origins), max(origins) + 1) if origins else (0, 0))
        return enc.ids, spans

    def decode(self, ids: list[int]) -> str:
        text = self.tokenizer.decode(list(ids), skip_special_tokens=False)
        return text.replace(" ", "").replace(SPACE_TOKEN, " ").replace(EOT_TOKEN, "").replace(UNK_TOKEN, "")


def text_spans_for_positions(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Per position of the wrapped text [SOT] ids [EOT] (what the alignment analyzer
    tracks), the character range it covers: SOT maps to (0, 0), EOT to the end."""
    end = max((e for _, e in spans), default=0)
    return [(0, 0)] + list(spans) + [(end, end)]


# ---------------------------------------------------------------------------------------
# Stand-in tokenizer and Cangjie table for random-weight checkpoints

# Scripts of the 23 languages after lowercasing and NFKD (ranges of code points).
_SCRIPT_RANGES = (
    (0x00A1, 0x00FF),  # Latin-1 punctuation and letters that NFKD keeps
    (0x0131, 0x0131), (0x0142, 0x0142), (0x0153, 0x0153), (0x00F8, 0x00F8),
    (0x0300, 0x036F),  # combining diacritics (NFKD output)
    (0x0370, 0x03FF),  # Greek
    (0x0400, 0x04FF),  # Cyrillic
    (0x0590, 0x05FF),  # Hebrew
    (0x0600, 0x06FF),  # Arabic
    (0x0900, 0x097F),  # Devanagari
    (0x1100, 0x11FF),  # Hangul jamo
    (0x3000, 0x303F),  # CJK punctuation
    (0x3040, 0x30FF),  # hiragana, katakana
    (0xFF01, 0xFF0F),  # fullwidth punctuation
)


def _stand_in_alphabet() -> list[str]:
    chars = [ch for ch in string.printable if ch.isprintable() and not ch.isspace()]
    seen = set(chars)
    for lo, hi in _SCRIPT_RANGES:
        for cp in range(lo, hi + 1):
            c = chr(cp)
            if c in seen or c.isspace() or unicodedata.category(c) in ("Cn", "Cc", "Cs", "Co", "Zs"):
                continue
            chars.append(c)
            seen.add(c)
    return chars


def stand_in_tokenizer() -> Tokenizer:
    """A tokenizer in the conventions of grapheme_mtl_merged_expanded_v1.json, 2454 ids.

    [STOP]=0, [UNK]=1, [SPACE]=2, [PAD]=3, [SEP]=4, [CLS]=5, [MASK]=6, [START]=255, the 23
    `[xx]` language tokens and the 27 `[cj_x]` Cangjie tokens as special tokens; characters
    of every supported script after lowercasing and NFKD; BPE merges of a small English text
    and two-letter lowercase merges up to 2454 ids. Whitespace pre-tokenizer, no normalizer.
    """
    fixed = {EOT_TOKEN: EOT, UNK_TOKEN: 1, SPACE_TOKEN: 2, "[PAD]": 3, "[SEP]": 4, "[CLS]": 5, "[MASK]": 6, SOT_TOKEN: SOT}
    specials = [f"[{code}]" for code in SUPPORTED_LANGUAGES] + [f"[cj_{c}]" for c in CANGJIE_LETTERS + "."]
    used = set(fixed.values())
    free_ids = (i for i in range(TEXT_VOCAB_SIZE) if i not in used)
    vocab = dict(fixed)
    for token in specials:
        vocab[token] = next(free_ids)
    alphabet = _stand_in_alphabet()
    for ch in alphabet:
        vocab[ch] = next(free_ids)
    n_merges = TEXT_VOCAB_SIZE - len(vocab)
    merges = learn_word_merges(MERGE_CORPUS.lower(), set(alphabet), n_merges)
    for a in string.ascii_lowercase:
        for b in string.ascii_lowercase:
            if len(merges) < n_merges and a + b not in {x + y for x, y in merges}:
                merges.append((a, b))
    merges = merges[:n_merges]
    for a, b in merges:
        vocab[a + b] = next(free_ids)
    assert len(vocab) == TEXT_VOCAB_SIZE and max(vocab.values()) == TEXT_VOCAB_SIZE - 1, len(vocab)

    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=UNK_TOKEN))
    tokenizer.pre_tokenizer = Whitespace()
    ordered = sorted(list(fixed) + specials, key=vocab.get)
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in ordered])
    return tokenizer


def write_stand_in_tokenizer_json(path: str | os.PathLike) -> Path:
    path = Path(path)
    spec = json.loads(stand_in_tokenizer().to_str())
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(spec, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


# A few common characters with made-up but well-formed codes; two share a code so that the
# index suffix (upstream's homograph numbering) is exercised.
_STAND_IN_CANGJIE = [
    "你\tonf", "好\tvnd", "我\thqi", "是\tamyo", "的\thapi", "中\tl", "文\tyk", "人\to",
    "们\toan", "天\tmk", "气\tomn", "很\thoav", "今\toin", "日\ta", "大\tk", "国\twmgi",
    "说\tyrcu", "话\tyhjr", "这\tyyk", "个\tol", "一\tm", "不\tmf", "了\tnn", "在\tkldg",
    "有\tkb", "和\thdr", "学\tfbnd", "生\thqm", "好\tvnd",
]


def write_stand_in_cangjie_json(path: str | os.PathLike) -> Path:
    """A small Cangjie5_TC.json (a JSON list of "glyph\\tcode" strings, as upstream's)."""
    path = Path(path)
    entries = list(dict.fromkeys(_STAND_IN_CANGJIE))
    entries.append("囡\tonf")  # same code as 你: encodes as "onf1"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(entries, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path
