"""OpenAI-compatible speech API, served inside `nightingale serve --http HOST:PORT`.

Endpoints: `POST /v1/audio/speech` (OpenAI's request body; audio streams back as chunked
transfer, or as server-sent events with `stream_format: "sse"`), `GET /v1/models`,
`GET /v1/audio/voices`. Every error has OpenAI's shape:
`{"error": {"message", "type", "param", "code"}}`.

Requests go through frontend.Frontdoor like any other client, so they share the queue,
priorities, cancel (a client that disconnects cancels its request) and status telemetry.
aiohttp serves it on the daemon's own event loop (docs/architecture.md says why aiohttp).
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
import json
import logging
from typing import Any

import anyio
import anyio.abc
import numpy as np
from aiohttp import web
from nightingale import protocol as p

from .audio_encode import FORMATS, Encoder
from .frontend import Frontdoor, network_voice

log = logging.getLogger(__name__)

MODEL_IDS = ("nightingale", "tts-1", "tts-1-hd", "gpt-4o-mini-tts")  # one model under every name
TOKEN_ENV = "NIGHTINGALE_HTTP_TOKEN"
MAX_BODY_BYTES = 1 << 20
SPEED_RANGE = (0.25, 4.0)

# daemon error code -> HTTP status, OpenAI error type
_STATUS = {
    p.E_BAD_FIELD: (400, "invalid_request_error"),
    p.E_TEXT_TOO_LONG: (400, "invalid_request_error"),
    p.E_UNKNOWN_VOICE: (400, "invalid_request_error"),
    p.E_UNSUPPORTED_LANGUAGE: (400, "invalid_request_error"),
    p.E_BUSY: (429, "rate_limit_error"),
    p.E_SHUTTING_DOWN: (503, "server_error"),
    "loading": (503, "server_error"),
    p.E_SYNTHESIS: (500, "server_error"),
    p.E_INTERNAL: (500, "server_error"),
}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def error_response(
    status: int, message: str, *, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return web.json_response(body, status=status)


def _daemon_error(code: str, message: str) -> web.Response:
    status, kind = _STATUS.get(code, (500, "server_error"))
    param = {p.E_UNKNOWN_VOICE: "voice", p.E_TEXT_TOO_LONG: "input", p.E_UNSUPPORTED_LANGUAGE: "language"}.get(code)
    return error_response(status, message, kind=kind, param=param, code=code)


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value"):
        super().__init__(message)
        self.param = param
        self.code = code


def parse_speech_request(body: Any, default_options: dict) -> tuple[p.Speak, str, float, str]:
    """OpenAI's JSON body -> (Speak, response_format, speed, stream_format). Raises BadRequest
    for OpenAI's own fields; Nightingale's (`priority`, `options`, `language`) are checked by p.Speak."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")

    def field(name: str, kinds: tuple[type, ...], default: Any = None, required: bool = False) -> Any:
        if name not in body or body[name] is None:
            if required:
                raise BadRequest(f"'{name}' is required", name, "missing_required_parameter")
            return default
        value = body[name]
        if not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds:
            want = " or ".join(k.__name__ for k in kinds)
            raise BadRequest(f"'{name}' must be {want}, got {type(value).__name__}", name, "invalid_type")
        return value

    field("model", (str,), required=True)
    text = field("input", (str,), required=True)
    if not text.strip():
        raise BadRequest("'input' must not be empty", "input")
    voice = field("voice", (str, dict), required=True)
    if isinstance(voice, dict):  # {"id": "voice_..."} (custom voices)
        voice = voice.get("id")
        if not isinstance(voice, str):
            raise BadRequest("'voice.id' must be a string", "voice", "invalid_type")
    try:
        voice = network_voice(voice)
    except ValueError as err:
        raise BadRequest(str(err), "voice", p.E_UNKNOWN_VOICE) from None
    fmt = field("response_format", (str,), "mp3")
    if fmt not in FORMATS:
        raise BadRequest(f"'response_format' must be one of {', '.join(FORMATS)} (got {fmt!r})", "response_format")
    speed = float(field("speed", (int, float), 1.0))
    if not SPEED_RANGE[0] <= speed <= SPEED_RANGE[1]:
        raise BadRequest(f"'speed' must be between {SPEED_RANGE[0]} and {SPEED_RANGE[1]} (got {speed:g})", "speed")
    stream_format = field("stream_format", (str,), "audio")
    if stream_format not in ("audio", "sse"):
        raise BadRequest(f"'stream_format' must be 'audio' or 'sse' (got {stream_format!r})", "stream_format")
    field("instructions", (str,))  # accepted; Chatterbox has no instruction input
    options = {**default_options, **field("options", (dict,), {})}
    speak = p.Speak(
        id="http",
        text=text,
        voice=voice,
        language=field("language", (str,)),  # Nightingale's: e.g. "fr" for the multilingual model
        priority=field("priority", (str,), p.DEFAULT_PRIORITY),
        output="stream",
        audio_format="f32le",
        options=options,
    )
    try:
        speak.validate()  # the daemon's own rules for priority, options and text length
    except p.ProtocolError as err:
        raise BadRequest(err.message, {"text_too_long": "input"}.get(err.code), err.code) from None
    return speak, fmt, speed, stream_format


