"""A hostile local client against the real daemon (tiny checkpoint, real Unix sockets).

Each test reproduces one item of issue 13 (daemon hardening) and checks that it now gets a
clear error or bounded behaviour.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time

import pytest

from nightingale import protocol as p
from nightingale.client.connection import Connection
from nightingale.models.chunks import Cancelled

from .helpers.daemon import (
    FAST,
    TIMEOUT,
    CountdownEvent,
    DaemonThread,
    assert_idle,
    connect_when_up,
    request,
    serve,
    tiny_factory,
    until_done,
    wait_for,
)

# A 12-token first chunk (its `progress` says the engine is in the utterance), then one
# chunk of ~300 tokens with 100 CFM steps: half a minute of S3Gen on the tiny model on an
# idle 2-core machine, all inside one chunk.
# first_chunk_timesteps: the first chunk takes as many CFM steps as the rest (by default
# it takes 4, models/streaming.py), so it measures what a chunk costs
HEAVY = {"seed": 3, "max_new_tokens": 400, "n_timesteps": 100, "first_chunk_timesteps": 100, "chunk_schedule": "12,10,1000"}
HEAVY_TEXT = "Hello there, this is a rather longer test sentence that keeps the tiny model busy for a while"


@pytest.fixture(scope="module")
def daemon(tiny_checkpoint, tmp_path_factory):
    d = DaemonThread(tmp_path_factory.mktemp("hostile") / "h.sock", tiny_factory(tiny_checkpoint)).start()
    yield d
    assert d.stop() == 0


# ----------------------------------------------------------------------------- cancel inside a chunk


def test_model_stream_stops_between_cfm_steps(tiny_model):
    # 100,000 CFM steps would take hours; the event is set at its 40th check. (T3's own
    # thread checks it too, so a few more checks happen around the one that stops.)
    cancel = CountdownEvent(40)
    with pytest.raises(Cancelled):
        for _ in tiny_model.stream(HEAVY_TEXT, seed=1, max_new_tokens=60, n_timesteps=100_000, chunk_schedule="48", cancel=cancel):
            pass
    assert 40 <= cancel.calls < 60


def test_model_stream_stops_between_t3_steps(tiny_model):
    # A chunk of 1000 tokens: T3 runs to its budget before any S3Gen call; cancel at token 5.
    cancel = CountdownEvent(5)
    taken = []
    with pytest.raises(Cancelled):
        tokens = tiny_model.generate_tokens(HEAVY_TEXT, seed=1, max_new_tokens=200, cancel=cancel)
        for token in tokens:
            taken.append(token)
    assert len(taken) < 5
    # A set event stops the stream before any audio.
    done = threading.Event()
    done.set()
    with pytest.raises(Cancelled):
        next(iter(tiny_model.stream(HEAVY_TEXT, seed=1, max_new_tokens=20, cancel=done)))


def test_cancel_frees_the_engine_inside_a_long_chunk(daemon):
    # Measured in CPU seconds of this process (the daemon runs on its threads here), which a
    # busy machine does not inflate as it does wall time.
    with daemon.connect() as conn:
        conn.send(p.Speak(id="heavy", text=HEAVY_TEXT, output="stream", options={**HEAVY, "n_timesteps": 40, "first_chunk_timesteps": 40}))
        wait_for(conn, p.Started, id="heavy")
        cpu_started = time.process_time()
        wait_for(conn, p.Progress, id="heavy")
        first_chunk_cpu = time.process_time() - cpu_started
        cpu_cancel = time.process_time()
        conn.send(p.Cancel(id="heavy"))
        assert wait_for(conn, p.Done, id="heavy").reason == "cancelled"
        # The engine is free again: the next (one-step, 6-token) utterance completes with a
        # fraction of the first chunk's work, instead of after the rest of the second chunk,
        # which has more tokens and the same steps as the first, so costs more than it did.
        conn.send(p.Speak(id="next", text="Hi.", output="stream", options=FAST))
        assert until_done(conn, "next")[-1].reason == "completed"
        assert time.process_time() - cpu_cancel < first_chunk_cpu / 2
    assert assert_idle(daemon).current is None


def test_sigterm_inside_a_long_chunk_exits_0(tiny_checkpoint, tmp_path):
    sock = tmp_path / "t.sock"
    proc = serve(tiny_checkpoint, sock, "--no-playback", "--drain-timeout", "0.5")
    try:
        with connect_when_up(sock, proc) as conn:
            if conn.hello.state != "ready":
                wait_for(conn, p.Ready)
            conn.send(p.Speak(id="heavy", text=HEAVY_TEXT, output="stream", options=HEAVY))
            wait_for(conn, p.Progress, id="heavy")
            proc.send_signal(signal.SIGTERM)
            done = wait_for(conn, p.Done, id="heavy")
            assert done.reason == "cancelled"
        out, _ = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 0, out
        assert "Traceback" not in out and "still busy" not in out
        assert not sock.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ----------------------------------------------------------------------------- option bounds


def _raw(conn: Connection, body: dict) -> None:
    import msgpack

    data = msgpack.packb(body)
    conn.send_raw(p.HEADER.pack(len(data)) + data)


BAD_OPTIONS = [
    ({"n_timesteps": 1_000_000}, "n_timesteps", "1..100"),
    ({"n_timesteps": 0}, "n_timesteps", "1..100"),
    ({"max_new_tokens": 10**9}, "max_new_tokens", "1..4096"),
    ({"exaggeration": float("nan")}, "exaggeration", "0..2"),
    ({"exaggeration": float("inf")}, "exaggeration", "0..2"),
    ({"temperature": -float("inf")}, "temperature", "0..5"),
    ({"repetition_penalty": float("nan")}, "repetition_penalty", "1..5"),
    ({"top_p": 0.0}, "top_p", "0.01..1"),
    ({"cfg_weight": 1e300}, "cfg_weight", "0..5"),
    ({"seed": -1}, "seed", "0.."),
    ({"seed": True}, "seed", "integer"),
    ({"n_timesteps": 2.0}, "n_timesteps", "integer"),
    ({"chunk_schedule": "abc"}, "chunk_schedule", "4..1000"),
    ({"chunk_schedule": "0,0,0"}, "chunk_schedule", "4..1000"),
    ({"chunk_schedule": "inf,1,1"}, "chunk_schedule", "4..1000"),
    ({"chunk_schedule": "1,1,1"}, "chunk_schedule", "4..1000"),
    ({"chunk_schedule": "8,nan,16"}, "chunk_schedule", "growth"),
    ({"chunk_schedule": "16,2,8"}, "chunk_schedule", "max"),
    ({"chunk_schedule": 12}, "chunk_schedule", "first"),
    ({"bogus": 1}, "bogus", "known"),
]


@pytest.mark.parametrize("options, field, allowed", BAD_OPTIONS)
def test_out_of_range_options_are_bad_field(daemon, options, field, allowed):
    with daemon.connect() as conn:
        _raw(conn, {"v": 1, "type": "speak", "id": "x", "text": "Hi.", "output": "stream", "options": options})
        err = wait_for(conn, p.Error, timeout=10)
        assert err.code == p.E_BAD_FIELD, err
        assert field in err.message and allowed in err.message and "\n" not in err.message
        # nothing was queued: the next request is answered at once
        conn.send(p.Speak(id="ok", text="Hi.", output="stream", options=FAST))
        assert until_done(conn, "ok")[-1].reason == "completed"


def test_options_at_their_bounds_are_accepted():
    # every numeric option has bounds (an option without one would raise KeyError, not bad_field)
    assert set(p.OPTION_RANGES) == set(p.SPEAK_OPTIONS) - {"chunk_schedule"}
    for name, (low, high) in p.OPTION_RANGES.items():
        for value in (low, high):
            assert p.check_option(name, value) == value
    assert p.check_option("chunk_schedule", "4,1,4") == "4,1,4"
    assert p.check_option("chunk_schedule", "24") == "24,2,48"
    assert p.check_option("chunk_schedule", "1000,10,1000") == "1000,10,1000"


@pytest.mark.parametrize("version", [True, 1.0, "1", 2, None])
def test_version_must_be_the_integer_1(daemon, version):
    with daemon.connect() as conn:
        body = {"type": "ping"} if version is None else {"v": version, "type": "ping"}
        _raw(conn, body)
        err = wait_for(conn, p.Error, timeout=10)
        assert err.code == p.E_VERSION
        _raw(conn, {"v": 1, "type": "ping", "ref": "good"})
        assert wait_for(conn, p.Pong, timeout=10).ref == "good"


def test_non_finite_floats_in_any_message_are_bad_field():
    with pytest.raises(p.ProtocolError) as err:
        p.decode_request({"v": 1, "type": "speak", "text": "x", "options": {"min_p": float("nan")}})
    assert err.value.code == p.E_BAD_FIELD and "min_p" in err.value.message


@pytest.mark.parametrize(
    "flag, value, cli",
    [
        ("--exaggeration", "nan", "nsay"),
        ("--temperature", "inf", "nsay"),
        ("--max-new-tokens", "0", "nsay"),
        ("--exaggeration", "nan", "synth"),
        ("--cfg-weight", "-1", "synth"),
        ("--max-new-tokens", "100000", "synth"),
        ("--exaggeration", "9", "voices"),
    ],
)
def test_clis_refuse_the_same_values(flag, value, cli, tmp_path):
    from .helpers.cli import NIGHTINGALE, NSAY

    if cli == "nsay":
        cmd = [*NSAY, "--socket", str(tmp_path / "none.sock"), "-o", str(tmp_path / "f.wav"), flag, value, "hi"]
    elif cli == "synth":
        cmd = [*NIGHTINGALE, "synth", "hi", "-o", str(tmp_path / "f.wav"), "--model", str(tmp_path / "none"), flag, value]
    else:
        cmd = [*NIGHTINGALE, "voices", "add", "carol", str(tmp_path / "none.wav"), flag, value]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0] and "must be" in lines[0], result.stderr
    assert not (tmp_path / "f.wav").exists()


# ----------------------------------------------------------------------------- files and permissions


def test_lock_is_never_a_followed_link_and_goes_away_on_clean_shutdown(tmp_path, tiny_checkpoint):
    from nightingale.daemon.binding import SocketBinding, UnsafeDirectory

    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    sock = tmp_path / "l.sock"
    (tmp_path / "l.sock.lock").symlink_to(victim)
    with pytest.raises(UnsafeDirectory, match="symbolic link"):
        SocketBinding(sock).bind()
    assert victim.read_text() == "precious\n" and not sock.exists()
    (tmp_path / "l.sock.lock").unlink()
    # A clean shutdown leaves neither the socket nor a lock holding a dead pid.
    d = DaemonThread(sock, tiny_factory(tiny_checkpoint)).start(wait_ready=False)
    assert (tmp_path / "l.sock.lock").read_text().strip() == str(os.getpid())
    assert d.stop() == 0
    assert sorted(x.name for x in tmp_path.iterdir()) == ["victim.txt"]


def test_socket_directory_writable_by_others_is_refused(tmp_path):
    from .helpers.cli import NIGHTINGALE

    shared = tmp_path / "shared"
    shared.mkdir()
    for mode in (0o777, 0o1777, 0o770):
        shared.chmod(mode)
        result = subprocess.run(
            [*NIGHTINGALE, "serve", "--socket", str(shared / "n.sock"), "--model", str(tmp_path / "none"), "--no-playback"],
            capture_output=True, text=True, timeout=TIMEOUT,
        )  # fmt: skip
        lines = [line for line in result.stderr.splitlines() if line.startswith("nightingale: ")]
        assert result.returncode == 1 and len(lines) == 1, result.stderr
        assert "other users can write" in lines[0] and str(shared) in lines[0]
        assert "Traceback" not in result.stderr and list(shared.iterdir()) == []


def _wait_until(predicate, timeout: float = TIMEOUT, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


# ----------------------------------------------------------------------------- limits


@pytest.fixture(scope="module")
def strict(tiny_checkpoint, tmp_path_factory):
    """A daemon with small limits, so each one is reached quickly."""
    d = DaemonThread(
        tmp_path_factory.mktemp("strict") / "s.sock",
        tiny_factory(tiny_checkpoint),
        max_connections=8,
        max_pending_bytes=2 << 20,
        frame_timeout_s=1.0,
        idle_timeout_s=1.5,
        slow_client_grace_s=30.0,
        socket_check_s=0.1,
        max_outbox_bytes=256 << 10,
    ).start()
    yield d
    assert d.stop() == 0


def _raw_client(path) -> tuple[socket.socket, p.FrameDecoder]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(TIMEOUT)
    s.connect(str(path))
    return s, p.FrameDecoder()


def _events(s: socket.socket, decoder: p.FrameDecoder, until=None) -> list[p.Event]:
    """Events until EOF (or until one satisfies `until`)."""
    out: list[p.Event] = []
    while True:
        for body in decoder.frames():
            out.append(p.decode_event(p.unpack_body(body)))
            if until is not None and until(out[-1]):
                return out
        data = s.recv(1 << 16)
        if not data:
            return out
        decoder.feed(data)


def test_connection_cap_answers_busy_and_frees_up(strict):
    held = [_raw_client(strict.path) for _ in range(8)]
    for s, dec in held:
        assert isinstance(_events(s, dec, until=lambda e: True)[0], p.Hello)
    s, dec = _raw_client(strict.path)
    events = _events(s, dec)
    assert len(events) == 1 and events[0].code == p.E_BUSY and "clients are connected" in events[0].message
    s.close()
    # client.connection.Connection (nsay's) retries a `busy` greeting: it gets in once a slot frees.
    errors = strict.daemon.telemetry.counters["errors"]
    got: list = []
    client = threading.Thread(target=lambda: got.append(strict.connect()))
    client.start()
    _wait_until(lambda: strict.daemon.telemetry.counters["errors"] > errors, what="the client to be refused once")
    held.pop()[0].close()
    client.join(TIMEOUT)
    with got[0] as c:
        assert request(c, p.Ping(), p.Pong).state == "ready"
    for s, _ in held:
        s.close()
    _wait_until(lambda: not strict.daemon.scheduler.peers, what="the clients to be gone")


def test_unfinished_frames_are_capped_in_bytes_and_time(strict):
    # Three clients each hold 0.9 MiB of a 1 MiB frame: together they pass the 2 MiB total,
    # and the one whose bytes cross it (whichever the daemon reads last) is told `busy`.
    clients = [_raw_client(strict.path) for _ in range(3)]
    for s, dec in clients:
        assert isinstance(_events(s, dec, until=lambda e: True)[0], p.Hello)
        try:
            s.sendall(p.HEADER.pack(1 << 20) + b"\x80" * (900 << 10))
        except BrokenPipeError:  # a dropped client may be closed before all of it is sent
            pass
    last = []
    for s, dec in clients:
        events = _events(s, dec)
        assert len(events) == 1 and isinstance(events[0], p.Error), events
        last.append(events[0])
        s.close()
    busy = [e for e in last if e.code == p.E_BUSY]
    assert len(busy) == 1 and "unfinished frames" in busy[0].message
    # The others never complete their frames: each is closed after the frame timeout.
    for e in last:
        assert e is busy[0] or (e.code == p.E_BAD_FRAME and "not completed within" in e.message), last
    _wait_until(lambda: strict.daemon.pending.total == 0, what="the buffers to be released")
    with strict.connect() as c:
        assert request(c, p.Ping(), p.Pong).state == "ready"


def test_idle_connections_time_out_but_busy_ones_do_not(strict):
    idle, dec = _raw_client(strict.path)
    events = _events(idle, dec)
    assert isinstance(events[0], p.Hello) and events[-1].code == p.E_IDLE
    idle.close()
    # A client waiting for a long utterance sends nothing for longer than the idle timeout.
    with strict.connect() as c:
        c.send(p.Speak(id="w", text="Hi.", output="stream", audio_format="s16le", options={**FAST, "n_timesteps": 30, "max_new_tokens": 20}))
        assert until_done(c, "w")[-1].reason == "completed"


def test_a_client_that_never_reads_gets_slow_client_then_is_dropped(strict):
    s, dec = _raw_client(strict.path)
    _events(s, dec, until=lambda e: True)
    # ~600 tokens of f32 audio: 2.3 MB, far more than the 256 KiB outbox and socket buffers
    text = " ".join([HEAVY_TEXT + "."] * 3)
    s.sendall(p.encode_frame(p.Speak(id="flood", text=text, output="stream", options={**FAST, "max_new_tokens": 400})))
    errors = strict.daemon.telemetry.counters["errors"]
    _wait_until(lambda: any(x.dropping for x in strict.daemon.scheduler.peers) or strict.daemon.telemetry.counters["errors"] > errors, what="the drop")
    events = _events(s, dec)  # read late: what was queued, then the documented error, then EOF
    assert isinstance(events[-1], p.Error) and events[-1].code == p.E_SLOW_CLIENT
    assert any(isinstance(e, p.Audio) for e in events)
    s.close()
    assert assert_idle(strict).current is None


def test_a_deleted_socket_is_recreated(strict):
    os.unlink(strict.path)
    _wait_until(lambda: strict.path.exists(), what="the socket to come back")
    with strict.connect() as c:
        assert request(c, p.Ping(), p.Pong).state == "ready"


def test_pause_is_released_when_its_client_leaves(strict):
    def paused() -> bool:
        with strict.connect() as c:
            return request(c, p.GetStatus(), p.Status).paused

    with strict.connect() as owner:
        request(owner, p.Pause(), p.Paused)
        assert paused()
    _wait_until(lambda: not paused(), what="the pause to be lifted")
    # A kept pause (nsay --pause) outlives its client until a resume.
    with strict.connect() as c:
        request(c, p.Pause(keep=True), p.Paused)
    assert paused()
    with strict.connect() as c:
        request(c, p.Resume(), p.Resumed)
    assert not paused()


# ----------------------------------------------------------------------------- conds.pt reader bounds


def _pt(path, pkl: bytes, records: dict | None = None):
    import zipfile

    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", pkl)
        for name, data in (records or {}).items():
            z.writestr(f"archive/{name}", data)
    return path


def _tensor_pickle(size: tuple[int, ...], stride: tuple[int, ...]) -> bytes:
    """Protocol-2 pickle of one tensor on storage "0" (one float), written opcode by opcode."""
    import struct

    def ints(values):
        return b"(" + b"".join(b"J" + struct.pack("<i", v) for v in values) + b"t"

    def text(s: str) -> bytes:
        return b"X" + struct.pack("<I", len(s)) + s.encode()

    pid = b"(" + text("storage") + b"ctorch\nFloatStorage\n" + text("0") + text("cpu") + b"K\x01tQ"
    return (
        b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(" + pid + b"K\x00" + ints(size) + ints(stride)
        + b"\x89ccollections\nOrderedDict\n)RtR."
    )  # fmt: skip


def test_zero_stride_tensor_is_refused_before_allocating(tmp_path):
    from nightingale.models import torchpickle as tp

    ok = _pt(tmp_path / "ok.pt", _tensor_pickle((3, 2), (0, 0)), {"data/0": b"\x00\x00\x80\x3f"})
    assert tp.load(ok).tolist() == [[1.0, 1.0]] * 3  # a legal broadcast view is still read
    # 2**30 elements from one float: 4 GiB if allocated.
    bomb = _pt(tmp_path / "bomb.pt", _tensor_pickle((1 << 15, 1 << 15), (0, 0)), {"data/0": b"\x00\x00\x80\x3f"})
    with pytest.raises(tp.TorchPickleError, match="would need 4294967296 bytes") as err:
        tp.load(bomb)
    assert "\n" not in str(err.value)


def test_zip_bomb_is_refused_from_its_declared_size(tmp_path, monkeypatch):
    from nightingale.models import torchpickle as tp

    monkeypatch.setattr(tp, "MAX_ARCHIVE_BYTES", 1 << 20)
    bomb = _pt(tmp_path / "zip.pt", _tensor_pickle((1,), (1,)), {"data/0": bytes(2 << 20)})
    assert bomb.stat().st_size < 20_000
    with pytest.raises(tp.TorchPickleError, match="unpacks to .* more than"):
        tp.load(bomb)


def test_deep_nesting_is_one_line(tmp_path):
    from nightingale.models import torchpickle as tp

    deep = 100_000
    nested = _pt(tmp_path / "deep.pt", b"\x80\x02" + b"]" * deep + b"a" * (deep - 1) + b".")
    with pytest.raises(tp.TorchPickleError, match="nested more than") as err:
        tp.load(nested)
    assert "\n" not in str(err.value)


def test_synth_with_a_refused_conds_pt_is_one_line(tmp_path, tiny_checkpoint):
    from .helpers.cli import NIGHTINGALE

    deep = 100_000
    bad = _pt(tmp_path / "bad.pt", b"\x80\x02" + b"]" * deep + b"a" * (deep - 1) + b".")
    out = tmp_path / "out.wav"
    result = subprocess.run(
        [*NIGHTINGALE, "synth", "hi", "-o", str(out), "--model", str(tiny_checkpoint), "--quantize", "none", "--voice", str(bad)],
        capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    lines = [line for line in result.stderr.splitlines() if "nightingale:" in line or "Traceback" in line]
    assert result.returncode == 2 and len(lines) == 1 and "nested" in lines[0], result.stderr
    assert not out.exists()


def test_nsay_pause_and_resume(strict):
    from .helpers.cli import NSAY

    def nsay(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*NSAY, "--socket", str(strict.path), *args], capture_output=True, text=True, timeout=TIMEOUT)

    def paused() -> bool:
        with strict.connect() as c:
            return request(c, p.GetStatus(), p.Status).paused

    assert nsay("--pause").returncode == 0
    assert paused()  # kept after nsay has left
    result = nsay("--pause", "some text")
    assert result.returncode == 2 and "take no text" in result.stderr
    assert nsay("--resume").returncode == 0
    assert not paused()
