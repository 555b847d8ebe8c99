"""The daemon in-process: a real Unix socket, the real engine thread, the tiny model.

One daemon (local playback off) serves most tests of this module, so the model loads once.
Real playback is tested in test_playback.py, the CLI daemon as a process (signals) in
test_daemon_process.py. DaemonThread and the other helpers: tests/helpers/daemon.py.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import threading

import numpy as np
import pytest

from nightingale import protocol as p
from nightingale.daemon.binding import SocketBinding, SocketInUse

from .helpers.daemon import (
    FAST,
    LONG,
    LONG_TEXT,
    TIMEOUT,
    EVERY_OPTION,
    DaemonThread,
    assert_idle,
    pcm_of,
    request,
    tiny_factory,
    until_done,
    wait_for,
)


@pytest.fixture(scope="module")
def daemon(tiny_checkpoint, tmp_path_factory):
    d = DaemonThread(tmp_path_factory.mktemp("sock") / "n.sock", tiny_factory(tiny_checkpoint)).start()
    yield d
    assert d.stop() == 0


@pytest.fixture
def conn(daemon):
    with daemon.connect() as c:
        yield c


# ----------------------------------------------------------------------------- basics


def test_hello_status_voices_ping(daemon, conn):
    assert conn.hello.state == "ready" and conn.hello.sample_rate == 24000
    assert conn.hello.protocol == 1 and conn.hello.playback is False
    st = request(conn, p.GetStatus(ref="s"), p.Status)
    assert st.ref == "s" and st.state == "ready" and st.pid == os.getpid()
    assert st.uptime_s > 0 and st.model["size"] == "tiny" and st.model["sample_rate"] == 24000
    assert st.queue_depth == 0 and st.current is None and st.paused is False
    assert st.playback["available"] is False and "--no-playback" in st.playback["reason"]
    assert st.memory["rss_mb"] > 0 and "mlx_active_mb" in st.memory
    assert st.clients >= 1
    assert "default" in request(conn, p.ListVoices(), p.Voices).voices
    assert request(conn, p.Ping(ref="pp"), p.Pong).state == "ready"
    assert isinstance(request(conn, p.Pause(), p.Paused), p.Paused)
    assert request(conn, p.GetStatus(), p.Status).paused is True
    assert isinstance(request(conn, p.Resume(), p.Resumed), p.Resumed)


def test_speak_streams_exactly_what_the_model_generates(daemon, conn, tiny_model):
    text = "Hello there."
    conn.send(p.Speak(id="a", text=text, output="stream", options=FAST))
    events = until_done(conn, "a")
    kinds = [type(e).__name__ for e in events]
    assert kinds[0] == "Accepted" and kinds[1] == "Started" and kinds[-1] == "Done"
    assert "Audio" in kinds and "Progress" in kinds
    done = events[-1]
    assert done.reason == "completed" and done.tokens > 0 and done.chunks >= 1
    assert done.ttfa_ms > 0 and done.first_audio_ms >= done.ttfa_ms and done.rtf > 0
    assert done.wait_ms is not None and done.t3_tokens_per_s > 0 and done.s3gen_ms_per_chunk > 0
    got = pcm_of(events, "a")
    assert len(got) == done.tokens * 960 == round(done.audio_s * 24000)
    # The same request straight through the model, in this thread: identical audio.
    want = np.concatenate([c.samples for c in tiny_model.stream(text, **FAST)])
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_every_speak_option_reaches_the_model(daemon, conn, tiny_model):
    assert set(EVERY_OPTION) == set(p.SPEAK_OPTIONS)
    conn.send(p.Speak(id="all", text="Hello there.", output="stream", options=EVERY_OPTION))
    events = until_done(conn, "all")
    assert events[-1].reason == "completed" and not any(isinstance(e, p.Error) for e in events)
    want = np.concatenate([c.samples for c in tiny_model.stream("Hello there.", **EVERY_OPTION)])
    assert len(want) > 0
    np.testing.assert_allclose(pcm_of(events, "all"), want, atol=1e-5)


def test_turbo_takes_every_option_and_ignores_the_original_models_own(tiny_turbo_checkpoint, tiny_turbo_model, tmp_path):
    """Turbo has no CFG, exaggeration or min-p; like the reference it ignores those options
    (README, "Chatterbox Turbo") rather than refusing them: the audio is the same without them."""
    own = {k: v for k, v in EVERY_OPTION.items() if k not in ("cfg_weight", "exaggeration", "min_p")}
    d = DaemonThread(tmp_path / "n.sock", tiny_factory(tiny_turbo_checkpoint)).start()
    try:
        with d.connect() as c:
            c.send(p.Speak(id="all", text="Hello there.", output="stream", options=EVERY_OPTION))
            events = until_done(c, "all")
    finally:
        assert d.stop() == 0
    assert events[-1].reason == "completed" and not any(isinstance(e, p.Error) for e in events)
    want = np.concatenate([c.samples for c in tiny_turbo_model.stream("Hello there.", **own)])
    assert len(want) > 0
    np.testing.assert_allclose(pcm_of(events, "all"), want, atol=1e-5)


def test_s16le_audio(daemon, conn):
    conn.send(p.Speak(id="f", text="Hello there.", output="stream", audio_format="s16le", options=FAST))
    events = until_done(conn, "f")
    conn.send(p.Speak(id="g", text="Hello there.", output="stream", options=FAST))
    ref = pcm_of(until_done(conn, "g"), "g")
    got = pcm_of(events, "f")
    assert all(e.format == "s16le" for e in events if isinstance(e, p.Audio))
    np.testing.assert_allclose(got, np.clip(ref, -1, 1), atol=1.0 / 32767 + 1e-6)


def test_text_stream_speaks_before_the_input_ends(daemon, conn):
    conn.send(p.Speak(id="s", stream=True, output="stream", options=FAST))
    wait_for(conn, p.Accepted, id="s")
    conn.send(p.SpeakText(id="s", text="Hello there. And the"))
    # Audio of the first sentence arrives while the second is still incomplete.
    first = wait_for(conn, p.Audio, id="s")
    assert first.seq == 0
    conn.send(p.SpeakText(id="s", text=" rest of it"))
    conn.send(p.SpeakEnd(id="s"))
    events = until_done(conn, "s")
    segments = {e.segment for e in events if isinstance(e, p.Progress)}
    assert events[-1].reason == "completed" and segments <= {0, 1} and 1 in segments
    conn.send(p.SpeakText(id="s", text="late"))
    assert wait_for(conn, p.Error).code == p.E_UNKNOWN_ID


def test_status_reports_recent_metrics(daemon, conn):
    conn.send(p.Speak(id="m", text="Hi.", output="stream", options=FAST))
    until_done(conn, "m")
    st = request(conn, p.GetStatus(), p.Status)
    m = st.metrics
    assert m["utterances"] >= 1
    for key in ("ttfa_ms", "first_audio_ms", "rtf", "t3_tokens_per_s", "s3gen_ms_per_chunk"):
        assert m[key]["last"] is not None and m[key]["p50"] is not None, key
    assert m["underruns"] == 0 and st.counters["completed"] >= 1


# ----------------------------------------------------------------------------- bad input


def _bad_inputs() -> list[tuple[bytes, str]]:
    import msgpack

    def frame(body: bytes) -> bytes:
        return p.HEADER.pack(len(body)) + body

    bad_utf8 = b"\x83" + msgpack.packb("v") + msgpack.packb(1) + msgpack.packb("type") + msgpack.packb("speak") + msgpack.packb("text") + b"\xa2\xff\xfe"
    oversized = p.HEADER.pack(p.MAX_FRAME_BYTES + 10) + b"\x00" * (p.MAX_FRAME_BYTES + 10)
    return [
        (frame(b"\xc1\xc1\xc1"), p.E_BAD_FRAME),
        (frame(msgpack.packb("just a string")), p.E_BAD_FRAME),
        (frame(bad_utf8), p.E_BAD_UTF8),
        (oversized, p.E_FRAME_TOO_LARGE),
        (frame(msgpack.packb({"v": 99, "type": "ping"})), p.E_VERSION),
        (frame(msgpack.packb({"type": "ping"})), p.E_VERSION),
        (frame(msgpack.packb({"v": 1, "type": "explode"})), p.E_UNKNOWN_TYPE),
        (frame(msgpack.packb({"v": 1, "type": "speak", "text": ["not", "text"]})), p.E_BAD_FIELD),
        (frame(msgpack.packb({"v": 1, "type": "speak", "text": "x", "priority": 3})), p.E_BAD_FIELD),
        (frame(msgpack.packb({"v": 1, "type": "cancel", "id": 5})), p.E_BAD_FIELD),
        (frame(msgpack.packb({"v": 1, "type": "speak", "text": "é" * p.MAX_TEXT_BYTES})), p.E_TEXT_TOO_LONG),
    ]  # fmt: skip


def test_malformed_frames_get_errors_and_nobody_else_notices(daemon):
    with daemon.connect() as bystander, daemon.connect() as attacker:
        bystander.send(p.Speak(id="b", text=LONG_TEXT, output="stream", options={**FAST, "max_new_tokens": 12}))
        wait_for(bystander, p.Accepted, id="b")
        for data, code in _bad_inputs():
            attacker.send_raw(data)
            err = wait_for(attacker, p.Error, timeout=10)
            assert err.code == code, (code, err)
            assert err.message
            # The same connection still works after each bad frame.
            assert request(attacker, p.Ping(), p.Pong).state == "ready"
        events = until_done(bystander, "b")
        assert events[-1].reason == "completed"
        assert not any(isinstance(e, p.Error) for e in events)
    # A frame cut short by a disconnect is not an error for anyone else.
    with daemon.connect() as c:
        c.send_raw(p.encode_frame(p.Speak(text="never finished"))[:9])
    with daemon.connect() as c:
        assert request(c, p.Ping(), p.Pong).state == "ready"


def test_bad_requests_are_refused_with_reasons(daemon, conn):
    conn.send(p.Speak(id="x", text="Hi.", output="play"))
    err = wait_for(conn, p.Error)
    assert err.code == p.E_NO_PLAYBACK and "--no-playback" in err.message and err.id == "x"
    conn.send(p.Speak(id="d", text=LONG_TEXT, output="stream", options=LONG))
    wait_for(conn, p.Accepted, id="d")
    conn.send(p.Speak(id="d", text="again", output="stream"))
    assert wait_for(conn, p.Error).code == p.E_DUPLICATE_ID
    conn.send(p.Cancel(id="nope"))
    assert wait_for(conn, p.Error).code == p.E_UNKNOWN_ID
    conn.send(p.SpeakText(id="d", text="more"))  # d was not opened as a text stream
    assert wait_for(conn, p.Error).code == p.E_UNKNOWN_ID
    conn.send(p.Cancel(id="d"))
    wait_for(conn, p.Done, id="d")
    conn.send(p.Speak(id="v", text="Hi.", voice="no-such-voice", output="stream", options=FAST))
    err = wait_for(conn, p.Error, id="v")
    assert err.code == p.E_UNKNOWN_VOICE and "no-such-voice" in err.message
    assert wait_for(conn, p.Done, id="v").reason == "failed"
    conn.send(p.Speak(text="auto id", output="stream", options=FAST, ref="auto"))
    acc = wait_for(conn, p.Accepted, ref="auto")
    assert acc.id.startswith("u")
    assert wait_for(conn, p.Done, id=acc.id).reason == "completed"


# ----------------------------------------------------------------------------- many clients


def test_twenty_concurrent_clients(daemon):
    n = 20
    results: dict[int, tuple[list, np.ndarray] | BaseException] = {}
    start = threading.Barrier(n)

    def client(i: int) -> None:
        try:
            with daemon.connect() as c:
                start.wait(30)
                c.send(p.Speak(id=f"c{i}", text=f"Client number {i}.", output="stream", options={**FAST, "max_new_tokens": 4}))
                events = until_done(c, f"c{i}", timeout=120)
                results[i] = (events, pcm_of(events, f"c{i}"))
        except BaseException as err:
            results[i] = err

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert len(results) == n
    for i, res in results.items():
        assert not isinstance(res, BaseException), f"client {i}: {res!r}"
        events, pcm = res
        done = events[-1]
        assert done.reason == "completed" and done.id == f"c{i}"
        assert len(pcm) == done.tokens * 960 > 0
        assert not any(isinstance(e, p.Error) for e in events)
        assert all(getattr(e, "id", f"c{i}") == f"c{i}" for e in events)  # nobody else's events
    st = assert_idle(daemon)
    assert st.clients == 1


def test_client_killed_mid_stream(daemon):
    code = f"""
