"""Nightingale protocol v1: framing, typed messages and the socket location.

One module, shared by the daemon and every client (`nsay`, tests, bench), so the wire
format is defined exactly once. It imports neither mlx nor numpy: clients stay light.

Wire format (docs/protocol.md is the full description):

    frame = length (4 bytes, unsigned big-endian) + body (`length` bytes)
    body  = one msgpack map: {"v": 1, "type": "<name>", ...fields}

Strings are msgpack str (UTF-8); PCM audio is msgpack bin. A frame longer than
MAX_FRAME_BYTES is refused without being buffered: the reader skips its body and reports
it, so one bad frame never desynchronises the stream. Every message is a dataclass below;
`decode_request` / `decode_event` check the version, the type and every field's type, and
raise ProtocolError with a stable `code` that the daemon sends back in an `error` event.
"""

from __future__ import annotations

import math
import os
import re
import socket
import struct
import sys
import threading
import time
import typing
import warnings
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Iterator, Union

import msgpack

PROTOCOL_VERSION = 1

HEADER = struct.Struct(">I")  # body length, unsigned 32-bit big-endian
MAX_FRAME_BYTES = 1 << 20  # 1 MiB per frame body, both directions
MAX_TEXT_BYTES = 64 * 1024  # UTF-8 bytes of text in one speak or speak_text frame
MAX_STREAM_TEXT_BYTES = 1 << 20  # total UTF-8 bytes one streamed utterance may receive
MAX_ID_CHARS = 128  # client-chosen utterance ids and refs
MAX_AUDIO_FRAME_SAMPLES = 48000  # the daemon splits audio events to at most 2 s at 24 kHz

SOCKET_ENV = "NIGHTINGALE_SOCKET"
SOCKET_NAME = "nightingale.sock"
APP_NAME = "nightingale"
# sockaddr_un.sun_path holds 104 bytes on macOS and 108 on Linux, including the NUL.
MAX_SOCKET_PATH_BYTES = 103 if sys.platform == "darwin" else 107

# speech-dispatcher's priorities, most urgent first (notification and progress share a rank).
PRIORITIES = ("important", "message", "text", "notification", "progress")
DEFAULT_PRIORITY = "message"
OUTPUTS = ("play", "stream", "both")
AUDIO_FORMATS = ("f32le", "s16le")
STATES = ("loading", "ready", "draining")
DONE_REASONS = ("completed", "cancelled", "preempted", "failed")

# speak.language: an ISO 639-1 code (two or three letters, an optional region/script part)
LANGUAGE_CODE = re.compile(r"[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{1,8})?")

# Sampling options a speak request may carry, with their wire types; the daemon passes the
# ones present to the model's stream() as keyword arguments.
SPEAK_OPTIONS: dict[str, type] = {
    "seed": int,
    "temperature": float,
    "cfg_weight": float,
    "exaggeration": float,
    "top_p": float,
    "min_p": float,
    "repetition_penalty": float,
    "max_new_tokens": int,
    "n_timesteps": int,  # CFM steps of S3Gen's flow (fewer: faster, rougher)
    "first_chunk_timesteps": int,  # CFM steps of the utterance's first chunk only
    "chunk_schedule": str,  # "first,growth,max" speech tokens per audio chunk
}

# Inclusive bounds of each option: wide enough for any real use, narrow enough that no
# request can ask for hours of work. check_option() applies them; the daemon and every
# CLI that takes an option use it, so a value is refused the same way everywhere.
OPTION_RANGES: dict[str, tuple[float, float]] = {
    "seed": (0, 2**62 - 1),
    "temperature": (0.0, 5.0),
    "cfg_weight": (0.0, 5.0),
    "exaggeration": (0.0, 2.0),
    "top_p": (0.01, 1.0),
    "min_p": (0.0, 1.0),
    "repetition_penalty": (1.0, 5.0),
    "max_new_tokens": (1, 4096),  # T3's learned speech positions
    "n_timesteps": (1, 100),  # the model's default is 10
    "first_chunk_timesteps": (1, 100),  # the model's default is 4 (capped by n_timesteps)
}
CHUNK_TOKENS_RANGE = (4, 1000)  # first and max speech tokens per chunk
CHUNK_GROWTH_RANGE = (1.0, 10.0)


