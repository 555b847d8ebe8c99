"""The speech queue: speech-dispatcher's five priorities and their interrupt rules.

Pure policy, owned by the event loop (not thread-safe, no I/O). `admit` decides what a new
utterance does to those waiting and speaking; the caller carries out the cancellations.

Rules (SSIP, "message priority model"; docs/protocol.md has the table):
- important:    cancels whatever of another priority is speaking; discards queued
                notification/progress; queues behind earlier important ones.
- message:      cancels speaking and queued text/notification/progress.
- text:         the same, so text interrupts itself (the newest text wins).
- notification: discarded on arrival if anything of another priority is speaking or
                queued (or playback is paused); otherwise cancels other notifications.
- progress:     discarded on arrival if important/message/text is speaking or queued (or
                paused); cancels a speaking notification and queued progress, so only the
                newest report of a series waits (the last one is always heard).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Protocol, Sequence

PRIORITY_RANK = {"important": 0, "message": 1, "text": 2, "notification": 3, "progress": 3}
DEFAULT_MAX_QUEUE = 64


class Queued(Protocol):
    priority: str
    seq: int


@dataclass
class Admission:
    """The decision for one new utterance.

    accepted: False when the new one is discarded on arrival (it is then neither queued nor
    counted against the bound). busy: the queue is full; nothing changed. preempted: queued
    or speaking utterances to cancel (queued ones are already removed).
    """

    accepted: bool = True
    busy: bool = False
    preempted: list = field(default_factory=list)
    reason: str = ""


class SpeechQueue:
    """Waiting utterances, taken most urgent first and FIFO within a rank."""

    def __init__(self, max_size: int = DEFAULT_MAX_QUEUE):
        self.max_size = max_size
        self._items: list[Queued] = []

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self):
        return iter(self._items)

    def admit(self, new: Queued, speaking: Sequence[Queued], paused: bool = False) -> Admission:
        """Apply the rules for `new` against the queue and the `speaking` utterances
        (being synthesized or still playing); queue it unless discarded or busy."""
        p = new.priority
        everything = [*speaking, *self._items]
        if p in ("notification", "progress"):
            if paused:
                return Admission(accepted=False, reason="playback is paused")
            blockers = ("important", "message", "text") + (("progress",) if p == "notification" else ())
            blocker = next((u for u in everything if u.priority in blockers), None)
            if blocker is not None:
                return Admission(accepted=False, reason=f"{blocker.priority} {getattr(blocker, 'id', '')} is pending".strip())
        victims_speaking = [u for u in speaking if self._cancels(p, u.priority, speaking=True)]
        victims_queued = [u for u in self._items if self._cancels(p, u.priority, speaking=False)]
        if len(self._items) - len(victims_queued) >= self.max_size:
            return Admission(busy=True, reason=f"the queue is full ({self.max_size} waiting)")
        for u in victims_queued:
            self._items.remove(u)
        self._insert(new)
        return Admission(preempted=[*victims_speaking, *victims_queued])

    @staticmethod
    def _cancels(new: str, old: str, *, speaking: bool) -> bool:
        if new == "important":
            # Speaking non-important is cut; queued message/text are only postponed.
            return old != "important" if speaking else old in ("notification", "progress")
        if new in ("message", "text"):
            return old in ("text", "notification", "progress")
        if new == "notification":
            return old == "notification"
        if new == "progress":
            return old == "notification" if speaking else old == "progress"
        raise ValueError(f"unknown priority {new!r}")

    def _insert(self, item: Queued) -> None:
        key = (PRIORITY_RANK[item.priority], item.seq)
        i = len(self._items)
        while i > 0 and (PRIORITY_RANK[self._items[i - 1].priority], self._items[i - 1].seq) > key:
            i -= 1
        self._items.insert(i, item)

    def position(self, item: Queued) -> int:
        return self._items.index(item)

    def pop(self) -> Queued | None:
        return self._items.pop(0) if self._items else None

    def remove(self, item: Queued) -> bool:
        try:
            self._items.remove(item)
            return True
        except ValueError:
            return False

    def remove_all(self, items: Iterable[Queued] | None = None) -> list[Queued]:
        """Remove `items` (default: everything) and return what was removed."""
        if items is None:
            out, self._items = self._items, []
            return out
        out = [u for u in items if self.remove(u)]
        return out
