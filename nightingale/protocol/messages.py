"""The typed messages of protocol v1, their checks, and decoding of frame bodies into them.

Every message is a class below; `decode_request` / `decode_event` check the version, the
type and every field's type and value, and raise ProtocolError with a stable `code` that
the daemon sends back in an `error` event.

Message classes are declared like keyword-only dataclasses, but built by _Record's
__init_subclass__ rather than by `dataclasses`: nsay imports this module at every start,
and importing `dataclasses` and building some 30 classes with it took about 20 ms of
nsay's start-up (docs/notes.md has the measurements).
"""

from __future__ import annotations

import math
import re
import typing
from typing import Any, Callable, ClassVar, Union

from .options import OptionError, check_option

PROTOCOL_VERSION = 1

MAX_FRAME_BYTES = 1 << 20  # 1 MiB per frame body, both directions
MAX_TEXT_BYTES = 64 * 1024  # UTF-8 bytes of text in one speak or speak_text frame
MAX_STREAM_TEXT_BYTES = 1 << 20  # total UTF-8 bytes one streamed utterance may receive
MAX_ID_CHARS = 128  # client-chosen utterance ids and refs
MAX_AUDIO_FRAME_SAMPLES = 48000  # the daemon splits audio events to at most 2 s at 24 kHz

# speech-dispatcher's priorities, most urgent first (notification and progress share a rank).
PRIORITIES = ("important", "message", "text", "notification", "progress")
DEFAULT_PRIORITY = "message"
OUTPUTS = ("play", "stream", "both")
AUDIO_FORMATS = ("f32le", "s16le")
STATES = ("loading", "ready", "draining")
DONE_REASONS = ("completed", "cancelled", "preempted", "failed")

# speak.language: an ISO 639-1 code (two or three letters, an optional region/script part)
LANGUAGE_CODE = re.compile(r"[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{1,8})?")

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


MISSING: Any = object()  # a field without a default


class Field:
    """One field of a message class: its name and default, or a factory for a fresh
    default per message (lists, dicts)."""

    __slots__ = ("name", "default", "default_factory")

    def __init__(self, name: str = "", default: Any = MISSING, default_factory: Callable[[], Any] | None = None):
        self.name = name
        self.default = default
        self.default_factory = default_factory

    @property
    def required(self) -> bool:
        return self.default is MISSING and self.default_factory is None


def field(*, default_factory: Callable[[], Any]) -> Any:
    """A field whose default is made fresh for each message, as dataclasses.field()."""
    return Field(default_factory=default_factory)


def fields(message: Message | type[Message]) -> tuple[Field, ...]:
    """The fields of a message class or message, the base class's first."""
    return message._fields


# Python 3.11+: type checkers see each message class's keyword-only __init__.
_dataclass_like = getattr(typing, "dataclass_transform", lambda **_: lambda cls: cls)


@_dataclass_like(kw_only_default=True, field_specifiers=(field,))
class _Record:
    """Keyword-only fields from the class annotations, with __init__, __repr__ and __eq__
    as a keyword-only dataclass has them."""

    _fields: ClassVar[tuple[Field, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own: dict[str, Field] = {}
        for name, annotation in cls.__dict__.get("__annotations__", {}).items():
            if str(annotation).startswith("ClassVar"):
                continue
            value = cls.__dict__.get(name, MISSING)
            if isinstance(value, Field):
                own[name] = Field(name, default_factory=value.default_factory)
                delattr(cls, name)
            else:
                own[name] = Field(name, default=value)
        # A redeclared field keeps its place among the base's, as in dataclasses.
        cls._fields = tuple({**{f.name: f for f in cls._fields}, **own}.values())

    def __init__(self, **values: Any) -> None:
        for f in self._fields:
            if f.name in values:
                value = values.pop(f.name)
            elif f.default_factory is not None:
                value = f.default_factory()
            elif f.default is not MISSING:
                value = f.default
            else:
                raise TypeError(f"{type(self).__name__}() needs the keyword argument {f.name!r}")
            setattr(self, f.name, value)
        if values:
            raise TypeError(f"{type(self).__name__}() got unexpected keyword arguments {', '.join(values)}")

    def __repr__(self) -> str:
        shown = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in self._fields)
        return f"{type(self).__qualname__}({shown})"

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return all(getattr(self, f.name) == getattr(other, f.name) for f in self._fields)


class Message(_Record):
    """Base of every message. `ref` is an optional client-chosen tag that the daemon
    echoes in the reply (and in any error) so a client can match answers to requests."""

    TYPE: ClassVar[str] = ""
    ref: str | None = None

    def to_wire(self) -> dict[str, Any]:
        """The msgpack map for this message; None-valued fields are left out."""
        out: dict[str, Any] = {"v": PROTOCOL_VERSION, "type": self.TYPE}
        for f in self._fields:
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


class SpeakText(Request):
    """The next piece of an open text stream."""

    TYPE = "speak_text"
    id: str
    text: str

    def validate(self) -> None:
        super().validate()
        _check_id(self, "id", self.id)
        _check_text(self, self.text)


class SpeakEnd(Request):
    """Close a text stream: the rest of the buffered text is spoken."""

    TYPE = "speak_end"
    id: str

    def validate(self) -> None:
        super().validate()
        _check_id(self, "id", self.id)


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


class Pause(Request):
    """Hold local playback; queued and partly played audio is kept, not dropped.

    The pause is lifted when the client that asked for it disconnects, unless `keep` is
    true (then it lasts until a `resume` from anyone, as `nsay --pause` asks)."""

    TYPE = "pause"
    keep: bool = False


class Resume(Request):
    """Continue local playback where it was paused."""

    TYPE = "resume"


class GetStatus(Request):
    TYPE = "status"


class ListVoices(Request):
    TYPE = "voices"


class Ping(Request):
    TYPE = "ping"


class Shutdown(Request):
    """Ask the daemon to drain and exit."""

    TYPE = "shutdown"


# --- events


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


class Ready(Event):
    """Sent to every connected client when the model is loaded and warmed."""

    TYPE = "ready"
    sample_rate: int
    model: str = ""


class Loading(Event):
    """The answer to a request that needs the model while it is still loading; the
    request was not performed. Wait for `ready`, then send it again."""

    TYPE = "loading"
    request: str
    id: str | None = None
    message: str = "the model is loading"


class Accepted(Event):
    """A speak request was queued. position: utterances ahead of it (0 = next)."""

    TYPE = "accepted"
    id: str
    position: int
    priority: str
    output: str


class Started(Event):
    """Synthesis of the utterance began (it left the queue). wait_ms: time queued."""

    TYPE = "started"
    id: str
    wait_ms: float
    voice: str | None = None
    language: str | None = None


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


class Error(Event):
    """A failed request or a broken frame. id names the utterance when known."""

    TYPE = "error"
    code: str
    message: str
    request: str | None = None
    id: str | None = None


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


class Voices(Event):
    TYPE = "voices"
    voices: list[str] = field(default_factory=list)
    family: str = ""  # the loaded model's family ("chatterbox", "turbo"); "" from older daemons


class Pong(Event):
    TYPE = "pong"
    state: str = "ready"


class Cancelled(Event):
    """The answer to `cancel`: the ids that were cancelled (each also gets its `done`)."""

    TYPE = "cancelled"
    ids: list[str] = field(default_factory=list)


class Paused(Event):
    TYPE = "paused"


class Resumed(Event):
    TYPE = "resumed"


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
            if f.required:
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