class HttpFrontend:
    """aiohttp application on HOST:PORT; `serve` runs it until cancelled."""

    def __init__(self, host: str, port: int, token: str | None = None, options: dict | None = None):
        if not is_loopback(host) and not token:
            raise ValueError(f"--http on {host} (not loopback) needs a bearer token (--http-token or {TOKEN_ENV})")
        self.host = host
        self.port = port
        self.token = token
        self.options = dict(options or {})
        self.door: Frontdoor | None = None
        self.bound_port: int | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self._errors_and_auth])
        app.router.add_post("/v1/audio/speech", self.speech)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model}", self.model)
        app.router.add_get("/v1/audio/voices", self.voices)
        return app

    async def serve(self, door: Frontdoor, *, task_status: anyio.abc.TaskStatus = anyio.TASK_STATUS_IGNORED) -> None:
        self.door = door
        runner = web.AppRunner(self.app(), handle_signals=False, access_log=None, handler_cancellation=True, shutdown_timeout=1.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port)
            await site.start()
            self.bound_port = runner.addresses[0][1]
            log.info("OpenAI-compatible HTTP API on http://%s:%d/v1", self.host, self.bound_port)
            task_status.started()
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                await runner.cleanup()

    # ------------------------------------------------------------------ middleware

    @web.middleware
    async def _errors_and_auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if self.token is not None:
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
                return error_response(401, "missing or wrong bearer token", code="invalid_api_key")
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return error_response(exc.status, exc.reason, code=None)

    # ------------------------------------------------------------------ endpoints

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._model(m) for m in MODEL_IDS]})

    async def model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        if name not in MODEL_IDS:
            return error_response(404, f"model {name!r} not found; models: {', '.join(MODEL_IDS)}", code="model_not_found")
        return web.json_response(self._model(name))

    @staticmethod
    def _model(name: str) -> dict:
        return {"id": name, "object": "model", "created": 0, "owned_by": "nightingale"}

    async def voices(self, request: web.Request) -> web.Response:
        assert self.door is not None
        if self.door.state == "loading":
            return _daemon_error("loading", "the model is loading; try again shortly")
        names = await self.door.voices()
        return web.json_response({"object": "list", "voices": names, "data": [{"id": n, "object": "voice", "name": n} for n in names]})

    async def speech(self, request: web.Request) -> web.StreamResponse:
        door = self.door
        assert door is not None
        try:
            body = await request.json(loads=json.loads)
        except web.HTTPRequestEntityTooLarge:
            return error_response(413, f"the request body is larger than {MAX_BODY_BYTES} bytes", param="input", code="request_too_large")
        except (ValueError, UnicodeDecodeError) as err:
            return error_response(400, f"the request body is not valid JSON: {err}", code="invalid_json")
        try:
            speak, fmt, speed, stream_format = parse_speech_request(body, self.options)
        except BadRequest as err:
            return error_response(400, str(err), param=err.param, code=err.code)
        if door.state == "loading":
            return _daemon_error("loading", "the model is loading; try again shortly")
        handle = door.submit(speak, label="http")
        async with handle:
            return await _Speech(request, door, handle, fmt, speed, stream_format).run()


