"""Queue policy (speech-dispatcher priorities) and the text feed, without a model."""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass

import pytest

from nightingale.daemon.scheduler import SpeechQueue
from nightingale.daemon.utterance import TextFeed

_seq = itertools.count()


@dataclass(eq=False)
class U:
    id: str
    priority: str

    def __post_init__(self):
        self.seq = next(_seq)


def ids(items) -> list[str]:
    return [u.id for u in items]


def test_order_is_priority_then_arrival():
    q = SpeechQueue()
    for name, prio in [("t1", "text"), ("m1", "message"), ("i1", "important"), ("m2", "message"), ("i2", "important")]:
        assert q.admit(U(name, prio), speaking=[]).accepted
    assert ids(q) == ["i1", "i2", "m1", "m2"]  # t1 was cancelled by m1 (message cancels text)
    assert ids([q.pop(), q.pop(), q.pop(), q.pop()]) == ["i1", "i2", "m1", "m2"]
    assert q.pop() is None


def test_important_interrupts_others_and_postpones_queued():
    q = SpeechQueue()
    speaking = U("m", "message")
    queued_text, queued_note = U("t", "text"), U("n", "notification")
    q._items = [queued_text, queued_note]
    a = q.admit(U("i", "important"), speaking=[speaking])
    assert a.accepted and set(ids(a.preempted)) == {"m", "n"}
    assert ids(q) == ["i", "t"]  # text waits (postponed), notification discarded


def test_important_does_not_interrupt_important():
    q = SpeechQueue()
    a = q.admit(U("i2", "important"), speaking=[U("i1", "important")])
    assert a.accepted and a.preempted == [] and ids(q) == ["i2"]


def test_message_does_not_interrupt_itself_but_cancels_text():
    q = SpeechQueue()
    a = q.admit(U("m2", "message"), speaking=[U("m1", "message")])
    assert a.preempted == [] and ids(q) == ["m2"]
    a = q.admit(U("m3", "message"), speaking=[U("t1", "text")])
    assert ids(a.preempted) == ["t1"]


def test_text_interrupts_itself():
    q = SpeechQueue()
    q.admit(U("t2", "text"), speaking=[])
    a = q.admit(U("t3", "text"), speaking=[U("t1", "text")])
    assert set(ids(a.preempted)) == {"t1", "t2"} and ids(q) == ["t3"]


def test_text_waits_behind_message():
    q = SpeechQueue()
    a = q.admit(U("t", "text"), speaking=[U("m", "message")])
    assert a.preempted == [] and ids(q) == ["t"]


def test_notification_is_discarded_when_anything_else_is_pending():
    q = SpeechQueue()
    for other in ("important", "message", "text", "progress"):
        a = q.admit(U("n", "notification"), speaking=[U("x", other)])
        assert not a.accepted and "pending" in a.reason
    a = q.admit(U("n2", "notification"), speaking=[U("n1", "notification")])
    assert a.accepted and ids(a.preempted) == ["n1"]  # it interrupts itself


def test_progress_keeps_only_the_newest_waiting():
    q = SpeechQueue()
    speaking = [U("p1", "progress")]
    assert q.admit(U("p2", "progress"), speaking=speaking).preempted == []
    a = q.admit(U("p3", "progress"), speaking=speaking)
    assert ids(a.preempted) == ["p2"] and ids(q) == ["p3"]  # p1 goes on, the last report waits
    assert not q.admit(U("p4", "progress"), speaking=[U("t", "text")]).accepted
    a = q.admit(U("p5", "progress"), speaking=[U("n", "notification")])
    assert set(ids(a.preempted)) == {"n", "p3"} and ids(q) == ["p5"]


def test_notification_and_progress_are_discarded_while_paused():
    q = SpeechQueue()
    for prio in ("notification", "progress"):
        a = q.admit(U("x", prio), speaking=[], paused=True)
        assert not a.accepted and "paused" in a.reason
    assert q.admit(U("m", "message"), speaking=[], paused=True).accepted


def test_full_queue_is_busy_without_changes():
    q = SpeechQueue(max_size=2)
    q.admit(U("m1", "message"), speaking=[])
    q.admit(U("m2", "message"), speaking=[])
    a = q.admit(U("m3", "message"), speaking=[])
    assert a.busy and ids(q) == ["m1", "m2"]
    q2 = SpeechQueue(max_size=1)
    q2.admit(U("t1", "text"), speaking=[])
    a = q2.admit(U("t2", "text"), speaking=[])  # room appears because t1 is cancelled
    assert not a.busy and ids(q2) == ["t2"]


def test_remove_and_position():
    q = SpeechQueue()
    a, b = U("a", "message"), U("b", "message")
    q.admit(a, speaking=[])
    q.admit(b, speaking=[])
    assert q.position(b) == 1
    assert q.remove(a) and not q.remove(a)
    assert q.position(b) == 0
    assert ids(q.remove_all()) == ["b"] and len(q) == 0


# --- text feed


def test_feed_runs_split_as_the_whole_text_does():
    """The feed cuts only at sentence ends (the model's splitter's), so the model's
    segments of the runs equal those of the whole text."""
    from nightingale.models.text import split_text

    text = "First sentence here. Then a question? " + ", ".join(["a clause"] * 60) + ". Last!"
    feed = TextFeed()
    runs: list[str] = []
    for i in range(0, len(text), 7):  # arrives in pieces; the engine takes what is ready
        feed.push(text[i : i + 7])
        while True:
            try:
                runs.append(feed.next_segment(timeout=0.001))
            except TimeoutError:
                break
    feed.end()
    runs.extend(feed.segments(threading.Event()))
    assert len(runs) >= 3
    assert [s for run in runs for s in split_text(run)] == split_text(text)


def test_feed_without_sentence_ends_is_still_spoken():
    feed = TextFeed()
    feed.push("word " * 100)  # 500 characters, no sentence end: one full segment is ready
    run = feed.next_segment(timeout=1.0)
    assert run.startswith("word word") and 250 < len(run) <= 300


def test_feed_yields_complete_sentences_before_the_input_ends():
    feed = TextFeed()
    cancelled = threading.Event()
    feed.push("Hello there. How are")
    segs = feed.segments(cancelled)
    assert next(segs) == "Hello there."
    got: list[str] = []

    def consume():
        got.extend(segs)

    t = threading.Thread(target=consume)
    t.start()
    time.sleep(0.1)
    assert got == []  # "How are" waits for the rest of its sentence
    feed.push(" you? Fine")
    feed.end()
    t.join(5)
    assert got == ["How are you? Fine"]


def test_feed_abort_wakes_a_waiting_reader():
    feed = TextFeed()
    cancelled = threading.Event()
    out: list = []
    t = threading.Thread(target=lambda: out.extend(feed.segments(cancelled)))
    t.start()
    time.sleep(0.1)
    cancelled.set()
    feed.abort()
    t.join(2)
    assert not t.is_alive() and out == []


@pytest.mark.parametrize("text", ["", "   ", "\n\n"])
def test_feed_skips_blank_text(text):
    feed = TextFeed()
    feed.push(text)
    feed.end()
    assert list(feed.segments(threading.Event())) == []
