"""The HTTP (OpenAI-compatible) and Wyoming front ends, driven by real clients: the official
`openai` package, `curl`, and the `wyoming` package's own client, against one in-process
daemon (tiny model) that also serves its native Unix socket. Audio from each front end is
compared with what the native socket gives for the same text and seed.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading

import numpy as np
import openai
import pytest
import soundfile as sf
from nightingale import protocol as p
from nightingale.daemon.openai_api import HttpFrontend
from nightingale.daemon.wyoming_server import WyomingFrontend
from wyoming.audio import AudioStop
from wyoming.error import Error as WyError
from wyoming.info import Describe, Info
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeStopped, SynthesizeVoice

from .helpers.daemon import FAST, LONG, LONG_TEXT, DaemonThread, assert_idle, request, tiny_factory, until_done
from .helpers.frontends import api_error, post, wyoming_audio, wyoming_session

TOKEN = "s3cret"
MEDIUM = {**LONG, "max_new_tokens": 40}  # ten 4-token chunks
TWENTY = {**LONG, "max_new_tokens": 80}  # twenty: time to spare after the first one
TEXT = "Hello there."


@pytest.fixture(scope="module")
def served(tiny_checkpoint, tmp_path_factory):
    http = HttpFrontend("127.0.0.1", 0, options=FAST)
    guarded = HttpFrontend("127.0.0.1", 0, token=TOKEN, options=FAST)
    wyoming = WyomingFrontend("127.0.0.1", 0, options=FAST)
    d = DaemonThread(tmp_path_factory.mktemp("sock") / "n.sock", tiny_factory(tiny_checkpoint), frontends=[http, guarded, wyoming]).start()
    d.http, d.guarded, d.wyoming = http.bound_port, guarded.bound_port, wyoming.bound_port
    yield d
    assert d.stop() == 0


@pytest.fixture(scope="module")
def oai(served):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{served.http}/v1", api_key="unused", max_retries=0, timeout=120)


def native_s16(daemon: DaemonThread, text: str = TEXT, options: dict = FAST, voice: str | None = None) -> bytes:
    """What the native socket streams for the same request, as s16le bytes."""
    with daemon.connect() as conn:
        conn.send(p.Speak(id="n", text=text, voice=voice, output="stream", audio_format="s16le", options=options))
        events = until_done(conn, "n", timeout=120)
    assert events[-1].reason == "completed"
    return b"".join(e.pcm for e in events if isinstance(e, p.Audio))


def s16(data: bytes) -> np.ndarray:
    return np.frombuffer(data, "<i2")


def decoded(data: bytes) -> np.ndarray:
    samples, rate = sf.read(io.BytesIO(data), dtype="int16")
    assert rate == 24000 and samples.ndim == 1
    return samples


def speech_body(**fields) -> bytes:
    return json.dumps({"model": "nightingale", "voice": "default", "input": TEXT, **fields}).encode()


# ----------------------------------------------------------------------------- HTTP


@pytest.mark.parametrize("fmt", ["pcm", "wav", "flac", "mp3", "opus"])
def test_openai_one_shot_every_format(served, oai, fmt):
    want = s16(native_s16(served))
    assert len(want) > 0
    data = oai.audio.speech.create(model="tts-1", voice="default", input=TEXT, response_format=fmt).content
    if fmt == "pcm":
        got = s16(data)
    else:
        got = decoded(data)
    if fmt in ("pcm", "wav", "flac"):  # lossless: exactly the native socket's samples
        assert np.array_equal(got, want)
    else:  # lossy codecs: same duration (within encoder padding), same loudness
        assert abs(len(got) - len(want)) <= 2400, (len(got), len(want))
        rms = lambda x: float(np.sqrt(np.mean(x.astype(np.float64) ** 2)))
        assert 0.5 < rms(got) / rms(want) < 2.0


def test_openai_streaming_and_speed(served, oai):
    want = native_s16(served)
    chunks = []
    with oai.audio.speech.with_streaming_response.create(model="nightingale", voice="default", input=TEXT, response_format="pcm") as resp:
        assert resp.headers["transfer-encoding"] == "chunked"
        for chunk in resp.iter_bytes():
            chunks.append(chunk)
    assert b"".join(chunks) == want
    fast = oai.audio.speech.create(model="nightingale", voice="default", input=TEXT, response_format="pcm", speed=2.0).content
    assert abs(len(fast) // 2 - round(len(want) // 2 / 2.0)) <= 1


def test_sse_stream_format(served):
    want = native_s16(served)
    status, headers, body = post(served.http, speech_body(response_format="pcm", stream_format="sse"))
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = [json.loads(line[6:]) for line in body.decode().split("\n") if line.startswith("data: ")]
    assert [e["type"] for e in events[:-1]] == ["speech.audio.delta"] * (len(events) - 1)
    assert events[-1]["type"] == "speech.audio.done" and events[-1]["usage"]["output_tokens"] > 0
    assert b"".join(base64.b64decode(e["audio"]) for e in events[:-1]) == want


def test_first_bytes_leave_while_synthesis_runs(served):
    """The first body bytes arrive while the daemon is still synthesizing the utterance."""
    conn = http.client.HTTPConnection("127.0.0.1", served.http, timeout=120)
    body = speech_body(input=LONG_TEXT, response_format="pcm", options=TWENTY)
    conn.request("POST", "/v1/audio/speech", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    first = resp.read1(1 << 16)
    assert first
    with served.connect() as c:
        st = request(c, p.GetStatus(), p.Status)
    assert st.current is not None and st.current["id"] == "http"  # still being synthesized
    rest = resp.read()
    conn.close()
    assert first + rest == native_s16(served, LONG_TEXT, TWENTY)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is installed by .ci/run")
def test_curl_chunked_stream(served, tmp_path):
    want = native_s16(served)
    out, head = tmp_path / "out.wav", tmp_path / "headers"
    cmd = ["curl", "-sS", "-N", "--fail-with-body", "-D", str(head), "-o", str(out), "-H", "Content-Type: application/json",
           "-d", speech_body(response_format="wav").decode(), f"http://127.0.0.1:{served.http}/v1/audio/speech"]  # fmt: skip
    subprocess.run(cmd, check=True, timeout=120)
    headers = head.read_text().lower()
    assert "transfer-encoding: chunked" in headers and "content-type: audio/wav" in headers
    assert np.array_equal(decoded(out.read_bytes()), s16(want))


def test_models_and_voices(served, oai):
    ids = [m.id for m in oai.models.list()]
    assert "nightingale" in ids and "tts-1" in ids
    conn = http.client.HTTPConnection("127.0.0.1", served.http, timeout=30)
    conn.request("GET", "/v1/audio/voices")
    listing = json.loads(conn.getresponse().read())
    conn.close()
    with served.connect() as c:
        assert listing["voices"] == request(c, p.ListVoices(), p.Voices).voices


def test_bad_http_requests_get_openai_errors(served, oai):
    cases = [
        (speech_body(voice="nobody"), 400, "unknown_voice"),
        (speech_body(voice="/etc/hostname"), 400, "unknown_voice"),
        (speech_body(voice="x.pt"), 400, "unknown_voice"),
        (speech_body(input=""), 400, None),
        (speech_body(input="   "), 400, None),
        (speech_body(input=5), 400, "invalid_type"),
        (speech_body(speed="fast"), 400, "invalid_type"),
        (speech_body(speed=9), 400, None),
        (speech_body(response_format="aac"), 400, None),
        (speech_body(stream_format="video"), 400, None),
        (speech_body(options={"bogus": 1}), 400, "bad_field"),
        (speech_body(priority="urgent"), 400, "bad_field"),
        (speech_body(input="x" * (p.MAX_TEXT_BYTES + 1)), 400, "text_too_long"),
        (json.dumps({"input": TEXT, "voice": "default"}).encode(), 400, "missing_required_parameter"),
        (b"{not json", 400, "invalid_json"),
        (b"[1, 2]", 400, None),
        (b"x" * (2 << 20), 413, "request_too_large"),
    ]
    for body, status, code in cases:
        got_status, _, reply = post(served.http, body)
        assert got_status == status, (body[:80], got_status, reply[:200])
        err = api_error(got_status, reply)
        if code is not None:
            assert err["code"] == code, (body[:80], err)
    conn = http.client.HTTPConnection("127.0.0.1", served.http, timeout=30)
    conn.request("GET", "/v1/nothing")
    resp = conn.getresponse()
    assert resp.status == 404 and api_error(404, resp.read())["type"] == "invalid_request_error"
    conn.close()
    with pytest.raises(openai.BadRequestError) as exc:
        oai.audio.speech.create(model="nightingale", voice="nobody", input=TEXT)
    assert exc.value.body["code"] == "unknown_voice"
    status, _, reply = post(served.http, speech_body(), headers={})
    assert status == 200 and len(reply) > 0  # the daemon is unharmed
    assert_idle(served)


def test_bearer_token(served):
    status, _, body = post(served.guarded, speech_body(response_format="pcm"))
    assert status == 401 and api_error(status, body)["code"] == "invalid_api_key"
    status, _, body = post(served.guarded, speech_body(response_format="pcm"), headers={"Authorization": "Bearer wrong"})
    assert status == 401
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{served.guarded}/v1", api_key=TOKEN, max_retries=0, timeout=120)
    assert client.audio.speech.create(model="nightingale", voice="default", input=TEXT, response_format="pcm").content == native_s16(served)


def test_non_loopback_needs_a_token():
    with pytest.raises(ValueError, match="token"):
        HttpFrontend("0.0.0.0", 8880)
    assert HttpFrontend("0.0.0.0", 8880, token="t").token == "t"


def test_client_that_never_reads_then_leaves(served, oai):
    """A client that never reads its audio holds up nobody: the request queued behind it is
    served in full; when it leaves, the daemon returns to idle and nothing is lost."""
    with served.connect() as c:
        before = request(c, p.GetStatus(), p.Status).counters
    sock = socket.create_connection(("127.0.0.1", served.http))
    body = speech_body(input=LONG_TEXT, response_format="pcm", options=MEDIUM)
    sock.sendall(b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)  # fmt: skip
    want = native_s16(served)  # queued behind the reader-less request, at the same priority
    assert oai.audio.speech.create(model="nightingale", voice="default", input=TEXT, response_format="pcm").content == want
    sock.close()
    st = assert_idle(served, timeout=60)
    ended = lambda c: c["completed"] + c["cancelled"]
    assert ended(st.counters) - ended(before) == 3 and st.counters["failed"] == before["failed"]
    assert st.clients == 1  # only the status connection: the HTTP request is gone


def test_cli_refuses_http_off_loopback_without_token(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "nightingale.cli",
        "serve",
        "--no-playback",
        "--socket",
        str(tmp_path / "s"),
        "--http",
        "0.0.0.0:8880",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env={**os.environ, "NIGHTINGALE_HTTP_TOKEN": ""})
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "token" in res.stderr
    for bad, words in (('{"bogus": 1}', "unknown option"), ("[1]", "JSON object"), ("{", "not JSON")):
        cmd = [sys.executable, "-m", "nightingale.cli", "serve", "--no-playback", "--socket", str(tmp_path / "s"),
               "--wyoming", "tcp://127.0.0.1:0", "--frontend-options", bad]  # fmt: skip
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert res.returncode == 2 and words in res.stderr and res.stderr.strip().count("\n") == 0, res.stderr


def test_disconnect_cancels_the_request(served):
    with served.connect() as c:
        before = request(c, p.GetStatus(), p.Status).counters["cancelled"]
    conn = http.client.HTTPConnection("127.0.0.1", served.http, timeout=120)
    conn.request("POST", "/v1/audio/speech", body=speech_body(input=LONG_TEXT, response_format="pcm", options=LONG),
                 headers={"Content-Type": "application/json"})  # fmt: skip
    resp = conn.getresponse()
    assert resp.read1(1 << 16)
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    st = assert_idle(served, timeout=60)
    assert st.counters["cancelled"] == before + 1


# ----------------------------------------------------------------------------- Wyoming


def test_wyoming_describe(served):
    events = asyncio.run(wyoming_session(served.wyoming, [Describe()], Info))
    info = Info.from_event(events[-1])
    (program,) = info.tts
    assert program.name == "nightingale" and program.supports_synthesize_streaming
    with served.connect() as c:
        assert [v.name for v in program.voices] == request(c, p.ListVoices(), p.Voices).voices
    assert all(v.languages == ["en"] for v in program.voices)


def test_wyoming_one_shot(served):
    want = native_s16(served)
    events = asyncio.run(wyoming_session(served.wyoming, [Synthesize(text=TEXT, voice=SynthesizeVoice(name="default"))], AudioStop))
    assert wyoming_audio(events) == want


def test_wyoming_streaming_speaks_before_the_text_ends(served):
    """Home Assistant's streaming path: the second chunk is sent only after audio of the
    first sentence has arrived."""
    first, second = "Hello there. ", "How are you?"
    sent = []

    async def on_audio(client, event):
        if not sent:
            sent.append(True)
            await client.write_event(SynthesizeChunk(text=second).event())
            await client.write_event(Synthesize(text=first + second).event())  # HA also sends the whole text
            await client.write_event(SynthesizeStop().event())

    events = asyncio.run(
        wyoming_session(
            served.wyoming,
            [SynthesizeStart(voice=SynthesizeVoice(name="default")), SynthesizeChunk(text=first)],
            SynthesizeStopped,
            on_audio,
        )
    )
    assert sent and events[-1].type == "synthesize-stopped"
    audio = wyoming_audio(events[:-1])
    # The same text as one native text stream fed the same way gives the same samples.
    with served.connect() as conn:
        conn.send(p.Speak(id="s", stream=True, output="stream", audio_format="s16le", options=FAST))
        conn.send(p.SpeakText(id="s", text=first))
        conn.send(p.SpeakText(id="s", text=second))
        conn.send(p.SpeakEnd(id="s"))
        native = until_done(conn, "s", timeout=120)
    assert native[-1].reason == "completed"
    assert len(audio) == len(b"".join(e.pcm for e in native if isinstance(e, p.Audio)))


def test_wyoming_client_that_never_reads(served):
    """A Wyoming client that sends a request and never reads holds up nobody; leaving
    ends its request; the status counters see both requests."""
    with served.connect() as c:
        before = request(c, p.GetStatus(), p.Status)
    sock = socket.create_connection(("127.0.0.1", served.wyoming))
    sock.sendall(b'{"type": "synthesize", "data": {"text": "Nobody will read this."}}\n')
    events = asyncio.run(wyoming_session(served.wyoming, [Synthesize(text=TEXT)], AudioStop))
    assert wyoming_audio(events) == native_s16(served)
    sock.close()
    st = assert_idle(served, timeout=60)
    ended = lambda c: c["completed"] + c["cancelled"]  # noqa: E731
    assert ended(st.counters) - ended(before.counters) == 3 and st.counters["failed"] == before.counters["failed"]
    assert st.counters["connections"] - before.counters["connections"] >= 3  # front-end requests count as clients
    assert st.metrics["utterances"] >= min(50, before.metrics["utterances"] + 2)
    assert st.clients == 1


def test_wyoming_bad_requests(served):
    cases = [
        [Synthesize(text=TEXT, voice=SynthesizeVoice(name="nobody"))],
        [Synthesize(text=TEXT, voice=SynthesizeVoice(name="../conds.pt"))],
        [SynthesizeChunk(text="no start")],
        [Synthesize(text="  ")],
    ]
    for send in cases:
        events = asyncio.run(wyoming_session(served.wyoming, send, AudioStop))
        err = WyError.from_event(events[-1])
        assert err.text and "\n" not in err.text
    assert (
        WyError.from_event(
            asyncio.run(wyoming_session(served.wyoming, [Synthesize(text="x" * (p.MAX_TEXT_BYTES + 1))], AudioStop))[-1]
        ).code
        == "text_too_long"
    )

    async def oversized() -> list:
        reader, writer = await asyncio.open_connection("127.0.0.1", served.wyoming)
        writer.write(b'{"type": "synthesize", "data_length": 99999999}\n')
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 30)
        rest = await asyncio.wait_for(reader.read(), 30)  # then the daemon closes it
        writer.close()
        return [json.loads(line), rest]

    header, _ = asyncio.run(oversized())
    assert header["type"] == "error"
    assert asyncio.run(wyoming_session(served.wyoming, [Synthesize(text=TEXT)], AudioStop))[0].type == "audio-start"
    assert_idle(served)


# ----------------------------------------------------------------------------- everyone at once


def test_concurrent_clients_of_every_protocol(served, oai):
    """Native, HTTP and Wyoming clients at once: every one gets its complete audio."""
    texts = [f"Client number {i}." for i in range(12)]
    expected = {t: native_s16(served, t) for t in texts[:3]}
    results: dict[int, bytes | BaseException] = {}
    start = threading.Barrier(len(texts))

    def run(i: int) -> None:
        text = texts[i]
        try:
            start.wait(30)
            if i % 3 == 0:
                results[i] = native_s16(served, text)
            elif i % 3 == 1:
                results[i] = oai.audio.speech.create(model="nightingale", voice="default", input=text, response_format="pcm").content
            else:
                events = asyncio.run(wyoming_session(served.wyoming, [Synthesize(text=text)], AudioStop))
                results[i] = wyoming_audio(events)
        except BaseException as err:
            results[i] = err

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for i, res in sorted(results.items()):
        assert not isinstance(res, BaseException), f"client {i}: {res!r}"
        assert len(res) > 0 and len(res) % (960 * 2) == 0  # whole speech tokens, nothing cut
        if texts[i] in expected:
            assert res == expected[texts[i]]
    assert len(results) == len(texts)
    st = assert_idle(served)
    assert st.clients == 1


def test_drain_finishes_the_http_stream_then_stops(tiny_checkpoint, tmp_path):
    """SIGTERM-style shutdown while an HTTP response streams: the utterance is finished
    (within --drain-timeout), the response completes, and the daemon exits cleanly."""
    front = HttpFrontend("127.0.0.1", 0)
    d = DaemonThread(tmp_path / "n.sock", tiny_factory(tiny_checkpoint), frontends=[front], drain_timeout_s=60.0).start()
    try:
        want = native_s16(d, LONG_TEXT, MEDIUM)
        conn = http.client.HTTPConnection("127.0.0.1", front.bound_port, timeout=120)
        conn.request("POST", "/v1/audio/speech", body=speech_body(input=LONG_TEXT, response_format="pcm", options=MEDIUM),
                     headers={"Content-Type": "application/json"})  # fmt: skip
        resp = conn.getresponse()
        first = resp.read1(1 << 16)
        assert resp.status == 200 and first
        d.daemon.request_shutdown()
        data = first + resp.read()
        conn.close()
        assert data == want  # the whole utterance
    finally:
        assert d.stop() == 0


def test_reaper_ticks_while_front_end_requests_run(tiny_checkpoint, tmp_path):
    """The daemon's idle/frame reaper walks every session, front-end peers included: with it
    ticking every 50 ms, an HTTP request that outlasts many ticks still completes, and the
    daemon stays up and exits cleanly (a peer missing an attribute the reaper reads used to
    kill the daemon's task group)."""
    front = HttpFrontend("127.0.0.1", 0, options=FAST)
    d = DaemonThread(tmp_path / "n.sock", tiny_factory(tiny_checkpoint), frontends=[front], frame_timeout_s=0.2).start()
    try:
        want = native_s16(d, LONG_TEXT, MEDIUM)
        status, _, body = post(front.bound_port, speech_body(input=LONG_TEXT, response_format="pcm", options=MEDIUM))
        assert status == 200 and body == want
        assert_idle(d)
    finally:
        assert d.stop() == 0


def test_a_front_end_request_that_stops_reading_ends_with_slow_client():
    """The slow-client rule drops a front end's peer as it drops a socket client: its
    utterance is cancelled and the handle ends with `slow_client` (a local peer once had no
    way to be dropped, and its request hung until the HTTP client left)."""
    from nightingale.daemon.frontend import Frontdoor
    from nightingale.daemon.requests import Requests
    from nightingale.daemon.scheduler import Scheduler
    from nightingale.daemon.telemetry import Telemetry

    async def main() -> list[p.Event]:
        scheduler = Scheduler(4, Telemetry("unused"), announce_ready=lambda: None, stop_daemon=lambda code: None)
        scheduler.state = "ready"  # no engine: the utterance waits in the queue
        door = Frontdoor(scheduler, Requests(scheduler, shutdown=lambda: None))
        handle = door.submit(p.Speak(text=TEXT))
        (peer,) = list(scheduler.peers)
        peer.slow = True  # as when its outbox overflowed
        scheduler.drop_slow(peer)
        events = [e async for e in handle]
        assert not scheduler.peers and len(scheduler.queue) == 0
        assert scheduler.telemetry.counters["cancelled"] == 1 and scheduler.telemetry.counters["errors"] == 1
        return events

    events = asyncio.run(main())
    assert [type(e) for e in events] == [p.Accepted, p.Error] and events[-1].code == p.E_SLOW_CLIENT
