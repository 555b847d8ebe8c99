"""Wyoming (Home Assistant, Rhasspy) text-to-speech, inside `nightingale serve --wyoming tcp://HOST:PORT`.

Events use the `wyoming` package's classes. `describe` -> `info` (the model, its voices,
its languages, streaming support); `synthesize` (one shot) and the streaming
`synthesize-start` / `synthesize-chunk`... / `synthesize-stop` are answered with
`audio-start`, `audio-chunk`s as the daemon produces them, `audio-stop` (and, for a
stream, `synthesize-stopped`). Text of a stream is spoken sentence by sentence while it
arrives, so Home Assistant starts talking before its language model has finished.

Requests go through frontend.Frontdoor like any other client (shared queue, priorities,
cancel on disconnect, status). The package's AsyncServer is not used because it installs
its own SIGTERM handler, which belongs to the daemon; its event reader is not used
because it trusts the peer's lengths (an event may announce any size).
"""

from __future__ import annotations

import asyncio
import json
import logging
from urllib.parse import urlparse

import anyio
import anyio.abc
from nightingale import protocol as p
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event, async_write_event
from wyoming.info import Attribution, Describe, Info, TtsProgram, TtsVoice
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeStopped

from nightingale import __version__

from .frontend import Frontdoor, SpeechHandle, network_voice

log = logging.getLogger(__name__)

MAX_LINE_BYTES = 64 << 10  # one event's JSON header line
MAX_DATA_BYTES = 1 << 20  # an event's data or payload
LANGUAGES = ["en"]
ATTRIBUTION = Attribution(name="Resemble AI (Chatterbox); Nightingale", url="https://github.com/resemble-ai/chatterbox")


def parse_uri(uri: str) -> tuple[str, int]:
    """'tcp://HOST:PORT' -> (host, port)."""
    parsed = urlparse(uri)
    if parsed.scheme != "tcp" or parsed.hostname is None or parsed.port is None:
        raise ValueError(f"bad Wyoming address {uri!r}: expected tcp://HOST:PORT")
    return parsed.hostname, parsed.port


class BadEvent(Exception):
    pass


async def read_event(reader: asyncio.StreamReader) -> Event | None:
    """The next event, None at end of stream; BadEvent for one that breaks the limits."""
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError:
        return None
    except asyncio.LimitOverrunError:
        raise BadEvent(f"an event header is longer than {MAX_LINE_BYTES} bytes") from None
    try:
        header = json.loads(line)
    except ValueError as err:
        raise BadEvent(f"an event header is not JSON: {err}") from None
    if not isinstance(header, dict) or not isinstance(header.get("type"), str):
        raise BadEvent("an event header must be a JSON object with a string 'type'")
    data = header.get("data") or {}
    lengths = [header.get("data_length") or 0, header.get("payload_length") or 0]
    if not all(isinstance(n, int) and 0 <= n <= MAX_DATA_BYTES for n in lengths) or not isinstance(data, dict):
        raise BadEvent(f"an event's data and payload must be at most {MAX_DATA_BYTES} bytes")
    try:
        if lengths[0]:
            extra = json.loads(await reader.readexactly(lengths[0]))
            if not isinstance(extra, dict):
                raise BadEvent("an event's data must be a JSON object")
            data.update(extra)
        payload = await reader.readexactly(lengths[1]) if lengths[1] else None
    except asyncio.IncompleteReadError:
        return None
    except ValueError as err:
        raise BadEvent(f"an event's data is not JSON: {err}") from None
    return Event(type=header["type"], data=data, payload=payload)


class WyomingFrontend:
    """A TCP listener; one `_Connection` per client."""

    def __init__(self, host: str, port: int, options: dict | None = None):
        self.host = host
        self.port = port
        self.options = dict(options or {})
        self.bound_port: int | None = None

    async def serve(self, door: Frontdoor, *, task_status: anyio.abc.TaskStatus = anyio.TASK_STATUS_IGNORED) -> None:
        connections: set[asyncio.Task] = set()

        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            connections.add(task)
            try:
                await _Connection(door, reader, writer, self.options).run()
            finally:
                connections.discard(task)

        server = await asyncio.start_server(accept, self.host, self.port, limit=MAX_LINE_BYTES)
        try:
            self.bound_port = server.sockets[0].getsockname()[1]
            log.info("Wyoming text-to-speech on tcp://%s:%d", self.host, self.bound_port)
            task_status.started()
            await anyio.sleep_forever()
        finally:
            server.close()
            for task in list(connections):
                task.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.gather(*connections, return_exceptions=True)


