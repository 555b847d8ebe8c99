"""One speak request as the daemon tracks it, and the text feed the engine reads from.

An Utterance is created by the event loop, queued, handed to the engine thread, and
finished by the loop. The loop and the engine share it through thread-safe parts only:
`cancelled` (an Event), `feed` (a TextFeed), and `streams` (a flag the loop may clear when
a streaming client goes away).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

from nightingale import protocol as p
from nightingale.models.text import last_sentence_end, split_text

_POLL_S = 0.05  # how often a blocked engine re-checks cancellation


class TextFeed:
    """Text that arrives in pieces (or all at once) and leaves in runs of whole sentences.

    The loop calls push()/end()/abort(); the engine passes segments() to model.stream, which
    splits each run into sentences with the model's one splitter (models/text.py). A run
    ends at the last sentence end the buffer holds, or is the whole text once the input has
    ended; a sentence too long for one segment is spoken segment by segment as soon as the
    splitter's cut can no longer move. So the runs split exactly as the whole text does, and
    text given at once is spoken exactly as model.stream(text) speaks it.
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

    def _take_ready(self) -> str:
        """Remove and return what may be spoken now ("" if nothing)."""
        cut = len(self._buf) if self._ended else last_sentence_end(self._buf)
        if cut:
            head, self._buf = self._buf[:cut], self._buf[cut:]
            return head
        segments = split_text(self._buf)
        if len(segments) < 2:
            return ""
        # One long sentence: every segment but the last is final (the splitter packs
        # clauses and words greedily); the last may still grow.
        tail = " " if self._buf[-1:].isspace() else ""
        self._buf = segments[-1] + tail
        return " ".join(segments[:-1])

    def next_segment(self, timeout: float | None = None) -> str | None:
        """The next non-blank run of text; None when the input ended (or was aborted).
        Raises TimeoutError if `timeout` passes with nothing ready."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if self._aborted:
                    return None
                head = self._take_ready()
                if head.strip():
                    return head.strip()
                if head:
                    continue
                if self._ended:
                    return None
                wait = _POLL_S if deadline is None else min(_POLL_S, deadline - time.monotonic())
                if wait <= 0:
                    raise TimeoutError("no text arrived")
                self._cond.wait(wait)

    def segments(self, cancelled: threading.Event) -> Iterator[str]:
        """Runs of text until the input ends or `cancelled` is set."""
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
    time.monotonic() seconds. `peer` is the client that asked (scheduler.Peer: a socket
    connection or a front end's local peer).
    """

    id: str
    peer: Any
    priority: str
    output: str
    seq: int = 0  # set by Scheduler.submit
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

    def done_event(self, reason: str, detail: str | None) -> p.Done:
        """The one `done` of this utterance, with its timings (the engine's `stats` where it
        ran, else the loop's progress counts)."""
        st = self.stats
        done = p.Done(id=self.id, reason=reason, detail=detail, tokens=st.get("tokens", self.tokens), chunks=st.get("chunks", self.chunks))
        done.audio_s = round(float(st.get("audio_s", self.audio_s)), 3)
        if self.started_at is not None:
            done.wait_ms = round((self.started_at - self.received_at) * 1000.0, 1)
        if st.get("ttfa_ms") is not None:
            done.ttfa_ms = round(st["ttfa_ms"], 1)
        if self.first_audio_at is not None:
            done.first_audio_ms = round((self.first_audio_at - self.received_at) * 1000.0, 1)
        if st.get("audio_s") and st.get("synth_s") is not None:
            done.rtf = round(st["synth_s"] / st["audio_s"], 4)
        if st.get("t3_ms"):
            done.t3_tokens_per_s = round(st["tokens"] / (st["t3_ms"] / 1000.0), 1)
        if st.get("chunks") and st.get("s3gen_ms"):
            done.s3gen_ms_per_chunk = round(st["s3gen_ms"] / st["chunks"], 1)
        done.underruns = int(st.get("underruns", 0))
        return done