class _Speech:
    """One /v1/audio/speech response: headers leave with the first audio (so an error that
    comes first still gets a proper status), then each chunk as it is encoded."""

    def __init__(self, request: web.Request, door: Frontdoor, handle: Any, fmt: str, speed: float, stream_format: str):
        self.request = request
        self.handle = handle
        self.sse = stream_format == "sse"
        self.encoder = Encoder(fmt, door.sample_rate)
        self.stretcher = None
        if speed != 1.0:
            from nightingale.timestretch import TimeStretcher

            self.stretcher = TimeStretcher(speed, door.sample_rate)
        self.response: web.StreamResponse | None = None
        self.sent = 0

    async def run(self) -> web.StreamResponse:
        try:
            async for event in self.handle:
                if isinstance(event, p.Audio):
                    samples = np.frombuffer(event.pcm, "<f4")
                    if self.stretcher is not None:
                        samples = self.stretcher.push(samples)
                    await self._send(self.encoder.push(samples))
                elif isinstance(event, p.Loading):
                    return _daemon_error("loading", "the model is loading; try again shortly")
                elif isinstance(event, p.Error):
                    if self.response is None:
                        return _daemon_error(event.code, event.message)
                    return await self._fail(event.code, event.message)
                elif isinstance(event, p.Done):
                    if event.reason != "completed":
                        message = f"the request was {event.reason}" + (f" ({event.detail})" if event.detail else "")
                        if self.response is None:
                            return error_response(409, message, kind="server_error", code=event.reason)
                        return await self._fail(event.reason, message)
                    return await self._complete(event)
            return await self._fail(p.E_SHUTTING_DOWN, "the daemon stopped")
        finally:
            self.encoder.close()

    async def _start(self) -> web.StreamResponse:
        if self.response is None:
            resp = web.StreamResponse(status=200)
            resp.content_type = "text/event-stream" if self.sse else self.encoder.content_type
            resp.headers["Cache-Control"] = "no-cache"
            resp.enable_chunked_encoding()
            await resp.prepare(self.request)
            self.response = resp
        return self.response

    async def _send(self, data: bytes) -> None:
        resp = await self._start()
        if not data:
            return
        self.sent += len(data)
        if self.sse:
            event = {"type": "speech.audio.delta", "audio": base64.b64encode(data).decode("ascii")}
            data = f"data: {json.dumps(event)}\n\n".encode()
        await resp.write(data)

    async def _complete(self, done: p.Done) -> web.StreamResponse:
        if self.stretcher is not None:
            tail = self.stretcher.flush()
            if len(tail):
                await self._send(self.encoder.push(tail))
        await self._send(self.encoder.finish())
        resp = await self._start()
        if self.sse:
            usage = {"input_tokens": 0, "output_tokens": int(done.tokens or 0), "total_tokens": int(done.tokens or 0)}
            await resp.write(f"data: {json.dumps({'type': 'speech.audio.done', 'usage': usage})}\n\n".encode())
        await resp.write_eof()
        return resp

    async def _fail(self, code: str | None, message: str) -> web.StreamResponse:
        """An error after the headers left: SSE says so; a plain stream is cut short (no
        final chunk), which every HTTP client reports as an incomplete body."""
        resp = await self._start()
        log.info("http request %s ended early: %s", self.handle.id, message)
        if self.sse:
            body = {"type": "error", "error": {"message": message, "type": "server_error", "param": None, "code": code}}
            await resp.write(f"data: {json.dumps(body)}\n\n".encode())
            await resp.write_eof()
            return resp
        if self.request.transport is not None:
            self.request.transport.close()
        return resp


def parse_address(value: str) -> tuple[str, int]:
    """'HOST:PORT', ':PORT' or 'PORT' (loopback) -> (host, port); IPv6 as [::1]:PORT."""
    host, _, port = value.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"bad address {value!r}: expected HOST:PORT")
    return host, int(port)