class OptionError(ValueError):
    """An option value out of type or range; the message is one line naming the field
    and what it accepts."""


def check_option(name: str, value: Any) -> Any:
    """Validate one speak option; returns it normalised (ints as float for float options,
    chunk_schedule as canonical "first,growth,max"). Raises OptionError."""
    want = SPEAK_OPTIONS.get(name)
    if want is None:
        raise OptionError(f"unknown option {name!r}; known: {', '.join(SPEAK_OPTIONS)}")
    if name == "chunk_schedule":
        return _check_chunk_schedule(value)
    low, high = OPTION_RANGES[name]
    if want is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise OptionError(f"option {name!r} must be an integer in {low}..{high}, got {value!r}")
    elif not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise OptionError(f"option {name!r} must be a finite number in {low:g}..{high:g}, got {value!r}")
    if not low <= value <= high:
        shown = f"{low}..{high}" if want is int else f"{low:g}..{high:g}"
        raise OptionError(f"option {name!r} must be in {shown}, got {value!r}")
    return float(value) if want is float else value


def _check_chunk_schedule(value: Any) -> str:
    lo, hi = CHUNK_TOKENS_RANGE
    glo, ghi = CHUNK_GROWTH_RANGE
    usage = f"option 'chunk_schedule' is first[,growth[,max]] with first and max in {lo}..{hi} tokens and growth in {glo:g}..{ghi:g}"
    if not isinstance(value, str) or len(value) > 64:
        raise OptionError(f"{usage}, got {value!r}")
    try:
        parts = [float(v) for v in value.split(",")]
    except ValueError:
        raise OptionError(f"{usage}, got {value!r}") from None
    if not 1 <= len(parts) <= 3 or not all(math.isfinite(v) for v in parts):
        raise OptionError(f"{usage}, got {value!r}")
    first = parts[0]
    growth = parts[1] if len(parts) > 1 else 2.0
    top = parts[2] if len(parts) > 2 else max(first, 48)
    if first != int(first) or top != int(top) or not lo <= first <= top <= hi or not glo <= growth <= ghi:
        raise OptionError(f"{usage} (max not below first), got {value!r}")
    return f"{int(first)},{growth:g},{int(top)}"

# Error codes (the `code` of an `error` event).
E_BAD_FRAME = "bad_frame"  # body is not exactly one msgpack map, or the frame was cut short
E_FRAME_TOO_LARGE = "frame_too_large"
E_BAD_UTF8 = "bad_utf8"
E_VERSION = "version"  # missing or unsupported "v"
E_UNKNOWN_TYPE = "unknown_type"
E_BAD_FIELD = "bad_field"  # missing required field, wrong type or invalid value
E_TEXT_TOO_LONG = "text_too_long"
E_BUSY = "busy"  # the queue is full
E_DUPLICATE_ID = "duplicate_id"
E_UNKNOWN_ID = "unknown_id"
E_UNKNOWN_VOICE = "unknown_voice"
E_UNSUPPORTED_LANGUAGE = "unsupported_language"  # the message lists the model's languages
E_NO_PLAYBACK = "no_playback"  # local playback asked for, but no audio device is usable
E_SHUTTING_DOWN = "shutting_down"
E_SYNTHESIS = "synthesis_failed"
E_SLOW_CLIENT = "slow_client"  # the client stopped reading streamed audio
E_IDLE = "idle_timeout"  # the client sent nothing (and had nothing live) for too long
E_LOAD_FAILED = "load_failed"
E_INTERNAL = "internal"
ERROR_CODES = (
    E_BAD_FRAME, E_FRAME_TOO_LARGE, E_BAD_UTF8, E_VERSION, E_UNKNOWN_TYPE, E_BAD_FIELD,
    E_TEXT_TOO_LONG, E_BUSY, E_DUPLICATE_ID, E_UNKNOWN_ID, E_UNKNOWN_VOICE, E_UNSUPPORTED_LANGUAGE, E_NO_PLAYBACK,
    E_SHUTTING_DOWN, E_SYNTHESIS, E_SLOW_CLIENT, E_LOAD_FAILED, E_INTERNAL, E_IDLE,
)  # fmt: skip


