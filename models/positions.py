"""Which characters of the caller's text a streamed audio chunk speaks.

The multilingual model's alignment analyzer tracks a text position (an index into
[SOT] text tokens [EOT]) for every speech token; the tokenizer says which characters each
text token came from (`mtl_tokenizer.Tracked`); the sentence splitter says where each
segment sits in the original text. Together they give each chunk a character range of
the text the client sent. The English model has no aligned heads: its chunks get the
range of the segment (sentence or clause) they belong to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

# T3's start-of-speech id; it and every id above it are T3's own, outside S3Gen's 6561-token
# codebook, so they are never rendered (upstream drops them before S3Gen, as streaming does).
START_SPEECH_TOKEN = 6561


def segment_origins(text: str, segments: list[str]) -> list[list[int]]:
    """For each segment, the index in `text` of each of its characters.

    The splitter only drops and collapses whitespace, so the segments' non-space
    characters appear in `text` in order; a segment's space maps to the whitespace after
    the previous character. Characters that cannot be found (a splitter
    that rewrites text) map to the last matched position."""
    out, cursor = [], 0
    for segment in segments:
        origins = []
        for ch in segment:
            if ch.isspace():  # the whitespace run at the cursor, or (none: a joiner the
                # splitter added between CJK clauses) the previous character
                at_space = cursor < len(text) and text[cursor].isspace()
                origins.append(cursor if at_space else max(cursor - 1, 0))
                continue
            k = text.find(ch, cursor)
            if k < 0:
                origins.append(max(cursor - 1, 0))
                continue
            origins.append(k)
            cursor = k + 1
        out.append(origins)
    return out


@dataclass
class SegmentPositions:
    """Maps text positions of one segment to character ranges of the whole text.

    spans: per text position ([SOT] tokens [EOT]), the [start, end) range in the segment
    (None: the English model, every position means the whole segment). origins: the
    segment's characters' indices in the whole text (`segment_origins`)."""

    origins: list[int]
    spans: list[tuple[int, int]] | None = None

    def segment_range(self) -> tuple[int, int]:
        if not self.origins:
            return (0, 0)
        return (self.origins[0], self.origins[-1] + 1)

    def char_range(self, positions: list[int]) -> tuple[int, int]:
        """The range covered by these text positions (the whole segment without spans)."""
        if self.spans is None or not positions or not self.origins:
            return self.segment_range()
        covered = [self.spans[min(max(p, 0), len(self.spans) - 1)] for p in positions]
        covered = [(a, b) for a, b in covered if b > a]
        if not covered:  # SOT, the language tag or EOT: nothing spoken yet / all of it
            at = self.segment_range()[0] if max(positions) < len(self.spans) // 2 else self.segment_range()[1]
            return (at, at)
        start = min(a for a, _ in covered)
        end = max(b for _, b in covered)
        last = len(self.origins) - 1
        return (self.origins[min(start, last)], self.origins[min(end - 1, last)] + 1)


def tracked_tokens(model, segment: str, language: str | None, positions: list[int], **generate) -> Iterator[int]:
    """The segment's speech tokens (model.generate_tokens); for the multilingual model the
    analyzer's text position of every token below 6561 (the ones S3Gen renders) is
    appended to `positions` as it is generated, so rendered-token ranges index it."""
    if model.family != "multilingual":
        yield from model.generate_tokens(segment, **generate)  # English-only models take no language
        return
    for aligned in model.generate_aligned_tokens(segment, language=language, **generate):
        if aligned.token < START_SPEECH_TOKEN:
            positions.append(aligned.position)
        yield aligned.token
