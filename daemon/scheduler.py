"""The scheduler: one queue of utterances for every client, whichever front end it came
through, and the one place where an utterance is dispatched to the engine and finished.

It runs on the event loop only (not thread-safe, no I/O of its own): clients are `Peer`s it
posts events to; the engine thread and the player reach it through the loop
(`on_started`, `on_audio`, `on_chunk`, `on_generated`, `on_played`). An utterance's life:
submit() -> queued -> _dispatch() -> engine -> on_generated() -> (playing tail) ->
finish(), which sends its one `done`.

The queue follows speech-dispatcher's five priorities (SSIP, "message priority model";
docs/protocol.md has the table). `SpeechQueue.admit` decides what a new utterance does to
those waiting and speaking; the scheduler carries out the cancellations:
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

import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Protocol, Sequence

import anyio

from nightingale import protocol as p

from .config import DEFAULT_MAX_QUEUE, SAMPLE_RATE
from .peers import Peer, Peers
from .telemetry import Telemetry, model_line
from .utterance import Utterance

if TYPE_CHECKING:
    from .engine import EngineInfo

log = logging.getLogger(__name__)

PRIORITY_RANK = {"important": 0, "message": 1, "text": 2, "notification": 3, "progress": 3}


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
        prio = new.priority
        everything = [*speaking, *self._items]
        if prio in ("notification", "progress"):
            if paused:
                return Admission(accepted=False, reason="playback is paused")
            blockers = ("important", "message", "text") + (("progress",) if prio == "notification" else ())
            blocker = next((u for u in everything if u.priority in blockers), None)
            if blocker is not None:
                return Admission(accepted=False, reason=f"{blocker.priority} {getattr(blocker, 'id', '')} is pending".strip())
        victims_speaking = [u for u in speaking if self._cancels(prio, u.priority, speaking=True)]
        victims_queued = [u for u in self._items if self._cancels(prio, u.priority, speaking=False)]
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


class Scheduler:
    """The queue, the engine's one running utterance, the tails still playing, pause, and
    the peers they belong to. The socket and the front ends use the same entry points:
    attach/detach a peer, and (through requests.Requests) submit, cancel, pause, resume.

    announce_ready() runs once the model is ready; stop_daemon(exit_code) begins shutdown.
    """

    def __init__(self, max_queue: int, telemetry: Telemetry, *, announce_ready: Callable[[], None],
                 stop_daemon: Callable[[int], None]):
        self.state = "loading"  # loading -> ready -> draining
        self.info: EngineInfo | None = None
        self.engine: Any = None  # engine.Engine, set by the server before the model loads
        self.player: Any = None  # playback.Player; None: no local playback (playback_reason says why)
        self.playback_reason = ""
        self.telemetry = telemetry
        self.queue = SpeechQueue(max_queue)
        self.peers = Peers(telemetry)
        self.paused = False
        self.pause_owner: Peer | None = None  # a pause is lifted when this client leaves
        self.ready_at = 0.0
        self.running: Utterance | None = None  # handed to the engine
        self._tails: list[Utterance] = []  # synthesized, last samples still playing
        self._ids = itertools.count(1)
        self._seq = itertools.count(1)
        self._idle: anyio.Event | None = None  # set when nothing runs or plays (the drain waits)
        self._announce_ready = announce_ready
        self._stop_daemon = stop_daemon

    # ------------------------------------------------------------------ peers

    def attach(self, peer: Peer) -> None:
        self.peers.add(peer)

    def detach(self, peer: Peer) -> None:
        """The peer went away: its streamed (or still open) utterances are cancelled, the
        others play on locally; a pause it owned is lifted."""
        if not self.peers.remove(peer):
            return
        if self.pause_owner is peer:
            self.pause_owner = None
            if self.paused:
                log.info("the client that paused playback left; resuming")
                self._set_paused(False)
        for utt in list(peer.utterances.values()):
            if utt.output == "stream" or (utt.text_stream and not utt.feed.ended) or peer.slow:
                self.finish(utt, "cancelled", "the client disconnected")
            else:
                utt.streams = False  # keep playing locally; nobody to stream to
        self._dispatch()

    def drop_slow(self, peer: Peer) -> None:
        """A client let its outbox limit of events pile up: cancel its utterances, queue a
        `slow_client` error after what it has not read, and close it once that is read or
        the grace time passes, so it cannot hold the daemon's memory."""
        if peer.closing or peer.dropping:
            return
        log.warning("client %d stopped reading (%d bytes queued); disconnecting it", peer.number, peer.outbox_bytes)
        for utt in list(peer.utterances.values()):
            self.finish(utt, "cancelled", f"{p.E_SLOW_CLIENT}: the client stopped reading")
        self.peers.drop(peer, p.E_SLOW_CLIENT, f"the client stopped reading ({peer.outbox_bytes} bytes of events unread)")

    # ------------------------------------------------------------------ the model

    def languages(self) -> list[str]:
        """The loaded model's language codes (empty while loading or when it has none)."""
        return list((self.info.describe if self.info else {}).get("languages") or [])

    def list_voices(self, answer: Callable[[Any, BaseException | None], None]) -> bool:
        """Ask the engine for the voice names (it answers between chunks); answer(names,
        error) then runs on the loop. False while the model loads."""
        if self.state == "loading" or self.engine is None:
            return False
        self.engine.call(lambda model: [str(v) for v in model.list_voices()], answer)
        return True

    # ------------------------------------------------------------------ utterances

    def new_id(self) -> str:
        return f"u{next(self._ids)}"

    def submit(self, utt: Utterance, ref: str | None) -> str | None:
        """Queue a new utterance under the priority rules and answer `accepted`; the
        utterances it preempts get their `done`. Returns why it was refused (the queue is
        full), or None."""
        peer = utt.peer
        utt.seq = next(self._seq)
        admission = self.queue.admit(utt, self._speaking(), paused=self.paused)
        if admission.busy:
            return admission.reason
        peer.utterances[utt.id] = utt
        self.telemetry.count("accepted")
        position = 0
        if admission.accepted:
            running_stays = self.running is not None and self.running not in admission.preempted
            position = self.queue.position(utt) + int(running_stays)
        peer.post(p.Accepted(id=utt.id, position=position, priority=utt.priority, output=utt.output, ref=ref))
        log.debug("accepted %s/%s (%s, %s)", peer.number, utt.id, utt.priority, utt.output)
        if not admission.accepted:
            self.finish(utt, "preempted", f"discarded on arrival: {admission.reason}")
        for victim in admission.preempted:
            self.finish(victim, "preempted", f"preempted by {utt.priority} message {utt.id!r}")
        self._dispatch()
        return None

    def cancellable(self) -> list[Utterance]:
        """Every live utterance of every client: running, playing, queued."""
        return [u for u in [*self._speaking(), *self.queue] if not u.finished]

    def cancel(self, targets: Iterable[Utterance], detail: str) -> None:
        for utt in targets:
            self.finish(utt, "cancelled", detail)
        self._dispatch()

    def pause(self, owner: Peer | None) -> None:
        """Hold playback; with an owner, until that client resumes or leaves."""
        self.pause_owner = owner
        self._set_paused(True)

    def resume(self) -> None:
        self.pause_owner = None
        self._set_paused(False)

    def _set_paused(self, paused: bool) -> None:
        self.paused = paused
        if self.player is not None:
            self.player.pause() if paused else self.player.resume()
        log.info("playback %s", "paused" if paused else "resumed")

    def _speaking(self) -> list[Utterance]:
        out = [u for u in self._tails if not u.finished]
        if self.running is not None and not self.running.finished:
            out.insert(0, self.running)
        return out

    def _dispatch(self) -> None:
        """Hand the next utterance to the engine if it is free."""
        if self.state != "ready" or self.running is not None or self.engine is None:
            return
        utt = self.queue.pop()
        if utt is None:
            return
        self.running = utt
        utt.started_at = time.monotonic()
        self.engine.submit(utt)

    def finish(self, utt: Utterance, reason: str, detail: str | None = None) -> None:
        """Send the utterance's one `done` and forget it (idempotent)."""
        if utt.finished:
            return
        utt.finished = True
        if reason != "completed":
            utt.cancel()
            if utt.plays and self.player is not None:
                self.player.flush(utt)
        self.queue.remove(utt)
        if utt in self._tails:
            self._tails.remove(utt)
        peer = utt.peer
        if peer.utterances.get(utt.id) is utt:
            del peer.utterances[utt.id]
        done = utt.done_event(reason, detail)
        peer.post(done)
        self.telemetry.record(reason, done)
        log.debug("done %s/%s: %s%s (%.0f ms)", peer.number, utt.id, reason, f" ({detail})" if detail else "",
                  (time.monotonic() - utt.received_at) * 1e3)
        self._check_idle()

    # ------------------------------------------------------------------ engine and player callbacks (loop thread)

    def on_loaded(self, info: EngineInfo) -> None:
        self.info = info
        if self.state != "loading":
            return
        self.state = "ready"
        self.ready_at = time.monotonic()
        line = model_line(info)
        log.info("ready: %s (load %.1f s, warm-up %.1f s)", line, info.load_s, info.warmup_s)
        if info.sample_rate != SAMPLE_RATE and self.player is not None:
            log.warning("model rate %d Hz differs from the player's %d Hz; playback disabled", info.sample_rate, SAMPLE_RATE)
            self.player.close()
            self.player = None
            self.playback_reason = "local playback is unavailable: unexpected model sample rate"
        self.peers.broadcast(p.Ready(sample_rate=info.sample_rate, model=line))
        self._announce_ready()
        self._dispatch()

    def on_load_failed(self, error: BaseException) -> None:
        message = f"the model could not be loaded: {type(error).__name__}: {error}"
        log.error("%s", message)
        self.peers.broadcast(p.Error(code=p.E_LOAD_FAILED, message=message))
        self._stop_daemon(1)

    def on_started(self, utt: Utterance, language: str | None = None) -> None:
        if not utt.finished:
            utt.peer.post(p.Started(id=utt.id, wait_ms=round((utt.started_at - utt.received_at) * 1000.0, 1),
                                    voice=utt.voice, language=language))

    def on_audio(self, utt: Utterance, seq: int, pcm: bytes, start_s: float) -> None:
        if utt.finished or not utt.streams:
            return
        peer = utt.peer
        peer.post(p.Audio(id=utt.id, seq=seq, pcm=pcm, format=utt.audio_format, sample_rate=self.info.sample_rate,
                          start_s=round(start_s, 4)))
        if peer.slow:
            self.drop_slow(peer)

    def on_chunk(self, utt: Utterance, info: dict) -> None:
        if utt.first_audio_at is None:
            utt.first_audio_at = time.monotonic()
        utt.chunks = info["chunk"] + 1
        utt.tokens = info["tokens"]
        utt.audio_s = info["audio_s"]
        if utt.finished:
            return
        utt.peer.post(p.Progress(
            id=utt.id, chunk=info["chunk"], segment=info["segment"], tokens=info["tokens"], audio_s=round(info["audio_s"], 3),
            t3_ms=info.get("t3_ms"), s3gen_ms=info.get("s3gen_ms"),
            text_start=info.get("text_start"), text_end=info.get("text_end"), text=info.get("text"),
        ))  # fmt: skip

    def on_generated(self, utt: Utterance, outcome: str, stats: dict, error: tuple[str, str] | None) -> None:
        if self.running is utt:
            self.running = None
        utt.stats = {**stats, "underruns": utt.stats.get("underruns", 0)}
        if outcome == "completed" and not utt.finished:
            if utt.plays and stats.get("played") and not utt.played:
                self._tails.append(utt)  # done once its last sample is heard (on_played)
            else:
                self.finish(utt, "completed")
        elif outcome == "failed" and not utt.finished:
            code, message = error or (p.E_SYNTHESIS, "synthesis failed")
            self.peers.send_error(utt.peer, p.Error(code=code, message=message, request="speak", id=utt.id))
            self.finish(utt, "failed", message)
        else:
            self.finish(utt, "cancelled")
        self._dispatch()
        self._check_idle()

    def on_played(self, utt: Utterance, underruns: int) -> None:
        utt.played = True
        utt.stats["underruns"] = underruns
        self.telemetry.add_underruns(underruns)
        if utt in self._tails:
            self.finish(utt, "completed")

    # ------------------------------------------------------------------ drain

    def begin_drain(self) -> None:
        """Take no more speech: cancel what waits; a running text stream speaks what has
        arrived and ends."""
        self.state = "draining"
        log.info("draining")
        self.peers.broadcast(p.ShuttingDown())
        for utt in self.queue.remove_all():
            self.finish(utt, "cancelled", "the daemon is shutting down")
        if self.running is not None and self.running.text_stream:
            self.running.feed.end()  # speak what has arrived, then stop

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until nothing is synthesized or playing; False if the timeout passed."""
        self._idle = anyio.Event()
        self._check_idle()
        with anyio.move_on_after(timeout_s):
            await self._idle.wait()
        return self._idle.is_set()

    def cancel_active(self, detail: str) -> None:
        for utt in self._speaking():
            self.finish(utt, "cancelled", detail)

    def _check_idle(self) -> None:
        if self._idle is not None and self.running is None and not self._tails:
            self._idle.set()
