"""The requests a client may send (docs/protocol.md, "Requests"), each checked against the
daemon's state, turned into scheduler calls and answered. Socket connections
(connection.py) and the in-process front ends (frontend.py) call the same `handle()`, with
requests already decoded and validated."""

from __future__ import annotations

import logging
from typing import Any, Callable

from nightingale import __version__
from nightingale import protocol as p

from .peers import Peer
from .scheduler import Scheduler
from .utterance import Utterance

log = logging.getLogger(__name__)


class Requests:
    """One per daemon. shutdown() begins the daemon's drain (the `shutdown` request)."""

    def __init__(self, scheduler: Scheduler, shutdown: Callable[[], None]):
        self._scheduler = scheduler
        self._peers = scheduler.peers
        self._shutdown = shutdown
        self._handlers: dict[str, Callable[[Peer, Any], None]] = {
            "speak": self.speak,
            "speak_text": self.speak_text,
            "speak_end": self.speak_end,
            "cancel": self.cancel,
            "pause": self.pause,
            "resume": self.resume,
            "status": self.status,
            "voices": self.voices,
            "ping": self.ping,
            "shutdown": self.shutdown,
        }

    def hello(self) -> p.Hello:
        """The greeting a new socket client gets first."""
        s = self._scheduler
        return p.Hello(
            server=f"nightingale {__version__}",
            state=s.state,
            sample_rate=s.info.sample_rate if s.info else None,
            playback=s.player is not None,
            languages=s.languages(),
        )

    def handle(self, peer: Peer, msg: p.Request) -> None:
        """Perform one request for a peer; a bug in a handler is answered as an internal error."""
        try:
            self._handlers[msg.TYPE](peer, msg)
        except Exception as err:
            log.exception("client %s: %s failed", peer.number, msg.TYPE)
            self._peers.send_error(peer, p.Error(code=p.E_INTERNAL, message=f"internal error: {err}", request=msg.TYPE, ref=msg.ref))

    # ------------------------------------------------------------------ speech

    def speak(self, peer: Peer, msg: p.Speak) -> None:
        s = self._scheduler

        def error(code: str, text: str) -> None:
            self._peers.send_error(peer, p.Error(code=code, message=text, request="speak", id=msg.id, ref=msg.ref))

        if s.state == "loading":
            peer.post(p.Loading(request="speak", id=msg.id, ref=msg.ref))
            return
        if s.state != "ready":
            return error(p.E_SHUTTING_DOWN, "the daemon is shutting down")
        if msg.output in ("play", "both") and s.player is None:
            return error(p.E_NO_PLAYBACK, f"{s.playback_reason}; ask for output 'stream' instead")
        uid = msg.id if msg.id is not None else s.new_id()
        languages = s.languages()
        if msg.language is not None and languages and msg.language.lower() not in languages:
            return error(p.E_UNSUPPORTED_LANGUAGE, f"unsupported language {msg.language!r}; supported: {', '.join(languages)}")
        if uid in peer.utterances:
            return error(p.E_DUPLICATE_ID, f"utterance id {uid!r} is still in use on this connection")
        utt = Utterance(
            id=uid,
            peer=peer,
            priority=msg.priority,
            output=msg.output,
            voice=msg.voice,
            options=dict(msg.options),
            language=msg.language.lower() if msg.language else None,
            audio_format=msg.audio_format,
            text_stream=msg.stream,
        )
        if not msg.stream:
            utt.feed.push(msg.text or "")
            utt.feed.end()
        refused = s.submit(utt, msg.ref)
        if refused is not None:
            error(p.E_BUSY, f"busy: {refused}; try again later")

    def _live(self, peer: Peer, uid: str, request: str, ref: str | None) -> Utterance | None:
        utt = peer.utterances.get(uid)
        if utt is None:
            self._peers.send_error(
                peer, p.Error(code=p.E_UNKNOWN_ID, message=f"no live utterance {uid!r} on this connection", request=request, id=uid, ref=ref)
            )
        return utt

    def speak_text(self, peer: Peer, msg: p.SpeakText) -> None:
        utt = self._live(peer, msg.id, "speak_text", msg.ref)
        if utt is None:
            return
        if not utt.text_stream or utt.feed.ended:
            self._peers.send_error(
                peer, p.Error(code=p.E_UNKNOWN_ID, message=f"utterance {msg.id!r} has no open text stream", request="speak_text", id=msg.id, ref=msg.ref)
            )
            return
        if utt.feed.total_bytes + len(msg.text.encode("utf-8")) > p.MAX_STREAM_TEXT_BYTES:
            self._peers.send_error(
                peer,
                p.Error(code=p.E_TEXT_TOO_LONG, message=f"a text stream may carry at most {p.MAX_STREAM_TEXT_BYTES} bytes", request="speak_text", id=msg.id, ref=msg.ref),
            )
            self._scheduler.finish(utt, "failed", "text stream too long")
            return
        utt.feed.push(msg.text)

    def speak_end(self, peer: Peer, msg: p.SpeakEnd) -> None:
        utt = self._live(peer, msg.id, "speak_end", msg.ref)
        if utt is not None:
            utt.feed.end()

    def cancel(self, peer: Peer, msg: p.Cancel) -> None:
        if msg.all:
            targets = self._scheduler.cancellable()
        else:
            utt = self._live(peer, msg.id, "cancel", msg.ref)
            if utt is None:
                return
            targets = [utt]
        peer.post(p.Cancelled(ids=[u.id for u in targets], ref=msg.ref))
        self._scheduler.cancel(targets, "cancel request")

    # ------------------------------------------------------------------ playback

    def pause(self, peer: Peer, msg: p.Pause) -> None:
        # A pause lasts while its client stays connected, unless it asks to keep it.
        self._scheduler.pause(owner=None if msg.keep else peer)
        peer.post(p.Paused(ref=msg.ref))

    def resume(self, peer: Peer, msg: p.Resume) -> None:
        self._scheduler.resume()
        peer.post(p.Resumed(ref=msg.ref))

    # ------------------------------------------------------------------ the daemon

    def status(self, peer: Peer, msg: p.GetStatus) -> None:
        peer.post(self._scheduler.telemetry.status(self._scheduler, ref=msg.ref))

    def voices(self, peer: Peer, msg: p.ListVoices) -> None:
        s = self._scheduler

        def answer(names: Any, error: BaseException | None) -> None:  # runs on the loop
            if error is not None:
                self._peers.send_error(peer, p.Error(code=p.E_INTERNAL, message=f"listing voices failed: {error}", request="voices", ref=msg.ref))
            else:
                family = str((s.info.describe if s.info else {}).get("family", ""))
                peer.post(p.Voices(voices=names, family=family, ref=msg.ref))

        if not s.list_voices(answer):
            peer.post(p.Loading(request="voices", ref=msg.ref))

    def ping(self, peer: Peer, msg: p.Ping) -> None:
        peer.post(p.Pong(state=self._scheduler.state, ref=msg.ref))

    def shutdown(self, peer: Peer, msg: p.Shutdown) -> None:
        log.info("shutdown requested by client %d", peer.number)
        peer.post(p.ShuttingDown(ref=msg.ref))
        self._shutdown()