class ProtocolError(Exception):
    """A frame or message that breaks the protocol. `code` is one of ERROR_CODES;
    `request` and `id` name the offending request when they could be read."""

    def __init__(self, code: str, message: str, *, request: str | None = None, id: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.request = request
        self.id = id

    def to_event(self) -> "Error":
        return Error(code=self.code, message=self.message, request=self.request, id=self.id)


# ----------------------------------------------------------------------------- messages


@dataclass(kw_only=True)
class Message:
    """Base of every message. `ref` is an optional client-chosen tag that the daemon
    echoes in the reply (and in any error) so a client can match answers to requests."""

    TYPE: ClassVar[str] = ""
    ref: str | None = None

    def to_wire(self) -> dict[str, Any]:
        """The msgpack map for this message; None-valued fields are left out."""
        out: dict[str, Any] = {"v": PROTOCOL_VERSION, "type": self.TYPE}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = value
        return out

    def validate(self) -> None:
        """Check values beyond their types; raise ProtocolError(E_BAD_FIELD)."""
        _check_id(self, "ref", self.ref)


class Request(Message):
    """A message a client sends to the daemon."""


class Event(Message):
    """A message the daemon sends to a client."""


def _bad(msg: Message, text: str) -> ProtocolError:
    return ProtocolError(E_BAD_FIELD, text, request=msg.TYPE, id=getattr(msg, "id", None))


def _check_id(msg: Message, name: str, value: str | None) -> None:
    if value is not None and not (0 < len(value) <= MAX_ID_CHARS):
        raise _bad(msg, f"{msg.TYPE}.{name} must be 1 to {MAX_ID_CHARS} characters")


def _check_choice(msg: Message, name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise _bad(msg, f"{msg.TYPE}.{name} must be one of {', '.join(choices)} (got {value!r})")


def _check_text(msg: Message, text: str | None) -> None:
    if text is not None and len(text.encode("utf-8")) > MAX_TEXT_BYTES:
        raise ProtocolError(
            E_TEXT_TOO_LONG,
            f"{msg.TYPE}.text is longer than {MAX_TEXT_BYTES} bytes; send it as a text stream",
            request=msg.TYPE,
            id=getattr(msg, "id", None),
        )


# --- requests


@dataclass(kw_only=True)
class Speak(Request):
    """Speak `text`, or open a text stream (`stream=True`) fed by SpeakText and closed
    by SpeakEnd, so speech starts before the input ends.

    id: client-chosen utterance id (unique among this connection's live utterances);
    the daemon assigns one when it is missing. priority: one of PRIORITIES. output:
    "play" (local speakers), "stream" (audio events back to this client) or "both".
    audio_format: PCM encoding of streamed audio. options: sampling options (SPEAK_OPTIONS).
    """

    TYPE = "speak"
    id: str | None = None
    text: str | None = None
    stream: bool = False
    voice: str | None = None
    priority: str = DEFAULT_PRIORITY
    output: str = "play"
    audio_format: str = "f32le"
    options: dict = field(default_factory=dict)
    language: str | None = None  # e.g. "fr"; None: the voice's language, else English

    def validate(self) -> None:
        super().validate()
        _check_id(self, "id", self.id)
        _check_choice(self, "priority", self.priority, PRIORITIES)
        _check_choice(self, "output", self.output, OUTPUTS)
        _check_choice(self, "audio_format", self.audio_format, AUDIO_FORMATS)
        if self.stream:
            if self.id is None:
                raise _bad(self, "speak.id is required when stream is true (speak_text frames name it)")
        elif self.text is None:
            raise _bad(self, "speak needs text (or stream: true and speak_text frames)")
        _check_text(self, self.text)
        if self.voice is not None and not (0 < len(self.voice) <= 4096):
            raise _bad(self, "speak.voice must be a non-empty name or path")
        if self.language is not None and not LANGUAGE_CODE.fullmatch(self.language):
            raise _bad(self, f"speak.language must be a language code such as 'en' or 'fr' (got {self.language!r})")
        for key, value in self.options.items():
            try:
                self.options[key] = check_option(key, value)
            except OptionError as err:
                raise _bad(self, f"speak.options: {err}") from None


@dataclass(kw_only=True)
class SpeakText(Request):
    """The next piece of an open text stream."""

    TYPE = "speak_text"
    id: str
    text: str

    def validate(self) -> None:
        super().validate()
        _check_id(self, "id", self.id)
        _check_text(self, self.text)


@dataclass(kw_only=True)
class SpeakEnd(Request):
    """Close a text stream: the rest of the buffered text is spoken."""

    TYPE = "speak_end"
    id: str

    def validate(self) -> None:
        super().validate()
        _check_id(self, "id", self.id)


@dataclass(kw_only=True)
class Cancel(Request):
    """Cancel one of this connection's utterances (`id`), or every utterance of every
    client (`all`), queued or speaking."""

    TYPE = "cancel"
    id: str | None = None
    all: bool = False

    def validate(self) -> None:
        super().validate()
        _check_id(self, "id", self.id)
        if (self.id is None) == (not self.all):
            raise _bad(self, "cancel needs exactly one of id or all: true")


@dataclass(kw_only=True)
class Pause(Request):
    """Hold local playback; queued and partly played audio is kept, not dropped.

    The pause is lifted when the client that asked for it disconnects, unless `keep` is
    true (then it lasts until a `resume` from anyone, as `nsay --pause` asks)."""

    TYPE = "pause"
    keep: bool = False


@dataclass(kw_only=True)
class Resume(Request):
    """Continue local playback where it was paused."""

    TYPE = "resume"


@dataclass(kw_only=True)
class GetStatus(Request):
    TYPE = "status"


@dataclass(kw_only=True)
class ListVoices(Request):
    TYPE = "voices"


@dataclass(kw_only=True)
class Ping(Request):
    TYPE = "ping"


@dataclass(kw_only=True)
class Shutdown(Request):
    """Ask the daemon to drain and exit."""

    TYPE = "shutdown"


# --- events


@dataclass(kw_only=True)
class Hello(Event):
    """Sent first on every connection. state: one of STATES; sample_rate is None while
    loading."""

    TYPE = "hello"
    server: str
    protocol: int = PROTOCOL_VERSION
    state: str = "loading"
    sample_rate: int | None = None
    playback: bool = False
    max_frame_bytes: int = MAX_FRAME_BYTES
    max_text_bytes: int = MAX_TEXT_BYTES
    languages: list[str] = field(default_factory=list)  # what the loaded model speaks


@dataclass(kw_only=True)
class Ready(Event):
    """Sent to every connected client when the model is loaded and warmed."""

    TYPE = "ready"
    sample_rate: int
    model: str = ""


@dataclass(kw_only=True)
class Loading(Event):
    """The answer to a request that needs the model while it is still loading; the
    request was not performed. Wait for `ready`, then send it again."""

    TYPE = "loading"
    request: str
    id: str | None = None
    message: str = "the model is loading"


@dataclass(kw_only=True)
class Accepted(Event):
    """A speak request was queued. position: utterances ahead of it (0 = next)."""

    TYPE = "accepted"
    id: str
    position: int
    priority: str
    output: str


@dataclass(kw_only=True)
class Started(Event):
    """Synthesis of the utterance began (it left the queue). wait_ms: time queued."""

    TYPE = "started"
    id: str
    wait_ms: float
    voice: str | None = None
    language: str | None = None


@dataclass(kw_only=True)
class Audio(Event):
    """PCM audio of an utterance streamed back (output "stream" or "both"); mono.
    seq counts audio events of the utterance from 0; start_s is the offset of the first
    sample within the utterance."""

    TYPE = "audio"
    id: str
    seq: int
    pcm: bytes
    format: str = "f32le"
    sample_rate: int = 24000
    channels: int = 1
    start_s: float = 0.0


@dataclass(kw_only=True)
class Progress(Event):
    """One synthesized chunk. tokens and audio_s are running totals for the utterance.
    text_start/text_end: the characters of the utterance's text (for a text stream, of
    its speak_text runs joined) this chunk speaks, and text those characters; None when
    the daemon cannot tell."""

    TYPE = "progress"
    id: str
    chunk: int
    tokens: int
    audio_s: float
    segment: int = 0
    t3_ms: float | None = None
    s3gen_ms: float | None = None
    text_start: int | None = None
    text_end: int | None = None
    text: str | None = None


@dataclass(kw_only=True)
class Done(Event):
    """The end of an accepted utterance; exactly one per accepted speak.

    reason: "completed", "cancelled" (a cancel request or shutdown), "preempted"
    (priority rules), "failed" (an `error` event with this id came first).
    ttfa_ms: synthesis start to first audio; wait_ms: time queued; first_audio_ms:
    request received to first audio. rtf: synthesis time / audio seconds (lower is
    faster). With local playback, done is sent once the last sample has played.
    """

    TYPE = "done"
    id: str
    reason: str = "completed"
    detail: str | None = None
    ttfa_ms: float | None = None
    wait_ms: float | None = None
    first_audio_ms: float | None = None
    rtf: float | None = None
    tokens: int = 0
    audio_s: float = 0.0
    chunks: int = 0
    underruns: int = 0
    t3_tokens_per_s: float | None = None
    s3gen_ms_per_chunk: float | None = None


@dataclass(kw_only=True)
class Error(Event):
    """A failed request or a broken frame. id names the utterance when known."""

    TYPE = "error"
    code: str
    message: str
    request: str | None = None
    id: str | None = None


@dataclass(kw_only=True)
class Status(Event):
    """The daemon's state and telemetry (the `status` request's answer); the dict
    fields are documented in docs/protocol.md."""

    TYPE = "status"
    state: str
    version: str
    pid: int
    uptime_s: float
    socket: str
    model: dict = field(default_factory=dict)
    queue_depth: int = 0
    queue: list = field(default_factory=list)
    current: dict | None = None
    paused: bool = False
    playback: dict = field(default_factory=dict)
    clients: int = 0
    metrics: dict = field(default_factory=dict)
    memory: dict = field(default_factory=dict)
    counters: dict = field(default_factory=dict)


@dataclass(kw_only=True)
class Voices(Event):
    TYPE = "voices"
    voices: list[str] = field(default_factory=list)
    family: str = ""  # the loaded model's family ("chatterbox", "turbo"); "" from older daemons


@dataclass(kw_only=True)
class Pong(Event):
    TYPE = "pong"
    state: str = "ready"


@dataclass(kw_only=True)
class Cancelled(Event):
    """The answer to `cancel`: the ids that were cancelled (each also gets its `done`)."""

    TYPE = "cancelled"
    ids: list[str] = field(default_factory=list)


@dataclass(kw_only=True)
class Paused(Event):
    TYPE = "paused"


@dataclass(kw_only=True)
class Resumed(Event):
    TYPE = "resumed"


@dataclass(kw_only=True)
class ShuttingDown(Event):
    """The daemon is draining: sent in answer to `shutdown` and to every client when a
    drain begins (signal or shutdown request)."""

    TYPE = "shutting_down"


REQUESTS: dict[str, type[Request]] = {
    cls.TYPE: cls
    for cls in (Speak, SpeakText, SpeakEnd, Cancel, Pause, Resume, GetStatus, ListVoices, Ping, Shutdown)
}
EVENTS: dict[str, type[Event]] = {
    cls.TYPE: cls
    for cls in (
        Hello, Ready, Loading, Accepted, Started, Audio, Progress, Done, Error, Status,
        Voices, Pong, Cancelled, Paused, Resumed, ShuttingDown,
    )
}  # fmt: skip


# ----------------------------------------------------------------------------- field types

_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _is_type(value: Any, want: Any) -> bool:
    """Whether a decoded msgpack value fits the annotation `want`."""
    origin = typing.get_origin(want)
    if origin is Union or type(want).__name__ == "UnionType":
        return any(_is_type(value, arg) for arg in typing.get_args(want))
    if want is type(None):
        return value is None
    if want is Any:
        return True
    if want is bool:
        return isinstance(value, bool)
    if want is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if want is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if want is str:
        return isinstance(value, str)
    if want is bytes:
        return isinstance(value, (bytes, bytearray))
    if want is dict or origin is dict:
        return isinstance(value, dict) and all(isinstance(k, str) for k in value)
    if want is list or origin is list:
        if not isinstance(value, list):
            return False
        args = typing.get_args(want)
        return not args or all(_is_type(v, args[0]) for v in value)
    return isinstance(value, want)


def _type_name(want: Any) -> str:
    args = typing.get_args(want)
    if args and (typing.get_origin(want) is Union or type(want).__name__ == "UnionType"):
        return " or ".join(_type_name(a) for a in args)
    if want is type(None):
        return "nil"
    return {str: "str", int: "int", float: "float", bool: "bool", bytes: "bin", dict: "map"}.get(
        want, "array" if want is list or typing.get_origin(want) is list else str(want)
    )


def _from_wire(cls: type[Message], obj: dict[str, Any]) -> Message:
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    mtype = cls.TYPE
    msg_id = obj.get("id") if isinstance(obj.get("id"), str) else None
    for f in fields(cls):
        if f.name not in obj:
            if f.default is MISSING and f.default_factory is MISSING:
                raise ProtocolError(E_BAD_FIELD, f"{mtype} needs field {f.name!r}", request=mtype, id=msg_id)
            continue
        value = obj[f.name]
        want = hints[f.name]
        if not _is_type(value, want):
            raise ProtocolError(
                E_BAD_FIELD,
                f"{mtype}.{f.name} must be {_type_name(want)}, got {type(value).__name__}",
                request=mtype,
                id=msg_id,
            )
        if want is float or (typing.get_args(want) and float in typing.get_args(want)):
            value = float(value) if isinstance(value, int) and not isinstance(value, bool) else value
            if isinstance(value, float) and not math.isfinite(value):
                raise ProtocolError(E_BAD_FIELD, f"{mtype}.{f.name} must be a finite number, got {value!r}", request=mtype, id=msg_id)
        if isinstance(value, bytearray):
            value = bytes(value)
        kwargs[f.name] = value
    # Unknown fields are ignored: a v1 peer may add optional fields without a new version.
    msg = cls(**kwargs)
    msg.validate()
    return msg


def _decode(obj: Any, registry: dict[str, type[Message]]) -> Message:
    if not isinstance(obj, dict):
        raise ProtocolError(E_BAD_FRAME, f"a frame must hold a msgpack map, not {type(obj).__name__}")
    mtype = obj.get("type")
    version = obj.get("v")
    # exactly the integer 1: msgpack true and 1.0 compare equal to 1 in Python
    if type(version) is not int or version != PROTOCOL_VERSION:
        seen = "no version" if version is None else f"version {version!r}"
        raise ProtocolError(
            E_VERSION,
            f"frame has {seen}; this side speaks protocol version {PROTOCOL_VERSION}",
            request=mtype if isinstance(mtype, str) else None,
        )
    if not isinstance(mtype, str):
        raise ProtocolError(E_BAD_FIELD, "a message needs a string field 'type'")
    cls = registry.get(mtype)
    if cls is None:
        raise ProtocolError(E_UNKNOWN_TYPE, f"unknown message type {mtype!r}", request=mtype)
    return _from_wire(cls, obj)


def decode_request(obj: Any) -> Request:
    """A decoded frame body (from unpack_body) as a typed request; raises ProtocolError."""
    return _decode(obj, REQUESTS)  # type: ignore[return-value]


def decode_event(obj: Any) -> Event:
    """A decoded frame body as a typed event; raises ProtocolError (E_UNKNOWN_TYPE for an
    event this client does not know, which a client may ignore)."""
    return _decode(obj, EVENTS)  # type: ignore[return-value]


# ----------------------------------------------------------------------------- framing


def pack_body(obj: dict[str, Any]) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def encode_frame(message: Message | dict[str, Any]) -> bytes:
    """Header + msgpack body of a message (or of a raw map, for tests of bad input)."""
    body = pack_body(message.to_wire() if isinstance(message, Message) else message)
    if len(body) > MAX_FRAME_BYTES:
        raise ValueError(f"frame body of {len(body)} bytes exceeds {MAX_FRAME_BYTES}")
    return HEADER.pack(len(body)) + body


def unpack_body(body: bytes) -> Any:
    """A frame body as Python objects; raises ProtocolError (E_BAD_UTF8 / E_BAD_FRAME)."""
    try:
        return msgpack.unpackb(body, raw=False, use_list=True, strict_map_key=True)
    except UnicodeDecodeError as err:
        raise ProtocolError(E_BAD_UTF8, f"a string in the frame is not valid UTF-8 ({err.reason})") from None
    except msgpack.ExtraData:
        raise ProtocolError(E_BAD_FRAME, "the frame holds more than one msgpack object") from None
    except Exception as err:  # msgpack raises ValueError, TypeError, FormatError, StackError...
        raise ProtocolError(E_BAD_FRAME, f"the frame is not valid msgpack ({type(err).__name__})") from None


class FrameDecoder:
    """Incremental, sans-IO frame splitter.

    feed() bytes as they arrive; frames() yields each complete body (bytes) or a
    ProtocolError for an oversized frame. An oversized body is skipped as it streams in,
    never buffered, so the next frame is read correctly.
    """

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES):
        self.max_frame_bytes = max_frame_bytes
        self._buf = bytearray()
        self._skip = 0  # bytes of an oversized body still to discard

    def feed(self, data: bytes) -> None:
        if self._skip:
            dropped = min(self._skip, len(data))
            self._skip -= dropped
            data = data[dropped:]
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes held in memory for an unfinished frame."""
        return len(self._buf)

    @property
    def pending(self) -> int:
        """Bytes of an unfinished frame (or of an oversized body still being skipped)."""
        return len(self._buf) + self._skip

    def frames(self) -> Iterator[bytes | ProtocolError]:
        while True:
            if self._skip:
                dropped = min(self._skip, len(self._buf))
                del self._buf[:dropped]
                self._skip -= dropped
                if self._skip:
                    return
            if len(self._buf) < HEADER.size:
                return
            (length,) = HEADER.unpack_from(self._buf)
            if length > self.max_frame_bytes:
                del self._buf[: HEADER.size]
                self._skip = length
                yield ProtocolError(
                    E_FRAME_TOO_LARGE, f"frame of {length} bytes exceeds the limit of {self.max_frame_bytes} bytes"
                )
                continue
            if len(self._buf) < HEADER.size + length:
                return
            body = bytes(self._buf[HEADER.size : HEADER.size + length])
            del self._buf[: HEADER.size + length]
            yield body


# ----------------------------------------------------------------------------- socket location


def default_socket_path() -> Path:
    """The per-user socket: platformdirs' runtime dir (Linux: $XDG_RUNTIME_DIR or a
    private fallback) or app-support dir (macOS), plus SOCKET_NAME."""
    import platformdirs

    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset and it falls back to /tmp/runtime-UID.
        warnings.simplefilter("ignore")
        if sys.platform == "darwin":
            base = platformdirs.user_data_dir(APP_NAME, appauthor=False)  # ~/Library/Application Support
        else:
            base = platformdirs.user_runtime_dir(APP_NAME, appauthor=False)
    return Path(base) / SOCKET_NAME


def socket_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Where the daemon listens: `--socket PATH`, else $NIGHTINGALE_SOCKET, else the default.
    Raises ValueError when the path is too long for a Unix socket address."""
    raw = explicit or os.environ.get(SOCKET_ENV) or default_socket_path()
    path = Path(raw).expanduser()
    if len(os.fsencode(str(path))) > MAX_SOCKET_PATH_BYTES:
        raise ValueError(
            f"socket path {path} is longer than {MAX_SOCKET_PATH_BYTES} bytes; choose a shorter --socket"
        )
    return path