import sys
from nightingale import protocol as p
from nightingale.client.connection import Connection
c = Connection({str(daemon.path)!r}, timeout=60)
c.send(p.Speak(id="k", text={LONG_TEXT!r}, output="stream", options={LONG!r}))
while not isinstance(c.recv(60), p.Audio):
    pass
print("streaming", flush=True)
sys.stdin.read()
"""
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "streaming"
        with daemon.connect() as c:
            before = request(c, p.GetStatus(), p.Status).counters["cancelled"]
            proc.kill()
            proc.wait(10)
            st = assert_idle(daemon)
            assert st.counters["cancelled"] == before + 1
            c.send(p.Speak(id="after", text="Still here.", output="stream", options=FAST))
            assert until_done(c, "after")[-1].reason == "completed"
    finally:
        if proc.poll() is None:
            proc.kill()


# ----------------------------------------------------------------------------- cancel and priority


def test_cancel_takes_effect_within_one_chunk(daemon, conn):
    conn.send(p.Speak(id="long", text=LONG_TEXT, output="stream", options=LONG))
    wait_for(conn, p.Progress, id="long")
    conn.send(p.Cancel(id="long", ref="c"))
    after: list[p.Event] = []
    while True:
        ev = conn.recv(TIMEOUT)
        after.append(ev)
        if isinstance(ev, p.Done):
            break
    cancelled = next(e for e in after if isinstance(e, p.Cancelled))
    assert cancelled.ids == ["long"] and cancelled.ref == "c"
    assert after[-1].reason == "cancelled" and after[-1].id == "long"
    # At most the chunk that was being computed when the cancel arrived slips out.
    assert sum(isinstance(e, p.Progress) for e in after) <= 1
    assert assert_idle(daemon).current is None


def test_cancel_all_reaches_every_client(daemon):
    with daemon.connect() as a, daemon.connect() as b, daemon.connect() as boss:
        a.send(p.Speak(id="a", text=LONG_TEXT, output="stream", options=LONG))
        b.send(p.Speak(id="b", text=LONG_TEXT, output="stream", options=LONG))
        wait_for(a, p.Progress, id="a")
        wait_for(b, p.Accepted, id="b")
        got = request(boss, p.Cancel(all=True), p.Cancelled)
        assert sorted(got.ids) == ["a", "b"]
        assert wait_for(a, p.Done, id="a").reason == "cancelled"
        assert wait_for(b, p.Done, id="b").reason == "cancelled"
    assert_idle(daemon)


def test_important_preempts_and_message_waits(daemon):
    with daemon.connect() as a, daemon.connect() as b, daemon.connect() as c:
        a.send(p.Speak(id="m1", text=LONG_TEXT, output="stream", options=LONG))
        wait_for(a, p.Progress, id="m1")
        # A second message queues behind the first instead of interrupting it.
        b.send(p.Speak(id="m2", text="Second in line.", output="stream", options=FAST))
        assert wait_for(b, p.Accepted, id="m2").position == 1
        # An important message cuts the speaking message; the queued one is postponed.
        c.send(p.Speak(id="i", text="Important news.", priority="important", output="stream", options=FAST))
        assert wait_for(c, p.Accepted, id="i").position == 0
        done = wait_for(a, p.Done, id="m1")
        assert done.reason == "preempted" and "important" in done.detail
        c_events = until_done(c, "i")
        b_events = until_done(b, "m2")
        assert c_events[-1].reason == b_events[-1].reason == "completed"
        started_i = next(e for e in c_events if isinstance(e, p.Started))
        started_m2 = next(e for e in b_events if isinstance(e, p.Started))
        assert started_i.wait_ms < started_m2.wait_ms
    assert_idle(daemon)


def test_text_interrupts_itself_and_notifications_yield(daemon):
    with daemon.connect() as a, daemon.connect() as b:
        a.send(p.Speak(id="t1", text=LONG_TEXT, priority="text", output="stream", options=LONG))
        wait_for(a, p.Progress, id="t1")
        b.send(p.Speak(id="n", text="Psst.", priority="notification", output="stream", options=FAST))
        assert wait_for(b, p.Done, id="n").reason == "preempted"  # discarded: t1 is speaking
        b.send(p.Speak(id="t2", text="Newer text.", priority="text", output="stream", options=FAST))
        assert wait_for(a, p.Done, id="t1").reason == "preempted"
        assert until_done(b, "t2")[-1].reason == "completed"
    assert_idle(daemon)


def test_full_queue_answers_busy(daemon):
    daemon.daemon.scheduler.queue.max_size = 2
    try:
        with daemon.connect() as c:
            c.send(p.Speak(id="run", text=LONG_TEXT, output="stream", options=LONG))
            wait_for(c, p.Progress, id="run")
            for uid in ("q1", "q2"):
                c.send(p.Speak(id=uid, text="Queued.", output="stream", options=FAST))
                wait_for(c, p.Accepted, id=uid)
            c.send(p.Speak(id="q3", text="No room.", output="stream", options=FAST))
            err = wait_for(c, p.Error, id="q3")
            assert err.code == p.E_BUSY and "full" in err.message
            assert request(c, p.Cancel(all=True), p.Cancelled).ids.__len__() == 3
    finally:
        daemon.daemon.scheduler.queue.max_size = 64
    assert_idle(daemon)


# ----------------------------------------------------------------------------- lifecycle


def test_loading_is_answered_until_ready(tiny_checkpoint, tmp_path):
    gate = threading.Event()
    load = tiny_factory(tiny_checkpoint)

    def slow_factory():
        assert gate.wait(TIMEOUT)
        return load()

    d = DaemonThread(tmp_path / "l.sock", slow_factory).start(wait_ready=False)
    try:
        with d.connect() as c:
            assert c.hello.state == "loading" and c.hello.sample_rate is None
            assert request(c, p.Ping(), p.Pong).state == "loading"
            assert request(c, p.GetStatus(), p.Status).state == "loading"
            c.send(p.Speak(id="early", text="Too soon.", output="stream", ref="e"))
            loading = wait_for(c, p.Loading, ref="e")
            assert loading.request == "speak" and loading.id == "early"
            assert request(c, p.ListVoices(), p.Loading).request == "voices"
            gate.set()
            ready = wait_for(c, p.Ready)
            assert ready.sample_rate == 24000 and "tiny" in ready.model
            c.send(p.Speak(id="now", text="Now.", output="stream", options=FAST))
            assert until_done(c, "now")[-1].reason == "completed"
    finally:
        gate.set()
        assert d.stop() == 0
    assert not (tmp_path / "l.sock").exists()


def test_load_failure_is_reported_and_the_daemon_exits(tmp_path):
    def broken():
        raise FileNotFoundError("no checkpoint here")

    d = DaemonThread(tmp_path / "f.sock", broken)
    d._thread.start()
    d._thread.join(TIMEOUT)
    assert d.exit_code == 1 and d.error is None
    assert not (tmp_path / "f.sock").exists()


def test_shutdown_request_drains(tiny_checkpoint, tmp_path):
    d = DaemonThread(tmp_path / "s.sock", tiny_factory(tiny_checkpoint)).start()
    with d.connect() as c, d.connect() as other:
        c.send(p.Speak(id="last", text="Finish me.", output="stream", options=FAST))
        c.send(p.Speak(id="queued", text="Never spoken.", output="stream", options=FAST))
        wait_for(c, p.Started, id="last")
        other.send(p.Shutdown(ref="bye"))
        assert isinstance(wait_for(other, p.ShuttingDown, ref="bye"), p.ShuttingDown)
        events = []
        while (ev := c.recv(TIMEOUT)) is not None:
            events.append(ev)
        dones = {e.id: e.reason for e in events if isinstance(e, p.Done)}
        assert dones == {"last": "completed", "queued": "cancelled"}
        assert any(isinstance(e, p.ShuttingDown) for e in events)
    d._thread.join(TIMEOUT)
    assert d.exit_code == 0 and not (tmp_path / "s.sock").exists()


# ----------------------------------------------------------------------------- the socket


def test_socket_modes_and_directory(tmp_path):
    path = tmp_path / "run" / "deep" / "n.sock"
    b = SocketBinding(path)
    b.bind()
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
        assert stat.S_ISSOCK(os.stat(path).st_mode)
    finally:
        b.close()
    assert not path.exists()


def test_one_daemon_per_socket(tmp_path):
    path = tmp_path / "one.sock"
    first = SocketBinding(path)
    first.bind()
    try:
        with pytest.raises(SocketInUse, match=f"pid {os.getpid()}"):
            SocketBinding(path).bind()
        assert path.exists()  # the loser leaves the winner's socket alone
    finally:
        first.close()


def test_stale_socket_is_replaced_but_a_live_one_is_not(tmp_path):
    path = tmp_path / "stale.sock"
    crashed = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    crashed.bind(str(path))  # a socket file nobody listens on: what a crash leaves
    crashed.close()
    b = SocketBinding(path)
    b.bind()
    b.close()
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(path))
    live.listen(1)
    try:
        with pytest.raises(SocketInUse, match="listening"):
            SocketBinding(path).bind()
    finally:
        live.close()
    path.unlink()
    path.write_text("not a socket")
    with pytest.raises(SocketInUse, match="not a socket"):
        SocketBinding(path).bind()
