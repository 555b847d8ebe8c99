"""Where sentences and clauses end, in every script the multilingual model speaks.

Pure Python (no MLX): the sentence splitter uses it, and the daemon imports that.

- Latin, Greek, Cyrillic, Hebrew: . ! ? ... (Greek's question mark ";" is also the Latin
  semicolon, a clause end), then closing quotes or brackets, then white space.
- Arabic: the question mark (U+061F) and the Urdu full stop (U+06D4) end sentences; the
  Arabic comma (U+060C) and semicolon (U+061B) end clauses; white space follows them.
- Devanagari (Hindi): the danda (U+0964) and double danda (U+0965) end sentences.
- CJK: the full-width full stop, exclamation and question marks (U+3002, U+FF01, U+FF1F)
  end sentences and the full-width comma, the ideographic (enumeration) comma, semicolon
  and colon (U+FF0C, U+3001, U+FF1B, U+FF1A) end clauses with no white space after them:
  Chinese and Japanese do not put spaces between sentences. Pieces cut there are joined
  again without a space (`join`).

As in the Latin case, closing quotes and brackets right after a sentence end go with the
separator (they are not spoken).
"""

from __future__ import annotations

import re

LATIN_SENTENCE = ".!?\u2026"
ARABIC_SENTENCE = "\u061f\u06d4"
DEVANAGARI_SENTENCE = "\u0964\u0965"
CJK_SENTENCE = "\u3002\uff01\uff1f"
CLOSERS = "\"'\u201d\u2019\u00bb)\\]"  # closing quotes and brackets after a sentence end
CJK_CLOSERS = "\u300d\u300f\u201d\u2019\uff09)\\]"
LATIN_CLAUSE = ",;:\u2014\u2013"
ARABIC_CLAUSE = "\u060c\u061b"
CJK_CLAUSE = "\uff0c\u3001\uff1b\uff1a"

# A sentence end as the splitter cuts at it (the match is the separator it drops).
SENTENCE_END = re.compile(
    rf"(?<=[{LATIN_SENTENCE}{ARABIC_SENTENCE}{DEVANAGARI_SENTENCE}])[{CLOSERS}]*\s+"
    rf"|(?<=[{CJK_SENTENCE}])[{CJK_CLOSERS}]*\s*"
)
CLAUSE_END = re.compile(rf"(?<=[{LATIN_CLAUSE}{ARABIC_CLAUSE}])\s+|(?<=[{CJK_CLAUSE}])\s*")
# After these a cut removed no space (the separator dropped only closers, if any).
NO_SPACE_AFTER = set(CJK_SENTENCE + CJK_CLAUSE)


def join(head: str, tail: str) -> str:
    """head + tail with the space a cut removed (none after CJK punctuation)."""
    if not head:
        return tail
    if not tail:
        return head
    return head + tail if head[-1] in NO_SPACE_AFTER else f"{head} {tail}"