class _Connection:
    """One Wyoming client. The reader takes events while a speaker task sends the audio of
    the current request, so chunks of a stream can arrive while earlier ones are spoken."""

    def __init__(self, door: Frontdoor, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, options: dict):
        self.door = door
        self.reader = reader
        self.writer = writer
        self.options = options
        self.handle: SpeechHandle | None = None
        self.streaming = False  # between synthesize-start and synthesize-stop
        self.speaker: asyncio.Task | None = None
        self.write_lock = asyncio.Lock()

    async def run(self) -> None:
        try:
            while True:
                try:
                    event = await read_event(self.reader)
                except BadEvent as err:
                    await self.send(Error(text=str(err), code="bad_event").event())
                    return
                if event is None:
                    return
                await self.on_event(event)
        except (ConnectionError, OSError):
            pass
        finally:
            if self.handle is not None:
                self.handle.close()  # the client left: its request is cancelled
            if self.speaker is not None:
                self.speaker.cancel()
                await asyncio.gather(self.speaker, return_exceptions=True)
            self.writer.close()

    async def send(self, event: Event) -> None:
        async with self.write_lock:
            await async_write_event(event, self.writer)

    async def on_event(self, event: Event) -> None:
        try:
            if Describe.is_type(event.type):
                await self.send((await self.info()).event())
            elif SynthesizeStart.is_type(event.type):
                start = SynthesizeStart.from_event(event)
                await self.begin(None, start.voice.name if start.voice else None, start.voice.language if start.voice else None)
            elif SynthesizeChunk.is_type(event.type):
                chunk = SynthesizeChunk.from_event(event)
                if not self.streaming or self.handle is None:
                    await self.send(Error(text="synthesize-chunk without synthesize-start", code="bad_event").event())
                elif (err := self.handle.feed(str(chunk.text))) is not None:
                    await self.send(Error(text=err.message, code=err.code).event())
            elif SynthesizeStop.is_type(event.type):
                if self.streaming and self.handle is not None:
                    self.streaming = False
                    self.handle.end()
            elif Synthesize.is_type(event.type):
                if self.streaming:
                    return  # the full text a streaming client also sends for older servers
                synth = Synthesize.from_event(event)
                await self.begin(str(synth.text), synth.voice.name if synth.voice else None,
                                 synth.voice.language if synth.voice else None)
            else:
                log.debug("wyoming: ignoring %s", event.type)
        except (KeyError, TypeError, AttributeError, ValueError) as err:
            await self.send(Error(text=f"bad {event.type} event: {err}", code="bad_event").event())

    async def info(self) -> Info:
        voices = await self.door.voices()
        description = self.door.model_line() or "loading"
        program = TtsProgram(
            name="nightingale",
            attribution=ATTRIBUTION,
            installed=True,
            description=f"Nightingale streaming text-to-speech ({description})",
            version=__version__,
            voices=[
                TtsVoice(
                    name=v, attribution=ATTRIBUTION, installed=True, description=f"Chatterbox voice {v}", version=None,
                    languages=self.door.languages() or LANGUAGES
                )
                for v in voices
            ],
            supports_synthesize_streaming=True,
        )
        return Info(tts=[program])

    async def begin(self, text: str | None, voice: str | None, language: str | None = None) -> None:
        """Start one request (text None: a stream); waits for the previous one to finish
        (a stream left open by a new request is closed with what it has)."""
        if self.streaming and self.handle is not None:
            self.streaming = False
            self.handle.end()
        if self.speaker is not None:
            await asyncio.gather(self.speaker, return_exceptions=True)
        if self.door.state == "loading":
            await self.send(Error(text="the model is loading; try again shortly", code="loading").event())
            return
        if text is not None and not text.strip():
            await self.send(Error(text="synthesize needs non-empty text", code=p.E_BAD_FIELD).event())
            return
        try:
            voice = network_voice(voice)
        except ValueError as err:
            await self.send(Error(text=str(err), code=p.E_UNKNOWN_VOICE).event())
            return
        speak = p.Speak(
            id="wyoming",
            text=text,
            stream=text is None,
            voice=voice,
            language=language.split("_")[0].split("-")[0].lower() if language else None,  # "fr_FR" -> "fr"
            audio_format="s16le",
            options=dict(self.options),
        )
        try:
            self.handle = self.door.submit(speak, label="wyoming")
        except p.ProtocolError as err:
            await self.send(Error(text=err.message, code=err.code).event())
            return
        self.streaming = text is None
        self.speaker = asyncio.create_task(self.speak(self.handle, stream=text is None))

    async def speak(self, handle: SpeechHandle, stream: bool) -> None:
        rate = self.door.sample_rate
        started = False
        async with handle:
            async for event in handle:
                if isinstance(event, p.Audio):
                    if not started:
                        started = True
                        await self.send(AudioStart(rate=rate, width=2, channels=1, timestamp=0).event())
                    chunk = AudioChunk(rate=rate, width=2, channels=1, audio=event.pcm, timestamp=int(event.start_s * 1000))
                    await self.send(chunk.event())
                elif isinstance(event, p.Error):
                    await self.send(Error(text=event.message, code=event.code).event())
                elif isinstance(event, p.Loading):
                    await self.send(Error(text="the model is loading; try again shortly", code="loading").event())
                elif isinstance(event, p.Done):
                    if event.reason == "completed" and not started:
                        await self.send(AudioStart(rate=rate, width=2, channels=1, timestamp=0).event())
                        started = True
                    elif event.reason not in ("completed", "failed"):
                        await self.send(Error(text=f"synthesis {event.reason}: {event.detail or ''}".strip(), code=event.reason).event())
        if started:
            await self.send(AudioStop().event())
        if stream:
            self.streaming = False
            await self.send(SynthesizeStopped().event())
        if self.handle is handle:
            self.handle = None
