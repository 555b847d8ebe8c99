"""The one interface through which in-process front ends (HTTP, Wyoming) use the daemon.

A front end turns its protocol's request into a `p.Speak` and calls `Frontdoor.submit`,
which returns a `SpeechHandle`: an async iterator over the utterance's events (`accepted`,
`started`, `progress`, `audio`, then exactly one `done`; or one `error`/`loading`), with
`feed`/`end` for text streams and `cancel`. Behind it each handle owns a `LocalPeer`,
which the scheduler treats exactly like a socket connection (it only ever calls the
scheduler.Peer methods), so queue, priorities, cancel, the slow-client rule and status
telemetry are shared with `nsay` and never know which front end is talking. Nothing here
touches the socket code: a front end sees the scheduler and the request handlers only.

Everything here runs on the daemon's event loop.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
from nightingale import protocol as p

from .config import MAX_OUTBOX_BYTES, SAMPLE_RATE
from .requests import Requests
from .peers import Peer
from .scheduler import Scheduler
from .telemetry import model_line

_numbers = itertools.count(100001)  # logged as "client N"; apart from the socket clients' 1, 2, ...
_EVENT_BYTES = 256  # what an event other than audio counts against the outbox limit


def _size(event: p.Event) -> int:
    return len(event.pcm) if isinstance(event, p.Audio) else _EVENT_BYTES


class LocalPeer(Peer):
    """An in-process client: events go to a memory stream that the front end's
    SpeechHandle reads (a drop ends that stream after its error). It has no frames in
    flight, and it is active whenever it posts (its front end times out its own
    transport); the idle reaper reads both."""

    def __init__(self, label: str):
        super().__init__(next(_numbers), MAX_OUTBOX_BYTES)
        self.label = label

    @property
    def closing(self) -> bool:
        return False  # it ends through SpeechHandle.close(), which detaches it

    def post(self, event: p.Event, force: bool = False) -> bool:
        if not self._enqueue(event, _size(event), force):
            return False
        self.last_active = time.monotonic()
        return True

    async def next_event(self) -> p.Event | None:
        try:
            event = await self._recv.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            return None
        self.outbox_bytes -= _size(event)
        return event


class SpeechHandle:
    """One submitted utterance. Iterate it for events; the iteration ends after `done`,
    after an `error` or `loading` that refused the request, or when the daemon drains.
    `cancel()` (or leaving `async with`) withdraws the request like a client disconnect."""

    def __init__(self, door: Frontdoor, peer: LocalPeer, uid: str):
        self._door = door
        self._peer = peer
        self.id = uid
        self.done: p.Done | None = None
        self.error: p.Error | None = None
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[p.Event]:
        while not self.closed:
            event = await self._peer.next_event()
            if event is None:
                if self.done is None and self.error is None:
                    code, text = (
                        (p.E_SLOW_CLIENT, "the client stopped reading")
                        if self._peer.slow
                        else (p.E_SHUTTING_DOWN, "the daemon is shutting down")
                    )
                    self.error = p.Error(code=code, message=text, request="speak", id=self.id)
                    yield self.error
                break
            if getattr(event, "id", self.id) != self.id:
                continue
            if isinstance(event, p.Error):
                self.error = event
                yield event
                if self._daemon_forgot():
                    break  # refused on arrival: no `done` follows
                continue
            if isinstance(event, p.Loading):
                yield event
                break
            if isinstance(event, (p.Ready, p.ShuttingDown, p.Hello)):
                continue
            yield event
            if isinstance(event, p.Done):
                self.done = event
                break
        self.close()

    def _daemon_forgot(self) -> bool:
        return self.id not in self._peer.utterances

    def feed(self, text: str) -> p.Error | None:
        """Append text to a text stream (Speak with stream=True); the error, if refused."""
        return self._request(p.SpeakText(id=self.id, text=text))

    def end(self) -> p.Error | None:
        """Close the text stream: what has arrived is spoken, then `done`."""
        return self._request(p.SpeakEnd(id=self.id))

    def _request(self, msg: p.Request) -> p.Error | None:
        try:
            msg.validate()
        except p.ProtocolError as err:
            return err.to_event()
        self._door.requests.handle(self._peer, msg)
        return None

    def cancel(self) -> None:
        self.close()

    def close(self) -> None:
        """Detach from the daemon; an unfinished utterance is cancelled (idempotent)."""
        if self.closed:
            return
        self.closed = True
        self._door.scheduler.detach(self._peer)
        self._peer.close_outbox()

    async def __aenter__(self) -> SpeechHandle:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


def network_voice(name: str | None) -> str | None:
    """A voice asked for over the network: a stored voice's name or "default" (None), never
    a file path (the socket protocol accepts a conds.pt path from local users only)."""
    if name is None or name == "default":
        return None
    if "/" in name or "\\" in name or name.endswith(".pt") or name.startswith("."):
        raise ValueError(f"unknown voice {name!r}: over HTTP and Wyoming a voice is a stored voice's name, not a path")
    return name


class Frontdoor:
    """What a front end may ask of the daemon: submit speech, list voices, read state.
    It plugs into the scheduler beside the socket listener, with the same request handlers."""

    def __init__(self, scheduler: Scheduler, requests: Requests):
        self.scheduler = scheduler
        self.requests = requests

    @property
    def state(self) -> str:
        return self.scheduler.state

    @property
    def sample_rate(self) -> int:
        info = self.scheduler.info
        return info.sample_rate if info is not None else SAMPLE_RATE

    def languages(self) -> list[str]:
        """The loaded model's language codes ([] while loading)."""
        return self.scheduler.languages()

    def model_line(self) -> str:
        return model_line(self.scheduler.info)

    def submit(self, speak: p.Speak, label: str = "local") -> SpeechHandle:
        """Queue `speak` (output is forced to "stream") and return its handle. Raises
        p.ProtocolError, with the daemon's own message, if the request is invalid."""
        speak.output = "stream"
        if speak.id is None:
            speak.id = "s"
        speak.validate()
        peer = LocalPeer(label)
        self.scheduler.attach(peer)
        self.requests.handle(peer, speak)
        return SpeechHandle(self, peer, speak.id)

    async def voices(self) -> list[str]:
        """Voice names (the model's default first); [] while loading. The engine answers
        between chunks, so this never waits for a whole utterance."""
        done = anyio.Event()
        result: dict[str, Any] = {}

        def answer(value: Any, error: BaseException | None) -> None:
            result["value"], result["error"] = value, error
            done.set()

        if not self.scheduler.list_voices(answer):
            return []
        await done.wait()
        if result["error"] is not None:
            raise RuntimeError(f"listing voices failed: {result['error']}")
        return list(result["value"])


