"""One speak request as the daemon tracks it, and the text feed the engine reads from.

An Utterance is created by the event loop, queued, handed to the engine thread, and
finished by the loop. The loop and the engine share it through thread-safe parts only:
`cancelled` (an Event), `feed` (a TextFeed), and `streams` (a flag the loop may clear when
a streaming client goes away).
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

# Pieces of text synthesized in one model.stream() call. Chatterbox degrades on long
# inputs (~300 characters, ~40 s), so longer text is cut at sentence ends.
MAX_SEGMENT_CHARS = 300
# Text without any sentence end is still spoken once this much has accumulated.
FORCE_SEGMENT_CHARS = 200
_POLL_S = 0.05  # how often a blocked engine re-checks cancellation

# The end of a sentence: terminal punctuation (plus closing quotes/brackets) followed by
# white space (CJK full-width ends need none; models/punctuation.py), or a line break.
_BOUNDARY = re.compile(
    r"[.!?;:\u2026\u061f\u06d4\u0964\u0965]+[\"'\u201d\u2019\u00bb)\]]*(?=\s)"  # Latin, Arabic, Devanagari
    r"|[\u3002\uff01\uff1f]+[\u300d\u300f\u201d\u2019\uff09)\]]*"  # CJK: no space follows
    r"|\n"
)


def last_boundary(text: str, limit: int | None = None) -> int:
    """Index just past the last sentence end in text[:limit] (0 when there is none)."""
    end = 0
    for m in _BOUNDARY.finditer(text, 0, len(text) if limit is None else min(limit, len(text))):
        end = m.end()
    return end


def take_segment(text: str, max_chars: int = MAX_SEGMENT_CHARS) -> tuple[str, str]:
    """Split `text` into (head, rest): head is at most max_chars, cut at the last sentence
    end, else at the last space, else hard."""
    if len(text) <= max_chars:
        return text, ""
    cut = last_boundary(text, max_chars)
    if cut == 0:
        space = text.rfind(" ", 0, max_chars)
        cut = space + 1 if space > 0 else max_chars
    return text[:cut], text[cut:]


class TextFeed:
    """Text that arrives in pieces (or all at once) and leaves in sentence-sized segments.

    The loop calls push()/end()/abort(); the engine iterates segments(), which blocks until
    a complete sentence (or the end of input) is available. Segments are formed when the
    engine asks, so text that piled up while it was busy is spoken as one larger segment.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._buf = ""
        self.text = ""  # everything pushed so far (progress events index it)
        self._ended = False
        self._aborted = False
        self.total_bytes = 0

    def push(self, text: str) -> None:
        with self._cond:
            if self._ended or self._aborted:
                return
            self._buf += text
            self.text += text
            self.total_bytes += len(text.encode("utf-8"))
            self._cond.notify_all()

    def end(self) -> None:
        with self._cond:
            self._ended = True
            self._cond.notify_all()

    def abort(self) -> None:
        with self._cond:
            self._aborted = True
            self._cond.notify_all()

    @property
    def ended(self) -> bool:
        return self._ended

    def _ready_text(self) -> int:
        """How much of the buffer may be spoken now."""
        if self._ended:
            return len(self._buf)
        cut = last_boundary(self._buf)
        if cut == 0 and len(self._buf) >= FORCE_SEGMENT_CHARS:
            cut = self._buf.rfind(" ") + 1 or len(self._buf)
        return cut

    def next_segment(self, timeout: float | None = None) -> str | None:
        """The next non-empty segment; None when the input ended (or was aborted).
        Raises TimeoutError if `timeout` passes with nothing ready."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if self._aborted:
                    return None
                ready = self._ready_text()
                if ready:
                    head, rest = take_segment(self._buf[:ready])
                    self._buf = rest + self._buf[ready:]
                    if head.strip():
                        return head.strip()
                    continue
                if self._ended:
                    return None
                wait = _POLL_S if deadline is None else min(_POLL_S, deadline - time.monotonic())
                if wait <= 0:
                    raise TimeoutError("no text arrived")
                self._cond.wait(wait)

    def segments(self, cancelled: threading.Event) -> Iterator[str]:
        """Segments until the input ends or `cancelled` is set."""
        while not cancelled.is_set():
            try:
                seg = self.next_segment(timeout=_POLL_S)
            except TimeoutError:
                continue
            if seg is None:
                return
            yield seg


@dataclass(eq=False)
class Utterance:
    """A speak request from acceptance to `done`.

    seq is the daemon-wide arrival number (FIFO order within a priority). Times are
    time.monotonic() seconds. `session` is the owning connection (opaque here).
    """

    id: str
    seq: int
    session: Any
    priority: str
    output: str
    voice: str | None = None
    options: dict = field(default_factory=dict)
    language: str | None = None  # as asked (None: the voice's, else English)
    audio_format: str = "f32le"
    text_stream: bool = False
    received_at: float = field(default_factory=time.monotonic)
    feed: TextFeed = field(default_factory=TextFeed)
    cancelled: threading.Event = field(default_factory=threading.Event)

    # Loop-owned progress.
    started_at: float | None = None
    first_audio_at: float | None = None
    generated: bool = False  # the engine is done with it
    played: bool = False  # its last sample has been heard (or it never played)
    finished: bool = False  # `done` was sent
    chunks: int = 0
    tokens: int = 0
    audio_s: float = 0.0
    stats: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.plays = self.output in ("play", "both")
        # Cleared by the loop when a streaming client disconnects (read by the engine).
        self.streams = self.output in ("stream", "both")

    def cancel(self) -> None:
        """Stop synthesis at the next chunk and wake an engine blocked on the feed."""
        self.cancelled.set()
        self.feed.abort()

    def describe(self, now: float | None = None) -> dict:
        now = time.monotonic() if now is None else now
        out = {"id": self.id, "priority": self.priority, "output": self.output}
        if self.started_at is None:
            out["wait_ms"] = round((now - self.received_at) * 1000.0, 1)
        else:
            out.update(
                elapsed_ms=round((now - self.started_at) * 1000.0, 1),
                chunks=self.chunks,
                tokens=self.tokens,
                audio_s=round(self.audio_s, 3),
            )
        return out
