"""The one sentence splitter: model.stream, model.synthesize and the daemon's text feed.

Pure Python (no MLX), so the daemon can import it without loading the model.

Chatterbox degrades on long inputs (the reference's practical limit is ~300 characters,
~40 s per generate() call), so text is spoken segment after segment: sentences, cut further
at clauses and then words while longer than MAX_SEGMENT_CHARS. A text that arrives in pieces
(the daemon's streamed text) is spoken up to its last sentence end as soon as that exists.
"""

from __future__ import annotations

from typing import Iterator

from .punctuation import CLAUSE_END, SENTENCE_END, join

MAX_SEGMENT_CHARS = 300

# A sentence end: terminal punctuation, closing quotes/brackets, then white space (none
# after CJK full-width marks); clause ends likewise. Every script: models/punctuation.py.
_SENTENCE_END = SENTENCE_END
_CLAUSE_END = CLAUSE_END


def split_text(text: str, max_chars: int = MAX_SEGMENT_CHARS) -> list[str]:
    """Sentences (white space collapsed), split further at clauses and then words while
    longer than max_chars. Blank text gives []."""
    segments: list[str] = []
    for sentence in _SENTENCE_END.split(" ".join(text.split())):
        sentence = sentence.strip()
        if not sentence:
            continue
        if len(sentence) <= max_chars:
            segments.append(sentence)
            continue
        current = ""
        for piece in _split_long(sentence, max_chars):
            if current and len(current) + 1 + len(piece) > max_chars:
                segments.append(current)
                current = piece
            else:
                current = join(current, piece).strip()
        if current:
            segments.append(current)
    return segments


def _split_long(sentence: str, max_chars: int) -> Iterator[str]:
    for clause in _CLAUSE_END.split(sentence):
        if len(clause) <= max_chars:
            yield clause
            continue
        current = ""
        for word in clause.split(" "):
            while len(word) > max_chars:  # one enormous "word": cut it
                if current:
                    yield current
                    current = ""
                yield word[:max_chars]
                word = word[max_chars:]
            if current and len(current) + 1 + len(word) > max_chars:
                yield current
                current = word
            else:
                current = f"{current} {word}".strip()
        if current:
            yield current


def last_sentence_end(text: str) -> int:
    """Index just past the last sentence end in `text` (0 when there is none): the part of
    a still-growing text that split_text would cut the same way whatever follows."""
    end = 0
    for m in _SENTENCE_END.finditer(text):
        end = m.end()
    return end