def build_frontends(http: str | None, http_token: str | None, wyoming: str | None, options_json: str | None = None) -> list:
    """The front ends `nightingale serve --http/--wyoming` asked for. Raises ValueError for a
    bad address, a missing token or bad --frontend-options (checked as a speak's options),
    ImportError when the `server` extra is not installed."""
    import json
    import os

    options: dict = {}
    if options_json:
        try:
            options = json.loads(options_json)
        except ValueError as err:
            raise ValueError(f"--frontend-options is not JSON: {err}") from None
        if not isinstance(options, dict):
            raise ValueError("--frontend-options must be a JSON object")
        try:
            p.Speak(text="", options=options).validate()
        except p.ProtocolError as err:
            raise ValueError(f"--frontend-options: {err.message}") from None
    out: list = []
    if http:
        try:
            from .openai_api import TOKEN_ENV, HttpFrontend, parse_address
        except ImportError as err:
            raise ImportError(f"--http needs the server extra: pip install 'nightingale-tts[server]' ({err})") from None
        host, port = parse_address(http)
        out.append(HttpFrontend(host, port, token=http_token or os.environ.get(TOKEN_ENV) or None, options=options))
    if wyoming:
        try:
            from .wyoming_server import WyomingFrontend, parse_uri
        except ImportError as err:
            raise ImportError(f"--wyoming needs the server extra: pip install 'nightingale-tts[server]' ({err})") from None
        host, port = parse_uri(wyoming)
        out.append(WyomingFrontend(host, port, options=options))
    return out
