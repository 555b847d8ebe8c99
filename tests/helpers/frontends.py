"""Clients of the daemon's front ends in tests: the OpenAI-compatible HTTP API and Wyoming."""

from __future__ import annotations

import asyncio
import http.client
import json

from wyoming.audio import AudioChunk, AudioStart
from wyoming.client import AsyncTcpClient
from wyoming.error import Error as WyError


def post(port: int, body: bytes, headers: dict | None = None) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", "/v1/audio/speech", body=body, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def api_error(status: int, body: bytes) -> dict:
    """OpenAI's error shape, checked."""
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str) and err["message"]
    assert "\n" not in err["message"]
    return err


async def wyoming_session(port: int, send: list, until: type, on_audio=None) -> list:
    events = []
    async with AsyncTcpClient("127.0.0.1", port) as client:
        for ev in send:
            await client.write_event(ev.event())
        while True:
            event = await asyncio.wait_for(client.read_event(), 120)
            assert event is not None, f"closed after {[e.type for e in events]}"
            events.append(event)
            if on_audio is not None and AudioChunk.is_type(event.type):
                await on_audio(client, event)
            if until.is_type(event.type) or WyError.is_type(event.type):
                return events


def wyoming_audio(events: list) -> bytes:
    types = [e.type for e in events]
    assert types[0] == "audio-start" and "audio-stop" in types, types
    start = AudioStart.from_event(events[0])
    assert (start.rate, start.width, start.channels) == (24000, 2, 1)
    return b"".join(AudioChunk.from_event(e).audio for e in events if AudioChunk.is_type(e.type))