# ----------------------------------------------------------------------------- blocking client


class DaemonUnavailable(ConnectionError):
    """No daemon answers at the socket path."""


CONNECT_RETRY_S = 5.0  # how long a full listen backlog (EAGAIN) is retried


def _connect_retrying(sock: socket.socket, path: str) -> None:
    """connect(), retried with backoff while the daemon's listen backlog is full: a local
    connect flood then delays a client instead of failing it."""
    deadline = time.monotonic() + CONNECT_RETRY_S
    delay = 0.005
    while True:
        try:
            sock.connect(path)
            return
        except BlockingIOError:  # EAGAIN on a Unix socket: the backlog is full
            if time.monotonic() + delay > deadline:
                raise
            time.sleep(delay)
            delay = min(0.2, delay * 2)


class Connection:
    """A blocking framed connection to the daemon (clients, tests, bench).

    `hello` holds the daemon's first event. recv() returns typed events, None at a clean
    end of stream, and raises ProtocolError for a frame cut short or malformed, and
    TimeoutError when `timeout` passes with no complete frame.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, *, timeout: float | None = 10.0):
        self.path = socket_path(path)
        deadline = time.monotonic() + CONNECT_RETRY_S
        delay = 0.05
        while True:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._sock.settimeout(timeout)
            try:
                _connect_retrying(self._sock, str(self.path))
            except (FileNotFoundError, ConnectionRefusedError) as err:
                self._sock.close()
                raise DaemonUnavailable(
                    f"no nightingale daemon at {self.path} ({err.strerror}); start one with `nightingale serve`"
                ) from None
            except OSError:
                self._sock.close()
                raise
            self._decoder = FrameDecoder()
            self._frames: Iterator[bytes | ProtocolError] = iter(())
            self._send_lock = threading.Lock()  # whole frames when threads share the connection
            first = self.recv(timeout)
            if isinstance(first, Hello):
                break
            self.close()
            if isinstance(first, Error) and first.code == E_BUSY and time.monotonic() + delay < deadline:
                time.sleep(delay)  # the daemon is at its connection cap: a flood, usually brief
                delay = min(0.5, delay * 2)
                continue
            if isinstance(first, Error):
                raise ProtocolError(first.code, first.message)
            raise ProtocolError(E_BAD_FRAME, f"expected hello from the daemon, got {first!r}")
        self.hello: Hello = first

    def send(self, message: Message | dict[str, Any]) -> None:
        """Thread-safe: a frame is written whole before another thread's frame starts."""
        frame = encode_frame(message)
        with self._send_lock:
            self._sock.sendall(frame)

    def send_raw(self, data: bytes) -> None:
        """Bytes as they are (for tests of malformed input)."""
        with self._send_lock:
            self._sock.sendall(data)

    def recv(self, timeout: float | None = None) -> Event | None:
        body = self._next_body(timeout)
        if body is None:
            return None
        return decode_event(unpack_body(body))

    def _next_body(self, timeout: float | None) -> bytes | None:
        if timeout is not None:
            self._sock.settimeout(timeout)
        while True:
            for item in self._frames:
                if isinstance(item, ProtocolError):
                    raise item
                return item
            try:
                data = self._sock.recv(1 << 16)
            except socket.timeout:
                raise TimeoutError(f"no frame from the daemon within {timeout} s") from None
            if not data:
                if self._decoder.pending:
                    raise ProtocolError(E_BAD_FRAME, "the daemon closed the connection in the middle of a frame")
                return None
            self._decoder.feed(data)
            self._frames = self._decoder.frames()

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
